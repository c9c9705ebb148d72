"""Interleaved CPU benchmark: every provider runs once per round, in a shuffled order, for many
rounds; the table quotes each provider's median and its ratio to `base` from the same run.

    python benchmarks/run_cpu.py [--rounds 15] [--out benchmarks/results/cpu.md] [--shape small]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import mftk  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)

# isort: split
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from providers import PROVIDERS, SHAPES, build, make_inputs  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(shape, routing: str, direction: str, rounds: int, seed: int = 0) -> dict[str, list]:
    inp = make_inputs(shape)
    steps = {p: build(p, routing, direction, inp, shape) for p in PROVIDERS[routing]}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list] = {p: [] for p in steps}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for p in order:
            t0 = time.perf_counter()
            steps[p]()
            times[p].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    ap.add_argument("--shape", choices=["all", "large", "small"], default="all")
    args = ap.parse_args()
    shapes = {"all": SHAPES, "large": SHAPES[:1], "small": SHAPES[1:]}[args.shape]
    lines = [
        "# mftk.multi_adapter_linear on the CPU",
        "",
        f"Device: {_cpu_name()}, {torch.get_num_threads()} torch threads,"
        f" torch {torch.__version__}; commit {_commit()}; fp32;"
        f" {args.rounds} interleaved rounds, medians;"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        "CPU numbers say nothing about GPU speed. The machine is shared with other work, so single",
        "runs can be 2x off; ratios to `base` come from the same rounds.",
        "",
    ]
    for shape in shapes:
        for routing in ("hard", "soft"):
            for direction in ("fwd", "fwd+bwd"):
                times = measure(shape, routing, direction, args.rounds)
                med = {p: statistics.median(t) for p, t in times.items()}
                floor = shape.flops(routing, direction) / shape.base_flops(direction)
                lines += [
                    f"## {routing} routing, {direction}, {shape.name}",
                    f"FLOP floor (base + adapters{' + router' if routing == 'soft' else ''}) "
                    f"= {floor:.3f}x base",
                    "",
                    "| provider | median ms | x base | GFLOP/s |",
                    "| --- | ---: | ---: | ---: |",
                ]
                for p, m in sorted(med.items(), key=lambda kv: kv[1]):
                    gf = shape.flops(routing, direction) / m / 1e9
                    lines.append(f"| {p} | {m * 1e3:.2f} | {m / med['base']:.2f} | {gf:.1f} |")
                lines.append("")
                print("\n".join(lines[-(len(med) + 6) :]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
