"""Tasks whose data is a Hugging Face `datasets` spec over local files (tasks[i].data as a
mapping: config.DatasetConfig, checked by mftk.train.checks_data):

    data: {source: parquet, data_files: ./review/*.parquet, split: train, streaming: true}

load_dataset(source, data_files, split, streaming) reads local json / jsonl / csv / parquet /
arrow files; nothing is downloaded. Each row is read as a jsonl line's record is
(records.render_record: the task's prompt / completion keys or prompt_template, chat_rounds,
MFTCoder's formats under data.template: mftcoder), and a bad row's error says where it is:
`tasks[i].data (parquet split 'train'):row N`, N counted from 0 as `dataset[N]`. The datasets
package is imported here, and only when such a task is read.

Without streaming the split is loaded (memory-mapped arrow, cached under cache_dir) and read
whole, as a task's files are: its eval rows are eval_split's first data.eval_max_samples, else
data.eval_fraction of the split, split off as for files. With streaming the training split is
an IterableDataset read only as training draws from it (RowStream here, tokenized a chunk at a
time by data.SampleStream): the eval rows are eval_split's first data.eval_max_samples rows,
else the split's own first data.eval_max_samples rows, which training then skips; each pass over
the rest is shuffled in a buffer of shuffle_buffer rows, seeded by train.seed, the task and the
pass, so that a resumed run reads the same rows in the same order.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from mftk.train.config import DataConfig, TaskConfig
from mftk.train.records import DataError, Example, Render, render_record

Row = tuple[int, dict]  # (row index in the split, record)


def load_split(task: TaskConfig, index: int, split: str) -> Any:
    """The task's split as a datasets Dataset, or an IterableDataset under streaming."""
    import datasets

    spec = task.data
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            spec.source,
            data_files=spec.data_files,
            split=split,
            streaming=spec.streaming,
            cache_dir=spec.cache_dir,
        )
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        cause = err.__cause__ or err
        raise DataError(f"{label(task, index, split)}: cannot load ({cause})") from None


def label(task: TaskConfig, index: int, split: str) -> str:
    """Where a task's dataset rows come from, as errors name it: tasks[i].data (source split)."""
    return f"tasks[{index}].data ({task.data.source} split {split!r})"


def indexed(ds: Iterable[dict], where: str, start: int = 0) -> Iterator[Row]:
    """(row index, record) from ds; a row the loader cannot parse is a DataError at its row."""
    it, n = iter(ds), start
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except (ValueError, OSError) as err:  # pyarrow's parse errors are ValueErrors
            raise DataError(f"{where}:row {n}: cannot read ({err})") from None
        yield n, rec
        n += 1


def render_row(row: Row, task: TaskConfig, index: int, where: str, r: Render) -> Example:
    """A row as an Example of task `index` (its location: where:row N); ValueError when it
    cannot be read."""
    n, rec = row
    item = render_record(rec, task, task.format, r)
    segs, lab = item if isinstance(item, tuple) else (item, -1)
    return Example(index, segs, f"{where}:row {n}", lab)


def read_rows(
    rows: Iterable[Row], task: TaskConfig, index: int, where: str, r: Render, skip_bad: bool
) -> tuple[list[Example], Counter]:
    """Rows as Examples; a bad row is a DataError, or with skip_bad counted and skipped."""
    out: list[Example] = []
    skipped: Counter = Counter()
    for row in rows:
        try:
            out.append(render_row(row, task, index, where, r))
        except ValueError as err:
            if not skip_bad:
                raise DataError(f"{where}:row {row[0]}: {err}") from None
            skipped[str(err).split(" (")[0]] += 1
    return out, skipped


class RowStream:
    """A streamed task's training rows, pass after pass.

    items(epoch, start): the rows of pass `epoch` (after the first `skip` rows of the split,
    held out for eval) in buffer-shuffled order, from the start-th on (the ones before are read
    but not rendered: a resumed run's position), each as an Example or, for a row that cannot
    be read, (its location, the ValueError).
    """

    def __init__(
        self, ds: Any, task: TaskConfig, index: int, r: Render, skip: int, seed: int
    ) -> None:
        self.ds, self.task, self.index, self.r = ds, task, index, r
        self.skip, self.seed = skip, seed
        self.where = label(task, index, task.data.split)

    def rows(self, epoch: int) -> Iterator[Row]:
        rows = itertools.islice(indexed(self.ds, self.where), self.skip, None)
        rng = random.Random(f"{self.seed}:{self.index}:{epoch}")
        return shuffled(rows, self.task.data.shuffle_buffer, rng)

    def items(self, epoch: int, start: int) -> Iterator[Example | tuple[str, ValueError]]:
        for row in itertools.islice(self.rows(epoch), start, None):
            try:
                yield render_row(row, self.task, self.index, self.where, self.r)
            except ValueError as err:
                yield f"{self.where}:row {row[0]}", err


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A buffer shuffle (datasets' IterableDataset.shuffle): each item out is a random one of the
    `size` held; size 0: in order."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = x
    rng.shuffle(buf)
    yield from buf


def load_task(
    task: TaskConfig, index: int, r: Render, data: DataConfig, seed: int
) -> tuple[list[Example] | RowStream, list[Example] | None, Counter]:
    """(training examples, or a RowStream under streaming; eval examples, or None where the
    caller splits them off the training ones as for files; skipped-row counts)."""
    spec, skip_bad, n_eval = task.data, data.skip_bad_lines, data.eval_max_samples
    where = label(task, index, spec.split)
    ds = load_split(task, index, spec.split)
    ev, skipped = None, Counter()
    if spec.eval_split is not None:
        ev_where = label(task, index, spec.eval_split)
        ev_rows = itertools.islice(
            indexed(load_split(task, index, spec.eval_split), ev_where), n_eval
        )
        ev, skipped = read_rows(ev_rows, task, index, ev_where, r, skip_bad)
    elif spec.streaming:
        ev_rows = itertools.islice(indexed(ds, where), n_eval)
        ev, skipped = read_rows(ev_rows, task, index, where, r, skip_bad)
    if ev is not None and not ev:
        raise DataError(f"{where}: no usable eval rows")
    if spec.streaming:
        held_out = 0 if spec.eval_split is not None else n_eval
        return RowStream(ds, task, index, r, held_out, seed), ev, skipped
    train, sk = read_rows(indexed(ds, where), task, index, where, r, skip_bad)
    if not train:
        raise DataError(f"{where}: no usable records")
    return train, ev, skipped + sk
