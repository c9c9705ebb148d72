"""Shared input builders and tolerances for the op tests (and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mftk.ops.reference import multi_adapter_linear_ref

# |kernel - ref64| <= 2 * |torch_same_dtype - ref64| + ATOL * max|ref64| + RTOL * |ref64|
# (flash-attention's rule, with a floor per dtype: ATOL is relative to the tensor's scale, since a
# gradient element is a sum of many large terms and cancellation leaves it small).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass
class Case:
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor
    scaling: Tensor
    task_ids: Tensor | None
    router_weight: Tensor | None
    router_bias: Tensor | None
    top_k: int | None
    temperature: float

    def kwargs(self) -> dict:
        kw = dict(
            bias=self.bias, scaling=self.scaling, top_k=self.top_k, temperature=self.temperature
        )
        if self.task_ids is not None:
            kw["task_ids"] = self.task_ids
        if self.router_weight is not None:
            kw["router_weight"] = self.router_weight
            kw["router_bias"] = self.router_bias
        return kw

    def leaves(self) -> list[Tensor]:
        """The differentiable inputs, in a fixed order."""
        out = [self.x, self.lora_a, self.lora_b]
        out += [t for t in (self.bias, self.router_weight, self.router_bias) if t is not None]
        return out

    def to(self, dtype: torch.dtype) -> Case:
        def conv(t):
            if t is None or not t.dtype.is_floating_point:
                return t
            return t.detach().to(dtype).requires_grad_(t.requires_grad)

        return Case(
            *(conv(getattr(self, f)) for f in ("x", "weight", "bias", "lora_a", "lora_b")),
            self.scaling.double(),
            self.task_ids,
            conv(self.router_weight),
            conv(self.router_bias),
            self.top_k,
            self.temperature,
        )


def make_case(
    n: int,
    d_in: int,
    d_out: int,
    t: int,
    r: int,
    mode: str = "hard",
    dtype: torch.dtype = torch.float32,
    top_k: int | None = None,
    bias: bool = True,
    ids: Tensor | None = None,
    lead: tuple[int, ...] | None = None,
) -> Case:
    """Fresh random inputs (never zeros). mode: hard | soft. lead replaces (n,) as leading dims."""
    shape = lead if lead is not None else (n,)
    g = dict(dtype=torch.float64)
    x = torch.randn(*shape, d_in, **g)
    w = torch.randn(d_out, d_in, **g) / d_in**0.5
    b = torch.randn(d_out, **g) if bias else None
    a = torch.randn(t, r, d_in, **g) / d_in**0.5
    bb = torch.randn(t, d_out, r, **g) / r**0.5
    s = torch.rand(t, dtype=torch.float64) + 0.5
    task_ids = rw = rb = None
    if mode == "hard":
        task_ids = ids if ids is not None else torch.randint(-1, t, shape)
    else:
        rw = torch.randn(t, d_in, **g) / d_in**0.5
        rb = torch.randn(t, **g)
    case = Case(x, w, b, a, bb, s, task_ids, rw, rb, top_k, 0.8)
    case = case.to(dtype)
    for leaf in case.leaves():
        leaf.requires_grad_(True)
    return case


def run(case: Case, fn, grad_out: Tensor | None = None, **extra):
    """Forward and every gradient in one autograd.grad call. Returns (y, grads, grad_out)."""
    y = fn(case, **extra)
    if grad_out is None:
        grad_out = torch.randn(y.shape, dtype=torch.float64)
    leaves = case.leaves()
    grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype), allow_unused=True)
    # An input the graph never used (e.g. no routed token) has a zero gradient.
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return y, grads, grad_out


def reference_fn(case: Case) -> Tensor:
    lead = case.x.shape[:-1]
    x2 = case.x.reshape(-1, case.x.shape[-1])
    ids = case.task_ids.reshape(-1) if case.task_ids is not None else None
    y, _ = multi_adapter_linear_ref(
        x2,
        case.weight,
        case.lora_a,
        case.lora_b,
        case.bias,
        case.scaling,
        ids,
        case.router_weight,
        case.router_bias,
        case.top_k,
        case.temperature,
    )
    return y.reshape(*lead, case.lora_b.shape[1])


def assert_close(name: str, got: Tensor, ref64: Tensor, same_dtype: Tensor | None, dtype) -> None:
    """flash-attention's criterion: err(got) <= 2 * err(plain torch in the same dtype) + atol."""
    got64 = got.detach().double()
    err = (got64 - ref64).abs()
    ref64 = ref64.detach()
    atol = ATOL[dtype] * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    bound = atol + RTOL[dtype] * ref64.abs()
    if same_dtype is not None:
        bound = torch.maximum(bound, 2 * (same_dtype.detach().double() - ref64).abs() + atol)
    bad = err > bound
    if bad.any():
        flat = (err - bound).flatten().argmax()
        idx = tuple(int(i) for i in torch.unravel_index(flat, err.shape))
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} at {idx}, "
            f"got {got64[idx].item():.6g} want {ref64[idx].item():.6g} "
            f"({int(bad.sum())}/{err.numel()} elements out of tolerance)"
        )


def with_threads(threads: int, fn):
    """fn() with torch's intra-op thread count set to `threads`, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def assert_same_bits_across_threads(fn, repeats: int = 3) -> None:
    """fn() -> list of tensors gives the one-thread result bit for bit with two threads, every
    time (a result that depends on which thread finished first would differ)."""
    one = with_threads(1, fn)
    for _ in range(repeats):
        for a, b in zip(one, with_threads(2, fn), strict=True):
            assert torch.equal(a, b)
