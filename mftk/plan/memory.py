"""Memory model of `mftk plan`: options, GPUs, per-GPU bytes (formulas in mftk/plan/__init__.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mftk.plan.model import LLAMA_LAYER_LINEARS, ModelInfo, TensorInfo

GIB = 1024**3


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


def shard_numel(shape: tuple[int, ...], gpus: int, dim: int = 0) -> int:
    """Elements of one tensor on its fullest rank when FSDP2 shards it on `dim` over `gpus`
    (Shard(dim) pads that dim to a multiple of gpus: the fullest rank holds ceil(d/gpus) slices)."""
    if not shape:
        return 1
    return math.ceil(shape[dim] / gpus) * (math.prod(shape) // shape[dim])


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
    ad = sum(shard_numel(p.shape, G, p.shard_dim) for p in info.adapters)
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
