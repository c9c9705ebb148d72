"""Training checkpoints that are whole, verified and never pickled; the output dir of one run.

Layout of a one-process checkpoint, `<output>/checkpoints/step-000050/`:
    adapters/              mftk.save_adapters: every task's adapter in mftk's multi-task format
    peft/<task>/           mftk.export_peft: adapter_config.json + adapter_model.safetensors
    trainer_state.json     step, optimizer, scheduler, sampler (data position), the loss mode's
    trainer_state.safetensors  state (CoBa's), RNG states, metric history: JSON + safetensors
                           (mftk.train.statefile), so loading runs no code from the files
    manifest.json          every other file's size and sha256, and the strategy that wrote it
(fsdp2 checkpoints hold the full adapters and optimizer instead of adapters/ and peft/, and one
RNG state per rank: see mftk.train.dcp.)

Writing: into `step-000050.tmp-<host>-<pid>`; every file fsynced, then the manifest, then the
folder, renamed to `step-000050`, and the parent folder fsynced. A run that starts removes the
temp folders of dead processes of its host (remove_stale_temps).
Resuming (latest_valid): the newest `step-<digits>` whose files match its manifest; a corrupt,
truncated or older-format one is reported and the one before it tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from typing import Any

import torch

from mftk.checkpoint import load_adapters, save_adapters
from mftk.peft_io import export_peft
from mftk.train.config import ConfigError
from mftk.train.statefile import fsync_path, load_state, save_state, write_fsynced

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-\d+\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
MANIFEST = "manifest.json"
FORMAT, VERSION = "mftk-checkpoint", 2
STATE = "trainer_state"  # trainer_state.json + trainer_state.safetensors
# what a run writes into its output dir; --overwrite removes these (a tiny base's cache/ stays)
RUN_OUTPUTS = ("checkpoints", "adapters", "peft", "metrics.json", "loss.png", "tb", "eval.json")


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed: corrupt, truncated, incomplete or of an older format."""


def save_adapter_outputs(model: torch.nn.Module, tasks: list[str], path: str) -> None:
    """adapters/ (mftk format) and peft/<task>/ for every task, under path."""
    save_adapters(model, os.path.join(path, "adapters"))
    for task in tasks:  # a router, if any, has no PEFT equivalent: only the LoRA weights go
        export_peft(model, task, os.path.join(path, "peft", task))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rank_rng(path: str, rank: int, seed: int) -> None:
    """Rank `rank`'s RNG state from a per-rank checkpoint folder (rng-rank<r>.*, fsdp2); a rank
    the checkpoint did not have takes rank 0's with torch re-seeded from seed: its own dropout
    stream rather than a copy of rank 0's."""
    own = os.path.join(path, f"rng-rank{rank}")
    if os.path.isfile(own + ".json"):
        set_rng_state(load_state(own))
    else:
        set_rng_state(load_state(os.path.join(path, "rng-rank0")))
        torch.manual_seed(seed)


# ---------------------------------------------------------------------------- writing


def temp_dir(final: str, pid: int | None = None) -> str:
    """The folder a checkpoint is written into before it is renamed to final."""
    return f"{final}.tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(root: str, log: Callable[[str], None]) -> list[str]:
    """Remove the temp folders under root left by killed runs: this host's, whose process is
    dead (another host's cannot be checked and stay). Returns the removed paths."""
    removed = []
    host = socket.gethostname()
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        m = _TMP_DIR.match(name)
        if m is None or m["host"] not in (None, host):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
    if removed:
        log(f"removed {len(removed)} unfinished checkpoint(s) of killed runs: {removed}")
    return removed


