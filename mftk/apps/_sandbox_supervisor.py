"""The sandbox's supervisor: owns the token, the tests and the verdict (see mftk.apps.sandbox).

    [unshare --user --map-root-user --net --pid --fork --mount --mount-proc --kill-child --]
        python -I -S -B _sandbox_supervisor.py    # stdin: the request; fd report_fd: the report

It draws a random token, starts the runner with the token, the program and its tests on a pipe,
and watches a second pipe, the runner's fd 3, for the token. At the runner's exit or the deadline
it kills every process the run left, then reports {returncode, token, timeout, seconds}. It is
non-dumpable, so the runner can neither read its memory, fds or environment nor ptrace it; in
the namespaces it is also the PID namespace's init, which signals from inside cannot kill.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import secrets
import select
import signal
import struct
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_CAPBSET_DROP = 1, 4, 22, 24
PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 28, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1, 2  # uid 0 gets no capabilities at exec
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
SYS_MOUNT_SETATTR, MOUNT_ATTR_RDONLY, AT_RECURSIVE = 442, 1, 0x8000  # same number on both arches
SYS_OPEN_TREE, SYS_MOVE_MOUNT, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 428, 429, 1, 4
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")
NOFILE, NPROC = 128, 64

# seccomp: machine -> (column in _SYSCALLS, AUDIT_ARCH_*)
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
_SYSCALLS = {  # (x86_64, aarch64); None where the call does not exist
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_open": (434, 434), "pidfd_getfd": (438, 438), "pidfd_send_signal": (424, 424),
    "kcmp": (312, 272), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "unshare": (272, 97), "setns": (308, 268),
    "io_uring_setup": (425, 425), "socket": (41, 198), "socketpair": (53, 199),
    "fork": (57, None), "vfork": (58, None), "mknod": (133, None), "mknodat": (259, 33),
    "clone": (56, 220), "clone3": (435, 435),
}  # fmt: skip
# Without a PID namespace to contain them, no new processes (threads still), and no mknod: its
# fifo-making has no audit event.
_NO_NAMESPACE = ("fork", "vfork", "mknod", "mknodat")
# Other processes, raw memory, kernel attack surface and sockets: refused (EPERM) everywhere.
_DENIED = tuple(n for n in _SYSCALLS if n not in (*_NO_NAMESPACE, "clone", "clone3"))
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|J*|K, RET|K
_ALLOW, _ERRNO, CLONE_THREAD = 0x7FFF0000, 0x00050000, 0x10000


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int, arg3: int = 0) -> None:
    rc = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0)
    _check(rc, f"prctl({option})")


def seccomp_filter(namespaces: bool) -> bytes | None:
    """A classic-BPF program: EPERM for _DENIED (and, without namespaces, for new processes);
    None on an architecture it has no syscall numbers for."""
    arch = _ARCH.get(os.uname().machine)
    if arch is None:
        return None
    col, audit_arch = arch
    names = _DENIED if namespaces else _DENIED + _NO_NAMESPACE
    prog: list[tuple] = [(_LD, 0, 0, 4), (_JEQ, 0, "deny", audit_arch), (_LD, 0, 0, 0)]
    if col == 0:
        prog.append((_JGE, "deny", 0, 0x40000000))  # the x32 ABI's numbers
    prog += [(_JEQ, "deny", 0, _SYSCALLS[n][col]) for n in names if _SYSCALLS[n][col] is not None]
    if not namespaces:  # clone3's flags sit in memory BPF cannot read: ENOSYS sends glibc to clone
        prog += [
            (_JEQ, "nosys", 0, _SYSCALLS["clone3"][col]),
            (_JEQ, 0, "allow", _SYSCALLS["clone"][col]),
        ]
        prog += [(_LD, 0, 0, 16), (_JSET, "allow", "deny", CLONE_THREAD)]  # args[0], low word
    at = {"allow": len(prog), "deny": len(prog) + 1, "nosys": len(prog) + 2}
    prog += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | 1), (_RET, 0, 0, _ERRNO | 38)]

    def jump(i: int, to) -> int:
        return at[to] - i - 1 if isinstance(to, str) else to

    return b"".join(
        struct.pack("HBBI", code, jump(i, jt), jump(i, jf), k)
        for i, (code, jt, jf, k) in enumerate(prog)
    )


def _read_only(path: str) -> None:
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)
    rc = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), path.encode(),
        ctypes.c_uint(AT_RECURSIVE), attr, ctypes.c_size_t(len(attr)),
    )  # fmt: skip
    _check(rc, f"mount_setattr({path}, read-only, recursive)")


def _private_view(size_mb: int, keep: list[str]) -> str:
    """Everything read-only, fresh tmpfs on PRIVATE_DIRS; returns a new empty directory in /tmp.

    keep: directories the runner needs (the interpreter's prefix, the runner's folder) that may
    lie under a private dir (a venv or a checkout in /tmp): each is cloned before the tmpfs goes
    on, and put back, read-only, at the same path inside it."""
    _read_only("/")
    under = [
        p for p in keep
        if os.path.isdir(p) and any(p == d or p.startswith(d + "/") for d in PRIVATE_DIRS)
    ]  # fmt: skip
    clones = []
    for path in under:
        fd = _libc.syscall(
            ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(-100), path.encode(),
            ctypes.c_uint(OPEN_TREE_CLONE | AT_RECURSIVE),
        )  # fmt: skip
        _check(0 if fd >= 0 else -1, f"open_tree({path})")
        clones.append((path, fd))
    opts = f"size={max(1, size_mb)}m,nr_inodes=4096,mode=1777".encode()  # 0 is no limit
    for where in PRIVATE_DIRS:
        if os.path.isdir(where) and not os.path.islink(where):
            flags = ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC)
            _check(_libc.mount(b"tmpfs", where.encode(), b"tmpfs", flags, opts), f"mount {where}")
    for path, fd in clones:
        os.makedirs(path, exist_ok=True)
        rc = _libc.syscall(
            ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), b"", ctypes.c_int(-100),
            path.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )  # fmt: skip
        _check(rc, f"move_mount({path})")
        os.close(fd)
        _read_only(path)
    workdir = "/tmp/mftk-sandbox-" + secrets.token_hex(6)
    os.mkdir(workdir, 0o700)
    return workdir


def _limits(req: dict, namespaces: bool) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for the runner. CPU: SIGXCPU at soft, SIGKILL a second later."""
    cpu, mem, fsize = (
        max(1, math.ceil(req["timeout"])),
        req["memory_mb"] << 20,
        req["file_mb"] << 20,
    )
    # Without a user namespace RLIMIT_NPROC counts every task of this user, not only the run's.
    nproc = NPROC if namespaces else _user_tasks() + NPROC
    return [
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, NOFILE, NOFILE),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ]


