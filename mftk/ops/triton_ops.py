"""Triton backend of the multi-adapter op: mftk::triton_{hard,soft}_{fwd,bwd}.

Same schemas as the C++ CPU family (csrc/registration.cpp); fake kernels and autograd come from
registry.register_family, so both backends share them. The kernels live in kernels/ (mftk.kernels);
this file only allocates, picks a strategy and launches.

Private contract between forward and backward (shapes match the fakes):
  hard: shrink (N, R) = x[perm[i]] A_t^T in plan order (row i <-> token perm[i]), unscaled, in the
        acc dtype (fp32, fp64 for fp64 inputs); rows past offsets[T] (base-only tokens) are 0.
  soft: shrink (N, T*R) = x A_cat^T in token order, unscaled; probs (N, T) after top-k.

Strategies for the rows of y (forward) and dx (backward), both implemented:
  "addmm": cuBLAS (torch.addmm / mm) for the frozen base, then the grouped GEMM adds the adapter
           range into that output in place (no atomics: each output row belongs to one program);
  "fused": one grouped GEMM computes [x | H] [W^T ; B^T] (+ bias) in plan order, y written once.
`choose_strategy` holds the per-shape dispatch table. It is NOT measured yet (no GPU was
available when it was written), so every shape class defaults to "addmm".

Determinism: with torch.are_deterministic_algorithms_enabled() the backward uses no atomics: dB
comes from a separate fixed-order reduction instead of being fused into the dH pass, and dA /
dRouter reductions use one program per output tile. Forward kernels never use atomics.

fp64 inputs run the same kernels with fp64 operands and accumulators (tl.dot in fp64).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mftk.kernels._common import acc_dtype
from mftk.kernels.grouped_gemm import grouped_gemm_fwd
from mftk.kernels.hard_bwd import hard_bwd_ds
from mftk.kernels.reduce import grouped_reduce_bwd
from mftk.kernels.soft import soft_bwd_ds, soft_fwd_shrink
from mftk.ops import registry

STRATEGIES = ("addmm", "fused")
# (shape class -> strategy). Unmeasured: every class defaults to "addmm" until
# benchmarks/gpu_suite.py has been run on a GPU and the winners are written here.
STRATEGY_TABLE: dict[str, str] = {"small": "addmm", "large": "addmm"}
_forced: str | None = None


def set_strategy(name: str | None) -> None:
    """Force a strategy ("addmm" | "fused") for every shape, or None to use the table.
    The environment variable MFTK_TRITON_STRATEGY does the same."""
    global _forced
    if name is not None and name not in STRATEGIES:
        raise ValueError(f"name: expected one of {STRATEGIES} or None, got {name!r}")
    _forced = name


def choose_strategy(n: int, d_in: int, d_out: int) -> str:
    """Strategy for an (N, D_in) -> (N, D_out) layer: forced, else the (unmeasured) table."""
    forced = _forced or os.environ.get("MFTK_TRITON_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"MFTK_TRITON_STRATEGY: expected one of {STRATEGIES}, got {forced!r}")
        return forced
    return STRATEGY_TABLE["large" if n * d_in * d_out >= 2**30 else "small"]


def _split(n: int) -> int:
    """Programs per task in the dA/dRouter reductions: 1 (fixed order) when deterministic."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(8, -(-n // 32)))


def _reduce(out_shape, out_dtype, left, right, offsets, dtype, **kw) -> Tensor:
    """grouped_reduce_bwd into a fresh tensor (fp32/fp64 buffer when atomics are used)."""
    split = kw.pop("split", 1)
    adt = acc_dtype(dtype)
    if split > 1:
        out = torch.zeros(out_shape, dtype=adt, device=left.device)
    else:
        out = torch.empty(out_shape, dtype=out_dtype, device=left.device)
    grouped_reduce_bwd(out, left, right, offsets, dtype, split=split, **kw)
    return out.to(out_dtype)


def _base(x: Tensor, weight: Tensor | None, bias: Tensor | None, d_out: int) -> Tensor:
    """x W^T + b; without weight (the adapters alone), b or zeros. (N, d_out)"""
    if weight is None:
        y = torch.zeros((x.shape[0], d_out), dtype=x.dtype, device=x.device)
        return y.add_(bias) if bias is not None else y
    return torch.addmm(bias, x, weight.t()) if bias is not None else x.mm(weight.t())


def _base_dx(grad_y: Tensor, weight: Tensor | None, d_in: int) -> Tensor:
    """grad_y W, or zeros (N, d_in) without weight."""
    if weight is None:
        return grad_y.new_zeros((grad_y.shape[0], d_in))
    return grad_y.mm(weight)


def _strategy(n: int, d_in: int, d_out: int, weight: Tensor | None) -> str:
    # Without a base weight there is no base GEMM to fold the expand into.
    return "addmm" if weight is None else choose_strategy(n, d_in, d_out)


