"""Run untrusted generated Python for execution-checked evals, under a verdict it cannot reach.

    res = run_program(prompt + completion, tests, timeout=5.0, memory_mb=512)
    res.passed, res.status   # True/False; "passed" | "failed" | "timeout" | "memory" | "blocked"

Three processes. This module starts the supervisor (_sandbox_supervisor.py) with a clean
environment. The supervisor draws a random token and starts the runner (_sandbox_runner.py) with
the token, the program and its tests on a pipe; the tests never touch the disk. The runner runs
the program, then the tests in the same namespace, in a worker thread, under two audit hooks: a
policy hook (below), and a verdict hook that alone holds the token and writes it to a private pipe
only when the statement appended to the tests runs, in the tests' own frame, called from the
runner's frame (_sandbox_runner.py says why the program cannot reach the token). "passed" means
the supervisor read the token and the runner exited 0: nothing printed, no exit code, no
SystemExit or os._exit of the program's, and no rebinding of a name it can see produces it.
"memory" means the runner died of a MemoryError, whatever stderr says.

Isolation (`detect_isolation()` says which; found once per process by running a trivial program):
- "namespaces" (`unshare`: new user, network, PID and mount namespaces): no network (a loopback
  that is down); the supervisor is the PID namespace's init, so the timeout's kill and the
  end of a run take every process the run made; the file system is read-only but for fresh,
  small tmpfs on /tmp, /var/tmp, /run and /dev/shm; /proc shows only the run's processes.
- "none" (unprivileged namespaces refused, e.g. some containers): the supervisor is a child
  subreaper and sweeps every descendant; seccomp also refuses new processes (threads are fine)
  and mknod.
In both: the runner has no capabilities (bounding set emptied, SECBIT_NOROOT, no_new_privs); a
seccomp filter refuses ptrace, process_vm_*, pidfd_*, kcmp, bpf, perf_event_open, userfaultfd,
keyrings, unshare/setns, io_uring and sockets; rlimits AS (memory_mb), CPU (the timeout), FSIZE
(file_mb), NOFILE (128), NPROC (64 tasks in the namespace), CORE 0. The supervisor is
non-dumpable, so the runner can read neither its memory, fds nor environment, nor ptrace it, and
its own environment holds PATH, HOME, TMPDIR and LANG only. The audit hook refuses sockets,
processes, signals, ctypes, writes outside the run's directory (dir_fd resolved, sqlite ATTACH
off), opening /proc/<pid>/, gc's object walks and tracing; a refusal ends the run as "blocked".
stdout and stderr are read as they stream, keeping the last max_output characters of each.

What it does NOT protect against:
- Wrong code that passes weak tests, or code built to fool them: an object whose __eq__ says True,
  or a function that reads the expected values from the tests' frame (sys._getframe stays
  allowed: namedtuple, logging and warnings need it). The sandbox checks that the tests ran to
  their end, not that they test enough.
- Exploits of the interpreter or the kernel; C extensions that do I/O without audit events (in
  "none" mode, e.g. dbm or readline writing a file outside the run's directory).
- Reads: the program may read every file the caller's user may read (the view is read-only, not
  empty). Run as root (as on the machine this was written on) that is every file, and the kernel
  does not enforce RLIMIT_NPROC for uid 0; the PID namespace still bounds the process tree's life.
- In "none" mode the total size written to the run's directory (FSIZE bounds each file only).
Programs that need the main thread fail: the program runs in a worker thread (so that no signal
handler of its can run inside a hook), where signal.signal raises ValueError.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from mftk.apps._sandbox_runner import EXIT_BLOCKED, EXIT_MEMORY

# The stdout marker of the first sandbox. Printing it proves nothing: the verdict never travels
# on stdout. Kept because callers import it.
PASS_MARKER = "__MFTK_SANDBOX_PASSED__"
MODES = ("namespaces", "none")
_HERE = os.path.dirname(os.path.abspath(__file__))
_SUPERVISOR = os.path.join(_HERE, "_sandbox_supervisor.py")
_RUNNER = os.path.join(_HERE, "_sandbox_runner.py")
_UNSHARE_FLAGS = (
    "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount", "--mount-proc",
    "--kill-child",  # if unshare dies, the namespace's init (the supervisor) and all in it die
)  # fmt: skip
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_GRACE = 10.0  # seconds past the timeout before a supervisor that has not reported is killed
_AFTER_REPORT = 1.0  # seconds the output may still trickle in after the report


@dataclass
class SandboxResult:
    """One run. status: passed | failed (assertion, exception, any exit before the tests ended) |
    timeout | memory | blocked (a refused operation, see the module docstring).
    isolation: the mode it ran under ("namespaces" or "none")."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def detect_isolation() -> str:
    """The isolation mode: "namespaces" when this machine lets the sandbox run in its own user,
    network, PID and mount namespaces; else "none", with a RuntimeWarning saying why (once)."""
    return _detect(shutil.which("unshare"), sys.executable)


def _detect(unshare: str | None, python: str) -> str:
    reason = "no unshare(1) on PATH"
    if unshare:
        try:
            # a generous timeout: on a loaded machine a cold start can take seconds, and a
            # timeout here would silently drop the kernel isolation
            res = _run("pass", None, 60.0, 256, 4, python, 2000, "namespaces", unshare)
            if res.passed:
                return "namespaces"
            reason = f"a trivial program ended {res.status}: {res.stderr.strip()}"
        except RuntimeError as e:
            reason = str(e)
    warnings.warn(
        f"mftk sandbox: no namespaces ({reason}); falling back to seccomp, rlimits and the "
        "audit hook, without network or file-system isolation from the kernel",
        RuntimeWarning,
        stacklevel=3,
    )
    return "none"


