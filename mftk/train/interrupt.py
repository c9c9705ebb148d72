"""Stopping a run cleanly on SIGINT or SIGTERM (Ctrl-C; SLURM and Kubernetes preemption).

Inside `StopSignals`, while it is armed (the training steps), the first SIGINT / SIGTERM only
marks the run: the trainer checks at each step boundary (`requested`, collective, so every rank
stops at the same step), saves a checkpoint and raises `Interrupted`; `mftk train` prints the
resume command and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A second
signal (REPEAT_S or more after the first: under torchrun a worker gets the terminal's Ctrl-C and
the copy the agent forwards, or SLURM's SIGTERM twice, as one request), or one while not armed
(setup, evaluation before the first step, the final outputs), stops at once without a
checkpoint: KeyboardInterrupt for SIGINT, SystemExit(143) for SIGTERM. Under torchrun the check
is one small all-reduce per step, and the agent kills its workers 30 s after forwarding a signal:
a step and a save must fit in that. Outside the main thread signals cannot be caught, and
nothing changes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0  # a second signal sooner than this is the same request delivered twice


class Interrupted(Exception):
    """The run stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}; checkpoint {checkpoint}")


class StopSignals:
    """A context in which SIGINT / SIGTERM ask the run to stop at the next step boundary.
    announce: this process says so on stderr (the main rank)."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.armed = False
        self.received: int | None = None
        self.received_at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                # an ignored signal stays ignored (nohup, `cmd &` in a script: SIGINT is SIG_IGN)
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.received is not None and self.armed and now - self.received_at < REPEAT_S:
            return
        if self.received is not None or not self.armed:
            if signum == signal.SIGTERM:
                raise SystemExit(128 + signum)
            raise KeyboardInterrupt
        self.received, self.received_at = signum, now
        if self.announce:  # os.write: safe inside a handler, unlike print
            name = signal.Signals(signum).name
            msg = f"\n{name}: saving a checkpoint after this step, then stopping (again: abort)\n"
            os.write(2, msg.encode())

    def requested(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> int | None:
        """Collective (reduce: the sum over processes): the signal that any process received,
        SIGTERM first; None when none did."""
        got = torch.tensor([float(self.received == s) for s in SIGNALS], dtype=torch.float64)
        counts = reduce(got)
        for s, n in sorted(zip(SIGNALS, counts.tolist()), reverse=True):
            if n > 0:
                return int(s)
        return None
