"""RESULTS.md for the stdlib benchmark, from run_comparison.py's comparison.json: per-task loss
per mode and seed, the paired difference against `shared`, and every task and seed it loses."""

from __future__ import annotations

import statistics

from stdlib_summary import _loss, _table, goal_section, summary

WHAT = {
    "complete": "raw code: the function cut inside its body → the rest",
    "doc2code": "header + docstring → body",
    "inject_bug": "**the same prompt as doc2code** → the body with one injected bug",
    "code2doc": "`Function:` + the code, docstring removed, name masked + `Answer:` → summary",
    "name": "**the same prompt as code2doc** → the function's name",
    "verdict": "`Is there a bug?` + a function (half with a bug) + `Answer:` → ` True` / ` False`",
}
SWITCH = {
    "shared": "`adapter.mode: shared`, `match_params: true`: one LoRA of rank T × r",
    "shared_r": "`adapter.mode: shared`: one LoRA of rank r (equal rank per token, 1/T the "
    "parameters)",
    "per_task": "`adapter.mode: per_task`: one rank-r LoRA per task, hard routing by task id",
    "router": "`adapter.router: softmax`: the per-task adapters mixed per token by softmax "
    "routers (task-label supervised); scored without task ids",
    "hybrid": "`adapter.mode: hybrid`, `match_params: true`: a shared LoRA of rank T × r/2 on "
    "every token + a rank-r/2 LoRA per task",
    "segment": "`adapter.router: segment`, `router_layer: -1`: the per-task adapters, one per "
    "packed sample, picked top-1 from its prompt's embeddings, attention-pooled (task-label "
    "supervised, the first 25 steps routed by the true ids); scored without task ids",
    "segment_st": "`segment` + `straight_through: true`: the LM loss trains the router too",
    "shared_lowlr": "`shared` at half the learning rate (`train.lr` 0.0015)",
    "hybrid_lowlr": "`hybrid` at half the learning rate (`train.lr` 0.0015)",
    "single": "not a multi-task mode: `shared` trained on one task alone (`--task`: every step "
    "draws it, T × its tokens), six runs per seed, each scored on its own task (its adapter "
    "params are one run's)",
}


def _ms(vals: list[float], digits: int = 4) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _pct(new: float, base: float) -> str:
    return f"{100 * (new / base - 1):+.1f}%"


