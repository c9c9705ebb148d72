"""fsdp2 checkpoints, `<output>/checkpoints/step-000050/`:
    full_state.json + .safetensors      rank 0: the whole adapters (fp32 masters) and AdamW state,
                                        keyed by parameter name, gathered from every rank's shard
    trainer_state.json + .safetensors   rank 0: the trainer's progress (step, scheduler, sampler
                                        position, the loss mode's state, history) and world_size
    rng-rank<r>.json + .safetensors     each rank's RNG
    manifest.json                       every file's size and sha256 (mftk.train.checkpointing)
No pickle: the files are JSON and safetensors (mftk.train.statefile). Every rank writes into
`step-000050.tmp-<host>-<pid of rank 0>`; after a barrier rank 0 seals it (fsync, manifest,
rename). On resume every rank reads the full state and keeps its own shard, so a checkpoint
resumes on any number of ranks (one included). The adapters and their optimizer state are small
next to the base (LoRA), which is why rank 0 can hold them whole. An fsdp2 checkpoint resumes
under fsdp2 only.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mftk.train import checkpointing as ckpt
from mftk.train.statefile import load_state, save_state

FULL = "full_state"


def _full_state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective: the adapters' and AdamW's whole state dicts on rank 0 (CPU); {} elsewhere."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_state_dict(model, opt, options=opts)


def save_sharded(trainer: Any, rank: int, world: int) -> str:
    """Collective: write the trainer's checkpoint at its step; returns its folder."""
    run = trainer.run
    root = os.path.join(trainer.out, "checkpoints")
    final = os.path.join(root, f"step-{trainer.step:06d}")
    pid = torch.tensor([float(os.getpid() if rank == 0 else 0)])
    tmp = ckpt.temp_dir(final, int(trainer.par.reduce(pid)[0]))  # rank 0's process id
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    model_sd, optim_sd = _full_state_dicts(run.model, run.opt)
    dist.barrier()  # the folder exists
    save_state(ckpt.rng_state(), os.path.join(tmp, f"rng-rank{rank}"))
    if rank == 0:
        save_state({"model": model_sd, "optim": optim_sd}, os.path.join(tmp, FULL))
        state = {**trainer.state_dict(), "world_size": world}
        save_state(state, os.path.join(tmp, ckpt.STATE))
    dist.barrier()  # every rank's files are complete before the rename
    if rank == 0:
        ckpt.seal(tmp, final, "fsdp2", trainer.cfg.output.keep_last)
    dist.barrier()
    return final


def load_sharded(trainer: Any, path: str) -> None:
    """Collective: adapters and optimizer from the full state in path (each rank keeps its
    shard), the trainer's progress, and this rank's RNG (trainer.load_rng)."""
    ckpt.check_strategy(path, "fsdp2")
    run = trainer.run
    full = load_state(os.path.join(path, FULL))
    set_state_dict(
        run.model,
        run.opt,
        model_state_dict=full["model"],
        optim_state_dict=full["optim"],
        options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False),
    )
    trainer.load_state_dict(ckpt.load_trainer_state(path))
    trainer.load_rng(path)
