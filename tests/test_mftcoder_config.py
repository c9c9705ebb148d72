"""Coming from MFTCoder, its training configs: converted key by key (or refused by name),
`mftk convert-config`, `mftk train CONFIG.json` (trained on MFTCoder's samples, token for token)
and `mftk --version`. The data formats and their expected token ids are in test_mftcoder.py."""

import dataclasses
import json

import pytest
import yaml
from test_mftcoder import BOT, CHAT, HUMAN, TEXT, expected

import mftk
from mftk.apps.convert_config import to_yaml
from mftk.cli import main
from mftk.train.config import LossConfig, OutputConfig, TrainConfig, load_config
from mftk.train.data import build_task_data
from mftk.train.mftcoder import MFTCoderConfigError, convert, is_mftcoder_config
from mftk.train.tiny_model import tiny_config, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 300)


# MFTCoder's lora_train_config.json (its documented keys and values), filled in
LORA = {
    "data_paths": "[data/code_exercise,data/code_qa]",
    "output_dir": "out",
    "tb_dir": "tb",
    "pretrained_model_path": "model",
    "model_type": "llama",
    "load_raw_dataset": True,
    "data_split": "98,2,0",
    "padding_mode": "padding",
    "use_dynamic_padding": True,
    "tokenize_mode": "sft",
    "tokenizer_type": "AutoTokenizer",
    "weighted_loss_mode": "case3",
    "attn_implementation": "flash_attention_2",
    "seq_length": 4096,
    "seed": 1234,
    "peft_type": "lora",
    "quantization": None,
    "lora_rank": 96,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "learning_rate": 5e-5,
    "min_lr": 5e-6,
    "weight_decay": 0.1,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "num_warmup_steps": 300,
    "resume_from_checkpoint": None,
    "log_interval": 10,
    "checkpointing_steps": 100,
    "evaluation_steps": 100,
    "max_train_steps": 2000,
    "epoch_checkpointing": False,
    "shuffle_before_split": True,
    "early_stopping": False,
    "early_stopping_stall_num": 5,
    "saving_limit": None,
}


def test_lora_config_maps_every_key():
    assert is_mftcoder_config(LORA) and not is_mftcoder_config({"tasks": [], "seed": 1})
    c = convert(dict(LORA, task_weights="[1,3]"))
    cfg = c.config
    assert cfg["tasks"] == [
        {"name": "code_exercise", "data": "data/code_exercise/**/*.jsonl", "loss_weight": 1.0},
        {"name": "code_qa", "data": "data/code_qa/**/*.jsonl", "loss_weight": 3.0},
    ]
    assert cfg["model"] == {
        "path": "model",
        "dtype": "bfloat16",
        "attn_implementation": "flash_attention_2",
    }
    assert cfg["adapter"] == {
        "mode": "shared",
        "rank": 96,
        "alpha": 32.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
    }
    assert cfg["data"] == {
        "template": "mftcoder",
        "overlong": "drop",
        "seq_len": 4097,
        "eval_fraction": 0.02,
        "eval_max_samples": 10**9,
        "packing": False,
    }
    assert cfg["train"] == {
        "lr": 5e-5,
        "batch_size": 2,
        "grad_accum": 1,
        "weight_decay": 0.1,
        "clip": 1.0,
        "seed": 1234,
        "log_every": 10,
        "eval_every": 100,
        "steps": 2000,
        "warmup_steps": 300,
        "schedule": "cosine",
        "min_lr": 0.0,  # HF's cosine ends at 0; MFTCoder never reads min_lr
    }
    assert cfg["loss"] == {"mode": "balanced"}
    assert cfg["output"] == {"dir": "out", "save_every": 100, "tb_dir": "tb"}
    # every given key is either mapped (its name in a comment) or noted with the reason
    used = " ".join(c.comments.values())
    assert [k for k in LORA if k not in c.notes and k not in used] == []
    assert "early_stopping_stall_num" in c.notes and "min_lr" in c.notes


