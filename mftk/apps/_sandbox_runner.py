"""The sandbox's runner: the process that runs the program and its tests (see mftk.apps.sandbox).

    python -I -B -u _sandbox_runner.py  # fd 0: 16 token bytes, {"code", "tests"}; fd 3: verdict

It installs an audit hook, runs the code, then the tests in the same namespace. Only the hook can
say "passed": when the statement appended to the tests runs in the tests' own frame, called from
this runner's frame, on the line where it was appended, the hook writes the token to fd 3 and ends
the process. Exiting before that (SystemExit, exit(), os._exit) leaves no token, so it fails.

The token lives only in the hook's sealed globals: a private dict that holds the functions the
hook calls, captured before the program ran. The program cannot reach that dict (gc's object
walks are refused), and cannot make the hook run its code (a replaced os.path or builtins is
never looked up), so no frame of the hook's is ever under the program's code. A refused
operation ends the process at once (exit 87) instead of raising, so no traceback carries the
hook's frame out either.
"""

from __future__ import annotations

import builtins
import json
import linecache
import os
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
DONE_EVENT = "mftk.sandbox.done"
_DONE_STMT = f"__import__('sys').audit({DONE_EVENT!r})"

# Refused outright. Process creation, signals, sockets and raw memory; plus what would let the
# program walk to the hook's state (gc) or step through the tests' frame (tracing).
_DENY = (
    "socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "winreg.", "os.symlink", "os.link",
    "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_",
    "sys.monitoring",
)  # fmt: skip
# Events that change the file system: (path argument, its dir_fd argument or None).
_FS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.rename": ((0, 2), (1, 3)), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),), "os.chdir": ((0, None),),
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DIR_FLAGS = os.O_DIRECTORY | getattr(os, "O_PATH", 0)
_WRITABLE = ("/dev/null",)  # outside the run's directory, the only file a program may write

# What the hook calls, captured here, before any program code runs. _seal copies these into the
# hook's private globals; the hook never looks up a module attribute or a shared builtin.
_write, _exit, _getframe = os.write, os._exit, sys._getframe
_stat, _lstat, _readlink, _getcwd = os.stat, os.lstat, os.readlink, os.getcwd
_ISLNK, _ISDIR = stat.S_ISLNK, stat.S_ISDIR
_ATTACHED = getattr(sqlite3, "SQLITE_LIMIT_ATTACHED", None)  # Python 3.11+
_setlimit = None if _ATTACHED is None else sqlite3.Connection.setlimit
_AT_FDCWD = getattr(os, "AT_FDCWD", -100)
# Per run (set by _seal): the verdict, where it goes, and what a genuine end of the tests is.
_TOKEN, _VFD, _TESTS, _RUNNER, _DONE_LINE, _ROOT = bytearray(), -1, None, None, -1, "/"


def _hook(event, args):
    """The audit hook: refuse (exit 87), or on the tests' last statement write the verdict."""
    if type(event) is not str:  # a str subclass's __eq__ would run the program's code in here
        _violation("an event that is not a str")
    try:
        if event == DONE_EVENT:
            _done()
        elif event.startswith(_DENY) or _refused(event, args):
            _violation(event)
    except MemoryError:
        _exit(EXIT_MEMORY)
    except BaseException:
        _violation(event)


def _done():
    frame = _getframe(2)  # 0 _done, 1 _hook, 2 the frame that raised the event
    if frame.f_code is _TESTS and frame.f_back is _RUNNER and frame.f_lineno == _DONE_LINE:
        _write(_VFD, _TOKEN)
        _exit(0)  # nothing of the program's runs after its verdict
    _violation("a forged end of the tests")


def _violation(what):
    _write(2, b"mftk sandbox: blocked " + what.encode("utf-8", "replace") + b"\n")
    _exit(EXIT_BLOCKED)


def _refused(event, args):
    """Whether this event writes outside the run's directory, or reads what it must not."""
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        if type(path) is int:
            return False  # an already open file descriptor
        path = _text(path)
        writes = type(mode) is str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
        if writes or flags & _WRITE_FLAGS:
            if _resolve(path, _AT_FDCWD) in _WRITABLE:
                return False
            return not _inside(path, _AT_FDCWD) or _climbs(path)
        if _proc_of_a_process(_resolve(path, _AT_FDCWD)):
            return True  # /proc/self/mem holds the token; other processes are not its business
        if mode is None or flags & _DIR_FLAGS:  # os.open: a directory fd outside is a dir_fd
            return not _inside(path, _AT_FDCWD) and _is_dir(path)
        return False
    if event == "sqlite3.connect":
        db = _text(args[0])
        if db.startswith("file:"):
            db = db[5:].split("?")[0]
        return db not in ("", ":memory:") and not _inside(db, _AT_FDCWD)
    if event == "sqlite3.connect/handle":
        if _setlimit is None:
            return True
        _setlimit(args[0], _ATTACHED, 0)  # ATTACH opens files without an audit event
        return False
    spec = _FS.get(event)
    if spec is None:
        return False
    for path_at, dir_at in spec:
        dir_fd = _AT_FDCWD if dir_at is None or args[dir_at] in (None, -1) else args[dir_at]
        if type(args[path_at]) is not int and not _inside(_text(args[path_at]), dir_fd):
            return True
    return False


