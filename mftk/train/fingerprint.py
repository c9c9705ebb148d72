"""A run's fingerprint: the config settings that shape its loss curve, kept in every checkpoint so
that --resume can name what changed, and can tell a setting a newer mftk added (absent from the
checkpoint, at its default here) from one the user changed."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from typing import Any

from mftk.train.config import Config


def _settings(cfg: Config, world: int) -> dict[str, Any]:
    if world != 1:
        cfg = copy.deepcopy(cfg)
        cfg.train.batch_size *= world
    d = cfg.to_dict()
    for k in ("output", "base_dir", "distributed"):
        d.pop(k)
    for k in ("log_every", "threads", "device"):
        d["train"].pop(k)
    return d


def run_fingerprint(cfg: Config, world: int = 1) -> dict[str, Any]:
    """Everything that shapes the loss curve (not output, logging, threads), as JSON data, for a
    run on `world` processes: that of the one-process run with the same global batch
    (train.batch_size × world), so a checkpoint resumes on any number of ranks."""
    return json.loads(json.dumps(_settings(cfg, world), sort_keys=True, default=str))


def run_key(cfg: Config, world: int = 1) -> str:
    """A 16-hex-digit hash of the fingerprint (the text earlier checkpoints hashed, unchanged)."""
    text = json.dumps(_settings(cfg, world), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """["adapter.rank: 8 -> 16", ...]: where fingerprint `new` differs from `old` (a checkpoint's).
    A setting `old` lacks counts only when `new` has it off its default (a newer mftk added it,
    and its default keeps the old behaviour); a setting `new` lacks (since removed) is skipped."""
    out: list[str] = []
    _diff(old, new, Config, "", out)
    return out


def _diff(old: Any, new: Any, tp: Any, path: str, out: list[str]) -> None:
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(old, dict) and isinstance(new, dict):
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for key, value in new.items():
            where = f"{path}.{key}" if path else key
            if key in old:
                _diff(old[key], value, hints.get(key, Any), where, out)
            elif key not in fields or value != _default(fields[key]):
                out.append(f"{where}: (not in the checkpoint) -> {_show(value)}")
        return
    if typing.get_origin(tp) is list and isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            (item,) = typing.get_args(tp) or (Any,)
            for i, (a, b) in enumerate(zip(old, new)):
                _diff(a, b, item, f"{path}[{i}]", out)
            return
    if old != new:
        out.append(f"{path}: {_show(old)} -> {_show(new)}")


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else Any
    return tp


def _default(f: dataclasses.Field) -> Any:
    """The field's default as run_fingerprint writes it (JSON data); a sentinel if it has none."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return _NO_DEFAULT
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


_NO_DEFAULT = object()


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
