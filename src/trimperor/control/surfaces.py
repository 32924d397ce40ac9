"""The listeners of the control surfaces: the control socket and the dashboard.

One small HTTP/1.1 front reads the request head (bounded in size and time):
a WebSocket upgrade goes to :class:`ControlServer`, which checks the
``Origin`` and the token and then answers JSON requests; on the dashboard's
port, plain GETs get the static files shipped in ``trimperor/dashboard``.
The control socket is a unix socket (mode 0600) or TCP with a token.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio

from trimperor.control.hub import (
    COMMANDS,
    HEAD_TIMEOUT,
    MAX_HEAD,
    MAX_MESSAGE,
    REQUEST_TIMEOUT,
    ControlHub,
    ControlOptions,
    ControlRequest,
    ProcSampler,
    _Client,
    status_rows,
)
from trimperor.core.errors import UsageError
from trimperor.core.stats import EmperorStats

if TYPE_CHECKING:
    # The WebSocket library is imported by the first upgrade request: an emperor
    # nobody talks to does not carry it (3 MB of RSS).
    from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = ["ControlServer", "serve_surfaces"]

log = logging.getLogger(__name__)


class _Prefixed(trio.abc.Stream):
    """A stream whose first bytes were already read (the HTTP request head)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return bytes(data)
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def __repr__(self) -> str:
        return "<control stream>"


@dataclass(frozen=True, slots=True)
class _Head:
    method: str
    target: str
    headers: dict[str, str]
    raw: bytes


async def _read_head(stream: trio.abc.Stream) -> _Head | None:
    buf = b""
    with trio.move_on_after(HEAD_TIMEOUT):
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                return None
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            buf += chunk
    if b"\r\n\r\n" not in buf:
        return None
    head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    first, *lines = head.split("\r\n")
    parts = first.split()
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return _Head(parts[0], parts[1], headers, buf)


_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def _static(path: str) -> tuple[bytes, str] | None:
    entry = _STATIC.get(path)
    if entry is None:
        return None
    name, ctype = entry
    from importlib import resources  # only the dashboard's pages need it

    return resources.files("trimperor.control").joinpath("dashboard", name).read_bytes(), ctype


async def _respond(
    stream: trio.abc.Stream, status: str, body: bytes, ctype: str = "text/plain; charset=utf-8"
) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        "Content-Security-Policy: default-src 'self'; connect-src 'self'\r\n"
        "Connection: close\r\n\r\n"
    )
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head.encode() + body)


@dataclass(slots=True)
class _Surface:
    """One listener: the control socket or the dashboard."""

    kind: str
    """``unix``, ``tcp`` or ``dashboard``."""
    shown: str
    token: str | None
    origins: frozenset[str]
    hosts: frozenset[str] = frozenset()


