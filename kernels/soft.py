"""Soft routing: the kernels that see all T adapters of a row block at once.

Forward, one pass over x:  S = x A_cat^T (N, T*R) and logits = x Wr^T + br (N, T) share the x
tiles; the epilogue does top-k and softmax and writes logits, p and S. The expand (y0 = sum_t p s_t
S_t B_t^T + b) is the grouped GEMM's adapter range (grouped_gemm.py).
Backward, one pass over dy: dH = dy B_cat, whose epilogue writes G = [dS | dL] (N, T*R + T):
dS = p s dH, dp_t = s_t (dH_t . S_t), and the softmax backward dL = p (dp - sum p dp) / temp + gL.
dB, dA and dWr then come from the reductions (reduce.py), with no atomics.

Columns c of S and dS are compact (task c // R, rank c % R). The T*R columns are walked in
chunks of BLOCK_C inside the program, so registers hold one chunk whatever T*R is (T*R = 2048
fits an A100); a chunk after the first re-reads the row block's x (or dy) tiles, from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mftk.kernels._common import (
    acc_dtype,
    configs,
    dot_meta,
    elem_bytes,
    n_bucket,
    pow2,
    pruner,
    register,
    smem_ok,
    tiles_ok,
)

_ROWS = [  # BLOCK_M, BLOCK_K, BLOCK_C, warps, stages
    (64, 64, 64, 4, 3),
    (32, 64, 128, 4, 3),
    (64, 32, 128, 8, 3),
    (32, 128, 64, 4, 3),
    (16, 64, 128, 4, 4),
    (64, 64, 128, 8, 2),
    (16, 64, 64, 4, 4),
    (16, 64, 32, 4, 4),
    (16, 32, 32, 4, 3),
    (16, 32, 16, 4, 3),
]
_NAMES = ("BLOCK_M", "BLOCK_K", "BLOCK_C")


def _fits(kw: dict, args: dict, arch: int) -> bool:
    bm, bk, bc, bt = kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_C"], args["BLOCK_T"]
    if bc > pow2(args["TR"]) and bc > 32:  # no chunk wider than T*R needs
        return False
    esz = elem_bytes(args, "x_ptr" if "x_ptr" in args else "dy_ptr")
    if esz >= 4 and bk > 32:
        return False  # fp32 dots run on FMA units: short K tiles
    smem = kw["num_stages"] * (bm * bk + bk * (bc + bt)) * esz
    # the S / dH chunk and the router (dp, softmax) tiles of a row block
    return smem_ok(smem, arch) and tiles_ok(esz, 2048, 512 + 256, bm * bc, bm * bt)


@triton.autotune(
    configs=configs(_ROWS, _NAMES),
    key=["K", "T", "R", "N_BKT"],
    prune_configs_by={"early_config_prune": pruner("soft_fwd", _fits)},
)
@triton.jit
def _soft_fwd_kernel(
    # pointers
    x_ptr,
    a_ptr,
    rw_ptr,
    rb_ptr,
    logits_ptr,
    probs_ptr,
    shrink_ptr,
    # sizes
    N,
    K,
    T,
    R,
    TR,
    inv_temp,
    N_BKT,
    # strides
    stride_xm,
    stride_xk,
    stride_at,
    stride_ar,
    stride_ak,
    stride_rwt,
    stride_rwk,
    stride_lm,
    stride_lt,
    stride_pm,
    stride_pt,
    stride_sm,
    stride_sc,
    # meta-parameters
    HAS_RB: tl.constexpr,
    TOP_K: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ks = tl.arange(0, BLOCK_K)
    cs = tl.arange(0, BLOCK_C)
    acc_l = tl.zeros((BLOCK_M, BLOCK_T), dtype=ACC_DTYPE)
    x_row = x_ptr + rows[:, None] * stride_xm  # [BLOCK_M, 1]
    for c0 in range(0, TR, BLOCK_C):
        cc = c0 + cs  # [BLOCK_C] compact S columns
        cmask = cc < TR
        a_col = a_ptr + (cc // R) * stride_at + (cc % R) * stride_ar  # [BLOCK_C]
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            kmask = kk < K
            x = tl.load(
                x_row + kk[None, :] * stride_xk, mask=rmask[:, None] & kmask[None, :], other=0.0
            ).to(OP_DTYPE)  # [BLOCK_M, BLOCK_K]
            a = tl.load(
                a_col[None, :] + kk[:, None] * stride_ak,
                mask=cmask[None, :] & kmask[:, None],
                other=0.0,
            )  # [BLOCK_K, BLOCK_C]
            acc = tl.dot(x, a.to(OP_DTYPE), acc, input_precision=PRECISION)
            if c0 == 0:  # the router shares the first chunk's x tiles
                rw = tl.load(
                    rw_ptr + ts[None, :] * stride_rwt + kk[:, None] * stride_rwk,
                    mask=tmask[None, :] & kmask[:, None],
                    other=0.0,
                )  # [BLOCK_K, BLOCK_T]
                acc_l = tl.dot(x, rw.to(OP_DTYPE), acc_l, input_precision=PRECISION)
        tl.store(
            shrink_ptr + rows[:, None] * stride_sm + cc[None, :] * stride_sc,
            acc.to(shrink_ptr.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )
    # epilogue: logits -> top-k mask -> softmax
    logits = acc_l
    if HAS_RB:
        logits += tl.load(rb_ptr + ts, mask=tmask, other=0.0).to(ACC_DTYPE)[None, :]
    lmask = rmask[:, None] & tmask[None, :]
    logits = logits.to(logits_ptr.dtype.element_ty)  # the softmax sees what the caller sees
    tl.store(logits_ptr + rows[:, None] * stride_lm + ts[None, :] * stride_lt, logits, mask=lmask)
    z = tl.where(tmask[None, :], logits.to(ACC_DTYPE) * inv_temp, float("-inf"))
    if TOP_K > 0:
        keep = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.int1)
        for _ in tl.static_range(TOP_K):
            cur = tl.where(keep, float("-inf"), z)
            best = tl.max(cur, 1)
            first = tl.min(tl.where(cur == best[:, None], ts[None, :], BLOCK_T), 1)
            keep = keep | (ts[None, :] == first[:, None])
        z = tl.where(keep, z, float("-inf"))
    zmax = tl.max(z, 1)
    ez = tl.exp(z - zmax[:, None])
    p = ez / tl.sum(ez, 1)[:, None]
    tl.store(
        probs_ptr + rows[:, None] * stride_pm + ts[None, :] * stride_pt,
        p.to(probs_ptr.dtype.element_ty),
        mask=lmask,
    )


register("soft_fwd", _soft_fwd_kernel)


@triton.autotune(
    configs=configs(_ROWS, _NAMES),
    key=["D_OUT", "T", "R", "N_BKT"],
    prune_configs_by={"early_config_prune": pruner("soft_bwd", _fits)},
)
@triton.jit
def _soft_bwd_kernel(
    # pointers
    dy_ptr,
    b_ptr,
    s_ptr,
    probs_ptr,
    shrink_ptr,
    gl_ptr,
    g_ptr,
    # sizes
    N,
    D_OUT,
    T,
    R,
    TR,
    inv_temp,
    N_BKT,
    # strides
    stride_dym,
    stride_dyn,
    stride_bt,
    stride_bn,
    stride_br,
    stride_pm,
    stride_pt,
    stride_sm,
    stride_sc,
    stride_glm,
    stride_glt,
    stride_gm,
    stride_gc,
    # meta-parameters
    HAS_GL: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # BLOCK_K tiles D_out, the reduced dimension of dH.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    lmask = rmask[:, None] & tmask[None, :]
    ns = tl.arange(0, BLOCK_K)
    cs = tl.arange(0, BLOCK_C)
    dy_row = dy_ptr + rows[:, None] * stride_dym
    dp = tl.zeros((BLOCK_M, BLOCK_T), dtype=ACC_DTYPE)
    for c0 in range(0, TR, BLOCK_C):
        cc = c0 + cs
        cmask = cc < TR
        ct = cc // R
        b_col = b_ptr + ct * stride_bt + (cc % R) * stride_br  # [BLOCK_C]
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
        for n0 in range(0, D_OUT, BLOCK_K):
            nn = n0 + ns
            nmask = nn < D_OUT
            dy = tl.load(
                dy_row + nn[None, :] * stride_dyn, mask=rmask[:, None] & nmask[None, :], other=0.0
            )  # [BLOCK_M, BLOCK_K]
            b = tl.load(
                b_col[None, :] + nn[:, None] * stride_bn,
                mask=cmask[None, :] & nmask[:, None],
                other=0.0,
            )  # [BLOCK_K, BLOCK_C]
            acc = tl.dot(dy.to(OP_DTYPE), b.to(OP_DTYPE), acc, input_precision=PRECISION)
        m2 = rmask[:, None] & cmask[None, :]
        s_c = tl.load(s_ptr + ct, mask=cmask, other=0.0).to(ACC_DTYPE)  # [BLOCK_C]
        p_c = tl.load(probs_ptr + rows[:, None] * stride_pm + ct[None, :] * stride_pt, mask=m2)
        sh = tl.load(shrink_ptr + rows[:, None] * stride_sm + cc[None, :] * stride_sc, mask=m2)
        tl.store(
            g_ptr + rows[:, None] * stride_gm + cc[None, :] * stride_gc,
            (acc * p_c.to(ACC_DTYPE) * s_c[None, :]).to(g_ptr.dtype.element_ty),
            mask=m2,
        )
        # dp[n, t] += sum over the chunk's columns of task t of s_t dH S (exact fp32 sums; an
        # fp32 one-hot dot would take the FMA path and its register tiles)
        v = tl.where(m2, acc * sh.to(ACC_DTYPE) * s_c[None, :], 0.0)  # [BLOCK_M, BLOCK_C]
        for t in tl.static_range(BLOCK_T):
            col = tl.sum(tl.where((ct == t)[None, :], v, 0.0), 1)  # [BLOCK_M]
            dp += tl.where((ts == t)[None, :], col[:, None], 0.0)
    # softmax backward: dz = p (dp - sum_t p dp); dL = dz / temperature + gL
    p = tl.load(
        probs_ptr + rows[:, None] * stride_pm + ts[None, :] * stride_pt, mask=lmask, other=0.0
    ).to(ACC_DTYPE)  # [BLOCK_M, BLOCK_T]
    dl = p * (dp - tl.sum(p * dp, 1)[:, None]) * inv_temp
    if HAS_GL:
        dl += tl.load(
            gl_ptr + rows[:, None] * stride_glm + ts[None, :] * stride_glt, mask=lmask, other=0.0
        ).to(ACC_DTYPE)
    tl.store(
        g_ptr + rows[:, None] * stride_gm + (TR + ts)[None, :] * stride_gc,
        dl.to(g_ptr.dtype.element_ty),
        mask=lmask,
    )


register("soft_bwd", _soft_bwd_kernel)


def soft_fwd_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    temperature: float,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, T) x.dtype, probs (N, T) and S (N, T*R) in the acc dtype, in one pass over x.

    x: (N, D_in); lora_a: (T, R, D_in); router_weight: (T, D_in); router_bias: (T,) or None;
    top_k: 0 for all tasks, else keep the k largest probabilities (renormalised).
    """
    n, k = x.shape
    t, r, _ = lora_a.shape
    meta = dot_meta(x.dtype)
    logits = torch.empty((n, t), dtype=x.dtype, device=x.device)
    probs = torch.empty((n, t), dtype=acc_dtype(x.dtype), device=x.device)
    shrink = torch.empty((n, t * r), dtype=probs.dtype, device=x.device)

    def grid(m):
        return (triton.cdiv(n, m["BLOCK_M"]),)

    _soft_fwd_kernel[grid](
        x,
        lora_a,
        router_weight,
        router_bias if router_bias is not None else router_weight,
        logits,
        probs,
        shrink,
        n,
        k,
        t,
        r,
        t * r,
        1.0 / temperature,
        n_bucket(n),
        *x.stride(),
        *lora_a.stride(),
        *router_weight.stride(),
        *logits.stride(),
        *probs.stride(),
        *shrink.stride(),
        HAS_RB=router_bias is not None,
        TOP_K=top_k,
        **meta,
        BLOCK_T=pow2(t),
    )
    return logits, probs, shrink


