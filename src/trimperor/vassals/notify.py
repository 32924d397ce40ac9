"""systemd's notification protocol (sd_notify), sending side.

When the emperor itself runs under systemd (``Type=notify``), ``NOTIFY_SOCKET``
names a datagram socket: we send ``READY=1`` once the sources are watched and
the first vassals started, ``STATUS=...`` as the number of vassals changes, and
``STOPPING=1`` on shutdown. Without the variable every call is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable, Mapping

import trio

__all__ = ["Notifier", "NotifyHub", "PrivateNotify", "parse_message"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self._address = address
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> None:
        """``send(READY="1", STATUS="...")`` -> ``READY=1\\nSTATUS=...``."""
        if self._address is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto(message, self._address)
            except OSError as exc:
                log.warning("notify.failed address=%s error=%s", self._address, exc.strerror)

    def status(self, text: str) -> None:
        """Send ``STATUS=text`` if it differs from the last one."""
        if text != self._last_status:
            self._last_status = text
            with contextlib.suppress(OSError):
                self.send(STATUS=text)


_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyHub:
    """The one ``NOTIFY_SOCKET`` every native vassal shares.

    The kernel attaches the sender's credentials to each datagram
    (``SO_PASSCRED``), so a message is attributed to the vassal whose process,
    or whose process group (a worker of it), sent it: one socket and one task
    for all vassals, whatever their number.
    """

    def __init__(self) -> None:
        self._routes: dict[int, Callable[[dict[str, str]], None]] = {}
        self.address = ""

    def register(self, pid: int, handler: Callable[[dict[str, str]], None]) -> None:
        self._routes[pid] = handler

    def unregister(self, pid: int) -> None:
        self._routes.pop(pid, None)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        name = f"trimperor/{os.getpid()}/notify"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            await sock.bind("\0" + name)
            self.address = "@" + name
            task_status.started(self.address)
            while True:
                data, creds = await _receive(sock)
                pid = creds[0] if creds is not None else None
                handler = self._route(pid)
                if handler is None:
                    log.debug("notify.unknown_sender pid=%s", pid)
                    continue
                handler(parse_message(data))

    def _route(self, pid: int | None) -> Callable[[dict[str, str]], None] | None:
        if pid is None:
            return None
        handler = self._routes.get(pid)
        if handler is None:
            try:
                handler = self._routes.get(os.getpgid(pid))
            except OSError:
                return None
        return handler


class PrivateNotify:
    """A ``NOTIFY_SOCKET`` of one vassal process's own (``type = notify``).

    Every datagram on it is that vassal's, whichever of its processes sent it:
    a helper that says ``READY=1`` and exits at once (``systemd-notify``), or a
    worker in a session of its own. The shared socket knows a sender only by its
    process or process group, which a process that has already exited no longer
    has. The abstract name is random but visible (``/proc/net/unix``), so only
    senders running as the vassal's user or the emperor's are heard.
    """

    def __init__(self) -> None:
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.address = ""

    @classmethod
    async def open(cls) -> PrivateNotify:
        private = cls()
        name = f"trimperor/{os.getpid()}/notify/{secrets.token_hex(8)}"
        try:
            await private._sock.bind("\0" + name)
        except BaseException:
            private.close()
            raise
        private.address = "@" + name
        return private

    async def run(self, handler: Callable[[dict[str, str]], None], uids: frozenset[int]) -> None:
        """Hand each message from a sender running as one of *uids* to *handler*."""
        while True:
            data, creds = await _receive(self._sock)
            if creds is None or creds[1] not in uids:
                log.debug("notify.foreign_sender pid=%s", creds[0] if creds else None)
                continue
            handler(parse_message(data))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PrivateNotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _receive(sock: trio.socket.SocketType) -> tuple[bytes, tuple[int, int, int] | None]:
    """The next datagram on *sock*, and its sender's (pid, uid, gid) as the kernel
    attached them (``SO_PASSCRED``)."""
    data, ancdata, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
    for level, kind, cmsg in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, uid, gid = _CREDENTIALS.unpack_from(cmsg)
            return data, (int(pid), int(uid), int(gid))
    return data, None


def parse_message(data: bytes) -> dict[str, str]:
    """``READY=1\\nSTATUS=x`` -> ``{"READY": "1", "STATUS": "x"}``."""
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields
