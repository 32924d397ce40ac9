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

The listeners (control socket, dashboard, metrics) are in
:mod:`trimperor.control.surfaces`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from trimperor.control.api import parse_address
from trimperor.control.vassallogs import LogFiles
from trimperor.core.errors import TrimperorError
from trimperor.core.stats import EmperorStats, VassalStats

if TYPE_CHECKING:
    # Imported where a connection is made: an emperor nobody talks to does
    # not carry the WebSocket library (3 MB of RSS).
    from trio_websocket import WebSocketConnection

__all__ = [
    "COMMANDS",
    "ControlClient",
    "ControlHub",
    "ControlOptions",
    "ControlRefused",
    "ControlRequest",
    "ProcSampler",
    "connect",
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
                self._last.pop(pid, None)
                continue
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS
            prev = self._last.get(pid)
            if prev is not None and now - prev[0] > 0.05:
                pct = 100.0 * (cpu - prev[1]) / (now - prev[0])
                seen[pid] = (now, cpu)
            else:
                # A process's start is counted from boot, as CLOCK_BOOTTIME is.
                started = int(fields[19]) / _TICKS
                pct = 100.0 * cpu / max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.01)
                seen[pid] = prev if prev is not None else (now, cpu)
            out[pid] = (round(max(pct, 0.0), 1), rss)
        self._last.update(seen)  # a status of some vassals keeps the others' samples
        if len(self._last) > 2 * len(seen) + 10_000:  # pids of processes long gone
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
    now = time.time()  # noqa: TID251 (uptime from the stats' Unix epochs)
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
        self.log_files = log_files or LogFiles(None)
        self.queue_size = queue_size
        self._logs: dict[str, collections.deque[tuple[float, str, str]]] = {}
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
        # An event's time is a Unix timestamp for clients on other clocks.
        doc: dict[str, Any] = {"event": kind, "seq": self._seq, "time": time.time()}  # noqa: TID251
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
            ring.append((doc["time"], line, str(fields.get("stream", "stdout"))))
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
        self.log_files.close(name)
        self.log_files.configure(name, None, None, None)

    def logs(self, names: Iterable[str], n: int) -> list[dict[str, Any]]:
        """The last *n* lines of the named vassals (all if none), merged by time."""
        wanted = list(names) or list(self._logs)
        merged = sorted(
            (t, name, line, stream)
            for name in wanted
            for t, line, stream in list(self._logs.get(name, ()))[-n:]
        )
        return (
            [
                {"time": t, "name": name, "line": line, "stream": stream}
                for t, name, line, stream in merged[-n:]
            ]
            if n
            else []
        )

    def recent_events(self, n: int) -> list[dict[str, Any]]:
        return [json.loads(m) for m in list(self._events)[-n:]] if n else []

    def _add(self, client: _Client) -> None:
        self._clients.add(client)

    def _remove(self, client: _Client) -> None:
        self._clients.discard(client)
        client.send.close()


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


class ControlRefused(TrimperorError):
    pass


@asynccontextmanager
async def connect(address: str, token: str | None = None) -> AsyncIterator[ControlClient]:
    """``async with connect("/run/trimperor/control.sock") as client: ...``"""
    from trio_websocket import ConnectionRejected, HandshakeError, wrap_client_stream

    where = parse_address(address)
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
