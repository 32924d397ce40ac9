"""The control socket: a WebSocket API to watch and steer a running emperor.

::

    supervisors ──emit()──► ControlHub ──(bounded queue per client)──► clients
    clients ──request──► serve_control ──ControlRequest──► emperor inbox
                                       ◄──reply──────────┘

The hub only copies what it is given (events, vassal output lines) into rings
and into one bounded queue per connected client; it never awaits, so a client
that stops reading is dropped and never slows the emperor. Read-only requests
(``status``, ``logs``) are answered from the emperor's immutable snapshots;
requests that change something enter the emperor as inbox events and the
emperor, the only decision point, answers them.

The same listener code serves the control socket (a unix socket, mode 0600,
or TCP with a token) and the dashboard (static files plus the same WebSocket
at ``/ws``).
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import stat
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
    wrap_server_stream,
)

from trimperor.errors import UsageError
from trimperor.stats import EmperorStats, VassalStats
from trimperor.vassallogs import LogFiles

__all__ = [
    "COMMANDS",
    "ControlClient",
    "ControlHub",
    "ControlOptions",
    "ControlRefused",
    "ControlRequest",
    "ProcSampler",
    "connect",
    "serve_surfaces",
    "status_rows",
]

log = logging.getLogger(__name__)

#: Requests the emperor itself answers (they change something).
EMPEROR_COMMANDS = ("start", "stop", "restart", "reload", "signal")
COMMANDS = ("status", "logs", "events", "subscribe", "unsubscribe", "ping", *EMPEROR_COMMANDS)
MAX_MESSAGE = 64 * 1024
"""The largest request accepted (bytes); larger ones close the connection (1009)."""
MAX_HEAD = 16 * 1024
"""The largest HTTP request head accepted before the WebSocket handshake."""
QUEUE_SIZE = 1024
"""Messages waiting for one client; a client that lets more pile up is dropped."""
LOG_LINES = 500
"""Lines of output kept per vassal for ``ctl logs``."""
LOG_LINE_MAX = 4096
EVENT_RING = 1000
REQUEST_TIMEOUT = 10.0
HEAD_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ControlOptions:
    """Where the control surfaces listen. ``control`` is a path or ``host:port``
    (None: no control socket); TCP listeners need *token*."""

    control: str | None
    control_explicit: bool = True
    """False for the default path: a socket already in use there is a warning, not an error."""
    token: str | None = None
    metrics: str | None = None
    dashboard: str | None = None
    logs_dir: str | None = None
    """Write each vassal's output to ``DIR/NAME.log`` too."""
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5


# -- requests that enter the emperor ------------------------------------------


@dataclass(eq=False, slots=True)
class ControlRequest:
    """A control command for the emperor's inbox; the emperor calls :meth:`reply`."""

    command: str
    names: tuple[str, ...] = ()
    all: bool = False
    signal: int | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] = field(default_factory=dict)

    def reply(self, done: Mapping[str, str], errors: Mapping[str, str]) -> None:
        self.result = {"ok": not errors, "done": dict(done), "errors": dict(errors)}
        self.done.set()


