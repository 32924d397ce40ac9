"""Listening sockets the emperor binds and holds for its vassals.

The emperor binds a vassal's sockets when its configuration appears and keeps
them open for the vassal's whole life, across restarts, reloads and sleeps. A
vassal gets duplicates; connections that arrive while no process is there
wait in the backlog instead of being refused. The emperor never accepts a
connection itself.

Idle detection counts the connections of a socket from the kernel's tables
(``/proc/net/tcp``, ``tcp6``, ``unix``), so it works for servers that never
report anything (gunicorn, uvicorn), and nothing is proxied.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import threading

import trio

from trimperor.core.errors import SpawnError
from trimperor.core.vassalspec import SocketSpec
from trimperor.vassals.asuser import LIBC, Credentials, call_as
from trimperor.vassals.spawner import resolve_ids

__all__ = ["ARRIVAL_SIGNAL", "Arrivals", "ConnectionTable", "HeldSocket", "bind"]

log = logging.getLogger(__name__)

_TCP_INFO_UNACKED = struct.Struct("B" * 8 + "I" * 5)  # up to tcpi_unacked
_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"
_TCP_CLOSE_WAIT = "08"
_UNIX_CONNECTED = "03"


class HeldSocket:
    """One bound, listening socket owned by the emperor."""

    __slots__ = ("_creds", "sock", "spec", "state")

    def __init__(
        self, spec: SocketSpec, sock: socket.socket, creds: Credentials | None = None
    ) -> None:
        self.spec = spec
        self.sock = sock
        self._creds = creds
        """Tyrant mode: the user whose rights the socket's path is handled with."""
        self.state = "armed"
        """``armed`` (no process; a connection wakes the vassal), ``handed over``
        (a process has it), ``sleeping`` (the vassal is being put to sleep)."""

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def local_port(self) -> int:
        if self.spec.family == "unix":
            return 0
        port: int = self.sock.getsockname()[1]
        return port

    def pending(self) -> int | None:
        """Connections waiting in the accept queue (TCP only; None if unknown)."""
        if self.spec.family == "unix":
            return None
        try:
            raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(raw) < _TCP_INFO_UNACKED.size:
            return None
        fields = _TCP_INFO_UNACKED.unpack_from(raw)
        unacked: int = fields[-1]  # for a listening socket: the accept queue length
        return unacked

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            # A vassal may still hold the socket: no more signals for it.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.sock.fileno(), fcntl.F_SETOWN, 0)
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        if self.spec.family == "unix":
            with contextlib.suppress(OSError, SpawnError):
                call_as(self._creds, _unlink_ours, self.spec.path, self._creds)


def _unlink_ours(path: str, creds: Credentials | None) -> None:
    """Remove the socket at *path*, if it is one (and, in tyrant mode, the user's)."""
    st = os.lstat(path)
    if stat.S_ISSOCK(st.st_mode) and (creds is None or st.st_uid == creds.uid):
        os.unlink(path)


def bind(
    spec: SocketSpec, user: str | None = None, group: str | None = None, as_user: bool = False
) -> HeldSocket:
    """Bind and listen. Raises SpawnError with a message naming the address.

    With *as_user* (tyrant mode) a unix socket's path is handled with the
    rights of *user* alone: it is bound (so created) as that user, an existing
    path is replaced only if it is a socket the user owns, and ``socket-owner``
    can only name the user and its groups (the kernel's rule for chown).
    """
    creds = None
    if as_user and user is not None and spec.family == "unix":
        uid, gid, _ = resolve_ids(user, group, init_groups=False)
        if uid is not None:
            gid = uid if gid is None else gid
            try:
                name = pwd.getpwuid(uid).pw_name
                groups = tuple(os.getgrouplist(name, gid))
            except KeyError:
                groups = (gid,)
            creds = Credentials(uid, gid, groups)
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}
    sock = socket.socket(family[spec.family], socket.SOCK_STREAM)
    try:
        # The emperor never accepts, so the mode is the vassal's: see SocketSpec.
        sock.setblocking(not spec.nonblocking)
        # Before any vassal shares the open file: see Arrivals.
        flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags | os.O_ASYNC)
        if spec.family == "unix":
            call_as(creds, _bind_unix, sock, spec, user, group, creds)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spec.family == "inet6":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.host, spec.port))
        sock.listen(spec.backlog)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        if creds is not None:
            reason += f" (as uid {creds.uid})"
        raise SpawnError(f"cannot bind {spec.address}: {reason}") from None
    except SpawnError:
        sock.close()
        raise
    log.info("socket.bound address=%s fd=%d", spec.address, sock.fileno())
    return HeldSocket(spec, sock, creds)


