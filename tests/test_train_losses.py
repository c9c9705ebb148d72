"""Loss modes and router losses against hand computations (float64 loops over tokens and
samples, and MFTCoder's four cases on hand-picked token losses); CoBa's weights against values
worked out by hand from the published formulas over a history that crosses the warm-up, and
against a transcription of MFTCoder's update over random histories."""

import math

import numpy as np
import pytest
import torch

from mftk.train.coba import CoBa, slope
from mftk.train.coba_eval import EvalCoBa
from mftk.train.config import LossConfig
from mftk.train.data import IGNORE
from mftk.train.losses import (
    build_loss,
    combine,
    labelled_rows,
    mft_loss,
    router_losses,
    token_losses,
    top1_counts,
)

B, S, V, T = 3, 11, 13, 4


@pytest.fixture
def batch():
    logits = torch.randn(B, S, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, S))
    targets[torch.rand(B, S) < 0.35] = IGNORE
    task_ids = torch.randint(0, T - 1, (B, S))  # task T-1 is absent from the batch
    task_ids[2, 7:] = -1  # padding
    targets[2, 7:] = IGNORE
    weights = torch.tensor([0.6, 0.4, 1.7, 5.0], dtype=torch.float64)
    return logits, targets, task_ids, weights


def hand_token_losses(logits, targets, task_ids):
    """{task: [ℓ_n, ...]} by a plain loop: ℓ = logsumexp(z) - z[target]."""
    out = {}
    for b in range(B):
        for s in range(S):
            y, t = int(targets[b, s]), int(task_ids[b, s])
            if y == IGNORE or t < 0:
                continue
            z = logits[b, s]
            out.setdefault(t, []).append(torch.logsumexp(z, 0) - z[y])
    return out


def hand_loss(mode, logits, targets, task_ids, weights, gamma=2.0):
    per = hand_token_losses(logits, targets, task_ids)
    if mode == "token":
        allv = [v for vs in per.values() for v in vs]
        return sum(allv) / len(allv)
    num, den = 0.0, 0.0
    for t, vs in per.items():
        mean = sum(vs) / len(vs)
        f = (1 - torch.exp(-mean)) ** gamma if mode == "focal" else 1.0
        num = num + weights[t] * f * mean
        den = den + weights[t]
    return num / den


@pytest.mark.parametrize(
    "mode, gamma", [("token", 0), ("balanced", 0), ("coba", 0), ("focal", 2.0), ("focal", 0.5)]
)
def test_loss_modes_match_hand_computation(batch, mode, gamma):
    logits, targets, task_ids, weights = batch
    got, means, counts = mft_loss(logits, targets, task_ids, weights, mode, gamma)
    want = hand_loss(mode, logits, targets, task_ids, weights, gamma)
    assert abs(got.item() - want.item()) < 1e-12, (got.item(), want.item())
    assert counts[T - 1] == 0 and means[T - 1] == 0
    g_got = torch.autograd.grad(got, logits)[0]
    g_want = torch.autograd.grad(want, logits)[0]
    err = (g_got - g_want).abs().max().item()
    assert err < 1e-12, f"grad max err {err}"
    # prompt / padding tokens carry no loss and get no gradient
    no_loss = (targets == IGNORE) | (task_ids < 0)
    assert g_got[no_loss].abs().max() == 0 and g_got[~no_loss].abs().max() > 0


def test_focal_gamma_zero_is_balanced_and_downweights_easy_tasks():
    means = torch.tensor([0.05, 2.0, 1.0], dtype=torch.float64)
    counts = torch.tensor([3.0, 5.0, 0.0])
    w = torch.ones(3, dtype=torch.float64)
    assert combine("focal", means, counts, w, 0.0) == combine("balanced", means, counts, w)
    # easy task 0 (p = e^-0.05) contributes (1-p)^2 ≈ 0.0024 of its loss
    focal = combine("focal", means, counts, w, 2.0).item()
    want = ((1 - math.exp(-0.05)) ** 2 * 0.05 + (1 - math.exp(-2.0)) ** 2 * 2.0) / 2
    assert abs(focal - want) < 1e-14
    assert combine("token", means, torch.zeros(3), w).item() == 0.0
    with pytest.raises(ValueError, match="mode"):
        combine("case5", means, counts, w)


def test_token_losses_bf16_upcast():
    logits = torch.randn(2, 5, 7).bfloat16()
    targets = torch.randint(0, 7, (2, 5))
    out = token_losses(logits, targets)
    assert out.dtype == torch.float32


