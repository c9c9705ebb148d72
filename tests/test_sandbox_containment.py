"""Issue 15's probes of mftk.apps.sandbox that keep the caller safe, one test each: no write outside
the temp dir through dir_fd or sqlite, the caller survives a pidfd kill, a child that escaped the
session dies with the run (and the fallback sweep kills orphans), output is capped while it streams,
the rlimits are set, the caller's environment is out of reach, a memory status needs a real cause,
isolation is detected either way and namespaces isolate the run. The probes run under every
isolation mode this machine has (both, where unshare works)."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest
from test_sandbox import MODES, SOLUTION, _run

from mftk.apps import _sandbox_runner, sandbox
from mftk.apps.sandbox import detect_isolation


@pytest.mark.parametrize("mode", MODES)
def test_dir_fd_and_sqlite_cannot_write_outside(mode, tmp_path):
    target = tmp_path / "escape"
    probes = {
        "dir_fd": f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.close(os.open('escape', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n",
        "sqlite": f"import sqlite3\nc = sqlite3.connect({str(target)!r})\n"
        "c.execute('create table t (x)')\n",
        "attach": "import sqlite3\nc = sqlite3.connect(':memory:')\n"
        f"c.execute(\"attach database '{target}' as e\")\nc.execute('create table e.t (x)')\n",
    }
    for name, probe in probes.items():
        res = _run(probe + SOLUTION, mode=mode)
        assert not res.passed and not target.exists(), (name, res.status, res.stderr)
        # without namespaces only the hook stands in the way; with them the path is not even there
        assert res.status == "blocked" or mode == "namespaces" or name == "attach", name


def _forked(fn) -> int:
    """fn() in a forked copy of this process (the probe may kill its caller); its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(fn())
        finally:
            os._exit(99)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("mode", MODES)
def test_the_caller_survives_a_pidfd_kill(mode):
    probe = "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n"
    status = _forked(lambda: 0 if not _run(probe + SOLUTION, mode=mode).passed else 1)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the caller ended: {status}"


# A child that escapes the session (setsid) and holds stdout: _posixsubprocess has no audit event.
ESCAPE = """\
import os, _posixsubprocess
r, w = os.pipe()
args = ([b'/bin/sleep', b'{secs}'], [b'/bin/sleep'], True, (w,), None, None,
        -1, -1, -1, -1, -1, -1, r, w, False, True, -1, None, None, None, -1, None)
try:
    pid = _posixsubprocess.fork_exec(*args, False)  # 3.11.7+: allow_vfork
except TypeError:
    pid = _posixsubprocess.fork_exec(*args)
print('forked', pid, flush=True)
"""


