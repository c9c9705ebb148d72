"""Reading records: jsonl / chat_rounds / csv files into Examples (text segments with loss flags).

Formats (per task, `format: auto` picks csv by extension and chat_rounds by the record's key):
- prompt_completion jsonl: `{"prompt": str, "completion": str}` (key names configurable).
- chat_rounds jsonl (MFTCoder): `{"chat_rounds": [{"role": "system"|"human"|"bot"
  (or "user"/"assistant"/"gpt"), "content": str}, ...]}`; only bot turns carry loss.
- csv: a header row; the task config names the completion column and either a prompt column or
  a `prompt_template` formatted with the row's columns.

Rendering, `data.template: mftk` (the default): chat turns become `<s>human\\n{content}\\n`,
`<s>bot\\n` + `{content}{eos}`; prompt/completion becomes `{bos}{prompt}` + `{completion}{eos}`.
`data.template: mftcoder` renders as MFTCoder does, token for token, and also reads its
prompt/answer (+ system) and text records; `format: auto` then detects the format as MFTCoder
does (see mftk.train.mftcoder_format). Classify tasks read `{bos}{prompt}` under either.

A malformed record raises `DataError("file:line: reason")`, or with `skip_bad_lines` is counted
and skipped. render_record reads one record; mftk.train.hf_data reads a datasets row with it.
"""

from __future__ import annotations

import csv
import json
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mftk.train.config import DataConfig, TaskConfig
from mftk.train.mftcoder_format import markers_of, pair_segments, record_kind, record_segments

ROLES = {
    "system": "system",
    "human": "human",
    "user": "human",
    "bot": "bot",
    "assistant": "bot",
    "gpt": "bot",
}


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


# ----------------------------------------------------------------------------- reading records


@dataclass
class Render:
    """How records become text: the tokenizer's bos/eos strings, the template (mftk | mftcoder)
    and, for mftcoder, the role markers (mftcoder_format.markers_of)."""

    bos: str
    eos: str
    template: str = "mftk"
    markers: dict[str, str] = field(default_factory=lambda: markers_of(None))

    @classmethod
    def of(cls, data: DataConfig, bos: str, eos: str) -> Render:
        return cls(bos, eos, data.template, markers_of(data.role_markers))


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


def _record_segments(task: TaskConfig, prompt: Any, rec: dict, r: Render):
    """Segments of a prompt/completion record, or (segments, label index) for classify tasks:
    the prompt alone, no loss token (the head's cross-entropy is the task's loss)."""
    if task.type != "classify":
        keys = (task.prompt, task.completion)
        if r.template == "mftcoder":
            return pair_segments(rec.get("system"), prompt, rec[keys[1]], keys, r.eos, r.markers)
        return _pc_segments(prompt, rec[task.completion], *keys, r.bos, r.eos)
    if not isinstance(prompt, str):
        raise ValueError(f"'{task.prompt}' must be a string, got {type(prompt).__name__}")
    value = rec[task.label]
    if not isinstance(value, str) or value not in task.labels:
        raise ValueError(f"label {value!r} in '{task.label}' is not one of {task.labels}")
    return [(r.bos + prompt, False)], task.labels.index(value)


def _plain(task: TaskConfig) -> bool:
    """A generate task without a prompt_template: its records are read by their own keys."""
    return task.type != "classify" and not task.prompt_template


def _mftcoder_hint(rec: dict) -> str:
    """A hint for an MFTCoder-style record read under the mftk template."""
    try:
        kind = record_kind(rec)
    except ValueError:
        return ""
    if kind == "chat_rounds":
        return ""
    return " (an MFTCoder record: set data.template: mftcoder to read it as MFTCoder does)"


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _read_jsonl(path: str, task: TaskConfig, fmt: str, r: Render):
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
                except RecursionError:
                    raise ValueError("invalid JSON (nested too deeply)") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                segs = render_record(rec, task, fmt, r)
            except ValueError as err:
                yield where, err
                continue
            yield where, segs


def render_record(rec: dict, task: TaskConfig, fmt: str, r: Render):
    """One record (a jsonl line's object, or a datasets row) as segments, or (segments, label
    index) for classify tasks. fmt: auto | prompt_completion | chat_rounds. ValueError: why the
    record cannot be read (the caller adds its location)."""
    kind = fmt
    if kind == "auto":
        kind = "chat_rounds" if "chat_rounds" in rec else "prompt_completion"
    if r.template == "mftcoder" and kind != fmt and _plain(task):
        # auto: MFTCoder's detection, then the task's own prompt/completion keys
        kind = record_kind(rec, (task.prompt, task.completion))
        return record_segments(rec, kind, r.eos, r.markers)
    if kind == "chat_rounds":
        if "chat_rounds" not in rec:
            raise ValueError("missing key 'chat_rounds'")
        if r.template == "mftcoder":
            return record_segments(rec, kind, r.eos, r.markers)
        return _chat_segments(rec["chat_rounds"], r.eos)  # "<s>role\n" opens each turn
    for key in (_answer_key(task),) + (() if task.prompt_template else (task.prompt,)):
        if key not in rec:
            raise ValueError(f"missing key '{key}'{_mftcoder_hint(rec)}")
    prompt = _format(task.prompt_template, rec) if task.prompt_template else rec[task.prompt]
    return _record_segments(task, prompt, rec, r)


def _format(template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        raise ValueError(
            f"prompt_template needs field {err.args[0]!r}, not in the record"
        ) from None


def _read_csv(path: str, task: TaskConfig, r: Render):
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
                segs = _record_segments(task, prompt, rec, r)
            except ValueError as err:
                yield where, err
                continue
            yield where, segs


def read_examples(
    task: TaskConfig,
    task_index: int,
    bos: str,
    eos: str,
    skip_bad_lines: bool = False,
    data: DataConfig | None = None,
) -> tuple[list[Example], Counter]:
    """All records of one task's files as Examples; returns (examples, skipped-reason counts).
    data: the template and role markers (default: the mftk template)."""
    r = Render.of(data or DataConfig(), bos, eos)
    out: list[Example] = []
    skipped: Counter = Counter()
    for path in task.files:
        fmt = task.format
        if fmt == "auto":
            fmt = "csv" if path.lower().endswith(".csv") else "auto"
        reader = _read_csv(path, task, r) if fmt == "csv" else _read_jsonl(path, task, fmt, r)
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
