"""A run's parts, built once from the config.

    run = build_run(cfg, out, log, Single(cfg))   # model, data, optimizer: what training needs
    run = load_run(cfg, out, log, Single(cfg))    # model, tokenizer, eval batches: evaluation

The strategy (mftk.train.parallel.Single, or mftk.train.distributed.FSDP2) says where the model
loads and computes, in which order processes load it, how it is sharded, and how the training
sampler is split; the optimizer is built once, over the parameters the strategy left.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from mftk.core import unwrap
from mftk.patch import adapter_parameters, patch_model
from mftk.quant import base_linear_bytes, quantize_model
from mftk.segment_router import add_segment_router
from mftk.spec import AdapterSpec, QuantSpec
from mftk.train.classify import ClassifyTasks, as_config_error, patch_kwargs, train_labels
from mftk.train.config import Config, ConfigError
from mftk.train.data import (
    SampleStream,
    TaskData,
    build_task_data,
    describe,
    load_examples,
    special_strings,
)
from mftk.train.packing import Batch, MultiTaskSampler, eval_batches, pack_rows
from mftk.train.tiny_model import DTYPES, load_model_and_tokenizer, read_corpus

SHARED_ADAPTER = "shared"  # the one adapter's name in adapter.mode: shared

Log = Callable[[str], None]


def lr_lambda(schedule: str, warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the base lr at step s: linear warm-up, then cosine/linear decay to floor
    (train.min_lr / train.lr; 10% without min_lr)."""
    half = (1 - floor) / 2

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - (1 - floor) * frac
        return floor + half * (1 + math.cos(math.pi * frac))

    return f


def warmup_steps(cfg: Config) -> int:
    """train.warmup_steps in steps: a number < 1 is that fraction of train.steps (rounded down,
    as MFTCoder's num_warmup_steps)."""
    w, total = cfg.train.warmup_steps, cfg.train.steps
    return int(w * total) if w < 1 else int(w)


def batch_limits(cfg: Config) -> tuple[int, int | None]:
    """(rows, tokens) one micro-batch may hold (pack_rows' max_rows, max_tokens): train.batch_size
    rows (train.batch_tokens with data.packing has set it: checks._batch_tokens), or, under
    train.batch_tokens without packing, as many one-sample rows as keep rows × the longest
    row <= batch_tokens."""
    tokens = cfg.train.batch_tokens
    if tokens is None or cfg.data.packing:
        return cfg.train.batch_size, None
    return tokens, tokens


