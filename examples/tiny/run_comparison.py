"""Reproduce examples/tiny/RESULTS.md: shared LoRA vs per-task adapters vs router vs hybrid (and
single-task runs) on the tiny example, at equal steps, over a few seeds; each run trained then
`mftk eval`ed.

    python examples/tiny/run_comparison.py                     # all variants, seeds 0,1,2
    python examples/tiny/run_comparison.py --variants shared,per_task,router,hybrid --seeds 0,1,2

Fair by construction: every variant trains the same three generation tasks (config-shared.yaml
or config-router.yaml, never config.yaml's classify task), so at one seed they all load the same
tokenizer and tiny base (one cache key: mftk.train.tiny_model hashes no adapter setting); the
tables check it (each run's eval.json names its base) and pair the variants per seed.

Runs go to examples/tiny/runs/<variant>-s<seed>/ (ignored by git; one shared tiny-base cache in
runs/cache); the collected numbers to examples/tiny/comparison.json; markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# routers everywhere except layer 0's q/k/v, whose input is the bare token embedding (no context)
NO_LAYER0_QKV = (
    r"^model\.layers\.(0\.(self_attn\.o_proj|mlp\.(gate|up|down)_proj)"
    r"|[1-9]\d*\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))$"
)
# every variant is config-shared.yaml or config-router.yaml (the three generation tasks) with
# one switch changed; single_<task>: per-task adapters trained on that task only (--task)
PER_TASK = {"adapter": {"mode": "per_task", "match_params": False}}
HYBRID = {"adapter": {"mode": "hybrid", "match_params": True}}
VARIANTS = {
    "shared": ("config-shared.yaml", {}),  # one LoRA, rank 24 = 3 tasks x 8 (match_params)
    "shared_r8": ("config-shared.yaml", {"adapter": {"match_params": False}}),
    "per_task": ("config-shared.yaml", PER_TASK),  # one rank-8 LoRA per task, hard routing
    "router": ("config-router.yaml", {}),  # the same adapters mixed by softmax routers
    # a shared rank-12 LoRA on every token + a rank-4 one per task (match_params: 49,152 params)
    "hybrid": ("config-shared.yaml", HYBRID),
    "router_ctx": ("config-router.yaml", {"adapter": {"target_modules": NO_LAYER0_QKV}}),
    # one adapter per packed sample, picked from its prompt by mftk.segment_router (top-1)
    "segment": ("config-segment.yaml", {}),
    # the same, and the LM loss trains the router too (adapter.straight_through)
    "segment_st": ("config-segment.yaml", {"adapter": {"straight_through": True}}),
    "single_completion": ("config-shared.yaml", PER_TASK),
    "single_bugs": ("config-shared.yaml", PER_TASK),
    "single_docstrings": ("config-shared.yaml", PER_TASK),
    # + a 4th task that conflicts with completion (see conflict_data)
    "conflict_shared": ("config-shared.yaml", {}),
    "conflict_per_task": ("config-shared.yaml", PER_TASK),
    "conflict_hybrid": ("config-shared.yaml", HYBRID),
    # 3x the steps of every stage (the 300-step runs are still improving)
    "long_shared": ("config-shared.yaml", {}),
    "long_per_task": ("config-shared.yaml", PER_TASK),
}


# LoRA rank directions that act on one token (3 tasks, rank 8 per task unless match_params)
RANK_PER_TOKEN = {
    "shared": "24",
    "shared_r8": "8",
    "per_task": "8",
    "router": "24 (soft mix of 3 × 8)",
    "hybrid": "16 (12 shared + 4 own)",
    "segment": "8 (top-1 of 3 × 8)",
    "segment_st": "8 (top-1 of 3 × 8)",
}
# paired per seed against shared
PAIRED = ("per_task", "router", "hybrid", "shared_r8", "segment", "segment_st")


def conflict_data() -> str:
    """A bug-injection task that conflicts with `completion`: the same kind of prompt (signature
    + docstring, same families as make_data.py), answered with a buggy body. Nothing in the text
    tells the two tasks apart; only the task id does. Written to runs/conflict_data/."""
    sys.path.insert(0, HERE)
    import make_data

    rng = random.Random(4321)
    out = os.path.join(HERE, "runs", "conflict_data")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "inject_bug.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(make_data.N_PER_TASK):
            header, _, doc, bugs = make_data.make_function(rng)
            buggy, _ = rng.choice(bugs)
            prompt = f'{header}\n    """{doc}"""\n    '
            f.write(json.dumps({"prompt": prompt, "completion": buggy + "\n"}) + "\n")
    return path


def _merge(raw: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict):
            _merge(raw.setdefault(k, {}), v)
        else:
            raw[k] = v
    return raw


def load(variant: str, seed: int):
    from mftk.train.config import config_from_dict, single_task

    name, over = VARIANTS[variant]
    with open(os.path.join(HERE, name)) as f:
        raw = _merge(yaml.safe_load(f), copy.deepcopy(over))
    raw["train"]["seed"] = seed
    if variant.startswith("long_"):
        for st in raw["stages"]:
            st["steps"] *= 3
    if variant.startswith("conflict_"):
        raw["tasks"].append({"name": "inject_bug", "data": conflict_data(), "loss_weight": 1.0})
        for st in raw["stages"]:
            if st.get("mix"):
                st["mix"]["inject_bug"] = 1
    raw["model"]["cache_dir"] = "./runs/cache"
    raw["output"]["dir"] = f"./runs/{variant}-s{seed}"
    raw["output"]["save_every"] = None
    cfg = config_from_dict(raw, HERE)
    if variant.startswith("single_"):
        out = cfg.output.dir
        cfg = single_task(cfg, variant.removeprefix("single_"))
        cfg.output.dir = out
    return cfg


def run_one(variant: str, seed: int, samples: int) -> dict:
    from mftk.apps.evaluate import evaluate_run
    from mftk.train.loop import Trainer

    cfg = load(variant, seed)
    quiet = lambda msg: None  # noqa: E731
    t0 = time.perf_counter()
    metrics = Trainer(cfg, progress=False, log=quiet, overwrite=True).train()
    wall = time.perf_counter() - t0
    res = evaluate_run(
        cfg, os.path.join(cfg.output.dir, "adapters"), log=quiet, samples=samples, ks=(1, 5)
    )
    with open(os.path.join(cfg.output.dir, "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    for t in res["tasks"].values():  # keep comparison.json small: per-problem rows stay in eval
        t.get("exec", {}).pop("per_problem", None)
    res["train_seconds"] = metrics["train_seconds"]
    res["train_wall_seconds"] = wall
    res["tokens_per_second"] = metrics["tokens_per_second"]
    print(
        f"{variant} seed {seed}: avg loss {res['average_loss']:.4f} "
        + " ".join(f"{k} {v['loss']:.4f}" for k, v in res["tasks"].items())
        + (f" router acc {res['router_accuracy']:.3f}" if "router_accuracy" in res else "")
        + f" | train {metrics['train_seconds']:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return res


def timing(variants: list[str], rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per training step, the variants interleaved round by round (so that a shared
    machine's load hits them alike); the first `eval` and setup are not timed."""
    from mftk.train.loop import Trainer

    out: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            cfg = load(v, 0)
            cfg.output.dir += "-timing"
            t = Trainer(cfg, max_steps=steps, progress=False, log=lambda m: None, overwrite=True)
            m = t.train()
            out[v].append(m["train_seconds"] / m["steps"])
            print(f"timing round {r} {v}: {1000 * out[v][-1]:.1f} ms/step", file=sys.stderr)
    return out


