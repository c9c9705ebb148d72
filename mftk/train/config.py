"""The trainer's YAML config: dataclasses, loaded and validated up front.

Every problem is a `ConfigError` that names the key (dotted path, e.g. `tasks[1].loss_weight`);
an unknown key gets a difflib suggestion, a missing data file names the pattern that matched
nothing. Relative paths are resolved against the config file's folder.

    tasks:                       # one adapter per task
      - name: code_completion
        data: ./data/python/*.jsonl
        loss_weight: 0.6
      (per task also: format auto|prompt_completion|chat_rounds|csv, prompt, completion,
       prompt_template: the jsonl keys / csv columns, or a str.format template over a row;
       eval: loss|exec, exec_problems: a jsonl of execution-checked problems for `eval: exec`,
       see mftk.apps.evaluate; type: generate (default) | classify with labels: [...] and label:
       the csv column / jsonl key holding each record's label (default "label"), trained with
       cross-entropy on a head over the last prompt token (mftk.heads); rank: this task's own
       adapter rank (default adapter.rank; mixed ranks are padded, see mftk.pyramid))
    model:   {path: DIR} or {tiny: {...}, vocab_size, pretrain: {steps, lr, batch_size}},
             dtype, attn_implementation (sdpa|eager|flash_attention_2), cache_dir,
             quantize (null|nf4|fp4: QLoRA, a frozen 4-bit base quantized on the CPU one layer at
             a time after loading; needs bitsandbytes), double_quant, compute_dtype (the 4-bit
             matmul's dtype), quantize_all_linear (also the non-target linears, never lm_head)
    adapter: rank, alpha, target_modules, router (null|softmax), top_k, dropout,
             mode (per_task|shared: one LoRA for all tasks, MFTCoder's way), match_params
             (shared: rank T*rank and alpha T*alpha, the per-task setup's adapter parameters),
             layers: decoder layers that get adapters ("18:", [0, 3], null = all)
    data:    seq_len, packing, eval_fraction, eval_max_samples, skip_bad_lines, noise_kind,
             noise_token_rate, template (mftk|mftcoder: MFTCoder's formats and rendering),
             overlong (drop|truncate; null: drop under mftcoder), role_markers (mftcoder)
    train:   steps, lr, schedule (cosine|linear|constant), warmup_steps, batch_size (rows of up
             to seq_len tokens per micro-batch; one sample per row without packing),
             grad_accum, clip, weight_decay, seed, device, threads, log_every, eval_every
    loss:    mode (token|balanced|focal|coba), focal_gamma, coba: {history_length,
             warmup_steps, tau}, router_balance, router_supervision
    stages:  [{name, steps, mix: {task: w}, noise, noise_kind, loss_weights: {task: w}}]
    output:  dir, save_every, keep_last
    distributed: strategy (none|fsdp2), backend (auto|gloo|nccl), activation_checkpointing,
             mixed_precision: {param_dtype (null = model.dtype), reduce_dtype}
             (see mftk.train.distributed; launch with torchrun)
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mftk.train.mftcoder import MFTCoderConfigError, load_json
from mftk.train.mftcoder_format import DEFAULT_MARKERS


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key it concerns."""


FORMATS = ("auto", "prompt_completion", "chat_rounds", "csv")
LOSS_MODES = ("token", "balanced", "focal", "coba")
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


@dataclass
class TaskConfig:
    name: str
    data: list[str]
    loss_weight: float = 1.0
    format: str = "auto"
    # jsonl: keys of prompt/completion; csv: column names. `prompt_template` formats a csv row
    # (or jsonl record) into the prompt with str.format(**row), e.g. "Code:\n{code}\nBug?"
    prompt: str = "prompt"
    completion: str = "completion"
    prompt_template: str | None = None
    eval: str = "loss"  # exec: also generate for exec_problems and run their unit tests
    exec_problems: str | None = None
    type: str = "generate"  # classify: a head over the last prompt token, CE on `label`
    labels: list[str] | None = None  # classify: the class names, in head order
    label: str = "label"  # classify: the csv column / jsonl key of the label
    rank: int | None = None  # this task's adapter rank (default adapter.rank)
    files: list[str] = field(default_factory=list)  # filled by validation: the matched files


