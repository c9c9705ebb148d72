"""MFTCoder `mftcoder_accelerate` training configs (the JSON of `--train_config`) as mftk configs.

`convert(raw)` maps every key of MFTCoder's MftTrainArgs: a key that has a meaning here becomes an
mftk setting (with a comment naming the key and what differs); a key that changes nothing here
(min_lr, which MFTCoder's scheduler never reads; legacy keys) becomes a note that says why; a key
whose behaviour mftk cannot reproduce (DeepSpeed, full-parameter training, concat padding,
tokenized data) is refused by name with what to use instead. All refusals are reported at once.
A key left out takes MFTCoder's default (QLoRA, rank 96, alpha 32, seq_length 4096, early
stopping after 5 evaluations without a lower eval loss, ...).

The converted config trains one LoRA shared by all tasks (adapter.mode: shared, MFTCoder's
setup) on MFTCoder's data template (data.template: mftcoder, see mftk.train.mftcoder_format),
dropping samples longer than seq_length + 1 tokens as MFTCoder does (its samples hold the inputs
and the shifted labels, so data.seq_len = seq_length + 1).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from mftk.train.mftcoder_format import DEFAULT_MARKERS
from mftk.train.mftcoder_keys import (
    BOOLS,
    DEFAULTS,
    DISTRIBUTED_HINT,
    FLOATS,
    INTS,
    LEGACY,
    LOSS_NOTES,
    LOSSES,
    NOTES,
    OTHER_TOOLS,
    REQUIRED,
    SCHEDULES,
    SWITCHES,
)

MFTK_SECTIONS = ("tasks", "model", "adapter", "data", "train", "loss", "stages", "output")


class MFTCoderConfigError(ValueError):
    """MFTCoder keys that cannot be converted; one `key: reason` line each."""


@dataclass
class Conversion:
    """config: the mftk config as parsed YAML; comments: mftk key path (e.g. "train.lr") ->
    where the value comes from and what differs; notes: MFTCoder key -> why it has no setting."""

    config: dict[str, Any] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def set(self, path: str, value: Any, comment: str) -> None:
        section, key = path.split(".")
        self.config.setdefault(section, {})[key] = value
        self.comments[path] = comment


def is_mftcoder_config(raw: Any) -> bool:
    """An MFTCoder training config: data_paths, or two of its keys and no mftk section."""
    if not isinstance(raw, dict) or any(k in raw for k in MFTK_SECTIONS):
        return False
    return "data_paths" in raw or len(set(raw) & set(DEFAULTS)) >= 2


def _list_arg(value: Any) -> list[str]:
    """MFTCoder's "[a,b,c]" strings (it strips the brackets and splits at commas), or a list."""
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    if not isinstance(value, str) or not (value.startswith("[") and value.endswith("]")):
        raise ValueError('expected a string of a list as MFTCoder reads it, e.g. "[a,b]"')
    return [v.strip() for v in value[1:-1].split(",")]


def _type_errors(raw: dict[str, Any]) -> dict[str, str]:
    """Numbers MFTCoder reads as int / float, checked before they are mapped."""
    bad = {}
    for key, value in raw.items():
        if key in INTS and not (isinstance(value, int) and not isinstance(value, bool)):
            if not (value is None and key in ("max_train_steps", "saving_limit")):
                bad[key] = f"expected an integer, got {value!r}"
        elif key in FLOATS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            bad[key] = f"expected a number, got {value!r}"
        elif key in BOOLS and not isinstance(value, bool):
            bad[key] = f"expected true or false, got {value!r}"
    return bad


def _tasks(c: Conversion, v: dict[str, Any]) -> None:
    paths = _list_arg(v["data_paths"])
    weights = [1.0] * len(paths)
    if v["task_weights"] is not None and v["weighted_loss_mode"] == "coba":
        c.notes["task_weights"] = "MFTCoder sets every task weight to 1 under coba; so does this"
    elif v["task_weights"] is not None:
        try:
            weights = [float(w) for w in _list_arg(v["task_weights"])]
        except ValueError as err:
            c.refused["task_weights"] = str(err)
        if len(weights) != len(paths) and "task_weights" not in c.refused:
            c.refused["task_weights"] = f"{len(weights)} weights for {len(paths)} data_paths"
    tasks = []
    for path, w in zip(paths, weights):
        base = path.rstrip("/")
        if base.endswith(".jsonl"):
            name, data = os.path.basename(base)[: -len(".jsonl")], base
        else:
            name, data = os.path.basename(base), base + "/**/*.jsonl"
        tasks.append({"name": name, "data": data, "loss_weight": w})
    c.config["tasks"] = tasks
    c.comments["tasks"] = (
        "data_paths: one task per path, named by its last component (a .jsonl file: its stem), "
        "reading every *.jsonl under it; loss_weight from task_weights"
    )


