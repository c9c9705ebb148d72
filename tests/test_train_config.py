"""Trainer config: validated up front; every error names its key, with a suggestion if possible."""

import copy
import os

import pytest

from mftk.train.config import ConfigError, config_from_dict, load_config


@pytest.fixture
def base(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "a" / "y.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "b.csv").write_text("code,verdict\nx,ok\n")
    raw = {
        "tasks": [
            {"name": "gen", "data": "./a/*.jsonl", "loss_weight": 0.6},
            {
                "name": "bugs",
                "data": ["b.csv"],
                "loss_weight": 0.4,
                "completion": "verdict",
                "prompt": "code",
            },
        ],
        "model": {"tiny": {}},
        "train": {"steps": 10},
        "loss": {"mode": "balanced"},
    }
    return raw, str(tmp_path)


def err(raw, base_dir):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, base_dir)
    return str(e.value)


def test_valid_config_resolves_globs_and_defaults(base):
    raw, d = base
    cfg = config_from_dict(raw, d)
    assert [os.path.basename(f) for f in cfg.tasks[0].files] == ["x.jsonl", "y.jsonl"]
    assert cfg.tasks[1].files == [os.path.join(d, "b.csv")]
    assert cfg.train.steps == 10 and len(cfg.stages) == 1 and cfg.stages[0].steps == 10
    assert cfg.output.dir == os.path.join(d, "out")
    assert cfg.loss.mode == "balanced" and cfg.data.packing is True


@pytest.mark.parametrize(
    "path, key, expect",
    [
        ((), "trian", "trian: unknown key; did you mean 'train'?"),
        (
            ("tasks", 0),
            "loss_wieght",
            "tasks[0].loss_wieght: unknown key; did you mean 'loss_weight'?",
        ),
        (("train",), "learning_rate", "train.learning_rate: unknown key"),
        (("loss",), "focal_gama", "loss.focal_gama: unknown key; did you mean 'focal_gamma'?"),
    ],
)
def test_unknown_key_named_with_suggestion(base, path, key, expect):
    raw, d = base
    raw = copy.deepcopy(raw)
    node = raw
    for p in path:
        node = node[p]
    node[key] = 1
    assert expect in err(raw, d)


