"""Packing samples of different tasks into batches, and the resumable multi-task sampler.

A packed row holds several samples back to back. Per token it carries:
- `task_ids`: the sample's task (the adapter that token goes through); -1 on padding;
- `position_ids`: restarting at 0 for every sample;
- `targets`: the next-token label, shifted *inside each sample* (the last token of a sample has
  no target), so no loss ever crosses a sample boundary; -100 where there is no loss;
- `attention_mask`: an additive (B, 1, S, S) block-diagonal causal mask (0 = attend, dtype-min =
  blocked), derived from `seq_ids` when the forward asks for it, on their device: the S x S mask
  is never built on the host nor copied to the GPU. Hugging Face models take a 4D mask as-is,
  for the eager and the SDPA attention (with no mask, transformers 5's eager/SDPA mask from reset
  position ids still lets a sample attend to the earlier samples of its row). flash-attention
  takes no 4D mask: there the position ids alone go in, and HF's flash path turns them into
  varlen sequence boundaries, so no mask is made at all.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from mftk.train.data import IGNORE, Sample, SampleStream


@dataclass
class Batch:
    """input_ids, targets, task_ids, position_ids, seq_ids: (B, S) int64; num_tokens: real
    (non-pad) tokens; cls_labels: (B, S) int64, the class index on the last token of each
    classify-task sample, -100 elsewhere (None when built without it); mask_dtype: the dtype of
    attention_mask, (B, 1, S, S) additive, made from seq_ids on their device when read."""

    input_ids: Tensor
    targets: Tensor
    task_ids: Tensor
    position_ids: Tensor
    seq_ids: Tensor
    num_tokens: int
    cls_labels: Tensor | None = None
    mask_dtype: torch.dtype = torch.float32

    @property
    def attention_mask(self) -> Tensor:
        return block_causal_mask(self.seq_ids, self.mask_dtype)

    def model_inputs(self, varlen: bool = False) -> dict[str, Tensor]:
        """Keyword arguments for a Hugging Face causal LM. varlen (flash-attention, which takes
        no 4D mask): position ids alone; HF derives the packed sequence boundaries from them."""
        if varlen:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
        }

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on device."""
        cls = None if self.cls_labels is None else self.cls_labels.to(device)
        return dataclasses.replace(
            self, **{k: getattr(self, k).to(device) for k in BATCH_TENSORS}, cls_labels=cls
        )


BATCH_TENSORS = ("input_ids", "targets", "task_ids", "position_ids", "seq_ids")


def shifted_targets(labels: list[int]) -> list[int]:
    """targets[i] = labels[i + 1] within one sample; the last token predicts nothing."""
    return list(labels[1:]) + [IGNORE]


