"""Reproduce examples/stdlib/RESULTS.md: one shared LoRA vs per-task adapters vs a router vs
hybrid (shared + per-task) on the stdlib benchmark, over 3 seeds, scored on held-out modules.

    python examples/stdlib/run_comparison.py                    # every mode, seeds 0,1,2
    python examples/stdlib/run_comparison.py --modes shared,per_task --seeds 0
    python examples/stdlib/run_comparison.py --tables-only      # RESULTS.md from comparison.json
    python examples/stdlib/run_comparison.py --tiny 256,512,4 --modes shared,shared_lowlr,hybrid \
        --out comparison-256x4.json --results RESULTS-256x4.md    # a larger tiny model

Every mode is config.yaml with one switch changed (MODES); all runs share one tokenizer and, per
seed, one pretrained tiny base (model.cache_dir runs/cache). A mode whose config the trainer
refuses is skipped with a note. Runs go to runs/<mode>-s<seed>/ (ignored by git), the numbers
to comparison.json after every run, the tables to RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
sys.path.insert(0, HERE)
import make_data  # noqa: E402
import stdlib_report  # noqa: E402

# each mode: config.yaml's adapter section updated with these keys
MODES = {
    "shared": {"mode": "shared", "match_params": True},  # one LoRA, rank T x 8 (MFTCoder's way)
    "shared_r": {"mode": "shared"},  # one rank-8 LoRA: equal rank per token, 1/T the params
    "per_task": {},  # one rank-8 LoRA per task, hard routing by task id
    "router": {"router": "softmax"},  # the same adapters, mixed per token by softmax routers
    "hybrid": {"mode": "hybrid", "match_params": True},  # shared T x 4 + rank 4 per task
    # one adapter per packed sample, picked from its prompt's mean embedding (top-1)
    "segment": {"router": "segment", "router_layer": -1},
    # the same, and the LM loss trains the router too (adapter.straight_through)
    "segment_st": {"router": "segment", "router_layer": -1, "straight_through": True},
    # is the comparison a matter of learning rate? shared and hybrid at half the lr
    "shared_lowlr": {"mode": "shared", "match_params": True},
    "hybrid_lowlr": {"mode": "hybrid", "match_params": True},
    # not a multi-task mode: `shared` trained on one task at a time (all steps on it), scored on
    # that task; six runs per seed, the no-interference ceiling (run_single)
    "single": {"mode": "shared", "match_params": True},
}
# other sections' keys a mode changes (as examples/tiny/config-segment.yaml)
MODE_EXTRA = {
    "segment": {"train": {"router_warmup_steps": 25}, "loss": {"router_balance": 0.0}},
    "segment_st": {"train": {"router_warmup_steps": 25}, "loss": {"router_balance": 0.0}},
    "shared_lowlr": {"train": {"lr": 0.0015}},
    "hybrid_lowlr": {"train": {"lr": 0.0015}},
}
# the conflicting pairs: one prompt, two answers (make_data.py)
PAIRS = [("doc2code", "inject_bug"), ("code2doc", "name")]


def ensure_data() -> dict:
    """data/ as make_data writes it: rebuilt when missing or made by another Python."""
    path = os.path.join(DATA, "manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            manifest = json.load(f)
        fresh = manifest.get("data_format") == make_data.DATA_FORMAT
        if fresh and manifest["python"] == sys.version.split()[0] and manifest["max_files"] is None:
            return manifest
    return make_data.build(DATA)


# --tiny: the tiny model's size for every mode (None: config.yaml's); its runs go to runs/<size>/
TINY: dict | None = None
PRETRAIN_STEPS: int | None = None  # --pretrain-steps (None: config.yaml's)


def tiny_size(text: str) -> dict:
    """--tiny HIDDEN,INTERMEDIATE,LAYERS as model.tiny's keys."""
    try:
        h, i, n = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"--tiny: expected HIDDEN,INTERMEDIATE,LAYERS (ints), got {text!r}"
        ) from None
    return {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": n}


def load(mode: str, seed: int):
    """The mode's validated Config (mftk's ConfigError if the trainer refuses it)."""
    from mftk.train.config import config_from_dict

    with open(os.path.join(HERE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["adapter"].update(copy.deepcopy(MODES[mode]))
    for section, keys in MODE_EXTRA.get(mode, {}).items():
        raw.setdefault(section, {}).update(keys)
    raw["train"]["seed"] = seed
    raw["model"]["cache_dir"] = "./runs/cache"  # the base's key hashes the model's size
    runs = "./runs"
    if TINY is not None:
        raw["model"]["tiny"] = dict(TINY)
        runs += f"/{TINY['hidden_size']}x{TINY['num_hidden_layers']}"
    if PRETRAIN_STEPS is not None:
        raw["model"]["pretrain"]["steps"] = PRETRAIN_STEPS
        runs += f"/pretrain{PRETRAIN_STEPS}"
    raw["output"]["dir"] = f"{runs}/{mode}-s{seed}"
    return config_from_dict(raw, HERE)


def heldout_samples(run, cfg) -> list:
    """data/eval/ (the held-out modules) read and tokenized exactly as the trainer's own eval
    split; one Sample per record, its task id the record's task."""
    from mftk.train.data import overlong_mode, special_strings, tokenize
    from mftk.train.records import read_examples

    bos, eos = special_strings(run.tokenizer)
    samples = []
    for i, task in enumerate(cfg.tasks):
        held = dataclasses.replace(task, files=[os.path.join(DATA, "eval", f"{task.name}.jsonl")])
        exs, _ = read_examples(held, i, bos, eos, False, cfg.data)
        samples += tokenize(exs, run.tokenizer, cfg.data.seq_len, overlong_mode(cfg.data))[0]
    return samples


def batches(run, cfg, samples: list) -> list:
    """Packed eval batches, as the trainer packs its eval split."""
    from mftk.train.packing import eval_batches

    d = cfg.data
    return eval_batches(samples, cfg.train.batch_size, d.seq_len, d.packing, run.pad_id, run.dtype)


def partner_losses(ev, cfg, samples: list) -> dict[str, float]:
    """Each conflicting task's held-out answers scored through its PARTNER's adapter (the task
    id swapped): {task: loss}. Above the task's own loss when the two adapters learned
    different answers to the same prompts; equal under one shared adapter."""
    names = cfg.task_names
    swap = {}
    for a, b in PAIRS:
        swap[names.index(a)], swap[names.index(b)] = names.index(b), names.index(a)
    moved = [dataclasses.replace(x, task=swap[x.task]) for x in samples if x.task in swap]
    ev.run.eval_set = batches(ev.run, cfg, moved)
    scored = ev.loss_metrics()["tasks"]  # keyed by the adapter's task: map back to the answers'
    return {names[swap[i]]: scored[names[i]]["loss"] for i in swap}


def train_and_score(cfg):
    """Train cfg in a fresh output dir, then load its adapters with mftk's Evaluator on the
    held-out samples: (trainer metrics, wall seconds, Evaluator, samples); ev.run.eval_set holds
    the samples' packed batches."""
    from mftk.apps.evaluate import Evaluator
    from mftk.train.loop import Trainer

    # a fresh run each time: the trainer refuses a dir holding another run (the cache is apart)
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    quiet = lambda msg: None  # noqa: E731
    t0 = time.perf_counter()
    metrics = Trainer(cfg, progress=False, log=quiet).train()
    wall = time.perf_counter() - t0
    ev = Evaluator(cfg, os.path.join(cfg.output.dir, "adapters"), log=quiet)
    samples = heldout_samples(ev.run, cfg)
    ev.run.eval_set = batches(ev.run, cfg, samples)
    return metrics, wall, ev, samples


def run_single(seed: int) -> dict:
    """`single` at one seed: for each task, `shared` trained on that task alone (`mftk train
    --task`: every step draws it, 6x its tokens) and scored on its held-out answers. One result
    in run_one's shape, each task's loss from its own run; times summed over the runs."""
    from mftk.train.config import single_task

    res: dict = {"mode": "single", "tasks": {}, "train_seconds": 0.0, "wall_seconds": 0.0}
    for name in load("single", seed).task_names:
        cfg = single_task(load("single", seed), name)
        metrics, wall, ev, samples = train_and_score(cfg)
        res["wall_seconds"] += wall
        res["train_seconds"] += metrics["train_seconds"]
        res["tasks"][name] = ev.loss_metrics()["tasks"][name]
        res["tasks"][name]["samples"] = sum(x.task == cfg.task_names.index(name) for x in samples)
        res["adapter_parameters"] = ev.adapter_params
        res["pretrain"] = metrics["model"].get("pretrain", {})
    res["average_loss"] = sum(t["loss"] for t in res["tasks"].values()) / len(res["tasks"])
    print(
        f"single seed {seed}: held-out avg {res['average_loss']:.4f} | "
        + " ".join(f"{k} {v['loss']:.4f}" for k, v in res["tasks"].items()),
        flush=True,
    )
    return res


def run_one(mode: str, seed: int, base: bool = False) -> dict:
    """Train one mode at one seed, then score it on the held-out modules with mftk's Evaluator
    (per-task loss; router runs routed softly, without task ids, as `mftk eval` does). base:
    also score the model with every adapter zeroed (the pretrained base: the floor to beat)."""
    if mode == "single":
        return run_single(seed)
    import torch

    from mftk.patch import adapter_parameters

    cfg = load(mode, seed)
    metrics, wall, ev, samples = train_and_score(cfg)
    own = ev.run.eval_set
    res = {"mode": ev.mode, "adapter_parameters": ev.adapter_params, **ev.loss_metrics()}
    for i, name in enumerate(cfg.task_names):
        res["tasks"][name]["samples"] = sum(x.task == i for x in samples)
    if ev.mode != "router":  # a router takes no task ids
        res["partner_adapter_loss"] = partner_losses(ev, cfg, samples)
    res["train_seconds"] = metrics["train_seconds"]
    res["wall_seconds"] = wall
    res["pretrain"] = metrics["model"].get("pretrain", {})
    res["in_training_eval"] = metrics["eval_after"]  # the trainer's split of the TRAIN modules
    if base:
        ev.run.eval_set = own
        with torch.no_grad():
            for p in adapter_parameters(ev.model):
                p.zero_()
        res["base"] = ev.loss_metrics()
    with open(os.path.join(cfg.output.dir, "heldout.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(
        f"{mode} seed {seed}: held-out avg {res['average_loss']:.4f} | "
        + " ".join(f"{k} {v['loss']:.4f}" for k, v in res["tasks"].items())
        + f" | {res['adapter_parameters']} adapter params | train {wall:.0f}s",
        flush=True,
    )
    return res


def machine() -> str:
    import torch

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared with other "
        f"jobs; load average {load1:.1f} at the end), Python {platform.python_version()}, "
        f"torch {torch.__version__}, one thread per run"
    )


def sweeps_of(state: dict) -> list[dict]:
    """The sweeps recorded in state (older files kept one: sweep, sweep_seconds)."""
    if "sweeps" in state:
        return state["sweeps"]
    if "sweep" in state:
        return [{"sweep": state.pop("sweep"), "seconds": state.pop("sweep_seconds", 0.0),
                 "date": state.get("date", "?")}]  # fmt: skip
    return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(HERE, "comparison.json"))
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--tables-only", action="store_true", help="RESULTS.md from --out, no runs")
    p.add_argument("--tiny", help="HIDDEN,INTERMEDIATE,LAYERS: another tiny model size")
    p.add_argument("--pretrain-steps", type=int, help="the base's pretraining steps")
    args = p.parse_args()
    global TINY, PRETRAIN_STEPS
    try:
        TINY = tiny_size(args.tiny) if args.tiny else None
    except ValueError as err:
        p.error(str(err))
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        p.error(f"--pretrain-steps: expected a positive int, got {args.pretrain_steps}")
    PRETRAIN_STEPS = args.pretrain_steps
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown {m!r}; known: {', '.join(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    state: dict = {"results": {}, "skipped": {}, "base": {}}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            state = json.load(f)
    if not args.tables_only:
        from mftk.train.config import ConfigError

        here = {"tiny": TINY, "pretrain_steps": PRETRAIN_STEPS}
        there = {"tiny": state.get("tiny"), "pretrain_steps": state.get("pretrain_steps")}
        if there != here and state["results"]:
            p.error(f"--out {args.out} holds runs of {there}, not {here}: give another --out")
        state.update(here)

        t0 = time.perf_counter()
        manifest = ensure_data()
        based: set[int] = set()
        for mode in modes:
            try:
                load(mode, seeds[0])
            except ConfigError as err:
                note = f"the trainer refuses its config: {err}"
                print(f"skipping mode {mode}: {note}", flush=True)
                state["skipped"][mode] = note
                state["results"].pop(mode, None)
                continue
            state["skipped"].pop(mode, None)
            for seed in seeds:
                res = run_one(mode, seed, base=seed not in based)
                if "base" in res:  # once per seed and sweep: the base is the same for all modes
                    state.setdefault("base", {})[str(seed)] = res.pop("base")
                    based.add(seed)
                state["results"].setdefault(mode, {})[str(seed)] = res
                with open(args.out, "w") as f:  # after every run: a partial sweep is kept
                    json.dump(state, f, indent=1)
        state.update(
            manifest={k: v for k, v in manifest.items() if k != "modules"},
            modules={k: len(v) for k, v in manifest["modules"].items()},
            machine=machine(),
            date=datetime.date.today().isoformat(),
            # every sweep that wrote into this file, oldest first (a --modes subset adds one)
            sweeps=sweeps_of(state)
            + [
                {
                    "sweep": f"--modes {args.modes} --seeds {args.seeds}"
                    + (f" --tiny {args.tiny}" if args.tiny else "")
                    + (f" --pretrain-steps {PRETRAIN_STEPS}" if PRETRAIN_STEPS else ""),
                    "seconds": time.perf_counter() - t0,
                    "date": datetime.date.today().isoformat(),
                }
            ],
        )
        with open(args.out, "w") as f:
            json.dump(state, f, indent=1)
    with open(os.path.join(HERE, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    if state.get("tiny"):
        cfg["model"]["tiny"] = state["tiny"]
    if state.get("pretrain_steps"):
        cfg["model"]["pretrain"]["steps"] = state["pretrain_steps"]
    text = stdlib_report.results_md(state, cfg, list(MODES), PAIRS)
    with open(args.results, "w") as f:
        f.write(text)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
