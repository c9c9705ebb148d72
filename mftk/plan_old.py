"""`mftk plan`: per-GPU memory and step time for multi-task LoRA fine-tuning under FSDP2.

    mftk plan --model deepseek-coder-33b --gpus 8 --gpu-mem-gb 40 --seq-len 4096 --micro-batch 1 \
              --rank 16 --tasks 4 [--router] [--quantize nf4] [--json]

Parameter counts are exact: the model is built from its HF config on the meta device (no weights,
no download) and its tensors are listed; the adapters are added by `mftk.patch_model` on that meta
model (the same shapes training will use). Everything else is the arithmetic below, per GPU, in
bytes; b = micro-batch, s = seq_len, n = b*s tokens per GPU per micro-step, G = GPUs.

Persistent state (FSDP2 `fully_shard` per decoder layer and on the root, sharding every parameter
on dim 0 with padding, so one rank holds ceil(d0/G) * prod(rest) elements of each tensor):
- frozen base: bf16, 2 bytes/param; or, with --quantize nf4|fp4, the weight of every target linear
  (all nn.Linear but lm_head, as QLoRA does) packed 2 per byte, plus bitsandbytes' QuantState per
  tensor of n elements (blocksize 64): without double quant an fp32 absmax per block (0.5
  bit/param); with double quant an 8-bit absmax per block plus an fp32 absmax per 256 blocks
  (8/64 + 32/16384 = 0.127 bit/param, QLoRA paper section 2), plus a 256-entry fp32 code, a
  16-entry fp32 nf4 code and an fp32 offset. The QuantState is not an nn.Parameter, so FSDP does
  not shard it: replicated.
- adapters (lora_a (T, R, D_in), lora_b (T, D_out, R), router (T, D_in) + (T,)): fp32 master,
  fp32 grads, AdamW exp_avg + exp_avg_sq fp32 = 16 bytes/param, sharded on dim 0 = T. With T < G
  each rank that holds data holds ceil(T/G) = 1 task's rows: dim-0 sharding cannot split below one
  task (the plan prints the padding waste).
FSDP2 buffers (G > 1; torch/distributed/fsdp/_fully_shard): the root group (embeddings, final
norm, lm_head) stays unsharded for the whole step (fully_shard's default
reshard_after_forward=None does not reshard the root after forward); per layer, the unsharded
layer in use + one prefetched + the flat all-gather output of the one in flight
(foreach_all_gather_copy_out copies it into per-parameter tensors), 3 layers in compute storage
(bf16, or packed 4-bit), plus the layer's unsharded adapter grads (bf16) and their fp32
reduce-scatter input. A 4-bit base adds one dequantized bf16 weight (the largest target linear).

Activations: a Llama-style decoder layer (pre-RMSNorm, GQA attention, gated MLP) with mftk adapters
on its 7 linears saves, per token, in bytes (h hidden, q = heads*head_dim, k = kv_heads*head_dim,
i intermediate, a heads, L linears with adapters):

    A_layer = 2*(4h + 4)          two HF RMSNorms: the fp32 upcast of the input and fp32 rstd
            + 2h + 2h             the two norm outputs, inputs of q/k/v and of gate/up (bf16)
            + 2q + 4k             q, k after RoPE and v, saved by flash/SDPA attention
            + 2q + 4a             attention output (= o_proj input) and the fp32 logsumexp
            + 8i                  gate out, up out, silu(gate), silu(gate)*up (down_proj input)
            + L * 4R              hard routing: mftk's fp32 shrink x@A^T (N, R) per linear
              (soft: L * (4TR + 4T) shrink (N, T*R) and router probabilities (N, T), fp32,
               + L * 2T router logits kept for the router losses)
          = 16h + 4k + 8i + 4a + 8 + 28R  for q == h, hard routing.

This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
eq. 1: sbh(34 + 5as/h) bytes for a GPT layer) redone for this layer: no s^2 term (flash-attn /
memory-efficient SDPA keep only the logsumexp), GQA k/v, a SwiGLU MLP of width i, fp32 RMSNorm
upcasts, no dropout masks, and a frozen base whose linear inputs are still saved because the
adapters need them for dA. tests/test_plan.py checks it byte-for-byte against the tensors autograd
saves for an mftk-patched bf16 Llama layer. --attention sdpa (packed sequences with a block-
diagonal mask) adds 4(q - k) (transformers' repeat_kv copies k, v to all heads; a view when
there is a single kv head) and 2s (the bf16 additive mask each layer saves); the bool mask
itself, b*s^2 bytes, is made once per step.
With activation checkpointing each layer keeps only its input (2h per token) and recomputes
A_layer in its backward. Kept for the whole step as well: the final norm (4h + 4 + 2h), RoPE
cos/sin (4 * head_dim), input ids, labels, position and task ids, and the routing plan (40).

The peak moment is the larger of
- the loss: logits bf16 + their fp32 upcast + the fp32 log-softmax CE saves = 10 * vocab per token
  (transformers' ForCausalLMLoss does logits.float() then cross_entropy), and
- one layer's backward: its recomputed A_layer (with checkpointing) + residual-stream gradients
  (2 * 2h) + the larger of the MLP gradients (3 * 2i) and the flash-attn 2 backward workspace
  (dq_accum fp32 4q, dq/dk/dv expanded to all heads 3 * 2q, dk/dv 4k, softmax_d 4a), + the bf16
  logits still held by the model output.
An allocator headroom (fraction of the peak, default 10%) covers fragmentation; the card loses a
further 1 GiB to the driver, the CUDA context and cuBLAS workspaces, and 0.5 GiB to NCCL for G > 1.
Transient optimizer-step temporaries (foreach AdamW on the sharded adapters) come after the
activations are freed and are not at the peak.

Step time, per GPU per micro-step (n tokens), FLOPs executed:
- frozen base linears (P_lin params): forward 2*P_lin*n + input-gradient backward 2*P_lin*n (no dW)
  + recompute 2*P_lin*n with checkpointing;
- lm_head: 2*h*V*n forward + 2*h*V*n backward (dx, needed to reach the adapters);
- attention core, causal: forward 2*s*q per token per layer (QK^T and PV, half the square),
  backward 2x forward, + forward again with checkpointing;
- adapters per linear: forward 2*R'*(D_in + D_out) per token, backward 4*R'*(D_in + D_out)
  (dA, dB, dS, dx), + recompute; R' = R for hard routing, T*R for soft, whose router adds
  2*T*D_in forward and 4*T*D_in backward.
time = FLOPs / (mfu * peak). --mfu is the achieved fraction of the GPU's dense bf16 peak on the
executed FLOPs, recompute included (HFU in Korthikanti et al.'s terms). Elementwise work (norms,
RoPE, softmax, 4-bit dequantization) is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3
LLAMA_LAYER_LINEARS = 7  # q, k, v, o, gate, up, down

# The configs shipped in mftk/configs/ (package data), by name and alias.
SHIPPED = {
    "deepseek-coder-33b": "deepseek-coder-33b.json",
    "deepseek-coder-33b-base": "deepseek-coder-33b.json",
    "deepseek-ai/deepseek-coder-33b-base": "deepseek-coder-33b.json",
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    mem_gib: float  # the usual card size (override with --gpu-mem-gb)
    bus_gbs: float  # all-gather bus bandwidth inside one node, GB/s (nccl-tests order of magnitude)


GPUS = {
    "a100": GpuSpec("A100 SXM", 312.0, 80.0, 230.0),
    "a100-pcie": GpuSpec("A100 PCIe", 312.0, 80.0, 20.0),
    "h100": GpuSpec("H100 SXM", 989.0, 80.0, 360.0),
    "h100-pcie": GpuSpec("H100 PCIe", 756.0, 80.0, 40.0),
    "h200": GpuSpec("H200 SXM", 989.0, 141.0, 360.0),
    "l40s": GpuSpec("L40S", 362.0, 48.0, 20.0),
}

DRIVER_CONTEXT_GIB = (
    1.0  # driver reserve + CUDA context + cuBLAS workspaces: outside torch's allocator
)
NCCL_GIB = 0.5  # NCCL communicators and their buffers, G > 1


# --------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TensorInfo:
    """One parameter of the model. layer: decoder-layer index (None: root). quantized: the weight of
    a target linear, stored 4-bit under --quantize."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    quantized: bool = False

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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model in SHIPPED:
        from importlib.resources import files

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
    from torch import nn

    best = [
        n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers
    ]
    if not best:
        raise ValueError(f"model: no ModuleList of {num_layers} decoder layers found")
    return best[0]


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1 :].split(".")[0])


