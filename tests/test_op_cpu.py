"""mftk.multi_adapter_linear on the CPU backend (mftk._C) against the float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_cases import assert_close, make_case, reference_fn, run

import mftk


def mftk_fn(case, backend="cpu"):
    return mftk.multi_adapter_linear(
        case.x, case.weight, case.lora_a, case.lora_b, backend=backend, **case.kwargs()
    )


def check_case(case, backend="cpu"):
    """Kernel in case dtype vs the float64 reference; plain torch in case dtype is the yardstick."""
    dtype = case.x.dtype
    y, grads, g = run(case, lambda c: mftk_fn(c, backend))
    c64 = case.to(torch.float64)
    for leaf in c64.leaves():
        leaf.requires_grad_(True)
    y64, grads64, _ = run(c64, reference_fn, g)
    same = None
    same_grads = [None] * len(grads)
    if dtype != torch.float64:
        cd = case.to(dtype)
        for leaf in cd.leaves():
            leaf.requires_grad_(True)
        same, same_grads, _ = run(cd, reference_fn, g)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close("y", y, y64, same, dtype)
    names = [
        "grad_x",
        "grad_lora_a",
        "grad_lora_b",
        "grad_bias",
        "grad_router_weight",
        "grad_router_bias",
    ]
    names = names[:3] + [
        n
        for n, t in zip(names[3:], (case.bias, case.router_weight, case.router_bias))
        if t is not None
    ]
    for name, gk, gr, gs in zip(names, grads, grads64, same_grads):
        assert gk is not None, f"{name} is missing"
        assert gk.dtype == dtype
        assert_close(name, gk, gr, gs, dtype)


SHAPES = [  # (N, D_in, D_out, T, R)
    (1, 16, 16, 1, 1),
    (17, 33, 16, 3, 8),
    (300, 33, 341, 8, 8),
    (17, 341, 33, 3, 64),
    (0, 16, 33, 3, 8),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hard(shape, dtype):
    n, d_in, d_out, t, r = shape
    check_case(make_case(n, d_in, d_out, t, r, "hard", dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_soft(shape, dtype, top_k):
    n, d_in, d_out, t, r = shape
    k = None if top_k is None else min(top_k, t)
    check_case(make_case(n, d_in, d_out, t, r, "soft", dtype, top_k=k))


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_fp16(shape, mode):
    """fp16 in, fp16 out and grads, within fp16 tolerances of the float64 reference."""
    check_case(make_case(*shape, mode, torch.float16, top_k=2 if mode == "soft" else None))


@pytest.mark.parametrize(
    "ids",
    [
        torch.full((40,), -1),  # all base-only
        torch.tensor([2] * 20 + [0] * 20),  # task 1 empty, sorted descending
        torch.randint(0, 3, (40,)).flip(0),  # unsorted
        torch.tensor([1] * 40),  # one task takes everything
    ],
    ids=["all_minus_one", "empty_task", "unsorted", "single_task"],
)
def test_hard_routing_edges(ids):
    check_case(make_case(40, 33, 17, 3, 4, "hard", torch.float64, ids=ids))


def test_all_minus_one_is_exactly_base():
    case = make_case(23, 33, 17, 3, 4, "hard", torch.float32, ids=torch.full((23,), -1))
    y = mftk_fn(case)
    base = torch.nn.functional.linear(case.x, case.weight, case.bias)
    torch.testing.assert_close(y, base, rtol=0, atol=0)


def test_no_bias_and_leading_dims():
    case = make_case(0, 33, 17, 3, 4, "hard", torch.float64, bias=False, lead=(2, 5, 3))
    check_case(case)
    soft = make_case(0, 33, 17, 3, 4, "soft", torch.float64, bias=False, lead=(4, 5))
    check_case(soft)


def test_non_contiguous_x():
    case = make_case(30, 66, 17, 3, 4, "hard", torch.float64)
    case.x = case.x.detach()[:, ::2].requires_grad_(True)  # strided view, D_in = 33
    case.weight = case.weight[:, ::2].contiguous()
    case.lora_a = case.lora_a.detach()[:, :, ::2].contiguous().requires_grad_(True)
    assert not case.x.is_contiguous()
    check_case(case)


def test_plan_reused_across_layers():
    case = make_case(50, 16, 16, 4, 4, "hard", torch.float64)
    plan = mftk.build_plan(case.task_ids, 4)
    kw = case.kwargs()
    kw["task_ids"] = plan
    y_plan = mftk.multi_adapter_linear(case.x, case.weight, case.lora_a, case.lora_b, **kw)
    y_ids = mftk_fn(case)
    torch.testing.assert_close(y_plan, y_ids, rtol=0, atol=0)


def test_build_plan_is_stable_counting_sort():
    ids = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2])
    plan = mftk.build_plan(ids, 4)
    assert plan.perm.tolist() == [2, 5, 4, 0, 3, 7, 1, 6]
    assert plan.offsets.tolist() == [0, 2, 3, 6, 6]
    assert plan.counts().tolist() == [2, 1, 3, 0]


def test_weight_grad_when_it_requires_grad():
    case = make_case(20, 16, 8, 2, 4, "hard", torch.float64)
    w = case.weight.detach().requires_grad_(True)
    y = mftk.multi_adapter_linear(case.x, w, case.lora_a, case.lora_b, **case.kwargs())
    (gw,) = torch.autograd.grad(y.sum(), [w])
    torch.testing.assert_close(gw, torch.ones(20, 8, dtype=torch.float64).t() @ case.x.detach())


def test_returns_router_logits():
    case = make_case(12, 16, 8, 3, 4, "soft", torch.float64)
    y, logits = mftk.multi_adapter_linear(
        case.x, case.weight, case.lora_a, case.lora_b, return_router_logits=True, **case.kwargs()
    )
    want = case.x @ case.router_weight.t() + case.router_bias
    torch.testing.assert_close(logits, want)
    # A loss on the logits reaches the router: the gradient includes the router-loss term.
    (g_logits_only,) = torch.autograd.grad(logits.square().sum(), [case.router_weight])
    torch.testing.assert_close(g_logits_only, (2 * want).t() @ case.x)


def test_gradcheck_float64():
    for mode, k in (("hard", None), ("soft", None), ("soft", 2)):
        case = make_case(9, 6, 5, 3, 2, mode, torch.float64, top_k=k)

        def f(*leaves, case=case):
            x, a, b, bias, *router = leaves
            kw = case.kwargs()
            kw["bias"] = bias
            if router:
                kw["router_weight"], kw["router_bias"] = router
            return mftk.multi_adapter_linear(x, case.weight, a, b, backend="cpu", **kw)

        assert torch.autograd.gradcheck(f, tuple(case.leaves()), eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    t=st.integers(1, 5),
    r=st.integers(1, 6),
    mode=st.sampled_from(["hard", "soft"]),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_matches_reference(n, d_in, d_out, t, r, mode, k, seed):
    torch.manual_seed(seed)
    check_case(
        make_case(
            n, d_in, d_out, t, r, mode, torch.float64, top_k=min(k, t) if mode == "soft" else None
        )
    )


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_without_base_weight_is_adapters_alone(mode):
    """weight=None: y = b + adapters; base computed elsewhere (4-bit layers, LoRA dropout)."""
    case = make_case(29, 33, 17, 3, 4, mode, torch.float64, top_k=2 if mode == "soft" else None)
    full = case.weight
    case.weight = None
    check_case(case)
    y = mftk_fn(case)
    case.weight = full
    base = torch.nn.functional.linear(case.x, full)
    torch.testing.assert_close(y + base, mftk_fn(case))
