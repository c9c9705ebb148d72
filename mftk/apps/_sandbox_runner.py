"""The sandbox's runner: the process that runs the program and its tests (see mftk.apps.sandbox).

    python -I -B -u _sandbox_runner.py  # fd 0: 16 token bytes, {"code", "tests"}; fd 3: verdict

It runs the program, then the tests in the same namespace, under two audit hooks. The verdict
hook alone holds the token. It writes it to fd 3, and ends the process, when the statement
appended to the tests raises its event with the tests' own frame: that frame must be on the
appended line (numbered past every line of the program), called through _run_tests from the
worker's frame. Exiting before that (SystemExit, exit(), os._exit) leaves no token: a failure.
The policy hook refuses what the module docstring of mftk.apps.sandbox lists, and a refusal
ends the process (exit 87).

Why the program cannot reach the token:
- Neither hook reads a global, a builtin or a closure: only its arguments and default values
  (tests/test_sandbox.py checks the bytecode). A frame of the policy hook that leaks (in a
  RecursionError or MemoryError, or to a finalizer run by the garbage collector inside it) can be
  read, but no change to it alters what the hook does; and it holds no secret.
- The verdict hook's frame never leaks: it makes no call and no allocation before it turns the
  garbage collector off, raises no audit event, and lets no exception out.
- Python runs signal handlers only in the main thread. The program runs in a worker thread; the
  main thread waits in C with SIGINT ignored, so no handler of the program's ever runs.
- The objects that could lead to the hooks are refused: gc's object walks, sys._current_frames,
  tracing and profiling, ctypes, subinterpreters, /proc/<pid>/ (its mem), new audit hooks.
"""

from __future__ import annotations

import _thread
import builtins
import gc
import json
import linecache
import os
import signal
import stat
import sys
import traceback
import types

try:
    import sqlite3
except ImportError:  # a Python built without sqlite
    sqlite3 = None

EXIT_MEMORY = 86
EXIT_BLOCKED = 87
EXIT_EXCEPTION = 88
DONE_EVENT = "mftk_sandbox_done"
_DONE_STMT = f"__import__('sys').audit({DONE_EVENT!r}, __import__('sys')._getframe())"

# Refused outright: process creation, signals, sockets, raw memory, other interpreters (they have
# no hooks), and what leads to the hooks' objects or frames (gc walks, tracing, other threads).
_DENY = (
    "socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "winreg.", "os.symlink", "os.link",
    "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_",
    "sys.monitoring", "cpython.PyInterpreterState_New", "_xxsubinterpreters.",
)  # fmt: skip
_DENY_IMPORTS = ("_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels")
# Events that change the file system: (index of a path argument, of its dir_fd or -1), ...
_FS = types.MappingProxyType({
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, -1),),
    "os.rename": ((0, 2), (1, 3)), "os.setxattr": ((0, -1),), "os.removexattr": ((0, -1),),
    "os.chflags": ((0, -1),), "os.chdir": ((0, -1),), "sqlite3.connect": ((0, -1),),
})  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DIR_FLAGS = os.O_DIRECTORY | getattr(os, "O_PATH", 0)
_WRITABLE = ("/dev/null",)  # outside the run's directory, the only file a program may write
_ATTACHED = getattr(sqlite3, "SQLITE_LIMIT_ATTACHED", None)  # Python 3.11+
_SETLIMIT = None if _ATTACHED is None else sqlite3.Connection.setlimit
_AT_FDCWD = getattr(os, "AT_FDCWD", -100)


def _make_verdict(token, worker, line):
    """The verdict hook: the token goes out only for the tests' own frame on its closing line."""

    def verdict(event, args, _done=DONE_EVENT, _token=token, _worker=worker, _line=line,
                _frame=types.FrameType, _type=type, _len=len, _gc_off=gc.disable,
                _write=os.write, _exit=os._exit, _blocked=EXIT_BLOCKED,
                _any=BaseException):  # fmt: skip
        # Everything inside the try, even the comparison: at the recursion limit it raises, and
        # an exception leaving here would carry this frame, and the token, to the program.
        try:
            if event != _done:  # C made `event` from a char *: an exact str, no program __eq__
                return
            _gc_off()  # no finalizer of the program's may run in here; only a C call before this
            f = args[0] if _len(args) == 1 else None
            if _type(f) is _frame and f.f_lineno == _line and f.f_back.f_back is _worker:
                _write(3, _token)
                _exit(0)  # nothing of the program's runs after its verdict
            _write(2, b"mftk sandbox: blocked a forged end of the tests\n")
            _exit(_blocked)
        except _any:
            pass

    return verdict


