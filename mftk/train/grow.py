"""`mftk train --resume` with a config that lists extra tasks: continue the run with them.

The new tasks must come after the checkpoint's tasks, and the config minus the new tasks (their
entries, and their keys in stage mixes / loss weights) must be the run that wrote the checkpoint.
Then:
- adapters: the model is patched with every task; the checkpoint fills the old tasks' slots
  (mftk.load_adapters(grow=True)); the new tasks start fresh (B = 0: the base model) and their
  heads (classify) at zero;
- optimizer: the old tasks' AdamW moments are kept, slice for slice ([:T_old, :R_old] of each
  adapter tensor; old heads whole); the new slots start with zero moments. AdamW's `step` is one
  count per tensor, so the new slots share the old step count (their bias correction is already
  ~1: the first updates are about 3x a fresh Adam's, then equal);
- sampler: new tasks get a fresh shuffled order; the stage mix is re-read at the next step;
- history: the new tasks' past train / eval entries are None / NaN; eval_before is measured at
  resume time for them.
Not supported: loss.mode coba and coba_eval (their per-task slope histories) and the built-in
tiny model (its tokenizer is trained on every task's text, so a new task changes the base model
itself).
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Callable
from typing import Any

import torch

from mftk.checkpoint import load_adapters
from mftk.train.checkpointing import load_trainer_state
from mftk.train.config import Config, ConfigError
from mftk.train.fingerprint import run_fingerprint, run_key


def checkpoint_tasks(st: dict[str, Any]) -> list[str]:
    """The task names of a trainer state (older states: from the history's keys)."""
    return list(st.get("tasks") or st["history"]["train"].keys())


def _without(cfg: Config, n_old: int) -> Config:
    c = copy.deepcopy(cfg)
    new = {t.name for t in c.tasks[n_old:]}
    c.tasks = c.tasks[:n_old]
    for s in c.stages:
        for key in ("mix", "loss_weights"):
            table = getattr(s, key)
            if table is not None:
                setattr(s, key, {k: v for k, v in table.items() if k not in new} or None)
    for t in c.tasks:
        t.files = list(t.files)
    return c


def new_tasks(cfg: Config, st: dict[str, Any], key: Callable[[Config], str]) -> list[str]:
    """The tasks this config adds to the checkpoint's ([] if the same); ConfigError when the
    config is not the checkpoint's run plus appended tasks, or growing is not supported.
    key: the run fingerprint (mftk.train.fingerprint.run_key)."""
    old = checkpoint_tasks(st)
    names = cfg.task_names
    if names == old:
        return []
    if names[: len(old)] != old or len(names) <= len(old):
        raise ConfigError(
            f"--resume: the checkpoint's tasks {old} must be the config's first tasks (new tasks "
            f"go at the end); the config lists {names}"
        )
    if st.get("run_key") != key(_without(cfg, len(old))):
        raise ConfigError(
            "--resume: apart from the new tasks "
            f"{names[len(old) :]}, the config differs from the run that wrote the checkpoint"
        )
    if cfg.loss.mode in ("coba", "coba_eval"):
        raise ConfigError(f"--resume with new tasks: loss.mode {cfg.loss.mode} is not supported")
    if cfg.model.path is None:
        raise ConfigError(
            "--resume with new tasks needs model.path: the built-in tiny model's tokenizer and "
            "base are trained on every task's text, so a new task changes the base model"
        )
    return names[len(old) :]


def grow_optimizer_state(opt: torch.optim.Optimizer, old: dict[str, Any]) -> dict[str, Any]:
    """A state dict for `opt` (built over the grown parameters) that keeps `old`'s state: within
    each param group the old parameters are a prefix of the new ones (model order); each state
    tensor goes into the leading block of a zero tensor of the new shape."""
    new = opt.state_dict()
    flat = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for gi, gn in enumerate(new["param_groups"]):
        if gi < len(old["param_groups"]):
            go = old["param_groups"][gi]
            for io, i_new in zip(go["params"], gn["params"]):
                s = old["state"].get(io)
                if s is None:
                    continue
                shape = flat[i_new].shape
                state[i_new] = {k: _pad(v, shape) for k, v in s.items()}
            groups.append({**gn, **{k: v for k, v in go.items() if k != "params"}})
        else:
            groups.append(gn)
    return {"state": state, "param_groups": groups}


def _pad(v: Any, shape: torch.Size) -> Any:
    if not torch.is_tensor(v) or v.dim() == 0 or v.shape == shape:
        return v
    out = v.new_zeros(shape)
    out[tuple(slice(0, n) for n in v.shape)] = v
    return out


def grow_state(trainer, st: dict[str, Any], added: list[str]) -> dict[str, Any]:
    """The trainer state `st` of the old tasks, extended to trainer.tasks."""
    run = trainer.run
    st = dict(st)
    n_old = len(trainer.tasks) - len(added)
    n_groups = len(st["optimizer"]["param_groups"])
    st["optimizer"] = opt = grow_optimizer_state(run.opt, st["optimizer"])
    g0 = opt["param_groups"][0]
    for g in opt["param_groups"][n_groups:]:  # a new group (a first head) at the current lr
        g["lr"] = g["initial_lr"] * g0["lr"] / g0["initial_lr"]
    sch, fresh = dict(st["scheduler"]), run.sched.state_dict()
    for key in ("base_lrs", "_last_lr"):
        if key in sch and len(sch[key]) < len(fresh[key]):
            extra = [g["lr"] for g in opt["param_groups"][n_groups:]]
            sch[key] = list(sch[key]) + (fresh[key][n_groups:] if key == "base_lrs" else extra)
    st["scheduler"] = sch
    sam = dict(st["sampler"])
    sam["orders"] = [list(o) for o in sam["orders"]]
    for i in range(n_old, len(trainer.tasks)):
        order = list(range(len(run.data[i].train)))
        random.Random(trainer.cfg.train.seed + 7919 * i).shuffle(order)
        sam["orders"].append(order)
    sam["cursors"] = list(sam["cursors"]) + [0] * len(added)
    sam["drawn"] = list(sam["drawn"]) + [0] * len(added)
    sam["weights"] = list(sam["weights"]) + [0.0] * len(added)  # the stage mix resets them
    st["sampler"] = sam
    h = copy.deepcopy(st["history"])
    for t in added:
        h["train"][t] = [None] * len(h["step"])
        h["eval"][t] = [math.nan] * len(h["eval_step"])
    st["history"] = h
    ev = trainer.evaluate()  # the new tasks' starting point (the base model for them)
    st["eval_before"] = {**st["eval_before"], **{t: ev[t] for t in added}}
    st["tasks"] = list(trainer.tasks)
    st["run_key"] = run_key(trainer.cfg)
    st["run_config"] = run_fingerprint(trainer.cfg, trainer.par.world)
    return st


def load_grown_checkpoint(trainer, path: str) -> dict[str, Any] | None:
    """If the checkpoint in `path` has fewer tasks than the trainer: load its adapters into the
    old slots and return the grown trainer state; None when the task lists are equal."""
    st = load_trainer_state(path)
    added = new_tasks(trainer.cfg, st, run_key)
    if not added:
        return None
    load_adapters(trainer.run.model, os.path.join(path, "adapters"), grow=True)
    trainer.log(
        f"--resume: adding tasks {added} to the {len(trainer.tasks) - len(added)} of {path}"
    )
    return grow_state(trainer, st, added)
