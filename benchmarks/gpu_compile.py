"""Ahead-of-time compile gate for the Triton kernels, without a GPU (issue 12, item 1).
    python benchmarks/gpu_compile.py          # full matrix -> benchmarks/results/gpu-compile.md
    python benchmarks/gpu_compile.py --ci     # representative subset (a few minutes, 2 workers)
    python benchmarks/gpu_compile.py --json out.json
Launches are recorded, not run (Autotuner.run / JITFunction.run patched), while the four custom
ops run on small CPU tensors (N=256, D=1024) over dtypes, T*R, strategies, determinism, bias,
router bias and top_k: no kernel list. Each launch goes through Triton's own binder for a cuda
target of capability 80 and 90 (signature, specialisation, divisibility attrs), deduplicated by
(kernel, signature, constexprs, attrs); every config the arch's pruner keeps
(mftk.kernels._common.configs_for_arch if present, else all; a plain @jit launch: one config) is
compiled with triton.compile: registers and spills from its ptxas -v, shared from the metadata.
Fails on a compile error, shared memory over SHARED_LIMIT, any spill, or a launch that no config
fits; dropped configs are "pruned". Runs without TRITON_INTERPRET (main() drops it first).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = (80, 90)
SHARED_LIMIT = {80: 166_912, 90: 232_448}  # opt-in shared memory per block: A100, H100/H200
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


@dataclass
class Launch:
    """One intercepted launch; args/kwargs as passed to run (no grid/warmup)."""

    jit: object  # triton JITFunction
    autotuner: object | None  # triton Autotuner (outermost) or None
    args: tuple
    kwargs: dict
    launcher: object | None  # the Python function that launched it (first frame outside triton)

    name = property(lambda self: self.jit.fn.__name__)

    def named_args(self) -> dict:
        return {**dict(zip(self.jit.arg_names, self.args)), **self.kwargs}


def _unwrap(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _launcher(frame) -> object | None:
    """The first caller outside triton: the launcher function (for an optional `traffic`)."""
    own = ("triton", __name__)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(own):
        frame = frame.f_back
    return None if frame is None else frame.f_globals.get(frame.f_code.co_name)


@contextlib.contextmanager
def record_launches():
    """Patch triton so launches are recorded, not run; yields the list of Launch."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    out: list[Launch] = []
    at_run, jit_run = Autotuner.run, JITFunction.run

    def _at(self, *args, **kwargs):
        kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        out.append(Launch(_unwrap(self), self, args, kw, _launcher(inspect.currentframe())))

    def _jit(self, *args, grid, warmup, **kwargs):
        out.append(Launch(self, None, args, dict(kwargs), _launcher(inspect.currentframe())))

    Autotuner.run, JITFunction.run = _at, _jit
    try:
        yield out
    finally:
        Autotuner.run, JITFunction.run = at_run, jit_run


@dataclass(frozen=True)
class Case:
    routing: str  # "hard" | "soft"
    dtype: str  # "bf16" | "fp16" | "fp32"
    t: int
    r: int
    strategy: str  # "addmm" | "fused"
    det: bool
    bias: bool
    rbias: bool = False  # soft only
    top_k: int = 0  # soft only


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TR = [(1, 16), (8, 16), (8, 64), (16, 128)]  # T*R = 16, 128, 512, 2048


def full_matrix() -> list[Case]:
    out, two = [], (False, True)
    for dt, (t, r), st, det, bias in itertools.product(DTYPES, TR, ("addmm", "fused"), two, two):
        out.append(Case("hard", dt, t, r, st, det, bias))
        out += [Case("soft", dt, t, r, st, det, bias, rb, k) for rb in two for k in (0, 2) if k < t]
    return out


def ci_matrix() -> list[Case]:
    """Every dtype, both strategies, det on/off, T*R 16 and 2048, both routings, in 8 cases."""
    return [
        Case("hard", "bf16", 1, 16, "addmm", False, True),
        Case("hard", "fp16", 16, 128, "fused", True, False),
        Case("hard", "fp32", 16, 128, "addmm", True, True),
        Case("hard", "bf16", 16, 128, "fused", False, False),
        Case("soft", "bf16", 16, 128, "fused", False, True, True, 2),
        Case("soft", "fp16", 1, 16, "addmm", True, False),
        Case("soft", "fp32", 1, 16, "fused", False, True, False),
        Case("soft", "bf16", 16, 128, "addmm", True, False, True, 0),
    ]


