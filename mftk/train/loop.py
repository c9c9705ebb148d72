"""The training loop: one adapter per task (or a router), trained in one pass over mixed batches.

    trainer = Trainer(load_config("config.yaml"))
    metrics = trainer.train()

Each step draws packed micro-batches from the stage's task mix, routes every token to its task's
adapter with `mftk.use_tasks(model, task_ids)`, and combines per-task token losses by `loss.mode`.
Router models route softly and add the router losses. Evaluation (per-task answer-token loss on the
held-out split) runs at step 0, every `train.eval_every` steps and at the end; CoBa updates there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from typing import Any

import torch

from mftk.patch import adapter_parameters, patch_model
from mftk.routing import use_tasks
from mftk.train import checkpointing as ckpt
from mftk.train.classify import ClassifyTasks, as_config_error, patch_kwargs, train_labels
from mftk.train.coba import CoBa
from mftk.train.config import Config, ConfigError
from mftk.train.data import build_task_data, describe, load_examples
from mftk.train.losses import mft_loss, router_losses, task_token_means, token_losses
from mftk.train.packing import MultiTaskSampler, eval_batches, rows_to_batch
from mftk.train.tiny_model import DTYPES, load_model_and_tokenizer

SHARED_ADAPTER = "shared"  # the one adapter's name in adapter.mode: shared


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at step s: linear warm-up, then cosine/linear decay to 10%."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - 0.9 * frac
        return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))

    return f


def resolve_device(device: str) -> torch.device:
    """train.device as a torch.device (auto: cuda when available, else cpu)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def flash_attention_available(device: torch.device) -> bool:
    """flash-attn 2 can run: a CUDA device and the flash_attn package importable."""
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class Trainer:
    """Model, data and optimizer from a Config; train() runs (or resumes) and returns metrics."""

    is_main = True  # the process that logs and writes outputs (rank 0 under torchrun)

    def __init__(
        self,
        cfg: Config,
        output_dir: str | None = None,
        max_steps: int | None = None,
        resume: bool = False,
        progress: bool | None = None,
        log=None,
    ):
        self.cfg = cfg
        self.out = os.path.abspath(output_dir or cfg.output.dir)
        self.max_steps = cfg.train.steps if max_steps is None else min(max_steps, cfg.train.steps)
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._log = log
        self.tasks = cfg.task_names
        self.router = cfg.adapter.router is not None
        # adapter.mode shared (the MFTCoder baseline): one adapter that every task's tokens go
        # through; losses and metrics stay per task (batch.task_ids), only the routing changes
        self.shared = cfg.adapter.mode == "shared"
        self.adapter_tasks = [SHARED_ADAPTER] if self.shared else self.tasks
        self.stages = []
        start = 0
        for s in cfg.stages:
            self.stages.append({"name": s.name, "start": start, "end": start + s.steps})
            start += s.steps

    # ------------------------------------------------------------------ setup

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        else:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        os.makedirs(self.out, exist_ok=True)
        if cfg.model.path is not None:
            from transformers import AutoTokenizer

            from mftk.train.data import special_strings

            bos, eos = special_strings(AutoTokenizer.from_pretrained(cfg.model.path))
        else:
            bos, eos = "<s>", "</s>"
        examples = load_examples(cfg, bos, eos)
        texts = [ex.text() for part in examples[:2] for exs in part for ex in exs]
        pre_docs = [[seg for seg, _ in ex.segments] for exs in examples[0] for ex in exs]
        cache = cfg.model.cache_dir or os.path.join(self.out, "cache")
        attn_cfg = cfg.model.attn_implementation
        attn = self.attention(self.attention_device())
        cfg.model.attn_implementation = attn
        try:
            self.model, self.tokenizer, self.model_info = load_model_and_tokenizer(
                cfg.model, texts, pre_docs, cfg.data.seq_len, cfg.train.seed, cache, self.log
            )
        finally:  # restored: the run's fingerprint (run_key) is the configured one
            cfg.model.attn_implementation = attn_cfg
        self.data = build_task_data(cfg, self.tokenizer, examples)
        self.log(f"data: {describe(self.data)}")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.dtype = DTYPES[cfg.model.dtype]
        self.device = resolve_device(cfg.train.device)
        if cfg.model.quantize is not None:  # QLoRA: 4-bit bases, on the CPU, layer by layer
            self.quantize_base()
        self.model.to(self.device)
        # flash-attention takes no 4D mask: packed boundaries come from the position ids
        self.varlen = attn == "flash_attention_2"
        a = cfg.adapter
        torch.manual_seed(cfg.train.seed)
        rank, alpha = a.rank, a.alpha
        if self.shared and a.match_params:  # T rank-r adapters' parameters; same alpha / rank
            rank, alpha = a.rank * len(self.tasks), a.alpha * len(self.tasks)
        pk = patch_kwargs(cfg)  # per-task ranks, layer range
        try:
            patch_model(
                self.model,
                tasks=self.adapter_tasks,
                rank=pk.pop("rank", rank),
                alpha=alpha,
                target_modules=a.target_modules,
                router=a.router,
                top_k=a.top_k,
                dropout=a.dropout,
                **pk,
            )
        except ValueError as err:
            raise as_config_error(err) from None
        self.cls = ClassifyTasks(cfg, self.model, bos, train_labels(self.data))
        self.params = list(adapter_parameters(self.model)) + self.cls.params()
        self.opt = torch.optim.AdamW(
            self.cls.param_groups(self.params, cfg.train.lr),
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps)
        )
        self.sampler = MultiTaskSampler(
            [d.train for d in self.data],
            cfg.train.seed,
            len(self.tokenizer),
            cfg.data.noise_kind,
            cfg.data.noise_token_rate,
        )
        all_eval = [s for d in self.data for s in d.eval]
        self.eval_set = eval_batches(
            all_eval,
            cfg.train.batch_size,
            cfg.data.seq_len,
            cfg.data.packing,
            self.pad_id,
            self.dtype,
        )
        c = cfg.loss.coba
        self.coba = CoBa(len(self.tasks), c.history_length, c.warmup_steps, c.tau)
        self.history: dict[str, Any] = {
            "step": [],
            "loss": [],
            "lr": [],
            "tokens": [],
            "stage": [],
            "train": {t: [] for t in self.tasks},
            "eval_step": [],
            "eval": {t: [] for t in self.tasks},
            "router_accuracy": [],
            "task_weights": [],
        }
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0

    def attention_device(self) -> torch.device:
        """The device the model's attention runs on (the fsdp2 trainer: this rank's device)."""
        return resolve_device(self.cfg.train.device)

    def attention(self, device: torch.device) -> str:
        """The attention implementation to load the model with: the configured one, or sdpa
        (with a logged note) for flash_attention_2 where flash-attn cannot run on device."""
        attn = self.cfg.model.attn_implementation
        if attn == "flash_attention_2" and not flash_attention_available(device):
            # packed samples stay apart through the 4D block mask instead of varlen boundaries
            self.log("flash-attn is not usable here (needs CUDA and flash_attn): using sdpa")
            return "sdpa"
        return attn

    def quantize_base(self) -> None:
        from mftk.quant import base_linear_bytes, quantize_model

        m = self.cfg.model
        before = base_linear_bytes(self.model)
        try:
            names = quantize_model(
                self.model, m.quantize, m.double_quant, m.compute_dtype,
                self.cfg.adapter.target_modules, m.quantize_all_linear,
            )  # fmt: skip
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.quantize: {err}") from None
        after = base_linear_bytes(self.model)
        self.log(
            f"quantized {len(names)} linears to {m.quantize} (double_quant={m.double_quant}, "
            f"compute {m.compute_dtype}): base linear weights {before / 2**20:.2f} -> "
            f"{after / 2**20:.2f} MiB"
        )

    # ------------------------------------------------------------------ pieces

    def dropout_seed(self) -> int:
        """The torch seed of the training steps (their only torch randomness: LoRA dropout)."""
        return self.cfg.train.seed

    def stage_index(self, step: int) -> int:
        for i, st in enumerate(self.stages):
            if step < st["end"]:
                return i
        return len(self.stages) - 1

    def stage_mix(self, i: int) -> list[float]:
        mix = self.cfg.stages[i].mix
        if mix is None:
            return [float(len(d.train)) for d in self.data]
        return [float(mix.get(t, 0.0)) for t in self.tasks]

    def task_weights(self, i: int) -> torch.Tensor:
        over = self.cfg.stages[i].loss_weights or {}
        w = [over.get(t.name, t.loss_weight) for t in self.cfg.tasks]
        if self.cfg.loss.mode == "coba":
            w = [a * b for a, b in zip(w, self.coba.weights())]
        return torch.tensor(w, dtype=torch.float32)

    def forward(self, batch):
        """(logits (B, S, V), router losses dict or None) for one batch (on self.device)."""
        ids = None if self.router else self.route_ids(batch.task_ids)
        with (
            use_tasks(self.model, ids, collect_router_logits=self.router) as state,
            self.cls.capture() as cap,
        ):
            logits = self.model(**batch.model_inputs(self.varlen)).logits
            rl = router_losses(state.pop_router_logits(), batch.task_ids) if self.router else None
        self.hidden = None if cap is None else cap.hidden  # classify heads read it
        return logits, rl

    def route_ids(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The adapter ids for a batch's task ids (B, S): themselves, or 0 (-1 stays) shared."""
        return task_ids.clamp(max=0) if self.shared else task_ids

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-task mean answer-token loss over the eval split (and router accuracy)."""
        self.model.eval()
        n = len(self.tasks)
        stats, n_tokens = [], []
        self.cls.eval_begin()
        for batch in self.eval_set:
            batch = batch.to(self.device)
            logits, rl = self.forward(batch)
            if self.cls.active:
                self.cls.eval_batch(self.hidden, batch)
            means, cnt = task_token_means(
                token_losses(logits, batch.targets), batch.targets, batch.task_ids, n
            )
            acc = rl["accuracy"] if rl is not None else means.new_zeros(())
            # on the device until the end: one copy to the host per evaluation
            stats.append(torch.cat([(means * cnt).double(), cnt.double(), acc.double().reshape(1)]))
            n_tokens.append(batch.num_tokens)
        self.model.train()
        sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        acc, acc_n = 0.0, 0
        for row, ntok in zip(torch.stack(stats).cpu() if stats else [], n_tokens):
            sums += row[:n]
            counts += row[n : 2 * n]
            if self.router:
                acc += float(row[-1]) * ntok
                acc_n += ntok
        return self._eval_result(sums, counts, acc, acc_n)

    def _eval_result(
        self, sums: torch.Tensor, counts: torch.Tensor, acc: float, acc_n: float
    ) -> dict[str, float]:
        """{task: mean answer-token loss} from (T,) fp64 sums and counts (classify tasks: CE
        mean, accuracy, macro-F1), and router_accuracy = acc / acc_n when acc_n > 0."""
        out = {t: float(sums[i] / counts[i]) for i, t in enumerate(self.tasks)}
        self.cls.eval_end(out)
        if acc_n:
            out["router_accuracy"] = float(acc / acc_n)
        return out

    def record_eval(self, ev: dict[str, float]) -> None:
        self.history["eval_step"].append(self.step)
        for t in self.tasks:
            self.history["eval"][t].append(ev[t])
        if "router_accuracy" in ev:
            self.history["router_accuracy"].append(ev["router_accuracy"])
        for k in ev:
            if "/" in k:  # classify: <task>/accuracy, <task>/f1
                self.history.setdefault("classify", {}).setdefault(k, []).append(ev[k])
        if self.cfg.loss.mode == "coba":
            self.coba.update([ev[t] for t in self.tasks], self.step)

    def train_step(self, stage: int) -> dict[str, Any]:
        cfg = self.cfg
        weights = self.task_weights(stage)
        n = len(self.tasks)
        tokens, stats = 0, []
        for _ in range(cfg.train.grad_accum):
            batch = self._next_batch()
            logits, rl = self.forward(batch)
            if self.cls.active:  # classify tasks: head CE in place of their token means
                loss, means, cnt = self.cls.loss(
                    logits, self.hidden, batch, weights, cfg.loss.mode, cfg.loss.focal_gamma
                )
            else:
                loss, means, cnt = mft_loss(
                    logits, batch.targets, batch.task_ids, weights, cfg.loss.mode,
                    cfg.loss.focal_gamma,
                )  # fmt: skip
            if rl is not None:
                loss = (
                    loss
                    + cfg.loss.router_balance * rl["balance"]
                    + cfg.loss.router_supervision * rl["supervision"]
                )
            (loss / cfg.train.grad_accum).backward()
            acc = rl["accuracy"] if rl is not None else loss.new_zeros(())
            stats.append(  # stays on the device: one copy to the host per step, below
                torch.cat([
                    loss.detach().double().reshape(1), acc.double().reshape(1),
                    (means.detach() * cnt).double().to(loss.device), cnt.double().to(loss.device),
                ])
            )  # fmt: skip
            tokens += batch.num_tokens
        # the same float64 values and sums, in the same order, as per-micro-step .item()/.cpu()
        sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        total, racc = 0.0, []
        for row in torch.stack(stats).cpu():
            total += float(row[0]) / cfg.train.grad_accum
            if self.router:
                racc.append(float(row[1]))
            sums += row[2 : 2 + n]
            counts += row[2 + n :]
        return self._finish_step(total, sums, counts, tokens, racc, weights)

    def _next_batch(self):
        """The next packed training micro-batch (this rank's rows under fsdp2), on self.device."""
        c = self.cfg
        rows = self.sampler.next_rows(c.train.batch_size, c.data.seq_len, c.data.packing)
        return rows_to_batch(rows, self.pad_id, self.dtype).to(self.device)

    def _clip(self) -> None:
        """Clip the gradients' norm to train.clip (the distributed trainer: the global norm)."""
        if self.cfg.train.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip)

    def _finish_step(
        self,
        total: float,
        sums: torch.Tensor,
        counts: torch.Tensor,
        tokens: int,
        racc: list[float],
        weights: torch.Tensor,
    ) -> dict[str, Any]:
        """Clip, step the optimizer and scheduler, zero the grads; the step's result dict.

        total: the step's loss; sums, counts: (T,) fp64 per-task answer-token loss sums and
        counts over the step's micro-batches; racc: per-micro-batch router accuracies.
        """
        self._clip()
        self.opt.step()
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        per_task = {
            t: (float(sums[i] / counts[i]) if counts[i] > 0 else None)
            for i, t in enumerate(self.tasks)
        }
        return {
            "loss": total,
            "per_task": per_task,
            "tokens": tokens,
            "lr": lr,
            "router_accuracy": sum(racc) / len(racc) if racc else None,
            "weights": weights.tolist(),
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "sampler": self.sampler.state_dict(),
            "coba": self.coba.state_dict(),
            "rng": ckpt.rng_state(),
            "history": self.history,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "eval_before": getattr(self, "eval_before", None),
            "run_key": run_key(self.cfg),
            "tasks": list(self.tasks),
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("run_key") != run_key(self.cfg):
            raise ConfigError(
                "--resume: the checkpoint was written by a run with a different config (tasks, "
                "data, model, adapter, loss, stages or training settings); resuming it would not "
                "continue that run. Use a new --output, or restore the config."
            )
        self.opt.load_state_dict(st["optimizer"])
        self._load_progress(st)
        ckpt.set_rng_state(st["rng"])

    def _load_progress(self, st: dict[str, Any]) -> None:
        """Step, scheduler, sampler position, CoBa, history and counters from a trainer state."""
        self.step = st["step"]
        self.sched.load_state_dict(st["scheduler"])
        self.sampler.load_state_dict(st["sampler"])
        self.coba.load_state_dict(st["coba"])
        self.history = st["history"]
        self.tokens_seen = st["tokens_seen"]
        self.train_seconds = st["train_seconds"]
        self.eval_before = st["eval_before"]

    def load_checkpoint(self, path: str) -> None:
        """Adapters into the model and the trainer state from checkpoint folder path (with tasks
        appended to the config since: see mftk.train.grow)."""
        from mftk.train.grow import load_grown_checkpoint

        st = load_grown_checkpoint(self, path, run_key)
        self.load_state_dict(ckpt.load_checkpoint(path, self.model) if st is None else st)

    def save(self) -> str:
        path = ckpt.save_checkpoint(
            os.path.join(self.out, "checkpoints"),
            self.step,
            self.model,
            self.adapter_tasks,
            self.state_dict(),
            self.cfg.output.keep_last,
        )
        self.log(f"checkpoint -> {path}")
        return path

    # ------------------------------------------------------------------ main

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.setup()
        resumed_from = None
        if self.resume:
            found = ckpt.list_checkpoints(os.path.join(self.out, "checkpoints"))
            if not found:
                self.log(f"--resume: no checkpoint under {self.out}/checkpoints; starting fresh")
            else:
                resumed_from = found[-1]
                self.load_checkpoint(resumed_from)
                self.log(f"resumed from {resumed_from} at step {self.step}")
        if resumed_from is None:
            random.seed(cfg.train.seed)
            torch.manual_seed(self.dropout_seed())
            self.eval_before = self.evaluate()
            self.record_eval(self.eval_before)
            self.log("eval before: " + _fmt(self.eval_before))
        writer = _tensorboard(self.out) if self.is_main else None
        from tqdm import tqdm

        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            disable=not self.progress,
            dynamic_ncols=True,
            desc="train",
            file=sys.stderr,
        )
        self.model.train()
        stage = -1
        window_tokens, window_t = 0, time.perf_counter()
        while self.step < self.max_steps:
            i = self.stage_index(self.step)
            if i != stage:
                stage = i
                st = cfg.stages[i]
                self.sampler.set_stage(self.stage_mix(i), st.noise, st.noise_kind)
                if len(self.stages) > 1 or self.step == 0:
                    mix = dict(zip(self.tasks, [round(x, 3) for x in self.stage_mix(i)]))
                    self.log(
                        f"stage {i + 1}/{len(self.stages)} '{st.name}' from step {self.step}: "
                        f"{st.steps} steps, mix {mix}, noise {st.noise}"
                    )
            t0 = time.perf_counter()
            res = self.train_step(i)
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += res["tokens"]
            window_tokens += res["tokens"]
            h = self.history
            h["step"].append(self.step)
            h["loss"].append(res["loss"])
            h["lr"].append(res["lr"])
            h["tokens"].append(res["tokens"])
            h["stage"].append(i)
            h["task_weights"].append(res["weights"])
            for t in self.tasks:
                h["train"][t].append(res["per_task"][t])
            tps = self.tokens_seen / max(self.train_seconds, 1e-9)
            bar.set_postfix_str(
                f"tok/s {tps:.0f} | "
                + " ".join(f"{t[:10]} {v:.3f}" for t, v in res["per_task"].items() if v is not None)
            )
            bar.update(1)
            if writer is not None:
                writer.add_scalar("train/loss", res["loss"], self.step)
                writer.add_scalar("train/lr", res["lr"], self.step)
                for t, v in res["per_task"].items():
                    if v is not None:
                        writer.add_scalar(f"train/{t}", v, self.step)
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                now = time.perf_counter()
                rate = window_tokens / max(now - window_t, 1e-9)
                window_tokens, window_t = 0, now
                extra = (
                    f" | router acc {res['router_accuracy']:.3f}"
                    if res["router_accuracy"] is not None
                    else ""
                )
                self.log(
                    f"step {self.step}/{self.max_steps} [{cfg.stages[i].name}] "
                    f"loss {res['loss']:.4f} | "
                    + _fmt({k: v for k, v in res["per_task"].items() if v is not None})
                    + f" | lr {res['lr']:.2e} | {rate:.0f} tok/s{extra}"
                )
            # evaluations (and CoBa updates) follow the configured schedule, not --max-steps, so
            # that a stopped-and-resumed run matches an uninterrupted one exactly
            if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                ev = self.evaluate()
                self.record_eval(ev)
                self.log(f"eval @ {self.step}: " + _fmt(ev))
                if writer is not None:
                    for t, v in ev.items():
                        writer.add_scalar(f"eval/{t}", v, self.step)
            save_every = cfg.output.save_every
            if (save_every and self.step % save_every == 0) or self.step == self.max_steps:
                self.save()
        bar.close()
        if writer is not None:
            writer.close()
        return self.finish(time.perf_counter() - t_start, resumed_from)

    def _final_eval(self) -> None:
        """Evaluate at the last step unless the schedule already did (stopped early by
        --max-steps); recorded in the history (no CoBa update)."""
        h = self.history
        if not h["eval_step"] or h["eval_step"][-1] != self.step:
            ev = self.evaluate()
            h["eval_step"].append(self.step)
            for t in self.tasks:
                h["eval"][t].append(ev[t])
            if "router_accuracy" in ev:
                h["router_accuracy"].append(ev["router_accuracy"])

    def finish(self, wall: float, resumed_from: str | None) -> dict[str, Any]:
        from mftk.train.plots import plot_losses

        h = self.history
        self._final_eval()
        ckpt.save_adapter_outputs(self.model, self.adapter_tasks, self.out)
        if self.cls.active:  # `mftk scan --adapters out/adapters` needs the tokenizer
            self.tokenizer.save_pretrained(os.path.join(self.out, "adapters"))
        eval_after = {t: h["eval"][t][-1] for t in self.tasks}
        metrics = {
            "tasks": self.tasks,
            "steps": self.step,
            "eval_before": {t: self.eval_before[t] for t in self.tasks},
            "eval_after": eval_after,
            "final_train_loss": h["loss"][-1] if h["loss"] else None,
            "train_tokens": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "tokens_per_second": self.tokens_seen / max(self.train_seconds, 1e-9),
            "wall_seconds": wall,
            "resumed_from": resumed_from,
            "stages": self.stages,
            "loss_mode": self.cfg.loss.mode,
            "router_accuracy": h["router_accuracy"][-1] if h["router_accuracy"] else None,
            "classify": self.cls.last_metrics,
            "skipped": {d.name: dict(d.skipped) for d in self.data},
            "samples": {d.name: {"train": len(d.train), "eval": len(d.eval)} for d in self.data},
            "model": self.model_info,
            "history": h,
        }
        with open(os.path.join(self.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        plot_losses(h, self.tasks, self.stages, os.path.join(self.out, "loss.png"))
        self.log("eval after:  " + _fmt(eval_after))
        for t, m in self.cls.last_metrics.items():
            self.log(
                f"{t}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} on "
                f"{m['eval_samples']} eval samples (majority class '{m['majority_label']}': "
                f"accuracy {m['majority_accuracy']:.3f}, macro-F1 {m['majority_macro_f1']:.3f})"
            )
        self.log(
            f"wrote {self.out}/loss.png, metrics.json, adapters/, peft/ "
            f"({self.step} steps, {metrics['tokens_per_second']:.0f} tok/s, wall {wall:.1f}s)"
        )
        return metrics


def run_key(cfg: Config) -> str:
    """A fingerprint of everything that shapes the loss curve (not output, logging, threads)."""
    d = cfg.to_dict()
    for k in ("output", "base_dir", "distributed"):
        d.pop(k)
    for k in ("log_every", "threads", "device"):
        d["train"].pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt(d: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in d.items())


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed
        return None
    return SummaryWriter(os.path.join(out, "tb"))
