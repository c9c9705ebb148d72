"""Packing: sample boundaries, per-token task ids, block-diagonal attention, packed == unpacked
loss through a real mftk-patched Llama; the resumable multi-task sampler and its stage mixes."""

import importlib.util
import random

import pytest
import torch

import mftk
from mftk.train.data import IGNORE, Sample
from mftk.train.losses import mft_loss, token_losses
from mftk.train.packing import (
    Batch,
    MultiTaskSampler,
    block_causal_mask,
    pack_rows,
    rows_to_batch,
)

VOCAB = 97


def rand_sample(rng, task, n, n_prompt):
    ids = [rng.randrange(3, VOCAB) for _ in range(n)]
    return Sample(task, ids, [IGNORE] * n_prompt + ids[n_prompt:])


def test_layout_positions_tasks_targets():
    rng = random.Random(0)
    a, b, c = rand_sample(rng, 0, 5, 2), rand_sample(rng, 2, 3, 1), rand_sample(rng, 1, 4, 3)
    batch = rows_to_batch([[a, b], [c]], pad_id=0)
    assert batch.input_ids.shape == (2, 8) and batch.num_tokens == 12
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    assert batch.task_ids.tolist() == [[0] * 5 + [2] * 3, [1] * 4 + [-1] * 4]
    assert batch.seq_ids.tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [-1] * 4]
    # targets shift inside each sample: the last token of a sample never predicts the next sample
    assert batch.targets[0].tolist() == a.labels[1:] + [IGNORE] + b.labels[1:] + [IGNORE]
    assert batch.targets[1].tolist() == c.labels[1:] + [IGNORE] * 5
    assert batch.input_ids[1, 4:].tolist() == [0] * 4


