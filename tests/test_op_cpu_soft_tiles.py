"""The CPU soft-routing kernel's tiled, threaded path (csrc/soft_cpu.cpp: row tiles doing the
shrink, router softmax and expand, and the backward's dH, router and dx, in cache; then units
that own column blocks of the weight gradients) against the float64 reference, at shapes above
the serial threshold (N * D_in * D_out >= 2^22), with one and two threads."""

import dataclasses

import pytest
import torch
from op_cases import assert_same_bits_across_threads, make_case
from test_op_cpu import check_case

import mftk

SHAPES = [  # (N, D_in, D_out, T, R)
    (700, 96, 200, 3, 8),  # several row tiles, a short last one
    (4095, 33, 341, 8, 4),  # awkward sizes, 16 tiles of 256 sub-rows
    (513, 129, 257, 5, 1),  # rank 1
    (1, 2048, 2048, 2, 16),  # one token, one tile
]


@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_soft_tiled(shape, dtype, top_k, threads):
    n, d_in, d_out, t, r = shape
    if top_k is not None and top_k >= t:
        pytest.skip("top_k >= T is plain softmax")
    check_case(make_case(n, d_in, d_out, t, r, "soft", dtype, top_k=top_k))


def test_soft_tiled_no_biases(threads):
    case = make_case(600, 80, 160, 4, 8, "soft", torch.float64, bias=False)
    check_case(dataclasses.replace(case, router_bias=None))


def _grads(case, backend, g, g_logits, weight):
    y, logits = mftk.multi_adapter_linear(
        case.x, weight, case.lora_a, case.lora_b, backend=backend, return_router_logits=True,
        **case.kwargs(),
    )  # fmt: skip
    leaves = case.leaves()
    return [y, logits, *torch.autograd.grad([y, logits], leaves, [g, g_logits])]


@pytest.mark.parametrize("with_weight", [True, False], ids=["base", "adapters_alone"])
def test_soft_tiled_logits_gradient(with_weight, threads):
    """A loss on the router logits too (grad_logits reaches the kernel), with and without W."""
    case = make_case(600, 80, 160, 4, 8, "soft", torch.float64, top_k=2)
    w = case.weight if with_weight else None
    g, g_logits = torch.randn(600, 160, dtype=torch.float64), torch.randn(600, 4).double()
    got = _grads(case, "cpu", g, g_logits, w)
    ref = _grads(case, "reference", g, g_logits, w)
    for i, (a, b) in enumerate(zip(got, ref)):
        err = (a - b).abs().max().item()
        assert err < 1e-9 * max(1.0, b.abs().max().item()), f"output {i}: max error {err:.3g}"


def test_soft_tiled_threads_bit_identical():
    """Row blocks and the weight-gradient units (column chunks, one GEMM over all rows each) do
    not depend on the thread count: two threads give one thread's bits."""
    case = make_case(1500, 300, 260, 3, 8, "soft", torch.float32)  # 3 units each of dA, dB
    g, g_logits = torch.randn(1500, 260), torch.randn(1500, 3)

    assert_same_bits_across_threads(
        lambda: [t.detach() for t in _grads(case, "cpu", g, g_logits, case.weight)]
    )


def test_soft_tiled_rejects_bad_shapes():
    """Called directly (no Python checks), the tiled kernels refuse inputs of the wrong shape
    instead of reading past them."""
    case = make_case(600, 80, 160, 4, 8, "soft", torch.float32)
    x, w, a, b, rw = (
        t.detach() for t in (case.x, case.weight, case.lora_a, case.lora_b, case.router_weight)
    )
    s = torch.ones(4)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.mftk.soft_fwd(x, w, torch.ones(3), a, b, s, rw, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="scaling"):
        torch.ops.mftk.soft_fwd(x, w, None, a, b, torch.ones(3), rw, None, 1.0, 0)
    y, logits, probs, shrink = torch.ops.mftk.soft_fwd(x, w, None, a, b, s, rw, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="shrink"):
        torch.ops.mftk.soft_bwd(y, None, x, w, a, b, s, rw, probs, shrink[:, :5], 1.0)