@dataclass
class PretrainConfig:
    steps: int = 0
    lr: float = 3e-3
    batch_size: int = 8


@dataclass
class ModelConfig:
    path: str | None = None
    tiny: dict[str, Any] | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    quantize: str | None = None  # nf4 | fp4: QLoRA (mftk.quant)
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quantize_all_linear: bool = False
    vocab_size: int = 512  # tokenizer size for the built-in tiny model
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cache_dir: str | None = None


@dataclass
class AdapterConfig:
    rank: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = "all-linear"
    router: str | None = None
    top_k: int | None = None
    dropout: float = 0.0
    mode: str = "per_task"  # shared: one adapter for every task (the MFTCoder baseline)
    match_params: bool = False  # shared: rank and alpha times the number of tasks
    layers: str | int | list[int] | None = None  # decoder layers with adapters (None: all)


@dataclass
class DataConfig:
    seq_len: int = 256
    packing: bool = True
    eval_fraction: float = 0.1
    eval_max_samples: int = 64
    skip_bad_lines: bool = False
    noise_kind: str = "random_tokens"
    noise_token_rate: float = 0.2
    template: str = "mftk"  # mftcoder: MFTCoder's formats and rendering (train.mftcoder_format)
    overlong: str | None = None  # drop | truncate (null: drop under mftcoder, else truncate)
    role_markers: dict[str, str] | None = None  # mftcoder: {system, user, assistant} markers


@dataclass
class TrainConfig:
    steps: int | None = None
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1
    clip: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    log_every: int = 10
    eval_every: int = 25
    threads: int | None = None


@dataclass
class CobaConfig:
    history_length: int = 5
    warmup_steps: int = 100
    tau: float = 5.0


@dataclass
class LossConfig:
    mode: str = "balanced"
    focal_gamma: float = 2.0
    coba: CobaConfig = field(default_factory=CobaConfig)
    router_balance: float = 0.01
    router_supervision: float = 1.0


@dataclass
class StageConfig:
    steps: int
    name: str = ""
    mix: dict[str, float] | None = None
    noise: float = 0.0
    noise_kind: str | None = None  # default: data.noise_kind
    loss_weights: dict[str, float] | None = None


@dataclass
class OutputConfig:
    dir: str = "./out"
    save_every: int | None = None
    keep_last: int = 2


@dataclass
class MixedPrecisionConfig:
    param_dtype: str | None = None  # FSDP2 all-gather/compute dtype; null: model.dtype
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype


@dataclass
class DistributedConfig:
    strategy: str = "none"  # none: one process; fsdp2: torchrun + fully_shard per decoder layer
    backend: str = "auto"  # auto: nccl on cuda, gloo on cpu
    activation_checkpointing: bool = False
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)


