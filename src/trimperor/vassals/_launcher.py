"""The launcher: the small process that spawns every vassal and outlives none.

The emperor starts it once (``python -I -S _launcher.py FD``, FD being its
end of a ``SOCK_SEQPACKET`` socketpair) and asks it to start vassals. It is
the *child subreaper* of all of them (``PR_SET_CHILD_SUBREAPER``), so every
descendant that loses its parent (double-forked, ``setsid`` daemons) becomes
its child instead of init's, and nothing can slip away:

* when a vassal's main process exits, the rest of its process group and
  every orphan it left (recognised by the ``TRIMPEROR_VASSAL_ID`` in its
  environment) are killed before the exit is reported;
* when the emperor dies, however it dies, its end of the socket closes and
  the launcher kills every descendant, reaps them, and exits;
* when the launcher dies, the emperor kills every process it knew (and, as
  the next subreaper up, every orphan that comes to it), and starts a new one.
  A vassal forked by the launcher (one that changes user) also has the
  parent-death signal.

Vassals are spawned with ``posix_spawn`` (vfork and exec, no Python in the
child: 0.2 ms against 2 ms for a fork of this process), their descriptors
placed by file actions; ``LISTEN_PID`` is set by ``/bin/sh`` exec'ing the
program in its own place. A vassal that changes user is forked, and set up in
Python. Either way the cost does not depend on the emperor's size, and no
library's at-fork hook runs. Standard library only, no trimperor imports: it
must start fast and stay small.

Messages are JSON, one per datagram, with file descriptors alongside:
``{"op": "spawn", "id": N, ...}`` is answered by ``{"op": "spawned", "id": N,
"pid": P}`` or ``{"op": "failed", "id": N, "error": "..."}``; an exit is
reported as ``{"op": "exit", "pid": P, "returncode": R}`` (minus the signal
number if it was killed).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import sys
import time
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TAG = "TRIMPEROR_VASSAL_ID"
MAX_MESSAGE = 4 * 1024 * 1024
MAX_FDS = 64
#: How long orphans of an exited vassal are looked for (seconds).
SWEEP_FOR = 1.0

_libc = ctypes.CDLL(None, use_errno=True)
_close_range = getattr(_libc, "close_range", None)  # glibc 2.34 and later
if _close_range is not None:
    _close_range.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int]


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


# -- the child, between fork and exec ------------------------------------------------


def _as_whom(req: dict[str, Any]) -> str:
    return f" as uid {req['uid']}" if req.get("uid") is not None else ""


def _child(req: dict[str, Any], fds: list[int], errw: int, launcher: int) -> None:
    """Set the child up and exec; on failure write why to *errw* (never returns)."""
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died between fork and prctl
        os._exit(1)
    signal.set_wakeup_fd(-1)
    for sig in (
        signal.SIGCHLD,
        signal.SIGPIPE,
        signal.SIGXFSZ,
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
    ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Everything received goes high first, out of the way of its final place.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
    for fd in fds:
        os.close(fd)
    if req.get("uid") is not None:
        if os.geteuid() == 0:
            os.setgroups(req.get("groups") or [])
        if req.get("gid") is not None:
            os.setresgid(req["gid"], req["gid"], req["gid"])
        os.setresuid(req["uid"], req["uid"], req["uid"])
    elif req.get("gid") is not None:
        os.setresgid(req["gid"], req["gid"], req["gid"])
    cwd = req["cwd"]
    try:
        os.chdir(cwd)
    except FileNotFoundError:
        _fail(errw, f"working directory {cwd!r} does not exist")
    except OSError:
        _fail(errw, f"working directory {cwd!r} cannot be entered{_as_whom(req)}")
    if req.get("logto") is not None:
        # O_NONBLOCK: a FIFO without a reader must not hang the launcher.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            out = os.open(req["logto"], flags, 0o640)
        except OSError as exc:
            _fail(errw, f"cannot open logto {req['logto']!r}{_as_whom(req)}: {exc.strerror}")
        os.set_blocking(out, True)
    else:
        out = high[req["stdout"]]
    stdin = high[req["stdin"]] if req.get("stdin") is not None else os.open(os.devnull, os.O_RDONLY)
    err = high[req["stderr"]] if req.get("stderr") is not None else out
    os.dup2(stdin, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    keep = {0, 1, 2, errw}
    for index, target in req.get("pass", []):
        os.dup2(high[index], target)
        keep.add(target)
    env = dict(req["env"])
    listen = req.get("listen", [])
    for position, index in enumerate(listen):
        os.dup2(high[index], 3 + position)
        keep.add(3 + position)
    if listen:
        env["LISTEN_PID"] = str(os.getpid())
    if req.get("nofile") is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, tuple(req["nofile"]))
    _close_all_but(keep)
    argv = req["argv"]
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        _fail(errw, f"program {argv[0]!r} not found")
    except OSError as exc:
        _fail(errw, f"cannot run {argv[0]!r}: {exc.strerror}")


def _close_all_but(keep: set[int]) -> None:
    """Close every descriptor not in *keep*: ``close_range(2)`` between them where
    the kernel has it (no listing of /proc/self/fd), else one by one."""
    if _close_range is not None:
        low = 0
        for fd in sorted(keep):
            if fd > low and _close_range(low, fd - 1, 0) != 0:
                break
            low = fd + 1
        else:
            if _close_range(low, 0xFFFFFFFF, 0) == 0:
                return
    for fd in _open_fds():  # Linux < 5.9
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _fail(errw: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(errw, message.encode(errors="replace")[:4000])
    os._exit(127)


# -- the launcher ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of *pid*, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[2])


def _tag_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    prefix = TAG.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def _children() -> list[int]:
    """Every process whose parent is this one (orphans it adopted included)."""
    me = os.getpid()
    try:  # the kernel's own list (CONFIG_PROC_CHILDREN), for our only thread
        with open(f"/proc/{me}/task/{me}/children", "rb") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        pass
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] == me:
                found.append(int(name))
    return found


def _kill(pid: int, pgid: bool = True) -> None:
    with contextlib.suppress(OSError):
        if pgid:
            os.killpg(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)


#: Sets ``LISTEN_PID`` to the shell's pid and execs the program as that process
#: (``$0`` is the program, as given: the shell looks it up in the vassal's PATH).
_SET_LISTEN_PID = 'export LISTEN_PID=$$; exec "$0" "$@"'
#: Reset to their default action in the child (we ignore SIGINT, SIGTERM, ...;
#: Python ignores SIGPIPE and SIGXFSZ).
_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


class _Refused(Exception):
    """A spawn that cannot be done; the message is the vassal's error."""


