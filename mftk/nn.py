"""MultiAdapterLinear: a frozen nn.Linear plus one LoRA adapter per task, routed per token.

The module holds parameters and decides the routing; all arithmetic is one call to the public op
`mftk.multi_adapter_linear` (two calls when LoRA dropout is active in training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mftk.ops import RoutingPlan, multi_adapter_linear
from mftk.route import BaseOnly, Hard, Route, Soft
from mftk.spec import ROUTERS, AdapterSpec, lora_scale

__all__ = ["ROUTERS", "MultiAdapterLinear", "init_lora_a_", "lora_scale"]


def init_lora_a_(lora_a: Tensor) -> None:
    """PEFT's init for each task's A (R, D_in): Kaiming-uniform with a = sqrt(5), fan_in = D_in."""
    with torch.no_grad():
        for t in range(lora_a.shape[0]):
            nn.init.kaiming_uniform_(lora_a[t], a=math.sqrt(5))


def _gate(route: Route) -> Tensor | None:
    """(gate - gate.detach())[..., None] of a gated Hard route (mftk.route.Hard.gate), else None:
    zero in value; times the adapters' output it hands the gate its straight-through gradient."""
    if isinstance(route, Hard) and route.gate is not None:
        return (route.gate - route.gate.detach())[..., None]
    return None


def _gated(route: Route, delta: Tensor) -> Tensor:
    """The adapters' output delta, with the route's straight-through gate applied (same value)."""
    g = _gate(route)
    return delta if g is None else delta + g.to(delta.dtype) * delta


