"""The benchmark baselines compute what mftk computes: every provider of benchmarks/providers.py,
on a small shape, against the float64 reference (the benchmarks check the same before timing)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from providers import PROVIDERS, Shape, check_provider, make_inputs  # noqa: E402

SMALL = Shape(96, 48, 40, 4, 8)
CASES = [(r, d, p) for r in ("hard", "soft") for d in ("fwd", "fwd+bwd") for p in PROVIDERS[r]]


@pytest.mark.parametrize("routing,direction,provider", CASES)
def test_provider_computes_the_reference(routing, direction, provider):
    if provider == "peft":
        pytest.importorskip("peft")
    check_provider(provider, routing, direction, make_inputs(SMALL), SMALL)


def test_check_catches_a_wrong_baseline(monkeypatch):
    """A grouped_mm baseline that forgets the bias is caught before it is timed."""
    import providers

    inp = make_inputs(SMALL)
    real = providers.grouped_mm_hard
    monkeypatch.setattr(
        providers, "grouped_mm_hard", lambda x, w, a, b, bias, *r: real(x, w, a, b, None, *r)
    )
    with pytest.raises(AssertionError, match="grouped_mm hard fwd: max err"):
        check_provider("grouped_mm", "hard", "fwd", inp, SMALL)
