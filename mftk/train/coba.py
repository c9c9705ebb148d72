"""CoBa task weights (Gong et al., "CoBa: Convergence Balancer for Multitask Finetuning of Large
Language Models", EMNLP 2024) as MFTCoder's mftcoder_accelerate computes them, from the slopes of
per-task validation losses.

Inputs. L_i(0), task i's loss on the whole eval split before training (`begin`: the trainer's
first evaluation). After the training step that follows c completed steps, when c % I == 0 and
c ≥ 1 (I = update_interval), the trainer evaluates S = eval_batches eval batches, cycling through
the split (batch (S·c/I + s) mod n, s < S), and `observe` appends l_i = L_i / L_i(0); a task
absent from those batches (its loss nan or 0) adds no point.

Weights. Before the training step that follows c completed steps, when c % I == 0 and c ≥ W
(W = warmup_steps), with N tasks and H = history_length (`begin_step`):
1. α_i = the least-squares slope of task i's last H points (its absent points left out, the
   rest taken at unit spacing; fewer than 2: 0) and α_max that of m = max_i l_i. The slope
   lists α_i(k), α_max(k), k = 1..K, start at the first update at or after W and grow by one
   at each update;
2. RCS = softmax_i( N α_i(K) / Σ_j |α_j(K)| )          relative convergence: a task converging
                                                       slower than the others weighs more;
   ACS = softmax_i( −J α_i(K) / Σ_{k>K−J} |α_i(k)| ),  J = min(K, H): the last H slopes;
                                                       absolute convergence: a task whose loss
                                                       turned upward weighs less;
   DF  = K · softmax_k( τ · (−K α_max(k) / Σ_k' |α_max(k')|) )[K]   over every slope since W,
                                                       not capped: ≈ 1 while the worst loss
                                                       falls, → 0 when it rises;
3. w = softmax_i( N (DF · RCS_i + (1 − DF) · ACS_i) ); if some w_i < w_min = 1/(10N):
   w ← w (1 − N w_min) + w_min.
A zero denominator (all slopes 0) puts 0 in place of its quotient (MFTCoder: nan). Until the
first update at or after W, `current` is None and the trainer keeps the static weights; from
then on w replaces them (mftk.train.losses.CobaLoss).

Where mftk differs from MFTCoder's code: ACS keeps the last H slopes (MFTCoder slices its slope
list from index c/I − H counted from step 0 while the list starts at W, which keeps H − W/I + 1
slopes once c/I > H); the history window is the last H points for any I (MFTCoder mixes steps
and updates there when I > 1); the S batches' losses are pooled per token (MFTCoder averages the
batches' task means, an absent task counting 0); and the first update comes at the first
multiple of I at or after W (MFTCoder's slope lists only start at c == W exactly).
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


def present(v: float) -> bool:
    """A recorded loss: finite and non-zero (MFTCoder marks an absent task with 0)."""
    return math.isfinite(v) and v != 0.0


def window_slope(values: list[float]) -> float:
    """slope() over the present values, in order (absent ones dropped, as MFTCoder does)."""
    return slope([v for v in values if present(v)])


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def safe_div(a: float, b: float) -> float:
    return a / b if b > 1e-12 else 0.0


def slope_state(obj) -> dict:
    """The CoBa variants' state: L(0), the loss history, the slopes, their maxima, the weights."""
    keys = ("initial", "history", "slopes", "max_slopes", "current")
    return {k: getattr(obj, k) for k in keys}


def load_slope_state(obj, state: dict) -> None:
    obj.initial = None if state["initial"] is None else list(state["initial"])
    obj.history = [list(h) for h in state["history"]]
    obj.slopes = [list(s) for s in state["slopes"]]
    obj.max_slopes = list(state["max_slopes"])
    obj.current = None if state["current"] is None else list(state["current"])


class CoBa:
    """CoBa's state: begin() with the first full evaluation, begin_step() before each training
    step, eval_batches() / observe() after it; `current` holds the weights (None: static)."""

    def __init__(
        self,
        num_tasks: int,
        history_length: int = 200,
        warmup_steps: int = 100,
        tau: float = 5.0,
        update_interval: int = 1,
        eval_batches: int = 1,
    ):
        self.n = num_tasks
        self.history_length = history_length
        self.warmup_steps = warmup_steps
        self.tau = tau
        self.update_interval = update_interval
        self.num_eval_batches = eval_batches
        self.initial: list[float] | None = None
        self.history: list[list[float]] = []  # the last H normalised losses: [point][task]
        self.slopes: list[list[float]] = []  # α since the warm-up: [update][task]
        self.max_slopes: list[float] = []
        self.current: list[float] | None = None
        self.last: dict = {"rcs": None, "acs": None, "df": None}

    def begin(self, val_losses: list[float]) -> None:
        """The normaliser L(0): the first full evaluation's per-task losses (later ones pass)."""
        self._check(val_losses)
        if self.initial is None:
            self.initial = list(val_losses)

    def eval_batches(self, step: int, num_batches: int) -> list[int]:
        """After the training step that followed `step` completed steps: the eval batches to
        observe (none unless step % I == 0 and step >= 1)."""
        if step < 1 or step % self.update_interval or num_batches < 1:
            return []
        first = self.num_eval_batches * (step // self.update_interval)
        return [(first + s) % num_batches for s in range(self.num_eval_batches)]

    def observe(self, val_losses: list[float]) -> None:
        """Append the normalised per-task losses of the sampled eval batches (nan: absent)."""
        self._check(val_losses)
        if self.initial is None:
            raise ValueError("observe: begin() with the first evaluation's losses comes first")
        point = [
            v / i if present(v) and present(i) else math.nan
            for v, i in zip(val_losses, self.initial)
        ]
        self.history = (self.history + [point])[-self.history_length :]

    def begin_step(self, step: int) -> None:
        """Before the training step that follows `step` completed steps: an update when
        step % I == 0 and step >= W."""
        if step % self.update_interval == 0 and step >= self.warmup_steps:
            self.current = self.compute()

    def compute(self) -> list[float]:
        """Steps 1-3 of the module docstring on the history so far; returns w."""
        n = self.n
        window = self.history[-self.history_length :]
        a = [window_slope([h[i] for h in window]) for i in range(n)]
        worst = [max((v for v in h if present(v)), default=math.nan) for h in window]
        if self.current is None:  # the first update after the warm-up: the lists restart
            self.slopes, self.max_slopes = [], []
        self.slopes.append(a)
        self.max_slopes.append(window_slope(worst))
        sl = self.slopes[-self.history_length :]
        k, j, ms = len(self.slopes), len(sl), self.max_slopes
        rcs = softmax([n * safe_div(ai, sum(abs(x) for x in a)) for ai in a])
        acs = softmax([-j * safe_div(a[i], sum(abs(s[i]) for s in sl)) for i in range(n)])
        norm = sum(abs(x) for x in ms)
        df = k * softmax([self.tau * (-k * safe_div(x, norm)) for x in ms])[-1]
        w = softmax([n * (df * r + (1 - df) * c) for r, c in zip(rcs, acs)])
        w_min = 1.0 / (10 * n)
        if min(w) < w_min:
            w = [x * (1 - n * w_min) + w_min for x in w]
        self.last = {"rcs": rcs, "acs": acs, "df": df}
        return w

    def _check(self, val_losses: list[float]) -> None:
        if len(val_losses) != self.n:
            raise ValueError(f"val_losses: expected {self.n} values, got {len(val_losses)}")

    def state_dict(self) -> dict:
        return slope_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_slope_state(self, state)
