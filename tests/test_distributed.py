"""FSDP2 data-parallel training (mftk/train/distributed.py), in real runs.

- 2 gloo ranks under torchrun on the tiny model give the per-step losses, evaluations and final
  adapters of one process on the same global batch (hard routing with activation checkpointing
  and gradient accumulation; soft routing with router losses and the focal loss);
- a sharded checkpoint resumes on 2 ranks (bit for bit) and on 1 rank;
- adapter.mode shared on a layer range, and hybrid, train under fsdp2; resumed on more ranks,
  each rank draws its own dropout masks.

The pieces checked in one process (loss shares, the batch split, seeds, the config section) are in
test_distributed_units.py.
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mftk.train.distributed as D
from mftk.train.config import config_from_dict
from mftk.train.loop import Trainer
from mftk.train.statefile import load_state

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "examples", "tiny")
TOL = dict(rtol=2e-5, atol=2e-5)  # fp32: reduction order differs between 1 and 2 ranks


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist_cache"))


def tiny_raw(cache_dir, out, **over):
    """Three tasks of the tiny example's data on a 2-layer tiny Llama (20 pretraining steps,
    cached), 4 steps of one stage."""
    data = os.path.join(os.path.abspath(EXAMPLE), "data")
    raw = {
        "tasks": [
            {"name": "completion", "data": f"{data}/completion/*.jsonl"},
            {
                "name": "bugs",
                "data": f"{data}/bugs/*.csv",
                "prompt_template": "Is there a bug?\n{code}\nAnswer:",
                "completion": "verdict",
            },
            {"name": "docstrings", "data": f"{data}/docstrings/*.jsonl"},
        ],
        "model": {
            "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
            "vocab_size": 512,
            "attn_implementation": "eager",
            "pretrain": {"steps": 20, "lr": 0.003, "batch_size": 8},
            "cache_dir": cache_dir,
        },
        "adapter": {"rank": 8, "alpha": 16},
        "data": {"seq_len": 128, "eval_fraction": 0.1, "eval_max_samples": 8},
        "train": {"lr": 0.003, "warmup_steps": 1, "eval_every": 2, "log_every": 1, "threads": 1},
        "loss": {"mode": "balanced"},
        "stages": [{"name": "a", "steps": 4}],
        "output": {"dir": str(out), "save_every": 2},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return raw


def one_process(raw):
    """The plain (one-process) Trainer, in this process."""
    return Trainer(config_from_dict(copy.deepcopy(raw), EXAMPLE), progress=False, log=lambda _: 0)


def torchrun(nproc, raw, tmp_path, *args, name="cfg"):
    """`torchrun --standalone --nproc_per_node nproc -m mftk train CFG` (gloo on the CPU);
    returns metrics.json of the run's output dir."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", "mftk", "train", str(path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=170, env=env, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = args[args.index("-o") + 1] if "-o" in args else raw["output"]["dir"]
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f), res.stderr


def adapters(out):
    return load_file(os.path.join(out, "adapters", "mftk_adapters.safetensors"))


def assert_close_runs(got, want, exact=False):
    hg, hw = got["history"], want["history"]
    assert len(hg["loss"]) == len(hw["loss"])
    for key in ("loss", "lr", "tokens"):
        if exact:
            assert hg[key] == hw[key], (key, hg[key], hw[key])
        a, b = (
            torch.tensor(hg[key], dtype=torch.float64),
            torch.tensor(hw[key], dtype=torch.float64),
        )
        err = (a - b).abs().max().item()
        assert torch.allclose(a, b, **TOL), f"{key}: max error {err:.3g}: {hg[key]} vs {hw[key]}"
    for t in want["tasks"]:
        for part in ("train", "eval"):
            assert [x is None for x in hg[part][t]] == [x is None for x in hw[part][t]]
            a = torch.tensor([x for x in hg[part][t] if x is not None], dtype=torch.float64)
            b = torch.tensor([x for x in hw[part][t] if x is not None], dtype=torch.float64)
            assert torch.allclose(a, b, **TOL), (part, t, (a - b).abs().max().item())
    assert hg["eval_step"] == hw["eval_step"]


def assert_same_adapters(out_a, out_b, atol=2e-5):
    a, b = adapters(out_a), adapters(out_b)
    assert a.keys() == b.keys()
    errs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= atol, f"max error {errs[worst]:.3g} at {worst}"
    assert all(a[k].dtype == b[k].dtype for k in a)


# ----------------------------------------------------------------------------- torchrun runs


