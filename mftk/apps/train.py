"""`mftk train CONFIG.yaml [--output DIR] [--max-steps N] [--resume]`."""

from __future__ import annotations

import argparse
import sys

from mftk.train.config import ConfigError, load_config, single_task
from mftk.train.data import DataError
from mftk.train.distributed import trainer_class


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
        help="continue from the latest complete checkpoint in the output dir",
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
        )
        trainer.train()
    except (ConfigError, DataError) as err:
        print(f"mftk train: error: {err}", file=sys.stderr)
        return 2
    return 0
