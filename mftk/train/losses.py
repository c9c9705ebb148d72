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

Each mode is a TaskLoss in LOSSES, which `loss.mode` names: calling it combines the per-task
means into the loss; `weights` turns the static task weights into a step's; `update` takes each
evaluation's per-task losses; `state_dict` / `load_state_dict` carry its state through
checkpoints (CoBa's slope history lives in its object). A new mode is a TaskLoss subclass, its
LOSSES entry and its name in mftk.train.checks.LOSS_MODES.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mftk.train.coba import CoBa
from mftk.train.config import LossConfig
from mftk.train.data import IGNORE


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """logits: (B, S, V); targets: (B, S) with -100 = no loss (already shifted, see
    packing.shifted_targets). returns ℓ: (B, S) fp32 (fp64 for fp64 logits), 0 where ignored."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    flat = F.cross_entropy(z, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


def task_sums(
    tok_loss: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int
) -> tuple[Tensor, Tensor]:
    """Per-task sums of one batch's answer-token losses, and their counts.

    tok_loss, targets, task_ids: (B, S) (ℓ from token_losses; task id -1: no task).
    returns (Σ_{t(n)=t} ℓ_n: (T,) tok_loss.dtype, m_t: (T,) fp32)."""
    mask = (targets != IGNORE) & (task_ids >= 0)
    t = task_ids.clamp(min=0).reshape(-1)
    w = mask.reshape(-1).float()
    sums = torch.zeros(num_tasks, dtype=tok_loss.dtype, device=tok_loss.device)
    sums = sums.index_add(0, t, tok_loss.reshape(-1) * w)
    counts = torch.zeros(num_tasks, dtype=torch.float32, device=tok_loss.device).index_add(0, t, w)
    return sums, counts


def task_token_means(tok_loss: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int):
    """returns (L: (T,) task token means, 0 where absent; m: (T,) answer-token counts, fp32)."""
    sums, counts = task_sums(tok_loss, targets, task_ids, num_tasks)
    return sums / counts.clamp(min=1), counts


class TaskLoss:
    """A loss mode: the scalar loss from per-task token means, the task weights of each step, and
    whatever state the mode keeps between evaluations (none here)."""

    def __init__(self, cfg: LossConfig, num_tasks: int) -> None:
        self.gamma = cfg.focal_gamma

    def __call__(self, means: Tensor, counts: Tensor, weights: Tensor) -> Tensor:
        """means, counts, weights: (T,) (L_t, m_t, w_t). returns the loss, a scalar (0 when no
        task is present)."""
        present = counts > 0
        if not bool(present.any()):
            return means.sum() * 0.0
        w = torch.where(present, weights.to(means), torch.zeros_like(means))  # w_t on P
        return self.combine(means, counts, w)

    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        """The mode's formula; w: (T,) the weights of the present tasks, 0 elsewhere."""
        raise NotImplementedError(f"{type(self).__name__}: a loss mode defines combine")

    def weights(self, static: list[float]) -> Tensor:
        """A step's task weights (T,) fp32 from the static ones (loss_weight, or a stage's)."""
        return torch.tensor(static, dtype=torch.float32)

    def update(self, val_losses: list[float], step: int) -> None:
        """Take an evaluation's per-task losses (at training step `step`); stateless modes keep
        nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict(); stateless modes have none."""


class TokenLoss(TaskLoss):
    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        return (means * counts).sum() / counts.sum()


class BalancedLoss(TaskLoss):
    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        return (w * means).sum() / w.sum()


class FocalLoss(TaskLoss):
    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        p = torch.exp(-means)
        return (w * (1 - p).pow(self.gamma) * means).sum() / w.sum()


class CobaLoss(BalancedLoss):
    """`balanced` with the static weights times CoBa's, which move at every evaluation."""

    def __init__(self, cfg: LossConfig, num_tasks: int) -> None:
        super().__init__(cfg, num_tasks)
        c = cfg.coba
        self.coba = CoBa(num_tasks, c.history_length, c.warmup_steps, c.tau)

    def weights(self, static: list[float]) -> Tensor:
        return super().weights([a * b for a, b in zip(static, self.coba.weights())])

    def update(self, val_losses: list[float], step: int) -> None:
        self.coba.update(val_losses, step)

    def state_dict(self) -> dict[str, Any]:
        return self.coba.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coba.load_state_dict(state)


LOSSES: dict[str, type[TaskLoss]] = {
    "token": TokenLoss,
    "balanced": BalancedLoss,
    "focal": FocalLoss,
    "coba": CobaLoss,
}


def build_loss(cfg: LossConfig, num_tasks: int) -> TaskLoss:
    """The TaskLoss that cfg.mode names."""
    if cfg.mode not in LOSSES:
        raise ValueError(f"mode: expected {'|'.join(LOSSES)}, got {cfg.mode!r}")
    return LOSSES[cfg.mode](cfg, num_tasks)


def combine(
    mode: str, means: Tensor, counts: Tensor, weights: Tensor, gamma: float = 2.0
) -> Tensor:
    """The scalar loss of `mode` from per-task token means (see the module docstring).

    means, counts, weights: (T,); coba combines as balanced (the caller passes CoBa's weights)."""
    return build_loss(LossConfig(mode=mode, focal_gamma=gamma), len(means))(means, counts, weights)


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
