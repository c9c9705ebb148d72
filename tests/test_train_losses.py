"""Loss modes and router losses against hand computations (float64 loops over tokens); CoBa
weights on synthetic histories against an independent transcription of the formula."""

import math

import numpy as np
import pytest
import torch

from mftk.train.coba import CoBa, slope
from mftk.train.data import IGNORE
from mftk.train.losses import (
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


# ----------------------------------------------------------------------------- CoBa


def coba_reference(history, hist_len, tau):
    """CoBa weights after the last update, transcribed with numpy from the formula."""
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


def test_slope_matches_polyfit():
    v = list(np.random.default_rng(0).normal(size=9))
    assert abs(slope(v) - np.polyfit(np.arange(9), v, 1)[0]) < 1e-12
    assert slope([3.0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coba_weights_on_synthetic_history(seed):
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
    c = CoBa(3, history_length=4, warmup_steps=5, tau=5.0)
    for k, row in enumerate(hist):
        w = c.update(list(row), step=k)
        if k < 5:
            assert w == [1 / 3] * 3  # warm-up: uniform
    want, df = coba_reference(hist, 4, 5.0)
    assert np.abs(np.asarray(w) - want).max() < 1e-12, (w, want)
    assert abs(c.last["df"] - df) < 1e-12
    assert abs(sum(w) - 1) < 1e-12 and min(w) >= 1 / 30 / 1.0001
    # the slowly converging task gets more weight than the fast one; the diverging one the least
    assert w[1] > w[0] and w[2] < w[1]


def test_coba_state_round_trip():
    c = CoBa(2, history_length=3, warmup_steps=0)
    for v in ([2.0, 1.0], [1.5, 0.9], [1.2, 0.95], [1.0, 0.97]):
        c.update(v, step=10)
    d = CoBa(2, history_length=3, warmup_steps=0)
    d.load_state_dict(c.state_dict())
    assert c.update([0.9, 1.0], 11) == d.update([0.9, 1.0], 11)
    with pytest.raises(ValueError, match="val_losses"):
        c.update([1.0], 12)
