"""AdapterSpec / QuantSpec (one spelling of every adapter setting, validated once) and routing as a
value (Hard | Soft | BaseOnly, one shared Routing per model, router logits in a typed collector)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import max_err, randomize_adapters, tiny_llama, tokens

import mftk
from mftk.core import adapter_layers
from mftk.ops.reference import multi_adapter_linear_ref
from mftk.routing import Routing

TASKS = ["code", "sql", "docs"]


def test_spec_validates_once_and_names_the_setting():
    bad = [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=True), TypeError, "rank"),
        (dict(rank="8"), TypeError, "rank"),
        (dict(rank={"code": 0}), ValueError, "rank"),
        (dict(alpha=-1), ValueError, "alpha"),
        (dict(alpha=True), ValueError, "alpha"),
        (dict(router="sigmoid"), ValueError, "router"),
        (dict(top_k=1), ValueError, "top_k: only meaningful"),
        (dict(router="softmax", top_k=True), ValueError, "top_k"),
        (dict(router="softmax", top_k=0), ValueError, "top_k"),
        (dict(temperature=0), ValueError, "temperature"),
        (dict(temperature=True), ValueError, "temperature"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(use_rslora="yes"), TypeError, "use_rslora"),
        (dict(quantize="nf4"), TypeError, "quantize"),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            mftk.AdapterSpec(**kw)
    spec = mftk.AdapterSpec(rank=[4, 2, 8], router="softmax", top_k=3)
    assert spec.ranks(TASKS) == [4, 2, 8] and spec.alphas([4, 2, 8]) == [4.0, 2.0, 8.0]
    with pytest.raises(ValueError, match=r"top_k: expected an int in \[1, num_tasks=2\]"):
        spec.check_tasks(2)
    with pytest.raises(ValueError, match="rank: 3 ranks for 2 tasks"):
        spec.ranks(["a", "b"])
    with pytest.raises(ValueError, match="missing"):
        mftk.AdapterSpec(rank={"code": 4}).ranks(TASKS)


def test_quant_spec_round_trips_and_checks():
    q = mftk.QuantSpec("nf4", compute_dtype="bf16", all_linear=True)
    assert q.compute_dtype is torch.bfloat16
    assert mftk.QuantSpec.from_dict(q.to_dict()) == q
    assert q.to_dict()["quantize_all_linear"] is True and q.to_dict()["compute_dtype"] == "bfloat16"
    for kw, exc, msg in [
        (dict(quant_type="int8"), ValueError, "quantize: expected one of"),
        (dict(quant_type="nf4", double_quant="yes"), TypeError, "double_quant"),
        (dict(quant_type="nf4", compute_dtype=torch.float64), ValueError, "compute_dtype"),
        (dict(quant_type="nf4", blocksize=100), ValueError, "blocksize"),
        (dict(quant_type="nf4", all_linear=1), TypeError, "quantize_all_linear"),
    ]:
        with pytest.raises(exc, match=msg):
            mftk.QuantSpec(**kw)


def test_patch_with_spec_equals_keywords_and_config_spec_round_trips():
    base = tiny_llama(torch.float64)
    kw = dict(rank={"code": 4, "sql": 2, "docs": 3}, alpha=6.0, use_rslora=True,
              router="softmax", top_k=2, temperature=0.5)  # fmt: skip
    torch.manual_seed(0)
    a = mftk.patch_model(copy.deepcopy(base), TASKS, **kw)
    torch.manual_seed(0)
    b = mftk.patch_model(copy.deepcopy(base), TASKS, spec=mftk.AdapterSpec(**kw))
    assert a.mftk_config == b.mftk_config
    sa, sb = mftk.adapter_state_dict(a), mftk.adapter_state_dict(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the checkpoint's config gives back a spec that patches the same way
    torch.manual_seed(0)
    c = mftk.patch_model(copy.deepcopy(base), TASKS, spec=a.mftk_config.spec())
    assert c.mftk_config == a.mftk_config
    with pytest.raises(ValueError, match=r"spec: given together with \['rank'\]"):
        mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, spec=mftk.AdapterSpec())
    with pytest.raises(TypeError, match="spec: expected an mftk.AdapterSpec"):
        mftk.patch_model(copy.deepcopy(base), TASKS, spec={"rank": 4})
    with pytest.raises(ValueError, match="top_k"):
        mftk.patch_model(
            copy.deepcopy(base), TASKS, spec=mftk.AdapterSpec(router="softmax", top_k=4)
        )


def test_layer_takes_a_route_value():
    torch.manual_seed(1)
    m = mftk.MultiAdapterLinear(12, 10, 3, rank=4, router="softmax", top_k=2, dtype=torch.float64)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    ids = torch.randint(-1, 3, (2, 5))
    args = (x.reshape(10, 12), m.weight, m.lora_a, m.lora_b, m.bias, m.lora_scaling)
    hard = multi_adapter_linear_ref(*args, task_ids=ids.reshape(10))[0].reshape(2, 5, 10)
    y = m(x, mftk.Hard(mftk.build_plan(ids, 3)))
    assert torch.allclose(y, hard, atol=1e-10), max_err(y, hard)
    assert torch.allclose(m(x, ids), hard, atol=1e-10)
    assert torch.equal(m(x, mftk.BaseOnly()), torch.nn.functional.linear(x, m.weight, m.bias))
    logits = mftk.RouterLogits()
    y = m(x, mftk.Soft(top_k=1, temperature=2.0, logits=logits))
    want, want_logits = multi_adapter_linear_ref(
        *args, router_weight=m.router_weight, router_bias=m.router_bias, top_k=1, temperature=2.0
    )
    want = want.reshape(2, 5, 10)
    assert torch.allclose(y, want, atol=1e-10), max_err(y, want)
    got = logits.pop()
    assert len(got) == 1 and got[0].shape == (10, 3) and len(logits) == 0
    assert torch.allclose(got[0], want_logits, atol=1e-10)
    plain = mftk.MultiAdapterLinear(12, 10, 3, rank=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="Soft routing needs a layer with router"):
        plain(x, mftk.Soft())


def test_one_shared_routing_per_model_and_ids_checked_once(monkeypatch):
    model = mftk.patch_model(tiny_llama(torch.float64), TASKS, rank=4)
    randomize_adapters(model)
    layers = [m for _, m in adapter_layers(model)]
    shared = layers[0].routing
    assert isinstance(shared, Routing) and all(m.routing is shared for m in layers)
    checks = []
    real = mftk.routing.check_task_ids
    monkeypatch.setattr(mftk.routing, "check_task_ids", lambda *a: checks.append(1) or real(*a))
    ids = tokens(2, 6)
    with mftk.use_tasks(model, torch.tensor([0, 2])) as state:
        model(ids)
        model(ids[:, :3])
        assert all(m.routing is shared for m in layers) and shared.state is state
    assert len(checks) == 1, f"{len(checks)} checks of the ids for one context"
    with pytest.raises(RuntimeError, match="use_tasks"):
        model(ids)  # the patched default is back


def test_router_logits_collector_per_context():
    model = mftk.patch_model(tiny_llama(torch.float64), TASKS, rank=4, router="softmax")
    ids = tokens(2, 6)
    with mftk.use_tasks(model, None, collect_router_logits=True) as state:
        model(ids)
        assert isinstance(state.logits, mftk.RouterLogits)
        n = len(adapter_layers(model))
        assert len(state.router_logits) == n  # a copy: reading does not clear
        got = state.pop_router_logits()
        assert len(got) == n and all(z.shape == (12, 3) for z in got)
        assert state.router_logits == []
    with mftk.use_tasks(model, None) as state:
        model(ids)
        assert state.router_logits is None
        with pytest.raises(RuntimeError, match="collect_router_logits"):
            state.pop_router_logits()
