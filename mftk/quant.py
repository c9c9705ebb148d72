"""QLoRA: 4-bit (nf4 / fp4) frozen bases from bitsandbytes under the multi-adapter layers.

A quantized MultiAdapterLinear computes

    y = base_layer(x) + adapters(x)
    base_layer(x) = x_c @ dequant(W4).T + b      (bitsandbytes' 4-bit matmul)

with x_c = x cast to compute_dtype (the result is cast back to x's dtype).

The base is a `bitsandbytes.nn.Linear4bit` holding the packed 4-bit weight (D_out * D_in / 2 bytes)
plus blockwise constants (one absmax per 64 weights; with double quantization those absmax are
themselves 8-bit, with one float32 per 256 blocks). Its backward dequantizes one layer at a time and
saves only the packed weight. The adapters (and router) stay in the model's dtype and go through
`mftk.multi_adapter_linear(x, None, ...)`, so no dense copy of W is ever kept.

bitsandbytes is optional (`pip install bitsandbytes`); everything here imports it lazily.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from mftk.core import find_targets, unwrap
from mftk.nn import MultiAdapterLinear
from mftk.spec import BLOCKSIZE, COMPUTE_DTYPES, QUANT_TYPES, QuantSpec, compute_dtype_of

__all__ = ["BLOCKSIZE", "COMPUTE_DTYPES", "QUANT_TYPES", "QuantSpec"]

QuantArg = str | QuantSpec | None  # a quant_type name, or the whole QuantSpec

_bnb: Any = None
_SHARED_CODES: dict[tuple, Tensor] = {}


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or an ImportError that says how to install it."""
    global _bnb
    if _bnb is not None:
        return _bnb
    # Its CPU backend tries `from kernels import get_kernel` (a Hugging Face hub package) and logs
    # a warning when that fails, which it always does here. Inside an mftk checkout that name would
    # even resolve to mftk's own kernels/ folder (installed as mftk.kernels), so drop that stray
    # module again afterwards.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    had_kernels = "kernels" in sys.modules
    try:
        _bnb = importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise ImportError(
            "quantize: 4-bit bases need bitsandbytes (pip install bitsandbytes, or the mftk "
            f"'qlora' extra): {e}"
        ) from e
    stray = sys.modules.get("kernels")
    if not had_kernels and stray is not None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.abspath(getattr(stray, "__file__", "") or "").startswith(here + os.sep):
            del sys.modules["kernels"]
    _fix_cpu_dequantize(_bnb)
    return _bnb


def dequantize_4bit_flat(
    packed: Tensor,
    absmax: Tensor,
    blocksize: int,
    quant_type: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> Tensor:
    """W = code[q] * absmax[block], blocks of `blocksize` over the flattened weight (bitsandbytes'
    layout: its quantizer and CUDA kernels). packed: two 4-bit codes per byte, high nibble first;
    absmax: (ceil(numel / blocksize),) float32 (already dequantized when double-quantized)."""
    bnb = require_bitsandbytes()
    n = 1
    for d in shape:
        n *= int(d)
    a = packed.reshape(-1)
    a = a if a.dtype == torch.uint8 else a.view(torch.uint8)
    idx = torch.stack((a >> 4, a & 0xF), dim=-1).reshape(-1)[:n].long()
    code = bnb.functional.get_4bit_type(quant_type, device=packed.device)
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code[idx] * scale).reshape(tuple(shape)).to(dtype)


