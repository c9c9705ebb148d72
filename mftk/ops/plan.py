"""The routing plan: tokens grouped by task once per batch, reused by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # True once checked (build_plan's plans are; a plan built by hand is checked on first use).
    # Not a constructor argument: a hand-built plan cannot claim it.
    checked: bool = field(default=False, init=False, compare=False, repr=False)

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
    plan = RoutingPlan(perm=perm, offsets=offsets, task_ids=ids, num_tasks=num_tasks)
    object.__setattr__(plan, "checked", True)  # built here from checked ids
    return plan


def check_plan(plan: RoutingPlan) -> None:
    """Raise ValueError naming `task_ids` unless a (hand-built) plan is consistent: perm a
    permutation of 0..N-1, offsets (T + 1,) non-decreasing from 0, and task_ids[perm] grouped as
    the offsets say. One pass over N; a plan is checked once (plan.checked)."""
    if plan.checked:
        return
    n, t = plan.task_ids.numel(), plan.num_tasks
    for name, v, shape in (("perm", plan.perm, (n,)), ("offsets", plan.offsets, (t + 1,))):
        if not isinstance(v, Tensor) or v.dtype != torch.int64 or tuple(v.shape) != shape:
            raise ValueError(f"task_ids: plan.{name} must be an int64 tensor of shape {shape}")
    if torch.compiler.is_compiling() or plan.perm.device.type == "meta":
        return  # no values to read (tracing, or the launch model's meta tensors)
    perm, off = plan.perm, plan.offsets
    seen = torch.zeros(n, dtype=torch.int64, device=perm.device)
    in_range = bool(((perm >= 0) & (perm < n)).all()) if n else True
    if not in_range or (
        n and not bool(seen.index_add_(0, perm, torch.ones_like(perm)).eq(1).all())
    ):
        raise ValueError("task_ids: plan.perm is not a permutation of 0..N-1")
    if int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()) or int(off[-1]) > n:
        raise ValueError("task_ids: plan.offsets must rise from 0 to at most N")
    counts = off[1:] - off[:-1]
    want = torch.repeat_interleave(torch.arange(t, device=perm.device), counts)
    got = plan.task_ids.reshape(-1)[perm]
    if not torch.equal(got[: want.numel()], want) or bool(got[want.numel() :].ne(-1).any()):
        raise ValueError("task_ids: plan.perm does not group plan.task_ids as plan.offsets say")
    object.__setattr__(plan, "checked", True)