def inspect_model(config: Any, name: str = "") -> tuple[ModelInfo, Any]:
    """Build the model on the meta device; return its ModelInfo and the meta model itself."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

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


def count_adapters(info: ModelInfo, meta_model: Any, rank: int, tasks: int, router: bool) -> None:
    """Fill info.adapters: the trainable tensors `mftk.patch_model` adds (on the meta model, in
    place), or, without mftk.patch, the shapes MultiAdapterLinear would give every target linear."""
    try:
        from mftk.patch import adapter_layers, patch_model
    except ImportError:
        patch_model = None
    adapters: list[TensorInfo] = []
    if patch_model is not None:
        names = [f"task{i}" for i in range(tasks)]
        patch_model(meta_model, tasks=names, rank=rank, router="softmax" if router else None)
        prefix = _layer_prefix(meta_model, info.num_layers)
        for lname, layer in adapter_layers(meta_model):
            for p_name, p in layer.named_parameters():
                if p.requires_grad:
                    full = f"{lname}.{p_name}"
                    adapters.append(TensorInfo(full, tuple(p.shape), _layer_of(full, prefix)))
        info.adapter_source = "mftk.patch_model on the meta-device model"
    else:
        for n, d_in, d_out, layer in info.targets:
            adapters += [
                TensorInfo(f"{n}.lora_a", (tasks, rank, d_in), layer),
                TensorInfo(f"{n}.lora_b", (tasks, d_out, rank), layer),
            ]
            if router:
                adapters += [
                    TensorInfo(f"{n}.router_weight", (tasks, d_in), layer),
                    TensorInfo(f"{n}.router_bias", (tasks,), layer),
                ]
        info.adapter_source = "target nn.Linear shapes of the meta-device model (no mftk.patch)"
    info.adapters = adapters


# ------------------------------------------------------------------------------------- options


@dataclass
class PlanOptions:
    gpus: int = 1
    gpu_mem_gib: float = 80.0
    seq_len: int = 4096
    micro_batch: int = 1
    rank: int = 16
    tasks: int = 4
    router: bool = False
    quantize: str | None = None  # None | "nf4" | "fp4"
    double_quant: bool = True
    activation_checkpointing: bool = True
    attention: str = (
        "flash"  # "flash" (flash-attn 2 / varlen) | "sdpa" (packed, block-diagonal mask)
    )
    mfu: float = 0.4
    gpu: str = "a100"
    peak_tflops: float | None = None
    grad_accum: int = 1
    headroom: float = 0.10

    def check(self) -> None:
        """Raise ValueError naming the first bad option."""
        for key in ("gpus", "seq_len", "micro_batch", "rank", "tasks", "grad_accum"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}: expected an int >= 1, got {v!r}")
        if not self.gpu_mem_gib > 0:
            raise ValueError(f"gpu_mem_gib: expected > 0, got {self.gpu_mem_gib!r}")
        if self.quantize not in (None, "nf4", "fp4"):
            raise ValueError(f"quantize: expected None, 'nf4' or 'fp4', got {self.quantize!r}")
        if self.attention not in ("flash", "sdpa"):
            raise ValueError(f"attention: expected 'flash' or 'sdpa', got {self.attention!r}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu: expected a fraction in (0, 1], got {self.mfu!r}")
        if self.gpu not in GPUS and self.peak_tflops is None:
            raise ValueError(
                f"gpu: unknown GPU {self.gpu!r}; known: {sorted(GPUS)} (or give peak_tflops)"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops: expected > 0, got {self.peak_tflops!r}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom: expected a fraction in [0, 1), got {self.headroom!r}")


# ------------------------------------------------------------------------------------- memory


def shard_numel(shape: tuple[int, ...], gpus: int) -> int:
    """Elements of one tensor on its fullest rank under FSDP2's dim-0 sharding over `gpus`."""
    if not shape:
        return 1
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


