"""Atomic training checkpoints: adapters (mftk format + one PEFT folder per task) and trainer state.

Layout of `<output>/checkpoints/step-000050/`:
    adapters/              mftk.save_adapters: every task's adapter in mftk's multi-task format
    peft/<task>/           mftk.export_peft: adapter_config.json + adapter_model.safetensors
    trainer_state.pt       step, optimizer, scheduler, sampler (data position), the loss mode's
                           state (CoBa's), RNG states, metric history
(fsdp2 checkpoints keep the optimizer sharded and the RNG per rank: see mftk.train.dcp.)
A checkpoint is written into `step-000050.tmp-<pid>` and renamed when complete, so any folder
named `step-<digits>` is whole; resume takes the highest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from typing import Any

import torch

from mftk.checkpoint import load_adapters, save_adapters
from mftk.peft_io import export_peft
from mftk.train.config import Config

_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_adapter_outputs(model: torch.nn.Module, tasks: list[str], path: str) -> None:
    """adapters/ (mftk format) and peft/<task>/ for every task, under path."""
    save_adapters(model, os.path.join(path, "adapters"))
    for task in tasks:  # a router, if any, has no PEFT equivalent: only the LoRA weights go
        export_peft(model, task, os.path.join(path, "peft", task))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rank_rng(path: str, rank: int, seed: int) -> None:
    """Rank `rank`'s RNG state from a per-rank checkpoint folder (rng-rank<r>.pt, fsdp2); a rank
    the checkpoint did not have takes rank 0's with torch re-seeded from seed: its own dropout
    stream rather than a copy of rank 0's."""
    own = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.isfile(own):
        set_rng_state(torch.load(own, weights_only=False))
    else:
        set_rng_state(torch.load(os.path.join(path, "rng-rank0.pt"), weights_only=False))
        torch.manual_seed(seed)


def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    tasks: list[str],
    state: dict[str, Any],
    keep_last: int = 2,
) -> str:
    """Write checkpoint `root/step-<step>` atomically; delete all but the newest keep_last."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter_outputs(model, tasks, tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def load_checkpoint(path: str, model: torch.nn.Module) -> dict[str, Any]:
    """Load the adapters into model (in place) and return the trainer state."""
    load_adapters(model, os.path.join(path, "adapters"))
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)


def run_key(cfg: Config, world: int = 1) -> str:
    """A fingerprint of everything that shapes the loss curve (not output, logging, threads), for
    a run on `world` processes: that of the one-process run with the same global batch
    (train.batch_size × world), so a checkpoint resumes on any number of ranks."""
    if world != 1:
        cfg = copy.deepcopy(cfg)
        cfg.train.batch_size *= world
    d = cfg.to_dict()
    for k in ("output", "base_dir", "distributed"):
        d.pop(k)
    for k in ("log_every", "threads", "device"):
        d["train"].pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoint files are never rewritten in place: a link is a copy
    except OSError:
        shutil.copy2(src, dst)


def keep_best(root: str, path: str, score: float, keep: int) -> list[str]:
    """output.keep_best beside keep_last's rotation: checkpoint `path` (a step-<digits> folder
    under root, of eval loss `score`) goes into root/best/ (hard links; copies across file
    systems) when it is among the `keep` lowest scores there (a tie: the later step), and the
    ones it pushes out are removed. root/best/scores.json holds {folder: eval loss}.
    returns the kept folders, best first."""
    best = os.path.join(root, "best")
    os.makedirs(best, exist_ok=True)
    table = os.path.join(best, "scores.json")
    scores: dict[str, float] = {}
    if os.path.isfile(table):
        with open(table, encoding="utf-8") as f:
            scores = json.load(f)
    name = os.path.basename(path.rstrip(os.sep))
    scores[name] = score
    step = {n: int(m.group(1)) if (m := _STEP_DIR.match(n)) else -1 for n in scores}
    ranked = sorted(scores, key=lambda n: (scores[n], -step[n]))
    if name in ranked[:keep]:
        dst = os.path.join(best, name)
        shutil.rmtree(dst + ".tmp", ignore_errors=True)
        shutil.copytree(path, dst + ".tmp", copy_function=_link_or_copy)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(dst + ".tmp", dst)
    for n in ranked[keep:]:
        shutil.rmtree(os.path.join(best, n), ignore_errors=True)
        del scores[n]
    with open(table + ".tmp", "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=1)
    os.replace(table + ".tmp", table)
    return [os.path.join(best, n) for n in ranked[:keep]]
