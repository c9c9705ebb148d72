"""Data-parallel training with FSDP2 under torchrun: `distributed: {strategy: fsdp2}`.

    torchrun --nproc_per_node G -m mftk train CONFIG.yaml

The FSDP2 strategy gives the trainer's parts (mftk.train.parallel lists what a strategy answers):
- Process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); backend `auto` is nccl
  on CUDA (device cuda:LOCAL_RANK) and gloo on CPU. Without torchrun it forms a group of one.
- The model: loaded and patched on the CPU (rank 0 first: it writes the tiny model's cache), then
  fp32 adapter masters, activation checkpointing and sharding per decoder layer
  (mftk.train.sharding). AdamW is built once, over the sharded parameters.
- Data: every rank runs the same `MultiTaskSampler`, draws the global micro-batch of
  batch_size × world rows and keeps rows [rank·batch_size, (rank+1)·batch_size): deterministic,
  and the same global batch as one process with batch_size × world (`RankShard`).
- Losses: the per-task token sums and counts (and router statistics) are all-reduced, and each
  rank back-propagates its share of the *global* loss (`global_task_loss`), so G ranks give the
  gradients of one process on the same global batch, for every loss mode. Logged losses, token
  counts, evaluation (each rank evaluates a slice of the held-out batches, the sums reduced) and
  the loss mode's (CoBa's) inputs are global.
- Gradient accumulation: reduce-scatter only on the last micro-batch
  (`set_requires_gradient_sync`). Clipping: `clip_grad_norm_` on the DTensor grads (global norm,
  recorded as history grad_norm).
- Checkpoints: sharded, per-rank RNG (mftk.train.dcp). The final adapters are gathered in full
  (fp32) on rank 0 and written as adapters/ (mftk) and peft/<task>/.
- Attention: flash-attn 2 varlen over the packed samples when configured (flash_attention_2) and
  usable (CUDA and the flash_attn package); SDPA with the block-diagonal mask otherwise.
- Only rank 0 logs, shows the progress bar and writes metrics.json and loss.png.
- Dropout: the adapters are initialised from train.seed on every rank (identical before
  sharding), then each rank seeds its training steps with train.seed + r × RANK_SEED_STRIDE
  (rank 0: train.seed), so LoRA dropout masks differ across ranks instead of repeating the same
  mask on every rank's rows. With adapter.dropout 0 nothing draws from that RNG, and G ranks
  still give one process's losses exactly (up to reduction order). With dropout > 0 a G-rank run
  is a proper dropout run but not the one-process run, nor a run on another number of ranks
  (the masks of a row depend on which rank holds it); a resume on more ranks than the
  checkpoint had seeds the new ranks with their seed + the step.

Limits: every rank loads the whole base on its CPU before sharding (host memory G × the model);
the output dir must be one filesystem shared by all nodes; classify tasks are refused. An fsdp2
checkpoint resumes under fsdp2 only (on any number of ranks, one included: `mftk train` without
torchrun forms a group of one).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mftk.train.config import Config, ConfigError, LossConfig
from mftk.train.dcp import load_sharded, save_sharded
from mftk.train.loop import Trainer
from mftk.train.losses import (
    TaskLoss,
    build_loss,
    labelled_rows,
    sample_task_sums,
    task_sums,
    token_losses,
    top1_counts,
)
from mftk.train.packing import Batch
from mftk.train.parallel import RANK_SEED_STRIDE  # noqa: F401 (re-exported)
from mftk.train.run import TrainRun, flash_attention_available, resolve_device  # noqa: F401
from mftk.train.sharding import SHARD_DIMS, gathered_adapters, prepare_model  # noqa: F401
from mftk.train.step import Forward


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def trainer_class(cfg: Config) -> type[Trainer]:
    """Trainer for `distributed.strategy: none`, DistributedTrainer for fsdp2. Refuses a
    multi-process launch (torchrun, WORLD_SIZE > 1) of a one-process config."""
    if cfg.distributed.strategy == "none":
        if env_world_size() > 1:
            raise ConfigError(
                f"distributed.strategy: launched on {env_world_size()} processes (WORLD_SIZE) but "
                "the strategy is none; set distributed.strategy: fsdp2 or launch one process"
            )
        return Trainer
    return DistributedTrainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group)."""
    kind = resolve_device(cfg.train.device).type
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl" and kind != "cuda":
        raise ConfigError("distributed.backend: nccl needs CUDA devices (train.device is cpu)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # `mftk train` without torchrun: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if kind == "cuda" else None,
        )
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


