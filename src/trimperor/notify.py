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
import socket
from collections.abc import AsyncIterator, Mapping

import trio

__all__ = ["Notifier", "NotifyListener"]

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


class NotifyListener:
    """One vassal process's ``NOTIFY_SOCKET``: an abstract unix datagram socket.

    Each process gets its own, so a message needs no credentials to be
    attributed, and nothing is left in the file system.
    """

    _count = 0

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        self._sock = sock
        self.address = "@" + name
        """The value of ``NOTIFY_SOCKET`` for the vassal."""

    @classmethod
    async def open(cls) -> NotifyListener:
        cls._count += 1
        name = f"trimperor/{os.getpid()}/{cls._count}"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            await sock.bind("\0" + name)
        except OSError:
            sock.close()
            raise
        return cls(sock, name)

    async def messages(self) -> AsyncIterator[dict[str, str]]:
        """Each datagram as a mapping (``READY=1\\nSTATUS=x`` -> ``{READY: 1, STATUS: x}``)."""
        while True:
            try:
                data = await self._sock.recv(4096)
            except (OSError, trio.ClosedResourceError):
                return
            fields: dict[str, str] = {}
            for line in data.decode(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    fields[key] = value
            if fields:
                yield fields

    def close(self) -> None:
        self._sock.close()
