"""`mftk plan` against measurements: the per-layer activation formula against the bytes autograd
really saves in a patched bf16 Llama layer (flash and SDPA, with and without a router, GQA as a view
or a copy), and on a CUDA GPU the planned allocated bytes against torch.cuda.max_memory_allocated
for a 2-layer DeepSeek-33B."""

from __future__ import annotations

import pytest
import torch
from test_plan import TINY, H, _info

from mftk import plan as P

# ------------------------------------------------------------ activations vs what autograd saves


def _saved_bytes(layer, x, pe, mask, skip) -> int:
    """Bytes of the distinct storages autograd saves in one layer forward, except `skip` and int64
    tensors (the routing plan, built once per forward and shared by all layers)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and t.dtype != torch.int64:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=pe, attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("kv_heads", [1, 5])  # 1: repeat_kv is a view; 5 of 10 heads: a copy
@pytest.mark.parametrize("router", [False, True])
@pytest.mark.parametrize("attention", ["flash", "sdpa"])
def test_layer_activation_formula_equals_autograd_saved_bytes(
    tmp_path, router, attention, kv_heads
):
    """A middle layer of an mftk-patched bf16 Llama: per-token saved bytes == A_layer exactly.

    "flash" is measured as SDPA without a mask (transformers then keeps GQA: enable_gqa), which
    saves what flash-attn saves (q, k, v, out, logsumexp). Measured at batch 1 and 3 and
    differenced, which cancels per-call constants such as the (T,) scalings; parameters, buffers,
    the layer input and the tables shared by all layers (RoPE, mask) are excluded.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    import mftk

    T, R, s = 3, 4, 12
    heads = 5 if kv_heads == 1 else 10  # head_dim 8 or 4
    path = str(tmp_path / "config.json")
    LlamaConfig(
        **{**TINY, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    ).to_json_file(path)
    cfg = P.load_config(path)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    mftk.patch_model(model, tasks=["a", "b", "c"], rank=R, router="softmax" if router else None)
    skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    per_batch = {}
    for b in (1, 3):
        x = torch.randn(b, s, H, dtype=torch.bfloat16, requires_grad=True)
        pe = model.model.rotary_emb(x, torch.arange(s)[None].expand(b, s))
        mask = None
        if attention == "sdpa":  # a packing mask: two documents, causal within each
            doc = torch.tensor([0] * 5 + [1] * (s - 5))
            allowed = (doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
            mask = allowed[None, None].expand(b, 1, s, s).contiguous()
        ext = skip | {t.untyped_storage().data_ptr() for t in (x, *pe)}
        if mask is not None:
            ext.add(mask.untyped_storage().data_ptr())
        layer = model.model.layers[1]
        if router:
            per_batch[b] = _saved_bytes(layer, x, pe, mask, ext)
        else:
            with mftk.use_tasks(model, torch.randint(0, T, (b, s))):
                per_batch[b] = _saved_bytes(layer, x, pe, mask, ext)
    measured = (per_batch[3] - per_batch[1]) / (2 * s)
    info = _info(path, rank=R, tasks=T, router=router)
    o = P.PlanOptions(rank=R, tasks=T, router=router, attention=attention, seq_len=s)
    assert measured == P.layer_activation_bytes(info, o, router_logits=False), per_batch


# ------------------------------------------------------------------------------ GPU (cuda only)


@pytest.mark.cuda
def test_plan_vs_cuda_max_memory_allocated():
    """A 2-layer, full-width DeepSeek-33B on one GPU (no FSDP), bf16 base and adapters, activation
    checkpointing: forward + backward peak vs the plan's allocated bytes, within 15%.

    The op needs one dtype, so the adapters are bf16 here: the plan's fp32 params + grads + AdamW
    (16 bytes/param) are replaced by bf16 params + grads (4 bytes/param) before comparing."""
    from transformers import AutoModelForCausalLM

    import mftk

    cfg = P.load_config("deepseek-coder-33b")
    cfg.num_hidden_layers = 2
    cfg._attn_implementation = "sdpa"
    T, R, s = 4, 16, 4096
    info, meta = P.inspect_model(cfg)
    P.count_adapters(info, meta, R, T, False)
    o = P.PlanOptions(gpus=1, gpu_mem_gib=80, seq_len=s, micro_batch=1, rank=R, tasks=T)
    mem = P.memory_rows(info, o)
    rows = {k: v for k, _, v in mem["rows"]}
    n_ad = sum(t.numel for t in info.adapters)
    expected = mem["allocated"] - rows["adapter_params"] - rows["adapter_grads"]
    expected += -rows["adapter_adamw"] + 4 * n_ad

    torch.cuda.empty_cache()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    mftk.patch_model(model, tasks=[f"t{i}" for i in range(T)], rank=R)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, s), device="cuda")
    tasks = torch.randint(0, T, (1, s), device="cuda")
    for step in range(2):  # the second step runs with the grads of the first allocated
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with mftk.use_tasks(model, tasks):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert abs(peak - expected) / expected < 0.15, (peak / 2**30, expected / 2**30)