class MultiAdapterLinear(nn.Module):
    """A frozen linear layer plus T LoRA adapters, one per task.

    hard routing:  y[n] = x[n] @ W.T + b + s[t] * (x[n] @ A[t].T) @ B[t].T,   t = task_ids[n]
                   (t = -1: base only)
    soft routing:  p = softmax(top_k_mask((x @ R.T + r) / temperature))
                   y[n] = x[n] @ W.T + b + sum_t p[n, t] * s[t] * (x[n] @ A[t].T) @ B[t].T
    s[t] = alpha / rank, or alpha / sqrt(rank) with use_rslora.

    Parameters: weight (D_out, D_in) and bias (D_out,) frozen; lora_a (T, R, D_in) and lora_b
    (T, D_out, R) trainable; with router="softmax" also router_weight (T, D_in) and
    router_bias (T,).
    Buffers: lora_scaling (T,) float64 (kept in float64 through .to(dtype)) and lora_rank (T,)
    int64, the rank each task really uses (an imported PEFT adapter of rank r < R is zero-padded,
    which is exact). A is Kaiming-uniform and B zero, so a fresh module equals the base linear.

    forward(x, task_ids=None): x (..., D_in) -> (..., D_out). task_ids (...) int or a RoutingPlan
    picks hard routing. Without task_ids the routing comes from `mftk.use_tasks(model, ...)`; with
    neither, a router module routes softly and a module without a router raises.
    dropout > 0 (training only) drops the adapter input as PEFT does: the base sees x, the adapters
    (and the router) see dropout(x) through a second op call with weight=None (adapters alone),
    so dropout=0, one fused call, is the fast path.
    On the meta device (deferred init), call reset_adapters(full_rank=True) after to_empty(): the
    adapters and the scaling/rank buffers are not materialised with values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tasks: int,
        rank: int,
        alpha: float | None = None,
        bias: bool = True,
        router: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        shared_rank: int = 0,
        shared_alpha: float | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        b = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self._setup(
            weight, b, num_tasks, rank, alpha, router, top_k, temperature, dropout, use_rslora,
            hybrid=(shared_rank, shared_alpha),
        )  # fmt: skip
        self._init_base()
        self.reset_adapters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_tasks: int,
        rank: int,
        alpha: float | None = None,
        router: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        shared_rank: int = 0,
        shared_alpha: float | None = None,
    ) -> MultiAdapterLinear:
        """Wrap `linear` without copying: the new module's weight and bias ARE linear's Parameters
        (now frozen). Adapters are created on linear.weight's device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if not linear.weight.dtype.is_floating_point:
            raise TypeError(f"linear: weight dtype {linear.weight.dtype} is not floating point")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self._setup(
            linear.weight, linear.bias, num_tasks, rank, alpha, router, top_k, temperature, dropout,
            use_rslora, hybrid=(shared_rank, shared_alpha),
        )  # fmt: skip
        self.reset_adapters()
        return self

    @classmethod
    def from_base_layer(
        cls,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        num_tasks: int,
        rank: int,
        alpha: float | None = None,
        router: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        shared_rank: int = 0,
        shared_alpha: float | None = None,
    ) -> MultiAdapterLinear:
        """Adapters over a base computed by another module, e.g. a bitsandbytes 4-bit linear
        (see mftk.quant):  y = base_layer(x) + adapters(x).

        base_layer: (..., D_in) -> (..., D_out) in x's dtype; its parameters are frozen here. The
        adapters go through the op with weight=None, so no dense base weight is built: `weight`
        and `bias` are None and the base's bias is base_layer's. Adapters (and router) are created
        on `device` in `dtype` (the model's activation dtype, default float32).
        """
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer: expected an nn.Module, got {type(base_layer).__name__}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        kw = {"device": torch.device(device or "cpu"), "dtype": dtype or torch.float32}
        self._setup(
            None, None, num_tasks, rank, alpha, router, top_k, temperature, dropout, use_rslora,
            base_layer=base_layer, shape=(out_features, in_features), kw=kw,
            hybrid=(shared_rank, shared_alpha),
        )  # fmt: skip
        self.reset_adapters()
        return self

    def _setup(
        self, weight, bias, num_tasks, rank, alpha, router, top_k, temperature, dropout, use_rslora,
        base_layer=None, shape=None, kw=None, hybrid=(0, None),
    ) -> None:  # fmt: skip
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        spec = AdapterSpec(
            rank=rank, alpha=alpha, use_rslora=use_rslora, dropout=dropout, router=router,
            top_k=top_k, temperature=temperature, mode="hybrid" if hybrid[0] else "per_task",
            shared_rank=hybrid[0] or None, shared_alpha=hybrid[1],
        )  # fmt: skip
        spec.check_tasks(num_tasks)
        alpha = float(rank if alpha is None else alpha)
        if base_layer is None:
            shape, kw = tuple(weight.shape), {"device": weight.device, "dtype": weight.dtype}
        self.out_features, self.in_features = shape
        self.num_tasks, self.rank, self.alpha = num_tasks, rank, alpha
        self.router, self.top_k, self.temperature = router, top_k, float(temperature)
        self.dropout, self.use_rslora = float(dropout), bool(use_rslora)
        self.weight = weight
        self.bias = bias
        self.base_layer = base_layer  # None: the base is weight/bias, fused into the op
        t, d_in, d_out = num_tasks, self.in_features, self.out_features
        self.lora_a = nn.Parameter(torch.empty(t, rank, d_in, **kw))
        self.lora_b = nn.Parameter(torch.empty(t, d_out, rank, **kw))
        if router is not None:
            self.router_weight = nn.Parameter(torch.empty(t, d_in, **kw))
            self.router_bias = nn.Parameter(torch.empty(t, **kw))
        else:
            self.router_weight = None
            self.router_bias = None
        s = lora_scale(alpha, rank, self.use_rslora)
        self.register_buffer(
            "lora_scaling", torch.full((t,), s, dtype=torch.float64, device=kw["device"])
        )
        self.register_buffer(
            "lora_rank", torch.full((t,), rank, dtype=torch.int64, device=kw["device"])
        )
        self._setup_shared(spec, kw)
        # The model's one shared mftk.routing.Routing (set once by patch_model or use_tasks):
        # it resolves each forward's Route, so no routing state is written per layer.
        self.routing: Any = None

    def _setup_shared(self, spec: AdapterSpec, kw: dict[str, Any]) -> None:
        # Hybrid: one shared adapter (A_sh (R_s, D_in), B_sh (D_out, R_s)) on every routed token,
        # scale alpha_sh / R_s (or / sqrt(R_s)); shared_tasks (T,) 0/1: the tasks that use it.
        self.shared_rank = spec.shared_rank if spec.mode == "hybrid" else 0
        if not self.shared_rank:
            self.shared_a = self.shared_b = self.shared_tasks = None
            self.shared_scaling = 0.0
            return
        rs = self.shared_rank
        self.shared_alpha = float(spec.shared_alpha if spec.shared_alpha is not None else rs)
        self.shared_scaling = lora_scale(self.shared_alpha, rs, self.use_rslora)
        self.shared_a = nn.Parameter(torch.empty(rs, self.in_features, **kw))
        self.shared_b = nn.Parameter(torch.empty(self.out_features, rs, **kw))
        self.register_buffer(
            "shared_tasks", torch.ones(self.num_tasks, dtype=torch.float64, device=kw["device"])
        )

    def _init_base(self) -> None:
        # nn.Linear's own init, for a module built from sizes.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_adapters(self, task: int | None = None, *, full_rank: bool = False) -> None:
        """Re-initialise one task's adapter (or all) at the rank the task uses, r = lora_rank[t]:
        A[t, :r] Kaiming-uniform and A[t, r:] exactly 0, B[t] zeros. lora_rank and lora_scaling
        (per-task rank and alpha, mftk.pyramid) are kept, and so are the padding-gradient hooks
        (they live on the Parameters, updated in place). The router is re-initialised only when
        all tasks are.

        full_rank=True first resets both buffers to the module's rank R and alpha / R: the state
        of a freshly built module, needed after to_empty() on a meta-built one.
        """
        tasks = range(self.num_tasks) if task is None else [task]
        slots = torch.arange(self.rank, device=self.lora_rank.device)
        with torch.no_grad():
            for t in tasks:
                if full_rank:
                    self.lora_scaling[t] = lora_scale(self.alpha, self.rank, self.use_rslora)
                    self.lora_rank[t] = self.rank
                init_lora_a_(self.lora_a[t : t + 1])
                used = (slots < self.lora_rank[t]).to(self.lora_a.device, self.lora_a.dtype)
                self.lora_a[t].mul_(used[:, None])  # tensor ops only: no sync, works on meta
                self.lora_b[t].zero_()
            if self.router_weight is not None and task is None:
                nn.init.normal_(self.router_weight, std=0.02)
                nn.init.zeros_(self.router_bias)
            if self.shared_a is not None and task is None:
                init_lora_a_(self.shared_a[None])
                self.shared_b.zero_()

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable parameters: lora_a, lora_b and, with a router, router_weight/bias."""
        ps = [self.lora_a, self.lora_b]
        if self.router_weight is not None:
            ps += [self.router_weight, self.router_bias]
        if self.shared_a is not None:
            ps += [self.shared_a, self.shared_b]
        return ps

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the per-task scaling; keep it in float64.
        scaling = self.lora_scaling
        out = super()._apply(fn, recurse)
        if self.lora_scaling.dtype != torch.float64:
            self.lora_scaling = scaling.to(device=self.lora_scaling.device, dtype=torch.float64)
        return out

    # --- forward ---------------------------------------------------------------------------

    @property
    def spec(self) -> AdapterSpec:
        """This layer's settings as an AdapterSpec (rank R; alpha the layer's)."""
        return AdapterSpec(
            rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora, dropout=self.dropout,
            router=self.router, top_k=self.top_k, temperature=self.temperature,
            mode="hybrid" if self.shared_rank else "per_task",
            shared_rank=self.shared_rank or None,
            shared_alpha=self.shared_alpha if self.shared_rank else None,
        )  # fmt: skip

    def _route(self, x: Tensor, task_ids: Route | Tensor | RoutingPlan | None) -> Route:
        """The Route of this forward: given, from the model's Routing, or soft for a router."""
        if isinstance(task_ids, (Hard, Soft, BaseOnly)):
            if isinstance(task_ids, Soft) and self.router is None:
                raise ValueError("route: Soft routing needs a layer with router='softmax'")
            return task_ids
        if task_ids is not None:
            return Hard(task_ids)
        if self.routing is not None:
            return self.routing.resolve(x.shape[:-1], x.device, self.num_tasks, self.router)
        if self.router is not None:
            return Soft()
        raise RuntimeError(
            "MultiAdapterLinear: no task ids for this forward. Pass task_ids=..., run the model "
            "inside `with mftk.use_tasks(model, task_ids):`, or opt in to base-only outputs with "
            "`mftk.use_tasks(model, None)` / `mftk.set_default_tasks(model, None)`."
        )

    def forward(self, x: Tensor, task_ids: Route | Tensor | RoutingPlan | None = None) -> Tensor:
        """x: (..., D_in) -> (..., D_out) in x.dtype.

        task_ids: (...) int ids or a RoutingPlan (hard routing), a Route (Hard | Soft |
        BaseOnly), or None (the model's routing from mftk.use_tasks).
        """
        route = self._route(x, task_ids)
        routed = not isinstance(route, BaseOnly)
        if self.base_layer is not None:
            return self._forward_base_layer(x, route, routed)
        if self.dropout > 0 and self.training and routed:
            return self._forward_dropout(x, route)
        out = self._call_op(x, self.weight, route, bias=self.bias)
        g = _gate(route)
        if g is not None:  # the fused call gave base + adapters: the adapters alone once more
            out = out + g.to(out.dtype) * self._call_op(x, None, route)
        return out

    def _call_op(
        self, x: Tensor, weight: Tensor | None, route: Route, bias: Tensor | None = None
    ) -> Tensor:
        """One op call with this layer's adapters (and router when soft); records router logits.

        x: (..., D_in); weight: (D_out, D_in) or None (adapters only) -> (..., D_out).
        """
        soft = isinstance(route, Soft)
        ids = route.plan if isinstance(route, Hard) else None
        top_k = route.top_k if soft and route.top_k is not None else self.top_k
        temp = route.temperature if soft and route.temperature is not None else self.temperature
        out = multi_adapter_linear(
            x, weight, self.lora_a, self.lora_b, bias=bias, scaling=self.lora_scaling,
            task_ids=ids, router_weight=self.router_weight if soft else None,
            router_bias=self.router_bias if soft else None, top_k=top_k,
            temperature=temp, return_router_logits=soft, shared_a=self.shared_a,
            shared_b=self.shared_b, shared_scaling=self.shared_scaling,
            shared_tasks=self.shared_tasks,
        )  # fmt: skip
        if soft:
            out, logits = out
            if route.logits is not None:
                route.logits.add(logits.reshape(-1, self.num_tasks))
        return out

    def _forward_dropout(self, x: Tensor, route: Route) -> Tensor:
        # Exact LoRA dropout: the base sees x, the adapters (and router) see dropout(x). The adapter
        # call runs with weight=None (adapters alone), so the base GEMM is done once; the cost over
        # the fused path (dropout=0) is one extra pass over x and y.
        base = multi_adapter_linear(x, self.weight, self.lora_a, self.lora_b, bias=self.bias)
        xd = nn.functional.dropout(x, p=self.dropout, training=True)
        return base + _gated(route, self._call_op(xd, None, route))

    def _forward_base_layer(self, x: Tensor, route: Route, routed: bool) -> Tensor:
        # The base from base_layer (bitsandbytes' 4-bit matmul dequantizes one layer on the fly and
        # saves only the packed weight for backward), the adapters from the op with weight=None.
        base = self.base_layer(x)
        if not routed:
            return base
        if self.dropout > 0 and self.training:
            x = nn.functional.dropout(x, p=self.dropout, training=True)
        return base + _gated(route, self._call_op(x, None, route))

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None or getattr(self.base_layer, 'bias', None) is not None}, "
            f"num_tasks={self.num_tasks}, rank={self.rank}, "
            f"alpha={self.alpha:g}"
        )
        if self.use_rslora:
            s += ", use_rslora=True"
        if self.router is not None:
            s += f", router={self.router!r}, top_k={self.top_k}, temperature={self.temperature:g}"
        if self.dropout:
            s += f", dropout={self.dropout:g}"
        if self.shared_rank:
            s += f", shared_rank={self.shared_rank}, shared_alpha={self.shared_alpha:g}"
        return s
