"""ConfigError and the helpers every config check uses: each raises a ConfigError that names the
dotted key (e.g. `tasks[1].data.data_files[0]`), with a difflib suggestion where one fits."""

from __future__ import annotations

import difflib
import glob
import os
from typing import Any


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key it concerns."""


def suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(allowed)}"


def check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def choice(value: Any, allowed: tuple, where: str) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{where}: {value!r} is not one of {list(allowed)}{suggest(str(value), list(allowed))}"
        )


def resolve_path(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def match_files(patterns: list[str], base: str, where: str) -> list[str]:
    """The files each glob pattern matches (relative to base, `**` recursive), in order; a
    pattern that matches no file is a ConfigError at `where[j]`."""
    files: list[str] = []
    for j, pattern in enumerate(patterns):
        matched = sorted(glob.glob(resolve_path(pattern, base), recursive=True))
        matched = [m for m in matched if os.path.isfile(m)]
        check(
            len(matched) > 0,
            f"{where}[{j}]",
            f"no file matches {pattern!r} (resolved to {resolve_path(pattern, base)})",
        )
        files.extend(matched)
    return files
