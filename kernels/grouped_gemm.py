"""Grouped GEMM over tokens grouped by task, with adapter K ranges: the matmuls of the op that
produce whole rows of y or dx (the "fused" strategy) or the adapters' part of them (y0, dx0).

    out[orow(i), n] = sum_k a[arow(i), k] w[g, n, k]                         (base range)
                    + sum_t c[i, t] s[t] sum_j h[i, t, j] e[t, n, j]          (adapter range)
                    + sum_j h2[i, j] e2[n, j] + bias[n]                        (router range)

Row i runs over plan rows (token perm[i]) or plain token rows; group g is the row's task (from the
plan offsets), and t runs over {g} (hard routing) or all tasks (soft, c = p[i, t]). `out` is
written once, never read (no read-modify-write pass). Used as:
  hard fused forward   y  = [x | s_g S] [W^T ; B_g^T] + b        (both ranges, plan order)
  hard fused backward  dx = [dy | dS] [W ; A_g]
  soft expand          y0 = sum_t p_t s_t S_t B_t^T + b           (adapter range; then addmm_)
  soft backward dx0    dx0 = [dS | dL] [A_cat ; Wr]               (or with the base: fused)
Intermediates (h, h2: S, dS, dL in fp32) are rounded to the input dtype before their dot.
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

_ROWS = [  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages
    (128, 128, 64, 8, 8, 3),
    (128, 128, 32, 8, 8, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (64, 128, 32, 8, 4, 5),
    (64, 64, 32, 8, 4, 3),
    (32, 64, 32, 8, 4, 3),
    (32, 32, 32, 8, 4, 3),
    (16, 32, 32, 8, 4, 3),
]


def _fits(kw: dict, args: dict, arch: int) -> bool:
    bm, bn, bk, warps = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"]
    esz = elem_bytes(args, "out_ptr")
    extra = args.get("EXTRA", 0) or args.get("HAS_EXTRA2")
    bj = max(args.get("BLOCK_J", 16), args.get("BLOCK_J2", 16)) if extra else 0
    stages = kw["num_stages"]
    base = stages * (bm + bn) * bk * esz if args.get("HAS_BASE") else 0
    smem = max(base, stages * (bm * bj * 4 + bj * bn * esz))  # the loops reuse shared memory
    if esz >= 4 and (bk > 32 or bm > 16 or bn > 32):
        return False  # fp32 dots run on FMA units: small tiles only
    if esz < 4 and bm == 16:
        return False  # the fp32 fallback tile; it spills a little in bf16/fp16 on sm_90
    # accumulator per warp, plus the fp32 adapter tile h that is scaled, rounded and multiplied
    per_warp = (bm * bn + 2 * bm * bj) // warps
    return smem_ok(smem, arch) and tiles_ok(esz, 3584, 2048, per_warp)


@triton.autotune(
    configs=configs(_ROWS, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
    key=["N_COLS", "K", "J", "N_BKT"],
    prune_configs_by={"early_config_prune": pruner("grouped_gemm", _fits)},
)
@triton.jit
def _grouped_gemm_fwd_kernel(
    # pointers
    a_ptr,
    w_ptr,
    bias_ptr,
    h_ptr,
    e_ptr,
    coef_ptr,
    scale_ptr,
    h2_ptr,
    e2_ptr,
    out_ptr,
    perm_ptr,
    off_ptr,
    # sizes
    N_ROWS,
    N_COLS,
    K,
    J,
    J2,
    G,
    NUM_OFF,
    NUM_E,
    N_BKT,
    # strides
    stride_am,
    stride_ak,
    stride_wg,
    stride_wn,
    stride_wk,
    stride_hm,
    stride_ht,
    stride_hj,
    stride_eg,
    stride_en,
    stride_ej,
    stride_cm,
    stride_ct,
    stride_h2m,
    stride_h2j,
    stride_e2n,
    stride_e2j,
    stride_om,
    stride_on,
    # meta-parameters
    GATHER_A: tl.constexpr,
    SCATTER_OUT: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EXTRA: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_EXTRA2: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_J2: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # EXTRA: 0 no adapter range, 1 the row group's own adapter (hard), 2 all adapters (soft).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N_ROWS, BLOCK_M) + G
    num_pid_n = tl.cdiv(N_COLS, BLOCK_N)
    # grouped ordering of the (m, n) tiles for L2 reuse of w
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    if ONE_GROUP:  # plain token rows (soft routing): no offsets to read
        g = 0
        row0 = pid_m.to(tl.int64) * BLOCK_M
        row_end = N_ROWS
    else:
        g, row0, row_end = group_of_block(off_ptr, pid_m, G, NUM_OFF, N_ROWS, BLOCK_M, BLOCK_G)
        if g >= G:
            return
    rows = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] plan (or token) rows, int64
    rmask = rows < row_end
    if GATHER_A or SCATTER_OUT:
        tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
    else:
        tok = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cmask = cols < N_COLS

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if HAS_BASE:
        ks = tl.arange(0, BLOCK_K)
        arow = tok if GATHER_A else rows
        # pointers advance along K: two pointer tiles live, not rebuilt from int64 grids
        a_ptrs = a_ptr + arow[:, None] * stride_am + ks[None, :] * stride_ak
        w_ptrs = w_ptr + g.to(tl.int64) * stride_wg + cols[None, :] * stride_wn
        w_ptrs += ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
        for k0 in range(0, K, BLOCK_K):
            kmask = ks < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=cmask[None, :] & kmask[:, None], other=0.0)
            acc = tl.dot(a.to(OP_DTYPE), w.to(OP_DTYPE), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
    if EXTRA > 0:
        js = tl.arange(0, BLOCK_J)
        jmask = js < J
        if EXTRA == 1:
            t_lo = g
            t_hi = tl.minimum(g + 1, NUM_E)  # group NUM_E (base-only tokens) has no adapter
        else:
            t_lo = 0
            t_hi = NUM_E
        for t in range(t_lo, t_hi):
            h = tl.load(
                h_ptr + rows[:, None] * stride_hm + t * stride_ht + js[None, :] * stride_hj,
                mask=rmask[:, None] & jmask[None, :],
                other=0.0,
            ).to(ACC_DTYPE)  # [BLOCK_M, BLOCK_J]
            if HAS_COEF:
                c = tl.load(coef_ptr + rows * stride_cm + t * stride_ct, mask=rmask, other=0.0)
                h = h * c.to(ACC_DTYPE)[:, None]
            if HAS_SCALE:
                h = h * tl.load(scale_ptr + t).to(ACC_DTYPE)
            e = tl.load(
                e_ptr + t * stride_eg + cols[None, :] * stride_en + js[:, None] * stride_ej,
                mask=cmask[None, :] & jmask[:, None],
                other=0.0,
            )  # [BLOCK_J, BLOCK_N]
            acc = tl.dot(
                to_op(h, ROUND_DTYPE, OP_DTYPE), e.to(OP_DTYPE), acc, input_precision=PRECISION
            )
    if HAS_EXTRA2:
        js2 = tl.arange(0, BLOCK_J2)
        j2mask = js2 < J2
        h2 = tl.load(
            h2_ptr + rows[:, None] * stride_h2m + js2[None, :] * stride_h2j,
            mask=rmask[:, None] & j2mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_J2]
        e2 = tl.load(
            e2_ptr + cols[None, :] * stride_e2n + js2[:, None] * stride_e2j,
            mask=cmask[None, :] & j2mask[:, None],
            other=0.0,
        )  # [BLOCK_J2, BLOCK_N]
        acc = tl.dot(
            to_op(h2, ROUND_DTYPE, OP_DTYPE), e2.to(OP_DTYPE), acc, input_precision=PRECISION
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)[None, :]
    orow = tok if SCATTER_OUT else rows
    optrs = out_ptr + orow[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


register("grouped_gemm", _grouped_gemm_fwd_kernel)


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def grouped_gemm_fwd(
    out: torch.Tensor,
    offsets: torch.Tensor | None,
    num_groups: int,
    dtype: torch.dtype,
    *,
    perm: torch.Tensor | None = None,
    gather_a: bool = False,
    scatter_out: bool = False,
    a: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    e: torch.Tensor | None = None,
    extra: int = 0,
    coef: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    h2: torch.Tensor | None = None,
    e2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the grouped GEMM into `out` (N_ROWS, N_COLS), which the caller allocated.

    dtype: the op's input dtype (sets the dot operand and accumulator dtypes).
    offsets: (NUM_OFF,) int64 plan offsets, with num_groups G <= NUM_OFF (T + 1 includes the
    base-only tail), or None: one group of all rows in token order (num_groups is then ignored).
    a: (N_ROWS, K); w: (G|1, N_COLS, K) given as a strided view; bias: (N_COLS,)
    h: (N_ROWS, T, J) view; e: (T, N_COLS, J) view; coef: (N_ROWS, T); scale: (T,)
    h2: (N_ROWS, J2); e2: (N_COLS, J2) views. The tensors are only read; every row of `out` that a
    group covers is written (all rows when the groups span N_ROWS).
    """
    n_rows, n_cols = out.shape
    dummy = out
    has_base = a is not None
    if has_base:
        k = a.shape[1]
        sw = tuple(w.stride()) if w.dim() == 3 else (0, *w.stride())  # 2-D w: shared by groups
    else:
        k, sw = 0, (0, 0, 0)
    j = h.shape[2] if h is not None else 0
    num_e = h.shape[1] if h is not None else 0
    j2 = h2.shape[1] if h2 is not None else 0
    one = offsets is None
    if one:  # never read; a small placeholder (not `out`, which cost models would count)
        num_groups, offsets = 0, torch.empty(1, dtype=torch.int64, device=out.device)

    def grid(meta):
        n_m = triton.cdiv(n_rows, meta["BLOCK_M"]) + num_groups
        return (n_m * triton.cdiv(n_cols, meta["BLOCK_N"]),)

    _grouped_gemm_fwd_kernel[grid](
        a if has_base else dummy,
        w if has_base else dummy,
        bias if bias is not None else dummy,
        h if h is not None else dummy,
        e if e is not None else dummy,
        coef if coef is not None else dummy,
        scale if scale is not None else dummy,
        h2 if h2 is not None else dummy,
        e2 if e2 is not None else dummy,
        out,
        perm if perm is not None else offsets,
        offsets,
        n_rows,
        n_cols,
        k,
        j,
        j2,
        num_groups,
        0 if one else offsets.shape[0],
        num_e,
        n_bucket(n_rows),
        *_strides(a, 2),
        *sw,
        *_strides(h, 3),
        *_strides(e, 3),
        *_strides(coef, 2),
        *_strides(h2, 2),
        *_strides(e2, 2),
        *out.stride(),
        GATHER_A=gather_a,
        SCATTER_OUT=scatter_out,
        HAS_BASE=has_base,
        HAS_BIAS=bias is not None,
        EXTRA=extra,
        HAS_COEF=coef is not None,
        HAS_SCALE=scale is not None,
        HAS_EXTRA2=h2 is not None,
        ONE_GROUP=one,
        **dot_meta(dtype),
        BLOCK_J=pow2(j),
        BLOCK_J2=pow2(j2),
        BLOCK_G=pow2(num_groups, 1),
    )
    return out