def run_case(case: Case, n: int = 256, d: int = 1024) -> None:
    """Call the forward and backward op bodies of one case (inside record_launches)."""
    import torch

    from mftk.ops import triton_ops

    t, r, g = case.t, case.r, torch.Generator().manual_seed(0)

    def rnd(*s, dtype=None):
        return torch.randn(*s, generator=g).to(dtype or getattr(torch, DTYPES[case.dtype]))

    x, w, dy = rnd(n, d), rnd(d, d), rnd(n, d)
    b = rnd(d) if case.bias else None
    a, bb, s = rnd(t, r, d), rnd(t, d, r), rnd(t, dtype=torch.float32)
    prev_det = torch.are_deterministic_algorithms_enabled()
    triton_ops.set_strategy(case.strategy)
    torch.use_deterministic_algorithms(case.det)
    try:
        if case.routing == "hard":
            perm = torch.randperm(n, generator=g)  # a base-only tail after offsets[T]
            offsets = torch.linspace(0, n * t / (t + 1), t + 1).to(torch.int64)
            _, shrink = triton_ops.hard_fwd(x, w, b, a, bb, s, perm, offsets)
            triton_ops.hard_bwd(dy, x, w, a, bb, s, perm, offsets, shrink)
        else:
            rw, rb = rnd(t, d), rnd(t) if case.rbias else None
            _, _, probs, shrink = triton_ops.soft_fwd(x, w, b, a, bb, s, rw, rb, 1.0, case.top_k)
            triton_ops.soft_bwd(dy, None, x, w, a, bb, s, rw, probs, shrink, 1.0)
    finally:
        triton_ops.set_strategy(None)
        torch.use_deterministic_algorithms(prev_det)


def _configs(launch: Launch, arch: int) -> tuple[list, list]:
    """(all configs, configs the pruner keeps on `arch`)."""
    import triton

    if launch.autotuner is None:
        kw = launch.kwargs
        cfg = triton.Config(
            {}, num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3)
        )
        return [cfg], [cfg]
    configs = list(launch.autotuner.configs)
    try:
        from mftk.kernels._common import configs_for_arch
    except ImportError:
        return configs, configs
    return configs, list(configs_for_arch(launch.autotuner, arch, launch.named_args()))


def _cfg_str(cfg) -> str:
    kw = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}"


def _short(v) -> str:
    s = str(v)
    return {"True": "1", "False": "0"}.get(s, s.replace("triton.language.", ""))


def specialize(launch: Launch, cfg, arch: int) -> dict:
    """Triton's binder applied to the recorded args for a cuda:arch target: signature,
    constexprs (keyed by param name), attrs and options. Plain, picklable values."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = launch.jit
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**launch.kwargs, **cfg.all_kwargs()}
    bound, spec, opts = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
    names = jit.arg_names
    sp = {"module": jit.fn.__module__, "name": jit.fn.__name__, "signature": signature}
    sp["constexprs"] = {names[k[0]]: v for k, v in constexprs.items()}
    sp["attrs"] = {names[k[0]]: v for k, v in attrs.items() if v}
    sp["options"] = {k: v for k, v in kwargs.items() if k in OPTION_KEYS and v is not None}
    sp.update(arch=arch, config=_cfg_str(cfg), config_keys=sorted(cfg.kwargs))
    return sp


def launch_key(sp: dict) -> tuple:
    """Dedupe key: kernel, signature, constexprs and attrs, without the config's own keys."""
    cfg = set(sp["config_keys"])
    const = tuple((k, _short(v)) for k, v in sp["constexprs"].items() if k not in cfg)
    sig = tuple((k, v) for k, v in sp["signature"].items() if k not in cfg)
    attrs = tuple(sorted(sp["attrs"]))
    return (sp["module"], sp["name"], sig, const, attrs)