def _user_tasks() -> int:
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                n += os.stat(f"/proc/{pid}/task").st_nlink - 2  # one subdirectory per thread
        except OSError:
            pass
    return n


def _lock_down(limits: list[tuple[int, int, int]], filt: bytes | None) -> None:
    """In the runner's process before exec: limits, no capabilities, no privilege to regain."""
    for res, soft, hard in limits:
        now = resource.getrlimit(res)[1]  # a hard limit can only go down
        if now != resource.RLIM_INFINITY:
            soft, hard = min(soft, now), min(hard, now)
        resource.setrlimit(res, (soft, hard))
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if the supervisor dies, the run dies with it
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    # EPERM here means there are no capabilities to give up: nothing to check.
    _libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        for cap in range(int(f.read()) + 1):
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if filt is not None:
        prog = _Fprog(len(filt) // 8, filt)
        _prctl(PR_SET_SECCOMP, 2, ctypes.addressof(prog))  # SECCOMP_MODE_FILTER


def _start(req: dict, workdir: str, namespaces: bool, token: bytes) -> tuple[int, int]:
    """Fork and exec the runner; returns (pid, read end of its verdict pipe)."""
    verdict_r, verdict_w = os.pipe()
    payload_r, payload_w = os.pipe()
    error_r, error_w = os.pipe()  # close-on-exec: EOF without a message means exec happened
    limits, filt = _limits(req, namespaces), seccomp_filter(namespaces)
    argv = [req["python"], "-I", "-B", "-u", req["runner"]]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(payload_r, 0)
            os.dup2(verdict_w, 3)  # 1 and 2 are the caller's pipes already
            os.closerange(4, error_w)
            os.closerange(error_w + 1, os.sysconf("SC_OPEN_MAX"))
            os.chdir(workdir)
            _lock_down(limits, filt)
            os.execve(argv[0], argv, env)
        except BaseException as e:
            os.write(error_w, f"starting the runner: {type(e).__name__}: {e}".encode())
        finally:
            os._exit(127)
    for fd in (payload_r, verdict_w, error_w):
        os.close(fd)
    with os.fdopen(error_r, "rb") as f:
        error = f.read()
    if error:
        os.waitpid(pid, 0)
        raise RuntimeError(error.decode(errors="replace"))
    payload = token + json.dumps({"code": req["code"], "tests": req["tests"]}).encode()
    try:
        with os.fdopen(payload_w, "wb") as f:
            f.write(payload)
    except BrokenPipeError:
        pass  # the runner died first; its exit tells the rest
    return pid, verdict_r


class _Verdict:
    """Looks for the token in the verdict pipe's stream, keeping only its last len(token) bytes."""

    def __init__(self, token: bytes) -> None:
        self.token, self.tail, self.seen = token, b"", False

    def feed(self, chunk: bytes) -> None:
        buf = self.tail + chunk
        self.seen = self.seen or self.token in buf
        self.tail = buf[-len(self.token) :]


def _wait(pid: int, verdict: int, scan: _Verdict, deadline: float) -> tuple[bool, int]:
    """(timed out, wait status): read the verdict pipe until the runner exits or the deadline."""
    pidfd = os.pidfd_open(pid)
    timed_out, fds = False, [pidfd, verdict]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready = select.select(fds, [], [], left)[0]
        if verdict in ready:
            chunk = os.read(verdict, 1 << 16)
            if not chunk:
                fds.remove(verdict)
            scan.feed(chunk)
        if pidfd in ready:
            break
    os.close(pidfd)
    return timed_out, os.waitpid(pid, 0)[1]


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: read every ppid
        kids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == me:
                        kids.append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
        return kids


def _sweep(namespaces: bool) -> None:
    """SIGKILL every process this one adopted (it is a subreaper, or init) until none is left."""
    if namespaces and os.getpid() == 1:
        with contextlib.suppress(ProcessLookupError):  # ESRCH: nobody else is left
            os.kill(-1, signal.SIGKILL)  # init of the run's PID namespace: all the others at once
    while True:
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _supervise(req: dict) -> dict:
    namespaces = req["mode"] == "namespaces"
    keep = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(req["runner"]))]
    keep += [os.path.dirname(os.path.dirname(os.path.realpath(req["python"])))]
    keep += [os.path.dirname(os.path.dirname(os.path.abspath(req["python"])))]
    workdir = _private_view(req["file_mb"], sorted(set(keep))) if namespaces else req["workdir"]
    token = secrets.token_bytes(16)
    t0 = time.monotonic()
    pid, verdict = _start(req, workdir, namespaces, token)
    scan = _Verdict(token)
    timed_out, status = _wait(pid, verdict, scan, t0 + req["timeout"])
    seconds = time.monotonic() - t0
    _sweep(namespaces)
    while chunk := os.read(verdict, 1 << 16):  # the rest: every writer is gone, so EOF comes
        scan.feed(chunk)
    rc = os.waitstatus_to_exitcode(status)
    return {"returncode": rc, "token": scan.seen, "timeout": timed_out, "seconds": seconds}


def main() -> None:
    req = json.loads(sys.stdin.buffer.read())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the caller ends this process
    try:
        _prctl(PR_SET_DUMPABLE, 0)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the run come back here, to be swept
        report = _supervise(req)
    except Exception as e:
        report = {"error": f"{type(e).__name__}: {e}"}
    os.write(req["report_fd"], json.dumps(report).encode())


if __name__ == "__main__":
    main()
