"""Every autotune config of every Triton kernel, checked against the float64 reference.

Under the interpreter the autotuner keeps one config (kernels/_common.py); `force_config` makes a
kernel run each of its GPU configs in turn, at awkward sizes that leave partial tiles on every
side. bf16 inputs are computed as a GPU computes them: S, dS and dL are rounded to bf16
(round-to-nearest-even) before they enter a dot. On a GPU these tests run the same configs for
real (the autotuner is bypassed the same way only under the interpreter, so they are skipped).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from mftk.kernels import _common
from op_cases import make_case
from test_triton_ops import check_case

from mftk.ops import triton_ops

# which op and strategy launches each kernel
USES = {
    "shrink_expand": [("hard", "addmm"), ("hard", "fused")],
    "hard_bwd": [("hard", "addmm"), ("hard", "fused")],
    "grouped_reduce": [("soft", "addmm")],
    "grouped_gemm": [("hard", "fused"), ("soft", "addmm"), ("soft", "fused")],
    "soft_fwd": [("soft", "addmm")],
    "soft_bwd": [("soft", "addmm")],
}
# (N, D_in, D_out, T, R): D past one K tile of 128 with a tail, rank 12 (padded to 16)
SHAPE = {"hard": (67, 150, 141, 3, 12), "soft": (37, 150, 141, 3, 12)}


def _cases():
    for name, uses in USES.items():
        n_cfg = len(_common.kernels()[name].configs)
        for i in range(n_cfg):
            mode, strategy = uses[i % len(uses)]  # spread the configs over the uses
            yield pytest.param(name, i, mode, strategy, id=f"{name}-{i}-{mode}-{strategy}")


def test_every_kernel_is_registered():
    assert set(_common.kernels()) == set(USES)


@pytest.mark.skipif(not _common.interpreting(), reason="forcing configs is for the interpreter")
@pytest.mark.parametrize("name,index,mode,strategy", list(_cases()))
def test_config_matches_reference(name, index, mode, strategy):
    kernel = _common.kernels()[name]
    triton_ops.set_strategy(strategy)
    try:
        with _common.force_config(name, index) as cfg:
            case = make_case(*SHAPE[mode], mode=mode, dtype=torch.bfloat16, top_k=None)
            check_case(case)
            assert kernel.best_config is cfg  # the forced config is the one that ran
    finally:
        triton_ops.set_strategy(None)


@pytest.mark.skipif(not _common.interpreting(), reason="forcing configs is for the interpreter")
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes_largest_tiles(mode, dtype):
    """fp16 and fp32 with the widest config of every kernel at once."""
    with contextlib.ExitStack() as stack:
        for name, kernel in _common.kernels().items():
            widest = max(range(len(kernel.configs)), key=lambda i: _common._size(kernel.configs[i]))
            stack.enter_context(_common.force_config(name, widest))
        top_k = 2 if mode == "soft" else None
        check_case(make_case(*SHAPE[mode], mode=mode, dtype=dtype, top_k=top_k))


def test_bf16_rounding_is_emulated():
    """The interpreter's own fp32 -> bf16 cast truncates; kernels round to nearest even."""
    if not _common.interpreting():
        pytest.skip("interpreter only")
    import triton
    import triton.language as tl

    @triton.jit
    def _k(x_ptr, o_ptr, ROUND: tl.constexpr, OP: tl.constexpr):
        offs = tl.arange(0, 1024)
        tl.store(o_ptr + offs, _common.to_op(tl.load(x_ptr + offs), ROUND, OP))

    x = torch.randn(1024) * 100
    out = torch.empty(1024)
    _k[(1,)](x, out, ROUND=tl.bfloat16, OP=tl.float32)
    assert torch.equal(out, x.bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_soft_many_columns(dtype):
    """T*R = 270: the soft kernels walk several column chunks, and [dS | dL] (279 columns) is
    split over two P blocks of the reduction, the router rows landing in the second."""
    check_case(make_case(21, 40, 33, 9, 30, mode="soft", dtype=dtype, top_k=3))
