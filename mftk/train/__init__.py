"""mftk trainer: `mftk train CONFIG.yaml`.

config (checks) -> run.build_run (model, data, optimizer, once) -> step (forward_batch,
train_step, evaluate) under a strategy (parallel.Single, or distributed.FSDP2 with sharding and
dcp) -> loop.Trainer (stages, checkpoints, report; its progress state in progress). Losses:
losses.LOSSES, picked by loss.mode; tracking: early stopping and keep-best.
Data: records (files) and hf_data (datasets specs, streamed or loaded) -> data (tokenize, split,
SampleStream) -> packing (rows, the resumable sampler). Config errors: config_errors, checks,
checks_data.
Checkpoints: checkpointing (manifest with sha256, fsync, rename; one run per output dir) over
statefile (JSON + safetensors, no pickle); interrupt: SIGINT / SIGTERM stop at a step boundary.
"""
