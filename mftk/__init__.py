"""mftk: multi-task fine-tuning kernels. One LoRA adapter per task, routed per token."""

import os
import sys

if "torch" not in sys.modules:
    # Idle OpenMP threads that spin between parallel regions steal the cores the working threads
    # need when the CPU is shared: the CPU ops ran 2-4x slower on a loaded 2-core machine with
    # libgomp's default, at par with PASSIVE when idle. libgomp reads this once, when torch loads;
    # a value set by the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402, F401  (loads libtorch before mftk._C)

from mftk.checkpoint import from_pretrained, load_adapters, save_adapters
from mftk.core import MftkConfig, task_index, task_names
from mftk.nn import MultiAdapterLinear
from mftk.ops import RoutingPlan, build_plan, multi_adapter_linear, set_debug
from mftk.patch import adapter_parameters, adapter_state_dict, merge, patch_model, unmerge
from mftk.peft_io import export_peft, import_peft
from mftk.pyramid import add_task
from mftk.route import BaseOnly, Hard, Route, RouterLogits, Soft
from mftk.routing import RoutingState, clear_default_tasks, set_default_tasks, use_tasks
from mftk.spec import AdapterSpec, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "RoutingPlan",
    "build_plan",
    "multi_adapter_linear",
    "set_debug",
    "MultiAdapterLinear",
    "MftkConfig",
    "adapter_parameters",
    "adapter_state_dict",
    "merge",
    "patch_model",
    "task_index",
    "task_names",
    "unmerge",
    "RoutingState",
    "Route",
    "Hard",
    "Soft",
    "BaseOnly",
    "RouterLogits",
    "AdapterSpec",
    "QuantSpec",
    "clear_default_tasks",
    "set_default_tasks",
    "use_tasks",
    "export_peft",
    "import_peft",
    "add_task",
    "from_pretrained",
    "load_adapters",
    "save_adapters",
]
