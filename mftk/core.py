"""The model-level lookups every other module builds on (the bottom of the model layer).

Everything here reads a model or a name; nothing patches, routes or trains:
- `MftkConfig` (`model.mftk_config`, what patch_model did) and `get_config` / `task_names`;
- `unwrap` (through torch.compile), `adapter_layers` (every MultiAdapterLinear), `find_targets`
  (the nn.Linear modules a target spec names, never lm_head), `set_module`;
- task names to ids: `BASE`, `task_index`, `to_task_ids` (names and lists to an int64 tensor;
  a tensor's dtype and range are checked once, by `mftk.ops.check_task_ids`);
- the decoder stack: `layer_of` (a module name's decoder-layer index, PEFT's layers_pattern rule),
  `num_decoder_layers`, `decoder_layers` (the layer modules, by HF's `_no_split_modules`).

Imports point down only: mftk.nn and torch. See docs/ARCHITECTURE.md (layers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mftk.nn import MultiAdapterLinear
from mftk.spec import AdapterSpec, QuantSpec

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
    # "hybrid": a shared adapter of rank shared_rank (alpha shared_alpha) on every routed token
    mode: str = "per_task"
    shared_rank: int | None = None
    shared_alpha: float | None = None
    # the segment router's read point (mftk.segment_router: -1 or a decoder layer); None: none
    segment_router: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def spec(self, quantize: bool = True) -> AdapterSpec:
        """The AdapterSpec that patches a base model as this config says (quantize=False: leave
        the base full precision even if it was 4-bit)."""
        q = QuantSpec.from_dict(self.quantize) if self.quantize and quantize else None
        alpha = self.alpha
        if self.ranks is not None:  # mixed ranks: one alpha for all, or None (alpha_t = r_t)
            alphas = {float(v["lora_alpha"]) for v in self.task_adapters.values()}
            alpha = alphas.pop() if len(alphas) == 1 else None
        return AdapterSpec(
            rank=self.ranks or self.rank, alpha=alpha,
            use_rslora=self.use_rslora, dropout=self.dropout, router=self.router,
            top_k=self.top_k, temperature=self.temperature, quantize=q, mode=self.mode,
            shared_rank=self.shared_rank, shared_alpha=self.shared_alpha,
        )  # fmt: skip

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
    return _index(task_names(model), _num_tasks(model), task)


def _index(names: list[str] | None, n: int, task: Any) -> int:
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


def to_task_ids(model: nn.Module, task_ids: Any, num_tasks: int | None = None) -> Tensor:
    """Task ids as a tensor: a tensor as given (its dtype and range are the op's check,
    mftk.ops.check_task_ids, run once by the caller), names and indices as int64 on the CPU.

    task_ids: an int tensor, a name or index (returned as a 0-d tensor), or a (nested) list of
    names and indices, (B,) or (B, S). Raises ValueError naming a bad name or out-of-range index.
    num_tasks: T when the caller knows it (saves a walk over the model's modules).
    """
    if isinstance(task_ids, Tensor):
        if task_ids.dim() > 2:
            raise ValueError(
                f"task_ids: expected (B,) or (B, S), got shape {tuple(task_ids.shape)}"
            )
        return task_ids
    names, n = task_names(model), num_tasks if num_tasks is not None else _num_tasks(model)
    if isinstance(task_ids, (str, int)):
        return torch.tensor(_index(names, n, task_ids), dtype=torch.int64)

    def conv(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [conv(u) for u in v]
        try:
            return _index(names, n, v)
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


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# PEFT's default layers_pattern names (ModuleList attribute holding the decoder layers)
LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")
_LAYER_RE = re.compile(r"(?:^|\.)(" + "|".join(LAYER_PATTERNS) + r")\.(\d+)(?:\.|$)")

LayerSpec = str | int | slice | range | Sequence[int] | None


def layer_of(name: str) -> tuple[str, int] | None:
    """(pattern, decoder-layer index) of a module name such as `model.layers.3.mlp.up_proj`,
    or None for modules outside the decoder layers (embeddings, lm_head, final norm)."""
    m = _LAYER_RE.search(name)  # the outermost numbered ModuleList is the decoder stack
    if m is None:
        return None
    return m.group(1), int(m.group(2))


def num_decoder_layers(model: nn.Module) -> int:
    """The number of decoder layers: config.num_hidden_layers, else the largest index seen + 1."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    idx = [li[1] for li in (layer_of(name) for name, _ in model.named_modules()) if li]
    if not idx:
        raise ValueError("layers: the model has no numbered decoder layers (model.layers.<i>.)")
    return max(idx) + 1


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the model's decoder layers, in model order.

    The layers are the modules whose class HF lists in `_no_split_modules` (what FSDP shards one
    at a time); without that list, the items of the ModuleList named by LAYER_PATTERNS that holds
    num_decoder_layers modules. [] when neither finds any.
    """
    model = unwrap(model)
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    if kinds:
        return [(n, m) for n, m in model.named_modules() if type(m).__name__ in kinds]
    try:
        n_layers = num_decoder_layers(model)
    except ValueError:
        return []
    for name, m in model.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(m, nn.ModuleList) and last in LAYER_PATTERNS and len(m) == n_layers:
            return [(f"{name}.{i}", sub) for i, sub in enumerate(m)]
    return []
