"""mftk: multi-task fine-tuning kernels. One LoRA adapter per task, routed per token."""

import torch  # noqa: F401  (loads libtorch before mftk._C)

from mftk.ops import RoutingPlan, build_plan, multi_adapter_linear, set_debug

__version__ = "0.1.0"

__all__ = ["RoutingPlan", "build_plan", "multi_adapter_linear", "set_debug"]
