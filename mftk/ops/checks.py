"""Argument checks for the public op: bad input is a ValueError/TypeError naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor

_DEBUG = False
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_debug(enabled: bool = True) -> None:
    """When on, every call checks its floating inputs for NaN/Inf (a device sync per tensor)."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_enabled() -> bool:
    return _DEBUG


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_shape(name: str, t: Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {what} = {tuple(expected)}, got {tuple(t.shape)}")


def check_op_args(
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    scaling: float | Tensor,
    router_weight: Tensor | None,
    router_bias: Tensor | None,
    top_k: int | None,
    temperature: float,
) -> None:
    """Validate shapes, dtypes and devices of multi_adapter_linear's arguments."""
    x = _tensor("x", x)
    lora_a = _tensor("lora_a", lora_a)
    lora_b = _tensor("lora_b", lora_b)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., D_in), got a 0-d tensor")
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a: expected (T, R, D_in), got shape {tuple(lora_a.shape)}")
    num_tasks, rank, _ = lora_a.shape
    if num_tasks < 1 or rank < 1:
        raise ValueError(f"lora_a: expected T >= 1 and R >= 1, got shape {tuple(lora_a.shape)}")
    named = {"lora_a": lora_a, "lora_b": lora_b}
    if weight is not None:  # None: the adapters alone (the caller adds its own base)
        weight = _tensor("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight: expected (D_out, D_in), got shape {tuple(weight.shape)}")
        d_out, d_in = weight.shape
        if x.shape[-1] != d_in:
            raise ValueError(f"x: last dim {x.shape[-1]} != D_in = weight.shape[1] = {d_in}")
        named["weight"] = weight
    else:
        lora_b = _tensor("lora_b", lora_b)
        d_in = x.shape[-1]
        d_out = lora_b.shape[1] if lora_b.dim() == 3 else -1
    check_shape("lora_a", lora_a, (num_tasks, rank, d_in), "(T, R, D_in)")
    _tensor("lora_b", lora_b)
    check_shape("lora_b", lora_b, (num_tasks, d_out, rank), "(T, D_out, R)")
    if bias is not None:
        named["bias"] = _tensor("bias", bias)
        check_shape("bias", bias, (d_out,), "(D_out,)")
    if isinstance(scaling, Tensor):
        if not scaling.dtype.is_floating_point:
            raise TypeError(f"scaling: expected a real floating tensor, got dtype {scaling.dtype}")
        if scaling.numel() not in (1, num_tasks):
            raise ValueError(
                f"scaling: expected a float or (T,) = ({num_tasks},), got {tuple(scaling.shape)}"
            )
        if scaling.requires_grad:
            raise ValueError(
                "scaling: gradients through scaling are not supported; pass it detached"
            )
        if scaling.device != x.device and scaling.device.type != "cpu":
            raise ValueError(f"scaling: expected device {x.device}, got {scaling.device}")
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling: expected a float or a (T,) tensor, got {type(scaling).__name__}")
    if router_weight is not None:
        named["router_weight"] = _tensor("router_weight", router_weight)
        check_shape("router_weight", router_weight, (num_tasks, d_in), "(T, D_in)")
        if router_bias is not None:
            named["router_bias"] = _tensor("router_bias", router_bias)
            check_shape("router_bias", router_bias, (num_tasks,), "(T,)")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_tasks
        ):
            raise ValueError(f"top_k: expected an int in [1, T={num_tasks}], got {top_k!r}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature > 0
        ):
            raise ValueError(f"temperature: expected a positive float, got {temperature!r}")
    elif router_bias is not None:
        raise ValueError("router_bias: given without router_weight")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, but x is on {x.device}")
    if _DEBUG:
        for name, t in {"x": x, **named}.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN or Inf (mftk debug checks are on)")


def check_shared_args(
    lora_a: Tensor,
    lora_b: Tensor,
    shared_a: Tensor | None,
    shared_b: Tensor | None,
    shared_scaling: float,
    shared_tasks: Tensor | None,
) -> None:
    """The hybrid (shared adapter) arguments of the op, against lora_a (T, R, D_in) and lora_b
    (T, D_out, R)."""
    if (shared_a is None) != (shared_b is None):
        raise ValueError("shared_a and shared_b: give both (a hybrid layer) or neither")
    _tensor("shared_a", shared_a)
    _tensor("shared_b", shared_b)
    if shared_a.dim() != 2 or shared_a.shape[0] < 1:
        raise ValueError(f"shared_a: expected shape (R_s, D_in), got {tuple(shared_a.shape)}")
    num_tasks, d_out, d_in = lora_a.shape[0], lora_b.shape[1], lora_a.shape[2]
    rs = shared_a.shape[0]
    check_shape("shared_a", shared_a, (rs, d_in), "(R_s, D_in)")
    check_shape("shared_b", shared_b, (d_out, rs), "(D_out, R_s)")
    for name, t in (("shared_a", shared_a), ("shared_b", shared_b)):
        if t.dtype != lora_a.dtype or t.device != lora_a.device:
            raise ValueError(
                f"{name}: expected {lora_a.dtype} on {lora_a.device} like lora_a, got "
                f"{t.dtype} on {t.device}"
            )
    if isinstance(shared_scaling, bool) or not isinstance(shared_scaling, (int, float)):
        raise TypeError(f"shared_scaling: expected a float, got {shared_scaling!r}")
    if shared_tasks is not None:
        _tensor("shared_tasks", shared_tasks)
        check_shape("shared_tasks", shared_tasks, (num_tasks,), "(T,)")
