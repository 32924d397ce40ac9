"""The stats server: one JSON document per connection, then close.

``ADDR`` is ``host:port`` (TCP; port 0 picks a free port) or a unix socket path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable

import trio

from trimperor.errors import UsageError
from trimperor.stats import EmperorStats, to_json

__all__ = ["parse_address", "serve_stats"]

log = logging.getLogger(__name__)


def parse_address(addr: str) -> tuple[str, int] | str:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port); anything else is a path."""
    if "/" in addr or ":" not in addr:
        return addr
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"bad address {addr!r}: port must be a number")
    return host, int(port)


async def _listen(addr: str) -> tuple[trio.SocketListener, str]:
    where = parse_address(addr)
    if isinstance(where, tuple):
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        bound_host, bound_port = sock.getsockname()[:2]
        shown = (
            f"{bound_host}:{bound_port}"
            if family == socket.AF_INET
            else (f"[{bound_host}]:{bound_port}")
        )
    else:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(where).st_mode):
                os.unlink(where)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(where)
        shown = where
    sock.listen(128)
    return trio.SocketListener(sock), shown


async def serve_stats(
    addr: str,
    snapshot: Callable[[], EmperorStats],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        listener, shown = await _listen(addr)
    except OSError as exc:
        raise UsageError(f"cannot serve stats on {addr!r}: {exc.strerror}") from None

    async def handle(stream: trio.abc.Stream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(to_json(snapshot()).encode())

    log.info("stats.listening addr=%s", shown)
    try:
        task_status.started(shown)
        await trio.serve_listeners(handle, [listener])
    finally:
        if not isinstance(parse_address(addr), tuple):
            with contextlib.suppress(OSError):
                os.unlink(addr)
        listener.socket.close()