def _base_plus_adapters(
    a: Tensor,
    w: Tensor | None,
    bias: Tensor | None,
    width: int,
    dtype: torch.dtype,
    offsets: Tensor,
    groups: int,
    perm: Tensor | None = None,
    **adapters,
) -> Tensor:
    """out = a w^T (+ bias) + the adapter range `adapters` (h, e, extra, coef, scale, h2, e2 of
    grouped_gemm_fwd), by the strategy for this shape; the rows of y (forward) and dx (backward).

    a: (N, K); w: (width, K) or None (adapters alone: addmm); offsets/groups: the routed groups
    (hard: plan offsets and T, with perm (N,); soft: a single 0 and 1). returns (N, width), dtype.
    """
    n, k = a.shape
    routed = {} if perm is None else {"perm": perm, "scatter_out": True}
    if _strategy(n, k, width, w) == "fused":
        out = torch.empty((n, width), dtype=dtype, device=a.device)
        # hard routing adds the base-only tail as group T and gathers a's rows in plan order
        tail = 0 if perm is None else 1
        grouped_gemm_fwd(
            out, offsets, groups + tail, dtype, gather_a=perm is not None, a=a, w=w, bias=bias,
            **routed, **adapters,
        )  # fmt: skip
    else:
        out = _base(a, w, bias, width)
        grouped_gemm_fwd(out, offsets, groups, dtype, accumulate=True, **routed, **adapters)
    return out


# --- hard routing -------------------------------------------------------------------------


@torch.library.custom_op("mftk::triton_hard_fwd", mutates_args=())
def hard_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    perm: Tensor,
    offsets: Tensor,
) -> tuple[Tensor, Tensor]:
    """y[n] = x[n] W^T + b + s[t] (x[n] A[t]^T) B[t]^T,  t = task of token n (-1: base only).

    x: (N, D_in); weight: (D_out, D_in); bias: (D_out,) or None; lora_a: (T, R, D_in);
    lora_b: (T, D_out, R); scaling: (T,); perm: (N,) int64; offsets: (T + 1,) int64.
    returns y (N, D_out) x.dtype, shrink (N, R) acc dtype in plan order.
    """
    n, d_in = x.shape
    t, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    adt = acc_dtype(x.dtype)
    perm, offsets = perm.contiguous(), offsets.to(torch.int64).contiguous()
    s = scaling.to(device=x.device, dtype=adt).contiguous()
    shrink = torch.zeros((n, r), dtype=adt, device=x.device)
    if n == 0:
        return _base(x, weight, bias, d_out), shrink
    # S = x[perm] A_t^T over the routed rows, plan order, no padding
    grouped_gemm_fwd(shrink, offsets, t, x.dtype, perm=perm, gather_a=True, a=x, w=lora_a)
    h = shrink.unsqueeze(1).expand(n, t, r)  # h[i, t, :] = S[i]: the group picks its own adapter
    y = _base_plus_adapters(
        x, weight, bias, d_out, x.dtype, offsets, t, perm, h=h, e=lora_b, extra=1, scale=s
    )
    return y, shrink


@torch.library.custom_op("mftk::triton_hard_bwd", mutates_args=())
def hard_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    perm: Tensor,
    offsets: Tensor,
    shrink: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """dS = s_t dy B_t (fused with dB = s_t dy^T S), dx = [dy | dS] [W ; A_t], dA = dS^T x.

    grad_y: (N, D_out); other inputs as in hard_fwd; shrink: (N, R) from hard_fwd.
    returns grad_x (N, D_in), grad_lora_a (T, R, D_in), grad_lora_b (T, D_out, R).
    """
    n, d_in = x.shape
    t, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    adt = acc_dtype(x.dtype)
    perm, offsets = perm.contiguous(), offsets.to(torch.int64).contiguous()
    s = scaling.to(device=x.device, dtype=adt).contiguous()
    if n == 0:
        return _base_dx(grad_y, weight, d_in), torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    det = torch.are_deterministic_algorithms_enabled()
    db_acc = None if det else torch.zeros((t, d_out, r), dtype=adt, device=x.device)
    ds = hard_bwd_ds(grad_y, lora_b, s, shrink, perm, offsets, db_acc)  # (N, R) plan order
    if det:
        grad_b = _reduce(
            (t, d_out, r),
            lora_b.dtype,
            grad_y.unsqueeze(1).expand(n, t, d_out),
            shrink.unsqueeze(1).expand(n, t, r),
            offsets,
            x.dtype,
            perm=perm,
            gather_left=True,
            scale=s,
        )
    else:
        grad_b = db_acc.to(lora_b.dtype)
    grad_a = _reduce(
        (t, r, d_in),
        lora_a.dtype,
        ds.unsqueeze(1).expand(n, t, r),
        x.unsqueeze(1).expand(n, t, d_in),
        offsets,
        x.dtype,
        perm=perm,
        gather_right=True,
        split=_split(n),
    )
    h = ds.unsqueeze(1).expand(n, t, r)
    e = lora_a.transpose(1, 2)  # (T, D_in, R)
    w_t = weight.t() if weight is not None else None  # dx = dy W: W^T as the (D_in, D_out) "w"
    grad_x = _base_plus_adapters(
        grad_y, w_t, None, d_in, x.dtype, offsets, t, perm, h=h, e=e, extra=1
    )
    return grad_x, grad_a, grad_b