def test_block_causal_mask():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seq, torch.float64)[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert m.min() == torch.finfo(torch.float64).min


def test_pack_rows_greedy_and_leftover():
    lens = [5, 4, 3, 6, 2, 7]
    samples = [Sample(0, [1] * n, [1] * n) for n in lens]
    rows, used = pack_rows(samples, seq_len=10, max_rows=2)
    assert [[len(s) for s in r] for r in rows] == [[5, 4], [3, 6]] and used == 4
    rows, used = pack_rows(samples, seq_len=10, max_rows=3, packing=False)
    assert [[len(s) for s in r] for r in rows] == [[5], [4], [3]] and used == 3
    with pytest.raises(ValueError, match="length 7 > seq_len 6"):
        pack_rows(samples, seq_len=6, max_rows=10)


def tiny_patched(attn: str, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn).to(dtype).eval()
    mftk.patch_model(model, tasks=["a", "b", "c"], rank=4, alpha=8)
    with torch.no_grad():  # B starts at zero: make every task's adapter matter
        for p in mftk.adapter_parameters(model):
            p.normal_(0, 0.3)
    return model


def per_token_loss(model, batch, varlen=False):
    with mftk.use_tasks(model, batch.task_ids):
        logits = model(**batch.model_inputs(varlen)).logits
    return token_losses(logits, batch.targets), logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_unpacked_loss(attn):
    """The explicit 4D block mask (for eager/SDPA, HF's position-id packing detection is not
    enough: it remaps positions but does not separate the samples)."""
    varlen = False
    rng = random.Random(1)
    samples = [
        rand_sample(rng, t, n, p)
        for t, n, p in [(0, 7, 3), (2, 5, 1), (1, 9, 4), (0, 4, 2), (2, 11, 5), (1, 3, 1)]
    ]
    model = tiny_patched(attn)
    rows, used = pack_rows(samples, seq_len=24, max_rows=4)
    assert used == len(samples) and len(rows) < len(samples)  # really packed
    packed = rows_to_batch(rows, 0, torch.float64)
    lp, logits_p = per_token_loss(model, packed, varlen)
    # unpacked: each sample alone, then laid out like the packed batch
    want = torch.zeros_like(lp)
    for r, row in enumerate(rows):
        off = 0
        for smp in row:
            lu, _ = per_token_loss(model, rows_to_batch([[smp]], 0, torch.float64))
            want[r, off : off + len(smp)] = lu[0]
            off += len(smp)
    err = (lp - want).abs().max().item()
    # HF's LlamaRMSNorm computes in float32 even for a float64 model, hence a float32 tolerance
    assert err < 1e-5, f"packed vs unpacked per-token loss: max err {err}"
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss_p, means_p, counts_p = mft_loss(
        logits_p, packed.targets, packed.task_ids, weights, "balanced"
    )
    assert counts_p.tolist() == [
        sum(1 for s in samples if s.task == t for lab in s.labels[1:] if lab != IGNORE)
        for t in range(3)
    ]

    # negative control: one causal mask over the whole row lets samples see each other
    class Leaky(Batch):
        @property
        def attention_mask(self):
            return block_causal_mask(torch.zeros_like(self.seq_ids), self.mask_dtype)

    leaky = Leaky(**vars(rows_to_batch(rows, 0, torch.float64)))
    ll, _ = per_token_loss(model, leaky)
    assert (ll - want).abs().max().item() > 1e-2


def test_task_routing_matters_per_token():
    rng = random.Random(2)
    s = rand_sample(rng, 0, 8, 3)
    model = tiny_patched("eager")
    b0 = rows_to_batch([[s]], 0, torch.float64)
    b1 = rows_to_batch([[Sample(1, s.input_ids, s.labels)]], 0, torch.float64)
    l0, _ = per_token_loss(model, b0)
    l1, _ = per_token_loss(model, b1)
    assert (l0 - l1).abs().max().item() > 1e-4


def make_tasks(sizes, seed=0):
    rng = random.Random(seed)
    return [
        [rand_sample(rng, t, rng.randrange(4, 12), 2) for _ in range(n)]
        for t, n in enumerate(sizes)
    ]


def flat(rows):
    return [(s.task, tuple(s.input_ids), tuple(s.labels)) for r in rows for s in r]


def test_sampler_resume_is_exact():
    tasks = make_tasks([7, 5, 9])
    a = MultiTaskSampler(tasks, seed=3, vocab_size=VOCAB)
    full = [flat(a.next_rows(3, 20, True)) for _ in range(12)]
    b = MultiTaskSampler(tasks, seed=3, vocab_size=VOCAB)
    for _ in range(5):
        b.next_rows(3, 20, True)
    state = b.state_dict()
    c = MultiTaskSampler(tasks, seed=99, vocab_size=VOCAB)
    c.load_state_dict(state)
    rest = [flat(c.next_rows(3, 20, True)) for _ in range(7)]
    assert rest == full[5:]


def test_sampler_epochs_cover_every_sample():
    tasks = make_tasks([6])
    s = MultiTaskSampler(tasks, seed=0, vocab_size=VOCAB)
    seen = [tuple(s.draw().input_ids) for _ in range(12)]
    ids = sorted(tuple(x.input_ids) for x in tasks[0])
    assert sorted(seen[:6]) == ids and sorted(seen[6:]) == ids


def test_stage_mix_switches_tasks():
    tasks = make_tasks([10, 10, 10])
    s = MultiTaskSampler(tasks, seed=0, vocab_size=VOCAB)
    s.set_stage([0, 1, 0], 0.0)
    s.next_rows(2, 30, True)
    assert {smp.task for _ in range(20) for smp in [s.draw()]} == {1}
    s.set_stage([1, 0, 3], 0.0)
    drawn = [s.draw().task for _ in range(400)]
    assert 1 not in drawn[1:]  # (the first may be the pending sample from the previous stage)
    frac2 = drawn.count(2) / len(drawn)
    assert 0.68 < frac2 < 0.82
    with pytest.raises(ValueError, match="mix"):
        s.set_stage([1, 1], 0.0)


def test_noise_random_tokens_corrupts_prompts_only():
    tasks = make_tasks([50])
    s = MultiTaskSampler(
        tasks, seed=0, vocab_size=VOCAB, noise_kind="random_tokens", noise_token_rate=0.5
    )
    s.set_stage([1], 0.5)
    originals = {tuple(x.labels): x for x in tasks[0]}
    n_noisy = 0
    for _ in range(200):
        smp = s.draw()
        orig = originals[tuple(smp.labels)]  # labels (answers) are never changed
        changed = [i for i, (x, y) in enumerate(zip(smp.input_ids, orig.input_ids)) if x != y]
        assert all(orig.labels[i] == IGNORE and i > 0 for i in changed)
        n_noisy += bool(changed)
    assert 50 < n_noisy < 150


def test_noise_swap_answer():
    tasks = make_tasks([30])
    s = MultiTaskSampler(tasks, seed=0, vocab_size=VOCAB, noise_kind="swap_answer")
    s.set_stage([1], 0.99)
    answers = {tuple(lab for lab in x.labels if lab != IGNORE) for x in tasks[0]}
    prompts = {tuple(x.input_ids[:2]) for x in tasks[0]}
    for _ in range(50):
        smp = s.draw()
        assert tuple(smp.input_ids[:2]) in prompts
        ans = tuple(lab for lab in smp.labels if lab != IGNORE)
        assert any(a[: len(ans)] == ans for a in answers)
        assert [x for x, lab in zip(smp.input_ids, smp.labels) if lab != IGNORE] == list(ans)


def test_varlen_inputs_mark_every_sample_boundary():
    """The varlen inputs (flash-attention: no mask) carry the boundaries in the position ids
    alone: they restart at 0 at every packed sample, and match the mask path's ids."""
    rng = random.Random(2)
    samples = [rand_sample(rng, t, n, p) for t, n, p in [(0, 5, 2), (1, 7, 3), (2, 4, 1)]]
    rows, _ = pack_rows(samples, seq_len=24, max_rows=1)
    batch = rows_to_batch(rows, 0, torch.float64)
    inp, masked = batch.model_inputs(True), batch.model_inputs(False)
    assert set(inp) == {"input_ids", "position_ids"}
    assert torch.equal(inp["position_ids"], masked["position_ids"])
    starts = [0, 5, 12]
    pos = inp["position_ids"][0].tolist()
    assert [i for i, v in enumerate(pos[:16]) if v == 0] == starts


@pytest.mark.cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_packed_equals_unpacked_loss_varlen_flash():
    """The varlen path (flash-attn 2, position ids and no mask) on a GPU, in bf16."""
    rng = random.Random(1)
    samples = [
        rand_sample(rng, t, n, p)
        for t, n, p in [(0, 7, 3), (2, 5, 1), (1, 9, 4), (0, 4, 2), (2, 11, 5), (1, 3, 1)]
    ]
    model = tiny_patched("flash_attention_2", torch.bfloat16).cuda()
    rows, _ = pack_rows(samples, seq_len=24, max_rows=4)
    packed = rows_to_batch(rows, 0, torch.bfloat16).to("cuda")
    lp, _ = per_token_loss(model, packed, varlen=True)
    for r, row in enumerate(rows):
        off = 0
        for smp in row:
            alone = rows_to_batch([[smp]], 0, torch.bfloat16).to("cuda")
            lu, _ = per_token_loss(model, alone, varlen=True)
            err = (lp[r, off : off + len(smp)] - lu[0]).abs().max().item()
            assert err < 5e-2, f"row {r}: packed vs alone max err {err}"
            off += len(smp)
