"""mftk.multi_adapter_linear with backend="triton" against the float64 reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), so
shapes stay small; the `cuda`-marked tests repeat the checks at real sizes on a GPU, with opcheck
and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from op_cases import assert_close, make_case, reference_fn, run

import mftk
from mftk.ops import triton_ops

GRAD_NAMES = ["grad_x", "grad_lora_a", "grad_lora_b"]
OPT_NAMES = ["grad_bias", "grad_router_weight", "grad_router_bias"]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(params=["addmm", "fused"])
def strategy(request):
    triton_ops.set_strategy(request.param)
    yield request.param
    triton_ops.set_strategy(None)


def triton_fn(case, **kw):
    return mftk.multi_adapter_linear(
        case.x, case.weight, case.lora_a, case.lora_b, backend="triton", **case.kwargs(), **kw
    )


def _to_device(case):
    if DEVICE == "cpu":
        return case
    for f in ("x", "weight", "bias", "lora_a", "lora_b", "router_weight", "router_bias"):
        t = getattr(case, f)
        if t is not None:
            setattr(case, f, t.detach().to(DEVICE).requires_grad_(t.requires_grad))
    case.scaling = case.scaling.to(DEVICE)
    if case.task_ids is not None:
        case.task_ids = case.task_ids.to(DEVICE)
    return case


def _fresh(case, dtype):
    c = case.to(dtype)
    for leaf in c.leaves():
        leaf.requires_grad_(True)
    return c


def check_case(case):
    """Triton in the case dtype vs the float64 reference; plain torch in that dtype is the
    yardstick (|err| <= 2 |err_torch| + atol, or the per-dtype floor)."""
    case = _to_device(case)
    dtype = case.x.dtype
    g = torch.randn((*case.x.shape[:-1], case.lora_b.shape[1]), dtype=torch.float64, device=DEVICE)
    y, grads, _ = run(case, triton_fn, g)
    y64, grads64, _ = run(_fresh(case, torch.float64), reference_fn, g)
    same, same_grads = None, [None] * len(grads)
    if dtype != torch.float64:
        same, same_grads, _ = run(_fresh(case, dtype), reference_fn, g)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close("y", y, y64, same, dtype)
    present = (case.bias, case.router_weight, case.router_bias)
    names = GRAD_NAMES + [n for n, t in zip(OPT_NAMES, present) if t is not None]
    for name, gk, gr, gs in zip(names, grads, grads64, same_grads):
        assert gk is not None, f"{name} is missing"
        assert gk.dtype == dtype, f"{name}: dtype {gk.dtype}, want {dtype}"
        assert_close(name, gk, gr, gs, dtype)
    return y, grads


# --- correctness under the interpreter (small shapes) ----------------------------------------

SHAPES = [  # (N, D_in, D_out, T, R): awkward sizes, a single token, rank 1 and 64
    (33, 40, 17, 3, 8),
    (1, 17, 33, 2, 1),
    (17, 33, 40, 2, 64),
]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hard(shape, dtype, strategy):
    check_case(make_case(*shape, mode="hard", dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_soft(shape, top_k, dtype, strategy):
    check_case(make_case(*shape, mode="soft", dtype=dtype, top_k=top_k))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_float64(mode):
    check_case(make_case(33, 40, 17, 5, 4, mode=mode, dtype=torch.float64, top_k=None))


@pytest.mark.parametrize(
    "ids",
    [
        torch.full((33,), -1),  # all base-only
        torch.tensor([3] * 16 + [0] * 17),  # tasks 1, 2 empty, sorted descending
        torch.randint(-1, 4, (33,)).flip(0),  # unsorted, with -1
        torch.tensor([1] * 33),  # one task takes everything
    ],
    ids=["all_minus_one", "empty_tasks", "unsorted", "single_task"],
)
def test_hard_routing_edges(ids, strategy):
    check_case(make_case(33, 40, 17, 4, 8, mode="hard", dtype=torch.float32, ids=ids))


def test_soft_top1_no_bias_leading_dims():
    case = make_case(0, 33, 17, 5, 4, "soft", torch.float32, top_k=1, bias=False, lead=(3, 7))
    check_case(case)


def test_router_logits_loss_reaches_router(strategy):
    """grad_logits (a router loss on the returned logits) flows through the soft backward."""
    case = _to_device(make_case(33, 40, 17, 3, 8, "soft", torch.float32, top_k=2))
    gy = torch.randn(33, 17, device=DEVICE)
    gl = torch.randn(33, 3, device=DEVICE)

    def loss(c, backend):
        y, logits = mftk.multi_adapter_linear(
            c.x,
            c.weight,
            c.lora_a,
            c.lora_b,
            return_router_logits=True,
            backend=backend,
            **c.kwargs(),
        )
        return y, logits, (y * gy.to(y.dtype)).sum() + (logits * gl.to(y.dtype)).sum()

    y, logits, total = loss(case, "triton")
    grads = torch.autograd.grad(total, case.leaves())
    c64 = _fresh(case, torch.float64)
    y64, logits64, total64 = loss(c64, "reference")
    grads64 = torch.autograd.grad(total64, c64.leaves())
    assert_close("logits", logits, logits64, None, torch.float32)
    names = GRAD_NAMES + OPT_NAMES
    for name, gk, gr in zip(names, grads, grads64):
        assert_close(name, gk, gr, None, torch.float32)


def test_plan_reused():
    case = _to_device(make_case(33, 40, 17, 3, 8, "hard", torch.float32))
    plan = mftk.build_plan(case.task_ids, 3)
    kw = case.kwargs()
    kw["task_ids"] = plan
    y_plan = mftk.multi_adapter_linear(
        case.x, case.weight, case.lora_a, case.lora_b, backend="triton", **kw
    )
    torch.testing.assert_close(y_plan, triton_fn(case), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_deterministic_path(mode, monkeypatch):
    """Under torch.use_deterministic_algorithms nothing uses atomics (hard dS gets its own pass
    over dy; the only atomics in kernels/ are that dS accumulation), it is as accurate as the
    default path, and two runs agree bit for bit."""
    kernel_dir = pathlib.Path(triton_ops.__file__).parents[2] / "kernels"
    with_atomics = {f.name for f in kernel_dir.glob("*.py") if "atomic_" in f.read_text()}
    assert with_atomics == {"hard_bwd.py"}
    seen = []
    orig = triton_ops.hard_bwd_dy_pass
    monkeypatch.setattr(
        triton_ops,
        "hard_bwd_dy_pass",
        lambda *a, **k: seen.append(len(a) + len(k)) or orig(*a, **k),
    )
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        case = make_case(65, 40, 17, 3, 8, mode, torch.float32, top_k=2 if mode == "soft" else None)
        case = _to_device(case)
        check_case(case)
        g = torch.randn(65, 17, dtype=torch.float64, device=DEVICE)
        y1, grads1, _ = run(case, triton_fn, g)
        y2, grads2, _ = run(case, triton_fn, g)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(k == 7 for k in seen), seen  # the dy pass was called without its dS buffer
    for a, b in zip((y1, *grads1), (y2, *grads2)):
        assert torch.equal(a, b)


def test_default_hard_path_accumulates_ds_in_the_dy_pass(monkeypatch):
    """By default the dy pass also accumulates dS (one pass over dy instead of two)."""
    seen = []
    orig = triton_ops.hard_bwd_dy_pass
    monkeypatch.setattr(
        triton_ops,
        "hard_bwd_dy_pass",
        lambda *a, **k: seen.append(len(a) + len(k)) or orig(*a, **k),
    )
    assert not torch.are_deterministic_algorithms_enabled()
    check_case(make_case(65, 40, 17, 3, 8, "hard", torch.float32))
    assert seen == [8]


def test_op_outputs_match_fakes():
    """Shapes and dtypes of the Triton ops' outputs are those of the shared fake kernels."""
    case = _to_device(make_case(33, 40, 17, 3, 8, "hard", torch.bfloat16))
    plan = mftk.build_plan(case.task_ids, 3)
    s = torch.rand(3, device=DEVICE) + 0.5
    args = (case.x, case.weight, case.bias, case.lora_a, case.lora_b, s, plan.perm, plan.offsets)
    y, shrink = triton_ops.hard_fwd(*(a.detach() for a in args))
    assert y.dtype == torch.bfloat16 and y.shape == (33, 17)
    assert shrink.dtype == torch.float32 and shrink.shape == (33, 8)
    soft = _to_device(make_case(33, 40, 17, 3, 8, "soft", torch.bfloat16))
    out = triton_ops.soft_fwd(
        soft.x,
        soft.weight,
        soft.bias,
        soft.lora_a,
        soft.lora_b,
        s,
        soft.router_weight,
        soft.router_bias,
        0.8,
        2,
    )
    assert [t.dtype for t in out] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert [tuple(t.shape) for t in out] == [(33, 17), (33, 3), (33, 3), (33, 24)]
    # top-2 of 3: exactly one probability per token is zero, the rest sum to one
    probs = out[2]
    assert ((probs == 0).sum(1) == 1).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(33, device=DEVICE))


