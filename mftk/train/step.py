"""One training step and one evaluation, over a Run and a strategy.

A batch goes through `forward_batch`, the one place that routes tokens to their adapters
(mftk.use_tasks) and runs the model (`route_task` routes generation). The strategy turns the
forward into this process's share of the loss and back-propagates it (mftk.train.parallel.Single:
the batch's own loss; mftk.train.distributed.FSDP2: a share of the global batch's). Per-task
loss sums and counts collect in a TaskMeter on the device and reach the host once per step or
evaluation; the strategy's reducer sums an evaluation's over processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mftk.routing import use_tasks
from mftk.segment_router import prompt_mask, use_segment_router
from mftk.train.losses import TaskLoss, router_losses, task_token_means, token_losses
from mftk.train.packing import Batch, rows_to_batch
from mftk.train.run import Run, TrainRun, batch_limits


@dataclass
class Forward:
    """A routed forward. logits: (B, S, V); router_logits: per patched layer (..., T) (router
    runs, else None); hidden: the decoder's final hidden state (B, S, H) (classify tasks, else
    None)."""

    logits: Tensor
    router_logits: list[Tensor] | None
    hidden: Tensor | None


def route_ids(task_ids: Tensor, shared: bool) -> Tensor:
    """The adapter ids (B, S) of a batch's task ids: themselves, or 0 (-1 stays) when shared."""
    return task_ids.clamp(max=0) if shared else task_ids


@contextlib.contextmanager
def forward_batch(run: Run, batch: Batch, true_ids: bool = False) -> Iterator[Forward]:
    """Run the model on batch (on run.device) with every token routed to its task's adapter (a
    router: softly, no ids; a segment router: each sample by its top-1, or by its task ids with
    true_ids (a warm start), router_logits [its (B, S, T) token logits]; adapter.mode shared: the
    one adapter). The routing holds inside the block: a backward there under activation
    checkpointing recomputes the forward with it."""
    if run.segment:
        prompt = prompt_mask(batch.targets, batch.seq_ids)
        true = batch.task_ids if true_ids else None
        st = run.cfg.adapter.straight_through and run.model.training
        routing = use_segment_router(run.model, batch.seq_ids, prompt, true, straight_through=st)
    else:
        ids = None if run.router else route_ids(batch.task_ids, run.shared)
        routing = use_tasks(run.model, ids, collect_router_logits=run.router)
    with routing as state, run.cls.capture() as cap:
        logits = run.model(**batch.model_inputs(run.varlen)).logits
        if run.segment:
            router = [state.token_logits]
        else:
            router = state.pop_router_logits() if run.router else None
        yield Forward(logits, router, None if cap is None else cap.hidden)


@contextlib.contextmanager
def route_task(run: Run, task: str) -> Iterator[None]:
    """Inside the block the model runs as `task` (its adapter; the one adapter when shared; a
    router: softly; a segment router is not consulted, the task's adapter runs), for
    model.generate: a 0-d id fits any batch and the KV cache."""
    soft = run.router and not run.segment
    ids = None if soft else torch.tensor(0 if run.shared else run.tasks.index(task))
    with use_tasks(run.model, ids):
        yield


class TaskMeter:
    """Per-task answer-token loss sums and counts over the batches of a step or an evaluation,
    with k scalars per batch beside them, kept on the device until total()."""

    def __init__(self, num_tasks: int, scalars: int) -> None:
        self.width = 2 * num_tasks + scalars
        self.rows: list[Tensor] = []

    def add(self, means: Tensor, counts: Tensor, *scalars: Tensor) -> None:
        """One batch: means, counts (T,) (its L_t, m_t), scalars: k 0-d tensors."""
        dev = means.device
        extra = [s.detach().double().reshape(1).to(dev) for s in scalars]
        self.rows.append(
            torch.cat([(means.detach() * counts).double(), counts.double().to(dev), *extra])
        )

    def total(self) -> Tensor:
        """(2T + k,) fp64 on the host: Σ over batches of [L_t·m_t, m_t, scalars], added batch by
        batch; one copy to the host."""
        out = torch.zeros(self.width, dtype=torch.float64)
        for row in torch.stack(self.rows).cpu() if self.rows else []:
            out += row
        return out


