"""`mftk train CONFIG.yaml [--output DIR] [--max-steps N] [--resume | --overwrite]`.

Exit status: 0 done; 2 a config, data or checkpoint error (one line, no traceback); 130 / 143
stopped by SIGINT / SIGTERM (after a checkpoint when training had started: the resume command
is printed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mftk.train.checkpointing import RUN_OUTPUTS, CheckpointError
from mftk.train.config import ConfigError, load_config, single_task
from mftk.train.data import DataError
from mftk.train.distributed import trainer_class
from mftk.train.interrupt import Interrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="YAML config: tasks, model, adapter, data, train, loss, stages, output"
    )
    parser.add_argument(
        "--output", "-o", default=None, help="output dir (default: output.dir of the config)"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N steps (the lr schedule still spans the configured steps)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest valid checkpoint in the output dir",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in the output dir (removes its "
        + ", ".join(RUN_OUTPUTS)
        + "; keeps the tiny base's cache/). Without it, or --resume, such a dir is refused",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    parser.add_argument(
        "--task",
        default=None,
        help="single-task baseline: train only this task's data (output dir gets -TASK)",
    )


def run(args: argparse.Namespace) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        print("mftk train: error: --max-steps: must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        if args.task is not None:
            cfg = single_task(cfg, args.task)
        trainer = trainer_class(cfg)(
            cfg,
            output_dir=args.output,
            max_steps=args.max_steps,
            resume=args.resume,
            progress=False if args.no_progress else None,
            overwrite=args.overwrite,
        )
        trainer.train()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"mftk train: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        if trainer.is_main:
            print(f"mftk train: {stop}\nresume with: {resume_command(args)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("mftk train: interrupted (no checkpoint written)", file=sys.stderr)
        return 130
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The `mftk train` command line that continues this run (under torchrun: its arguments)."""
    cmd = ["mftk", "train", args.config]
    for flag, value in (("--output", args.output), ("--task", args.task)):
        if value is not None:
            cmd += [flag, value]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    cmd += ["--resume"] + (["--no-progress"] if args.no_progress else [])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun ... -m " + shlex.join(cmd)
    return shlex.join(cmd)
