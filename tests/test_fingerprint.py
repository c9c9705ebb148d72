"""The run fingerprint a checkpoint carries: --resume names the settings that changed, lets a
setting a newer mftk added pass at its default, and keeps the key earlier checkpoints stored."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import yaml

from mftk.train.config import ConfigError, config_from_dict
from mftk.train.fingerprint import fingerprint_changes, run_fingerprint, run_key
from mftk.train.progress import check_same_run

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")


def _cfg(**over):
    with open(os.path.join(EXAMPLE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    for section, keys in over.items():
        raw[section].update(keys)
    return config_from_dict(raw, EXAMPLE)


def test_run_key_is_the_hash_earlier_checkpoints_stored():
    cfg = _cfg()
    d = cfg.to_dict()
    for k in ("output", "base_dir", "distributed"):
        d.pop(k)
    for k in ("log_every", "threads", "device"):
        d["train"].pop(k)
    old = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert run_key(cfg) == old
    assert run_key(cfg, world=2) != old  # the global batch doubles
    assert run_key(_cfg(train={"log_every": 7, "threads": 1})) == old  # not the loss curve


def test_changes_name_each_setting():
    fp = run_fingerprint(_cfg())
    new = run_fingerprint(_cfg(adapter={"rank": 16}, train={"lr": 0.01}))
    assert sorted(fingerprint_changes(fp, new)) == [
        "adapter.rank: 8 -> 16",
        "train.lr: 0.003 -> 0.01",
    ]
    assert fingerprint_changes(fp, copy.deepcopy(fp)) == []
    # per-rank batch 4 on 2 ranks is the one-rank batch 8
    one, two = _cfg(train={"batch_size": 8}), _cfg(train={"batch_size": 4})
    assert fingerprint_changes(run_fingerprint(one), run_fingerprint(two, world=2)) == []
    fewer = run_fingerprint(_cfg())
    fewer["tasks"] = fewer["tasks"][:2]
    (line,) = fingerprint_changes(fewer, fp)
    assert line.startswith("tasks: [")
    renamed = copy.deepcopy(fp)
    renamed["tasks"][1]["name"] = "bugz"
    assert fingerprint_changes(renamed, fp) == ['tasks[1].name: "bugz" -> "bugs"']


def test_a_setting_a_newer_version_added_passes_at_its_default():
    fp = run_fingerprint(_cfg())
    older = copy.deepcopy(fp)
    del older["adapter"]["dropout"]  # written before the setting existed
    del older["loss"]["coba"]  # a whole section, too
    assert fingerprint_changes(older, fp) == []
    on = run_fingerprint(_cfg(adapter={"dropout": 0.1}))
    assert fingerprint_changes(older, on) == ["adapter.dropout: (not in the checkpoint) -> 0.1"]
    gone = copy.deepcopy(fp)
    gone["adapter"]["a_setting_since_removed"] = 3
    assert fingerprint_changes(gone, fp) == []


def test_check_same_run_with_and_without_the_fingerprint():
    cfg = _cfg()
    st = {"run_key": run_key(cfg), "run_config": run_fingerprint(cfg)}
    check_same_run(st, cfg, 1)
    with pytest.raises(ConfigError, match=r"adapter\.rank: 8 -> 4; .*Use a new --output"):
        check_same_run(st, _cfg(adapter={"rank": 4}), 1)
    with pytest.raises(ConfigError, match=r"train\.batch_size: 8 -> 16 \(the global batch: "):
        check_same_run(st, cfg, 2)
    old = {"run_key": run_key(cfg)}  # a checkpoint from before the fingerprint: the key only
    check_same_run(old, cfg, 1)
    with pytest.raises(ConfigError, match="written by a run with a different config"):
        check_same_run(old, _cfg(adapter={"rank": 4}), 1)
