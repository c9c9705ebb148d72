"""PEFT's LoRA format, both ways: one task <-> one PEFT adapter folder.

A folder holds adapter_config.json and adapter_model.safetensors with, per module,
`base_model.model.<module>.lora_A.weight` (r, D_in) and `...lora_B.weight` (D_out, r). PEFT's
scaling is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with per-module overrides in
rank_pattern / alpha_pattern. peft itself is not needed to read or write these files.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mftk.core import adapter_layers, get_config, layer_of, task_index, unwrap
from mftk.nn import lora_scale

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
# LoRA variants whose math is not plain W + s B A: refuse them rather than import them wrongly.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None, {}),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "target_parameters": (None, []),
    "use_bdlora": (None, False),
}


# A group holding a quantifier or an alternation, itself repeated: `(a+)+`, `(.|.)*`. Python's
# re backtracks exponentially on such patterns, and has no timeout.
_NESTED_REPEAT = re.compile(r"\((?:[^()\\]|\\.)*[*+?}|](?:[^()\\]|\\.)*\)[*+?{]")
_PLAIN_KEY = re.compile(r"[\w.]+")


def _pattern_matcher(field: str, key: Any):
    r"""A predicate module -> bool for one alpha_pattern / rank_pattern key, as PEFT's
    get_pattern_key matches it (re.match(rf"(.*\.)?({key})$", module)), but bounded: a plain
    dotted name is matched as a suffix without a regex, and a regex that could backtrack
    exponentially is refused."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{field}: keys must be non-empty strings, got {key!r}")
    if _PLAIN_KEY.fullmatch(key):
        return lambda module: module == key or module.endswith("." + key)
    if len(key) > 256 or _NESTED_REPEAT.search(key):
        raise ValueError(
            f"{field}: pattern {key!r} is refused (a repeated group that can backtrack for "
            "minutes); use plain module names or a simpler regex"
        )
    try:
        rx = re.compile(rf"(.*\.)?({key})$")
    except re.error as err:
        raise ValueError(f"{field}: pattern {key!r} is not a valid regex: {err}") from None
    return lambda module: rx.match(module) is not None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any, field: str) -> Any:
    # PEFT's get_pattern_key: the value of the first key that matches the module.
    for k, v in patterns.items():
        if _pattern_matcher(field, k)(module):
            return v
    return default


def _positive(config: dict[str, Any], key: str, default: Any, integer: bool) -> Any:
    v = config.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not v > 0 or (not integer and not math.isfinite(v)):
        what = "a positive int" if integer else "a positive number"
        raise ValueError(f"adapter_config.json: {key} must be {what}, got {v!r}")
    return v


def _task(model: nn.Module, task: str | int) -> tuple[int, str]:
    t = task_index(model, task)
    if t < 0:
        raise ValueError(f"task: {task!r} is the base model, not an adapter task")
    return t, get_config(model).tasks[t]


def export_peft(
    model: nn.Module,
    task: str | int,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write one task as a PEFT LoRA folder that `peft.PeftModel.from_pretrained(base, path)` loads.

    Every patched module is written, at the rank the task really uses there (lora_rank), with
    per-module rank_pattern / alpha_pattern entries where it differs from the task's r / lora_alpha.
    A router has no PEFT equivalent and is not exported. A hybrid task is written as one LoRA of
    rank r_t + R_s per module: A = [A_t; A_sh], B = [B_t, B_sh * s_sh / s_t] at the task's scale
    s_t, which PEFT computes exactly as mftk does.
    """
    model = unwrap(model)
    t, name = _task(model, task)
    cfg = get_config(model)
    meta = cfg.task_adapters.get(
        name, {"r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora}
    )
    r0, alpha0, rs = int(meta["r"]), float(meta["lora_alpha"]), bool(meta["use_rslora"])
    tensors, rank_pattern, alpha_pattern, targets = {}, {}, {}, []
    layers = adapter_layers(model)
    if any(m.shared_a is not None and float(m.shared_tasks[t]) for _, m in layers):
        # the task's PEFT rank grows by R_s; keep its PEFT scale s_t = lora_alpha / r
        alpha0 = lora_scale(alpha0, r0, rs) * (
            math.sqrt(r0 + cfg.shared_rank) if rs else r0 + cfg.shared_rank
        )
        r0 += cfg.shared_rank
    for mod, m in layers:
        r = int(m.lora_rank[t])
        a, b = m.lora_a[t].detach(), m.lora_b[t].detach()
        if r < m.rank and (a[r:].any() or b[:, r:].any()):
            raise ValueError(
                f"module {mod!r}: task {name!r} uses rank {r} but its padded rows are nonzero"
            )
        s = float(m.lora_scaling[t])
        a, b = a[:r], b[:, :r]
        if m.shared_a is not None and float(m.shared_tasks[t]):
            a = torch.cat([a, m.shared_a.detach()])
            b = torch.cat([b, m.shared_b.detach() * (m.shared_scaling / s)], dim=1)
            r += m.shared_rank
        if r != r0:
            rank_pattern[mod] = r
        if not math.isclose(lora_scale(alpha0, r, rs), s, rel_tol=1e-12):
            alpha_pattern[mod] = s * (math.sqrt(r) if rs else r)
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = b.contiguous()
        targets.append(mod)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or cfg.base_model,
        "r": r0,
        "lora_alpha": int(alpha0) if float(alpha0).is_integer() else alpha0,
        "use_rslora": rs,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if cfg.layers is not None:
        # PEFT's layers_to_transform: the decoder layers that carry the adapter
        found = layer_of(targets[0])
        config["layers_to_transform"] = list(cfg.layers)
        config["layers_pattern"] = found[0] if found else None
    os.makedirs(path, exist_ok=True)
    save_file(
        tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt", "mftk_task": name}
    )
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(adapter config, {module: {"A": (r, D_in), "B": (D_out, r)}}) of a PEFT LoRA folder."""
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"path: {p} not found (expected a PEFT LoRA folder)")
    with open(cfg_path) as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"path: {cfg_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"path: {cfg_path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"path: peft_type {config.get('peft_type')!r} is not supported, only 'LORA'"
        )
    for key, fine in _UNSUPPORTED.items():
        if key in config and config[key] not in fine:
            raise ValueError(f"path: adapter_config {key}={config[key]!r} is not supported by mftk")
    if config.get("init_lora_weights") not in (True, False, None, "gaussian"):
        # PiSSA/OLoRA/... folders store weights relative to a changed base; refuse them.
        raise ValueError(
            f"path: init_lora_weights={config['init_lora_weights']!r} is not supported"
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in load_file(w_path).items():
        m = _KEY.match(k)
        if m is None:
            raise ValueError(
                f"path: unexpected tensor {k!r} in {WEIGHTS_NAME} (only lora_A/lora_B)"
            )
        modules.setdefault(m.group(1), {})[m.group(2)] = v
    for mod, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"module {mod!r}: the PEFT adapter has lora_{''.join(ab)} but not both"
            )
    return config, modules


