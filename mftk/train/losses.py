"""Multi-task losses (MFTCoder's four cases plus focal and CoBa weights) and router losses.

Notation: ℓ_n the next-token cross-entropy of answer token n, t(n) its task, m_t the number of
answer tokens of task t in the batch, L_t = (1/m_t) Σ_{t(n)=t} ℓ_n the task's token mean, w_t the
task weights (config `loss_weight`, a stage's `loss_weights`, or CoBa's weights), and P the set of
tasks present in the batch with w_t > 0 (m_t > 0). Per sample j (one packed sample: a row's
seq_id, with at least one answer token) of task t(j): ℓ̄_j its token mean, k_t the number of
task t's samples and M_t = (1/k_t) Σ_{t(j)=t} ℓ̄_j their mean.

- token       (MFTCoder case1):  Σ_{t∈P} m_t L_t / Σ_{t∈P} m_t       (the mean over all tokens)
- sample      (MFTCoder case2):  Σ_{t∈P} k_t M_t / Σ_{t∈P} k_t       (the mean over samples)
- balanced    (MFTCoder case3):  Σ_{t∈P} w_t L_t / Σ_{t∈P} w_t
- task_sample (MFTCoder case4):  Σ_{t∈P} w_t M_t / Σ_{t∈P} w_t
- focal       (task-level):      Σ_{t∈P} w_t (1 − p_t)^γ L_t / Σ_{t∈P} w_t,  p_t = exp(−L_t)
  p_t is the task's geometric-mean token probability, so a task the model already predicts well
  (p_t → 1) is down-weighted; γ = 0 is `balanced`. The factor is not detached (as in focal loss).
- coba: `balanced` with the static weights until CoBa's warm-up ends, then CoBa's weights in
  their place (MFTCoder's way; a task of static weight 0 stays at 0), see mftk.train.coba.
- coba_eval: `balanced` with the static weights times mftk's earlier CoBa weights, updated at
  each evaluation (mftk.train.coba_eval).
A task of weight 0 has no loss in any mode (it leaves every mean); a batch holding only such
tasks has loss 0 with zero gradients, never 0/0. MFTCoder's "sample" is a padded row (packed rows
hold one task there); mftk's is the packed sample, the same under `data.packing: false`.

Each mode is a TaskLoss in LOSSES, which `loss.mode` names: calling it combines the per-task
means into the loss (`per_sample` modes take (M_t, k_t), the others (L_t, m_t): see
`TaskLoss.stats`); `weights` turns the static task weights into a step's; `update` takes each
full evaluation's per-task losses, `begin_step` / `eval_batches` / `observe` drive a mode that
reads sampled eval batches between evaluations (CoBa); `state_dict` / `load_state_dict` carry
its state through checkpoints (CoBa's slope history lives in its object). A new mode is a
TaskLoss subclass, its LOSSES entry and its name in mftk.train.checks.LOSS_MODES.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mftk.train.coba import CoBa
from mftk.train.coba_eval import EvalCoBa
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


def sample_task_sums(
    tok_loss: Tensor, targets: Tensor, task_ids: Tensor, seq_ids: Tensor, num_tasks: int
) -> tuple[Tensor, Tensor]:
    """Per-task sums of the samples' token means, and the sample counts (MFTCoder's case2/case4).

    tok_loss, targets, task_ids, seq_ids: (B, S) (seq_ids: each token's sample within its row, -1
    on padding). A sample with no answer token is not counted.
    returns (Σ_{t(j)=t} ℓ̄_j: (T,) tok_loss.dtype, k_t: (T,) fp32)."""
    b, s = targets.shape
    dev, dt = tok_loss.device, tok_loss.dtype
    rows = torch.arange(b, device=dev)[:, None] * s
    inside = (seq_ids >= 0) & (task_ids >= 0)  # a token of a sample
    key = torch.where(inside, rows + seq_ids, b * s).reshape(-1)  # the rest: slot b*s
    w = ((targets != IGNORE) & inside).reshape(-1).to(dt)
    sums = torch.zeros(b * s + 1, dtype=dt, device=dev).index_add(0, key, tok_loss.reshape(-1) * w)
    n = torch.zeros(b * s + 1, dtype=dt, device=dev).index_add(0, key, w)
    owner = torch.where(inside, task_ids, -1).reshape(-1)  # one task per sample
    task = torch.full((b * s + 1,), -1, dtype=owner.dtype, device=dev).scatter(0, key, owner)
    have = (n > 0) & (task >= 0)
    t = task.clamp(min=0)
    means = torch.where(have, sums / n.clamp(min=1), torch.zeros_like(sums))  # ℓ̄_j
    total = torch.zeros(num_tasks, dtype=dt, device=dev).index_add(0, t, means)
    k = torch.zeros(num_tasks, dtype=torch.float32, device=dev).index_add(0, t, have.float())
    return total, k


def sample_task_means(
    tok_loss: Tensor, targets: Tensor, task_ids: Tensor, seq_ids: Tensor, num_tasks: int
) -> tuple[Tensor, Tensor]:
    """returns (M: (T,) the mean over task t's samples of ℓ̄_j, 0 where absent; k: (T,) fp32);
    arguments as sample_task_sums."""
    total, k = sample_task_sums(tok_loss, targets, task_ids, seq_ids, num_tasks)
    return total / k.clamp(min=1), k


def _den(v: Tensor) -> Tensor:
    """v.sum(), or 1 when it is 0 (no task present: the numerator is 0 too). v is constant."""
    d = v.sum()
    return torch.where(d > 0, d, torch.ones_like(d))


class TaskLoss:
    """A loss mode: the scalar loss from per-task means, the task weights of each step, and
    whatever state the mode keeps between evaluations (none here)."""

    per_sample = False  # combine per-sample means (M_t, k_t) rather than token means (L_t, m_t)

    def __init__(self, cfg: LossConfig, num_tasks: int) -> None:
        self.gamma = cfg.focal_gamma

    def stats(
        self, tok_loss: Tensor, targets: Tensor, task_ids: Tensor, seq_ids: Tensor, num_tasks: int
    ) -> tuple[Tensor, Tensor]:
        """The per-task (means, counts) (T,) this mode combines: (M_t, k_t) for per_sample
        modes, else (L_t, m_t). Arguments as sample_task_means."""
        if self.per_sample:
            return sample_task_means(tok_loss, targets, task_ids, seq_ids, num_tasks)
        return task_token_means(tok_loss, targets, task_ids, num_tasks)

    def __call__(self, means: Tensor, counts: Tensor, weights: Tensor) -> Tensor:
        """means, counts, weights: (T,) (L_t or M_t, m_t or k_t, w_t). returns the loss, a scalar
        (0 when no task of weight > 0 is present)."""
        w = weights.to(means)
        present = (counts > 0) & (w > 0)  # no host sync: with P empty every term below is 0
        zero = torch.zeros_like(means)
        kept = torch.where(present, counts, torch.zeros_like(counts))  # m_t on P
        return self.combine(means, kept, torch.where(present, w, zero))  # w_t on P

    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        """The mode's formula; counts, w: (T,) those of the tasks in P, 0 elsewhere. Divide by
        _den(...) so that an empty P gives 0 (and zero gradients), not 0/0."""
        raise NotImplementedError(f"{type(self).__name__}: a loss mode defines combine")

    def weights(self, static: list[float]) -> Tensor:
        """A step's task weights (T,) fp32 from the static ones (loss_weight, or a stage's)."""
        return torch.tensor(static, dtype=torch.float32)

    def update(self, val_losses: list[float], step: int) -> None:
        """Take a full evaluation's per-task losses (at training step `step`); stateless modes
        keep nothing."""

    def begin_step(self, step: int) -> None:
        """Before the training step that follows `step` completed steps."""

    def eval_batches(self, step: int, num_batches: int) -> list[int]:
        """After that step: the indices of the eval batches (of num_batches) whose per-task
        losses observe() wants; none here."""
        return []

    def observe(self, val_losses: list[float]) -> None:
        """Per-task losses over the eval_batches() just asked for (nan: a task absent)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict(); stateless modes have none."""


class TokenLoss(TaskLoss):
    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        return (means * counts).sum() / _den(counts)


class SampleLoss(TokenLoss):
    per_sample = True


class BalancedLoss(TaskLoss):
    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        return (w * means).sum() / _den(w)


class TaskSampleLoss(BalancedLoss):
    per_sample = True


class FocalLoss(TaskLoss):
    def combine(self, means: Tensor, counts: Tensor, w: Tensor) -> Tensor:
        p = torch.exp(-means)
        return (w * (1 - p).pow(self.gamma) * means).sum() / _den(w)


class CobaLoss(BalancedLoss):
    """`balanced` with the static weights until CoBa's warm-up ends, then CoBa's weights (a task
    of static weight 0 keeps 0). CoBa reads `eval_batches` sampled eval batches every
    `update_interval` steps (mftk.train.coba)."""

    def __init__(self, cfg: LossConfig, num_tasks: int) -> None:
        super().__init__(cfg, num_tasks)
        c = cfg.coba
        hist = 200 if c.history_length is None else c.history_length
        self.coba = CoBa(num_tasks, hist, c.warmup_steps, c.tau, c.update_interval, c.eval_batches)

    def weights(self, static: list[float]) -> Tensor:
        if self.coba.current is None:
            return super().weights(static)
        return super().weights([c if s > 0 else 0.0 for s, c in zip(static, self.coba.current)])

    def update(self, val_losses: list[float], step: int) -> None:
        self.coba.begin(val_losses)

    def begin_step(self, step: int) -> None:
        self.coba.begin_step(step)

    def eval_batches(self, step: int, num_batches: int) -> list[int]:
        return self.coba.eval_batches(step, num_batches)

    def observe(self, val_losses: list[float]) -> None:
        self.coba.observe(val_losses)

    def state_dict(self) -> dict[str, Any]:
        return self.coba.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coba.load_state_dict(state)


class CobaEvalLoss(BalancedLoss):
    """`balanced` with the static weights times mftk's earlier CoBa weights, which move at every
    evaluation (mftk.train.coba_eval; loss.coba.history_length counts evaluations, default 5)."""

    def __init__(self, cfg: LossConfig, num_tasks: int) -> None:
        super().__init__(cfg, num_tasks)
        c = cfg.coba
        hist = 5 if c.history_length is None else c.history_length
        self.coba = EvalCoBa(num_tasks, hist, c.warmup_steps, c.tau)

    def weights(self, static: list[float]) -> Tensor:
        return super().weights([a * b for a, b in zip(static, self.coba.current)])

    def update(self, val_losses: list[float], step: int) -> None:
        self.coba.update(val_losses, step)

    def state_dict(self) -> dict[str, Any]:
        return self.coba.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coba.load_state_dict(state)


LOSSES: dict[str, type[TaskLoss]] = {
    "token": TokenLoss,
    "sample": SampleLoss,
    "balanced": BalancedLoss,
    "task_sample": TaskSampleLoss,
    "focal": FocalLoss,
    "coba": CobaLoss,
    "coba_eval": CobaEvalLoss,
}


def build_loss(cfg: LossConfig, num_tasks: int) -> TaskLoss:
    """The TaskLoss that cfg.mode names."""
    if cfg.mode not in LOSSES:
        raise ValueError(f"mode: expected {'|'.join(LOSSES)}, got {cfg.mode!r}")
    return LOSSES[cfg.mode](cfg, num_tasks)


def combine(
    mode: str, means: Tensor, counts: Tensor, weights: Tensor, gamma: float = 2.0
) -> Tensor:
    """The scalar loss of `mode` from per-task means (see the module docstring).

    means, counts, weights: (T,) ((M_t, k_t) for sample and task_sample); coba combines as
    balanced (the caller passes CoBa's weights)."""
    return build_loss(LossConfig(mode=mode, focal_gamma=gamma), len(means))(means, counts, weights)


def mft_loss(
    logits: Tensor,
    targets: Tensor,
    task_ids: Tensor,
    weights: Tensor,
    mode: str,
    gamma: float = 2.0,
    seq_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """logits: (B, S, V); targets, task_ids: (B, S); weights: (T,); seq_ids: (B, S) each token's
    sample in its row (None: one sample per row).
    returns (loss scalar, the mode's per-task means (T,) and counts (T,): see TaskLoss.stats)."""
    loss = build_loss(LossConfig(mode=mode, focal_gamma=gamma), len(weights))
    seq = torch.zeros_like(task_ids) if seq_ids is None else seq_ids
    means, counts = loss.stats(token_losses(logits, targets), targets, task_ids, seq, len(weights))
    return loss(means, counts, weights), means, counts


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
