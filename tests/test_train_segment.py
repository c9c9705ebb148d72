"""The trainer with adapter.router: segment (mftk.segment_router): config errors, the warm start
on true task ids, and a short run in which the supervised router learns to route."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from test_train_loop import EXAMPLE, example_raw, run

import mftk.train.step as step_mod
from mftk.checkpoint import WEIGHTS_NAME
from mftk.train.config import ConfigError, config_from_dict


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache"))


def segment_raw(cache_dir, out, **over):
    raw = example_raw(cache_dir, out, **over)
    raw["adapter"]["router"] = "segment"
    raw["loss"]["router_balance"] = 0.0
    raw["tasks"] = [t for t in raw["tasks"] if t.get("type") != "classify"]
    raw["stages"] = [{"steps": 12}]
    raw["train"].update(eval_every=12, router_warmup_steps=4)
    raw["output"] = {"dir": str(out)}
    return raw


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda r: r["adapter"].update(router="segmnt"), "did you mean 'segment'?"),
        (lambda r: r["adapter"].update(top_k=1), "adapter.top_k: the segment router routes"),
        (lambda r: r["adapter"].update(router_layer=-2), "adapter.router_layer: must be >= -1"),
        (
            lambda r: r["adapter"].update(router="softmax", router_layer=0),
            "adapter.router_layer: only with adapter.router: segment",
        ),
        (
            lambda r: r["adapter"].update(router=None),
            "train.router_warmup_steps: only with adapter.router: segment",
        ),
        (lambda r: r["train"].update(router_warmup_steps=-1), "must be >= 0, got -1"),
        (
            lambda r: r["adapter"].update(router="softmax", straight_through=True),
            "adapter.straight_through: only with router: segment",
        ),
        (
            lambda r: r.update(distributed={"strategy": "fsdp2"}),
            "adapter.router: the segment router trains in one process",
        ),
    ],
)
def test_config_errors(cache_dir, tmp_path, change, expect):
    raw = segment_raw(cache_dir, tmp_path)
    change(raw)
    with pytest.raises(ConfigError, match=expect.replace("?", r"\?")):
        config_from_dict(raw, EXAMPLE)


def test_router_layer_out_of_range(cache_dir, tmp_path):
    raw = segment_raw(cache_dir, tmp_path)
    raw["adapter"]["router_layer"] = 2  # the tiny model has decoder layers 0 and 1
    with pytest.raises(ConfigError, match="adapter.router_layer: expected -1 .. 1"):
        run(raw)


def test_warm_start_then_own_routes_and_it_learns(cache_dir, tmp_path, monkeypatch):
    calls = []
    real = step_mod.use_segment_router

    def spy(model, seq_ids, prompt, true_ids=None, **kw):
        calls.append((model.training, true_ids is not None))
        return real(model, seq_ids, prompt, true_ids, **kw)

    monkeypatch.setattr(step_mod, "use_segment_router", spy)
    raw = segment_raw(cache_dir, tmp_path / "s", train={"lr": 0.01})
    _, m, _ = run(raw)
    train = [t for training, t in calls if training]
    assert train == [True] * 4 + [False] * 8  # warm start: the true ids for 4 steps
    assert not any(t for training, t in calls if not training)  # evaluation: its own routes
    acc = m["history"]["router_accuracy"]
    ans = m["history"]["router_accuracy_answer"]
    assert len(acc) == len(ans) == 2 and acc[-1] > acc[0] and acc[-1] > 0.9, acc
    assert m["router_accuracy_answer"] == ans[-1] > 0.9
    with safe_open(str(tmp_path / "s" / "adapters" / WEIGHTS_NAME), framework="pt") as f:
        assert {"segment_router.weight", "segment_router.bias"} <= set(f.keys())


def test_straight_through_in_training_only(cache_dir, tmp_path, monkeypatch):
    """adapter.straight_through: the training forwards after the warm start pass it to the
    router (the loss then trains it too), evaluation never does; the run still learns to route."""
    calls = []
    real = step_mod.use_segment_router

    def spy(model, seq_ids, prompt, true_ids=None, straight_through=False):
        calls.append((model.training, straight_through))
        return real(model, seq_ids, prompt, true_ids, straight_through)

    monkeypatch.setattr(step_mod, "use_segment_router", spy)
    raw = segment_raw(cache_dir, tmp_path / "st", train={"lr": 0.01})
    raw["adapter"]["straight_through"] = True
    _, m, _ = run(raw)
    assert [st for training, st in calls if training] == [True] * 12
    assert not any(st for training, st in calls if not training)
    assert m["router_accuracy_answer"] > 0.9
