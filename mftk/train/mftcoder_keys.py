"""The key tables of MFTCoder's `mftcoder_accelerate` training config (its MftTrainArgs), as
mftk.train.mftcoder converts them: defaults, types, and the keys that need no mftk setting."""

from __future__ import annotations

from typing import Any

# MftTrainArgs' defaults (None: required, or null by default)
DEFAULTS: dict[str, Any] = {
    "data_paths": None, "output_dir": None, "tb_dir": None, "pretrained_model_path": None,
    "model_type": None, "load_raw_dataset": True, "task_weights": None, "data_weights": None,
    "low_cpu_mem_usage": True, "data_split": "98,2,0", "padding_mode": "padding",
    "tokenize_mode": "sft", "weighted_loss_mode": "case3", "peft_type": "qlora",
    "quantization": "4bit", "lora_rank": 96, "lora_alpha": 32, "lora_dropout": 0.05,
    "target_modules": None, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
    "tokenizer_type": "AutoTokenizer", "learning_rate": 5e-5, "min_lr": 5e-6,
    "weight_decay": 0.01, "gradient_accumulation_steps": 1, "lr_scheduler_type": "cosine",
    "num_warmup_steps": 0.05, "num_train_epochs": 4, "seed": 1234, "seq_length": 4096,
    "resume_from_checkpoint": None, "auto_resume": True, "log_interval": 10,
    "checkpointing_steps": 100, "evaluation_steps": 100, "max_train_steps": None,
    "epoch_checkpointing": False, "shuffle_before_split": True, "use_random_sampler": True,
    "early_stopping": True, "early_stopping_stall_num": 5, "saving_limit": None,
    "use_dynamic_padding": True, "coba_warmup_steps": 100, "coba_history_length": 200,
    "coba_tau": 5, "coba_update_interval": 1, "coba_sample_valid_num": 1,
    "attn_implementation": "flash_attention_2", "role_markers": None, "distributed_type": None,
    "init_timeout_seconds": 3600, "use_xformers": True, "trust_remote_code": True,
    "weight_by_num_documents": True, "make_vocab_size_divisible_by": 32,
    "model_parallel_size": 1, "use_slow_tokenizer": False, "world_size": 8,
}  # fmt: skip
REQUIRED = ("data_paths", "output_dir", "pretrained_model_path")
INTS = (
    "lora_rank", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
    "seq_length", "log_interval", "checkpointing_steps", "evaluation_steps", "max_train_steps",
    "saving_limit", "coba_warmup_steps", "coba_history_length", "coba_update_interval",
    "coba_sample_valid_num", "num_train_epochs", "early_stopping_stall_num",
)  # fmt: skip
FLOATS = ("lora_alpha", "lora_dropout", "learning_rate", "weight_decay", "coba_tau")
FLOATS += ("num_warmup_steps", "min_lr")
BOOLS = ("early_stopping", "epoch_checkpointing")
LOSSES = {
    "case1": "token", "case2": "sample", "case3": "balanced", "case4": "task_sample",
    "coba": "coba",
}  # fmt: skip
LOSS_NOTES = {
    "case1": "the token mean over all answer tokens",
    "case2": "the mean over samples of each sample's token mean (MFTCoder's sample is a row: "
    "under padding_mode pack a packed row of one task, mftk's the packed sample)",
    "case3": "the task-weighted mean of the task token means of a batch",
    "case4": "the task-weighted mean of each task's mean over its samples of their token means "
    "(samples as case2)",
    "coba": "CoBa's weights as MFTCoder computes them (mftk.train.coba)",
}
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant_with_warmup": "constant"}
# keys that change nothing in mftk's run: the note says why
NOTES = {
    "model_type": "mftk reads the architecture from the model's config.json",
    "low_cpu_mem_usage": "a loading detail; mftk loads with transformers' defaults",
    "data_weights": "MFTCoder overwrites it with 1 per task (unused there too)",
    "quantization": "MFTCoder derives it from peft_type (qlora: 4bit, else none); so does mftk",
    "per_device_eval_batch_size": "mftk evaluates in batches of train.batch_size",
    "use_dynamic_padding": "mftk pads each batch to its longest row; the loss is the same",
    "shuffle_before_split": "MFTCoder's jsonl loader shuffles before the split either way; so "
    "does mftk (seeded by train.seed)",
    "use_random_sampler": "mftk draws batches with its seeded multi-task sampler",
    "auto_resume": "mftk resumes from output.dir with `mftk train CONFIG --resume`",
    "init_timeout_seconds": "the process-group timeout; mftk keeps torch's default",
    "trust_remote_code": "mftk loads models with transformers' own classes (no remote code)",
}
LEGACY = (
    "use_xformers", "weight_by_num_documents", "make_vocab_size_divisible_by",
    "model_parallel_size", "use_slow_tokenizer", "world_size",
)  # fmt: skip
OTHER_TOOLS = {
    "xxpo": "DPO/ORPO training is not supported; mftk trains supervised multi-task LoRA",
    "beta": "DPO's beta: DPO/ORPO training is not supported",
    "rpo_alpha": "DPO's rpo_alpha: DPO/ORPO training is not supported",
}
DISTRIBUTED_HINT = (
    "DeepSpeed/FSDP settings are not read from here: mftk trains in one process, or under "
    "torchrun with distributed.strategy: fsdp2 (set it in the converted YAML)"
)
# key: (the values mftk follows (strings lower-cased), the note for them, the refusal otherwise)
SWITCHES = {
    "load_raw_dataset": (
        (True,),
        "mftk reads the jsonl files too",
        "tokenized binary datasets are not supported; give jsonl task folders in data_paths and "
        "set load_raw_dataset true",
    ),
    "tokenize_mode": (
        ("sft",),
        "sft: loss on the answers only, as mftk",
        "not supported yet; use sft (text records already carry loss on every token)",
    ),
    "tokenizer_type": (
        ("autotokenizer",),
        "mftk loads the model dir's AutoTokenizer too",
        "only AutoTokenizer (as in MFTCoder)",
    ),
    "resume_from_checkpoint": (
        (None,),
        "null: a fresh run",
        "use `mftk train CONFIG --resume` (it resumes from output.dir's latest checkpoint)",
    ),
    "distributed_type": ((None,), "one process", DISTRIBUTED_HINT),
}
