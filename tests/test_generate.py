"""Mixed-task HF generate with the KV cache: each row keeps its task through every decode step."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import randomize_adapters, tiny_llama, tokens

import mftk

TASKS = ["code", "sql", "docs"]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    m = mftk.patch_model(tiny_llama(torch.float64), TASKS, rank=4, alpha=8)
    randomize_adapters(m, std=0.2)
    return m


def _generate(model, prompt, task_ids, **kw):
    with mftk.use_tasks(model, task_ids):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), **{**GEN, **kw})


def _greedy_no_cache(model, prompt, task_ids, steps):
    """Reference decoding: recompute the whole sequence each step, no cache, no generate()."""
    seq = prompt
    with mftk.use_tasks(model, task_ids):
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def test_mixed_generate_equals_per_task_generate_row_by_row(model):
    prompt = tokens(4, 5, seed=11)
    rows = ["docs", "code", -1, "sql"]
    mixed = _generate(model, prompt, rows)
    assert mixed.shape == (4, 5 + GEN["max_new_tokens"])
    outs = {}
    for task in TASKS + [-1]:
        outs[task] = _generate(model, prompt, [task] * 4)
    for r, task in enumerate(rows):
        assert torch.equal(mixed[r], outs[task][r]), f"row {r} (task {task})"
    new = [tuple(outs[t][0, 5:].tolist()) for t in TASKS + [-1]]
    assert len(set(new)) > 2, f"tasks should generate different tokens: {new}"


def test_left_padded_mixed_generate_equals_per_task_generate(model):
    prompt = tokens(3, 6, seed=15)
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0  # left padding, as for HF batched generation
    prompt[2, :4], mask[2, :4] = 0, 0
    rows = ["sql", "docs", "code"]
    with mftk.use_tasks(model, rows):
        mixed = model.generate(prompt, attention_mask=mask, **GEN)
    for r, task in enumerate(rows):
        with mftk.use_tasks(model, task):  # one name: every row gets that task
            alone = model.generate(prompt, attention_mask=mask, **GEN)
        assert torch.equal(mixed[r], alone[r]), f"row {r} (task {task})"


def test_kv_cache_generate_equals_no_cache_decoding(model):
    prompt = tokens(3, 4, seed=12)
    task_ids = torch.tensor([2, 0, 1])
    got = _generate(model, prompt, task_ids)
    want = _greedy_no_cache(model, prompt, task_ids, GEN["max_new_tokens"])
    assert torch.equal(got, want)


def test_beam_search_rows_keep_their_task(model):
    # generate repeat_interleaves each row num_beams times; per-sequence ids follow
    prompt = tokens(2, 4, seed=13)
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=4)
    mixed = _generate(model, prompt, ["sql", "docs"], **kw)
    assert torch.equal(mixed[:2], _generate(model, prompt, ["sql", "sql"], **kw)[:2])
    assert torch.equal(mixed[2:], _generate(model, prompt, ["docs", "docs"], **kw)[2:])


def test_router_mode_generate_matches_no_cache():
    m = mftk.patch_model(tiny_llama(torch.float64), TASKS, rank=4, router="softmax", top_k=2)
    randomize_adapters(m, std=0.2)
    prompt = tokens(2, 4, seed=14)
    got = m.generate(prompt, attention_mask=torch.ones_like(prompt), **GEN)  # no context needed
    want = _greedy_no_cache(m, prompt, None, GEN["max_new_tokens"])
    assert torch.equal(got, want)
    plain = copy.deepcopy(m)
    mftk.merge(plain, "sql")  # sanity: routing really changes the generation
    assert not torch.equal(
        plain.generate(prompt, attention_mask=torch.ones_like(prompt), **GEN), got
    )


def test_generate_outside_context_raises(model):
    prompt = tokens(1, 3)
    with pytest.raises(RuntimeError, match="use_tasks"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **GEN)
