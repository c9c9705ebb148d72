"""Interleaved CPU benchmark: every provider runs once per round, in a shuffled order, for many
rounds; the table quotes each provider's median and its ratio to `base` from the same run.

    python benchmarks/run_cpu.py [--rounds 15] [--out FILE] [--shape all|large|small|none]
                                 [--small-table] [--under-load K]

--under-load K runs K busy background processes (benchmarks/busy.py) during the measurement.
--small-table adds one table of hard routing at small shapes (per-call overhead), mftk and the
baselines as ratios to the base linear.
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
from busy import busy_processes, load_average  # noqa: E402
from providers import PROVIDERS, SHAPES, Shape, build, make_inputs  # noqa: E402

SMALL_SHAPES = [Shape(n, 256, 256, 8, 16) for n in (32, 128, 512, 2048)]
SMALL_PROVIDERS = ["base", "mftk", "grouped_mm", "peft"]


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


def measure(
    shape, routing: str, direction: str, rounds: int, seed: int = 0, providers=None
) -> dict[str, list]:
    inp = make_inputs(shape)
    providers = providers or PROVIDERS[routing]
    steps = {p: build(p, routing, direction, inp, shape) for p in providers}
    return interleaved(steps, rounds, seed)


def interleaved(steps: dict, rounds: int, seed: int = 0, warmup: int = 1) -> dict[str, list]:
    """Seconds per call of each step, over `rounds` rounds in a fresh random order each round
    (so that load on a shared machine falls on every provider alike), after `warmup` calls."""
    for step in steps.values():
        for _ in range(warmup):
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
    ap.add_argument("--shape", choices=["all", "large", "small", "none"], default="all")
    ap.add_argument("--small-table", action="store_true", help="hard routing at small shapes")
    ap.add_argument("--under-load", type=int, default=0, metavar="K",
                    help="K busy background processes during the measurement")  # fmt: skip
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, got {args.rounds}")
    if args.under_load < 0:
        ap.error(f"--under-load: expected >= 0, got {args.under_load}")
    shapes = {"all": SHAPES, "large": SHAPES[:1], "small": SHAPES[1:], "none": []}[args.shape]
    with busy_processes(args.under_load):
        lines = _run(args, shapes)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.out}")
    return 0


def _small_table(rounds: int) -> list[str]:
    lines = [
        "## hard routing at small shapes (D 256x256, T 8, R 16): x base",
        "",
        "| N | direction | base ms | " + " | ".join(SMALL_PROVIDERS[1:]) + " |",
        "| ---: | --- | ---: |" + " ---: |" * (len(SMALL_PROVIDERS) - 1),
    ]
    for shape in SMALL_SHAPES:
        for direction in ("fwd", "fwd+bwd"):
            times = measure(shape, "hard", direction, rounds, providers=SMALL_PROVIDERS)
            med = {p: statistics.median(t) for p, t in times.items()}
            ratios = " | ".join(f"{med[p] / med['base']:.2f}" for p in SMALL_PROVIDERS[1:])
            lines.append(f"| {shape.n} | {direction} | {med['base'] * 1e3:.3f} | {ratios} |")
            print(lines[-1], flush=True)
    return lines + [""]


def _run(args, shapes) -> list[str]:
    lines = [
        "# mftk.multi_adapter_linear on the CPU",
        "",
        f"Device: {_cpu_name()}, {torch.get_num_threads()} torch threads,"
        f" torch {torch.__version__}; commit {_commit()}; fp32;"
        f" {args.rounds} interleaved rounds, medians;"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')};"
        f" {args.under_load} busy background process(es); load average at start {load_average()}.",
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
    if args.small_table:
        lines += _small_table(max(args.rounds, 15))
    lines.append(f"Load average at the end: {load_average()}.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