def quant_constant_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """bitsandbytes QuantState bytes of one 4-bit tensor of `numel` elements (see module doc)."""
    blocks = math.ceil(numel / blocksize)
    code4 = 16 * 4  # the 16-entry fp32 nf4/fp4 code
    if not double_quant:
        return 4 * blocks + code4
    # uint8 absmax per block; state2: fp32 absmax per 256 blocks + 256-entry fp32 code; offset
    return blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + code4


def _stored_bytes(p: TensorInfo, quantize: str | None) -> float:
    """Bytes of the stored (unsharded) tensor: packed 4-bit or bf16."""
    return math.ceil(p.numel / 2) if (quantize and p.quantized) else 2 * p.numel


def _shard_bytes(p: TensorInfo, o: PlanOptions) -> int:
    if o.quantize and p.quantized:  # Params4bit is stored flat (numel/2, 1) uint8
        return math.ceil(math.ceil(p.numel / 2) / o.gpus)
    return 2 * shard_numel(p.shape, o.gpus)


def adapter_saved_bytes_per_linear(rank: int, tasks: int, router: bool, logits: bool = True) -> int:
    """Bytes per token one mftk-adapted linear saves for backward besides its (shared) input."""
    if not router:
        return 4 * rank  # shrink (N, R) fp32
    kept = 2 * tasks if logits else 0  # router logits (N, T) bf16 kept for the router losses
    return 4 * tasks * rank + 4 * tasks + kept  # shrink (N, T*R) + probs (N, T), fp32


