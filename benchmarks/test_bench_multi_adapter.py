"""pytest-benchmark suite for mftk.multi_adapter_linear on the CPU.

Groups: one per (routing, direction, shape); providers are parameters, `base` (the frozen linear
alone) is the floor. Run: `pytest benchmarks/ --benchmark-only`. For the committed table with
interleaved rounds use `python benchmarks/run_cpu.py` (a shared machine: one run can be 2x off).
"""

import platform

import pytest
import torch
from providers import PROVIDERS, SHAPES, build, check_provider, make_inputs

CASES = [
    (routing, direction, shape, provider)
    for routing in ("hard", "soft")
    for direction in ("fwd", "fwd+bwd")
    for shape in SHAPES
    for provider in PROVIDERS[routing]
]


@pytest.mark.parametrize(
    "routing,direction,shape,provider",
    CASES,
    ids=[f"{r}-{d}-{s.name}-{p}" for r, d, s, p in CASES],
)
def test_multi_adapter_linear(benchmark, routing, direction, shape, provider):
    inp = make_inputs(shape)
    check_provider(provider, routing, direction, inp, shape)  # it computes the same layer
    step = build(provider, routing, direction, inp, shape)
    benchmark.group = f"{routing} {direction} {shape.name}"
    benchmark.extra_info.update(
        device=f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        flops=shape.flops(routing, direction),
    )
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats["median"]
    benchmark.extra_info["gflops"] = shape.flops(routing, direction) / median / 1e9