def _targets(req: dict[str, Any]) -> list[tuple[int, int]]:
    """(index of a received descriptor, its number in the child), 0-2 included."""
    out = req["stdout"]
    err = req["stderr"] if req.get("stderr") is not None else out
    targets = [(out, 1), (err, 2)]
    if req.get("stdin") is not None:
        targets.insert(0, (req["stdin"], 0))
    targets += [(index, target) for index, target in req.get("pass", [])]
    targets += [(index, 3 + position) for position, index in enumerate(req.get("listen", []))]
    return targets


def _spawnable(req: dict[str, Any], targets: list[tuple[int, int]]) -> bool:
    """Whether ``posix_spawn`` can do all this spawn needs (else: fork)."""
    if req.get("uid") is not None or req.get("gid") is not None or req.get("logto") is not None:
        return False  # a change of user, and what is opened as that user
    if req.get("stdout") is None:
        return False
    nofile = req.get("nofile")
    if nofile is not None:
        # File actions run under the vassal's limit: each target must fit in it,
        # and the launcher must be able to take its own limit back afterwards.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if any(target >= nofile[0] for _, target in targets):
            return False
        if nofile[1] != hard and os.geteuid() != 0:
            return False
    return True


def _program(name: str, env: dict[str, str]) -> str:
    """The file *name* runs, looked up as ``execvpe`` does (in *env*'s PATH)."""
    if "/" in name:
        candidates = [name]
    else:
        path = env.get("PATH", os.defpath)
        candidates = [os.path.join(d or ".", name) for d in path.split(os.pathsep)]
    denied = False
    for candidate in candidates:
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = True
    if denied:
        raise _Refused(f"cannot run {name!r}: {os.strerror(errno.EACCES)}")
    raise _Refused(f"program {name!r} not found")


