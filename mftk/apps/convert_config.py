"""`mftk convert-config IN.json OUT.yaml`: an MFTCoder training config as an mftk YAML config.

Every setting carries a comment naming the MFTCoder key it comes from and what differs; the
MFTCoder keys with no setting here are listed at the end with the reason. A key mftk cannot follow
is refused by name (nothing is written). The written file is then loaded as `mftk train` would
load it; when that fails here (a data folder or model dir of another machine), the file is kept
and the reason printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from typing import Any

from mftk.train.config import ConfigError, load_config
from mftk.train.mftcoder import Conversion, MFTCoderConfigError, convert, is_mftcoder_config

SECTIONS = ("tasks", "model", "adapter", "data", "train", "loss", "output", "distributed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="MFTCoder mftcoder_accelerate training config (JSON)")
    parser.add_argument("output", help="the mftk YAML config to write")
    parser.add_argument(
        "--force", action="store_true", help="overwrite the output file if it exists"
    )


def yaml_value(value: Any) -> str:
    """One value in YAML flow style (JSON, with floats PyYAML reads back as floats)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            text = text.replace("e", ".0e")
        return text.replace("e-0", "e-").replace("e+0", "e+")
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _line(indent: str, key: str, value: Any, comment: str | None) -> str:
    text = f"{indent}{key}: {yaml_value(value)}"
    return f"{text:<44}  # {comment}" if comment else text


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, 100, initial_indent="# " + indent, subsequent_indent="#   " + indent)


def to_yaml(conv: Conversion, source: str) -> str:
    """The converted config as commented YAML (yaml.safe_load of it == conv.config)."""
    out = _comment(
        f"Converted by `mftk convert-config` from {source}, an MFTCoder (mftcoder_accelerate) "
        "training config. Each comment names the MFTCoder key a setting comes from."
    )
    out += [""] + _comment(conv.comments["tasks"]) + ["tasks:"]
    for task in conv.config["tasks"]:
        out.append(f"  - name: {yaml_value(task['name'])}")
        out += [_line("    ", k, v, None) for k, v in task.items() if k != "name"]
    for section in SECTIONS[1:]:
        if section not in conv.config:
            continue
        out += ["", f"{section}:"]
        for key, value in conv.config[section].items():
            out.append(_line("  ", key, value, conv.comments.get(f"{section}.{key}")))
    if conv.notes:
        out += ["", "# MFTCoder keys with no setting here:"]
        for key, why in conv.notes.items():
            out += _comment(f"{key}: {why}", "  ")
    return "\n".join(out) + "\n"


def rebase(config: dict[str, Any], src_dir: str, dst_dir: str) -> None:
    """Relative paths (read against the JSON's folder, as `mftk train IN.json` reads them)
    rewritten against the YAML's folder."""

    def move(path: str) -> str:
        if os.path.isabs(path):
            return path
        return os.path.relpath(os.path.join(src_dir, path), dst_dir)

    for task in config["tasks"]:
        task["data"] = move(task["data"])
    config["model"]["path"] = move(config["model"]["path"])
    config["output"]["dir"] = move(config["output"]["dir"])
    if config["output"].get("tb_dir") is not None:
        config["output"]["tb_dir"] = move(config["output"]["tb_dir"])


def run(args: argparse.Namespace) -> int:
    prog = "mftk convert-config"
    if os.path.exists(args.output) and not args.force:
        print(f"{prog}: error: {args.output} exists (--force overwrites it)", file=sys.stderr)
        return 2
    try:
        with open(args.input, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        print(f"{prog}: error: {args.input}: {err}", file=sys.stderr)
        return 2
    if not is_mftcoder_config(raw):
        print(f"{prog}: error: {args.input} is not an MFTCoder training config", file=sys.stderr)
        return 2
    try:
        conv = convert(raw)
    except MFTCoderConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    src, dst = (os.path.dirname(os.path.abspath(p)) for p in (args.input, args.output))
    rebase(conv.config, src, dst)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(to_yaml(conv, os.path.basename(args.input)))
    print(f"wrote {args.output} ({len(conv.notes)} MFTCoder keys without a setting, listed there)")
    try:
        load_config(args.output)
    except ConfigError as err:
        print(f"{prog}: {args.output} does not load here as it is: {err}", file=sys.stderr)
        return 1
    return 0
