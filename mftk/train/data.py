"""Multi-task data: tokenize the records (mftk.train.records), mask prompts, split eval.

Each segment of a record is tokenized separately and concatenated, so the answer/prompt boundary
is exact in tokens; a segment that is the eos string alone becomes the eos id (MFTCoder appends
the id). A sample longer than data.seq_len is truncated (`data.overlong: truncate`, the mftk
template's default) or dropped (`drop`, the mftcoder template's default, as MFTCoder drops it);
either is counted, and a sample left with no loss token is dropped.

A task read from a streamed dataset (mftk.train.hf_data) trains from a SampleStream instead of
a list: its rows are rendered and tokenized a chunk at a time as the sampler draws them.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mftk.train.config import Config, DataConfig
from mftk.train.hf_data import RowStream, load_task
from mftk.train.records import DataError, Example, Render, read_examples

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
    train: list[Sample] | SampleStream
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


class SampleStream:
    """A streamed task's training samples (hf_data.RowStream), drawn one at a time, pass after
    pass: CHUNK rows at a time are rendered and tokenized as `tokenize` does (a bad row is a
    DataError at its row, or with data.skip_bad_lines skipped; overlong and answerless samples
    dropped or truncated). Only the chunk and the row stream's shuffle buffer are in memory.
    The position, state_dict(): the pass, the rows read before the current chunk, and the
    samples taken from it; a loaded position reads that chunk again."""

    CHUNK = 64

    def __init__(
        self, rows: RowStream, tokenizer: Any, seq_len: int, overlong: str, data: DataConfig
    ) -> None:
        self.rows, self.tokenizer, self.seq_len, self.overlong = rows, tokenizer, seq_len, overlong
        self.skip_bad = data.skip_bad_lines
        self.load_state_dict({"epoch": 0, "start": 0, "taken": 0})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start, self.taken = state["epoch"], state["start"], state["taken"]
        self._items = None  # the pass's iterator, opened at self.start
        self._chunk: list[Sample] | None = None  # the current chunk's samples
        self._size = 0  # the rows it was read from
        self._fresh = self.start == 0 and self.taken == 0  # nothing drawn yet in this pass

    def check(self) -> None:
        """Read the first sample and go back: a stream with nothing to train on fails here."""
        state = self.state_dict()
        self.next()
        self.load_state_dict(state)

    def next(self) -> Sample:
        while self._chunk is None or self.taken == len(self._chunk):
            if self._chunk is not None:  # used up: the next chunk
                self.start, self.taken = self.start + self._size, 0
            self._read_chunk()
        self._fresh = False
        self.taken += 1
        return self._chunk[self.taken - 1]

    def _read_chunk(self) -> None:
        if self._items is None:
            self._items = self.rows.items(self.epoch, self.start)
        items = list(itertools.islice(self._items, self.CHUNK))
        if not items:  # the pass is over: the next one, shuffled anew
            if self._fresh:
                raise DataError(f"{self.rows.where}: no row to train on (after skipped ones)")
            self.epoch, self.start, self.taken = self.epoch + 1, 0, 0
            self.load_state_dict(self.state_dict())
            self._chunk = []
            return
        examples = []
        for item in items:
            if isinstance(item, Example):
                examples.append(item)
            elif not self.skip_bad:
                raise DataError(f"{item[0]}: {item[1]}")
        self._chunk, _ = tokenize(examples, self.tokenizer, self.seq_len, self.overlong)
        self._size = len(items)


def load_examples(
    cfg: Config, bos: str, eos: str
) -> tuple[list[list[Example]], list[list[Example]], list[Counter]]:
    """Per task: (train examples, or a streamed task's hf_data.RowStream; eval examples;
    skipped counts), split before tokenizing. bos, eos: the tokenizer's special strings (see
    special_strings)."""
    trains, evals, skips = [], [], []
    for i, task in enumerate(cfg.tasks):
        if not isinstance(task.data, list):  # a datasets spec (hf_data)
            r = Render.of(cfg.data, bos, eos)
            exs, ev, skipped = load_task(task, i, r, cfg.data, cfg.train.seed)
            if ev is not None:
                trains.append(exs)
                evals.append(ev)
                skips.append(skipped)
                continue
        else:
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
        if isinstance(trains[i], RowStream):
            tr = SampleStream(trains[i], tokenizer, cfg.data.seq_len, overlong, cfg.data)
            tr.check()
        else:
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
        extra = f", skipped {sum(t.skipped.values())}" if t.skipped else ""
        extra += f", truncated {t.truncated} to data.seq_len" if t.truncated else ""
        if isinstance(t.train, SampleStream):
            parts.append(f"{t.name}: streamed train / {len(t.eval)} eval samples{extra}")
            continue
        n_tok = sum(len(s) for s in t.train)
        parts.append(
            f"{t.name}: {len(t.train)} train / {len(t.eval)} eval samples, {n_tok} tokens{extra}"
        )
    return "; ".join(parts)
