"""One description of the adapters, validated once: `AdapterSpec` (and `QuantSpec` for a 4-bit
base). The train config's `adapter:` section, `patch_model`, `MultiAdapterLinear`, the checkpoint
(`MftkConfig.spec()`) and `from_pretrained` all build or read this one object, so a setting is
spelled and checked in one place.

    spec = AdapterSpec(rank={"code": 16, "sql": 8}, alpha=32, router="softmax", top_k=1)
    mftk.patch_model(model, ["code", "sql"], spec=spec)

Errors name the setting (`rank: ...`, `top_k: ...`) and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ROUTERS = (None, "softmax")
MODES = ("per_task", "hybrid")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
BLOCKSIZE = 64  # bitsandbytes' default 4-bit block (QLoRA's)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rsLoRA (PEFT's convention)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def compute_dtype_of(value: torch.dtype | str | None) -> torch.dtype | None:
    """A 4-bit matmul dtype from a torch dtype or a name ("bf16", "bfloat16", ...)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype: expected one of {sorted(COMPUTE_DTYPES)}, got {value!r}"
            )
        return COMPUTE_DTYPES[value]
    if value not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype: expected float32, bfloat16 or float16, got {value!r}")
    return value


@dataclass(frozen=True)
class QuantSpec:
    """A frozen 4-bit base (QLoRA, bitsandbytes): quant_type "nf4" | "fp4"; double_quant (8-bit
    absmax constants); compute_dtype (the matmul's dtype); all_linear (also the linears without
    adapters, never lm_head); blocksize (elements per absmax)."""

    quant_type: str
    double_quant: bool = True
    compute_dtype: torch.dtype | None = torch.bfloat16
    all_linear: bool = False
    blocksize: int = BLOCKSIZE

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"quantize: expected one of {QUANT_TYPES} or None, got {self.quant_type!r}"
            )
        if not isinstance(self.double_quant, bool):
            raise TypeError(
                f"double_quant: expected a bool, got {type(self.double_quant).__name__}"
            )
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"blocksize: expected a power of two in [64, 4096], got {self.blocksize!r}"
            )
        if not isinstance(self.all_linear, bool):
            raise TypeError(
                f"quantize_all_linear: expected a bool, got {type(self.all_linear).__name__}"
            )
        object.__setattr__(self, "compute_dtype", compute_dtype_of(self.compute_dtype))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form kept in MftkConfig.quantize (and the checkpoint)."""
        dt = None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": dt,
            "quantize_all_linear": self.all_linear,
            "blocksize": self.blocksize,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        return cls(
            quant_type=d["quant_type"],
            double_quant=d.get("double_quant", True),
            compute_dtype=d.get("compute_dtype", "bfloat16"),
            all_linear=d.get("quantize_all_linear", False),
            blocksize=d.get("blocksize", BLOCKSIZE),
        )


RankSpec = int | Mapping[str, int] | Sequence[int]


@dataclass(frozen=True)
class AdapterSpec:
    """What every patched layer carries, for T tasks.

    rank: an int (every task), or per task a {task: rank} dict / a list in task order (padded to
    R = max rank; see mftk.pyramid). alpha: the LoRA alpha (None: alpha = rank, scaling 1; with
    mixed ranks alpha = r_t per task). use_rslora: scaling alpha / sqrt(r). dropout: LoRA dropout
    on the adapters' input, in [0, 1). router: None (hard routing by task ids) or "softmax"
    (a learned router over the T adapters), with top_k (None: all T) and temperature.
    quantize: a QuantSpec for a 4-bit base, or None.
    mode: "per_task" (one adapter per task) or "hybrid" (also one shared adapter on every routed
    token, rank shared_rank (default: the largest task rank) and shared_alpha (default: its rank);
    see mftk.multi_adapter_linear's shared_* arguments).
    """

    rank: RankSpec = 8
    alpha: float | None = None
    use_rslora: bool = False
    dropout: float = 0.0
    router: str | None = None
    top_k: int | None = None
    temperature: float = 1.0
    quantize: QuantSpec | None = field(default=None)
    mode: str = "per_task"
    shared_rank: int | None = None
    shared_alpha: float | None = None

    def __post_init__(self) -> None:
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, Mapping, Sequence)) or isinstance(r, str):
            raise TypeError(f"rank: expected an int, a dict or a list, got {r!r}")
        ranks = list(r.values()) if isinstance(r, Mapping) else [r] if _is_int(r) else list(r)
        for v in ranks:
            if not _is_int(v) or v < 1:
                raise ValueError(f"rank: each rank must be a positive int, got {v!r}")
        if isinstance(r, Mapping):
            object.__setattr__(self, "rank", dict(r))
        elif not _is_int(r):
            object.__setattr__(self, "rank", tuple(r))
        if self.router not in ROUTERS:
            raise ValueError(f"router: expected one of {ROUTERS}, got {self.router!r}")
        if self.top_k is not None:
            if self.router is None:
                raise ValueError("top_k: only meaningful with router='softmax'")
            if not _is_int(self.top_k) or self.top_k < 1:
                raise ValueError(f"top_k: expected a positive int, got {self.top_k!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"temperature: expected a positive float, got {t!r}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {d!r}")
        a = self.alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0):
            raise ValueError(f"alpha: expected a positive number, got {a!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora: expected a bool, got {self.use_rslora!r}")
        if self.quantize is not None and not isinstance(self.quantize, QuantSpec):
            raise TypeError(f"quantize: expected a QuantSpec or None, got {self.quantize!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        sr, sa = self.shared_rank, self.shared_alpha
        if self.mode == "per_task" and (sr is not None or sa is not None):
            raise ValueError("shared_rank / shared_alpha: only meaningful with mode='hybrid'")
        if sr is not None and (not _is_int(sr) or sr < 1):
            raise ValueError(f"shared_rank: expected a positive int, got {sr!r}")
        if sa is not None and (isinstance(sa, bool) or not isinstance(sa, (int, float)) or sa <= 0):
            raise ValueError(f"shared_alpha: expected a positive number, got {sa!r}")
        if self.mode == "hybrid" and sr is None:
            object.__setattr__(self, "shared_rank", max(ranks))
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "dropout", float(d))
        if a is not None:
            object.__setattr__(self, "alpha", float(a))

    def check_tasks(self, num_tasks: int) -> None:
        """The checks that need T: top_k <= T."""
        if not _is_int(num_tasks) or num_tasks < 1:
            raise ValueError(f"num_tasks: expected a positive int, got {num_tasks!r}")
        if self.top_k is not None and self.top_k > num_tasks:
            raise ValueError(
                f"top_k: expected an int in [1, num_tasks={num_tasks}], got {self.top_k!r}"
            )

    def ranks(self, tasks: Sequence[str]) -> list[int]:
        """Per-task ranks (T,), in task order."""
        r = self.rank
        if _is_int(r):
            return [r] * len(tasks)
        if isinstance(r, Mapping):
            missing = [t for t in tasks if t not in r]
            extra = [k for k in r if k not in tasks]
            if missing or extra:
                raise ValueError(
                    f"rank: dict must name every task; missing {missing}, unknown {extra}"
                )
            return [r[t] for t in tasks]
        if len(r) != len(tasks):
            raise ValueError(f"rank: {len(r)} ranks for {len(tasks)} tasks")
        return list(r)

    def alphas(self, ranks: Sequence[int]) -> list[float]:
        """Per-task alpha: the spec's alpha, or each task's rank when alpha is None."""
        return [float(self.alpha if self.alpha is not None else r) for r in ranks]

    def layer_kwargs(self) -> dict[str, Any]:
        """The MultiAdapterLinear keywords besides rank and alpha."""
        return {
            "router": self.router,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "shared_rank": self.shared_rank if self.mode == "hybrid" else 0,
            "shared_alpha": self.shared_alpha,
        }
