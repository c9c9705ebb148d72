"""Launch and traffic count of the mftk op, and a roofline model of its time (issues 12.3, 13).

    python benchmarks/gpu_suite.py --model      # prints it, writes benchmarks/results/gpu-model.md

The whole fwd+bwd path autograd runs (mftk.multi_adapter_linear(..., backend="triton") forward,
then torch.autograd.grad) runs on "meta" tensors: a TorchDispatchMode counts every aten op and
runs the mftk:: custom ops' Python bodies under itself; Triton launches are recorded, not run
(gpu_compile.record_launches). So N=8192, D=7168 costs nothing. Nothing lists the kernels.

Launches: one per Triton launch, one per aten op that launches a CUDA kernel (not the
metadata-only ops in NO_LAUNCH). Bytes: aten ops read their inputs and write their outputs (the
region a view touches: stride-0 dims count once); a Triton launch uses the kernel's or its
launcher's `traffic(named_args) -> (read, write)` if it has one, else the distinct tensor
arguments' bytes (one per storage; split into read/write unknown, shown as read).
Hidden vs exposed: the base GEMMs (aten mm/addmm/bmm with K >= the layer's D, or a Triton launch
that reads the frozen weight) are compute-bound and hide their traffic; every other byte is
exposed. passes = bytes / (N * D * element size).

Roofline (a model's ASSUMPTIONS, not measurements): time of a launch =
max(flops / (GEMM_EFF * peak), bytes / (BW_EFF * bandwidth)) + LAUNCH_US.

| device        | peak bf16 dense | bandwidth  |
|---------------|-----------------|------------|
| A100-SXM 80GB | 312 TFLOP/s     | 2.039 TB/s |
| H100-SXM      | 989 TFLOP/s     | 3.35 TB/s  |
| H200          | 989 TFLOP/s     | 4.8 TB/s   |

FLOPs: aten GEMMs exactly (2MNK); a Triton launch from the kernel's `flops(named_args)` if it
has one, else the op's analytic floor (base 2ND^2 fwd + dx, LoRA and router GEMMs) less the aten
GEMMs' FLOPs: the base part split evenly over the Triton launches that read the weight, the rest
over all Triton launches in proportion to bytes. Base = the frozen linear alone, fwd y = x W^T
(+ b), bwd dx = dy W (no dW), counted the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEVICES = {"A100-SXM 80GB": (312e12, 2.039e12), "H100-SXM": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # fmt: skip
GEMM_EFF = 0.75  # achievable fraction of peak FLOP/s (cuBLAS-class GEMMs)
BW_EFF = 0.85  # achievable fraction of peak DRAM bandwidth
LAUNCH_US = 4.0  # per-launch overhead, microseconds
GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm"}
NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "expand", "as_strided",
    "detach", "unsqueeze", "squeeze", "permute", "select", "slice", "alias", "split", "unbind",
    "narrow", "unflatten", "flatten", "lift_fresh", "view_as", "expand_as", "resize_",
    "_to_copy_noop", "sym_size", "sym_stride", "is_same_size", "diagonal", "split_with_sizes",
}  # fmt: skip
NO_READ = {"fill_", "zero_", "copy_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_full"}  # fmt: skip


@dataclass
class Rec:
    """One device launch. read/write: bytes (write None: split unknown)."""

    name: str
    kind: str  # "triton" | "aten"
    read: int
    write: int | None
    flops: float = 0.0
    hidden: bool = False
    reads_weight: bool = False
    declared_flops: bool = False


def touched(t) -> int:
    """Bytes of the storage region a view touches (stride-0 dims counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _storage_key(t):
    try:
        return t.untyped_storage()._cdata
    except Exception:  # no storage (e.g. some wrappers): the tensor itself
        return id(t)


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _distinct_bytes(tensors) -> int:
    per = {}
    for t in tensors:
        k = _storage_key(t)
        per[k] = max(per.get(k, 0), touched(t))
    return sum(per.values())


def _counting_mode(recs: list[Rec], weight_keys: set, d: int):
    """A TorchDispatchMode appending a Rec per launching aten op; runs mftk custom op bodies."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            qual = f"{func.namespace}::{func._opname}"
            if func.namespace == "mftk" and qual in OPDEFS:
                with self:  # the body's aten ops and Triton launches are counted too
                    return OPDEFS[qual]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            name = func._opname
            if name in NO_LAUNCH:
                return out
            ins = list(_tensors((args, kwargs)))
            outs = list(_tensors(out))
            in_keys = {_storage_key(t) for t in ins}
            if not name.endswith("_") and outs and all(_storage_key(t) in in_keys for t in outs):
                return out  # returned an input or a view of one (e.g. .to() to the same dtype)
            if name in NO_READ and ins:
                ins = ins[1:]  # dst / self is written, not read
            flops = 0.0
            if name in GEMMS:
                m1, m2 = (args[1], args[2]) if name.startswith(("add", "badd")) else args[:2]
                k = m1.shape[-1]
                flops = 2.0 * m1.shape[:-1].numel() * m2.shape[-1] * k
                if m1.dim() == 3 and m2.dim() == 3 and name != "addbmm":
                    flops = 2.0 * m1.shape[0] * m1.shape[1] * k * m2.shape[2]
            rw = any(_storage_key(t) in weight_keys for t in ins)
            big_k = name in GEMMS and (args[1] if name.startswith(("add", "badd")) else args[0]).shape[-1] >= d  # fmt: skip
            recs.append(Rec(f"aten.{name}", "aten", _distinct_bytes(ins), _distinct_bytes(outs),
                            flops, hidden=big_k, reads_weight=rw, declared_flops=True))  # fmt: skip
            return out

    return Mode()


_STORES = {"store", "atomic_add", "atomic_max", "atomic_min", "atomic_xchg", "atomic_cas", "atomic_and", "atomic_or", "atomic_xor"}  # fmt: skip


def pointer_use(jit, constexprs: dict) -> tuple[set, set]:
    """(params read, params written) of a @triton.jit kernel, from its source: tl.load /
    tl.store / tl.atomic_* pointer expressions traced back through assignments to parameters,
    skipping `if` branches that the launch's constexpr values rule out. A pointer passed to
    another call counts as read."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(jit.src))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    params = set(jit.arg_names)
    deps: dict[str, set] = {}
    for node in ast.walk(fn):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)} if node.value else set()  # fmt: skip
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        deps.setdefault(n.id, set()).update(names)

    def roots(expr) -> set:
        todo, seen = [n.id for n in ast.walk(expr) if isinstance(n, ast.Name)], set()
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
                    live = bool(eval(compile(ast.Expression(node.test), "<if>", "eval"), {}, dict(constexprs)))  # fmt: skip
                except Exception:  # not decidable from constexprs: both branches
                    visit(node.body), visit(node.orelse)
                    continue
                visit(node.body if live else node.orelse)
                continue
            if isinstance(node, (ast.For, ast.While, ast.With)):
                visit(node.body), visit(getattr(node, "orelse", []))
                continue
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                attr = call.func.attr if isinstance(call.func, ast.Attribute) else None
                if not call.args:
                    continue
                if attr in _STORES:
                    writes.update(roots(call.args[0]))
                elif attr == "load":
                    reads.update(roots(call.args[0]))
                elif not (isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id == "tl"):  # fmt: skip
                    for a in call.args:  # a helper @jit function: its pointers are read
                        reads.update(n.id for n in ast.walk(a) if isinstance(n, ast.Name) and n.id in params)  # fmt: skip

    visit(fn.body)
    return reads, writes


