"""Hybrid adapters on a patched model (issue 14): a shared LoRA on every routed token plus each
task's own, against a float64 reference, through PEFT export (PeftModel loads the merged rank
r_t + R_s LoRA to the same logits), import_peft, merge/unmerge, save/load and add_task."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers_models import max_err, randomize_adapters, tiny_llama, tokens

import mftk
from mftk.core import adapter_layers

TASKS = ["a", "b", "c"]
TOL = dict(atol=1e-10, rtol=1e-10)


def _hybrid(base, **kw):
    model = mftk.patch_model(copy.deepcopy(base), TASKS, mode="hybrid", **kw)
    randomize_adapters(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.shared_a.copy_(torch.randn(m.shared_a.shape, generator=g, dtype=m.shared_a.dtype))
            m.shared_b.copy_(torch.randn(m.shared_b.shape, generator=g, dtype=m.shared_b.dtype) / 5)
    return model


def _logits(model, ids, task_ids):
    with mftk.use_tasks(model, task_ids):
        return model(ids).logits


def _reference_logits(base, model, ids, task):
    """The base with W + s_t B_t A_t + s_sh B_sh A_sh folded in by hand, in float64."""
    ref = copy.deepcopy(base)
    t = TASKS.index(task)
    with torch.no_grad():
        for name, m in adapter_layers(model):
            lin = ref.get_submodule(name)
            lin.weight += float(m.lora_scaling[t]) * (m.lora_b[t] @ m.lora_a[t])
            lin.weight += m.shared_scaling * (m.shared_b @ m.shared_a)
    return ref(ids).logits


def test_spec_and_config():
    base = tiny_llama(torch.float64)
    model = mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, mode="hybrid")
    cfg = model.mftk_config
    assert (cfg.mode, cfg.shared_rank, cfg.shared_alpha) == ("hybrid", 4, 4.0)
    m = adapter_layers(model)[0][1]
    assert m.shared_a.shape == (4, m.in_features) and m.shared_b.shape == (m.out_features, 4)
    assert not m.shared_b.any() and m.shared_a.requires_grad
    ids = tokens(2, 5)
    assert torch.equal(_logits(model, ids, ["a", "b"]), base(ids).logits)  # B = 0 at init
    with pytest.raises(ValueError, match="shared_rank / shared_alpha: only meaningful"):
        mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, shared_rank=8)
    with pytest.raises(ValueError, match="mode: expected one of"):
        mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, mode="shared")
    per_task = mftk.patch_model(copy.deepcopy(base), TASKS, rank=8)
    hybrid = mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, mode="hybrid", shared_rank=12)
    n_per_task = sum(p.numel() for p in mftk.adapter_parameters(per_task))
    n_hybrid = sum(p.numel() for p in mftk.adapter_parameters(hybrid))
    assert n_per_task == n_hybrid  # 3 * 8 = 3 * 4 + 12: equal parameters, rank 16 per token


def test_hybrid_logits_and_gradients_match_reference():
    base = tiny_llama(torch.float64)
    model = _hybrid(base, rank={"a": 4, "b": 2, "c": 3}, alpha=6, shared_rank=5, shared_alpha=3)
    ids = tokens(3, 6)
    got = _logits(model, ids, ["a", "b", "c"])
    for row, task in enumerate(TASKS):
        want = _reference_logits(base, model, ids[row : row + 1], task)
        assert torch.allclose(got[row : row + 1], want, **TOL), max_err(got[row : row + 1], want)
    got.sum().backward()
    for _, m in adapter_layers(model):
        assert m.shared_a.grad is not None and m.shared_a.grad.abs().sum() > 0
        assert m.shared_b.grad is not None and m.shared_b.grad.abs().sum() > 0


def test_peft_export_is_the_merged_lora(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(torch.float64)
    for rs in (False, True):
        model = _hybrid(base, rank=4, alpha=6, shared_rank=6, use_rslora=rs)
        ids = tokens(2, 7)
        for task in ("a", "c"):
            path = tmp_path / f"{task}-{rs}"
            mftk.export_peft(model, task, path)
            cfg = json.loads((path / "adapter_config.json").read_text())
            assert cfg["r"] == 10
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
            got, want = pm(ids).logits, _logits(model, ids, [task, task])
            assert torch.allclose(got, want, **TOL), f"{task} rslora={rs}: {max_err(got, want)}"


def test_import_merge_save_load_add_task(tmp_path):
    base = tiny_llama(torch.float64)
    model = _hybrid(base, rank=4, shared_rank=4)
    ids = tokens(3, 6)
    want = _logits(model, ids, TASKS)
    # save / load into a fresh hybrid model
    mftk.save_adapters(model, tmp_path / "ckpt")
    loaded = mftk.from_pretrained(copy.deepcopy(base), tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, ids, TASKS), want)
    # merge / unmerge: the merged base computes task b with its shared part
    mftk.merge(model, "b")
    assert torch.allclose(model(ids).logits[1], want[1], **TOL)
    mftk.unmerge(model)
    assert torch.equal(_logits(model, ids, TASKS), want)
    # import a per-task PEFT LoRA into task c: c then is that LoRA alone, as in PEFT
    plain = mftk.patch_model(copy.deepcopy(base), ["x"], rank=4)
    randomize_adapters(plain, seed=9)
    mftk.export_peft(plain, "x", tmp_path / "x")
    mftk.import_peft(model, "c", tmp_path / "x")
    assert all(float(m.shared_tasks[2]) == 0 for _, m in adapter_layers(model))
    got = _logits(model, ids, ["a", "b", "c"])
    assert torch.allclose(got[2], _logits(plain, ids, ["x"] * 3)[2], **TOL)
    assert torch.equal(got[:2], want[:2])
    # add_task: the new task uses the shared adapter; the old ones are unchanged
    mftk.add_task(model, "d", seed=0)
    assert all(float(m.shared_tasks[3]) == 1 for _, m in adapter_layers(model))
    assert torch.equal(_logits(model, ids, ["a", "b", "c"]), got)
    shared_only = _logits(model, ids, ["d", "d", "d"])  # B_d = 0: base + the shared adapter
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in adapter_layers(model):
            ref.get_submodule(name).weight += m.shared_scaling * (m.shared_b @ m.shared_a)
    assert torch.allclose(shared_only, ref(ids).logits, **TOL)
