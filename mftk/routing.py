"""Per-forward task routing for patched models, without touching the model's forward signature.

    with mftk.use_tasks(model, task_ids):      # (B,) per sequence or (B, S) per token
        logits = model(input_ids).logits

Every MultiAdapterLinear of a model holds the model's one `Routing` (set once); `use_tasks` swaps
the RoutingState inside it. The first layer of a forward resolves that state to a Route value
(mftk.route: Hard(plan) | Soft(...) | BaseOnly()) for the forward's token shape; every other layer
gets the same value, so tokens are grouped by task once per forward, not once per layer. Task ids
are checked once, when the context opens (mftk.ops.check_task_ids, the op's own check).

Router mode: `use_tasks(model, None, collect_router_logits=True)` routes softly and collects every
layer's router logits, (N, T) each, in call order, in a RouterLogits collector (`ctx.logits`): a
trainer adds its router losses from `ctx.pop_router_logits()` after each forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mftk.core import adapter_layers, to_task_ids
from mftk.ops import check_task_ids, plan_checked
from mftk.route import BaseOnly, Hard, Route, RouterLogits, Soft


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
    """What one `use_tasks` context (or the default) asks of a model's layers.

    mode "ids": hard routing by task_ids (int64, () / (B,) / (B, S), already checked); "none":
    base only, or soft routing in router layers; "error": router layers route softly, other
    layers raise (a freshly patched model outside any context); "deferred": base only until
    `set_task_ids` gives ids mid-forward, hard by them afterwards (mftk.segment_router).
    logits: the RouterLogits collector router layers add to, or None when not collecting.
    """

    def __init__(
        self, task_ids: Tensor | None, mode: str, collect_router_logits: bool = False
    ) -> None:
        self.task_ids = task_ids
        self.mode = mode
        self.logits: RouterLogits | None = RouterLogits() if collect_router_logits else None
        self._soft = Soft(logits=self.logits)
        self._key: Any = None  # the shape and device the cached Hard route was built for
        self._hard: Hard | None = None
        self.gate: Tensor | None = None  # deferred: a straight-through gate, shaped as task_ids

    def resolve(
        self, lead: torch.Size, device: torch.device, num_tasks: int, router: str | None
    ) -> Route:
        """The Route of a forward whose x.shape[:-1] == lead, for a layer with `router`."""
        if self.mode == "ids" or (self.mode == "deferred" and self.task_ids is not None):
            key = (tuple(lead), device, num_tasks)
            if self._key != key:
                ids = expand_task_ids(self.task_ids.to(device), tuple(lead))
                gate = None if self.gate is None else self.gate.reshape(lead)
                self._hard = Hard(plan_checked(ids, num_tasks), gate)
                self._key = key
            return self._hard
        if router is not None:
            return self._soft
        if self.mode in ("none", "deferred"):
            return BaseOnly()
        raise RuntimeError(
            "mftk: a patched model was called outside `mftk.use_tasks(model, task_ids)`. Wrap the "
            "call in that context to pick each sequence's task, or opt in to base-only outputs "
            "with `mftk.use_tasks(model, None)` or `mftk.set_default_tasks(model, None)`."
        )

    def set_task_ids(self, task_ids: Tensor | None, gate: Tensor | None = None) -> None:
        """Mode "deferred": the layers called from now on route hard by task_ids (checked, int64,
        matching the forward's tokens), or base only with None; gate: a straight-through gate
        shaped as task_ids (mftk.route.Hard)."""
        if self.mode != "deferred":
            raise RuntimeError(f"set_task_ids: only in mode 'deferred', not {self.mode!r}")
        self.task_ids, self.gate, self._key, self._hard = task_ids, gate, None, None

    @property
    def router_logits(self) -> list[Tensor] | None:
        """The router logits collected so far (a list copy), or None when not collecting."""
        return None if self.logits is None else self.logits.peek()

    def pop_router_logits(self) -> list[Tensor]:
        """The router logits collected so far, (N, T) per layer call in call order; clears them."""
        if self.logits is None:
            raise RuntimeError("router logits are collected only with collect_router_logits=True")
        return self.logits.pop()


class Routing:
    """A model's one routing slot, shared by all its MultiAdapterLinear layers (layer.routing).

    state: the RoutingState in force; use_tasks swaps it and puts the previous one back.
    """

    def __init__(self) -> None:
        self.state = RoutingState(None, "error")

    def resolve(
        self, lead: torch.Size, device: torch.device, num_tasks: int, router: str | None
    ) -> Route:
        return self.state.resolve(lead, device, num_tasks, router)


def model_routing(model: torch.nn.Module) -> Routing:
    """The Routing shared by every patched layer of model (made and attached on first use)."""
    return _routing_and_tasks(model)[0]


def _routing_and_tasks(model: torch.nn.Module) -> tuple[Routing, int]:
    """(the model's Routing, T), from one walk over its modules."""
    layers = [m for _, m in adapter_layers(model)]
    shared = layers[0].routing
    if not isinstance(shared, Routing) or any(m.routing is not shared for m in layers):
        shared = Routing()
        for m in layers:
            m.routing = shared
    return shared, layers[0].num_tasks


def _state_for(model: torch.nn.Module, task_ids: Any, collect: bool, n: int) -> RoutingState:
    if task_ids is None:
        return RoutingState(None, "none", collect)
    ids = to_task_ids(model, task_ids, n)
    check_task_ids(ids, n)  # dtype and range: the op's own check, once per context
    return RoutingState(ids.to(torch.int64), "ids", collect)


@contextlib.contextmanager
def use_tasks(
    model: torch.nn.Module, task_ids: Any, *, collect_router_logits: bool = False
) -> Iterator[RoutingState]:
    """Route every forward of `model` inside the block by `task_ids`.

    task_ids: per sequence (B,) or per token (B, S), as an int tensor, a (nested) list of task
    names or indices, or one name/index for all tokens; -1 (or "__base__") means base only.
    None means no adapters (base only) in a model without a router, and soft routing in a model
    with one. Ids given to a router model route hard, bypassing the router.
    collect_router_logits: router layers add their logits (N, T) to the yielded state's
    RouterLogits collector `logits`, in call order (see RoutingState.pop_router_logits).
    Yields the RoutingState in force; the previous routing returns on exit.
    With activation checkpointing, call backward inside the block too: the recomputed forward
    reads the routing again (outside the block it raises rather than route wrongly).
    """
    routing, n = _routing_and_tasks(model)
    state = _state_for(model, task_ids, collect_router_logits, n)
    previous, routing.state = routing.state, state
    try:
        yield state
    finally:
        routing.state = previous


def set_default_tasks(model: torch.nn.Module, task_ids: Any) -> None:
    """The routing used outside any `use_tasks` context from now on (same forms as use_tasks).

    `set_default_tasks(model, None)` opts in to base-only outputs (soft routing in router
    models); `set_default_tasks(model, "code")` sends every token to task "code".
    """
    routing, n = _routing_and_tasks(model)
    routing.state = _state_for(model, task_ids, False, n)


def clear_default_tasks(model: torch.nn.Module) -> None:
    """Back to the patched default: calls outside `use_tasks` raise (router layers route softly)."""
    model_routing(model).state = RoutingState(None, "error")
