"""Data-parallel training with FSDP2 under torchrun: `distributed: {strategy: fsdp2}`.

    torchrun --nproc_per_node G -m mftk train CONFIG.yaml

What `DistributedTrainer` changes over the one-process `Trainer`:
- Process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); backend `auto` is nccl
  on CUDA (device cuda:LOCAL_RANK) and gloo on CPU. Without torchrun it forms a group of one.
- Sharding: `fully_shard` on every decoder layer (the model's `_no_split_modules` classes), then
  the root. The frozen base is sharded on dim 0 in its model dtype; the adapters are cast to fp32
  masters first and sharded on a feature dim (lora_a (T, R, D_in) on D_in, lora_b (T, D_out, R) on
  D_out, router (T, D_in) on D_in): dim 0 is T, and 4 tasks on 8 GPUs would leave half the ranks
  empty. `MixedPrecisionPolicy(param_dtype, reduce_dtype)` casts *every* parameter to param_dtype
  in the all-gather, so the mftk op sees x, weight, lora_a, lora_b in one dtype (as it requires);
  gradients are reduce-scattered in reduce_dtype into the fp32 masters.
- Activation checkpointing per decoder layer through transformers' own
  `activation_checkpointing_enable` (non-reentrant torch.utils.checkpoint), which keeps the module
  names (and so the adapter checkpoint keys) unchanged. Backward runs inside `mftk.use_tasks`:
  the recomputed forward reads the routing again.
- Data: every rank runs the same `MultiTaskSampler`, draws the global micro-batch of
  batch_size × world rows and keeps rows [rank·batch_size, (rank+1)·batch_size): deterministic,
  and the same global batch as one process with batch_size × world (`RankShard`).
- Losses: the per-task token sums and counts (and router statistics) are all-reduced, and each
  rank back-propagates its share of the *global* loss (`global_task_loss`), so G ranks give the
  gradients of one process on the same global batch, for every loss mode. Logged losses, token
  counts, evaluation (each rank evaluates a slice of the held-out batches) and CoBa's inputs are
  global.
- Gradient accumulation: reduce-scatter only on the last micro-batch
  (`set_requires_gradient_sync`). Clipping: `clip_grad_norm_` on the DTensor grads (global norm).
- Checkpoints `checkpoints/step-000050/`: `dcp/` (torch.distributed.checkpoint: adapters and
  AdamW state, sharded, reloadable on any number of ranks), `trainer_state.pt` (rank 0: step,
  scheduler, sampler position, CoBa, history), `rng-rank<r>.pt` (each rank's RNG). All ranks
  write into `step-000050.tmp`; after a barrier rank 0 renames it. The final adapters are
  gathered in full (fp32) on rank 0 and written as adapters/ (mftk) and peft/<task>/.
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
import copy
import datetime
import math
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mftk.core import adapter_layers
from mftk.core import decoder_layers as find_decoder_layers
from mftk.patch import adapter_parameters
from mftk.routing import use_tasks
from mftk.train import checkpointing as ckpt
from mftk.train.config import Config, ConfigError
from mftk.train.data import IGNORE
from mftk.train.loop import (  # noqa: F401 (flash_attention_available: re-exported)
    Trainer,
    flash_attention_available,
    resolve_device,
    run_key,
)
from mftk.train.losses import combine, labelled_rows, token_losses, top1_counts
from mftk.train.tiny_model import DTYPES

ADAPTER_PARAMS = ("lora_a", "lora_b", "router_weight", "router_bias")
# the feature dim each adapter tensor is sharded on (dim 0 is the task dim T)
SHARD_DIMS = {"lora_a": 2, "lora_b": 1, "router_weight": 1, "router_bias": 0}
# rank r seeds its training steps (LoRA dropout) with train.seed + r × this; a large prime, so
# nearby train.seed values of other runs do not reuse a rank's stream
RANK_SEED_STRIDE = 1_000_003


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

    def next_rows(self, batch_size: int, seq_len: int, packing: bool) -> list:
        rows = self.sampler.next_rows(batch_size * self.world, seq_len, packing)
        return rows[self.rank * batch_size : (self.rank + 1) * batch_size]

    def set_stage(self, *args: Any, **kwargs: Any) -> None:
        self.sampler.set_stage(*args, **kwargs)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    @property
    def drawn(self) -> list[int]:
        return self.sampler.drawn


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
    mode: str,
    gamma: float,
    num_tokens: int,
) -> tuple[Tensor, float, Tensor, Tensor, int]:
    """This rank's share of the loss over the global micro-batch (all ranks' tokens).

    tok_loss, targets, task_ids: (B, S) on this rank; weights: (T,).
    The global loss ℒ = combine(mode, L, m, w) depends on the local tokens only through the task
    sums S_t = Σ_r S_t^r, and L_t = S_t / m_t. The returned surrogate Σ_t (∂ℒ/∂L_t) · S_t^r / m_t
    (∂ℒ/∂L_t taken at the global L) has, summed over ranks, exactly ℒ's gradient.
    returns (surrogate (scalar, differentiable), ℒ's value, global task means (T,) fp64,
    global answer-token counts (T,) fp64, global num_tokens).
    """
    t_count = len(weights)
    mask = ((targets != IGNORE) & (task_ids >= 0)).reshape(-1)
    t = task_ids.clamp(min=0).reshape(-1)
    w = mask.to(tok_loss.dtype)
    sums = torch.zeros(t_count, dtype=tok_loss.dtype, device=tok_loss.device)
    sums = sums.index_add(0, t, tok_loss.reshape(-1) * w)
    counts = torch.zeros(t_count, dtype=torch.float64, device=tok_loss.device)
    counts = counts.index_add(0, t, mask.to(torch.float64))
    local = torch.cat(
        [
            sums.detach().double(),
            counts,
            torch.tensor([num_tokens], dtype=torch.float64, device=t.device),
        ]
    )
    glob = _all_reduce(local)
    g_sums, g_counts, g_tokens = glob[:t_count], glob[t_count : 2 * t_count], int(glob[-1])
    g_means = (g_sums / g_counts.clamp(min=1)).to(torch.float32).requires_grad_()
    with torch.enable_grad():
        loss = combine(mode, g_means, g_counts.to(torch.float32), weights, gamma)
        (d_means,) = torch.autograd.grad(loss, g_means, allow_unused=True)
    if d_means is None:
        d_means = torch.zeros_like(g_means)
    scale = (d_means.double() / g_counts.clamp(min=1)).to(sums)
    surrogate = (scale.to(sums.device) * sums).sum()
    return surrogate, float(loss.detach()), g_sums / g_counts.clamp(min=1), g_counts, g_tokens


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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (mftk.core.decoder_layers); fsdp2 shards one at a time."""
    layers = [m for _, m in find_decoder_layers(model)]
    if not layers:
        names = sorted(getattr(model, "_no_split_modules", None) or [])
        raise ConfigError(
            f"distributed.strategy: found no decoder layers in {type(model).__name__} "
            f"(_no_split_modules={names}); fsdp2 shards one decoder layer at a time"
        )
    return layers


