"""The segment router (mftk.segment_router): one task per packed sample from its prompt's mean
hidden state, routed Hard by its top-1 through the model's Routing (mode "deferred")."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import max_err, randomize_adapters, tiny_llama, tokens

import mftk
from mftk.core import adapter_layers, layer_of
from mftk.route import BaseOnly, Hard
from mftk.segment_router import (
    SegmentRouter,
    add_segment_router,
    prompt_mask,
    route_segments,
    segment_index,
    use_segment_router,
)

TASKS = ["code", "sql", "docs"]
IGN = -100


def _model(dtype=torch.float64, layer=-1, seed=3, query=False):
    model = mftk.patch_model(tiny_llama(dtype), TASKS, rank=4, alpha=8)
    randomize_adapters(model)
    router = add_segment_router(model, layer)
    torch.manual_seed(seed)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
        router.bias.normal_(0, 0.1)
        if query:  # a learned attention pooling (zero: the plain mean)
            router.query.normal_(0, 1.0)
    return model


def _pool(router, h):
    """(n, H) prompt hidden states -> (1, H): softmax(rms_norm(h) . query) weighted, by hand."""
    h = h.double()
    normed = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    w = torch.softmax(normed @ router.query.double(), 0)
    return (w[:, None] * h).sum(0, keepdim=True)


def _packed():
    # row 0: samples 0 (5 tokens, prompt 3) and 1 (3 tokens, no answer); row 1: one sample of 6
    # tokens (prompt 2), then 2 pads
    seq = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1]])
    tgt = torch.full((2, 8), IGN)
    tgt[0, 2:4] = 7  # predicts tokens 3, 4: the prompt is tokens 0..2
    tgt[1, 1:5] = 7  # prompt tokens 0..1
    return seq, tgt


def test_prompt_mask_and_segment_index():
    seq, tgt = _packed()
    want = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0]]).bool()
    assert torch.equal(prompt_mask(tgt, seq), want)
    seg, m = segment_index(seq)
    assert m == 3
    assert seg.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2, -1, -1]]


def _expected_ids(model, x, seq, prompt, layer):
    """The top-1 per sample of the router on the pooled prompts, computed by hand."""
    hid = model(input_ids=x, output_hidden_states=True).hidden_states[layer + 1]
    seg, m = segment_index(seq)
    router = model.mftk_segment_router
    ids = torch.full_like(seq, -1)
    for k in range(m):
        sel = (seg == k) & prompt
        ids[seg == k] = int(router(_pool(router, hid[sel])).argmax(-1))
    return ids


@pytest.mark.parametrize("query", [False, True], ids=["mean", "attention"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_routes_hard_by_its_top1(layer, query):
    """Equals hard routing by the router's predicted ids (float64), with the patched layers up
    to the read point on the base alone (their lora_b zeroed in the reference copy)."""
    model = _model(layer=layer, query=query)
    x = tokens(2, 8)
    seq, tgt = _packed()
    prompt = prompt_mask(tgt, seq)
    with mftk.use_tasks(model, None):  # base only up to the read point: any layer <= it
        want_ids = _expected_ids(model, x, seq, prompt, layer)
    with use_segment_router(model, seq, prompt) as seg:
        got = model(input_ids=x).logits
    assert torch.equal(seg.task_ids, want_ids)
    assert seg.logits.shape == (3, len(TASKS)) and seg.token_logits.shape == (2, 8, len(TASKS))
    ref = copy.deepcopy(model)
    for name, m in adapter_layers(ref):
        where = layer_of(name)
        if where is not None and where[1] <= layer:
            m.lora_b.data.zero_()
    with mftk.use_tasks(ref, want_ids):
        want = ref(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-10), max_err(got, want)
    # the Routing is back as it was: outside any context a patched model raises
    with pytest.raises(RuntimeError, match="use_tasks"):
        model(input_ids=x)


def test_warm_start_routes_by_true_ids():
    model = _model()
    x = tokens(2, 8)
    seq, tgt = _packed()
    true = torch.tensor([[2, 2, 2, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, -1, -1]])
    with use_segment_router(model, seq, prompt_mask(tgt, seq), true_ids=true) as seg:
        got = model(input_ids=x).logits
    assert torch.equal(seg.task_ids, true) and seg.logits.shape == (3, len(TASKS))
    with mftk.use_tasks(model, true):
        want = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-10), max_err(got, want)


def test_supervision_trains_it():
    """Prompts of task t draw from their own 4 tokens of the vocabulary: cross-entropy on the
    segment logits takes the router from chance to > 90% in a short run."""
    torch.manual_seed(0)
    model = _model(torch.float32)
    router = model.mftk_segment_router
    with torch.no_grad():
        router.weight.zero_()
        router.bias.zero_()
    opt = torch.optim.Adam(router.parameters(), lr=0.05)

    def batch():
        task = torch.randint(0, 3, (4, 2))
        x = 3 + torch.randint(0, 4, (4, 12)) + 4 * task.repeat_interleave(6, 1)
        seq = torch.arange(2).repeat_interleave(6).expand(4, 12)
        tgt = torch.full((4, 12), IGN)
        tgt[:, 3:5] = 1
        tgt[:, 9:11] = 1
        return x, seq, tgt, task.reshape(-1)

    def accuracy(n=5):
        hits = total = 0
        with torch.no_grad():
            for _ in range(n):
                x, seq, tgt, task = batch()
                with use_segment_router(model, seq, prompt_mask(tgt, seq)) as seg:
                    model(input_ids=x)
                hits += int((seg.logits.argmax(-1) == task).sum())
                total += task.numel()
        return hits / total

    before = accuracy()
    for _ in range(40):
        x, seq, tgt, task = batch()
        with use_segment_router(model, seq, prompt_mask(tgt, seq)) as seg:
            model(input_ids=x)
        loss = torch.nn.functional.cross_entropy(seg.logits, task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert before < 0.6 and after > 0.9, (before, after)


def test_bad_layer():
    model = mftk.patch_model(tiny_llama(), TASKS, rank=4)
    with pytest.raises(ValueError, match="layer"):
        add_segment_router(model, 2)


def test_saved_and_loaded_with_the_adapters(tmp_path):
    model = _model(torch.float32, layer=0)
    mftk.save_adapters(model, tmp_path)
    fresh = mftk.from_pretrained(tiny_llama(), tmp_path)
    got, want = fresh.mftk_segment_router, model.mftk_segment_router
    assert got.layer == 0 and fresh.mftk_config.segment_router == 0
    assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)
    other = mftk.patch_model(tiny_llama(), TASKS, rank=4, alpha=8)
    add_segment_router(other, -1)
    with pytest.raises(ValueError, match="segment_router=0 differs"):
        mftk.load_adapters(other, tmp_path)


def test_pooling_starts_as_the_mean_and_learns_to_attend():
    """Zero query: the plain mean of the prompt's states, and the query gets a gradient. A query
    along one token's normalised state pools (nearly) that token alone."""
    torch.manual_seed(0)
    router = SegmentRouter(16, 3, -1).double()
    with torch.no_grad():
        router.weight.normal_()
    h = torch.randn(1, 6, 16, dtype=torch.float64)
    seg, prompt = torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool)
    prompt[0, 5] = False  # an answer token: never pooled
    logits, _ = route_segments(router, h, seg, 1, prompt)
    assert torch.allclose(logits, router(h[0, :5].mean(0, keepdim=True)), atol=1e-12)
    logits[0, 1].backward()  # the query learns from the start
    assert router.query.grad is not None and router.query.grad.abs().sum() > 0
    pick = h[0, 2] / h[0, 2].pow(2).mean().sqrt()
    with torch.no_grad():
        router.query.copy_(pick * 50)
    logits, _ = route_segments(router, h, seg, 1, prompt)
    assert torch.allclose(logits, router(h[0, 2:3]), atol=1e-6)