@pytest.fixture(scope="module")
def hard_runs(cache_dir, tmp_path_factory):
    """One process (global batch 4 × accum 2) and 2 FSDP2 ranks (2 each × accum 2, activation
    checkpointing), hard routing, balanced loss, clipping at 0.2 (grad norms are ~0.3); both
    save at steps 2 and 4. Records the one-process run's grad norms."""
    tmp = tmp_path_factory.mktemp("hard")
    over = dict(train={"batch_size": 4, "grad_accum": 2, "clip": 0.2})
    raw1 = tiny_raw(cache_dir, tmp / "one", **over)
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(clip(*a, **k)))
        single = one_process(raw1).train()  # also fills the tiny-model cache for the ranks
    # (the first run also pretrains the tiny base, which clips too: keep the last steps)
    single["grad_norm"] = [float(x) for x in norms[-len(single["history"]["loss"]) :]]
    raw2 = tiny_raw(cache_dir, tmp / "two", **over)
    raw2["train"]["batch_size"] = 2
    raw2["distributed"] = {"strategy": "fsdp2", "activation_checkpointing": True}
    dist2, logs = torchrun(2, raw2, tmp)
    return {"tmp": tmp, "raw1": raw1, "raw2": raw2, "single": single, "dist": dist2, "logs": logs}


def test_fsdp2_two_ranks_match_one_process(hard_runs):
    r = hard_runs
    assert r["dist"]["steps"] == 4 and r["single"]["steps"] == 4
    assert_close_runs(r["dist"], r["single"])
    assert r["dist"]["train_tokens"] == r["single"]["train_tokens"]
    assert_same_adapters(r["tmp"] / "two", r["tmp"] / "one")
    # clipping used the global norm over all shards (and really clipped)
    got, want = r["dist"]["history"]["grad_norm"], r["single"]["grad_norm"]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5), (got, want)
    assert max(want) > 0.2
    for t in r["single"]["tasks"]:  # PEFT exports written by rank 0 from the gathered adapters
        a = load_file(r["tmp"] / "two" / "peft" / t / "adapter_model.safetensors")
        b = load_file(r["tmp"] / "one" / "peft" / t / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], **TOL) for k in a)
    assert (r["tmp"] / "two" / "loss.png").is_file()
    # only rank 0 logs: one line per step
    assert r["logs"].count("step 3/4 [a] loss") == 1
    assert "fsdp2: 2 ranks (gloo, cpu), 2 decoder layers" in r["logs"]
    assert "activation checkpointing on" in r["logs"]
    ck = r["tmp"] / "two" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step-000002", "step-000004"]  # no .tmp left over
    files = ("full_state", "trainer_state", "rng-rank0", "rng-rank1")
    assert {f"{f}.{e}" for f in files for e in ("json", "safetensors")} | {"manifest.json"} == set(
        os.listdir(ck / "step-000002")
    )
    # per-rank dropout seeds: rank 0 keeps the one-process stream, rank 1 has its own (with
    # dropout 0 neither is drawn from, and the runs above still match)
    rng = [load_state(str(ck / "step-000002" / f"rng-rank{k}"))["torch"] for k in (0, 1)]
    one = load_state(str(r["tmp"] / "one" / "checkpoints" / "step-000002" / "trainer_state"))
    assert torch.equal(rng[0], one["rng"]["torch"]) and not torch.equal(rng[0], rng[1])
    torch.manual_seed(r["raw2"]["train"].get("seed", 0) + D.RANK_SEED_STRIDE)
    assert torch.equal(rng[1], torch.get_rng_state())


@pytest.mark.parametrize("nproc, batch", [(2, 2), (1, 4)], ids=["2ranks", "1rank"])
def test_sharded_checkpoint_resumes(hard_runs, nproc, batch):
    """Resume the 2-rank run's step-2 checkpoint on 2 ranks (bit for bit) and on 1 rank with
    the same global batch (the full adapters and AdamW state: each rank keeps its shard)."""
    r, tmp = hard_runs, hard_runs["tmp"]
    out = tmp / f"resume{nproc}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp / "two" / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002"
    )
    raw = copy.deepcopy(r["raw2"])
    raw["train"]["batch_size"] = batch
    got, logs = torchrun(nproc, raw, tmp, "-o", str(out), "--resume", name=f"r{nproc}")
    assert got["resumed_from"].endswith("step-000002"), logs[-2000:]
    assert "resumed from" in logs and f"fsdp2: {nproc} ranks" in logs
    if nproc == 2:
        assert_close_runs(got, r["dist"], exact=True)
        assert_same_adapters(out, tmp / "two", atol=0.0)
    else:
        assert_close_runs(got, r["dist"])
        assert_same_adapters(out, tmp / "two")