def test_labelled_rows_and_top1_counts_match_mask_and_bincount():
    ids = torch.tensor([[2, -1, 0, 4], [-1, 2, 2, -1]])  # (B, S), task 1 and 3 never picked
    rows, labels = labelled_rows(ids)
    keep = ids.reshape(-1) >= 0
    assert torch.equal(rows, keep.nonzero().squeeze(1))
    assert torch.equal(labels, ids.reshape(-1)[keep])
    top = torch.randint(0, 5, (37,))
    top[top == 3] = 1
    assert torch.equal(top1_counts(top, 5), torch.bincount(top, minlength=5))
    assert torch.equal(top1_counts(top[:0], 5), torch.zeros(5, dtype=torch.int64))
    none = labelled_rows(torch.full((3,), -1))
    assert none[0].numel() == 0 and none[1].numel() == 0


def test_router_losses_match_hand_computation():
    n_layers, N = 3, 17
    logits = [torch.randn(N, T, dtype=torch.float64, requires_grad=True) for _ in range(n_layers)]
    ids = torch.randint(0, T, (N,))
    ids[:3] = -1
    got = router_losses(logits, ids)
    bal, sup, acc = 0.0, 0.0, 0.0
    keep = [n for n in range(N) if ids[n] >= 0]
    for z in logits:
        p = [torch.softmax(z[n], 0) for n in keep]
        top = [int(z[n].argmax()) for n in keep]
        f = [top.count(t) / len(keep) for t in range(T)]
        pbar = [sum(pi[t] for pi in p) / len(keep) for t in range(T)]
        bal = bal + T * sum(f[t] * pbar[t] for t in range(T))
        sup = sup + sum(-torch.log_softmax(z[n], 0)[ids[n]] for n in keep) / len(keep)
        acc += sum(top[i] == int(ids[n]) for i, n in enumerate(keep)) / len(keep)
    assert abs(got["balance"].item() - bal.item() / n_layers) < 1e-12
    assert abs(got["supervision"].item() - sup.item() / n_layers) < 1e-12
    assert abs(got["accuracy"].item() - acc / n_layers) < 1e-12
    g = torch.autograd.grad(got["supervision"] + got["balance"], logits)
    gw = torch.autograd.grad(sup / n_layers + bal / n_layers, logits)
    assert max((a - b).abs().max().item() for a, b in zip(g, gw)) < 1e-12
    with pytest.raises(ValueError, match="router_logits"):
        router_losses([], ids)


# ----------------------------------------------------------------------------- MFTCoder's cases


def hand_case_losses(tok, seq, task, w):
    """MFTCoder's four cases over one row of token losses, by hand: tok, seq, task are lists
    (seq -1: padding)."""
    samples = {}
    for v, j, t in zip(tok, seq, task):
        if j >= 0:
            samples.setdefault(j, (t, []))[1].append(v)
    per_task = {}
    for t, vs in samples.values():
        per_task.setdefault(t, []).append(vs)
    tokens = [v for _, vs in samples.values() for v in vs]
    means = [sum(vs) / len(vs) for _, vs in samples.values()]
    L = {t: sum(sum(v) for v in vss) / sum(len(v) for v in vss) for t, vss in per_task.items()}
    M = {t: sum(sum(v) / len(v) for v in vss) / len(vss) for t, vss in per_task.items()}
    wsum = sum(w[t] for t in per_task)
    return {
        "token": sum(tokens) / len(tokens),
        "sample": sum(means) / len(means),
        "balanced": sum(w[t] * L[t] for t in per_task) / wsum,
        "task_sample": sum(w[t] * M[t] for t in per_task) / wsum,
    }


def case_loss(mode, tok, seq, task, w):
    t = torch.tensor([tok], dtype=torch.float64)
    ids = torch.tensor([task])
    obj = build_loss(LossConfig(mode=mode), len(w))
    means, counts = obj.stats(t, torch.zeros_like(ids), ids, torch.tensor([seq]), len(w))
    return obj(means, counts, torch.tensor(w, dtype=torch.float64)).item()


def test_mftcoder_cases_on_hand_picked_token_losses():
    # task 0: samples [1, 3] (mean 2) and [5]; task 1: one sample [4, 8] (mean 6); then padding
    tok, seq, task, w = [1, 3, 5, 4, 8, 9], [0, 0, 1, 2, 2, -1], [0, 0, 0, 1, 1, -1], [1.0, 3.0]
    want = {
        "token": 21 / 5,  # (1+3+5+4+8) / 5
        "sample": 13 / 3,  # (2 + 5 + 6) / 3
        "balanced": 21 / 4,  # (1·3 + 3·6) / 4, task 0's token mean 9/3
        "task_sample": 21.5 / 4,  # (1·3.5 + 3·6) / 4, task 0's sample mean (2+5)/2
    }
    assert hand_case_losses(tok, seq, task, w) == pytest.approx(want, abs=1e-15)
    for mode, v in want.items():
        assert abs(case_loss(mode, tok, seq, task, w) - v) < 1e-14, mode