def test_a_router_saved_before_its_query_loads_as_the_mean(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(torch.float32, query=True)
    mftk.save_adapters(model, tmp_path)
    path = tmp_path / "mftk_adapters.safetensors"
    state = load_file(path)
    del state["segment_router.query"]
    save_file(state, path)
    fresh = mftk.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(fresh.mftk_segment_router.query, torch.zeros(64))
    assert torch.equal(fresh.mftk_segment_router.weight, model.mftk_segment_router.weight)


def test_straight_through_gate_changes_no_value_and_carries_the_adapters_gradient():
    """Hard(plan, gate): the output is the gate-free output bit for bit; d out / d gate is the
    adapters' own output (y = base + gate * adapters in the backward)."""
    torch.manual_seed(0)
    layer = mftk.MultiAdapterLinear(16, 12, 3, rank=4, alpha=8, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ids = torch.randint(-1, 3, (2, 5))
    gate = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x, Hard(ids, gate))
    assert torch.equal(out, layer(x, ids))
    v = torch.randn_like(out)
    (out * v).sum().backward()
    delta = layer(x, ids) - layer(x, BaseOnly())
    assert torch.allclose(gate.grad, (delta * v).sum(-1), atol=1e-12)


def test_straight_through_trains_the_router_from_the_loss():
    model = _model()
    x = tokens(2, 8)
    seq, tgt = _packed()
    prompt = prompt_mask(tgt, seq)
    router = model.mftk_segment_router
    outs = {}
    for st in (False, True):
        router.zero_grad()
        with use_segment_router(model, seq, prompt, straight_through=st):
            outs[st] = model(input_ids=x).logits
        outs[st].pow(2).mean().backward()
        assert (router.weight.grad is not None and router.weight.grad.abs().sum() > 0) == st
    assert torch.equal(outs[False], outs[True])
