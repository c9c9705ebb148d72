"""CoBa's task weights: against values worked out by hand from the published formulas over a
history that crosses the warm-up, against a transcription of MFTCoder's update over random
histories, its sampling interval and absent tasks, the slope against numpy's polyfit; and the
evaluation-driven variant (coba_eval) against a reference over synthetic histories, with its state
round trip."""

import math

import numpy as np
import pytest

from mftk.train.coba import CoBa, slope
from mftk.train.coba_eval import EvalCoBa
from mftk.train.config import LossConfig
from mftk.train.losses import build_loss

# ----------------------------------------------------------------------------- CoBa


def drive(c, points, steps):
    """Run CoBa as the trainer does for each c in steps: begin_step(c), the training step, then
    observe the next point when eval_batches asks. points: raw losses, one per observation."""
    seen = list(points)
    for step in steps:
        c.begin_step(step)
        if c.eval_batches(step, 5) and seen:
            c.observe(seen.pop(0))


def softmax2(a, b):
    return 1 / (1 + math.exp(b - a)), 1 / (1 + math.exp(a - b))


def test_coba_weights_by_hand_across_the_warmup():
    init = [2.0, 4.0]
    # l_i = L_i / L_i(0) observed after the steps that followed c = 1..5 completed steps:
    # task 0 plateaus, task 1 (the worse one) speeds up its descent
    norm = [[0.90, 0.99], [0.85, 0.985], [0.83, 0.97], [0.82, 0.94], [0.83, 0.90]]
    c = CoBa(2, history_length=3, warmup_steps=3, tau=5.0)
    c.begin(init)
    c.begin([9.0, 9.0])  # later evaluations do not move L(0)
    raw = [[x * i for x, i in zip(p, init)] for p in norm]
    drive(c, raw, range(3))
    assert c.current is None and len(c.history) == 2  # warm-up: the static weights stay
    drive(c, raw[2:], range(3, 7))  # updates at c = 3..6
    # slopes (3 points: (y3 - y1) / 2; 2 points: y2 - y1) over the last H=3 points, from c = W
    # c=3: points 1,2 (from before the warm-up); c=4: 1..3; c=5: 2..4; c=6: 3..5
    a0 = [-0.05, -0.035, -0.015, 0.0]
    a1 = [-0.005, -0.01, -0.0225, -0.035]
    amax = a1  # task 1 is the worst at every point
    assert np.allclose(c.slopes, list(zip(a0, a1)), atol=1e-15)
    assert np.allclose(c.max_slopes, amax, atol=1e-15)
    rcs = softmax2(2 * a0[-1] / 0.035, 2 * a1[-1] / 0.035)  # softmax(N α / Σ|α|)
    # ACS over the last J = 3 slopes (c = 4, 5, 6): -J α_i / Σ_k |α_i(k)|
    acs = softmax2(-3 * a0[-1] / (0.035 + 0.015 + 0.0), -3 * a1[-1] / (0.01 + 0.0225 + 0.035))
    # DF over all K = 4 slopes since the warm-up, not capped at 1
    x = [5 * (-4 * a / 0.0725) for a in amax]
    df = 4 * math.exp(x[-1]) / sum(math.exp(v) for v in x)
    assert df > 3.8 and abs(c.last["df"] - df) < 1e-12
    w0, w1 = softmax2(*[2 * (df * r + (1 - df) * q) for r, q in zip(rcs, acs)])
    assert w1 < 1 / 20  # below the floor 1/(10N): w (1 - N/(10N)) + 1/(10N)
    want = [0.9 * w0 + 0.05, 0.9 * w1 + 0.05]
    assert np.abs(np.asarray(c.current) - want).max() < 1e-12, (c.current, want)
    loss = build_loss(LossConfig(mode="coba"), 3)
    assert loss.weights([2.0, 0.0, 1.0]).tolist() == [2.0, 0.0, 1.0]  # before: static
    loss.coba.current = [0.2, 0.3, 0.5]
    w = loss.weights([2.0, 0.0, 1.0])  # after: CoBa's replace them; weight 0 stays 0
    assert w.tolist() == pytest.approx([0.2, 0.0, 0.5])


