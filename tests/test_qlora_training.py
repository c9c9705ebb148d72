"""QLoRA in training: a PEFT export from a 4-bit model loads on the dequantized, 4-bit and
full-precision bases; a few steps over a 4-bit base lower every task's loss and the checkpoint
round trips (onto a fresh 4-bit model, or the full-precision one); the trainer's quantize config
keys; and the trainer on the tiny QLoRA example. The layers themselves are in test_qlora.py."""

import copy

import pytest
import torch
from helpers_models import max_err, tiny_llama, tokens
from test_qlora import TASKS, _dequantized_base, _logits, _pair

import mftk
from mftk import quant
from mftk.core import adapter_layers

if not quant.bitsandbytes_available():
    pytest.skip("bitsandbytes is not installed", allow_module_level=True)


def test_peft_export_from_4bit_run_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base, q, dense = _pair()
    ids = tokens(3, 7)
    mftk.export_peft(q, "docs", tmp_path / "docs")
    want = _logits(q, ids, ["docs"] * 3)
    # on the dequantized base: the same model
    pm = peft.PeftModel.from_pretrained(_dequantized_base(base, q), tmp_path / "docs")
    with torch.no_grad():
        got = pm(ids).logits
    assert torch.allclose(got, want, atol=1e-5), max_err(got, want)
    # on a 4-bit base quantized the same way (quantization is deterministic): the same model
    qb = copy.deepcopy(base)
    quant.quantize_linears(qb, [n for n, _ in adapter_layers(q)], "nf4", True, torch.float32)
    pm4 = peft.PeftModel.from_pretrained(qb, tmp_path / "docs")
    with torch.no_grad():
        got4 = pm4(ids).logits
    assert torch.allclose(got4, want, atol=1e-5), max_err(got4, want)
    # on the full-precision base: the same adapter on the original weights (what PEFT users do
    # after QLoRA), equal to mftk with the adapter imported onto that base
    pf = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "docs")
    fp = mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, alpha=8)
    mftk.import_peft(fp, "docs", tmp_path / "docs")
    with torch.no_grad():
        got_f = pf(ids).logits
    want_f = _logits(fp, ids, ["docs"] * 3)
    assert torch.allclose(got_f, want_f, atol=1e-5), max_err(got_f, want_f)
    assert not torch.allclose(got_f, want, atol=1e-4)  # the quantization error is real


