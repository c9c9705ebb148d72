"""Busy background processes for the CPU benchmarks' --under-load mode.

Each is a separate Python process spinning in a loop (one core's worth of demand), the way a
second user's job shares a laptop. They are started before the warm-up and ended by their pid.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def busy_processes(k: int) -> Iterator[list[int]]:
    """Run k spinning processes for the duration of the block; yields their pids."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"under_load: expected a number of processes >= 0, got {k!r}")
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"
