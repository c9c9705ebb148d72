"""The eval loss the trainer follows between evaluations: early stopping
(`train.early_stopping_patience`, MFTCoder's early_stopping / early_stopping_stall_num) and the
score of each checkpoint for `output.keep_best` (mftk.train.checkpointing.keep_best).

eval loss = Σ_t w_t L_t / Σ_t w_t, with L_t the task's loss at the evaluation (answer-token mean;
classify tasks: the head's cross-entropy) and w_t = tasks[t].loss_weight. An evaluation whose
eval loss is ≤ the best so far becomes the best (a tie goes to the later one, as MFTCoder's
`<=`); otherwise it counts one stall, and `patience` stalls in a row stop the run. The
evaluation before training (step 0) only sets the baseline that MFTCoder does not count either:
it is neither a best nor a stall.
"""

from __future__ import annotations

import math
from typing import Any

from mftk.train.checkpointing import keep_best


class EvalTracker:
    """record() each evaluation; `stop` says when the patience ran out; score(step) is the eval
    loss of the evaluation at step (None when there was none)."""

    def __init__(self, weights: list[float], patience: int | None) -> None:
        self.weights = weights
        self.patience = patience
        self.best, self.best_step = math.inf, None
        self.stalls = 0
        self.last: tuple[int, float] | None = None
        self.stopped_at: int | None = None

    def eval_loss(self, losses: list[float]) -> float:
        """Σ_t w_t L_t / Σ_t w_t over per-task losses L (in task order); nan: inf."""
        v = sum(w * x for w, x in zip(self.weights, losses)) / sum(self.weights)
        return v if math.isfinite(v) else math.inf

    def record(self, step: int, losses: list[float]) -> float:
        """An evaluation at training step `step` (per-task losses in task order); returns its
        eval loss."""
        v = self.eval_loss(losses)
        self.last = (step, v)
        if step == 0:
            return v
        if v <= self.best:
            self.best, self.best_step, self.stalls = v, step, 0
        else:
            self.stalls += 1
        if self.patience is not None and self.stalls >= self.patience:
            self.stopped_at = step
        return v

    @property
    def stop(self) -> bool:
        return self.stopped_at is not None

    def score(self, step: int) -> float | None:
        return self.last[1] if self.last is not None and self.last[0] == step else None

    def keep_best(self, root: str, path: str, step: int, keep: int) -> None:
        """Offer checkpoint `path`, saved at `step`, to checkpoints/best/ (keep > 0) when an
        evaluation scored that step (checkpointing.keep_best)."""
        score = self.score(step)
        if keep and score is not None and step > 0:
            keep_best(root, path, score, keep)

    def stop_reason(self) -> str:
        """Why early stopping ended the run, for the log."""
        return (
            f"no lower eval loss in {self.patience} evaluations (best {self.best:.4f} at step "
            f"{self.best_step})"
        )

    def summary(self) -> dict[str, Any]:
        """For metrics.json: the best evaluation and where early stopping stopped (or None)."""
        best = None if self.best_step is None else {"step": self.best_step, "eval_loss": self.best}
        return {"best": best, "stopped_at": self.stopped_at, "patience": self.patience}

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "stalls": self.stalls,
            "last": None if self.last is None else list(self.last),
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.stalls, self.stopped_at = state["stalls"], state["stopped_at"]
        self.last = None if state["last"] is None else (state["last"][0], state["last"][1])
