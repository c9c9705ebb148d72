"""What a training run records and shows: the metric history, the progress bar, log lines and
TensorBoard scalars while it runs, and its outputs at the end (adapters, metrics.json, loss.png).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from mftk.train import checkpointing as ckpt
from mftk.train.plots import plot_losses


def new_history(tasks: list[str]) -> dict[str, Any]:
    """Per step: loss, lr, tokens, stage, task weights, per-task train losses (None: absent from
    the step); per evaluation: its step, per-task eval losses, router accuracy. Classify metrics
    (classify) and the fsdp2 global grad norm (grad_norm) join when they first occur."""
    return {
        "step": [],
        "loss": [],
        "lr": [],
        "tokens": [],
        "stage": [],
        "train": {t: [] for t in tasks},
        "eval_step": [],
        "eval": {t: [] for t in tasks},
        "router_accuracy": [],
        "task_weights": [],
    }


def record_step(h: dict[str, Any], step: int, stage: int, res: dict[str, Any]) -> None:
    """A training step's result (mftk.train.step.train_step) into history h."""
    if res["grad_norm"] is not None:
        h.setdefault("grad_norm", []).append(res["grad_norm"])
    h["step"].append(step)
    h["loss"].append(res["loss"])
    h["lr"].append(res["lr"])
    h["tokens"].append(res["tokens"])
    h["stage"].append(stage)
    h["task_weights"].append(res["weights"])
    for t, v in res["per_task"].items():
        h["train"][t].append(v)


def record_eval(h: dict[str, Any], step: int, ev: dict[str, float], classify: bool = True) -> None:
    """An evaluation into history h (classify: also its <task>/accuracy, <task>/f1 entries)."""
    h["eval_step"].append(step)
    for t in h["eval"]:
        h["eval"][t].append(ev[t])
    if "router_accuracy" in ev:
        h["router_accuracy"].append(ev["router_accuracy"])
    if "router_accuracy_answer" in ev:  # the key only in router runs' histories
        h.setdefault("router_accuracy_answer", []).append(ev["router_accuracy_answer"])
    for k in ev:
        if classify and "/" in k:
            h.setdefault("classify", {}).setdefault(k, []).append(ev[k])


def fmt(d: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in d.items())


def _tensorboard(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed
        return None
    return SummaryWriter(logdir)


class Progress:
    """The progress bar, a log line every train.log_every steps (and the last) with the tokens/s
    since the previous one, and TensorBoard scalars in output.tb_dir (default: the output dir's
    tb/; the main process, when tensorboard is installed): losses, lr, task weights."""

    def __init__(self, trainer: Any) -> None:
        self.log = trainer.log
        self.log_every = trainer.cfg.train.log_every
        self.max_steps = trainer.max_steps
        logdir = trainer.cfg.output.tb_dir or os.path.join(trainer.out, "tb")
        self.writer = _tensorboard(logdir) if trainer.is_main else None
        self.bar = tqdm(
            total=trainer.max_steps,
            initial=trainer.step,
            disable=not trainer.progress,
            dynamic_ncols=True,
            desc="train",
            file=sys.stderr,
        )
        self.window_tokens, self.window_t = 0, time.perf_counter()

    def step(self, step: int, stage: str, res: dict[str, Any], tokens_per_s: float) -> None:
        """After training step `step` (1-based) of stage `stage`."""
        self.window_tokens += res["tokens"]
        losses = {t: v for t, v in res["per_task"].items() if v is not None}
        per_task = " ".join(f"{t[:10]} {v:.3f}" for t, v in losses.items())
        self.bar.set_postfix_str(f"tok/s {tokens_per_s:.0f} | " + per_task)
        self.bar.update(1)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", res["loss"], step)
            self.writer.add_scalar("train/lr", res["lr"], step)
            for t, v in losses.items():
                self.writer.add_scalar(f"train/{t}", v, step)
            for t, w in zip(res["per_task"], res["weights"]):  # CoBa's move
                self.writer.add_scalar(f"weight/{t}", w, step)
        if step % self.log_every == 0 or step == self.max_steps:
            now = time.perf_counter()
            rate = self.window_tokens / max(now - self.window_t, 1e-9)
            self.window_tokens, self.window_t = 0, now
            acc = res["router_accuracy"]
            extra = f" | router acc {acc:.3f}" if acc is not None else ""
            self.log(
                f"step {step}/{self.max_steps} [{stage}] loss {res['loss']:.4f} | "
                + fmt(losses)
                + f" | lr {res['lr']:.2e} | {rate:.0f} tok/s{extra}"
            )

    def eval(self, step: int, ev: dict[str, float]) -> None:
        self.log(f"eval @ {step}: " + fmt(ev))
        if self.writer is not None:
            for t, v in ev.items():
                self.writer.add_scalar(f"eval/{t}", v, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def write_outputs(trainer: Any, wall: float, resumed_from: str | None) -> dict[str, Any]:
    """adapters/ and peft/<task>/ (plus the tokenizer for classify heads: `mftk scan` reads it),
    metrics.json and loss.png under the output dir; returns the metrics."""
    run, h, tasks = trainer.run, trainer.history, trainer.tasks
    out = trainer.out
    ckpt.save_adapter_outputs(run.model, run.adapter_tasks, out)
    if run.cls.active:
        run.tokenizer.save_pretrained(os.path.join(out, "adapters"))
    eval_after = {t: h["eval"][t][-1] for t in tasks}
    tok_s = trainer.tokens_seen / max(trainer.train_seconds, 1e-9)
    metrics = {
        "tasks": tasks,
        "steps": trainer.step,
        "eval_before": {t: trainer.eval_before[t] for t in tasks},
        "eval_after": eval_after,
        "final_train_loss": h["loss"][-1] if h["loss"] else None,
        "train_tokens": trainer.tokens_seen,
        "train_seconds": trainer.train_seconds,
        "tokens_per_second": tok_s,
        "wall_seconds": wall,
        "resumed_from": resumed_from,
        "stages": trainer.stages,
        "loss_mode": trainer.cfg.loss.mode,
        "router_accuracy": h["router_accuracy"][-1] if h["router_accuracy"] else None,
        "router_accuracy_answer": (h.get("router_accuracy_answer") or [None])[-1],
        "early_stopping": trainer.tracker.summary(),
        "classify": run.cls.last_metrics,
        "skipped": {d.name: dict(d.skipped) for d in run.data},
        "samples": {d.name: {"train": _count(d.train), "eval": len(d.eval)} for d in run.data},
        "model": run.model_info,
        "history": h,
    }
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_losses(h, tasks, trainer.stages, os.path.join(out, "loss.png"))
    log = trainer.log
    log("eval after:  " + fmt(eval_after))
    for t, m in run.cls.last_metrics.items():
        log(
            f"{t}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} on "
            f"{m['eval_samples']} eval samples (majority class '{m['majority_label']}': "
            f"accuracy {m['majority_accuracy']:.3f}, macro-F1 {m['majority_macro_f1']:.3f})"
        )
    log(
        f"wrote {out}/loss.png, metrics.json, adapters/, peft/ "
        f"({trainer.step} steps, {tok_s:.0f} tok/s, wall {wall:.1f}s)"
    )
    return metrics


def _count(train: Any) -> int | None:
    """A task's training samples; None for a streamed task (data.SampleStream: not counted)."""
    return len(train) if isinstance(train, list) else None
