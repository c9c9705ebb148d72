"""The trainer's options on the tiny example (reduced steps): a stage of one task at loss weight 0,
CoBa's sampled eval batches every interval, the sample loss modes, epochs, warm-up fractions and
min_lr against the schedule by hand, early stopping, and keep-best checkpoints (ranks, ties, hard
links)."""

import json
import math
import os

import pytest
from test_train_loop import Recorder, example_raw, run

import mftk.train.loop as loop_mod
import mftk.train.report as report
from mftk.train.checkpointing import keep_best
from mftk.train.loop import Trainer
from mftk.train.run import lr_lambda


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache"))


def test_stage_of_one_task_at_weight_zero_trains_nothing(cache_dir, tmp_path):
    """A batch holding only a task of loss weight 0 has loss 0 and zero gradients (it was 0/0:
    NaN in every adapter)."""
    stage = {"name": "off", "steps": 3, "mix": {"bugs": 1}, "loss_weights": {"bugs": 0}}
    _, m, _ = run(example_raw(cache_dir, tmp_path / "z", stages=[stage], train={"eval_every": 9}))
    assert m["history"]["loss"] == [0.0, 0.0, 0.0]
    assert m["eval_after"] == m["eval_before"]  # every adapter and head as it started


def test_coba_samples_eval_batches_every_interval(cache_dir, tmp_path, monkeypatch):
    calls = []
    real = loop_mod.sampled_task_losses

    def spy(run_, par, batches):
        calls.append([next(i for i, b in enumerate(run_.eval_set) if b is x) for x in batches])
        return real(run_, par, batches)

    monkeypatch.setattr(loop_mod, "sampled_task_losses", spy)
    coba = {"warmup_steps": 4, "history_length": 4, "update_interval": 2, "eval_batches": 2}
    over = dict(stages=[{"name": "all", "steps": 8}], loss={"mode": "coba", "coba": coba})
    trainer, m, _ = run(example_raw(cache_dir, tmp_path / "c", **over))
    n = len(trainer.run.eval_set)
    assert calls == [[(2 * k + s) % n for s in range(2)] for k in (1, 2, 3)]  # after c = 2, 4, 6
    w = m["history"]["task_weights"]
    assert w[:4] == [[1.0] * 4] * 4  # warm-up: the static weights
    assert w[4] == w[5] == [0.25] * 4  # c = 4: one point (from c = 2), no slope yet: uniform
    assert w[6] == w[7] != w[4] and abs(sum(w[6]) - 1) < 1e-6  # c = 6: two points


@pytest.mark.parametrize("mode", ["sample", "task_sample"])
def test_sample_modes_train(cache_dir, tmp_path, mode):
    over = dict(stages=[{"name": "all", "steps": 6}], loss={"mode": mode})
    _, m, _ = run(example_raw(cache_dir, tmp_path / mode, **over))
    assert all(math.isfinite(v) for v in m["history"]["loss"])
    assert m["eval_after"]["completion"] < m["eval_before"]["completion"]


