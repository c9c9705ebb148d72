"""Loss modes and router losses against hand computations (float64 loops over tokens and
samples, and MFTCoder's four cases on hand-picked token losses). CoBa's weights are in
test_train_coba.py."""

import math

import pytest
import torch

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
