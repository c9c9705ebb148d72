"""PEFT interop proven by peft itself: mftk export -> PeftModel.from_pretrained gives mftk's logits;
PEFT adapters (alpha/r, rsLoRA, rank/alpha patterns, subsets of modules) imported as tasks give
PEFT's logits, mixed batches included (PEFT's adapter_names=); mismatches name the module."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers_models import max_err, randomize_adapters, tiny_llama, tiny_qwen2, tokens

import mftk

peft = pytest.importorskip("peft")
TOL = dict(atol=1e-10, rtol=1e-10)  # float64 models: both sides compute the same math


def _peft_adapter(base, path, seed, **lora_kw):
    """Save a PEFT LoRA with random A and B (PEFT's init has B = 0) to `path`; return the config."""
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **lora_kw)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    pm.save_pretrained(path)
    return cfg


def _mftk_logits(model, ids, task_ids):
    with mftk.use_tasks(model, task_ids):
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_loads_in_peft_with_same_logits(arch, tmp_path):
    build = tiny_llama if arch == "llama" else tiny_qwen2
    base = build(torch.float64)
    model = mftk.patch_model(
        copy.deepcopy(base), ["a", "b"], rank=4, alpha=6, use_rslora=arch == "qwen2"
    )
    randomize_adapters(model)
    ids = tokens(2, 7)
    for task in ("a", "b"):
        mftk.export_peft(model, task, tmp_path / task)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / task)
        got, want = pm(ids).logits, _mftk_logits(model, ids, [task, task])
        assert torch.allclose(got, want, **TOL), f"task {task}: {max_err(got, want)}"
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 6 and cfg["use_rslora"] == (arch == "qwen2")
    assert cfg["target_modules"] == model.mftk_config.target_modules


@pytest.mark.parametrize(
    "lora_kw",
    [
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=8, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        dict(
            r=2,
            lora_alpha=4,
            target_modules="all-linear",
            rank_pattern={"o_proj": 6},
            alpha_pattern={"up_proj": 10},
        ),
        # rsLoRA with per-module scales: export must write alpha_pattern as s * sqrt(r)
        dict(
            r=2,
            lora_alpha=4,
            use_rslora=True,
            target_modules="all-linear",
            rank_pattern={"o_proj": 6, "gate_proj": 3},
            alpha_pattern={"up_proj": 10, "o_proj": 9},
        ),
    ],
    ids=["alpha_over_r-subset", "rslora", "rank_alpha_patterns", "rslora_rank_alpha_patterns"],
)
def test_import_peft_matches_peft_and_round_trips(lora_kw, tmp_path):
    base = tiny_llama(torch.float64)
    _peft_adapter(base, tmp_path / "src", seed=3, **lora_kw)
    model = mftk.patch_model(copy.deepcopy(base), ["x", "y"], rank=8)
    randomize_adapters(model)
    other_before = _mftk_logits(model, tokens(2, 6), ["x", "x"])
    mftk.import_peft(model, "y", tmp_path / "src")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "src")
    ids = tokens(2, 6)
    got, want = _mftk_logits(model, ids, ["y", "y"]), pm(ids).logits
    assert torch.allclose(got, want, **TOL), max_err(got, want)
    assert torch.equal(_mftk_logits(model, ids, ["x", "x"]), other_before), "other tasks untouched"
    # and back out: PEFT loads the exported task to the same logits, at the original ranks
    mftk.export_peft(model, "y", tmp_path / "out")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    got2 = pm2(ids).logits
    assert torch.allclose(got2, want, **TOL), max_err(got2, want)
    if lora_kw.get("alpha_pattern"):  # per-module scales went out as alpha_pattern entries
        assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["alpha_pattern"]
    from safetensors.torch import load_file

    src = load_file(tmp_path / "src" / "adapter_model.safetensors")
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for k, v in src.items():
        assert torch.equal(out[k], v), k


def test_several_peft_adapters_equal_peft_mixed_batch(tmp_path):
    base = tiny_llama(torch.float64)
    _peft_adapter(base, tmp_path / "t1", seed=4, r=4, lora_alpha=8, target_modules="all-linear")
    _peft_adapter(
        base,
        tmp_path / "t2",
        seed=5,
        r=2,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "up_proj"],
    )
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "t1", adapter_name="t1")
    pm.load_adapter(tmp_path / "t2", adapter_name="t2")
    model = mftk.patch_model(copy.deepcopy(base), ["t1", "t2"], rank=4)
    mftk.import_peft(model, "t1", tmp_path / "t1")
    mftk.import_peft(model, "t2", tmp_path / "t2")
    ids = tokens(4, 6)
    rows = ["t2", "__base__", "t1", "t2"]
    want = pm(ids, adapter_names=rows).logits  # PEFT's own mixed-adapter inference
    got = _mftk_logits(model, ids, rows)
    assert torch.allclose(got, want, **TOL), max_err(got, want)
    assert not torch.allclose(got[0], got[2], atol=1e-3), "the two adapters must differ"
    # mixed-adapter generate with the KV cache: PEFT's loop over adapters vs one mftk call
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(ids)
    want = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **gen)
    with mftk.use_tasks(model, rows):
        got = model.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(got, want)


def test_mismatches_raise_naming_the_module(tmp_path):
    base = tiny_llama(torch.float64)
    _peft_adapter(
        base, tmp_path / "qv", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    only_q = mftk.patch_model(copy.deepcopy(base), ["a"], rank=4, target_modules=["q_proj"])
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\.\d\.self_attn\.v_proj'.*not patched"
    ):
        mftk.import_peft(only_q, "a", tmp_path / "qv")
    low_rank = mftk.patch_model(copy.deepcopy(base), ["a"], rank=2)
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*rank 4 exceeds"
    ):
        mftk.import_peft(low_rank, "a", tmp_path / "qv")
    wide = mftk.patch_model(tiny_llama(torch.float64, hidden_size=32), ["a"], rank=4)
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*do not fit"
    ):
        mftk.import_peft(wide, "a", tmp_path / "qv")
    model = mftk.patch_model(copy.deepcopy(base), ["a"], rank=4)
    with pytest.raises(ValueError, match="unknown task"):
        mftk.import_peft(model, "b", tmp_path / "qv")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        mftk.import_peft(model, "a", tmp_path / "missing")
    _peft_adapter(base, tmp_path / "dora", seed=7, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        mftk.import_peft(model, "a", tmp_path / "dora")