def mftcoder_reference(points, c, warmup, hist_len, tau):
    """MFTCoder's compute_per_task_weight at completed step c (update interval 1), transcribed
    with numpy: points[k] is observed after step k + 1 (k < c - 1), the slope of every update
    from the warm-up on is recomputed, ACS from the slope list's index max(0, c - H)."""
    h = np.asarray(points, dtype=np.float64)
    per, tot = [], []
    for step in range(warmup, c + 1):
        win = h[: step - 1][-min(step, hist_len) :]
        x = np.arange(len(win))
        per.append([np.polyfit(x, win[:, i], 1)[0] if len(win) > 1 else 0.0 for i in range(2)])
        tot.append(np.polyfit(x, win.max(1), 1)[0] if len(win) > 1 else 0.0)
    per, tot = np.asarray(per).T, np.asarray(tot)

    def sm(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    a, n = per[:, -1], 2
    rcs = sm(n * a / np.abs(a).sum())
    hist = per[:, max(0, c - hist_len) :]
    acs = sm((-hist.shape[1] * hist / np.abs(hist).sum(1, keepdims=True))[:, -1])
    df = sm(-len(tot) * tot / np.abs(tot).sum() * tau)[-1] * len(tot)
    w = sm(n * (df * rcs + (1 - df) * acs))
    if (w < 1 / (10 * n)).any():
        w = w * (1 - 1 / 10) + 1 / (10 * n)
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coba_matches_mftcoder_update_on_random_histories(seed):
    rng = np.random.default_rng(seed)
    steps = 14
    t = np.arange(1, steps)[:, None]
    points = np.exp(-rng.uniform(0.01, 0.1, 2) * t) + 0.01 * rng.normal(size=(steps - 1, 2))
    c = CoBa(2, history_length=16, warmup_steps=6, tau=5.0)
    c.begin([1.0, 1.0])
    drive(c, points.tolist(), range(steps))
    want = mftcoder_reference(points, steps - 1, 6, 16, 5.0)
    assert np.abs(np.asarray(c.current) - want).max() < 1e-12, (c.current, want)


def test_coba_samples_every_interval_and_skips_absent_tasks():
    c = CoBa(2, history_length=4, warmup_steps=0, tau=5.0, update_interval=2, eval_batches=2)
    assert [c.eval_batches(s, 3) for s in range(7)] == [[], [], [2, 0], [], [1, 2], [], [0, 1]]
    c.begin([2.0, 1.0])
    c.begin_step(0)
    assert c.current == [0.5, 0.5]  # W = 0: an update at step 0 on no history: uniform
    for v in ([1.8, math.nan], [1.6, 0.9], [1.4, 0.0], [1.2, 0.7]):  # nan, 0: task 1 absent
        c.observe(v)
    c.begin_step(2)
    assert c.slopes[-1] == pytest.approx([-0.1, -0.2])  # task 1: 0.9, 0.7 as consecutive points
    assert len(c.history) == 4 and math.isnan(c.history[0][1])
    d = CoBa(2, history_length=4, warmup_steps=0, tau=5.0, update_interval=2, eval_batches=2)
    d.load_state_dict(c.state_dict())
    for x in (c, d):
        x.observe([1.1, 0.65])
        x.begin_step(4)
    assert c.current == d.current and c.slopes == d.slopes
    with pytest.raises(ValueError, match="val_losses"):
        c.observe([1.0])
    with pytest.raises(ValueError, match="begin"):
        CoBa(2).observe([1.0, 1.0])


def test_slope_matches_polyfit():
    v = list(np.random.default_rng(0).normal(size=9))
    assert abs(slope(v) - np.polyfit(np.arange(9), v, 1)[0]) < 1e-12
    assert slope([3.0]) == 0.0


# ----------------------------------------------------------------------------- coba_eval


def coba_eval_reference(history, hist_len, tau):
    """coba_eval's weights after the last update, transcribed with numpy from its formula."""
    h = np.asarray(history, dtype=np.float64)
    lnorm = h / h[0]
    n = h.shape[1]
    slopes, mslopes = [], []
    for k in range(1, len(h)):
        win = lnorm[max(0, k + 1 - hist_len) : k + 1]
        x = np.arange(len(win))
        slopes.append([np.polyfit(x, win[:, i], 1)[0] for i in range(n)])
        mslopes.append(np.polyfit(x, win.max(1), 1)[0])
    sl = np.asarray(slopes[-hist_len:])
    ms = np.asarray(mslopes[-hist_len:])
    t = len(sl)
    a = sl[-1]

    def sm(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    rcs = sm(n * a / np.abs(a).sum())
    acs = sm(-t * a / np.abs(sl).sum(0))
    df = min(1.0, t * sm(tau * (-t * ms / np.abs(ms).sum()))[-1])
    w = sm(n * (df * rcs + (1 - df) * acs))
    w = np.maximum(w, 1 / (10 * n))
    return w / w.sum(), df


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coba_eval_weights_on_synthetic_history(seed):
    rng = np.random.default_rng(seed)
    steps = np.arange(12)
    # task 0 converges fast, task 1 slowly, task 2 plateaus then diverges (overfits)
    hist = np.stack(
        [
            3.0 * np.exp(-0.3 * steps),
            2.0 * np.exp(-0.05 * steps),
            1.5 * np.exp(-0.2 * np.minimum(steps, 5)) + 0.06 * np.maximum(steps - 5, 0),
        ],
        1,
    )
    hist = hist * (1 + 0.01 * rng.normal(size=hist.shape))
    c = EvalCoBa(3, history_length=4, warmup_steps=5, tau=5.0)
    for k, row in enumerate(hist):
        w = c.update(list(row), step=k)
        if k < 5:
            assert w == [1 / 3] * 3  # warm-up: uniform
    want, df = coba_eval_reference(hist, 4, 5.0)
    assert np.abs(np.asarray(w) - want).max() < 1e-12, (w, want)
    assert abs(c.last["df"] - df) < 1e-12
    assert abs(sum(w) - 1) < 1e-12 and min(w) >= 1 / 30 / 1.0001
    # the slowly converging task gets more weight than the fast one; the diverging one the least
    assert w[1] > w[0] and w[2] < w[1]


def test_coba_eval_state_round_trip():
    c = EvalCoBa(2, history_length=3, warmup_steps=0)
    for v in ([2.0, 1.0], [1.5, 0.9], [1.2, 0.95], [1.0, 0.97]):
        c.update(v, step=10)
    d = EvalCoBa(2, history_length=3, warmup_steps=0)
    d.load_state_dict(c.state_dict())
    assert c.update([0.9, 1.0], 11) == d.update([0.9, 1.0], 11)
    with pytest.raises(ValueError, match="val_losses"):
        c.update([1.0], 12)