def _files(path: str) -> list[str]:
    """Every file under path, relative, sorted."""
    out = []
    for dp, _, names in os.walk(path):
        out += [os.path.relpath(os.path.join(dp, n), path) for n in names]
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(tmp: str, final: str, strategy: str, keep_last: int) -> str:
    """Finish a checkpoint written into tmp: fsync its files, write manifest.json (their sizes
    and sha256), fsync the folders, rename tmp to final and fsync the parent; then delete all
    but the newest keep_last checkpoints beside it. Returns final."""
    files = {}
    for rel in _files(tmp):
        p = os.path.join(tmp, rel)
        fsync_path(p)
        files[rel] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    manifest = {"format": FORMAT, "version": VERSION, "strategy": strategy, "files": files}
    write_fsynced(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    for dp, _, _ in os.walk(tmp, topdown=False):
        fsync_path(dp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = os.path.dirname(final)
    fsync_path(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    tasks: list[str],
    state: dict[str, Any],
    keep_last: int = 2,
) -> str:
    """Write checkpoint `root/step-<step>` atomically; delete all but the newest keep_last."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = temp_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter_outputs(model, tasks, tmp)
    save_state(state, os.path.join(tmp, STATE))
    return seal(tmp, final, "none", keep_last)


# ---------------------------------------------------------------------------- reading


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint folders under root (renamed complete; not yet verified), oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def verify_checkpoint(path: str) -> dict[str, Any]:
    """The manifest of checkpoint folder path, when the folder holds exactly the files it lists,
    with their sizes and sha256; CheckpointError saying what is wrong otherwise."""
    man_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(man_path):
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            raise CheckpointError(
                f"{path}: written by an older mftk (a pickled trainer_state.pt, which can run "
                "code when loaded): no longer read. Start a new run (--overwrite), or finish "
                "this one with the mftk version that wrote it"
            )
        raise CheckpointError(f"{path}: no {MANIFEST} (not an mftk checkpoint)")
    try:
        with open(man_path, encoding="utf-8") as f:
            man = json.load(f)
        files = man["files"]
        ok = man["format"] == FORMAT and man["version"] == VERSION and isinstance(files, dict)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({err})") from None
    if not ok:
        raise CheckpointError(f"{path}: {MANIFEST} is not an {FORMAT} version {VERSION} one")
    present = [f for f in _files(path) if f != MANIFEST]
    extra = sorted(set(present) - set(files))
    if extra:
        raise CheckpointError(f"{path}: files not in its {MANIFEST}: {extra[:5]}")
    for rel, want in files.items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"{path}: {rel} is missing")
        size = os.path.getsize(p)
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {rel} is truncated ({size} of {want['bytes']} bytes)")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{path}: {rel} is corrupt (its sha256 differs)")
    return man


def latest_valid(root: str, log: Callable[[str], None]) -> str | None:
    """The newest checkpoint under root that verifies; one that does not is reported and the
    one before it tried. None: no checkpoint; CheckpointError: some, none valid."""
    found = list_checkpoints(root)
    problems = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            log(f"--resume: skipping {err}; trying the checkpoint before it")
            continue
        return path
    if found:
        raise CheckpointError(f"--resume: no valid checkpoint under {root}: " + "; ".join(problems))
    return None


def check_strategy(path: str, strategy: str) -> None:
    """ConfigError unless the checkpoint in path was written under `strategy` (none | fsdp2)."""
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        wrote = json.load(f)["strategy"]
    if wrote != strategy:
        raise ConfigError(
            f"--resume: {path} was written with distributed.strategy {wrote}; it resumes under "
            f"that strategy only (this run: {strategy})"
        )


def load_trainer_state(path: str) -> dict[str, Any]:
    """The trainer state of a (verified) checkpoint folder."""
    return load_state(os.path.join(path, STATE))


def load_checkpoint(path: str, model: torch.nn.Module) -> dict[str, Any]:
    """Load the adapters into model (in place) and return the trainer state."""
    check_strategy(path, "none")
    load_adapters(model, os.path.join(path, "adapters"))
    return load_trainer_state(path)


# ---------------------------------------------------------------------------- one run per dir


def prepare_output(
    out: str, resume: bool, overwrite: bool, remove: bool, log: Callable[[str], None]
) -> None:
    """One run per output dir. A dir that holds a previous run's outputs (RUN_OUTPUTS) is refused
    unless resuming it (it has a checkpoint), or overwrite: then (remove: this process does it)
    those outputs are deleted; a cache/ and unrelated files stay. ConfigError when refused."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the output dir, --overwrite replaces it")
    prior = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
    if overwrite:
        if remove and prior:
            for n in prior:
                p = os.path.join(out, n)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            log(f"--overwrite: removed the previous run's {', '.join(prior)} from {out}")
        return
    if resume and list_checkpoints(os.path.join(out, "checkpoints")):
        return
    if resume:
        prior = [n for n in prior if n != "checkpoints"]  # only unfinished temp folders in it
    if prior:
        what = "--resume: no checkpoint to continue, and " if resume else ""
        raise ConfigError(
            f"{what}{out} holds a previous run's outputs ({', '.join(prior)}); training into it "
            "would mix two runs. Continue that run with --resume, replace it with --overwrite, "
            "or pick another --output"
        )


def remove_if_empty(path: str) -> None:
    """Remove path if it holds nothing but (nested) empty folders."""
    if not os.path.isdir(path):
        return
    if not any(files for _, _, files in os.walk(path)):
        shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoint files are never rewritten in place: a link is a copy
    except OSError:
        shutil.copy2(src, dst)


def keep_best(root: str, path: str, score: float, keep: int) -> list[str]:
    """output.keep_best beside keep_last's rotation: checkpoint `path` (a step-<digits> folder
    under root, of eval loss `score`) goes into root/best/ (hard links; copies across file
    systems) when it is among the `keep` lowest scores there (a tie: the later step), and the
    ones it pushes out are removed. root/best/scores.json holds {folder: eval loss}.
    returns the kept folders, best first."""
    best = os.path.join(root, "best")
    os.makedirs(best, exist_ok=True)
    table = os.path.join(best, "scores.json")
    scores: dict[str, float] = {}
    if os.path.isfile(table):
        with open(table, encoding="utf-8") as f:
            scores = json.load(f)
    name = os.path.basename(path.rstrip(os.sep))
    scores[name] = score
    step = {n: int(m.group(1)) if (m := _STEP_DIR.match(n)) else -1 for n in scores}
    ranked = sorted(scores, key=lambda n: (scores[n], -step[n]))
    if name in ranked[:keep]:
        dst = os.path.join(best, name)
        shutil.rmtree(dst + ".tmp", ignore_errors=True)
        shutil.copytree(path, dst + ".tmp", copy_function=_link_or_copy)
        for dp, _, names in os.walk(dst + ".tmp", topdown=False):  # copies too, as seal does
            for fn in names:
                fsync_path(os.path.join(dp, fn))
            fsync_path(dp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(dst + ".tmp", dst)
    for n in ranked[keep:]:
        shutil.rmtree(os.path.join(best, n), ignore_errors=True)
        del scores[n]
    write_fsynced(table + ".tmp", json.dumps(scores, indent=1))
    os.replace(table + ".tmp", table)
    fsync_path(best)
    return [os.path.join(best, n) for n in ranked[:keep]]
