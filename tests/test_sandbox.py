"""mftk.apps.sandbox: generated code runs in a limited child; loops, memory hogs, sockets, processes and
writes outside its temp dir are stopped and count as failures; a correct solution passes."""

import os
import uuid

import pytest

from mftk.apps.sandbox import run_program

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
