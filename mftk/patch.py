"""Patch a whole model with MultiAdapterLinear layers, name tasks, and merge one task back in.

    model = mftk.patch_model(model, tasks=["code", "sql"], rank=16, alpha=32)
    with mftk.use_tasks(model, ["code", "sql"]):   # one task per sequence
        out = model(input_ids)

patch_model stores its settings as `model.mftk_config` (an MftkConfig): the task names (index i is
task i everywhere), rank, alpha, the patched module names, router settings and, per task, the
LoRA hyper-parameters it came with (for PEFT export).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mftk.nn import MultiAdapterLinear
from mftk.quant import (
    BLOCKSIZE,
    check_quant_args,
    dequantize_weight,
    dtype_name,
    is_4bit,
    quant_info,
    quant_settings,
    quantize_linear,
    quantize_linears,
    quantized_adapter_layer,
)

BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches; task id -1


@dataclass
class MftkConfig:
    """What patch_model did; JSON-serialisable via to_dict / from_dict."""

    tasks: list[str]
    rank: int
    alpha: float
    target_modules: list[str]
    router: str | None = None
    top_k: int | None = None
    temperature: float = 1.0
    dropout: float = 0.0
    use_rslora: bool = False
    base_model: str | None = None
    # per task: {"r", "lora_alpha", "use_rslora"} (what export_peft writes; import_peft sets it)
    task_adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # 4-bit base (mftk.quant): {"quant_type", "double_quant", "compute_dtype",
    # "quantize_all_linear", "blocksize"}; None: full-precision base
    quantize: dict[str, Any] | None = None
    # decoder-layer indices that carry adapters (None: all); see mftk.pyramid
    layers: list[int] | None = None
    # per-task ranks when they differ (rank is then their max, the padded R); None: all = rank
    ranks: list[int] | None = None
    # per-task output heads: {task: {"type": "classify", "labels": [...], "hidden_size": H}}
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MftkConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"mftk config: unknown keys {sorted(unknown)}")
        return cls(**d)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, seen through torch.compile's OptimizedModule."""
    return getattr(model, "_orig_mod", model)


