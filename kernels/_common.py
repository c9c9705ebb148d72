"""Shared pieces of the Triton kernels: interpreter detection, dtype maps, autotune configs pruned
per GPU arch, and the device-side block -> group lookup that replaces a precomputed block table.

Imports triton and torch only (docs/ARCHITECTURE.md, layering).

Autotune configs are always the GPU's. Each kernel's `early_config_prune` is `pruner(fits)`:
- on a GPU it keeps the configs that `fits(kwargs, named_args, arch)` accepts for the device's
  arch (shared memory under the card's opt-in limit, accumulators small enough not to spill);
- under TRITON_INTERPRET=1 it keeps one config: the one `force_config` selects (tests walk every
  config this way), else the smallest that fits sm_80.
`configs_for_arch(kernel, arch, named_args)` gives the configs that can be picked on `arch`; the
ahead-of-time compile gate (benchmarks/gpu_compile.py) compiles exactly those.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
# Opt-in shared memory per block (bytes), by compute capability major*10+minor.
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / side-output dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_meta(dtype: torch.dtype) -> dict:
    """OP_DTYPE (what tl.dot operands are cast to), ROUND_DTYPE (what an fp32 intermediate such as
    S or dS is rounded to before it enters a dot), ACC_DTYPE and PRECISION, for an input dtype.

    On a GPU bf16/fp16 operands go to the tensor cores as they are, and fp32 uses TF32 only when
    torch allows it. The interpreter computes bf16 dots wrongly, so there every operand is fp32,
    but intermediates are still rounded to bf16/fp16 first (ROUND_DTYPE), as a GPU computes them.
    """
    acc = acc_dtype(dtype)
    op = acc if interpreting() else dtype
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting()
    return dict(
        OP_DTYPE=_TL_DTYPES[op],
        ROUND_DTYPE=_TL_DTYPES[dtype],
        ACC_DTYPE=_TL_DTYPES[acc],
        PRECISION="tf32" if tf32 else "ieee",
    )


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo) (tl.dot needs blocks >= 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def n_bucket(n: int) -> int:
    """Autotune key for the token count: its power-of-two bucket, capped at 2^16, so that a
    config tuned at N=1024 is not reused at N=8192."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


def elem_bytes(named_args: dict, name: str) -> int:
    """Element size of tensor argument `name` (fp32 when it is not a tensor)."""
    t = named_args.get(name)
    return t.element_size() if hasattr(t, "element_size") else 4


# --- autotune configs and pruning ----------------------------------------------------------

Fits = Callable[[dict, dict, int], bool]
_forced: dict[str, int] = {}
_kernels: dict[str, triton.runtime.Autotuner] = {}


def configs(rows: list[tuple], names: tuple[str, ...]) -> list[triton.Config]:
    """triton.Config per row: the block sizes named `names`, then num_warps and num_stages."""
    k = len(names)
    return [
        triton.Config(dict(zip(names, r[:k])), num_warps=r[k], num_stages=r[k + 1]) for r in rows
    ]


def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _size(cfg: triton.Config) -> int:
    out = 1
    for v in cfg.kwargs.values():
        out *= v
    return out


def pruner(name: str, fits: Fits) -> Callable:
    """early_config_prune for kernel `name`: see the module docstring."""

    def for_arch(cfgs: list[triton.Config], named_args: dict, arch: int) -> list[triton.Config]:
        keep = []
        for c in cfgs:
            kw = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            if fits(kw, named_args, arch):
                keep.append(c)
        return keep

    def prune(cfgs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        if interpreting():
            if name in _forced:
                return [cfgs[_forced[name] % len(cfgs)]]
            ok = for_arch(cfgs, args, 80) or cfgs
            return [min(ok, key=_size)]
        keep = for_arch(cfgs, args, _arch())
        if not keep:
            raise RuntimeError(f"{name}: no autotune config fits this GPU for these shapes")
        return keep

    prune.for_arch = for_arch
    return prune


def register(name: str, kernel: triton.runtime.Autotuner) -> triton.runtime.Autotuner:
    """Record an autotuned kernel so that tests and the compile gate can enumerate it."""
    _kernels[name] = kernel
    return kernel


def kernels() -> dict[str, triton.runtime.Autotuner]:
    """name -> autotuned kernel, for every kernel module imported so far."""
    return dict(_kernels)


def configs_for_arch(kernel, arch: int, named_args: dict) -> list[triton.Config]:
    """The configs of an autotuned `kernel` that can be picked on compute capability `arch`
    (80, 90) for a launch with `named_args` (all arguments, constexprs included)."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None or not hasattr(prune, "for_arch"):
        return list(kernel.configs)
    return prune.for_arch(kernel.configs, named_args, arch)


@contextlib.contextmanager
def force_config(name: str, index: int) -> Iterator[triton.Config]:
    """Under the interpreter, make kernel `name` run its autotune config `index` (modulo the
    count), so that a test can check every config against the reference."""
    kernel = _kernels[name]
    _forced[name] = index
    kernel.cache.clear()
    try:
        yield kernel.configs[index % len(kernel.configs)]
    finally:
        _forced.pop(name, None)
        kernel.cache.clear()


def smem_ok(bytes_: int, arch: int) -> bool:
    return bytes_ <= SMEM_LIMIT.get(arch, 101_376)


def tiles_ok(esz: int, budget2: int, budget4: int, *tiles: int) -> bool:
    """Live register tiles (element counts) within the kernel's budget for its dtype: budget2
    for bf16/fp16, budget4 for fp32 (whose dots take the FMA path and hold operands in
    registers). The budgets are calibrated per kernel on ptxas -v (benchmarks/gpu_compile.py)."""
    return sum(tiles) <= (budget4 if esz >= 4 else budget2)


# --- device-side helpers ------------------------------------------------------------------


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


@triton.jit
def group_rows(off_ptr, g, NUM_OFF, N_ROWS):
    """[lo, hi) plan rows of group g (the last group ends at N_ROWS)."""
    lo = tl.load(off_ptr + g)
    hi = tl.load(off_ptr + g + 1, mask=g + 1 < NUM_OFF, other=N_ROWS)
    return lo, hi


@triton.jit
def to_op(x, ROUND_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr):
    """x (fp32 tile) as a dot operand: rounded to ROUND_DTYPE, then cast to OP_DTYPE.

    On a GPU both are the input dtype: one cast, round-to-nearest-even. Under the interpreter
    OP_DTYPE is fp32, and its own fp32 -> bf16 cast truncates, so bf16 is rounded here by bits.
    """
    if ROUND_DTYPE == OP_DTYPE:
        return x.to(OP_DTYPE)
    elif ROUND_DTYPE == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True).to(OP_DTYPE)
    else:
        return x.to(ROUND_DTYPE).to(OP_DTYPE)