def sample_batch():
    """A packed (B, S) batch: several samples per row, a sample without answer tokens, task 3
    absent, padding."""
    seq = torch.tensor(
        [[0] * 4 + [1] * 5 + [2] * 2, [0] * 6 + [1] * 5, [0] * 3 + [1] * 4 + [-1] * 4]
    )
    task = torch.tensor(
        [[0] * 4 + [2] * 5 + [0] * 2, [1] * 6 + [1] * 5, [0] * 3 + [2] * 4 + [-1] * 4]
    )
    targets = torch.randint(0, V, (B, S))
    targets[torch.rand(B, S) < 0.3] = IGNORE
    targets[0, 9:] = IGNORE  # row 0's third sample has no answer token: not counted
    targets[seq < 0] = IGNORE
    for b, s in ((0, 0), (0, 4), (1, 0), (1, 6), (2, 0), (2, 3)):
        targets[b, s] = 1  # every other sample keeps an answer token
    logits = torch.randn(B, S, V, dtype=torch.float64, requires_grad=True)
    return logits, targets, task, seq


@pytest.mark.parametrize("mode", ["sample", "task_sample"])
def test_sample_modes_match_hand_loop_with_gradients(mode):
    logits, targets, task, seq = sample_batch()
    weights = torch.tensor([0.6, 0.4, 1.7, 5.0], dtype=torch.float64)
    got, means, counts = mft_loss(logits, targets, task, weights, mode, seq_ids=seq)
    samples = {}
    for b in range(B):
        for s in range(S):
            if targets[b, s] != IGNORE and seq[b, s] >= 0:
                z = logits[b, s]
                ell = torch.logsumexp(z, 0) - z[targets[b, s]]
                samples.setdefault((b, int(seq[b, s])), (int(task[b, s]), []))[1].append(ell)
    assert (0, 2) not in samples and len(samples) == 6
    per = {}
    for t, vs in samples.values():
        per.setdefault(t, []).append(sum(vs) / len(vs))
    if mode == "sample":
        want = sum(m for ms in per.values() for m in ms) / len(samples)
    else:
        want = sum(weights[t] * sum(ms) / len(ms) for t, ms in per.items())
        want = want / sum(weights[t] for t in per)
    assert abs(got.item() - want.item()) < 1e-12
    assert counts.tolist() == [2.0, 2.0, 2.0, 0.0]
    g_got, g_want = torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0]
    assert (g_got - g_want).abs().max().item() < 1e-12


def test_sample_modes_without_packing_are_mftcoder_rows():
    """seq_ids None: each row is one sample, as MFTCoder's case2/case4 over padded rows."""
    logits, targets, task_ids, weights = batch.__wrapped__()
    task_ids = torch.tensor([[0] * S, [1] * S, [0] * 7 + [-1] * 4])
    tl = token_losses(logits, targets).detach()
    n = ((targets != IGNORE) & (task_ids >= 0)).sum(1)
    row = (tl * (task_ids >= 0)).sum(1) / n  # MFTCoder: sum(losses, 1) / effective tokens
    got2, _, _ = mft_loss(logits, targets, task_ids, weights, "sample")
    got4, _, _ = mft_loss(logits, targets, task_ids, weights, "task_sample")
    assert abs(got2.item() - row.mean().item()) < 1e-12
    case4 = (weights[0] * (row[0] + row[2]) / 2 + weights[1] * row[1]) / (weights[0] + weights[1])
    assert abs(got4.item() - case4.item()) < 1e-12


@pytest.mark.parametrize("mode", ["token", "sample", "balanced", "task_sample", "focal"])
def test_weight_zero_task_is_left_out_never_nan(mode):
    means = torch.tensor([0.7, 2.0, 1.3], dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([3.0, 5.0, 2.0])
    # the case: the batch holds only the task of weight 0 -> 0, zero gradients
    alone = combine(mode, means, torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert alone.item() == 0.0
    assert torch.autograd.grad(alone, means)[0].abs().max() == 0
    # mixed: the weight-0 task leaves the normalisation (the other tasks' loss as if it weren't)
    w = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    got = combine(mode, means, counts, w)
    without = combine(mode, means[1:], counts[1:], w[1:])
    assert torch.isfinite(got) and abs(got.item() - without.item()) < 1e-15
    assert torch.autograd.grad(got, means)[0][0] == 0


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