def test_training_steps_lower_every_task_loss_and_checkpoint_round_trip(tmp_path):
    base = tiny_llama(torch.float32)
    q = mftk.patch_model(base, TASKS, rank=4, alpha=8, quantize="nf4", compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    data = {t: torch.randint(3, 128, (4, 12), generator=g) for t in TASKS}  # one batch per task

    def losses():
        out = {}
        with torch.no_grad():
            for t, x in data.items():
                with mftk.use_tasks(q, [t] * len(x)):
                    out[t] = float(q(x, labels=x).loss)
        return out

    before = losses()
    opt = torch.optim.AdamW(mftk.adapter_parameters(q), lr=1e-2)
    ids = torch.cat(list(data.values()))
    task_ids = [t for t in TASKS for _ in range(4)]
    for _ in range(15):  # mixed-task batches, one adapter per row
        with mftk.use_tasks(q, task_ids):
            loss = q(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = losses()
    print(f"\nper-task loss before -> after 15 steps (nf4 base): {before} -> {after}")
    for t in TASKS:
        assert after[t] < before[t] - 0.05, f"task {t}: {before[t]:.4f} -> {after[t]:.4f}"
    # mftk's own checkpoint round trip onto a fresh 4-bit model
    mftk.save_adapters(q, tmp_path / "ck")
    q2 = mftk.patch_model(
        tiny_llama(torch.float32), TASKS, rank=4, alpha=8, quantize="nf4",
        compute_dtype=torch.float32,
    )  # fmt: skip
    mftk.load_adapters(q2, tmp_path / "ck")
    assert losses() == after
    x = data["sql"]
    a, b = _logits(q, x, "sql"), _logits(q2, x, "sql")
    assert torch.equal(a, b)
    # from_pretrained re-applies the 4-bit setting, or puts the adapters on the fp32 base
    q3 = mftk.from_pretrained(tiny_llama(torch.float32), tmp_path / "ck")
    assert q3.mftk_config.quantize == q.mftk_config.quantize
    assert torch.equal(_logits(q3, x, "sql"), a)
    f = mftk.from_pretrained(tiny_llama(torch.float32), tmp_path / "ck", quantize=False)
    assert f.mftk_config.quantize is None and not any(quant.is_4bit(m) for m in f.modules())
    sd, sd_f = mftk.adapter_state_dict(q), mftk.adapter_state_dict(f)
    assert sd.keys() == sd_f.keys() and all(torch.equal(sd[k], sd_f[k]) for k in sd)
    w = f.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, tiny_llama(torch.float32).model.layers[0].mlp.down_proj.weight)


def test_trainer_config_quantize_keys(tmp_path):
    from mftk.train.config import ConfigError, config_from_dict

    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')

    def cfg(**model):
        raw = {
            "tasks": [{"name": "a", "data": str(data)}],
            "model": {"tiny": {"hidden_size": 32}, **model},
            "train": {"steps": 1},
        }
        return config_from_dict(raw, str(tmp_path))

    c = cfg(quantize="nf4", double_quant=False, compute_dtype="float32")
    assert (c.model.quantize, c.model.double_quant, c.model.compute_dtype) == (
        "nf4", False, "float32",
    )  # fmt: skip
    assert cfg().model.quantize is None
    for model, needle in (
        ({"quantize": "int4"}, "model.quantize"),
        ({"quantize": "nf4", "compute_dtype": "float64"}, "model.compute_dtype"),
        ({"quantize_all_linear": True}, "model.quantize_all_linear: needs model.quantize"),
    ):
        with pytest.raises(ConfigError, match=needle):
            cfg(**model)
    raw = {
        "tasks": [{"name": "a", "data": str(data)}],
        "model": {"tiny": {"hidden_size": 32}, "quantize": "nf4"},
        "train": {"steps": 1},
        "distributed": {"strategy": "fsdp2"},
    }
    with pytest.raises(ConfigError, match="model.quantize: 4-bit bases are not supported with"):
        config_from_dict(raw, str(tmp_path))


def test_trainer_runs_the_tiny_qlora_example(tmp_path):
    import os

    import yaml

    from mftk.train.config import config_from_dict
    from mftk.train.loop import Trainer

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")
    with open(os.path.join(example, "config-qlora.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["model"]["pretrain"]["steps"] = 40
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["data"]["eval_max_samples"] = 12
    raw["train"].update(steps=30, eval_every=10, log_every=10, warmup_steps=2)
    raw["output"] = {"dir": str(tmp_path / "out"), "save_every": 30}
    logs = []
    trainer = Trainer(config_from_dict(raw, example), progress=False, log=logs.append)
    m = trainer.train()
    print(f"\nQLoRA tiny example, eval loss before -> after 30 steps: {m['eval_before']} -> "
          f"{m['eval_after']}")  # fmt: skip
    for t in ("completion", "bugs", "docstrings"):
        assert m["eval_after"][t] < m["eval_before"][t] - 0.02, (t, m)
    layers = adapter_layers(trainer.model)
    assert layers and all(quant.is_4bit(la.base_layer) for _, la in layers)
    assert trainer.model.mftk_config.quantize["quant_type"] == "nf4"
    assert any(x.startswith("quantized 14 linears to nf4") for x in logs), logs[:5]
    assert not quant.is_4bit(trainer.model.lm_head)
    assert (tmp_path / "out" / "peft" / "bugs" / "adapter_model.safetensors").is_file()