class Launcher:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.me = os.getpid()
        self.home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.leaders: dict[int, str] = {}  # pid -> tag
        self.sweeps: dict[str, float] = {}  # tag -> until (monotonic)
        self.swept = 0.0

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendmsg([json.dumps(message).encode()])

    def spawn(self, req: dict[str, Any], fds: list[int]) -> None:
        targets = _targets(req)
        if _spawnable(req, targets):
            self.spawn_vfork(req, fds, targets)
        else:
            self.spawn_fork(req, fds)

    def spawn_vfork(
        self, req: dict[str, Any], fds: list[int], targets: list[tuple[int, int]]
    ) -> None:
        """``posix_spawn`` (vfork and exec): no Python runs in the child.

        Forking this process costs page-table copies and a copy-on-write fault
        for every page the child's Python touches: 2 ms a spawn, against 0.2 ms
        here. The descriptors are placed by file actions, from duplicates above
        every target (so no action overwrites another's source); every other
        descriptor of ours closes on exec. The working directory and the
        open-file limit are the launcher's own for the moment of the spawn.
        """
        ident = req["id"]
        above = 1 + max(target for _, target in targets)
        high: list[int] = []
        try:
            for fd in fds:
                high.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above))
        except OSError as exc:  # out of descriptors
            for fd in (*high, *fds):
                os.close(fd)
            self.send({"op": "failed", "id": ident, "error": f"cannot place: {exc.strerror}"})
            return
        for fd in fds:
            os.close(fd)
        actions: list[tuple[Any, ...]] = []
        if req.get("stdin") is None:
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        actions += [(os.POSIX_SPAWN_DUP2, high[index], target) for index, target in targets]
        argv, env, cwd = req["argv"], dict(req["env"]), req["cwd"]
        nofile = req.get("nofile")
        try:
            try:
                os.chdir(cwd)
            except FileNotFoundError:
                raise _Refused(f"working directory {cwd!r} does not exist") from None
            except OSError:
                raise _Refused(f"working directory {cwd!r} cannot be entered") from None
            program = _program(argv[0], env)
            if req.get("listen"):
                # LISTEN_PID is the vassal's own pid, known only in the child: a
                # shell sets it and execs the program in its place (same pid).
                path, args = "/bin/sh", ["sh", "-c", _SET_LISTEN_PID, *argv]
            else:
                path, args = program, argv
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, tuple(nofile))
            try:
                pid = os.posix_spawn(
                    path,
                    args,
                    env,
                    file_actions=actions,
                    setsid=True,
                    setsigmask=(),
                    setsigdef=_DEFAULT_SIGNALS,
                )
            except OSError as exc:
                raise _Refused(f"cannot run {argv[0]!r}: {exc.strerror}") from None
            finally:
                if nofile is not None:
                    resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
        except _Refused as exc:
            self.send({"op": "failed", "id": ident, "error": str(exc)})
            return
        finally:
            os.fchdir(self.home)
            for fd in high:
                os.close(fd)
        self.leaders[pid] = req["env"].get(TAG, "")
        self.send({"op": "spawned", "id": ident, "pid": pid})

    def spawn_fork(self, req: dict[str, Any], fds: list[int]) -> None:
        """Fork, and set the child up in Python: to change its user, or when the
        open-file limit or a descriptor's number rules ``posix_spawn`` out."""
        errr, errw = os.pipe()  # both close on exec
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (*fds, errr, errw):
                os.close(fd)
            self.send({"op": "failed", "id": req["id"], "error": f"cannot fork: {exc.strerror}"})
            return
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(errr)
                _child(req, fds, errw, self.me)
            except BaseException as exc:
                _fail(errw, f"cannot start {req['argv'][0]!r}: {exc}")
            os._exit(127)
        os.close(errw)
        for fd in fds:
            os.close(fd)
        error = b""
        while chunk := os.read(errr, 4096):
            error += chunk
        os.close(errr)
        if error:
            os.waitpid(pid, 0)
            self.send({"op": "failed", "id": req["id"], "error": error.decode(errors="replace")})
            return
        self.leaders[pid] = req["env"].get(TAG, "")
        self.send({"op": "spawned", "id": req["id"], "pid": pid})

    def reap(self) -> None:
        """Every exited child: a vassal's rest is killed before its exit is told."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            tag = self.leaders.pop(pid, None)
            if tag is not None:
                # Still a zombie: its group id cannot be reused yet.
                _kill(pid)
                if tag:
                    self.sweeps[tag] = time.monotonic() + SWEEP_FOR
                    self.sweep()
            _, status = os.waitpid(pid, 0)
            if tag is not None:
                self.send(
                    {"op": "exit", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)}
                )

    def sweep(self) -> None:
        """Kill the orphans of exited vassals (adopted by us, tagged with their id)."""
        now = self.swept = time.monotonic()
        for tag, until in list(self.sweeps.items()):
            if now > until:
                del self.sweeps[tag]
        if not self.sweeps:
            return
        for pid in _children():
            if pid not in self.leaders and _tag_of(pid) in self.sweeps:
                _kill(pid)

    def handle(self, data: bytes, fds: list[int]) -> None:
        try:
            req = json.loads(data)
            op = req["op"]
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            return
        if op == "spawn":
            self.spawn(req, fds)
        elif op == "kill_all":
            for pid in list(self.leaders):
                _kill(pid)

    def run(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.send({"op": "hello", "pid": self.me})
        # poll, not select: started by a large emperor, our descriptors are above 1024.
        poller = select.poll()
        for fd in (self.sock.fileno(), wake_r):
            poller.register(fd, select.POLLIN)
        while True:
            timeout = 20 if self.sweeps else None
            ready = [fd for fd, _ in poller.poll(timeout)]
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                self.reap()
            # On the timer, not in the way of a request (but never starved by them).
            if self.sweeps and (
                self.sock.fileno() not in ready or time.monotonic() - self.swept >= 0.02
            ):
                self.sweep()
            if self.sock.fileno() in ready:
                fds = array.array("i")
                try:
                    data, ancdata, _, _ = self.sock.recvmsg(
                        MAX_MESSAGE,
                        socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                        socket.MSG_CMSG_CLOEXEC,  # none may leak into a vassal
                    )
                except OSError:
                    data = b""
                else:
                    for level, kind, payload in ancdata:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            usable = len(payload) - len(payload) % fds.itemsize
                            fds.frombytes(payload[:usable])
                if not data:
                    self.shutdown()
                    return
                self.handle(data, list(fds))

    def shutdown(self) -> None:
        """The emperor is gone: kill every descendant, reap them all, exit."""
        deadline = time.monotonic() + 5.0
        for pid in list(self.leaders):
            _kill(pid)
        while time.monotonic() < deadline:
            children = _children()
            for pid in children:
                st = _stat(pid)
                _kill(pid, pgid=st is not None and st[1] == pid)
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                return
            if not children:
                time.sleep(0.005)


def main() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sys.stdin.close()
    Launcher(sock).run()


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
