"""model.pretrain.data: the tiny base pretrained on a corpus of its own (plain code, say) instead
of the tasks' training text. read_corpus, the config checks, and a run that uses it."""

import copy
import json
import os

import pytest
import yaml

from mftk.train.config import ConfigError, config_from_dict
from mftk.train.loop import Trainer
from mftk.train.records import DataError
from mftk.train.tiny_model import read_corpus

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")
CODE = [
    "def add(a, b):\n    return a + b\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


def _corpus(tmp_path, copies: int = 40):
    path = tmp_path / "code.jsonl"
    lines = [json.dumps({"text": CODE[i % len(CODE)]}) for i in range(copies)]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line
    return path


def test_read_corpus_jsonl_and_text_files(tmp_path):
    jl = _corpus(tmp_path, copies=5)
    txt = tmp_path / "more.py"
    txt.write_text(CODE[2])
    docs = read_corpus([str(jl), str(txt)])
    assert docs == [[CODE[i % 3]] for i in range(5)] + [[CODE[2]]]


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"text": "ok"', "not JSON"),
        ('{"body": "x"}', 'an object with a "text" string'),
        ('{"text": 3}', 'an object with a "text" string'),
        ('["text"]', 'an object with a "text" string'),
    ],
)
def test_read_corpus_bad_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"c\.jsonl:2: .*{why}"):
        read_corpus([str(path)])


def test_read_corpus_refuses_binary_and_empty(tmp_path):
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="b.txt: not UTF-8"):
        read_corpus([str(binary)])
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="model.pretrain.data: no text"):
        read_corpus([str(empty)])


def _raw(tmp_path, **pretrain):
    with open(os.path.join(EXAMPLE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["tasks"] = raw["tasks"][:2]
    for t in raw["tasks"]:
        t["data"] = os.path.join(os.path.abspath(EXAMPLE), t["data"])
    raw["model"]["pretrain"] = {"steps": 3, "lr": 0.003, "batch_size": 2, **pretrain}
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["data"]["eval_max_samples"] = 4
    raw["train"].update(eval_every=100, log_every=100, warmup_steps=0, threads=1)
    raw["stages"] = [{"name": "train", "steps": 1}]
    raw["output"] = {"dir": str(tmp_path / "out")}
    return raw


def test_config_checks_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.pretrain\.data\[0\]: no file matches"):
        config_from_dict(_raw(tmp_path, data=str(tmp_path / "missing-*.jsonl")), EXAMPLE)
    corpus = str(_corpus(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.pretrain\.data: needs model\.pretrain\.steps"):
        config_from_dict(_raw(tmp_path, data=corpus, steps=0), EXAMPLE)
    cfg = config_from_dict(_raw(tmp_path, data=corpus), EXAMPLE)
    assert cfg.model.pretrain.files == [corpus]


def test_a_run_pretrains_on_the_corpus_and_gets_its_own_base(tmp_path):
    """Same tasks and seed: the corpus base and the task-text base are two cache entries, and the
    corpus run's pretraining starts from the corpus (its loss is the corpus's, not the tasks')."""
    raw = _raw(tmp_path, data=str(_corpus(tmp_path)))
    runs = {}
    for name, r in (("corpus", raw), ("tasks", _raw(tmp_path))):
        r = copy.deepcopy(r)
        r["output"]["dir"] = str(tmp_path / name)
        cfg = config_from_dict(r, EXAMPLE)
        runs[name] = Trainer(cfg, progress=False, log=lambda m: None).train()["model"]
    assert runs["corpus"]["base"] != runs["tasks"]["base"]
    assert runs["corpus"]["tokenizer"] == runs["tasks"]["tokenizer"]  # the task text's, both
    first = {k: v["pretrain"]["first_loss"] for k, v in runs.items()}
    assert first["corpus"] != first["tasks"]


def test_a_changed_corpus_refuses_resume_and_evaluation(tmp_path):
    """The corpus's contents are hashed into the base; a run resumed, or its adapters scored,
    after the corpus changed would continue on another base: both are refused, naming it."""
    from mftk.apps.evaluate import Evaluator

    corpus = _corpus(tmp_path)
    raw = _raw(tmp_path, data=str(corpus))
    raw["stages"] = [{"name": "train", "steps": 2}]
    raw["output"]["save_every"] = 1
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    Trainer(cfg, max_steps=1, progress=False, log=lambda m: None).train()
    corpus.write_text(json.dumps({"text": "def other():\n    pass\n" * 40}) + "\n")
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    with pytest.raises(ConfigError, match=r"--resume: the checkpoint was trained on the tiny base"):
        Trainer(cfg, resume=True, progress=False, log=lambda m: None).train()
    adapters = os.path.join(raw["output"]["dir"], "adapters")
    with open(os.path.join(raw["output"]["dir"], "metrics.json"), "w") as f:
        json.dump({"model": {"base": "base-trained-elsewhere"}}, f)
    os.makedirs(adapters, exist_ok=True)
    with pytest.raises(ConfigError, match=r"trained on the tiny base base-trained-elsewhere"):
        Evaluator(cfg, adapters, log=lambda m: None)


def test_a_corpus_shorter_than_seq_len_names_the_key(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "x = 1\n"}) + "\n")
    cfg = config_from_dict(_raw(tmp_path, data=str(path)), EXAMPLE)
    with pytest.raises(DataError, match=r"model\.pretrain: the pretraining text .* fewer than"):
        Trainer(cfg, progress=False, log=lambda m: None).train()
