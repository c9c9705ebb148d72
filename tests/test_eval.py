"""mftk eval / compare and the baseline modes: pass@k estimator, router accuracy, eval of tiny runs
(per-task, shared, router), the exec path through the sandbox, single-task runs, the CLI."""

import copy
import json
import math
import os
from fractions import Fraction
from math import comb

import pytest
import torch
import yaml

import mftk
from mftk.apps.eval_metrics import load_problems, pass_at_k, router_hits, truncate_completion
from mftk.apps.evaluate import Evaluator, evaluate_run, format_table
from mftk.apps.sandbox import run_program
from mftk.train.config import ConfigError, config_from_dict, single_task
from mftk.train.loop import Trainer
from mftk.train.parallel import Single
from mftk.train.run import load_run

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")
PROBLEMS = os.path.join(EXAMPLE, "data", "exec", "problems.jsonl")


# ----------------------------------------------------------------------------- pure functions


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                got = pass_at_k(n, c, k)
                assert abs(got - float(exact)) < 1e-12, (n, c, k, got, float(exact))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 1, 200) == 1.0
    # large n (no overflow): 1 - C(150, 10) / C(200, 10)
    assert pass_at_k(200, 50, 10) == pytest.approx(1 - comb(150, 10) / comb(200, 10), rel=1e-12)


def test_pass_at_k_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="c"):
        pass_at_k(5, 6, 1)
    with pytest.raises(TypeError, match="n"):
        pass_at_k(5.0, 1, 1)


def test_router_hits_on_a_constructed_case():
    # 6 tokens, 3 tasks; token 3 is padding (-1); two layers
    ids = torch.tensor([[0, 1, 2, -1, 1, 0]])
    top_a = torch.tensor([0, 1, 0, 2, 1, 2])  # right, right, wrong, (pad), right, wrong
    top_b = torch.tensor([0, 0, 2, 0, 1, 0])  # right, wrong, right, (pad), right, right
    logits = [
        torch.nn.functional.one_hot(t, 3).float() * 3 + torch.randn(6, 3) * 0.1
        for t in (top_a, top_b)
    ]
    correct, total = router_hits(logits, ids, 3)
    assert total.tolist() == [4.0, 4.0, 2.0]  # per task: tokens x 2 layers
    assert correct.tolist() == [3.0, 3.0, 1.0]
    assert float(correct.sum() / total.sum()) == pytest.approx(0.7)
    mask = torch.tensor([[True, True, False, True, False, True]])  # e.g. answer tokens only
    correct, total = router_hits(logits, ids, 3, mask)
    assert total.tolist() == [4.0, 2.0, 0.0] and correct.tolist() == [3.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="routes"):
        router_hits([torch.zeros(6, 2)], ids, 3)


def test_truncate_completion():
    body = "return a + b\n"
    assert truncate_completion(body + "\ndef other():\n    pass\n") == body
    assert truncate_completion(body + "\nprint(add(1, 2))") == body
    assert truncate_completion("x = 1\n    if x:\n        return x\n") == (
        "x = 1\n    if x:\n        return x\n"
    )  # indented statements stay


def test_bundled_problems_are_solvable_and_checked():
    problems = load_problems(PROBLEMS)
    assert 10 <= len(problems) <= 30
    for p in problems:
        good = run_program(p["prompt"] + p["canonical_solution"], p["tests"], timeout=5)
        assert good.passed, (p["task_id"], good.stderr)
    # the tests reject a wrong body (checked on a few, to keep this fast)
    for p in problems[:4]:
        assert not run_program(p["prompt"] + "return None\n", p["tests"], timeout=5).passed