def plan_jobs(launches: list[Launch]) -> tuple[list[dict], dict]:
    """Compile jobs (one per distinct launch x kept config x arch) plus "pruned" rows, and the
    launch key -> label map. A config kept for any launch with the same key is compiled."""
    jobs, labels = {}, {}
    for la in launches:
        for arch in ARCHS:
            configs, kept = _configs(la, arch)
            kept_names = {_cfg_str(c) for c in kept}
            sp0 = specialize(la, configs[0], arch)
            key = launch_key(sp0)
            if key not in labels:
                labels[key] = f"{sp0['name']}#{sum(k[1] == sp0['name'] for k in labels)}"
            for cfg in configs:
                ident = (key, arch, _cfg_str(cfg))
                keep = _cfg_str(cfg) in kept_names
                if ident in jobs:  # kept for any launch with this key: compiled
                    jobs[ident]["status"] = "compile" if keep else jobs[ident]["status"]
                    continue
                sp = sp0 if cfg is configs[0] else specialize(la, cfg, arch)
                consts = " ".join(f"{k}={v}" for k, v in key[3])
                sp.update(launch=labels[key], key_constexprs=consts)
                sp["status"] = "compile" if keep else "pruned"
                jobs[ident] = sp
    return list(jobs.values()), labels


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> dict | None:
    """{regs, spill_stores, spill_loads} (max over functions) from a ptxas -v log, or None."""
    if "Used" not in log:
        return None
    return {k: max([int(m) for m in rx.findall(log)] or [0]) for k, rx in _PTXAS_RE.items()}


