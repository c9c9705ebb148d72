"""Checks of a task's Hugging Face `datasets` spec (tasks[i].data as a mapping, see
mftk.train.hf_data) and of what streaming rules out; each problem is a ConfigError naming its
dotted key. data_files are matched here (globs relative to the config's folder) and replaced by
{split: [files]}, so that the loader sees local files only."""

from __future__ import annotations

import importlib.util
from typing import Any

from mftk.train.config_errors import check, choice, match_files, resolve_path

# load_dataset's packaged builders that read local files: nothing to download
SOURCES = ("json", "csv", "parquet", "arrow")


def dataset(cfg: Any, i: int) -> None:
    """tasks[i].data as a datasets spec: source, data_files (matched), split / eval_split among
    the data_files' splits, shuffle_buffer, cache_dir, and the datasets package installed."""
    t, w = cfg.tasks[i], f"tasks[{i}].data"
    d = t.data
    check(
        importlib.util.find_spec("datasets") is not None,
        w,
        "a datasets spec needs the datasets package (pip install 'mftk[train]')",
    )
    choice(d.source, SOURCES, f"{w}.source")
    check(
        t.format != "csv",
        f"tasks[{i}].format",
        "csv reads files; a dataset's rows are records (data.source: csv reads csv files)",
    )
    files = d.data_files if isinstance(d.data_files, dict) else {"train": d.data_files}
    check(len(files) > 0, f"{w}.data_files", "needs at least one file or glob")
    resolved = {}
    for split, patterns in files.items():
        key = f"{w}.data_files" + (f".{split}" if isinstance(d.data_files, dict) else "")
        check(len(patterns) > 0, key, "needs at least one file or glob")
        resolved[split] = match_files(patterns, cfg.base_dir, key)
    choice(d.split, tuple(resolved), f"{w}.split")
    if d.eval_split is not None:
        check(
            isinstance(d.data_files, dict),
            f"{w}.eval_split",
            "needs data_files as {split: globs} (a list of data_files is the one split 'train')",
        )
        choice(d.eval_split, tuple(resolved), f"{w}.eval_split")
        check(d.eval_split != d.split, f"{w}.eval_split", f"is data.split ({d.split!r})")
    check(d.shuffle_buffer >= 0, f"{w}.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    if d.cache_dir is not None:
        d.cache_dir = resolve_path(d.cache_dir, cfg.base_dir)
    d.data_files = resolved
    t.files = sorted({f for fs in resolved.values() for f in fs})
    if d.streaming:
        check(
            t.type != "classify",
            f"{w}.streaming",
            "not for a classify task (its majority baseline counts every training label)",
        )


def streaming(cfg: Any) -> None:
    """With a streamed task the training data has no known length: no train.epochs or
    output.save_every_epoch, a mix in every stage, no swap_answer noise (it draws another
    sample of the task at random)."""
    streamed = [i for i, t in enumerate(cfg.tasks) if getattr(t.data, "streaming", False)]
    if not streamed:
        return
    w = f"tasks[{streamed[0]}].data.streaming"
    why = f"a streamed dataset ({w}: true) has no known length"
    check(cfg.train.epochs is None, "train.epochs", f"{why}; give train.steps")
    check(not cfg.output.save_every_epoch, "output.save_every_epoch", f"{why}; use save_every")
    for k, s in enumerate(cfg.stages):
        check(
            s.mix is not None,
            f"stages[{k}].mix",
            f"{why} to weight the natural task mix by; give stages: [{{steps: N, mix: "
            f"{{task: weight, ...}}}}]",
        )
        kind = s.noise_kind or cfg.data.noise_kind
        check(
            s.noise == 0 or kind != "swap_answer",
            f"stages[{k}].noise_kind",
            f"swap_answer draws a random sample of the task, which {w} cannot; use random_tokens",
        )