def soft_bwd_ds(
    grad_y: torch.Tensor,
    grad_logits: torch.Tensor | None,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    probs: torch.Tensor,
    shrink: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """G = [dS | dL] (N, T*R + T) in the acc dtype, in one pass over dy.

    grad_y: (N, D_out); grad_logits: (N, T) or None; lora_b: (T, D_out, R); scaling: (T,);
    probs: (N, T); shrink: (N, T*R) from the forward.
    """
    n, d_out = grad_y.shape
    t, _, r = lora_b.shape
    g = torch.empty((n, t * r + t), dtype=shrink.dtype, device=grad_y.device)
    gl = grad_logits if grad_logits is not None else probs

    def grid(m):
        return (triton.cdiv(n, m["BLOCK_M"]),)

    _soft_bwd_kernel[grid](
        grad_y,
        lora_b,
        scaling,
        probs,
        shrink,
        gl,
        g,
        n,
        d_out,
        t,
        r,
        t * r,
        1.0 / temperature,
        n_bucket(n),
        *grad_y.stride(),
        *lora_b.stride(),
        *probs.stride(),
        *shrink.stride(),
        *gl.stride(),
        *g.stride(),
        HAS_GL=grad_logits is not None,
        **dot_meta(grad_y.dtype),
        BLOCK_T=pow2(t),
    )
    return g
