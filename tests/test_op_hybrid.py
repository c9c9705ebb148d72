"""Hybrid routing in the op: a shared adapter on every routed token plus the token's own task's
adapter, hard and soft, on every backend, forward and every gradient, against the float64
formula (mftk.ops.reference: multi_adapter_linear_ref + shared_adapter_ref)."""

from __future__ import annotations

import pytest
import torch

import mftk
from mftk.ops.reference import multi_adapter_linear_ref, router_probs, shared_adapter_ref

BACKENDS = ["reference", "cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 here
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2}


def _case(n, d_in, d_out, t, r, rs, dtype, soft, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    c = dict(
        x=rnd(n, d_in), weight=rnd(d_out, d_in, scale=0.2), bias=rnd(d_out),
        lora_a=rnd(t, r, d_in, scale=0.3), lora_b=rnd(t, d_out, r, scale=0.3),
        shared_a=rnd(rs, d_in, scale=0.3), shared_b=rnd(d_out, rs, scale=0.3),
    )  # fmt: skip
    if soft:
        c["router_weight"], c["router_bias"] = rnd(t, d_in), rnd(t)
    ids = torch.randint(-1, t, (n,), generator=g)
    scaling = torch.rand(t, generator=g, dtype=torch.float64) + 0.5
    mask = (torch.rand(t, generator=g) > 0.3).to(torch.float64)
    return c, ids, scaling, mask


def _want(c, ids, scaling, mask, soft, top_k):
    kw = dict(bias=c["bias"], scaling=scaling)
    if soft:
        y, _ = multi_adapter_linear_ref(
            c["x"], c["weight"], c["lora_a"], c["lora_b"], router_weight=c["router_weight"],
            router_bias=c["router_bias"], top_k=top_k, **kw,
        )  # fmt: skip
        p, _ = router_probs(c["x"], c["router_weight"], c["router_bias"], top_k)
        return y + shared_adapter_ref(
            c["x"], c["shared_a"], c["shared_b"], 0.75, shared_tasks=mask, probs=p
        )
    y, _ = multi_adapter_linear_ref(
        c["x"], c["weight"], c["lora_a"], c["lora_b"], task_ids=ids, **kw
    )
    return y + shared_adapter_ref(c["x"], c["shared_a"], c["shared_b"], 0.75, ids, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft,top_k", [(False, None), (True, None), (True, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 341])
def test_hybrid_matches_reference_with_gradients(backend, soft, top_k, dtype, n):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels take fp32/bf16/fp16")
    c, ids, scaling, mask = _case(n, 24, 20, 3, 4, 8, dtype, soft, seed=n)
    want = _want(c, ids, scaling, mask, soft, top_k)
    cast = {k: v.detach().to(dtype).requires_grad_() for k, v in c.items()}
    route = dict(router_weight=cast["router_weight"], router_bias=cast["router_bias"],
                 top_k=top_k) if soft else dict(task_ids=ids)  # fmt: skip
    y = mftk.multi_adapter_linear(
        cast["x"], cast["weight"], cast["lora_a"], cast["lora_b"], bias=cast["bias"],
        scaling=scaling, shared_a=cast["shared_a"], shared_b=cast["shared_b"],
        shared_scaling=0.75, shared_tasks=mask, backend=backend, **route,
    )  # fmt: skip
    tol = TOL[dtype] * max(1.0, float(want.detach().abs().max()))
    assert (y.double() - want).abs().max() <= tol
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want.backward(dy)
    y.backward(dy.to(dtype))
    for k in ("x", "lora_a", "lora_b", "shared_a", "shared_b", "bias") + (
        ("router_weight", "router_bias") if soft else ()
    ):
        g_want, g = c[k].grad, cast[k].grad
        gtol = TOL[dtype] * 4 * max(1.0, float(g_want.abs().max()))
        assert g is not None and (g.double() - g_want).abs().max() <= gtol, k


def test_hybrid_edge_cases():
    c, _, scaling, _ = _case(5, 16, 12, 3, 4, 4, torch.float64, False, seed=3)
    args = (c["x"], c["weight"], c["lora_a"], c["lora_b"])
    sh = dict(shared_a=c["shared_a"], shared_b=c["shared_b"], shared_scaling=2.0)
    # all ids -1: the shared adapter is off with the task adapters
    ids = torch.full((5,), -1)
    base = torch.nn.functional.linear(c["x"], c["weight"])
    assert torch.allclose(mftk.multi_adapter_linear(*args, task_ids=ids, **sh), base)
    # an empty batch
    y = mftk.multi_adapter_linear(c["x"][:0], *args[1:], task_ids=ids[:0], **sh)
    assert y.shape == (0, 12)
    with pytest.raises(ValueError, match="shared_a and shared_b: give both"):
        mftk.multi_adapter_linear(*args, task_ids=ids, shared_a=c["shared_a"])
    with pytest.raises(ValueError, match=r"shared_b: expected shape \(D_out, R_s\)"):
        mftk.multi_adapter_linear(*args, task_ids=ids, shared_a=c["shared_a"],
                                  shared_b=c["shared_b"][:, :2])  # fmt: skip
    with pytest.raises(ValueError, match="shared_a: expected torch.float64 on cpu like lora_a"):
        mftk.multi_adapter_linear(*args, task_ids=ids, shared_a=c["shared_a"].float(),
                                  shared_b=c["shared_b"])  # fmt: skip
    # a task of scale 0 keeps its shared part
    ids = torch.tensor([0, 1, 2, -1, 0])
    y = mftk.multi_adapter_linear(*args, task_ids=ids, scaling=0.0, **sh)
    want = base + shared_adapter_ref(c["x"], c["shared_a"], c["shared_b"], 2.0, ids)
    assert torch.allclose(y, want, atol=1e-10)
    with pytest.raises(ValueError, match=r"shared_tasks: expected shape \(T,\)"):
        mftk.multi_adapter_linear(*args, task_ids=ids, shared_tasks=torch.ones(2), **sh)
