"""Launch and traffic count of the mftk op, and a roofline model of its time (issues 12.3, 13).

    python benchmarks/gpu_suite.py --model      # prints it, writes benchmarks/results/gpu-model.md

The whole path autograd runs (mftk.multi_adapter_linear(..., backend="triton") forward, then
torch.autograd.grad) runs on "meta" tensors: a TorchDispatchMode counts every aten op and runs
the mftk:: custom ops' Python bodies under itself; Triton launches are recorded, not run
(gpu_compile.record_launches). So N=8192, D=7168 costs nothing, and no kernel is listed here.

Launches: one per Triton launch and per aten op that launches a CUDA kernel (not NO_LAUNCH's
metadata ops, nor an op that returns its input). Bytes: aten ops read their inputs and write
their outputs (the region a view touches: stride-0 dims once; one count per storage). A Triton
launch uses `traffic(named_args) -> (read, write)` of its launcher function or kernel if it has
one, else the kernel source (pointer_use): the tensors behind tl.load are read, behind
tl.store / tl.atomic_* written, in the branches the launch's constexprs keep (a dummy pointer
of a disabled flag counts 0). Base GEMMs (aten mm/addmm/bmm with K >= D, or a Triton launch that
reads the frozen weight) are compute-bound and hide their traffic; every other byte is exposed.
passes = bytes / (N * D * 2), one bf16 (N, D) tensor.

Roofline, a model's ASSUMPTIONS (not measurements): launch time =
max(flops / (GEMM_EFF * peak), bytes / (BW_EFF * bandwidth)) + LAUNCH_US, with a Triton launch that
does the base GEMM (the fused strategy) at TRITON_GEMM_REL of cuBLAS's efficiency.

| device        | peak bf16 dense | bandwidth  |
|---------------|-----------------|------------|
| A100-SXM 80GB | 312 TFLOP/s     | 2.039 TB/s |
| H100-SXM      | 989 TFLOP/s     | 3.35 TB/s  |
| H200          | 989 TFLOP/s     | 4.8 TB/s   |

FLOPs: aten GEMMs exactly (2MNK); a Triton launch from `flops(named_args)` if declared, else the
op's analytic floor less the aten GEMMs': the base part (2ND^2 fwd + dx) split evenly over the
Triton launches that read the weight, the adapter/router part over all Triton launches in
proportion to their bytes. Base = the frozen linear alone (y = x W^T + b, dx = dy W; no dW).
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEVICES = {"A100-SXM 80GB": (312e12, 2.039e12), "H100-SXM": (989e12, 3.35e12)}
DEVICES["H200"] = (989e12, 4.8e12)
GEMM_EFF = 0.75  # achievable fraction of peak FLOP/s (cuBLAS-class GEMMs)
BW_EFF = 0.85  # achievable fraction of peak DRAM bandwidth
LAUNCH_US = 4.0  # per-launch overhead, microseconds
# A Triton GEMM (gathered rows, no TMA) against cuBLAS, per device: an assumption until
# benchmarks/gpu_suite.py measures mftk-fused against base on that card.
TRITON_GEMM_REL = {"A100-SXM 80GB": 0.90, "H100-SXM": 0.80, "H200": 0.80}
GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm"}
NO_LAUNCH = set(
    "empty empty_like empty_strided new_empty new_empty_strided view _unsafe_view reshape "
    "_reshape_alias transpose t expand as_strided detach unsqueeze squeeze permute select slice "
    "alias split unbind narrow unflatten flatten lift_fresh view_as expand_as resize_ sym_size "
    "sym_stride is_same_size diagonal split_with_sizes".split()
)
NO_READ = set("fill_ zero_ copy_ new_zeros new_full new_ones".split())  # first arg only written
STORES = {"store", "atomic_add", "atomic_max", "atomic_min", "atomic_xchg", "atomic_cas"}
STORES |= {"atomic_and", "atomic_or", "atomic_xor"}


@dataclass
class Rec:
    """One device launch: bytes read and written, FLOPs, and whether its traffic is hidden."""

    name: str
    kind: str  # "triton" | "aten"
    read: int
    write: int
    flops: float = 0.0
    hidden: bool = False
    reads_weight: bool = False
    declared_flops: bool = False

    @property
    def bytes(self) -> int:
        return self.read + self.write


def touched(t) -> int:
    """Bytes of the storage region a view touches (stride-0 dims counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n * t.element_size() if t.numel() else 0


def _key(t):
    try:
        return t.untyped_storage()._cdata
    except Exception:  # no storage: the tensor itself
        return id(t)


def _tensors(obj):
    if hasattr(obj, "untyped_storage"):
        yield obj
    elif isinstance(obj, (list, tuple, dict)):
        for o in obj.values() if isinstance(obj, dict) else obj:
            yield from _tensors(o)


def _distinct_bytes(tensors) -> int:
    per: dict = {}
    for t in tensors:
        per[_key(t)] = max(per.get(_key(t), 0), touched(t))
    return sum(per.values())


def _counting_mode(recs: list[Rec], weight_keys: set, d: int):
    """A TorchDispatchMode appending a Rec per launching aten op; runs mftk custom op bodies."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs, qual, name = kwargs or {}, f"{func.namespace}::{func._opname}", func._opname
            if func.namespace == "mftk" and qual in OPDEFS:
                with self:  # the body's aten ops and Triton launches are counted too
                    return OPDEFS[qual]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            ins, outs = list(_tensors((args, kwargs))), list(_tensors(out))
            in_keys = {_key(t) for t in ins}
            if name in NO_LAUNCH or (
                not name.endswith("_") and outs and all(_key(t) in in_keys for t in outs)
            ):
                return out  # metadata only, or returned its input (e.g. .to() the same dtype)
            if name in NO_READ:
                ins = ins[1:]
            flops, big_k = 0.0, False
            if name in GEMMS:
                m1, m2 = (args[1], args[2]) if name.startswith(("add", "badd")) else args[:2]
                flops = 2.0 * m1.shape[:-1].numel() * m1.shape[-1] * m2.shape[-1]
                big_k = m1.shape[-1] >= d
            rw = any(_key(t) in weight_keys for t in ins)
            rec = Rec(f"aten.{name}", "aten", _distinct_bytes(ins), _distinct_bytes(outs), flops)
            rec.hidden, rec.reads_weight, rec.declared_flops = big_k, rw, True
            recs.append(rec)
            return out

    return Mode()


def pointer_use(jit, constexprs: dict) -> tuple[set, set]:
    """(params read, params written) of a @triton.jit kernel from its source: tl.load and
    tl.store / tl.atomic_* pointer expressions traced back through assignments to parameters,
    in the `if` branches the launch's values keep (undecidable tests: both). A parameter passed
    to another (helper) call counts as read."""
    fn = next(
        n for n in ast.walk(ast.parse(textwrap.dedent(jit.src))) if isinstance(n, ast.FunctionDef)
    )
    params, deps = set(jit.arg_names), {}
    names = lambda e: {n.id for n in ast.walk(e) if isinstance(n, ast.Name)}  # noqa: E731

    def value_names(e) -> set:
        # `out_ptr.dtype.element_ty` names a type, not a read of out_ptr
        if isinstance(e, ast.Attribute) and e.attr in ("dtype", "element_ty"):
            return set()
        own = {e.id} if isinstance(e, ast.Name) else set()
        return own.union(*(value_names(c) for c in ast.iter_child_nodes(e)))

    for node in ast.walk(fn):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for name in names(t):
                    deps.setdefault(name, set()).update(names(node.value))

    def roots(expr) -> set:
        todo, seen = list(names(expr)), set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(deps.get(name, ()))
        return seen & params

    reads, writes = set(), set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If):
                try:
                    code = compile(ast.Expression(node.test), "<if>", "eval")
                    live = bool(eval(code, {}, dict(constexprs)))
                except Exception:
                    visit(node.body), visit(node.orelse)
                    continue
                visit(node.body if live else node.orelse)
                continue
            if isinstance(node, (ast.For, ast.While, ast.With)):
                visit(node.body), visit(getattr(node, "orelse", []))
                continue
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call) and n.args):
                f = call.func
                attr = f.attr if isinstance(f, ast.Attribute) else None
                if attr in STORES:
                    writes.update(roots(call.args[0]))
                elif attr == "load":
                    reads.update(roots(call.args[0]))
                elif not (isinstance(f, ast.Attribute) and names(f.value) == {"tl"}):
                    reads.update(set().union(*map(value_names, call.args)) & params)

    visit(fn.body)
    return reads, writes


def _triton_rec(la, weight_keys: set) -> Rec:
    """Rec of a recorded Triton launch (gpu_compile.Launch)."""
    named = la.named_args()
    tensors = {k: v for k, v in named.items() if hasattr(v, "untyped_storage")}
    hooks = [o for o in (la.launcher, la.autotuner, la.jit) if o is not None]
    traffic = next((o.traffic for o in hooks if callable(getattr(o, "traffic", None))), None)
    flops = next((o.flops for o in hooks if callable(getattr(o, "flops", None))), None)
    if traffic is not None:
        read, write = (int(v) for v in traffic(named))
    else:
        consts = {k: v for k, v in named.items() if k not in tensors}
        rd, wr = pointer_use(la.jit, consts)
        read = _distinct_bytes(t for k, t in tensors.items() if k in rd)
        write = _distinct_bytes(t for k, t in tensors.items() if k in wr)
    rw = any(_key(t) in weight_keys for t in tensors.values())
    rec = Rec(la.name, "triton", read, write, float(flops(named)) if flops else 0.0, hidden=rw)
    rec.reads_weight, rec.declared_flops = rw, flops is not None
    return rec


@dataclass(frozen=True)
class ModelShape:
    n: int = 8192
    d: int = 4096  # D_in = D_out
    t: int = 8
    r: int = 16
    routing: str = "hard"  # "hard" | "soft" (top_k 0)
    strategy: str = "addmm"
    bias: bool = True

    def floor_flops(self) -> tuple[float, float]:
        """(base, adapters + router) FLOPs of fwd + bwd (dx, dA, dB, dRouter; no dW)."""
        n, d, t, r = self.n, self.d, self.t, self.r
        lora = 2.0 * n * r * 2 * d * (t if self.routing == "soft" else 1)
        router = 2.0 * n * d * t if self.routing == "soft" else 0.0
        return 2 * (2.0 * n * d * d), 3 * (lora + router)  # bwd: dx side and weight side


def count(shape: ModelShape, base_only: bool = False, det: bool = False) -> list[Rec]:
    """Launch records of one steady-state fwd+bwd of the op (or the base linear alone) on
    meta tensors (the second of two calls)."""
    import torch
    from gpu_compile import record_launches

    import mftk
    from mftk.ops import triton_ops
    from mftk.ops.plan import RoutingPlan

    n, d, t, r = shape.n, shape.d, shape.t, shape.r

    def meta(*s, grad=False, dtype=torch.bfloat16):
        return torch.empty(*s, dtype=dtype, device="meta").requires_grad_(grad)

    x, w, dy, b = meta(n, d, grad=True), meta(d, d), meta(n, d), meta(d) if shape.bias else None
    a, bb, rw = meta(t, r, d, grad=True), meta(t, d, r, grad=True), meta(t, d, grad=True)
    ids = meta(n, dtype=torch.int64)
    plan = RoutingPlan(meta(n, dtype=torch.int64), meta(t + 1, dtype=torch.int64), ids, t)
    kw = dict(task_ids=plan) if shape.routing == "hard" else dict(router_weight=rw)
    recs: list[Rec] = []
    prev = torch.are_deterministic_algorithms_enabled()
    triton_ops.set_strategy(shape.strategy)
    torch.use_deterministic_algorithms(det)
    try:
        for _ in range(2):  # the first call warms caches (e.g. a cached scaling tensor)
            recs.clear()
            with record_launches() as launches, _counting_mode(recs, {_key(w)}, d):
                if base_only:
                    y, leaves = torch.nn.functional.linear(x, w, b), [x]
                else:
                    y = mftk.multi_adapter_linear(x, w, a, bb, bias=b, backend="triton", **kw)
                    leaves = [x, a, bb] + ([rw] if shape.routing == "soft" else [])
                torch.autograd.grad(y, leaves, dy)
        recs.extend(_triton_rec(la, {_key(w)}) for la in launches)  # order not needed
    finally:
        triton_ops.set_strategy(None)
        torch.use_deterministic_algorithms(prev)
    if not base_only:
        _assign_flops(recs, shape)
    return recs


def _assign_flops(recs: list[Rec], shape: ModelShape) -> None:
    """Undeclared Triton FLOPs: the analytic floor less the aten GEMMs (see the docstring)."""
    todo = [r for r in recs if r.kind == "triton" and not r.declared_flops]
    if not todo:
        return
    base, rest = shape.floor_flops()
    base -= sum(r.flops for r in recs if r.kind == "aten" and r.hidden)
    rest -= sum(r.flops for r in recs if r.declared_flops and not (r.kind == "aten" and r.hidden))
    readers = [r for r in todo if r.reads_weight] or todo
    for r in readers:
        r.flops += max(0.0, base) / len(readers)
    total = sum(r.bytes for r in todo) or 1
    for r in todo:
        r.flops += max(0.0, rest) * r.bytes / total


def launch_time(rec: Rec, peak: float, bw: float, rel: float = 1.0) -> float:
    """Seconds: roofline max of compute and memory time, plus the launch overhead; a Triton
    launch that does the base GEMM runs at `rel` of cuBLAS's efficiency."""
    eff = GEMM_EFF * (rel if rec.kind == "triton" and rec.hidden else 1.0)
    return max(rec.flops / (eff * peak), rec.bytes / (BW_EFF * bw)) + LAUNCH_US * 1e-6


def summarize(recs: list[Rec], shape: ModelShape) -> dict:
    unit = shape.n * shape.d * 2  # one bf16 (N, D) pass
    out = {"launches": len(recs), "total_passes": sum(r.bytes for r in recs) / unit}
    out["exposed_passes"] = sum(r.bytes for r in recs if not r.hidden) / unit
    out["flops"] = sum(r.flops for r in recs)
    out["times"] = {
        k: sum(launch_time(r, p, b, TRITON_GEMM_REL[k]) for r in recs)
        for k, (p, b) in DEVICES.items()
    }
    # the Triton-GEMM efficiency (vs cuBLAS) at which this path would match rel = 1 exactly
    out["gemm_s"] = {
        k: sum(r.flops / (GEMM_EFF * p) for r in recs if r.kind == "triton" and r.hidden)
        for k, (p, _) in DEVICES.items()
    }
    return out


def rows(recs: list[Rec]) -> list[tuple]:
    """(name, count, read MB, write MB, exposed) aggregated by name and class."""
    agg: dict[tuple, list] = {}
    for r in recs:
        a = agg.setdefault((r.name, not r.hidden), [0, 0, 0])
        a[0], a[1], a[2] = a[0] + 1, a[1] + r.read, a[2] + r.write
    return [(k[0], a[0], a[1] / 1e6, a[2] / 1e6, k[1]) for k, a in sorted(agg.items())]
