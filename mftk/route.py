"""Routing as a value: what one forward of one patched layer does with its adapters.

    Hard(plan)        every token to its own task's adapter (a RoutingPlan, or (...) int ids);
    Soft(top_k, temperature, logits)
                      the layer's softmax router mixes the adapters (None: the layer's own
                      top_k / temperature); its logits go to the `logits` collector if given;
    BaseOnly()        the frozen base alone.

`mftk.use_tasks` resolves one Route per forward (mftk.routing) and every MultiAdapterLinear of the
model reads it; `MultiAdapterLinear.forward(x, route)` takes one directly. Router logits come back
through a `RouterLogits` collector, never a shared list. See docs/ARCHITECTURE.md
("add a routing mode").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mftk.ops import RoutingPlan


class RouterLogits:
    """Collects the router logits of one or more forwards: (N, T) per router-layer call, in call
    order. A trainer adds its router losses from `pop()` after each forward."""

    def __init__(self) -> None:
        self._items: list[Tensor] = []

    def add(self, logits: Tensor) -> None:
        """logits: (N, T) of one layer call."""
        self._items.append(logits)

    def pop(self) -> list[Tensor]:
        """The logits collected so far, in call order; the collector is empty afterwards."""
        out, self._items = self._items, []
        return out

    def peek(self) -> list[Tensor]:
        """The logits collected so far (a copy of the list), without clearing."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Hard:
    """Hard routing: plan is a RoutingPlan over this forward's N tokens, or (...) int task ids
    (-1: base only) matching x.shape[:-1]. gate: None, or (...) like x.shape[:-1], a router's
    top-1 probability with its gradient (straight-through): the layer adds
    (gate - gate.detach()) * adapters(x), zero in value, so the backward is that of
    y = base + gate * adapters(x) and the router learns from the loss."""

    plan: RoutingPlan | Tensor
    gate: Tensor | None = None


@dataclass(frozen=True)
class Soft:
    """Soft routing by the layer's router. top_k / temperature: None keeps the layer's own."""

    top_k: int | None = None
    temperature: float | None = None
    logits: RouterLogits | None = None


@dataclass(frozen=True)
class BaseOnly:
    """The frozen base alone; the adapters are skipped."""


Route = Hard | Soft | BaseOnly