def layer_activation_bytes(
    info: ModelInfo, o: PlanOptions, linears: int | None = None, router_logits: bool = True
) -> int:
    """A_layer: bytes per token one decoder layer saves for backward (formula in the module doc)."""
    h, q, k, i, a = info.hidden, info.q_dim, info.kv_dim, info.intermediate, info.heads
    lin = linears if linears is not None else _linears_per_layer(info)
    mlp = 8 * i if info.gated_mlp else 4 * i  # gated: 4 i-wide tensors; plain: fc1 out, act out
    total = 2 * (4 * h + 4) + 4 * h + 2 * q + 4 * k + 2 * q + 4 * a + mlp
    total += lin * adapter_saved_bytes_per_linear(o.rank, o.tasks, o.router, router_logits)
    if o.attention == "sdpa":
        # repeat_kv's expand + reshape copies k and v to all heads unless there is one kv head
        total += (4 * (q - k) if 1 < info.kv_heads < info.heads else 0) + 2 * o.seq_len
    return total


def _linears_per_layer(info: ModelInfo) -> int:
    in_layer = [t for t in info.targets if t[3] == 0]
    return len(in_layer) if in_layer else LLAMA_LAYER_LINEARS


def memory_rows(info: ModelInfo, o: PlanOptions, micro_batch: int | None = None) -> dict[str, Any]:
    """Per-GPU memory in bytes for `micro_batch` (default o.micro_batch): {"rows": [(key, label,
    bytes)], "details", "allocated", "headroom", "total", "reserved", "budget", "fits"}."""
    b = o.micro_batch if micro_batch is None else micro_batch
    G, n, s = o.gpus, b * o.seq_len, o.seq_len
    h, V, L = info.hidden, info.vocab, info.num_layers
    q, k, i = info.q_dim, info.kv_dim, info.intermediate
    rows: list[tuple[str, str, float]] = []

    def add(key: str, label: str, nbytes: float) -> None:
        rows.append((key, label, nbytes))

    # persistent: base weights, 4-bit constants, adapters + grads + AdamW
    base = sum(_shard_bytes(p, o) for p in info.params)
    shard = f"FSDP2-sharded 1/{G}" if G > 1 else "unsharded (1 GPU)"
    if o.quantize:
        dq = "double quant" if o.double_quant else "no double quant"
        add("base_weights", f"frozen base: {o.quantize} linears + bf16 rest, {shard}", base)
        quant = [p for p in info.params if p.quantized]
        consts = sum(quant_constant_bytes(p.numel, o.double_quant) for p in quant)
        add("quant_constants", f"4-bit constants ({dq}), replicated on every GPU", consts)
    else:
        add("base_weights", f"frozen base weights, bf16, {shard}", base)
    ad = sum(shard_numel(p.shape, G) for p in info.adapters)
    what = "adapters + routers" if o.router else "adapters"
    add("adapter_params", f"{what}: fp32 master params", 4 * ad)
    add("adapter_grads", f"{what}: fp32 grads", 4 * ad)
    add("adapter_adamw", f"{what}: AdamW exp_avg + exp_avg_sq, fp32", 8 * ad)
    # FSDP2 buffers
    if G > 1:
        root = sum(2 * p.numel for p in info.params if p.layer is None)
        add("fsdp_root", "FSDP2 root group unsharded (embeddings, final norm, lm_head)", root)
        layer = max(_layer_stored_bytes(info, li, o.quantize) for li in range(L))
        lad = max(sum(p.numel for p in info.adapters if p.layer == li) for li in range(L))
        bufs = 3 * (layer + 2 * lad) + lad * (2 + 4)
        add("fsdp_layer_buffers", "FSDP2 layers: in use + prefetched + all-gather staging", bufs)
    if o.quantize:
        big = max(d_in * d_out for _, d_in, d_out, _ in info.targets)
        add("dequant_workspace", "4-bit: one dequantized bf16 weight (largest linear)", 2 * big)
    # activations kept for the whole step
    a_layer = layer_activation_bytes(info, o)
    if o.activation_checkpointing:
        add("activations", f"activations: {L} layer inputs (checkpoints, 2h/token)", L * 2 * h * n)
    else:
        add("activations", f"activations: {L} layers x {a_layer} bytes/token", L * a_layer * n)
    mask = b * s * s if o.attention == "sdpa" else 0
    other = n * ((4 * h + 4 + 2 * h) + 4 * info.head_dim + 40) + mask
    add(
        "activations_other",
        "final norm, RoPE tables, ids, routing plan" + (", mask" if mask else ""),
        other,
    )
    # the peak moment: the loss, or one layer's backward
    loss = 10 * V * n
    attn_ws = n * (10 * q + 4 * k + 4 * info.heads)
    mlp_grads = n * (6 * i if info.gated_mlp else 4 * i)
    recompute = a_layer * n if o.activation_checkpointing else 0
    bwd = recompute + n * 4 * h + max(mlp_grads, attn_ws) + 2 * V * n
    label = f"peak of: loss {loss / GIB:.2f}, layer backward {bwd / GIB:.2f}"
    add("peak_transient", label, max(loss, bwd))
    allocated = sum(r[2] for r in rows)
    headroom = o.headroom * allocated
    reserve = DRIVER_CONTEXT_GIB + (NCCL_GIB if G > 1 else 0.0)
    budget = (o.gpu_mem_gib - reserve) * GIB
    return {
        "micro_batch": b,
        "rows": rows,
        "details": {
            "layer_activation_bytes_per_token": a_layer,
            "loss_phase": loss,
            "backward_phase": bwd,
            "recompute": recompute,
            "attention_workspace": attn_ws,
            "mlp_grads": mlp_grads,
            "residual_grads": n * 4 * h,
            "logits_bf16": 2 * V * n,
        },
        "allocated": allocated,
        "headroom": headroom,
        "total": allocated + headroom,
        "reserved": reserve * GIB,
        "budget": budget,
        "fits": allocated + headroom <= budget,
    }


