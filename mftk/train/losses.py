"""Multi-task losses (MFTCoder's cases plus focal and CoBa weights) and router losses.

Notation: ℓ_n the next-token cross-entropy of answer token n, t(n) its task, m_t the number of
answer tokens of task t in the batch, L_t = (1/m_t) Σ_{t(n)=t} ℓ_n the task's token mean, w_t the
task weights (config `loss_weight`, a stage's `loss_weights`, or CoBa's weights), and P the set of
tasks present in the batch (m_t > 0).

- token    (MFTCoder case1):  Σ_n ℓ_n / Σ_t m_t
- balanced (MFTCoder case3):  Σ_{t∈P} w_t L_t / Σ_{t∈P} w_t
- focal    (task-level):      Σ_{t∈P} w_t (1 − p_t)^γ L_t / Σ_{t∈P} w_t,  p_t = exp(−L_t)
  p_t is the task's geometric-mean token probability, so a task the model already predicts well
  (p_t → 1) is down-weighted; γ = 0 is `balanced`. The factor is not detached (as in focal loss).
- coba: `balanced` with w_t = loss_weight_t · coba_t (see mftk.train.coba).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mftk.train.data import IGNORE


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """logits: (B, S, V); targets: (B, S) with -100 = no loss (already shifted, see
    packing.shifted_targets). returns ℓ: (B, S) fp32 (fp64 for fp64 logits), 0 where ignored."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    flat = F.cross_entropy(z, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


def task_token_means(tok_loss: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int):
    """returns (L: (T,) task token means, 0 where absent; m: (T,) answer-token counts, fp32)."""
    mask = (targets != IGNORE) & (task_ids >= 0)
    t = task_ids.clamp(min=0).reshape(-1)
    w = mask.reshape(-1).float()
    sums = torch.zeros(num_tasks, dtype=tok_loss.dtype, device=tok_loss.device)
    sums = sums.index_add(0, t, tok_loss.reshape(-1) * w)
    counts = torch.zeros(num_tasks, dtype=torch.float32, device=tok_loss.device).index_add(0, t, w)
    means = sums / counts.clamp(min=1)
    return means, counts


def combine(
    mode: str, means: Tensor, counts: Tensor, weights: Tensor, gamma: float = 2.0
) -> Tensor:
    """The scalar loss from per-task token means (see the module docstring for each mode).

    means, counts, weights: (T,). mode: token | balanced | focal | coba (coba = balanced; the
    caller passes CoBa's weights)."""
    present = counts > 0
    if not bool(present.any()):
        return means.sum() * 0.0
    if mode == "token":
        return (means * counts).sum() / counts.sum()
    w = torch.where(present, weights.to(means), torch.zeros_like(means))
    if mode in ("balanced", "coba"):
        return (w * means).sum() / w.sum()
    if mode == "focal":
        p = torch.exp(-means)
        return (w * (1 - p).pow(gamma) * means).sum() / w.sum()
    raise ValueError(f"mode: expected token|balanced|focal|coba, got {mode!r}")


def mft_loss(
    logits: Tensor,
    targets: Tensor,
    task_ids: Tensor,
    weights: Tensor,
    mode: str,
    gamma: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """logits: (B, S, V); targets, task_ids: (B, S); weights: (T,).
    returns (loss scalar, per-task token means (T,), per-task answer-token counts (T,))."""
    means, counts = task_token_means(token_losses(logits, targets), targets, task_ids, len(weights))
    return combine(mode, means, counts, weights, gamma), means, counts


def labelled_rows(task_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, labels): the flat indices of the tokens with a task label (id >= 0) and their ids,
    (M,) int64 each. One host sync per batch (the count); every layer then gathers with
    index_select, which, unlike boolean-mask indexing, does not sync again."""
    ids = task_ids.reshape(-1)
    rows = (ids >= 0).nonzero().squeeze(1)
    return rows, ids.index_select(0, rows)


def top1_counts(top: Tensor, num_tasks: int) -> Tensor:
    """(T,) int64: how many of the (M,) top-1 choices picked each task. torch.bincount (and
    one_hot) read the max back to the host on CUDA; this compare-and-sum does not."""
    return (top[:, None] == torch.arange(num_tasks, device=top.device)).sum(0)


def router_losses(router_logits: list[Tensor], task_ids: Tensor) -> dict[str, Tensor]:
    """Router losses averaged over layers.

    router_logits: per patched layer, (..., T) logits for the same N tokens; task_ids: (...) with
    -1 for tokens without a label (padding). For each layer, over labelled tokens:
    - balance = T · Σ_t f_t · P̄_t (Switch Transformer), f_t the fraction of tokens whose top-1 is t,
      P̄_t the mean router probability of t; 1.0 when perfectly balanced.
    - supervision = CE(logits, task label): teaches the router to route unlabeled tokens.
    - accuracy = fraction of tokens whose top-1 is their task (not differentiable).
    """
    if not router_logits:
        raise ValueError("router_logits: empty (is the model patched with a router?)")
    rows, labels = labelled_rows(task_ids)  # once per batch: no host sync inside the layer loop
    bal, sup, acc = [], [], []
    for logits in router_logits:
        z = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        t = z.shape[-1]
        p = z.softmax(-1)
        top = z.argmax(-1)
        f = top1_counts(top, t).to(p.dtype) / max(len(top), 1)
        bal.append(t * (f * p.mean(0)).sum())
        sup.append(F.cross_entropy(z, labels))
        acc.append((top == labels).to(p.dtype).mean())
    return {
        "balance": torch.stack(bal).mean(),
        "supervision": torch.stack(sup).mean(),
        "accuracy": torch.stack(acc).mean().detach(),
    }