def _text(path):
    if type(path) is str:
        return path
    if type(path) is bytes:
        return path.decode("utf-8", "surrogateescape")
    raise TypeError("a path that is not str or bytes")  # its __fspath__ would be program code


def _inside(path, dir_fd):
    real = _resolve(path, dir_fd)
    return real == _ROOT or real.startswith(_ROOT + "/")


def _climbs(path):
    """Whether a relative path goes above where it starts: the open event carries no dir_fd."""
    if path[:1] == "/":
        return False
    depth = 0
    for name in path.split("/"):
        depth += -1 if name == ".." else 0 if name in ("", ".") else 1
        if depth < 0:
            return True
    return False


def _is_dir(path):
    try:
        return _ISDIR(_stat(path).st_mode)
    except OSError:
        return False


def _proc_of_a_process(real):
    parts = real.split("/")
    return (
        len(parts) > 2
        and parts[1] == "proc"
        and (parts[2] in ("self", "thread-self") or parts[2].isdigit())
    )


def _resolve(path, dir_fd):
    """The absolute path the kernel would open for `path`, symlinks followed."""
    if path[:1] == "/":
        base = ""
    elif dir_fd == _AT_FDCWD:
        base = _getcwd()
    else:
        base = _readlink("/proc/self/fd/" + str(dir_fd))
    todo = (base + "/" + path).split("/")
    todo.reverse()
    done, hops = "", 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            done = done[: done.rfind("/")]
            continue
        here = done + "/" + name
        try:
            is_link = _ISLNK(_lstat(here).st_mode)
        except OSError:
            is_link = False  # not there (yet): the rest is read as written
        if not is_link:
            done = here
            continue
        hops += 1
        if hops > 40:
            raise OSError("too many symlinks")
        target = _readlink(here)
        if target[:1] == "/":
            done = ""
        todo.extend(reversed(target.split("/")))
    return done or "/"


_SEALED = (
    "_hook", "_done", "_violation", "_refused", "_text", "_inside", "_climbs", "_is_dir",
    "_proc_of_a_process", "_resolve",
)  # fmt: skip


def _seal(token, tests, runner, done_line):
    """The hook, rebuilt over a private copy of this module's globals and of builtins."""
    sealed = dict(globals())
    sealed["__builtins__"] = dict(vars(builtins))
    sealed.update(_TOKEN=token, _VFD=3, _TESTS=tests, _RUNNER=runner, _DONE_LINE=done_line)
    sealed["_ROOT"] = os.path.realpath(os.getcwd())
    for name in _SEALED:
        fn = sealed[name]
        sealed[name] = types.FunctionType(fn.__code__, sealed, name, fn.__defaults__)
    return sealed["_hook"]


def _read_payload():
    """(token, code, tests) from fd 0, which then reads /dev/null."""
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
    return token, payload["code"], payload["tests"]


def _prepare():
    """Read and compile the payload; the tests get their closing statement appended."""
    token, code_src, tests = _read_payload()
    tests_src = tests or ""
    done_line = tests_src.count("\n") + 2
    tests_code = compile(tests_src + "\n" + _DONE_STMT + "\n", "tests.py", "exec")
    code = compile(code_src, "solution.py", "exec")
    linecache.cache["solution.py"] = (len(code_src), None, code_src.splitlines(True), "solution.py")
    return token, code, tests_code, tests_src, done_line, tests is not None


def main() -> None:
    # Locals, not module names: the program can rebind this module's globals, not this frame's.
    run, exit_now, module = exec, os._exit, types.ModuleType("__main__")
    try:
        token, code, tests_code, tests_src, done_line, has_tests = _prepare()
    except BaseException:
        traceback.print_exc()
        exit_now(EXIT_EXCEPTION)
    sys.addaudithook(_seal(token, tests_code, sys._getframe(), done_line))
    del token  # from here on only the sealed hook holds it
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv[:] = ["solution.py"]
    try:
        try:
            run(code, module.__dict__)
        except SystemExit as e:  # without tests, a program that exits 0 has run to its end
            if has_tests or type(e) is not SystemExit or e.code not in (0, None):
                raise
        run(tests_code, module.__dict__)
    except MemoryError:
        exit_now(EXIT_MEMORY)
    except SystemExit:
        os.write(2, b"mftk sandbox: the program exited before its tests finished\n")
    except BaseException:
        # the tests failed, so showing their source can no longer help the program
        lines = tests_src.splitlines(True)
        linecache.cache["tests.py"] = (len(tests_src), None, lines, "tests.py")
        traceback.print_exc()
    exit_now(EXIT_EXCEPTION)  # the tests did not reach their closing statement


if __name__ == "__main__":
    main()
