"""`mftk scan`: run a task's classification head over a codebase, function by function.

    mftk scan --adapters examples/tiny/out/adapters --task bug_detection examples/

Python files are split into functions and methods with the standard library's `ast` (a file that
does not parse, or has no function, falls back to windows); files of other extensions into
fixed-size line windows with overlap. Every unit is rendered the way the trainer rendered the
task's samples (the head's prompt_template, bos and seq_len stored in mftk_config.json),
classified in batches, and listed in a table sorted by score (printed; also written as JSON
with --output, and as text with --table: nothing is written without a path).
score = 1 - P(negative label), the negative label being the head's first label unless
--negative says otherwise (for labels [ok, bug]: P(bug)).
`--fail-above S` exits 1 when any unit scores above S, so that the scan can gate CI.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import string
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from mftk.checkpoint import from_pretrained, read_config
from mftk.heads import classify

DEFAULT_EXTS = (".py", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".go", ".rs", ".rb", ".sh")
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", "build", "dist", ".tox"}


@dataclass
class Unit:
    """One piece of code to classify: a function, or a window of lines (1-based, inclusive)."""

    file: str
    function: str
    line: int
    end_line: int
    text: str


def collect_files(paths: list[str], exts: tuple[str, ...]) -> list[str]:
    """Files under paths (files given directly are kept whatever their extension), sorted;
    hidden and build folders are skipped. Raises FileNotFoundError for a missing path."""
    out: list[str] = []
    for p in paths:
        if os.path.isfile(p):
            out.append(p)
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
                out += [os.path.join(root, f) for f in sorted(files) if f.endswith(exts)]
        else:
            raise FileNotFoundError(f"PATH: {p} does not exist")
    return sorted(dict.fromkeys(out))


def python_units(path: str, source: str) -> list[Unit] | None:
    """One Unit per function / method (qualified name, e.g. `Stack.push`, nested `f.<locals>.g`);
    None when the file does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    lines = source.splitlines()
    units: list[Unit] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                end = child.end_lineno or child.lineno
                name = prefix + child.name
                units.append(Unit(path, name, start, end, "\n".join(lines[start - 1 : end])))
                visit(child, name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return units


def window_units(path: str, source: str, window: int, overlap: int) -> list[Unit]:
    """Fixed windows of `window` lines, each starting `window - overlap` lines after the last."""
    lines = source.splitlines()
    step = window - overlap
    units = []
    for start in range(0, max(len(lines), 1), step):
        chunk = lines[start : start + window]
        if any(x.strip() for x in chunk):
            end = start + len(chunk)
            units.append(Unit(path, f"<lines {start + 1}-{end}>", start + 1, end, "\n".join(chunk)))
        if start + window >= len(lines):
            break
    return units


def split_file(path: str, window: int = 40, overlap: int = 10) -> list[Unit]:
    """The units of one file (see the module docstring); unreadable files give none."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (UnicodeDecodeError, OSError):
        return []
    if path.endswith(".py"):
        units = python_units(path, source)
        if units:  # a script without functions (or that does not parse) goes by windows
            return units
    return window_units(path, source, window, overlap)


def render(text: str, meta: dict[str, Any]) -> str:
    """The model input for a unit, as the trainer rendered this task: bos + prompt_template with
    the code in its single field (or the code alone without a template)."""
    tpl = meta.get("prompt_template")
    bos = meta.get("bos", "")
    if not tpl:
        return bos + text
    fields = [f for _, f, _, _ in string.Formatter().parse(tpl) if f]
    return bos + tpl.format(**{f: text for f in fields})


def load_classifier(adapters: str, task: str, base: str | None, tokenizer: str | None, device):
    """(model, tokenizer, head meta) for a save_adapters folder with a head for task."""
    cfg = read_config(adapters)
    if task not in cfg.tasks:
        raise ValueError(f"--task: {task!r} is not a task of {adapters} ({cfg.tasks})")
    if task not in cfg.heads:
        raise ValueError(
            f"--task: {task!r} has no classification head in {adapters} "
            f"(tasks with heads: {sorted(cfg.heads)}); train it as `type: classify`"
        )
    base = base or cfg.base_model
    if not base or not os.path.isdir(base):
        raise ValueError(f"--base: base model dir {base!r} not found; pass --base DIR")
    tok_dir = tokenizer
    if tok_dir is None:
        for cand in (adapters, base):
            if os.path.isfile(os.path.join(cand, "tokenizer.json")) or os.path.isfile(
                os.path.join(cand, "tokenizer_config.json")
            ):
                tok_dir = cand
                break
    if tok_dir is None:
        raise ValueError(f"--tokenizer: no tokenizer in {adapters} or {base}; pass --tokenizer DIR")
    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(base)
    from_pretrained(model, adapters)
    model.to(device).eval()
    return model, tok, cfg.heads[task]


def classify_units(
    model, tok, task: str, meta: dict[str, Any], units: list[Unit], batch_size: int, device,
    progress: bool = True,
) -> list[list[float]]:  # fmt: skip
    """Class probabilities per unit, in batches (right-padded, truncated like the trainer)."""
    seq_len = int(meta.get("seq_len") or 0) or None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out: list[list[float]] = []
    bar = tqdm(total=len(units), desc="scan", unit="fn", disable=not progress, file=sys.stderr)
    for i in range(0, len(units), batch_size):
        chunk = units[i : i + batch_size]
        ids = tok([render(u.text, meta) for u in chunk], add_special_tokens=False)["input_ids"]
        ids = [x[:seq_len] if seq_len else x for x in ids]
        ids = [x or [pad] for x in ids]
        width = max(len(x) for x in ids)
        inp = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            inp[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        probs = classify(model, task, inp.to(device), mask.to(device))
        out += probs.float().cpu().tolist()
        bar.update(len(chunk))
    bar.close()
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: file, function, line, label, score."""
    head = ("file", "function", "line", "label", "score")
    cells = [
        (r["file"], r["function"], str(r["line"]), r["label"], f"{r['score']:.3f}") for r in rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'>' if i in (2, 4) else '<'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*c) for c in cells]
    return "\n".join(lines)