# -- CPU and memory of vassal processes ---------------------------------------


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ProcSampler:
    """CPU % (since the previous sample, else since the process started) and RSS
    of one process, from ``/proc``."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (monotonic, cpu seconds)
        with open("/proc/uptime") as f:
            self._boot = time.time() - float(f.read().split()[0])

    def sample(self, pids: Iterable[int]) -> dict[int, tuple[float | None, int | None]]:
        now = time.monotonic()
        out: dict[int, tuple[float | None, int | None]] = {}
        seen: dict[int, tuple[float, float]] = {}
        for pid in pids:
            try:
                fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = os.read(fd, 4096)
                finally:
                    os.close(fd)
                # stat(5), after the command: state (3), ... utime (14), stime (15),
                # starttime (22), rss in pages (24).
                fields = data.rpartition(b")")[2].split()
                rss = int(fields[21]) * _PAGE
            except (OSError, ValueError, IndexError):
                out[pid] = (None, None)
                continue
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS
            prev = self._last.get(pid)
            if prev is not None and now - prev[0] > 0.05:
                pct = 100.0 * (cpu - prev[1]) / (now - prev[0])
                seen[pid] = (now, cpu)
            else:
                started = self._boot + int(fields[19]) / _TICKS
                pct = 100.0 * cpu / max(time.time() - started, 0.01)
                seen[pid] = prev if prev is not None else (now, cpu)
            out[pid] = (round(max(pct, 0.0), 1), rss)
        self._last = seen
        return out


def status_rows(
    stats: EmperorStats, sampler: ProcSampler | None, names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """One row per vassal for ``ctl status`` (all of them, or those named)."""
    wanted = set(names)
    vassals = [v for v in stats.vassals if not wanted or v.name in wanted]
    pids = [v.pid for v in vassals if v.pid is not None]
    usage = sampler.sample(pids) if sampler is not None else {}
    now = time.time()
    rows = []
    for v in vassals:
        cpu, rss = usage.get(v.pid, (None, None)) if v.pid is not None else (None, None)
        rows.append(
            {
                "name": v.name,
                "kind": v.kind,
                "state": v.state,
                "held": v.held,
                "health": v.health,
                "pid": v.pid,
                "uptime": round(now - v.started_at, 3) if v.started_at is not None else None,
                "restarts": v.restarts,
                "wakes": v.wakes,
                "cpu": cpu,
                "rss": rss,
                "last_error": v.last_error,
                "last_exit_code": v.last_exit_code,
                "last_exit_signal": v.last_exit_signal,
                "backoff_attempt": v.backoff_attempt,
                "next_start": v.next_start,
                "source": v.source,
                "config_version": v.config_version,
            }
        )
    return rows


# -- the hub ----------------------------------------------------------------------


class _Client:
    def __init__(self, where: str, queue_size: int) -> None:
        self.where = where
        self.send, self.recv = trio.open_memory_channel[str](queue_size)
        self.scope = trio.CancelScope()
        self.events = False
        self.logs = False
        self.names: frozenset[str] = frozenset()
        self.dropped = False

    def wants(self, doc: Mapping[str, Any]) -> bool:
        if doc["event"] == "log":
            if not self.logs:
                return False
        elif not self.events:
            return False
        return not self.names or doc.get("name") in self.names

    def offer(self, message: str) -> None:
        try:
            self.send.send_nowait(message)
        except trio.WouldBlock:
            if not self.dropped:
                self.dropped = True
                self.scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


class Histogram:
    """Counts of observations by upper bound (seconds), as Prometheus buckets."""

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*map(str, self.BOUNDS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class ControlHub:
    """Events and output lines from the emperor and its supervisors, to every client.

    :meth:`emit` is the one narrow channel the supervisors report through; it
    never blocks.
    """

    def __init__(
        self,
        log_lines: int = LOG_LINES,
        queue_size: int = QUEUE_SIZE,
        log_files: LogFiles | None = None,
    ) -> None:
        self._log_lines = log_lines
        self.log_files = log_files
        self.queue_size = queue_size
        self._logs: dict[str, collections.deque[tuple[float, str]]] = {}
        self._events: collections.deque[str] = collections.deque(maxlen=EVENT_RING)
        self._clients: set[_Client] = set()
        self._seq = 0
        self.listeners: dict[str, str] = {}
        """What each surface bound (``control``, ``metrics``, ``dashboard``) -> address."""
        self.sampler: ProcSampler | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.spawn_seconds = Histogram()
        """From deciding to start a process to its spawn (any cause)."""
        self.wake_seconds = Histogram()
        """From an on-demand vassal's wake-up (first connection) to its spawn."""
        self._starting: dict[str, tuple[float, bool]] = {}

    @property
    def clients(self) -> int:
        return len(self._clients)

    def emit(self, kind: str, name: str | None = None, **fields: Any) -> None:
        self._seq += 1
        doc: dict[str, Any] = {"event": kind, "seq": self._seq, "time": time.time()}
        if name is not None:
            doc["name"] = name
        doc.update(fields)
        if kind == "log":
            line = str(fields.get("line", ""))
            if len(line) > LOG_LINE_MAX:
                line = line[:LOG_LINE_MAX] + " [...]"
                doc["line"] = line
            ring = self._logs.get(name or "")
            if ring is None:
                ring = self._logs[name or ""] = collections.deque(maxlen=self._log_lines)
            ring.append((doc["time"], line))
            if self.log_files is not None:
                self.log_files.write(name or "-", doc["time"], line)
            if not any(c.logs for c in self._clients):
                return
            message = json.dumps(doc)
        else:
            self.counts[kind] += 1
            if kind == "state" and fields.get("state") in {"running", "starting"} and name:
                self._starting[name] = (time.perf_counter(), fields.get("on") == "wake")
            elif kind == "spawn" and name in self._starting:
                began, woke = self._starting.pop(name)
                took = time.perf_counter() - began
                self.spawn_seconds.observe(took)
                if woke:
                    self.wake_seconds.observe(took)
            message = json.dumps(doc)
            self._events.append(message)
        for client in list(self._clients):
            if client.wants(doc):
                client.offer(message)

    def forget(self, name: str) -> None:
        """The vassal is gone for good: drop its output."""
        self._logs.pop(name, None)
        if self.log_files is not None:
            self.log_files.close(name)

    def logs(self, names: Iterable[str], n: int) -> list[dict[str, Any]]:
        """The last *n* lines of the named vassals (all if none), merged by time."""
        wanted = list(names) or list(self._logs)
        merged = sorted(
            (t, name, line) for name in wanted for t, line in list(self._logs.get(name, ()))[-n:]
        )
        return (
            [{"time": t, "name": name, "line": line} for t, name, line in merged[-n:]] if n else []
        )

    def recent_events(self, n: int) -> list[dict[str, Any]]:
        return [json.loads(m) for m in list(self._events)[-n:]] if n else []

    def _add(self, client: _Client) -> None:
        self._clients.add(client)

    def _remove(self, client: _Client) -> None:
        self._clients.discard(client)
        client.send.close()


