"""Multi-task data: tokenize the records (mftk.train.records), mask prompts, split eval.

Each segment of a record is tokenized separately and concatenated, so the answer/prompt boundary
is exact in tokens; a segment that is the eos string alone becomes the eos id (MFTCoder appends
the id). A sample longer than data.seq_len is truncated (`data.overlong: truncate`, the mftk
template's default) or dropped (`drop`, the mftcoder template's default, as MFTCoder drops it);
either is counted, and a sample left with no loss token is dropped.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mftk.train.config import Config, DataConfig
from mftk.train.records import DataError, Example, read_examples

IGNORE = -100
DROP_NO_ANSWER = "no answer token within seq_len"
DROP_OVERLONG = "longer than data.seq_len (dropped)"


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
    truncated: int = 0  # samples cut to data.seq_len (data.overlong: truncate)


# ----------------------------------------------------------------------------- tokenizing


def special_strings(tokenizer: Any) -> tuple[str, str]:
    """(bos, eos) strings to put in the text: eos is required, bos optional."""
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer: needs an eos_token so that answers end")
    return tokenizer.bos_token or "", tokenizer.eos_token


def tokenize(
    examples: list[Example],
    tokenizer: Any,
    seq_len: int,
    overlong: str = "truncate",
    stats: Counter | None = None,
) -> tuple[list[Sample], int]:
    """Tokenize segment by segment (a segment that is the eos string alone becomes the eos id);
    a sample over seq_len tokens is truncated to seq_len (overlong "truncate") or dropped
    ("drop"); then a sample left with no loss token is dropped.

    returns (samples, number dropped); stats, when given, counts the dropped samples by reason
    (DROP_NO_ANSWER, DROP_OVERLONG) and the truncated ones under "truncated".
    """
    stats = Counter() if stats is None else stats
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    flat = [s for ex in examples for s, _ in ex.segments if s != eos]
    ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    out, dropped = [], 0
    for ex in examples:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_answer in ex.segments:
            seg = [eos_id] if text == eos else next(ids)
            input_ids.extend(seg)
            labels.extend(seg if is_answer else [IGNORE] * len(seg))
        if len(input_ids) > seq_len:
            if overlong == "drop":
                stats[DROP_OVERLONG] += 1
                dropped += 1
                continue
            stats["truncated"] += 1
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        # the first token is never a target (nothing precedes it): keep at least one later answer
        if ex.label < 0 and all(lab == IGNORE for lab in labels[1:]):
            stats[DROP_NO_ANSWER] += 1
            dropped += 1
            continue
        out.append(Sample(ex.task, input_ids, labels, ex.label))
    return out, dropped


def overlong_mode(data: DataConfig) -> str:
    """data.overlong, or the template's default: drop under mftcoder (as MFTCoder), else
    truncate."""
    if data.overlong is not None:
        return data.overlong
    return "drop" if data.template == "mftcoder" else "truncate"


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
        exs, skipped = read_examples(task, i, bos, eos, cfg.data.skip_bad_lines, cfg.data)
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
    overlong = overlong_mode(cfg.data)
    out = []
    for i, task in enumerate(cfg.tasks):
        stats: Counter = Counter()
        tr, _ = tokenize(trains[i], tokenizer, cfg.data.seq_len, overlong, stats)
        ev, _ = tokenize(evals[i], tokenizer, cfg.data.seq_len, overlong, stats)
        if not tr or not ev:
            raise DataError(
                f"tasks[{i}] ({task.name}): no sample fits data.seq_len={cfg.data.seq_len}"
                f" ({dict(stats)})"
            )
        truncated = stats.pop("truncated", 0)
        out.append(TaskData(task.name, tr, ev, Counter(skips[i]) + stats, truncated))
    return out


def corpus_files_text(examples: list[list[Example]]) -> list[str]:
    """Plain text of examples (for tokenizer training and base pretraining)."""
    return [ex.text() for exs in examples for ex in exs]


def describe(tasks: list[TaskData]) -> str:
    parts = []
    for t in tasks:
        n_tok = sum(len(s) for s in t.train)
        extra = f", skipped {sum(t.skipped.values())}" if t.skipped else ""
        extra += f", truncated {t.truncated} to data.seq_len" if t.truncated else ""
        parts.append(
            f"{t.name}: {len(t.train)} train / {len(t.eval)} eval samples, {n_tok} tokens{extra}"
        )
    return "; ".join(parts)
