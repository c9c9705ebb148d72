"""The AOT compile gate (benchmarks/gpu_compile.py --ci): every Triton kernel the ops launch
compiles for sm_80 and sm_90 without spills or shared memory over the limit. No GPU needed; the
compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for pytest)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_compile.py")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_compile_gate_ci(tmp_path):
    out = tmp_path / "gate.json"
    p = subprocess.run(
        [sys.executable, SCRIPT, "--ci", "--json", str(out)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800,
    )  # fmt: skip
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    s = res["summary"]
    fails = [
        f"{r['name']} [{r['launch']}] {r['config']} sm_{r['arch']}: {r['reason']}"
        for r in res["results"]
        if r["status"] == "FAIL"
    ]
    # every kernel the ops launched got at least one config compiled, for both archs
    assert s["kernels"], "no Triton launch was recorded"
    for kernel in s["kernels"]:
        for arch in (80, 90):
            assert s["compiled_per_kernel_arch"][f"{kernel}@sm_{arch}"] >= 1, (kernel, arch)
    assert not fails, f"{len(fails)} gate failures:\n" + "\n".join(fails[:40])
    assert p.returncode == 0, p.stdout[-3000:]


def test_recorder_sees_launches_and_specialises():
    """Recording finds launches of several kernels, and Triton's binder gives a signature."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import gpu_compile as g\n"
        "ls = g.record([g.Case('hard', 'bf16', 8, 16, 'addmm', False, True)])\n"
        "assert len(ls) >= 2, ls\n"
        "sp = g.specialize(ls[0], g._configs(ls[0], 90)[0][0], 90)\n"
        "assert any(v.startswith('*bf16') for v in sp['signature'].values()), sp['signature']\n"
        "print(len(ls), sorted({la.name for la in ls}))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_ptxas_log_parser():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_compile import parse_ptxas

    log = (
        "ptxas info    : Used 255 registers, used 1 barriers, 98304 bytes smem\n"
        "ptxas info    : 0 bytes gmem\n    184 bytes stack frame, 184 bytes spill stores, "
        "176 bytes spill loads\n"
    )
    assert parse_ptxas(log) == {"regs": 255, "spill_stores": 184, "spill_loads": 176}
    assert parse_ptxas("") is None
