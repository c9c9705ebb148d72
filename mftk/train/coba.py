"""CoBa: convergence-balanced task weights from the slopes of per-task validation losses.

At each update (every evaluation), with N tasks and the validation losses L_i(k) of update k:
1. normalise by the first value: l_i(k) = L_i(k) / L_i(0);
2. α_i(k) = the least-squares slope of l_i over the last `history_length` updates (≥ 2 points);
   α_max(k) = the same for m(k) = max_i l_i(k);
3. with T the number of slopes kept (≤ history_length) and sums over that window,
   RCS = softmax_i( N · α_i(k) / Σ_j |α_j(k)| )            relative convergence: a task converging
                                                            slower than the others weighs more;
   ACS = softmax_i( −T · α_i(k) / Σ_k' |α_i(k')| )          absolute convergence: a task whose loss
                                                            turned upward (diverging) weighs less;
   DF  = min(1, T · softmax_k'( τ · (−T · α_max(k') / Σ_k'' |α_max(k'')|) )[last])
         divergence factor: ≈ 1 while the worst loss still falls, → 0 when it rises;
4. w = softmax( N · (DF · RCS + (1 − DF) · ACS) ), floored at 1/(10N) and renormalised.
Until `warmup_steps` training steps have passed (or fewer than 2 slopes exist) w is uniform.
The trainer multiplies w by the static loss weights and uses the `balanced` loss.
"""

from __future__ import annotations

import math


def slope(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, ..., n-1 (0 for fewer than 2 points)."""
    n = len(values)
    if n < 2:
        return 0.0
    xm = (n - 1) / 2
    ym = sum(values) / n
    num = sum((i - xm) * (v - ym) for i, v in enumerate(values))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 1e-12 else 0.0


class CoBa:
    """Stateful CoBa weights; update() after each validation, weights() before each step."""

    def __init__(
        self, num_tasks: int, history_length: int = 5, warmup_steps: int = 100, tau: float = 5.0
    ):
        self.n = num_tasks
        self.history_length = history_length
        self.warmup_steps = warmup_steps
        self.tau = tau
        self.initial: list[float] | None = None
        self.history: list[list[float]] = []  # normalised losses per update: [update][task]
        self.slopes: list[list[float]] = []  # α per update: [update][task]
        self.max_slopes: list[float] = []
        self.current = [1.0 / num_tasks] * num_tasks
        self.last = {"rcs": None, "acs": None, "df": None}

    def update(self, val_losses: list[float], step: int) -> list[float]:
        if len(val_losses) != self.n:
            raise ValueError(f"val_losses: expected {self.n} values, got {len(val_losses)}")
        if self.initial is None:
            self.initial = [max(v, 1e-12) for v in val_losses]
        self.history.append([v / i for v, i in zip(val_losses, self.initial)])
        window = self.history[-self.history_length :]
        if len(window) >= 2:
            self.slopes.append([slope([h[i] for h in window]) for i in range(self.n)])
            self.max_slopes.append(slope([max(h) for h in window]))
        self.current = (
            self.compute() if step >= self.warmup_steps and self.slopes else [1.0 / self.n] * self.n
        )
        return self.current

    def compute(self) -> list[float]:
        n = self.n
        sl = self.slopes[-self.history_length :]
        ms = self.max_slopes[-self.history_length :]
        t = len(sl)
        a = sl[-1]
        rcs = softmax([n * _safe_div(ai, sum(abs(x) for x in a)) for ai in a])
        acs = softmax([-t * _safe_div(a[i], sum(abs(s[i]) for s in sl)) for i in range(n)])
        norm = sum(abs(x) for x in ms)
        df = min(1.0, t * softmax([self.tau * (-t * _safe_div(x, norm)) for x in ms])[-1])
        w = softmax([n * (df * r + (1 - df) * c) for r, c in zip(rcs, acs)])
        floor = 1.0 / (10 * n)
        w = [max(x, floor) for x in w]
        s = sum(w)
        self.last = {"rcs": rcs, "acs": acs, "df": df}
        return [x / s for x in w]

    def weights(self) -> list[float]:
        return list(self.current)

    def state_dict(self) -> dict:
        return {
            "initial": self.initial,
            "history": self.history,
            "slopes": self.slopes,
            "max_slopes": self.max_slopes,
            "current": self.current,
        }

    def load_state_dict(self, state: dict) -> None:
        self.initial = state["initial"]
        self.history = [list(h) for h in state["history"]]
        self.slopes = [list(s) for s in state["slopes"]]
        self.max_slopes = list(state["max_slopes"])
        self.current = list(state["current"])
