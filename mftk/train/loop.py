"""The training loop: one adapter per task (or a router), trained in one pass over mixed batches.

    trainer = Trainer(load_config("config.yaml"))
    metrics = trainer.train()

setup() builds the run's parts once (mftk.train.run.build_run) and the loss mode's object
(mftk.train.losses.LOSSES). Each step draws packed micro-batches from the stage's task mix and
runs mftk.train.step.train_step; evaluation (per-task answer-token loss on the held-out split)
runs at step 0, every `train.eval_every` steps and at the end, and feeds the loss mode (CoBa's
L(0)) and the eval tracker (early stopping, keep-best: mftk.train.tracking). Around each step the
loss mode may update itself and ask for a few eval batches' losses (CoBa's updates).
What differs across processes is the strategy's (mftk.train.parallel.Single here,
mftk.train.distributed.FSDP2 for `distributed.strategy: fsdp2`).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from mftk.train.checkpointing import (
    latest_valid,
    load_rank_rng,
    prepare_output,
    remove_if_empty,
    remove_stale_temps,
)
from mftk.train.config import Config
from mftk.train.interrupt import Interrupted, StopSignals
from mftk.train.losses import build_loss
from mftk.train.parallel import RANK_SEED_STRIDE, Single
from mftk.train.progress import load_trainer_state, plan_stages, stage_at, trainer_state
from mftk.train.report import Progress, fmt, new_history, record_eval, record_step, write_outputs
from mftk.train.run import build_run
from mftk.train.step import evaluate, sampled_task_losses, train_step
from mftk.train.tracking import EvalTracker


class Trainer:
    """A training run from a Config: train() runs (or resumes) it and returns the metrics."""

    strategy: Callable[[Config], Any] = Single  # how the run spreads over processes
    rank, is_main = 0, True  # the process that logs and writes outputs (rank 0 under torchrun)

    def __init__(
        self,
        cfg: Config,
        output_dir: str | None = None,
        max_steps: int | None = None,
        resume: bool = False,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        self.out = os.path.abspath(output_dir or cfg.output.dir)
        self.max_steps_arg = max_steps  # --max-steps (None: the configured steps)
        self.resume, self.overwrite = resume, overwrite
        self._log = log
        self.par = self.strategy(cfg)
        self.rank, self.is_main = self.par.rank, self.par.rank == 0
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.is_main
        self.tasks = cfg.task_names
        self.plan_steps()

    def plan_steps(self) -> None:
        """max_steps and the stages' step ranges (mftk.train.progress.plan_stages)."""
        self.max_steps, self.stages = plan_stages(self.cfg, self.max_steps_arg)

    # the run's parts (after setup)
    model = property(lambda self: self.run.model)
    tokenizer = property(lambda self: self.run.tokenizer)
    eval_set = property(lambda self: self.run.eval_set)
    sampler = property(lambda self: self.run.sampler)
    opt = property(lambda self: self.run.opt)
    varlen = property(lambda self: self.run.varlen)

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            tqdm.write(msg, file=sys.stderr)

    def setup(self) -> None:
        """Build the run (model, data, optimizer), the loss mode and a fresh history. First the
        output dir: it must not hold another run (checkpointing.prepare_output: --resume,
        --overwrite); the main process removes temp folders of killed runs; with --resume the
        checkpoint to load is picked (resume_from: the newest valid one, or None). An output
        dir this call created is removed again if setup fails before anything is written there."""
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        prepare_output(self.out, self.resume, self.overwrite, self.is_main, self.log)
        ckpts = os.path.join(self.out, "checkpoints")
        if self.is_main:
            remove_stale_temps(ckpts, self.log)
        self.resume_from = latest_valid(ckpts, self.log) if self.resume else None
        created = not os.path.exists(self.out)
        try:
            self.run = build_run(self.cfg, self.out, self.log, self.par)
            os.makedirs(self.out, exist_ok=True)
        except BaseException:
            if created and self.is_main:
                remove_if_empty(self.out)
            raise
        self.loss = build_loss(self.cfg.loss, len(self.tasks))
        self.plan_steps()  # train.epochs: build_run has set the steps
        weights = [t.loss_weight for t in self.cfg.tasks]
        self.tracker = EvalTracker(weights, self.cfg.train.early_stopping_patience)
        self.history = new_history(self.tasks)
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.eval_before: dict[str, float] | None = None

    def dropout_seed(self) -> int:
        """This rank's torch seed for the training steps (their only torch randomness: LoRA
        dropout): train.seed + rank × RANK_SEED_STRIDE, so dropout masks differ across ranks."""
        return self.cfg.train.seed + RANK_SEED_STRIDE * self.rank

    # ------------------------------------------------------------------ stages

    def stage_index(self, step: int) -> int:
        return stage_at(self.stages, step)

    def stage_mix(self, i: int) -> list[float]:
        mix = self.cfg.stages[i].mix
        if mix is None:
            return [float(len(d.train)) for d in self.run.data]
        return [float(mix.get(t, 0.0)) for t in self.tasks]

    def task_weights(self, i: int) -> torch.Tensor:
        over = self.cfg.stages[i].loss_weights or {}
        return self.loss.weights([over.get(t.name, t.loss_weight) for t in self.cfg.tasks])

    def enter_stage(self, i: int) -> None:
        st = self.cfg.stages[i]
        self.run.sampler.set_stage(self.stage_mix(i), st.noise, st.noise_kind)
        if len(self.stages) > 1 or self.step == 0:
            mix = dict(zip(self.tasks, [round(x, 3) for x in self.stage_mix(i)]))
            self.log(
                f"stage {i + 1}/{len(self.stages)} '{st.name}' from step {self.step}: "
                f"{st.steps} steps, mix {mix}, noise {st.noise}"
            )

    # ------------------------------------------------------------------ steps

    def train_step(self, stage: int) -> dict[str, Any]:
        return train_step(self.run, self.par, self.loss, self.task_weights(stage))

    def evaluate(self) -> dict[str, float]:
        """Per-task mean answer-token loss over the eval split (and router accuracy)."""
        return evaluate(self.run, self.par)

    def record_eval(self, ev: dict[str, float]) -> None:
        record_eval(self.history, self.step, ev)
        self.loss.update([ev[t] for t in self.tasks], self.step)
        self.tracker.record(self.step, [ev[t] for t in self.tasks])

    def observe_eval_batches(self, step: int) -> None:
        """After the training step that followed `step` completed steps: the eval batches the
        loss mode asks for (CoBa's samples), and their per-task losses back to it."""
        picks = self.loss.eval_batches(step, len(self.run.eval_set))
        if picks:
            batches = [self.run.eval_set[k] for k in picks]
            self.loss.observe(sampled_task_losses(self.run, self.par, batches))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The run's progress (mftk.train.progress); the strategy saves optimizer and RNG."""
        return trainer_state(self)

    def load_state_dict(self, st: dict[str, Any]) -> None:
        load_trainer_state(self, st)

    def load_checkpoint(self, path: str) -> None:
        """Adapters, optimizer, progress and RNG from checkpoint folder path."""
        self.par.load(self, path)

    def load_rng(self, path: str) -> None:
        """This rank's RNG from a per-rank checkpoint folder (see checkpointing.load_rank_rng)."""
        load_rank_rng(path, self.rank, self.dropout_seed() + self.step)

    def save(self) -> str:
        path = self.par.save(self)
        if self.is_main:  # fsdp2: after the collective save
            keep = self.cfg.output.keep_best
            self.tracker.keep_best(os.path.join(self.out, "checkpoints"), path, self.step, keep)
        self.log(f"checkpoint -> {path}")
        self.saved = (self.step, path)
        return path

    def stop_on_signal(self, progress: Progress) -> None:
        """Collective, at a step boundary: after a SIGINT / SIGTERM (mftk.train.interrupt), save a
        checkpoint at this step (unless just saved), close, and raise Interrupted."""
        signum = self.signals.requested(self.par.reduce)
        if signum is None:
            return
        path = self.saved[1] if self.saved[0] == self.step else self.save()
        progress.close()
        self.signals.armed = False
        self.par.close()
        raise Interrupted(signum, self.step, path)

    def checkpoint_due(self) -> bool:
        """A checkpoint after this step: every output.save_every steps, at each epoch's end
        (output.save_every_epoch), at the last step, and when early stopping ends the run."""
        o, s = self.cfg.output, self.step
        every = o.save_every and s % o.save_every == 0
        epoch = o.save_every_epoch and s % self.run.steps_per_epoch == 0
        return bool(every or epoch or s == self.max_steps or self.tracker.stop)

    # ------------------------------------------------------------------ main

    def train(self) -> dict[str, Any] | None:
        """Train (collectively under fsdp2); the main process returns the metrics, others None.
        Interrupted: stopped by SIGINT / SIGTERM after saving a checkpoint."""
        with StopSignals(announce=self.is_main) as self.signals:
            return self._train()

    def _train(self) -> dict[str, Any] | None:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.setup()
        resumed_from = None
        if self.resume:
            resumed_from = self.resume_from
            if resumed_from is None:
                self.log(f"--resume: no checkpoint under {self.out}/checkpoints; starting fresh")
            else:
                self.load_checkpoint(resumed_from)
                self.log(f"resumed from {resumed_from} at step {self.step}")
        if resumed_from is None:
            random.seed(cfg.train.seed)
            torch.manual_seed(self.dropout_seed())
            self.eval_before = self.evaluate()
            self.record_eval(self.eval_before)
            self.log("eval before: " + fmt(self.eval_before))
        progress = Progress(self)
        self.run.model.train()
        stage = -1
        self.saved: tuple[int, str | None] = (-1, None)
        self.signals.armed = True
        while self.step < self.max_steps and not self.tracker.stop:
            i = self.stage_index(self.step)
            if i != stage:
                stage = i
                self.enter_stage(i)
            self.loss.begin_step(self.step)
            t0 = time.perf_counter()
            res = self.train_step(i)
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.observe_eval_batches(self.step - 1)
            self.tokens_seen += res["tokens"]
            record_step(self.history, self.step, i, res)
            tps = self.tokens_seen / max(self.train_seconds, 1e-9)
            progress.step(self.step, cfg.stages[i].name, res, tps)
            # evaluations follow the configured schedule, not --max-steps, so
            # that a stopped-and-resumed run matches an uninterrupted one exactly
            if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                ev = self.evaluate()
                self.record_eval(ev)
                progress.eval(self.step, ev)
            if self.checkpoint_due():
                self.save()
            if self.tracker.stop:
                self.log(f"early stopping at step {self.step}: {self.tracker.stop_reason()}")
                break
            self.stop_on_signal(progress)
        self.signals.armed = False
        progress.close()
        out = self.finish(time.perf_counter() - t_start, resumed_from)
        self.par.close()
        return out

    def finish(self, wall: float, resumed_from: str | None) -> dict[str, Any] | None:
        """Evaluate at the last step unless the schedule already did (stopped early by
        --max-steps; recorded, no CoBa update), then the main process writes the outputs."""
        h = self.history
        if not h["eval_step"] or h["eval_step"][-1] != self.step:
            record_eval(h, self.step, self.evaluate(), classify=False)
        with self.par.full_adapters(self.run.model):  # fsdp2: gathered whole on rank 0
            return write_outputs(self, wall, resumed_from) if self.is_main else None