def test_epochs_warmup_fraction_min_lr_and_epoch_checkpoints(cache_dir, tmp_path):
    raw = example_raw(cache_dir, tmp_path / "e")
    raw.pop("stages")
    lr, min_lr = 0.003, 0.0004
    raw["train"].update(epochs=1.5, warmup_steps=0.25, min_lr=min_lr, batch_size=16, eval_every=99)
    raw["output"].update(save_every=None, save_every_epoch=True, keep_last=9)
    trainer, m, logs = run(raw)
    rows, used, seq_len = 0, None, raw["data"]["seq_len"]  # greedy packing, by hand
    for n in (len(s) for d in trainer.run.data for s in d.train):
        if used is not None and used + n <= seq_len:
            used += n
        else:
            rows, used = rows + 1, n
    per_epoch = math.ceil(rows // 16 / 1)
    total = math.ceil(1.5 * per_epoch)
    assert m["steps"] == total and any(f"{total} steps ({per_epoch} an epoch)" in x for x in logs)
    assert sorted(os.listdir(tmp_path / "e" / "checkpoints")) == [
        f"step-{per_epoch:06d}",
        f"step-{total:06d}",
    ]
    warm = int(0.25 * total)
    want = [lr * (s + 1) / warm for s in range(warm)] + [
        min_lr + (lr - min_lr) / 2 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        for s in range(warm, total)
    ]
    assert max(abs(a - b) for a, b in zip(m["history"]["lr"], want)) < 1e-15


def test_lr_schedules_end_at_min_lr_or_ten_percent():
    for kind in ("cosine", "linear"):
        assert abs(lr_lambda(kind, 2, 10)(10) - 0.1) < 1e-15  # default: 10% of lr
        assert abs(lr_lambda(kind, 2, 10, 0.0)(10)) < 1e-15
        assert abs(lr_lambda(kind, 2, 10, 0.25)(6) - (1 - 0.75 * 0.5)) < 1e-15  # halfway
    assert lr_lambda("constant", 2, 10, 0.0)(9) == 1.0


def test_early_stopping_and_keep_best(cache_dir, tmp_path, monkeypatch):
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.2, 9.0])  # eval at steps 0, 2, 4, 6, 8
    monkeypatch.setattr(Trainer, "evaluate", lambda self: dict.fromkeys(self.tasks, next(losses)))
    logdirs = []
    monkeypatch.setattr(report, "_tensorboard", lambda d: logdirs.append(d) or Recorder())
    out = tmp_path / "s"
    over = dict(
        stages=[{"name": "all", "steps": 20}],
        train={"eval_every": 2, "early_stopping_patience": 2},
        output={"save_every": 2, "keep_last": 1, "keep_best": 1, "tb_dir": str(tmp_path / "tb")},
    )
    raw = example_raw(cache_dir, out, **over)
    _, m, logs = run(raw)
    assert m["steps"] == 8 and any("early stopping at step 8" in x for x in logs)
    assert m["early_stopping"] == {
        "best": {"step": 4, "eval_loss": 3.0},
        "stopped_at": 8,
        "patience": 2,
    }
    ck = out / "checkpoints"
    assert sorted(os.listdir(ck)) == ["best", "step-000008"]
    assert sorted(os.listdir(ck / "best")) == ["scores.json", "step-000004"]
    assert json.loads((ck / "best" / "scores.json").read_text()) == {"step-000004": 3.0}
    assert sorted(os.listdir(ck / "best" / "step-000004")) == sorted(os.listdir(ck / "step-000008"))
    assert logdirs == [str(tmp_path / "tb")]
    _, again, _ = run(raw, resume=True)  # a stopped run stays stopped
    assert again["steps"] == 8 and len(again["history"]["loss"]) == 8


def test_keep_best_ranks_ties_and_links(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step-{step:06d}" / "adapters").mkdir(parents=True)
        (root / f"step-{step:06d}" / "adapters" / "w.bin").write_bytes(bytes([step]))
    assert [
        os.path.basename(p) for p in keep_best(str(root), str(root / "step-000002"), 3.0, 2)
    ] == ["step-000002"]
    keep_best(str(root), str(root / "step-000004"), 2.0, 2)
    kept = keep_best(str(root), str(root / "step-000006"), 2.0, 2)  # a tie: the later first
    assert [os.path.basename(p) for p in kept] == ["step-000006", "step-000004"]
    kept = keep_best(str(root), str(root / "step-000008"), float("inf"), 2)
    assert sorted(os.listdir(root / "best")) == ["scores.json", "step-000004", "step-000006"]
    linked = root / "best" / "step-000004" / "adapters" / "w.bin"
    assert linked.read_bytes() == bytes([4])
    assert os.stat(linked).st_ino == os.stat(root / "step-000004" / "adapters" / "w.bin").st_ino
