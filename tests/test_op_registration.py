"""torch.library integration: opcheck on every mftk:: CPU op, and torch.compile(fullgraph=True)."""

import pytest
import torch
from op_cases import make_case

import mftk


def _scaling(t, dtype):
    return (torch.rand(t) + 0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_hard(dtype):
    c = make_case(21, 16, 12, 3, 4, "hard", dtype)
    plan = mftk.build_plan(c.task_ids, 3)
    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, _scaling(3, dtype), plan.perm, plan.offsets)
    torch.library.opcheck(torch.ops.mftk.hard_fwd.default, args)
    y, shrink = torch.ops.mftk.hard_fwd(*args)
    bargs = (
        torch.randn_like(y),
        c.x,
        c.weight,
        c.lora_a,
        c.lora_b,
        args[5],
        plan.perm,
        plan.offsets,
        shrink,
    )
    torch.library.opcheck(torch.ops.mftk.hard_bwd.default, tuple(t.detach() for t in bargs))


@pytest.mark.parametrize("top_k", [0, 2])
def test_opcheck_soft(top_k):
    c = make_case(21, 16, 12, 3, 4, "soft", torch.float64)
    s = _scaling(3, torch.float64)
    args = (
        c.x,
        c.weight,
        c.bias,
        c.lora_a,
        c.lora_b,
        s,
        c.router_weight,
        c.router_bias,
        0.7,
        top_k,
    )
    torch.library.opcheck(torch.ops.mftk.soft_fwd.default, args)
    y, logits, probs, shrink = torch.ops.mftk.soft_fwd(*args)
    d = [t.detach() for t in (c.x, c.weight, c.lora_a, c.lora_b)]
    bargs = (
        torch.randn_like(y),
        torch.randn_like(logits),
        *d,
        s,
        c.router_weight.detach(),
        probs.detach(),
        shrink.detach(),
        0.7,
    )
    torch.library.opcheck(torch.ops.mftk.soft_bwd.default, bargs)


def test_opcheck_build_plan():
    torch.library.opcheck(torch.ops.mftk.build_plan.default, (torch.randint(-1, 4, (33,)), 4))


def test_compile_fullgraph_matches_eager():
    c = make_case(40, 16, 16, 3, 4, "hard", torch.float32)
    s = make_case(40, 16, 16, 3, 4, "soft", torch.float32, top_k=2)

    def f(x, w, b, a, bb, ids, rw, rb):
        plan = mftk.build_plan(ids, 3)
        y1 = mftk.multi_adapter_linear(
            x, w, a, bb, bias=b, scaling=0.5, task_ids=plan, backend="cpu"
        )
        y2 = mftk.multi_adapter_linear(
            y1, w, a, bb, scaling=0.5, router_weight=rw, router_bias=rb, top_k=2, backend="cpu"
        )
        return y2.square().mean()

    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.task_ids, s.router_weight, s.router_bias)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [c.x, c.lora_a, c.lora_b, s.router_weight]
    out_c = compiled(*args)
    g_c = torch.autograd.grad(out_c, leaves)
    out_e = f(*args)
    g_e = torch.autograd.grad(out_e, leaves)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
