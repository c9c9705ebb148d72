"""Classify tasks in the trainer: a head per task on the last token of each of its samples.

A `type: classify` task's samples are prompts only (no LM target); packing marks each sample's
last token with its class index (Batch.cls_labels). The decoder's final hidden state there goes
through the task's ClassificationHead (mftk.heads), and the task's loss is the cross-entropy
mean over its samples in the batch, L_c = (1/n_c) Σ CE. L_c takes the place of the task's token
mean in the per-task loss vector and n_c that of its token count, so every loss mode (token,
balanced, focal, coba) combines generate and classify tasks in the same mixed batch.
Evaluation reports accuracy and macro-F1 per classify task, next to the majority-class baseline
(the train split's most frequent label, predicted for every eval sample).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mftk.heads import add_head, capture_hidden, head_parameters, last_token_index
from mftk.train.config import Config, ConfigError
from mftk.train.data import IGNORE

HEAD_LR_SCALE = 10.0


def accuracy_f1(pred: list[int], gold: list[int], num_labels: int) -> tuple[float, float]:
    """(accuracy, macro-F1 over the labels that occur in gold or pred); (nan, nan) when empty."""
    if not gold:
        return float("nan"), float("nan")
    acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn == 0:
            continue  # a label absent from both: not part of the macro average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return acc, sum(f1s) / len(f1s)


class ClassifyTasks:
    """The trainer's classify tasks: heads, the mixed-batch loss and the eval metrics."""

    def __init__(self, cfg: Config, model: nn.Module, bos: str, train_labels: dict[int, list]):
        self.cfg = cfg
        self.index = {i: t for i, t in enumerate(cfg.tasks) if t.type == "classify"}
        self.heads: dict[int, nn.Module] = {}
        for i, t in self.index.items():
            meta = {"prompt_template": t.prompt_template, "bos": bos, "seq_len": cfg.data.seq_len}
            self.heads[i] = add_head(model, t.name, t.labels, meta=meta)
        self.model = model
        self.majority = {i: Counter(train_labels.get(i, [])).most_common(1) for i in self.index}
        self.last_metrics: dict[str, dict[str, Any]] = {}

    @property
    def active(self) -> bool:
        return bool(self.index)

    def params(self) -> list[nn.Parameter]:
        return head_parameters(self.model)

    def param_groups(self, params: list[nn.Parameter], lr: float) -> list[dict[str, Any]]:
        """AdamW groups: the adapters at lr, the heads at HEAD_LR_SCALE * lr (a zero-initialised
        linear head on a frozen-ish feature learns slowly at a LoRA learning rate)."""
        heads = {id(p) for p in self.params()}
        groups = [{"params": [p for p in params if id(p) not in heads]}]
        if heads:
            groups.append({"params": self.params(), "lr": HEAD_LR_SCALE * lr})
        return groups

    def capture(self):
        """A context whose `.hidden` is the decoder's final hidden state (B, S, H) (None if no
        classify task)."""
        return capture_hidden(self.model) if self.active else contextlib.nullcontext(None)

    def _logits(self, hidden: Tensor, batch) -> dict[int, tuple[Tensor, Tensor]]:
        """{task: (head logits (n_c, C) fp32, labels (n_c,))} for the classify samples."""
        rows, cols = last_token_index(batch.seq_ids)
        labels = batch.cls_labels[rows, cols]
        keep = labels != IGNORE
        rows, cols, labels = rows[keep], cols[keep], labels[keep]
        tasks = batch.task_ids[rows, cols]
        out = {}
        for i, head in self.heads.items():
            sel = tasks == i
            if bool(sel.any()):
                out[i] = (head(hidden[rows[sel], cols[sel]]), labels[sel])
        return out

    def task_means(
        self, pairs: list[tuple[Tensor, Tensor]], hidden: Tensor, batch
    ) -> list[tuple[Tensor, Tensor]]:
        """Each (means, counts) (T,) pair of a batch with every classify task's entry replaced:
        the head's cross-entropy mean over the task's samples in the batch, and their number.
        The heads run once for all the pairs."""
        out = [(means.clone(), counts.clone()) for means, counts in pairs]
        for i, (z, y) in self._logits(hidden, batch).items():
            ce = F.cross_entropy(z, y)
            for means, counts in out:
                means[i] = ce.to(means.dtype)
                counts[i] = float(len(y))
        return out

    def eval_begin(self) -> None:
        self._ce = {i: 0.0 for i in self.index}
        self._pred: dict[int, list[int]] = {i: [] for i in self.index}
        self._gold: dict[int, list[int]] = {i: [] for i in self.index}

    def eval_batch(self, hidden: Tensor, batch) -> None:
        for i, (z, y) in self._logits(hidden, batch).items():
            self._ce[i] += float(F.cross_entropy(z, y, reduction="sum"))
            self._pred[i] += z.argmax(-1).tolist()
            self._gold[i] += y.tolist()

    def eval_end(self, out: dict[str, float]) -> None:
        """Set out[task] to the CE mean and add out["<task>/accuracy"], out["<task>/f1"]."""
        for i, t in self.index.items():
            gold, pred = self._gold[i], self._pred[i]
            n_labels = len(t.labels)
            acc, f1 = accuracy_f1(pred, gold, n_labels)
            out[t.name] = self._ce[i] / max(len(gold), 1)
            out[f"{t.name}/accuracy"] = acc
            out[f"{t.name}/f1"] = f1
            maj = self.majority[i][0][0] if self.majority[i] else 0
            m_acc, m_f1 = accuracy_f1([maj] * len(gold), gold, n_labels)
            self.last_metrics[t.name] = {
                "labels": list(t.labels),
                "eval_samples": len(gold),
                "accuracy": acc,
                "macro_f1": f1,
                "majority_label": t.labels[maj],
                "majority_accuracy": m_acc,
                "majority_macro_f1": m_f1,
            }


def train_labels(data) -> dict[int, list[int]]:
    """{task index: the class indices of its training samples} (classify tasks only)."""
    out: dict[int, list[int]] = {}
    for i, d in enumerate(data):
        if not isinstance(d.train, list):  # streamed (never a classify task: checks_data)
            continue
        labs = [s.cls_label for s in d.train if s.cls_label >= 0]
        if labs:
            out[i] = labs
    return out


def patch_kwargs(cfg: Config) -> dict[str, Any]:
    """patch_model's rank (an int, or {task: rank} when a task sets its own) and layers."""
    a = cfg.adapter
    kw: dict[str, Any] = {"layers": a.layers}
    if a.mode == "per_task" and any(t.rank is not None for t in cfg.tasks):
        kw["rank"] = {t.name: t.rank or a.rank for t in cfg.tasks}
    return kw


def as_config_error(err: ValueError) -> ValueError:
    """patch_model's `layers: ...` errors as ConfigErrors naming adapter.layers."""
    msg = str(err)
    if msg.startswith("layers"):
        return ConfigError("adapter." + msg)
    return err
