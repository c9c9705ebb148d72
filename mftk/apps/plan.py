"""The `mftk plan` command line: flags, options, and run (mftk/cli.py's subcommand protocol)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from mftk.plan.memory import GPUS, PlanOptions
from mftk.plan.model import SHIPPED
from mftk.plan.report import format_plan, make_plan

# ------------------------------------------------------------------------------------------ CLI


def _int_at_least_1(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _fraction(text: str) -> float:
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `mftk plan` (see the module docstring for the model behind the numbers)."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"a shipped config ({', '.join(sorted(set(SHIPPED)))}) or a path to an HF "
        "config.json (or its folder); built on the meta device, nothing downloaded",
    )
    parser.add_argument("--gpus", type=_int_at_least_1, default=1, help="GPUs (FSDP2 ranks)")
    parser.add_argument(
        "--gpu-mem-gb",
        type=_positive_float,
        default=None,
        help="memory per GPU in GiB as the card is sold (40, 80; default: the GPU's)",
    )
    parser.add_argument(
        "--gpu", default="a100", choices=sorted(GPUS), help="GPU type (peak TFLOP/s)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=_positive_float,
        default=None,
        help="override the GPU's dense bf16 peak",
    )
    parser.add_argument("--seq-len", type=_int_at_least_1, default=4096)
    parser.add_argument("--micro-batch", type=_int_at_least_1, default=1, help="sequences per GPU")
    parser.add_argument("--grad-accum", type=_int_at_least_1, default=1)
    parser.add_argument("--rank", type=_int_at_least_1, default=16)
    parser.add_argument("--tasks", type=_int_at_least_1, default=4, help="adapters (one per task)")
    parser.add_argument(
        "--router", action="store_true", help="soft routing: a softmax router per linear"
    )
    parser.add_argument(
        "--quantize", choices=("nf4", "fp4"), default=None, help="4-bit base (QLoRA)"
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="4-bit without double quantization of the absmax constants",
    )
    parser.add_argument(
        "--no-activation-checkpointing", dest="activation_checkpointing", action="store_false"
    )
    parser.add_argument(
        "--attention",
        choices=("flash", "sdpa"),
        default="flash",
        help="flash: flash-attn 2 varlen; sdpa: packed sequences with a mask",
    )
    parser.add_argument(
        "--mfu",
        type=_fraction,
        default=0.4,
        help="achieved fraction of peak on executed FLOPs (default 0.4)",
    )
    parser.add_argument(
        "--headroom",
        type=_fraction,
        default=0.10,
        help="allocator headroom as a fraction of the peak (default 0.10)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    mem = args.gpu_mem_gb if args.gpu_mem_gb is not None else GPUS[args.gpu].mem_gib
    return PlanOptions(
        gpus=args.gpus, gpu_mem_gib=mem, seq_len=args.seq_len, micro_batch=args.micro_batch,
        rank=args.rank, tasks=args.tasks, router=args.router, quantize=args.quantize,
        double_quant=args.double_quant, activation_checkpointing=args.activation_checkpointing,
        attention=args.attention, mfu=args.mfu, gpu=args.gpu, peak_tflops=args.peak_tflops,
        grad_accum=args.grad_accum, headroom=args.headroom,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        p = make_plan(args.model, options_from_args(args))
    except ValueError as err:
        print(f"mftk plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
