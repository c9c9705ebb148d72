"""Layer ranges, per-task ranks (padded, held at zero) and add_task (mftk.pyramid, patch_model)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from helpers_models import max_err, tiny_llama, tokens
from torch import nn

import mftk
from mftk.core import adapter_layers
from mftk.ops.reference import base_linear_ref, multi_adapter_linear_ref
from mftk.pyramid import add_task, padding_flops, parse_layers

TOL = dict(atol=1e-10, rtol=1e-9)


def _fill_active(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Random values in each task's active slices only (padding stays 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            for t in range(m.num_tasks):
                r = int(m.lora_rank[t])
                m.lora_a[t, :r] = torch.randn(r, m.in_features, generator=g, dtype=torch.float64)
                m.lora_b[t, :, :r] = (
                    torch.randn(m.out_features, r, generator=g, dtype=torch.float64) * std
                )


def _logits(model, ids, tasks):
    with mftk.use_tasks(model, tasks):
        return model(ids).logits


# ------------------------------------------------------------------------------- layer range


def test_parse_layers_forms_and_errors():
    assert parse_layers("18:", 20) == [18, 19]
    assert parse_layers("-2:", 4) == [2, 3]
    assert parse_layers("::2", 5) == [0, 2, 4]
    assert parse_layers([3, 0, -1], 4) == [0, 3]
    assert parse_layers(slice(1, 3), 4) == [1, 2]
    assert parse_layers(2, 4) == [2]
    for bad in ("18:", [4], "5", slice(0, 9)):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(bad, 4)
    with pytest.raises(ValueError, match="layers"):
        parse_layers("a:b", 4)
    with pytest.raises(TypeError, match="layers"):
        parse_layers(1.5, 4)


def test_layer_range_leaves_other_layers_untouched(tmp_path):
    base = tiny_llama(torch.float64, num_hidden_layers=3)
    ref = copy.deepcopy(base)
    model = mftk.patch_model(copy.deepcopy(base), ["a", "b"], rank=4, layers="1:")
    cfg = model.mftk_config
    assert cfg.layers == [1, 2]
    assert cfg.target_modules and all(".layers.0." not in n for n in cfg.target_modules)
    for name, mod in model.model.layers[0].named_modules():
        orig = ref.model.layers[0].get_submodule(name)
        assert type(mod) is type(orig)
        for (pn, p), (_, q) in zip(mod.named_parameters(), orig.named_parameters()):
            assert torch.equal(p, q) and not p.requires_grad, pn
    assert isinstance(model.model.layers[1].self_attn.q_proj, mftk.MultiAdapterLinear)
    with pytest.raises(ValueError, match="layers"):
        mftk.patch_model(copy.deepcopy(base), ["a"], layers="5:")
    with pytest.raises(ValueError, match="layers"):
        mftk.patch_model(copy.deepcopy(base), ["a"], layers=[0, 3])
    # PEFT loads the export (layers_to_transform) with the same logits
    _fill_active(model)
    mftk.export_peft(model, "b", tmp_path / "b")
    pcfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert pcfg["layers_to_transform"] == [1, 2] and pcfg["layers_pattern"] == "layers"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
    ids = tokens(2, 6)
    got, want = pm(ids).logits, _logits(model, ids, ["b", "b"])
    assert torch.allclose(got, want, **TOL), max_err(got, want)
    # and the mftk checkpoint round-trips the range
    mftk.save_adapters(model, tmp_path / "ck")
    back = mftk.from_pretrained(copy.deepcopy(base), tmp_path / "ck")
    assert back.mftk_config.layers == [1, 2]
    assert torch.equal(_logits(back, ids, ["a", "b"]), _logits(model, ids, ["a", "b"]))


# ------------------------------------------------------------------------------- per-task rank


@pytest.mark.parametrize("ranks", [[5, 1, 3], [2, 7, 7]])
def test_mixed_ranks_op_equals_ragged_reference(ranks):
    """The op on padded (T, R, ·) tensors equals, token by token, each task's own rank-r_t LoRA
    computed by the float64 reference at its true rank; every gradient too, and the padded
    gradient slices are exactly zero."""
    n, d_in, d_out, t = 23, 13, 11, len(ranks)
    rmax = max(ranks)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64)
    a = torch.zeros(t, rmax, d_in, dtype=torch.float64)
    b = torch.zeros(t, d_out, rmax, dtype=torch.float64)
    acts = []
    for i, r in enumerate(ranks):
        acts.append((torch.randn(r, d_in, dtype=torch.float64),
                     torch.randn(d_out, r, dtype=torch.float64)))  # fmt: skip
        a[i, :r], b[i, :, :r] = acts[-1]
    a.requires_grad_(True)
    b.requires_grad_(True)
    scaling = torch.tensor([0.5, 1.5, 2.0][:t], dtype=torch.float64)
    ids = torch.randint(-1, t, (n,))
    ids[:t] = torch.arange(t)
    y = mftk.multi_adapter_linear(x, w, a, b, bias=bias, scaling=scaling, task_ids=ids)
    dy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    # the ragged oracle: one reference call per task at its true rank
    xr = x.detach().clone().requires_grad_(True)
    ar = [p.clone().requires_grad_(True) for p, _ in acts]
    br = [q.clone().requires_grad_(True) for _, q in acts]
    want = base_linear_ref(xr, w, bias, d_out)
    want = torch.where((ids < 0)[:, None], want, torch.zeros_like(want))
    for i in range(t):
        yi = multi_adapter_linear_ref(
            xr,
            w,
            ar[i][None],
            br[i][None],
            bias,
            scaling[i : i + 1],
            torch.zeros(n, dtype=torch.long),
        )[0]
        want = want + torch.where((ids == i)[:, None], yi, torch.zeros_like(yi))
    assert torch.allclose(y, want, **TOL), max_err(y, want)
    wx, *wab = torch.autograd.grad(want, [xr, *ar, *br], dy)
    assert torch.allclose(gx, wx, **TOL), max_err(gx, wx)
    for i, r in enumerate(ranks):
        assert torch.allclose(ga[i, :r], wab[i], **TOL), max_err(ga[i, :r], wab[i])
        assert torch.allclose(gb[i, :, :r], wab[t + i], **TOL), max_err(gb[i, :, :r], wab[t + i])
        assert not ga[i, r:].any() and not gb[i, :, r:].any()


def test_per_task_rank_padding_stays_zero_under_adamw(tmp_path):
    base = tiny_llama(torch.float32)
    model = mftk.patch_model(
        copy.deepcopy(base), ["code", "bugs", "docs"], rank={"code": 8, "bugs": 2, "docs": 5}
    )
    cfg = model.mftk_config
    assert cfg.rank == 8 and cfg.ranks == [8, 2, 5]
    layers = adapter_layers(model)
    assert all(m.lora_rank.tolist() == [8, 2, 5] for _, m in layers)
    assert all(
        torch.allclose(m.lora_scaling, torch.ones(3, dtype=torch.float64)) for _, m in layers
    )
    opt = torch.optim.AdamW(mftk.adapter_parameters(model), lr=1e-2, weight_decay=0.1)
    ids = tokens(3, 9)
    for _ in range(4):
        with mftk.use_tasks(model, ["code", "bugs", "docs"]):
            out = model(ids).logits
        loss = out.float().pow(2).mean()
        loss.backward()
        for _, m in layers:  # the hooks zero the padded gradient slices
            assert not m.lora_a.grad[1, 2:].any() and not m.lora_b.grad[2, :, 5:].any()
        opt.step()
        opt.zero_grad()
    for name, m in layers:
        for t, r in enumerate([8, 2, 5]):
            assert not m.lora_a[t, r:].any(), f"{name}: padded A of task {t} moved"
            assert not m.lora_b[t, :, r:].any(), f"{name}: padded B of task {t} moved"
        assert m.lora_b[1, :, :2].abs().sum() > 0  # the active part did train
    # PEFT export: each task at its own r; import keeps working
    for task, r in (("code", 8), ("bugs", 2), ("docs", 5)):
        mftk.export_peft(model, task, tmp_path / task)
        pcfg = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert pcfg["r"] == r and pcfg["rank_pattern"] == {}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "bugs")
    got, want = pm(ids).logits, _logits(model, ids, "bugs")
    assert torch.allclose(got, want, atol=1e-5), max_err(got, want)
    other = mftk.patch_model(copy.deepcopy(base), ["x", "y"], rank=8)
    mftk.import_peft(other, "y", tmp_path / "bugs")
    got = _logits(other, ids, "y")
    assert torch.allclose(got, want, atol=1e-5), max_err(got, want)


def test_reset_adapters_keeps_per_task_rank_scaling_and_hooks():
    base = tiny_llama(torch.float64)
    tasks, ranks = ["code", "bugs", "docs"], [8, 2, 5]
    model = mftk.patch_model(copy.deepcopy(base), tasks, rank=dict(zip(tasks, ranks)), alpha=16.0)
    layers = adapter_layers(model)
    scaling = [m.lora_scaling.clone() for _, m in layers]
    assert torch.equal(scaling[0], torch.tensor([2.0, 8.0, 3.2], dtype=torch.float64))
    _fill_active(model)
    before = [(m.lora_a[[0, 2]].clone(), m.lora_b[[0, 2]].clone()) for _, m in layers]
    for _, m in layers:
        m.reset_adapters(1)  # one task: the others are untouched
    for (name, m), s, (a02, b02) in zip(layers, scaling, before):
        assert m.lora_rank.tolist() == ranks, name
        assert torch.equal(m.lora_scaling, s), name
        assert torch.equal(m.lora_a[[0, 2]], a02) and torch.equal(m.lora_b[[0, 2]], b02), name
        assert m.lora_a[1, :2].abs().min() > 0, name  # Kaiming-uniform on the used rows
        assert not m.lora_a[1, 2:].any() and not m.lora_b[1].any(), name
    for _, m in layers:
        m.reset_adapters()
    ids = tokens(3, 7)
    with mftk.use_tasks(model, tasks):
        out = model(ids).logits
    ref = base(ids).logits  # B = 0 everywhere: the base model exactly
    assert torch.allclose(out, ref, **TOL), max_err(out, ref)
    for (name, m), s in zip(layers, scaling):
        assert m.lora_rank.tolist() == ranks and torch.equal(m.lora_scaling, s), name
        for t, r in enumerate(ranks):
            assert m.lora_a[t, :r].abs().min() > 0 and not m.lora_a[t, r:].any(), name
    # the padding-gradient hooks survive the reset
    out.pow(2).mean().backward()
    for name, m in layers:
        assert m.lora_b.grad[1, :, :2].abs().sum() > 0, name
        for t, r in enumerate(ranks):
            assert not m.lora_a.grad[t, r:].any() and not m.lora_b.grad[t, :, r:].any(), name


def test_reset_adapters_full_rank_after_meta_init():
    with torch.device("meta"):
        m = mftk.MultiAdapterLinear(13, 11, num_tasks=3, rank=4, alpha=6.0)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        m.lora_rank.fill_(-7)  # what uninitialised memory may hold
        m.lora_scaling.fill_(float("nan"))
    m.reset_adapters(full_rank=True)
    assert m.lora_rank.tolist() == [4, 4, 4]
    assert torch.equal(m.lora_scaling, torch.full((3,), 1.5, dtype=torch.float64))
    assert m.lora_a.abs().min() > 0 and not m.lora_b.any()


def test_rank_argument_errors():
    base = tiny_llama()
    with pytest.raises(ValueError, match="rank"):
        mftk.patch_model(copy.deepcopy(base), ["a", "b"], rank={"a": 4})
    with pytest.raises(ValueError, match="rank"):
        mftk.patch_model(copy.deepcopy(base), ["a", "b"], rank=[4])
    with pytest.raises(ValueError, match="rank"):
        mftk.patch_model(copy.deepcopy(base), ["a", "b"], rank=[4, 0])


def test_padding_flops_at_benchmark_shape():
    # N=4096 tokens split evenly over T=8 tasks of ranks 64,64,32,32,16,16,8,8; D=1024
    f = padding_flops([64, 64, 32, 32, 16, 16, 8, 8], [512] * 8, 1024, 1024)
    assert f["padded"] == 6 * 2048 * 4096 * 64
    assert f["ragged"] == 6 * 2048 * 512 * 240
    assert f["base"] == 4 * 4096 * 1024 * 1024
    assert f["overhead"] == 6 * 2048 * (4096 * 64 - 512 * 240)  # 1.71 GFLOP per layer-step
    assert 0.0995 < f["overhead_vs_base"] < 0.0997  # ~10% of the frozen base step


# ------------------------------------------------------------------------------- add_task


@pytest.mark.parametrize("new_rank", [None, 2])
def test_add_task_keeps_old_outputs_bit_identical(new_rank, tmp_path):
    base = tiny_llama(torch.float32)
    model = mftk.patch_model(copy.deepcopy(base), ["a", "b"], rank=4, alpha=8)
    _fill_active(model)
    ids = tokens(4, 7)
    tasks = ["a", "b", "b", "a"]
    before = _logits(model, ids, tasks)
    snap = {k: v.clone() for k, v in mftk.adapter_state_dict(model).items()}
    assert add_task(model, "c", rank=new_rank) == 2
    assert model.mftk_config.tasks == ["a", "b", "c"]
    assert torch.equal(_logits(model, ids, tasks), before)
    for k, v in mftk.adapter_state_dict(model).items():
        assert torch.equal(v[:2], snap[k]), k
    # the new task starts at the base model and trains; its padding stays 0
    with mftk.use_tasks(model, None):
        base_out = model(ids).logits
    assert torch.equal(_logits(model, ids, "c"), base_out)
    opt = torch.optim.AdamW(mftk.adapter_parameters(model), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _logits(model, ids, "c").pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for _, m in adapter_layers(model):
        assert m.lora_b[2].abs().sum() > 0
        if new_rank == 2:
            assert not m.lora_a[2, 2:].any() and not m.lora_b[2, :, 2:].any()
    assert torch.equal(
        _logits(model, ids, ["a", "b", "b", "a"])[:, :, :], _logits(model, ids, tasks)
    )
    mftk.save_adapters(model, tmp_path / "ck")
    back = mftk.from_pretrained(copy.deepcopy(base), tmp_path / "ck")
    assert torch.equal(
        _logits(back, ids, ["c", "a", "b", "c"]), _logits(model, ids, ["c", "a", "b", "c"])
    )


def test_add_task_growing_rank_and_errors():
    base = tiny_llama(torch.float64)
    model = mftk.patch_model(copy.deepcopy(base), ["a"], rank=2)
    _fill_active(model)
    ids = tokens(2, 5)
    before = _logits(model, ids, "a")
    add_task(model, "big", rank=5)
    assert model.mftk_config.rank == 5 and model.mftk_config.ranks == [2, 5]
    # a larger R only adds exact zeros to task a's sums
    got = _logits(model, ids, "a")
    assert torch.allclose(got, before, **TOL), max_err(got, before)
    with pytest.raises(ValueError, match="name"):
        add_task(model, "a")
    with pytest.raises(ValueError, match="rank"):
        add_task(model, "z", rank=0)
