"""mftk compare refuses runs over different bases (issue 14: compare fairly): the base's identity
from metrics.json / eval.json, --allow-different-bases, the average over the tasks runs share."""

import json

import pytest

from mftk.apps.compare import base_identity, common_tasks, different_bases, load_run
from mftk.cli import main


def metrics(folder, losses, model):
    """A trainer metrics.json in folder (only what compare reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = {"eval_after": losses, "steps": 10, "train_seconds": 1.0, "model": model}
    (folder / "metrics.json").write_text(json.dumps(d))
    return str(folder)


TINY_A = {"source": "tiny", "cache": "/x/out/cache/base-aaaa", "base": "base-aaaa"}
TINY_B = {"source": "tiny", "cache": "/x/out/cache/base-bbbb", "base": "base-bbbb"}
GEN = {"completion": 0.5, "bugs": 0.2, "docstrings": 0.4}


def test_base_identity():
    assert base_identity(TINY_A) == "base-aaaa"
    assert base_identity({"source": "tiny", "cache": "/y/cache/base-cccc/"}) == "base-cccc"
    assert base_identity({"source": "/models/llama"}) == "/models/llama"
    assert base_identity(None) is None and base_identity({}) is None


def test_same_base_in_different_cache_folders_compares(tmp_path, capsys):
    other = {**TINY_A, "cache": "/elsewhere/runs/cache/base-aaaa"}
    a = metrics(tmp_path / "a", GEN, TINY_A)
    b = metrics(tmp_path / "b", {k: v * 0.9 for k, v in GEN.items()}, other)
    assert main(["compare", a, b, "--names", "shared,per_task"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "-10.0%" in out
    assert [line.split() for line in out.splitlines() if line.startswith("base")] == [
        ["base", "base-aaaa", "base-aaaa"]
    ]


def test_different_bases_are_refused_naming_the_runs(tmp_path, capsys):
    a = metrics(tmp_path / "a", GEN, TINY_A)
    b = metrics(tmp_path / "b", GEN, TINY_B)
    assert main(["compare", a, b, "--names", "shared,per_task"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert "bases differ" in err and "shared: base-aaaa" in err and "per_task: base-bbbb" in err
    assert "--allow-different-bases" in err
    assert main(["compare", a, b, "--names", "shared,per_task", "--allow-different-bases"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("WARNING: the runs' bases differ") and "mix bases" in out
    assert "completion loss" in out  # the table still follows


def test_hf_paths_differ(tmp_path, capsys):
    a = metrics(tmp_path / "a", GEN, {"source": "/models/a"})
    b = metrics(tmp_path / "b", GEN, {"source": "/models/b"})
    assert main(["compare", a, b]) == 2
    assert "/models/a" in capsys.readouterr().err


def test_eval_json_takes_the_base_beside_it(tmp_path, capsys):
    run = tmp_path / "run"
    metrics(run, GEN, TINY_B)
    ev = {"tasks": {t: {"loss": v} for t, v in GEN.items()}, "average_loss": 0.3667}
    (run / "eval.json").write_text(json.dumps(ev))  # an older eval.json: no "model"
    assert load_run(str(run))["base"] == "base-bbbb"
    assert load_run(str(run / "eval.json"))["base"] == "base-bbbb"
    (run / "eval.json").write_text(json.dumps({**ev, "model": TINY_A}))
    assert load_run(str(run))["base"] == "base-aaaa"  # its own entry first
    a = metrics(tmp_path / "a", GEN, TINY_A)
    assert main(["compare", a, str(run)]) == 0
    capsys.readouterr()


def test_unrecorded_base_is_noted_not_refused(tmp_path, capsys):
    a = metrics(tmp_path / "a", GEN, TINY_A)
    b = metrics(tmp_path / "b", GEN, None)
    assert main(["compare", a, b, "--names", "new,old"]) == 0
    captured = capsys.readouterr()
    assert "old: its base is not recorded" in captured.err and "WARNING" not in captured.out
    runs = [load_run(a), load_run(b)]
    assert different_bases(runs, ["new", "old"]) is None


def test_average_over_the_tasks_all_runs_share(tmp_path, capsys):
    """A classify task in one run only (config.yaml's bug_detection) stays out of the average."""
    a = metrics(tmp_path / "a", GEN, TINY_A)
    b = metrics(tmp_path / "b", {**GEN, "bug_detection": 0.9}, TINY_A)
    runs = [load_run(a), load_run(b)]
    assert common_tasks(runs) == ["completion", "bugs", "docstrings"]
    assert common_tasks(runs[:1]) is None
    assert runs[1]["average_loss"] == pytest.approx(0.5)  # its own, over its four tasks
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("average loss"))
    assert "(completion, bugs, docstrings)" in row
    assert row.split()[-2:] == ["0.3667", "0.3667"]
    assert "+0.0%" in out and "bug_detection loss" in out