def shard_model(
    model: nn.Module,
    device: torch.device,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
) -> int:
    """fully_shard every decoder layer, then the root, on a 1-D mesh over all ranks (in place);
    returns the number of decoder layers.

    The adapter tensors are sharded on their feature dim (SHARD_DIMS), everything else on dim 0.
    A model on the CPU with a CUDA mesh moves only each rank's shard to its GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dims = {}
    for _, m in adapter_layers(model):
        for k in ADAPTER_PARAMS:
            p = getattr(m, k)
            if p is not None:
                dims[id(p)] = SHARD_DIMS[k]

    def place(p: nn.Parameter):
        return Shard(dims[id(p)]) if id(p) in dims else None

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, mp_policy=mp, shard_placement_fn=place)
    return len(layers)


@contextlib.contextmanager
def full_adapters(model: nn.Module, full: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily put full (unsharded) adapter tensors, {fqn: tensor} from a full state dict,
    into the adapter layers, for mftk.save_adapters / export_peft; restores the shards on exit."""
    saved = []
    for name, m in adapter_layers(model):
        for k in ADAPTER_PARAMS:
            key = f"{name}.{k}" if name else k
            if key in full:
                saved.append((m, k, m._parameters[k]))
                m._parameters[k] = nn.Parameter(full[key], requires_grad=False)
    try:
        yield
    finally:
        for m, k, p in saved:
            m._parameters[k] = p


