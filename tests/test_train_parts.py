"""The trainer's parts on their own: the loss registry and CoBa's state in its loss object, the
per-task meter, and how the strategies hand out evaluation batches."""

import pytest
import torch

import mftk.train.distributed as D
from mftk.train.checks import LOSS_MODES
from mftk.train.config import LossConfig
from mftk.train.losses import LOSSES, CobaLoss, build_loss, combine
from mftk.train.parallel import Single
from mftk.train.step import TaskMeter


def test_every_config_loss_mode_has_a_loss_object():
    assert tuple(LOSSES) == LOSS_MODES
    means = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    counts = torch.tensor([3.0, 5.0, 0.0])
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    for mode in LOSS_MODES:
        obj = build_loss(LossConfig(mode=mode, focal_gamma=1.5), 3)
        assert torch.equal(obj(means, counts, w), combine(mode, means, counts, w, 1.5)), mode
    with pytest.raises(ValueError, match="mode"):
        build_loss(LossConfig(mode="case5"), 3)


def test_coba_state_lives_in_its_loss_object():
    cfg = LossConfig(mode="coba")
    cfg.coba.warmup_steps, cfg.coba.history_length = 3, 3
    loss = build_loss(cfg, 2)
    assert isinstance(loss, CobaLoss)
    loss.update([3.0, 3.0], 0)  # the first evaluation: CoBa's L(0)
    for step, v in enumerate([[2.0, 2.9], [1.5, 2.8], [1.2, 2.75]]):
        loss.begin_step(step)
        assert loss.weights([2.0, 1.0]).tolist() == [2.0, 1.0]  # warm-up: the static weights
        assert loss.eval_batches(step, 4) == ([] if step == 0 else [step % 4])
        loss.observe(v)
    loss.begin_step(3)
    moved = loss.weights([2.0, 1.0])
    assert moved.tolist() != [2.0, 1.0] and abs(moved.sum().item() - 1) < 1e-6  # CoBa's own
    fresh = build_loss(cfg, 2)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.weights([2.0, 1.0]), moved)
    for x in (loss, fresh):
        x.observe([1.0, 2.7])
        x.begin_step(4)
    assert torch.equal(fresh.weights([2.0, 1.0]), loss.weights([2.0, 1.0]))
    assert build_loss(LossConfig(mode="balanced"), 2).state_dict() == {}
    assert build_loss(LossConfig(mode="balanced"), 2).eval_batches(5, 4) == []


def test_task_meter_sums_batches_in_float64_in_order():
    meter = TaskMeter(2, 1)
    rows = [
        (torch.tensor([0.25, 1.5]), torch.tensor([4.0, 2.0]), torch.tensor(0.125)),
        (torch.tensor([1.0 / 3, 0.0]), torch.tensor([3.0, 0.0]), torch.tensor(2.0)),
    ]
    want = torch.zeros(5, dtype=torch.float64)
    for means, counts, s in rows:
        meter.add(means, counts, s)
        want += torch.cat([(means * counts).double(), counts.double(), s.double().reshape(1)])
    assert torch.equal(meter.total(), want)
    assert torch.equal(TaskMeter(3, 2).total(), torch.zeros(8, dtype=torch.float64))


def test_eval_batches_per_strategy():
    batches = list("abcde")  # stand-ins: the strategies only hand them out
    one = Single.__new__(Single)
    assert one.eval_batches(batches) == [(b, True) for b in batches]
    got = []
    for rank in range(3):
        par = D.FSDP2.__new__(D.FSDP2)  # no process group needed
        par.rank, par.world = rank, 3
        got.append(par.eval_batches(batches))
    assert all(len(g) == 2 for g in got)  # the same number of forwards on every rank
    mine = sorted(b for g in got for b, keep in g if keep)
    assert mine == batches  # each batch counted once
    assert got[2][1] == ("a", False)  # rank 2 runs out: repeats batch 0, uncounted
