"""Multi-task data: read jsonl / chat_rounds / csv records, tokenize, mask prompts, split eval.

Formats (per task, `format: auto` picks csv by extension and chat_rounds by the record's key):
- prompt_completion jsonl: `{"prompt": str, "completion": str}` (key names configurable).
- chat_rounds jsonl (MFTCoder): `{"chat_rounds": [{"role": "system"|"human"|"bot"
  (or "user"/"assistant"), "content": str}, ...]}`; only bot turns carry loss.
- csv: a header row; the task config names the completion column and either a prompt column or
  a `prompt_template` formatted with the row's columns.

Rendering (MFTCoder's template): chat turns become `<s>human\\n{content}\\n`, `<s>bot\\n` +
`{content}{eos}`; prompt/completion becomes `{bos}{prompt}` + `{completion}{eos}`. Each segment is
tokenized separately and concatenated, so the answer/prompt boundary is exact in tokens.

A malformed record raises `DataError("file:line: reason")`, or with `skip_bad_lines` is counted
and skipped.
"""

from __future__ import annotations

import csv
import json
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mftk.train.config import Config, TaskConfig

IGNORE = -100
ROLES = {"system": "system", "human": "human", "user": "human", "bot": "bot", "assistant": "bot"}


class DataError(ValueError):
    """A malformed data record; the message is `file:line: reason`."""


@dataclass
class Example:
    """One record as text: segments of (text, carries_loss); label: the class index of a
    classify task's record (its only segment is the prompt), -1 for generate tasks."""

    task: int
    segments: list[tuple[str, bool]]
    where: str  # "file:line"
    label: int = -1

    def text(self) -> str:
        return "".join(s for s, _ in self.segments)


@dataclass
class Sample:
    """One tokenized record. labels[i] = input_ids[i] where the token carries loss, else -100."""

    task: int
    input_ids: list[int]
    labels: list[int]
    cls_label: int = -1  # classify tasks: the class index (read on the last token); else -1

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TaskData:
    name: str
    train: list[Sample]
    eval: list[Sample]
    skipped: Counter = field(default_factory=Counter)  # reason -> count


# ----------------------------------------------------------------------------- reading records


def _chat_segments(rounds: Any, eos: str) -> list[tuple[str, bool]]:
    if not isinstance(rounds, list) or not rounds:
        raise ValueError("'chat_rounds' must be a non-empty list")
    segs: list[tuple[str, bool]] = []
    has_bot = False
    for k, turn in enumerate(rounds):
        if not isinstance(turn, dict):
            raise ValueError(f"chat_rounds[{k}] must be an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ValueError(f"chat_rounds[{k}].role: {role!r} is not one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"chat_rounds[{k}].content must be a string")
        role = ROLES[role]
        if role == "bot":
            if not content.strip():
                raise ValueError(f"chat_rounds[{k}]: empty bot content")
            segs.append(("<s>bot\n", False))
            segs.append((content + eos, True))
            has_bot = True
        else:
            segs.append((f"<s>{role}\n{content}\n", False))
    if not has_bot:
        raise ValueError("chat_rounds has no bot/assistant turn (nothing to learn)")
    return segs


def _pc_segments(prompt: Any, completion: Any, pk: str, ck: str, bos: str, eos: str):
    if not isinstance(prompt, str):
        raise ValueError(f"'{pk}' must be a string, got {type(prompt).__name__}")
    if not isinstance(completion, str):
        raise ValueError(f"'{ck}' must be a string, got {type(completion).__name__}")
    if not completion.strip():
        raise ValueError(f"empty '{ck}'")
    return [(bos + prompt, False), (completion + eos, True)]


def _answer_key(task: TaskConfig) -> str:
    return task.label if task.type == "classify" else task.completion


