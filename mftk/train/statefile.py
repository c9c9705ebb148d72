"""A trainer state as two files, without pickle: NAME.json (the structure) and NAME.safetensors
(its tensors). Reading one back runs no code from the files, whatever they hold.

A state is nested dicts, lists and tuples of None, bool, int, float, str and tensors. JSON lacks
some of these, so they are tagged and come back as they went in:
    {"__tensor__": "7"}                 tensor "7" of NAME.safetensors (any dtype and shape)
    {"__tuple__": [...]}                a tuple (python's RNG state)
    {"__dict__": [[key, value], ...]}   a dict whose keys are not all plain strings (an
                                        optimizer's state, keyed by parameter index)
Floats round-trip exactly (JSON numbers as repr writes them; NaN and ±inf as JSON's NaN and
Infinity, which Python's json reads and writes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TAGS = ("__tensor__", "__tuple__", "__dict__")


def _encode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(x):
        key = str(len(tensors))
        t = x.detach().cpu().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a larger storage: safetensors stores whole storages
        tensors[key] = t
        return {"__tensor__": key}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    raise TypeError(f"trainer state: cannot store a {type(x).__name__} ({x!r:.80})")


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        tag, v = next(iter(x.items()))
        if tag == "__tensor__":
            if v not in tensors:
                raise ValueError(f"tensor {v!r} is missing from the safetensors file")
            return tensors[v]
        if tag == "__tuple__":
            return tuple(_decode(i, tensors) for i in v)
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors)): _decode(val, tensors) for k, val in v}
    return {k: _decode(v, tensors) for k, v in x.items()}


def _hashable(k: Any) -> Any:
    if isinstance(k, (list, dict)) or torch.is_tensor(k):
        raise ValueError(f"a dict key must be a number, string or tuple, not {type(k).__name__}")
    return k


def write_fsynced(path: str, text: str) -> None:
    """Write text to path and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: str) -> None:
    """fsync a file or a folder (its entries: a rename inside it, a new file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(state: Any, prefix: str) -> list[str]:
    """Write state to prefix.json and prefix.safetensors (both fsynced); returns the two paths."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    st_path, js_path = prefix + ".safetensors", prefix + ".json"
    save_file(tensors, st_path)
    fsync_path(st_path)
    write_fsynced(js_path, json.dumps(tree))
    return [js_path, st_path]


def load_state(prefix: str) -> Any:
    """The state that save_state(state, prefix) wrote, its tensors on the CPU.
    ValueError: the files are not a state that save_state writes."""
    with open(prefix + ".json", encoding="utf-8") as f:
        tree = json.load(f)
    return _decode(tree, load_file(prefix + ".safetensors"))