def _ms(vals: list[float], digits: int = 4) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def tables(results: dict[str, dict[str, dict]]) -> str:
    """Markdown, one table per task set: per-task held-out loss (mean ± std over seeds) and,
    after them, router accuracy, pass@k and training time."""
    groups: dict[tuple, dict] = {}
    for v, runs in results.items():
        groups.setdefault(tuple(next(iter(runs.values()))["tasks"]), {})[v] = runs
    out = "\n\n".join(loss_table(g) for g in groups.values())
    if "shared" in results and any(v in results for v in PAIRED):
        out += "\n\n" + paired_table(results)
    return out + "\n\n" + other_table(results)


def paired_table(results: dict[str, dict[str, dict]]) -> str:
    """Per seed, each PAIRED variant's change in loss against shared at that seed, per task and
    on average (negative: better than shared), and the base every variant at that seed loaded
    (eval.json's model entry): one base per seed, else a ValueError naming the variants."""
    shared = results["shared"]
    tasks = list(next(iter(shared.values()))["tasks"])
    variants = [v for v in PAIRED if v in results]
    head = "| seed | base | " + " | ".join(f"{v}: {' / '.join(tasks)} / avg" for v in variants)
    lines = [head + " |", "|" + "---|" * (2 + len(variants))]
    for seed, ref in shared.items():
        bases = {v: results[v][seed].get("model", {}).get("base") for v in ["shared", *variants]
                 if seed in results[v]}  # fmt: skip
        if len(set(bases.values())) != 1:
            raise ValueError(f"seed {seed}: the variants' bases differ: {bases}")
        cells = []
        for v in variants:
            run = results[v].get(seed)
            if run is None:
                cells.append("-")
                continue
            pairs = [(run["tasks"][t]["loss"], ref["tasks"][t]["loss"]) for t in tasks]
            pairs.append((run["average_loss"], ref["average_loss"]))
            cells.append(" / ".join(f"{100 * (a / b - 1):+.1f}%" for a, b in pairs))
        lines.append(f"| {seed} | {bases['shared']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_table(results: dict[str, dict[str, dict]]) -> str:
    variants = list(results)
    tasks = list(next(iter(next(iter(results.values())).values()))["tasks"])
    head = (
        "| variant | adapter params | rank per token | "
        + " | ".join(tasks)
        + " | average | vs shared |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = None
    shared = [v for v in variants if v.endswith("shared")]
    if shared:
        base = statistics.mean(r["average_loss"] for r in results[shared[0]].values())
    for v in variants:
        runs = list(results[v].values())
        avg = statistics.mean(r["average_loss"] for r in runs)
        rel = f"{100 * (avg / base - 1):+.1f}%" if base else "-"
        cells = [_ms([r["tasks"][t]["loss"] for r in runs]) for t in tasks]
        lines.append(
            f"| {v} | {runs[0]['adapter_parameters']} | {RANK_PER_TOKEN.get(v, '-')} | "
            + " | ".join(cells)
            + f" | {_ms([r['average_loss'] for r in runs])} | {rel} |"
        )
    return "\n".join(lines)


def other_table(results: dict[str, dict[str, dict]]) -> str:
    variants = list(results)
    lines = ["", "| variant | seeds | router acc (all tokens) | router acc (answer tokens) | "
              "completion pass@1 greedy | pass@1 (n samples) | pass@5 | train s/run |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in variants:
        runs = list(results[v].values())
        ex = [r["tasks"]["completion"].get("exec", {}) for r in runs]

        def col(key: str, ex=ex) -> str:
            vals = [e[key] for e in ex if key in e]
            return _ms(vals, 3) if vals else "-"

        ra = [r["router_accuracy_all"] for r in runs if "router_accuracy_all" in r]
        rn = [r["router_accuracy_answer"] for r in runs if "router_accuracy_answer" in r]
        lines.append(
            f"| {v} | {len(runs)} | {_ms(ra, 3) if ra else '-'} | {_ms(rn, 3) if rn else '-'} | "
            f"{col('pass@1_greedy')} | {col('pass@1')} | {col('pass@5')} | "
            f"{_ms([r['train_seconds'] for r in runs], 1)} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=10, help="samples per exec problem (pass@k)")
    p.add_argument("--out", default=os.path.join(HERE, "comparison.json"))
    p.add_argument("--tables-only", action="store_true", help="print tables from --out")
    p.add_argument("--timing", type=int, default=0, help="N rounds of interleaved step timing")
    p.add_argument("--timing-steps", type=int, default=60)
    args = p.parse_args()
    if args.timing:
        res = timing(args.variants.split(","), args.timing, args.timing_steps)
        for v, secs in res.items():
            print(f"| {v} | {1000 * statistics.median(secs):.1f} | "
                  f"{', '.join(f'{1000 * x:.1f}' for x in secs)} |")  # fmt: skip
        return 0
    results: dict[str, dict[str, dict]] = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if not args.tables_only:
        for v in args.variants.split(","):
            if v not in VARIANTS:
                p.error(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
            for s in (int(x) for x in args.seeds.split(",")):
                results.setdefault(v, {})[str(s)] = run_one(v, s, args.samples)
                with open(args.out, "w") as f:  # after every run: a partial sweep is kept
                    json.dump(results, f, indent=1)
    order = [v for v in VARIANTS if v in results]
    print(tables({v: results[v] for v in order}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
