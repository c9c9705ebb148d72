"""Atomic training checkpoints: adapters (mftk format + one PEFT folder per task) and trainer state.

Layout of `<output>/checkpoints/step-000050/`:
    adapters/              mftk.save_adapters: every task's adapter in mftk's multi-task format
    peft/<task>/           mftk.export_peft: adapter_config.json + adapter_model.safetensors
    trainer_state.pt       step, optimizer, scheduler, sampler (data position), CoBa, RNG states,
                           metric history
A checkpoint is written into `step-000050.tmp-<pid>` and renamed when complete, so any folder
named `step-<digits>` is whole; resume takes the highest.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import torch

from mftk.checkpoint import load_adapters, save_adapters
from mftk.peft_io import export_peft

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
