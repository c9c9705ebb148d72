"""Custom ops (torch.library mftk::*), their autograd, and the routing plan. No nn.Module here."""

from mftk.ops.checks import set_debug
from mftk.ops.functional import multi_adapter_linear
from mftk.ops.plan import RoutingPlan, build_plan, check_task_ids, plan_checked

__all__ = [
    "RoutingPlan",
    "build_plan",
    "check_task_ids",
    "multi_adapter_linear",
    "plan_checked",
    "set_debug",
]