def test_strategy_knob_validates():
    with pytest.raises(ValueError, match="name"):
        triton_ops.set_strategy("bogus")
    assert triton_ops.choose_strategy(8192, 4096, 4096) in triton_ops.STRATEGIES


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_opcheck(mode):
    """opcheck on every mftk::triton_* op (schema, fake kernel, autograd registration)."""
    case = _to_device(make_case(33, 32, 16, 3, 4, mode, torch.float32, top_k=2))
    s = case.scaling.float()
    d = [t.detach() for t in (case.x, case.weight, case.bias, case.lora_a, case.lora_b)]
    if mode == "hard":
        plan = mftk.build_plan(case.task_ids, 3)
        args = (*d, s, plan.perm, plan.offsets)
        torch.library.opcheck(torch.ops.mftk.triton_hard_fwd.default, args)
        y, shrink = torch.ops.mftk.triton_hard_fwd(*args)
        bargs = (torch.randn_like(y), d[0], d[1], d[3], d[4], s, plan.perm, plan.offsets, shrink)
        torch.library.opcheck(torch.ops.mftk.triton_hard_bwd.default, bargs)
    else:
        rw, rb = case.router_weight.detach(), case.router_bias.detach()
        args = (*d, s, rw, rb, 0.8, 2)
        torch.library.opcheck(torch.ops.mftk.triton_soft_fwd.default, args)
        y, logits, probs, shrink = torch.ops.mftk.triton_soft_fwd(*args)
        bargs = (
            torch.randn_like(y),
            torch.randn_like(logits),
            d[0],
            d[1],
            d[3],
            d[4],
            s,
            rw,
            probs,
            shrink,
            0.8,
        )
        torch.library.opcheck(torch.ops.mftk.triton_soft_bwd.default, bargs)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) through both Triton ops, forward and backward."""
    c = _to_device(make_case(33, 32, 32, 3, 4, "hard", torch.float32))
    s = _to_device(make_case(33, 32, 32, 3, 4, "soft", torch.float32, top_k=2))

    def f(x, w, b, a, bb, ids, rw, rb):
        plan = mftk.build_plan(ids, 3)
        y1 = mftk.multi_adapter_linear(
            x, w, a, bb, bias=b, scaling=0.5, task_ids=plan, backend="triton"
        )
        y2 = mftk.multi_adapter_linear(
            y1, w, a, bb, scaling=0.5, router_weight=rw, router_bias=rb, top_k=2, backend="triton"
        )
        return y2.square().mean()

    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.task_ids, s.router_weight, s.router_bias)
    leaves = [c.x, c.lora_a, c.lora_b, s.router_weight]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    out_c = compiled(*args)
    g_c = torch.autograd.grad(out_c, leaves)
    out_e = f(*args)
    g_e = torch.autograd.grad(out_e, leaves)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


# --- on a GPU: the same checks at real sizes ----------------------------------------------

CUDA_SHAPES = [(4096, 1024, 1024, 8, 16), (3001, 1536, 512, 5, 64), (1, 4096, 4096, 8, 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode,top_k", [("hard", None), ("soft", None), ("soft", 2)])
def test_cuda_real_sizes(shape, dtype, mode, top_k, strategy):
    check_case(make_case(*shape, mode=mode, dtype=dtype, top_k=top_k))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_cuda_deterministic_bit_identical(mode):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        case = _to_device(make_case(4096, 1024, 1024, 8, 16, mode, torch.bfloat16))
        g = torch.randn(4096, 1024, dtype=torch.float64, device=DEVICE)
        first = run(case, triton_fn, g)
        second = run(case, triton_fn, g)
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_build_plan_matches_torch():
    from mftk.ops.plan import _plan_torch

    ids = torch.randint(-1, 8, (100_003,), device="cuda")
    plan = mftk.build_plan(ids, 8)
    perm, offsets = _plan_torch(ids, 8)
    assert torch.equal(plan.perm, perm) and torch.equal(plan.offsets, offsets)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_non_contiguous_inputs(mode, strategy):
    """Strided views of x and lora_a go to the kernels as they are (strides, not copies)."""
    case = make_case(33, 80, 17, 3, 8, mode, torch.float32)
    case.x = case.x.detach()[:, ::2].requires_grad_(True)  # D_in = 40, row stride 80
    case.weight = case.weight[:, ::2].contiguous()
    case.lora_a = case.lora_a.detach()[:, :, ::2].requires_grad_(True)
    if case.router_weight is not None:
        case.router_weight = case.router_weight.detach()[:, ::2].requires_grad_(True)
    assert not case.x.is_contiguous() and not case.lora_a.is_contiguous()
    check_case(case)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_without_base_weight(mode):
    """weight=None: the adapters alone (bias kept); the caller computes its own base."""
    case = make_case(33, 40, 17, 3, 8, mode, torch.float32, top_k=2 if mode == "soft" else None)
    case.weight = None
    check_case(case)
