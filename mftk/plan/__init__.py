"""`mftk plan`: per-GPU memory and step time for multi-task LoRA fine-tuning under FSDP2.

    mftk plan --model deepseek-coder-33b --gpus 8 --gpu-mem-gb 40 --seq-len 4096 --micro-batch 1 \
              --rank 16 --tasks 4 [--router] [--quantize nf4] [--json]

Parameter counts are exact: the model is built from its HF config on the meta device (no weights,
no download) and its tensors are listed; the adapters are added by `mftk.patch_model` on that meta
model (the same shapes training will use). Everything else is the arithmetic below, per GPU, in
bytes; b = micro-batch, s = seq_len, n = b*s tokens per GPU per micro-step, G = GPUs.

Persistent state (FSDP2 `fully_shard` per decoder layer and on the root, sharding each parameter
on one dim d with padding, so one rank holds ceil(shape[d]/G) * (numel / shape[d]) elements of it;
d = 0 for the base, a feature dim for the adapters, as mftk.train.distributed does):
- frozen base: bf16, 2 bytes/param; or, with --quantize nf4|fp4, the weight of every target linear
  (all nn.Linear but lm_head, as QLoRA does) packed 2 per byte, plus bitsandbytes' QuantState per
  tensor of n elements (blocksize 64): without double quant an fp32 absmax per block (0.5
  bit/param); with double quant an 8-bit absmax per block plus an fp32 absmax per 256 blocks
  (8/64 + 32/16384 = 0.127 bit/param, QLoRA paper section 2), plus a 256-entry fp32 code, a
  16-entry fp32 nf4 code and an fp32 offset. The QuantState is not an nn.Parameter, so FSDP does
  not shard it: replicated.
- adapters (lora_a (T, R, D_in), lora_b (T, D_out, R), router (T, D_in) + (T,)): fp32 master,
  fp32 grads, AdamW exp_avg + exp_avg_sq fp32 = 16 bytes/param, sharded on a feature dim (lora_a
  on D_in, lora_b on D_out, router on D_in; the (T,) router bias on T), not on dim 0 = T, which
  with T < G would leave ranks empty and give the fullest a whole task; the padding left (feature
  dims not a multiple of G) is reported.
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

from mftk.plan.memory import (
    DRIVER_CONTEXT_GIB,
    GIB,
    GPUS,
    NCCL_GIB,
    GpuSpec,
    PlanOptions,
    adapter_saved_bytes_per_linear,
    largest_micro_batch,
    layer_activation_bytes,
    memory_rows,
    quant_constant_bytes,
    shard_numel,
)
from mftk.plan.model import (
    ADAPTER_SHARD_DIMS,
    LLAMA_LAYER_LINEARS,
    SHIPPED,
    ModelInfo,
    TensorInfo,
    count_adapters,
    inspect_model,
    load_config,
)
from mftk.plan.report import format_plan, make_plan, plan, step_flops

__all__ = [
    "ADAPTER_SHARD_DIMS",
    "DRIVER_CONTEXT_GIB",
    "GIB",
    "GPUS",
    "LLAMA_LAYER_LINEARS",
    "NCCL_GIB",
    "SHIPPED",
    "GpuSpec",
    "ModelInfo",
    "PlanOptions",
    "TensorInfo",
    "adapter_saved_bytes_per_linear",
    "count_adapters",
    "format_plan",
    "inspect_model",
    "largest_micro_batch",
    "layer_activation_bytes",
    "load_config",
    "make_plan",
    "memory_rows",
    "plan",
    "quant_constant_bytes",
    "shard_numel",
    "step_flops",
]