def block_causal_mask(seq_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """seq_ids: (B, S), equal ids = same sample (padding shares id -1, so it attends to itself).
    returns (B, 1, S, S) additive mask: 0 where key j <= query i in the same sample, else min."""
    s = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=seq_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def rows_to_batch(
    rows: list[list[Sample]],
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    length: int | None = None,
) -> Batch:
    """Lay out rows of samples (each row = samples packed back to back) as a padded Batch."""
    s = length or max(sum(len(x) for x in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    tgt = torch.full((b, s), IGNORE, dtype=torch.long)
    task = torch.full((b, s), -1, dtype=torch.long)
    pos = torch.zeros((b, s), dtype=torch.long)
    seq = torch.full((b, s), -1, dtype=torch.long)
    cls = torch.full((b, s), IGNORE, dtype=torch.long)
    n = 0
    for r, row in enumerate(rows):
        off = 0
        for k, smp in enumerate(row):
            L = len(smp)
            if off + L > s:
                raise ValueError(f"rows: row {r} holds {off + L} tokens, more than length {s}")
            ids[r, off : off + L] = torch.tensor(smp.input_ids)
            tgt[r, off : off + L] = torch.tensor(shifted_targets(smp.labels))
            task[r, off : off + L] = smp.task
            pos[r, off : off + L] = torch.arange(L)
            seq[r, off : off + L] = k
            if smp.cls_label >= 0:
                cls[r, off + L - 1] = smp.cls_label
            off += L
            n += L
    return Batch(ids, tgt, task, pos, seq, n, cls, mask_dtype=dtype)


class RowPacker:
    """Greedy in-order packing, one sample at a time (the rule of pack_rows), so that drawing a
    micro-batch sample by sample costs O(samples), not a re-pack per draw."""

    def __init__(
        self, seq_len: int, max_rows: int, packing: bool = True, max_tokens: int | None = None
    ) -> None:
        self.seq_len, self.max_rows, self.packing, self.max_tokens = (
            seq_len, max_rows, packing, max_tokens,
        )  # fmt: skip
        self.rows: list[list[Sample]] = []
        self.used: list[int] = []
        self.longest = 0  # max(used)

    def add(self, smp: Sample, i: int) -> bool:
        """Place smp (the i-th sample offered); False when it must wait for the next batch."""
        if len(smp) > self.seq_len:
            raise ValueError(f"samples[{i}]: length {len(smp)} > seq_len {self.seq_len}")
        rows, used = self.rows, self.used
        if self.packing and rows and used[-1] + len(smp) <= self.seq_len:
            rows[-1].append(smp)
            used[-1] += len(smp)
            self.longest = max(self.longest, used[-1])
            return True
        if len(rows) == self.max_rows:
            return False
        if self.max_tokens is not None and rows:
            if (len(rows) + 1) * max(self.longest, len(smp)) > self.max_tokens:
                return False
        rows.append([smp])
        used.append(len(smp))
        self.longest = max(self.longest, len(smp))
        return True


def pack_rows(
    samples: list[Sample],
    seq_len: int,
    max_rows: int,
    packing: bool = True,
    max_tokens: int | None = None,
):
    """Greedy in-order packing. returns (rows, number of samples consumed); a sample that does not
    fit once max_rows are open, or (max_tokens) would make rows × the longest row exceed
    max_tokens (the padded batch's size), stays for the next batch. The first row always opens."""
    packer = RowPacker(seq_len, max_rows, packing, max_tokens)
    for i, smp in enumerate(samples):
        if not packer.add(smp, i):
            return packer.rows, i
    return packer.rows, len(samples)


class MultiTaskSampler:
    """A deterministic, resumable stream of training samples drawn from several tasks.

    Each draw picks a task with probability ∝ the stage's mix weight, then that task's next sample
    in a per-epoch shuffled order. With probability `noise` the sample is corrupted:
    - `random_tokens`: each prompt (non-answer) token is replaced by a uniformly random vocabulary
      token with probability `noise_token_rate` (adversarial inputs, clean answers);
    - `swap_answer`: the answer tokens are replaced by another random sample's answer of the same
      task (a mislabelled sample; a classify sample takes the other sample's label).
    The whole state (RNG, per-task order and cursor, the sample left over by the last batch) is in
    state_dict(), so a resumed run draws exactly the same batches. A task given as a
    data.SampleStream (a streamed dataset) is drawn from in its stream's order instead, and its
    position is part of the state.
    """

    def __init__(
        self,
        tasks: list[list[Sample] | SampleStream],
        seed: int,
        vocab_size: int,
        noise_kind: str = "random_tokens",
        noise_token_rate: float = 0.2,
    ):
        self.streams = [t if isinstance(t, SampleStream) else None for t in tasks]
        lists = [t for t in tasks if not isinstance(t, SampleStream)]
        if not tasks or any(len(t) == 0 for t in lists):
            raise ValueError("tasks: every task needs at least one training sample")
        self.tasks = tasks
        self.vocab_size = vocab_size
        self.noise_kind = noise_kind
        self.noise_token_rate = noise_token_rate
        self.rng = random.Random(seed)
        self.orders = [[] if s else self._shuffled(len(t)) for t, s in zip(tasks, self.streams)]
        self.cursors = [0] * len(tasks)
        self.pending: Sample | None = None
        self.weights = [1.0 if s else float(len(t)) for t, s in zip(tasks, self.streams)]
        self.noise = 0.0
        self.drawn = [0] * len(tasks)

    def _shuffled(self, n: int) -> list[int]:
        order = list(range(n))
        self.rng.shuffle(order)
        return order

    def set_stage(self, mix: list[float], noise: float, noise_kind: str | None = None) -> None:
        """Task mix weights (T,), the fraction of corrupted samples and, optionally, how."""
        if len(mix) != len(self.tasks) or sum(mix) <= 0 or min(mix) < 0:
            raise ValueError(f"mix: expected {len(self.tasks)} non-negative weights, got {mix}")
        if noise_kind is not None and noise_kind not in ("random_tokens", "swap_answer"):
            raise ValueError(f"noise_kind: expected random_tokens|swap_answer, got {noise_kind!r}")
        self.weights = list(mix)
        self.noise = noise
        if noise_kind is not None:
            self.noise_kind = noise_kind

    def _next_index(self, t: int) -> int:
        if self.cursors[t] == len(self.orders[t]):
            self.orders[t] = self._shuffled(len(self.tasks[t]))
            self.cursors[t] = 0
        i = self.orders[t][self.cursors[t]]
        self.cursors[t] += 1
        return i

    def _corrupt(self, smp: Sample) -> Sample:
        ids, labels, cls = list(smp.input_ids), list(smp.labels), smp.cls_label
        if self.noise_kind == "random_tokens":
            for i, lab in enumerate(labels):
                if lab == IGNORE and i > 0 and self.rng.random() < self.noise_token_rate:
                    ids[i] = self.rng.randrange(self.vocab_size)
        else:  # swap_answer
            if self.streams[smp.task] is not None:
                raise ValueError("noise_kind swap_answer: a streamed task has no random access")
            other = self.tasks[smp.task][self.rng.randrange(len(self.tasks[smp.task]))]
            n_prompt = next((k for k, lab in enumerate(labels) if lab != IGNORE), len(labels))
            ans = [x for x, lab in zip(other.input_ids, other.labels) if lab != IGNORE]
            ids = ids[:n_prompt] + ans
            labels = [IGNORE] * n_prompt + ans
            ids, labels = ids[: len(smp)], labels[: len(smp)]
            cls = other.cls_label  # classify: a mislabelled sample
        return Sample(smp.task, ids, labels, cls)

    def draw(self) -> Sample:
        if self.pending is not None:
            smp, self.pending = self.pending, None
            return smp
        t = self.rng.choices(range(len(self.tasks)), weights=self.weights)[0]
        stream = self.streams[t]
        smp = stream.next() if stream is not None else self.tasks[t][self._next_index(t)]
        self.drawn[t] += 1
        if self.noise > 0 and self.rng.random() < self.noise:
            smp = self._corrupt(smp)
        return smp

    def next_rows(
        self, batch_size: int, seq_len: int, packing: bool, max_tokens: int | None = None
    ) -> list[list[Sample]]:
        """Rows for one micro-batch: up to batch_size rows of at most seq_len tokens (and with
        max_tokens, rows × the longest row at most max_tokens: see pack_rows)."""
        packer = RowPacker(seq_len, batch_size, packing, max_tokens)
        i = 0
        while True:
            smp = self.draw()
            if not packer.add(smp, i):  # it did not fit: keep it for the next batch
                self.pending = smp
                return packer.rows
            i += 1

    def state_dict(self) -> dict:
        pend = None
        if self.pending is not None:
            p = self.pending
            pend = [p.task, p.input_ids, p.labels, p.cls_label]
        streams = {}
        if any(self.streams):
            streams["streams"] = [s and s.state_dict() for s in self.streams]
        return {
            **streams,
            "rng": self.rng.getstate(),
            "orders": self.orders,
            "cursors": self.cursors,
            "pending": pend,
            "weights": self.weights,
            "noise": self.noise,
            "drawn": self.drawn,
            "noise_kind": self.noise_kind,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.orders = [list(o) for o in state["orders"]]
        self.cursors = list(state["cursors"])
        p = state["pending"]
        self.pending = (
            None if p is None else Sample(int(p[0]), list(p[1]), list(p[2]), *map(int, p[3:]))
        )
        self.weights = list(state["weights"])
        self.noise = float(state["noise"])
        self.drawn = list(state["drawn"])
        self.noise_kind = state.get("noise_kind", self.noise_kind)
        for stream, st in zip(self.streams, state.get("streams", [])):
            if stream is not None:
                stream.load_state_dict(st)


def _as_rng_state(s):
    """random.Random state after a round trip through lists (JSON/torch.save keep tuples)."""
    return (s[0], tuple(s[1]), s[2])


def eval_batches(
    samples: list[Sample],
    batch_size: int,
    seq_len: int,
    packing: bool,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    max_tokens: int | None = None,
) -> list[Batch]:
    """Fixed batches over a list of samples (in order), for evaluation (max_tokens: pack_rows)."""
    out, rest = [], list(samples)
    while rest:
        rows, used = pack_rows(rest, seq_len, batch_size, packing, max_tokens)
        out.append(rows_to_batch(rows, pad_id, dtype))
        rest = rest[used:]
    return out
