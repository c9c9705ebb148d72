"""Bad input to the op raises a clear ValueError/TypeError that names the argument."""

import pytest
import torch
from op_cases import make_case

import mftk


@pytest.fixture
def args():
    c = make_case(10, 16, 8, 3, 4, "hard", torch.float32)
    return dict(x=c.x, weight=c.weight, lora_a=c.lora_a, lora_b=c.lora_b, task_ids=c.task_ids)


def call(args, **over):
    a = {**args, **over}
    return mftk.multi_adapter_linear(
        a.pop("x"), a.pop("weight"), a.pop("lora_a"), a.pop("lora_b"), **a
    )


@pytest.mark.parametrize(
    "over,err,name",
    [
        (dict(task_ids=torch.full((10,), 3)), ValueError, "task_ids"),
        (dict(task_ids=torch.full((10,), -2)), ValueError, "task_ids"),
        (dict(task_ids=torch.zeros(9, dtype=torch.long)), ValueError, "task_ids"),
        (dict(task_ids=torch.zeros(10)), TypeError, "task_ids"),
        (dict(weight=torch.randn(8, 15)), ValueError, "x"),
        (dict(lora_a=torch.randn(3, 4, 15)), ValueError, "lora_a"),
        (dict(lora_b=torch.randn(3, 8, 5)), ValueError, "lora_b"),
        (dict(lora_b=torch.randn(2, 8, 4)), ValueError, "lora_b"),
        (dict(lora_a=torch.randn(4, 16)), ValueError, "lora_a"),
        (dict(bias=torch.randn(7)), ValueError, "bias"),
        (dict(weight=torch.randn(8, 16, dtype=torch.float64)), TypeError, "weight"),
        (dict(lora_b=torch.randn(3, 8, 4, dtype=torch.bfloat16)), TypeError, "lora_b"),
        (dict(x=torch.ones(10, 16, dtype=torch.long)), TypeError, "x"),
        (dict(x=[[1.0] * 16]), TypeError, "x"),
        (dict(router_weight=torch.randn(3, 16)), ValueError, "task_ids and router_weight"),
        (dict(task_ids=None, router_weight=torch.randn(2, 16)), ValueError, "router_weight"),
        (dict(task_ids=None, router_weight=torch.randn(3, 16), top_k=4), ValueError, "top_k"),
        (dict(task_ids=None, router_weight=torch.randn(3, 16), top_k=0), ValueError, "top_k"),
        (
            dict(task_ids=None, router_weight=torch.randn(3, 16), temperature=0.0),
            ValueError,
            "temperature",
        ),
        (dict(task_ids=None, router_bias=torch.randn(3)), ValueError, "router_bias"),
        (dict(return_router_logits=True), ValueError, "return_router_logits"),
        (dict(scaling=torch.ones(2)), ValueError, "scaling"),
        (dict(scaling="2"), TypeError, "scaling"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input_names_argument(args, over, err, name):
    with pytest.raises(err, match=name):
        call(args, **over)


def test_plan_for_other_task_count(args):
    plan = mftk.build_plan(args["task_ids"], 4)
    with pytest.raises(ValueError, match="task_ids"):
        call(args, task_ids=plan)


def test_debug_checks_non_finite(args):
    x = args["x"].detach().clone()
    x[3, 2] = float("nan")
    call(args, x=x)  # off by default: no sync, NaN propagates
    mftk.set_debug(True)
    try:
        with pytest.raises(ValueError, match="x: contains NaN"):
            call(args, x=x)
        a = args["lora_a"].detach().clone()
        a[0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="lora_a"):
            call(args, lora_a=a)
    finally:
        mftk.set_debug(False)


def test_empty_batch_and_empty_ids_are_valid():
    c = make_case(0, 16, 8, 3, 4, "hard", torch.float32)
    y = mftk.multi_adapter_linear(c.x, c.weight, c.lora_a, c.lora_b, task_ids=c.task_ids)
    assert y.shape == (0, 8)


def test_build_plan_bad_num_tasks():
    with pytest.raises(ValueError, match="num_tasks"):
        mftk.build_plan(torch.zeros(3, dtype=torch.long), 0)
