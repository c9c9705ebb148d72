"""The public op: mftk.multi_adapter_linear, with backend dispatch."""

from __future__ import annotations

import torch
from torch import Tensor

from mftk.ops import _lib, registry  # submodules, not the package's names
from mftk.ops.checks import check_op_args, check_shared_args
from mftk.ops.plan import RoutingPlan, build_plan, check_plan
from mftk.ops.reference import base_linear_ref, multi_adapter_linear_ref

BACKENDS = ("auto", "reference", "cpu", "triton")


# backend -> (hard_fwd, soft_fwd). Filled outside any torch.compile trace: registration itself
# must not be traced, and a plain dict lookup is a constant to dynamo.
_FAMILIES: dict[str, tuple] = {}


def _load_family(backend: str) -> tuple:
    if backend == "cpu":
        _lib.require_cpu_ops()
        torch.library.register_fake("mftk::build_plan")(registry.plan_fake)
        registry.register_family("", torch.ops.mftk.hard_bwd, torch.ops.mftk.soft_bwd)
        family = (torch.ops.mftk.hard_fwd, torch.ops.mftk.soft_fwd)
    else:
        from mftk.ops import triton_ops  # imports triton; only when asked for

        family = (triton_ops.hard_fwd, triton_ops.soft_fwd)
    _FAMILIES[backend] = family
    return family


def _ops(backend: str) -> tuple:
    family = _FAMILIES.get(backend)
    return family if family is not None else _load_family(backend)


if _lib.HAS_CPU_OPS:
    _load_family("cpu")


def resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if x.device.type == "cuda":
        return "triton"
    if x.device.type == "cpu":
        return "cpu" if _lib.HAS_CPU_OPS else "reference"
    return "reference"


def _scaling_tensor(scaling: float | Tensor, num_tasks: int, x: Tensor) -> Tensor:
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(scaling, Tensor):
        return (
            scaling.detach()
            .to(device=x.device, dtype=dt)
            .reshape(-1)
            .expand(num_tasks)
            .contiguous()
        )
    if torch.compiler.is_compiling():
        return torch.full((num_tasks,), float(scaling), dtype=dt, device=x.device)
    key = (float(scaling), num_tasks, dt, x.device)
    s = _SCALINGS.get(key)
    if s is None:  # one small fill launch per distinct constant, not one per layer call
        if len(_SCALINGS) >= 64:
            _SCALINGS.clear()
        s = _SCALINGS[key] = torch.full((num_tasks,), float(scaling), dtype=dt, device=x.device)
    return s


_SCALINGS: dict[tuple, Tensor] = {}