def _steps(c: Conversion, v: dict[str, Any], given: dict[str, Any]) -> None:
    steps, warm = v["max_train_steps"], v["num_warmup_steps"]
    if steps is None:
        c.set(
            "train.epochs",
            v["num_train_epochs"],
            "num_train_epochs: an epoch's steps counted from the packed training data as MFTCoder "
            "counts its dataloader (mftk.train.run.epoch_steps); the sampler draws tasks in "
            "proportion to their sizes, each task's samples in a shuffled cycle",
        )
    else:
        c.set("train.steps", steps, "max_train_steps")
        if "num_train_epochs" in given:
            c.notes["num_train_epochs"] = "MFTCoder derives the epochs from max_train_steps if set"
    if isinstance(warm, float) and warm < 1.0:  # int(fraction × steps), as MFTCoder
        c.set("train.warmup_steps", warm, f"num_warmup_steps {warm}: that fraction of the steps")
    else:
        c.set("train.warmup_steps", int(warm), "num_warmup_steps")


def _schedule(c: Conversion, v: dict[str, Any], given: dict[str, Any]) -> None:
    kind = v["lr_scheduler_type"]
    if kind == "constant":
        c.set("train.schedule", "constant", "lr_scheduler_type constant")
        c.set("train.warmup_steps", 0, "HF's constant schedule ignores num_warmup_steps")
    elif kind in SCHEDULES:
        c.set("train.schedule", SCHEDULES[kind], f"lr_scheduler_type {kind}")
        if kind != "constant_with_warmup":
            c.set("train.min_lr", 0.0, f"HF's {kind} schedule, as MFTCoder builds it, ends at 0")
    else:
        c.refused["lr_scheduler_type"] = (
            f"{kind!r} is not supported; use cosine, linear, constant or constant_with_warmup"
        )
    if "min_lr" in given:
        c.notes["min_lr"] = (
            "unused by MFTCoder: its get_scheduler takes no floor, so its lr decays to 0 "
            "(train.min_lr: 0 follows that; set it to another floor if you meant one)"
        )


def _loss(c: Conversion, v: dict[str, Any], given: dict[str, Any]) -> None:
    mode = v["weighted_loss_mode"]
    if mode not in LOSSES:
        have = ", ".join(f"{k} ({m})" for k, m in LOSSES.items())
        c.refused["weighted_loss_mode"] = f"{mode!r} is not supported yet; mftk has {have}"
        return
    c.set("loss.mode", LOSSES[mode], f"weighted_loss_mode {mode}: {LOSS_NOTES[mode]}")
    coba_keys = [k for k in DEFAULTS if k.startswith("coba_")]
    if mode != "coba":
        for k in coba_keys:
            if k in given:
                c.notes[k] = "unused: weighted_loss_mode is not coba"
        return
    coba = {"warmup_steps": v["coba_warmup_steps"], "history_length": v["coba_history_length"]}
    c.config["loss"]["coba"] = {
        **coba,
        "tau": float(v["coba_tau"]),
        "update_interval": v["coba_update_interval"],
        "eval_batches": v["coba_sample_valid_num"],
    }
    c.comments["loss.coba"] = (
        "coba_warmup_steps, coba_history_length, coba_tau, coba_update_interval, "
        "coba_sample_valid_num (eval batches of train.batch_size rows: MFTCoder's hold "
        "per_device_eval_batch_size)"
    )


