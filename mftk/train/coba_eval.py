"""`loss.mode: coba_eval`: mftk's earlier CoBa variant, updated at evaluations. It stays beside
`coba` (MFTCoder's algorithm, mftk.train.coba) because it measured better on the tiny example:
eval loss averaged over its four tasks 0.364 against 0.388 for coba (3 seeds, lower in each).

At each evaluation (the whole eval split, every train.eval_every steps), with N tasks and L_i(k)
the losses of evaluation k:
1. l_i(k) = L_i(k) / L_i(0), L_i(0) the first evaluation's;
2. α_i(k) = the least-squares slope of l_i over the last H evaluations (H = history_length, ≥ 2
   points), α_max(k) the same for m(k) = max_i l_i(k); slopes are kept from the first
   evaluation on, the warm-up included;
3. with T the number of slopes kept (≤ H) and sums over that window,
   RCS = softmax_i( N α_i(k) / Σ_j |α_j(k)| ),  ACS = softmax_i( −T α_i(k) / Σ_k' |α_i(k')| ),
   DF  = min(1, T · softmax_k'( τ · (−T α_max(k') / Σ_k'' |α_max(k'')|) )[last]);
4. w = softmax( N (DF · RCS + (1 − DF) · ACS) ), clipped at 1/(10N) and renormalised.
Until warmup_steps training steps have passed (or fewer than 2 slopes exist) w is uniform. The
trainer multiplies w by the static loss weights (mftk.train.losses.CobaEvalLoss).
"""

from __future__ import annotations

from mftk.train.coba import load_slope_state, safe_div, slope, slope_state, softmax


class EvalCoBa:
    """update() after each evaluation, weights() before each step."""

    def __init__(
        self, num_tasks: int, history_length: int = 5, warmup_steps: int = 100, tau: float = 5.0
    ):
        self.n = num_tasks
        self.history_length = history_length
        self.warmup_steps = warmup_steps
        self.tau = tau
        self.initial: list[float] | None = None
        self.history: list[list[float]] = []  # normalised losses per evaluation: [k][task]
        self.slopes: list[list[float]] = []  # α per evaluation: [k][task]
        self.max_slopes: list[float] = []
        self.current = [1.0 / num_tasks] * num_tasks
        self.last: dict = {"rcs": None, "acs": None, "df": None}

    def update(self, val_losses: list[float], step: int) -> list[float]:
        """An evaluation's per-task losses at training step `step`; returns the new w."""
        if len(val_losses) != self.n:
            raise ValueError(f"val_losses: expected {self.n} values, got {len(val_losses)}")
        if self.initial is None:
            self.initial = [max(v, 1e-12) for v in val_losses]
        self.history.append([v / i for v, i in zip(val_losses, self.initial)])
        window = self.history[-self.history_length :]
        if len(window) >= 2:
            self.slopes.append([slope([h[i] for h in window]) for i in range(self.n)])
            self.max_slopes.append(slope([max(h) for h in window]))
        warm = step >= self.warmup_steps and self.slopes
        self.current = self.compute() if warm else [1.0 / self.n] * self.n
        return self.current

    def compute(self) -> list[float]:
        """Steps 3-4 of the module docstring on the slopes so far."""
        n = self.n
        sl = self.slopes[-self.history_length :]
        ms = self.max_slopes[-self.history_length :]
        t = len(sl)
        a = sl[-1]
        rcs = softmax([n * safe_div(ai, sum(abs(x) for x in a)) for ai in a])
        acs = softmax([-t * safe_div(a[i], sum(abs(s[i]) for s in sl)) for i in range(n)])
        norm = sum(abs(x) for x in ms)
        df = min(1.0, t * softmax([self.tau * (-t * safe_div(x, norm)) for x in ms])[-1])
        w = softmax([n * (df * r + (1 - df) * c) for r, c in zip(rcs, acs)])
        floor = 1.0 / (10 * n)
        w = [max(x, floor) for x in w]
        s = sum(w)
        self.last = {"rcs": rcs, "acs": acs, "df": df}
        return [x / s for x in w]

    def state_dict(self) -> dict:
        return slope_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_slope_state(self, state)
