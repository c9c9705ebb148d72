"""`mftk eval CONFIG.yaml --adapters DIR [--json OUT]`: multi-task quality of a trained run.

Reports, per task of the config:
- held-out loss and perplexity: the mean next-token cross-entropy over the answer tokens of the
  trainer's own eval split (same split, packing and loss code as `mftk train`), and exp(loss);
- router accuracy (router runs): for every patched layer and every token with a task label, is
  the router's argmax adapter the token's own task? Reported over all labelled tokens (prompt and
  answer, padding excluded; what the trainer logs) and over answer tokens only (the positions
  whose next-token prediction is in the loss), overall and per task; layers count equally;
- for tasks with `eval: exec`: functional correctness on the task's `exec_problems` (jsonl of
  {"task_id", "prompt", "tests"}): completions are generated from `{bos}{prompt}` through the
  task's adapter, cut at the next top-level statement, and `prompt + completion` then the tests
  run in mftk.apps.sandbox (separate process, time and memory limits, no network, temp dir).
  pass@1 (greedy) is the fraction solved by the greedy completion; pass@k (sampling) uses n
  samples per problem and the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
  averaged over problems.

Adapter routing follows the run's mode: per-task adapters by the task id, `adapter.mode: shared`
through its one adapter, a router softly (no ids; what it would do on unlabelled text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import torch

from mftk.apps.eval_metrics import load_problems, pass_at_k, router_hits, truncate_completion
from mftk.apps.sandbox import run_program
from mftk.checkpoint import CONFIG_NAME, load_adapters
from mftk.core import adapter_layers
from mftk.patch import adapter_parameters
from mftk.train.config import Config, ConfigError, load_config
from mftk.train.data import IGNORE, DataError, special_strings
from mftk.train.losses import task_token_means, token_losses
from mftk.train.parallel import Single
from mftk.train.run import load_run
from mftk.train.step import TaskMeter, forward_batch, route_task


def _check_base(metrics_path: str, run: Any) -> None:
    """Adapters trained on one tiny base scored on another (the task text or the pretraining
    corpus changed since: their contents are hashed) would be a silent wrong answer."""
    if not os.path.isfile(metrics_path):
        return
    with open(metrics_path) as f:
        trained = json.load(f).get("model", {}).get("base")
    if trained is not None and trained != run.model_info.get("base"):
        raise ConfigError(
            f"the adapters were trained on the tiny base {trained} ({metrics_path}), but this "
            f"config now builds {run.model_info.get('base')}: the task text or "
            "model.pretrain.data's corpus changed since. Restore them to evaluate this run."
        )


class Evaluator:
    """A trained run, loaded for evaluation: the model with the adapters of `adapters_dir`, its
    tokenizer and the trainer's eval split (mftk.train.run.load_run; no optimizer, no Trainer)."""

    def __init__(self, cfg: Config, adapters_dir: str, run_dir: str | None = None, log=None):
        self.cfg = cfg
        self.adapters_dir = os.path.abspath(adapters_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        if run_dir is None:  # where the tiny base's cache is: the run that wrote the adapters
            parent = os.path.dirname(self.adapters_dir)
            run_dir = parent if os.path.isdir(os.path.join(parent, "cache")) else cfg.output.dir
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run = load_run(cfg, run_dir, self.log, Single(cfg))
        _check_base(os.path.join(os.path.dirname(self.adapters_dir), "metrics.json"), self.run)
        load_adapters(self.run.model, self.adapters_dir)
        self.model = self.run.model
        self.model.eval()
        self.tasks = cfg.task_names
        self.mode = "router" if self.run.router else cfg.adapter.mode
        self.adapter_params = sum(p.numel() for p in adapter_parameters(self.model))

    @torch.no_grad()
    def loss_metrics(self) -> dict[str, Any]:
        """Per-task held-out loss, perplexity, answer tokens; router accuracy for router runs."""
        run, n = self.run, len(self.tasks)
        cls = run.cls if run.cls.active else None  # classify tasks: their heads score them
        if cls is not None:
            cls.eval_begin()
        meter = TaskMeter(n, 0)
        hits = {"all": [torch.zeros(n, dtype=torch.float64) for _ in range(2)]}
        hits["answer"] = [torch.zeros(n, dtype=torch.float64) for _ in range(2)]
        per_layer: list[list[float]] = []  # [correct, total] over answer tokens, per router call
        for batch in run.eval_set:
            batch = batch.to(run.device)
            with forward_batch(run, batch) as fw:
                rl = fw.router_logits
            if cls is not None:
                cls.eval_batch(fw.hidden, batch)
            tl = token_losses(fw.logits, batch.targets)
            meter.add(*task_token_means(tl, batch.targets, batch.task_ids, n))
            if rl is not None:
                answer = batch.targets != IGNORE
                for key, mask in (("all", None), ("answer", answer)):
                    c, t = router_hits(rl, batch.task_ids, n, mask)
                    hits[key][0] += c
                    hits[key][1] += t
                if not per_layer:
                    per_layer = [[0.0, 0.0] for _ in rl]
                for acc, z in zip(per_layer, rl):
                    c, t = router_hits([z], batch.task_ids, n, answer)
                    acc[0] += float(c.sum())
                    acc[1] += float(t.sum())
        tot = meter.total()
        sums, counts = tot[:n], tot[n:]
        out: dict[str, Any] = {"tasks": {}}
        for i, t in enumerate(self.tasks):
            loss = float(sums[i] / counts[i]) if counts[i] else math.nan
            out["tasks"][t] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(counts[i])}
        if cls is not None:  # loss = the head's mean CE; accuracy, macro-F1, majority baseline
            flat: dict[str, float] = {}
            cls.eval_end(flat)
            for name, m in cls.last_metrics.items():
                out["tasks"][name] = {"type": "classify", "loss": flat[name], **m}
        # the average is over generation tasks: a classifier's CE is not on the same scale
        losses = [v["loss"] for v in out["tasks"].values() if v.get("type") != "classify"]
        out["average_loss"] = sum(losses) / len(losses)
        if run.router:
            for key, (c, t) in hits.items():
                out[f"router_accuracy_{key}"] = float(c.sum() / t.sum())
                for i, name in enumerate(self.tasks):
                    out["tasks"][name][f"router_accuracy_{key}"] = float(c[i] / t[i])
            out["router_accuracy"] = out["router_accuracy_all"]
            names = [name for name, _ in adapter_layers(self.model)]
            if len(names) != len(per_layer):  # a layer called twice per forward: index them
                names = [str(i) for i in range(len(per_layer))]
            out["router_accuracy_answer_per_layer"] = {
                name: c / t for name, (c, t) in zip(names, per_layer)
            }
        return out

    @torch.no_grad()
    def generate(
        self, task: str, prompt: str, n: int, sample: bool, max_new_tokens: int, **sampling
    ) -> list[str]:
        """n completions of `prompt` as `task` (greedy when not sample), truncated."""
        tok, run = self.run.tokenizer, self.run
        bos, _ = special_strings(tok)
        ids = tok(bos + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(run.device)
        kw = dict(do_sample=True, **sampling) if sample else dict(do_sample=False)
        with route_task(run, task):
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                eos_token_id=tok.eos_token_id,
                pad_token_id=run.pad_id,
                **kw,
            )
        texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [truncate_completion(t) for t in texts]

    def exec_metrics(
        self,
        task: str,
        problems: list[dict[str, Any]],
        samples: int = 10,
        ks: tuple[int, ...] = (1, 5, 10),
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 64,
        timeout: float = 5.0,
        memory_mb: int = 512,
        seed: int = 0,
    ) -> dict[str, Any]:
        """pass@1 (greedy) and pass@k (sampling, n = samples) of `task` on `problems`."""
        torch.manual_seed(seed)
        rows, statuses = [], {}
        for p in problems:
            greedy = self.generate(task, p["prompt"], 1, False, max_new_tokens)[0]
            g = run_program(p["prompt"] + greedy, p["tests"], timeout=timeout, memory_mb=memory_mb)
            statuses[g.status] = statuses.get(g.status, 0) + 1
            row = {"task_id": p["task_id"], "greedy_passed": g.passed, "greedy_status": g.status}
            row["greedy_completion"] = greedy
            if samples:
                outs = self.generate(
                    task,
                    p["prompt"],
                    samples,
                    True,
                    max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                )
                res = [
                    run_program(p["prompt"] + c, p["tests"], timeout=timeout, memory_mb=memory_mb)
                    for c in outs
                ]
                row["samples_passed"] = sum(r.passed for r in res)
                for r in res:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
            if "family" in p:
                row["family"] = p["family"]
            rows.append(row)
        out: dict[str, Any] = {
            "problems": len(problems),
            "pass@1_greedy": sum(r["greedy_passed"] for r in rows) / len(rows),
            "samples": samples,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "statuses": statuses,
            "per_problem": rows,
        }
        for k in ks:
            if samples and k <= samples:
                vals = [pass_at_k(samples, r["samples_passed"], k) for r in rows]
                out[f"pass@{k}"] = sum(vals) / len(vals)
        return out