def test_missing_data_file_names_pattern(base):
    raw, d = base
    raw["tasks"][1]["data"] = ["b.csv", "nope/*.csv"]
    msg = err(raw, d)
    assert msg.startswith("tasks[1].data[1]: no file matches 'nope/*.csv'")


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda r: r["train"].update(lr=-1), "train.lr: must be > 0"),
        (lambda r: r["train"].update(lr="fast"), "train.lr: expected a number"),
        (lambda r: r["train"].update(batch_size=1.5), "train.batch_size: expected an integer"),
        (lambda r: r.update(loss={"mode": "balance"}), "loss.mode: 'balance' is not one of"),
        (lambda r: r.update(loss={"mode": "balance"}), "did you mean 'balanced'?"),
        (lambda r: r["tasks"][0].update(loss_weight=0), "tasks[0].loss_weight: must be > 0"),
        (lambda r: r["tasks"][1].update(name="gen"), "tasks[1].name: duplicate task name 'gen'"),
        (lambda r: r["tasks"][0].update(format="parquet"), "tasks[0].format"),
        (lambda r: r.update(tasks=[]), "tasks: needs at least one task"),
        (lambda r: r.pop("tasks"), "tasks: required key is missing"),
        (lambda r: r["tasks"][0].pop("name"), "tasks[0].name: required key is missing"),
        (lambda r: r.update(model={"tiny": {}, "path": "/x"}), "model: give exactly one of"),
        (
            lambda r: r.update(model={"path": "/does/not/exist"}),
            "model.path: /does/not/exist is not",
        ),
        (lambda r: r.update(data={"packing": "yes"}), "data.packing: expected true/false"),
        (
            lambda r: r.update(model={"tiny": {"hidden": 8}}),
            "model.tiny.hidden: unknown key; did you mean 'hidden_size'?",
        ),
        (lambda r: r["train"].update(device="tpu"), "train.device: 'tpu' is not"),
        (
            lambda r: r.update(stages=[{"steps": 10, "noise_kind": "swap"}]),
            "stages[0].noise_kind: 'swap' is not one of",
        ),
        (lambda r: r.update(data={"eval_fraction": 1.5}), "data.eval_fraction: must be in (0, 1)"),
        (
            lambda r: r.update(adapter={"top_k": 1}),
            "adapter.top_k: only applies with adapter.router",
        ),
        (lambda r: r.update(adapter={"router": "softmx"}), "did you mean 'softmax'?"),
        (
            lambda r: r.update(stages=[{"steps": 4, "mix": {"gne": 1}}]),
            "stages[0].mix.gne: unknown task; did you mean 'gen'?",
        ),
        (
            lambda r: r.update(stages=[{"steps": 4, "noise": 1.5}]),
            "stages[0].noise: must be in [0, 1)",
        ),
        (lambda r: r.update(stages=[{"steps": 4}]), "train.steps: 10 != the stages' total 4"),
        (lambda r: r.update(stages=[{"name": "x"}]), "stages[0].steps: required key is missing"),
        (lambda r: r["train"].pop("steps"), "train.steps: required when no stages are given"),
        (lambda r: r["train"].update(epochs=2), "train.epochs: give train.steps or train.epochs"),
        (lambda r: r["train"].update(epochs=0, steps=None), "train.epochs: must be > 0"),
        (
            lambda r: r.update(train={"epochs": 1}, stages=[{"steps": 4}]),
            "train.epochs: not with stages",
        ),
        (lambda r: r["train"].update(min_lr=0.5), "train.min_lr: must be in [0, train.lr]"),
        (lambda r: r["train"].update(warmup_steps=2.5), "train.warmup_steps: a step count or"),
        (lambda r: r["train"].update(warmup_steps=-0.1), "train.warmup_steps: must be >= 0"),
        (lambda r: r["train"].update(early_stopping_patience=0), "train.early_stopping_patience"),
        (lambda r: r.update(output={"keep_best": -1}), "output.keep_best: must be >= 0"),
        (lambda r: r.update(loss={"mode": "case2"}), "loss.mode: 'case2' is not one of"),
        (
            lambda r: r.update(loss={"mode": "coba", "coba": {"update_interval": 0}}),
            "loss.coba.update_interval: must be >= 1",
        ),
        (
            lambda r: r.update(loss={"mode": "coba", "coba": {"eval_batches": 0}}),
            "loss.coba.eval_batches: must be >= 1",
        ),
        (lambda r: r.update(train=[1]), "train: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(base, mutate, expect):
    raw, d = base
    raw = copy.deepcopy(raw)
    mutate(raw)
    assert expect in err(raw, d)


def test_stages_sum_to_steps(base):
    raw, d = base
    raw["train"].pop("steps")
    raw["stages"] = [{"steps": 3, "name": "warm"}, {"steps": 4, "mix": {"gen": 1}, "noise": 0.05}]
    cfg = config_from_dict(raw, d)
    assert cfg.train.steps == 7 and [s.name for s in cfg.stages] == ["warm", "stage2"]


def test_load_config_file_and_yaml_errors(base, tmp_path):
    import yaml

    raw, d = base
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert load_config(str(p)).task_names == ["gen", "bugs"]
    p.write_text("tasks: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_example_config_is_valid():
    here = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny", "config.yaml")
    cfg = load_config(here)
    assert cfg.task_names == ["completion", "bugs", "docstrings", "bug_detection"]
    assert cfg.tasks[3].type == "classify" and cfg.tasks[3].labels
    assert len(cfg.tasks[0].files) == 2 and cfg.tasks[1].files[0].endswith(".csv")


def test_shared_mode_combinations(base):
    """adapter.mode shared: per-task ranks are refused naming the key (one adapter has one
    rank); a layer range and fsdp2 are accepted (trained in tests/test_distributed.py)."""
    raw, d = base
    shared = copy.deepcopy(raw)
    shared["adapter"] = {"mode": "shared", "rank": 4}
    r = copy.deepcopy(shared)
    r["tasks"][0]["rank"] = 2
    assert "tasks[0].rank: per-task ranks need mode: per_task" in err(r, d)
    r = copy.deepcopy(shared)
    r["adapter"]["rank"] = {"gen": 2, "bugs": 4}
    assert "adapter.rank: expected an integer" in err(r, d)
    r = copy.deepcopy(shared)
    r["adapter"]["layers"] = "1:"
    r["distributed"] = {"strategy": "fsdp2"}
    cfg = config_from_dict(r, d)
    assert cfg.adapter.layers == "1:" and cfg.distributed.strategy == "fsdp2"


def test_epochs_fractions_and_new_keys(base):
    raw, d = base
    raw["train"] = {"epochs": 1.5, "warmup_steps": 0.05, "min_lr": 1e-5, "lr": 1e-3}
    raw["loss"] = {"mode": "task_sample"}
    raw["output"] = {"tb_dir": "runs/tb", "keep_best": 2, "save_every_epoch": True}
    cfg = config_from_dict(raw, d)
    assert cfg.train.steps is None and [(s.name, s.steps) for s in cfg.stages] == [("train", 0)]
    assert cfg.train.warmup_steps == 0.05 and cfg.train.min_lr == 1e-5
    assert cfg.output.tb_dir == os.path.join(d, "runs", "tb") and cfg.output.keep_best == 2
    raw["train"] = {"steps": 10, "warmup_steps": 3}
    assert config_from_dict(raw, d).train.warmup_steps == 3  # a step count stays an int