class DistributedTrainer(Trainer):
    """The Trainer under FSDP2 (see the module docstring); same arguments and outputs."""

    def __init__(self, cfg: Config, *args: Any, **kwargs: Any) -> None:
        classify = [t.name for t in cfg.tasks if getattr(t, "type", "generate") == "classify"]
        if classify:
            raise ConfigError(
                f"distributed.strategy: fsdp2 does not train classify tasks yet ({classify}); "
                "use distributed.strategy: none"
            )
        super().__init__(cfg, *args, **kwargs)
        self.rank, self.world, self.dist_device, self._owns_group = init_distributed(cfg)
        self.is_main = self.rank == 0
        self.progress = self.progress and self.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            super().log(msg)

    def dropout_seed(self) -> int:
        """This rank's torch seed for the training steps: dropout masks differ across ranks."""
        return self.cfg.train.seed + RANK_SEED_STRIDE * self.rank

    def run_key(self) -> str:
        """run_key of the equivalent one-process config (batch_size × world): a checkpoint
        resumes on any number of ranks with the same global batch."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.batch_size *= self.world
        return run_key(cfg)

    # ------------------------------------------------------------------ setup

    def attention_device(self) -> torch.device:
        return self.dist_device  # setup loads on the CPU, but attention runs here

    def setup(self) -> None:
        cfg = self.cfg
        device_cfg = cfg.train.device
        cfg.train.device = "cpu"  # load and patch on the CPU; fully_shard moves only the shards
        try:
            if self.is_main:  # rank 0 first: it writes the tiny model's cache, the others read it
                super().setup()
                dist.barrier()
            else:
                dist.barrier()
                super().setup()
        finally:  # restored: the run's fingerprint (run_key) is the configured one
            cfg.train.device = device_cfg
        self.device = self.dist_device
        di = cfg.distributed
        model = self.model
        with torch.no_grad():  # fp32 masters (patch_model creates adapters in the base dtype)
            for p in adapter_parameters(model):
                p.data = p.data.float()
        if di.activation_checkpointing:
            if getattr(model.config, "use_cache", None):  # training needs no KV cache
                model.config.use_cache = False
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        mp = di.mixed_precision
        n_layers = shard_model(
            model,
            self.device,
            DTYPES[mp.param_dtype or cfg.model.dtype],
            DTYPES[mp.reduce_dtype],
        )
        self.sampler = RankShard(self.sampler, self.rank, self.world)
        self.log(
            f"fsdp2: {self.world} ranks ({dist.get_backend()}, {self.device.type}), "
            f"{n_layers} decoder layers + root sharded, params in "
            f"{DTYPES[mp.param_dtype or cfg.model.dtype]}, grads reduced in {mp.reduce_dtype}, "
            f"adapters fp32, activation checkpointing "
            f"{'on' if getattr(model, 'is_activation_checkpointing', False) else 'off'}, attention "
            f"{model.config._attn_implementation}"
        )
        # the optimizer over the sharded (DTensor) parameters that replaced the originals
        from mftk.train.loop import lr_lambda

        self.params = list(adapter_parameters(model))
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps)
        )

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-task answer-token loss over the whole eval split: rank r evaluates batches
        r, r + G, ...; sums are all-reduced. Every rank runs the same number of forwards (FSDP's
        all-gathers are collective), a rank out of batches repeats one and discards it."""
        self.model.eval()
        n = len(self.tasks)
        stats = torch.zeros(2 * n + 2, dtype=torch.float64)
        mine = self.eval_set[self.rank :: self.world]
        for i in range(math.ceil(len(self.eval_set) / self.world)):
            batch = (mine[i] if i < len(mine) else self.eval_set[0]).to(self.device)
            logits, rl = self.forward(batch)
            if i >= len(mine):
                continue
            tl = token_losses(logits, batch.targets)
            mask = (batch.targets != IGNORE) & (batch.task_ids >= 0)
            t = batch.task_ids.clamp(min=0).reshape(-1)
            w = mask.reshape(-1).double()
            stats[:n] += (
                torch.zeros(n, dtype=torch.float64, device=tl.device)
                .index_add(0, t, tl.reshape(-1).double() * w)
                .cpu()
            )
            stats[n : 2 * n] += (
                torch.zeros(n, dtype=torch.float64, device=tl.device).index_add(0, t, w).cpu()
            )
            if rl is not None:
                stats[2 * n] += float(rl["accuracy"]) * batch.num_tokens
                stats[2 * n + 1] += batch.num_tokens
        stats = _all_reduce(stats)
        self.model.train()
        return self._eval_result(stats[:n], stats[n : 2 * n], stats[2 * n], stats[2 * n + 1])

    def train_step(self, stage: int) -> dict[str, Any]:
        cfg = self.cfg
        weights = self.task_weights(stage)
        n = len(self.tasks)
        sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        total, tokens, racc = 0.0, 0, []
        accum = cfg.train.grad_accum
        for k in range(accum):
            batch = self._next_batch()
            self.model.set_requires_gradient_sync(k == accum - 1)
            ids = None if self.router else self.route_ids(batch.task_ids)
            with use_tasks(self.model, ids, collect_router_logits=self.router) as state:
                logits = self.model(**batch.model_inputs(self.varlen)).logits
                loss, value, means, cnt, ntok = global_task_loss(
                    token_losses(logits, batch.targets),
                    batch.targets,
                    batch.task_ids,
                    weights,
                    cfg.loss.mode,
                    cfg.loss.focal_gamma,
                    batch.num_tokens,
                )
                if self.router:
                    rl = global_router_losses(state.pop_router_logits(), batch.task_ids)
                    rb, rs = cfg.loss.router_balance, cfg.loss.router_supervision
                    loss = loss + rb * rl["balance"] + rs * rl["supervision"]
                    value += rb * rl["balance_value"] + rs * rl["supervision_value"]
                    racc.append(rl["accuracy"])
                # FSDP averages gradients over ranks; the shares sum, hence × world.
                # Inside use_tasks: activation checkpointing recomputes the forward here.
                (loss * (self.world / accum)).backward()
            total += value / accum
            sums += means * cnt
            counts += cnt
            tokens += ntok
        return self._finish_step(total, sums, counts, tokens, racc, weights)

    def _clip(self) -> None:
        """Clip to the global norm over all shards (DTensor grads); recorded as grad_norm."""
        if self.cfg.train.clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.history.setdefault("grad_norm", []).append(float(norm))

    # ------------------------------------------------------------------ checkpoints

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(ignore_frozen_params=True)
        return get_state_dict(self.model, self.opt, options=opts)

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        st.pop("optimizer")  # in dcp/, sharded
        st["run_key"] = self.run_key()
        st["world_size"] = self.world
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("run_key") != self.run_key():
            raise ConfigError(
                "--resume: the checkpoint was written by a run with a different config (tasks, "
                "data, model, adapter, loss, stages, training settings or global batch = "
                "train.batch_size × ranks); resuming it would not continue that run. Use a new "
                "--output, or restore the config."
            )
        self._load_progress(st)  # the optimizer comes from dcp/, the RNG from rng-rank<r>.pt

    def save(self) -> str:
        import torch.distributed.checkpoint as dcp

        root = os.path.join(self.out, "checkpoints")
        final = os.path.join(root, f"step-{self.step:06d}")
        tmp = f"{final}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = self._state_dicts()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
        torch.save(ckpt.rng_state(), os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        if self.is_main:
            torch.save(self.state_dict(), os.path.join(tmp, "trainer_state.pt"))
        dist.barrier()  # every rank's files are complete before the rename
        if self.is_main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in ckpt.list_checkpoints(root)[: -self.cfg.output.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"checkpoint -> {final}")
        dist.barrier()
        return final

    def load_checkpoint(self, path: str) -> None:
        """Adapters and optimizer from path/dcp (resharded to this world size), the trainer
        state, and this rank's RNG (when the checkpoint had fewer ranks: rank 0's, with the torch
        RNG re-seeded from this rank's dropout seed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if not os.path.isdir(os.path.join(path, "dcp")):
            raise ConfigError(
                f"--resume: {path} is not an fsdp2 checkpoint (no dcp/); one-process checkpoints "
                "resume with distributed.strategy: none"
            )
        model_sd, optim_sd = self._state_dicts()
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(
            self.model,
            self.opt,
            model_state_dict=model_sd,
            optim_state_dict=optim_sd,
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        self.load_state_dict(torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False))
        self.load_rng(path)

    def load_rng(self, path: str) -> None:
        """This rank's RNG state from checkpoint folder path; a rank the checkpoint did not have
        takes rank 0's, with torch re-seeded (dropout_seed() + step): its own dropout stream."""
        rng = os.path.join(path, f"rng-rank{self.rank}.pt")
        if os.path.isfile(rng):
            ckpt.set_rng_state(torch.load(rng, weights_only=False))
        else:
            ckpt.set_rng_state(torch.load(os.path.join(path, "rng-rank0.pt"), weights_only=False))
            torch.manual_seed(self.dropout_seed() + self.step)

    # ------------------------------------------------------------------ main

    def train(self) -> dict[str, Any] | None:
        """Train (collectively); rank 0 returns the metrics, the other ranks None."""
        out = super().train()
        dist.barrier()  # gloo can abort at exit when a rank tears down while another still talks
        if self._owns_group:
            dist.destroy_process_group()
        return out

    def finish(self, wall: float, resumed_from: str | None) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._final_eval()  # collective: all ranks (rank 0's super().finish then skips it)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(self.model, options=opts)  # collective; full on rank 0
        metrics = None
        if self.is_main:
            with full_adapters(self.model, full):
                metrics = super().finish(wall, resumed_from)
        dist.barrier()
        return metrics
