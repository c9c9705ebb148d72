"""Per-task reductions over tokens, no padding and no atomics: the weight gradients.

    out[g, p, q] = sum_{i in rows(g)} Lc[i, p] * R[rrow(i), q]
    Lc[i, p]     = L[lrow(i), p] * coef[i, task(p)] * scale[task(p)],   task(p) = g + p // PSUB

Each program owns one (g, P block, Q block) output tile and walks the rows of group g in order:
every output element is written once, by one program, so results are bit-reproducible and need
no zeroed buffer or cast afterwards. P is the small side (R, or T*R [+ T]) and Q the long one
(D_in or D_out), so L and R are each read once per P block. Used as (mftk/ops/triton_ops.py):
  hard dB_g^T = s_g S_g^T dy_g          L = S (plan rows), R = dy[perm]
  hard dA_g   = dS_g^T x_g              L = dS (plan rows), R = x[perm]
  soft dB_t^T = s_t (p_t S_t)^T dy      L = S, coef = p, scale = s, all rows, PSUB = R
  soft [dA ; dWr] = [dS | dL]^T x       rows p >= P1 go to out2 (the router), with sum_i dL = dbr
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mftk.kernels._common import (
    configs,
    dot_meta,
    elem_bytes,
    group_rows,
    n_bucket,
    pow2,
    pruner,
    register,
    smem_ok,
    tiles_ok,
    to_op,
)

P_CAP = 256  # the largest P block; a larger P is split over the grid (R is read once per block)
_ROWS = [  # BLOCK_M, BLOCK_Q, warps, stages
    (32, 64, 4, 3),
    (64, 64, 4, 3),
    (32, 128, 4, 3),
    (64, 128, 8, 3),
    (16, 64, 4, 4),
    (32, 32, 4, 4),
    (32, 32, 8, 3),
    (16, 32, 4, 4),
    (16, 32, 8, 3),
    (16, 16, 8, 3),
]


def _fits(kw: dict, args: dict, arch: int) -> bool:
    bm, bq, bp = kw["BLOCK_M"], kw["BLOCK_Q"], args["BLOCK_P"]
    esz = elem_bytes(args, "r_ptr")
    lfac = 1.5 if args.get("HAS_COEF") else 0.75  # the coefficient tile is pipelined too
    smem = kw["num_stages"] * (bp * bm * 4 * lfac + bm * bq * esz)
    # the output tile and the fp32 L tile (scaled, then rounded), per warp
    per_warp = (bp * bq + bp * bm) // kw["num_warps"]
    lo = 2 if args.get("HAS_COEF") else 1
    return smem_ok(int(smem), arch) and tiles_ok(
        esz, 4096 // lo, 1536 if lo == 1 else 1024, per_warp
    )


@triton.autotune(
    configs=configs(_ROWS, ("BLOCK_M", "BLOCK_Q")),
    key=["P", "Q", "N_BKT"],
    prune_configs_by={"early_config_prune": pruner("grouped_reduce", _fits)},
)
@triton.jit
def _grouped_reduce_bwd_kernel(
    # pointers
    l_ptr,
    r_ptr,
    coef_ptr,
    scale_ptr,
    out_ptr,
    out2_ptr,
    lsum_ptr,
    perm_ptr,
    off_ptr,
    # sizes
    P,
    Q,
    P1,
    PSUB,
    NUM_OFF,
    N_ROWS,
    N_BKT,
    # strides
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    stride_cm,
    stride_ct,
    stride_og,
    stride_ot,
    stride_op,
    stride_oq,
    stride_o2p,
    stride_o2q,
    # meta-parameters
    ALL_ROWS: tl.constexpr,
    GATHER_L: tl.constexpr,
    GATHER_R: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    HAS_LSUM: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    g = tl.program_id(0)
    pid_q = tl.program_id(2)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    pmask = ps < P
    qmask = qs < Q
    if ALL_ROWS:  # soft routing: every task reduces over every token
        lo = 0
        hi = N_ROWS
    else:
        lo, hi = group_rows(off_ptr, g, NUM_OFF, N_ROWS)
    task = g + ps // PSUB  # [BLOCK_P]
    if HAS_SCALE:
        sc = tl.load(scale_ptr + task, mask=pmask, other=0.0).to(ACC_DTYPE)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    lsum = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    ms = tl.arange(0, BLOCK_M)
    for i0 in range(lo, hi, BLOCK_M):
        rows = i0 + ms.to(tl.int64)  # [BLOCK_M] plan rows; N*D may pass 2^31
        rmask = rows < hi
        if GATHER_L or GATHER_R:
            tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
        else:
            tok = rows
        lrow = tok if GATHER_L else rows
        rrow = tok if GATHER_R else rows
        lt = tl.load(
            l_ptr + lrow[None, :] * stride_lm + ps[:, None] * stride_lp,
            mask=rmask[None, :] & pmask[:, None],
            other=0.0,
        ).to(ACC_DTYPE)  # [BLOCK_P, BLOCK_M]
        if HAS_COEF:
            c = tl.load(
                coef_ptr + rows[None, :] * stride_cm + task[:, None] * stride_ct,
                mask=rmask[None, :] & pmask[:, None],
                other=0.0,
            )
            lt = lt * c.to(ACC_DTYPE)
        if HAS_SCALE:
            lt = lt * sc[:, None]
        if HAS_LSUM:
            lsum += tl.sum(lt, 1)
        r = tl.load(
            r_ptr + rrow[:, None] * stride_rm + qs[None, :] * stride_rq,
            mask=rmask[:, None] & qmask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_Q]
        acc = tl.dot(
            to_op(lt, ROUND_DTYPE, OP_DTYPE), r.to(OP_DTYPE), acc, input_precision=PRECISION
        )
    first = ps < P1
    optrs = (
        out_ptr
        + g.to(tl.int64) * stride_og
        + (ps // PSUB)[:, None] * stride_ot
        + (ps % PSUB)[:, None] * stride_op
        + qs[None, :] * stride_oq
    )
    tl.store(
        optrs, acc.to(out_ptr.dtype.element_ty), mask=(pmask & first)[:, None] & qmask[None, :]
    )
    if HAS_OUT2:
        second = pmask & (ps >= P1)
        o2 = out2_ptr + (ps - P1)[:, None] * stride_o2p + qs[None, :] * stride_o2q
        tl.store(o2, acc.to(out2_ptr.dtype.element_ty), mask=second[:, None] & qmask[None, :])
        if HAS_LSUM:
            if pid_q == 0:
                tl.store(lsum_ptr + (ps - P1), lsum.to(lsum_ptr.dtype.element_ty), mask=second)


register("grouped_reduce", _grouped_reduce_bwd_kernel)


def grouped_reduce_bwd(
    out: torch.Tensor,
    out_strides: tuple[int, int, int, int],
    left: torch.Tensor,
    right: torch.Tensor,
    offsets: torch.Tensor | None,
    dtype: torch.dtype,
    *,
    groups: int = 1,
    psub: int | None = None,
    perm: torch.Tensor | None = None,
    gather_left: bool = False,
    gather_right: bool = False,
    coef: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out2: torch.Tensor | None = None,
    p1: int | None = None,
    lsum: torch.Tensor | None = None,
) -> None:
    """out[g, p, q] = sum over the rows of group g of (L[:, p] c s)^T R[:, q]; see the docstring.

    left: (N_ROWS, P); right: (N_ROWS', Q) (N_ROWS' rows when gathered through perm);
    out: any tensor, addressed as out + g*so_g + (p // psub)*so_t + (p % psub)*so_p + q*so_q with
    out_strides = (so_g, so_t, so_p, so_q); offsets: (groups + 1,) int64 plan offsets, or None:
    every group reduces over all rows; coef: (N_ROWS, T) per (row, task(p)); scale: (T,);
    out2: (P - p1, Q) for rows p >= p1, with lsum: (P - p1,) = sum_i L[i, p]. dtype: input dtype.
    Every element of out (and out2, lsum) in range is written.
    """
    n_rows, p = left.shape
    q = right.shape[1]
    psub = psub or p
    p1 = p if p1 is None else p1
    block_p = min(pow2(p), P_CAP)

    def grid(meta):
        return (groups, triton.cdiv(p, block_p), triton.cdiv(q, meta["BLOCK_Q"]))

    _grouped_reduce_bwd_kernel[grid](
        left,
        right,
        coef if coef is not None else out,
        scale if scale is not None else out,
        out,
        out2 if out2 is not None else out,
        lsum if lsum is not None else out,
        perm if perm is not None else out,
        offsets if offsets is not None else out,
        p,
        q,
        p1,
        psub,
        offsets.shape[0] if offsets is not None else 0,
        n_rows,
        n_bucket(n_rows),
        *left.stride(),
        *right.stride(),
        *(coef.stride() if coef is not None else (0, 0)),
        *out_strides,
        *(out2.stride() if out2 is not None else (0, 0)),
        ALL_ROWS=offsets is None,
        GATHER_L=gather_left,
        GATHER_R=gather_right,
        HAS_COEF=coef is not None,
        HAS_SCALE=scale is not None,
        HAS_OUT2=out2 is not None,
        HAS_LSUM=lsum is not None,
        **dot_meta(dtype),
        BLOCK_P=block_p,
    )
