"""mftk.apps.sandbox: generated code runs in a limited child; loops, memory hogs, sockets,
processes and writes outside its temp dir are stopped and count as failures; a correct solution
passes. Issue 15's probes each have a test below: the verdict is out of the program's reach,
whatever it rebinds, prints, exits with or forks, and the caller's process, memory and environment
are safe from it. The probes run under every isolation mode this machine has (both, where unshare
works)."""

import dis
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import types
import uuid

import pytest

from mftk.apps import _sandbox_runner, sandbox
from mftk.apps.sandbox import detect_isolation, run_program

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_correct_solution_passes():
    res = run_program(SOLUTION, TESTS, timeout=5, memory_mb=256)
    assert res.passed, (res.status, res.stderr)
    assert res.returncode == 0


def test_wrong_solution_fails():
    res = run_program("def add(a, b):\n    return a - b\n", TESTS, timeout=5, memory_mb=256)
    assert res.status == "failed" and not res.passed
    assert "AssertionError" in res.stderr


def test_infinite_loop_times_out():
    res = run_program("def add(a, b):\n    while True:\n        pass\n", TESTS, timeout=1)
    assert res.status == "timeout" and not res.passed
    assert res.seconds < 4


def test_sleep_times_out():  # wall clock, not only cpu time
    res = run_program("import time\ntime.sleep(60)\n" + SOLUTION, TESTS, timeout=1)
    assert res.status == "timeout"


def test_memory_hog_is_stopped():
    hog = "def add(a, b):\n    x = bytearray(1 << 31)\n    return a + b\n"
    res = run_program(hog, TESTS, timeout=5, memory_mb=256)
    assert res.status == "memory" and not res.passed


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.socket()\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
        "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        # caught by the program: still a failure, the attempt is what counts
        "import socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass\n",
    ],
)
def test_socket_is_blocked(code):
    res = run_program(code + SOLUTION, TESTS, timeout=5, memory_mb=256)
    assert res.status == "blocked" and not res.passed, (res.status, res.stderr)
    assert "socket" in res.stderr


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import ctypes\nctypes.CDLL(None)\n",
    ],
)
def test_processes_and_ctypes_are_blocked(code):
    assert run_program(code + SOLUTION, TESTS, timeout=5, memory_mb=256).status == "blocked"


def test_writes_only_inside_its_temp_dir(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}"
    res = run_program(f"open({str(target)!r}, 'w').write('x')\n" + SOLUTION, TESTS, timeout=5)
    assert res.status == "blocked" and not target.exists()
    fd_write = f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n"
    assert run_program(fd_write + SOLUTION, TESTS, timeout=5).status == "blocked"
    assert not target.exists()
    inside = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    res = run_program(inside + "import os\nprint(os.getcwd())\n" + SOLUTION, TESTS, timeout=5)
    assert res.passed, res.stderr
    assert os.path.basename(res.stdout).startswith("mftk-sandbox-")  # its own temp dir
    assert not os.path.exists(res.stdout)  # removed afterwards


def test_exit_before_tests_fails():
    for early in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        res = run_program(early + SOLUTION, TESTS, timeout=5)
        assert res.status == "failed", (early, res.status)


def test_marker_cannot_be_forged():
    from mftk.apps.sandbox import PASS_MARKER

    # flush: an unflushed print is lost at os._exit and the forgery would never reach the parent
    for forged in (PASS_MARKER, PASS_MARKER + "0" * 16):
        code = f"print({forged!r}, flush=True)\nimport os\nos._exit(0)\n"
        res = run_program(code, TESTS, timeout=5)
        assert res.returncode == 0 and forged in res.stdout, "the forged marker reached stdout"
        assert res.status == "failed", (forged, res.status)


def test_bad_arguments():
    with pytest.raises(TypeError, match="code"):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=1)
    with pytest.raises(ValueError, match="isolation"):
        run_program("pass", isolation="chroot")
    with pytest.raises(TypeError, match="tests"):
        run_program("pass", b"assert True")


# ---- issue 15: the probes, under each isolation mode this machine has ----------------------------

MODES = ["namespaces", "none"] if detect_isolation() == "namespaces" else ["none"]
WRONG = "def add(a, b):\n    return a - b\n"


def _run(code, tests=TESTS, mode="none", **kw):
    kw.setdefault("timeout", 5)
    return run_program(code, tests, isolation=mode, **kw)


# The first guard kept its state in the program's own globals (_DENY, _FS, _blocked, _parts,
# _marker); these rebind those names and every global of every frame up the stack.
REBIND = """\
import sys
_DENY = (); _FS = (); _blocked = []
f = sys._getframe()
while f is not None:
    for k in list(f.f_globals):
        if k.startswith('_') and not k.startswith('__'):
            f.f_globals[k] = () if isinstance(f.f_globals[k], tuple) else None
    f = f.f_back
"""


@pytest.mark.parametrize("mode", MODES)
def test_guard_state_is_out_of_reach(mode, tmp_path):
    target = tmp_path / "escape"
    for after in (
        "import socket\nsocket.socket()\n",
        "import os\nos.fork()\n",
        f"open({str(target)!r}, 'w').write('x')\n",
    ):
        res = _run(REBIND + after + SOLUTION, mode=mode)
        assert res.status == "blocked", (after, res.status, res.stderr)
    assert not target.exists()


TAMPER = """\
import os, sys
print(sorted(os.listdir('.')))
try:
    _parts[-1] = compile('', 'tests.py', 'exec')
except NameError:
    pass
f = sys._getframe()
while f is not None:
    for k, v in list(f.f_locals.items()) + list(f.f_globals.items()):
        if isinstance(v, types.CodeType) and v.co_filename == 'tests.py':
            f.f_globals[k] = compile('', 'tests.py', 'exec')
    f = f.f_back
"""


