"""The durability probes of issue 15 that need no trained run: no pickle anywhere in mftk/, the
JSON + safetensors state file round trip, every file and folder fsynced before a checkpoint's
rename, the stop-signal handler (a second signal aborts, signals stop at once until armed, ignored
signals stay ignored), and a config error that leaves no output dir behind."""

import json
import os
import pathlib
import re
import signal

import pytest
import torch
from test_durability import ROOT, tiny_raw, write_config

from mftk.cli import main
from mftk.train import checkpointing as ckpt
from mftk.train import interrupt
from mftk.train.interrupt import StopSignals
from mftk.train.statefile import load_state, save_state

PACKAGE = os.path.join(ROOT, "mftk")


def test_no_pickle_in_the_package():
    """No torch.load, pickle or torch.distributed.checkpoint save/load (whose .metadata is a
    pickle) anywhere in mftk/."""
    bad = re.compile(
        r"torch\.load\s*\(|\bimport pickle\b|\bpickle\.\w+\(|weights_only|\bdcp\.(save|load)\("
    )
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted(pathlib.Path(PACKAGE).rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if bad.search(line)
    ]
    assert not hits, hits


def test_state_file_round_trip_keeps_types(tmp_path):
    """JSON + safetensors give back tuples, int dict keys, NaN / inf, every dtype, views and an
    AdamW state that loads; a reference to a tensor the file lacks is an error."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3, 2)
    opt.step()
    big = torch.arange(10.0)
    state = {
        "opt": opt.state_dict(),
        "rng": (3, tuple(range(5)), None),
        "nums": [float("nan"), float("inf"), -0.0, 1e-310, 2**40, True, None, "x"],
        "t": {"bf16": torch.ones(2, dtype=torch.bfloat16), "0d": torch.tensor(7), "view": big[2:5]},
        "__tuple__": 1,  # a plain key that looks like a tag
    }
    prefix = str(tmp_path / "s")
    save_state(state, prefix)
    got = load_state(prefix)
    assert got["rng"] == (3, (0, 1, 2, 3, 4), None) and got["__tuple__"] == 1
    assert list(got["opt"]["state"]) == [0] and got["opt"]["param_groups"][0]["betas"] == (
        0.9,
        0.999,
    )
    n = got["nums"]
    assert n[0] != n[0] and n[1:] == [float("inf"), -0.0, 1e-310, 2**40, True, None, "x"]
    assert torch.equal(got["t"]["view"], big[2:5]) and got["t"]["bf16"].dtype == torch.bfloat16
    assert got["t"]["0d"].shape == () and int(got["t"]["0d"]) == 7
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(got["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state[p]["exp_avg"])
    with open(prefix + ".json", "w") as f:
        json.dump({"a": {"__tensor__": "99"}}, f)
    with pytest.raises(ValueError, match="missing from the safetensors file"):
        load_state(prefix)
    with pytest.raises(TypeError, match="cannot store a set"):
        save_state({"s": {1}}, prefix)


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """seal: every file and folder of the checkpoint is fsynced, and the manifest written, before
    the rename; the parent folder after it. save_state fsyncs both of its files."""
    events = []
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: events.append(("fsync", os.path.abspath(p))))
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", a)), real_replace(a, b))
    )
    root = tmp_path / "checkpoints"
    tmp = root / "step-000003.tmp-h-1"
    (tmp / "adapters").mkdir(parents=True)
    (tmp / "adapters" / "w.safetensors").write_bytes(b"abc")
    (tmp / "trainer_state.json").write_text("{}")
    final = ckpt.seal(str(tmp), str(root / "step-000003"), "none", keep_last=2)
    i = events.index(("replace", str(tmp)))
    before = {p for kind, p in events[:i] if kind == "fsync"}
    want = {str(tmp / "adapters" / "w.safetensors"), str(tmp / "trainer_state.json")}
    assert want | {str(tmp), str(tmp / "adapters")} <= before
    assert events[i + 1] == ("fsync", str(root))
    man = ckpt.verify_checkpoint(final)
    assert man["files"]["adapters/w.safetensors"]["bytes"] == 3
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr("mftk.train.statefile.fsync_path", lambda p: synced.append(p))
    save_state({"a": torch.ones(2)}, str(tmp_path / "s"))
    assert len(synced) == 2 and str(tmp_path / "s.safetensors") in synced


def test_a_second_signal_aborts_and_unarmed_signals_stop_at_once(monkeypatch):
    """Not armed (setup, the first evaluation): SIGINT / SIGTERM stop at once. Armed: the first
    only marks the run; the same request delivered twice at once (torchrun forwards the
    terminal's) counts once; a later second signal aborts."""
    # the default handlers, whatever the shell that started pytest left (`cmd &` ignores SIGINT)
    old = {n: signal.signal(n, h) for n, h in DEFAULT_HANDLERS.items()}
    try:
        _second_signal_checks(monkeypatch)
    finally:
        for n, h in old.items():
            signal.signal(n, h)


DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def _second_signal_checks(monkeypatch):
    with StopSignals(announce=False) as s:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # not armed: setup, first evaluation
        with pytest.raises(SystemExit) as exc:
            signal.raise_signal(signal.SIGTERM)
        assert exc.value.code == 143
        s.armed = True
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # within REPEAT_S: the same request
        assert s.requested(lambda t: t) == signal.SIGTERM
        monkeypatch.setattr(interrupt, "REPEAT_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ignored_signals_stay_ignored():
    """A run started with SIGINT ignored (nohup, `cmd &` in a script) leaves it ignored."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals(announce=False) as s:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            s.armed = True
            signal.raise_signal(signal.SIGINT)
            assert s.received is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_config_error_leaves_no_output_dir_and_deep_json_is_a_data_error(tmp_path, capsys):
    """A data file with deeply nested JSON: `file:line: invalid JSON (nested too deeply)`, exit
    2, no traceback, and the output dir (not there before) is not left behind."""
    data = tmp_path / "deep.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    raw = tiny_raw(tmp_path / "out")
    raw["tasks"] = [{"name": "deep", "data": str(data)}]
    cfg = write_config(raw, tmp_path / "c.yaml")
    assert main(["train", cfg, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"mftk train: error: {data}:2: invalid JSON (nested too deeply)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
