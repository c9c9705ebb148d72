"""Tiny Hugging Face causal LMs built from configs in code (no downloads), and adapter helpers.

Shared by the module, PEFT and trainer tests.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> nn.Module:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads (2 kv heads), vocab 128, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).to(dtype).eval()


def tiny_qwen2(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> nn.Module:
    """Qwen2ForCausalLM (q/k/v projections with bias): hidden 48, 2 layers, vocab 128."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**kw)).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel: its projections are transformers' Conv1D, not nn.Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def randomize_adapters(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Fill every lora_b (and router) with random values, so each task really changes the model."""
    from mftk.core import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            for p in (m.lora_a, m.lora_b):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std * 3)
            if m.router_weight is not None:
                m.router_weight.copy_(
                    torch.randn(m.router_weight.shape, generator=g, dtype=torch.float64)
                )
                m.router_bias.copy_(
                    torch.randn(m.router_bias.shape, generator=g, dtype=torch.float64)
                )


def tokens(batch: int, seq: int, seed: int = 2) -> torch.Tensor:
    """(batch, seq) random token ids in [3, VOCAB), avoiding pad/bos/eos."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def max_err(a: torch.Tensor, b: torch.Tensor) -> str:
    """'max |a - b| = e at index i' for failure messages."""
    d = (a.double() - b.double()).abs()
    i = int(d.argmax())
    return f"max |diff| = {float(d.max()):.3g} at flat index {i} (shape {tuple(d.shape)})"


class RefLayer(nn.Module):
    """Float64-reference stand-in for a MultiAdapterLinear: mftk.ops.reference on its parameters,
    with the task ids (B,) or (B, S) (or None: soft routing) read from `holder["ids"]`."""

    def __init__(self, m: nn.Module, holder: dict) -> None:
        super().__init__()
        self.m, self.holder = m, holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mftk.ops.reference import multi_adapter_linear_ref

        m, ids = self.m, self.holder["ids"]
        if ids is not None:
            ids = ids[:, None].expand(x.shape[:-1]) if ids.dim() == 1 else ids
            ids = ids.reshape(-1)
        soft = ids is None
        y, logits = multi_adapter_linear_ref(
            x.reshape(-1, m.in_features), m.weight, m.lora_a, m.lora_b, m.bias, m.lora_scaling,
            ids, m.router_weight if soft else None, m.router_bias if soft else None, m.top_k,
            m.temperature,
        )  # fmt: skip
        if soft and self.holder.get("logits") is not None:
            self.holder["logits"].append(logits)
        return y.reshape(*x.shape[:-1], m.out_features)


def reference_model(model: nn.Module) -> tuple[nn.Module, dict]:
    """A deep copy of a patched model whose adapter layers run mftk.ops.reference instead of the op.

    Returns (copy, holder): set holder["ids"] before each forward (and holder["logits"] = [] to
    collect router logits).
    """
    import copy

    from mftk.core import adapter_layers, set_module

    ref = copy.deepcopy(model)
    holder: dict = {"ids": None, "logits": None}
    for name, m in adapter_layers(ref):
        set_module(ref, name, RefLayer(m, holder))
    return ref, holder


def merged_copy(base: nn.Module, patched: nn.Module, task: int) -> nn.Module:
    """A deep copy of the unpatched base with task `task` folded into each target weight, in the
    weights' own dtype: W + s * B @ A, computed here from the adapter tensors."""
    import copy

    from mftk.core import adapter_layers

    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in adapter_layers(patched):
            lin = ref.get_submodule(name)
            lin.weight += float(m.lora_scaling[task]) * (m.lora_b[task] @ m.lora_a[task])
    return ref
