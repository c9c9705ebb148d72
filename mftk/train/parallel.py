"""How a run spreads over processes: the strategy that build_run, the step, the evaluation and the
trainer ask. Single is one process; mftk.train.distributed.FSDP2 is data parallel under torchrun.

A strategy has
- rank, world; device (where batches and compute go) and load_device (where the model loads);
- loading(): a context around loading the base (fsdp2: rank 0 first, it writes the tiny cache);
- prepare(model, log): after patching (fsdp2: fp32 masters, activation checkpointing, sharding);
- shard(sampler): this process's view of the training sampler;
- eval_batches(batches): (batch, mine) pairs; a process forwards all, and counts the mine ones;
- reduce(t): the sum over processes of a host tensor;
- sync_gradients(model, last) before each micro-batch, backward(run, fw, batch, loss, weights)
  inside its routing, clip(params, max_norm) -> the global norm to record, or None;
- save(trainer) -> path and load(trainer, path): checkpoints;
- full_adapters(model): a context in which the model holds whole adapters, to write them;
- close().
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mftk.train import checkpointing as ckpt
from mftk.train.config import Config
from mftk.train.grow import load_grown_checkpoint
from mftk.train.losses import TaskLoss, router_losses
from mftk.train.packing import Batch
from mftk.train.run import TrainRun, resolve_device
from mftk.train.step import Forward, task_means

# rank r seeds its training steps (LoRA dropout) with train.seed + r × this; a large prime, so
# nearby train.seed values of other runs do not reuse a rank's stream
RANK_SEED_STRIDE = 1_000_003


class Single:
    """One process: the batch's own loss, the identity reducer, checkpoints with the optimizer
    and RNG in the trainer state (mftk.train.checkpointing)."""

    rank, world = 0, 1

    def __init__(self, cfg: Config) -> None:
        self.device = self.load_device = resolve_device(cfg.train.device)

    def loading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, log: Callable[[str], None]) -> None:
        """Nothing: the model is on its device, whole."""

    def shard(self, sampler: Any) -> Any:
        return sampler

    def eval_batches(self, batches: list[Batch]) -> list[tuple[Batch, bool]]:
        return [(b, True) for b in batches]

    def reduce(self, t: Tensor) -> Tensor:
        return t

    def sync_gradients(self, model: nn.Module, last: bool) -> None:
        """Nothing: gradients are local."""

    def backward(
        self, run: TrainRun, fw: Forward, batch: Batch, loss: TaskLoss, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
        """Back-propagate the batch's loss / grad_accum (task loss, plus the router losses).
        returns (the loss, 0-d fp64; L_t, m_t (T,); tokens; router accuracy, 0-d)."""
        (means, counts), mode = task_means(run, fw, batch, loss)
        total = loss(*mode, weights)
        acc = total.new_zeros(())
        if fw.router_logits is not None:
            rl = router_losses(fw.router_logits, batch.task_ids)
            c = run.cfg.loss
            balance, supervision = rl["balance"], rl["supervision"]
            total = total + c.router_balance * balance + c.router_supervision * supervision
            acc = rl["accuracy"]
        (total / run.cfg.train.grad_accum).backward()
        return total.detach().double(), means, counts, batch.num_tokens, acc

    def clip(self, params: list[nn.Parameter], max_norm: float | None) -> float | None:
        """Clip the gradients' norm to max_norm (None: no clipping); nothing to record."""
        if max_norm:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        return None

    def save(self, trainer: Any) -> str:
        run = trainer.run
        state = {**trainer.state_dict(), "optimizer": run.opt.state_dict(), "rng": ckpt.rng_state()}
        root = os.path.join(trainer.out, "checkpoints")
        keep = trainer.cfg.output.keep_last
        return ckpt.save_checkpoint(root, trainer.step, run.model, run.adapter_tasks, state, keep)

    def load(self, trainer: Any, path: str) -> None:
        """Adapters, optimizer, progress and RNG from checkpoint folder path (with tasks appended
        to the config since: see mftk.train.grow)."""
        ckpt.check_strategy(path, "none")
        st = load_grown_checkpoint(trainer, path)
        if st is None:
            st = ckpt.load_checkpoint(path, trainer.run.model)
        trainer.load_state_dict(st)
        trainer.run.opt.load_state_dict(st["optimizer"])
        ckpt.set_rng_state(st["rng"])

    def full_adapters(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to release."""
