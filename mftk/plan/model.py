"""Model counting for `mftk plan`: the model on the meta device, its tensors and the adapters
mftk would add (exact shapes, no weights, no download)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mftk.core import adapter_layers, decoder_layers
from mftk.patch import patch_model

LLAMA_LAYER_LINEARS = 7  # q, k, v, o, gate, up, down
# The dim FSDP2 shards each adapter tensor on: the trainer's shard_placement_fn puts them on a
# feature dim, not on dim 0 = T (mftk.train.distributed.SHARD_DIMS; tests/test_plan.py pins the two
# together; a copy here keeps the planner free of the trainer's imports).
ADAPTER_SHARD_DIMS = {
    "lora_a": 2, "lora_b": 1, "router_weight": 1, "router_bias": 0, "shared_a": 1, "shared_b": 0,
}  # fmt: skip

# The configs shipped in mftk/configs/ (package data), by name and alias.
SHIPPED = {
    "deepseek-coder-33b": "deepseek-coder-33b.json",
    "deepseek-coder-33b-base": "deepseek-coder-33b.json",
    "deepseek-ai/deepseek-coder-33b-base": "deepseek-coder-33b.json",
}


@dataclass(frozen=True)
class TensorInfo:
    """One parameter of the model. layer: decoder-layer index (None: root). quantized: the weight of
    a target linear, stored 4-bit under --quantize. shard_dim: the dim FSDP2 shards it on."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    quantized: bool = False
    shard_dim: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelInfo:
    """What the planner needs from a model, read off its meta-device build."""

    name: str
    architecture: str
    model_type: str
    hidden: int
    intermediate: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: list[TensorInfo]
    targets: list[tuple[str, int, int, int | None]]  # (name, D_in, D_out, layer) adapter targets
    gated_mlp: bool
    adapters: list[TensorInfo] = field(default_factory=list)  # filled by count_adapters
    adapter_source: str = ""

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self, layer: int) -> int:
        return sum(p.numel for p in self.params if p.layer == layer)


def load_config(model: str) -> Any:
    """A transformers PretrainedConfig from a shipped name or a path to config.json (or its dir)."""
    if model in SHIPPED:
        text = (files("mftk") / "configs" / SHIPPED[model]).read_text(encoding="utf-8")
        where = f"shipped config {SHIPPED[model]}"
    else:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise ValueError(
                f"model: {model!r} is neither a shipped config ({', '.join(sorted(SHIPPED))}) nor "
                "a path to a Hugging Face config.json (or a folder holding one)"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        where = path
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"model: {where} is not valid JSON: {err}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model: {where} has model_type {model_type!r}, unknown to transformers")
    return CONFIG_MAPPING[model_type].from_dict(raw)


def _layer_prefix(model: Any, num_layers: int) -> str:
    """The qualified name of the decoder layers' ModuleList (e.g. "model.layers")."""
    layers = decoder_layers(model)
    if len(layers) != num_layers:
        raise ValueError(f"model: no ModuleList of {num_layers} decoder layers found")
    return layers[0][0].rpartition(".")[0]


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1 :].split(".")[0])


def inspect_model(config: Any, name: str = "") -> tuple[ModelInfo, Any]:
    """Build the model on the meta device; return its ModelInfo and the meta model itself."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ValueError(f"model: cannot build a causal LM from this config: {err}") from None
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    need = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    missing = [k for k in need if getattr(c, k, None) is None]
    if missing:
        raise ValueError(
            f"model: config lacks {missing}; the planner needs a decoder-only LM config"
        )
    num_layers = c.num_hidden_layers
    prefix = _layer_prefix(model, num_layers)
    out = model.get_output_embeddings()
    targets = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not out and n.split(".")[-1] != "lm_head":
            targets.append((n, m.in_features, m.out_features, _layer_of(n, prefix)))
    target_weights = {n + ".weight" for n, *_ in targets}
    params, seen = [], set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied embeddings: one tensor
            continue
        seen.add(id(p))
        params.append(TensorInfo(n, tuple(p.shape), _layer_of(n, prefix), n in target_weights))
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    info = ModelInfo(
        name=name or getattr(config, "_name_or_path", "") or arch,
        architecture=arch,
        model_type=config.model_type,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        num_layers=num_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=c.vocab_size,
        params=params,
        targets=targets,
        gated_mlp=any(n.endswith("gate_proj") for n, *_ in targets),
    )
    return info, model


def count_adapters(
    info: ModelInfo, meta_model: Any, rank: int, tasks: int, router: bool, via_patch: bool = True
) -> None:
    """Fill info.adapters: the trainable tensors `mftk.patch_model` adds (on the meta model, in
    place), or, with via_patch=False, the shapes MultiAdapterLinear would give every target
    linear (a cross-check of the two counts)."""
    adapters: list[TensorInfo] = []
    if via_patch:
        names = [f"task{i}" for i in range(tasks)]
        patch_model(meta_model, tasks=names, rank=rank, router="softmax" if router else None)
        prefix = _layer_prefix(meta_model, info.num_layers)
        for lname, layer in adapter_layers(meta_model):
            for p_name, p in layer.named_parameters():
                if p.requires_grad:
                    full = f"{lname}.{p_name}"
                    dim = ADAPTER_SHARD_DIMS.get(p_name, 0)
                    layer_i = _layer_of(full, prefix)
                    adapters.append(TensorInfo(full, tuple(p.shape), layer_i, False, dim))
        info.adapter_source = "mftk.patch_model on the meta-device model"
    else:
        for n, d_in, d_out, layer in info.targets:
            shapes = {"lora_a": (tasks, rank, d_in), "lora_b": (tasks, d_out, rank)}
            if router:
                shapes.update(router_weight=(tasks, d_in), router_bias=(tasks,))
            adapters += [
                TensorInfo(f"{n}.{k}", sh, layer, False, ADAPTER_SHARD_DIMS[k])
                for k, sh in shapes.items()
            ]
        info.adapter_source = "target nn.Linear shapes of the meta-device model (no mftk.patch)"
    info.adapters = adapters