def _record_segments(task: TaskConfig, prompt: Any, rec: dict, bos: str, eos: str):
    """Segments of a prompt/completion record, or (segments, label index) for classify tasks:
    the prompt alone, no loss token (the head's cross-entropy is the task's loss)."""
    if task.type != "classify":
        return _pc_segments(prompt, rec[task.completion], task.prompt, task.completion, bos, eos)
    if not isinstance(prompt, str):
        raise ValueError(f"'{task.prompt}' must be a string, got {type(prompt).__name__}")
    value = rec[task.label]
    if not isinstance(value, str) or value not in task.labels:
        raise ValueError(f"label {value!r} in '{task.label}' is not one of {task.labels}")
    return [(bos + prompt, False)], task.labels.index(value)


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _read_jsonl(path: str, task: TaskConfig, fmt: str, bos: str, eos: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                kind = fmt
                if kind == "auto":
                    kind = "chat_rounds" if "chat_rounds" in rec else "prompt_completion"
                if kind == "chat_rounds":
                    if "chat_rounds" not in rec:
                        raise ValueError("missing key 'chat_rounds'")
                    segs = _chat_segments(rec["chat_rounds"], eos)  # "<s>role\n" opens each turn
                else:
                    for key in (_answer_key(task),) + (
                        () if task.prompt_template else (task.prompt,)
                    ):
                        if key not in rec:
                            raise ValueError(f"missing key '{key}'")
                    prompt = (
                        _format(task.prompt_template, rec)
                        if task.prompt_template
                        else rec[task.prompt]
                    )
                    segs = _record_segments(task, prompt, rec, bos, eos)
            except ValueError as err:
                yield where, err
                continue
            yield where, segs


def _format(template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        raise ValueError(
            f"prompt_template needs field {err.args[0]!r}, not in the record"
        ) from None


def _read_csv(path: str, task: TaskConfig, bos: str, eos: str):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}:1: empty csv file (needs a header row)") from None
        needed = [_answer_key(task)] + (
            _template_fields(task.prompt_template) if task.prompt_template else [task.prompt]
        )
        for col in needed:
            if col not in header:
                raise DataError(f"{path}:1: missing column '{col}' (header has {header})")
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                yield f"{path}:{start}", ValueError(f"csv parse error: {err}")
                start = reader.line_num + 1
                continue
            where, start = f"{path}:{start}", reader.line_num + 1
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                yield where, ValueError(f"expected {len(header)} fields, got {len(row)}")
                continue
            rec = dict(zip(header, row))
            try:
                prompt = (
                    _format(task.prompt_template, rec) if task.prompt_template else rec[task.prompt]
                )
                segs = _record_segments(task, prompt, rec, bos, eos)
            except ValueError as err:
                yield where, err
                continue
            yield where, segs


def read_examples(
    task: TaskConfig, task_index: int, bos: str, eos: str, skip_bad_lines: bool = False
) -> tuple[list[Example], Counter]:
    """All records of one task's files as Examples; returns (examples, skipped-reason counts)."""
    out: list[Example] = []
    skipped: Counter = Counter()
    for path in task.files:
        fmt = task.format
        if fmt == "auto":
            fmt = "csv" if path.lower().endswith(".csv") else "auto"
        reader = (
            _read_csv(path, task, bos, eos)
            if fmt == "csv"
            else _read_jsonl(path, task, fmt, bos, eos)
        )
        try:
            for where, item in reader:
                if isinstance(item, Exception):
                    if not skip_bad_lines:
                        raise DataError(f"{where}: {item}")
                    skipped[str(item).split(" (")[0]] += 1
                    continue
                segs, label = item if isinstance(item, tuple) else (item, -1)
                out.append(Example(task_index, segs, where, label))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not out:
        raise DataError(f"tasks[{task_index}] ({task.name}): no usable records in {task.files}")
    return out, skipped


# ----------------------------------------------------------------------------- tokenizing


def special_strings(tokenizer: Any) -> tuple[str, str]:
    """(bos, eos) strings to put in the text: eos is required, bos optional."""
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer: needs an eos_token so that answers end")
    return tokenizer.bos_token or "", tokenizer.eos_token


def tokenize(examples: list[Example], tokenizer: Any, seq_len: int) -> tuple[list[Sample], int]:
    """Tokenize segment by segment; truncate to seq_len; drop samples left with no loss token.

    returns (samples, number dropped).
    """
    flat = [s for ex in examples for s, _ in ex.segments]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, dropped, k = [], 0, 0
    for ex in examples:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, is_answer in ex.segments:
            seg = ids[k]
            k += 1
            input_ids.extend(seg)
            labels.extend(seg if is_answer else [IGNORE] * len(seg))
        input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        # the first token is never a target (nothing precedes it): keep at least one later answer
        if ex.label < 0 and all(lab == IGNORE for lab in labels[1:]):
            dropped += 1
            continue
        out.append(Sample(ex.task, input_ids, labels, ex.label))
    return out, dropped


def split_eval(items: list, fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """Deterministic (train, eval) split: at least one of each."""
    if len(items) < 2:
        raise ValueError(f"need at least 2 records to split off an eval set, got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(fraction * len(items))), max_eval, len(items) - 1)
    ev = sorted(order[:n_eval])
    tr = sorted(order[n_eval:])
    return [items[i] for i in tr], [items[i] for i in ev]


def load_examples(
    cfg: Config, bos: str, eos: str
) -> tuple[list[list[Example]], list[list[Example]], list[Counter]]:
    """Per task: (train examples, eval examples, skipped counts), split before tokenizing.
    bos, eos: the tokenizer's special strings (see special_strings)."""
    trains, evals, skips = [], [], []
    for i, task in enumerate(cfg.tasks):
        exs, skipped = read_examples(task, i, bos, eos, cfg.data.skip_bad_lines)
        try:
            tr, ev = split_eval(
                exs, cfg.data.eval_fraction, cfg.data.eval_max_samples, cfg.train.seed + i
            )
        except ValueError as err:
            raise DataError(f"tasks[{i}].data: {err}") from None
        trains.append(tr)
        evals.append(ev)
        skips.append(skipped)
    return trains, evals, skips


def build_task_data(cfg: Config, tokenizer: Any, examples=None) -> list[TaskData]:
    """Read, split and tokenize every task's data (examples: a load_examples result to reuse)."""
    if examples is None:
        examples = load_examples(cfg, *special_strings(tokenizer))
    trains, evals, skips = examples
    out = []
    for i, task in enumerate(cfg.tasks):
        tr, d1 = tokenize(trains[i], tokenizer, cfg.data.seq_len)
        ev, d2 = tokenize(evals[i], tokenizer, cfg.data.seq_len)
        if not tr or not ev:
            raise DataError(
                f"tasks[{i}] ({task.name}): no sample fits data.seq_len={cfg.data.seq_len}"
            )
        skipped = Counter(skips[i])
        if d1 + d2:
            skipped["no answer token within seq_len"] += d1 + d2
        out.append(TaskData(task.name, tr, ev, skipped))
    return out


def corpus_files_text(examples: list[list[Example]]) -> list[str]:
    """Plain text of examples (for tokenizer training and base pretraining)."""
    return [ex.text() for exs in examples for ex in exs]


def describe(tasks: list[TaskData]) -> str:
    parts = []
    for t in tasks:
        n_tok = sum(len(s) for s in t.train)
        extra = f", skipped {sum(t.skipped.values())}" if t.skipped else ""
        parts.append(
            f"{t.name}: {len(t.train)} train / {len(t.eval)} eval samples, {n_tok} tokens{extra}"
        )
    return "; ".join(parts)