def setup(state: dict, cfg: dict, tasks: list[str], modes: list[str]) -> list[str]:
    man, res = state["manifest"], state["results"]
    any_run = next(iter(next(iter(res.values())).values()))
    m, t, d, a = cfg["model"], cfg["train"], cfg["data"], cfg["adapter"]
    rows = [
        [f"`{k}`", WHAT.get(k, ""), man["samples"][k]["train"], any_run["tasks"][k]["samples"]]
        for k in tasks
    ]
    switches = [[f"`{k}`", SWITCH[k], next(iter(res[k].values()))["adapter_parameters"]]
                for k in modes if k in res]  # fmt: skip
    out = [
        "## Setup",
        "",
        f"- **Data**: every function of Python {man['python']}'s standard library "
        f"(`{man['stdlib']}`, tests and GUI code left out) that fits the size limits, parsed "
        f"with `ast` by `make_data.py`: {man['functions']['train']} functions from "
        f"{state['modules']['train']} modules for training, {man['functions']['eval']} from "
        f"{state['modules']['eval']} held-out modules (a module is held out when the sha256 of "
        f"its name mod 100 < {man['eval_percent_of_modules']}; a function whose text occurs in "
        "two modules is dropped, so no function is in both splits).",
        "- **Tasks** (prompt/completion jsonl; two conflicting pairs, each one prompt with two "
        "answers that only the task id tells apart):",
        "",
        *_table(["task", "prompt → answer", "train samples", "held-out samples"], rows),
        "",
        f"  Injected bugs (train): {_kinds(man['bug_kinds']['inject_bug'])} in `inject_bug`; "
        f"{_kinds(man['bug_kinds']['verdict'])} in `verdict`.",
        f"- **Model**: the built-in tiny Llama (hidden {m['tiny']['hidden_size']}, MLP "
        f"{m['tiny']['intermediate_size']}, {m['tiny']['num_hidden_layers']} layers, BPE "
        f"vocabulary {m['vocab_size']}), "
        f"pretrained for {m['pretrain']['steps']} steps (batch {m['pretrain']['batch_size']} × "
        f"{d['seq_len']} tokens, lr {m['pretrain']['lr']}) on the training modules' functions "
        "as plain source (`model.pretrain.data`, from `make_data.py`): it has seen Python, none "
        "of the tasks' formats. "
        + "One tokenizer (trained on the task text) for all runs; one base per seed (its "
        "pretraining is seeded), shared by every mode (`model.cache_dir: runs/cache`).",
        f"- **Fine-tuning**: {t['steps']} steps, batch {t['batch_size']} × {d['seq_len']} "
        f"tokens packed, lr {t['lr']} {t['schedule']}, `loss.mode: "
        f"{cfg['loss']['mode']}`, adapters on every linear layer (`{a['target_modules']}`), "
        f"r = {a['rank']}, "
        f"alpha = {a['alpha']}. Seeds {', '.join(sorted(next(iter(res.values()))))}.",
        "- **Modes**, each `config.yaml` with one switch changed:",
        "",
        *_table(["mode", "switch", "adapter params"], switches),
        "",
        "- **Metric**: mean next-token cross-entropy over the answer tokens of `data/eval/` (the "
        "held-out modules), computed by mftk's `Evaluator` (the code `mftk eval` runs) on batches "
        "read, tokenized and packed like the trainer's own eval split. The average is the "
        "unweighted mean over tasks. Lower is better.",
    ]
    return out


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def loss_tables(state: dict, tasks: list[str], modes: list[str]) -> list[str]:
    res = state["results"]
    base = res.get("shared")
    rows = []
    floor = [r for s, r in sorted(state.get("base", {}).items()) if s in next(iter(res.values()))]
    if floor:  # every adapter zeroed: what fine-tuning starts from
        cells = [_ms([r["tasks"][t]["loss"] for r in floor]) for t in tasks]
        rows.append(["base (adapters zeroed)", 0, *cells, _ms([r["average_loss"] for r in floor]),
                     "-"])  # fmt: skip
    for mode in modes:
        runs = list(res[mode].values())
        avg = [r["average_loss"] for r in runs]
        rel = "-"
        if base and mode != "shared":
            rel = _pct(statistics.mean(avg), statistics.mean(r["average_loss"]
                                                             for r in base.values()))  # fmt: skip
        cells = [_ms([r["tasks"][t]["loss"] for r in runs]) for t in tasks]
        rows.append([mode, runs[0]["adapter_parameters"], *cells, _ms(avg), rel])
    per_seed = [
        [mode, s, *(f"{r['tasks'][t]['loss']:.4f}" for t in tasks), f"{r['average_loss']:.4f}"]
        for mode in modes
        for s, r in res[mode].items()
    ]
    return [
        "## Held-out loss (mean ± std over seeds)",
        "",
        *_table(["mode", "adapter params", *tasks, "average", "avg vs shared"], rows),
        "",
        "Per seed:",
        "",
        *_table(["mode", "seed", *tasks, "average"], per_seed),
    ]


def paired(res: dict, tasks: list[str], modes: list[str]) -> list[str]:
    """Per seed, each mode's loss change against shared at the same seed, and who loses where."""
    if "shared" not in res:
        return ["## Paired differences", "", "No `shared` runs to pair against."]
    base, rows, lines = res["shared"], [], []
    for mode in (m for m in modes if m != "shared"):
        seeds = [s for s in res[mode] if s in base]
        deltas: dict[str, list[float]] = {t: [] for t in [*tasks, "average"]}
        worse = []
        for s in seeds:
            r, b = res[mode][s], base[s]
            cells = []
            for t in [*tasks, "average"]:
                new = r["average_loss"] if t == "average" else r["tasks"][t]["loss"]
                old = b["average_loss"] if t == "average" else b["tasks"][t]["loss"]
                deltas[t].append(100 * (new / old - 1))
                cells.append(_pct(new, old))
                if new > old:
                    worse.append(f"{t} seed {s} ({_pct(new, old)})")
            rows.append([mode, s, *cells])
        rows.append([f"**{mode}**", "mean", *(f"{statistics.mean(v):+.1f}%" for v in
                                              deltas.values())])  # fmt: skip
        wins = sum(d < 0 for t in tasks for d in deltas[t])
        avg_wins = sum(d < 0 for d in deltas["average"])
        lines.append(
            f"- `{mode}` has a lower loss than `shared` in {wins} of {len(tasks) * len(seeds)} "
            f"task × seed pairs and a lower average in {avg_wins} of {len(seeds)} seeds. "
            + ("It loses on: " + "; ".join(worse) + "." if worse else "It never loses.")
        )
    return [
        "## Paired by seed: change in held-out loss against `shared`",
        "",
        "Negative = lower loss than `shared` at the same seed (same base, same data).",
        "",
        *_table(["mode", "seed", *tasks, "average"], rows),
        "",
        "### Wins and losses against `shared`, every task and seed",
        "",
        *lines,
    ]


