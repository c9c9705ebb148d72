"""The run's progress as data: the stage plan, and the trainer state a checkpoint carries beside
the adapters, optimizer and RNG (mftk.train.checkpointing writes it as JSON + safetensors)."""

from __future__ import annotations

from typing import Any

from mftk.train.config import Config, ConfigError
from mftk.train.fingerprint import fingerprint_changes, run_fingerprint, run_key


def plan_stages(cfg: Config, max_steps_arg: int | None) -> tuple[int, list[dict[str, Any]]]:
    """(max_steps, [{name, start, end}] per stage) from the config and --max-steps (under
    train.epochs the steps are known once build_run has counted an epoch: 0 until then)."""
    total = cfg.train.steps or 0
    max_steps = total if max_steps_arg is None else min(max_steps_arg, total)
    stages, start = [], 0
    for s in cfg.stages:
        stages.append({"name": s.name, "start": start, "end": start + s.steps})
        start += s.steps
    return max_steps, stages


def stage_at(stages: list[dict[str, Any]], step: int) -> int:
    """The index of the stage that step falls in (the last one past the end)."""
    return next((i for i, st in enumerate(stages) if step < st["end"]), len(stages) - 1)


def trainer_state(t: Any) -> dict[str, Any]:
    """A Trainer's progress: step, schedule, sampler, loss mode, history, eval tracker."""
    return {
        "step": t.step,
        "scheduler": t.run.sched.state_dict(),
        "sampler": t.run.sampler.state_dict(),
        "loss": t.loss.state_dict(),
        "history": t.history,
        "tokens_seen": t.tokens_seen,
        "train_seconds": t.train_seconds,
        "eval_before": t.eval_before,
        "eval_tracker": t.tracker.state_dict(),
        "run_key": run_key(t.cfg, t.par.world),
        "run_config": run_fingerprint(t.cfg, t.par.world),  # --resume names what changed
        "tasks": list(t.tasks),
        "base": t.run.model_info.get("base"),  # the tiny base's cache name (None: model.path)
    }


def check_same_run(st: dict[str, Any], cfg: Config, world: int) -> None:
    """ConfigError unless cfg (on `world` ranks) continues the run that wrote trainer state st.
    A checkpoint that carries its fingerprint is compared setting by setting, so the error names
    what changed, and a setting a newer mftk added passes at its default; an older one (a key
    only) must match the whole fingerprint."""
    fix = "resuming it would not continue that run. Use a new --output, or restore the config."
    if "run_config" in st:
        changes = fingerprint_changes(st["run_config"], run_fingerprint(cfg, world))
        if changes:
            more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
            batch = ""
            if any(c.startswith("train.batch_size") for c in changes):
                batch = f" (the global batch: train.batch_size × {world} ranks here)"
            raise ConfigError(
                "--resume: the config differs from the run that wrote the checkpoint: "
                + "; ".join(changes[:8])
                + more
                + batch
                + "; "
                + fix
            )
    elif st.get("run_key") != run_key(cfg, world):
        raise ConfigError(
            "--resume: the checkpoint was written by a run with a different config (tasks, "
            "data, model, adapter, loss, stages, training settings or global batch = "
            "train.batch_size × ranks); " + fix
        )


def load_trainer_state(t: Any, st: dict[str, Any]) -> None:
    """Restore trainer_state(t) into t; a checkpoint of another config is a ConfigError."""
    check_same_run(st, t.cfg, t.par.world)
    if st.get("base", t.run.model_info.get("base")) != t.run.model_info.get("base"):
        raise ConfigError(
            f"--resume: the checkpoint was trained on the tiny base {st['base']}, but this "
            f"run's tokenizer and base are {t.run.model_info.get('base')}: the task text or "
            "model.pretrain.data's corpus changed since (their contents are hashed). Restore "
            "them, or use a new --output."
        )
    t.step = st["step"]
    t.run.sched.load_state_dict(st["scheduler"])
    t.run.sampler.load_state_dict(st["sampler"])
    t.loss.load_state_dict(st["loss"])
    t.history = st["history"]
    t.tokens_seen = st["tokens_seen"]
    t.train_seconds = st["train_seconds"]
    t.eval_before = st["eval_before"]
    t.tracker.load_state_dict(st["eval_tracker"])