# --- soft routing -------------------------------------------------------------------------


@torch.library.custom_op("mftk::triton_soft_fwd", mutates_args=())
def soft_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    router_weight: Tensor,
    router_bias: Tensor | None,
    temperature: float,
    top_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """p = softmax(top_k_mask((x Wr^T + br) / temperature));
    y = x W^T + b + sum_t p[:, t] s[t] (x A[t]^T) B[t]^T.

    x: (N, D_in); router_weight: (T, D_in); router_bias: (T,) or None; top_k: 0 = all tasks.
    returns y (N, D_out) x.dtype, logits (N, T) x.dtype, probs (N, T) and shrink (N, T*R) in the
    acc dtype.
    """
    n, d_in = x.shape
    t, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    adt = acc_dtype(x.dtype)
    s = scaling.to(device=x.device, dtype=adt).contiguous()
    if n == 0:
        probs = x.new_empty((0, t), dtype=adt)
        shrink = x.new_empty((0, t * r), dtype=adt)
        return _base(x, weight, bias, d_out), x.new_empty((0, t)), probs, shrink
    logits, probs, shrink = soft_fwd_shrink(
        x, lora_a, router_weight, router_bias, temperature, top_k
    )
    h = shrink.view(n, t, r)
    rows = torch.zeros(1, dtype=torch.int64, device=x.device)  # one group: all tokens
    y = _base_plus_adapters(
        x, weight, bias, d_out, x.dtype, rows, 1, h=h, e=lora_b, extra=2, coef=probs, scale=s
    )
    return y, logits, probs, shrink


@torch.library.custom_op("mftk::triton_soft_bwd", mutates_args=())
def soft_bwd(
    grad_y: Tensor,
    grad_logits: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    router_weight: Tensor,
    probs: Tensor,
    shrink: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dH = dy B_cat (fused with dB), dS, dp and the softmax backward in its epilogue, then
    dx = [dy | dS | dL] [W ; A_cat ; Wr], dA = dS^T x, dWr = dL^T x, dbr = sum dL.

    grad_y: (N, D_out); grad_logits: (N, T) or None; probs, shrink: from soft_fwd.
    returns grad_x (N, D_in), grad_lora_a (T, R, D_in), grad_lora_b (T, D_out, R),
    grad_router_weight (T, D_in), grad_router_bias (T,).
    """
    n, d_in = x.shape
    t, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    adt = acc_dtype(x.dtype)
    s = scaling.to(device=x.device, dtype=adt).contiguous()
    rw_dtype = router_weight.dtype
    if n == 0:
        return (
            _base_dx(grad_y, weight, d_in),
            torch.zeros_like(lora_a),
            torch.zeros_like(lora_b),
            torch.zeros_like(router_weight),
            router_weight.new_zeros((t,)),
        )
    det = torch.are_deterministic_algorithms_enabled()
    db_acc = None if det else torch.zeros((t, d_out, r), dtype=adt, device=x.device)
    ds, dl = soft_bwd_ds(grad_y, grad_logits, lora_b, s, probs, shrink, temperature, db_acc)
    if det:
        grad_b = _reduce(
            (t, d_out, r),
            lora_b.dtype,
            grad_y.unsqueeze(1).expand(n, t, d_out),
            shrink.view(n, t, r),
            None,
            x.dtype,
            coef=probs,
            scale=s,
        )
    else:
        grad_b = db_acc.to(lora_b.dtype)
    split = _split(n)
    x_t = x.unsqueeze(1).expand(n, t, d_in)
    grad_a = _reduce((t, r, d_in), lora_a.dtype, ds.view(n, t, r), x_t, None, x.dtype, split=split)
    grad_rw = _reduce(
        (1, t, d_in), rw_dtype, dl.view(n, 1, t), x.unsqueeze(1), None, x.dtype, split=split
    )[0]
    grad_rb = dl.sum(0).to(rw_dtype)
    rows = torch.zeros(1, dtype=torch.int64, device=x.device)
    kw = dict(h=ds.view(n, t, r), e=lora_a.transpose(1, 2), extra=2, h2=dl, e2=router_weight.t())
    w_t = weight.t() if weight is not None else None
    grad_x = _base_plus_adapters(grad_y, w_t, None, d_in, x.dtype, rows, 1, **kw)
    return grad_x, grad_a, grad_b, grad_rw, grad_rb


registry.register_family("triton_", hard_bwd, soft_bwd)