def with_shared(
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float | Tensor,
    shared_a: Tensor | None,
    shared_b: Tensor | None,
    shared_scaling: float,
    shared_tasks: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(T, R + R_s, D_in), (T, D_out, R + R_s): the shared adapter appended to every task's rank
    range, every scale folded into B (B_t * s[t], B_sh * m[t] * s_sh), so the op then runs with
    scaling 1. No division and no host sync: a task of scale 0 keeps its shared part. Arguments
    checked by the caller (check_shared_args)."""
    num_tasks = lora_a.shape[0]
    s = _scaling_tensor(scaling, num_tasks, lora_a)
    on = torch.ones_like(s) if shared_tasks is None else shared_tasks.to(s)
    a = torch.cat([lora_a, shared_a.unsqueeze(0).expand(num_tasks, -1, -1)], dim=1)
    b_t = (lora_b.to(s.dtype) * s[:, None, None]).to(lora_b.dtype)
    b_sh = (shared_b.to(s.dtype).unsqueeze(0) * (on * float(shared_scaling))[:, None, None]).to(
        shared_b.dtype
    )
    return a, torch.cat([b_t, b_sh], dim=2)


def _plan_for(task_ids: Tensor | RoutingPlan, num_tasks: int, n: int) -> RoutingPlan:
    if isinstance(task_ids, RoutingPlan):
        plan = task_ids
        if plan.num_tasks != num_tasks:
            raise ValueError(
                f"task_ids: plan built for {plan.num_tasks} tasks, lora_a has {num_tasks}"
            )
        check_plan(plan)
    else:
        plan = build_plan(task_ids, num_tasks)
    if plan.num_tokens != n:
        raise ValueError(
            f"task_ids: {plan.num_tokens} ids for {n} tokens of x; expected one per token"
        )
    return plan


def multi_adapter_linear(
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    bias: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    task_ids: Tensor | RoutingPlan | None = None,
    router_weight: Tensor | None = None,
    router_bias: Tensor | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    return_router_logits: bool = False,
    backend: str = "auto",
    shared_a: Tensor | None = None,
    shared_b: Tensor | None = None,
    shared_scaling: float = 1.0,
    shared_tasks: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """A frozen linear layer plus one LoRA adapter per task, routed per token.

    hard (task_ids):      y[n] = x[n] @ W.T + b + s[t] * (x[n] @ A[t].T) @ B[t].T,  t = task_ids[n]
                          (t = -1: base only)
    soft (router_weight): p = softmax(top_k_mask((x @ router_weight.T + router_bias) / temperature))
                          y[n] = x[n] @ W.T + b + sum_t p[n, t] * s[t] * (x[n] @ A[t].T) @ B[t].T
    neither:              y = x @ W.T + b
    weight=None drops the x @ W.T term: the adapters alone, for a base computed elsewhere (a 4-bit
    layer, or the undropped input under LoRA dropout).

    x: (..., D_in) fp32|bf16|fp16|fp64, leading dims flattened to N; weight: (D_out, D_in);
    lora_a: (T, R, D_in); lora_b: (T, D_out, R); bias: (D_out,); scaling: float or (T,);
    task_ids: (...) int matching x's leading dims, or a RoutingPlan from mftk.build_plan;
    router_weight: (T, D_in); router_bias: (T,); top_k: keep the k largest p per token, renormalise.
    hybrid (shared_a (R_s, D_in), shared_b (D_out, R_s)): every routed token also gets a shared
    adapter, y[n] += m[t] * shared_scaling * (x[n] @ A_sh.T) @ B_sh.T (soft: weighted by p[n, t]);
    shared_tasks m (T,) 0/1 says which tasks use it (None: all). It runs as rank range R..R+R_s of
    every task's adapter in the same launches (A_t' = [A_t; A_sh], B_t' = [s[t] B_t, m[t]
    shared_scaling B_sh], scaling 1), so every backend computes it, forward and backward.
    returns y: (..., D_out) in x.dtype, and the router logits (..., T) when return_router_logits.
    Gradients flow to x, lora_a, lora_b, bias, router_weight, router_bias (and weight if it
    requires grad); scaling is a constant.
    """
    check_op_args(
        x, weight, lora_a, lora_b, bias, scaling, router_weight, router_bias, top_k, temperature
    )
    if shared_a is not None or shared_b is not None:
        check_shared_args(lora_a, lora_b, shared_a, shared_b, shared_scaling, shared_tasks)
        if task_ids is not None or router_weight is not None:  # base only: nothing to fold
            lora_a, lora_b = with_shared(
                lora_a, lora_b, scaling, shared_a, shared_b, shared_scaling, shared_tasks
            )
            scaling = 1.0  # folded into lora_b
    if task_ids is not None and router_weight is not None:
        raise ValueError(
            "task_ids and router_weight: give one routing mode (hard or soft), not both"
        )
    if return_router_logits and router_weight is None:
        raise ValueError("return_router_logits: needs router_weight (soft routing)")
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)
    n, num_tasks = x2.shape[0], lora_a.shape[0]
    be = resolve_backend(backend, x)
    logits = None
    if be == "reference":
        ids = None
        if task_ids is not None:
            ids = _plan_for(task_ids, num_tasks, n).task_ids
        y, logits = multi_adapter_linear_ref(
            x2,
            weight,
            lora_a,
            lora_b,
            bias,
            scaling,
            ids,
            router_weight,
            router_bias,
            top_k,
            temperature,
        )
    else:
        hard_fwd, soft_fwd = _ops(be)
        if be == "cpu" and x.device.type != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors, x is on {x.device}")
        s = _scaling_tensor(scaling, num_tasks, x2)
        if router_weight is not None:
            k = 0 if top_k is None or top_k >= num_tasks else top_k
            y, logits, _, _ = soft_fwd(
                x2,
                weight,
                bias,
                lora_a,
                lora_b,
                s,
                router_weight,
                router_bias,
                float(temperature),
                k,
            )
        elif task_ids is not None:
            plan = _plan_for(task_ids, num_tasks, n)
            y, _ = hard_fwd(x2, weight, bias, lora_a, lora_b, s, plan.perm, plan.offsets)
        else:
            y = base_linear_ref(x2, weight, bias, lora_b.shape[1])
    y = y.reshape(*lead, lora_b.shape[1])
    if return_router_logits:
        return y, logits.reshape(*lead, num_tasks)
    return y
