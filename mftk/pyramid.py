"""The parameter pyramid: adapters on a range of decoder layers, a rank per task, growing tasks.

- Layer range: `patch_model(model, tasks, layers="18:")` patches only the target modules of those
  decoder layers (`model.layers.<i>.`, `h.<i>.`, `blocks.<i>.`; PEFT's `layers_to_transform`). The
  other layers keep their plain nn.Linear modules, frozen.
- Per-task rank: `rank={"code": 64, "bugs": 16}` (or a list in task order). mftk PADS: every layer
  stores lora_a (T, R, D_in) / lora_b (T, D_out, R) at R = max rank, and task t uses the leading
  r_t rows of A[t] and columns of B[t]. The padded slices A[t, r_t:] and B[t, :, r_t:] start at 0
  and stay exactly 0: their gradients are exactly 0 (dA[t, r_t:] = (s·dy·B[t, :, r_t:])^T x
  and dB[t][:, r_t:] = dy^T (x A[t, r_t:]^T) are products with zero factors), AdamW keeps zero
  moments at 0 and weight decay scales 0 to 0, and a gradient hook (mask_padded_grads) zeroes
  those slices anyway, so that a non-finite gradient elsewhere or an optimizer with its own
  update rule cannot leak into them. The op is unchanged (the zero slices contribute exact
  zeros), and PEFT export writes each task at its own r.
  Cost: every token pays for rank R instead of r_t: see `padding_flops`. At the benchmark shape
  (N=4096 tokens, D_in=D_out=1024, T=8 tasks of 512 tokens each) and ranks 64,64,32,32,16,16,8,8
  a training step's adapters cost 3.22 GFLOP per layer padded vs 1.51 ragged: +1.71 GFLOP, 10.0%
  of the frozen base's 17.2 GFLOP (fwd+bwd); {64, 16} on half the tokens each: +1.21, 7.0%.
  (FLOPs only; step time was not measured.)
- add_task: grow a patched model by one task, leaving every other task's values bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mftk.core import BASE, LayerSpec, adapter_layers, get_config, layer_of, unwrap
from mftk.nn import init_lora_a_, lora_scale
from mftk.routing import clear_default_tasks


def parse_layers(spec: LayerSpec, num_layers: int) -> list[int] | None:
    """Sorted decoder-layer indices selected by spec; None (all layers) for spec None.

    spec: "18:", "2:10", "::2", "-4:" (Python slice syntax, negatives count from the end), an
    int, a slice/range, or a list of indices (negatives allowed). Raises ValueError naming
    `layers` when an index is outside [-num_layers, num_layers) or the selection is empty.
    """
    if spec is None:
        return None
    n = num_layers
    if isinstance(spec, str):
        parts = spec.strip().split(":")
        if len(parts) == 1:
            try:
                spec = int(parts[0])
            except ValueError:
                raise ValueError(
                    f"layers: {spec!r} is not an index or 'start:stop[:step]'"
                ) from None
        else:
            if len(parts) > 3:
                raise ValueError(f"layers: {spec!r} is not 'start:stop[:step]'")
            try:
                vals = [int(p) if p.strip() else None for p in parts]
            except ValueError:
                raise ValueError(f"layers: {spec!r} is not 'start:stop[:step]'") from None
            spec = slice(*vals)
    if isinstance(spec, range):
        spec = list(spec)
    if isinstance(spec, slice):
        for k in ("start", "stop"):
            v = getattr(spec, k)
            if v is not None and not -n <= v <= n:
                raise ValueError(f"layers: slice {k} {v} is outside the model's {n} decoder layers")
        if spec.step == 0:
            raise ValueError("layers: slice step must not be 0")
        out = list(range(n))[spec]
    elif isinstance(spec, bool) or not isinstance(spec, (int, Sequence)):
        raise TypeError(f"layers: expected a str, int, slice or list of ints, got {spec!r}")
    else:
        items = [spec] if isinstance(spec, int) else list(spec)
        out = []
        for i in items:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"layers: expected int indices, got {i!r}")
            if not -n <= i < n:
                raise ValueError(
                    f"layers: index {i} is outside the model's {n} decoder layers (0..{n - 1})"
                )
            out.append(i % n)
    out = sorted(set(out))
    if not out:
        raise ValueError(f"layers: {spec!r} selects none of the model's {n} decoder layers")
    return out


def filter_by_layers(names: list[str], layers: list[int] | None) -> list[str]:
    """The module names that sit in one of `layers` (all names for None)."""
    if layers is None:
        return names
    keep = set(layers)
    out = [n for n in names if (li := layer_of(n)) is not None and li[1] in keep]
    if not out:
        raise ValueError(f"layers: no target module lies in decoder layers {layers}")
    return out


def zero_padding_(layer: nn.Module) -> None:
    """Set the padded slices A[t, r_t:] and B[t, :, r_t:] of a MultiAdapterLinear to 0."""
    with torch.no_grad():
        mask = _rank_mask(layer)
        layer.lora_a.mul_(mask[:, :, None].to(layer.lora_a.dtype))
        layer.lora_b.mul_(mask[:, None, :].to(layer.lora_b.dtype))


def _rank_mask(layer: nn.Module) -> torch.Tensor:
    """(T, R) bool: True on the rank slots task t uses (index < lora_rank[t])."""
    r = torch.arange(layer.rank, device=layer.lora_rank.device)
    return (r[None, :] < layer.lora_rank[:, None]).to(layer.lora_a.device)


def mask_padded_grads(layer: nn.Module) -> None:
    """Register (once) gradient hooks that zero the padded slices of lora_a/lora_b's gradients.

    The mask is read from lora_rank at backward time, so later rank changes (import_peft,
    add_task) are honoured. Hooks live on the Parameter objects: they survive .to(); after a
    wrapper replaces the parameters (FSDP2), or after copy.deepcopy (call this again), the
    gradients of the padding are still exactly 0, only no longer enforced.
    """
    ids = (id(layer.lora_a), id(layer.lora_b))
    if getattr(layer, "_mftk_rank_hooks", None) == ids:
        return  # already hooked (a deepcopy has new Parameters without hooks: ids differ)

    def hook_a(g: torch.Tensor) -> torch.Tensor:
        return g.masked_fill(~_rank_mask(layer)[:, :, None].to(g.device), 0)

    def hook_b(g: torch.Tensor) -> torch.Tensor:
        return g.masked_fill(~_rank_mask(layer)[:, None, :].to(g.device), 0)

    layer.lora_a.register_hook(hook_a)
    layer.lora_b.register_hook(hook_b)
    layer._mftk_rank_hooks = ids


def padding_flops(
    ranks: Sequence[int], tokens: Sequence[int], d_in: int, d_out: int
) -> dict[str, float]:
    """FLOPs of the adapters of one layer for a training step (forward + backward), padded vs
    ragged. ranks, tokens: (T,) per-task rank and token count. One adapter costs
    2·n·r·(D_in+D_out) forward and 4·n·r·(D_in+D_out) backward (docs/ARCHITECTURE.md, cost floor);
    the frozen base costs 2·N·D_in·D_out forward and the same backward (dx only).

    returns {"padded", "ragged", "overhead" (padded - ragged), "base", "overhead_vs_base"}.
    """
    rmax = max(ranks)
    per = 6 * (d_in + d_out)
    padded = float(sum(per * n * rmax for n in tokens))
    ragged = float(sum(per * n * r for n, r in zip(tokens, ranks)))
    base = 4.0 * sum(tokens) * d_in * d_out
    return {
        "padded": padded,
        "ragged": ragged,
        "overhead": padded - ragged,
        "base": base,
        "overhead_vs_base": (padded - ragged) / base,
    }


def add_task(
    model: nn.Module,
    name: str,
    rank: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
) -> int:
    """Grow a patched model by one task, in place; returns the new task's index (T).

    Every MultiAdapterLinear gets a new slot: A Kaiming-uniform (PEFT init), B zero, so the new
    task starts equal to the base model. rank defaults to the model's rank R; a rank above R
    grows R for every task by zero padding (exact: the padding is held at 0). alpha defaults to
    the rank (scaling 1) for mixed-rank models, to the model's alpha otherwise. With hard routing
    the old tasks' outputs are bit-identical afterwards (with rank <= R, where no shape of theirs
    changes); with a softmax router the new task joins the softmax, so soft outputs change.
    The adapter Parameters are replaced by larger ones: rebuild the optimizer (the trainer keeps
    the old tasks' AdamW moments, see mftk.train).
    """
    model = unwrap(model)
    cfg = get_config(model)
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"name: expected a non-empty task name other than {BASE!r}, got {name!r}")
    if name in cfg.tasks:
        raise ValueError(f"name: task {name!r} already exists ({cfg.tasks})")
    layers = adapter_layers(model)
    old_r = layers[0][1].rank
    r = old_r if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    mixed = cfg.ranks is not None or r != old_r
    a = float(alpha if alpha is not None else (r if mixed else cfg.alpha))
    if not a > 0:
        raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
    new_r = max(old_r, r)
    gen = None
    if seed is not None:
        gen = torch.random.fork_rng(devices=[])
        gen.__enter__()
        torch.manual_seed(seed)
    try:
        for _, m in layers:
            _grow_layer(m, new_r, r, a, init_lora_a_, lora_scale)
            if mixed:
                mask_padded_grads(m)
    finally:
        if gen is not None:
            gen.__exit__(None, None, None)
    old_ranks = cfg.ranks or [old_r] * len(cfg.tasks)
    cfg.tasks.append(name)
    cfg.rank = new_r
    cfg.ranks = old_ranks + [r] if mixed else None
    cfg.task_adapters[name] = {"r": r, "lora_alpha": a, "use_rslora": cfg.use_rslora}
    clear_default_tasks(model)
    return len(cfg.tasks) - 1


def _grow_layer(m: nn.Module, new_r: int, r: int, alpha: float, init_a, scale) -> None:
    t, old_r = m.num_tasks, m.rank
    kw: dict[str, Any] = {"device": m.lora_a.device, "dtype": m.lora_a.dtype}
    with torch.no_grad():
        a = torch.zeros(t + 1, new_r, m.in_features, **kw)
        b = torch.zeros(t + 1, m.out_features, new_r, **kw)
        a[:t, :old_r] = m.lora_a
        b[:t, :, :old_r] = m.lora_b
        fresh = torch.empty(1, r, m.in_features, **kw)
        init_a(fresh)
        a[t, :r] = fresh[0]
        req = m.lora_a.requires_grad
        m.lora_a = nn.Parameter(a, requires_grad=req)
        m.lora_b = nn.Parameter(b, requires_grad=req)
        if m.router_weight is not None:
            rw = torch.zeros(t + 1, m.in_features, **kw)
            rw[:t] = m.router_weight
            nn.init.normal_(rw[t], std=0.02)
            rb = torch.zeros(t + 1, **kw)
            rb[:t] = m.router_bias
            m.router_weight = nn.Parameter(rw, requires_grad=m.router_weight.requires_grad)
            m.router_bias = nn.Parameter(rb, requires_grad=m.router_bias.requires_grad)
        m.lora_scaling = torch.cat(
            [m.lora_scaling, m.lora_scaling.new_tensor([scale(alpha, r, m.use_rslora)])]
        )
        m.lora_rank = torch.cat([m.lora_rank, m.lora_rank.new_tensor([r])])
        if m.shared_tasks is not None:  # hybrid: the new task uses the shared adapter too
            m.shared_tasks = torch.cat([m.shared_tasks, m.shared_tasks.new_ones(1)])
    m.num_tasks, m.rank = t + 1, new_r
    m._mftk_rank_hooks = None  # the hooks were on the old Parameters