def _make_policy(root):
    """The policy hook: exit 87 on a refused event (see mftk.apps.sandbox), else nothing."""

    def policy(event, args, _root=root, _deny=_DENY, _imports=_DENY_IMPORTS, _fs=_FS,
               _write_flags=_WRITE_FLAGS, _dir_flags=_DIR_FLAGS, _writable=_WRITABLE,
               _setlimit=_SETLIMIT, _attached=_ATTACHED, _at_fdcwd=_AT_FDCWD, _type=type,
               _str=str, _bytes=bytes, _int=int, _len=len, _reversed=reversed, _stat=os.stat,
               _lstat=os.lstat, _readlink=os.readlink, _getcwd=os.getcwd, _islnk=stat.S_ISLNK,
               _isdir=stat.S_ISDIR, _write=os.write, _exit=os._exit, _oserror=OSError,
               _blocked=EXIT_BLOCKED):  # fmt: skip
        if _type(event) is not _str:  # a str subclass's __eq__ would be the program's code
            event = "an event that is not a str"
            bad, checks = True, ()
        else:
            bad, checks = event.startswith(_deny), ()
        if bad:
            pass
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is _int:
                return  # an open file descriptor
            writes = _type(mode) is _str and (
                "w" in mode or "a" in mode or "x" in mode or "+" in mode
            )
            # "w": must be inside; "r": must not be /proc/<pid>/; "d": not a directory outside
            # (os.open's dir_fd is not in the event, so no directory fd may point outside)
            kind = "r"
            if writes or flags & _write_flags:
                kind = "w"
            elif mode is None or flags & _dir_flags:
                kind = "d"
            checks = ((path, _at_fdcwd, kind),)
        elif event == "import":
            bad = args[0] in _imports
        elif event == "sqlite3.connect/handle":
            bad = _setlimit is None
            if not bad:
                _setlimit(args[0], _attached, 0)  # ATTACH opens files without an audit event
        elif event in _fs:
            for p, d in _fs[event]:  # a loop, not a comprehension: that would be a closure
                checks += (
                    (args[p], _at_fdcwd if d < 0 or args[d] in (None, -1) else args[d], "w"),
                )
        for path, dir_fd, kind in checks:
            if _type(path) is _int:
                continue
            if _type(path) is _bytes:
                path = path.decode("utf-8", "surrogateescape")
            elif _type(path) is not _str:  # a PathLike's __fspath__ would be the program's code
                bad = True
                break
            if kind == "w" and event == "sqlite3.connect":
                path = path[5:].split("?")[0] if path.startswith("file:") else path
                if path in ("", ":memory:"):
                    continue
            # the real path, symlinks followed, as the kernel would open it
            if path[:1] == "/":
                base = ""
            elif dir_fd == _at_fdcwd:
                base = _getcwd()
            else:
                base = _readlink("/proc/self/fd/" + _str(dir_fd))
            todo, real, hops = (base + "/" + path).split("/"), "", 0
            todo.reverse()
            while todo:
                name = todo.pop()
                if name == "" or name == ".":
                    continue
                if name == "..":
                    real = real[: real.rfind("/")]
                    continue
                try:
                    link = _islnk(_lstat(real + "/" + name).st_mode)
                except _oserror:
                    link = False  # not there (yet): the rest is read as written
                if not link:
                    real = real + "/" + name
                    continue
                hops += 1
                if hops > 40:
                    break  # ELOOP: the kernel opens nothing
                target = _readlink(real + "/" + name)
                real = "" if target[:1] == "/" else real
                todo.extend(_reversed(target.split("/")))
            real = real or "/"
            inside = real == _root or real.startswith(_root + "/")
            if kind == "w":
                # a relative path that climbs above its start may be relative to a dir_fd
                depth, climbs = 0, False
                for name in path.split("/") if path[:1] != "/" else ():
                    depth += -1 if name == ".." else 0 if name == "" or name == "." else 1
                    climbs = climbs or depth < 0
                bad = real not in _writable and (not inside or climbs)
            elif kind == "r" or kind == "d":
                parts = real.split("/")
                bad = (
                    _len(parts) > 2
                    and parts[1] == "proc"
                    and (parts[2] == "self" or parts[2] == "thread-self" or parts[2].isdigit())
                )  # /proc/self/mem holds the token; other processes are not its business
                if kind == "d" and not bad and not inside:
                    try:
                        bad = _isdir(_stat(real).st_mode)
                    except _oserror:
                        pass
            if bad:
                break
        if bad:
            _write(2, b"mftk sandbox: blocked " + event.encode("utf-8", "replace") + b"\n")
            _exit(_blocked)

    return policy