def against_base(state: dict, tasks: list[str], modes: list[str]) -> list[str]:
    """Mean over seeds of each mode's per-seed change against the base (adapters zeroed)."""
    floor, res = state.get("base", {}), state["results"]
    rows = []
    for mode in modes:
        seeds = [s for s in res[mode] if s in floor]
        if not seeds:
            continue
        cells = [statistics.mean(100 * (_loss(res[mode][s], t) / _loss(floor[s], t) - 1)
                                 for s in seeds) for t in [*tasks, None]]  # fmt: skip
        rows.append([mode, *(f"{c:+.1f}%" for c in cells)])
    if not rows:
        return []
    return [
        "## What fine-tuning adds: change against the base (adapters zeroed), mean over seeds",
        "",
        *_table(["mode", *tasks, "average"], rows),
    ]


def conflict_check(state: dict, pairs: list[tuple[str, str]], modes: list[str]) -> list[str]:
    """Each conflicting task's answers through its own adapter and through its partner's."""
    res = state["results"]
    rows = []
    for mode in modes:
        runs = [r for r in res[mode].values() if "partner_adapter_loss" in r]
        if not runs:
            continue
        for a, b in pairs:
            for t, other in ((a, b), (b, a)):
                own = [r["tasks"][t]["loss"] for r in runs]
                cross = [r["partner_adapter_loss"][t] for r in runs]
                gap = statistics.mean(100 * (c / o - 1) for c, o in zip(cross, own))
                rows.append([mode, f"`{t}`", f"`{other}`", _ms(own), _ms(cross), f"{gap:+.1f}%"])
    if not rows:
        return []
    return [
        "## Are the conflicts real? Each pair's answers through the partner's adapter",
        "",
        "Each task of a conflicting pair has the same held-out prompts as its partner. Scoring a "
        "task's answers through the partner's adapter (the task id swapped) measures how far "
        "the two adapters have moved apart: under `shared` there is one adapter, so the two "
        "numbers are equal by construction.",
        "",
        *_table(
            [
                "mode",
                "answers of",
                "through the adapter of",
                "own adapter",
                "partner's adapter",
                "change",
            ],
            rows,
        ),  # fmt: skip
    ]


def runtime(state: dict, modes: list[str]) -> list[str]:
    res = state["results"]
    pre = {}
    for runs in res.values():
        for s, r in runs.items():
            if r["pretrain"] and not r["pretrain"].get("cached"):
                pre[s] = r["pretrain"]["seconds"]
    rows = [[m, _ms([r["train_seconds"] for r in res[m].values()], 1),
             _ms([r["wall_seconds"] for r in res[m].values()], 1)]
            for m in modes if m in res]  # fmt: skip
    return [
        "## Runtime",
        "",
        "Sweeps (data generation, base pretrainings when not cached and every held-out eval "
        "included): "
        + "; ".join(
            f"`run_comparison.py {w['sweep']}` {w['seconds'] / 60:.1f} minutes ({w['date']})"
            for w in state.get("sweeps", [])
        )  # fmt: skip
        + ". Pretraining: "
        + ", ".join(f"seed {s} {v:.0f} s" for s, v in sorted(pre.items()))
        + ". Per run (training steps only, and the run's wall time including loading and its "
        "first pretraining when it did it):",
        "",
        *_table(["mode", "train s", "wall s"], rows),
        "",
        "Timings come from a shared machine under other jobs' load: do not rank modes by them.",
    ]


