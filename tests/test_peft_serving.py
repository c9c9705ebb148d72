"""Serving the exported per-task adapters (README: "Serve the per-task adapters"): every task's
mftk.export_peft folder loaded into one PeftModel, and PEFT's generate(adapter_names=[...]) with a
different adapter per row gives each row what mftk's use_tasks generate gives for that task
(greedy, float64), per-task and hybrid (the merged rank r_t + R_s LoRA) exports alike."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers_models import randomize_adapters, tiny_llama, tokens

import mftk

peft = pytest.importorskip("peft")
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def served(base, model, tasks, path):
    """One PeftModel holding every task's export, each under its task's name."""
    for task in tasks:
        mftk.export_peft(model, task, path / task)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), path / tasks[0], adapter_name=tasks[0])
    for task in tasks[1:]:
        pm.load_adapter(path / task, adapter_name=task)
    return pm.eval()


def mftk_generate(model, prompt, mask, task):
    with mftk.use_tasks(model, task):  # one task for every row
        return model.generate(prompt, attention_mask=mask, **GEN)


def check_rows(base, model, tasks, tmp_path):
    pm = served(base, model, tasks, tmp_path)
    prompt = tokens(5, 6, seed=21)
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = 0, 0  # left padding, as batched serving pads
    rows = [tasks[1], tasks[0], "__base__", tasks[1], tasks[0]]
    with torch.no_grad():
        got = pm.generate(input_ids=prompt, attention_mask=mask, adapter_names=rows, **GEN)
        alone = {t: mftk_generate(model, prompt, mask, t) for t in tasks + ["__base__"]}
    for r, task in enumerate(rows):
        assert torch.equal(got[r], alone[task][r]), (
            f"row {r} ({task}): {got[r]} vs {alone[task][r]}"
        )
    new = {t: tuple(alone[t][0, 6:].tolist()) for t in alone}
    assert len(set(new.values())) == len(new), f"each adapter should generate its own: {new}"


def test_per_task_exports_serve_mixed_rows(tmp_path):
    base = tiny_llama(torch.float64)
    model = mftk.patch_model(copy.deepcopy(base), ["code", "sql"], rank=4, alpha=6)
    randomize_adapters(model, std=0.3)
    check_rows(base, model, ["code", "sql"], tmp_path)


def test_hybrid_exports_serve_mixed_rows(tmp_path):
    base = tiny_llama(torch.float64)
    model = mftk.patch_model(
        copy.deepcopy(base), ["code", "sql"], rank=3, mode="hybrid", shared_rank=5
    )
    randomize_adapters(model, std=0.3)
    check_rows(base, model, ["code", "sql"], tmp_path)
    cfg = json.loads((tmp_path / "code" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 + 5  # the merged LoRA: serve with --max-lora-rank >= r_t + R_s
