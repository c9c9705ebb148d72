"""Triton kernels of mftk, installed as mftk.kernels (never `import kernels`: that name belongs to
another PyPI package). They import triton and torch only; mftk/ops/triton_ops.py launches them.

  grouped_gemm  rows of y / S / dx over tokens grouped by task, base + adapter + router K ranges
  soft          soft routing: one-pass shrink + router softmax forward, dH + softmax backward
  hard_bwd      hard routing dS with dB fused
  reduce        per-task reductions over tokens (dA, dB, dRouter), atomic or fixed-order
"""
