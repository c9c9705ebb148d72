"""Patch a whole model with MultiAdapterLinear layers, name tasks, and merge one task back in.

    model = mftk.patch_model(model, tasks=["code", "sql"], rank=16, alpha=32)
    with mftk.use_tasks(model, ["code", "sql"]):   # one task per sequence
        out = model(input_ids)

patch_model stores its settings as `model.mftk_config` (an MftkConfig): the task names (index i is
task i everywhere), rank, alpha, the patched module names, router settings and, per task, the
LoRA hyper-parameters it came with (for PEFT export).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mftk.core import (
    BASE,
    MftkConfig,
    adapter_layers,
    find_targets,
    num_decoder_layers,
    set_module,
    task_index,
    task_names,
    unwrap,
)
from mftk.nn import MultiAdapterLinear, lora_scale
from mftk.pyramid import (
    filter_by_layers,
    mask_padded_grads,
    parse_layers,
    zero_padding_,
)
from mftk.quant import (
    as_quant_spec,
    dequantize_weight,
    is_4bit,
    quant_info,
    quant_settings,
    quantize_linear,
    quantize_linears,
    quantized_adapter_layer,
)
from mftk.routing import clear_default_tasks
from mftk.spec import AdapterSpec, QuantSpec


def patch_model(
    model: nn.Module,
    tasks: Sequence[str],
    rank: int | dict[str, int] | Sequence[int] = 8,
    alpha: float | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    router: str | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    quantize: str | QuantSpec | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    quantize_all_linear: bool = False,
    layers: str | int | slice | Sequence[int] | None = None,
    spec: AdapterSpec | None = None,
    mode: str = "per_task",
    shared_rank: int | None = None,
    shared_alpha: float | None = None,
) -> nn.Module:
    """Replace the target nn.Linear layers (never lm_head) by MultiAdapterLinear, in place.

    Every other parameter is frozen; only adapters (and routers) train. Weights are shared with the
    original layers, not copied. alpha defaults to rank (scaling 1). Returns the model, with
    `model.mftk_config` set. Outside `mftk.use_tasks`, forwards of a model without a router raise.

    quantize="nf4" | "fp4" (QLoRA; needs bitsandbytes): each target's base becomes a frozen 4-bit
    bitsandbytes Linear4bit (double_quant: 8-bit absmax constants; matmuls in compute_dtype),
    quantized on its device one layer at a time; the adapters stay in the layer's dtype and go
    through the op with weight=None. quantize_all_linear=True also quantizes every other nn.Linear
    except the output layer (lm_head). See mftk.quant. Targets that already are 4-bit Linear4bit
    layers (mftk.quant.quantize_model, or transformers' BitsAndBytesConfig) are wrapped as they are.

    rank: an int, or per task a {task: rank} dict / a list in task order. Mixed ranks are padded
    to R = max rank; the padded slices are zero and held at exactly zero (gradient hooks; see
    mftk.pyramid). With mixed ranks, alpha=None means alpha = r_t per task (scaling 1); a number
    gives scaling alpha / r_t (PEFT's lora_alpha / r).
    layers: decoder-layer indices to patch ("18:", "2:6", a slice, a list; None = all). Target
    modules in other layers stay plain frozen nn.Linear.
    mode="hybrid": every routed token also gets one shared adapter of rank shared_rank (default:
    the largest task rank) and alpha shared_alpha (default: shared_rank), in the same op call.
    spec: every adapter setting at once (mftk.AdapterSpec: rank, alpha, use_rslora, dropout,
    router, top_k, temperature, quantize); the keyword spellings of those then stay at their
    defaults.
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"tasks: expected a non-empty list of task names, got {tasks!r}")
    for t in tasks:
        if not isinstance(t, str) or not t or t == BASE:
            raise ValueError(
                f"tasks: each task name must be a non-empty str other than {BASE!r}, got {t!r}"
            )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: duplicate task names in {list(tasks)}")
    if any(isinstance(m, MultiAdapterLinear) for m in model.modules()):
        raise ValueError("model: already patched by mftk (it has MultiAdapterLinear layers)")
    if spec is None:
        quant = as_quant_spec(quantize, double_quant, compute_dtype, bool(quantize_all_linear))
        if quantize_all_linear and quant is None:
            raise ValueError("quantize_all_linear: needs quantize='nf4' or 'fp4'")
        spec = AdapterSpec(
            rank=rank, alpha=alpha, use_rslora=use_rslora, dropout=dropout, router=router,
            top_k=top_k, temperature=temperature, quantize=quant, mode=mode,
            shared_rank=shared_rank, shared_alpha=shared_alpha,
        )  # fmt: skip
    elif not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec: expected an mftk.AdapterSpec, got {type(spec).__name__}")
    else:
        given = locals()
        _check_no_keywords({k: given[k] for k in SPEC_KEYWORDS})
    spec.check_tasks(len(tasks))
    ranks = spec.ranks(tasks)
    layer_ids = None if layers is None else parse_layers(layers, num_decoder_layers(model))
    names = filter_by_layers(find_targets(model, target_modules), layer_ids)
    mixed = len(set(ranks)) > 1
    rank, alpha, quant = max(ranks), spec.alpha, spec.quantize
    others = [n for n in find_targets(model, "all-linear") if n not in names]
    kw = spec.layer_kwargs()
    new = {
        n: MultiAdapterLinear.from_linear(model.get_submodule(n), len(tasks), rank, alpha, **kw)
        if quant is None and not is_4bit(model.get_submodule(n))
        else quantized_adapter_layer(model.get_submodule(n), len(tasks), rank, alpha, quant, **kw)
        for n in names
    }
    if quant is not None and quant.all_linear:
        quantize_linears(model, others, quant)
    # a model quantized before patching (quantize_model, transformers' bnb loading): read it
    qinfo = quant.to_dict() if quant is not None else quant_info(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in new.items():
        set_module(model, n, m)
        for p in m.adapter_params():
            p.requires_grad_(True)
    alphas = spec.alphas(ranks)
    if mixed:
        with torch.no_grad():
            for m in new.values():
                for t, (r, a) in enumerate(zip(ranks, alphas)):
                    m.lora_rank[t] = r
                    m.lora_scaling[t] = lora_scale(a, r, spec.use_rslora)
                zero_padding_(m)
                mask_padded_grads(m)
    first = next(iter(new.values()))
    base = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    model.mftk_config = MftkConfig(
        tasks=list(tasks), rank=rank, alpha=first.alpha, target_modules=names,
        router=spec.router, top_k=spec.top_k, temperature=spec.temperature, dropout=spec.dropout,
        use_rslora=spec.use_rslora, base_model=base or None, quantize=qinfo,
        task_adapters={
            t: {"r": r, "lora_alpha": a if mixed else first.alpha, "use_rslora": spec.use_rslora}
            for t, r, a in zip(tasks, ranks, alphas)
        },
        layers=layer_ids, ranks=list(ranks) if mixed else None, mode=spec.mode,
        shared_rank=first.shared_rank or None,
        shared_alpha=first.shared_alpha if first.shared_rank else None,
    )  # fmt: skip
    clear_default_tasks(model)
    return model


# patch_model's keyword spellings of what an AdapterSpec holds
SPEC_KEYWORDS = (
    "rank", "alpha", "router", "top_k", "temperature", "dropout", "use_rslora", "quantize",
    "double_quant", "compute_dtype", "quantize_all_linear", "mode", "shared_rank", "shared_alpha",
)  # fmt: skip


def _check_no_keywords(values: dict[str, Any]) -> None:
    """With spec=..., the keyword spellings must keep patch_model's own defaults."""
    params = inspect.signature(patch_model).parameters
    given = [k for k, v in values.items() if v != params[k].default]
    if given:
        raise ValueError(f"spec: given together with {given}; put those settings in the spec")


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable mftk parameters (lora_a, lora_b, routers) of every patched layer."""
    for _, m in adapter_layers(model):
        yield from m.adapter_params()


ADAPTER_KEYS = (
    "lora_a", "lora_b", "router_weight", "router_bias", "lora_scaling", "lora_rank",
    "shared_a", "shared_b", "shared_tasks",
)  # fmt: skip


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{"<module>.<lora_a|lora_b|router_weight|router_bias|lora_scaling|lora_rank>": tensor},
    detached, for every patched layer: everything mftk adds to the base model."""
    out = {}
    for name, m in adapter_layers(model):
        for k in ADAPTER_KEYS:
            v = getattr(m, k)
            if v is not None:
                out[f"{name}.{k}"] = v.detach()
    return out


# --- merge -------------------------------------------------------------------------------------


def merge(
    model: nn.Module,
    task: str | int,
    keep_original: bool = True,
    dequantize: bool = False,
    requantize: bool = False,
) -> nn.Module:
    """Fold one task into the base weights: every MultiAdapterLinear becomes a plain nn.Linear with
    W' = W + s[t] * B[t] @ A[t] (+ s_sh * B_sh @ A_sh for a hybrid task; computed in float32,
    float64 for float64 weights), in place.

    The original weights are never modified, so `unmerge(model)` restores the patched model exactly
    (keep_original=False frees the originals instead; then there is no unmerge). Biases are shared.
    Returns the model, which then holds no mftk module.

    4-bit bases (patch_model(quantize=...)) are refused unless asked for: dequantize=True merges
    into the dequantized weight, dequant(W) + s B A, as a full-precision nn.Linear in the dtype
    the base was quantized from; requantize=True then quantizes the merged weight again with the
    layer's own settings (which rounds the adapter's update away in part: evaluate it before use).
    """
    model = unwrap(model)
    if getattr(model, "_mftk_merged", None) is not None:
        raise ValueError("model: already merged; call mftk.unmerge(model) first")
    t = task_index(model, task)
    layers = adapter_layers(model)
    quantized = [n for n, m in layers if m.base_layer is not None]
    if quantized and not (dequantize or requantize):
        raise ValueError(
            f"model: {len(quantized)} layers (e.g. {quantized[0]!r}) have a 4-bit base; merging "
            "into 4-bit weights would round the adapter away. Pass dequantize=True (merge into "
            "full-precision dequantized weights) or requantize=True (dequantize, merge, quantize "
            "again), or export the task with mftk.export_peft and merge on the full-precision base"
        )
    originals = {}
    with torch.no_grad():
        for name, m in layers:
            q = m.base_layer
            w = m.weight if q is None else dequantize_weight(q)
            if t >= 0:
                cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
                delta = float(m.lora_scaling[t]) * (m.lora_b[t].to(cdt) @ m.lora_a[t].to(cdt))
                if m.shared_a is not None and float(m.shared_tasks[t]):
                    delta += m.shared_scaling * (m.shared_b.to(cdt) @ m.shared_a.to(cdt))
                w = (w.to(cdt) + delta).to(w.dtype)
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            lin.bias = m.bias if q is None else q.bias
            if q is not None and requantize:
                lin = quantize_linear(lin, **quant_settings(q))
            set_module(model, name, lin)
            originals[name] = m
    names = task_names(model)
    model._mftk_merged = {
        "task": names[t] if names and t >= 0 else t,
        "modules": originals if keep_original else None,
    }
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge: put the original MultiAdapterLinear layers back, bit-exact. Returns model."""
    model = unwrap(model)
    merged = getattr(model, "_mftk_merged", None)
    if merged is None:
        raise ValueError("model: not merged (mftk.merge was not called)")
    if merged["modules"] is None:
        raise ValueError("model: merged with keep_original=False; the original layers are gone")
    for name, m in merged["modules"].items():
        set_module(model, name, m)
    model._mftk_merged = None
    return model
