"""The config's semantic checks, one function per section (ConfigError: mftk.train.config_errors).

validate(cfg) runs them in order on a built mftk.train.config.Config (values already of their
annotated types); each problem is a ConfigError naming its dotted key, with a difflib suggestion
where one fits. The checks also resolve relative paths against cfg.base_dir and fill what the
config leaves to them (TaskConfig.files, stage names, train.steps).
"""

from __future__ import annotations

import os
from typing import Any

from mftk.quant import QUANT_TYPES, bitsandbytes_available
from mftk.spec import AdapterSpec
from mftk.train import checks_data
from mftk.train.config_errors import ConfigError, check, choice, match_files, resolve_path, suggest
from mftk.train.mftcoder_format import DEFAULT_MARKERS

FORMATS = ("auto", "prompt_completion", "chat_rounds", "csv")
# mftk.train.losses.LOSSES
LOSS_MODES = ("token", "sample", "balanced", "task_sample", "focal", "coba", "coba_eval")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
# model.tiny: LlamaConfig fields the built-in tiny model lets a config set
TINY_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "rope_theta",
)
NOISE_KINDS = ("random_tokens", "swap_answer")
TASK_TYPES = ("generate", "classify")


def validate(cfg: Any) -> None:
    """Check a built Config section by section (cfg: mftk.train.config.Config)."""
    for section in (_tasks, _model, _adapter, _data, _train, _loss, _stages, _output, _distributed):
        section(cfg)
    checks_data.streaming(cfg)


def _tasks(cfg: Any) -> None:
    """tasks: names, weights, formats, types, ranks, data globs (matches: TaskConfig.files),
    eval."""
    check(len(cfg.tasks) > 0, "tasks", "needs at least one task")
    seen = set()
    for i, t in enumerate(cfg.tasks):
        w = f"tasks[{i}]"
        check(
            t.name.strip() != "" and t.name.replace("_", "").replace("-", "").isalnum(),
            f"{w}.name",
            f"{t.name!r} must be a non-empty identifier (letters, digits, _ or -)",
        )
        check(t.name not in seen, f"{w}.name", f"duplicate task name {t.name!r}")
        seen.add(t.name)
        check(t.loss_weight > 0, f"{w}.loss_weight", f"must be > 0, got {t.loss_weight}")
        choice(t.format, FORMATS, f"{w}.format")
        choice(t.type, TASK_TYPES, f"{w}.type")
        if t.type == "classify":
            check(
                t.labels is not None and len(t.labels) >= 2,
                f"{w}.labels",
                "a classify task needs labels: [...] (at least 2 class names)",
            )
            check(len(set(t.labels)) == len(t.labels), f"{w}.labels", "duplicate labels")
        else:
            check(t.labels is None, f"{w}.labels", "only for type: classify")
        check(t.rank is None or t.rank >= 1, f"{w}.rank", f"must be >= 1, got {t.rank}")
        if not isinstance(t.data, list):  # a datasets spec (config.DatasetConfig)
            checks_data.dataset(cfg, i)
        else:
            check(len(t.data) > 0, f"{w}.data", "needs at least one file or glob")
            t.files = match_files(t.data, cfg.base_dir, f"{w}.data")
        choice(t.eval, ("loss", "exec"), f"{w}.eval")
        if t.eval == "exec":
            check(t.exec_problems is not None, f"{w}.exec_problems", "required with eval: exec")
        if t.exec_problems is not None:
            t.exec_problems = resolve_path(t.exec_problems, cfg.base_dir)
            check(os.path.isfile(t.exec_problems), f"{w}.exec_problems", "no such file")