def evaluate_run(
    cfg,
    adapters_dir: str,
    *,
    run_dir: str | None = None,
    exec_eval: bool = True,
    log=None,
    **exec_kw,
) -> dict[str, Any]:
    """All metrics of one run as a JSON-ready dict (see the module docstring)."""
    t0 = time.perf_counter()
    ev = Evaluator(cfg, adapters_dir, run_dir, log)
    result: dict[str, Any] = {
        "adapters": ev.adapters_dir,
        "mode": ev.mode,
        "adapter_parameters": ev.adapter_params,
        "model": ev.run.model_info,  # the base's identity: mftk compare refuses mixed bases
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, device {ev.run.device}",
    }
    t1 = time.perf_counter()
    result.update(ev.loss_metrics())
    result["loss_seconds"] = time.perf_counter() - t1
    metrics = os.path.join(os.path.dirname(ev.adapters_dir), "metrics.json")
    if os.path.isfile(metrics):  # the training run's own numbers, for compare
        with open(metrics) as f:
            m = json.load(f)
        result["train"] = {k: m.get(k) for k in ("steps", "train_seconds", "wall_seconds")}
    if exec_eval:
        for t in cfg.tasks:
            if t.eval == "exec":
                t1 = time.perf_counter()
                res = ev.exec_metrics(t.name, load_problems(t.exec_problems), **exec_kw)
                res["seconds"] = time.perf_counter() - t1
                result["tasks"][t.name]["exec"] = res
    result["seconds"] = time.perf_counter() - t0
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of evaluate_run's result."""
    router = "router_accuracy" in result
    head = ["task", "loss", "ppl", "tokens / classify"] + (
        ["router acc (all/answer)"] if router else []
    )
    exec_cols = sorted(
        {k for v in result["tasks"].values() for k in v.get("exec", {}) if k.startswith("pass@")},
        key=lambda s: (s != "pass@1_greedy", s),
    )
    head += exec_cols
    rows = []
    for t, v in result["tasks"].items():
        if v.get("type") == "classify":
            row = [t, f"{v['loss']:.4f}", "-", f"acc {v['accuracy']:.3f} f1 {v['macro_f1']:.3f}"]
        else:
            row = [t, f"{v['loss']:.4f}", f"{v['perplexity']:.3f}", str(v["tokens"])]
        if router and "router_accuracy_all" not in v:
            row.append("-")
        elif router:
            row.append(f"{v['router_accuracy_all']:.3f} / {v['router_accuracy_answer']:.3f}")
        row += [f"{v['exec'][c]:.3f}" if c in v.get("exec", {}) else "-" for c in exec_cols]
        rows.append(row)
    avg = ["average", f"{result['average_loss']:.4f}", "", ""]
    if router:
        avg.append(f"{result['router_accuracy_all']:.3f} / {result['router_accuracy_answer']:.3f}")
    rows.append(avg + [""] * len(exec_cols))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"mode {result['mode']}, {result['adapter_parameters']} adapter parameters, "
        f"{result['adapters']}"
    )
    return title + "\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run's YAML config (tasks, data split, model)")
    parser.add_argument(
        "--adapters",
        default=None,
        help="adapter folder (mftk_config.json + safetensors) or a run dir holding adapters/; "
        "default: <output.dir>/adapters",
    )
    parser.add_argument(
        "--json", default=None, help="write the result here (default: <run dir>/eval.json)"
    )
    parser.add_argument("--no-exec", action="store_true", help="skip the code-execution eval")
    parser.add_argument("--samples", type=int, default=10, help="samples per problem (pass@k)")
    parser.add_argument("--k", default="1,5,10", help="comma-separated k for pass@k")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per program")
    parser.add_argument("--memory-mb", type=int, default=512, help="address space per program")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def resolve_adapters(path: str | None, cfg) -> str:
    """The adapter folder for --adapters (a folder with mftk_config.json, or a run dir)."""
    path = path or os.path.join(cfg.output.dir, "adapters")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    if os.path.isfile(os.path.join(path, "adapters", CONFIG_NAME)):
        return os.path.join(path, "adapters")
    raise FileNotFoundError(f"--adapters: no {CONFIG_NAME} in {path} or {path}/adapters")


def run(args: argparse.Namespace) -> int:
    try:
        ks = tuple(int(k) for k in args.k.split(",") if k.strip())
        if any(k < 1 for k in ks) or args.samples < 0:
            raise ValueError
    except ValueError:
        print("mftk eval: error: --k: comma-separated ints >= 1; --samples >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        adapters = resolve_adapters(args.adapters, cfg)
        result = evaluate_run(
            cfg,
            adapters,
            exec_eval=not args.no_exec,
            samples=args.samples,
            ks=ks,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            timeout=args.timeout,
            memory_mb=args.memory_mb,
            seed=args.seed,
        )
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"mftk eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    path = args.json or os.path.join(os.path.dirname(adapters), "eval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)
    return 0
