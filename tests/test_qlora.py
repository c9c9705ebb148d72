"""QLoRA: patch_model(quantize="nf4"|"fp4") puts bitsandbytes 4-bit bases under the adapters.

Checked on tiny Llama models on the CPU: outputs and adapter gradients equal an mftk model whose
base weights are the dequantized 4-bit weights, and a float64 reference; only adapters get
gradients; base memory is about a quarter of fp16; merge refuses 4-bit bases unless asked to
dequantize; bad settings raise clear errors. Training over 4-bit bases (steps, checkpoints, PEFT
export, the trainer) is in test_qlora_training.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import max_err, randomize_adapters, reference_model, tiny_llama, tokens
from torch import nn

import mftk
from mftk import quant
from mftk.core import adapter_layers

if not quant.bitsandbytes_available():
    pytest.skip("bitsandbytes is not installed", allow_module_level=True)

TASKS = ["code", "sql", "docs"]


def _copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    sd = mftk.adapter_state_dict(src)
    with torch.no_grad():
        for k, v in mftk.adapter_state_dict(dst).items():
            v.copy_(sd[k])


def _dequantized_base(base: nn.Module, qmodel: nn.Module) -> nn.Module:
    """A deep copy of base whose 4-bit linears (patched or not) hold the dequantized weights."""
    out = copy.deepcopy(base)
    for name, m in qmodel.named_modules():
        if quant.is_4bit(m):
            name = name.removesuffix(".base_layer")
            out.get_submodule(name).weight.data = quant.dequantize_weight(m).to(base.dtype)
    return out


def _pair(quant_type="nf4", double_quant=True, compute_dtype=torch.float32, **kw):
    """(full-precision base, 4-bit patched model, dense patched model on the dequantized base),
    with the same random adapters."""
    base = tiny_llama(torch.float32)
    q = mftk.patch_model(
        copy.deepcopy(base), TASKS, rank=4, alpha=8, quantize=quant_type,
        double_quant=double_quant, compute_dtype=compute_dtype, **kw,
    )  # fmt: skip
    randomize_adapters(q)
    kw.pop("quantize_all_linear", None)
    dense = mftk.patch_model(_dequantized_base(base, q), TASKS, rank=4, alpha=8, **kw)
    _copy_adapters(q, dense)
    return base, q, dense


def _logits(model, ids, task_ids):
    with mftk.use_tasks(model, task_ids):
        return model(ids).logits


def _adapter_grads(model, out, g):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return names, torch.autograd.grad(out, [model.get_parameter(n) for n in names], g)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_equals_dequantized_base_and_reference(quant_type, double_quant):
    _, q, dense = _pair(quant_type, double_quant)
    layers = adapter_layers(q)
    assert all(quant.is_4bit(m.base_layer) and m.weight is None for _, m in layers)
    assert q.mftk_config.quantize["quant_type"] == quant_type
    ids = tokens(3, 9)
    task_ids = torch.randint(-1, 3, (3, 9))
    out = _logits(q, ids, task_ids)
    want = _logits(dense, ids, task_ids)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5), max_err(out, want)
    # float64 oracle on the same (dequantized) weights
    ref, holder = reference_model(copy.deepcopy(dense).double())
    holder["ids"] = task_ids
    ref_out = ref(ids).logits
    tol = 2 * (want.double() - ref_out).abs().max() + 1e-6
    assert (out.double() - ref_out).abs().max() <= tol, max_err(out, ref_out)
    g = torch.randn_like(out)
    names, got = _adapter_grads(q, out, g)
    names_d, same = _adapter_grads(dense, want, g)
    assert names == names_d and all(".lora_" in n for n in names)
    exp = torch.autograd.grad(
        ref_out, [ref.get_parameter(n.replace("_proj.", "_proj.m.")) for n in names], g.double()
    )
    for n, a, b, e in zip(names, got, same, exp):
        tol = 2 * (b.double() - e).abs().max() + 1e-6
        assert (a.double() - e).abs().max() <= tol, f"grad {n}: {max_err(a, e)}"
    # only adapters train: the 4-bit weights and everything else get no gradient
    (_logits(q, ids, task_ids) * g).sum().backward()
    for n, p in q.named_parameters():
        if p.requires_grad:
            assert ".lora_" in n and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


def test_bf16_compute_error_stays_at_bf16_matmul_level():
    base, q, dense = _pair(compute_dtype=torch.bfloat16)
    assert q.mftk_config.quantize["compute_dtype"] == "bfloat16"
    ids, task_ids = tokens(2, 8), torch.tensor([[0] * 8, [2] * 8])
    out = _logits(q, ids, task_ids)
    assert out.dtype == torch.float32  # bnb casts back to the activation dtype
    ref, holder = reference_model(copy.deepcopy(dense).double())
    holder["ids"] = task_ids
    ref_out = ref(ids).logits
    # the yardstick: the dense model with every base matmul in bf16 (adapters in fp32)

    class CastBf16(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x.bfloat16()).to(x.dtype)

    bf = copy.deepcopy(dense)
    for _, m in adapter_layers(bf):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight.data = m.weight.data.bfloat16()
        if m.bias is not None:
            lin.bias.data = m.bias.data.bfloat16()
        m.base_layer, m.weight, m.bias = CastBf16(lin), None, None
    same = _logits(bf, ids, task_ids)
    err, err_same = (out.double() - ref_out).abs().max(), (same.double() - ref_out).abs().max()
    assert err <= 2 * err_same + 1e-4, f"bf16 compute: {err:.3g} vs bf16 yardstick {err_same:.3g}"
    assert err > 0  # it really computed in bf16


def test_router_and_dropout_over_4bit_base():
    _, q, dense = _pair(router="softmax", top_k=2)
    ids = tokens(2, 7)
    with mftk.use_tasks(q, None, collect_router_logits=True) as ctx:
        out = q(ids).logits
    logits = ctx.pop_router_logits()
    with mftk.use_tasks(dense, None, collect_router_logits=True) as ctx_d:
        want = dense(ids).logits
    assert torch.allclose(out, want, atol=1e-5), max_err(out, want)
    for a, b in zip(logits, ctx_d.pop_router_logits()):
        assert torch.allclose(a, b, atol=1e-5), max_err(a, b)
    (out.square().mean() + sum(lg.softmax(-1).var() for lg in logits)).backward()
    for _, m in adapter_layers(q):
        assert m.router_weight.grad is not None and m.router_weight.grad.abs().sum() > 0
    # LoRA dropout: the adapters see dropout(x), the 4-bit base sees x; off in eval
    _, q, dense = _pair(dropout=0.5)
    q.train()
    torch.manual_seed(3)
    a = _logits(q, ids, ["code", "sql"])
    torch.manual_seed(3)
    b = _logits(dense.train(), ids, ["code", "sql"])
    assert torch.allclose(a, b, atol=1e-5), max_err(a, b)
    q.eval()
    a = _logits(q, ids, ["code", "sql"])
    assert torch.allclose(a, _logits(dense.eval(), ids, ["code", "sql"]), atol=1e-5)


def test_quantize_all_linear_keeps_lm_head():
    base, q, _ = _pair(target_modules=["q_proj", "v_proj"], quantize_all_linear=True)
    four = [n for n, m in q.named_modules() if quant.is_4bit(m)]
    n_lin = sum(isinstance(m, nn.Linear) for m in base.modules()) - 1  # all but lm_head
    assert len(four) == n_lin
    assert not quant.is_4bit(q.lm_head) and isinstance(q.lm_head, nn.Linear)
    assert q.mftk_config.target_modules == [n for n, _ in adapter_layers(q)]
    assert len(adapter_layers(q)) == 2 * base.config.num_hidden_layers
    dq = mftk.patch_model(
        _dequantized_base(base, q), TASKS, rank=4, alpha=8, target_modules=["q_proj", "v_proj"]
    )
    _copy_adapters(q, dq)
    ids = tokens(2, 6)
    out, want = _logits(q, ids, ["docs", -1]), _logits(dq, ids, ["docs", -1])
    assert torch.allclose(out, want, atol=1e-5), max_err(out, want)
    trainable = {id(p) for p in q.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in mftk.adapter_parameters(q)}


def test_base_memory_is_about_a_quarter_of_fp16(capsys):
    base = tiny_llama(torch.float32)
    f16 = quant.base_linear_bytes(copy.deepcopy(base).half().model)  # decoder linears, no lm_head
    got = {}
    for qt, dq in (("nf4", True), ("nf4", False), ("fp4", True)):
        q = mftk.patch_model(copy.deepcopy(base), TASKS, rank=4, quantize=qt, double_quant=dq)
        got[(qt, dq)] = quant.base_linear_bytes(q.model) / f16
    with capsys.disabled():
        print(f"\n4-bit / fp16 base-linear bytes (fp16 = {f16} B): {got}")
    n = sum(m.in_features * m.out_features for _, m in adapter_layers(q))
    # hand arithmetic, nf4 + double quant: n/2 packed + n/64 8-bit absmax, per layer a float32
    # offset and a float32 per 256 absmax, the two lookup tables (16 + 256 float32) once
    layers = adapter_layers(q)
    expect = n // 2 + n // 64 + sum(4 + 4 * -(-m.in_features * m.out_features // 64 // 256)
                                    for _, m in layers) + 4 * (16 + 256)  # fmt: skip
    assert got[("nf4", True)] == pytest.approx(expect / f16, rel=1e-9)
    assert 0.25 < got[("nf4", True)] < 0.28
    assert got[("nf4", True)] < got[("nf4", False)] < 0.29  # double quant saves the absmax


def test_merge_refuses_4bit_unless_dequantized():
    base, q, dense = _pair()
    ids = tokens(2, 6)
    before = _logits(q, ids, ["sql", "sql"])
    layers = adapter_layers(q)
    with pytest.raises(ValueError, match="4-bit base"):
        mftk.merge(q, "sql")
    merged = mftk.merge(q, "sql", dequantize=True)
    assert not any(quant.is_4bit(m) for m in merged.modules())
    out = merged(ids).logits
    assert torch.allclose(out, before, atol=1e-5), max_err(out, before)
    merged_w = {
        n: m.weight.detach().clone() for n, m in merged.named_modules() if n in dict(layers)
    }
    mftk.unmerge(merged)
    assert torch.equal(_logits(q, ids, ["sql", "sql"]), before)
    req = mftk.merge(q, "sql", requantize=True)
    for name, m in layers:
        got = req.get_submodule(name)
        assert quant.is_4bit(got) and quant.quant_settings(got) == quant.quant_settings(m)
        # exactly the merged weight, quantized once more with the layer's own settings
        w = quant.dequantize_weight(got)
        lin = nn.Linear(m.in_features, m.out_features)
        lin.weight.data = merged_w[name]
        assert torch.equal(w, quant.dequantize_weight(quant.quantize_linear(lin, "nf4", True)))
        rel = float((w - merged_w[name]).norm() / merged_w[name].norm())
        assert 0 < rel < 0.15, f"{name}: requantized merge off by {rel:.3g} (relative)"
    mftk.unmerge(req)
    assert torch.equal(_logits(q, ids, ["sql", "sql"]), before)


def test_bad_settings_raise_clear_errors():
    base = tiny_llama(torch.float32)
    with pytest.raises(ValueError, match="quantize: expected one of"):
        mftk.patch_model(copy.deepcopy(base), TASKS, quantize="int8")
    with pytest.raises(ValueError, match="compute_dtype"):
        mftk.patch_model(copy.deepcopy(base), TASKS, quantize="nf4", compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="compute_dtype"):
        mftk.patch_model(copy.deepcopy(base), TASKS, quantize="nf4", compute_dtype="half-ish")
    with pytest.raises(TypeError, match="double_quant"):
        mftk.patch_model(copy.deepcopy(base), TASKS, quantize="nf4", double_quant="yes")
    with pytest.raises(ValueError, match="quantize_all_linear: needs quantize"):
        mftk.patch_model(copy.deepcopy(base), TASKS, quantize_all_linear=True)
    with pytest.raises(TypeError, match="linear: bitsandbytes quantizes"):
        mftk.patch_model(tiny_llama(torch.float64), TASKS, quantize="fp4")
    with torch.device("meta"):
        meta = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="meta device"):
        quant.quantize_linear(meta)
    with pytest.raises(TypeError, match="expected a 4-bit layer"):
        quant.dequantize_weight(nn.Linear(4, 4))
    assert quant.check_quant_args(None, compute_dtype="bf16") == torch.bfloat16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (7, 200), (1, 64)])
def test_4bit_base_matches_a_hand_dequantization(quant_type, shape):
    # Oracle: unpack the stored codes by hand (two per byte, high nibble first) and scale each
    # block of 64 over the flattened weight by its absmax; D_in not a multiple of 64 included
    # (bitsandbytes 0.50.2's own CPU dequantize gets those wrong; mftk.quant replaces it).
    lin = nn.Linear(shape[1], shape[0])
    q = quant.quantize_linear(lin, quant_type, double_quant=True, compute_dtype=torch.float32)
    st = q.weight.quant_state
    absmax = quant.require_bitsandbytes().functional.dequantize_blockwise(st.absmax, st.state2)
    absmax = absmax.double() + float(st.offset)
    a = q.weight.data.reshape(-1)
    idx = torch.stack((a >> 4, a & 0xF), -1).reshape(-1)[: lin.weight.numel()].long()
    blocks = torch.arange(idx.numel()) // 64
    w_hand = (st.code.double()[idx] * absmax[blocks]).reshape(shape)
    w = quant.dequantize_weight(q)
    assert torch.allclose(w.double(), w_hand, atol=1e-6, rtol=1e-6), max_err(w, w_hand)
    rel = float((w - lin.weight.detach()).norm() / lin.weight.detach().norm())
    assert rel < (0.12 if quant_type == "nf4" else 0.15), f"4-bit relative error {rel:.3g}"
    x = torch.randn(3, 5, shape[1], dtype=torch.float64)
    y = q(x.float())
    want = x @ w_hand.T + lin.bias.double()
    assert torch.allclose(y.double(), want, atol=1e-5, rtol=1e-5), max_err(y, want)


def test_patch_over_a_model_quantized_beforehand():
    # the trainer's path (and transformers' BitsAndBytesConfig models): Linear4bit targets are
    # wrapped as they are, with adapters in the dtype the weights were quantized from
    base = tiny_llama(torch.float32)
    pre = copy.deepcopy(base)
    names = quant.quantize_model(pre, "nf4", True, torch.float32, ["q_proj", "down_proj"])
    assert names == [n for n, m in pre.named_modules() if quant.is_4bit(m)]
    pre = mftk.patch_model(pre, TASKS, rank=4, alpha=8, target_modules=["q_proj", "down_proj"])
    q = mftk.patch_model(
        copy.deepcopy(base), TASKS, rank=4, alpha=8, target_modules=["q_proj", "down_proj"],
        quantize="nf4", compute_dtype=torch.float32,
    )  # fmt: skip
    assert pre.mftk_config.quantize == q.mftk_config.quantize
    assert pre.mftk_config.quantize["quantize_all_linear"] is False
    randomize_adapters(q)
    _copy_adapters(q, pre)
    ids = tokens(2, 7)
    a, b = _logits(pre, ids, ["sql", "docs"]), _logits(q, ids, ["sql", "docs"])
    assert torch.equal(a, b), max_err(a, b)
    assert all(m.lora_a.dtype == torch.float32 for _, m in adapter_layers(pre))
    allq = quant.quantize_model(copy.deepcopy(base), "fp4", all_linear=True)
    assert len(allq) == sum(isinstance(m, nn.Linear) for m in base.modules()) - 1


def test_no_dense_base_weight_is_saved_for_backward():
    lin = nn.Linear(128, 192)
    m = quant.quantized_adapter_layer(lin, 3, 4, 8.0, "nf4", True, torch.float32)
    del lin
    x = torch.randn(5, 7, 128, requires_grad=True)
    ids = torch.randint(-1, 3, (5, 7))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x, ids)
    assert saved, "the op saves its inputs"
    assert all(s[0] != (192, 128) for s in saved), saved  # no dense (D_out, D_in) weight
    y.square().sum().backward()
    assert x.grad is not None and m.lora_a.grad is not None and m.lora_b.grad is not None
    assert all(p.grad is None for p in m.base_layer.parameters())


def test_without_bitsandbytes_mftk_works_and_quantize_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setattr(quant, "_bnb", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    assert not quant.bitsandbytes_available() and not quant.is_4bit(nn.Linear(2, 2))
    model = mftk.patch_model(tiny_llama(torch.float32), TASKS, rank=2)  # full precision: fine
    assert model.mftk_config.quantize is None
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        mftk.patch_model(tiny_llama(torch.float32), TASKS, rank=2, quantize="nf4")