def _bind_unix(
    sock: socket.socket,
    spec: SocketSpec,
    user: str | None,
    group: str | None,
    creds: Credentials | None,
) -> None:
    """Bind *sock* at its path; runs with *creds*' rights when given."""
    try:
        st = os.lstat(spec.path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SpawnError(f"cannot bind {spec.address}: the path exists and is not a socket")
        if creds is not None and st.st_uid != creds.uid:
            raise SpawnError(
                f"cannot bind {spec.address}: the socket there belongs to uid {st.st_uid}, "
                f"not to the vassal's user ({creds.uid}); it is not replaced"
            )
        os.unlink(spec.path)  # a stale socket from an earlier run
    sock.bind(spec.path)
    os.chmod(spec.path, spec.mode)
    owner, owner_group = spec.owner or user, spec.group or group
    if owner is not None or owner_group is not None:
        uid, gid, _ = resolve_ids(owner, owner_group, init_groups=False)
        try:
            os.chown(spec.path, -1 if uid is None else uid, -1 if gid is None else gid)
        except PermissionError:
            os.unlink(spec.path)
            raise SpawnError(
                f"cannot bind {spec.address}: socket-owner {owner}:{owner_group or ''} "
                "names another user or a group the vassal's user is not in"
            ) from None


#: The real-time signal the kernel sends for each connection arriving at a
#: watched socket (SIGIO itself means the signal queue overflowed).
ARRIVAL_SIGNAL = signal.SIGRTMIN + 7
_F_SETSIG = 10
_F_SETOWN_EX = 15
_F_OWNER_TID = 0
_SIGNALFD_INFO = 128  # sizeof(struct signalfd_siginfo)
_libc = LIBC


class Arrivals:
    """Counts the connections that arrive at held sockets, whoever accepts them.

    Idle must mean "no connection accepted for N seconds", and a request that
    comes and goes between two looks at the kernel's connection tables would
    never be seen there. Without proxying anything: every held socket is
    ``O_ASYNC`` from its bind (a flag of the open file the vassal shares, so
    it is set before any vassal has the socket and never changed under one),
    and watching it makes the emperor's thread its owner with a real-time
    signal. The kernel then queues one signal naming the socket for each
    connection that arrives; the signal is blocked in that thread and read in
    batches from a signalfd by one task (:meth:`run`).
    """

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._watched: dict[int, HeldSocket] = {}
        self._sfd: int | None = None
        self._tid = 0

    @property
    def active(self) -> bool:
        return self._sfd is not None

    def _open(self) -> bool:
        if _libc is None:
            return False
        mask = ctypes.create_string_buffer(128)  # sigset_t
        _libc.sigemptyset(mask)
        for sig in (ARRIVAL_SIGNAL, signal.SIGIO):
            _libc.sigaddset(mask, int(sig))
        signal.pthread_sigmask(signal.SIG_BLOCK, {ARRIVAL_SIGNAL, signal.SIGIO})
        sfd = _libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC)
        if sfd < 0:
            log.warning("socket.arrivals_unavailable error=%s", os.strerror(ctypes.get_errno()))
            return False
        self._sfd = sfd
        self._tid = threading.get_native_id()
        return True

    def watch(self, held: HeldSocket) -> None:
        """Count the connections arriving at *held* from now on."""
        if self._sfd is None or self._watched.get(held.fd) is held:
            return
        try:
            fcntl.fcntl(held.fd, _F_SETSIG, ARRIVAL_SIGNAL)
            fcntl.fcntl(held.fd, _F_SETOWN_EX, struct.pack("ii", _F_OWNER_TID, self._tid))
        except OSError as exc:
            log.warning("socket.arrivals_unwatched address=%s error=%s", held.spec.address, exc)
            return
        self._watched[held.fd] = held
        self._counts[held.fd] = 0

    def count(self, held: HeldSocket) -> int | None:
        """Connections that arrived at *held* since it was watched; None if not watched."""
        if self._watched.get(held.fd) is not held:
            return None
        return self._counts[held.fd]

    async def run(self) -> None:
        """Read the signals, forever. Call from the emperor's (trio's) thread."""
        if not self._open():
            return
        assert self._sfd is not None
        try:
            while True:
                await trio.lowlevel.wait_readable(self._sfd)
                try:
                    data = os.read(self._sfd, _SIGNALFD_INFO * 256)
                except BlockingIOError:
                    continue
                for offset in range(0, len(data) - _SIGNALFD_INFO + 1, _SIGNALFD_INFO):
                    signo, fd = _SIGNALFD_FIELDS.unpack_from(data, offset)
                    if signo == signal.SIGIO:  # the queue overflowed: all of them
                        for key in self._counts:
                            self._counts[key] += 1
                    elif fd in self._counts:
                        self._counts[fd] += 1
        finally:
            trio.lowlevel.notify_closing(self._sfd)
            os.close(self._sfd)
            self._sfd = None
            self._watched.clear()
            self._counts.clear()


# ssi_signo (u32, offset 0) and ssi_fd (s32, offset 20) of struct signalfd_siginfo.
_SIGNALFD_FIELDS = struct.Struct("I16xi")


class ConnectionTable:
    """Open client connections per listening socket, read from ``/proc/net``.

    One read serves every vassal asking within ``max_age`` seconds, so that a
    host with thousands of sleeping sites does not read the tables thousands
    of times.
    """

    def __init__(self, max_age: float = 0.5, proc: str = "/proc/net") -> None:
        self.arrivals = Arrivals()
        """Connections arrived, accepted or not (run by the emperor)."""
        self._max_age = max_age
        self._proc = proc
        self._read_at = -1e9
        self._tcp: dict[int, int] = {}
        self._unix: dict[str, int] = {}

    def connections(self, held: HeldSocket) -> int:
        now = trio.current_time()
        if now - self._read_at > self._max_age:
            self._tcp, self._unix = self._read()
            self._read_at = now
        if held.spec.family == "unix":
            return self._unix.get(held.spec.path, 0)
        return self._tcp.get(held.local_port(), 0)

    def _read(self) -> tuple[dict[int, int], dict[str, int]]:
        tcp: dict[int, int] = {}
        for name in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"{self._proc}/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 4 or parts[3] not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
                        continue
                    port = int(parts[1].rpartition(":")[2], 16)
                    tcp[port] = tcp.get(port, 0) + 1
        unix: dict[str, int] = {}
        with contextlib.suppress(OSError), open(f"{self._proc}/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                # Num RefCount Protocol Flags Type St Inode Path
                if len(parts) >= 8 and parts[5] == _UNIX_CONNECTED:
                    path = parts[7]
                    unix[path] = unix.get(path, 0) + 1
        return tcp, unix
