"""The pure metrics of `mftk eval`: pass@k, router hits, execution-checked problems and
completion truncation (mftk.apps.evaluate runs them on a trained model)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

# generation stops at the next top-level statement (HumanEval's stop sequences)
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids huge binomials."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def router_hits(
    router_logits: list[Tensor], task_ids: Tensor, num_tasks: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per task: how often a layer's argmax route is the token's task.

    router_logits: per layer (N, T) (or (..., T) over the same N tokens); task_ids: (N,) or
    (B, S), -1 = unlabelled (skipped); mask: same shape as task_ids, True = count this token.
    returns (correct (T,), total (T,)) float64, summed over layers: accuracy = correct / total.
    """
    ids = task_ids.reshape(-1)
    keep = ids >= 0
    if mask is not None:
        keep = keep & mask.reshape(-1).to(torch.bool)
    ids = ids[keep]
    correct = torch.zeros(num_tasks, dtype=torch.float64)
    total = torch.zeros(num_tasks, dtype=torch.float64)
    for z in router_logits:
        if z.shape[-1] != num_tasks:
            raise ValueError(f"router_logits: expected {num_tasks} routes, got {z.shape[-1]}")
        top = z.reshape(-1, num_tasks)[keep].argmax(-1)
        total += torch.bincount(ids, minlength=num_tasks).double().cpu()
        correct += torch.bincount(ids[top == ids], minlength=num_tasks).double().cpu()
    return correct, total


def load_problems(path: str) -> list[dict[str, Any]]:
    """Execution-checked problems: one JSON object per line with str fields task_id, prompt,
    tests (asserts run after prompt + completion)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            for key in ("task_id", "prompt", "tests"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"{path}:{lineno}: needs a string '{key}'")
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def truncate_completion(text: str) -> str:
    """The completion up to the first top-level statement after it (see STOP_SEQUENCES)."""
    cut = len(text)
    for s in STOP_SEQUENCES:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
