"""Bad input gets a clear error naming what is wrong (issue 15, inputs): hand-built routing plans,
top_k / scaling / temperature types at the op, and malformed PEFT folders given to import_peft."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from helpers_models import randomize_adapters, tiny_llama
from safetensors.torch import load_file, save_file

import mftk
from mftk.ops import RoutingPlan

TASKS = ["code", "sql"]


def _op_args(n=6, t=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    a = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)
    b = torch.randn(t, 5, 2, generator=g, dtype=torch.float64)
    return x, w, a, b


def test_hand_built_plan_must_be_a_permutation():
    x, w, a, b = _op_args()
    ids = torch.tensor([0, 1, 2, 0, -1, 1])
    good = mftk.build_plan(ids, 3)
    want = mftk.multi_adapter_linear(x, w, a, b, task_ids=good)
    by_hand = RoutingPlan(good.perm.clone(), good.offsets.clone(), ids, 3)
    assert torch.equal(mftk.multi_adapter_linear(x, w, a, b, task_ids=by_hand), want)
    assert by_hand.checked  # checked once, on first use
    dup = good.perm.clone()
    dup[1] = dup[0]
    bad = [
        (RoutingPlan(dup, good.offsets, ids, 3), "not a permutation"),
        (RoutingPlan(good.perm + 1, good.offsets, ids, 3), "not a permutation"),
        (RoutingPlan(good.perm, torch.tensor([0, 3, 2, 5]), ids, 3), "offsets must rise"),
        (RoutingPlan(good.perm.flip(0), good.offsets, ids, 3), "does not group"),
        (RoutingPlan(good.perm.int(), good.offsets, ids, 3), "plan.perm must be an int64"),
        (RoutingPlan(good.perm, good.offsets[:3], ids, 3), r"plan.offsets must be .* \(4,\)"),
    ]
    for plan, msg in bad:
        with pytest.raises(ValueError, match=msg):
            mftk.multi_adapter_linear(x, w, a, b, task_ids=plan)


def test_op_type_checks_top_k_scaling_temperature():
    x, w, a, b = _op_args()
    rw = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="top_k"):
        mftk.multi_adapter_linear(x, w, a, b, router_weight=rw, top_k=True)
    with pytest.raises(ValueError, match="temperature"):
        mftk.multi_adapter_linear(x, w, a, b, router_weight=rw, temperature=True)
    with pytest.raises(TypeError, match="scaling: expected a real floating tensor"):
        mftk.multi_adapter_linear(x, w, a, b, scaling=torch.ones(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="scaling: expected a real floating tensor"):
        mftk.multi_adapter_linear(x, w, a, b, scaling=torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="scaling"):
        mftk.multi_adapter_linear(x, w, a, b, scaling=True)
    with pytest.raises(ValueError, match="top_k"):
        mftk.MultiAdapterLinear(8, 5, 3, rank=2, router="softmax", top_k=True)


@pytest.fixture()
def peft_dir(tmp_path):
    model = mftk.patch_model(tiny_llama(torch.float64), TASKS, rank=4)
    randomize_adapters(model)
    path = str(tmp_path / "code")
    mftk.export_peft(model, "code", path)
    return model, path


def _edit_config(path, **changes):
    p = os.path.join(path, "adapter_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def test_peft_import_errors_are_value_errors_naming_the_field(peft_dir):
    model, path = peft_dir
    mftk.import_peft(model, "sql", path)  # the untouched export loads
    cases = [
        (dict(r=0), "r must be a positive int"),
        (dict(r="8"), "r must be a positive int"),
        (dict(lora_alpha="abc"), "lora_alpha must be a positive number"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a positive number"),
        (dict(use_rslora="yes"), "use_rslora must be true or false"),
        (dict(alpha_pattern={"q_proj(": 2.0}), "alpha_pattern: pattern 'q_proj\\(' is not a valid"),
        (dict(alpha_pattern={"q_proj": "x"}), "q_proj must be a positive number"),
        (dict(alpha_pattern=["q_proj"]), "alpha_pattern must be an object"),
    ]
    for changes, msg in cases:
        original = open(os.path.join(path, "adapter_config.json")).read()
        _edit_config(path, **changes)
        with pytest.raises(ValueError, match=msg):
            mftk.import_peft(model, "sql", path)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write(original)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(["LORA"], f)
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        mftk.import_peft(model, "sql", path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write("[" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        mftk.import_peft(model, "sql", path)


def test_peft_import_rejects_rank_0_and_0d_tensors(peft_dir):
    model, path = peft_dir
    wpath = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(wpath)
    key_a = next(k for k in tensors if "lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    for a, b in [
        (torch.zeros(0, tensors[key_a].shape[1]), torch.zeros(tensors[key_b].shape[0], 0)),
        (torch.tensor(1.0), tensors[key_b]),
    ]:
        save_file({**tensors, key_a: a, key_b: b}, wpath)
        with pytest.raises(ValueError, match=r"are not \(r, D_in\) / \(D_out, r\) with r >= 1"):
            mftk.import_peft(model, "sql", path)


def test_peft_pattern_keys_are_bounded(peft_dir):
    model, path = peft_dir
    _edit_config(path, alpha_pattern={"(.|.)*X": 2.0})
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="can backtrack"):
        mftk.import_peft(model, "sql", path)
    assert time.perf_counter() - t0 < 5.0
    # plain names match as PEFT matches them: the module itself or a dotted suffix
    _edit_config(path, alpha_pattern={"q_proj": 2.0, "layers.0.mlp.up_proj": 3.0})
    mftk.import_peft(model, "sql", path)
    layers = dict(mftk.core.adapter_layers(model))
    r = int(layers["model.layers.0.self_attn.q_proj"].lora_rank[1])
    assert float(layers["model.layers.0.self_attn.q_proj"].lora_scaling[1]) == 2.0 / r
    assert float(layers["model.layers.1.self_attn.q_proj"].lora_scaling[1]) == 2.0 / r
    assert float(layers["model.layers.0.mlp.up_proj"].lora_scaling[1]) == 3.0 / r
    assert float(layers["model.layers.1.mlp.up_proj"].lora_scaling[1]) != 3.0 / r
