"""The routing plan: tokens grouped by task once per batch, reused by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mftk.ops import _lib


@dataclass(frozen=True)
class RoutingPlan:
    """Tokens stably sorted by task.

    perm: (N,) int64, token indices grouped by task 0..T-1; tokens with id -1 come last.
    offsets: (T + 1,) int64, rows offsets[t]:offsets[t+1] of perm belong to task t;
        offsets[T] is the number of routed tokens (the rest are base-only).
    task_ids: (N,) int64, the ids the plan was built from.
    """

    perm: Tensor
    offsets: Tensor
    task_ids: Tensor
    num_tasks: int

    @property
    def num_tokens(self) -> int:
        return self.perm.shape[0]

    def counts(self) -> Tensor:
        """(T,) int64 tokens per task."""
        return self.offsets[1:] - self.offsets[:-1]


def _plan_torch(task_ids: Tensor, num_tasks: int) -> tuple[Tensor, Tensor]:
    # -1 sorts last by mapping it to T; stable sort keeps token order within a task.
    keys = torch.where(task_ids < 0, torch.full_like(task_ids, num_tasks), task_ids)
    perm = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=num_tasks + 1)[:num_tasks]
    offsets = torch.zeros(num_tasks + 1, dtype=torch.int64, device=task_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, offsets


def check_task_ids(task_ids: Tensor, num_tasks: int, name: str = "task_ids") -> None:
    """Raise ValueError/TypeError naming `name` unless task_ids holds ints in [-1, num_tasks)."""
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of ints, got {type(task_ids).__name__}")
    if (
        task_ids.dtype.is_floating_point
        or task_ids.dtype.is_complex
        or task_ids.dtype == torch.bool
    ):
        raise TypeError(f"{name}: expected an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(task_ids)
        lo, hi = int(lo), int(hi)  # one sync per batch, not per layer
        if lo < -1 or hi >= num_tasks:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"{name}: task id {bad} out of range; expected -1 (base only) or 0..{num_tasks - 1}"
            )


def _has_cuda_plan() -> bool:
    """True when mftk._C was built with csrc/cuda (a CUDA kernel registered for build_plan)."""
    return _lib.HAS_CPU_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mftk::build_plan", "CUDA"
    )


def build_plan(task_ids: Tensor, num_tasks: int) -> RoutingPlan:
    """Group tokens by task: a stable counting sort.

    task_ids: any shape, int; flattened to (N,). -1 means base only.
    returns a RoutingPlan that every layer of a model can reuse for this batch.
    """
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks: expected a positive int, got {num_tasks!r}")
    check_task_ids(task_ids, num_tasks)
    return plan_checked(task_ids, num_tasks)


def plan_checked(task_ids: Tensor, num_tasks: int) -> RoutingPlan:
    """build_plan for ids already checked by check_task_ids (mftk.use_tasks checks its ids once,
    then plans each forward's token shape without another host sync)."""
    ids = task_ids.reshape(-1).to(torch.int64)
    if ids.device.type == "cpu" and _lib.HAS_CPU_OPS:
        perm, offsets = torch.ops.mftk.build_plan(ids, num_tasks)
    elif ids.device.type == "cuda" and _has_cuda_plan():
        perm, offsets = torch.ops.mftk.build_plan(ids, num_tasks)  # csrc/cuda counting sort
    else:
        perm, offsets = _plan_torch(ids, num_tasks)
    return RoutingPlan(perm=perm, offsets=offsets, task_ids=ids, num_tasks=num_tasks)