@pytest.mark.parametrize("mode", MODES)
def test_tests_cannot_be_replaced_or_read_from_disk(mode):
    res = _run("import types\n" + TAMPER + WRONG, mode=mode)
    assert res.status == "failed" and "AssertionError" in res.stderr, (res.status, res.stderr)
    assert res.stdout == "[]"  # an empty directory: the tests travel on a pipe


# Every short string any frame can see, written to every fd, then a clean exit: the old marker
# (and its nonce, in the old guard's globals) or anything else found cannot make a pass.
FORGE = """\
import os, sys
seen = set()
f = sys._getframe()
while f is not None:
    for v in list(f.f_globals.values()) + list(f.f_locals.values()):
        if isinstance(v, (str, bytes, bytearray)) and 0 < len(v) < 200:
            seen.add(v.encode() if isinstance(v, str) else bytes(v))
    f = f.f_back
for fd in range(1, 64):
    for v in seen:
        try:
            os.write(fd, v + b'\\n')
        except OSError:
            pass
os._exit(0)
"""


@pytest.mark.parametrize("mode", MODES)
def test_printed_marker_and_exit_do_not_pass(mode):
    res = _run(FORGE + SOLUTION, mode=mode)
    assert res.status == "failed" and res.returncode == 0, (res.status, res.stderr)


@pytest.mark.parametrize(
    "body",
    ["raise SystemExit(0)", "raise SystemExit", "exit()", "quit()", "sys.exit()", "os._exit(0)"],
)
def test_exit_when_the_tests_call_the_solution_fails(body):
    code = f"import os, sys\ndef add(a, b):\n    {body}\n"
    res = _run(code)
    assert res.status == "failed" and not res.passed, (body, res.status, res.stderr)


def test_without_tests_a_clean_exit_passes_and_os_exit_does_not():
    assert _run("import sys\nprint('hi')\nsys.exit(0)\n", None).passed
    assert _run("print('hi')\n", None).passed
    assert _run("import sys\nsys.exit(1)\n", None).status == "failed"
    assert _run("import os\nos._exit(0)\n", None).status == "failed"


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


def test_the_hooks_read_nothing_the_program_can_rebind():
    # Each hook reads only its arguments and defaults: no global, builtin or closure lookup that a
    # program could redirect, no nested function whose cells it could fill.
    hooks = [
        _sandbox_runner._make_policy("/tmp"),
        _sandbox_runner._make_verdict(bytearray(16), sys._getframe(), 1),
    ]
    lookups = {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF", "COPY_FREE_VARS"}
    mutable = (list, dict, set)
    for hook in hooks:
        ops = {i.opname for i in dis.get_instructions(hook)}
        assert not ops & lookups, (hook.__name__, ops & lookups)
        assert hook.__closure__ is None
        assert not any(isinstance(c, types.CodeType) for c in hook.__code__.co_consts)
        assert not any(isinstance(d, mutable) for d in hook.__defaults__), hook.__name__


# Attacks written against this sandbox's own design; with tests that fail, any pass is a forgery.
ATTACKS = {
    # at the recursion limit an audit hook raises RecursionError; its frame rides in the traceback
    "recursion": """\
import sys, os
found = []
def deep(n):
    try:
        deep(n + 1)
    except RecursionError:
        pass
    for event in (lambda: open('probe', 'w').close(), lambda: sys.audit('mftk_sandbox_done', 0)):
        try:
            event()
        except RecursionError as e:
            try:
                tb = e.__traceback__
                while tb is not None:
                    for v in tb.tb_frame.f_locals.values():
                        if isinstance(v, bytearray) and len(v) == 16:
                            found.append(bytes(v))
                    tb = tb.tb_next
            except RecursionError:
                pass
        except BaseException:
            pass
deep(0)
for tok in found:
    os.write(3, tok)
os._exit(0)
""",
    # a finalizer run by the garbage collector inside a hook walks up to the hook's frame
    "finalizer": """\
import gc, sys, os
class Bomb:
    def __del__(self):
        f = sys._getframe(1)
        while f is not None:
            for v in f.f_locals.values():
                if isinstance(v, bytearray) and len(v) == 16:
                    os.write(3, bytes(v)); os._exit(0)
            f = f.f_back
gc.set_threshold(1)
for i in range(20):
    for _ in range(50):
        a, b = Bomb(), Bomb(); a.o, b.o = b, a
    open('probe', 'w').close()
""",
    # the end-of-tests event, raised with the tests' own frame, from a function the tests call
    "callee": "import sys\ndef add(a, b):\n    sys.audit('mftk_sandbox_done', sys._getframe(1))\n",
    # ... with every frame on the stack while a traceback of the program's is being printed
    "print_exc": """\
import sys
class E(Exception):
    def __str__(self):
        f = sys._getframe()
        while f is not None:
            sys.audit('mftk_sandbox_done', f)
            f = f.f_back
        return 'x'
raise E()
""",
    # the runner's own names: the one that calls the tests, exec, the hooks' tables
    "runner_globals": REBIND.replace(
        "() if isinstance", "(lambda *a: None) if callable(f.f_globals[k]) else () if isinstance"
    ),
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_forged_verdicts_fail(mode, attack):
    res = _run(ATTACKS[attack] + SOLUTION, "assert add(2, 3) == 5\nassert False\n", mode=mode)
    assert not res.passed, (attack, res.status, res.stdout, res.stderr)