class ControlServer:
    """Answers WebSocket requests on any number of listeners."""

    def __init__(
        self,
        hub: ControlHub,
        snapshot: Callable[[], EmperorStats],
        submit: Callable[[ControlRequest], Awaitable[None]],
    ) -> None:
        self.hub = hub
        self._snapshot = snapshot
        self._submit = submit
        hub.sampler = hub.sampler or ProcSampler()

    # -- connection --------------------------------------------------------

    async def handle(self, surface: _Surface, stream: trio.abc.Stream) -> None:
        async with stream:
            head = await _read_head(stream)
            if head is None:
                await _respond(stream, "400 Bad Request", b"bad request\n")
                return
            upgrade = head.headers.get("upgrade", "").lower() == "websocket"
            if surface.kind == "dashboard":
                host = head.headers.get("host", "")
                if surface.hosts and host not in surface.hosts:
                    log.warning(
                        "control.refused surface=%s reason=host host=%r", surface.kind, host
                    )
                    await _respond(stream, "421 Misdirected Request", b"unknown host\n")
                    return
                if not upgrade:
                    path = urllib.parse.urlsplit(head.target).path
                    found = _static(path) if head.method in {"GET", "HEAD"} else None
                    if found is None:
                        await _respond(stream, "404 Not Found", b"not found\n")
                    else:
                        await _respond(stream, "200 OK", found[0], found[1])
                    return
            if not upgrade:
                await _respond(stream, "426 Upgrade Required", b"a WebSocket endpoint\n")
                return
            await self._upgrade(surface, stream, head)

    async def _upgrade(self, surface: _Surface, stream: trio.abc.Stream, head: _Head) -> None:
        from trio_websocket import ConnectionClosed, wrap_server_stream

        request: WebSocketRequest | None = None
        try:
            async with trio.open_nursery() as nursery:
                # A handshake wsproto rejects is answered 400 and never becomes a request.
                with trio.move_on_after(HEAD_TIMEOUT):
                    request = await wrap_server_stream(
                        nursery, _Prefixed(stream, head.raw), max_message_size=MAX_MESSAGE
                    )
                if request is None:
                    nursery.cancel_scope.cancel()
                    return
                reason = self._refusal(surface, request)
                if reason is not None:
                    status, why = reason
                    log.warning("control.refused surface=%s reason=%s", surface.kind, why)
                    await request.reject(status, body=(why + "\n").encode())
                else:
                    ws = await request.accept()
                    try:
                        await self._session(ws, surface)
                    finally:
                        with trio.move_on_after(2):
                            await ws.aclose()
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the client went away (raised inside the nursery: in a group)

    def _refusal(self, surface: _Surface, request: WebSocketRequest) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        origin = headers.get("origin")
        if origin is not None and origin not in surface.origins:
            return 403, "cross-origin request refused"
        if surface.token is None:
            return None
        given = ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
            given = (query.get("token") or [""])[0]
        if not given:
            return 401, "token required"
        if not hmac.compare_digest(given.encode(), surface.token.encode()):
            return 401, "wrong token"
        return None

    async def _session(self, ws: WebSocketConnection, surface: _Surface) -> None:
        from trio_websocket import ConnectionClosed

        client = _Client(surface.kind, self.hub.queue_size)
        self.hub._add(client)
        log.debug("control.client_connected surface=%s clients=%d", surface.kind, self.hub.clients)
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, ws, client)
                    while True:
                        message = await ws.get_message()
                        reply = await self._answer(client, message)
                        client.offer(json.dumps(reply))
        except* ConnectionClosed:
            pass  # the client closed: the end of its session (in the nursery's group)
        finally:
            self.hub._remove(client)
            if client.dropped:
                log.warning(
                    "control.client_dropped surface=%s: it did not read %d queued messages",
                    surface.kind,
                    self.hub.queue_size,
                )

    async def _writer(self, ws: WebSocketConnection, client: _Client) -> None:
        async for message in client.recv:
            await ws.send_message(message)

    # -- requests ------------------------------------------------------------

    async def _answer(self, client: _Client, message: str | bytes) -> dict[str, Any]:
        try:
            if isinstance(message, bytes):
                raise ValueError("binary message; send JSON text")
            request = json.loads(message)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            return {"ok": False, "error": f"malformed message: {exc}"}
        rid = request.get("id")
        try:
            result = await self._dispatch(client, request)
        except (ValueError, TypeError, KeyError) as exc:
            reply: dict[str, Any] = {"ok": False, "error": str(exc)}
        else:
            reply = {"ok": result.pop("ok", True), **result}
        if rid is not None:
            reply["id"] = rid
        return reply

    async def _dispatch(self, client: _Client, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd not in COMMANDS:
            raise ValueError(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
        names = request.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("names must be a list of strings")
        if cmd == "ping":
            return {"pong": True}
        if cmd == "status":
            stats = self._snapshot()
            return {
                "vassals": status_rows(stats, self.hub.sampler, names),
                "sources": [asdict(s) for s in stats.sources],
                "emperor": {
                    "pid": stats.pid,
                    "version": stats.version,
                    "uptime": round(stats.uptime, 3),
                    "clients": self.hub.clients,
                },
            }
        if cmd == "logs":
            n = _count(request.get("n", 50))
            return {"lines": self.hub.logs(names, n)}
        if cmd == "events":
            return {"events": self.hub.recent_events(_count(request.get("n", 100)))}
        if cmd == "subscribe":
            client.events = bool(request.get("events", True))
            client.logs = bool(request.get("logs", False))
            client.names = frozenset(names)
            return {"subscribed": True}
        if cmd == "unsubscribe":
            client.events = client.logs = False
            return {"subscribed": False}
        everything = bool(request.get("all", False))
        if not names and not everything:
            raise ValueError(f"{cmd} needs names or all")
        sig: int | None = None
        if cmd == "signal":
            sig = _signal(request.get("signal"))
        req = ControlRequest(cmd, tuple(names), everything, sig)
        with trio.move_on_after(REQUEST_TIMEOUT):
            await self._submit(req)
            await req.done.wait()
            return dict(req.result)
        raise ValueError("the emperor did not answer in time")


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("n must be a number >= 0")
    return min(value, 100_000)


def _signal(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int(signal.Signals(value))
        except ValueError:
            pass
    if isinstance(value, str):
        key = value.upper()
        key = key if key.startswith("SIG") else "SIG" + key
        with contextlib.suppress(KeyError):
            return int(signal.Signals[key])
    raise ValueError(f"unknown signal {value!r}")


# -- listeners ---------------------------------------------------------------------------


def _parse(addr: str) -> tuple[str, int] | str:
    from trimperor.control.api import parse_address

    return parse_address(addr)


async def _tcp_listener(host: str, port: int) -> tuple[trio.SocketListener, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    bound_host, bound_port = sock.getsockname()[:2]
    sock.listen(128)
    shown = (
        f"{bound_host}:{bound_port}" if family == socket.AF_INET else f"[{bound_host}]:{bound_port}"
    )
    return trio.SocketListener(sock), shown


def _in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


async def _unix_listener(path: str) -> trio.SocketListener:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"control socket {path}: exists and is not a socket")
        if _in_use(path):
            raise UsageError(f"control socket {path}: another emperor is listening there")
        os.unlink(path)
    # Bound, restricted and listening under a name of its own, then renamed into
    # place: a client finding the path can connect at once, and nobody can
    # connect before the mode is set.
    staging = path + "~"
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(staging).st_mode):
            os.unlink(staging)  # left by an emperor that died while starting
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(staging)
        os.chmod(staging, 0o600)
        sock.listen(128)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    return trio.SocketListener(sock)


def _loopback(host: str) -> bool:
    return host in {"127.0.0.1", "::1", "localhost"} or host.startswith("127.")


async def serve_surfaces(
    options: ControlOptions,
    hub: ControlHub,
    snapshot: Callable[[], EmperorStats],
    submit: Callable[[ControlRequest], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every configured surface, report what was bound, serve until cancelled."""
    server = ControlServer(hub, snapshot, submit)
    served: list[tuple[_Surface, trio.SocketListener]] = []
    unix_path: str | None = None
    try:
        if options.control is not None:
            where = _parse(options.control)
            if isinstance(where, tuple):
                if options.token is None:
                    raise UsageError("a TCP control socket needs --control-token-file")
                listener, shown = await _tcp_listener(*where)
                served.append(
                    (
                        _Surface("tcp", shown, options.token, frozenset({f"http://{shown}"})),
                        listener,
                    )
                )
            else:
                try:
                    listener = await _unix_listener(where)
                except UsageError as exc:
                    if options.control_explicit:
                        raise
                    log.warning("control.disabled: %s (use --control PATH)", exc)
                except OSError as exc:
                    if options.control_explicit:
                        raise UsageError(f"cannot listen on {where}: {exc.strerror}") from None
                    log.warning("control.disabled path=%s: %s", where, exc.strerror)
                else:
                    unix_path = where
                    served.append((_Surface("unix", where, None, frozenset()), listener))
        if options.dashboard is not None:
            # A bare port is on loopback: the dashboard is not for the network by default.
            dash = options.dashboard
            where = _parse(f"127.0.0.1:{dash}" if dash.isdigit() else dash)
            if not isinstance(where, tuple):
                raise UsageError("--dashboard takes host:port")
            if options.token is None:
                raise UsageError("--dashboard needs --control-token-file")
            if not _loopback(where[0]):
                log.warning("dashboard.not_loopback addr=%s: reachable from the network", where[0])
            listener, shown = await _tcp_listener(*where)
            port = shown.rpartition(":")[2]
            hosts = {shown, f"localhost:{port}"}
            surface = _Surface(
                "dashboard",
                shown,
                options.token,
                frozenset(f"http://{h}" for h in hosts),
                frozenset(hosts),
            )
            served.append((surface, listener))
    except OSError as exc:
        for _, listener in served:
            listener.socket.close()
        raise UsageError(f"cannot listen: {exc.strerror}") from None
    except BaseException:
        for _, listener in served:
            listener.socket.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            for surface, listener in served:
                key = "dashboard" if surface.kind == "dashboard" else "control"
                hub.listeners[key] = surface.shown
                log.info("control.listening surface=%s addr=%s", surface.kind, surface.shown)
                nursery.start_soon(trio.serve_listeners, _bind_handler(server, surface), [listener])
            if options.metrics is not None:
                from trimperor.control.metrics import serve_metrics

                hub.listeners["metrics"] = await nursery.start(
                    serve_metrics, options.metrics, snapshot, hub
                )
            task_status.started(dict(hub.listeners))
    finally:
        if unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(unix_path)


def _bind_handler(
    server: ControlServer, surface: _Surface
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await server.handle(surface, stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away mid-answer
        except* Exception:
            log.exception("control.connection_failed surface=%s", surface.kind)

    return handler
