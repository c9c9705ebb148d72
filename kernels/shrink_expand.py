"""Hard routing: the shrink and the expand of a row block in one program, the expand write-only.

    S[i]        = scale_in[g] * a[perm[i]] w_g^T                      (N, R) plan order, acc dtype
    out[perm[i]] = (scale_out[g] * S[i]) e_g^T + bias                  (N, N_OUT), written once

g is the task of plan row i (plan offsets); rows of the base-only tail (group T) get S = 0 and
out = bias (or 0). Used as (see mftk/ops/triton_ops.py):
  forward   a = x,  w = A (T, R, D_in),      e = B (T, D_out, R), scale_out = s:  S and y0
  backward  a = dy, w = B^T (T, R, D_out),   e = A^T (T, D_in, R), scale_in = s:  dS and dx0
The caller then runs cuBLAS addmm_(y0, x, W^T) (beta = 1) for the base, so no pass reads and
writes y or dx twice. Without `out` only S is computed (the "fused" strategy's shrink).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mftk.kernels._common import (
    configs,
    dot_meta,
    elem_bytes,
    group_of_block,
    n_bucket,
    pow2,
    pruner,
    register,
    smem_ok,
    tiles_ok,
    to_op,
)

_ROWS = [  # BLOCK_M, BLOCK_K, BLOCK_N, warps, stages
    (64, 64, 64, 4, 3),
    (32, 64, 128, 4, 3),
    (64, 128, 64, 4, 3),
    (32, 128, 64, 4, 4),
    (16, 128, 128, 4, 3),
    (16, 32, 32, 4, 3),
    (16, 64, 32, 4, 3),
]


def _fits(kw: dict, args: dict, arch: int) -> bool:
    bm, bk, bn, br = kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"], args["BLOCK_R"]
    esz = elem_bytes(args, "a_ptr")
    smem = kw["num_stages"] * max((bm * bk + bk * br) * esz, (br * bn) * esz + bm * br * 4)
    out = args.get("HAS_OUT")
    per_warp = (bm * br + (bm * bn if out else 0)) * 4 // kw["num_warps"]
    if esz >= 4 and (bk > (32 if br >= 64 else 64) or (out and bn > 32)):
        return False  # fp32 dots run on FMA units: short K and N tiles
    if esz < 4 and bk == 32:
        return False  # the fp32 fallback tile; it spills a little in bf16/fp16 on sm_80
    return smem_ok(smem, arch) and tiles_ok(esz, 12288, 2560, per_warp)


@triton.autotune(
    configs=configs(_ROWS, ("BLOCK_M", "BLOCK_K", "BLOCK_N")),
    key=["K", "R", "N_OUT", "N_BKT"],
    prune_configs_by={"early_config_prune": pruner("shrink_expand", _fits)},
)
@triton.jit
def _shrink_expand_kernel(
    # pointers
    a_ptr,
    w_ptr,
    scale_in_ptr,
    s_ptr,
    e_ptr,
    scale_out_ptr,
    bias_ptr,
    out_ptr,
    perm_ptr,
    off_ptr,
    # sizes
    N_ROWS,
    K,
    R,
    N_OUT,
    T,
    N_BKT,
    # strides
    stride_am,
    stride_ak,
    stride_wt,
    stride_wr,
    stride_wk,
    stride_sm,
    stride_sr,
    stride_et,
    stride_en,
    stride_er,
    stride_om,
    stride_on,
    # meta-parameters
    HAS_SCALE_IN: tl.constexpr,
    HAS_OUT: tl.constexpr,
    HAS_SCALE_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g, row0, row_end = group_of_block(
        off_ptr, tl.program_id(0), T + 1, T + 1, N_ROWS, BLOCK_M, BLOCK_G
    )
    if g > T:
        return
    routed = g < T  # group T: the base-only tail
    gt = tl.minimum(g, T - 1).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] plan rows, int64
    rmask = rows < row_end
    tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
    rs = tl.arange(0, BLOCK_R)
    rkmask = rs < R
    ks = tl.arange(0, BLOCK_K)
    # pointers advance along K instead of being rebuilt: fewer live int64 tiles, no spills
    a_ptrs = a_ptr + tok[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + gt * stride_wt + rs[None, :] * stride_wr + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    k_end = tl.where(routed, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & rkmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
        acc = tl.dot(a.to(OP_DTYPE), w.to(OP_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE_IN:
        acc = acc * tl.load(scale_in_ptr + gt).to(ACC_DTYPE)
    tl.store(
        s_ptr + rows[:, None] * stride_sm + rs[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty),
        mask=rmask[:, None] & rkmask[None, :],
    )
    if HAS_OUT:
        h = acc
        if HAS_SCALE_OUT:
            h = h * tl.load(scale_out_ptr + gt).to(ACC_DTYPE)
        h = to_op(h, ROUND_DTYPE, OP_DTYPE)  # [BLOCK_M, BLOCK_R], rounded as a GPU would
        ns = tl.arange(0, BLOCK_N)
        e_ptrs = e_ptr + gt * stride_et + ns[None, :] * stride_en + rs[:, None] * stride_er
        o_ptrs = out_ptr + tok[:, None] * stride_om + ns[None, :] * stride_on
        emask_r = (rs < tl.where(routed, R, 0))[:, None]  # the tail has no adapter
        for n0 in range(0, N_OUT, BLOCK_N):
            nmask = ns < N_OUT - n0
            e = tl.load(e_ptrs, mask=emask_r & nmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            o = tl.dot(h, e.to(OP_DTYPE), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if HAS_BIAS:
                o += tl.load(bias_ptr + n0 + ns, mask=nmask, other=0.0).to(ACC_DTYPE)[None, :]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])
            e_ptrs += BLOCK_N * stride_en
            o_ptrs += BLOCK_N * stride_on


register("shrink_expand", _shrink_expand_kernel)


def shrink_expand(
    a: torch.Tensor,
    w: torch.Tensor,
    s_out: torch.Tensor,
    perm: torch.Tensor,
    offsets: torch.Tensor,
    dtype: torch.dtype,
    *,
    scale_in: torch.Tensor | None = None,
    e: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """S = scale_in[g] a[perm] w_g^T into s_out; with `out`, out[perm] = scale_out[g] S e_g^T + b.

    a: (N, K) token order; w: (T, R, K) strided view; s_out: (N, R) acc dtype, plan order (every
    row written); perm: (N,) int64; offsets: (T + 1,) int64; e: (T, N_OUT, R) strided view;
    scale_in, scale_out: (T,) acc dtype; bias: (N_OUT,); out: (N, N_OUT), every row written.
    dtype: the op's input dtype (dot operand and rounding dtypes).
    """
    n, k = a.shape
    t, r, _ = w.shape
    n_out = out.shape[1] if out is not None else 0
    dummy = s_out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) + t + 1,)

    _shrink_expand_kernel[grid](
        a,
        w,
        scale_in if scale_in is not None else dummy,
        s_out,
        e if e is not None else dummy,
        scale_out if scale_out is not None else dummy,
        bias if bias is not None else dummy,
        out if out is not None else dummy,
        perm,
        offsets,
        n,
        k,
        r,
        n_out,
        t,
        n_bucket(n),
        *a.stride(),
        *w.stride(),
        *s_out.stride(),
        *(e.stride() if e is not None else (0, 0, 0)),
        *(out.stride() if out is not None else (0, 0)),
        HAS_SCALE_IN=scale_in is not None,
        HAS_OUT=out is not None,
        HAS_SCALE_OUT=scale_out is not None,
        HAS_BIAS=bias is not None,
        **dot_meta(dtype),
        BLOCK_R=pow2(r),
        BLOCK_G=pow2(t + 1, 1),
    )