def _model(cfg: Any) -> None:
    """model: path xor tiny, dtypes, attention, pretraining, quantization (QLoRA)."""
    m = cfg.model
    check(
        (m.path is None) != (m.tiny is None),
        "model",
        "give exactly one of model.path (a local HF model dir) or model.tiny (built-in config)",
    )
    if m.path is not None:
        m.path = resolve_path(m.path, cfg.base_dir)
        check(
            os.path.isfile(os.path.join(m.path, "config.json")),
            "model.path",
            f"{m.path} is not a Hugging Face model dir (no config.json)",
        )
    for key in m.tiny or {}:
        hint = suggest(key, list(TINY_KEYS))
        check(key in TINY_KEYS, f"model.tiny.{key}", f"unknown key{hint}")
    choice(m.dtype, DTYPES, "model.dtype")
    choice(
        m.attn_implementation, ("sdpa", "eager", "flash_attention_2"), "model.attn_implementation"
    )
    check(m.vocab_size >= 64, "model.vocab_size", f"must be >= 64, got {m.vocab_size}")
    check(m.pretrain.steps >= 0, "model.pretrain.steps", "must be >= 0")
    check(m.pretrain.lr > 0, "model.pretrain.lr", "must be > 0")
    if m.pretrain.data:
        check(m.path is None, "model.pretrain.data", "only for the built-in tiny model")
        check(m.pretrain.steps > 0, "model.pretrain.data", "needs model.pretrain.steps > 0")
        m.pretrain.files = match_files(m.pretrain.data, cfg.base_dir, "model.pretrain.data")
    if m.quantize is not None:
        choice(m.quantize, QUANT_TYPES, "model.quantize")
        choice(m.compute_dtype, DTYPES, "model.compute_dtype")
        check(isinstance(m.double_quant, bool), "model.double_quant", "must be true or false")
        check(
            cfg.distributed.strategy == "none",
            "model.quantize",
            "4-bit bases are not supported with distributed.strategy: fsdp2 (sharding "
            "bitsandbytes' packed weights with fully_shard is unverified in mftk); train QLoRA in "
            "one process (a 4-bit 33B fits one 80 GB GPU: see mftk plan --quantize nf4)",
        )
        check(
            bitsandbytes_available(),
            "model.quantize",
            "needs bitsandbytes: pip install bitsandbytes (or the mftk 'qlora' extra)",
        )
    else:
        check(
            not m.quantize_all_linear, "model.quantize_all_linear", "needs model.quantize: nf4|fp4"
        )
    if m.cache_dir is not None:
        m.cache_dir = resolve_path(m.cache_dir, cfg.base_dir)


def _adapter(cfg: Any) -> None:
    """adapter: rank, alpha, dropout, router, mode; what per-task settings it allows."""
    a = cfg.adapter
    check(
        a.top_k is None or a.router is not None, "adapter.top_k", "only applies with adapter.router"
    )
    if a.router is not None:
        choice(a.router, ("softmax", "segment"), "adapter.router")  # with a did-you-mean
    seg = a.router == "segment"
    check(not seg or a.top_k is None, "adapter.top_k", "the segment router routes top-1")
    check(a.router_layer == -1 or seg, "adapter.router_layer", "only with adapter.router: segment")
    check(not a.straight_through or seg, "adapter.straight_through", "only with router: segment")
    check(a.router_layer >= -1, "adapter.router_layer", f"must be >= -1, got {a.router_layer}")
    check(
        not seg or cfg.distributed.strategy == "none",
        "adapter.router",
        "the segment router trains in one process (distributed.strategy: none) for now",
    )
    w = cfg.train.router_warmup_steps
    check(w == 0 or seg, "train.router_warmup_steps", "only with adapter.router: segment")
    check(w >= 0, "train.router_warmup_steps", f"must be >= 0, got {w}")
    try:  # the values themselves: AdapterSpec is their one validator
        router = None if seg else a.router
        AdapterSpec(
            rank=a.rank, alpha=a.alpha, dropout=a.dropout, router=router, top_k=a.top_k
        ).check_tasks(len(cfg.tasks))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"adapter.{e}") from None
    choice(a.mode, ("per_task", "shared", "hybrid"), "adapter.mode")
    check(
        a.mode != "per_task" or not a.match_params,
        "adapter.match_params",
        "only with mode: shared or hybrid",
    )
    check(
        a.mode != "shared" or a.router is None,
        "adapter.router",
        "a router needs mode: per_task or hybrid",
    )
    for key in ("shared_rank", "shared_alpha"):
        v = getattr(a, key)
        check(v is None or a.mode == "hybrid", f"adapter.{key}", "only with mode: hybrid")
        check(v is None or not a.match_params, f"adapter.{key}", "match_params sets it")
        check(v is None or v > 0, f"adapter.{key}", f"must be > 0, got {v}")
    check(
        not (a.mode == "hybrid" and a.match_params and a.rank < 2),
        "adapter.rank",
        "hybrid with match_params splits it in two: must be >= 2",
    )
    for i, t in enumerate(cfg.tasks):
        if t.type == "classify":
            check(
                a.mode != "shared",
                f"tasks[{i}].type",
                "classify needs adapter.mode per_task or hybrid",
            )
            check(
                cfg.distributed.strategy == "none",
                f"tasks[{i}].type",
                "classify tasks train in one process (distributed.strategy: none) for now",
            )
        if t.rank is not None:
            check(
                a.mode != "shared",
                f"tasks[{i}].rank",
                "per-task ranks need mode: per_task or hybrid",
            )