def _data(c: Conversion, v: dict[str, Any]) -> None:
    c.set("data.template", "mftcoder", "MFTCoder's formats, role checks and rendering")
    c.set("data.overlong", "drop", "MFTCoder drops samples over seq_length + 1 tokens")
    seq = v["seq_length"]
    c.set("data.seq_len", seq + 1, f"seq_length {seq} + 1: inputs plus the shifted last label")
    split = str(v["data_split"]).replace("/", ",").split(",")
    try:
        frac = 1.0 - float(split[0]) / 100.0
    except ValueError:
        frac = -1.0
    if not 0.0 < frac < 1.0:
        c.refused["data_split"] = (
            f'{v["data_split"]!r}: mftk needs a validation split, e.g. "98,2,0" (train share '
            "under 100)"
        )
    else:
        c.set("data.eval_fraction", round(frac, 10), f"data_split {v['data_split']}")
        c.set("data.eval_max_samples", 10**9, "MFTCoder validates on its whole split")
    mode = v["padding_mode"]
    if mode == "concat":
        c.refused["padding_mode"] = "concat is not supported yet; use padding or pack"
    elif mode in ("padding", "pack"):
        note = "" if mode == "padding" else " (block-diagonal: no attention across samples)"
        c.set("data.packing", mode == "pack", f"padding_mode {mode}{note}")
    else:
        c.refused["padding_mode"] = f"{mode!r}: MFTCoder's modes are padding, pack, concat"
    markers = v["role_markers"]
    if markers is not None:
        if not isinstance(markers, dict) or set(markers) != set(DEFAULT_MARKERS):
            c.refused["role_markers"] = f"needs exactly the keys {sorted(DEFAULT_MARKERS)}"
        else:
            c.set("data.role_markers", dict(markers), "role_markers")


def _model(c: Conversion, v: dict[str, Any]) -> None:
    c.set("model.path", v["pretrained_model_path"], "pretrained_model_path (a local HF dir)")
    c.set("model.dtype", "bfloat16", "MFTCoder loads the base in bfloat16")
    c.set("model.attn_implementation", v["attn_implementation"], "attn_implementation")
    peft = v["peft_type"]
    if peft == "qlora":
        c.set("model.quantize", "nf4", "peft_type qlora: nf4 with double quantization")
        c.set("model.double_quant", True, "as MFTCoder's BitsAndBytesConfig")
        c.set("model.compute_dtype", "bfloat16", "as MFTCoder's BitsAndBytesConfig")
    elif peft != "lora":
        c.refused["peft_type"] = (
            f"{peft!r}: mftk trains LoRA adapters only (no full-parameter training); "
            "use lora or qlora"
        )
    c.set("adapter.mode", "shared", f"peft_type {peft}: one LoRA for all tasks (biases untrained)")
    c.set("adapter.rank", v["lora_rank"], "lora_rank")
    c.set("adapter.alpha", float(v["lora_alpha"]), "lora_alpha")
    c.set("adapter.dropout", float(v["lora_dropout"]), "lora_dropout")
    target = v["target_modules"] or "all-linear"
    c.set("adapter.target_modules", target, "target_modules (MFTCoder's default: all-linear)")


def _train(c: Conversion, v: dict[str, Any], given: dict[str, Any]) -> None:
    c.set("train.lr", float(v["learning_rate"]), "learning_rate")
    c.set("train.batch_size", v["per_device_train_batch_size"], "per_device_train_batch_size")
    c.set("train.grad_accum", v["gradient_accumulation_steps"], "gradient_accumulation_steps")
    c.set("train.weight_decay", float(v["weight_decay"]), "weight_decay (AdamW, as MFTCoder)")
    c.set("train.clip", 1.0, "MFTCoder clips at 1.0 (gradient_clipping in its accelerate YAML)")
    c.set("train.seed", v["seed"], "seed")
    c.set("train.log_every", v["log_interval"], "log_interval")
    c.set("train.eval_every", v["evaluation_steps"], "evaluation_steps")
    c.set("output.dir", v["output_dir"], "output_dir")
    c.set("output.save_every", v["checkpointing_steps"], "checkpointing_steps")
    if v["saving_limit"] is not None:
        c.set("output.keep_last", v["saving_limit"], "saving_limit")
        c.set(
            "output.keep_best",
            1,
            "saving_limit: MFTCoder's rotation spares the checkpoint of the lowest eval loss; "
            "mftk keeps it in checkpoints/best/",
        )
    elif "saving_limit" in given:
        c.notes["saving_limit"] = "null: MFTCoder keeps every checkpoint, mftk output.keep_last (2)"
    if v["tb_dir"] is not None:
        c.set("output.tb_dir", v["tb_dir"], "tb_dir (written when tensorboard is installed)")
    if v["epoch_checkpointing"]:
        c.set(
            "output.save_every_epoch",
            True,
            "epoch_checkpointing: a checkpoint at each epoch's end (step-N folders; MFTCoder "
            "names them epoch_N)",
        )
    elif "epoch_checkpointing" in given:
        c.notes["epoch_checkpointing"] = "false: checkpoints every checkpointing_steps only"
    if v["early_stopping"]:
        c.set(
            "train.early_stopping_patience",
            v["early_stopping_stall_num"],
            "early_stopping, early_stopping_stall_num: evaluations in a row without a lower eval "
            "loss (mftk's: the loss_weight-weighted mean of the task eval losses; MFTCoder's: "
            "the mean over eval batches of the weighted_loss_mode loss)",
        )
    else:
        if "early_stopping" in given:
            c.notes["early_stopping"] = "false: no early stopping"
        if "early_stopping_stall_num" in given:
            c.notes["early_stopping_stall_num"] = "unused: early_stopping is false"


