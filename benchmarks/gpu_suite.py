"""One-command GPU suite for mftk.multi_adapter_linear (hard and soft routing), bf16.

    python benchmarks/gpu_suite.py --out benchmarks/results/

1. correctness: every mftk strategy vs the float64 reference on the first 1024 tokens of each
   shape (|err| <= 2 |err of plain torch in bf16| + atol, as in the tests); a failure stops the run;
2. timing: triton.testing.do_bench (median of ~100 ms after warm-up, inputs rotated over 4 copies
   so that L2 holds no stale operands) of fwd, bwd (autograd.grad through a retained graph) and
   fwd+bwd, plus the peak memory of one fwd+bwd, for each provider:
     base        the frozen linear alone, cuBLAS fwd + dx (the floor)
     mftk-addmm  mftk Triton kernels, cuBLAS base + Triton adapter expand
     mftk-fused  mftk Triton kernels, adapters folded into a Triton base GEMM
     loop        the per-task loop of mftk/ops/reference.py (what PEFT/mLoRA-style code does)
     grouped_mm  torch._grouped_mm over tokens in plan order (mftk.ops.reference.grouped_mm_hard)
     dense       soft routing as plain torch GEMMs over the concatenated adapters
     peft        PEFT: one LoRA for the whole batch (fwd+bwd) and its mixed-adapter loop (fwd)
3. prints the table and writes benchmarks/results/gpu-<card>.md with card, commit and versions,
   and which mftk strategy won per shape (the input for triton_ops.STRATEGY_TABLE).

Needs a CUDA GPU; without one it exits with status 2 and says so. `--smoke` runs the same
pipeline on tiny shapes on the CPU under TRITON_INTERPRET=1 (wall-clock timer, no memory stats), to
check the script itself where there is no GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # op_cases: inputs and tolerance rule


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    d_in: int
    d_out: int
    tasks: int
    rank: int

    def flops(self, routing: str, direction: str) -> float:
        """The floor (docs/ARCHITECTURE.md): base fwd (+ dx bwd), adapters 2NR(Din+Dout) fwd, 4x
        bwd."""
        base = 2 * self.n * self.d_in * self.d_out
        lora = 2 * self.n * self.rank * (self.d_in + self.d_out)
        router = 0
        if routing == "soft":
            lora *= self.tasks
            router = 2 * self.n * self.d_in * self.tasks
        fwd, bwd = base + lora + router, base + 2 * lora + 2 * router
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


SHAPES = [
    Shape("4096x4096 R16", 8192, 4096, 4096, 8, 16),
    Shape("4096x4096 R64", 8192, 4096, 4096, 8, 64),
    Shape("ds33b qkvo 7168x7168", 8192, 7168, 7168, 8, 16),
    Shape("ds33b kv 7168x1024", 8192, 7168, 1024, 8, 16),
    Shape("ds33b up 7168x19200", 8192, 7168, 19200, 8, 16),
    Shape("ds33b down 19200x7168", 8192, 19200, 7168, 8, 16),
]
PROVIDERS = {
    "hard": ["base", "mftk-addmm", "mftk-fused", "loop", "grouped_mm", "peft"],
    "soft": ["base", "mftk-addmm", "mftk-fused", "loop", "dense"],
}
SMOKE_SHAPES = [Shape("smoke 48x40", 64, 48, 40, 3, 16)]
ROTATE = 4
DEV = "cuda"


@dataclass
class Inputs:
    xs: list  # ROTATE copies of x (N, D_in), requires grad
    grads: list  # ROTATE copies of dy (N, D_out)
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    router_weight: torch.Tensor
    task_ids: torch.Tensor
    plan: object


def make_inputs(shape: Shape, dtype: torch.dtype) -> Inputs:
    import mftk

    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*size, scale=1.0, grad=False):
        t = torch.randn(*size, generator=g, device=dev, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    n, di, do, t, r = shape.n, shape.d_in, shape.d_out, shape.tasks, shape.rank
    ids = torch.randint(-1, t, (n,), generator=g, device=dev)  # unsorted, ~1/(T+1) base-only
    return Inputs(
        xs=[rnd(n, di, grad=True) for _ in range(ROTATE)],
        grads=[rnd(n, do) for _ in range(ROTATE)],
        weight=rnd(do, di, scale=di**-0.5),
        bias=rnd(do),
        lora_a=rnd(t, r, di, scale=di**-0.5, grad=True),
        lora_b=rnd(t, do, r, scale=r**-0.5, grad=True),
        router_weight=rnd(t, di, scale=di**-0.5, grad=True),
        task_ids=ids,
        plan=mftk.build_plan(ids, t),
    )


def forward_fn(provider: str, routing: str, inp: Inputs, shape: Shape) -> tuple[Callable, list]:
    """(f(x) -> y, the leaves that get gradients) for one provider."""
    import mftk
    from mftk.ops import reference

    w, b, a, bb, rw = inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.router_weight
    soft = routing == "soft"
    leaves = [a, bb] + ([rw] if soft else [])
    if provider == "base":
        return (lambda x: torch.nn.functional.linear(x, w, b)), []
    if provider.startswith("mftk"):
        kw = dict(router_weight=rw) if soft else dict(task_ids=inp.plan)
        return (lambda x: mftk.multi_adapter_linear(x, w, a, bb, bias=b, **kw)), leaves
    if provider == "loop":
        ids = None if soft else inp.task_ids
        rw_ = rw if soft else None
        ref = reference.multi_adapter_linear_ref
        return (lambda x: ref(x, w, a, bb, b, 1.0, ids, rw_)[0]), leaves
    if provider == "grouped_mm":
        gmm = reference.grouped_mm_hard
        p = inp.plan
        return (lambda x: gmm(x, w, a, bb, b, 1.0, p.perm, p.offsets)), leaves
    if provider == "dense":
        return (lambda x: reference.soft_dense_torch(x, w, a, bb, b, 1.0, rw)), leaves
    if provider == "peft":
        from providers import peft_layer  # the CPU benchmarks' builder, one copy

        layer = peft_layer(w, b, a, bb)
        layer.set_adapter("t0")  # training: one adapter for the whole batch
        params = [layer.lora_A["t0"].weight, layer.lora_B["t0"].weight]
        return layer, params
    raise ValueError(f"provider: unknown {provider!r}")


def bench(fn: Callable) -> float:
    """Median ms of fn."""
    if DEV == "cpu":  # --smoke: a plain timer (do_bench needs CUDA events)
        import time

        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_provider(provider: str, routing: str, inp: Inputs, shape: Shape) -> dict:
    from mftk.ops import triton_ops

    triton_ops.set_strategy(provider.split("-")[1] if provider.startswith("mftk") else None)
    try:
        f, leaves = forward_fn(provider, routing, inp, shape)
        it = {"i": 0}

        def nxt():
            it["i"] = (it["i"] + 1) % ROTATE
            return inp.xs[it["i"]], inp.grads[it["i"]]

        def fwd():
            x, _ = nxt()
            with torch.no_grad():
                f(x)

        def fwd_bwd():
            x, dy = nxt()
            y = f(x)
            torch.autograd.grad(y, [x, *leaves], dy)

        ys = [f(x) for x in inp.xs]  # graphs for the bwd-only timing

        def bwd():
            i = it["i"] = (it["i"] + 1) % ROTATE
            torch.autograd.grad(ys[i], [inp.xs[i], *leaves], inp.grads[i], retain_graph=True)

        out = {"fwd": bench(fwd), "bwd": bench(bwd), "fwd+bwd": bench(fwd_bwd)}
        ys.clear()
        if provider == "peft":  # PEFT's mixed-adapter batch (inference only): forward
            names = ["__base__" if i < 0 else f"t{i}" for i in inp.task_ids.tolist()]

            def mixed():
                x, _ = nxt()
                with torch.no_grad():
                    f(x, adapter_names=names)

            out["fwd"] = bench(mixed)
            out["note"] = "fwd: mixed-adapter loop; bwd: one LoRA"
        _sync()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            out["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            out["peak_mb"] = float("nan")
        return out
    finally:
        triton_ops.set_strategy(None)


def check_correctness(shape: Shape, dtype: torch.dtype, n_check: int = 1024) -> list[str]:
    """mftk (each strategy, hard / soft / soft top-2) vs float64 on n_check tokens."""
    from op_cases import assert_close, make_case, reference_fn, run

    import mftk
    from mftk.ops import triton_ops

    n = min(n_check, shape.n)
    torch.manual_seed(0)
    lines = []
    for routing, top_k in (("hard", None), ("soft", None), ("soft", 2)):
        case = make_case(n, shape.d_in, shape.d_out, shape.tasks, shape.rank, routing, dtype, top_k)
        for f in ("x", "weight", "bias", "lora_a", "lora_b", "router_weight", "router_bias"):
            t = getattr(case, f)
            if t is not None:
                setattr(case, f, t.detach().to(DEV).requires_grad_(t.requires_grad))
        case.scaling = case.scaling.to(DEV)
        if case.task_ids is not None:
            case.task_ids = case.task_ids.to(DEV)
        c64, cdt = case.to(torch.float64), case.to(dtype)
        for c in (c64, cdt):
            for leaf in c.leaves():
                leaf.requires_grad_(True)
        g = torch.randn(n, shape.d_out, dtype=torch.float64, device=DEV)
        y64, gr64, _ = run(c64, reference_fn, g)
        ysd, grsd, _ = run(cdt, reference_fn, g)
        for strategy in triton_ops.STRATEGIES:
            triton_ops.set_strategy(strategy)
            try:
                y, grads, _ = run(
                    case,
                    lambda c: mftk.multi_adapter_linear(
                        c.x, c.weight, c.lora_a, c.lora_b, backend="triton", **c.kwargs()
                    ),
                    g,
                )
            finally:
                triton_ops.set_strategy(None)
            where = f"{shape.name} {routing} top_k={top_k} {strategy}"
            assert_close(f"{where}: y", y, y64, ysd, dtype)
            for i, (gk, gr, gs) in enumerate(zip(grads, gr64, grsd)):
                assert_close(f"{where}: grad of leaf {i}", gk, gr, gs, dtype)
            lines.append(f"{shape.name}: {routing} top_k={top_k} {strategy}: ok")
    return lines


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=HERE,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


STRATEGY_PROVIDERS = ("mftk-addmm", "mftk-fused")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for gpu-<card>.md")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or all")
    ap.add_argument("--routing", default="hard,soft")
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness step")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under the interpreter")
    ap.add_argument("--model", action="store_true", help="launch/traffic roofline model, no GPU")
    args = ap.parse_args(argv)
    if args.model:  # benchmarks/launch_model.py counts on meta tensors, writes gpu-model.md
        from model_report import main as model_main

        return model_main(os.path.join(args.out, "gpu-model.md"), _git_commit())
    global DEV
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA GPU is visible (torch.cuda.is_available() is False); this suite "
            "only runs on a GPU. CPU benchmarks: pytest benchmarks/ --benchmark-only",
            file=sys.stderr,
        )
        return 2
    import triton
    from model_report import predicted_cell

    import mftk

    table = SMOKE_SHAPES if args.smoke else SHAPES
    shapes = table if args.shapes == "all" else [table[int(i)] for i in args.shapes.split(",")]
    routings = args.routing.split(",")
    dtype = torch.bfloat16
    card = "cpu-smoke" if args.smoke else torch.cuda.get_device_name()
    print(f"gpu_suite on {card}, torch {torch.__version__}, triton {triton.__version__}")
    checks = []
    if not args.skip_check:
        for shape in shapes:
            checks += check_correctness(shape, dtype)
            print(checks[-1].split(":")[0], "correct (hard, soft, soft top-2; both strategies)")
    rows, winners = [], []
    for shape in shapes:
        inp = make_inputs(shape, dtype)
        for routing in routings:
            res = {}
            for provider in PROVIDERS[routing]:
                try:
                    res[provider] = time_provider(provider, routing, inp, shape)
                except Exception as e:  # a baseline this torch/GPU lacks (e.g. _grouped_mm)
                    res[provider] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            base = res["base"]["fwd+bwd"]
            for provider, r in res.items():
                if "error" in r:
                    rows.append(f"| {shape.name} | {routing} | {provider} | {r['error']} |||||")
                    continue
                tflops = shape.flops(routing, "fwd+bwd") / (r["fwd+bwd"] * 1e-3) / 1e12
                rows.append(
                    f"| {shape.name} | {routing} | {provider} | {r['fwd']:.3f} | {r['bwd']:.3f} "
                    f"| {r['fwd+bwd']:.3f} | {r['fwd+bwd'] / base:.3f} | {tflops:.1f} "
                    f"| {r['peak_mb']:.0f} |" + (f" {r['note']}" if "note" in r else "")
                )
                print(rows[-1])
            ok = {p: r["fwd+bwd"] for p, r in res.items() if p.startswith("mftk") and "fwd" in r}
            if ok:
                best = min(ok, key=ok.get)
                cells = [f"{ok[p] / base:.3f}" if p in ok else "-" for p in STRATEGY_PROVIDERS]
                cells += [predicted_cell(card, shape, routing, p) for p in STRATEGY_PROVIDERS]
                winners.append(f"| {shape.name} | {routing} | {best} | " + " | ".join(cells) + " |")
        del inp
        if DEV == "cuda":
            torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu-{slug}.md")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "w") as fh:
        fh.write(
            f"# mftk GPU suite: {card}\n\n"
            f"commit {_git_commit()}, {now}; torch {torch.__version__}, triton "
            f"{triton.__version__}, mftk {mftk.__version__}; bf16, N tokens as listed, T=8.\n"
            "Times: median ms (triton.testing.do_bench, inputs rotated over "
            f"{ROTATE} copies); ratio = fwd+bwd / base fwd+bwd; TFLOP/s counts the "
            "docs/ARCHITECTURE.md "
            "floor FLOPs (base + adapters + router); peak = extra memory of one fwd+bwd.\n\n"
            "| shape | routing | provider | fwd ms | bwd ms | fwd+bwd ms | x base | TFLOP/s "
            "| peak MB |\n|---|---|---|---|---|---|---|---|---|\n"
        )
        fh.write("\n".join(rows) + "\n\n## Faster mftk strategy per shape (fwd+bwd)\n\n")
        fh.write("| shape | routing | faster | addmm x base | fused x base | model: addmm | "
                 "model: fused |\n|---|---|---|---|---|---|---|\n")  # fmt: skip
        fh.write("\n".join(winners) + "\n\n## Correctness (vs float64, first 1024 tokens)\n\n")
        fh.write("\n".join(f"- {c}" for c in checks) or "- skipped (--skip-check)")
        fh.write("\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