def _sleepers(secs: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if secs.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("then", ["loop", "pass"])
def test_an_escaped_child_dies_with_the_run(mode, then):
    secs = f"30.{secrets.randbelow(10**6):06d}"
    code = ESCAPE.replace("{secs}", secs)
    code += "while True:\n    pass\n" if then == "loop" else SOLUTION
    t0 = time.monotonic()
    try:
        res = _run(code, mode=mode, timeout=1 if then == "loop" else 5)
        elapsed = time.monotonic() - t0
        assert elapsed < 8, f"run_program waited {elapsed:.1f}s for the escaped child"
        assert not _sleepers(secs), "the escaped child outlived the run"
        if mode == "namespaces":  # forks are allowed there: the PID namespace holds them
            assert "forked" in res.stdout, res.stderr
            assert res.status == ("timeout" if then == "loop" else "passed"), res.stderr
        else:  # without it, seccomp refuses new processes
            assert "forked" not in res.stdout and res.status == "failed", res.stderr
    finally:
        for pid in _sleepers(secs):
            os.kill(int(pid), signal.SIGKILL)


SWEEP = """\
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import _sandbox_supervisor as s
s._prctl(s.PR_SET_CHILD_SUBREAPER, 1)
# a child that starts a sleep in a session of its own and exits: the orphan comes back to us
grandchild = "import subprocess as p, sys; p.Popen(['sleep', sys.argv[1]], start_new_session=True)"
subprocess.run([sys.executable, '-c', grandchild, sys.argv[2]], check=True)
if sys.argv[3] == 'scan':  # a kernel without /proc/<pid>/task/<tid>/children
    def no_children(path, *args, _open=open):
        if path.endswith('/children'):
            raise FileNotFoundError(path)
        return _open(path, *args)
    s.open = no_children
for _ in range(100):
    if s._children():
        break
    time.sleep(0.02)
assert s._children(), 'the orphan was not adopted'
s._sweep(False)
assert not s._children()
"""


@pytest.mark.parametrize("listing", ["children", "scan"])
def test_the_fallback_sweep_kills_orphans_that_left_the_session(listing):
    # Without a PID namespace the supervisor is a child subreaper: what the run leaves comes back
    # to it, and _sweep kills it, found through /proc/<pid>/task/<tid>/children or every ppid.
    secs = f"30.{secrets.randbelow(10**6):06d}"
    apps = os.path.dirname(os.path.abspath(sandbox.__file__))
    try:
        subprocess.run([sys.executable, "-c", SWEEP, apps, secs, listing], check=True, timeout=30)
        assert not _sleepers(secs), "the orphan outlived the sweep"
    finally:
        for pid in _sleepers(secs):
            os.kill(int(pid), signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
def test_output_is_capped_while_it_streams(mode):
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(64):\n    sys.stdout.write(chunk)\n"
    tracemalloc.start()
    try:
        res = _run(code + SOLUTION, mode=mode, timeout=30, max_output=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.passed, res.stderr
    assert res.stdout == "x" * 1000
    assert peak < 8 << 20, f"the caller held {peak / 2**20:.0f} MiB for 64 MiB of output"


@pytest.mark.parametrize("mode", MODES)
def test_rlimits_are_set(mode):
    names = ["AS", "CPU", "FSIZE", "NOFILE", "NPROC", "CORE"]
    code = (
        "import json, resource\n"
        f"lim = {{n: resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) for n in {names}}}\n"
        "print(json.dumps(lim))\n"
    )
    res = _run(code + SOLUTION, mode=mode, timeout=3, memory_mb=200, file_mb=5)
    assert res.passed, res.stderr
    lim = {k: tuple(v) for k, v in json.loads(res.stdout).items()}
    assert lim["AS"] == (200 << 20, 200 << 20)
    assert lim["CPU"] == (3, 4)
    assert lim["FSIZE"] == (5 << 20, 5 << 20)
    assert lim["NOFILE"] == (128, 128)
    assert lim["CORE"] == (0, 0)
    nproc = lim["NPROC"]
    assert nproc[0] == nproc[1] and 0 < nproc[0] < (1 << 20), nproc
    if mode == "namespaces":
        assert nproc == (64, 64)


WALK = """\
import os
print(sorted(os.environ))
pid, out = os.getppid(), []
while pid > 0:
    for name in ('environ', 'cmdline'):
        try:
            out.append(open(f'/proc/{pid}/{name}', 'rb').read())
        except Exception as e:
            out.append(repr(e).encode())
    try:
        pid = int(open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[1])
    except Exception:
        break
print(b'\\0'.join(out))
"""


@pytest.mark.parametrize("mode", MODES)
def test_the_callers_environment_is_out_of_reach(mode):
    with open("/proc/self/environ", "rb") as f:
        mine = [e for e in f.read().split(b"\0") if e]
    env = _run("import os\nprint(sorted(os.environ))\n", None, mode=mode)
    assert env.passed and env.stdout == str(["HOME", "LANG", "PATH", "TMPDIR"]), env.stdout
    res = _run(WALK, None, mode=mode)
    shown = (res.stdout + res.stderr).encode()
    leaked = [e for e in mine if e.split(b"=", 1)[0] not in (b"PATH", b"LANG") and e in shown]
    assert not leaked, f"{len(leaked)} of the caller's variables leaked, e.g. {leaked[0][:40]!r}"


def test_memory_status_needs_a_real_cause():
    res = _run("import sys\nsys.stderr.write('MemoryError\\n')\n" + SOLUTION)
    assert res.passed, (res.status, res.stderr)
    assert _run("def add(a, b):\n    raise MemoryError\n").status == "memory"


def test_isolation_is_detected_either_way():
    unshare = shutil.which("unshare")
    raw = unshare is not None and (
        subprocess.run([unshare, "-Urnpf", "--mount-proc", "true"], capture_output=True).returncode
        == 0
    )
    assert detect_isolation() == ("namespaces" if raw else "none")
    for broken in (None, shutil.which("false")):  # no unshare; one that always fails
        with pytest.warns(RuntimeWarning, match="no namespaces"):
            assert sandbox._detect(broken, sys.executable) == "none"
    res = _run(SOLUTION, mode="none")
    assert res.passed and res.isolation == "none"


@pytest.mark.skipif(detect_isolation() != "namespaces", reason="no user namespaces here")
def test_namespaces_isolate_the_run():
    # a path the run sees read-only wherever the checkout lives (under /tmp only the runner's
    # folder and the interpreter are put back into the private /tmp)
    fifo = os.path.join(os.path.dirname(_sandbox_runner.__file__), f"fifo-{uuid.uuid4().hex}")
    code = (
        "import json, os\n"
        "ns = {n: os.readlink('/proc/self/ns/' + n) for n in ('net', 'pid', 'mnt', 'user')}\n"
        "caps = 'none'\ntry:\n    os.setgroups([])\n    caps = 'kept'\nexcept PermissionError:\n"
        "    pass\n"
        f"ro = 'written'\ntry:\n    os.mkfifo({fifo!r})\nexcept OSError as e:\n    ro = e.errno\n"
        "procs = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "print(json.dumps(dict(ns=ns, caps=caps, ro=ro, pid=os.getpid(), procs=procs)))\n"
    )
    try:
        res = _run(code + SOLUTION, mode="namespaces")
    finally:
        if os.path.exists(fifo):
            os.remove(fifo)
    assert res.passed, res.stderr
    out = json.loads(res.stdout)
    for name, link in out["ns"].items():
        assert link != os.readlink(f"/proc/self/ns/{name}"), f"the run shares the {name} namespace"
    assert out["caps"] == "none" and out["ro"] == 30  # EROFS: the view outside /tmp is read-only
    assert out["pid"] <= 3 and os.getpid() not in out["procs"] and max(out["procs"]) <= 3
