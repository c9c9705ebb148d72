"""`mftk compare RUN_A RUN_B ... [--names ...] [--plot OUT.png]`: runs side by side.

A RUN is a run folder holding `eval.json` (written by `mftk eval`) or only `metrics.json`
(written by `mftk train`: its final per-task eval loss), or the path of such a JSON file itself.
Prints per-task held-out loss for every run, the average over tasks, each run's change of the
average against the first run, router accuracy, pass@k where present, adapter parameters and
training time; with --plot, plots per-task loss (and pass@k) as grouped bars (nothing is
written without a path).

Only runs over one base compare fairly: a different tokenizer or base changes the loss before any
adapter trains and the number of held-out tokens. Each run's base is read from its JSON's "model"
entry (or the metrics.json beside an eval.json that lacks one): the tiny base's cache key
("base-<hash>", which covers its tokenizer), else the Hugging Face model path. Runs whose bases
differ are refused, naming them; --allow-different-bases compares them anyway under a warning in
the table. A run whose base is not recorded (an older JSON) is compared with a note on stderr.
When the runs' task sets differ, the average is taken over the tasks all runs share (a classify
task in one run only does not move it), and the row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def load_run(path: str) -> dict[str, Any]:
    """{"tasks": {task: {"loss", optional "exec"}}, "average_loss", "base", ...} for one run
    ("base": base_identity, None where the JSON does not record it)."""
    candidates = [path] if path.endswith(".json") else [
        os.path.join(path, "eval.json"),
        os.path.join(path, "metrics.json"),
    ]  # fmt: skip
    for c in candidates:
        if os.path.isfile(c):
            with open(c) as f:
                d = json.load(f)
            break
    else:
        raise FileNotFoundError(f"{path}: no eval.json or metrics.json (run `mftk eval` first)")
    model = d.get("model")
    if "eval_after" in d and "average_loss" not in d:  # a trainer metrics.json
        tasks = {t: {"loss": v} for t, v in d["eval_after"].items()}
        d = {
            "tasks": tasks,
            "average_loss": sum(v["loss"] for v in tasks.values()) / len(tasks),
            "router_accuracy": d.get("router_accuracy"),
            "train": {k: d.get(k) for k in ("steps", "train_seconds", "wall_seconds")},
        }
    if not isinstance(d.get("tasks"), dict):
        raise ValueError(f"{path}: not an mftk eval.json or metrics.json")
    beside = os.path.join(os.path.dirname(c), "metrics.json")
    if model is None and os.path.isfile(beside):  # an eval.json written before it named the base
        with open(beside) as f:
            model = json.load(f).get("model")
    d["base"] = base_identity(model)
    return d


def base_identity(model: dict[str, Any] | None) -> str | None:
    """What names a run's base in its "model" entry: the tiny base's cache key ("base-<hash>":
    the same key is the same tokenizer and weights, whichever cache folder holds it), else the
    Hugging Face path it loaded; None when unrecorded."""
    if not model:
        return None
    if model.get("base"):
        return model["base"]
    if model.get("cache"):
        return os.path.basename(os.path.normpath(model["cache"]))
    return model.get("source")


def different_bases(runs: list[dict[str, Any]], names: list[str]) -> str | None:
    """None when every run with a recorded base has the same one, else a message naming each
    run's base."""
    known = {r["base"] for r in runs if r.get("base") is not None}
    if len(known) <= 1:
        return None
    return (
        "the runs' bases differ ("
        + ", ".join(f"{n}: {r.get('base') or 'unrecorded'}" for r, n in zip(runs, names))
        + ")"
    )


def common_tasks(runs: list[dict[str, Any]]) -> list[str] | None:
    """The tasks every run has (first run's order), or None when all runs have the same tasks."""
    sets = [set(r["tasks"]) for r in runs]
    if all(s == sets[0] for s in sets):
        return None
    return [t for t in runs[0]["tasks"] if all(t in s for s in sets)]


def pass_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = {
        k
        for r in runs
        for v in r["tasks"].values()
        for k in v.get("exec", {})
        if k.startswith("pass@")
    }
    return sorted(keys, key=lambda s: (s != "pass@1_greedy", len(s), s))


