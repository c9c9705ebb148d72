"""Per-task output heads: a classification head on the final hidden state of a sample's last token.

    head = mftk.heads.add_head(model, "bug_detection", labels=["ok", "bug"])
    with mftk.heads.capture_hidden(model) as cap, mftk.use_tasks(model, "bug_detection"):
        model(input_ids)                                   # (B, S)
    logits = head(mftk.heads.last_token_states(cap.hidden, lengths))   # (B, C)

Heads live in `model.mftk_heads` (an nn.ModuleDict, task -> ClassificationHead) and are listed in
`model.mftk_config.heads` ({task: {"type": "classify", "labels": [...], "hidden_size": H}});
mftk.save_adapters / load_adapters / from_pretrained store them with the adapters, in the same
safetensors file (keys `heads.<task>.weight` / `.bias`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mftk.core import get_config, unwrap
from mftk.routing import use_tasks

HEAD_TYPES = ("classify",)


class ClassificationHead(nn.Module):
    """logits = h @ W.T + b on the (final-norm) hidden state of a sample's last token.

    h: (N, H) -> logits (N, C) in float32 (h is upcast: the head is tiny and trained in fp32).
    W: (C, H) zero-initialised, b: (C,) zero, so a fresh head predicts the uniform distribution
    and its first gradients come from the data, not from a random projection.
    """

    def __init__(self, hidden_size: int, labels: Sequence[str]) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        labels = list(labels) if not isinstance(labels, str) else labels
        if not isinstance(labels, list) or len(labels) < 2:
            raise ValueError(f"labels: a classify head needs at least 2 labels, got {labels!r}")
        if not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
            raise ValueError(f"labels: expected distinct non-empty strings, got {labels!r}")
        self.hidden_size, self.labels = hidden_size, labels
        self.weight = nn.Parameter(torch.zeros(len(labels), hidden_size))
        self.bias = nn.Parameter(torch.zeros(len(labels)))

    def forward(self, h: Tensor) -> Tensor:
        """h: (N, H) any float dtype -> (N, C) float32 logits."""
        return nn.functional.linear(h.float(), self.weight.float(), self.bias.float())

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, labels={self.labels}"


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(h, int):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            raise ValueError("model: cannot tell its hidden size (no config.hidden_size)")
        h = emb.weight.shape[1]
    return h


def heads(model: nn.Module) -> nn.ModuleDict:
    """model.mftk_heads (created empty if missing)."""
    model = unwrap(model)
    if not isinstance(getattr(model, "mftk_heads", None), nn.ModuleDict):
        model.mftk_heads = nn.ModuleDict()
    return model.mftk_heads


def add_head(
    model: nn.Module,
    task: str,
    labels: Sequence[str],
    kind: str = "classify",
    meta: dict[str, Any] | None = None,
) -> ClassificationHead:
    """Give a task of a patched model a classification head (on the model's device); returns it.

    meta: extra JSON-serialisable settings kept in mftk_config.heads[task] (the trainer stores
    how it rendered inputs: prompt_template, bos, seq_len, so that `mftk scan` renders alike).
    Raises ValueError for an unknown task, a task that already has a head, or bad labels."""
    model = unwrap(model)
    cfg = get_config(model)
    if kind not in HEAD_TYPES:
        raise ValueError(f"kind: expected one of {HEAD_TYPES}, got {kind!r}")
    if task not in cfg.tasks:
        raise ValueError(f"task: unknown task {task!r}; known tasks: {cfg.tasks}")
    hs = heads(model)
    if task in hs:
        raise ValueError(f"task: {task!r} already has a head")
    head = ClassificationHead(_hidden_size(model), labels)
    ref = next(iter(model.parameters()))
    head.to(device=ref.device)
    hs[task] = head
    cfg.heads[task] = {
        **(meta or {}),
        "type": kind,
        "labels": list(head.labels),
        "hidden_size": head.hidden_size,
    }
    return head


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every head's parameters (trainable)."""
    hs = getattr(unwrap(model), "mftk_heads", None)
    return [p for h in hs.values() for p in h.parameters()] if hs is not None else []


def head_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{"heads.<task>.weight": (C, H), "heads.<task>.bias": (C,)}, detached."""
    hs = getattr(unwrap(model), "mftk_heads", None) or {}
    return {f"heads.{t}.{k}": v.detach() for t, h in hs.items() for k, v in h.state_dict().items()}


def ensure_heads(model: nn.Module, spec: dict[str, dict]) -> None:
    """Create the heads listed in spec (an MftkConfig.heads) that the model does not have yet."""
    hs = heads(model)
    for task, meta in spec.items():
        if task not in hs:
            add_head(model, task, meta["labels"], meta.get("type", "classify"), meta)
        elif hs[task].labels != list(meta["labels"]):
            raise ValueError(
                f"task {task!r}: the model's head labels {hs[task].labels} differ from "
                f"{meta['labels']}"
            )


class _Capture:
    hidden: Tensor | None = None


@contextlib.contextmanager
def capture_hidden(model: nn.Module) -> Iterator[_Capture]:
    """Record the decoder's last_hidden_state (B, S, H), after the final norm, of the forwards run
    inside the block: `cap.hidden`. Works for any HF causal LM (get_decoder())."""
    model = unwrap(model)
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None:
        raise ValueError("model: has no get_decoder(); cannot read its final hidden states")
    cap = _Capture()

    def hook(_mod, _args, out):
        h = getattr(out, "last_hidden_state", None)
        cap.hidden = h if h is not None else out[0]

    handle = dec.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def last_token_index(seq_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the last token of every sample in a packed batch.

    seq_ids: (B, S) sample number within the row, -1 on padding. A sample ends where the next
    position holds another sample (or padding) or the row ends. returns two (M,) int64 tensors,
    in row-major order (row by row, samples in packing order).
    """
    nxt = torch.cat([seq_ids[:, 1:], torch.full_like(seq_ids[:, :1], -1)], dim=1)
    end = (seq_ids >= 0) & (nxt != seq_ids)
    rows, cols = end.nonzero(as_tuple=True)
    return rows, cols


@torch.no_grad()
def classify(
    model: nn.Module, task: str, input_ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Class probabilities (B, C) float32 for right-padded sequences input_ids (B, S) of `task`;
    attention_mask (B, S) 1/0 marks real tokens (all real if None). The head reads the hidden
    state of each row's last real token."""
    model = unwrap(model)
    hs = getattr(model, "mftk_heads", None)
    if hs is None or task not in hs:
        have = list(hs.keys()) if hs is not None else []
        raise ValueError(f"task: {task!r} has no classification head (heads: {have})")

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    last = attention_mask.long().sum(1) - 1
    if bool((last < 0).any()):
        raise ValueError("attention_mask: a row has no real token")
    with capture_hidden(model) as cap, use_tasks(model, task):
        model(input_ids=input_ids, attention_mask=attention_mask)
    h = cap.hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
    return hs[task](h).softmax(-1)
