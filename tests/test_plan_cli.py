"""The `mftk plan` command: its JSON output parses and its text report has every section, bad
input is one clear error (exit 2), and bad config files or plan options raise errors naming the
key. The arithmetic behind the plan is in test_plan.py."""

import json

import pytest
from test_plan import TINY

from mftk import plan as P


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("tiny")
    LlamaConfig(**TINY).to_json_file(str(d / "config.json"))
    return str(d / "config.json")


def _cli(argv, capsys):
    from mftk.cli import main

    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_parses(tiny_path, capsys):
    argv = ["--model", tiny_path, "--gpus", "3", "--gpu-mem-gb", "1", "--seq-len", "16",
            "--micro-batch", "2", "--rank", "3", "--tasks", "2", "--json"]  # fmt: skip
    rc, out, _ = _cli(argv, capsys)
    assert rc == 0
    p = json.loads(out)
    assert p["model"]["params"] == 45_800
    assert p["memory"]["allocated"] == pytest.approx(311_700)
    assert {r["key"] for r in p["memory"]["rows"]} >= {"base_weights", "activations", "fsdp_root"}
    assert isinstance(p["largest_micro_batch"], int)


def test_cli_text_report(tiny_path, capsys):
    rc, out, _ = _cli(["--model", tiny_path, "--gpus", "2", "--router", "--quantize", "nf4",
                       "--seq-len", "32", "--gpu", "h100"], capsys)  # fmt: skip
    assert rc == 0
    for s in ("per-GPU memory", "fits: YES", "largest micro-batch that fits",
              "without checkpointing", "4-bit constants (double quant)", "989 TFLOP/s",
              "tokens/s per GPU"):  # fmt: skip
        assert s in out, s


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "no-such-model"], "neither a shipped config"),
        (["--model", "deepseek-coder-33b", "--gpus", "0"], "--gpus: must be >= 1"),
        (["--model", "deepseek-coder-33b", "--rank", "x"], "--rank: expected an integer"),
        (["--model", "deepseek-coder-33b", "--mfu", "1.5"], "--mfu: must be a fraction"),
        (
            ["--model", "deepseek-coder-33b", "--gpu-mem-gb", "-4"],
            "--gpu-mem-gb: must be a positive",
        ),
        (["--model", "deepseek-coder-33b", "--quantize", "int3"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, needle, capsys):
    try:
        rc, _, err = _cli(argv, capsys)
    except SystemExit as e:  # argparse errors
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and needle in err, err


def test_bad_config_files_and_options(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        P.load_config(str(bad))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ValueError, match="model_type 'no-such-arch'"):
        P.load_config(str(odd))
    bad = (("gpus", 0), ("tasks", 0), ("micro_batch", 1.5), ("mfu", 0.0), ("quantize", "int8"),
           ("attention", "eager"), ("headroom", 1.0))  # fmt: skip
    for key, value in bad:
        with pytest.raises(ValueError, match=key):
            P.PlanOptions(**{key: value}).check()
    with pytest.raises(ValueError, match="gpu: unknown GPU"):
        P.PlanOptions(gpu="tpu").check()
