"""A segment router: one task per packed sample, read from the sample's prompt (issue 14).

A per-layer softmax router sees one layer's input for one token; in the first layers that is
little more than the token's embedding. The segment router reads context instead: the hidden
states of a sample's prompt tokens at one point of the model (`layer`: -1 the input embeddings, k
the output of decoder layer k), pooled by attention with a learned query (at first the plain
mean), a linear classifier (D -> T) on the model root, and routes every token of the sample
Hard to the argmax task (top-1): through the model's one Routing in mode
"deferred", so the op and the layers are unchanged. Patched layers that run before that point
(decoder layers <= k) see the base alone; with layer -1 every patched layer is routed.

    router = add_segment_router(model, layer=-1)
    with use_segment_router(model, seq_ids, prompt) as seg:   # (B, S) each
        out = model(input_ids, ...)
    seg.logits   # (M, T) per sample, row-major; seg.token_logits (B, S, T); seg.task_ids (B, S)

`true_ids` (B, S) routes by the given ids instead (a supervised warm start) while the classifier
still produces its logits. The prompt of a sample covers all of it, so a prompt token's route
depends on prompt tokens after it (never on answer tokens). Generation with a KV cache and
activation checkpointing (the recompute would re-read the ids) are not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mftk.core import decoder_layers, get_config, unwrap
from mftk.ops import check_task_ids
from mftk.routing import RoutingState, model_routing


class SegmentRouter(nn.Module):
    """logits = rms_norm(pooled_prompt_hidden) @ W.T + b, (M, H) -> (M, T) float32 (scaled to
    unit RMS: embeddings are small, and a unit-scale input lets AdamW's steps move the logits at
    the adapters' lr). The pooling is attention with one learned query (H,): token i of a
    prompt weighs softmax_i(query · rms_norm(h_i)), so the router can learn to read an
    instruction line that a plain mean dilutes among the code. query, W, b zero-initialised: a
    fresh router pools by the plain mean and predicts the uniform distribution (argmax: task 0).
    layer: where it reads."""

    def __init__(self, hidden_size: int, num_tasks: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.weight = nn.Parameter(torch.zeros(num_tasks, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_tasks))
        self.query = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, h: Tensor) -> Tensor:
        h = nn.functional.rms_norm(h.float(), (h.shape[-1],), eps=1e-6)
        return nn.functional.linear(h, self.weight.float(), self.bias.float())

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[1]}, num_tasks={self.weight.shape[0]}, " + (
            f"layer={self.layer}"
        )


def _read_point(model: nn.Module, layer: int) -> nn.Module:
    if layer == -1:
        return model.get_input_embeddings()
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer: expected -1 .. {len(layers) - 1}, got {layer}")
    return layers[layer][1]


def add_segment_router(model: nn.Module, layer: int = -1) -> SegmentRouter:
    """Give a patched model a segment router reading at `layer` (model.mftk_segment_router)."""
    model = unwrap(model)
    _read_point(model, layer)  # checks the layer
    emb = model.get_input_embeddings().weight
    cfg = get_config(model)
    router = SegmentRouter(emb.shape[1], len(cfg.tasks), layer).to(emb.device)
    model.mftk_segment_router = router
    cfg.segment_router = layer
    return router


def segment_router_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{"segment_router.weight": (T, H), "segment_router.bias": (T,)}, or {} without one."""
    router = getattr(unwrap(model), "mftk_segment_router", None)
    if router is None:
        return {}
    return {f"segment_router.{k}": v for k, v in router.state_dict().items()}


def prompt_mask(targets: Tensor, seq_ids: Tensor) -> Tensor:
    """(B, S) bool: the prompt tokens of each packed sample: those before its first token with a
    target (targets[i] != -100 predicts token i + 1, the first answer token, so that token is
    the prompt's last). A sample without targets is all prompt; padding (seq_ids -1) is not."""
    has = targets != -100
    first = torch.zeros_like(has)
    first[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    first[:, 0] = True
    # segment-wise cumulative count of targets strictly before each token
    before = torch.cumsum(has.long(), 1) - has.long()
    start = torch.where(first, before, torch.zeros_like(before))
    start = torch.cummax(start, 1).values  # the count at each token's segment start
    return (seq_ids >= 0) & (before - start == 0)


def segment_index(seq_ids: Tensor) -> tuple[Tensor, int]:
    """(B, S) int64: each real token's sample number in row-major order (-1 on padding), and M."""
    valid = seq_ids >= 0
    first = valid.clone()
    first[:, 1:] &= seq_ids[:, 1:] != seq_ids[:, :-1]
    idx = torch.cumsum(first.reshape(-1).long(), 0).reshape(seq_ids.shape) - 1
    return torch.where(valid, idx, torch.full_like(idx, -1)), int(first.sum())


class SegmentRouting:
    """One use_segment_router context: logits (M, T), token_logits (B, S, T) (the sample's
    logits on each of its tokens, zeros on padding), task_ids (B, S) the ids it routed by."""

    logits: Tensor | None = None
    token_logits: Tensor | None = None
    task_ids: Tensor | None = None


def route_segments(
    router: SegmentRouter, hidden: Tensor, seg: Tensor, m: int, prompt: Tensor
) -> tuple[Tensor, Tensor]:
    """hidden (B, S, H); seg (B, S) from segment_index; prompt (B, S) bool. returns the logits
    (M, T) on the attention-pooled prompts and the predicted ids (B, S) (top-1; -1 on padding).
    A sample without prompt tokens pools to zeros."""
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    take = prompt.reshape(-1).nonzero(as_tuple=True)[0]
    rows = seg.reshape(-1).index_select(0, take)
    hp = h.index_select(0, take)
    score = nn.functional.rms_norm(hp, (hp.shape[-1],), eps=1e-6) @ router.query.float()
    # softmax within each sample; its max is a constant per sample, so it carries no gradient
    peak = score.new_full((m,), -torch.inf).scatter_reduce(0, rows, score.detach(), "amax")
    e = torch.exp(score - peak.index_select(0, rows))
    den = e.new_zeros(m).index_add_(0, rows, e).clamp(min=1e-30)
    pooled = h.new_zeros(m, h.shape[1]).index_add_(0, rows, hp * e[:, None]) / den[:, None]
    logits = router(pooled)
    top = logits.argmax(-1)
    ids = torch.where(seg >= 0, top[seg.clamp(min=0)], torch.full_like(seg, -1))
    return logits, ids


@contextlib.contextmanager
def use_segment_router(
    model: nn.Module,
    seq_ids: Tensor,
    prompt: Tensor,
    true_ids: Tensor | None = None,
    straight_through: bool = False,
) -> Iterator[SegmentRouting]:
    """Route the forwards inside the block (B, S tokens, packed as seq_ids) by the model's
    segment router; true_ids (B, S): route by these instead (the router still predicts).
    straight_through: the top-1 pick's softmax probability gates the adapters in the backward
    only (mftk.route.Hard.gate), so the loss itself trains the router; values are unchanged."""
    model = unwrap(model)
    router: SegmentRouter = model.mftk_segment_router
    if true_ids is not None:  # checked once here: the routing state plans them unchecked
        check_task_ids(true_ids, router.weight.shape[0], "true_ids")
    seg, m = segment_index(seq_ids)
    out = SegmentRouting()
    routing = model_routing(model)
    state = RoutingState(None, "deferred")

    def pre(_mod, _args):
        state.set_task_ids(None)  # a new forward: base only until the read point

    def hook(_mod, _args, output):
        hidden = output if isinstance(output, Tensor) else output[0]
        out.logits, ids = route_segments(router, hidden, seg, m, prompt)
        lead = out.logits.new_zeros(*seg.shape, out.logits.shape[1])
        out.token_logits = torch.where((seg >= 0)[..., None], out.logits[seg.clamp(min=0)], lead)
        out.task_ids = ids if true_ids is None else true_ids
        gate = None
        if straight_through and true_ids is None:
            p_top = out.logits.softmax(-1).amax(-1)  # the top-1 pick's probability
            gate = torch.where(seg >= 0, p_top[seg.clamp(min=0)], torch.zeros_like(p_top[:1]))
        state.set_task_ids(out.task_ids, gate)

    handles = [
        model.register_forward_pre_hook(pre),
        _read_point(model, router.layer).register_forward_hook(hook),
    ]
    previous, routing.state = routing.state, state
    try:
        yield out
    finally:
        routing.state = previous
        for hd in handles:
            hd.remove()
