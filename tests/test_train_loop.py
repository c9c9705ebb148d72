"""The trainer end to end on the tiny example (reduced steps), resume exactness, stage switching,
a local Hugging Face model dir, router mode, and the CLI. Its options (loss weight 0, CoBa's sampled
updates, epochs, warm-up fractions, min_lr, early stopping, keep-best checkpoints) are in
test_train_options.py."""

import copy
import json
import math
import os

import pytest
import torch
import yaml

import mftk
from mftk.train.config import ConfigError, config_from_dict
from mftk.train.loop import Trainer

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache"))


def example_raw(cache_dir, out, **over):
    """The example config with a short pretraining and short stages (shared cache)."""
    with open(os.path.join(EXAMPLE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["model"]["pretrain"]["steps"] = 40
    raw["model"]["cache_dir"] = cache_dir
    raw["data"]["eval_max_samples"] = 12
    raw["train"].update(eval_every=10, log_every=10, warmup_steps=2, threads=1)
    raw["stages"] = [
        {"name": "multitask", "steps": 30},
        {
            "name": "focus",
            "steps": 10,
            "mix": {"completion": 1, "bugs": 1, "docstrings": 2},
            "loss_weights": {"docstrings": 1.5},
        },
        {"name": "adversarial", "steps": 10, "noise": 0.05},
    ]
    raw["output"] = {"dir": str(out), "save_every": 25}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k].update(v)
        else:
            raw[k] = v
    return raw


def run(raw, **kw):
    logs = []
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    trainer = Trainer(cfg, progress=False, log=logs.append, **kw)
    return trainer, trainer.train(), logs


def test_example_end_to_end(cache_dir, tmp_path):
    trainer, m, logs = run(example_raw(cache_dir, tmp_path / "out"))
    out = tmp_path / "out"
    assert m["steps"] == 50
    for t in ("completion", "bugs", "docstrings"):
        assert m["eval_after"][t] < m["eval_before"][t] - 0.05, (
            t,
            m["eval_before"],
            m["eval_after"],
        )
        assert (out / "peft" / t / "adapter_config.json").is_file()
        assert (out / "peft" / t / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 10_000
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval_after"] == m["eval_after"] and len(saved["history"]["loss"]) == 50
    assert [s["name"] for s in saved["stages"]] == ["multitask", "focus", "adversarial"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000025", "step-000050"]
    assert any("stage 3/3 'adversarial' from step 40" in x for x in logs)
    assert any(x.startswith("step 10/50 [multitask] loss") and "tok/s" in x for x in logs)
    # the mftk checkpoint reloads into a freshly patched base and reproduces the trained model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(m["model"]["cache"], attn_implementation="eager")
    mftk.from_pretrained(base, str(out / "adapters"))
    batch = trainer.eval_set[0]
    with torch.no_grad(), mftk.use_tasks(trainer.model, batch.task_ids):
        want = trainer.model(**batch.model_inputs()).logits
    with torch.no_grad(), mftk.use_tasks(base, batch.task_ids):
        got = base(**batch.model_inputs()).logits
    assert (got - want).abs().max().item() < 1e-5
    # the PEFT export of one task loads in PEFT and matches that task's routing
    from peft import PeftModel

    plain = LlamaForCausalLM.from_pretrained(m["model"]["cache"], attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(plain, str(out / "peft" / "bugs")).eval()
    ids = batch.input_ids[:1, :20]
    with torch.no_grad(), mftk.use_tasks(trainer.model, "bugs"):
        want = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4


def test_resume_reproduces_uninterrupted_run(cache_dir, tmp_path):
    over = dict(
        stages=[
            {"name": "a", "steps": 6},
            {"name": "b", "steps": 5, "noise": 0.3, "mix": {"bugs": 1, "docstrings": 1}},
        ],
        train={"eval_every": 2, "grad_accum": 2, "batch_size": 3},
        adapter={"dropout": 0.1},
        loss={"mode": "coba", "coba": {"warmup_steps": 0, "history_length": 3}},
    )
    raw_a = example_raw(cache_dir, tmp_path / "a", **over)
    raw_a["output"]["save_every"] = 4
    _, full, _ = run(raw_a)
    raw_b = example_raw(cache_dir, tmp_path / "b", **over)
    raw_b["output"]["save_every"] = 4
    _, part, _ = run(raw_b, max_steps=5)
    assert part["steps"] == 5 and len(part["history"]["loss"]) == 5
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step-000004", "step-000005"]
    _, resumed, logs = run(raw_b, resume=True)
    assert resumed["resumed_from"].endswith("step-000005")
    h_full, h_res = full["history"], resumed["history"]
    assert h_res["loss"] == h_full["loss"]  # every loss, bit for bit
    assert h_res["train"] == h_full["train"] and h_res["eval"] == h_full["eval"]
    assert h_res["task_weights"] == h_full["task_weights"]
    assert h_full["task_weights"][-1] != h_full["task_weights"][0]  # CoBa really moved
    assert resumed["eval_after"] == full["eval_after"]
    raw_b["train"]["lr"] = 0.01  # a different run must not resume this one: the error names it
    with pytest.raises(ConfigError, match=r"differs from the run .*: train\.lr: 0\.003 -> 0\.01;"):
        run(raw_b, resume=True)


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_stages_switch_task_mix(cache_dir, tmp_path, monkeypatch):
    import mftk.train.report as loop

    rec = Recorder()
    monkeypatch.setattr(loop, "_tensorboard", lambda out: rec)  # tensorboard is optional
    over = dict(
        stages=[
            {"name": "only_bugs", "steps": 4, "mix": {"bugs": 1}},
            {"name": "only_docs", "steps": 4, "mix": {"docstrings": 1}},
        ],
        train={"eval_every": 100},
    )
    _, m, logs = run(example_raw(cache_dir, tmp_path / "o", **over))
    tr = m["history"]["train"]
    assert all(v is None for v in tr["completion"])
    assert all(v is not None for v in tr["bugs"][:4]) and all(
        v is None for v in tr["docstrings"][:4]
    )
    # (step 5 may still hold the sample left over from the previous stage's last batch)
    assert all(v is None for v in tr["bugs"][5:]) and all(
        v is not None for v in tr["docstrings"][4:]
    )
    assert m["history"]["stage"] == [0] * 4 + [1] * 4
    assert any("stage 2/2 'only_docs' from step 4" in x for x in logs)
    tags = {t for t, _, _ in rec.scalars}
    assert {"train/loss", "train/lr", "train/bugs", "train/docstrings", "eval/bugs"} <= tags
    assert [s for t, _, s in rec.scalars if t == "train/loss"] == list(range(1, 9)) and rec.closed


def test_local_hf_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mftk.train.tiny_model import train_tokenizer

    texts = [open(f).read() for f in [os.path.join(EXAMPLE, "data", "bugs", "bugs.csv")]]
    tok = train_tokenizer(texts, 300)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    raw = example_raw("unused", tmp_path / "out", stages=[{"steps": 3}])
    raw["model"] = {
        "path": str(tmp_path / "hf"),
        "attn_implementation": "sdpa",
        "dtype": "bfloat16",
    }
    raw["loss"] = {"mode": "focal", "focal_gamma": 1.0}
    raw["tasks"] = raw["tasks"][1:]
    trainer, m, _ = run(raw)
    assert m["model"]["source"] == str(tmp_path / "hf") and m["steps"] == 3
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert all(math.isfinite(v) for v in m["history"]["loss"])
    assert trainer.tokenizer.vocab_size == len(tok)
    assert (tmp_path / "out" / "peft" / "docstrings" / "adapter_model.safetensors").is_file()
    assert not os.path.exists(os.path.join(EXAMPLE, "unused"))  # no tiny cache for a model dir


def test_router_mode_learns_to_route(cache_dir, tmp_path):
    over = dict(
        adapter={"router": "softmax"},
        stages=[{"steps": 12}],
        train={"eval_every": 12, "lr": 0.01},
        loss={"router_supervision": 1.0},
    )
    raw = example_raw(cache_dir, tmp_path / "r", **over)
    # bug_detection (classify) reads the bugs csv: the same tokens as bugs, no router tells them
    raw["tasks"] = [t for t in raw["tasks"] if t.get("type") != "classify"]
    _, m, logs = run(raw)
    acc = m["history"]["router_accuracy"]
    assert len(acc) == 2 and acc[-1] > acc[0] and acc[-1] > 0.5, acc
    assert any("router acc" in x for x in logs)


def test_cli_errors_and_max_steps(cache_dir, tmp_path, capsys):
    from mftk.cli import main

    raw = example_raw(cache_dir, tmp_path / "c", stages=[{"steps": 4}])
    raw["tasks"] = raw["tasks"][:1]
    for t in raw["tasks"]:
        t["data"] = os.path.abspath(os.path.join(EXAMPLE, t["data"]))
        if "exec_problems" in t:  # relative to the example, like data
            t["exec_problems"] = os.path.abspath(os.path.join(EXAMPLE, t["exec_problems"]))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["train", str(p), "--max-steps", "2", "--no-progress"]) == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["steps"] == 2
    raw["train"]["lr_rate"] = 1
    p.write_text(yaml.safe_dump(raw))
    assert main(["train", str(p)]) == 2
    assert "train.lr_rate: unknown key" in capsys.readouterr().err


def test_flash_attention_config_falls_back_to_sdpa(cache_dir, tmp_path):
    """`attn_implementation: flash_attention_2` where flash-attn cannot run (the CPU): the
    one-process trainer loads SDPA with a logged note (as fsdp2 does), trains the same losses
    as an sdpa config, and keeps the configured value (its run_key) for resuming."""
    from mftk.train.fingerprint import run_key
    from mftk.train.run import flash_attention_available

    assert not flash_attention_available(torch.device("cpu"))
    over = {"stages": [{"steps": 3}]}
    raw = example_raw(cache_dir, tmp_path / "sdpa", **over)
    raw["model"]["attn_implementation"] = "sdpa"
    _, ref, _ = run(raw)
    raw["model"]["attn_implementation"] = "flash_attention_2"
    raw["output"]["dir"] = str(tmp_path / "flash")
    trainer, m, logs = run(raw)
    assert any("flash-attn is not usable here" in s and "using sdpa" in s for s in logs)
    assert trainer.model.config._attn_implementation == "sdpa" and not trainer.varlen
    assert trainer.cfg.model.attn_implementation == "flash_attention_2"
    assert run_key(trainer.cfg) == run_key(config_from_dict(copy.deepcopy(raw), EXAMPLE))
    assert m["history"]["loss"] == ref["history"]["loss"]


def test_train_step_copies_to_the_host_once(cache_dir, tmp_path, monkeypatch):
    """A training step (and an evaluation) copies its statistics to the host once, however
    many micro-batches: Tensor.item / .cpu calls do not grow with train.grad_accum (router
    mode, whose accuracy is a tensor too). The logged values are unchanged: the resume test
    above compares them bit for bit."""
    raw = example_raw(cache_dir, tmp_path / "o", adapter={"router": "softmax"})
    raw["tasks"] = [t for t in raw["tasks"] if t.get("type") != "classify"]
    calls = []
    for name in ("item", "cpu"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for accum in (1, 3):
        raw["train"]["grad_accum"] = accum
        trainer = Trainer(config_from_dict(copy.deepcopy(raw), EXAMPLE), log=lambda _: 0)
        trainer.setup()
        trainer.sampler.set_stage(trainer.stage_mix(0), 0.0)
        calls.clear()
        res = trainer.train_step(0)
        step_calls = len(calls)
        calls.clear()
        ev = trainer.evaluate()
        counts[accum] = (step_calls, len(calls))
        assert res["router_accuracy"] is not None and 0 <= ev["router_accuracy"] <= 1
        assert all(v is None or math.isfinite(v) for v in res["per_task"].values())
    # (a step's fixed calls are AdamW's and clipping's, on the CPU here)
    assert counts[3] == counts[1], counts
