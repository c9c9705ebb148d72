"""fsdp2 checkpoints, `<output>/checkpoints/step-000050/`:
    dcp/               torch.distributed.checkpoint: adapters and AdamW state, sharded, reloadable
                       on any number of ranks
    trainer_state.pt   rank 0: the trainer's progress (step, scheduler, sampler position, the loss
                       mode's state, history) and world_size
    rng-rank<r>.pt     each rank's RNG
All ranks write into `step-000050.tmp`; after a barrier rank 0 renames it. An fsdp2 checkpoint
resumes under fsdp2 only (on any number of ranks, one included).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mftk.train import checkpointing as ckpt
from mftk.train.config import ConfigError


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded(trainer: Any, rank: int, world: int) -> str:
    """Collective: write the trainer's checkpoint at its step; returns its folder."""
    run = trainer.run
    root = os.path.join(trainer.out, "checkpoints")
    final = os.path.join(root, f"step-{trainer.step:06d}")
    tmp = f"{final}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = _state_dicts(run.model, run.opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(ckpt.rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank == 0:
        state = {**trainer.state_dict(), "world_size": world}
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    dist.barrier()  # every rank's files are complete before the rename
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in ckpt.list_checkpoints(root)[: -trainer.cfg.output.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(trainer: Any, path: str) -> None:
    """Collective: adapters and optimizer from path/dcp (resharded to this world size), the
    trainer's progress, and this rank's RNG (trainer.load_rng)."""
    if not os.path.isdir(os.path.join(path, "dcp")):
        raise ConfigError(
            f"--resume: {path} is not an fsdp2 checkpoint (no dcp/); one-process checkpoints "
            "resume with distributed.strategy: none"
        )
    run = trainer.run
    model_sd, optim_sd = _state_dicts(run.model, run.opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(
        run.model,
        run.opt,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    trainer.load_state_dict(torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False))
    trainer.load_rng(path)
