"""MultiAdapterLinear: init, forward and every gradient vs the float64 reference, dropout,
scaling, errors, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_models import max_err
from torch import nn

import mftk
from mftk.ops.reference import multi_adapter_linear_ref

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def _layer(d_in=37, d_out=29, t=3, r=5, dtype=torch.float64, **kw) -> mftk.MultiAdapterLinear:
    m = mftk.MultiAdapterLinear(d_in, d_out, t, r, dtype=dtype, **kw)
    with torch.no_grad():  # random adapters: B = 0 would hide every adapter bug
        m.lora_b.normal_(std=0.3)
        if m.router_weight is not None:
            m.router_weight.normal_()
            m.router_bias.normal_()
    return m


def _ref(m: mftk.MultiAdapterLinear, x, ids=None, soft=False):
    """Float64 oracle on m's own parameters (x (..., D_in)) -> (y, logits)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y, logits = multi_adapter_linear_ref(
        x.double().reshape(-1, m.in_features), d(m.weight), d(m.lora_a), d(m.lora_b), d(m.bias),
        m.lora_scaling, None if ids is None else ids.reshape(-1),
        d(m.router_weight) if soft else None, d(m.router_bias) if soft else None, m.top_k,
        m.temperature,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], m.out_features), logits


def test_init_equals_base_and_follows_peft():
    lin = nn.Linear(40, 24, bias=True)
    m = mftk.MultiAdapterLinear.from_linear(lin, num_tasks=4, rank=6)
    assert m.weight is lin.weight and m.bias is lin.bias  # shared, not copied
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert torch.count_nonzero(m.lora_b) == 0
    bound = 1 / math.sqrt(40)  # Kaiming-uniform a=sqrt(5): bound = 1/sqrt(fan_in), fan_in = D_in
    assert float(m.lora_a.detach().abs().max()) <= bound
    assert float(m.lora_a.detach().abs().max()) > 0.8 * bound
    assert not torch.equal(m.lora_a[0], m.lora_a[1])  # each task drawn independently
    x = torch.randn(3, 7, 40)
    ids = torch.tensor([[0, 1, 2, 3, -1, 0, 1]] * 3)
    assert torch.equal(m(x, task_ids=ids), lin(x)), "B = 0 must give the base output exactly"


@pytest.mark.parametrize("rank", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_hard_forward_and_grads_vs_reference(rank, bias):
    m = _layer(r=rank, bias=bias)
    x = torch.randn(2, 9, 37, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 3, (2, 9))
    ids[0, :] = 1  # a task with many tokens next to an unsorted mix; task ids -1 included
    y = m(x, task_ids=ids)
    y_ref, _ = _ref(m, x, ids)
    assert torch.allclose(y, y_ref, atol=1e-10, rtol=1e-10), max_err(y, y_ref)
    g = torch.randn_like(y)
    leaves = [x, m.lora_a, m.lora_b]
    got = torch.autograd.grad(y, leaves, g, retain_graph=True)
    want = torch.autograd.grad(y_ref, leaves, g)
    for name, a, b in zip(("x", "lora_a", "lora_b"), got, want):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), f"grad {name}: {max_err(a, b)}"
    (y * g).sum().backward()
    assert m.weight.grad is None and (m.bias is None or m.bias.grad is None), (
        "base must stay frozen"
    )


@pytest.mark.parametrize("top_k", [None, 2])
def test_soft_forward_grads_and_logits_vs_reference(top_k):
    m = _layer(t=4, router="softmax", top_k=top_k, temperature=0.7)
    x = torch.randn(11, 37, dtype=torch.float64, requires_grad=True)
    with mftk.use_tasks(m, None, collect_router_logits=True) as ctx:
        y = m(x)
    (logits,) = ctx.pop_router_logits()
    y_ref, l_ref = _ref(m, x, soft=True)
    assert torch.allclose(y, y_ref, atol=1e-10, rtol=1e-10), max_err(y, y_ref)
    assert logits.shape == (11, 4) and torch.allclose(logits, l_ref, atol=1e-10), max_err(
        logits, l_ref
    )
    g, gl = torch.randn_like(y), torch.randn_like(logits)
    leaves = [x, m.lora_a, m.lora_b, m.router_weight, m.router_bias]
    got = torch.autograd.grad((y * g).sum() + (logits * gl).sum(), leaves)
    want = torch.autograd.grad((y_ref * g).sum() + (l_ref * gl).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), f"grad {i}: {max_err(a, b)}"
    assert m(x).shape == (11, 29), "a router layer routes softly outside any context"


def test_bf16_forward_close_to_reference():
    m = _layer(dtype=torch.bfloat16)
    x = torch.randn(4, 6, 37, dtype=torch.bfloat16)
    ids = torch.randint(-1, 3, (4, 6))
    y = m(x, task_ids=ids)
    assert y.dtype == torch.bfloat16
    y_ref, _ = _ref(m, x, ids)
    assert torch.allclose(y.double(), y_ref, atol=5e-2, rtol=3e-2), max_err(y, y_ref)


