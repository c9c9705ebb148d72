"""mftk.apps.sandbox: generated code runs in a limited child; loops, memory hogs, sockets,
processes and writes outside its temp dir are stopped and count as failures; a correct solution
passes. Issue 15's probes of the verdict each have a test below: it is out of the program's
reach, whatever it rebinds, prints, exits with or forges. The probes run under every isolation mode
this machine has (both, where unshare works). The probes that the caller's process, memory and
environment are safe from the program are in test_sandbox_containment.py."""

import dis
import os
import sys
import types
import uuid

import pytest

from mftk.apps import _sandbox_runner
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
