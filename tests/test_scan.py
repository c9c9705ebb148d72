"""`mftk scan` on the bundled sample tree tests/data/scan_sample (mftk.apps.scan)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import mftk
from mftk.apps.scan import render, split_file, window_units
from mftk.cli import main
from mftk.heads import add_head, classify

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "scan_sample")
META = {"prompt_template": "Is there a bug?\n{code}\nAnswer:", "bos": "<s>", "seq_len": 96}
PY_UNITS = [  # (function, first line, last line) of pkg/stats.py
    ("total", 4, 8),
    ("mean", 11, 12),
    ("Stack.__init__", 16, 17),
    ("Stack.size", 19, 21),
    ("Stack.push", 23, 24),
    ("Stack.drain", 26, 30),
    ("Stack.drain.<locals>.helper", 27, 28),
]


def test_split_python_functions_and_windows(tmp_path):
    units = split_file(os.path.join(SAMPLE, "pkg", "stats.py"))
    assert [(u.function, u.line, u.end_line) for u in units] == PY_UNITS
    assert units[0].text.startswith("def total(values):") and units[0].text.endswith(
        "return result"
    )
    assert units[3].text.lstrip().startswith("@property")
    js = split_file(os.path.join(SAMPLE, "web", "app.js"), window=10, overlap=3)
    assert [(u.line, u.end_line) for u in js] == [(1, 10), (8, 17), (15, 24), (22, 25)]
    bad = tmp_path / "broken.py"
    bad.write_text("def oops(:\n    return 1\n")
    assert [u.function for u in split_file(str(bad))] == ["<lines 1-2>"]  # no parse: windows
    assert window_units("x", "", 5, 1) == []
    assert render("x = 1", META) == "<s>Is there a bug?\nx = 1\nAnswer:"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny base model + tokenizer saved to disk, patched with a 'bugs' classify head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mftk.train.tiny_model import train_tokenizer

    root = tmp_path_factory.mktemp("scan")
    texts = [open(os.path.join(SAMPLE, "pkg", "stats.py")).read()] * 3
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=256,
    )  # fmt: skip
    base = str(root / "base")
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base)
    mftk.patch_model(model, ["gen", "bugs"], rank=4)
    head = add_head(model, "bugs", ["ok", "bug"], meta=META)
    with torch.no_grad():
        head.weight.normal_(0, 3.0)
    adapters = str(root / "adapters")
    mftk.save_adapters(model, adapters)
    return root, adapters, model, tok


def test_scan_report_lists_functions_sorted(classifier, tmp_path, capsys):
    root, adapters, model, tok = classifier
    tree = tmp_path / "tree"
    shutil.copytree(SAMPLE, tree)
    (tree / "pkg" / "broken.py").write_text("def oops(:\n    return 1\n")
    out = tmp_path / "report.json"
    args = ["scan", "--adapters", adapters, "--task", "bugs", "--output", str(out),
            "--table", str(tmp_path / "t.txt"), "--window", "10", "--overlap", "3",
            "--no-progress", str(tree)]  # fmt: skip
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["labels"] == ["ok", "bug"] and rep["negative"] == "ok" and rep["files"] == 3
    units = rep["units"]
    stats = sorted((u["function"], u["line"], u["end_line"]) for u in units
                   if u["file"].endswith("stats.py"))  # fmt: skip
    assert stats == sorted(PY_UNITS)
    assert sum(u["file"].endswith("app.js") for u in units) == 4
    assert sum(u["file"].endswith("broken.py") for u in units) == 1
    assert not any(u["file"].endswith("notes.txt") for u in units)
    scores = [u["score"] for u in units]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 3
    for u in units:
        assert u["score"] == pytest.approx(1 - u["probs"]["ok"])
        assert u["label"] == max(u["probs"], key=u["probs"].get)
    # the score of one function equals the head run directly on its rendered text
    top = units[0]
    text = next(x.text for x in split_file(top["file"], 10, 3) if x.function == top["function"])
    ids = torch.tensor([tok(render(text, META), add_special_tokens=False)["input_ids"][:96]])
    p_bug = float(classify(model, "bugs", ids)[0, 1])
    assert top["score"] == pytest.approx(p_bug, abs=1e-5)
    table = (tmp_path / "t.txt").read_text().splitlines()
    assert table[0].split() == ["file", "function", "line", "label", "score"]
    assert len(table) == 2 + len(units) and top["function"] in table[2]
    # CI gate
    assert main(args + ["--fail-above", "0.0"]) == 1
    assert main(args + ["--fail-above", "1.0"]) == 0
    capsys.readouterr()


def test_scan_errors(classifier, tmp_path, capsys):
    root, adapters, _, _ = classifier
    base = ["scan", "--adapters", adapters, "--no-progress", "--output", str(tmp_path / "r.json")]
    assert main(base + ["--task", "gen", SAMPLE]) == 2
    assert "no classification head" in capsys.readouterr().err
    assert main(base + ["--task", "bugs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--task", "bugs", "--negative", "nah", SAMPLE]) == 2
    assert "--negative" in capsys.readouterr().err
