"""Plain-torch oracle for the multi-adapter op: a loop over tasks, differentiable by autograd.

Tests and benchmarks import their baselines from here. Call it with float64 inputs to get the
float64 reference; it computes in whatever dtype it is given.
"""

from __future__ import annotations

import torch
from torch import Tensor


def scaling_vector(scaling: float | Tensor, num_tasks: int, like: Tensor) -> Tensor:
    """Per-task scaling as a (T,) tensor of like's dtype and device."""
    if isinstance(scaling, Tensor):
        return scaling.to(device=like.device, dtype=like.dtype).reshape(num_tasks)
    return torch.full((num_tasks,), float(scaling), device=like.device, dtype=like.dtype)


def base_linear_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None, d_out: int) -> Tensor:
    """x @ weight.T + bias; without weight, bias alone (or zeros): (N, d_out)."""
    if weight is not None:
        return torch.nn.functional.linear(x, weight, bias)
    y = x.new_zeros(x.shape[0], d_out)
    return y + bias if bias is not None else y


def _base_and_scaling(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, scaling: float | Tensor, lora_b: Tensor
) -> tuple[Tensor, Tensor]:
    """What every routing mode starts from: (base output y (N, D_out), per-task scaling s (T,))."""
    num_tasks, d_out = lora_b.shape[0], lora_b.shape[1]
    return base_linear_ref(x, weight, bias, d_out), scaling_vector(scaling, num_tasks, x)


def router_probs(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Tensor | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """p = softmax(top_k_mask(logits / temperature)),  logits = x @ router_weight.T + router_bias.

    x: (N, D_in); router_weight: (T, D_in); router_bias: (T,) or None.
    returns (probs (N, T), logits (N, T)); with top_k the other T - k entries of p are 0 and the
    kept ones are renormalised.
    """
    logits = x @ router_weight.t()
    if router_bias is not None:
        logits = logits + router_bias
    z = logits / temperature
    if top_k is not None and top_k < router_weight.shape[0]:
        kept = z.topk(top_k, dim=-1).indices
        mask = torch.ones_like(z, dtype=torch.bool).scatter(-1, kept, False)
        z = z.masked_fill(mask, float("-inf"))
    return torch.softmax(z, dim=-1), logits


def multi_adapter_linear_ref(
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    task_ids: Tensor | None = None,
    router_weight: Tensor | None = None,
    router_bias: Tensor | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Reference for every routing mode.

    hard: y[n] = x[n] @ W.T + b + s[t] * (x[n] @ A[t].T) @ B[t].T,  t = task_ids[n] (-1: base only)
    soft: y[n] = x[n] @ W.T + b + sum_t p[n, t] * s[t] * (x[n] @ A[t].T) @ B[t].T
    x: (N, D_in); weight: (D_out, D_in) or None (the adapters alone); lora_a: (T, R, D_in);
    lora_b: (T, D_out, R); task_ids: (N,) int; router_weight: (T, D_in); router_bias: (T,)
    returns (y (N, D_out), router logits (N, T) or None)
    """
    num_tasks = lora_a.shape[0]
    y, s = _base_and_scaling(x, weight, bias, scaling, lora_b)
    logits = None
    if task_ids is not None:
        for t in range(num_tasks):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xt = x.index_select(0, rows)
            delta = s[t] * (xt @ lora_a[t].t()) @ lora_b[t].t()
            y = y.index_add(0, rows, delta)
    elif router_weight is not None:
        p, logits = router_probs(x, router_weight, router_bias, top_k, temperature)
        for t in range(num_tasks):
            y = y + (p[:, t : t + 1] * s[t]) * ((x @ lora_a[t].t()) @ lora_b[t].t())
    return y, logits


# --- baselines for benchmarks: how others compute the same thing -----------------------------


def grouped_mm_hard(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    scaling: float | Tensor,
    perm: Tensor,
    offsets: Tensor,
) -> Tensor:
    """Hard routing through torch._grouped_mm on tokens gathered in plan order (autograd by torch).

    perm (N,), offsets (T + 1,): a routing plan (mftk.build_plan). returns y (N, D_out).
    """
    y, s = _base_and_scaling(x, weight, bias, scaling, lora_b)
    routed = int(offsets[-1])
    if routed == 0:
        return y
    idx = perm[:routed]
    ends = offsets[1:].to(torch.int32)
    xs = x.index_select(0, idx)
    shrink = torch._grouped_mm(xs, lora_a.transpose(1, 2), offs=ends)  # (routed, R)
    row_scale = torch.repeat_interleave(s, (offsets[1:] - offsets[:-1]), output_size=routed)
    delta = torch._grouped_mm(shrink * row_scale[:, None], lora_b.transpose(1, 2), offs=ends)
    return y.index_add(0, idx, delta)


def soft_dense_torch(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    scaling: float | Tensor,
    router_weight: Tensor,
    router_bias: Tensor | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Soft routing as plain torch GEMMs over the concatenated adapters (autograd by torch).

    The rank-T*R LoRA view: y = x W^T + b + ((x A_cat^T) * coef) B_cat^T. returns y (N, D_out).
    """
    num_tasks, rank, d_in = lora_a.shape
    y, s = _base_and_scaling(x, weight, bias, scaling, lora_b)
    p, _ = router_probs(x, router_weight, router_bias, top_k, temperature)
    coef = (p * s).repeat_interleave(rank, dim=1)
    shrink = x @ lora_a.reshape(num_tasks * rank, d_in).t()
    b_cat = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_tasks * rank)
    return y + (shrink * coef) @ b_cat.t()


def shared_adapter_ref(
    x: Tensor,
    shared_a: Tensor,
    shared_b: Tensor,
    shared_scaling: float,
    task_ids: Tensor | None = None,
    shared_tasks: Tensor | None = None,
    probs: Tensor | None = None,
) -> Tensor:
    """The shared adapter's term of a hybrid layer, added to multi_adapter_linear_ref's y.

    hard: delta[n] = m[t] * s_sh * (x[n] @ A_sh.T) @ B_sh.T for t = task_ids[n] >= 0 (0 for -1);
    soft: delta[n] = sum_t p[n, t] * m[t] * s_sh * (x[n] @ A_sh.T) @ B_sh.T.
    x: (N, D_in); shared_a: (R_s, D_in); shared_b: (D_out, R_s); shared_tasks m: (T,) 0/1 (None:
    all 1); probs: (N, T) router probabilities (soft). returns (N, D_out).
    """
    full = shared_scaling * ((x @ shared_a.t()) @ shared_b.t())
    if probs is not None:
        m = probs.new_ones(probs.shape[1]) if shared_tasks is None else shared_tasks.to(probs)
        return full * (probs @ m)[:, None]
    assert task_ids is not None, "hard routing needs task_ids"
    on = task_ids >= 0
    if shared_tasks is not None:
        on = on & (shared_tasks.to(x.device)[task_ids.clamp(min=0)] != 0)
    return full * on[:, None].to(full.dtype)
