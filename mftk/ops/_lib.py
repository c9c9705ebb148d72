"""Loads the compiled op library mftk._C, which defines the mftk:: schemas and CPU kernels."""

from __future__ import annotations

import functools


@functools.cache
def has_cpu_ops() -> bool:
    try:
        import mftk._C  # noqa: F401  (registers torch.ops.mftk.*)
    except ImportError:
        return False
    return True


def require_cpu_ops() -> None:
    if not has_cpu_ops():
        raise RuntimeError(
            "mftk._C is not built: install with `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler and ninja), or pass backend='reference'"
        )
