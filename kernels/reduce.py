"""Per-task reductions over tokens, with no padding: the weight gradients of the adapters/router.

    out[g, p, q] = scale[g] * sum_{i in rows(g)} L[lrow(i), g, p] * R[rrow(i), g, q] * c[i, g]

rows(g) are the plan rows of task g (hard routing) or all tokens (soft). Used as:
  dA_g = dS_g^T x_g                       (L = dS, R = x)
  dB_g = s_g dy_g^T S_g  (x p[:, g], soft) (L = dy, R = S)
  dRouter = dL^T x                        (one group, L = dL, R = x)
With SPLIT == 1 each program owns a whole output tile and walks its rows in a fixed order, so the
result is bit-reproducible (the deterministic path). With SPLIT > 1 the rows of a task are shared
by SPLIT programs that add into a zeroed fp32 buffer with atomics (faster for skewed tasks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mftk.kernels._common import acc_dtype, dot_meta, pow2, reduce_configs


@triton.autotune(configs=reduce_configs(), key=["P", "Q"], reset_to_zero=["out_ptr"])
@triton.jit
def _grouped_reduce_bwd_kernel(
    # pointers
    l_ptr,
    r_ptr,
    coef_ptr,
    scale_ptr,
    out_ptr,
    perm_ptr,
    off_ptr,
    # sizes
    P,
    Q,
    NUM_OFF,
    N_ROWS,
    SPLIT,
    # strides
    stride_lm,
    stride_lg,
    stride_lp,
    stride_rm,
    stride_rg,
    stride_rq,
    stride_cm,
    stride_cg,
    stride_og,
    stride_op,
    stride_oq,
    # meta-parameters
    ALL_ROWS: tl.constexpr,
    GATHER_L: tl.constexpr,
    GATHER_R: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ATOMIC: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid0 = tl.program_id(0)
    g = pid0 // SPLIT
    part = pid0 % SPLIT
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    pmask = ps < P
    qmask = qs < Q
    if ALL_ROWS:  # soft routing: every task reduces over every token
        lo = 0
        hi = N_ROWS
    else:
        lo = tl.load(off_ptr + g)
        hi = tl.load(off_ptr + g + 1, mask=g + 1 < NUM_OFF, other=N_ROWS)
    l_base = l_ptr + g.to(tl.int64) * stride_lg
    r_base = r_ptr + g.to(tl.int64) * stride_rg
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    for i0 in range(lo + part * BLOCK_M, hi, SPLIT * BLOCK_M):
        rows = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M] plan rows; N*D may pass 2^31
        rmask = rows < hi
        if GATHER_L or GATHER_R:
            tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
        else:
            tok = rows
        lrow = tok if GATHER_L else rows
        rrow = tok if GATHER_R else rows
        lt = tl.load(
            l_base + lrow[None, :] * stride_lm + ps[:, None] * stride_lp,
            mask=rmask[None, :] & pmask[:, None],
            other=0.0,
        )  # [BLOCK_P, BLOCK_M]
        r = tl.load(
            r_base + rrow[:, None] * stride_rm + qs[None, :] * stride_rq,
            mask=rmask[:, None] & qmask[None, :],
            other=0.0,
        ).to(ACC_DTYPE)  # [BLOCK_M, BLOCK_Q]
        if HAS_COEF:
            c = tl.load(coef_ptr + rows * stride_cm + g * stride_cg, mask=rmask, other=0.0)
            r = r * c.to(ACC_DTYPE)[:, None]
        acc = tl.dot(
            lt.to(OP_DTYPE), r.to(OP_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE
        )
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + g).to(ACC_DTYPE)
    optrs = out_ptr + g.to(tl.int64) * stride_og + ps[:, None] * stride_op + qs[None, :] * stride_oq
    omask = pmask[:, None] & qmask[None, :]
    if ATOMIC:
        tl.atomic_add(optrs, acc, mask=omask)
    else:
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def grouped_reduce_bwd(
    out: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    offsets: torch.Tensor | None,
    dtype: torch.dtype,
    *,
    perm: torch.Tensor | None = None,
    gather_left: bool = False,
    gather_right: bool = False,
    coef: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    split: int = 1,
) -> torch.Tensor:
    """out[g] = scale[g] * L[:, g]^T (c[:, g] * R[:, g]) over the rows of group g.

    out: (G, P, Q), allocated by the caller (zeroed fp32/fp64 when split > 1, since then the
    programs add into it with atomics); left: (N_ROWS, G, P) view; right: (N_ROWS, G, Q) view;
    offsets: (NUM_OFF,) int64 with G <= NUM_OFF (group G - 1 ends at N_ROWS when G == NUM_OFF),
    or None: every group reduces over all N_ROWS rows (soft routing);
    coef: (N_ROWS, G); scale: (G,); dtype: the op's input dtype.
    """
    num_groups, p, q = out.shape
    if split > 1 and out.dtype != acc_dtype(dtype):
        raise ValueError("out: split > 1 accumulates with atomics into an fp32 (fp64) buffer")
    n_rows = left.shape[0]
    block_p = pow2(p) if p <= 64 else 64

    def grid(meta):
        return (num_groups * split, triton.cdiv(p, block_p), triton.cdiv(q, meta["BLOCK_Q"]))

    _grouped_reduce_bwd_kernel[grid](
        left,
        right,
        coef if coef is not None else out,
        scale if scale is not None else out,
        out,
        perm if perm is not None else out,
        offsets if offsets is not None else out,
        p,
        q,
        offsets.shape[0] if offsets is not None else 0,
        n_rows,
        split,
        *left.stride(),
        *right.stride(),
        *(coef.stride() if coef is not None else (0, 0)),
        *out.stride(),
        ALL_ROWS=offsets is None,
        GATHER_L=gather_left,
        GATHER_R=gather_right,
        HAS_COEF=coef is not None,
        HAS_SCALE=scale is not None,
        ATOMIC=split > 1,
        **dot_meta(dtype),
        BLOCK_P=block_p,
    )
    return out
