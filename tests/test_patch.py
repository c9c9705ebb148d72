"""patch_model on tiny Llama / Qwen2: exactness at init, per-task and per-token routing vs float64
references, gradients, router logits, task names, merge/unmerge, mftk checkpoints, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import (
    max_err,
    merged_copy,
    randomize_adapters,
    reference_model,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    tokens,
)
from torch import nn

import mftk

TASKS = ["code", "sql", "docs"]
BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request):
    return request.param


def _patched(arch="llama", dtype=torch.float64, **kw):
    base = BUILDERS[arch](dtype)
    model = mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, alpha=8, **kw)
    return base, model


def _logits(model, ids, task_ids):
    with mftk.use_tasks(model, task_ids):
        return model(ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_patch_equals_base_exactly(arch, dtype):
    base, model = _patched(arch, dtype)
    ids = tokens(3, 10)
    want = base(ids).logits
    assert torch.equal(_logits(model, ids, ["code", "sql", -1]), want)
    assert torch.equal(_logits(model, ids, torch.randint(-1, 3, (3, 10))), want)
    with mftk.use_tasks(model, None):  # opt-in base only
        assert torch.equal(model(ids).logits, want)


def test_patch_targets_and_freezing(arch):
    base, model = _patched(arch)
    layers = dict(mftk.patch.adapter_layers(model))
    n_lin = sum(isinstance(m, nn.Linear) for m in base.modules()) - 1  # all but lm_head
    assert len(layers) == n_lin and "lm_head" not in layers
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(
        model.lm_head, mftk.MultiAdapterLinear
    )
    assert model.mftk_config.tasks == TASKS and model.mftk_config.target_modules == list(layers)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in mftk.adapter_parameters(model)}
    sd = mftk.adapter_state_dict(model)
    assert set(sd) == {
        f"{n}.{k}" for n in layers for k in ("lora_a", "lora_b", "lora_scaling", "lora_rank")
    }
    assert sd["model.layers.0.self_attn.q_proj.lora_a"].shape == (3, 4, model.config.hidden_size)


def test_per_sequence_tasks_equal_per_task_merged_copies(arch):
    base, model = _patched(arch)
    randomize_adapters(model)
    ids = tokens(4, 9)
    got = _logits(model, ids, ["docs", "code", "__base__", 1])
    for row, t in enumerate([2, 0, -1, 1]):
        ref = base if t < 0 else merged_copy(base, model, t)
        want = ref(ids[row : row + 1]).logits[0]
        assert torch.allclose(got[row], want, atol=1e-9, rtol=1e-9), (
            f"row {row}: {max_err(got[row], want)}"
        )
    assert not torch.allclose(got[0], got[1], atol=1e-3), "tasks must differ"


def test_per_token_tasks_and_gradients_vs_reference(arch):
    _, model = _patched(arch)
    randomize_adapters(model)
    ref, holder = reference_model(model)
    ids = tokens(3, 8)
    task_ids = torch.randint(-1, 3, (3, 8))
    out = _logits(model, ids, task_ids)
    holder["ids"] = task_ids
    want = ref(ids).logits
    assert torch.allclose(out, want, atol=1e-9, rtol=1e-9), max_err(out, want)
    g = torch.randn_like(out)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(out, [model.get_parameter(n) for n in names], g)
    exp = torch.autograd.grad(
        want, [ref.get_parameter(n.replace("_proj.", "_proj.m.")) for n in names], g
    )
    for n, a, b in zip(names, got, exp):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), f"grad {n}: {max_err(a, b)}"
    loss = (_logits(model, ids, task_ids) * g).sum()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


def test_router_mode_logits_and_grads_vs_reference():
    _, model = _patched("llama", router="softmax", top_k=2)
    randomize_adapters(model)
    ref, holder = reference_model(model)
    ids = tokens(2, 7)
    n_layers = len(mftk.patch.adapter_layers(model))
    with mftk.use_tasks(model, None, collect_router_logits=True) as ctx:
        out = model(ids).logits
    logits = ctx.pop_router_logits()
    assert len(logits) == n_layers and all(lg.shape == (14, 3) for lg in logits)
    holder["logits"] = []
    want = ref(ids).logits
    assert torch.allclose(out, want, atol=1e-9, rtol=1e-9), max_err(out, want)
    for a, b in zip(logits, holder["logits"]):
        assert torch.allclose(a, b, atol=1e-9), max_err(a, b)
    # a load-balance-style loss on every layer's logits reaches every router
    loss = out.square().mean() + sum(lg.softmax(-1).mean(0).square().sum() for lg in logits)
    loss.backward()
    for _, m in mftk.patch.adapter_layers(model):
        assert m.router_weight.grad is not None and m.router_weight.grad.abs().sum() > 0
    assert torch.allclose(model(ids).logits, out), "router models need no context"
    # explicit ids override the router (hard routing), and collect nothing
    with mftk.use_tasks(model, ["sql", "code"], collect_router_logits=True) as ctx:
        hard = model(ids).logits
    holder["ids"] = torch.tensor([1, 0])
    assert torch.allclose(hard, ref(ids).logits, atol=1e-9) and ctx.router_logits == []


def test_task_names_ids_and_errors():
    _, model = _patched("llama")
    ids = tokens(2, 5)
    assert mftk.task_index(model, "sql") == 1 and mftk.task_index(model, 2) == 2
    assert mftk.task_index(model, None) == -1 and mftk.task_names(model) == TASKS
    with pytest.raises(RuntimeError, match="use_tasks"):
        model(ids)
    bad = [
        (["code", "nope"], ValueError, "unknown task 'nope'"),
        (torch.tensor([0, 3]), ValueError, "task id 3 out of range"),
        (torch.tensor([0, -2]), ValueError, "task id -2 out of range"),
        ([0, 7], ValueError, "index 7 out of range"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        ([[0, 1], [2]], ValueError, "rectangular"),
        (torch.zeros(2, 5, 1, dtype=torch.long), ValueError, r"\(B,\) or \(B, S\)"),
        (1.5, TypeError, "task_ids"),
    ]
    for task_ids, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            with mftk.use_tasks(model, task_ids):
                pass
    with pytest.raises(ValueError, match="per-token ids of shape"):
        with mftk.use_tasks(model, torch.zeros(2, 4, dtype=torch.long)):
            model(ids)
    with pytest.raises(ValueError, match="per-sequence ids"):
        with mftk.use_tasks(model, [0, 1, 2]):
            model(ids)
    mftk.set_default_tasks(model, "sql")
    assert torch.equal(model(ids).logits, _logits(model, ids, ["sql", "sql"]))
    mftk.clear_default_tasks(model)
    with pytest.raises(RuntimeError, match="use_tasks"):
        model(ids)


def test_target_module_lists_and_errors():
    base = tiny_llama()
    model = mftk.patch_model(
        copy.deepcopy(base), ["a"], rank=2, target_modules=["v_proj", "q_proj"]
    )
    assert [n.rsplit(".", 1)[1] for n in model.mftk_config.target_modules] == [
        "q_proj",
        "v_proj",
    ] * 2  # model order
    with pytest.raises(ValueError, match="already patched"):
        mftk.patch_model(model, ["a"])
    for tm, msg in [
        (["lm_head"], "never patched"),
        (["nope_proj"], "'nope_proj' matches no module"),
        (["mlp"], "module 'model.layers.0.mlp' is a LlamaMLP, not an nn.Linear"),
    ]:
        with pytest.raises(ValueError, match=msg):
            mftk.patch_model(copy.deepcopy(base), ["a"], target_modules=tm)
    for tasks, msg in [([], "non-empty"), (["a", "a"], "duplicate"), (["__base__"], "other than")]:
        with pytest.raises(ValueError, match=msg):
            mftk.patch_model(copy.deepcopy(base), tasks)
    with pytest.raises(ValueError, match="Conv1D"):
        mftk.patch_model(tiny_gpt2(), ["a"])
    with pytest.raises(ValueError, match="Conv1D"):
        mftk.patch_model(tiny_gpt2(), ["a"], target_modules=["c_attn"])


def test_merge_then_unmerge_is_exact():
    base, model = _patched("qwen2")
    randomize_adapters(model)
    ids = tokens(2, 6)
    before = _logits(model, ids, ["sql", "sql"])
    params_before = {n: p for n, p in model.named_parameters()}
    merged = mftk.merge(model, "sql")
    assert not any(isinstance(m, mftk.MultiAdapterLinear) for m in merged.modules())
    out = merged(ids).logits  # a plain model: no context needed
    assert torch.allclose(out, before, atol=1e-9, rtol=1e-9), max_err(out, before)
    want = merged_copy(base, mftk.unmerge(merged), 1)(ids).logits
    assert torch.allclose(out, want, atol=1e-12), max_err(out, want)
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert torch.equal(_logits(model, ids, ["sql", "sql"]), before)
    with pytest.raises(ValueError, match="not merged"):
        mftk.unmerge(model)
    mftk.merge(model, -1, keep_original=False)  # base only, originals dropped
    assert torch.equal(model(ids).logits, base(ids).logits)
    with pytest.raises(ValueError, match="keep_original=False"):
        mftk.unmerge(model)
    _, model = _patched("qwen2")
    with pytest.raises(ValueError, match="unknown task"):
        mftk.merge(model, "nope")


def test_save_load_adapters_round_trip(tmp_path):
    base, model = _patched("llama", router="softmax")
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_scaling[1] = 0.37  # per-task scaling survives
    mftk.save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mftk_adapters.safetensors",
        "mftk_config.json",
    ]
    loaded = mftk.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens(2, 6)
    for t in (["code", "docs"], None):
        assert torch.equal(_logits(loaded, ids, t), _logits(model, ids, t))
    for k, v in mftk.adapter_state_dict(model).items():
        assert torch.equal(v, mftk.adapter_state_dict(loaded)[k]), k
    other = mftk.patch_model(copy.deepcopy(base), ["code", "sql"], rank=4)
    with pytest.raises(ValueError, match="tasks"):
        mftk.load_adapters(other, tmp_path)
    other = mftk.patch_model(copy.deepcopy(base), TASKS, rank=8, router="softmax")
    with pytest.raises(ValueError, match="rank"):
        mftk.load_adapters(other, tmp_path)


def test_compiled_patched_model_has_no_graph_break():
    torch._dynamo.reset()
    _, model = _patched("llama", torch.float32)
    randomize_adapters(model)
    ids = tokens(2, 5)
    task_ids = torch.tensor([0, 2])
    eager = _logits(model, ids, task_ids)
    # fullgraph: the whole patched tiny Llama, routing context included, is one graph
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with mftk.use_tasks(compiled, task_ids):
        out = compiled(ids).logits
    assert torch.allclose(out, eager, atol=1e-5), max_err(out, eager)


def test_plan_built_once_per_forward_shape(monkeypatch):
    _, model = _patched("llama", torch.float32)
    calls = []
    real = mftk.routing.plan_checked
    monkeypatch.setattr(mftk.routing, "plan_checked", lambda *a: calls.append(1) or real(*a))
    ids = tokens(2, 5)
    with mftk.use_tasks(model, ["code", "docs"]):
        model(ids)
        assert len(calls) == 1, f"{len(calls)} plans for one forward of 14 layers"
        model(ids)  # same shape, same ids: the plan is reused
        assert len(calls) == 1
        model(ids[:, :3])  # a new token shape (e.g. a decode step) builds one new plan
        assert len(calls) == 2
