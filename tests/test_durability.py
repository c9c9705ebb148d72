"""Checkpoints that cannot be poisoned or mixed, clean interruption, no files in the wrong place
(issue 15): one test per probe.

A tiny two-task run (a generation task and a classifier, 6 steps, a checkpoint every 2) is trained
once; the tests copy its output dir and break it: a pickled trainer state, a flipped bit, a
truncated or empty file, stale temp folders, a second run into the same dir, SIGINT / SIGTERM in a
real `mftk train` process; and the commands that must not write into the current directory. The
probes that need no trained run (no pickle in mftk/, the state file, fsync, the signal handler, a
config error) are in test_durability_units.py.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mftk.cli import main
from mftk.train import checkpointing as ckpt
from mftk.train.config import ConfigError, config_from_dict
from mftk.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tiny")


def tiny_raw(out, steps=6):
    """completion + bug_detection (classify) of the tiny example: 20 pretraining steps, one stage
    of `steps`, a checkpoint every 2 steps, the base cached in out/cache (the default)."""
    with open(os.path.join(EXAMPLE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    tasks = {t["name"]: t for t in raw["tasks"]}
    raw["tasks"] = [tasks["completion"], tasks["bug_detection"]]
    for t in raw["tasks"]:
        for key in ("data", "exec_problems"):
            if key in t:
                t[key] = os.path.abspath(os.path.join(EXAMPLE, t[key]))
    raw["model"]["pretrain"]["steps"] = 20
    raw["data"]["eval_max_samples"] = 8
    raw["train"].update(eval_every=3, log_every=1, warmup_steps=1, threads=1)
    raw["stages"] = [{"name": "a", "steps": steps}]
    raw["output"] = {"dir": str(out), "save_every": 2}
    return raw


def write_config(raw, path):
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def train(raw, **kw):
    logs = []
    cfg = config_from_dict(json.loads(json.dumps(raw)), EXAMPLE)
    metrics = Trainer(cfg, progress=False, log=logs.append, **kw).train()
    return metrics, logs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The uninterrupted 6-step run: checkpoints step-000004 and step-000006 are kept."""
    tmp = tmp_path_factory.mktemp("durability")
    raw = tiny_raw(tmp / "base")
    metrics, _ = train(raw)
    assert sorted(os.listdir(tmp / "base" / "checkpoints")) == ["step-000004", "step-000006"]
    return {"out": tmp / "base", "raw": raw, "metrics": metrics}


def copy_run(base, dst):
    shutil.copytree(base["out"], dst)
    raw = json.loads(json.dumps(base["raw"]))
    raw["output"]["dir"] = str(dst)
    return raw


# ------------------------------------------------------------------------------ checkpoints


class _Payload:
    """Unpickling this (torch.load(weights_only=False)) creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_checkpoint_runs_no_code(base, tmp_path):
    """A checkpoint whose trainer_state.pt would run code when unpickled is refused, unread, with
    a message naming the old format; resume falls back to the valid checkpoint before it."""
    raw = copy_run(base, tmp_path / "run")
    step6 = tmp_path / "run" / "checkpoints" / "step-000006"
    marker = tmp_path / "pwned"
    shutil.rmtree(step6)
    step6.mkdir()
    torch.save({"step": 6, "evil": _Payload(str(marker))}, step6 / "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="older mftk .* pickled trainer_state.pt"):
        ckpt.verify_checkpoint(str(step6))
    metrics, logs = train(raw, resume=True)
    assert not marker.exists()
    assert metrics["resumed_from"].endswith("step-000004")
    assert any("skipping" in x and "older mftk" in x for x in logs)
    assert metrics["history"] == base["metrics"]["history"]  # the same run, bit for bit


def test_flipped_bit_is_detected_and_resume_falls_back(base, tmp_path):
    """One flipped bit inside a safetensors file: its sha256 no longer matches the manifest;
    --resume reports it and continues from the checkpoint before, reproducing the run."""
    raw = copy_run(base, tmp_path / "run")
    ck = tmp_path / "run" / "checkpoints"
    f = ck / "step-000006" / "adapters" / "mftk_adapters.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="mftk_adapters.safetensors is corrupt"):
        ckpt.verify_checkpoint(str(ck / "step-000006"))
    ckpt.verify_checkpoint(str(ck / "step-000004"))
    metrics, logs = train(raw, resume=True)
    assert metrics["resumed_from"].endswith("step-000004")
    assert any("skipping" in x and "corrupt" in x for x in logs)
    assert metrics["history"] == base["metrics"]["history"]


def test_truncated_or_empty_files_fall_back_then_fail_clearly(base, tmp_path, capsys):
    """A truncated state file: the checkpoint before is used. When every checkpoint is broken
    (an empty file in the other), `mftk train --resume` says so in one line, exit 2."""
    raw = copy_run(base, tmp_path / "run")
    ck = tmp_path / "run" / "checkpoints"
    st = ck / "step-000006" / "trainer_state.safetensors"
    size = st.stat().st_size
    st.write_bytes(st.read_bytes()[: size // 2])
    logs = []
    assert ckpt.latest_valid(str(ck), logs.append) == str(ck / "step-000004")
    assert f"trainer_state.safetensors is truncated ({size // 2} of {size} bytes)" in logs[0]
    (ck / "step-000004" / "trainer_state.json").write_text("")
    cfg = write_config(raw, tmp_path / "c.yaml")
    assert main(["train", cfg, "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mftk train: error: --resume: no valid checkpoint under" in err
    assert "trainer_state.json is truncated (0 of" in err and "Traceback" not in err


def test_stale_temp_folders_of_dead_processes_are_removed(base, tmp_path):
    """At start, temp folders of dead processes on this host go; a live process's, another
    host's and complete checkpoints stay."""
    raw = copy_run(base, tmp_path / "run")
    ck = tmp_path / "run" / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        names = {
            "dead": f"step-000008.tmp-{host}-{dead.pid}",
            "old_style": f"step-000010.tmp-{dead.pid}",
            "alive": f"step-000012.tmp-{host}-{alive.pid}",
            "other_host": f"step-000014.tmp-elsewhere-{dead.pid}",
        }
        for n in names.values():
            (ck / n).mkdir()
            (ck / n / "trainer_state.json").write_text("{}")
        metrics, logs = train(raw, resume=True)
        left = sorted(os.listdir(ck))
    finally:
        alive.kill()
        alive.wait()
    assert names["dead"] not in left and names["old_style"] not in left
    assert names["alive"] in left and names["other_host"] in left
    assert {"step-000004", "step-000006"} <= set(left)
    assert any("removed 2 unfinished checkpoint(s)" in x for x in logs)