def scan(
    paths: list[str],
    adapters: str,
    task: str,
    base: str | None = None,
    tokenizer: str | None = None,
    exts: tuple[str, ...] = DEFAULT_EXTS,
    window: int = 40,
    overlap: int = 10,
    batch_size: int = 16,
    device: str = "auto",
    negative: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scan paths; returns the report {"task", "labels", "negative", "files", "units": [...]},
    units sorted by score (highest first), each {file, function, line, end_line, label, score,
    probs: {label: p}}."""

    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"--window/--overlap: need window >= 1 and 0 <= overlap < window, "
                         f"got {window}/{overlap}")  # fmt: skip
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    files = collect_files(paths, exts)
    units = [u for f in files for u in split_file(f, window, overlap)]
    model, tok, meta = load_classifier(adapters, task, base, tokenizer, torch.device(device))
    labels = list(meta["labels"])
    neg = labels[0] if negative is None else negative
    if neg not in labels:
        raise ValueError(f"--negative: {neg!r} is not one of the head's labels {labels}")
    probs = classify_units(model, tok, task, meta, units, batch_size, device, progress)
    rows = []
    for u, p in zip(units, probs):
        k = max(range(len(labels)), key=p.__getitem__)
        d = asdict(u)
        d.pop("text")
        d.update(label=labels[k], score=1.0 - p[labels.index(neg)],
                 probs=dict(zip(labels, p)))  # fmt: skip
        rows.append(d)
    rows.sort(key=lambda r: (-r["score"], r["file"], r["line"]))
    return {"task": task, "labels": labels, "negative": neg, "files": len(files), "units": rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to scan")
    p.add_argument(
        "--adapters", required=True, help="an mftk adapter folder (mftk train's out/adapters)"
    )
    p.add_argument("--task", required=True, help="a task trained with `type: classify`")
    p.add_argument("--base", help="base model dir (default: the one recorded in the adapters)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the adapters, then the base dir)")
    p.add_argument("--ext", nargs="+", default=list(DEFAULT_EXTS),
                   help="file extensions to scan in folders (default: %(default)s)")  # fmt: skip
    p.add_argument("--window", type=int, default=40, help="lines per window (non-Python files)")
    p.add_argument("--overlap", type=int, default=10, help="lines shared by consecutive windows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--negative", help="the 'clean' label (default: the head's first label)")
    p.add_argument("--output", default=None, help="also write the JSON report here")
    p.add_argument("--table", help="also write the table to this file")
    p.add_argument("--top", type=int, default=None, help="print only the top N rows")
    p.add_argument("--fail-above", type=float, default=None,
                   help="exit 1 when any unit's score is above this threshold")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        exts = tuple(e if e.startswith(".") else "." + e for e in args.ext)
        report = scan(
            args.paths, args.adapters, args.task, args.base, args.tokenizer, exts, args.window,
            args.overlap, args.batch_size, args.device, args.negative, not args.no_progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"mftk scan: error: {err}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    rows = report["units"]
    table = format_table(rows)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    shown = rows if args.top is None else rows[: args.top]
    print(format_table(shown))
    saved = f"; report -> {args.output}" if args.output else ""
    print(f"\n{len(rows)} units in {report['files']} files{saved}")
    if args.fail_above is not None:
        over = [r for r in rows if r["score"] > args.fail_above]
        if over:
            print(f"{len(over)} units score above {args.fail_above}: failing", file=sys.stderr)
            return 1
    return 0
