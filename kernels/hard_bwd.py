"""Hard routing backward in two passes, one over dy and one over x (the default, non-deterministic
path; see mftk/ops/triton_ops.py):

  dy pass, one program per (task g, D_out block):   dB_g[n] = s_g dy_g[:, n]^T S_g    (owned)
                                                    dS_g   += s_g dy_g[:, n] B_g[n]  (atomics)
  x pass, one program per (task g, D_in block):     dA_g[k] = dS_g^T x_g[:, k]       (owned)
                                                    dx0[:, k] = dS_g A_g[:, k]       (write-only)

Each program owns its dB (dA) tile and walks its task's rows, so the weight gradients need no
atomics, zeroed buffer or cast. Only dS (N, R) fp32 is accumulated across the D_out blocks, with
relaxed atomics; programs of one task start at different row blocks, so they do not add into the
same rows in lockstep. Under torch.use_deterministic_algorithms the op uses shrink_expand for dS
instead (one more pass over dy, no atomics).
"""

from __future__ import annotations

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

_ROWS = [  # BLOCK_M, BLOCK_N (the owned D block), warps, stages
    (32, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 8, 3),
    (32, 64, 4, 4),
    (16, 128, 4, 3),
    (32, 32, 4, 4),
    (16, 32, 4, 3),
    (16, 16, 4, 3),
]


def _fits(kw: dict, args: dict, arch: int) -> bool:
    bm, bn, br = kw["BLOCK_M"], kw["BLOCK_N"], args["BLOCK_R"]
    esz = elem_bytes(args, "d_ptr")
    smem = kw["num_stages"] * bm * (bn + br) * max(esz, 4)
    if esz >= 4 and (bm > 16 or bn > 32):
        return False  # fp32 dots run on FMA units: small tiles only
    if br <= 32 and esz < 4:
        return smem_ok(smem, arch)
    budget = 6144 if args.get("SIDE") == 2 else 8192  # the x pass also holds dx0's tile
    return smem_ok(smem, arch) and tiles_ok(esz, budget, 4096, bn * br, bm * br)


