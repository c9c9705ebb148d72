"""loss.png: per-task training curves (smoothed) and eval points, with stage boundaries."""

from __future__ import annotations

import math
from typing import Any


def ema(values: list[float | None], beta: float = 0.9) -> list[float | None]:
    """Bias-corrected exponential moving average that skips missing (None) points."""
    out: list[float | None] = []
    avg, weight = 0.0, 0.0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)
        out.append(avg / weight)
    return out


def plot_losses(
    history: dict[str, Any], tasks: list[str], stages: list[dict[str, Any]], path: str
) -> None:
    """history: {"step": [...], "train": {task: [loss|None per step]}, "eval_step": [...],
    "eval": {task: [...]}}; stages: [{"name", "start", "end"}]. Writes a PNG to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(tasks):
        c = colors[i % len(colors)]
        ys = ema(history["train"][task])
        pts = [(s, y) for s, y in zip(history["step"], ys) if y is not None]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=c,
                lw=1.2,
                alpha=0.8,
                label=f"{task} train",
            )
        ax.plot(
            history["eval_step"],
            history["eval"][task],
            "o--",
            color=c,
            ms=3.5,
            lw=1,
            label=f"{task} eval",
        )
    if len(stages) > 1:
        for st in stages:
            ax.axvline(st["start"], color="grey", ls=":", lw=0.8)
            ax.text(
                st["start"],
                1.0,
                f" {st['name']}",
                transform=ax.get_xaxis_transform(),
                va="top",
                ha="left",
                fontsize=7,
                color="grey",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=len(tasks), loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.set_title("mftk train: per-task loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
