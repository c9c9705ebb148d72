"""train.batch_tokens: token-budget micro-batches (rows × the longest row <= the budget without
packing; batch_tokens // seq_len rows of seq_len with packing), their config checks, the epoch
count under a budget, and a short training run whose every batch keeps the budget."""

import copy
import os
import random

import pytest
import yaml

import mftk.train.step as step_mod
from mftk.train.config import ConfigError, config_from_dict
from mftk.train.data import IGNORE, Sample
from mftk.train.loop import Trainer
from mftk.train.packing import MultiTaskSampler, eval_batches, pack_rows
from mftk.train.run import batch_limits, epoch_steps

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")


def samples(lengths, task=0):
    return [Sample(task, list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1))) for n in lengths]


def padded(rows):
    return len(rows) * max(sum(len(s) for s in r) for r in rows)


def test_pack_rows_stops_at_the_token_budget():
    smp = samples([5, 3, 8, 2, 2, 9, 4])
    rows, used = pack_rows(smp, seq_len=10, max_rows=100, packing=False, max_tokens=16)
    # 5, 3: 2 rows × 5 = 10; + 8: 3 × 8 = 24 > 16 -> stop
    assert [[len(s) for s in r] for r in rows] == [[5], [3]] and used == 2
    rows, used = pack_rows(smp[2:], seq_len=10, max_rows=100, packing=False, max_tokens=16)
    assert [[len(s) for s in r] for r in rows] == [[8], [2]] and used == 2
    # a sample alone over the budget's share still opens the first row
    rows, used = pack_rows(samples([9, 1]), seq_len=10, max_rows=100, packing=False, max_tokens=9)
    assert used == 1 and padded(rows) == 9


def test_eval_batches_keep_the_budget_and_cover_the_data():
    rng = random.Random(0)
    lengths = [rng.randrange(2, 33) for _ in range(200)]
    smp = samples(lengths)
    for budget in (32, 45, 100, 257):
        batches = eval_batches(smp, budget, 32, False, pad_id=0, max_tokens=budget)
        assert all(b.input_ids.numel() <= budget for b in batches), budget
        assert sum(b.num_tokens for b in batches) == sum(lengths)
        flat = [row[row != 0].tolist() for b in batches for row in b.input_ids]
        assert [len(r) for r in flat] == lengths  # every sample once, in order
        # greedy: the next sample would have broken each batch's budget
        k = 0
        for b in batches[:-1]:
            k += b.input_ids.shape[0]
            longest = max(b.input_ids.shape[1], lengths[k])
            assert (b.input_ids.shape[0] + 1) * longest > budget


def test_sampler_budget_batches_cover_an_epoch():
    rng = random.Random(1)
    tasks = [samples([rng.randrange(2, 20) for _ in range(40)], t) for t in range(2)]
    for t, task in enumerate(tasks):  # tell the samples apart
        for k, s in enumerate(task):
            s.input_ids[0] = 1000 * t + k
    sampler = MultiTaskSampler(tasks, seed=0, vocab_size=50)
    drawn = []
    while len(drawn) < 80:
        rows = sampler.next_rows(60, 20, False, max_tokens=60)
        assert padded(rows) <= 60 and all(len(r) == 1 for r in rows)
        drawn.extend(r[0].input_ids[0] for r in rows)
    # each task's first epoch is a permutation of its samples: the first 40 of one task are all
    firsts = {t: [x for x in drawn if x // 1000 == t] for t in range(2)}
    for t in range(2):
        n = min(40, len(firsts[t]))
        assert len(set(firsts[t][:n])) == n


def raw_config(cache_dir, out, **train):
    with open(os.path.join(EXAMPLE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["model"]["pretrain"]["steps"] = 20
    raw["model"]["cache_dir"] = str(cache_dir)
    raw["data"]["eval_max_samples"] = 8
    raw["train"].pop("batch_size")
    raw["train"].update(eval_every=100, log_every=100, warmup_steps=0, threads=1, **train)
    raw["stages"] = [{"name": "train", "steps": 4}]
    raw["output"] = {"dir": str(out)}
    return raw


def test_config_checks(tmp_path):
    raw = raw_config(tmp_path, tmp_path / "out", batch_tokens=300)
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    assert cfg.train.batch_size == 2 and batch_limits(cfg) == (2, None)  # 300 // 128 rows
    raw["data"]["packing"] = False
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    assert batch_limits(cfg) == (300, 300)
    bad = copy.deepcopy(raw)
    bad["train"]["batch_size"] = 4
    with pytest.raises(ConfigError, match=r"^train\.batch_tokens: .*not both"):
        config_from_dict(bad, EXAMPLE)
    bad = copy.deepcopy(raw)
    bad["train"]["batch_tokens"] = 100
    with pytest.raises(ConfigError, match=r"^train\.batch_tokens: must be >= data\.seq_len"):
        config_from_dict(bad, EXAMPLE)
    bad = copy.deepcopy(raw)
    bad["distributed"] = {"strategy": "fsdp2"}
    bad["tasks"] = bad["tasks"][:3]  # fsdp2 refuses classify tasks
    with pytest.raises(ConfigError, match=r"^train\.batch_tokens: without data\.packing"):
        config_from_dict(bad, EXAMPLE)


def test_epoch_steps_count_budget_batches(tmp_path):
    raw = raw_config(tmp_path, tmp_path / "out", batch_tokens=64, grad_accum=2)
    raw["data"].update(packing=False, seq_len=32)
    cfg = config_from_dict(raw, EXAMPLE)

    class D:  # a TaskData's training split
        train = samples([30, 2, 2, 20, 20, 20, 32, 5])

    # in order: [30, 2] (2×30), [2, 20] (2×20 + 20 would be 3×20), [20, 20], [32, 5] -> 4 batches
    assert epoch_steps(cfg, [D], 1) == 2


def test_training_run_keeps_the_budget(tmp_path, monkeypatch):
    raw = raw_config(tmp_path / "cache", tmp_path / "out", batch_tokens=400)
    raw["data"]["packing"] = False
    shapes = []
    real = step_mod.rows_to_batch

    def spy(rows, *a, **k):
        batch = real(rows, *a, **k)
        shapes.append(tuple(batch.input_ids.shape))
        return batch

    monkeypatch.setattr(step_mod, "rows_to_batch", spy)
    cfg = config_from_dict(raw, EXAMPLE)
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    metrics = trainer.train()
    assert len(shapes) == 4 and all(b * s <= 400 for b, s in shapes), shapes
    assert any(b > 400 // 128 for b, _ in shapes)  # more rows than a seq_len budget would give
    assert all(b * s <= 400 for b, s in (tuple(e.input_ids.shape) for e in trainer.eval_set))
    assert metrics["train_tokens"] == sum(trainer.history["tokens"]) > 0