# -- serving --------------------------------------------------------------------------


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
    return resources.files("trimperor").joinpath("dashboard", name).read_bytes(), ctype


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
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(
                    nursery, _Prefixed(stream, head.raw), max_message_size=MAX_MESSAGE
                )
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
        except ConnectionClosed:
            pass
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
    from trimperor.api import parse_address

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
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)  # before listen(): nobody can connect in between
    sock.listen(128)
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
            where = _parse(options.dashboard)
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
                from trimperor.metrics import serve_metrics

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
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        except Exception:
            log.exception("control.connection_failed surface=%s", surface.kind)

    return handler


def held_stats(stats: VassalStats) -> VassalStats:
    """A vassal stopped by ``ctl stop``, as status shows it while it stays stopped."""
    from dataclasses import replace

    return replace(stats, state="stopped", held=True, pid=None, started_at=None, cursed=None)


# -- a client, for Python programs on trio (trimperor ctl has its own, blocking) ----


class ControlClient:
    """One WebSocket connection to an emperor's control socket."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._next = 0
        self._events: collections.deque[dict[str, Any]] = collections.deque()

    async def _receive(self) -> dict[str, Any]:
        doc = json.loads(await self._ws.get_message())
        assert isinstance(doc, dict)
        return doc

    async def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Send ``{"cmd": cmd, **fields}``; the reply (events meanwhile are kept)."""
        self._next += 1
        rid = self._next
        await self._ws.send_message(json.dumps({"id": rid, "cmd": cmd, **fields}))
        while True:
            doc = await self._receive()
            if "event" in doc:
                self._events.append(doc)
            elif doc.get("id") == rid:
                return doc

    async def next_event(self) -> dict[str, Any]:
        """The next event (after ``subscribe``)."""
        while not self._events:
            doc = await self._receive()
            if "event" in doc:
                return doc
        return self._events.popleft()


class ControlRefused(Exception):
    pass


@asynccontextmanager
async def connect(address: str, token: str | None = None) -> AsyncIterator[ControlClient]:
    """``async with connect("/run/trimperor/control.sock") as client: ...``"""
    where = _parse(address)
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
    if isinstance(where, tuple):
        stream = await trio.open_tcp_stream(*where)
        host = f"{where[0]}:{where[1]}"
    else:
        stream = await trio.open_unix_socket(where)
        host = "localhost"
    refused: HandshakeError | None = None
    try:
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, host, "/", extra_headers=headers)
            try:
                yield ControlClient(ws)
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* HandshakeError as group:
        first = group.exceptions[0]
        assert isinstance(first, HandshakeError)
        refused = first
    if refused is not None:
        why = str(refused)
        if isinstance(refused, ConnectionRejected):
            why = (refused.body or b"").decode(errors="replace").strip() or str(refused.status_code)
        raise ControlRefused(f"the emperor at {address} refused: {why}")