def test_fsdp2_bf16_base_fp32_masters(hard_runs):
    """bf16 base, fp32 adapter masters, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    on 2 gloo ranks: every parameter reaches the mftk op in bf16 (it refuses mixed dtypes), the
    gathered adapters are fp32, and the losses follow the fp32 one-process run within bf16
    tolerance (1%)."""
    tmp = hard_runs["tmp"]
    raw = copy.deepcopy(hard_runs["raw2"])
    raw["model"]["dtype"] = "bfloat16"
    raw["distributed"]["mixed_precision"] = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    raw["output"]["dir"] = str(tmp / "bf16")
    got, logs = torchrun(2, raw, tmp, name="bf16")
    assert "params in torch.bfloat16, grads reduced in float32, adapters fp32" in logs
    a = torch.tensor(got["history"]["loss"])
    b = torch.tensor(hard_runs["single"]["history"]["loss"])
    assert torch.allclose(a, b, rtol=1e-2), (a, b)
    ad = adapters(tmp / "bf16")
    assert {v.dtype for k, v in ad.items() if k.endswith(("lora_a", "lora_b"))} == {torch.float32}
    # (not compared with the fp32 run's: lora_a is initialised in the base dtype, so a bf16 base
    # draws different initial values) trained: lora_b moved off its zero init, all finite
    assert all(bool(torch.isfinite(v).all()) for v in ad.values())
    assert all(ad[k].abs().max() > 0 for k in ad if k.endswith("lora_b"))