def _data(cfg: Any) -> None:
    """data: sequence length, eval split, noise, template (mftk | mftcoder)."""
    d = cfg.data
    check(d.seq_len >= 8, "data.seq_len", f"must be >= 8, got {d.seq_len}")
    check(
        0 < d.eval_fraction < 1, "data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}"
    )
    check(d.eval_max_samples >= 1, "data.eval_max_samples", "must be >= 1")
    choice(d.noise_kind, NOISE_KINDS, "data.noise_kind")
    choice(d.template, ("mftk", "mftcoder"), "data.template")
    if d.overlong is not None:
        choice(d.overlong, ("drop", "truncate"), "data.overlong")
    if d.role_markers is not None:
        need = sorted(DEFAULT_MARKERS)
        check(d.template == "mftcoder", "data.role_markers", "only with data.template: mftcoder")
        check(sorted(d.role_markers) == need, "data.role_markers", f"needs the keys {need}")
    check(0 < d.noise_token_rate <= 1, "data.noise_token_rate", "must be in (0, 1]")


def _train(cfg: Any) -> None:
    """train: lr, schedule, device, threads, step counts, clipping."""
    tr = cfg.train
    check(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
    choice(tr.schedule, SCHEDULES, "train.schedule")
    check(
        tr.device in ("auto", "cpu", "cuda") or tr.device.startswith("cuda:"),
        "train.device",
        f"{tr.device!r} is not auto, cpu, cuda or cuda:N",
    )
    check(tr.threads is None or tr.threads >= 1, "train.threads", "must be >= 1 or null")
    for key in ("batch_size", "grad_accum", "log_every", "eval_every"):
        check(getattr(tr, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(tr, key)}")
    _batch_tokens(cfg)
    w = tr.warmup_steps
    check(w >= 0, "train.warmup_steps", f"must be >= 0, got {w}")
    check(w < 1 or w == int(w), "train.warmup_steps", f"a step count or a fraction < 1, got {w}")
    check(tr.clip is None or tr.clip > 0, "train.clip", "must be > 0 or null")
    if tr.min_lr is not None:
        check(0 <= tr.min_lr <= tr.lr, "train.min_lr", f"must be in [0, train.lr], got {tr.min_lr}")
    if tr.epochs is not None:
        check(tr.epochs > 0, "train.epochs", f"must be > 0, got {tr.epochs}")
        check(tr.steps is None, "train.epochs", "give train.steps or train.epochs, not both")
    p = tr.early_stopping_patience
    check(p is None or p >= 1, "train.early_stopping_patience", f"must be >= 1 or null, got {p}")


def _batch_tokens(cfg: Any) -> None:
    """train.batch_tokens: at least data.seq_len; with packing it sets train.batch_size (rows of
    seq_len tokens); without, fsdp2 is refused (its ranks split a batch by rows)."""
    tr, seq_len = cfg.train, cfg.data.seq_len
    if tr.batch_tokens is None:
        return
    check(
        tr.batch_tokens >= seq_len,
        "train.batch_tokens",
        f"must be >= data.seq_len ({seq_len}) so that the longest sample fits, got "
        f"{tr.batch_tokens}",
    )
    if cfg.data.packing:
        tr.batch_size = tr.batch_tokens // seq_len
        return
    check(
        cfg.distributed.strategy == "none",
        "train.batch_tokens",
        "without data.packing not under distributed.strategy fsdp2 (its ranks split a "
        "micro-batch by rows); use data.packing: true or train.batch_size",
    )


def _loss(cfg: Any) -> None:
    """loss: mode, focal gamma, CoBa, router loss weights."""
    lo = cfg.loss
    choice(lo.mode, LOSS_MODES, "loss.mode")
    check(lo.focal_gamma >= 0, "loss.focal_gamma", f"must be >= 0, got {lo.focal_gamma}")
    h = lo.coba.history_length
    check(h is None or h >= 2, "loss.coba.history_length", f"must be >= 2 or null, got {h}")
    check(lo.coba.warmup_steps >= 0, "loss.coba.warmup_steps", "must be >= 0")
    check(lo.coba.tau > 0, "loss.coba.tau", f"must be > 0, got {lo.coba.tau}")
    for key in ("update_interval", "eval_batches"):
        v = getattr(lo.coba, key)
        check(v >= 1, f"loss.coba.{key}", f"must be >= 1, got {v}")
    check(lo.router_balance >= 0, "loss.router_balance", "must be >= 0")
    check(lo.router_supervision >= 0, "loss.router_supervision", "must be >= 0")


def _stages(cfg: Any) -> None:
    """stages: steps, noise, mixes and loss weights over known tasks; train.steps is their total."""
    tr = cfg.train
    check(bool(cfg.stages), "train.steps", "required when no stages are given (or train.epochs)")
    if tr.epochs is not None:  # mftk.train.run.build_run sets the one stage's steps
        one = len(cfg.stages) == 1 and cfg.stages[0].steps == 0
        check(one, "train.epochs", "not with stages (each stage gives its steps)")
    names = cfg.task_names
    for i, s in enumerate(cfg.stages):
        w = f"stages[{i}]"
        s.name = s.name or f"stage{i + 1}"
        check(s.steps >= 1 or tr.epochs is not None, f"{w}.steps", f"must be >= 1, got {s.steps}")
        check(0 <= s.noise < 1, f"{w}.noise", f"must be in [0, 1), got {s.noise}")
        if s.noise_kind is not None:
            choice(s.noise_kind, NOISE_KINDS, f"{w}.noise_kind")
        for key in ("mix", "loss_weights"):
            table = getattr(s, key)
            if table is None:
                continue
            for k, v in table.items():
                check(k in names, f"{w}.{key}.{k}", f"unknown task{suggest(k, names)}")
                check(v >= 0, f"{w}.{key}.{k}", f"must be >= 0, got {v}")
            if key == "mix":
                check(sum(table.values()) > 0, f"{w}.mix", "weights must not all be zero")
    if tr.steps is not None:
        check(
            tr.steps == cfg.total_steps,
            "train.steps",
            f"{tr.steps} != the stages' total {cfg.total_steps}; drop train.steps or fix it",
        )
    if tr.epochs is None:
        tr.steps = cfg.total_steps


def _output(cfg: Any) -> None:
    """output: dir and tb_dir (resolved), save_every, keep_last, keep_best."""
    o = cfg.output
    o.dir = resolve_path(o.dir, cfg.base_dir)
    if o.tb_dir is not None:
        o.tb_dir = resolve_path(o.tb_dir, cfg.base_dir)
    check(o.save_every is None or o.save_every >= 1, "output.save_every", "must be >= 1 or null")
    check(o.keep_last >= 1, "output.keep_last", "must be >= 1")
    check(o.keep_best >= 0, "output.keep_best", f"must be >= 0, got {o.keep_best}")


def _distributed(cfg: Any) -> None:
    """distributed: strategy, backend, activation checkpointing, mixed precision."""
    di = cfg.distributed
    choice(di.strategy, ("none", "fsdp2"), "distributed.strategy")
    choice(di.backend, ("auto", "gloo", "nccl"), "distributed.backend")
    check(
        not di.activation_checkpointing or di.strategy == "fsdp2",
        "distributed.activation_checkpointing",
        "only applies with distributed.strategy: fsdp2",
    )
    mp = di.mixed_precision
    if mp.param_dtype is not None:
        choice(mp.param_dtype, DTYPES, "distributed.mixed_precision.param_dtype")
    choice(mp.reduce_dtype, DTYPES, "distributed.mixed_precision.reduce_dtype")
