"""Write the stdlib benchmark's data from the running Python's standard library (deterministic,
a few seconds, nothing downloaded).

Six tasks over the same pool of real functions (stdlib_code.collect), prompt/completion jsonl:
- complete    raw code: the function cut at a line inside its body -> the rest (verbatim source)
- doc2code    header + docstring (verbatim) -> the body
- inject_bug  the SAME prompt as doc2code -> the body with one realistic bug (stdlib_bugs);
              with doc2code the conflicting pair: one prompt, two answers, only the task id
              tells them apart
- code2doc    "Function:" + the function without its docstring, its name masked as `_`, +
              "Answer:" -> the docstring's first paragraph
- name        the SAME prompt as code2doc -> the function's name; the second conflicting pair
- verdict     "Is there a bug?" + the function (half of them with a bug injected) + "Answer:"
              -> " False" / " True" (words the code corpus is full of: a label the base has
              never seen would keep untrained embeddings that LoRA, frozen lm_head, cannot fix)

A module is held out (data/eval/) by a hash of its name (stdlib_code.is_eval_module), so no
function is in both data/train/ and data/eval/. data/pretrain/code.jsonl holds the training
modules' functions as plain source, one {"text": ...} per function: the corpus the tiny base is
pretrained on (model.pretrain.data), so that it sees Python but none of the tasks' formats.
data/manifest.json has the counts.

    python examples/stdlib/make_data.py                 # the whole stdlib -> data/
    python examples/stdlib/make_data.py --max-files 80 --out /tmp/d   # a slice
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stdlib_bugs import bug_edits, inject  # noqa: E402
from stdlib_code import Function, collect, is_eval_module, stdlib_root  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ["complete", "doc2code", "inject_bug", "code2doc", "name", "verdict"]
EVAL_PERCENT = 20  # of the modules (by hash), not of the functions
MAX_TRAIN = 1200  # per task
MAX_EVAL = 200
VERDICT_PROMPT = "Is there a bug?\n{code}Answer:"
MASKED_PROMPT = "Function:\n{code}Answer:"
DATA_FORMAT = 2  # 2: data/pretrain/ and verdict's True/False; run_comparison rebuilds older data


def _record(f: Function, prompt: str, completion: str, **extra) -> dict:
    return {"prompt": prompt, "completion": completion, "module": f.module, "name": f.name,
            **extra}  # fmt: skip


def _join(lines) -> str:
    return "".join(line + "\n" for line in lines)


def complete(fns: list[Function], rng: random.Random) -> list[dict]:
    """Cut after the header (+ docstring) and at least one body line, before the last line."""
    out = []
    for f in fns:
        k = rng.randrange(f.body_start + 1, len(f.lines))
        out.append(_record(f, _join(f.lines[:k]), _join(f.lines[k:])))
    return out


def doc2code_pair(fns: list[Function], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(doc2code, inject_bug): one record each per function, the same prompt in both."""
    good, bad = [], []
    for f in fns:
        if f.doc_start < 0:
            continue
        res = inject(f.lines, bug_edits(f.node, f.lines, f.body_start), rng)
        if res is None:
            continue
        buggy, edit = res
        prompt = _join(f.lines[: f.body_start])
        good.append(_record(f, prompt, _join(f.lines[f.body_start :])))
        bad.append(_record(f, prompt, _join(buggy[f.body_start :]), kind=edit.kind))
    return good, bad