def _triton_rec(la, weight_keys: set) -> Rec:
    """Rec of a recorded Triton launch (gpu_compile.Launch)."""
    named = la.named_args()
    tensors = {k: v for k, v in named.items() if hasattr(v, "untyped_storage")}
    rw = any(_storage_key(t) in weight_keys for t in tensors.values())
    traffic = flops = None
    for obj in (la.launcher, la.autotuner, la.jit):
        if obj is not None and traffic is None and callable(getattr(obj, "traffic", None)):
            traffic = obj.traffic(named)
        if obj is not None and flops is None and callable(getattr(obj, "flops", None)):
            flops = obj.flops(named)
    if traffic is not None:
        read, write = int(traffic[0]), int(traffic[1])
    else:
        try:
            consts = {k: v for k, v in named.items() if k not in tensors}
            rd, wr = pointer_use(la.jit, consts)
            read = _distinct_bytes(t for k, t in tensors.items() if k in rd)
            write = _distinct_bytes(t for k, t in tensors.items() if k in wr)
        except Exception:  # source not parseable: every distinct tensor, split unknown
            read, write = _distinct_bytes(tensors.values()), None
    return Rec(la.name, "triton", read, write, float(flops or 0.0), hidden=rw, reads_weight=rw,
               declared_flops=flops is not None)  # fmt: skip


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
        base = 2 * (2.0 * n * d * d)
        lora = 2.0 * n * r * (2 * d)
        router = 0.0
        if self.routing == "soft":
            lora *= t
            router = 2.0 * n * d * t
        return base, 3 * lora + 3 * router  # fwd 1x, bwd 2x (dx-side and weight-side)


