"""`mftk plan`: parameter counts against the meta-device model and the published 33B figures,
every memory row and FLOP count against hand arithmetic on a small config, 4-bit constants, the
largest micro-batch. The plan against measured bytes (autograd, CUDA) is in test_plan_measured.py,
the command line in test_plan_cli.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from mftk import plan as P

# A small Llama with awkward sizes: 5 heads of 8, 1 kv head, vocab 101, 3 layers.
TINY = dict(
    hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
    num_key_value_heads=1, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
H, I, L, A, KV, V, HD = 40, 72, 3, 5, 8, 101, 8  # KV: kv_heads * head_dim


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("tiny")
    LlamaConfig(**TINY).to_json_file(str(d / "config.json"))
    return str(d / "config.json")


@pytest.fixture(scope="module")
def ds33b():
    info, meta = P.inspect_model(P.load_config("deepseek-coder-33b"), "deepseek-coder-33b")
    P.count_adapters(info, meta, rank=16, tasks=4, router=False)
    return info


def _info(
    path: str, rank: int, tasks: int, router: bool = False, via_patch: bool = True
) -> P.ModelInfo:
    info, meta = P.inspect_model(P.load_config(path))
    P.count_adapters(info, meta, rank, tasks, router, via_patch)
    return info


# (D_out, D_in) of the 7 linears of one tiny layer: q, k, v, o, gate, up, down
TINY_LINEARS = [(40, 40), (8, 40), (8, 40), (40, 40), (72, 40), (72, 40), (40, 72)]


# ------------------------------------------------------------------------------ parameter counts


def test_33b_parameter_count_matches_published(ds33b):
    h, i, L_, v, kv = 7168, 19200, 62, 32256, 1024
    closed_form = L_ * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h
    assert ds33b.num_params == closed_form == 33_342_991_360
    assert abs(ds33b.num_params - 33.34e9) / 33.34e9 < 1e-3
    assert (ds33b.hidden, ds33b.intermediate, ds33b.num_layers) == (7168, 19200, 62)
    assert (ds33b.heads, ds33b.kv_heads, ds33b.vocab) == (56, 8, 32256)


def test_33b_adapter_fraction_and_rank_for_0_3_percent(ds33b):
    p = P.plan(ds33b, P.PlanOptions(gpus=8, gpu_mem_gib=40, rank=16, tasks=4))
    a = p["adapters"]
    # per unit of rank, one task: sum over 62 layers of D_in + D_out of q, k, v, o, gate, up, down
    per_rank = 62 * (2 * (7168 + 7168) + 2 * (7168 + 1024) + 3 * (7168 + 19200))
    assert a["params_per_rank_per_task"] == per_rank == 7_697_920  # REFERENCES.md: 7.70 M
    assert a["params_per_task"] == 16 * per_rank
    assert a["fraction_per_task"] == pytest.approx(16 * per_rank / 33_342_991_360)
    assert round(a["rank_for_0.3pct_per_task"]) == 13  # REFERENCES.md: r ~ 13 for 0.3%
    assert a["trainable_params"] == 4 * 16 * per_rank
    assert "patch_model" in a["source"]


def test_counts_match_the_meta_model_and_patch_model(tiny_path):
    from transformers import AutoModelForCausalLM

    import mftk

    cfg = P.load_config(tiny_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n_meta = sum(p.numel() for p in model.parameters())
    mftk.patch_model(model, tasks=["a", "b"], rank=3, router="softmax")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = _info(tiny_path, rank=3, tasks=2, router=True)
    per_layer = sum(o * i for o, i in TINY_LINEARS) + 2 * H
    assert info.num_params == n_meta == L * per_layer + 2 * V * H + H == 45_800
    lora = 2 * 3 * L * sum(o + i for o, i in TINY_LINEARS)
    routers = 2 * L * sum(i + 1 for _, i in TINY_LINEARS)
    assert sum(p.numel for p in info.adapters) == n_train == lora + routers


def test_any_hf_config_qwen2_with_bias_and_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=77,
                      tie_word_embeddings=True)  # fmt: skip
    cfg.to_json_file(str(tmp_path / "config.json"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    info = _info(str(tmp_path), rank=2, tasks=3)
    assert info.num_params == sum(p.numel() for p in model.parameters())  # tied: counted once
    # q (48x48 + bias), k and v (24x48 + bias), o (48x48), gate/up/down (48x80), 2 norms
    layer = (48 * 48 + 48) + 2 * (24 * 48 + 24) + 48 * 48 + 3 * 48 * 80 + 2 * 48
    assert info.num_params == 2 * layer + 77 * 48 + 48 == 40_992
    p = P.plan(info, P.PlanOptions(gpus=2, gpu_mem_gib=4, seq_len=8, rank=2, tasks=3))
    assert p["model"]["root_params"] == 77 * 48 + 48 and p["memory"]["fits"]


def test_fallback_count_equals_patch_model_count(tiny_path):
    real = _info(tiny_path, rank=5, tasks=3, router=True)
    fallback = _info(tiny_path, rank=5, tasks=3, router=True, via_patch=False)
    assert "no mftk.patch" in fallback.adapter_source
    assert sorted((t.shape, t.layer) for t in fallback.adapters) == sorted(
        (t.shape, t.layer) for t in real.adapters
    )


def test_shipped_config_by_alias_and_by_path(tmp_path):
    from importlib.resources import files

    a = P.load_config("deepseek-ai/deepseek-coder-33b-base")
    path = tmp_path / "config.json"
    path.write_text((files("mftk") / "configs" / "deepseek-coder-33b.json").read_text())
    b = P.load_config(str(tmp_path))  # a folder holding config.json
    assert a.to_dict() == b.to_dict()
    assert a.tie_word_embeddings is False and a.architectures == ["LlamaForCausalLM"]


# --------------------------------------------------------------------------- memory, by hand


def _shard(shape, g, dim=0):
    return math.ceil(shape[dim] / g) * math.prod(shape) // shape[dim]


def test_memory_rows_by_hand_bf16(tiny_path):
    G, T, R, s, b = 3, 2, 3, 16, 2
    n = b * s
    info = _info(tiny_path, rank=R, tasks=T)
    o = P.PlanOptions(gpus=G, gpu_mem_gib=1, seq_len=s, micro_batch=b, rank=R, tasks=T)
    mem = P.memory_rows(info, o)
    rows = {k: v for k, _, v in mem["rows"]}
    layer_shapes = [(o_, i_) for o_, i_ in TINY_LINEARS] + [(H,), (H,)]
    base = L * sum(_shard(sh, G) for sh in layer_shapes) + 2 * _shard((V, H), G) + _shard((H,), G)
    assert base == 15_682
    assert rows["base_weights"] == 2 * base
    # lora_a (T, R, in) sharded on in, lora_b (T, out, R) on out (mftk.train.distributed's
    # SHARD_DIMS), not on T = 2 < G = 3: the fullest rank holds ceil(d / 3) of each feature dim
    ad = L * sum(_shard((T, R, i_), G, 2) + _shard((T, o_, R), G, 1) for o_, i_ in TINY_LINEARS)
    assert ad == L * T * R * sum(math.ceil(o_ / G) + math.ceil(i_ / G) for o_, i_ in TINY_LINEARS)
    assert ad == 3672  # dim-0 sharding would hold a whole task: L * R * sum(o + i) = 5328
    assert (rows["adapter_params"], rows["adapter_grads"], rows["adapter_adamw"]) == (
        4 * ad, 4 * ad, 8 * ad,
    )  # fmt: skip
    assert rows["fsdp_root"] == 2 * (2 * V * H + H)
    layer_bytes = 2 * (sum(o_ * i_ for o_, i_ in TINY_LINEARS) + 2 * H)
    layer_adapters = T * R * sum(o_ + i_ for o_, i_ in TINY_LINEARS)
    assert rows["fsdp_layer_buffers"] == 3 * (layer_bytes + 2 * layer_adapters) + 6 * layer_adapters
    assert rows["activations"] == L * 2 * H * n  # checkpoints
    assert rows["activations_other"] == n * ((4 * H + 4) + 2 * H + 4 * HD + 40)
    a_layer = 16 * H + 4 * KV + 8 * I + 4 * A + 8 + 7 * 4 * R
    assert mem["details"]["layer_activation_bytes_per_token"] == a_layer == 1360
    loss = 10 * V * n
    bwd = a_layer * n + 4 * H * n + max(6 * I * n, n * (10 * H + 4 * KV + 4 * A)) + 2 * V * n
    assert rows["peak_transient"] == max(loss, bwd) == 69_568
    assert mem["allocated"] == pytest.approx(311_700)
    assert mem["total"] == pytest.approx(1.1 * 311_700)
    assert mem["budget"] == (1 - 1.0 - 0.5) * 2**30 and not mem["fits"]

    o.activation_checkpointing = False
    mem = P.memory_rows(info, o)
    rows = {k: v for k, _, v in mem["rows"]}
    assert rows["activations"] == L * a_layer * n
    assert rows["peak_transient"] == max(loss, bwd - a_layer * n)


def test_memory_rows_by_hand_nf4_one_gpu_and_sdpa(tiny_path):
    T, R, s, b = 2, 3, 16, 2
    n = b * s
    info = _info(tiny_path, rank=R, tasks=T)
    for dq in (True, False):
        o = P.PlanOptions(gpus=1, seq_len=s, micro_batch=b, rank=R, tasks=T, quantize="nf4",
                          double_quant=dq, attention="sdpa")  # fmt: skip
        rows = {k: v for k, _, v in P.memory_rows(info, o)["rows"]}
        packed = L * sum(math.ceil(o_ * i_ / 2) for o_, i_ in TINY_LINEARS)
        bf16 = 2 * (L * 2 * H + 2 * V * H + H)
        assert rows["base_weights"] == packed + bf16
        consts = 0
        for o_, i_ in TINY_LINEARS:
            blocks = math.ceil(o_ * i_ / 64)
            if dq:  # uint8 absmax, fp32 absmax per 256 blocks, 256-entry code, offset, nf4 code
                consts += blocks + 4 * math.ceil(blocks / 256) + 1024 + 4 + 64
            else:  # fp32 absmax per block, nf4 code
                consts += 4 * blocks + 64
        assert rows["quant_constants"] == L * consts
        assert rows["dequant_workspace"] == 2 * 72 * 40
        assert "fsdp_root" not in rows and "fsdp_layer_buffers" not in rows
        ad = T * R * L * sum(o_ + i_ for o_, i_ in TINY_LINEARS)
        assert rows["adapter_params"] == 4 * ad
        # sdpa with a packing mask: a bf16 (b, 1, s, s) mask per layer; with one kv head,
        # repeat_kv is a view (no copy of k, v)
        a_layer = 16 * H + 4 * KV + 8 * I + 4 * A + 8 + 7 * 4 * R + 2 * s
        assert rows["activations_other"] == n * ((4 * H + 4) + 2 * H + 4 * HD + 40) + b * s * s
        bwd = a_layer * n + 4 * H * n + max(6 * I * n, n * (10 * H + 4 * KV + 4 * A)) + 2 * V * n
        assert rows["peak_transient"] == max(10 * V * n, bwd)


def test_memory_rows_by_hand_nf4_fsdp(tiny_path):
    """G > 1 with nf4: the packed 4-bit base sharded flat, the bf16 root gathered whole, and the
    FSDP2 layer buffers sized from 4-bit layers (not bf16 ones)."""
    G, T, R = 3, 2, 3
    info = _info(tiny_path, rank=R, tasks=T)
    o = P.PlanOptions(gpus=G, seq_len=16, micro_batch=2, rank=R, tasks=T, quantize="nf4")
    rows = {k: v for k, _, v in P.memory_rows(info, o)["rows"]}
    packed = L * sum(math.ceil(math.ceil(o_ * i_ / 2) / G) for o_, i_ in TINY_LINEARS)
    bf16 = 2 * (L * 2 * _shard((H,), G) + 2 * _shard((V, H), G) + _shard((H,), G))
    assert rows["base_weights"] == packed + bf16
    assert rows["fsdp_root"] == 2 * (2 * V * H + H)
    layer_4bit = sum(math.ceil(o_ * i_ / 2) for o_, i_ in TINY_LINEARS) + 2 * 2 * H
    layer_adapters = T * R * sum(o_ + i_ for o_, i_ in TINY_LINEARS)
    assert rows["fsdp_layer_buffers"] == 3 * (layer_4bit + 2 * layer_adapters) + 6 * layer_adapters
    o.quantize = None
    bf16_rows = {k: v for k, _, v in P.memory_rows(info, o)["rows"]}
    assert rows["fsdp_layer_buffers"] < bf16_rows["fsdp_layer_buffers"]


def test_adapter_shard_dims_are_the_trainers():
    from mftk.train.distributed import SHARD_DIMS

    assert P.ADAPTER_SHARD_DIMS == SHARD_DIMS


def test_33b_adapters_split_evenly_over_8_gpus(ds33b):
    """4 tasks on 8 GPUs: sharded on the feature dims (7168, 1024, 19200 all divide by 8), each
    rank holds exactly 1/8 of the adapters; dim-0 sharding would give the fullest rank 1/4."""
    o = P.PlanOptions(gpus=8, gpu_mem_gib=40, rank=16, tasks=4)
    rows = {k: v for k, _, v in P.memory_rows(ds33b, o)["rows"]}
    total = sum(p.numel for p in ds33b.adapters)
    assert {p.shard_dim for p in ds33b.adapters if p.name.endswith("lora_a")} == {2}
    assert {p.shard_dim for p in ds33b.adapters if p.name.endswith("lora_b")} == {1}
    assert rows["adapter_params"] == 4 * total / 8
    p = P.plan(ds33b, o)
    assert p["adapters"]["shard_padding_params_per_gpu"] == 0
    dim0 = sum(math.ceil(p_.shape[0] / 8) * p_.numel // p_.shape[0] for p_ in ds33b.adapters)
    saved = 16 * (dim0 - total / 8) / 2**30  # master + grad + AdamW, fp32
    assert 0.9 < saved < 0.95  # what the dim-0 model overstated on the fullest rank


def test_nf4_bits_per_param_match_qlora():
    n = 7168 * 19200  # DeepSeek-33B's gate_proj
    dq = P.quant_constant_bytes(n, double_quant=True) * 8 / n
    no_dq = P.quant_constant_bytes(n, double_quant=False) * 8 / n
    assert dq == pytest.approx(8 / 64 + 32 / (64 * 256), rel=1e-3)  # ~0.127 bit (QLoRA)
    assert dq == pytest.approx(0.127, abs=5e-4)
    assert no_dq == pytest.approx(0.5, rel=1e-3)  # fp32 absmax per 64 weights


def test_quant_constants_equal_bitsandbytes_quant_state():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for numel, dq in ((64 * 300 + 17, True), (4096, False), (40 * 72, True)):
        w = torch.randn(numel, dtype=torch.bfloat16)
        packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        assert packed.numel() * packed.element_size() == math.ceil(numel / 2)
        got = (
            qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
        )
        if dq:
            s2 = qs.state2
            got += s2.absmax.numel() * s2.absmax.element_size()
            got += s2.code.numel() * s2.code.element_size() + qs.offset.numel() * 4
        assert got == P.quant_constant_bytes(numel, dq), (numel, dq)


# ------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("ckpt", [True, False])
@pytest.mark.parametrize("router", [False, True])
def test_step_flops_by_hand(tiny_path, ckpt, router):
    T, R, s, b = 2, 3, 16, 2
    n = b * s
    info = _info(tiny_path, rank=R, tasks=T, router=router)
    o = P.PlanOptions(seq_len=s, micro_batch=b, rank=R, tasks=T, router=router,
                      activation_checkpointing=ckpt, mfu=0.5, peak_tflops=100.0)  # fmt: skip
    f = P.step_flops(info, o)
    p_lin = L * sum(o_ * i_ for o_, i_ in TINY_LINEARS)
    io = L * sum(o_ + i_ for o_, i_ in TINY_LINEARS)
    d_in = L * sum(i_ for _, i_ in TINY_LINEARS)
    c = 1 if ckpt else 0
    assert f["base_linears"] == (4 + 2 * c) * p_lin * n  # fwd + dx (+ recompute), no dW
    assert f["lm_head"] == 4 * H * V * n
    assert f["attention"] == (3 + c) * 2 * s * H * L * n  # causal: 2*s*q per token per layer
    r_eff = T * R if router else R
    assert f["adapters"] == (6 + 2 * c) * r_eff * io * n
    assert f["router"] == ((6 + 2 * c) * T * d_in * n if router else 0)
    parts = ("base_linears", "lm_head", "attention", "adapters", "router")
    assert f["total"] == sum(f[k] for k in parts)
    assert f["model_flops"] == f["total"] - f["recompute"]
    if not ckpt:
        assert f["recompute"] == 0
    p = P.plan(info, o)
    assert p["step"]["seconds_per_micro_step"] == pytest.approx(f["total"] / (0.5 * 100e12))


# ------------------------------------------------------------------------- largest micro-batch


def test_largest_micro_batch_is_monotonic_and_tight(ds33b):
    prev = -1
    for mem in (24, 32, 40, 48, 64, 80, 141):
        o = P.PlanOptions(gpus=8, gpu_mem_gib=mem, rank=16, tasks=4)
        m = P.largest_micro_batch(ds33b, o)
        assert m >= prev
        prev = m
        if m > 0:
            assert P.memory_rows(ds33b, o, m)["fits"]
        assert not P.memory_rows(ds33b, o, m + 1)["fits"]
    assert prev > 1
    totals = [P.memory_rows(ds33b, o, b)["total"] for b in range(1, 6)]
    assert all(x < y for x, y in zip(totals, totals[1:]))
    shorter = P.PlanOptions(gpus=8, gpu_mem_gib=40, seq_len=2048, rank=16, tasks=4)
    assert P.largest_micro_batch(ds33b, shorter) >= P.largest_micro_batch(
        ds33b, P.PlanOptions(gpus=8, gpu_mem_gib=40, seq_len=4096, rank=16, tasks=4)
    )


def test_33b_answers(ds33b):
    """DeepSeek-Coder-33B: bf16 on 8 x A100-40G needs checkpointing; nf4 fits 1x80G and 8x40G."""
    bf16 = P.plan(ds33b, P.PlanOptions(gpus=8, gpu_mem_gib=40, rank=16, tasks=4))
    assert bf16["memory"]["fits"] and bf16["largest_micro_batch"] >= 1
    assert not bf16["memory_other_checkpointing"]["fits"]  # 62 x ~1 GiB of activations
    base = {r["key"]: r["bytes"] for r in bf16["memory"]["rows"]}["base_weights"]
    assert base / 2**30 == pytest.approx(33.34e9 * 2 / 8 / 2**30, rel=2e-3)  # 7.8 GiB per GPU
    one = P.plan(ds33b, P.PlanOptions(gpus=1, gpu_mem_gib=80, quantize="nf4", rank=16, tasks=4))
    eight = P.plan(ds33b, P.PlanOptions(gpus=8, gpu_mem_gib=40, quantize="nf4", rank=16, tasks=4))
    assert one["memory"]["fits"] and eight["memory"]["fits"]
    assert eight["largest_micro_batch"] > bf16["largest_micro_batch"]
    # nf4 with double quant: 4.127 bits per linear weight, the rest bf16
    rows = {r["key"]: r["bytes"] for r in one["memory"]["rows"]}
    lin = sum(t.numel for t in ds33b.params if t.quantized)
    assert (rows["base_weights"] + rows["quant_constants"]) * 8 / lin == pytest.approx(
        4.127 + 16 * (ds33b.num_params - lin) / lin, abs=2e-3
    )