def test_resume_with_another_global_batch_is_refused(hard_runs):
    """A different global batch (batch_size × ranks) is a different run (no torchrun here: a
    group of one)."""
    tmp = hard_runs["tmp"]
    out = tmp / "refused"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp / "two" / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002"
    )
    raw = copy.deepcopy(hard_runs["raw2"])
    raw["train"]["batch_size"] = 3
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = subprocess.run(
        [sys.executable, "-m", "mftk", "train", str(path), "-o", str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "global batch" in res.stderr, res.stderr[-2000:]


def one_vs_two_ranks(cache_dir, tmp_path, over):
    """The tiny config with `over`, batch 4 in one process (out one/) and 2 x 2 on 2 fsdp2 ranks
    (out two/); asserts the runs match and returns (2-rank metrics, one-process metrics)."""
    single = one_process(tiny_raw(cache_dir, tmp_path / "one", **over)).train()
    raw2 = tiny_raw(cache_dir, tmp_path / "two", **over)
    raw2["train"]["batch_size"] = 2
    raw2["distributed"] = {"strategy": "fsdp2"}
    got, _ = torchrun(2, raw2, tmp_path)
    assert_close_runs(got, single)
    return got, single


def test_fsdp2_router_focal_matches_one_process(cache_dir, tmp_path):
    over = dict(
        adapter={"router": "softmax"},
        loss={"mode": "focal", "focal_gamma": 1.5, "router_balance": 0.1},
        stages=[{"steps": 3}],
        train={"batch_size": 4, "eval_every": 3},
        data={"packing": False},
    )
    got, single = one_vs_two_ranks(cache_dir, tmp_path, over)
    a = torch.tensor(got["history"]["router_accuracy"])
    b = torch.tensor(single["history"]["router_accuracy"])
    assert torch.allclose(a, b, atol=1e-6)
    assert_same_adapters(tmp_path / "two", tmp_path / "one")
    assert any(k.endswith("router_weight") for k in adapters(tmp_path / "two"))


def test_flash_attention_config_runs_sdpa_without_flash_attn(hard_runs):
    """`attn_implementation: flash_attention_2` where flash-attn cannot run (CPU): SDPA with the
    block mask; also fsdp2 without torchrun (a process group of one)."""
    assert not D.flash_attention_available(torch.device("cpu"))
    tmp = hard_runs["tmp"]
    raw = copy.deepcopy(hard_runs["raw2"])
    raw["model"]["attn_implementation"] = "flash_attention_2"
    raw["stages"] = [{"steps": 1}]
    raw["train"]["batch_size"] = 4  # the global batch of the runs above, on one rank
    raw["output"] = {"dir": str(tmp / "flash")}
    path = tmp / "flash.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = subprocess.run(
        [sys.executable, "-m", "mftk", "train", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "flash-attn is not usable here" in res.stderr
    assert "fsdp2: 1 ranks (gloo, cpu)" in res.stderr and "attention sdpa" in res.stderr
    m = json.loads((tmp / "flash" / "metrics.json").read_text())
    assert abs(m["history"]["loss"][0] - hard_runs["single"]["history"]["loss"][0]) < 1e-4


def test_shared_mode_with_layers_two_ranks_match_one_process(cache_dir, tmp_path):
    """adapter.mode shared (one adapter for all tasks) on a layer range under fsdp2: 2 ranks
    match one process, and the exports name the adapter (`shared`), not the tasks."""
    over = dict(
        adapter={"rank": 4, "alpha": 8, "mode": "shared", "layers": "1:"},
        train={"batch_size": 4},
        stages=[{"name": "a", "steps": 2}],
    )
    got, single = one_vs_two_ranks(cache_dir, tmp_path, over)
    assert_same_adapters(tmp_path / "two", tmp_path / "one")
    ad = adapters(tmp_path / "two")
    assert ad and all(".layers.1." in k for k in ad)  # layers "1:" of 2
    assert all(v.shape[0] == 1 for k, v in ad.items() if k.endswith(("lora_a", "lora_b")))
    assert os.listdir(tmp_path / "two" / "peft") == ["shared"]
    assert set(got["eval_after"]) == set(single["tasks"])  # losses stay per task


def test_dropout_streams_differ_after_resuming_on_more_ranks(cache_dir, tmp_path):
    """adapter.dropout > 0: an fsdp2 run on one rank (no torchrun) stops at step 2; resumed on
    2 ranks, the rank the checkpoint lacks draws its own dropout masks (seeded from its rank
    and the step), not a copy of rank 0's stream."""
    raw = tiny_raw(cache_dir, tmp_path / "out", adapter={"rank": 4, "alpha": 8, "dropout": 0.1})
    raw["train"]["batch_size"] = 4
    raw["distributed"] = {"strategy": "fsdp2"}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "mftk", "train", str(path), "--no-progress", "--max-steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = tmp_path / "out" / "checkpoints"
    assert "rng-rank1.json" not in os.listdir(ck / "step-000002")
    raw["train"]["batch_size"] = 2  # the same global batch on 2 ranks
    got, logs = torchrun(2, raw, tmp_path, "--resume", name="two")
    assert got["resumed_from"].endswith("step-000002") and got["steps"] == 4, logs[-2000:]
    assert all(math.isfinite(x) for x in got["history"]["loss"])
    assert {"rng-rank0.json", "rng-rank1.json"} <= set(os.listdir(ck / "step-000004"))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_fsdp2_bf16_on_gpus(cache_dir, tmp_path):
    """bf16 base, fp32 adapter masters, bf16 compute, activation checkpointing on every visible
    GPU (nccl); flash-attn varlen when installed, SDPA otherwise, agree on the first loss."""
    n = torch.cuda.device_count()
    runs = {}
    attns = ["sdpa"] + (["flash_attention_2"] if D.flash_attention_available(
        torch.device("cuda")) else [])  # fmt: skip
    for attn in attns:
        raw = tiny_raw(cache_dir, tmp_path / attn, stages=[{"steps": 6}])
        raw["model"].update(dtype="bfloat16", attn_implementation=attn)
        raw["train"].update(batch_size=max(1, 8 // n), device="cuda")
        raw["distributed"] = {
            "strategy": "fsdp2",
            "activation_checkpointing": True,
            "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"},
        }
        runs[attn], _ = torchrun(n, raw, tmp_path, name=attn)
        loss = runs[attn]["history"]["loss"]
        assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0]
        ad = adapters(tmp_path / attn)  # gathered from the fp32 masters
        assert all(v.dtype == torch.float32 for k, v in ad.items() if k.endswith("lora_a"))
    if len(runs) == 2:
        a, b = runs["sdpa"]["history"]["loss"][0], runs["flash_attention_2"]["history"]["loss"][0]
        assert abs(a - b) < 2e-2 * abs(a)


def test_hybrid_mode_two_ranks_match_one_process(cache_dir, tmp_path):
    """adapter.mode hybrid under fsdp2: the shared adapter is sharded on its feature dims, and
    2 ranks match one process (losses and every adapter tensor, the shared ones included)."""
    over = dict(
        adapter={"rank": 4, "alpha": 8, "mode": "hybrid", "match_params": True},
        train={"batch_size": 4},
        stages=[{"name": "a", "steps": 2}],
    )
    one_vs_two_ranks(cache_dir, tmp_path, over)
    assert_same_adapters(tmp_path / "two", tmp_path / "one")
    ad = adapters(tmp_path / "two")
    assert any(k.endswith("shared_a") for k in ad) and any(k.endswith("shared_b") for k in ad)
