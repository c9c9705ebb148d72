"""Hard routing backward, first pass: one read of dy per plan row block gives

    dS[i] = s_g * dy[perm[i]] @ B_g             (N, R) plan order, fp32
    dB_g += s_g * dy[perm[i]]^T S[i]            (fused, atomics; skipped on the deterministic path)

dx and dA then come from the grouped GEMM and the grouped reduction (see mftk/ops/triton_ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mftk.kernels._common import dot_meta, group_of_block, interpreting, pow2, rows_configs


@triton.autotune(configs=rows_configs(), key=["D_OUT", "R"], reset_to_zero=["db_ptr"])
@triton.jit
def _hard_bwd_kernel(
    # pointers
    dy_ptr,
    b_ptr,
    s_ptr,
    shrink_ptr,
    ds_ptr,
    db_ptr,
    perm_ptr,
    off_ptr,
    # sizes
    N_ROWS,
    D_OUT,
    R,
    T,
    # strides
    stride_dym,
    stride_dyn,
    stride_bt,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    stride_dsm,
    stride_dsr,
    stride_dbt,
    stride_dbn,
    stride_dbr,
    # meta-parameters
    FUSE_DB: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # BLOCK_K tiles D_out, the reduced dimension of dS.
    g, row0, row_end = group_of_block(off_ptr, tl.program_id(0), T, T + 1, N_ROWS, BLOCK_M, BLOCK_G)
    if g >= T:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
    rs = tl.arange(0, BLOCK_R)
    rkmask = rs < R
    s_g = tl.load(s_ptr + g).to(ACC_DTYPE)
    b_base = b_ptr + g.to(tl.int64) * stride_bt
    if FUSE_DB:
        h = (
            tl.load(
                shrink_ptr + rows[:, None] * stride_sm + rs[None, :] * stride_sr,
                mask=rmask[:, None] & rkmask[None, :],
                other=0.0,
            ).to(ACC_DTYPE)
            * s_g
        )  # [BLOCK_M, BLOCK_R] = H rows of this block
        ht = tl.trans(h).to(OP_DTYPE)  # [BLOCK_R, BLOCK_M]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    ns = tl.arange(0, BLOCK_K)
    for n0 in range(0, D_OUT, BLOCK_K):
        nn = n0 + ns
        nmask = nn < D_OUT
        dy = tl.load(
            dy_ptr + tok[:, None] * stride_dym + nn[None, :] * stride_dyn,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_M, BLOCK_K]
        b = tl.load(
            b_base + nn[:, None] * stride_bn + rs[None, :] * stride_br,
            mask=nmask[:, None] & rkmask[None, :],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_K, BLOCK_R]
        acc = tl.dot(dy, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if FUSE_DB:
            # [BLOCK_R, BLOCK_K] partial dB of this row block
            part = tl.dot(ht, dy, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            tl.atomic_add(
                db_ptr
                + g.to(tl.int64) * stride_dbt
                + nn[None, :] * stride_dbn
                + rs[:, None] * stride_dbr,
                part,
                mask=rkmask[:, None] & nmask[None, :],
            )
    tl.store(
        ds_ptr + rows[:, None] * stride_dsm + rs[None, :] * stride_dsr,
        (acc * s_g).to(ds_ptr.dtype.element_ty),
        mask=rmask[:, None] & rkmask[None, :],
    )


def hard_bwd_ds(
    grad_y: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    shrink: torch.Tensor,
    perm: torch.Tensor,
    offsets: torch.Tensor,
    grad_b_acc: torch.Tensor | None,
) -> torch.Tensor:
    """dS (N, R) in plan order (acc dtype; rows past offsets[T] are 0), and, when grad_b_acc
    (T, D_out, R) zeroed acc-dtype buffer is given, dB accumulated into it in the same pass.

    grad_y: (N, D_out); lora_b: (T, D_out, R); scaling: (T,); shrink: (N, R) plan order.
    """
    n, d_out = grad_y.shape
    t, _, r = lora_b.shape
    ds = torch.zeros_like(shrink)
    db = grad_b_acc if grad_b_acc is not None else ds
    block_m = 32 if r > 32 or interpreting() else 64
    grid = (triton.cdiv(n, block_m) + t,)
    _hard_bwd_kernel[grid](
        grad_y,
        lora_b,
        scaling,
        shrink,
        ds,
        db,
        perm,
        offsets,
        n,
        d_out,
        r,
        t,
        *grad_y.stride(),
        *lora_b.stride(),
        *shrink.stride(),
        *ds.stride(),
        *(db.stride() if grad_b_acc is not None else (0, 0, 0)),
        FUSE_DB=grad_b_acc is not None,
        **dot_meta(grad_y.dtype),
        BLOCK_M=block_m,
        BLOCK_R=pow2(r),
        BLOCK_G=pow2(t, 1),
    )
    return ds
