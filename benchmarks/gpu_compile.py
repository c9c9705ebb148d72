"""Ahead-of-time compile gate for the Triton kernels, without a GPU (issue 12, item 1).

    python benchmarks/gpu_compile.py          # full matrix -> benchmarks/results/gpu-compile.md
    python benchmarks/gpu_compile.py --ci     # representative subset (a few minutes, 2 workers)
    python benchmarks/gpu_compile.py --json out.json

1. Record: Autotuner.run and JITFunction.run are patched to record each launch (kernel, bound
   args, constexpr kwargs, autotuner) and return without launching; the four custom ops
   (mftk.ops.triton_ops.{hard,soft}_{fwd,bwd}) then run on small CPU tensors (N=256, D=1024) over
   dtypes, T*R, strategies, determinism, bias, router bias and top_k. Outputs are garbage.
   Nothing is hard-coded: whatever kernels the ops launch are what gets compiled.
2. Specialise: each launch goes through Triton's own binder (signature, int/pointer
   specialisation, divisibility-16 attrs) for a CUDA target of capability 80 and 90, and is
   deduplicated by (kernel, signature, launch constexprs, attrs).
3. Compile every config the arch's pruner keeps (mftk.kernels._common.configs_for_arch when it
   exists, else all autotuner configs; a non-autotuned launch is one config) with triton.compile,
   then run the bundled ptxas -v on the PTX for registers and spills; shared memory comes from
   the compiled metadata.
Gate: a compile error, shared memory over the limit (SHARED_LIMIT) or any spill fails it. Configs
the pruner drops are reported as "pruned". Must run without TRITON_INTERPRET (main() drops it
before triton is imported; the tests call this file in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = (80, 90)
# Max dynamic shared memory per block with opt-in: A100 (sm_80), H100/H200 (sm_90).
SHARED_LIMIT = {80: 166_912, 90: 232_448}
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


# --- 1. recording launches ----------------------------------------------------------------


@dataclass
class Launch:
    """One intercepted kernel launch. args/kwargs: as passed to run (no grid/warmup)."""

    jit: object  # triton JITFunction
    autotuner: object | None  # triton Autotuner (outermost) or None
    args: tuple
    kwargs: dict
    launcher: object | None  # the Python function that launched it (first frame outside triton)

    @property
    def name(self) -> str:
        return self.jit.fn.__name__

    def named_args(self) -> dict:
        return {**dict(zip(self.jit.arg_names, self.args)), **self.kwargs}


def _unwrap(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _launcher(frame) -> object | None:
    """The first caller outside triton: the launcher function (for an optional `traffic`)."""
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if not (mod.startswith("triton") or mod == __name__):
            return frame.f_globals.get(frame.f_code.co_name)
        frame = frame.f_back
    return None


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
    out = []
    for dt in DTYPES:
        for t, r in TR:
            for strat in ("addmm", "fused"):
                for det in (False, True):
                    for bias in (False, True):
                        out.append(Case("hard", dt, t, r, strat, det, bias))
                        for rb in (False, True):
                            for k in (0, 2):
                                if k < t:
                                    out.append(Case("soft", dt, t, r, strat, det, bias, rb, k))
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


def run_case(case: Case, n: int = 256, d: int = 1024, device: str = "cpu") -> None:
    """Call the forward and backward op bodies of one case (inside record_launches)."""
    import torch

    from mftk.ops import triton_ops

    dt = getattr(torch, DTYPES[case.dtype])
    t, r = case.t, case.r
    g = torch.Generator().manual_seed(0)

    def rnd(*s, dtype=dt):
        if device == "meta":
            return torch.empty(*s, dtype=dtype, device="meta")
        return torch.randn(*s, generator=g).to(dtype)

    x, w, dy = rnd(n, d), rnd(d, d), rnd(n, d)
    b = rnd(d) if case.bias else None
    a, bb, s = rnd(t, r, d), rnd(t, d, r), rnd(t, dtype=torch.float32)
    prev_det = torch.are_deterministic_algorithms_enabled()
    triton_ops.set_strategy(case.strategy)
    torch.use_deterministic_algorithms(case.det)
    try:
        if case.routing == "hard":
            perm = torch.randperm(n, generator=g).to(device)
            offsets = torch.linspace(0, n * t / (t + 1), t + 1).to(torch.int64).to(device)
            y, shrink = triton_ops.hard_fwd(x, w, b, a, bb, s, perm, offsets)
            triton_ops.hard_bwd(dy, x, w, a, bb, s, perm, offsets, shrink)
        else:
            rw = rnd(t, d)
            rb = rnd(t) if case.rbias else None
            y, logits, probs, shrink = triton_ops.soft_fwd(x, w, b, a, bb, s, rw, rb, 1.0, case.top_k)
            triton_ops.soft_bwd(dy, None, x, w, a, bb, s, rw, probs, shrink, 1.0)
    finally:
        triton_ops.set_strategy(None)
        torch.use_deterministic_algorithms(prev_det)


# --- 2. specialisation and pruning --------------------------------------------------------


def _configs(launch: Launch, arch: int) -> tuple[list, list]:
    """(all configs, configs the pruner keeps on `arch`)."""
    import triton

    if launch.autotuner is None:
        opts = {k: launch.kwargs[k] for k in OPTION_KEYS if k in launch.kwargs}
        cfg = triton.Config({}, num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3))
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
    options = {k: v for k, v in kwargs.items() if k in OPTION_KEYS and v is not None}
    return dict(
        module=jit.fn.__module__,
        name=jit.fn.__name__,
        signature=signature,
        constexprs={names[k[0]]: v for k, v in constexprs.items()},
        attrs={names[k[0]]: v for k, v in attrs.items() if v},
        options=options,
        arch=arch,
        config=_cfg_str(cfg),
        config_keys=sorted(cfg.kwargs),
    )


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
                if ident in jobs:
                    if keep and jobs[ident]["status"] == "pruned":
                        jobs[ident]["status"] = "compile"
                    continue
                sp = sp0 if cfg is configs[0] else specialize(la, cfg, arch)
                sp["launch"] = labels[key]
                sp["key_constexprs"] = " ".join(f"{k}={v}" for k, v in key[3])
                sp["status"] = "compile" if keep else "pruned"
                jobs[ident] = sp
    return list(jobs.values()), labels


# --- 3. compile and measure ---------------------------------------------------------------

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from Triton's bundled ptxas -v (max over functions)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed: {p.stderr.strip()[:300]}")
    return parse_ptxas(p.stdout + p.stderr) or {k: 0 for k in _PTXAS_RE}


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
        src = ASTSource(fn, job["signature"], job["constexprs"], {(fn.arg_names.index(k),): v for k, v in job["attrs"].items()})  # fmt: skip
        log = io.StringIO()
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton's own ptxas -v run prints its log
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])  # fmt: skip
        stats = parse_ptxas(log.getvalue())
        if stats is None:  # cached compile: no ptxas ran, run it on the PTX
            stats = ptxas_stats(ck.asm["ptx"], job["arch"])
        res.update(stats, shared=ck.metadata.shared)
        reasons = []
        if res["shared"] > SHARED_LIMIT[job["arch"]]:
            reasons.append(f"shared {res['shared']} B > {SHARED_LIMIT[job['arch']]} B")
        if res["spill_stores"] or res["spill_loads"]:
            reasons.append(f"spills {res['spill_stores']} B st / {res['spill_loads']} B ld")
        res["status"] = "FAIL" if reasons else "ok"
        res["reason"] = "; ".join(reasons)
    except Exception as e:  # a compile error is a gate failure, with its message
        res["status"], res["reason"] = "FAIL", f"compile error: {type(e).__name__}: {str(e)[:300]}"
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _plain(job: dict) -> dict:
    """JSON-safe copy (constexpr values as strings)."""
    out = {k: v for k, v in job.items() if k not in ("constexprs", "config_keys")}
    out["constexprs"] = {k: _short(v) for k, v in job["constexprs"].items()}
    return out


def record(cases: list[Case]) -> list[Launch]:
    launches = []
    with record_launches() as rec:
        for case in cases:
            run_case(case)
        launches.extend(rec)
    return launches


def run_gate(cases: list[Case], workers: int = 2) -> dict:
    """Record, plan and compile. Returns {"results": [...], "kernels": [...], "summary": {...}}."""
    import multiprocessing as mp

    t0 = time.time()
    launches = record(cases)
    jobs, labels = plan_jobs(launches)
    todo = [j for j in jobs if j["status"] == "compile"]
    done = [j for j in jobs if j["status"] == "pruned"]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            done += pool.map(compile_job, todo, chunksize=1)
    else:
        done += [compile_job(j) for j in todo]
    done.sort(key=lambda r: (r["launch"], r["arch"], r["config"]))
    kernels = sorted({la.name for la in launches})
    fails = [r for r in done if r["status"] == "FAIL"]
    summary = dict(
        cases=len(cases),
        launches=len(launches),
        distinct_launches=len(labels),
        compiles=len(todo),
        pruned=len(done) - len(todo),
        failures=len(fails),
        kernels=kernels,
        compiled_per_kernel_arch={
            f"{k}@sm_{a}": sum(r["name"] == k and r["arch"] == a and r["status"] in ("ok", "FAIL")
                               and not r.get("reason", "").startswith("compile error")
                               for r in done)
            for k in kernels for a in ARCHS
        },  # fmt: skip
        seconds=round(time.time() - t0, 1),
    )
    return {"results": [_plain(r) for r in done], "summary": summary}


def write_markdown(out: dict, path: str, mode: str) -> None:
    s = out["summary"]
    lines = [
        "# AOT compile gate: mftk Triton kernels on sm_80 / sm_90 (no GPU needed)\n",
        f"`python benchmarks/gpu_compile.py{' --ci' if mode == 'ci' else ''}`; commit "
        f"{_git_commit()}. Regs/spills: Triton's bundled ptxas -v; shared: compiled metadata; "
        f"limits {SHARED_LIMIT[80]} B (A100) / {SHARED_LIMIT[90]} B (H100). Gate: compile error, "
        "shared over limit or any spill fails; configs the arch pruner drops are 'pruned'.\n",
        f"**{s['launches']} launches recorded ({s['distinct_launches']} distinct), "
        f"{s['compiles']} compiles, {s['pruned']} pruned, {s['failures']} failures** "
        f"({s['cases']} op cases, {s['seconds']} s).\n",
        "| kernel | launch | key constexprs | config | arch | regs | spill st/ld B | shared B "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        regs = r.get("regs", "")
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else ""
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(
            f"| {r['name']} | {r['launch']} | {r['key_constexprs']} | {r['config']} | "
            f"sm_{r['arch']} | {regs} | {spill} | {r.get('shared', '')} | {status} |"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=HERE)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ci", action="store_true", help="representative subset (a few minutes)")
    ap.add_argument("--json", help="write machine-readable results here")
    ap.add_argument("--out", help="markdown path (default benchmarks/results/gpu-compile.md; "
                    "--ci writes none unless given)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        if "triton" in sys.modules:
            print("gpu_compile: triton was imported under TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        os.environ.pop("TRITON_INTERPRET")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, no warning
    out = run_gate(ci_matrix() if args.ci else full_matrix(), args.workers)
    s = out["summary"]
    for r in out["results"]:
        if r["status"] == "FAIL":
            print(f"FAIL {r['name']} [{r['launch']}] config {r['config']} sm_{r['arch']}: "
                  f"{r['reason']}")  # fmt: skip
    print(f"gpu_compile: {s['launches']} launches ({s['distinct_launches']} distinct), "
          f"{s['compiles']} compiles, {s['pruned']} pruned, {s['failures']} failures, "
          f"{s['seconds']} s")  # fmt: skip
    for k, v in s["compiled_per_kernel_arch"].items():
        print(f"  compiled {k}: {v}")
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
