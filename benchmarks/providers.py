"""Providers for the CPU benchmarks: the same layer computed by mftk and by the baselines.

Each provider is built once per shape (setup outside the timed region) and returns a callable that
runs one step: forward only, or forward + backward with a fixed upstream gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import mftk
from mftk.ops.reference import grouped_mm_hard, multi_adapter_linear_ref, soft_dense_torch


@dataclass(frozen=True)
class Shape:
    n: int
    d_in: int
    d_out: int
    tasks: int
    rank: int

    @property
    def name(self) -> str:
        return f"N{self.n}-D{self.d_in}x{self.d_out}-T{self.tasks}-R{self.rank}"

    def base_flops(self, direction: str) -> float:
        """The frozen base alone: forward, plus the dx GEMM backward."""
        return 2 * self.n * self.d_in * self.d_out * (1 if direction == "fwd" else 2)

    def flops(self, routing: str, direction: str) -> float:
        """docs/ARCHITECTURE.md's cost floor: base fwd (+ dx bwd) plus the adapters (and router)."""
        base = 2 * self.n * self.d_in * self.d_out
        lora = 2 * self.n * self.rank * (self.d_in + self.d_out)
        if routing == "soft":
            lora *= self.tasks
        router = 2 * self.n * self.d_in * self.tasks if routing == "soft" else 0
        if direction == "fwd":
            return base + lora + router
        return 2 * base + 3 * lora + 3 * router


SHAPES = [Shape(4096, 1024, 1024, 8, 16), Shape(512, 256, 256, 8, 16)]
PROVIDERS = {
    "hard": ["base", "mftk", "loop", "grouped_mm", "peft"],
    "soft": ["base", "mftk", "torch_dense", "loop"],
}


@dataclass
class Inputs:
    x: Tensor
    weight: Tensor
    bias: Tensor
    lora_a: Tensor
    lora_b: Tensor
    task_ids: Tensor
    router_weight: Tensor
    grad_y: Tensor


