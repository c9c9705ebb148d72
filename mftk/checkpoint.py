"""mftk's own multi-task adapter checkpoint: every task in one safetensors file, no pickle.

<dir>/mftk_adapters.safetensors   adapter_state_dict(model): per patched module
                                  lora_a (T, R, D_in), lora_b (T, D_out, R), lora_scaling (T,)
                                  float64, lora_rank (T,) int64, router_weight/bias if any;
                                  per-task heads as heads.<task>.weight (C, H) / .bias (C,);
                                  a segment router as segment_router.weight (T, H) / .bias (T,) /
                                  .query (H,)
<dir>/mftk_config.json            MftkConfig: task names, rank, alpha, target modules, router
                                  settings, base model name, per-task LoRA settings
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mftk.core import MftkConfig, get_config, unwrap
from mftk.heads import ensure_heads, head_state_dict
from mftk.patch import adapter_state_dict, patch_model
from mftk.segment_router import add_segment_router, segment_router_state_dict

WEIGHTS_NAME = "mftk_adapters.safetensors"
CONFIG_NAME = "mftk_config.json"
FORMAT = "mftk-adapters-v1"


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every task's adapters and the mftk config of a patched model into folder `path`.

    Files are written to temporary names and renamed, so a crash never leaves half a checkpoint.
    """
    cfg = get_config(model)

    state = {**adapter_state_dict(model), **head_state_dict(model)}
    state.update(segment_router_state_dict(model))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    os.makedirs(path, exist_ok=True)
    cfg_json = json.dumps({"format": FORMAT, **cfg.to_dict()}, indent=2)
    w_path, c_path = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    save_file(tensors, w_path + ".tmp", metadata={"format": FORMAT, "mftk_config": cfg_json})
    with open(c_path + ".tmp", "w") as f:
        f.write(cfg_json)
    os.replace(w_path + ".tmp", w_path)
    os.replace(c_path + ".tmp", c_path)


def read_config(path: str | os.PathLike) -> MftkConfig:
    """The MftkConfig stored in checkpoint folder `path`."""
    c_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(c_path):
        raise FileNotFoundError(f"path: {c_path} not found (expected an mftk adapter folder)")
    with open(c_path) as f:
        d = json.load(f)
    if d.pop("format", None) != FORMAT:
        raise ValueError(f"path: {c_path} is not an {FORMAT} config")
    return MftkConfig.from_dict(d)


_SETTINGS = (
    "rank", "router", "top_k", "target_modules", "layers", "mode", "shared_rank", "shared_alpha",
)  # fmt: skip


def load_adapters(model: nn.Module, path: str | os.PathLike, grow: bool = False) -> nn.Module:
    """Load a save_adapters folder into a model patched with the same tasks, rank, router and
    target modules. Raises ValueError naming the first mismatch. Returns the model.

    grow=True: the model may have more tasks (the checkpoint's task list is a prefix of the
    model's) and a larger rank R; the checkpoint fills the first tasks' slots, [:T_old, :R_old],
    and the other tasks keep their values (see mftk.add_task; the trainer's resume with new tasks).
    """
    model = unwrap(model)
    cfg, saved = get_config(model), read_config(path)
    n_old = len(saved.tasks)
    grown = grow and cfg.tasks[:n_old] == saved.tasks and len(cfg.tasks) > n_old
    if cfg.tasks != saved.tasks and not grown:
        raise ValueError(
            f"path: checkpoint tasks {saved.tasks} differ from the model's {cfg.tasks}"
            + (" (grow=True needs them as the model's first tasks)" if grow else "")
        )
    if grown and saved.rank > cfg.rank:
        raise ValueError(f"path: checkpoint rank {saved.rank} exceeds the model's {cfg.rank}")
    for k in _SETTINGS:
        if grown and k == "rank":
            continue
        if getattr(cfg, k) != getattr(saved, k):
            raise ValueError(
                f"path: checkpoint {k}={getattr(saved, k)!r} differs from the model's "
                f"{getattr(cfg, k)!r}"
            )

    own = adapter_state_dict(model)
    with safe_open(os.path.join(path, WEIGHTS_NAME), framework="pt") as f:
        keys = {k for k in f.keys() if not k.startswith(("heads.", "segment_router."))}
        _load_segment_router(model, saved, f)
        if saved.heads:  # heads saved with the adapters: create the missing ones, then load
            ensure_heads(model, saved.heads)
            for k, v in head_state_dict(model).items():
                if k.split(".")[1] in saved.heads:
                    with torch.no_grad():
                        v.copy_(f.get_tensor(k))
        missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
        if missing or unexpected:
            raise ValueError(
                f"path: checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        loaded = {k: f.get_tensor(k) for k in own}
    for k, v in loaded.items():
        if grown and v.dim() == own[k].dim() and all(a <= b for a, b in zip(v.shape, own[k].shape)):
            continue  # a prefix block of the grown tensor
        if v.shape != own[k].shape:
            raise ValueError(
                f"module {k.rsplit('.', 1)[0]!r}: {k} has shape {tuple(v.shape)} in the file, "
                f"{tuple(own[k].shape)} in the model"
            )
    with torch.no_grad():
        for k, v in loaded.items():
            own[k][tuple(slice(0, n) for n in v.shape)].copy_(v)
    if grown:  # the model's config already describes every task; update the old ones
        cfg.task_adapters.update(saved.task_adapters)
        return model
    cfg.task_adapters = dict(saved.task_adapters)
    cfg.ranks = saved.ranks
    return model


def _load_segment_router(model: nn.Module, saved: MftkConfig, f: Any) -> None:
    """The saved segment router (created on the model if missing) from safetensors file f."""
    if saved.segment_router is None:
        return
    have = get_config(model).segment_router
    if have is None:
        add_segment_router(model, saved.segment_router)
    elif have != saved.segment_router:
        raise ValueError(
            f"path: checkpoint segment_router={saved.segment_router} differs from the model's "
            f"{have}"
        )
    with torch.no_grad():
        for k, v in segment_router_state_dict(model).items():
            if k == "segment_router.query" and k not in f.keys():
                v.zero_()  # saved before the router learned its pooling: the plain mean
                continue
            v.copy_(f.get_tensor(k))


def from_pretrained(model: nn.Module, path: str | os.PathLike, quantize: bool = True) -> nn.Module:
    """Patch a base model as the checkpoint in `path` says, then load its adapters.

    model: the (unpatched) base model the adapters were trained on. Returns it, patched.
    A checkpoint trained over a 4-bit base (QLoRA) quantizes model's base the same way, unless
    quantize=False: then the adapters go on the full-precision base as it is.
    """
    c = read_config(path)
    spec = c.spec(quantize=quantize)
    patch_model(model, c.tasks, target_modules=c.target_modules, layers=c.layers, spec=spec)
    return load_adapters(model, path)