def compare_table(runs: list[dict[str, Any]], names: list[str], warning: str | None = None) -> str:
    """The side-by-side text table; warning: a line printed above it (different bases)."""
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r["tasks"] if t not in tasks]
    head = ["metric"] + names
    rows = []
    for t in tasks:
        rows.append([f"{t} loss"] + [_num(r["tasks"].get(t, {}).get("loss")) for r in runs])
    common = common_tasks(runs)
    if common is None:
        label, avgs = "average loss", [r.get("average_loss") for r in runs]
    else:
        label = f"average loss ({', '.join(common) or 'no common task'})"
        avgs = [
            sum(r["tasks"][t]["loss"] for t in common) / len(common) if common else None
            for r in runs
        ]
    rows.append([label] + [_num(a) for a in avgs])
    rows.append(
        [f"vs {names[0]}"]
        + [f"{100 * (a / avgs[0] - 1):+.1f}%" if avgs[0] and a else "-" for a in avgs]
    )
    if any(r.get("router_accuracy") is not None for r in runs):
        rows.append(["router accuracy"] + [_num(r.get("router_accuracy"), 3) for r in runs])
    for t in tasks:
        for k in pass_keys(runs):
            cells = [_num(r["tasks"].get(t, {}).get("exec", {}).get(k), 3) for r in runs]
            if any(c != "-" for c in cells):
                rows.append([f"{t} {k}"] + cells)
    rows.append(["adapter params"] + [str(r.get("adapter_parameters", "-")) for r in runs])
    rows.append(
        ["train seconds"] + [_num((r.get("train") or {}).get("train_seconds"), 1) for r in runs]
    )
    rows.append(["base"] + [r.get("base") or "-" for r in runs])
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if warning:
        lines.insert(0, f"WARNING: {warning}: the losses mix bases and tokenizers")
    return "\n".join(lines)


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def plot_compare(runs: list[dict[str, Any]], names: list[str], path: str) -> None:
    """Grouped bars: per-task held-out loss per run (left), pass@k per run (right, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r["tasks"] if t not in tasks]
    groups = tasks + ["average"]
    keys = pass_keys(runs)
    exec_tasks = [t for t in tasks if any("exec" in r["tasks"].get(t, {}) for r in runs)]
    ncols = 2 if keys and exec_tasks else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols + 1, 4), squeeze=False)
    width = 0.8 / len(runs)
    ax = axes[0][0]
    for j, (r, name) in enumerate(zip(runs, names)):
        vals = [r["tasks"].get(t, {}).get("loss", float("nan")) for t in tasks]
        vals.append(r.get("average_loss", float("nan")))
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, vals, width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out answer-token loss (lower is better)")
    ax.set_title("per-task eval loss")
    ax.legend(fontsize=8)
    if ncols == 2:
        ax = axes[0][1]
        labels = [f"{t}\n{k}" for t in exec_tasks for k in keys]
        for j, (r, name) in enumerate(zip(runs, names)):
            vals = [
                r["tasks"].get(t, {}).get("exec", {}).get(k, float("nan"))
                for t in exec_tasks
                for k in keys
            ]
            xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, vals, width, label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of problems (higher is better)")
        ax.set_title("code execution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (eval.json / metrics.json) or files")
    parser.add_argument("--names", default=None, help="comma-separated column names")
    parser.add_argument("--plot", default=None, help="also write the comparison plot (PNG) here")
    parser.add_argument("--json", default=None, help="also write the loaded runs as one JSON")
    parser.add_argument(
        "--allow-different-bases",
        action="store_true",
        help="compare runs whose tokenizer/base differ (refused without it), under a warning",
    )


def run(args: argparse.Namespace) -> int:
    try:
        runs = [load_run(p) for p in args.runs]
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        print(f"mftk compare: error: {err}", file=sys.stderr)
        return 2
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(runs):
            print(f"mftk compare: error: --names: {len(names)} names for {len(runs)} runs")
            return 2
    else:
        names = [os.path.basename(os.path.normpath(p)) or p for p in args.runs]
    differ = different_bases(runs, names)
    if differ and not args.allow_different_bases:
        print(
            f"mftk compare: error: {differ}; train the runs over the same tasks, base and seed, "
            "or pass --allow-different-bases",
            file=sys.stderr,
        )
        return 2
    for r, n in zip(runs, names):
        if r.get("base") is None:
            print(
                f"mftk compare: note: {n}: its base is not recorded; not checked", file=sys.stderr
            )
    print(compare_table(runs, names, differ))
    if args.plot:
        plot_compare(runs, names, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(zip(names, runs)), f, indent=1)
    return 0