def count(shape: ModelShape, base_only: bool = False, det: bool = False) -> list[Rec]:
    """Launch records of one fwd+bwd of the op (or the base linear alone) on meta tensors."""
    import torch

    import mftk
    from gpu_compile import record_launches
    from mftk.ops import triton_ops
    from mftk.ops.plan import RoutingPlan

    n, d, t, r = shape.n, shape.d, shape.t, shape.r
    dt = torch.bfloat16

    def meta(*s, grad=False, dtype=dt):
        return torch.empty(*s, dtype=dtype, device="meta").requires_grad_(grad)

    x, w, dy = meta(n, d, grad=True), meta(d, d), meta(n, d)
    b = meta(d) if shape.bias else None
    a, bb, rw = meta(t, r, d, grad=True), meta(t, d, r, grad=True), meta(t, d, grad=True)
    ids = torch.empty(n, dtype=torch.int64, device="meta")
    plan = RoutingPlan(ids.clone(), torch.empty(t + 1, dtype=torch.int64, device="meta"), ids, t)
    recs: list[Rec] = []
    wkeys = {_storage_key(w)}
    prev = torch.are_deterministic_algorithms_enabled()
    triton_ops.set_strategy(shape.strategy)
    torch.use_deterministic_algorithms(det)
    try:
        with record_launches() as launches, _counting_mode(recs, wkeys, d):
            if base_only:
                y = torch.nn.functional.linear(x, w, b)
                leaves = [x]
            elif shape.routing == "hard":
                y = mftk.multi_adapter_linear(x, w, a, bb, bias=b, task_ids=plan, backend="triton")
                leaves = [x, a, bb]
            else:
                y = mftk.multi_adapter_linear(x, w, a, bb, bias=b, router_weight=rw, backend="triton")  # fmt: skip
                leaves = [x, a, bb, rw]
            torch.autograd.grad(y, leaves, dy)
        # Triton launches interleave with aten ops; order is not needed for the totals
        recs.extend(_triton_rec(la, wkeys) for la in launches)
    finally:
        triton_ops.set_strategy(None)
        torch.use_deterministic_algorithms(prev)
    if not base_only:
        _assign_flops(recs, shape)
    return recs


def _assign_flops(recs: list[Rec], shape: ModelShape) -> None:
    """Undeclared Triton FLOPs: the analytic floor less the aten GEMMs (see the docstring)."""
    base, rest = shape.floor_flops()
    aten_base = sum(r.flops for r in recs if r.kind == "aten" and r.hidden)
    aten_rest = sum(r.flops for r in recs if r.kind == "aten" and not r.hidden)
    declared = sum(r.flops for r in recs if r.kind == "triton" and r.declared_flops)
    todo = [r for r in recs if r.kind == "triton" and not r.declared_flops]
    if not todo:
        return
    base_left = max(0.0, base - aten_base)
    rest_left = max(0.0, rest - aten_rest - declared)
    readers = [r for r in todo if r.reads_weight] or todo
    for r in readers:
        r.flops += base_left / len(readers)
    total = sum(r.read + (r.write or 0) for r in todo) or 1
    for r in todo:
        r.flops += rest_left * (r.read + (r.write or 0)) / total


def launch_time(rec: Rec, peak: float, bw: float) -> float:
    """Seconds: roofline max of compute and memory time, plus the launch overhead."""
    return max(rec.flops / (GEMM_EFF * peak), (rec.read + (rec.write or 0)) / (BW_EFF * bw)) + LAUNCH_US * 1e-6  # fmt: skip


def summarize(recs: list[Rec], shape: ModelShape) -> dict:
    unit = shape.n * shape.d * 2  # one bf16 (N, D) pass
    total = sum(r.read + (r.write or 0) for r in recs)
    exposed = sum(r.read + (r.write or 0) for r in recs if not r.hidden)
    times = {dev: sum(launch_time(r, p, b) for r in recs) for dev, (p, b) in DEVICES.items()}
    return dict(launches=len(recs), total_passes=total / unit, exposed_passes=exposed / unit,
                flops=sum(r.flops for r in recs), times=times)  # fmt: skip


