"""The CPU hard-routing kernel's tiled, threaded path (csrc/hard_cpu.cpp) against the float64
reference: shapes large enough for a parallel region, several row blocks per task, column blocks
split when row blocks are few, and one or two threads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_cases import assert_same_bits_across_threads, make_case
from test_op_cpu import check_case

import mftk

SHAPES = [  # (N, D_in, D_out, T, R): above the serial threshold (N * D_in * D_out >= 2^22)
    (700, 96, 200, 3, 8),  # several 128-row blocks per task
    (200, 300, 520, 2, 16),  # few row blocks: columns split (forward over D_out, backward D_in)
    (513, 129, 257, 5, 1),  # awkward sizes, rank 1
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hard_tiled(shape, dtype, threads):
    n, d_in, d_out, t, r = shape
    check_case(make_case(n, d_in, d_out, t, r, "hard", dtype))


@pytest.mark.parametrize(
    "ids",
    [
        lambda n: torch.full((n,), -1),  # base only: the ATen path
        lambda n: torch.tensor([1] * (n - 3) + [-1] * 3),  # one task, a short base-only tail
        lambda n: torch.arange(n) % 2 * 2,  # tasks 0 and 2 interleaved, task 1 empty
    ],
    ids=["all_minus_one", "single_task", "empty_task"],
)
def test_hard_tiled_routing_edges(ids, threads):
    check_case(make_case(400, 64, 300, 3, 4, "hard", torch.float64, ids=ids(400)))


def test_hard_tiled_no_bias(threads):
    check_case(make_case(600, 80, 160, 4, 8, "hard", torch.float64, bias=False))


def test_hard_tiled_adapters_alone(threads):
    """weight=None: y is the bias plus the adapters, and grad_x comes from the adapters alone."""
    case = make_case(600, 80, 160, 4, 8, "hard", torch.float64)
    kw = case.kwargs()
    args = (case.x, None, case.lora_a, case.lora_b)
    got = mftk.multi_adapter_linear(*args, **kw)
    ref = mftk.multi_adapter_linear(*args, backend="reference", **kw)
    g = torch.randn_like(ref)
    leaves = [case.x, case.lora_a, case.lora_b, case.bias]
    for name, a, b in zip(
        ["y", "grad_x", "grad_lora_a", "grad_lora_b", "grad_bias"],
        [got, *torch.autograd.grad(got, leaves, g)],
        [ref, *torch.autograd.grad(ref, leaves, g)],
    ):
        err = (a - b).abs().max().item()
        assert err < 1e-10, f"{name}: max error {err:.3g}"


def test_hard_bwd_rejects_bad_shrink():
    case = make_case(300, 64, 64, 2, 4, "hard", torch.float32)
    plan = mftk.build_plan(case.task_ids, 2)
    s = torch.ones(2)
    x, w, a, b = (t.detach() for t in (case.x, case.weight, case.lora_a, case.lora_b))
    with pytest.raises(RuntimeError, match="shrink"):
        torch.ops.mftk.hard_bwd(
            torch.ones(300, 64), x, w, a, b, s, plan.perm, plan.offsets, torch.zeros(300, 3)
        )


def test_aten_gemm_fallback_matches(tmp_path):
    """MFTK_CPU_ATEN_GEMM=1 runs the tiles through at::addmm_out, as on a torch without BLAS
    symbols: same results as the float64 reference."""
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from op_cases import make_case\n"
        "from test_op_cpu import check_case\n"
        "torch.set_num_threads(2)\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    check_case(make_case(200, 300, 520, 2, 16, 'hard', dt))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MFTK_CPU_ATEN_GEMM="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_parallel_region_uses_the_threads(threads):
    """The tiles' parallel region really forks: a build without -fopenmp drops the pragma inside
    at::parallel_for, and every tile then runs on one thread (2x slower on 2 idle cores)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("setup.py builds with -fopenmp on Linux only")
    assert torch.ops.mftk.parallel_threads() == threads


def test_one_openmp_runtime():
    """mftk._C's libgomp.so.1 is the copy torch loaded (same soname), not a second runtime."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc (Linux)")
    import mftk._C  # noqa: F401

    gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, gomp


def test_hard_tiled_threads_bit_identical():
    """Weight-gradient partials are summed in tile order, not in the order threads finish: two
    threads give the one-thread result bit for bit, and so does every repeat."""
    case = make_case(1500, 96, 200, 3, 8, "hard", torch.float32)
    kw = case.kwargs()
    args = (case.x, case.weight, case.lora_a, case.lora_b)
    g = torch.randn(1500, 200)
    leaves = [case.x, case.lora_a, case.lora_b]

    def run():
        y = mftk.multi_adapter_linear(*args, **kw)
        return [y.detach(), *torch.autograd.grad(y, leaves, g)]

    assert_same_bits_across_threads(run)


def test_hard_tiled_column_split_bit_identical():
    """Few row blocks and wide layers: two threads split the columns. Blocks are whole 256-column
    chunks, so every GEMM has its one-thread shape and the result is the same bit for bit."""
    case = make_case(512, 1000, 1000, 2, 8, "hard", torch.float32)
    kw = case.kwargs()
    args = (case.x, case.weight, case.lora_a, case.lora_b)
    g = torch.randn(512, 1000)

    def run():
        y = mftk.multi_adapter_linear(*args, **kw)
        return [y.detach(), *torch.autograd.grad(y, [case.x, case.lora_a, case.lora_b], g)]

    assert_same_bits_across_threads(run, repeats=1)


@pytest.mark.parametrize("d_in, d_out", [(16, 0), (2048, 0)], ids=["small", "tiled"])
def test_hard_zero_width_output(d_in, d_out, threads):
    """D_out = 0: y is (N, 0) and every gradient is exactly 0 (BLAS rejects leading dimension 0,
    which left the dS buffer unwritten before)."""
    n = 4096
    x = torch.randn(n, d_in, requires_grad=True)
    a = torch.randn(2, 4, d_in, requires_grad=True)
    b = torch.randn(2, d_out, 4, requires_grad=True)
    y = mftk.multi_adapter_linear(x, None, a, b, task_ids=torch.arange(n) % 2, backend="cpu")
    assert y.shape == (n, 0)
    gx, ga = torch.autograd.grad(y.sum(), [x, a])
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(ga, torch.zeros_like(ga))


def test_hard_rejects_repeated_perm_entries():
    """A hand-made perm that names a row twice (and so misses one) is refused by the kernel."""
    case = make_case(300, 64, 64, 2, 4, "hard", torch.float32)
    x, w, a, b = (t.detach() for t in (case.x, case.weight, case.lora_a, case.lora_b))
    perm = torch.arange(300)
    perm[5] = 4
    offsets = torch.tensor([0, 150, 300])
    with pytest.raises(RuntimeError, match="repeats"):
        torch.ops.mftk.hard_fwd(x, w, None, a, b, torch.ones(2), perm, offsets)