def run_program(
    code: str,
    tests: str | None = None,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    file_mb: int = 16,
    python: str | None = None,
    max_output: int = 4096,
    isolation: str = "auto",
) -> SandboxResult:
    """Run `code` (a Python program, e.g. prompt + completion), then `tests` (unit tests, e.g.
    asserts) in the same namespace, in the sandbox.

    It passes when the tests run to their end (without tests: when the program ends, or exits 0)
    with no refused operation; any exit before that fails.
    timeout: wall seconds (the cpu limit is the same, rounded up); memory_mb: address-space limit
    (the interpreter itself needs ~30 MB); file_mb: largest file the program may write (and the
    size of its tmpfs); stdout/stderr keep their last max_output chars; isolation: "auto"
    (detect_isolation()), "namespaces" or "none". Raises RuntimeError if the sandbox itself
    cannot start.
    """
    if not isinstance(code, str):
        raise TypeError(f"code: expected a str, got {type(code).__name__}")
    if tests is not None and not isinstance(tests, str):
        raise TypeError(f"tests: expected a str or None, got {type(tests).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout: must be > 0, got {timeout}")
    if memory_mb < 64:
        raise ValueError(
            f"memory_mb: must be >= 64 (the interpreter needs ~30 MB), got {memory_mb}"
        )
    mode = detect_isolation() if isolation == "auto" else isolation
    if mode not in MODES:
        raise ValueError(f"isolation: expected 'auto' or one of {MODES}, got {isolation!r}")
    unshare = shutil.which("unshare")
    if mode == "namespaces" and unshare is None:
        raise RuntimeError("isolation='namespaces' needs unshare(1) on PATH")
    python = python or sys.executable
    return _run(code, tests, timeout, memory_mb, file_mb, python, max_output, mode, unshare)


def _run(code, tests, timeout, memory_mb, file_mb, python, max_output, mode, unshare):
    # In the namespaces the supervisor makes the run's directory in its private /tmp.
    tmp = (
        tempfile.TemporaryDirectory(prefix="mftk-sandbox-", ignore_cleanup_errors=True)
        if mode == "none"
        else contextlib.nullcontext(None)
    )
    with tmp as workdir:
        argv = [python, "-I", "-S", "-B", _SUPERVISOR]
        if mode == "namespaces":
            argv = [unshare, *_UNSHARE_FLAGS, "--", *argv]
        report_r, report_w = os.pipe()
        request = {
            "code": code, "tests": tests, "timeout": timeout, "memory_mb": memory_mb,
            "file_mb": file_mb, "mode": mode, "workdir": workdir, "python": python,
            "runner": _RUNNER, "report_fd": report_w,
        }  # fmt: skip
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_ENV,
                cwd="/",
                pass_fds=(report_w,),
                start_new_session=True,  # its own process group, killed whole at the end
            )
        finally:
            os.close(report_w)
        try:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(request).encode())
                proc.stdin.close()
            cap = 4 * max_output + 4  # bytes: a UTF-8 char is at most 4
            deadline = time.monotonic() + timeout + _GRACE
            out, err, report = _collect(proc, report_r, deadline, cap)
        finally:
            os.close(report_r)
            _kill_group(proc)  # before wait(): the group id cannot have been reused yet
            proc.wait()
    err_s = err.decode("utf-8", "replace")
    try:
        rep = json.loads(report)
    except ValueError:
        raise RuntimeError(
            f"mftk sandbox: the supervisor did not report (exit {proc.returncode}): "
            f"{err_s.strip()[-1000:]}"
        ) from None
    if "error" in rep:
        raise RuntimeError(f"mftk sandbox ({mode}): {rep['error']}")
    rc = rep["returncode"]
    if rep["timeout"] or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == EXIT_BLOCKED:
        status = "blocked"
    elif rc == EXIT_MEMORY:
        status = "memory"
    elif rep["token"] and rc == 0:
        status = "passed"
    else:
        status = "failed"
    out_s = out.decode("utf-8", "replace").strip()
    return SandboxResult(status, rc, rep["seconds"], out_s[-max_output:], err_s[-max_output:], mode)


def _collect(proc: subprocess.Popen, report: int, deadline: float, cap: int):
    """(stdout, stderr, report) bytes, read as they stream, each kept to its last `cap` bytes
    (never more than 2 * cap + 64 KiB in memory), until all close or the deadline passes."""
    bufs = {
        proc.stdout.fileno(): bytearray(),
        proc.stderr.fileno(): bytearray(),
        report: bytearray(),
    }
    caps = {fd: cap for fd in bufs} | {report: 1 << 16}
    live = list(bufs)
    reported = None
    while live:
        end = deadline if reported is None else min(deadline, reported + _AFTER_REPORT)
        left = end - time.monotonic()
        if left <= 0:
            break
        for fd in select.select(live, [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                live.remove(fd)
                if fd == report:
                    reported = time.monotonic()
                continue
            buf = bufs[fd]
            buf += chunk
            if len(buf) > 2 * caps[fd]:
                del buf[: -caps[fd]]
    return bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()], bytes(bufs[report])


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
