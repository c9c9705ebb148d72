"""A tour of the op: hard routing, soft routing, the routing plan and the backends.

python examples/op_demo.py
"""

import torch

import mftk
from mftk.ops.reference import multi_adapter_linear_ref

torch.manual_seed(0)
N, D_IN, D_OUT, T, R = 12, 64, 32, 3, 8
x = torch.randn(N, D_IN, requires_grad=True)
weight = torch.randn(D_OUT, D_IN) / D_IN**0.5  # frozen base
lora_a = (torch.randn(T, R, D_IN) / D_IN**0.5).requires_grad_()
lora_b = (torch.randn(T, D_OUT, R) / R**0.5).requires_grad_()
task_ids = torch.tensor([0, 2, 1, -1, 0, 0, 2, 1, 1, -1, 2, 0])  # -1: base only

# Hard routing: every token through its own task's adapter. The plan is built once per batch and
# can be passed to every layer instead of the ids.
plan = mftk.build_plan(task_ids, T)
print("tokens per task:", plan.counts().tolist(), "base-only:", N - int(plan.offsets[-1]))
y = mftk.multi_adapter_linear(x, weight, lora_a, lora_b, scaling=2.0, task_ids=plan)
y.square().mean().backward()
ref, _ = multi_adapter_linear_ref(
    x.double(), weight.double(), lora_a.double(), lora_b.double(), None, 2.0, task_ids
)
err = (y.double() - ref).abs().max()
print(f"hard: y {tuple(y.shape)}, max |y - float64 reference| = {err:.2e}")
print(f"      grad_lora_a {tuple(lora_a.grad.shape)}: a task's tokens reach only its adapter")

# Soft routing: a learned softmax router blends the adapters (top-2 of 3 here) and returns its
# logits so a trainer can add router losses.
router = torch.randn(T, D_IN, requires_grad=True)
y, logits = mftk.multi_adapter_linear(
    x, weight, lora_a, lora_b, router_weight=router, top_k=2, return_router_logits=True
)
print(
    f"soft: y {tuple(y.shape)}, router logits {tuple(logits.shape)}, argmax route",
    logits.argmax(-1).tolist(),
)

for backend in ("cpu", "reference"):
    out = mftk.multi_adapter_linear(x, weight, lora_a, lora_b, task_ids=task_ids, backend=backend)
    print(f"backend={backend!r}: sum {out.sum().item():.6f}")
