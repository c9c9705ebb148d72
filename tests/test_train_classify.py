"""Classify tasks in the trainer (mftk.train.classify): a head trained by cross-entropy in the
same packed batches as a generate task, metrics, saved heads, per-task rank / layer range, bad
configs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

import mftk
from mftk.train.classify import accuracy_f1
from mftk.train.config import ConfigError, config_from_dict
from mftk.train.data import DataError, Sample
from mftk.train.loop import Trainer
from mftk.train.packing import rows_to_batch

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")
CLASSIFY = {
    "name": "bug_detection",
    "type": "classify",
    "data": "./data/bugs/*.csv",
    "prompt_template": "Is there a bug?\n{code}\nAnswer:",
    "label": "label",
    "labels": ["ok", "bug"],
}


def raw_config(out, cache, steps=40, **over):
    raw = {
        "tasks": [
            {"name": "completion", "data": "./data/completion/*.jsonl", "rank": 4},
            dict(CLASSIFY),
        ],
        "model": {
            "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
            "vocab_size": 320,
            "attn_implementation": "eager",
            "pretrain": {"steps": 20, "lr": 0.003, "batch_size": 8},
            "cache_dir": cache,
        },
        "adapter": {"rank": 8, "alpha": 16},
        "data": {"seq_len": 96, "eval_max_samples": 24},
        "train": {
            "steps": steps,
            "lr": 0.003,
            "batch_size": 6,
            "threads": 1,
            "eval_every": 20,
            "log_every": 20,
            "warmup_steps": 2,
        },  # fmt: skip
        "output": {"dir": str(out)},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cls_cache"))


def test_accuracy_f1():
    assert accuracy_f1([0, 1, 1, 0], [0, 1, 0, 0], 2) == (0.75, pytest.approx((0.8 + 2 / 3) / 2))
    assert accuracy_f1([1, 1], [1, 1], 3) == (1.0, 1.0)  # absent labels leave the macro mean


def test_eval_predicts_the_argmax_class():
    """Known head logits on the last token of each classify sample: accuracy, macro-F1, CE and the
    majority baseline are exact (argmin predictions would score 0.25 / 1/6)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from mftk.train.classify import ClassifyTasks

    rows = [
        [Sample(1, [1, 2], [-100] * 2, 0), Sample(0, [3, 4], [-100, 4]), Sample(1, [5], [-100], 1)],
        [Sample(1, [6, 7, 8], [-100] * 3, 2), Sample(1, [9, 9], [-100] * 2, 1)],
    ]
    b = rows_to_batch(rows, pad_id=0)
    # gold [0, 1, 2, 1]; argmax [0, 1, 2, 0]; argmin [2, 0, 1, 1]
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [5.0, 2.0, 3.0]])
    hidden = torch.full((2, b.input_ids.shape[1], 3), 7.0)  # the head is the identity
    for (r, c), zi in zip([(0, 1), (0, 4), (1, 2), (1, 4)], z):
        hidden[r, c] = zi
    cls = ClassifyTasks.__new__(ClassifyTasks)
    cls.index = {1: SimpleNamespace(name="kind", labels=["a", "b", "c"])}
    cls.heads = {1: torch.nn.Identity()}
    cls.majority = {1: [(1, 5)]}
    cls.last_metrics = {}
    cls.eval_begin()
    cls.eval_batch(hidden, b)
    out = {}
    cls.eval_end(out)
    gold = torch.tensor([0, 1, 2, 1])
    assert out["kind/accuracy"] == 0.75
    assert out["kind/f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert out["kind"] == pytest.approx(float(F.cross_entropy(z, gold)))
    m = cls.last_metrics["kind"]
    assert (m["accuracy"], m["eval_samples"], m["majority_label"]) == (0.75, 4, "b")
    assert (m["majority_accuracy"], m["majority_macro_f1"]) == (0.5, pytest.approx(2 / 9))


def test_packed_batch_marks_last_token_of_classify_samples():
    rows = [[Sample(0, [5, 6, 7], [-100, 6, 7]), Sample(1, [8, 9], [-100, -100], 1)],
            [Sample(1, [3, 4, 5, 6], [-100] * 4, 0)]]  # fmt: skip
    b = rows_to_batch(rows, pad_id=0)
    assert b.cls_labels.tolist() == [[-100, -100, -100, -100, 1], [-100, -100, -100, 0, -100]]
    assert (b.targets[0, 3:] == -100).all() and (b.targets[1] == -100).all()
    assert b.to("cpu").cls_labels is not None


def test_classify_trains_next_to_generate(cache, tmp_path):
    logs = []
    cfg = config_from_dict(raw_config(tmp_path / "out", cache, adapter={"layers": "1:"}), EXAMPLE)
    trainer = Trainer(cfg, progress=False, log=logs.append)
    m = trainer.train()
    # the mixed batches hold both tasks; both losses fall
    h = m["history"]["train"]
    assert all(v is not None for v in h["bug_detection"][:5] + h["completion"][:5])
    first = sum(h["bug_detection"][:8]) / 8
    last = sum(h["bug_detection"][-8:]) / 8
    assert last < first - 0.02, (first, last)
    assert m["eval_after"]["completion"] < m["eval_before"]["completion"]
    c = m["classify"]["bug_detection"]
    assert c["eval_samples"] == 24 and 0 <= c["accuracy"] <= 1 and 0 <= c["macro_f1"] <= 1
    assert {"majority_accuracy", "majority_macro_f1", "majority_label"} <= set(c)
    assert len(m["history"]["classify"]["bug_detection/accuracy"]) == len(m["history"]["eval_step"])
    assert any(x.startswith("bug_detection: accuracy") for x in logs)
    # per-task rank: completion at 4, bug_detection at the adapter rank 8 (padded to 8)
    layers = list(mftk.patch.adapter_layers(trainer.model))
    assert all(mod.lora_rank.tolist() == [4, 8] for _, mod in layers)
    # adapter.layers "1:": layer 0 keeps its plain frozen nn.Linear modules
    assert layers and all(name.startswith("model.layers.1.") for name, _ in layers)
    assert type(trainer.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert trainer.model.mftk_config.layers == [1]
    # the head is saved with the adapters (and the tokenizer, for mftk scan), and loads back
    ad = tmp_path / "out" / "adapters"
    with safe_open(str(ad / "mftk_adapters.safetensors"), "pt") as f:
        assert "heads.bug_detection.weight" in f.keys()
    assert (ad / "tokenizer.json").is_file()
    saved = json.loads((ad / "mftk_config.json").read_text())
    assert saved["heads"]["bug_detection"]["labels"] == ["ok", "bug"]
    assert saved["heads"]["bug_detection"]["prompt_template"] == CLASSIFY["prompt_template"]
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(m["model"]["cache"], attn_implementation="eager")
    mftk.from_pretrained(base, str(ad))
    w = trainer.model.mftk_heads["bug_detection"].weight
    assert torch.equal(base.mftk_heads["bug_detection"].weight, w) and w.abs().sum() > 0


def test_bad_classify_and_layer_configs(cache, tmp_path):
    raw = raw_config(tmp_path / "o", cache)
    bad = copy.deepcopy(raw)
    del bad["tasks"][1]["labels"]
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.labels: a classify task needs labels"):
        config_from_dict(bad, EXAMPLE)
    bad = copy.deepcopy(raw)
    bad["tasks"][0]["labels"] = ["a", "b"]
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.labels: only for type: classify"):
        config_from_dict(bad, EXAMPLE)
    bad = copy.deepcopy(raw)
    bad["tasks"][1]["type"] = "clasify"
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.type"):
        config_from_dict(bad, EXAMPLE)
    bad = copy.deepcopy(raw)
    bad["tasks"][1]["labels"] = ["fine", "bug"]  # "ok" rows match no label
    with pytest.raises(DataError, match="label 'ok' in 'label' is not one of"):
        Trainer(config_from_dict(bad, EXAMPLE), progress=False, log=lambda s: None).train()
    bad = raw_config(tmp_path / "o2", cache, adapter={"layers": "2:"})  # the model has 2 layers
    with pytest.raises(ConfigError, match=r"adapter\.layers: .*the model.s 2 decoder layers"):
        Trainer(config_from_dict(bad, EXAMPLE), progress=False, log=lambda s: None).train()


def _hf_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mftk.train.tiny_model import train_tokenizer

    texts = [open(os.path.join(EXAMPLE, "data", "bugs", "bugs.csv")).read()]
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_resume_with_an_extra_task_keeps_old_state(tmp_path):
    from mftk.train.checkpointing import load_trainer_state
    from mftk.train.fingerprint import run_key
    from mftk.train.grow import _without, checkpoint_tasks, new_tasks

    hf = _hf_dir(tmp_path / "hf")
    raw = raw_config(tmp_path / "out", "unused", steps=8)
    raw["model"] = {"path": hf, "attn_implementation": "eager"}
    raw["tasks"][0].pop("rank")
    raw["tasks"] = [raw["tasks"][0]]  # the first run: completion only
    raw["train"].update(eval_every=4, log_every=4)
    raw["output"]["save_every"] = 4
    quiet = dict(progress=False, log=lambda s: None)
    Trainer(config_from_dict(copy.deepcopy(raw), EXAMPLE), max_steps=4, **quiet).train()
    ck = tmp_path / "out" / "checkpoints" / "step-000004"
    old = load_trainer_state(str(ck))
    assert checkpoint_tasks(old) == ["completion"]
    grown = copy.deepcopy(raw)
    grown["tasks"].append(dict(CLASSIFY, rank=12))  # a larger rank: R grows from 8 to 12
    cfg = config_from_dict(copy.deepcopy(grown), EXAMPLE)
    t = Trainer(cfg, resume=True, **quiet)
    t.setup()
    t.load_checkpoint(str(ck))
    assert t.step == 4
    # adapters: the old slots hold the checkpoint exactly, the new task is fresh (B = 0)
    from safetensors.torch import load_file

    saved = load_file(str(ck / "adapters" / "mftk_adapters.safetensors"))
    for name, m in mftk.patch.adapter_layers(t.model):
        assert torch.equal(m.lora_a[:1, :8], saved[f"{name}.lora_a"])
        assert torch.equal(m.lora_b[:1, :, :8], saved[f"{name}.lora_b"])
        assert not m.lora_b[1].any() and not m.lora_a[0, 8:].any()
        assert m.lora_rank.tolist() == [8, 12]
    # optimizer: the old moments kept slice for slice, zero for the new slots
    new_sd = t.opt.state_dict()
    n_checked = 0
    for io, inew in zip(old["optimizer"]["param_groups"][0]["params"],
                        new_sd["param_groups"][0]["params"]):  # fmt: skip
        so, sn = old["optimizer"]["state"][io], new_sd["state"][inew]
        for k in ("exp_avg", "exp_avg_sq"):
            blk = tuple(slice(0, n) for n in so[k].shape)
            assert torch.equal(sn[k][blk], so[k]), k
            rest = sn[k].clone()
            rest[blk] = 0
            assert not rest.any(), k  # the new slots start at zero
        assert torch.equal(sn["step"], so["step"])
        n_checked += 1
    assert n_checked == 2 * len(mftk.patch.adapter_layers(t.model))
    assert len(new_sd["param_groups"]) == 2  # the new head's group
    # and training continues to the end with the new task
    m = Trainer(config_from_dict(copy.deepcopy(grown), EXAMPLE), resume=True, **quiet).train()
    assert m["steps"] == 8 and m["resumed_from"].endswith("step-000004")
    tr = m["history"]["train"]["bug_detection"]
    assert tr[:4] == [None] * 4 and all(v is not None for v in tr[4:])
    assert "bug_detection" in m["classify"] and "bug_detection" in m["eval_before"]
    # what is refused: new tasks not at the end, other changes, the tiny model
    front = copy.deepcopy(grown)
    front["tasks"] = front["tasks"][::-1]
    with pytest.raises(ConfigError, match="must be the config's first tasks"):
        new_tasks(config_from_dict(front, EXAMPLE), old, run_key)
    other = copy.deepcopy(grown)
    other["train"]["lr"] = 0.01
    with pytest.raises(ConfigError, match="the config differs from the run"):
        new_tasks(config_from_dict(other, EXAMPLE), old, run_key)
    tiny = raw_config(tmp_path / "o3", "unused")
    tcfg = config_from_dict(tiny, EXAMPLE)
    st = {"tasks": ["completion"], "run_key": run_key(_without(tcfg, 1))}
    with pytest.raises(ConfigError, match="needs model.path"):
        new_tasks(tcfg, st, run_key)
