"""The launch/traffic model (benchmarks/launch_model.py) at a small shape, in a subprocess
without the Triton interpreter. Counts of the mftk kernels are not pinned (they change); the
base linear is: 2 launches (addmm fwd with bias, mm for dx), no exposed traffic."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import json, sys
sys.path.insert(0, "benchmarks")
import launch_model as lm
out = {}
for bias in (True, False):
    sh = lm.ModelShape(n=512, d=256, t=4, r=16, bias=bias)
    recs = lm.count(sh, base_only=True)
    out[f"base-bias{int(bias)}"] = dict(names=[r.name for r in recs], **lm.summarize(recs, sh))
for routing in ("hard", "soft"):
    for strategy in ("addmm", "fused"):
        sh = lm.ModelShape(n=512, d=256, t=4, r=16, routing=routing, strategy=strategy)
        recs = lm.count(sh)
        s = lm.summarize(recs, sh)
        s["triton"] = sum(r.kind == "triton" for r in recs)
        s["names"] = [r.name for r in recs]
        s["aten_base_gemms"] = sum(r.kind == "aten" and r.hidden for r in recs)
        out[f"{routing}-{strategy}"] = s
print(json.dumps(out))
"""


def _run():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_launch_model_counts():
    res = _run()
    assert res["base-bias1"]["names"] == ["aten.addmm", "aten.mm"]
    assert res["base-bias0"]["names"] == ["aten.mm", "aten.mm"]
    for key in ("base-bias0", "base-bias1"):
        assert res[key]["launches"] == 2
        assert res[key]["exposed_passes"] == 0
        assert res[key]["total_passes"] > 0
    for key in ("hard-addmm", "hard-fused", "soft-addmm", "soft-fused"):
        s = res[key]
        assert s["launches"] >= 2, key
        assert s["triton"] >= 1, key  # the Triton launches were caught
        assert s["exposed_passes"] >= 0 and s["total_passes"] >= s["exposed_passes"], key
        for dev, t in s["times"].items():
            assert t > res["base-bias1"]["times"][dev] * 0.5, (key, dev)
    # addmm strategy: the base GEMMs are cuBLAS calls the counter sees and hides
    assert res["hard-addmm"]["aten_base_gemms"] >= 1 and res["soft-addmm"]["aten_base_gemms"] >= 1


def test_gpu_suite_model_flag(tmp_path):
    """gpu_suite.py --model: the issue's shapes (meta tensors, seconds), written as markdown."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    suite = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
    p = subprocess.run(
        [sys.executable, suite, "--model", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = (tmp_path / "gpu-model.md").read_text()
    assert "not measurements" in text and "op / base" in text
    assert "hard routing" in text and "soft routing" in text and "D_in=D_out=7168" in text


def test_gpu_suite_smoke_runs_end_to_end(tmp_path):
    """gpu_suite.py --smoke: the whole GPU pipeline (correctness, every provider's timing, the
    report) on a tiny shape under the interpreter, so the script a GPU session runs is not first
    tried on the GPU (an import moved by a refactor once broke every provider)."""
    suite = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
    p = subprocess.run(
        [sys.executable, suite, "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = (tmp_path / "gpu-cpu-smoke.md").read_text()
    assert "error" not in text.lower(), text
    for provider in ("base", "mftk-addmm", "mftk-fused", "loop", "grouped_mm", "peft", "dense"):
        assert f"| {provider} |" in text, provider
    assert "model: addmm" in text


def test_model_prediction_beside_a_measurement():
    """The model's ratio that gpu_suite prints beside each measured one: the H200 figure of
    gpu-model.md for a covered card and square layer, None for other cards and non-square."""
    code = (
        "import json, sys\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "from model_report import predicted_ratio as p\n"
        "print(json.dumps([p('NVIDIA H200', 8192, 4096, 4096, 8, 16, 'hard', 'addmm'),\n"
        "                  p('NVIDIA H200', 8192, 4096, 4096, 8, 16, 'hard', 'fused'),\n"
        "                  p('NVIDIA L4', 8192, 4096, 4096, 8, 16, 'hard', 'addmm'),\n"
        "                  p('NVIDIA H200', 8192, 7168, 1024, 8, 16, 'hard', 'addmm')]))\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr[-3000:]
    addmm, fused, other_card, non_square = json.loads(p.stdout.strip().splitlines()[-1])
    assert 1.0 < addmm < 2.0 and 1.0 < fused < 2.0 and addmm != fused
    assert other_card is None and non_square is None