def masked_pair(fns: list[Function], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(code2doc, name): the function without its docstring, `def _(`, asked for its summary or
    its name. Only functions that do not use their own name elsewhere (a recursive call would
    give it away)."""
    docs, names = [], []
    for f in fns:
        name = f.node.name
        head = f"def {name}("
        if not f.doc or head not in f.lines[0] or len(re.findall(rf"\b{name}\b", f.code)) != 1:
            continue
        code = f.code.replace(head, "def _(", 1)
        prompt = MASKED_PROMPT.format(code=code)
        docs.append(_record(f, prompt, " " + f.doc))
        names.append(_record(f, prompt, " " + name))
    return docs, names


def verdict(fns: list[Function], rng: random.Random) -> list[dict]:
    """Alternately ok and bug over the shuffled pool (balanced labels); only functions with a
    possible bug, so that "has no comparison" cannot give away " False"."""
    out = []
    for f in fns:
        res = inject(f.lines, bug_edits(f.node, f.lines, f.body_start), rng)
        if res is None:
            continue
        if len(out) % 2:
            buggy, edit = res
            code, label, kind = _join(f.code_lines(buggy)), "True", edit.kind
        else:
            code, label, kind = f.code, "False", ""
        out.append(_record(f, VERDICT_PROMPT.format(code=code), " " + label, kind=kind))
    return out


def build_split(fns: list[Function], cap: int, salt: str) -> dict[str, list[dict]]:
    """All tasks' records from one split's functions, each task drawing from its own shuffle
    of the pool (each conflicting pair from one, so that its two tasks share their prompts)."""

    def draw(name: str) -> tuple[list[Function], random.Random]:
        rng = random.Random(f"{salt}-{name}")  # str seeds are hashed by sha512: stable
        pool = list(fns)
        rng.shuffle(pool)
        return pool, rng

    out: dict[str, list[dict]] = {}
    out["complete"] = complete(*draw("complete"))[:cap]
    good, bad = doc2code_pair(*draw("doc2code"))
    out["doc2code"], out["inject_bug"] = good[:cap], bad[:cap]
    docs, names = masked_pair(*draw("code2doc"))
    out["code2doc"], out["name"] = docs[:cap], names[:cap]
    out["verdict"] = verdict(*draw("verdict"))[:cap]
    return out


def build(out_dir: str, max_files: int | None = None, log=print) -> dict:
    """Write out_dir/{train,eval}/<task>.jsonl and out_dir/manifest.json; returns the manifest."""
    t0 = time.perf_counter()
    fns = collect(max_files=max_files)
    held = [f for f in fns if is_eval_module(f.module, EVAL_PERCENT)]
    train = [f for f in fns if not is_eval_module(f.module, EVAL_PERCENT)]
    splits = {
        "train": build_split(train, MAX_TRAIN, "train"),
        "eval": build_split(held, MAX_EVAL, "eval"),
    }
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):  # first: an interrupted rebuild leaves no manifest behind
        os.remove(manifest_path)
    d = os.path.join(out_dir, "pretrain")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "code.jsonl"), "w", encoding="utf-8") as fh:
        for f in train:
            fh.write(json.dumps({"text": f.source, "module": f.module}, sort_keys=True) + "\n")
    for split, tasks in splits.items():
        d = os.path.join(out_dir, split)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for task, recs in tasks.items():
            with open(os.path.join(d, f"{task}.jsonl"), "w", encoding="utf-8") as fh:
                for r in recs:
                    fh.write(json.dumps(r, sort_keys=True) + "\n")
    manifest = {
        "data_format": DATA_FORMAT,
        "python": sys.version.split()[0],
        "stdlib": stdlib_root(),
        "max_files": max_files,
        "eval_percent_of_modules": EVAL_PERCENT,
        "functions": {"train": len(train), "eval": len(held)},
        "modules": {
            "train": sorted({f.module for f in train}),
            "eval": sorted({f.module for f in held}),
        },
        "samples": {t: {s: len(splits[s][t]) for s in splits} for t in TASKS},
        "bug_kinds": {
            t: dict(sorted(Counter(r["kind"] for r in splits["train"][t] if r["kind"]).items()))
            for t in ("inject_bug", "verdict")
        },
    }
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    counts = ", ".join(f"{t} {c['train']}/{c['eval']}" for t, c in manifest["samples"].items())
    log(
        f"{len(fns)} functions ({len(train)} train / {len(held)} held out) from "
        f"{manifest['stdlib']} -> {out_dir} in {time.perf_counter() - t0:.1f}s; "
        f"samples train/eval: {counts}"
    )
    return manifest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "data"))
    p.add_argument("--max-files", type=int, default=None, help="only the first N modules")
    args = p.parse_args()
    build(args.out, args.max_files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