def test_load_problems_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"task_id": "a", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="tests"):
        load_problems(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_problems(str(bad))


# ----------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache_eval"))


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    """Three of the bundled problems (keeps generation + sandbox runs short)."""
    path = tmp_path_factory.mktemp("exec") / "problems.jsonl"
    with open(PROBLEMS) as f:
        path.write_text("".join(f.readlines()[:3]))
    return str(path)


def raw_config(cache_dir, out, problems, **adapter):
    with open(os.path.join(EXAMPLE, "config-shared.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["model"]["pretrain"]["steps"] = 40
    raw["model"]["cache_dir"] = cache_dir
    raw["data"]["eval_max_samples"] = 8
    raw["train"].update(eval_every=100, log_every=100, warmup_steps=2, threads=1)
    raw["stages"] = [{"name": "train", "steps": 12}]
    raw["output"] = {"dir": str(out)}
    raw["adapter"] = {"rank": 4, "alpha": 8, **adapter}
    raw["tasks"][0]["exec_problems"] = problems
    for t in raw["tasks"]:  # absolute, so that the dict also works written elsewhere
        t["data"] = os.path.join(os.path.abspath(EXAMPLE), t["data"])
    return raw


def train(raw):
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    return cfg, trainer, trainer.train(), raw


@pytest.fixture(scope="module")
def per_task_run(cache_dir, problems_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("per_task")
    return train(raw_config(cache_dir, out, problems_file, mode="per_task"))


@pytest.fixture(scope="module")
def shared_run(cache_dir, problems_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared")
    return train(raw_config(cache_dir, out, problems_file, mode="shared", match_params=True))


def test_eval_reproduces_the_trainers_eval_and_runs_exec(per_task_run):
    cfg, trainer, metrics, _ = per_task_run
    res = evaluate_run(
        cfg, os.path.join(cfg.output.dir, "adapters"), log=lambda m: None, samples=2, ks=(1, 2),
        max_new_tokens=16,
    )  # fmt: skip
    assert res["mode"] == "per_task" and "router_accuracy" not in res
    for t in ("completion", "bugs", "docstrings"):
        v = res["tasks"][t]
        # same split, packing and loss code as the trainer's own final eval
        assert v["loss"] == pytest.approx(metrics["eval_after"][t], rel=1e-6), t
        assert v["perplexity"] == pytest.approx(math.exp(v["loss"]))
        assert v["tokens"] > 0
    assert res["average_loss"] == pytest.approx(sum(metrics["eval_after"].values()) / 3, rel=1e-6)
    ex = res["tasks"]["completion"]["exec"]
    assert ex["problems"] == 3 and sum(ex["statuses"].values()) == 3 * (1 + 2)
    for k in ("pass@1_greedy", "pass@1", "pass@2"):
        assert 0.0 <= ex[k] <= 1.0
    # the summary follows from the per-problem outcomes of the real generations
    rows = ex["per_problem"]
    assert ex["pass@1_greedy"] == sum(r["greedy_passed"] for r in rows) / len(rows)
    for k in (1, 2):
        want = sum(pass_at_k(2, r["samples_passed"], k) for r in rows) / len(rows)
        assert ex[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    assert ex["statuses"].get("passed", 0) == sum(
        r["greedy_passed"] + r["samples_passed"] for r in rows
    )
    assert "exec" not in res["tasks"]["bugs"]
    json.dumps(res)  # JSON-ready
    table = format_table(res)
    assert "completion" in table and "pass@2" in table and "average" in table


def test_exec_scores_known_completions(per_task_run, problems_file, monkeypatch):
    """The exec path with completions of known correctness: canonical bodies pass, a loop and a
    socket fail; pass@k follows the estimator over the sampled ones."""
    cfg, _, _, _ = per_task_run
    ev = Evaluator(cfg, os.path.join(cfg.output.dir, "adapters"), log=lambda m: None)
    problems = load_problems(problems_file)
    answers = {p["prompt"]: p["canonical_solution"] for p in problems}
    bad = ["while True:\n        pass\n", "import socket\n    return socket.socket()\n"]

    def fake_generate(task, prompt, n, sample, max_new_tokens, **kw):
        assert task == "completion"
        if not sample:
            return [answers[prompt]]
        return ([answers[prompt]] + bad * n)[:n]  # 1 correct of n

    monkeypatch.setattr(ev, "generate", fake_generate)
    res = ev.exec_metrics("completion", problems, samples=3, ks=(1, 2, 3), timeout=1)
    assert res["pass@1_greedy"] == 1.0
    assert res["pass@1"] == pytest.approx(1 / 3)
    assert res["pass@2"] == pytest.approx(pass_at_k(3, 1, 2))
    assert res["pass@3"] == 1.0
    # 3 greedy + 3 sampled canonical bodies pass; per problem one loop, one socket sample
    assert res["statuses"] == {"passed": 6, "timeout": 3, "blocked": 3}
    assert [r["samples_passed"] for r in res["per_problem"]] == [1, 1, 1]


def test_shared_mode_has_one_adapter_with_matched_parameters(shared_run, per_task_run):
    cfg, trainer, metrics, _ = shared_run
    assert mftk.task_names(trainer.model) == ["shared"]
    layers = mftk.patch.adapter_layers(trainer.model)
    assert all(m.num_tasks == 1 and m.rank == 3 * 4 for _, m in layers)  # match_params: T * r
    # the same scaling alpha / r as the per-task setup (alpha 8 / rank 4)
    assert all(float(m.lora_scaling[0]) == pytest.approx(2.0) for _, m in layers)
    n_shared = sum(p.numel() for p in mftk.adapter_parameters(trainer.model))
    n_per_task = sum(p.numel() for p in mftk.adapter_parameters(per_task_run[1].model))
    assert n_shared == n_per_task
    # per-task metrics are still per task, and every task learned through the one adapter
    for t in ("completion", "bugs", "docstrings"):
        assert metrics["eval_after"][t] < metrics["eval_before"][t], t
    assert sorted(os.listdir(os.path.join(cfg.output.dir, "peft"))) == ["shared"]
    res = evaluate_run(cfg, os.path.join(cfg.output.dir, "adapters"), exec_eval=False)
    assert res["mode"] == "shared" and res["adapter_parameters"] == n_shared
    for t in ("completion", "bugs", "docstrings"):
        assert res["tasks"][t]["loss"] == pytest.approx(metrics["eval_after"][t], rel=1e-6)


def test_shared_mode_config_errors(cache_dir, problems_file, tmp_path):
    raw = raw_config(cache_dir, tmp_path, problems_file, mode="per_task", match_params=True)
    with pytest.raises(ConfigError, match="adapter.match_params"):
        config_from_dict(raw, EXAMPLE)
    raw = raw_config(cache_dir, tmp_path, problems_file, mode="shared", router="softmax")
    with pytest.raises(ConfigError, match="adapter.router"):
        config_from_dict(raw, EXAMPLE)
    raw = raw_config(cache_dir, tmp_path, problems_file, mode="both")
    with pytest.raises(ConfigError, match="adapter.mode"):
        config_from_dict(raw, EXAMPLE)
    raw = raw_config(cache_dir, tmp_path, problems_file)
    raw["tasks"][0]["exec_problems"] = None
    with pytest.raises(ConfigError, match=r"tasks\[0\].exec_problems"):
        config_from_dict(raw, EXAMPLE)


def test_router_accuracy_matches_the_trainer(cache_dir, problems_file, tmp_path):
    raw = raw_config(cache_dir, tmp_path / "r", problems_file, router="softmax")
    cfg, trainer, metrics, _ = train(raw)
    res = evaluate_run(cfg, os.path.join(cfg.output.dir, "adapters"), exec_eval=False)
    assert res["mode"] == "router"
    # all-token accuracy is the trainer's definition (labelled tokens, layers weighted equally)
    assert res["router_accuracy"] == pytest.approx(metrics["router_accuracy"], rel=1e-6)  # fp32
    assert 0.0 <= res["router_accuracy_answer"] <= 1.0
    per_layer = res["router_accuracy_answer_per_layer"]
    assert len(per_layer) == len(mftk.patch.adapter_layers(trainer.model))
    mean = sum(per_layer.values()) / len(per_layer)
    assert mean == pytest.approx(res["router_accuracy_answer"], abs=1e-9)
    for t in ("completion", "bugs", "docstrings"):
        assert 0.0 <= res["tasks"][t]["router_accuracy_all"] <= 1.0


def test_single_task_run_trains_only_its_adapter(cache_dir, problems_file, tmp_path):
    raw = raw_config(cache_dir, tmp_path / "s", problems_file, mode="per_task")
    cfg = single_task(config_from_dict(copy.deepcopy(raw), EXAMPLE), "bugs")
    assert cfg.output.dir.endswith("s-bugs") and all(s.mix == {"bugs": 1.0} for s in cfg.stages)
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    m = trainer.train()
    for _, layer in mftk.patch.adapter_layers(trainer.model):
        assert layer.lora_b[0].abs().max() == 0 and layer.lora_b[2].abs().max() == 0
        assert layer.lora_b[1].abs().max() > 0
    assert m["eval_after"]["bugs"] < m["eval_before"]["bugs"]
    for t in ("completion", "docstrings"):  # untouched adapters: exactly the base model
        assert m["eval_after"][t] == pytest.approx(m["eval_before"][t], rel=1e-9)
    with pytest.raises(ConfigError, match="--task"):
        single_task(config_from_dict(copy.deepcopy(raw), EXAMPLE), "bug")


def test_cli_eval_and_compare(per_task_run, shared_run, tmp_path, capsys):
    from mftk.cli import main

    outs = []
    for cfg, _, _, raw in (per_task_run, shared_run):
        name = os.path.basename(cfg.output.dir)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        path = tmp_path / f"{name}.json"
        rc = main(["eval", str(tmp_path / f"{name}.yaml"), "--adapters", cfg.output.dir,
                   "--no-exec", "--json", str(path)])  # fmt: skip
        assert rc == 0 and path.is_file()
        outs.append(str(path))
    table = capsys.readouterr().out
    assert "mode per_task" in table and "mode shared" in table
    png = tmp_path / "cmp.png"
    assert main(["compare", *outs, "--names", "per_task,shared", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "per_task" in out and "shared" in out and "average loss" in out and "bugs loss" in out
    assert png.stat().st_size > 5_000
    bad = ["eval", str(tmp_path / f"{name}.yaml"), "--adapters", str(tmp_path / "nowhere")]
    assert main(bad) == 2
    assert main(["compare", str(tmp_path / "nowhere")]) == 2


def test_adapter_settings_share_one_base(
    per_task_run, shared_run, cache_dir, problems_file, tmp_path
):
    """The tiny base's cache key hashes no adapter setting: per_task, shared, router and hybrid
    over the same tasks and seed load one tokenizer and base (issue 14: compare fairly)."""
    bases = {m["model"]["base"] for _, _, m, _ in (per_task_run, shared_run)}
    tokenizers = {m["model"]["tokenizer"] for _, _, m, _ in (per_task_run, shared_run)}
    for adapter in ({"router": "softmax"}, {"mode": "hybrid", "match_params": True}):
        cfg = config_from_dict(raw_config(cache_dir, tmp_path, problems_file, **adapter), EXAMPLE)
        info = load_run(cfg, str(tmp_path), lambda m: None, Single(cfg)).model_info
        bases.add(info["base"])
        tokenizers.add(info["tokenizer"])
    assert len(bases) == 1 and len(tokenizers) == 1, (bases, tokenizers)
    assert os.path.basename(per_task_run[2]["model"]["cache"]) == bases.pop()
