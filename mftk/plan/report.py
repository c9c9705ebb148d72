"""FLOPs, step time and the assembled plan of `mftk plan`, as a dict and as text."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from mftk.plan.memory import (
    GIB,
    GPUS,
    GpuSpec,
    PlanOptions,
    _layer_stored_bytes,
    _linears_per_layer,
    largest_micro_batch,
    memory_rows,
    shard_numel,
)
from mftk.plan.model import (
    LLAMA_LAYER_LINEARS,
    ModelInfo,
    count_adapters,
    inspect_model,
    load_config,
)

# -------------------------------------------------------------------------------------- FLOPs


def step_flops(info: ModelInfo, o: PlanOptions) -> dict[str, float]:
    """FLOPs per GPU per micro-step, by part (see the module doc); 'total' is what runs."""
    n, s = o.micro_batch * o.seq_len, o.seq_len
    ck = 1 if o.activation_checkpointing else 0
    in_layers = [t for t in info.targets if t[3] is not None]
    p_lin = sum(d_in * d_out for _, d_in, d_out, _ in in_layers)
    sum_io = sum(d_in + d_out for _, d_in, d_out, _ in in_layers)
    sum_in = sum(d_in for _, d_in, _, _ in in_layers)
    out_other = sum(d_in * d_out for _, d_in, d_out, layer in info.targets if layer is None)
    r_eff = o.tasks * o.rank if o.router else o.rank
    f = {
        "base_linears": (4 + 2 * ck) * p_lin * n,
        "lm_head": 4 * info.hidden * info.vocab * n + 4 * out_other * n,
        "attention": (3 + ck) * 2 * s * info.q_dim * info.num_layers * n,
        "adapters": (6 + 2 * ck) * r_eff * sum_io * n,
        "router": (6 + 2 * ck) * o.tasks * sum_in * n if o.router else 0,
    }
    f["total"] = sum(f.values())
    f["recompute"] = ck * (
        2 * p_lin * n
        + 2 * s * info.q_dim * info.num_layers * n
        + 2 * r_eff * sum_io * n
        + (2 * o.tasks * sum_in * n if o.router else 0)
    )
    f["model_flops"] = f["total"] - f["recompute"]
    return f


# -------------------------------------------------------------------------------------- plan


def plan(info: ModelInfo, o: PlanOptions) -> dict[str, Any]:
    """Everything `mftk plan` prints, as a JSON-serialisable dict (bytes, FLOPs, seconds)."""
    o.check()
    gpu = GPUS.get(o.gpu, GpuSpec(o.gpu, o.peak_tflops or 0.0, o.gpu_mem_gib, 0.0))
    peak = (o.peak_tflops or gpu.peak_tflops) * 1e12
    total = info.num_params
    adapter_total = sum(p.numel for p in info.adapters)
    lora_total = sum(p.numel for p in info.adapters if p.name.endswith(("lora_a", "lora_b")))
    per_rank = lora_total // (o.tasks * o.rank)  # = sum over targets of D_in + D_out
    per_task = lora_total / o.tasks
    mem = memory_rows(info, o)
    other = PlanOptions(**{**asdict(o), "activation_checkpointing": not o.activation_checkpointing})
    mem_other = memory_rows(info, other)
    fl = step_flops(info, o)
    t_step = fl["total"] / (o.mfu * peak) if peak > 0 else float("nan")
    n = o.micro_batch * o.seq_len
    # FSDP2 all-gathers every layer twice (forward; backward, which also serves the recompute) and
    # the root group once
    gathered = 2 * sum(_layer_stored_bytes(info, li, o.quantize) for li in range(info.num_layers))
    gathered += sum(2 * p.numel for p in info.params if p.layer is None)
    ag = gathered * (o.gpus - 1) / o.gpus
    pad = sum(shard_numel(p.shape, o.gpus, p.shard_dim) for p in info.adapters)
    pad -= adapter_total / o.gpus
    return {
        "model": {
            "name": info.name,
            "architecture": info.architecture,
            "params": total,
            "layers": info.num_layers,
            "layer_params": info.layer_params(0),
            "root_params": sum(p.numel for p in info.params if p.layer is None),
            "hidden": info.hidden,
            "intermediate": info.intermediate,
            "heads": info.heads,
            "kv_heads": info.kv_heads,
            "head_dim": info.head_dim,
            "vocab": info.vocab,
            "target_linears_per_layer": _linears_per_layer(info),
            "gated_mlp": info.gated_mlp,
        },
        "adapters": {
            "source": info.adapter_source,
            "rank": o.rank,
            "tasks": o.tasks,
            "routing": "soft (softmax router)" if o.router else "hard (task ids)",
            "params_per_rank_per_task": per_rank,
            "params_per_task": per_task,
            "fraction_per_task": per_task / total,
            "rank_for_0.3pct_per_task": 0.003 * total / per_rank,
            "params_all_tasks": lora_total,
            "router_params": adapter_total - lora_total,
            "trainable_params": adapter_total,
            "shard_padding_params_per_gpu": pad,
        },
        "options": asdict(o),
        "gpu": {"name": gpu.name, "peak_tflops": peak / 1e12, "mem_gib": o.gpu_mem_gib},
        "memory": _jsonable(mem),
        "memory_other_checkpointing": _jsonable(mem_other),
        "largest_micro_batch": largest_micro_batch(info, o),
        "largest_micro_batch_other_checkpointing": largest_micro_batch(info, other),
        "flops": fl,
        "step": {
            "seconds_per_micro_step": t_step,
            "tokens_per_micro_step_per_gpu": n,
            "tokens_per_second_per_gpu": n / t_step,
            "tokens_per_second_all_gpus": n * o.gpus / t_step,
            "seconds_per_optimizer_step": t_step * o.grad_accum,
            "tokens_per_optimizer_step": n * o.gpus * o.grad_accum,
            "allgather_bytes_per_gpu": ag,
            "allgather_seconds": ag / (gpu.bus_gbs * 1e9) if gpu.bus_gbs > 0 else None,
            "bus_gbs": gpu.bus_gbs,
        },
    }


def _jsonable(mem: dict[str, Any]) -> dict[str, Any]:
    out = dict(mem)
    out["rows"] = [{"key": k, "label": lab, "bytes": v} for k, lab, v in mem["rows"]]
    return out


# ---------------------------------------------------------------------------------- text output


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _count(x: float) -> str:
    return f"{x / 1e9:.3f} B" if x >= 1e9 else f"{x / 1e6:.2f} M"


def _fit_line(mem: dict[str, Any], largest: int) -> str:
    verdict = "fits" if mem["fits"] else "does not fit"
    return f"total {mem['total'] / GIB:.2f} GiB, {verdict}, largest micro-batch {largest}"


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable report of plan()."""
    m, a, o, g, mem = p["model"], p["adapters"], p["options"], p["gpu"], p["memory"]
    fl, st = p["flops"], p["step"]
    ck, n = o["activation_checkpointing"], st["tokens_per_micro_step_per_gpu"]
    r03 = a["rank_for_0.3pct_per_task"]
    frac03 = round(r03) * a["params_per_rank_per_task"] / m["params"]
    attention = "flash-attn 2" if o["attention"] == "flash" else "SDPA with a packing mask"
    lines = [
        f"mftk plan: {m['name']} ({m['architecture']}) on {o['gpus']} x {g['name']}, "
        f"{o['gpu_mem_gib']:g} GiB each",
        f"model     {_count(m['params'])} parameters (meta-device count): {m['layers']} layers x "
        f"{_count(m['layer_params'])} + {_count(m['root_params'])} embeddings/norm/lm_head",
        f"adapters  rank {a['rank']}, {a['tasks']} tasks, {a['routing']} routing, on "
        f"{m['target_linears_per_layer']} linears per layer [{a['source']}]",
        f"          {_count(a['params_per_rank_per_task'])} params per unit of rank per task; "
        f"per task {_count(a['params_per_task'])} = {a['fraction_per_task']:.3%} of the base; "
        f"trainable {_count(a['trainable_params'])}",
        f"          0.3% of the base per task <=> rank {r03:.2f} (r={round(r03)}: {frac03:.3%})",
        f"batch     micro-batch {mem['micro_batch']} x seq {o['seq_len']} = {n} tokens per GPU per "
        f"micro-step; {o['quantize'] or 'bf16'} base; activation checkpointing "
        f"{'on' if ck else 'off'}; {attention}",
        "",
        f"per-GPU memory{'':62}GiB",
    ]
    lines += [f"  {r['label']:<74}{_gib(r['bytes'])}" for r in mem["rows"]]
    reserve = "card - driver/CUDA context" + (" - NCCL" if o["gpus"] > 1 else "")
    headroom = f"allocator headroom ({o['headroom']:.0%} of the above)"
    lines += [
        f"  {headroom:<74}{_gib(mem['headroom'])}",
        f"  {'total':<74}{_gib(mem['total'])}",
        f"  {'usable: ' + reserve:<74}{_gib(mem['budget'])}",
        f"  fits: {'YES' if mem['fits'] else 'NO'} ({(mem['budget'] - mem['total']) / GIB:+.2f} "
        f"GiB); largest micro-batch that fits: {p['largest_micro_batch']}",
    ]
    other = p["memory_other_checkpointing"]
    ob = p["largest_micro_batch_other_checkpointing"]
    on, off = (
        ((mem, p["largest_micro_batch"]), (other, ob))
        if ck
        else ((other, ob), (mem, p["largest_micro_batch"]))
    )
    act = {r["key"]: r["bytes"] for r in on[0]["rows"]}["activations"]
    act_off = {r["key"]: r["bytes"] for r in off[0]["rows"]}["activations"]
    per_layer = mem["details"]["layer_activation_bytes_per_token"]
    lines += [
        "",
        f"activations at micro-batch {mem['micro_batch']}: {per_layer} bytes/token per layer "
        f"= {per_layer * n / GIB:.2f} GiB per layer",
        f"  with checkpointing:    {act / GIB:7.2f} GiB kept; {_fit_line(*on)}",
        f"  without checkpointing: {act_off / GIB:7.2f} GiB kept; {_fit_line(*off)}",
        "",
        f"step time ({g['name']}: {g['peak_tflops']:g} TFLOP/s dense bf16 peak, at "
        f"{o['mfu']:.0%} of peak on the executed FLOPs)",
        f"  TFLOP per GPU per micro-step: base linears {fl['base_linears'] / 1e12:.1f} "
        f"({'6' if ck else '4'}*P*n: fwd + dx{' + recompute' if ck else ''}), "
        f"lm_head {fl['lm_head'] / 1e12:.1f}, attention {fl['attention'] / 1e12:.1f}, "
        f"adapters {fl['adapters'] / 1e12:.2f}"
        + (f", routers {fl['router'] / 1e12:.2f}" if o["router"] else ""),
        f"  total {fl['total'] / 1e12:.1f} TFLOP executed ({fl['recompute'] / 1e12:.1f} of it "
        f"recompute; model FLOPs {fl['model_flops'] / 1e12:.1f})",
        f"  ~ {st['seconds_per_micro_step']:.2f} s per micro-step -> "
        f"{st['tokens_per_second_per_gpu']:.0f} tokens/s per GPU, "
        f"{st['tokens_per_second_all_gpus']:.0f} tokens/s on {o['gpus']} GPU(s)",
        f"  optimizer step: {o['grad_accum']} micro-step(s) x {o['gpus']} GPU(s) = "
        f"{st['tokens_per_optimizer_step']} tokens in {st['seconds_per_optimizer_step']:.2f} s",
    ]
    if o["quantize"]:
        lines.append(
            "  (4-bit: the dequantization of every weight in forward, backward and recompute is "
            "memory traffic not counted above; expect a lower utilization than bf16)"
        )
    if o["gpus"] > 1 and st["allgather_seconds"] is not None:
        lines.append(
            f"  FSDP2 all-gathers {st['allgather_bytes_per_gpu'] / 1e9:.1f} GB per GPU per "
            f"micro-step ~ {st['allgather_seconds']:.2f} s at {st['bus_gbs']:g} GB/s bus "
            "bandwidth (hidden behind compute when shorter)"
        )
    if m["target_linears_per_layer"] != LLAMA_LAYER_LINEARS or not m["gated_mlp"]:
        lines.append(
            f"  note: the activation formula assumes a Llama-style layer (7 linears, gated MLP); "
            f"this model has {m['target_linears_per_layer']} linears per layer, so activations "
            "are a rough estimate"
        )
    if a["shard_padding_params_per_gpu"] > 0.1 * a["trainable_params"] / o["gpus"]:
        lines.append(
            f"  note: FSDP2's sharding of the adapter tensors on their feature dim over "
            f"{o['gpus']} GPUs pads the fullest rank by "
            f"{_count(a['shard_padding_params_per_gpu'])} params (feature dims not a multiple of "
            "the GPU count)"
        )
    return "\n".join(lines)


def make_plan(model: str, options: PlanOptions) -> dict[str, Any]:
    """Load `model` (shipped name or config.json path), build it on meta, and plan it."""
    options.check()
    config = load_config(model)
    info, meta = inspect_model(config, name=model)
    count_adapters(info, meta, options.rank, options.tasks, options.router)
    return plan(info, options)