class RankShard:
    """This rank's slice of a MultiTaskSampler's global micro-batches.

    Every rank holds an identical sampler and draws the same global micro-batch of
    batch_size × world rows; rank r keeps rows [r·batch_size, (r+1)·batch_size). The sampler's
    state (the data position) is therefore the same on every rank and independent of world size.
    """

    def __init__(self, sampler: Any, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def next_rows(
        self, batch_size: int, seq_len: int, packing: bool, max_tokens: int | None = None
    ) -> list:
        if max_tokens is not None:  # checks._batch_tokens: a row count splits, a budget not
            raise ValueError("RankShard: a token budget per micro-batch does not split by rank")
        rows = self.sampler.next_rows(batch_size * self.world, seq_len, packing)
        return rows[self.rank * batch_size : (self.rank + 1) * batch_size]

    def set_stage(self, *args: Any, **kwargs: Any) -> None:
        self.sampler.set_stage(*args, **kwargs)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks, in float64 on the process group's device."""
    dev = torch.device("cuda", torch.cuda.current_device()) if _is_nccl() else torch.device("cpu")
    out = t.detach().to(device=dev, dtype=torch.float64)
    dist.all_reduce(out)
    return out.cpu()


def _is_nccl() -> bool:
    return dist.get_backend() == "nccl"


def global_task_loss(
    tok_loss: Tensor,
    targets: Tensor,
    task_ids: Tensor,
    weights: Tensor,
    loss: TaskLoss | str,
    gamma: float,
    num_tokens: int,
    seq_ids: Tensor | None = None,
) -> tuple[Tensor, float, Tensor, Tensor, int]:
    """This rank's share of the loss over the global micro-batch (all ranks' tokens).

    tok_loss, targets, task_ids: (B, S) on this rank; weights: (T,); loss: the loss mode (a
    TaskLoss, or a LOSSES name with gamma its focal_gamma); seq_ids: (B, S) each token's sample
    (per_sample modes; None: one sample per row).
    The global loss ℒ = loss(L, m, w) depends on the local tokens only through the task sums
    S_t = Σ_r S_t^r, and L_t = S_t / m_t (per_sample modes: S_t sums the samples' token means and
    m_t counts samples). The returned surrogate Σ_t (∂ℒ/∂L_t) · S_t^r / m_t (∂ℒ/∂L_t taken at
    the global L) has, summed over ranks, exactly ℒ's gradient.
    returns (surrogate (scalar, differentiable), ℒ's value, global task token means (T,) fp64,
    global answer-token counts (T,) fp64, global num_tokens).
    """
    t_count = len(weights)
    if isinstance(loss, str):
        loss = build_loss(LossConfig(mode=loss, focal_gamma=gamma), t_count)
    sums, counts = task_sums(tok_loss, targets, task_ids, t_count)
    l_sums, l_counts = sums, counts
    parts = [sums.detach().double(), counts.double()]
    if loss.per_sample:
        seq = torch.zeros_like(task_ids) if seq_ids is None else seq_ids
        l_sums, l_counts = sample_task_sums(tok_loss, targets, task_ids, seq, t_count)
        parts += [l_sums.detach().double(), l_counts.double()]
    n_tok = torch.tensor([num_tokens], dtype=torch.float64, device=sums.device)
    glob = _all_reduce(torch.cat([*parts, n_tok]))
    g_sums, g_counts, g_tokens = glob[:t_count], glob[t_count : 2 * t_count], int(glob[-1])
    g_l_sums, g_l_counts = g_sums, g_counts
    if loss.per_sample:
        g_l_sums, g_l_counts = glob[2 * t_count : 3 * t_count], glob[3 * t_count : 4 * t_count]
    g_means = (g_l_sums / g_l_counts.clamp(min=1)).to(torch.float32).requires_grad_()
    with torch.enable_grad():
        value = loss(g_means, g_l_counts.to(torch.float32), weights)
        (d_means,) = torch.autograd.grad(value, g_means, allow_unused=True)
    if d_means is None:
        d_means = torch.zeros_like(g_means)
    scale = (d_means.double() / g_l_counts.clamp(min=1)).to(l_sums)
    surrogate = (scale.to(l_sums.device) * l_sums).sum()
    return surrogate, float(value.detach()), g_sums / g_counts.clamp(min=1), g_counts, g_tokens


def global_router_losses(router_logits: list[Tensor], task_ids: Tensor) -> dict[str, Any]:
    """Router losses (see mftk.train.losses.router_losses) over the global micro-batch.

    Per layer, with N the global number of labelled tokens, f_t the global fraction whose top-1
    is t and P_t^r this rank's sum of router probabilities of t:
    balance = T Σ_t f_t Σ_r P_t^r / N, supervision = Σ_r CE^r / N, accuracy = correct / N.
    returns {"balance", "supervision": this rank's differentiable shares (summing over ranks to
    the global losses' gradients), "balance_value", "supervision_value", "accuracy": floats}.
    """
    if not router_logits:
        raise ValueError("router_logits: empty (is the model patched with a router?)")
    rows, labels = labelled_rows(task_ids)  # once per batch: no host sync inside the layer loop
    n_layers = len(router_logits)
    psums, ces, tops, correct = [], [], [], []
    for logits in router_logits:
        z = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        t = z.shape[-1]
        top = z.argmax(-1)
        psums.append(z.softmax(-1).sum(0))
        ces.append(F.cross_entropy(z, labels, reduction="sum"))
        tops.append(top1_counts(top, t).double())
        correct.append((top == labels).sum().double())
    psum, ce = torch.stack(psums), torch.stack(ces)  # (L, T), (L,)
    local = torch.cat(
        [
            torch.stack(tops).flatten(),
            psum.detach().double().flatten(),
            ce.detach().double(),
            torch.stack(correct),
            torch.tensor([float(len(rows))], dtype=torch.float64, device=rows.device),
        ]
    )
    glob = _all_reduce(local)
    lt = n_layers * t
    f_cnt, p_g = glob[:lt].view(n_layers, t), glob[lt : 2 * lt].view(n_layers, t)
    ce_g, corr_g = glob[2 * lt : 2 * lt + n_layers], glob[2 * lt + n_layers : -1]
    n = float(glob[-1].clamp(min=1))
    f = f_cnt / n
    coef = (t * f / n).to(psum)
    return {
        "balance": (coef.to(psum.device) * psum).sum(-1).mean(),
        "supervision": ce.mean() / n,
        "balance_value": float((t * f * p_g / n).sum(-1).mean()),
        "supervision_value": float(ce_g.mean() / n),
        "accuracy": float((corr_g / n).mean()),
    }


class FSDP2:
    """The fsdp2 strategy (see the module docstring and mftk.train.parallel)."""

    def __init__(self, cfg: Config) -> None:
        classify = [t.name for t in cfg.tasks if t.type == "classify"]
        if classify:
            raise ConfigError(
                f"distributed.strategy: fsdp2 does not train classify tasks yet ({classify}); "
                "use distributed.strategy: none"
            )
        self.cfg = cfg
        self.rank, self.world, self.device, self._owns_group = init_distributed(cfg)
        self.load_device = torch.device("cpu")  # fully_shard moves only each rank's shard

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Rank 0 first: it writes the tiny model's cache, which the others then read."""
        if self.rank != 0:
            dist.barrier()
        yield
        if self.rank == 0:
            dist.barrier()

    def prepare(self, model: nn.Module, log: Callable[[str], None]) -> None:
        prepare_model(model, self.cfg, self.device, log)

    def shard(self, sampler: Any) -> RankShard:
        return RankShard(sampler, self.rank, self.world)

    def eval_batches(self, batches: list[Batch]) -> list[tuple[Batch, bool]]:
        """Batches r, r + G, ... for rank r. Every rank runs the same number of forwards (FSDP's
        all-gathers are collective): a rank out of batches repeats batch 0 and discards it."""
        mine = batches[self.rank :: self.world]
        n = math.ceil(len(batches) / self.world)
        return [(mine[i], True) if i < len(mine) else (batches[0], False) for i in range(n)]

    def reduce(self, t: Tensor) -> Tensor:
        return _all_reduce(t)

    def sync_gradients(self, model: nn.Module, last: bool) -> None:
        """Reduce-scatter the gradients in the last micro-batch's backward only."""
        model.set_requires_gradient_sync(last)

    def backward(
        self, run: TrainRun, fw: Forward, batch: Batch, loss: TaskLoss, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
        """Back-propagate this rank's share of the global micro-batch's loss / grad_accum.
        returns (the global loss, 0-d fp64; global L_t, m_t (T,); global tokens; router
        accuracy, 0-d)."""
        rb, rs = run.cfg.loss.router_balance, run.cfg.loss.router_supervision
        tl = token_losses(fw.logits, batch.targets)
        b = batch
        share, value, means, counts, ntok = global_task_loss(
            tl, b.targets, b.task_ids, weights, loss, loss.gamma, b.num_tokens, b.seq_ids
        )
        acc = 0.0
        if fw.router_logits is not None:
            rl = global_router_losses(fw.router_logits, batch.task_ids)
            share = share + rb * rl["balance"] + rs * rl["supervision"]
            value += rb * rl["balance_value"] + rs * rl["supervision_value"]
            acc = rl["accuracy"]
        # FSDP averages gradients over ranks and the shares sum, hence × world
        (share * (self.world / run.cfg.train.grad_accum)).backward()
        f64 = dict(dtype=torch.float64)
        return torch.tensor(value, **f64), means, counts, ntok, torch.tensor(acc, **f64)

    def clip(self, params: list[nn.Parameter], max_norm: float | None) -> float | None:
        """Clip to the global norm over all shards (DTensor grads); returns it, to record."""
        if not max_norm:
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def save(self, trainer: Any) -> str:
        return save_sharded(trainer, self.rank, self.world)

    def load(self, trainer: Any, path: str) -> None:
        load_sharded(trainer, path)

    def full_adapters(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return gathered_adapters(model, self.rank)

    def close(self) -> None:
        dist.barrier()  # gloo can abort at exit when a rank tears down while another still talks
        if self._owns_group:
            dist.destroy_process_group()


class DistributedTrainer(Trainer):
    """The Trainer with the FSDP2 strategy; same arguments and outputs (train() returns None on
    ranks other than 0)."""

    strategy = FSDP2
