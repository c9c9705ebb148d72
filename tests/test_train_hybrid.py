"""adapter.mode: hybrid in the trainer: the config's adapter section as one AdapterSpec (equal
parameters with match_params), config errors naming the key, and a short run of the tiny example
whose checkpoint loads back through from_pretrained to the same eval loss."""

from __future__ import annotations

import copy
import os

import pytest
from test_train_loop import EXAMPLE, cache_dir, example_raw, run  # noqa: F401 (fixture)

import mftk
from mftk.apps.evaluate import Evaluator
from mftk.train.config import ConfigError, config_from_dict
from mftk.train.run import adapter_spec


def _cfg(raw, **adapter):
    raw = copy.deepcopy(raw)
    raw["adapter"].update(adapter)
    return config_from_dict(raw, EXAMPLE)


def test_adapter_spec_from_config(cache_dir, tmp_path):  # noqa: F811
    raw = example_raw(cache_dir, tmp_path / "o")
    n = len(raw["tasks"])
    spec = adapter_spec(_cfg(raw, mode="hybrid", match_params=True))
    assert (spec.rank, spec.shared_rank) == (4, n * 4)  # T*8 = T*4 + T*4
    assert spec.alpha == 8.0 and spec.shared_alpha == 2.0 * n * 4  # alpha / rank kept at 2
    spec = adapter_spec(_cfg(raw, mode="hybrid", shared_rank=6))
    assert (spec.rank, spec.alpha, spec.shared_rank, spec.shared_alpha) == (8, 16.0, 6, 12.0)
    gen = dict(raw, tasks=[t for t in raw["tasks"] if t.get("type") != "classify"])
    shared = adapter_spec(_cfg(gen, mode="shared", match_params=True))
    k = len(gen["tasks"])
    assert (shared.rank, shared.alpha, shared.mode) == (8 * k, 16.0 * k, "per_task")
    for adapter, key in [
        (dict(shared_rank=4), "adapter.shared_rank"),
        (dict(mode="hybrid", match_params=True, shared_rank=4), "adapter.shared_rank"),
        (dict(mode="hybrid", shared_alpha=-1), "adapter.shared_alpha"),
        (dict(mode="hybrid", match_params=True, rank=1), "adapter.rank"),
        (dict(mode="mixed"), "adapter.mode"),
    ]:
        with pytest.raises(ConfigError, match=key):
            _cfg(raw, **adapter)


def test_hybrid_run_trains_and_reloads(cache_dir, tmp_path):  # noqa: F811
    over = dict(adapter={"mode": "hybrid", "match_params": True}, stages=[{"steps": 12}],
                train={"eval_every": 12})  # fmt: skip
    out = tmp_path / "h"
    trainer, m, _ = run(example_raw(cache_dir, out, **over))
    model = trainer.run.model
    per_task = run(example_raw(cache_dir, tmp_path / "p", stages=[{"steps": 1}]))[0].run.model
    n = sum(p.numel() for p in mftk.adapter_parameters(model))
    assert n == sum(p.numel() for p in mftk.adapter_parameters(per_task))  # equal parameters
    layer = mftk.core.adapter_layers(model)[0][1]
    assert layer.shared_b.abs().sum() > 0 and layer.lora_b.abs().sum() > 0  # both trained
    gen = ["completion", "bugs", "docstrings"]  # (the classifier head starts untrained)
    assert all(m["eval_after"][t] < m["eval_before"][t] for t in gen), m["eval_after"]
    saved = mftk.checkpoint.read_config(os.path.join(out, "adapters"))
    assert saved.mode == "hybrid" and saved.shared_rank == layer.shared_rank
    # a fresh model built from the config, with the saved adapters: the same held-out losses
    ev = Evaluator(trainer.cfg, os.path.join(out, "adapters"), run_dir=str(out), log=lambda _: 0)
    got = ev.loss_metrics()["tasks"]
    for t, want in m["eval_after"].items():
        if "/" not in t:
            assert got[t]["loss"] == pytest.approx(want, rel=1e-6), t