def _layer_stored_bytes(info: ModelInfo, layer: int, quantize: str | None) -> float:
    return sum(_stored_bytes(p, quantize) for p in info.params if p.layer == layer)


def largest_micro_batch(info: ModelInfo, o: PlanOptions, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose plan fits (0: not even 1). Memory grows with the batch."""
    if not memory_rows(info, o, 1)["fits"]:
        return 0
    lo, hi = 1, 2
    while hi <= limit and memory_rows(info, o, hi)["fits"]:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_rows(info, o, mid)["fits"] else (lo, mid)
    return lo


# -------------------------------------------------------------------------------------- FLOPs


def step_flops(info: ModelInfo, o: PlanOptions) -> dict[str, float]:
    """FLOPs per GPU per micro-step, by part (see the module doc); 'total' is what runs."""
    n, s = o.micro_batch * o.seq_len, o.seq_len
    ck = 1 if o.activation_checkpointing else 0
    in_layers = [t for t in info.targets if t[3] is not None]
    p_lin = sum(d_in * d_out for _, d_in, d_out, _ in in_layers)
    sum_io = sum(d_in + d_out for _, d_in, d_out, _ in in_layers)
    sum_in = sum(d_in for _, d_in, _, _ in in_layers)
    out_other = sum(d_in * d_out for _, d_in, d_out, layer in info.targets if layer is None)
    r_eff = o.tasks * o.rank if o.router else o.rank
    f = {
        "base_linears": (4 + 2 * ck) * p_lin * n,
        "lm_head": 4 * info.hidden * info.vocab * n + 4 * out_other * n,
        "attention": (3 + ck) * 2 * s * info.q_dim * info.num_layers * n,
        "adapters": (6 + 2 * ck) * r_eff * sum_io * n,
        "router": (6 + 2 * ck) * o.tasks * sum_in * n if o.router else 0,
    }
    f["total"] = sum(f.values())
    f["recompute"] = ck * (
        2 * p_lin * n
        + 2 * s * info.q_dim * info.num_layers * n
        + 2 * r_eff * sum_io * n
        + (2 * o.tasks * sum_in * n if o.router else 0)
    )
    f["model_flops"] = f["total"] - f["recompute"]
    return f


# -------------------------------------------------------------------------------------- plan


def plan(info: ModelInfo, o: PlanOptions) -> dict[str, Any]:
    """Everything `mftk plan` prints, as a JSON-serialisable dict (bytes, FLOPs, seconds)."""
    o.check()
    gpu = GPUS.get(o.gpu, GpuSpec(o.gpu, o.peak_tflops or 0.0, o.gpu_mem_gib, 0.0))
    peak = (o.peak_tflops or gpu.peak_tflops) * 1e12
    total = info.num_params
    adapter_total = sum(p.numel for p in info.adapters)
    lora_total = sum(p.numel for p in info.adapters if p.name.endswith(("lora_a", "lora_b")))
    per_rank = lora_total // (o.tasks * o.rank)  # = sum over targets of D_in + D_out
    per_task = lora_total / o.tasks
    mem = memory_rows(info, o)
    other = PlanOptions(**{**asdict(o), "activation_checkpointing": not o.activation_checkpointing})
    mem_other = memory_rows(info, other)
    fl = step_flops(info, o)
    t_step = fl["total"] / (o.mfu * peak) if peak > 0 else float("nan")
    n = o.micro_batch * o.seq_len
    # FSDP2 all-gathers every layer twice (forward; backward, which also serves the recompute) and
    # the root group once
    gathered = 2 * sum(_layer_stored_bytes(info, li, o.quantize) for li in range(info.num_layers))
    gathered += sum(2 * p.numel for p in info.params if p.layer is None)
    ag = gathered * (o.gpus - 1) / o.gpus
    pad = sum(shard_numel(p.shape, o.gpus) for p in info.adapters) - adapter_total / o.gpus
    return {
        "model": {
            "name": info.name,
            "architecture": info.architecture,
            "params": total,
            "layers": info.num_layers,
            "layer_params": info.layer_params(0),
            "root_params": sum(p.numel for p in info.params if p.layer is None),
            "hidden": info.hidden,
            "intermediate": info.intermediate,
            "heads": info.heads,
            "kv_heads": info.kv_heads,
            "head_dim": info.head_dim,
            "vocab": info.vocab,
            "target_linears_per_layer": _linears_per_layer(info),
            "gated_mlp": info.gated_mlp,
        },
        "adapters": {
            "source": info.adapter_source,
            "rank": o.rank,
            "tasks": o.tasks,
            "routing": "soft (softmax router)" if o.router else "hard (task ids)",
            "params_per_rank_per_task": per_rank,
            "params_per_task": per_task,
            "fraction_per_task": per_task / total,
            "rank_for_0.3pct_per_task": 0.003 * total / per_rank,
            "params_all_tasks": lora_total,
            "router_params": adapter_total - lora_total,
            "trainable_params": adapter_total,
            "dim0_padding_params_per_gpu": pad,
        },
        "options": asdict(o),
        "gpu": {"name": gpu.name, "peak_tflops": peak / 1e12, "mem_gib": o.gpu_mem_gib},
        "memory": _jsonable(mem),
        "memory_other_checkpointing": _jsonable(mem_other),
        "largest_micro_batch": largest_micro_batch(info, o),
        "largest_micro_batch_other_checkpointing": largest_micro_batch(info, other),
        "flops": fl,
        "step": {
            "seconds_per_micro_step": t_step,
            "tokens_per_micro_step_per_gpu": n,
            "tokens_per_second_per_gpu": n / t_step,
            "tokens_per_second_all_gpus": n * o.gpus / t_step,
            "seconds_per_optimizer_step": t_step * o.grad_accum,
            "tokens_per_optimizer_step": n * o.gpus * o.grad_accum,
            "allgather_bytes_per_gpu": ag,
            "allgather_seconds": ag / (gpu.bus_gbs * 1e9) if gpu.bus_gbs > 0 else None,
            "bus_gbs": gpu.bus_gbs,
        },
    }


def _jsonable(mem: dict[str, Any]) -> dict[str, Any]:
    out = dict(mem)
    out["rows"] = [{"key": k, "label": lab, "bytes": v} for k, lab, v in mem["rows"]]
    return out


# ---------------------------------------------------------------------------------- text output


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _count(x: float) -> str:
    return f"{x / 1e9:.3f} B" if x >= 1e9 else f"{x / 1e6:.2f} M"


def _fit_line(mem: dict[str, Any], largest: int) -> str:
    verdict = "fits" if mem["fits"] else "does not fit"
    return f"total {mem['total'] / GIB:.2f} GiB, {verdict}, largest micro-batch {largest}"


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable report of plan()."""
    m, a, o, g, mem = p["model"], p["adapters"], p["options"], p["gpu"], p["memory"]
    fl, st = p["flops"], p["step"]
    ck, n = o["activation_checkpointing"], st["tokens_per_micro_step_per_gpu"]
    r03 = a["rank_for_0.3pct_per_task"]
    frac03 = round(r03) * a["params_per_rank_per_task"] / m["params"]
    attention = "flash-attn 2" if o["attention"] == "flash" else "SDPA with a packing mask"
    lines = [
        f"mftk plan: {m['name']} ({m['architecture']}) on {o['gpus']} x {g['name']}, "
        f"{o['gpu_mem_gib']:g} GiB each",
        f"model     {_count(m['params'])} parameters (meta-device count): {m['layers']} layers x "
        f"{_count(m['layer_params'])} + {_count(m['root_params'])} embeddings/norm/lm_head",
        f"adapters  rank {a['rank']}, {a['tasks']} tasks, {a['routing']} routing, on "
        f"{m['target_linears_per_layer']} linears per layer [{a['source']}]",
        f"          {_count(a['params_per_rank_per_task'])} params per unit of rank per task; "
        f"per task {_count(a['params_per_task'])} = {a['fraction_per_task']:.3%} of the base; "
        f"trainable {_count(a['trainable_params'])}",
        f"          0.3% of the base per task <=> rank {r03:.2f} (r={round(r03)}: {frac03:.3%})",
        f"batch     micro-batch {mem['micro_batch']} x seq {o['seq_len']} = {n} tokens per GPU per "
        f"micro-step; {o['quantize'] or 'bf16'} base; activation checkpointing "
        f"{'on' if ck else 'off'}; {attention}",
        "",
        f"per-GPU memory{'':62}GiB",
    ]
    lines += [f"  {r['label']:<74}{_gib(r['bytes'])}" for r in mem["rows"]]
    reserve = "card - driver/CUDA context" + (" - NCCL" if o["gpus"] > 1 else "")
    headroom = f"allocator headroom ({o['headroom']:.0%} of the above)"
    lines += [
        f"  {headroom:<74}{_gib(mem['headroom'])}",
        f"  {'total':<74}{_gib(mem['total'])}",
        f"  {'usable: ' + reserve:<74}{_gib(mem['budget'])}",
        f"  fits: {'YES' if mem['fits'] else 'NO'} ({(mem['budget'] - mem['total']) / GIB:+.2f} "
        f"GiB); largest micro-batch that fits: {p['largest_micro_batch']}",
    ]
    other = p["memory_other_checkpointing"]
    ob = p["largest_micro_batch_other_checkpointing"]
    on, off = (
        ((mem, p["largest_micro_batch"]), (other, ob))
        if ck
        else ((other, ob), (mem, p["largest_micro_batch"]))
    )
    act = {r["key"]: r["bytes"] for r in on[0]["rows"]}["activations"]
    act_off = {r["key"]: r["bytes"] for r in off[0]["rows"]}["activations"]
    per_layer = mem["details"]["layer_activation_bytes_per_token"]
    lines += [
        "",
        f"activations at micro-batch {mem['micro_batch']}: {per_layer} bytes/token per layer "
        f"= {per_layer * n / GIB:.2f} GiB per layer",
        f"  with checkpointing:    {act / GIB:7.2f} GiB kept; {_fit_line(*on)}",
        f"  without checkpointing: {act_off / GIB:7.2f} GiB kept; {_fit_line(*off)}",
        "",
        f"step time ({g['name']}: {g['peak_tflops']:g} TFLOP/s dense bf16 peak, at "
        f"{o['mfu']:.0%} of peak on the executed FLOPs)",
        f"  TFLOP per GPU per micro-step: base linears {fl['base_linears'] / 1e12:.1f} "
        f"({'6' if ck else '4'}*P*n: fwd + dx{' + recompute' if ck else ''}), "
        f"lm_head {fl['lm_head'] / 1e12:.1f}, attention {fl['attention'] / 1e12:.1f}, "
        f"adapters {fl['adapters'] / 1e12:.2f}"
        + (f", routers {fl['router'] / 1e12:.2f}" if o["router"] else ""),
        f"  total {fl['total'] / 1e12:.1f} TFLOP executed ({fl['recompute'] / 1e12:.1f} of it "
        f"recompute; model FLOPs {fl['model_flops'] / 1e12:.1f})",
        f"  ~ {st['seconds_per_micro_step']:.2f} s per micro-step -> "
        f"{st['tokens_per_second_per_gpu']:.0f} tokens/s per GPU, "
        f"{st['tokens_per_second_all_gpus']:.0f} tokens/s on {o['gpus']} GPU(s)",
        f"  optimizer step: {o['grad_accum']} micro-step(s) x {o['gpus']} GPU(s) = "
        f"{st['tokens_per_optimizer_step']} tokens in {st['seconds_per_optimizer_step']:.2f} s",
    ]
    if o["quantize"]:
        lines.append(
            "  (4-bit: the dequantization of every weight in forward, backward and recompute is "
            "memory traffic not counted above; expect a lower utilization than bf16)"
        )
    if o["gpus"] > 1 and st["allgather_seconds"] is not None:
        lines.append(
            f"  FSDP2 all-gathers {st['allgather_bytes_per_gpu'] / 1e9:.1f} GB per GPU per "
            f"micro-step ~ {st['allgather_seconds']:.2f} s at {st['bus_gbs']:g} GB/s bus "
            "bandwidth (hidden behind compute when shorter)"
        )
    if m["target_linears_per_layer"] != LLAMA_LAYER_LINEARS or not m["gated_mlp"]:
        lines.append(
            f"  note: the activation formula assumes a Llama-style layer (7 linears, gated MLP); "
            f"this model has {m['target_linears_per_layer']} linears per layer, so activations "
            "are a rough estimate"
        )
    if a["dim0_padding_params_per_gpu"] > 0.1 * a["trainable_params"] / o["gpus"]:
        lines.append(
            f"  note: FSDP2's dim-0 sharding of the (T, ...) adapter tensors over {o['gpus']} GPUs "
            f"pads the fullest rank by {_count(a['dim0_padding_params_per_gpu'])} params; "
            "sharding them on another dim (fully_shard's shard_placement_fn) avoids it"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def _int_at_least_1(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _fraction(text: str) -> float:
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `mftk plan` (see the module docstring for the model behind the numbers)."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"a shipped config ({', '.join(sorted(set(SHIPPED)))}) or a path to an HF "
        "config.json (or its folder); built on the meta device, nothing downloaded",
    )
    parser.add_argument("--gpus", type=_int_at_least_1, default=1, help="GPUs (FSDP2 ranks)")
    parser.add_argument(
        "--gpu-mem-gb",
        type=_positive_float,
        default=None,
        help="memory per GPU in GiB as the card is sold (40, 80; default: the GPU's)",
    )
    parser.add_argument(
        "--gpu", default="a100", choices=sorted(GPUS), help="GPU type (peak TFLOP/s)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=_positive_float,
        default=None,
        help="override the GPU's dense bf16 peak",
    )
    parser.add_argument("--seq-len", type=_int_at_least_1, default=4096)
    parser.add_argument("--micro-batch", type=_int_at_least_1, default=1, help="sequences per GPU")
    parser.add_argument("--grad-accum", type=_int_at_least_1, default=1)
    parser.add_argument("--rank", type=_int_at_least_1, default=16)
    parser.add_argument("--tasks", type=_int_at_least_1, default=4, help="adapters (one per task)")
    parser.add_argument(
        "--router", action="store_true", help="soft routing: a softmax router per linear"
    )
    parser.add_argument(
        "--quantize", choices=("nf4", "fp4"), default=None, help="4-bit base (QLoRA)"
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="4-bit without double quantization of the absmax constants",
    )
    parser.add_argument(
        "--no-activation-checkpointing", dest="activation_checkpointing", action="store_false"
    )
    parser.add_argument(
        "--attention",
        choices=("flash", "sdpa"),
        default="flash",
        help="flash: flash-attn 2 varlen; sdpa: packed sequences with a mask",
    )
    parser.add_argument(
        "--mfu",
        type=_fraction,
        default=0.4,
        help="achieved fraction of peak on executed FLOPs (default 0.4)",
    )
    parser.add_argument(
        "--headroom",
        type=_fraction,
        default=0.10,
        help="allocator headroom as a fraction of the peak (default 0.10)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    mem = args.gpu_mem_gb if args.gpu_mem_gb is not None else GPUS[args.gpu].mem_gib
    return PlanOptions(
        gpus=args.gpus, gpu_mem_gib=mem, seq_len=args.seq_len, micro_batch=args.micro_batch,
        rank=args.rank, tasks=args.tasks, router=args.router, quantize=args.quantize,
        double_quant=args.double_quant, activation_checkpointing=args.activation_checkpointing,
        attention=args.attention, mfu=args.mfu, gpu=args.gpu, peak_tflops=args.peak_tflops,
        grad_accum=args.grad_accum, headroom=args.headroom,
    )  # fmt: skip


def make_plan(model: str, options: PlanOptions) -> dict[str, Any]:
    """Load `model` (shipped name or config.json path), build it on meta, and plan it."""
    options.check()
    config = load_config(model)
    info, meta = inspect_model(config, name=model)
    count_adapters(info, meta, options.rank, options.tasks, options.router)
    return plan(info, options)


def run(args: argparse.Namespace) -> int:
    try:
        p = make_plan(args.model, options_from_args(args))
    except ValueError as err:
        print(f"mftk plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
