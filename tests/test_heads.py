"""Per-task classification heads (mftk.heads): shapes, hidden-state capture, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import max_err, tiny_llama, tokens

import mftk
from mftk.heads import (
    ClassificationHead,
    add_head,
    capture_hidden,
    classify,
    head_parameters,
    last_token_index,
)


def test_head_math_and_errors():
    head = ClassificationHead(5, ["ok", "bug", "maybe"])
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, 5))
        head.bias.copy_(torch.randn(3))
    h = torch.randn(4, 5, dtype=torch.float64)
    want = h @ head.weight.double().T + head.bias.double()
    got = head(h)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        ClassificationHead(5, ["only"])
    with pytest.raises(ValueError, match="labels"):
        ClassificationHead(5, ["a", "a"])
    with pytest.raises(ValueError, match="hidden_size"):
        ClassificationHead(0, ["a", "b"])


def test_last_token_index_packed_rows():
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    rows, cols = last_token_index(seq)
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [2, 4, 5, 7]


def test_capture_hidden_is_the_final_normed_state():
    model = mftk.patch_model(tiny_llama(torch.float64), ["a", "b"], rank=4)
    ids = tokens(2, 6)
    with capture_hidden(model) as cap, mftk.use_tasks(model, "a"):
        logits = model(ids).logits
    assert cap.hidden.shape == (2, 6, 64)
    want = model.lm_head(cap.hidden)
    assert torch.allclose(logits, want, atol=1e-12), max_err(logits, want)


def test_head_trains_saves_and_loads(tmp_path):
    base = tiny_llama(torch.float32)
    model = mftk.patch_model(copy.deepcopy(base), ["gen", "cls"], rank=4)
    head = add_head(model, "cls", ["even", "odd"])
    assert model.mftk_config.heads["cls"]["labels"] == ["even", "odd"]
    with pytest.raises(ValueError, match="task"):
        add_head(model, "cls", ["x", "y"])
    with pytest.raises(ValueError, match="task"):
        add_head(model, "nope", ["x", "y"])
    # a learnable toy: the label is the parity of the last token
    ids = tokens(16, 5, seed=3)
    y = ids[:, -1] % 2
    params = list(mftk.adapter_parameters(model)) + head_parameters(model)
    opt = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(12):
        with capture_hidden(model) as cap, mftk.use_tasks(model, "cls"):
            model(ids)
        loss = torch.nn.functional.cross_entropy(head(cap.hidden[:, -1]), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    probs = classify(model, "cls", ids)
    assert probs.shape == (16, 2) and torch.allclose(probs.sum(1), torch.ones(16))
    # right padding: the head reads the last real token
    padded = torch.cat([ids, torch.zeros(16, 3, dtype=ids.dtype)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(16, 3, dtype=ids.dtype)], 1)
    assert torch.allclose(classify(model, "cls", padded, mask), probs, atol=1e-5)
    mftk.save_adapters(model, tmp_path / "ck")
    back = mftk.from_pretrained(copy.deepcopy(base), tmp_path / "ck")
    assert back.mftk_heads["cls"].labels == ["even", "odd"]
    assert torch.equal(back.mftk_heads["cls"].weight, head.weight)
    assert torch.equal(classify(back, "cls", ids), probs)
    with pytest.raises(ValueError, match="head"):
        classify(back, "gen", ids)
