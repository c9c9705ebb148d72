"""Soft routing: the kernels that see all T adapters of a row block at once.

Forward, one pass over x:   S = x A_cat^T (N, T*R) and logits = x Wr^T + br (N, T) share the x
tiles; the epilogue does top-k, softmax and writes logits, p and S. The expand (y += sum_t p s_t
S_t B_t^T) is the grouped GEMM's adapter range, which applies p and s_t on the fly, so
H = p s S is never written.
Backward, one pass over dy: dH = dy B_cat, with dB += (p s S)^T dy fused (atomics); the epilogue
does dS = p s dH, dp = s (dH . S) per task, the softmax backward and dL = dz / temperature + gL.

A row block keeps all T*R columns in registers (BLOCK_TS * BLOCK_R), so the row block shrinks as
T*R grows (see row_block); very large T*R (> ~1024) will spill registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mftk.kernels._common import acc_dtype, dot_meta, pow2, row_block, rows_configs


@triton.autotune(configs=rows_configs(), key=["K", "T", "R"])
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
    inv_temp,
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
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_TS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    cs = tl.arange(0, BLOCK_TS * BLOCK_R)  # S column c <-> (task c // BLOCK_R, rank c % BLOCK_R)
    ct = cs // BLOCK_R
    cr = cs % BLOCK_R
    csmask = (ct < T) & (cr < R)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ks = tl.arange(0, BLOCK_K)
    acc_s = tl.zeros((BLOCK_M, BLOCK_TS * BLOCK_R), dtype=ACC_DTYPE)
    acc_l = tl.zeros((BLOCK_M, BLOCK_T), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_M, BLOCK_K]
        a = tl.load(
            a_ptr + ct[None, :] * stride_at + cr[None, :] * stride_ar + kk[:, None] * stride_ak,
            mask=csmask[None, :] & kmask[:, None],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_K, BLOCK_TS * BLOCK_R]
        rw = tl.load(
            rw_ptr + ts[None, :] * stride_rwt + kk[:, None] * stride_rwk,
            mask=tmask[None, :] & kmask[:, None],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_K, BLOCK_T]
        acc_s = tl.dot(x, a, acc_s, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        acc_l = tl.dot(x, rw, acc_l, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    # epilogue: logits -> top-k mask -> softmax
    logits = acc_l
    if HAS_RB:
        logits += tl.load(rb_ptr + ts, mask=tmask, other=0.0).to(ACC_DTYPE)[None, :]
    lmask = rmask[:, None] & tmask[None, :]
    tl.store(
        logits_ptr + rows[:, None] * stride_lm + ts[None, :] * stride_lt,
        logits.to(logits_ptr.dtype.element_ty),
        mask=lmask,
    )
    z = tl.where(tmask[None, :], logits * inv_temp, float("-inf"))  # [BLOCK_M, BLOCK_T]
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
    tl.store(
        shrink_ptr + rows[:, None] * stride_sm + (ct * R + cr)[None, :] * stride_sc,
        acc_s.to(shrink_ptr.dtype.element_ty),
        mask=rmask[:, None] & csmask[None, :],
    )


@triton.autotune(configs=rows_configs(), key=["D_OUT", "T", "R"], reset_to_zero=["db_ptr"])
@triton.jit
def _soft_bwd_kernel(
    # pointers
    dy_ptr,
    b_ptr,
    s_ptr,
    probs_ptr,
    shrink_ptr,
    gl_ptr,
    ds_ptr,
    dl_ptr,
    db_ptr,
    # sizes
    N,
    D_OUT,
    T,
    R,
    inv_temp,
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
    stride_dsm,
    stride_dsc,
    stride_dlm,
    stride_dlt,
    stride_dbt,
    stride_dbn,
    stride_dbr,
    # meta-parameters
    HAS_GL: tl.constexpr,
    FUSE_DB: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_TS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # BLOCK_K tiles D_out, the reduced dimension of dH.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    cs = tl.arange(0, BLOCK_TS * BLOCK_R)
    ct = cs // BLOCK_R
    cr = cs % BLOCK_R
    csmask = (ct < T) & (cr < R)
    m2 = rmask[:, None] & csmask[None, :]
    sh = tl.load(
        shrink_ptr + rows[:, None] * stride_sm + (ct * R + cr)[None, :] * stride_sc,
        mask=m2,
        other=0.0,
    ).to(ACC_DTYPE)  # [BLOCK_M, BLOCK_TS * BLOCK_R]
    s_c = tl.load(s_ptr + ct, mask=ct < T, other=0.0).to(ACC_DTYPE)
    p_c = tl.load(
        probs_ptr + rows[:, None] * stride_pm + ct[None, :] * stride_pt, mask=m2, other=0.0
    )
    coef = p_c.to(ACC_DTYPE) * s_c[None, :]  # p[n, t] s[t] per column
    if FUSE_DB:
        ht = tl.trans(sh * coef).to(OP_DTYPE)  # [BLOCK_TS * BLOCK_R, BLOCK_M]
    acc = tl.zeros((BLOCK_M, BLOCK_TS * BLOCK_R), dtype=ACC_DTYPE)
    ns = tl.arange(0, BLOCK_K)
    for n0 in range(0, D_OUT, BLOCK_K):
        nn = n0 + ns
        nmask = nn < D_OUT
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_M, BLOCK_K]
        b = tl.load(
            b_ptr + ct[None, :] * stride_bt + nn[:, None] * stride_bn + cr[None, :] * stride_br,
            mask=csmask[None, :] & nmask[:, None],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_K, BLOCK_TS * BLOCK_R]
        acc = tl.dot(dy, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if FUSE_DB:
            part = tl.dot(ht, dy, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            tl.atomic_add(
                db_ptr
                + ct[:, None] * stride_dbt
                + nn[None, :] * stride_dbn
                + cr[:, None] * stride_dbr,
                part,
                mask=csmask[:, None] & nmask[None, :],
            )
    tl.store(
        ds_ptr + rows[:, None] * stride_dsm + (ct * R + cr)[None, :] * stride_dsc,
        (acc * coef).to(ds_ptr.dtype.element_ty),
        mask=m2,
    )
    # softmax backward: dp[n, t] = s_t sum_r dH[n, t, r] S[n, t, r]; dz = p (dp - sum_t p dp)
    dp = tl.sum(tl.reshape(acc * sh * s_c[None, :], (BLOCK_M, BLOCK_TS, BLOCK_R)), 2)
    ts = tl.arange(0, BLOCK_TS)
    lmask = rmask[:, None] & (ts < T)[None, :]
    p = tl.load(
        probs_ptr + rows[:, None] * stride_pm + ts[None, :] * stride_pt, mask=lmask, other=0.0
    ).to(ACC_DTYPE)  # [BLOCK_M, BLOCK_TS]
    dl = p * (dp - tl.sum(p * dp, 1)[:, None]) * inv_temp
    if HAS_GL:
        dl += tl.load(
            gl_ptr + rows[:, None] * stride_glm + ts[None, :] * stride_glt, mask=lmask, other=0.0
        ).to(ACC_DTYPE)
    tl.store(
        dl_ptr + rows[:, None] * stride_dlm + ts[None, :] * stride_dlt,
        dl.to(dl_ptr.dtype.element_ty),
        mask=lmask,
    )


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
    adt = acc_dtype(x.dtype)
    logits = torch.empty((n, t), dtype=x.dtype, device=x.device)
    probs = torch.empty((n, t), dtype=adt, device=x.device)
    shrink = torch.empty((n, t * r), dtype=adt, device=x.device)
    bts, br = pow2(t, 1), pow2(r)
    block_m = row_block(bts * br)
    _soft_fwd_kernel[(triton.cdiv(n, block_m),)](
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
        1.0 / temperature,
        *x.stride(),
        *lora_a.stride(),
        *router_weight.stride(),
        *logits.stride(),
        *probs.stride(),
        *shrink.stride(),
        HAS_RB=router_bias is not None,
        TOP_K=top_k,
        **dot_meta(x.dtype),
        BLOCK_M=block_m,
        BLOCK_T=pow2(t),
        BLOCK_TS=bts,
        BLOCK_R=br,
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
    grad_b_acc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS (N, T*R) and dL (N, T) in the acc dtype, in one pass over dy; when grad_b_acc (T, D_out,
    R), a zeroed acc-dtype buffer, is given, dB is accumulated into it in the same pass.

    grad_y: (N, D_out); grad_logits: (N, T) or None; lora_b: (T, D_out, R); scaling: (T,);
    probs: (N, T); shrink: (N, T*R) from the forward.
    """
    n, d_out = grad_y.shape
    t, _, r = lora_b.shape
    ds = torch.empty_like(shrink)
    dl = torch.empty_like(probs)
    db = grad_b_acc if grad_b_acc is not None else ds.view(n, t, r)
    gl = grad_logits if grad_logits is not None else dl
    bts, br = pow2(t, 1), pow2(r)
    block_m = row_block(bts * br)
    _soft_bwd_kernel[(triton.cdiv(n, block_m),)](
        grad_y,
        lora_b,
        scaling,
        probs,
        shrink,
        gl,
        ds,
        dl,
        db,
        n,
        d_out,
        t,
        r,
        1.0 / temperature,
        *grad_y.stride(),
        *lora_b.stride(),
        *probs.stride(),
        *shrink.stride(),
        *gl.stride(),
        *ds.stride(),
        *dl.stride(),
        *db.stride(),
        HAS_GL=grad_logits is not None,
        FUSE_DB=grad_b_acc is not None,
        **dot_meta(grad_y.dtype),
        BLOCK_M=block_m,
        BLOCK_TS=bts,
        BLOCK_R=br,
    )
    return ds, dl