def _switches(c: Conversion, v: dict[str, Any], given: dict[str, Any]) -> None:
    """Keys that are fine at some values (noted) and need a missing feature at others."""
    dist = v["distributed_type"]
    if isinstance(dist, str) and dist.lower() == "fsdp":
        c.set("distributed.strategy", "fsdp2", "distributed_type FSDP (launch with torchrun)")
        v = {**v, "distributed_type": None}
    for key, (ok, note, refusal) in SWITCHES.items():
        value = v[key].lower() if isinstance(v[key], str) else v[key]
        if value not in ok:
            c.refused[key] = f"{json.dumps(v[key])}: {refusal}"
        elif key in given and key not in c.comments:
            c.notes[key] = note


def convert(raw: dict[str, Any]) -> Conversion:
    """The mftk config of an MFTCoder training config (see the module docstring).
    Raises MFTCoderConfigError listing every refused key."""
    c = Conversion()
    for key, value in raw.items():
        if isinstance(value, str) and value.startswith("$"):
            c.refused[key] = f"{value!r} is a placeholder of MFTCoder's template; fill it in"
        elif key in OTHER_TOOLS:
            c.refused[key] = OTHER_TOOLS[key]
        elif any(w in key.lower() for w in ("deepspeed", "zero", "offload", "fsdp")):
            c.refused[key] = DISTRIBUTED_HINT
        elif key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            c.refused[key] = f"not a key of MFTCoder's MftTrainArgs{hint}"
        elif key in NOTES:
            c.notes[key] = NOTES[key]
        elif key in LEGACY:
            c.notes[key] = "legacy in MFTCoder (unused there too)"
    for key in REQUIRED:
        if raw.get(key) is None:
            c.refused.setdefault(key, "required")
    for key, why in _type_errors(raw).items():
        c.refused.setdefault(key, why)
    # map what is left (a refused key takes MFTCoder's default, so every refusal shows at once)
    v = {**DEFAULTS, **{k: x for k, x in raw.items() if k not in c.refused}}
    if "data_paths" not in c.refused:
        try:
            _tasks(c, v)
        except ValueError as err:
            c.refused["data_paths"] = str(err)
    _model(c, v)
    _data(c, v)
    _train(c, v, raw)
    _steps(c, v, raw)
    _schedule(c, v, raw)
    _loss(c, v, raw)
    _switches(c, v, raw)
    if c.refused:
        lines = "\n".join(f"  {k}: {why}" for k, why in c.refused.items())
        raise MFTCoderConfigError(f"MFTCoder config: keys mftk cannot follow:\n{lines}")
    return c


def load_json(path: str) -> dict[str, Any]:
    """A JSON config file as a raw mftk config: an MFTCoder config is converted (a line on
    stderr says so), any other JSON is returned as it is. Raises MFTCoderConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise MFTCoderConfigError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno})"
        ) from None
    if not is_mftcoder_config(raw):
        return raw
    c = convert(raw)
    print(
        f"mftk: {path} is an MFTCoder config: converted ({len(c.notes)} keys without a setting "
        f"here; `mftk convert-config {path} OUT.yaml` writes the YAML with the reasons)",
        file=sys.stderr,
    )
    return c.config