def task_means(
    run: Run, fw: Forward, batch: Batch, loss: TaskLoss | None = None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """One batch's per-task (means, counts), (T,) each, twice: the answer-token (L_t, m_t) the
    meters record, and what `loss` combines (the same pair, or (M_t, k_t) for a per_sample mode:
    TaskLoss.stats). Classify tasks: the head's cross-entropy mean over their samples and the
    sample count in both (mftk.train.classify)."""
    tl = token_losses(fw.logits, batch.targets)
    n = len(run.tasks)
    pairs = [task_token_means(tl, batch.targets, batch.task_ids, n)]
    if loss is not None and loss.per_sample:
        pairs.append(loss.stats(tl, batch.targets, batch.task_ids, batch.seq_ids, n))
    if run.cls.active:  # the heads run once for both pairs
        pairs = run.cls.task_means(pairs, fw.hidden, batch)
    return pairs[0], pairs[-1]


def next_batch(run: TrainRun) -> Batch:
    """The next packed training micro-batch (this rank's rows under fsdp2), on run.device."""
    c = run.cfg
    max_rows, max_tokens = batch_limits(c)
    rows = run.sampler.next_rows(max_rows, c.data.seq_len, c.data.packing, max_tokens)
    return rows_to_batch(rows, run.pad_id, run.dtype).to(run.device)


def train_step(run: TrainRun, par: Any, loss: TaskLoss, weights: Tensor) -> dict[str, Any]:
    """train.grad_accum micro-batches, then clip, step AdamW and the schedule, zero the grads.

    weights: (T,) the step's task weights. returns {"loss", "per_task": {task: mean answer-token
    loss or None}, "tokens", "lr", "router_accuracy" (router runs, else None), "weights",
    "grad_norm" (the strategy's global norm, or None)}."""
    accum = run.cfg.train.grad_accum
    n = len(run.tasks)
    meter = TaskMeter(n, 2)
    tokens = 0
    warm = run.segment and run.sched.last_epoch < run.cfg.train.router_warmup_steps
    for k in range(accum):
        batch = next_batch(run)
        par.sync_gradients(run.model, k == accum - 1)
        with forward_batch(run, batch, warm) as fw:
            value, means, counts, ntok, acc = par.backward(run, fw, batch, loss, weights)
        meter.add(means, counts, value / accum, acc)
        tokens += ntok
    tot = meter.total()
    sums, counts, total, racc = tot[:n], tot[n : 2 * n], tot[2 * n], tot[2 * n + 1]
    norm = par.clip(run.params, run.cfg.train.clip)
    run.opt.step()
    lr = run.sched.get_last_lr()[0]
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return {
        "loss": float(total),
        "per_task": {
            t: (float(sums[i] / counts[i]) if counts[i] > 0 else None)
            for i, t in enumerate(run.tasks)
        },
        "tokens": tokens,
        "lr": lr,
        "router_accuracy": float(racc / accum) if run.router else None,
        "weights": weights.tolist(),
        "grad_norm": norm,
    }


@torch.no_grad()
def evaluate(run: Run, par: Any) -> dict[str, float]:
    """{task: mean answer-token loss over the eval split} (classify tasks: the head's CE mean,
    and <task>/accuracy, <task>/f1), and router_accuracy / router_accuracy_answer for router runs
    (over all real tokens / answer tokens: the mean over batches weighted by their tokens).
    Each process evaluates the batches par.eval_batches gives it; the sums go through
    par.reduce."""
    run.model.eval()
    n = len(run.tasks)
    meter = TaskMeter(n, 4)
    run.cls.eval_begin()
    for batch, mine in par.eval_batches(run.eval_set):
        batch = batch.to(run.device)
        with forward_batch(run, batch) as fw:
            if not mine:  # a forward only to keep collectives in step
                continue
            if run.cls.active:
                run.cls.eval_batch(fw.hidden, batch)
            tl = token_losses(fw.logits, batch.targets)
            means, cnt = task_token_means(tl, batch.targets, batch.task_ids, n)
            ntok = torch.tensor(float(batch.num_tokens), dtype=torch.float64, device=run.device)
            acc = nans = means.new_zeros(())
            ans = batch.task_ids.masked_fill(batch.targets < 0, -1)
            if run.router:
                acc = router_losses(fw.router_logits, batch.task_ids)["accuracy"] * ntok
                nans = (ans >= 0).sum().double()
                if nans > 0:
                    acc_ans = router_losses(fw.router_logits, ans)["accuracy"] * nans
            meter.add(means, cnt, acc, ntok, acc_ans if nans > 0 else nans, nans)
    run.model.train()
    tot = par.reduce(meter.total())
    sums, counts, acc, ntok = tot[:n], tot[n : 2 * n], tot[2 * n], tot[2 * n + 1]
    out = {t: float(sums[i] / counts[i]) for i, t in enumerate(run.tasks)}
    run.cls.eval_end(out)
    if run.router and ntok > 0:
        out["router_accuracy"] = float(acc / ntok)
    if run.router and tot[2 * n + 3] > 0:
        out["router_accuracy_answer"] = float(tot[2 * n + 2] / tot[2 * n + 3])
    return out


@torch.no_grad()
def sampled_task_losses(run: Run, par: Any, batches: list[Batch]) -> list[float]:
    """Per-task mean loss over a few eval batches (CoBa's samples), as evaluate computes it
    (answer tokens; classify tasks: the head's CE over their samples); nan for a task absent
    from them. Each process counts the batches par.eval_batches gives it; par.reduce sums."""
    run.model.eval()
    n = len(run.tasks)
    meter = TaskMeter(n, 0)
    for batch, mine in par.eval_batches(batches):
        batch = batch.to(run.device)
        with forward_batch(run, batch) as fw:
            if mine:
                meter.add(*task_means(run, fw, batch)[0])
    run.model.train()
    tot = par.reduce(meter.total())
    return [float(tot[i] / tot[n + i]) if tot[n + i] > 0 else math.nan for i in range(n)]
