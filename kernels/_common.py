"""Shared pieces of the Triton kernels: interpreter detection, dtype maps, autotune configs and the
device-side block -> group lookup that replaces a precomputed block table.

Imports triton and torch only (see DESIGN.md, layering).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / side-output dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_meta(dtype: torch.dtype) -> dict:
    """OP_DTYPE (what tl.dot operands are cast to), ACC_DTYPE and PRECISION for an input dtype.

    On a GPU bf16/fp16 operands go to the tensor cores as they are, and fp32 uses TF32 only when
    torch allows it. The interpreter computes bf16 blocks wrongly, so there every operand is fp32.
    """
    acc = acc_dtype(dtype)
    op = acc if interpreting() else dtype
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting()
    return dict(
        OP_DTYPE=_TL_DTYPES[op], ACC_DTYPE=_TL_DTYPES[acc], PRECISION="tf32" if tf32 else "ieee"
    )


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo) (tl.dot needs blocks >= 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


# --- autotune configs ---------------------------------------------------------------------
# Several configs cannot be benchmarked without a GPU, so the interpreter gets exactly one.


def gemm_configs() -> list[triton.Config]:
    """Tiles for the grouped GEMM (base + adapter K ranges); keyed on N_COLS, K, J."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    out = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 32, 4, 5),
    ]:
        out.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=warps,
                num_stages=stages,
            )
        )
    return out


def rows_configs() -> list[triton.Config]:
    """Tiles for kernels whose row block is fixed by the launcher (soft epilogues, dH): BLOCK_K
    / BLOCK_N of the inner loop and warps; keyed on the reduced dimension."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bk, w, s in [(32, 4, 4), (64, 4, 3), (64, 8, 3), (128, 8, 2)]
    ]


def reduce_configs() -> list[triton.Config]:
    """Tiles for the per-task reductions over tokens (dA, dB, dRouter); keyed on P, Q."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_Q": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_Q": bq}, num_warps=w, num_stages=s)
        for bm, bq, w, s in [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (32, 128, 4, 4)]
    ]


def row_block(cols: int) -> int:
    """Row block of the soft kernels, which keep all T*R columns of a row block in registers."""
    if interpreting():
        return 32
    return 64 if cols <= 128 else 32 if cols <= 512 else 16


# --- device-side block table --------------------------------------------------------------


@triton.jit
def group_of_block(off_ptr, pid, G, NUM_OFF, N_ROWS, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Map row-block `pid` to (group, first row, end row) of a grouped row range.

    Group g spans rows [off[g], off[g + 1]) (or [off[g], N_ROWS) for g + 1 == NUM_OFF). Blocks are
    numbered group after group, cdiv(len_g, BLOCK_M) per group, so a grid of cdiv(N_ROWS, BLOCK_M)
    + G programs covers every group; programs past the end get group G and must exit. This is the
    block -> task table, computed in registers from the (T + 1) offsets: no host sync, no tensor.
    """
    gs = tl.arange(0, BLOCK_G)
    valid = gs < G
    lo = tl.load(off_ptr + gs, mask=valid, other=0)
    hi = tl.load(off_ptr + gs + 1, mask=valid & (gs + 1 < NUM_OFF), other=N_ROWS)
    hi = tl.where(valid, hi, lo)
    nblk = ((hi - lo + BLOCK_M - 1) // BLOCK_M).to(tl.int32)  # [BLOCK_G]
    cum = tl.cumsum(nblk, 0)
    g = tl.sum((cum <= pid).to(tl.int32), 0)
    first_blk = tl.sum(tl.where(gs == g, cum - nblk, 0), 0)
    start = tl.sum(tl.where(gs == g, lo, 0), 0)
    end = tl.sum(tl.where(gs == g, hi, 0), 0)
    row0 = start + (pid - first_blk).to(tl.int64) * BLOCK_M
    return g, row0, end