def test_qlora_coba_and_defaults():
    raw = {k: LORA[k] for k in ("data_paths", "output_dir", "pretrained_model_path")}
    raw.update(max_train_steps=100, early_stopping=False, weighted_loss_mode="coba")
    raw.update(coba_warmup_steps=10, coba_history_length=30, coba_tau=5, padding_mode="pack")
    cfg = convert(raw).config
    assert cfg["model"]["quantize"] == "nf4" and cfg["model"]["double_quant"]  # default qlora
    assert cfg["adapter"]["rank"] == 96 and cfg["data"]["seq_len"] == 4097
    assert cfg["train"]["warmup_steps"] == 0.05  # num_warmup_steps: 0.05 of the 100 steps
    assert cfg["train"]["weight_decay"] == 0.01 and cfg["data"]["packing"] is True
    assert "early_stopping_patience" not in cfg["train"]
    assert cfg["loss"] == {
        "mode": "coba",
        "coba": {
            "warmup_steps": 10,
            "history_length": 30,
            "tau": 5.0,
            "update_interval": 1,
            "eval_batches": 1,
        },
    }
    del raw["early_stopping"]  # MFTCoder's default: early stopping after 5 stalled evaluations
    assert convert(raw).config["train"]["early_stopping_patience"] == 5


@pytest.mark.parametrize(
    "over, path, value",
    [
        ({"max_train_steps": None, "num_train_epochs": 3}, "train.epochs", 3),
        ({"lr_scheduler_type": "linear", "min_lr": 1e-6}, "train.min_lr", 0.0),
        ({"early_stopping": True, "early_stopping_stall_num": 3},
         "train.early_stopping_patience", 3),
        ({"epoch_checkpointing": True}, "output.save_every_epoch", True),
        ({"weighted_loss_mode": "case2"}, "loss.mode", "sample"),
        ({"weighted_loss_mode": "case4"}, "loss.mode", "task_sample"),
        ({"tb_dir": "runs/tb"}, "output.tb_dir", "runs/tb"),
        ({"saving_limit": 3}, "output.keep_best", 1),
        (
            {"weighted_loss_mode": "coba", "coba_update_interval": 4, "coba_sample_valid_num": 2},
            "loss.coba",
            {"warmup_steps": 100, "history_length": 200, "tau": 5.0, "update_interval": 4,
             "eval_batches": 2},
        ),
    ],
)  # fmt: skip
def test_keys_mftk_now_follows_are_mapped(over, path, value):
    c = convert({**LORA, **over})
    section, key = path.split(".")
    assert c.config[section][key] == value
    section_cls = {"train": TrainConfig, "loss": LossConfig, "output": OutputConfig}[section]
    assert key in {f.name for f in dataclasses.fields(section_cls)}  # an mftk key
    key = list(over)[-1]  # named in the setting's comment, or noted (min_lr: unused by MFTCoder)
    assert key in c.comments.get(path, "") or key in c.notes, (path, c.comments)


