"""Loads the compiled op library mftk._C, which defines the mftk:: schemas and CPU kernels."""

from __future__ import annotations

try:
    import mftk._C  # noqa: F401  (registers torch.ops.mftk.*)

    HAS_CPU_OPS = True
except ImportError:  # not built: only backend="reference" (and triton) are available
    HAS_CPU_OPS = False


def has_cpu_ops() -> bool:
    return HAS_CPU_OPS


def require_cpu_ops() -> None:
    if not HAS_CPU_OPS:
        raise RuntimeError(
            "mftk._C is not built: install with `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler and ninja), or pass backend='reference'"
        )