def rows(recs: list[Rec]) -> list[tuple]:
    """(name, count, read MB, write MB or None, exposed) aggregated by name and class."""
    agg: dict[tuple, list] = {}
    for r in recs:
        a = agg.setdefault((r.name, not r.hidden), [0, 0, 0, True])
        a[0] += 1
        a[1] += r.read
        a[2] += r.write or 0
        a[3] = a[3] and r.write is not None
    return [(k[0], a[0], a[1] / 1e6, a[2] / 1e6 if a[3] else None, k[1]) for k, a in sorted(agg.items())]  # fmt: skip


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def add(self, s: str = "") -> None:
        self.lines.append(s)


def model_report(d_values=(4096, 7168), n: int = 8192) -> str:
    """The markdown report of issue 13's shapes (bf16, T=8, R=16, deterministic off)."""
    rep = Report()
    dev_hdr = " | ".join(DEVICES)
    rep.add("| device | peak bf16 dense | bandwidth |\n|---|---|---|")
    for dev, (p, b) in DEVICES.items():
        rep.add(f"| {dev} | {p / 1e12:.0f} TFLOP/s | {b / 1e12:.3f} TB/s |")
    rep.add(f"\nAssumed: GEMM_EFF {GEMM_EFF} of peak FLOP/s, BW_EFF {BW_EFF} of peak bandwidth, "
            f"{LAUNCH_US} us per launch.\n")  # fmt: skip
    for d in d_values:
        base_shape = ModelShape(n=n, d=d)
        base = summarize(count(base_shape, base_only=True), base_shape)
        for routing in ("hard", "soft"):
            for strategy in ("addmm", "fused"):
                shape = ModelShape(n=n, d=d, routing=routing, strategy=strategy)
                recs = count(shape)
                s = summarize(recs, shape)
                rep.add(f"### {routing} routing, strategy {strategy}: N={n}, D_in=D_out={d}, "
                        f"T={shape.t}, R={shape.r}, bf16, bias, top_k 0\n")  # fmt: skip
                rep.add("| launch | count | read MB | write MB | exposed |\n|---|---|---|---|---|")
                for name, c, rd, wr, ex in rows(recs):
                    wr_s = f"{wr:.1f}" if wr is not None else "(in read)"
                    rep.add(f"| {name} | {c} | {rd:.1f} | {wr_s} | {'yes' if ex else 'no (base GEMM)'} |")  # fmt: skip
                rep.add(f"\n**{s['launches']} launches (base {base['launches']}), "
                        f"{s['total_passes']:.2f} total passes (base {base['total_passes']:.2f}), "
                        f"{s['exposed_passes']:.2f} exposed passes (base {base['exposed_passes']:.2f})**\n")  # fmt: skip
                rep.add(f"| | {dev_hdr} |\n|---|" + "---|" * len(DEVICES))
                rep.add("| op ms | " + " | ".join(f"{s['times'][k] * 1e3:.3f}" for k in DEVICES) + " |")  # fmt: skip
                rep.add("| base ms | " + " | ".join(f"{base['times'][k] * 1e3:.3f}" for k in DEVICES) + " |")  # fmt: skip
                rep.add("| op / base | " + " | ".join(f"{s['times'][k] / base['times'][k]:.3f}" for k in DEVICES) + " |\n")  # fmt: skip
    return "\n".join(rep.lines)


@contextlib.contextmanager
def _no_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        raise RuntimeError("launch_model: triton was imported under TRITON_INTERPRET=1")
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def main(out_path: str | None = None, commit: str = "unknown") -> int:
    """Print the model and write it to out_path (benchmarks/results/gpu-model.md)."""
    with _no_interpreter():
        body = model_report()
    head = (f"# mftk launch / traffic model (a MODEL's figures, not measurements)\n\ncommit {commit}; "
            "`python benchmarks/gpu_suite.py --model`. How it counts: benchmarks/launch_model.py.\n")  # fmt: skip
    text = head + "\n" + body + "\n"
    print(text)
    if out_path:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as fh:
            fh.write(text)
        print(f"wrote {out_path}")
    return 0