NOTES = [
    "## Reading these numbers",
    "",
    "- The base is pretrained on plain source of the training modules, never on a task's "
    "format: the adapters add each task's format and mapping, and whatever transfers to modules "
    "they never saw. Tokens the corpus lacks keep untrained embeddings that LoRA (lm_head "
    "frozen) can hardly use: `verdict` answers ` True`/` False`, words the code is full of "
    "(` ok`/` bug` occur 6 and 3 times in its ~410k tokens), then the end of text: with "
    "balanced labels ln 2 / 2 ≈ 0.347 per answer token is chance.",
    "- The rank each token sees: T × r under `shared`, r under `shared_r` (1/T the "
    "parameters), `per_task` and `router`, T × r/2 + r/2 under `hybrid`.",
    "- Seeds change the base (its pretraining and the trainer's eval split are seeded), so "
    "compare modes within a seed (the paired table) rather than across seeds.",
    "- `run_comparison.py --tiny HIDDEN,INTERMEDIATE,LAYERS [--pretrain-steps N] --out F "
    "--results R` reruns a sweep on another tiny model: `RESULTS-256x4.md` is hidden 256, 4 "
    "layers with the same 400 pretraining steps (a weaker base), `RESULTS-256x4-p1200.md` the "
    "same model pretrained 1200 steps (a base at least as good as this one's).",
]


def router_table(res: dict, tasks: list[str], modes: list[str]) -> list[str]:
    """Modes routed without task ids: router accuracy, and the loss against hard routing."""
    routed = [m for m in modes if any("router_accuracy_all" in r for r in res[m].values())]
    if not routed:
        return []
    rows = []
    for m in routed:
        runs = list(res[m].values())
        acc = [_ms([r[f"router_accuracy_{k}"] for r in runs], 3) for k in ("all", "answer")]
        per = [_ms([r["tasks"][t]["router_accuracy_answer"] for r in runs], 3) for t in tasks]
        vs = "-"
        if "per_task" in res:
            vs = " / ".join(_pct(_loss(res[m][s], None), _loss(res["per_task"][s], None))
                            for s in res[m] if s in res["per_task"])  # fmt: skip
        rows.append([m, *acc, *per, vs])
    return [
        "## Router accuracy (no task ids) and loss against hard routing",
        "",
        "Accuracy (all tokens, answer tokens, then answer tokens per task): the share of "
        "labelled tokens whose router picks their own task's adapter "
        "(argmax; every patched layer counts equally for `router`). Last column: the average "
        "held-out loss against `per_task` (hard routing by the true ids) at the same seed. "
        "Reading only the text, a router is right on half of each same-prompt pair's samples "
        "at best (`doc2code`/`inject_bug`, `code2doc`/`name`: only the id tells them apart).",
        "",
        *_table(["mode", "all", "answer", *tasks, "avg loss vs per_task, per seed"], rows),
    ]


def results_md(state: dict, cfg: dict, mode_order: list[str], pairs=()) -> str:
    res = state["results"]
    modes = [m for m in mode_order if m in res]
    tasks = [t["name"] for t in cfg["tasks"]]
    out = [
        "# The stdlib benchmark: shared LoRA vs per-task adapters vs router vs hybrid",
        "",
        f"Generated by `python examples/stdlib/run_comparison.py` on {state.get('date', '?')}. "
        f"Machine: {state.get('machine', '?')}.",
        "",
    ]
    for mode, note in state.get("skipped", {}).items():
        out += [f"**Mode `{mode}` was not run**: {note}", ""]
    if not res:
        return "\n".join(out + ["No results yet."]) + "\n"
    for part in (
        summary(state, tasks, modes, pairs),
        goal_section(state, tasks, modes),
        setup(state, cfg, tasks, modes),
        loss_tables(state, tasks, modes),
        paired(res, tasks, modes),
        router_table(res, tasks, modes),
        against_base(state, tasks, modes),
        conflict_check(state, list(pairs), modes),
        NOTES,
        runtime(state, modes),
    ):
        out += [*part, ""]
    return "\n".join(out)
