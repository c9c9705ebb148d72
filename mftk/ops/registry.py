"""Fake (meta) kernels and autograd for the mftk:: op families.

Each family is a forward op and a backward op with fixed signatures (see csrc/registration.cpp).
The CPU family `mftk::{hard,soft}_{fwd,bwd}` comes from mftk._C; the Triton family
`mftk::triton_{hard,soft}_{fwd,bwd}` is defined in mftk/ops/triton_ops.py with the same signatures.
`register_family` gives both the same fake kernels and the same autograd formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _cdt(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_common(x, weight, lora_a, lora_b, scaling) -> None:
    torch._check(x.dim() == 2, lambda: "x: expected (N, D_in)")
    if weight is not None:  # None: the adapters alone, D_out from lora_b
        torch._check(weight.shape[1] == x.shape[1], lambda: "weight: expected (D_out, D_in)")
        torch._check(lora_b.shape[1] == weight.shape[0], lambda: "lora_b: expected (T, D_out, R)")
    torch._check(lora_a.shape[2] == x.shape[1], lambda: "lora_a: expected (T, R, D_in)")
    torch._check(lora_b.shape[0] == lora_a.shape[0], lambda: "lora_b: expected (T, D_out, R)")
    torch._check(lora_b.shape[2] == lora_a.shape[1], lambda: "lora_b: expected (T, D_out, R)")
    torch._check(scaling.shape == (lora_a.shape[0],), lambda: "scaling: expected (T,)")


# --- fake kernels -------------------------------------------------------------------------


def plan_fake(task_ids: Tensor, num_tasks: int) -> tuple[Tensor, Tensor]:
    torch._check(task_ids.dim() == 1, lambda: "task_ids: expected (N,)")
    return (
        task_ids.new_empty(task_ids.shape, dtype=torch.int64),
        task_ids.new_empty((num_tasks + 1,), dtype=torch.int64),
    )


def hard_fwd_fake(x, weight, bias, lora_a, lora_b, scaling, perm, offsets):
    _check_common(x, weight, lora_a, lora_b, scaling)
    torch._check(perm.shape == (x.shape[0],), lambda: "perm: expected (N,)")
    torch._check(offsets.shape == (lora_a.shape[0] + 1,), lambda: "offsets: expected (T + 1,)")
    y = x.new_empty((x.shape[0], lora_b.shape[1]))
    shrink = x.new_empty((x.shape[0], lora_a.shape[1]), dtype=_cdt(x))
    return y, shrink


def hard_bwd_fake(grad_y, x, weight, lora_a, lora_b, scaling, perm, offsets, shrink):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def soft_fwd_fake(
    x, weight, bias, lora_a, lora_b, scaling, router_weight, router_bias, temperature, top_k
):
    _check_common(x, weight, lora_a, lora_b, scaling)
    t, r = lora_a.shape[0], lora_a.shape[1]
    torch._check(router_weight.shape == (t, x.shape[1]), lambda: "router_weight: (T, D_in)")
    n = x.shape[0]
    return (
        x.new_empty((n, lora_b.shape[1])),
        x.new_empty((n, t)),
        x.new_empty((n, t), dtype=_cdt(x)),
        x.new_empty((n, t * r), dtype=_cdt(x)),
    )


def soft_bwd_fake(
    grad_y, grad_logits, x, weight, lora_a, lora_b, scaling, router_weight, probs, shrink, temp
):
    return (
        torch.empty_like(x),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
        torch.empty_like(router_weight),
        router_weight.new_empty((router_weight.shape[0],)),
    )


# --- autograd -----------------------------------------------------------------------------


def _base_grads(ctx, grad_y: Tensor, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the base weight (only if it requires grad) and of the bias."""
    grad_w = grad_y.t().mm(x) if ctx.weight_needs_grad else None  # False when weight is None
    grad_bias = grad_y.sum(0) if ctx.bias_needs_grad else None
    return grad_w, grad_bias


def _hard_autograd(bwd: Callable):
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scaling, perm, offsets = inputs
        _, shrink = output
        ctx.set_materialize_grads(False)  # no zero-filled launch for the unused shrink's grad
        ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[1]
        ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, perm, offsets, shrink)

    def backward(ctx, grad_y, _grad_shrink):
        x, weight, lora_a, lora_b, scaling, perm, offsets, shrink = ctx.saved_tensors
        if grad_y is None:
            grad_y = x.new_zeros((x.shape[0], lora_b.shape[1]))
        grad_x, grad_a, grad_b = bwd(
            grad_y.contiguous(), x, weight, lora_a, lora_b, scaling, perm, offsets, shrink
        )
        grad_w, grad_bias = _base_grads(ctx, grad_y, x)
        # x, weight, bias, lora_a, lora_b, scaling, perm, offsets
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None

    return backward, setup_context


def _soft_autograd(bwd: Callable):
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scaling, router_w, router_b, temperature, _ = inputs
        _, _, probs, shrink = output
        ctx.set_materialize_grads(False)  # probs and shrink are never differentiated through
        ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[1]
        ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.has_router_bias = router_b is not None
        ctx.temperature = temperature
        ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, router_w, probs, shrink)

    def backward(ctx, grad_y, grad_logits, _grad_probs, _grad_shrink):
        x, weight, lora_a, lora_b, scaling, router_w, probs, shrink = ctx.saved_tensors
        if grad_y is None:
            grad_y = x.new_zeros((x.shape[0], lora_b.shape[1]))
        grad_x, grad_a, grad_b, grad_rw, grad_rb = bwd(
            grad_y.contiguous(),
            grad_logits,
            x,
            weight,
            lora_a,
            lora_b,
            scaling,
            router_w,
            probs,
            shrink,
            ctx.temperature,
        )
        grad_w, grad_bias = _base_grads(ctx, grad_y, x)
        grad_rb = grad_rb if ctx.has_router_bias else None
        # x, weight, bias, lora_a, lora_b, scaling, router_weight, router_bias, temperature, top_k
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_rw, grad_rb, None, None

    return backward, setup_context


def register_family(prefix: str, hard_bwd: Callable, soft_bwd: Callable) -> None:
    """Register fake kernels and autograd for mftk::{prefix}hard_* and mftk::{prefix}soft_*."""
    lib = "mftk::" + prefix
    torch.library.register_fake(lib + "hard_fwd")(hard_fwd_fake)
    torch.library.register_fake(lib + "hard_bwd")(hard_bwd_fake)
    torch.library.register_fake(lib + "soft_fwd")(soft_fwd_fake)
    torch.library.register_fake(lib + "soft_bwd")(soft_bwd_fake)
    backward, setup = _hard_autograd(hard_bwd)
    torch.library.register_autograd(lib + "hard_fwd", backward, setup_context=setup)
    backward, setup = _soft_autograd(soft_bwd)
    torch.library.register_autograd(lib + "soft_fwd", backward, setup_context=setup)