@triton.autotune(
    configs=configs(_ROWS, ("BLOCK_M", "BLOCK_N")),
    key=["D", "R", "N_BKT", "SIDE"],
    prune_configs_by={"early_config_prune": pruner("hard_bwd", _fits)},
    # on a GPU, autotuning runs the kernel once per config and repetition: dS (SIDE 1) is
    # accumulated with atomics, so it is zeroed before each of those runs and before the real one
    reset_to_zero=["side_ptr"],
)
@triton.jit
def _hard_bwd_kernel(
    # pointers
    d_ptr,
    lr_ptr,
    w_ptr,
    s_ptr,
    wgrad_ptr,
    side_ptr,
    perm_ptr,
    off_ptr,
    # sizes
    N_ROWS,
    D,
    R,
    T,
    N_BKT,
    # strides
    stride_dm,
    stride_dd,
    stride_lm,
    stride_lr,
    stride_wt,
    stride_wd,
    stride_wr,
    stride_gt,
    stride_gd,
    stride_gr,
    stride_sm,
    stride_sd,
    # meta-parameters
    SIDE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    # dy pass (SIDE 1): d = dy, lr = S, w = B, wgrad = dB, side = dS (atomics).
    # x pass (SIDE 2, or 0 without dx0): d = x, lr = dS, w = A^T view, wgrad = dA^T view,
    # side = dx0 (write-only; group T writes the base-only tail's zeros).
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] the owned D block
    nmask = ns < D
    rs = tl.arange(0, BLOCK_R)
    rkmask = rs < R
    ms = tl.arange(0, BLOCK_M)
    if g == T:  # the base-only tail: dx0 rows are 0
        if SIDE == 2:
            lo, hi = group_rows(off_ptr, g, T + 1, N_ROWS)
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=side_ptr.dtype.element_ty)
            for i0 in range(lo, hi, BLOCK_M):
                rows = i0 + ms.to(tl.int64)
                rmask = rows < hi
                tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
                sp = side_ptr + tok[:, None] * stride_sm + ns[None, :] * stride_sd
                tl.store(sp, zero, mask=rmask[:, None] & nmask[None, :])
        return
    lo, hi = group_rows(off_ptr, g, T + 1, N_ROWS)
    gl = g.to(tl.int64)
    s_g = tl.load(s_ptr + g).to(ACC_DTYPE) if HAS_SCALE else 1.0
    w_tile = tl.load(
        w_ptr + gl * stride_wt + ns[:, None] * stride_wd + rs[None, :] * stride_wr,
        mask=nmask[:, None] & rkmask[None, :],
        other=0.0,
    ).to(OP_DTYPE)  # [BLOCK_N, BLOCK_R]
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE)
    nblk = tl.cdiv(hi - lo, BLOCK_M)
    # stagger: the D blocks of one task start at different row blocks (no lockstep atomics)
    start = (pid_n * nblk) // tl.num_programs(1)
    for j in range(0, nblk):
        blk = (start + j) % nblk
        rows = lo + blk.to(tl.int64) * BLOCK_M + ms  # [BLOCK_M] plan rows
        rmask = rows < hi
        tok = tl.load(perm_ptr + rows, mask=rmask, other=0)
        d = tl.load(
            d_ptr + tok[:, None] * stride_dm + ns[None, :] * stride_dd,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(OP_DTYPE)  # [BLOCK_M, BLOCK_N]
        lr = tl.load(
            lr_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr,
            mask=rmask[:, None] & rkmask[None, :],
            other=0.0,
        ).to(ACC_DTYPE)  # [BLOCK_M, BLOCK_R] fp32 S or dS
        lr_op = to_op(lr * s_g, ROUND_DTYPE, OP_DTYPE)
        acc = tl.dot(tl.trans(d), lr_op, acc, input_precision=PRECISION)
        if SIDE == 1:  # partial dS of these rows from this D_out block
            part = tl.dot(d, w_tile, input_precision=PRECISION, out_dtype=ACC_DTYPE) * s_g
            tl.atomic_add(
                side_ptr + rows[:, None] * stride_sm + rs[None, :] * stride_sd,
                part,
                mask=rmask[:, None] & rkmask[None, :],
                sem="relaxed",
            )
        if SIDE == 2:  # dx0 = dS A_g for this D_in block, written once
            if BLOCK_R <= R_CHUNK:
                o = tl.dot(lr_op, tl.trans(w_tile), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:  # a long-K dot in R chunks (reloaded from L1/L2): no spills at R = 128
                o = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
                rc = tl.arange(0, R_CHUNK)
                for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                    lc = tl.load(
                        lr_ptr + rows[:, None] * stride_lm + (r0 + rc)[None, :] * stride_lr,
                        mask=rmask[:, None] & (r0 + rc < R)[None, :],
                        other=0.0,
                    )  # [BLOCK_M, R_CHUNK]
                    wc = tl.load(
                        w_ptr
                        + gl * stride_wt
                        + ns[None, :] * stride_wd
                        + (r0 + rc)[:, None] * stride_wr,
                        mask=nmask[None, :] & (r0 + rc < R)[:, None],
                        other=0.0,
                    )  # [R_CHUNK, BLOCK_N]
                    o = tl.dot(
                        to_op(lc, ROUND_DTYPE, OP_DTYPE),
                        wc.to(OP_DTYPE),
                        o,
                        input_precision=PRECISION,
                    )
            tl.store(
                side_ptr + tok[:, None] * stride_sm + ns[None, :] * stride_sd,
                o.to(side_ptr.dtype.element_ty),
                mask=rmask[:, None] & nmask[None, :],
            )
    tl.store(
        wgrad_ptr + gl * stride_gt + ns[:, None] * stride_gd + rs[None, :] * stride_gr,
        acc.to(wgrad_ptr.dtype.element_ty),
        mask=nmask[:, None] & rkmask[None, :],
    )


register("hard_bwd", _hard_bwd_kernel)


def _launch(d, lr, w, wgrad, side, perm, offsets, dtype, side_mode, scale) -> None:
    n, dd = d.shape
    t, r = w.shape[0], w.shape[2]

    def grid(meta):
        return (t + (1 if side_mode == 2 else 0), triton.cdiv(dd, meta["BLOCK_N"]))

    _hard_bwd_kernel[grid](
        d,
        lr,
        w,
        scale if scale is not None else lr,
        wgrad,
        side if side is not None else wgrad,  # written whole: zeroing it is harmless
        perm,
        offsets,
        n,
        dd,
        r,
        t,
        n_bucket(n),
        *d.stride(),
        *lr.stride(),
        *w.stride(),
        *wgrad.stride(),
        *(side.stride() if side is not None else (0, 0)),
        SIDE=side_mode,
        HAS_SCALE=scale is not None,
        **dot_meta(dtype),
        BLOCK_R=pow2(r),
        R_CHUNK=32,
    )


def hard_bwd_dy_pass(grad_y, shrink, lora_b, scaling, perm, offsets, grad_b, ds=None) -> None:
    """dB (owned) into grad_b (T, D_out, R) and, with ds (N, R) fp32 that the caller zeroed,
    dS += s dy B (relaxed atomics); one pass over dy. grad_y: (N, D_out); shrink: (N, R) plan
    order; scaling: (T,) acc dtype."""
    side = 1 if ds is not None else 0
    _launch(grad_y, shrink, lora_b, grad_b, ds, perm, offsets, grad_y.dtype, side, scaling)


def hard_bwd_x_pass(x, ds, lora_a, perm, offsets, grad_a, dx0=None) -> None:
    """dA (owned) into grad_a (T, R, D_in) and, with dx0 (N, D_in), dx0 = dS A_t (every row
    written, the base-only tail with 0); one pass over x. ds: (N, R) fp32 plan order."""
    w = lora_a.transpose(1, 2)  # (T, D_in, R)
    g = grad_a.transpose(1, 2)
    _launch(x, ds, w, g, dx0, perm, offsets, x.dtype, 2 if dx0 is not None else 0, None)