@dataclass
class Config:
    tasks: list[TaskConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: list[StageConfig] = field(default_factory=list)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    base_dir: str = "."  # the config file's folder (not a YAML key)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- generic building


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(allowed)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a type annotation (dataclass, list, dict, Optional...)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("files", "base_dir")]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown key{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in kwargs:
            raise ConfigError(f"{where + '.' if where else ''}{f.name}: required key is missing")
    return cls(**kwargs)


# ----------------------------------------------------------------------------- semantic checks


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _choice(value: Any, allowed: tuple, where: str) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{where}: {value!r} is not one of {list(allowed)}{_suggest(str(value), list(allowed))}"
        )


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _validate(cfg: Config) -> None:
    _check(len(cfg.tasks) > 0, "tasks", "needs at least one task")
    seen = set()
    for i, t in enumerate(cfg.tasks):
        w = f"tasks[{i}]"
        _check(
            t.name.strip() != "" and t.name.replace("_", "").replace("-", "").isalnum(),
            f"{w}.name",
            f"{t.name!r} must be a non-empty identifier (letters, digits, _ or -)",
        )
        _check(t.name not in seen, f"{w}.name", f"duplicate task name {t.name!r}")
        seen.add(t.name)
        _check(t.loss_weight > 0, f"{w}.loss_weight", f"must be > 0, got {t.loss_weight}")
        _choice(t.format, FORMATS, f"{w}.format")
        _choice(t.type, TASK_TYPES, f"{w}.type")
        if t.type == "classify":
            _check(
                t.labels is not None and len(t.labels) >= 2,
                f"{w}.labels",
                "a classify task needs labels: [...] (at least 2 class names)",
            )
            _check(len(set(t.labels)) == len(t.labels), f"{w}.labels", "duplicate labels")
        else:
            _check(t.labels is None, f"{w}.labels", "only for type: classify")
        _check(t.rank is None or t.rank >= 1, f"{w}.rank", f"must be >= 1, got {t.rank}")
        _check(len(t.data) > 0, f"{w}.data", "needs at least one file or glob")
        files: list[str] = []
        for j, pattern in enumerate(t.data):
            matched = sorted(glob.glob(_resolve(pattern, cfg.base_dir), recursive=True))
            matched = [m for m in matched if os.path.isfile(m)]
            _check(
                len(matched) > 0,
                f"{w}.data[{j}]",
                f"no file matches {pattern!r} (resolved to {_resolve(pattern, cfg.base_dir)})",
            )
            files.extend(matched)
        t.files = files
        _choice(t.eval, ("loss", "exec"), f"{w}.eval")
        if t.eval == "exec":
            _check(t.exec_problems is not None, f"{w}.exec_problems", "required with eval: exec")
        if t.exec_problems is not None:
            t.exec_problems = _resolve(t.exec_problems, cfg.base_dir)
            _check(os.path.isfile(t.exec_problems), f"{w}.exec_problems", "no such file")
    m = cfg.model
    _check(
        (m.path is None) != (m.tiny is None),
        "model",
        "give exactly one of model.path (a local HF model dir) or model.tiny (built-in config)",
    )
    if m.path is not None:
        m.path = _resolve(m.path, cfg.base_dir)
        _check(
            os.path.isfile(os.path.join(m.path, "config.json")),
            "model.path",
            f"{m.path} is not a Hugging Face model dir (no config.json)",
        )
    for key in m.tiny or {}:
        hint = _suggest(key, list(TINY_KEYS))
        _check(key in TINY_KEYS, f"model.tiny.{key}", f"unknown key{hint}")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(
        m.attn_implementation, ("sdpa", "eager", "flash_attention_2"), "model.attn_implementation"
    )
    _check(m.vocab_size >= 64, "model.vocab_size", f"must be >= 64, got {m.vocab_size}")
    _check(m.pretrain.steps >= 0, "model.pretrain.steps", "must be >= 0")
    _check(m.pretrain.lr > 0, "model.pretrain.lr", "must be > 0")
    if m.quantize is not None:
        from mftk.quant import QUANT_TYPES, bitsandbytes_available

        _choice(m.quantize, QUANT_TYPES, "model.quantize")
        _choice(m.compute_dtype, DTYPES, "model.compute_dtype")
        _check(isinstance(m.double_quant, bool), "model.double_quant", "must be true or false")
        _check(
            cfg.distributed.strategy == "none",
            "model.quantize",
            "4-bit bases are not supported with distributed.strategy: fsdp2 (sharding "
            "bitsandbytes' packed weights with fully_shard is unverified in mftk); train QLoRA in "
            "one process (a 4-bit 33B fits one 80 GB GPU: see mftk plan --quantize nf4)",
        )
        _check(
            bitsandbytes_available(),
            "model.quantize",
            "needs bitsandbytes: pip install bitsandbytes (or the mftk 'qlora' extra)",
        )
    else:
        _check(
            not m.quantize_all_linear, "model.quantize_all_linear", "needs model.quantize: nf4|fp4"
        )
    if m.cache_dir is not None:
        m.cache_dir = _resolve(m.cache_dir, cfg.base_dir)
    a = cfg.adapter
    _check(a.rank >= 1, "adapter.rank", f"must be >= 1, got {a.rank}")
    _check(a.alpha > 0, "adapter.alpha", f"must be > 0, got {a.alpha}")
    _check(0 <= a.dropout < 1, "adapter.dropout", f"must be in [0, 1), got {a.dropout}")
    if a.router is not None:
        _choice(a.router, ("softmax",), "adapter.router")
    _choice(a.mode, ("per_task", "shared"), "adapter.mode")
    _check(
        a.mode == "shared" or not a.match_params, "adapter.match_params", "only with mode: shared"
    )
    _check(
        a.mode != "shared" or a.router is None, "adapter.router", "a router needs mode: per_task"
    )
    for i, t in enumerate(cfg.tasks):
        if t.type == "classify":
            _check(a.mode == "per_task", f"tasks[{i}].type", "classify needs adapter.mode per_task")
            _check(
                cfg.distributed.strategy == "none",
                f"tasks[{i}].type",
                "classify tasks train in one process (distributed.strategy: none) for now",
            )
        if t.rank is not None:
            _check(a.mode == "per_task", f"tasks[{i}].rank", "per-task ranks need mode: per_task")
    if a.top_k is not None:
        _check(a.router is not None, "adapter.top_k", "only applies with adapter.router")
        _check(1 <= a.top_k <= len(cfg.tasks), "adapter.top_k", f"must be in [1, {len(cfg.tasks)}]")
    d = cfg.data
    _check(d.seq_len >= 8, "data.seq_len", f"must be >= 8, got {d.seq_len}")
    _check(
        0 < d.eval_fraction < 1, "data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}"
    )
    _check(d.eval_max_samples >= 1, "data.eval_max_samples", "must be >= 1")
    _choice(d.noise_kind, NOISE_KINDS, "data.noise_kind")
    _choice(d.template, ("mftk", "mftcoder"), "data.template")
    if d.overlong is not None:
        _choice(d.overlong, ("drop", "truncate"), "data.overlong")
    if d.role_markers is not None:
        need = sorted(DEFAULT_MARKERS)
        _check(d.template == "mftcoder", "data.role_markers", "only with data.template: mftcoder")
        _check(sorted(d.role_markers) == need, "data.role_markers", f"needs the keys {need}")
    _check(0 < d.noise_token_rate <= 1, "data.noise_token_rate", "must be in (0, 1]")
    tr = cfg.train
    _check(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
    _choice(tr.schedule, SCHEDULES, "train.schedule")
    _check(
        tr.device in ("auto", "cpu", "cuda") or tr.device.startswith("cuda:"),
        "train.device",
        f"{tr.device!r} is not auto, cpu, cuda or cuda:N",
    )
    _check(tr.threads is None or tr.threads >= 1, "train.threads", "must be >= 1 or null")
    for key in ("batch_size", "grad_accum", "log_every", "eval_every"):
        _check(getattr(tr, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(tr, key)}")
    _check(tr.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(tr.clip is None or tr.clip > 0, "train.clip", "must be > 0 or null")
    lo = cfg.loss
    _choice(lo.mode, LOSS_MODES, "loss.mode")
    _check(lo.focal_gamma >= 0, "loss.focal_gamma", f"must be >= 0, got {lo.focal_gamma}")
    _check(lo.coba.history_length >= 2, "loss.coba.history_length", "must be >= 2")
    _check(lo.coba.warmup_steps >= 0, "loss.coba.warmup_steps", "must be >= 0")
    _check(lo.router_balance >= 0, "loss.router_balance", "must be >= 0")
    _check(lo.router_supervision >= 0, "loss.router_supervision", "must be >= 0")
    # Stages: with none, one stage of train.steps over the natural mix.
    if not cfg.stages:
        _check(tr.steps is not None, "train.steps", "required when no stages are given")
        cfg.stages = [StageConfig(steps=tr.steps, name="train")]
    names = cfg.task_names
    for i, s in enumerate(cfg.stages):
        w = f"stages[{i}]"
        s.name = s.name or f"stage{i + 1}"
        _check(s.steps >= 1, f"{w}.steps", f"must be >= 1, got {s.steps}")
        _check(0 <= s.noise < 1, f"{w}.noise", f"must be in [0, 1), got {s.noise}")
        if s.noise_kind is not None:
            _choice(s.noise_kind, NOISE_KINDS, f"{w}.noise_kind")
        for key in ("mix", "loss_weights"):
            table = getattr(s, key)
            if table is None:
                continue
            for k, v in table.items():
                _check(k in names, f"{w}.{key}.{k}", f"unknown task{_suggest(k, names)}")
                _check(v >= 0, f"{w}.{key}.{k}", f"must be >= 0, got {v}")
            if key == "mix":
                _check(sum(table.values()) > 0, f"{w}.mix", "weights must not all be zero")
    if tr.steps is not None:
        _check(
            tr.steps == cfg.total_steps,
            "train.steps",
            f"{tr.steps} != the stages' total {cfg.total_steps}; drop train.steps or fix it",
        )
    tr.steps = cfg.total_steps
    o = cfg.output
    o.dir = _resolve(o.dir, cfg.base_dir)
    _check(o.save_every is None or o.save_every >= 1, "output.save_every", "must be >= 1 or null")
    _check(o.keep_last >= 1, "output.keep_last", "must be >= 1")
    di = cfg.distributed
    _choice(di.strategy, ("none", "fsdp2"), "distributed.strategy")
    _choice(di.backend, ("auto", "gloo", "nccl"), "distributed.backend")
    _check(
        not di.activation_checkpointing or di.strategy == "fsdp2",
        "distributed.activation_checkpointing",
        "only applies with distributed.strategy: fsdp2",
    )
    mp = di.mixed_precision
    if mp.param_dtype is not None:
        _choice(mp.param_dtype, DTYPES, "distributed.mixed_precision.param_dtype")
    _choice(mp.reduce_dtype, DTYPES, "distributed.mixed_precision.reduce_dtype")


def single_task(cfg: Config, name: str) -> Config:
    """The single-task baseline of a multi-task config (`mftk train CONFIG --task NAME`).

    Every stage draws only task `name` (mix {name: 1}); tasks, eval split, adapters and steps
    stay as they are, so the run's eval compares task by task with the multi-task run (the other
    tasks' per-task adapters stay untrained: their eval is the base model's). output.dir gets
    "-NAME" appended; the tiny base's cache stays the multi-task run's. Returns cfg, changed.
    """
    if name not in cfg.task_names:
        raise ConfigError(f"--task: unknown task {name!r}{_suggest(name, cfg.task_names)}")
    if cfg.model.cache_dir is None:
        cfg.model.cache_dir = os.path.join(cfg.output.dir, "cache")
    cfg.output.dir = cfg.output.dir.rstrip(os.sep) + f"-{name}"
    for s in cfg.stages:
        s.mix = {name: 1.0}
    return cfg


def config_from_dict(raw: Any, base_dir: str = ".") -> Config:
    """Build and validate a Config from parsed YAML; relative paths resolve against base_dir."""
    cfg = _build(Config, raw, "")
    cfg.base_dir = os.path.abspath(base_dir)
    _validate(cfg)
    return cfg


def load_config(path: str) -> Config:
    """Read a YAML file into a validated Config (ConfigError on any problem). A .json file may
    be an MFTCoder training config: it is converted (mftk.train.mftcoder)."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config: no such file {path}")
    if path.lower().endswith(".json"):
        try:
            raw = load_json(path)
        except MFTCoderConfigError as err:  # each MFTCoder key mftk cannot follow, by name
            raise ConfigError(str(err)) from None
        return config_from_dict(raw, os.path.dirname(os.path.abspath(path)))
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
    return config_from_dict(raw, os.path.dirname(os.path.abspath(path)))
