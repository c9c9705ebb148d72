"""`mftk` command line: each subcommand lives in its own module (mftk.apps.*), imported only when
it is the one called, so `mftk plan` never loads the trainer.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mftk import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mftk.apps.train", "fine-tune a model on a YAML list of tasks"),
    "plan": ("mftk.apps.plan", "estimate per-GPU memory and step time for a model on G GPUs"),
    "eval": (
        "mftk.apps.evaluate",
        "per-task held-out loss, router accuracy and pass@k of a run",
    ),
    "compare": (
        "mftk.apps.compare",
        "side-by-side per-task eval loss and pass@k of runs, with a plot",
    ),
    "scan": ("mftk.apps.scan", "classify a codebase's functions with a task's head (CI gate)"),
    "convert-config": (
        "mftk.apps.convert_config",
        "write an MFTCoder training config (JSON) as a commented mftk YAML config",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (every one when command is None)."""
    parser = argparse.ArgumentParser(prog="mftk", description="multi-task fine-tuning kernels")
    parser.add_argument("--version", action="version", version=f"mftk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is not None and name != command:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as err:  # a subcommand whose optional deps are missing
            p.set_defaults(_import_error=err)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None) is not None:
        parser.error(f"{args.command}: {args._import_error}")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