@pytest.mark.parametrize(
    "over, key, hint",
    [
        ({"weighted_loss_mode": "case5"}, "weighted_loss_mode", "case2 (sample)"),
        ({"early_stopping": "yes"}, "early_stopping", "expected true or false"),
        ({"num_train_epochs": 1.5}, "num_train_epochs", "expected an integer"),
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type", "use cosine, linear"),
        ({"padding_mode": "concat"}, "padding_mode", "use padding or pack"),
        ({"peft_type": None}, "peft_type", "use lora or qlora"),
        ({"distributed_type": "deepspeed"}, "distributed_type", "distributed.strategy: fsdp2"),
        ({"deepspeed_config": {"zero_stage": 2}}, "deepspeed_config", "torchrun"),
        ({"lora_rnak": 8}, "lora_rnak", "did you mean 'lora_rank'"),
        ({"load_raw_dataset": False}, "load_raw_dataset", "jsonl"),
        ({"data_paths": "$DATA_PATHS"}, "data_paths", "placeholder"),
        ({"lora_rank": "96"}, "lora_rank", "expected an integer"),
        ({"resume_from_checkpoint": "out/step_100"}, "resume_from_checkpoint", "--resume"),
        ({"xxpo": "dpo"}, "xxpo", "DPO/ORPO"),
    ],
)
def test_keys_mftk_cannot_follow_are_refused_by_name(over, key, hint):
    with pytest.raises(MFTCoderConfigError) as err:
        convert({**LORA, **over, "tokenize_mode": "pt"})
    lines = str(err.value).splitlines()[1:]
    assert any(x.startswith('  tokenize_mode: "pt": not supported yet') for x in lines)  # at once
    assert any(x.startswith(f"  {key}: ") and hint in x for x in lines), lines


def make_model_dir(path, tok):
    from transformers import LlamaForCausalLM

    tok.save_pretrained(path)
    LlamaForCausalLM(tiny_config(None, len(tok), 256, tok)).save_pretrained(path)


def make_task_dirs(root):
    for name, rec in [
        ("code_exercise", {"chat_rounds": CHAT}),
        ("code_qa", {"prompt": "Write add", "answer": "def add(a, b):\n    return a + b"}),
    ]:
        (root / "data" / name / "sub").mkdir(parents=True)
        (root / "data" / name / "sub" / "a.jsonl").write_text((json.dumps(rec) + "\n") * 6)


def test_convert_config_cli_and_train_from_json(tmp_path, tok, capsys):
    make_task_dirs(tmp_path)
    make_model_dir(tmp_path / "model", tok)
    raw = dict(LORA, max_train_steps=2, seq_length=128, data_split="80,20,0")
    raw.update(log_interval=1, evaluation_steps=1, checkpointing_steps=100)
    (tmp_path / "cfg.json").write_text(json.dumps(raw, indent="\t"))  # tabs: JSON, not YAML
    out = tmp_path / "yaml" / "cfg.yaml"
    out.parent.mkdir()
    assert main(["convert-config", str(tmp_path / "cfg.json"), str(out)]) == 0
    text = out.read_text()
    assert "seq_len: 4097" not in text and "seq_len: 129" in text
    assert "# seq_length 128 + 1" in text and 'tb_dir: "../tb"' in text
    conv = convert(raw)
    assert yaml.safe_load(to_yaml(conv, "cfg.json")) == conv.config
    from_yaml, from_json = load_config(str(out)), load_config(str(tmp_path / "cfg.json"))
    a, b = from_yaml.to_dict(), from_json.to_dict()
    for d in (a, b):  # the patterns differ (../data/... against data/...), the files do not
        d["base_dir"] = [t.pop("data") for t in d["tasks"]] and ""
    assert a == b and a["tasks"][0]["files"] == [str(tmp_path / "data/code_exercise/sub/a.jsonl")]
    assert main(["convert-config", str(tmp_path / "cfg.json"), str(out)]) == 2  # exists
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.json"), "--no-progress"]) == 0
    assert "is an MFTCoder config: converted" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["eval_after"]) >= {"code_exercise", "code_qa"}
    # the trained samples are MFTCoder's: the one-round prompt/answer record, token for token
    (qa,) = {tuple(s.input_ids) for s in build_task_data(from_json, tok)[1].train}
    want = expected(
        tok,
        [
            (HUMAN + "Write add\n" + BOT, False),
            ("def add(a, b):\n    return a + b\n", True),
            (None, True),
        ],
    )
    assert list(qa) == want[0]
    (tmp_path / "bad.json").write_text(json.dumps(dict(raw, padding_mode="concat")))
    assert main(["train", str(tmp_path / "bad.json")]) == 2
    assert "padding_mode: concat is not supported yet" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mftk {mftk.__version__}"