def _fix_cpu_dequantize(bnb: Any) -> None:
    # bitsandbytes 0.50.2's CPU dequantize kernel restarts the blocks at every row, while its
    # quantizer (and CUDA) run them over the flattened weight: any weight whose D_in is not a
    # multiple of the block size comes back wrong (relative error ~0.25 instead of ~0.09), in the
    # forward, the backward and dequantize alike. Detect that on a small weight and, if present,
    # replace the CPU kernel of bitsandbytes::dequantize_4bit by the flat-block one above.
    w = torch.arange(2 * 96, dtype=torch.float32).sin().reshape(2, 96)
    q, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    got = bnb.functional.dequantize_4bit(q, st)
    want = dequantize_4bit_flat(q, st.absmax, 64, "nf4", w.shape, torch.float32)
    if torch.equal(got, want):
        return

    def kernel(A, absmax, blocksize, quant_type, shape, dtype):  # the op's schema
        return dequantize_4bit_flat(A, absmax, blocksize, quant_type, shape, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", kernel)


def bitsandbytes_available() -> bool:
    """True when bitsandbytes imports."""
    try:
        require_bitsandbytes()
    except ImportError:
        return False
    return True


def check_quant_args(
    quantize: QuantArg,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    blocksize: int = BLOCKSIZE,
) -> torch.dtype | None:
    """Validate the quantization settings (QuantSpec's checks); return compute_dtype as a
    torch.dtype. Raises ValueError / TypeError naming the bad argument. No bitsandbytes import."""
    if isinstance(quantize, QuantSpec):
        return quantize.compute_dtype
    if quantize is not None:
        return as_quant_spec(
            quantize, double_quant, compute_dtype, blocksize=blocksize
        ).compute_dtype
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected a bool, got {type(double_quant).__name__}")
    return compute_dtype_of(compute_dtype)


def as_quant_spec(
    quantize: QuantArg,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    all_linear: bool = False,
    blocksize: int = BLOCKSIZE,
) -> QuantSpec | None:
    """The one QuantSpec for the settings (None for no quantization): a QuantSpec is returned as
    is, a name ("nf4" | "fp4") is completed by the other arguments."""
    if quantize is None or isinstance(quantize, QuantSpec):
        return quantize
    return QuantSpec(quantize, double_quant, compute_dtype, all_linear, blocksize)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """'bfloat16' for torch.bfloat16 (for JSON configs)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (without importing bitsandbytes when it is not loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _share_codes(state: Any) -> None:
    # Every quant state carries its own copy of the constant lookup tables (16 floats for nf4/fp4,
    # 256 for the double-quant map). They are the same for every layer: share one copy.
    for st in (state, getattr(state, "state2", None)):
        if st is None:
            continue
        key = (st.code.device, st.code.dtype, tuple(st.code.shape), tuple(st.code.tolist()))
        st.code = _SHARED_CODES.setdefault(key, st.code)


def quantize_linear(
    linear: nn.Linear,
    quant_type: QuantArg = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    blocksize: int = BLOCKSIZE,
) -> nn.Module:
    """A frozen bitsandbytes Linear4bit holding `linear`'s weight quantized to 4 bits.

    linear: nn.Linear with weight (D_out, D_in) fp32|bf16|fp16 on CPU or CUDA (not meta).
    Quantizes on the weight's device; the bias is shared, not copied. The dense weight is not
    kept: once `linear` is dropped its memory is freed. Returns Linear4bit computing
    (..., D_in) -> (..., D_out) in the input's dtype, with matmuls in compute_dtype.
    """
    if quant_type is None:
        raise ValueError("quant_type: expected 'nf4' or 'fp4', got None")
    spec = as_quant_spec(quant_type, double_quant, compute_dtype, blocksize=blocksize)
    quant_type, double_quant, dt = spec.quant_type, spec.double_quant, spec.compute_dtype
    blocksize = spec.blocksize
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    if w.device.type == "meta":
        raise ValueError(
            "linear: weight is on the meta device; load real weights before quantizing"
        )
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"linear: bitsandbytes quantizes float32/bfloat16/float16 weights, got {w.dtype}"
        )
    bnb = require_bitsandbytes()
    with torch.device("meta"):  # no throw-away dense allocation for Linear4bit's own init
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=dt, compress_statistics=double_quant, quant_type=quant_type,
        )  # fmt: skip
    param = bnb.nn.Params4bit(
        w.detach(), requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
        quant_type=quant_type, module=q,
    )  # fmt: skip
    q.weight = param._quantize(w.device)
    _share_codes(q.weight.quant_state)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    # On AVX512-BF16 CPUs Linear4bit repacks its weight in place the first time it runs in eval mode
    # without grad, and from then on computes in bf16 whatever compute_dtype says. Keep the
    # standard layout (dequantize + matmul in compute_dtype) so outputs do not depend on the CPU or
    # on the mode, and dequantize_weight / state_dict keep working.
    q.support_avx512bf16_for_cpu = False
    return q


def dequantize_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The dense (D_out, D_in) weight a Linear4bit (or quantized MultiAdapterLinear) computes with.

    dtype: defaults to the dtype the weight was quantized from. Allocates one layer's weight.
    """
    base = getattr(module, "base_layer", None) or module
    if not is_4bit(base):
        raise TypeError(f"module: expected a 4-bit layer, got {type(base).__name__}")
    w = base.weight
    st = w.quant_state
    if getattr(st, "packing_format_for_cpu", False):
        raise ValueError(
            "module: its 4-bit weight was repacked for bitsandbytes' CPU inference kernel; "
            "quantize it with mftk.quant.quantize_linear, which keeps the standard layout"
        )
    F = require_bitsandbytes().functional
    out = F.dequantize_4bit(w.data, st)
    return out if dtype is None else out.to(dtype)


def dequantize_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """An nn.Linear with the dequantized weight of a Linear4bit; the bias is shared."""
    base = getattr(module, "base_layer", None) or module
    w = dequantize_weight(base, dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    lin.bias = base.bias
    return lin


def quant_settings(module: nn.Module) -> dict[str, Any]:
    """{"quant_type", "double_quant", "compute_dtype", "blocksize"} of a Linear4bit."""
    base = getattr(module, "base_layer", None) or module
    if not is_4bit(base):
        raise TypeError(f"module: expected a 4-bit layer, got {type(base).__name__}")
    w = base.weight
    return {
        "quant_type": w.quant_type,
        "double_quant": bool(w.compress_statistics),
        "compute_dtype": base.compute_dtype,
        "blocksize": int(w.blocksize),
    }


def _tensors(module: nn.Module) -> Iterator[Tensor]:
    if isinstance(module, MultiAdapterLinear):  # a quantized one's base_layer is visited itself
        if module.weight is not None:
            yield module.weight
    elif is_4bit(module):
        st = module.weight.quant_state
        yield module.weight.data
        yield from (st.absmax, st.code)
        if st.nested:
            yield from (st.offset, st.state2.absmax, st.state2.code)
    else:
        yield module.weight
    if getattr(module, "bias", None) is not None:
        yield module.bias


def base_linear_bytes(model: nn.Module, include_bias: bool = False) -> int:
    """Bytes held by the base weights of every linear layer below `model` (nn.Linear, Linear4bit,
    and the bases of MultiAdapterLinear), 4-bit quantization constants included; each storage
    counted once. The output layer (lm_head) counts if it is below model; adapters do not."""
    seen, total = set(), 0
    for m in model.modules():
        if not isinstance(m, (nn.Linear, MultiAdapterLinear)):  # Linear4bit is an nn.Linear
            continue
        for t in _tensors(m):
            if t is m.bias and not include_bias:
                continue
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def quantized_adapter_layer(
    linear: nn.Linear,
    num_tasks: int,
    rank: int,
    alpha: float | None,
    quant_type: QuantArg,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    **kw: Any,
) -> nn.Module:
    """A MultiAdapterLinear over `linear` quantized to 4 bits; adapters in linear's dtype/device.

    linear: an nn.Linear (quantized here), or a Linear4bit already (e.g. from transformers'
    BitsAndBytesConfig or quantize_model), used as is; the adapters then take the dtype the
    weight was quantized from. kw: router, top_k, temperature, dropout, use_rslora.
    """
    if is_4bit(linear):
        q, dtype = linear, linear.weight.quant_state.dtype
        q.support_avx512bf16_for_cpu = False  # see quantize_linear
    else:
        q, dtype = quantize_linear(linear, quant_type, double_quant, compute_dtype), None
    w = q.weight
    return MultiAdapterLinear.from_base_layer(
        q, linear.in_features, linear.out_features, num_tasks, rank, alpha, device=w.device,
        dtype=dtype or linear.weight.dtype, **kw,
    )  # fmt: skip


def quantize_linears(
    model: nn.Module,
    names: list[str],
    quant_type: QuantArg,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
) -> None:
    """Replace the nn.Linear modules `names` of model by frozen 4-bit Linear4bit, one at a time
    (each dense weight is freed as soon as its layer is swapped, unless something else holds it)."""
    for name in names:
        lin = model.get_submodule(name)
        q = quantize_linear(lin, quant_type, double_quant, compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        del lin


def quantize_model(
    model: nn.Module,
    quant_type: QuantArg,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    target_modules: str | list[str] = "all-linear",
    all_linear: bool = False,
) -> list[str]:
    """Quantize a loaded model's linears to 4 bits in place, one layer at a time (each dense
    weight is freed once its layer is swapped): the target modules (patch_model's rule), or every
    nn.Linear with all_linear; never the output layer (lm_head). patch_model then puts adapters
    over the 4-bit targets. quant_type: "nf4" | "fp4", or a QuantSpec (whose all_linear then
    wins). Returns the names quantized."""
    spec = as_quant_spec(quant_type, double_quant, compute_dtype, all_linear)
    if spec is None:
        raise ValueError("quant_type: expected 'nf4', 'fp4' or a QuantSpec, got None")
    quant_type = spec
    model = unwrap(model)
    names = find_targets(model, "all-linear" if spec.all_linear else target_modules)
    names = [n for n in names if not is_4bit(model.get_submodule(n))]
    quantize_linears(model, names, quant_type, double_quant, compute_dtype)
    return names


def quant_info(model: nn.Module, targets: list[str]) -> dict[str, Any] | None:
    """MftkConfig.quantize for a model with 4-bit linears (None if it has none): the first 4-bit
    layer's settings, compute_dtype as a name, and whether linears other than the adapter
    targets (module names) are 4-bit too."""
    model = unwrap(model)
    four = [(n, m) for n, m in model.named_modules() if is_4bit(m)]
    if not four:
        return None
    info = quant_settings(four[0][1])
    info["compute_dtype"] = dtype_name(info["compute_dtype"])
    targets = set(targets)
    info["quantize_all_linear"] = any(n.removesuffix(".base_layer") not in targets for n, _ in four)
    return info