def epoch_steps(cfg: Config, data: list[TaskData], world: int) -> int:
    """Optimizer steps in one epoch: the training splits packed into rows as the sampler packs
    them (greedy, in order; one sample a row without data.packing), taken batch_size rows per
    rank and grad_accum micro-batches a step, as MFTCoder counts its dataloader:
    ceil(⌊rows / (batch_size × ranks)⌋ / grad_accum), at least 1. Under train.batch_tokens
    without packing: ceil(micro-batches / grad_accum), the micro-batches laid out in order.
    0 with a streamed task (no known length: checks_data refuses what counts in epochs)."""
    if any(isinstance(d.train, SampleStream) for d in data):
        return 0
    samples = [s for d in data for s in d.train]
    tr, seq_len, packing = cfg.train, cfg.data.seq_len, cfg.data.packing
    max_rows, max_tokens = batch_limits(cfg)
    if max_tokens is not None:
        n, rest = 0, samples
        while rest:
            _, used = pack_rows(rest, seq_len, max_rows, packing, max_tokens)
            n, rest = n + 1, rest[used:]
        return max(1, math.ceil(n / tr.grad_accum))
    rows, _ = pack_rows(samples, seq_len, len(samples) + 1, packing)
    return max(1, math.ceil(len(rows) // (tr.batch_size * world) / tr.grad_accum))


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


def attention(configured: str, device: torch.device, log: Log) -> str:
    """The attention implementation to load the model with: the configured one, or sdpa (with a
    logged note) for flash_attention_2 where flash-attn cannot run on device."""
    if configured == "flash_attention_2" and not flash_attention_available(device):
        # packed samples stay apart through the 4D block mask instead of varlen boundaries
        log("flash-attn is not usable here (needs CUDA and flash_attn): using sdpa")
        return "sdpa"
    return configured


@dataclass
class Run:
    """What an evaluation works on: the patched model (fresh adapters), tokenizer, task data and
    the fixed eval batches, with where and how batches are laid out."""

    cfg: Config
    model: nn.Module
    tokenizer: Any
    model_info: dict[str, Any]
    data: list[TaskData]
    eval_set: list[Batch]
    cls: ClassifyTasks
    device: torch.device  # where batches go
    dtype: torch.dtype  # the model's dtype (the block mask's)
    pad_id: int
    varlen: bool  # flash-attention: packed boundaries from position ids, no 4D mask

    @property
    def tasks(self) -> list[str]:
        return self.cfg.task_names

    @property
    def router(self) -> bool:
        """adapter.router set: a softmax router in every layer, or a segment router."""
        return self.cfg.adapter.router is not None

    @property
    def segment(self) -> bool:
        """adapter.router segment: one task per packed sample (mftk.segment_router)."""
        return self.cfg.adapter.router == "segment"

    @property
    def shared(self) -> bool:
        """adapter.mode shared (the MFTCoder baseline): every task's tokens go through one adapter;
        losses and metrics stay per task (batch.task_ids), only the routing changes."""
        return self.cfg.adapter.mode == "shared"

    @property
    def adapter_tasks(self) -> list[str]:
        return [SHARED_ADAPTER] if self.shared else self.tasks


@dataclass
class TrainRun(Run):
    """A Run plus what training adds: the trainable parameters, AdamW, its lr schedule and the
    training sampler."""

    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    sampler: Any  # MultiTaskSampler, or the strategy's view of it (distributed.RankShard)
    steps_per_epoch: int  # epoch_steps: train.epochs and output.save_every_epoch count in it


def load_run(cfg: Config, out: str, log: Log, par: Any) -> Run:
    """The model (quantized if configured, moved to par.load_device, patched from train.seed),
    tokenizer, task data and eval batches. out: the run's folder (the tiny base's cache is
    out/cache unless model.cache_dir); par: the strategy."""
    if cfg.model.path is not None:
        bos, eos = special_strings(AutoTokenizer.from_pretrained(cfg.model.path))
    else:
        bos, eos = "<s>", "</s>"
    examples = load_examples(cfg, bos, eos)
    # the tiny model's tokenizer and pretraining: a streamed task's eval rows only
    trains, evals = [e for e in examples[0] if isinstance(e, list)], examples[1]
    texts = [ex.text() for part in (trains, evals) for exs in part for ex in exs]
    pre_docs = [[seg for seg, _ in ex.segments] for exs in trains for ex in exs]
    if cfg.model.pretrain.files:  # a corpus of its own (e.g. plain code) instead of the tasks'
        pre_docs = read_corpus(cfg.model.pretrain.files)
    cache = cfg.model.cache_dir or os.path.join(out, "cache")
    attn_cfg = cfg.model.attn_implementation
    attn = attention(attn_cfg, par.device, log)
    cfg.model.attn_implementation = attn
    try:
        with par.loading():
            model, tokenizer, model_info = load_model_and_tokenizer(
                cfg.model, texts, pre_docs, cfg.data.seq_len, cfg.train.seed, cache, log
            )
    finally:  # restored: the run's fingerprint (run_key) is the configured one
        cfg.model.attn_implementation = attn_cfg
    data = build_task_data(cfg, tokenizer, examples)
    log(f"data: {describe(data)}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.quantize is not None:  # QLoRA: 4-bit bases, on the CPU, layer by layer
        _quantize(model, cfg, log)
    model.to(par.load_device)
    _patch(model, cfg)
    cls = ClassifyTasks(cfg, model, bos, train_labels(data))
    all_eval = [s for d in data for s in d.eval]
    d = cfg.data
    rows, tokens = batch_limits(cfg)
    evals = eval_batches(all_eval, rows, d.seq_len, d.packing, pad_id, dtype, tokens)
    varlen = attn == "flash_attention_2"
    return Run(
        cfg, model, tokenizer, model_info, data, evals, cls, par.device, dtype, pad_id, varlen
    )


def build_run(cfg: Config, out: str, log: Log, par: Any) -> TrainRun:
    """load_run, then the strategy's preparation of the model (fsdp2: fp32 masters, sharding),
    then AdamW over the adapters (and classify heads, at their own lr), the lr schedule and the
    sampler over the training splits. train.epochs becomes train.steps here (epoch_steps)."""
    run = load_run(cfg, out, log, par)
    par.prepare(run.model, log)
    params = list(adapter_parameters(run.model)) + run.cls.params()
    if run.segment:
        params += list(unwrap(run.model).mftk_segment_router.parameters())
    tr = cfg.train
    per_epoch = epoch_steps(cfg, run.data, par.world)
    if tr.epochs is not None:  # the one stage's steps (checks._stages), now that data is in
        tr.steps = cfg.stages[0].steps = max(1, math.ceil(tr.epochs * per_epoch))
        log(f"train.epochs {tr.epochs}: {tr.steps} steps ({per_epoch} an epoch)")
    opt = torch.optim.AdamW(
        run.cls.param_groups(params, tr.lr), lr=tr.lr, weight_decay=tr.weight_decay
    )
    floor = 0.1 if tr.min_lr is None else tr.min_lr / tr.lr
    lr_at = lr_lambda(tr.schedule, warmup_steps(cfg), tr.steps, floor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    d = cfg.data
    sampler = MultiTaskSampler(
        [t.train for t in run.data], tr.seed, len(run.tokenizer), d.noise_kind, d.noise_token_rate
    )
    parts = {f.name: getattr(run, f.name) for f in fields(run)}
    sampler = par.shard(sampler)
    return TrainRun(
        **parts, params=params, opt=opt, sched=sched, sampler=sampler, steps_per_epoch=per_epoch
    )


def adapter_spec(cfg: Config) -> AdapterSpec:
    """The config's adapter section as one AdapterSpec (what patch_model builds every layer from).

    shared + match_params: rank T*r, alpha T*alpha (T rank-r adapters' parameters, same scale).
    hybrid + match_params: task rank r_t = r // 2 and shared rank T*r - T*r_t, so the adapter
    parameters equal per_task's at rank r while each token sees rank r_t + R_s (about (T+1)*r/2):
    one shared LoRA holds what the tasks share, the small per-task ones what they don't. alpha
    keeps the ratio alpha / rank in both parts.
    """
    a, n = cfg.adapter, len(cfg.tasks)
    rank, alpha, hybrid = a.rank, a.alpha, {}
    if a.mode == "shared" and a.match_params:
        rank, alpha = a.rank * n, a.alpha * n
    elif a.mode == "hybrid":
        ratio = a.alpha / a.rank
        if a.match_params:
            rank = a.rank // 2
            alpha, shared = ratio * rank, n * (a.rank - rank)
        else:
            shared = a.shared_rank or a.rank
        shared_alpha = a.shared_alpha if a.shared_alpha is not None else ratio * shared
        hybrid = dict(mode="hybrid", shared_rank=shared, shared_alpha=shared_alpha)
    per_task = patch_kwargs(cfg).get("rank")  # {task: rank} when a task sets its own
    return AdapterSpec(
        rank=per_task or rank, alpha=alpha, router=None if a.router == "segment" else a.router,
        top_k=a.top_k, dropout=a.dropout,
        **hybrid,
    )  # fmt: skip


def quant_spec(cfg: Config) -> QuantSpec:
    """model.quantize and its settings as a QuantSpec."""
    m = cfg.model
    return QuantSpec(m.quantize, m.double_quant, m.compute_dtype, m.quantize_all_linear)


def _patch(model: nn.Module, cfg: Config) -> None:
    """patch_model with the config's adapters, initialised from train.seed."""
    a = cfg.adapter
    torch.manual_seed(cfg.train.seed)
    try:
        patch_model(
            model,
            tasks=[SHARED_ADAPTER] if a.mode == "shared" else cfg.task_names,
            target_modules=a.target_modules,
            layers=a.layers,
            spec=adapter_spec(cfg),
        )
    except ValueError as err:
        raise as_config_error(err) from None
    if a.router == "segment":
        try:
            add_segment_router(model, a.router_layer)
        except ValueError as err:
            raise ConfigError(f"adapter.router_{err}") from None


def _quantize(model: nn.Module, cfg: Config, log: Log) -> None:
    m = cfg.model
    before = base_linear_bytes(model)
    try:
        names = quantize_model(model, quant_spec(cfg), target_modules=cfg.adapter.target_modules)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.quantize: {err}") from None
    after = base_linear_bytes(model)
    log(
        f"quantized {len(names)} linears to {m.quantize} (double_quant={m.double_quant}, "
        f"compute {m.compute_dtype}): base linear weights {before / 2**20:.2f} -> "
        f"{after / 2**20:.2f} MiB"
    )