def make_inputs(shape: Shape, dtype: torch.dtype = torch.float32, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    n, di, do, t, r = shape.n, shape.d_in, shape.d_out, shape.tasks, shape.rank

    def rnd(*size, scale=1.0, grad=False):
        return (torch.randn(*size, generator=g) * scale).to(dtype).requires_grad_(grad)

    return Inputs(
        x=rnd(n, di, grad=True),
        weight=rnd(do, di, scale=di**-0.5),
        bias=rnd(do),
        lora_a=rnd(t, r, di, scale=di**-0.5, grad=True),
        lora_b=rnd(t, do, r, scale=r**-0.5, grad=True),
        # Unsorted ids, about 1/(T+1) of the tokens base-only, like a packed multi-task batch.
        task_ids=torch.randint(-1, t, (n,), generator=g),
        router_weight=rnd(t, di, scale=di**-0.5, grad=True),
        grad_y=rnd(n, do),
    )


def peft_layer(weight: Tensor, bias: Tensor, lora_a: Tensor, lora_b: Tensor):
    """A PEFT LoRA Linear holding T adapters t0..t{T-1} with these weights (lora_alpha = R).

    weight: (D_out, D_in); bias: (D_out,); lora_a: (T, R, D_in); lora_b: (T, D_out, R). The layer
    lives on weight's device and dtype. Shared by the CPU providers and benchmarks/gpu_suite.py.
    """
    import peft
    from torch import nn

    (d_out, d_in), (tasks, rank) = weight.shape, lora_a.shape[:2]
    dev, dtype = weight.device, weight.dtype
    base = nn.Sequential(nn.Linear(d_in, d_out, device=dev, dtype=dtype))
    with torch.no_grad():
        base[0].weight.copy_(weight)
        base[0].bias.copy_(bias)
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"])
    model = peft.LoraModel(base, cfg, "t0")
    for t in range(1, tasks):
        model.peft_config[f"t{t}"] = cfg
        model.inject_adapter(model.model, f"t{t}")
    layer = model.model[0].to(device=dev, dtype=dtype)  # PEFT creates the adapters in fp32
    with torch.no_grad():
        for t in range(tasks):
            layer.lora_A[f"t{t}"].weight.copy_(lora_a[t])
            layer.lora_B[f"t{t}"].weight.copy_(lora_b[t])
    return layer


def build(provider: str, routing: str, direction: str, inp: Inputs, shape: Shape) -> Callable:
    """A zero-argument step for (provider, routing, direction)."""
    x, w, b, a, bb = inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b
    plan = mftk.build_plan(inp.task_ids, shape.tasks)
    if provider == "base":
        fwd = lambda: torch.nn.functional.linear(x, w, b)  # noqa: E731
    elif provider == "mftk" and routing == "hard":
        fwd = lambda: mftk.multi_adapter_linear(x, w, a, bb, bias=b, task_ids=plan)  # noqa: E731
    elif provider == "mftk":
        rw = inp.router_weight
        fwd = lambda: mftk.multi_adapter_linear(x, w, a, bb, bias=b, router_weight=rw)  # noqa: E731
    elif provider == "loop" and routing == "hard":
        ids = inp.task_ids
        fwd = lambda: multi_adapter_linear_ref(x, w, a, bb, b, 1.0, ids)[0]  # noqa: E731
    elif provider == "loop":
        rw = inp.router_weight
        fwd = lambda: multi_adapter_linear_ref(x, w, a, bb, b, 1.0, None, rw)[0]  # noqa: E731
    elif provider == "grouped_mm":
        fwd = lambda: grouped_mm_hard(x, w, a, bb, b, 1.0, plan.perm, plan.offsets)  # noqa: E731
    elif provider == "torch_dense":
        rw = inp.router_weight
        fwd = lambda: soft_dense_torch(x, w, a, bb, b, 1.0, rw)  # noqa: E731
    elif provider == "peft":
        layer = peft_layer(w, b, a, bb)
        if direction == "fwd":
            names = ["__base__" if i < 0 else f"t{i}" for i in inp.task_ids.tolist()]

            def fwd():
                with torch.no_grad():  # PEFT's mixed-adapter batches are inference only
                    return layer(x, adapter_names=names)
        else:
            layer.set_adapter("t0")  # training: one adapter for the whole batch
            fwd = lambda: layer(x)  # noqa: E731
    else:
        raise ValueError(f"provider: unknown {provider!r} for {routing}")

    if direction == "fwd":

        def step():
            with torch.no_grad():
                return fwd()

        return step if provider != "peft" else fwd

    def step_bwd():
        y = fwd()
        y.backward(inp.grad_y)
        return y

    return step_bwd


def expected(provider: str, routing: str, direction: str, inp: Inputs) -> Tensor:
    """What a provider's step must compute, in float64 from mftk.ops.reference: the frozen base
    for `base`; hard or soft routing otherwise; PEFT's training step runs adapter t0 on every
    token (PEFT trains one adapter per batch), so its reference routes every token to task 0."""
    d = {k: v.detach().double() for k, v in vars(inp).items() if v.dtype.is_floating_point}
    args = (d["x"], d["weight"], d["lora_a"], d["lora_b"], d["bias"], 1.0)
    if provider == "base":
        return torch.nn.functional.linear(d["x"], d["weight"], d["bias"])
    if routing == "soft":
        return multi_adapter_linear_ref(*args, None, d["router_weight"])[0]
    ids = inp.task_ids
    if provider == "peft" and direction != "fwd":
        ids = torch.zeros_like(ids)
    return multi_adapter_linear_ref(*args, ids)[0]


def check_provider(provider: str, routing: str, direction: str, inp: Inputs, shape: Shape) -> None:
    """Run the provider's step once and raise AssertionError unless its output is `expected`
    (fp32 tolerance): a baseline that computes something else would make its timing meaningless."""
    y = build(provider, routing, direction, inp, shape)()
    want = expected(provider, routing, direction, inp)
    err = float((y.detach().double() - want).abs().max())
    tol = 1e-4 * max(1.0, float(want.abs().max()))
    assert err <= tol, f"{provider} {routing} {direction}: max err {err:.3g} vs the reference"
    for t in (inp.x, inp.lora_a, inp.lora_b, inp.router_weight):
        t.grad = None
