"""Per-forward task routing for patched models, without touching the model's forward signature.

    with mftk.use_tasks(model, task_ids):      # (B,) per sequence or (B, S) per token
        logits = model(input_ids).logits

Every MultiAdapterLinear of the model points at one shared RoutingState while the context is open.
The first layer of a forward builds the RoutingPlan for that forward's token shape; every other
layer reuses it, so tokens are grouped by task once per forward, not once per layer.

Router mode: `use_tasks(model, None, collect_router_logits=True)` routes softly and collects every
layer's router logits, (N, T) each, in call order, in `ctx.router_logits` (a list): a trainer adds
its router losses from them and then calls `ctx.pop_router_logits()` before the next forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mftk.core import adapter_layers, to_task_ids
from mftk.ops import RoutingPlan, build_plan


def expand_task_ids(ids: Tensor, lead: tuple[int, ...]) -> Tensor:
    """Broadcast context ids to one forward's token shape `lead` (x.shape[:-1]).

    ids: () one task for all tokens; (B,) per sequence: each row keeps its task whatever the
    sequence length (so generate with a KV cache works), and a batch of k*B rows (HF generate's
    num_return_sequences / beams, made by repeat_interleave) repeats each id k times; (B, S) per
    token: must match the forward's (B, S) (or its flattened (B*S,)) exactly.
    returns (*lead) int64.
    """
    if ids.dim() == 0:
        return ids.expand(lead)
    if ids.dim() == 1:
        b = ids.shape[0]
        rows = lead[0] if len(lead) else 1
        if len(lead) and rows % b == 0:
            if rows != b:
                ids = ids.repeat_interleave(rows // b)
            return ids.view(rows, *([1] * (len(lead) - 1))).expand(lead)
        raise ValueError(
            f"task_ids: {b} per-sequence ids do not fit this forward's batch of shape {tuple(lead)}"
        )
    if tuple(ids.shape) == tuple(lead):
        return ids
    if len(lead) == 1 and ids.numel() == lead[0]:
        return ids.reshape(lead)
    raise ValueError(
        f"task_ids: per-token ids of shape {tuple(ids.shape)} do not match this forward's tokens "
        f"{tuple(lead)}; per-token ids must cover each forward exactly (for generate with a KV "
        "cache, give per-sequence ids of shape (B,))"
    )


class RoutingState:
    """The routing every patched layer of a model reads during a forward.

    mode "ids": hard routing by task_ids (int64, () / (B,) / (B, S)); "none": base only, or soft
    routing in router layers; "error": router layers route softly, other layers raise (the state
    of a freshly patched model outside any context). router_logits: a list that router layers
    append their (N, T) logits to, or None when not collecting.
    """

    def __init__(
        self, task_ids: Tensor | None, mode: str, collect_router_logits: bool = False
    ) -> None:
        self.task_ids = task_ids
        self.mode = mode
        self.router_logits: list[Tensor] | None = [] if collect_router_logits else None
        self._key: Any = None  # the shape and device the cached plan was built for
        self._plan: RoutingPlan | None = None

    def resolve(
        self, lead: torch.Size, device: torch.device, num_tasks: int, has_router: bool
    ) -> tuple[RoutingPlan | None, bool]:
        """(plan for hard routing or None, soft?) for a forward whose x.shape[:-1] == lead."""
        if self.mode == "ids":
            key = (tuple(lead), device, num_tasks)
            if self._key != key:
                ids = expand_task_ids(self.task_ids.to(device), tuple(lead))
                self._plan = build_plan(ids, num_tasks)
                self._key = key
            return self._plan, False
        if has_router:
            return None, True
        if self.mode == "none":
            return None, False
        raise RuntimeError(
            "mftk: a patched model was called outside `mftk.use_tasks(model, task_ids)`. Wrap the "
            "call in that context to pick each sequence's task, or opt in to base-only outputs "
            "with `mftk.use_tasks(model, None)` or `mftk.set_default_tasks(model, None)`."
        )

    def pop_router_logits(self) -> list[Tensor]:
        """The router logits collected so far, (N, T) per layer call in call order; clears them."""
        if self.router_logits is None:
            raise RuntimeError("router logits are collected only with collect_router_logits=True")
        out, self.router_logits = self.router_logits, []
        return out


def _state_for(model: torch.nn.Module, task_ids: Any, collect: bool) -> RoutingState:
    if task_ids is None:
        return RoutingState(None, "none", collect)
    return RoutingState(to_task_ids(model, task_ids), "ids", collect)


@contextlib.contextmanager
def use_tasks(
    model: torch.nn.Module, task_ids: Any, *, collect_router_logits: bool = False
) -> Iterator[RoutingState]:
    """Route every forward of `model` inside the block by `task_ids`.

    task_ids: per sequence (B,) or per token (B, S), as an int tensor, a (nested) list of task
    names or indices, or one name/index for all tokens; -1 (or "__base__") means base only.
    None means no adapters (base only) in a model without a router, and soft routing in a model
    with one. Ids given to a router model route hard, bypassing the router.
    collect_router_logits: router layers append their logits (N, T) to the yielded state's
    `router_logits` list, in call order (see RoutingState.pop_router_logits).
    Yields the RoutingState shared by all patched layers; the previous routing returns on exit.
    With activation checkpointing, call backward inside the block too: the recomputed forward
    reads the routing again (outside the block it raises rather than route wrongly).
    """
    layers = [m for _, m in adapter_layers(model)]
    state = _state_for(model, task_ids, collect_router_logits)
    previous = [m._mftk_routing for m in layers]
    for m in layers:
        m._mftk_routing = state
    try:
        yield state
    finally:
        for m, p in zip(layers, previous):
            m._mftk_routing = p


def set_default_tasks(model: torch.nn.Module, task_ids: Any) -> None:
    """The routing used outside any `use_tasks` context from now on (same forms as use_tasks).

    `set_default_tasks(model, None)` opts in to base-only outputs (soft routing in router
    models); `set_default_tasks(model, "code")` sends every token to task "code".
    """
    state = _state_for(model, task_ids, False)
    for _, m in adapter_layers(model):
        m._mftk_routing = state


def clear_default_tasks(model: torch.nn.Module) -> None:
    """Back to the patched default: calls outside `use_tasks` raise (router layers route softly)."""
    state = RoutingState(None, "error")
    for _, m in adapter_layers(model):
        m._mftk_routing = state
