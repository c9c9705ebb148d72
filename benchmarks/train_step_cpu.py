"""One multi-task LoRA training step on the CPU, four ways, interleaved in one run.

A tiny Llama built from a config (no download): hidden 512, 4 layers, 8 heads, MLP 1376, vocab
2048; batch 8 sequences x 256 tokens from 4 tasks (2 sequences each); rank 16 on every linear
layer (never lm_head); fp32; 2 threads. A step is forward + LM loss + backward (gradients zeroed
outside the timed region; the optimizer update is the same tiny cost for every LoRA provider).

  base          the frozen model alone (the floor: backward reaches the input embeddings)
  peft_shared   PEFT, one LoRA shared by all tasks, one forward over the batch
  peft_switch   PEFT, one LoRA per task: set_adapter and forward+backward per task sub-batch
  mftk          mftk, one adapter per task, routed per sequence, one forward over the batch

Every provider runs once per round in a shuffled order; the table gives medians and the ratio to
`base` from the same rounds.

    python benchmarks/train_step_cpu.py [--rounds 9] [--under-load K] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import mftk  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)

# isort: split
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy import busy_processes, load_average  # noqa: E402
from run_cpu import interleaved  # noqa: E402

from mftk.core import adapter_layers  # noqa: E402

TASKS = ["t0", "t1", "t2", "t3"]
BATCH, SEQ, RANK, VOCAB = 8, 256, 16, 2048


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=SEQ,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lora_b_nonzero(params) -> None:
    """Random B (PEFT and mftk start it at zero): every adapter really contributes."""
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)


def build_steps(seed: int = 0) -> dict:
    import peft

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    task_of_seq = torch.arange(BATCH) % len(TASKS)  # 2 sequences per task, interleaved
    steps = {}

    base = tiny_llama(seed)

    def step_base():
        emb = base.get_input_embeddings()(ids).detach().requires_grad_(True)
        base(inputs_embeds=emb, labels=ids).loss.backward()

    steps["base"] = step_base

    cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear")
    shared = peft.get_peft_model(tiny_llama(seed), cfg)
    _lora_b_nonzero(p for n, p in shared.named_parameters() if "lora_B" in n)

    def step_shared():
        shared(input_ids=ids, labels=ids).loss.backward()
        shared.zero_grad(set_to_none=True)

    steps["peft_shared"] = step_shared

    switch = peft.get_peft_model(tiny_llama(seed), cfg, adapter_name=TASKS[0])
    for t in TASKS[1:]:
        switch.add_adapter(t, cfg)
    _lora_b_nonzero(p for n, p in switch.named_parameters() if "lora_B" in n)
    rows = [(t, (task_of_seq == i).nonzero().flatten()) for i, t in enumerate(TASKS)]

    def step_switch():
        for t, r in rows:
            switch.set_adapter(t)  # also makes only this task's adapter trainable
            # Mean of per-task means = the whole batch's mean here (equal sub-batches).
            (switch(input_ids=ids[r], labels=ids[r]).loss / len(TASKS)).backward()
        switch.zero_grad(set_to_none=True)

    steps["peft_switch"] = step_switch

    model = mftk.patch_model(tiny_llama(seed), tasks=TASKS, rank=RANK, alpha=RANK)
    _lora_b_nonzero(m.lora_b for _, m in adapter_layers(model))

    def step_mftk():
        with mftk.use_tasks(model, task_of_seq):
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    steps["mftk"] = step_mftk
    return steps


def measure(steps: dict, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    # warm-up twice: allocator and autograd caches
    return interleaved(steps, rounds, seed, warmup=2)


def table(times: dict[str, list[float]], title: str) -> list[str]:
    med = {p: statistics.median(t) for p, t in times.items()}
    lines = [
        title,
        "",
        "| provider | median s | x base | min s | max s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]  # noqa: E501
    for p, m in sorted(med.items(), key=lambda kv: kv[1]):
        t = times[p]
        lines.append(f"| {p} | {m:.3f} | {m / med['base']:.2f} | {min(t):.3f} | {max(t):.3f} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--under-load", type=int, default=0, metavar="K",
                    help="run K busy background processes during the measurement")  # fmt: skip
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, got {args.rounds}")
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    if args.under_load < 0:
        ap.error(f"--under-load: expected >= 0, got {args.under_load}")
    torch.set_num_threads(args.threads)
    steps = build_steps()
    load_before = load_average()
    with busy_processes(args.under_load):
        times = measure(steps, args.rounds)
    title = (
        f"### Training step, {args.under_load} busy background process(es);"
        f" {args.rounds} rounds, {args.threads} threads; load average before {load_before},"
        f" after {load_average()}"
    )
    lines = table(times, title)
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
