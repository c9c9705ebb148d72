"""`mftk compare RUN_A RUN_B ... [--names ...] [--plot OUT.png]`: runs side by side.

A RUN is a run folder holding `eval.json` (written by `mftk eval`) or only `metrics.json`
(written by `mftk train`: its final per-task eval loss), or the path of such a JSON file itself.
Prints per-task held-out loss for every run, the average over tasks, each run's change of the
average against the first run, router accuracy, pass@k where present, adapter parameters and
training time; with --plot, plots per-task loss (and pass@k) as grouped bars (nothing is
written without a path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def load_run(path: str) -> dict[str, Any]:
    """{"tasks": {task: {"loss", optional "exec"}}, "average_loss", ...} for one run."""
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
    return d


def pass_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = {
        k
        for r in runs
        for v in r["tasks"].values()
        for k in v.get("exec", {})
        if k.startswith("pass@")
    }
    return sorted(keys, key=lambda s: (s != "pass@1_greedy", len(s), s))


def compare_table(runs: list[dict[str, Any]], names: list[str]) -> str:
    """The side-by-side text table."""
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r["tasks"] if t not in tasks]
    head = ["metric"] + names
    rows = []
    for t in tasks:
        rows.append([f"{t} loss"] + [_num(r["tasks"].get(t, {}).get("loss")) for r in runs])
    rows.append(["average loss"] + [_num(r.get("average_loss")) for r in runs])
    base = runs[0].get("average_loss")
    rows.append(
        [f"vs {names[0]}"]
        + [
            f"{100 * (r['average_loss'] / base - 1):+.1f}%"
            if base and r.get("average_loss")
            else "-"
            for r in runs
        ]
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
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
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
    print(compare_table(runs, names))
    if args.plot:
        plot_compare(runs, names, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(zip(names, runs)), f, indent=1)
    return 0