# ------------------------------------------------------------------------------ runs


def test_second_run_into_an_output_dir_is_refused_unless_overwrite(base, tmp_path, capsys):
    """A dir holding a run's outputs: refused without --resume (one line, exit 2), also for
    --resume when there is no checkpoint to continue; --overwrite removes that run's outputs and
    keeps the tiny base's cache/ (reused, not rebuilt) and unrelated files."""
    raw, out = copy_run(base, tmp_path / "run"), tmp_path / "run"
    (out / "notes.txt").write_text("mine")
    cfg = write_config(raw, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="holds a previous run's outputs"):
        train(raw)
    assert main(["train", cfg, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a previous run's outputs (checkpoints, adapters, peft, metrics.json" in err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert main(["train", cfg, "--resume", "--overwrite"]) == 2
    assert main(["train", cfg, "--overwrite", "--max-steps", "2", "--no-progress"]) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002"]  # the old run's are gone
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["resumed_from"] is None and m["model"]["pretrain"]["cached"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "cache").is_dir()
    shutil.rmtree(out / "checkpoints")
    assert main(["train", cfg, "--resume", "--no-progress"]) == 2
    assert "--resume: no checkpoint to continue" in capsys.readouterr().err


def _wait_for(log_path, pattern, proc, timeout=240.0):
    """The first match of pattern in the process's log, polling; fails if it exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if m := re.search(pattern, log_path.read_text()):
            return m
        assert proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} within {timeout}s: {log_path.read_text()[-3000:]}")


def _terminal_signals():
    """The child starts as from a terminal, SIGINT not ignored (pytest may run under `cmd &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(cmd, log_path, pattern, sig):
    """Run cmd, send sig once its log matches pattern; returns (exit code, log)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_terminal_signals
        )
    try:
        _wait_for(log_path, pattern, proc)
        proc.send_signal(sig)
        rc = proc.wait(timeout=240)  # generous: a loaded 2-core CI machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log_path.read_text()


def test_sigint_and_sigterm_save_a_checkpoint_and_resume_continues(base, tmp_path):
    """A real `mftk train` gets SIGINT after its first step: it saves a checkpoint at the step
    boundary, prints the resume command and exits 130. The printed command resumes; SIGTERM
    then stops it the same way (143). Resumed to a fixed step, the run equals an uninterrupted
    one."""
    out = tmp_path / "run"
    shutil.copytree(base["out"] / "cache", out / "cache")
    raw = tiny_raw(out, steps=300)
    raw["output"]["save_every"] = None
    cfg = write_config(raw, tmp_path / "long.yaml")
    cmd = [sys.executable, "-m", "mftk", "train", cfg, "--no-progress"]
    rc, log = _interrupt(cmd, tmp_path / "a.log", r"step 1/300 ", signal.SIGINT)
    assert rc == 130, log[-3000:]
    assert (m := re.search(r"interrupted by SIGINT at step (\d+); checkpoint (\S+)", log)), log
    k, path = int(m[1]), m[2]
    assert path == str(out / "checkpoints" / f"step-{k:06d}") and 1 <= k < 300
    ckpt.verify_checkpoint(path)
    resume = re.search(r"resume with: (.*)", log)[1]
    assert resume == f"mftk train {cfg} --resume --no-progress"
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    cmd = [sys.executable, "-m", *resume.split()]
    rc, log = _interrupt(cmd, tmp_path / "b.log", rf"step {k + 1}/300 ", signal.SIGTERM)
    assert rc == 143, log[-3000:]
    assert f"resumed from {path} at step {k}" in log
    k2 = int(re.search(r"interrupted by SIGTERM at step (\d+)", log)[1])
    assert k2 > k and sorted(os.listdir(out / "checkpoints"))[-1] == f"step-{k2:06d}"
    got, _ = train(raw, resume=True, max_steps=k2 + 1)
    raw["output"]["dir"] = str(tmp_path / "straight")
    want, _ = train(raw, max_steps=k2 + 1)
    assert got["history"] == want["history"] and got["steps"] == k2 + 1


def test_compare_and_scan_write_nothing_unless_given_a_path(base, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = str(base["out"])
    assert main(["compare", out, out, "--names", "a,b"]) == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text("def f(x):\n    return x + 1\n")
    args = ["scan", "--adapters", f"{out}/adapters", "--task", "bug_detection", "--no-progress"]
    assert main([*args, str(src)]) == 0
    assert "1 units in 1 files" in capsys.readouterr().out
    assert os.listdir(cwd) == [] and os.listdir(src) == ["m.py"]
    assert main([*args, "--output", str(tmp_path / "r.json"), str(src)]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["files"] == 1
