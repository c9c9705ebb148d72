"""Triton backend of the multi-adapter op: mftk::triton_{hard,soft}_{fwd,bwd}.

Same schemas as the C++ CPU family (csrc/registration.cpp); fake kernels and autograd come from
registry.register_family, so both backends share them. The kernels live in kernels/ (mftk.kernels);
this file only allocates, picks a strategy and launches.

Private contract between forward and backward (shapes match the fakes):
  hard: shrink (N, R) = x[perm[i]] A_t^T in plan order (row i <-> token perm[i]), unscaled, in the
        acc dtype (fp32, fp64 for fp64 inputs); rows past offsets[T] (base-only tokens) are 0.
  soft: shrink (N, T*R) = x A_cat^T in token order, unscaled; probs (N, T) after top-k.

Strategies for the rows of y (forward) and dx (backward):
  "addmm": a Triton kernel writes the adapters' part y0 = b + s S B^T (dx0 = dS A) once, in the
           pass that already holds S (dS); cuBLAS then accumulates the frozen base into it
           (addmm_ with beta = 1), which a compute-bound GEMM hides. No read-modify-write pass.
  "fused": one Triton grouped GEMM computes [x | s S] [W^T ; B^T] (+ b): y is written once by
           the GEMM itself, at the price of a Triton GEMM instead of cuBLAS for the base.
`STRATEGY_TABLE` is set from the cost model (benchmarks/launch_model.py), not from a GPU
measurement: no GPU has run these kernels yet. See benchmarks/results/gpu-model.md.

Launches per fwd+bwd (addmm): hard 2 + 4, soft 3 + 5 (benchmarks/results/gpu-model.md). Weight
gradients have one owner program per tile (no atomics on them). The only atomics accumulate hard
routing's dS (N, R) over D_out blocks; under torch.use_deterministic_algorithms dS gets its own
pass over dy instead, and every run is bit-identical.

fp64 inputs run the same kernels with fp64 operands and accumulators (tl.dot in fp64).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mftk.kernels._common import acc_dtype
from mftk.kernels.grouped_gemm import grouped_gemm_fwd
from mftk.kernels.hard_bwd import hard_bwd_dy_pass, hard_bwd_x_pass
from mftk.kernels.reduce import grouped_reduce_bwd
from mftk.kernels.shrink_expand import shrink_expand
from mftk.kernels.soft import soft_bwd_ds, soft_fwd_shrink
from mftk.ops import registry

STRATEGIES = ("addmm", "fused")
# (shape class -> strategy), from the cost model until a GPU measures it: gpu-model.md picks
# addmm at every modelled shape and card; fused would need a Triton GEMM at >= 0.95 of cuBLAS.
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
    """Strategy for an (N, D_in) -> (N, D_out) layer: forced, else the (modelled) table."""
    forced = _forced or os.environ.get("MFTK_TRITON_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"MFTK_TRITON_STRATEGY: expected one of {STRATEGIES}, got {forced!r}")
        return forced
    return STRATEGY_TABLE["large" if n * d_in * d_out >= 2**30 else "small"]


def _fused(n: int, d_in: int, d_out: int, weight: Tensor | None, rank: int = 0) -> bool:
    # Without a base weight there is no base GEMM to fuse: the adapters' kernel writes y itself.
    # fp32 with rank > 32 has no fused GEMM config that compiles without spills (gpu-compile.md).
    if weight is None or (weight.dtype == torch.float32 and rank > 32):
        return False
    return choose_strategy(n, d_in, d_out) == "fused"


def _base(x: Tensor, weight: Tensor | None, bias: Tensor | None, d_out: int) -> Tensor:
    """x W^T + b; without weight (the adapters alone), b or zeros. (N, d_out); N = 0 only."""
    if weight is None:
        y = torch.zeros((x.shape[0], d_out), dtype=x.dtype, device=x.device)
        return y.add_(bias) if bias is not None else y
    return torch.addmm(bias, x, weight.t()) if bias is not None else x.mm(weight.t())


def _base_dx(grad_y: Tensor, weight: Tensor | None, d_in: int) -> Tensor:
    """grad_y W, or zeros (N, d_in) without weight."""
    if weight is None:
        return grad_y.new_zeros((grad_y.shape[0], d_in))
    return grad_y.mm(weight)


def _strides4(t: Tensor, order: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """grouped_reduce_bwd's (so_g, so_t, so_p, so_q) from t's strides; -1 means 0."""
    return tuple(0 if i < 0 else t.stride(i) for i in order)


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
    shrink = torch.empty((n, r), dtype=adt, device=x.device)
    if n == 0:
        return _base(x, weight, bias, d_out), shrink
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    if _fused(n, d_in, d_out, weight, r):
        shrink_expand(x, lora_a, shrink, perm, offsets, x.dtype)  # S only
        h = shrink.unsqueeze(1).expand(n, t, r)  # h[i, t, :] = S[i]: the group picks its adapter
        grouped_gemm_fwd(
            y, offsets, t + 1, x.dtype, perm=perm, gather_a=True, scatter_out=True, a=x,
            w=weight, bias=bias, h=h, e=lora_b, extra=1, scale=s,
        )  # fmt: skip
        return y, shrink
    # S and y0 = b + s S B^T in one pass over x; cuBLAS adds x W^T into y0
    shrink_expand(
        x, lora_a, shrink, perm, offsets, x.dtype, e=lora_b, scale_out=s, bias=bias, out=y
    )
    if weight is not None:
        y.addmm_(x, weight.t())
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
    """dB_t = s_t dy_t^T S_t with dS = s_t dy B_t in one pass over dy, dA_t = dS_t^T x_t with
    dx0 = dS A_t in one pass over x, dx = dx0 + dy W (cuBLAS addmm_). Weight gradients have one
    owner program per tile; dS uses relaxed atomics (its own pass when deterministic).

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
    grad_x = torch.empty((n, d_in), dtype=x.dtype, device=x.device)
    grad_a, grad_b = torch.empty_like(lora_a), torch.empty_like(lora_b)
    fused = _fused(n, d_in, d_out, weight, r)
    if torch.are_deterministic_algorithms_enabled():
        # dS by its own pass over dy (no atomics), dB by the dy pass
        ds = torch.empty((n, r), dtype=adt, device=x.device)
        shrink_expand(grad_y, lora_b.transpose(1, 2), ds, perm, offsets, x.dtype, scale_in=s)
        hard_bwd_dy_pass(grad_y, shrink, lora_b, s, perm, offsets, grad_b)
    else:
        # one pass over dy: dB owned, dS accumulated over the D_out blocks (relaxed atomics)
        ds = torch.zeros((n, r), dtype=adt, device=x.device)  # plan order
        hard_bwd_dy_pass(grad_y, shrink, lora_b, s, perm, offsets, grad_b, ds)
    if fused:
        hard_bwd_x_pass(x, ds, lora_a, perm, offsets, grad_a)
        h = ds.unsqueeze(1).expand(n, t, r)
        grouped_gemm_fwd(
            grad_x, offsets, t + 1, x.dtype, perm=perm, gather_a=True, scatter_out=True,
            a=grad_y, w=weight.t(), h=h, e=lora_a.transpose(1, 2), extra=1,
        )  # fmt: skip
    else:
        # one pass over x: dA owned, dx0 = dS A_t written once; cuBLAS adds dy W into it
        hard_bwd_x_pass(x, ds, lora_a, perm, offsets, grad_a, dx0=grad_x)
        if weight is not None:
            grad_x.addmm_(grad_y, weight)
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
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    kw = dict(h=shrink.view(n, t, r), e=lora_b, extra=2, coef=probs, scale=s, bias=bias)
    if _fused(n, d_in, d_out, weight, r):
        grouped_gemm_fwd(y, None, 0, x.dtype, a=x, w=weight, **kw)
    else:
        grouped_gemm_fwd(y, None, 0, x.dtype, **kw)  # y0 = b + sum_t p s S B^T, write-only
        if weight is not None:
            y.addmm_(x, weight.t())
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
    """G = [dS | dL] from one pass over dy (dH = dy B_cat and the softmax backward), then
    dB_t = s_t dy^T (p_t S_t), [dA ; dWr] = G^T x with dbr = sum dL (one pass over x), and
    dx = dy W + G [A_cat ; Wr].

    grad_y: (N, D_out); grad_logits: (N, T) or None; probs, shrink: from soft_fwd.
    returns grad_x (N, D_in), grad_lora_a (T, R, D_in), grad_lora_b (T, D_out, R),
    grad_router_weight (T, D_in), grad_router_bias (T,).
    """
    n, d_in = x.shape
    t, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    adt = acc_dtype(x.dtype)
    s = scaling.to(device=x.device, dtype=adt).contiguous()
    if n == 0:
        return (
            _base_dx(grad_y, weight, d_in),
            torch.zeros_like(lora_a),
            torch.zeros_like(lora_b),
            torch.zeros_like(router_weight),
            router_weight.new_zeros((t,)),
        )
    g = soft_bwd_ds(grad_y, grad_logits, lora_b, s, probs, shrink, temperature)  # (N, T*R + T)
    grad_b = torch.empty_like(lora_b)  # column p = (task, rank) of S, row = D_out
    grouped_reduce_bwd(
        grad_b, _strides4(grad_b, (-1, 0, 2, 1)), shrink, grad_y, None, x.dtype,
        psub=r, coef=probs, scale=s,
    )  # fmt: skip
    grad_a = torch.empty_like(lora_a)
    grad_rw = torch.empty_like(router_weight)
    grad_rb = router_weight.new_empty((t,))
    grouped_reduce_bwd(
        grad_a, _strides4(grad_a, (-1, 0, 1, 2)), g, x, None, x.dtype,
        psub=r, out2=grad_rw, p1=t * r, lsum=grad_rb,
    )  # fmt: skip
    grad_x = torch.empty((n, d_in), dtype=x.dtype, device=x.device)
    kw = dict(h=g[:, : t * r].unflatten(1, (t, r)), e=lora_a.transpose(1, 2), extra=2)
    kw.update(h2=g[:, t * r :], e2=router_weight.t())
    if _fused(n, d_in, d_out, weight, r):
        grouped_gemm_fwd(grad_x, None, 0, x.dtype, a=grad_y, w=weight.t(), **kw)
    else:
        grouped_gemm_fwd(grad_x, None, 0, x.dtype, **kw)  # dx0 = [dS | dL] [A_cat ; Wr]
        if weight is not None:
            grad_x.addmm_(grad_y, weight)
    return grad_x, grad_a, grad_b, grad_rw, grad_rb


registry.register_family("triton_", hard_bwd, soft_bwd)