def adapter_layers(model: nn.Module) -> list[tuple[str, MultiAdapterLinear]]:
    """(qualified name, layer) for every MultiAdapterLinear in model (model itself included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, MultiAdapterLinear)]
    if not layers:
        raise ValueError("model: has no MultiAdapterLinear layers; call mftk.patch_model first")
    counts = {m.num_tasks for _, m in layers}
    if len(counts) != 1:
        raise ValueError(f"model: its MultiAdapterLinear layers disagree on num_tasks: {counts}")
    return layers


def get_config(model: nn.Module) -> MftkConfig:
    cfg = getattr(unwrap(model), "mftk_config", None)
    if not isinstance(cfg, MftkConfig):
        raise ValueError("model: not patched by mftk.patch_model (no model.mftk_config)")
    return cfg


def task_names(model: nn.Module) -> list[str] | None:
    cfg = getattr(unwrap(model), "mftk_config", None)
    return list(cfg.tasks) if isinstance(cfg, MftkConfig) else None


def _num_tasks(model: nn.Module) -> int:
    return adapter_layers(model)[0][1].num_tasks


def task_index(model: nn.Module, task: str | int | None) -> int:
    """The index of a task given by name or index; None, -1 and "__base__" mean base only (-1)."""
    names, n = task_names(model), _num_tasks(model)
    if task is None or task == BASE:
        return -1
    if isinstance(task, str):
        if names is None or task not in names:
            raise ValueError(f"task: unknown task {task!r}; known tasks: {names}")
        return names.index(task)
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task: expected a task name or an int index, got {type(task).__name__}")
    if not -1 <= task < n:
        raise ValueError(f"task: index {task} out of range; expected -1 (base) or 0..{n - 1}")
    return task


def to_task_ids(model: nn.Module, task_ids: Any) -> Tensor:
    """Task ids as an int64 tensor (on task_ids' device if it is a tensor, else CPU).

    task_ids: an int tensor, a name or index (returned as a 0-d tensor), or a (nested) list of
    names and indices, (B,) or (B, S). Raises ValueError naming a bad name or out-of-range id.
    """
    n = _num_tasks(model)
    if isinstance(task_ids, Tensor):
        if (
            task_ids.dtype.is_floating_point
            or task_ids.dtype.is_complex
            or task_ids.dtype == torch.bool
        ):
            raise TypeError(f"task_ids: expected an integer tensor, got dtype {task_ids.dtype}")
        if task_ids.dim() > 2:
            raise ValueError(
                f"task_ids: expected (B,) or (B, S), got shape {tuple(task_ids.shape)}"
            )
        ids = task_ids.to(torch.int64)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= n:
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"task_ids: task id {bad} out of range; expected -1 (base) or 0..{n - 1} "
                    f"(tasks {task_names(model)})"
                )
        return ids
    if isinstance(task_ids, (str, int)):
        return torch.tensor(task_index(model, task_ids), dtype=torch.int64)

    def conv(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [conv(u) for u in v]
        try:
            return task_index(model, v)
        except (ValueError, TypeError) as e:
            raise type(e)(f"task_ids: {e}") from None

    if not isinstance(task_ids, (list, tuple)):
        raise TypeError(
            f"task_ids: expected a tensor, a task name/index or a list, "
            f"got {type(task_ids).__name__}"
        )
    try:
        ids = torch.tensor(conv(task_ids), dtype=torch.int64)
    except ValueError as e:
        if "task" in str(e):
            raise
        raise ValueError(f"task_ids: nested lists must be rectangular ({e})") from None
    if ids.dim() > 2:
        raise ValueError(f"task_ids: expected (B,) or (B, S), got shape {tuple(ids.shape)}")
    return ids


# --- patching ----------------------------------------------------------------------------------


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the nn.Linear modules to patch; never the output layer (lm_head).

    "all-linear": every nn.Linear. A list: module names, each matching a module whose name equals
    it or ends with "." + it (PEFT's rule). Another string: a regex that must match the full name.
    """
    out = _output_layer(model)
    mods = [
        (n, m)
        for n, m in model.named_modules()
        if n and m is not out and n.split(".")[-1] != "lm_head"
    ]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        names = [n for n, m in mods if isinstance(m, nn.Linear)]
        if not names:
            kinds = sorted(
                {type(m).__name__ for _, m in mods if "conv1d" in type(m).__name__.lower()}
            )
            hint = (
                f" (it has {kinds}: GPT-2 style Conv1D layers are not supported)" if kinds else ""
            )
            raise ValueError(
                f"target_modules: 'all-linear' found no nn.Linear besides lm_head{hint}"
            )
        return names
    if isinstance(target_modules, str):
        matched = [(n, m) for n, m in mods if re.fullmatch(target_modules, n)]
        if not matched:
            raise ValueError(f"target_modules: regex {target_modules!r} matches no module")
        keys = None
    else:
        if not target_modules or not all(isinstance(k, str) for k in target_modules):
            raise ValueError(
                f"target_modules: expected 'all-linear' or a list of names, got {target_modules!r}"
            )
        matched, keys = [], list(target_modules)
        for k in keys:
            if k == "lm_head":
                raise ValueError("target_modules: 'lm_head' (the output layer) is never patched")
            hits = [(n, m) for n, m in mods if n == k or n.endswith("." + k)]
            if not hits:
                raise ValueError(f"target_modules: {k!r} matches no module of the model")
            matched += hits
    names = []
    for n, m in matched:
        if not isinstance(m, nn.Linear):
            hint = (
                " (GPT-2 style Conv1D stores its weight transposed; mftk patches nn.Linear only)"
                if "conv1d" in type(m).__name__.lower()
                else ""
            )
            raise ValueError(
                f"target_modules: module {n!r} is a {type(m).__name__}, not an nn.Linear{hint}"
            )
        if n not in names:
            names.append(n)
    order = {n: i for i, (n, _) in enumerate(mods)}
    return sorted(names, key=order.__getitem__)  # model order, whatever the key order


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


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
    quantize: str | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = torch.bfloat16,
    quantize_all_linear: bool = False,
    layers: str | int | slice | Sequence[int] | None = None,
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
    """
    from mftk.pyramid import (  # pyramid imports this module lazily
        filter_by_layers,
        mask_padded_grads,
        num_decoder_layers,
        parse_layers,
        resolve_ranks,
        zero_padding_,
    )
    from mftk.routing import clear_default_tasks  # routing imports this module

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
    ranks = resolve_ranks(rank, tasks)
    layer_ids = None if layers is None else parse_layers(layers, num_decoder_layers(model))
    names = filter_by_layers(find_targets(model, target_modules), layer_ids)
    mixed = len(set(ranks)) > 1
    rank = max(ranks)
    qdtype = check_quant_args(quantize, double_quant, compute_dtype)
    if quantize_all_linear and quantize is None:
        raise ValueError("quantize_all_linear: needs quantize='nf4' or 'fp4'")
    others = [n for n in find_targets(model, "all-linear") if n not in names]
    kw = dict(
        router=router, top_k=top_k, temperature=temperature, dropout=dropout, use_rslora=use_rslora
    )
    qinfo = None
    if quantize is not None:
        qinfo = dict(
            quant_type=quantize, double_quant=double_quant, compute_dtype=dtype_name(qdtype),
            quantize_all_linear=bool(quantize_all_linear), blocksize=BLOCKSIZE,
        )  # fmt: skip
    new = {
        n: MultiAdapterLinear.from_linear(model.get_submodule(n), len(tasks), rank, alpha, **kw)
        if quantize is None and not is_4bit(model.get_submodule(n))
        else quantized_adapter_layer(
            model.get_submodule(n), len(tasks), rank, alpha, quantize, double_quant, qdtype, **kw
        )
        for n in names
    }
    if quantize_all_linear:
        quantize_linears(model, others, quantize, double_quant, qdtype)
    if qinfo is None:  # quantized before patching (quantize_model, transformers' bnb loading)
        qinfo = quant_info(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in new.items():
        _set_module(model, n, m)
        for p in m.adapter_params():
            p.requires_grad_(True)
    from mftk.nn import lora_scale

    alphas = [float(alpha if alpha is not None else r) for r in ranks]
    if mixed:
        with torch.no_grad():
            for m in new.values():
                for t, (r, a) in enumerate(zip(ranks, alphas)):
                    m.lora_rank[t] = r
                    m.lora_scaling[t] = lora_scale(a, r, bool(use_rslora))
                zero_padding_(m)
                mask_padded_grads(m)
    first = next(iter(new.values()))
    base = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    model.mftk_config = MftkConfig(
        tasks=list(tasks), rank=rank, alpha=first.alpha, target_modules=names, router=router,
        top_k=top_k, temperature=float(temperature), dropout=float(dropout),
        use_rslora=bool(use_rslora), base_model=base or None, quantize=qinfo,
        task_adapters={
            t: {"r": r, "lora_alpha": a if mixed else first.alpha, "use_rslora": bool(use_rslora)}
            for t, r, a in zip(tasks, ranks, alphas)
        },
        layers=layer_ids, ranks=list(ranks) if mixed else None,
    )  # fmt: skip
    clear_default_tasks(model)
    return model


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable mftk parameters (lora_a, lora_b, routers) of every patched layer."""
    for _, m in adapter_layers(model):
        yield from m.adapter_params()


ADAPTER_KEYS = ("lora_a", "lora_b", "router_weight", "router_bias", "lora_scaling", "lora_rank")


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
    W' = W + s[t] * B[t] @ A[t] (computed in float32, float64 for float64 weights), in place.

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
                w = (w.to(cdt) + delta).to(w.dtype)
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            lin.bias = m.bias if q is None else q.bias
            if q is not None and requantize:
                lin = quantize_linear(lin, **quant_settings(q))
            _set_module(model, name, lin)
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
        _set_module(model, name, m)
    model._mftk_merged = None
    return model
