"""The stats server: one JSON document per connection, then close.

``ADDR`` is ``host:port`` (TCP; port 0 picks a free port) or a unix socket path.
A TCP address other than loopback (``:port`` means every interface) is refused
unless ``--allow-remote-stats`` is given (:func:`check_stats_address`).

At most :data:`MAX_CLIENTS` connections are served at a time: a new one
beyond that closes the oldest. A client has :data:`SEND_TIMEOUT` seconds in
total to take the document once it is made, or it is dropped. Idle or slow clients therefore
cost a bounded amount of memory and never delay the others by more than that.
While more than :data:`FRESH_CLIENTS` clients are being served, a document
made less than :data:`MAX_AGE` seconds ago is handed out again rather than
made anew, so a crowd of clients costs one document per ``MAX_AGE``. Clients
that ask while a document is being made share it. The document is kept
between requests and patched where vassals changed
(:class:`~trimperor.core.stats.DocumentCache`); it is sent in the pieces it is
kept in, never joined into one copy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

import trio

from trimperor.core.errors import UsageError
from trimperor.core.stats import DocumentCache, EmperorStats

__all__ = ["check_stats_address", "is_loopback", "parse_address", "serve_stats"]

log = logging.getLogger(__name__)

#: Connections served at the same time; one more closes the oldest.
MAX_CLIENTS = 64
#: Seconds a client has to read the whole document.
SEND_TIMEOUT = 5.0
#: With up to this many clients, each one gets a document made for it.
FRESH_CLIENTS = 4
#: Seconds a document may be handed out again while more clients are served.
MAX_AGE = 1.0


def parse_address(addr: str) -> tuple[str, int] | str:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port); anything else is a path."""
    if "/" in addr or ":" not in addr:
        return addr
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"bad address {addr!r}: port must be a number")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether *host* (an address or a name; resolved, blocking) is only reachable locally.

    A name counts as loopback when every address it resolves to is one; a
    name that does not resolve is not.
    """
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%", 1)[0]).is_loopback for a in addresses
    )


def check_stats_address(addr: str, *, allow_remote: bool) -> None:
    """Raise UsageError for a TCP address other than loopback, unless *allow_remote*."""
    where = parse_address(addr)
    if not isinstance(where, tuple) or allow_remote:
        return
    host, _ = where
    if not is_loopback(host):
        raise UsageError(
            f"--stats {addr}: {host} is not a loopback address, and anyone who can reach it "
            "could read the status document; use 127.0.0.1:PORT or a unix socket path, "
            "or pass --allow-remote-stats"
        )


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
    document: Callable[[], Awaitable[bytes | Iterable[bytes]]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the stats document on *addr* until cancelled.

    *document* makes it, as bytes or in pieces (the emperor's
    :meth:`~trimperor.emperor.Emperor.stats_chunks`, which keeps the event loop
    free meanwhile); without it, it is made from *snapshot*, reusing each
    unchanged vassal's JSON.
    """
    if document is None:
        cache = DocumentCache()

        async def from_snapshot() -> bytes | Iterable[bytes]:
            return cache.encode(snapshot())

        document = from_snapshot
    make = document
    try:
        listener, shown = await _listen(addr)
    except OSError as exc:
        raise UsageError(f"cannot serve stats on {addr!r}: {exc.strerror}") from None

    # The connections being served, oldest first, each with its cancel scope.
    clients: OrderedDict[int, trio.CancelScope] = OrderedDict()
    counter = iter(range(1, 1 << 62))
    dropped = 0
    made: tuple[float, Iterable[bytes]] | None = None
    # The document being made, if any: its event, and its pieces once made.
    making: tuple[trio.Event, list[Iterable[bytes]]] | None = None

    async def current() -> Iterable[bytes]:
        """A document made for this client, or shared with the clients asking meanwhile."""
        nonlocal made, making
        while True:
            now = trio.current_time()
            if made is not None and len(clients) > FRESH_CLIENTS and now - made[0] < MAX_AGE:
                return made[1]
            if making is None:
                break
            done, result = making
            await done.wait()  # take the one being made (unless its maker was cancelled)
            if result:
                return result[0]
        done, result = trio.Event(), []
        making = (done, result)
        try:
            begun = trio.current_time()
            data = await make()
            if isinstance(data, bytes):
                data = (data,)
            result.append(data)
            made = (begun, data)
            return data
        finally:
            making = None
            done.set()

    async def handle(stream: trio.abc.Stream) -> None:
        nonlocal dropped
        key = next(counter)
        if len(clients) >= MAX_CLIENTS:
            _, oldest = clients.popitem(last=False)
            oldest.cancel()
            dropped += 1
            if dropped in {1, 10, 100} or dropped % 1000 == 0:
                log.warning(
                    "stats.client_dropped addr=%s dropped=%d: more than %d clients at once; "
                    "the oldest is closed",
                    shown,
                    dropped,
                    MAX_CLIENTS,
                )
        with trio.CancelScope() as scope:
            clients[key] = scope
            try:
                async with stream:
                    pieces = await current()
                    # The client's time starts once its document is made: making it
                    # is the emperor's work (long for the first document of many
                    # vassals on a busy host), taking it is the client's.
                    scope.deadline = trio.current_time() + SEND_TIMEOUT
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        for piece in pieces:
                            await stream.send_all(piece)
            finally:
                clients.pop(key, None)
        if scope.cancelled_caught:
            log.debug("stats.client_slow addr=%s: dropped", shown)

    log.info("stats.listening addr=%s", shown)
    try:
        task_status.started(shown)
        await trio.serve_listeners(handle, [listener])
    finally:
        if not isinstance(parse_address(addr), tuple):
            with contextlib.suppress(OSError):
                os.unlink(addr)
        listener.socket.close()