def import_peft(model: nn.Module, task: str | int, path: str | os.PathLike) -> None:
    """Load a PEFT LoRA folder into one task slot of a patched model.

    Each module's A (r, D_in) and B (D_out, r) go into lora_a[t, :r] and lora_b[t, :, :r] (zero
    padded up to the module's rank R, which is exact); scaling comes from lora_alpha / r (or
    sqrt(r)), with alpha_pattern applied. Patched modules the adapter does not touch get a zero
    adapter for this task. Raises ValueError naming the module when the adapter has a module that
    is not patched, a rank above R, or shapes that do not match. In a hybrid model the task stops
    using the shared adapter: the imported LoRA is all of it, as in PEFT.
    """
    model = unwrap(model)
    t, name = _task(model, task)
    config, modules = read_peft(path)
    layers = dict(adapter_layers(model))
    r0 = _positive(config, "r", 8, integer=True)
    alpha0 = float(_positive(config, "lora_alpha", 8, integer=False))
    rs = config.get("use_rslora", False)
    if not isinstance(rs, bool):
        raise ValueError(f"adapter_config.json: use_rslora must be true or false, got {rs!r}")
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise ValueError(
            f"adapter_config.json: alpha_pattern must be an object, got {alpha_pattern!r}"
        )
    for k, v in alpha_pattern.items():
        _pattern_matcher("alpha_pattern", k)
        _positive({k: v}, k, None, integer=False)
    plan = {}
    for mod, ab in modules.items():
        m = layers.get(mod)
        if m is None:
            raise ValueError(
                f"module {mod!r}: in the PEFT adapter at {path} but not patched by mftk "
                f"(patch it via target_modules)"
            )
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise ValueError(
                f"module {mod!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not "
                "(r, D_in) / (D_out, r) with r >= 1"
            )
        r = a.shape[0]
        if r > m.rank:
            raise ValueError(
                f"module {mod!r}: PEFT rank {r} exceeds the mftk rank {m.rank}; "
                f"patch with rank >= {r}"
            )
        if a.shape[1] != m.in_features or b.shape[0] != m.out_features:
            raise ValueError(
                f"module {mod!r}: PEFT shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                f"the layer ({m.out_features} x {m.in_features})"
            )
        alpha = _pattern_value(alpha_pattern, mod, alpha0, "alpha_pattern")
        plan[mod] = (a, b, lora_scale(float(alpha), r, rs))
    with torch.no_grad():
        for mod, m in layers.items():
            m.lora_a[t].zero_()
            m.lora_b[t].zero_()
            if m.shared_tasks is not None:  # hybrid: the imported LoRA is the whole task
                m.shared_tasks[t] = 0
            if mod in plan:
                a, b, s = plan[mod]
                r = a.shape[0]
                m.lora_a[t, :r].copy_(a)
                m.lora_b[t, :, :r].copy_(b)
                m.lora_scaling[t] = s
                m.lora_rank[t] = r
            else:
                m.lora_scaling[t] = lora_scale(alpha0, r0, rs)
                m.lora_rank[t] = min(r0, m.rank)
    get_config(model).task_adapters[name] = {"r": r0, "lora_alpha": alpha0, "use_rslora": rs}