def _prepare():
    """Read the payload from fd 0 (then /dev/null) and compile it. The closing statement goes
    on a line past every line of the program's, so no frame of the program's is ever on it."""
    token = bytearray(16)  # read straight into the buffer the hook keeps: no other copy exists
    got = 0
    while got < len(token):
        n = os.readv(0, [memoryview(token)[got:]])
        if n == 0:
            raise EOFError("the payload ended inside the token")
        got += n
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    payload = json.loads(b"".join(chunks))
    code_src, tests_src = payload["code"], payload["tests"] or ""
    line = max(code_src.count("\n"), tests_src.count("\n")) + 2
    padding = "\n" * (line - tests_src.count("\n") - 1)
    tests = compile(tests_src + padding + _DONE_STMT + "\n", "tests.py", "exec")
    code = compile(code_src, "solution.py", "exec")
    linecache.cache["solution.py"] = (len(code_src), None, code_src.splitlines(True), "solution.py")
    return token, code, tests, tests_src, line, payload["tests"] is not None


def _run_tests(run, tests, namespace):
    run(tests, namespace)  # the one frame the tests' own frame may be called from


def _work(token, code, tests, tests_src, line, has_tests):
    # Locals, not module names: the program can rebind this module's globals, not this frame's.
    run, run_tests, exit_now, print_exc = exec, _run_tests, os._exit, traceback.print_exc
    module = types.ModuleType("__main__")
    try:
        sys.addaudithook(_make_verdict(token, sys._getframe(), line))
        sys.addaudithook(_make_policy(os.path.realpath(os.getcwd())))
    except BaseException:
        print_exc()
        exit_now(EXIT_EXCEPTION)
    del token  # from here on only the verdict hook's defaults hold it
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv[:] = ["solution.py"]
    try:
        try:
            run(code, module.__dict__)
        except SystemExit as e:  # without tests, a program that exits 0 has run to its end
            if has_tests or type(e) is not SystemExit or e.code not in (0, None):
                raise
        run_tests(run, tests, module.__dict__)
    except MemoryError:
        exit_now(EXIT_MEMORY)
    except SystemExit:
        os.write(2, b"mftk sandbox: the program exited before its tests finished\n")
    except BaseException:
        # the tests failed, so showing their source can no longer help the program
        lines = tests_src.splitlines(True)
        linecache.cache["tests.py"] = (len(tests_src), None, lines, "tests.py")
        print_exc()
    exit_now(EXIT_EXCEPTION)  # the tests did not reach their closing statement


def main() -> None:
    try:
        token, code, tests, tests_src, line, has_tests = _prepare()
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_EXCEPTION)
    # The only Python-level handler; the worker thread cannot install any (main thread only).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _thread.start_new_thread(_work, (token, code, tests, tests_src, line, has_tests))
    del token
    # Waits in C for good (a pipe could be written to, or closed, by the program): the worker
    # ends the process.
    forever = _thread.allocate_lock()
    forever.acquire()
    while True:
        forever.acquire()


if __name__ == "__main__":
    main()