def compile_job(job: dict) -> dict:
    """Worker: compile one (launch, config, arch) and fill regs/spills/shared/status/reason."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = dict(job)
    if job["status"] == "pruned":
        return res
    t0 = time.time()
    try:
        fn = _unwrap(getattr(importlib.import_module(job["module"]), job["name"]))
        attrs = {(fn.arg_names.index(k),): v for k, v in job["attrs"].items()}
        src = ASTSource(fn, job["signature"], job["constexprs"], attrs)
        target = GPUTarget("cuda", job["arch"], 32)
        # Triton's own `ptxas -v` run prints its log; always compile (no cache hit) to get it
        log = io.StringIO()
        triton.knobs.nvidia.dump_ptxas_log = triton.knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=target, options=job["options"])
        stats = parse_ptxas(log.getvalue())
        if stats is None:
            raise RuntimeError("no ptxas -v log captured")
        res.update(stats, shared=ck.metadata.shared)
        lim, st, ld = SHARED_LIMIT[job["arch"]], res["spill_stores"], res["spill_loads"]
        reasons = [f"shared {res['shared']} B > {lim} B"] if res["shared"] > lim else []
        reasons += [f"spills {st} B st / {ld} B ld"] if st or ld else []
        res.update(status="FAIL" if reasons else "ok", reason="; ".join(reasons))
    except Exception as e:  # a compile error is a gate failure, with its message
        res["status"], res["reason"] = "FAIL", f"compile error: {type(e).__name__}: {str(e)[:300]}"
    res["seconds"] = round(time.time() - t0, 2)
    return res


def record(cases: list[Case]) -> list[Launch]:
    with record_launches() as launches:
        for case in cases:
            run_case(case)
    return launches


def run_gate(cases: list[Case], workers: int = 2) -> dict:
    """Record, plan and compile. Returns {"results": [...], "kernels": [...], "summary": {...}}."""
    import multiprocessing as mp

    t0 = time.time()
    launches = record(cases)
    jobs, labels = plan_jobs(launches)
    todo = [j for j in jobs if j["status"] == "compile"]
    done = [j for j in jobs if j["status"] == "pruned"]
    with mp.get_context("spawn").Pool(workers) as pool:  # spawn: fresh, uninterpreted triton
        done += pool.map(compile_job, todo, chunksize=1)
    for label in {(j["launch"], j["arch"]) for j in jobs}:  # no config: fails at run time
        if not any((j["launch"], j["arch"]) == label for j in todo):
            row = next(j for j in jobs if (j["launch"], j["arch"]) == label)
            done.append({**row, "status": "FAIL", "config": "(none)", "reason": "no config fits"})
    done.sort(key=lambda r: (r["launch"], r["arch"], r["config"]))
    kernels = sorted({la.name for la in launches})
    fails = [r for r in done if r["status"] == "FAIL"]
    compiled = [r for r in done if "shared" in r]  # compiled, whether or not it passed
    per = {f"{k}@sm_{a}": 0 for k in kernels for a in ARCHS}
    for r in compiled:
        per[f"{r['name']}@sm_{r['arch']}"] += 1
    n_pruned, secs = len(done) - len(todo), round(time.time() - t0, 1)
    summary = {"cases": len(cases), "launches": len(launches), "distinct_launches": len(labels)}
    summary.update(compiles=len(todo), pruned=n_pruned, failures=len(fails), seconds=secs)
    summary.update(kernels=kernels, compiled_per_kernel_arch=per)
    for r in done:  # JSON-safe
        r.pop("config_keys")
        r["constexprs"] = {k: _short(v) for k, v in r["constexprs"].items()}
    return {"results": done, "summary": summary}


def write_markdown(out: dict, path: str, mode: str) -> None:
    from gpu_suite import _git_commit as git_commit

    s = out["summary"]
    cmd = "python benchmarks/gpu_compile.py" + (" --ci" if mode == "ci" else "")
    lines = [
        f"# AOT compile gate: Triton kernels on sm_80 / sm_90\n\n`{cmd}`, commit {git_commit()}. "
        f"Regs/spills: Triton's ptxas -v; shared: compiled metadata, limit {SHARED_LIMIT[80]} B "
        f"(A100), {SHARED_LIMIT[90]} B (H100). A compile error, shared over the limit or any "
        "spill fails; configs the arch's pruner drops are listed as pruned, one row per launch.\n",
        f"**{s['launches']} launches ({s['distinct_launches']} distinct), {s['compiles']} "
        f"compiles, {s['pruned']} pruned, {s['failures']} failures** ({s['seconds']} s)\n",
        "| kernel | launch | constexprs | config | arch | regs | spill st/ld | shared B | status |"
        "\n|---|---|---|---|---|---|---|---|---|",
    ]
    pruned: dict[tuple, list] = {}
    for r in out["results"]:
        consts = " ".join(c for c in r["key_constexprs"].split() if not c.startswith("stride"))
        row = f"| {r['name']} | {r['launch']} | {consts} |"
        if r["status"] == "pruned":
            pruned.setdefault((row, r["arch"]), []).append(r["config"])
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else ""
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        row += f" {r['config']} | sm_{r['arch']} | {r.get('regs', '')} | {spill} |"
        lines.append(row + f" {r.get('shared', '')} | {status} |")
    for (row, arch), cfgs in pruned.items():
        lines.append(f"{row} {'; '.join(cfgs)} | sm_{arch} | | | | pruned |")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ci", action="store_true", help="representative subset (a few minutes)")
    ap.add_argument("--json", help="write machine-readable results here")
    ap.add_argument("--out", help="markdown path (default: results/gpu-compile.md, none for --ci)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.pop("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        sys.exit("gpu_compile: triton was imported under TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, no warning
    out = run_gate(ci_matrix() if args.ci else full_matrix(), args.workers)
    s = out["summary"]
    for r in out["results"]:
        if r["status"] == "FAIL":
            where = f"{r['name']} [{r['launch']}] config {r['config']} sm_{r['arch']}"
            print(f"FAIL {where}: {r['reason']}")
    print(f"gpu_compile: {s['launches']} launches ({s['distinct_launches']} distinct), ", end="")
    print(f"{s['compiles']} compiles, {s['pruned']} pruned, {s['failures']} failures")
    print("\n".join(f"  compiled {k}: {v}" for k, v in s["compiled_per_kernel_arch"].items()))
    md = args.out or (None if args.ci else os.path.join(HERE, "results", "gpu-compile.md"))
    if md:
        write_markdown(out, md, "ci" if args.ci else "full")
        print(f"wrote {md}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
