"""Run untrusted generated Python in a separate, limited process, for execution-checked evals.

    res = run_program(prompt + completion + "\\n" + tests, timeout=5.0, memory_mb=512)
    res.passed, res.status   # True/False; "passed" | "failed" | "timeout" | "memory" | "blocked"

What each run gets:
- a fresh interpreter, `python -I -B` (isolated: no PYTHON* variables, no user site, no script dir
  on sys.path; no .pyc writes), a new session (process group), a minimal environment, and a new
  temporary directory as its cwd, deleted afterwards;
- resource limits set in the child before exec: RLIMIT_AS (address space, `memory_mb`),
  RLIMIT_CPU (cpu seconds), RLIMIT_FSIZE (largest file it may write), RLIMIT_CORE 0;
- a wall-clock timeout, after which the whole process group is killed;
- a guard script that installs a `sys.addaudithook` hook before the program runs. The hook
  refuses socket creation, connect/bind and DNS (`socket.*`), new processes (`subprocess.Popen`,
  `os.system`, `os.exec*`, `os.posix_spawn`, `os.fork`, `os.kill`), `ctypes`, and writes,
  removals or renames outside the temp dir. A refused event raises PermissionError in the
  program, and the run counts as "blocked" (a failure) even if the program catches it.

What this does NOT stop (it is a guard against accidents of generated code, not a security
boundary): code that reaches the OS without an audit event (a C extension module already on
sys.path, or `_posixsubprocess` internals), reads of any file the user can read, CPU burn until
the limits hit, or exploits of the interpreter. Network isolation proper needs an OS mechanism
(a network namespace, seccomp, a container); run untrusted benchmarks inside one.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# exit codes the guard uses to tell the parent what happened
_EXIT_MEMORY = 86
_EXIT_BLOCKED = 87
_EXIT_EXCEPTION = 88
PASS_MARKER = "__MFTK_SANDBOX_PASSED__"

_GUARD = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_blocked = []
_DENY = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
         "os.fork", "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "winreg.")
_FS = ("os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree", "os.chmod",
       "os.chown", "os.mkdir", "os.symlink", "os.link", "os.utime")

def _inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True  # an already-open file descriptor
    return os.path.realpath(os.path.join(_root, p)).startswith(_root + os.sep)

def _hook(event, args):
    bad = event.startswith(_DENY)
    if event == "open" and len(args) > 2:
        mode, flags = args[1], args[2] or 0
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        bad = bool(writes) and not _inside(args[0])
    elif event in _FS:
        bad = not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))
    if bad:
        if not _blocked:
            os.write(2, ("mftk sandbox: blocked " + event + "\n").encode())
        _blocked.append(event)
        raise PermissionError("mftk sandbox: " + event + " is not allowed")

_parts = []
for _name in ("solution.py", "tests.py"):
    if os.path.exists(_name):
        with open(_name, encoding="utf-8") as _f:
            _parts.append(compile(_f.read(), _name, "exec"))
_marker = "@MARKER@" + sys.argv[1]
os.remove(sys.argv[0])  # the marker's nonce is not left on disk for the program to read
sys.argv[:] = ["solution.py"]
sys.addaudithook(_hook)
_status = 0
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    for _i, _code in enumerate(_parts):
        try:
            exec(_code, _globals)
        except SystemExit as _e:  # exiting before the tests ran is a failure
            if _i + 1 < len(_parts):
                raise RuntimeError("the program exited before its tests ran") from None
            raise
except MemoryError:
    _status = @MEMORY@
except SystemExit as _e:
    _status = _e.code if isinstance(_e.code, int) else (0 if _e.code is None else 1)
except BaseException as _e:
    import traceback
    traceback.print_exc()
    _status = @MEMORY@ if isinstance(_e, MemoryError) else @EXC@
if _blocked:
    _status = @BLOCKED@
if _status == 0:
    sys.stdout.write("\n" + _marker + "\n")
    sys.stdout.flush()
os._exit(_status)
"""
for _k, _v in (
    ("@MEMORY@", _EXIT_MEMORY),
    ("@EXC@", _EXIT_EXCEPTION),
    ("@BLOCKED@", _EXIT_BLOCKED),
):
    _GUARD = _GUARD.replace(_k, str(_v))
_GUARD = _GUARD.replace("@MARKER@", PASS_MARKER)


@dataclass
class SandboxResult:
    """One run. status: passed | failed (assertion/exception/nonzero exit) | timeout | memory |
    blocked (a refused operation, see the module docstring)."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_mb: int, cpu_seconds: int, file_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        fsize = file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(
    code: str,
    tests: str | None = None,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    file_mb: int = 16,
    python: str | None = None,
    max_output: int = 4096,
) -> SandboxResult:
    """Run `code` (a Python program, e.g. prompt + completion), then `tests` (unit tests, e.g.
    asserts) in the same namespace, in a sandboxed child.

    It passes when the tests run to the end (or, without tests, the program exits 0) with no
    refused operation; a program that exits before its tests ran fails.
    timeout: wall seconds (the cpu limit is the same, rounded up); memory_mb: address-space limit
    (the interpreter itself needs ~30 MB); file_mb: largest file the program may write;
    stdout/stderr are truncated to their last max_output chars.
    """
    if not isinstance(code, str):
        raise TypeError(f"code: expected a str, got {type(code).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout: must be > 0, got {timeout}")
    if memory_mb < 64:
        raise ValueError(
            f"memory_mb: must be >= 64 (the interpreter needs ~30 MB), got {memory_mb}"
        )
    with tempfile.TemporaryDirectory(prefix="mftk-sandbox-") as tmp:
        with open(os.path.join(tmp, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if tests is not None:
            with open(os.path.join(tmp, "tests.py"), "w", encoding="utf-8") as f:
                f.write(tests)
        with open(os.path.join(tmp, "_guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD)
        nonce = secrets.token_hex(8)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [python or sys.executable, "-I", "-B", "_guard.py", nonce],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills everything it made
            preexec_fn=_limits(memory_mb, max(1, int(timeout + 0.999)), file_mb),
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - t0
    out_s = out.decode("utf-8", "replace")
    err_s = err.decode("utf-8", "replace")
    rc = proc.returncode
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= timeout * 0.9:
        status = "timeout"
    elif rc == _EXIT_BLOCKED:
        status = "blocked"
    elif rc == _EXIT_MEMORY or "MemoryError" in err_s:
        status = "memory"
    elif rc == 0 and PASS_MARKER + nonce in out_s:
        status = "passed"
    else:
        status = "failed"
    out_s = out_s.replace(PASS_MARKER + nonce, "").strip()
    return SandboxResult(status, rc, seconds, out_s[-max_output:], err_s[-max_output:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