def test_scaling_alpha_rslora_and_dtype_cast():
    m = mftk.MultiAdapterLinear(8, 8, 2, rank=4, alpha=12)
    assert torch.all(m.lora_scaling == 3.0)
    m = mftk.MultiAdapterLinear(8, 8, 2, rank=4, alpha=12, use_rslora=True)
    assert torch.all(m.lora_scaling == 6.0)
    m = mftk.MultiAdapterLinear(8, 8, 2, rank=3, alpha=1).to(torch.bfloat16)
    assert m.lora_a.dtype == torch.bfloat16
    assert m.lora_scaling.dtype == torch.float64 and float(m.lora_scaling[0]) == 1 / 3
    assert mftk.MultiAdapterLinear(8, 8, 2, rank=4).lora_scaling[0] == 1.0  # alpha defaults to rank
    assert "rank=4" in repr(m) or "rank=3" in repr(m)
    r = repr(mftk.MultiAdapterLinear(8, 6, 2, 4, router="softmax", top_k=1, dropout=0.1))
    for s in (
        "in_features=8",
        "out_features=6",
        "num_tasks=2",
        "router='softmax'",
        "top_k=1",
        "dropout=0.1",
    ):
        assert s in r, r


def test_dropout_is_exact_lora_dropout():
    m = _layer(dropout=0.3).train()
    x = torch.randn(3, 5, 37, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 3, (3, 5))
    torch.manual_seed(7)
    y = m(x, task_ids=ids)
    torch.manual_seed(7)
    xd = nn.functional.dropout(x, p=0.3, training=True)  # the same mask
    base = nn.functional.linear(x, m.weight, m.bias)
    lora_only, _ = _ref(m, xd, ids)
    y_ref = base + lora_only - nn.functional.linear(xd, m.weight, m.bias)
    assert torch.allclose(y, y_ref, atol=1e-10), max_err(y, y_ref)
    g = torch.randn_like(y)
    leaves = [x, m.lora_a, m.lora_b]
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        assert torch.allclose(a, b, atol=1e-10), max_err(a, b)
    m.eval()  # no dropout at inference: the fused path
    y_eval, y_eval_ref = m(x, task_ids=ids), _ref(m, x, ids)[0]
    assert torch.allclose(y_eval, y_eval_ref, atol=1e-10), max_err(y_eval, y_eval_ref)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="rank"):
        mftk.MultiAdapterLinear(8, 8, 2, rank=0)
    with pytest.raises(ValueError, match="num_tasks"):
        mftk.MultiAdapterLinear(8, 8, 0, rank=2)
    with pytest.raises(ValueError, match="router"):
        mftk.MultiAdapterLinear(8, 8, 2, rank=2, router="sigmoid")
    with pytest.raises(ValueError, match="top_k"):
        mftk.MultiAdapterLinear(8, 8, 2, rank=2, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        mftk.MultiAdapterLinear(8, 8, 2, rank=2, router="softmax", top_k=3)
    with pytest.raises(ValueError, match="dropout"):
        mftk.MultiAdapterLinear(8, 8, 2, rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        mftk.MultiAdapterLinear(8, 8, 2, rank=2, alpha=-1)
    with pytest.raises(TypeError, match="linear"):
        mftk.MultiAdapterLinear.from_linear(nn.Conv1d(2, 2, 1), 2, 2)
    m = mftk.MultiAdapterLinear(8, 8, 2, rank=2)
    with pytest.raises(RuntimeError, match="use_tasks"):
        m(torch.randn(3, 8))
    with pytest.raises(ValueError, match="task_ids"):
        m(torch.randn(3, 8), task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="task_ids"):
        m(torch.randn(3, 8), task_ids=torch.tensor([0, 1]))


def test_compile_fullgraph_layer():
    torch._dynamo.reset()
    m = _layer(dtype=torch.float32)
    x = torch.randn(2, 5, 37)
    ids = torch.randint(-1, 3, (2, 5))
    eager = m(x, task_ids=ids)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, task_ids=ids), eager, atol=1e-5)
    # routing from the context: the plan is built inside the graph, still no graph break
    from torch._dynamo.utils import counters

    with mftk.use_tasks(m, ids):
        y = compiled(x)
    assert torch.allclose(y, eager, atol=1e-5), max_err(y, eager)
    graphs = counters["stats"]["unique_graphs"]
    ids2 = torch.randint(-1, 3, (2, 5))
    with mftk.use_tasks(m, ids2):  # a new context with new ids: no recompile
        y2 = compiled(x)
    assert counters["stats"]["unique_graphs"] == graphs
    want = m(x, task_ids=ids2)
    assert torch.allclose(y2, want, atol=1e-5), max_err(y2, want)
