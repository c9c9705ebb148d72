"""The trainer's YAML config: dataclasses, loaded and validated up front (the checks, one per
section, are in mftk.train.checks).

Every problem is a `ConfigError` that names the key (dotted path, e.g. `tasks[1].loss_weight`);
an unknown key gets a difflib suggestion, a missing data file names the pattern that matched
nothing. Relative paths are resolved against the config file's folder.

    tasks:                       # one adapter per task
      - name: code_completion
        data: ./data/python/*.jsonl
        loss_weight: 0.6
      - name: code_review        # or a Hugging Face datasets spec (see mftk.train.hf_data)
        data: {source: parquet, data_files: ./data/review/*.parquet, streaming: true}
      (per task also: format auto|prompt_completion|chat_rounds|csv, prompt, completion,
       prompt_template: the jsonl keys / csv columns, or a str.format template over a row;
       eval: loss|exec, exec_problems: a jsonl of execution-checked problems for `eval: exec`,
       see mftk.apps.evaluate; type: generate (default) | classify with labels: [...] and label:
       the csv column / jsonl key holding each record's label (default "label"), trained with
       cross-entropy on a head over the last prompt token (mftk.heads); rank: this task's own
       adapter rank (default adapter.rank; mixed ranks are padded, see mftk.pyramid))
    model:   {path: DIR} or {tiny: {...}, vocab_size, pretrain: {steps, lr, batch_size, data}},
             dtype, attn_implementation (sdpa|eager|flash_attention_2), cache_dir,
             quantize (null|nf4|fp4: QLoRA, a frozen 4-bit base quantized on the CPU one layer at
             a time after loading; needs bitsandbytes), double_quant, compute_dtype (the 4-bit
             matmul's dtype), quantize_all_linear (also the non-target linears, never lm_head)
    adapter: rank, alpha, target_modules, router (null|softmax|segment: mftk.segment_router),
             router_layer (segment: -1 the embeddings, k decoder layer k's output), top_k, dropout,
             mode (per_task | shared: one LoRA for all tasks, MFTCoder's way | hybrid: one shared
             LoRA on every token plus each task's own), shared_rank, shared_alpha (hybrid),
             match_params (the per-task setup's adapter parameters; shared: rank T*rank, alpha
             T*alpha; hybrid: task rank r/2 and shared rank T*r/2, alpha/rank kept),
             layers: decoder layers that get adapters ("18:", [0, 3], null = all),
             straight_through (segment: the loss trains the router too, mftk.route.Hard.gate)
    data:    seq_len, packing, eval_fraction, eval_max_samples, skip_bad_lines, noise_kind,
             noise_token_rate, template (mftk|mftcoder: MFTCoder's formats and rendering),
             overlong (drop|truncate; null: drop under mftcoder), role_markers (mftcoder)
    train:   steps, or epochs (passes over the training data, counted once it is packed: see
             mftk.train.run.epoch_steps; not with stages), lr, schedule
             (cosine|linear|constant), min_lr (where cosine/linear end; null: 10% of lr),
             warmup_steps (a number < 1: that fraction of the steps), batch_size (rows of up
             to seq_len tokens per micro-batch; one sample per row without packing), or
             batch_tokens (a token budget per micro-batch, fairseq's --max-tokens: with packing
             batch_tokens // seq_len rows; without, as many samples as keep rows × the longest
             one <= batch_tokens; not with batch_size), grad_accum, clip, weight_decay, seed,
             device, threads, log_every, eval_every, router_warmup_steps (segment: steps routed
             by the true task ids), early_stopping_patience (stop after N evaluations in a row
             without a lower eval loss, see mftk.train.tracking)
    loss:    mode (token|sample|balanced|task_sample|focal|coba|coba_eval: see
             mftk.train.losses), focal_gamma, coba: {history_length (null: 200 for coba, 5 for
             coba_eval), warmup_steps, tau, update_interval, eval_batches (coba)},
             router_balance, router_supervision
    stages:  [{name, steps, mix: {task: w}, noise, noise_kind, loss_weights: {task: w}}]
    output:  dir, save_every, save_every_epoch, keep_last, keep_best (also keep the N checkpoints
             of lowest eval loss, under checkpoints/best/), tb_dir (TensorBoard; null: dir/tb)
    distributed: strategy (none|fsdp2), backend (auto|gloo|nccl), activation_checkpointing,
             mixed_precision: {param_dtype (null = model.dtype), reduce_dtype}
             (see mftk.train.distributed; launch with torchrun)
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mftk.train.checks import validate
from mftk.train.config_errors import ConfigError, suggest
from mftk.train.mftcoder import MFTCoderConfigError, load_json


@dataclass
class DatasetConfig:
    """A task's data as a Hugging Face `datasets` spec over local files (mftk.train.hf_data):
    load_dataset(source, data_files=..., split=..., streaming=...). Nothing is downloaded."""

    source: str  # the file format: json (also jsonl) | csv | parquet | arrow
    data_files: list[str] | dict[str, list[str]]  # globs, or {split: globs}
    split: str = "train"
    eval_split: str | None = None  # null: split off as file data is (streaming: the first rows)
    streaming: bool = False  # an IterableDataset: rows read as training draws them
    shuffle_buffer: int = 1000  # streaming: rows shuffled in a buffer of this many (0: in order)
    cache_dir: str | None = None  # the arrow cache without streaming (null: datasets' default)


@dataclass
class TaskConfig:
    name: str
    data: list[str] | DatasetConfig  # files / globs, or a datasets spec
    loss_weight: float = 1.0
    format: str = "auto"
    # jsonl keys / csv columns; prompt_template: str.format(**row), e.g. "Code:\n{code}\nBug?"
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
    data: list[str] = field(default_factory=list)  # globs of a corpus (tiny_model.read_corpus)
    files: list[str] = field(default_factory=list)  # filled by validation; none: the task text


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
    router_layer: int = -1  # segment router: -1 the embeddings, k decoder layer k's output
    dropout: float = 0.0
    mode: str = "per_task"  # shared: one adapter for all tasks (MFTCoder); hybrid: shared + own
    match_params: bool = False  # shared / hybrid: the per-task setup's adapter parameters
    layers: str | int | list[int] | None = None  # decoder layers with adapters (None: all)
    shared_rank: int | None = None  # hybrid: the shared adapter's rank (null: rank)
    shared_alpha: float | None = None  # hybrid: its alpha (null: the tasks' alpha / rank ratio)
    straight_through: bool = False  # segment router: top-1 forward, its probability's gradient


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
    epochs: float | None = None  # instead of steps: passes over the training splits (run.py)
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int | float = 0  # a number < 1: that fraction of the steps
    min_lr: float | None = None  # where cosine / linear end (null: 10% of lr)
    early_stopping_patience: int | None = None  # stop after N evaluations without a new best
    batch_size: int = 4  # sequences per micro-batch
    batch_tokens: int | None = None  # instead of batch_size: tokens per micro-batch (checks.py)
    grad_accum: int = 1
    clip: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    log_every: int = 10
    eval_every: int = 25
    threads: int | None = None
    router_warmup_steps: int = 0  # segment router: steps routed by the true task ids


@dataclass
class CobaConfig:  # MFTCoder's coba_* keys and defaults (mftk.train.coba)
    history_length: int | None = None  # null: 200 updates (coba), 5 evaluations (coba_eval)
    warmup_steps: int = 100
    tau: float = 5.0
    update_interval: int = 1  # steps between updates
    eval_batches: int = 1  # eval batches sampled at each update


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
    save_every_epoch: bool = False
    keep_last: int = 2
    keep_best: int = 0  # also keep the N checkpoints of lowest eval loss, in checkpoints/best/
    tb_dir: str | None = None  # TensorBoard logs (null: dir/tb)


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


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a type annotation (dataclass, list, dict, Optional...)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: must not be null")
        spec = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(spec) == 1:  # a mapping is the section's own errors
            return _build(spec[0], value, where)
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
            raise ConfigError(f"{full}: unknown key{suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in kwargs:
            raise ConfigError(f"{where + '.' if where else ''}{f.name}: required key is missing")
    return cls(**kwargs)


def single_task(cfg: Config, name: str) -> Config:
    """The single-task baseline of a multi-task config (`mftk train CONFIG --task NAME`).

    Every stage draws only task `name` (mix {name: 1}); tasks, eval split, adapters and steps
    stay as they are, so the run's eval compares task by task with the multi-task run (the other
    tasks' per-task adapters stay untrained: their eval is the base model's). output.dir gets
    "-NAME" appended; the tiny base's cache stays the multi-task run's. Returns cfg, changed.
    """
    if name not in cfg.task_names:
        raise ConfigError(f"--task: unknown task {name!r}{suggest(name, cfg.task_names)}")
    if cfg.model.cache_dir is None:
        cfg.model.cache_dir = os.path.join(cfg.output.dir, "cache")
    cfg.output.dir = cfg.output.dir.rstrip(os.sep) + f"-{name}"
    for s in cfg.stages:
        s.mix = {name: 1.0}
    return cfg


def config_from_dict(raw: Any, base_dir: str = ".") -> Config:
    """Build and validate a Config from parsed YAML; relative paths resolve against base_dir."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and "batch_size" in train and "batch_tokens" in train:
        raise ConfigError(
            "train.batch_tokens: give train.batch_size (rows per micro-batch) or "
            "train.batch_tokens (tokens per micro-batch), not both"
        )
    cfg = _build(Config, raw, "")
    cfg.base_dir = os.path.abspath(base_dir)
    tr = cfg.train
    if not cfg.stages and (tr.steps is not None or tr.epochs is not None):
        # one stage over the natural mix; under train.epochs its steps (0 here) come with the data
        cfg.stages = [StageConfig(steps=tr.steps or 0, name="train")]
    validate(cfg)
    return cfg


def load_config(path: str) -> Config:
    """Read a YAML file into a validated Config (ConfigError on any problem). A .json file may
    be an MFTCoder training config: it is converted (mftk.train.mftcoder)."""
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
