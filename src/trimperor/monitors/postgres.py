"""The ``pg://`` source: vassal configurations as rows of a PostgreSQL query.

``pg://DSN;QUERY[;LISTEN channel]``: everything before the first ``;`` is a
libpq connection string (``host=... dbname=...``) or a ``postgresql://`` URI;
then the query; then, optionally, ``LISTEN channel``. Without a query, uWSGI's
default is used: ``SELECT name,config,EXTRACT(epoch FROM ts) FROM vassals``.

The query's columns are taken by position: name, config, ts (Unix seconds: an
integer, a float, a numeric or a string of digits; a fraction is kept, so any
change of the value reloads; a ``timestamp`` is accepted too), and optionally
uid, gid and socket (an empty socket means "not on demand"). A row's version is
its ts.

The monitor keeps one connection (autocommit) and runs the query every
``freq`` seconds; with ``LISTEN``, also at once whenever a notification arrives
on the channel (several notifications that arrive together cause one query).
Every successful query sends a full :class:`~trimperor.core.model.Snapshot`. A
query that fails (connection lost, SQL error) sends nothing that could stop a
vassal: the monitor logs, reports the problem once per outage, backs off and
reconnects; its next successful query carries the removals made meanwhile.

A bad row (bad name, NULL config, non-numeric ts, oversized config, wrong
number of columns) is logged once and left out. If a row that was good turns
bad, its last good version stays in the snapshot, so that a broken edit does
not stop a running vassal.

Blocking libpq calls (connect, query) run in a worker thread; waiting for a
notification does not: the task waits for the connection's socket to become
readable (:func:`trio.lowlevel.wait_readable`). A call that cancellation
abandons keeps running in its thread, which then closes the connection; TCP
keepalives (on unless the DSN sets them) bound how long a dead peer can hold
it.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Snapshot, SourceEvent, VassalDocument
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    BadVassal,
    LastGood,
    SourceStatus,
    check_freq,
    check_or_raise,
    error_text,
    parse_id,
    redact,
)

with kit.driver_imports(__name__):
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["DEFAULT_QUERY", "PostgresMonitor", "parse_uri", "row_document"]

log = logging.getLogger(__name__)

#: uWSGI's query when the URI gives none.
DEFAULT_QUERY = "SELECT name,config,EXTRACT(epoch FROM ts) FROM vassals"

#: Connection settings added unless the DSN sets them: a dead server is
#: noticed within about 20 s even while a query waits for its answer.
_CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}

#: A query that takes longer than this counts as a failure (seconds).
QUERY_TIMEOUT = 60.0

_LISTEN = re.compile(
    r";\s*LISTEN\s+(?P<channel>[A-Za-z_][A-Za-z0-9_$]*|\"(?:[^\"]|\"\")+\")\s*;?\s*\Z",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

T = TypeVar("T")


def parse_uri(uri: str) -> tuple[str, str, str | None]:
    """Split ``pg://DSN;QUERY[;LISTEN channel]`` into (dsn, query, channel).

    The channel is returned as PostgreSQL names it: folded to lower case
    unless it was double-quoted. Raises UsageError.
    """
    if not uri.startswith("pg://"):
        raise UsageError(f"not a pg:// URI: {uri!r}")
    dsn, _, rest = uri.removeprefix("pg://").partition(";")
    channel = None
    listen = _LISTEN.search(";" + rest)
    if listen is not None:
        raw = listen.group("channel")
        channel = raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()
        rest = (";" + rest)[: listen.start()].removeprefix(";")
    query = rest.strip() or DEFAULT_QUERY
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        message = str(exc).strip()
        raise UsageError(f"bad connection string in {_label(uri, dsn)!r}: {message}") from None
    return dsn, query, channel


def _short_label(dsn: str) -> str:
    """``pg://HOST:PORT/DBNAME``: the source without its query, for repeated lines."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "pg://"
    host = str(params.get("host") or params.get("hostaddr") or "local")
    port = params.get("port")
    where = f"{host}:{port}" if port else host
    return f"pg://{where}/{params.get('dbname') or ''}"


def _label(uri: str, dsn: str) -> str:
    """*uri* with the password in *dsn* hidden."""
    shown = re.sub(r"([?&]password=)[^&;]*", r"\1***", redact(dsn))
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    if isinstance(password, str) and password and password in shown:
        shown = shown.replace(password, "***")
    return "pg://" + shown + uri.removeprefix("pg://")[len(dsn) :]


# -- rows --------------------------------------------------------------------------


class BadRow(BadVassal):
    """A row that is not a vassal; ``name`` is set if the row has a usable one."""


def _version(ts: object) -> str:
    """The row's ts as a version string; raises ValueError."""
    if ts is None:
        raise ValueError("ts is NULL")
    if isinstance(ts, bool):
        raise ValueError(f"ts is not a number: {ts!r}")
    if isinstance(ts, int):
        return str(ts)
    if isinstance(ts, float | decimal.Decimal):
        # A numeric such as 1e400 is finite, but not as a Unix time.
        if not math.isfinite(ts) or not math.isfinite(float(ts)):
            shown = repr(ts) if len(repr(ts)) <= 40 else f"{float(ts)!r} as a float"
            raise ValueError(f"ts is not a finite number: {shown}")
        return str(ts)
    if isinstance(ts, str) and _NUMBER.fullmatch(ts.strip()):
        if not math.isfinite(float(ts)):
            raise ValueError("ts is not a finite number: inf as a float")
        return ts.strip()
    if isinstance(ts, datetime.datetime):
        return ts.isoformat()
    raise ValueError(f"ts is not a number: {ts!r}")


@dataclass(frozen=True, slots=True)
class Oversized:
    """A config column the server measured and did not send: over the limit."""

    size: int


def guarded_query(query: str, columns: int, limit: int) -> str:
    """*query* wrapped so that the server never sends a config over *limit* bytes.

    Its second column comes back NULL where it is too large, followed by an
    extra column with its size; see :func:`unguard`.
    """
    names = [f"c{i}" for i in range(columns)]
    rest = ", ".join(f"t.{n}" for n in names[2:])
    return (
        f"SELECT t.c0, CASE WHEN octet_length(t.c1) > {int(limit)} THEN NULL ELSE t.c1 END, "
        f"octet_length(t.c1), {rest} FROM ({query.rstrip().rstrip(';')}) AS t({', '.join(names)})"
    )


def unguard(row: Sequence[Any], limit: int) -> tuple[Any, ...]:
    """A row of :func:`guarded_query` in the shape of the user's query."""
    config, size = row[1], row[2]
    if config is None and isinstance(size, int) and size > limit:
        config = Oversized(size)
    return (row[0], config, *row[3:])


def row_document(row: Sequence[Any], source: str, options: MonitorOptions) -> VassalDocument:
    """The vassal a query row describes; raises :class:`BadRow`."""
    name = row[0] if row else None
    if not isinstance(name, str):
        raise BadRow(None, f"name is {'NULL' if name is None else 'not text: ' + repr(name)}")
    if not 3 <= len(row) <= 6:
        raise BadRow(name, f"the query returns {len(row)} columns, not 3 to 6")
    config = row[1]
    if isinstance(config, Oversized):
        raise BadRow(
            name,
            f"configuration is {config.size} bytes, over --max-config-size "
            f"({options.max_config_size}); not fetched",
        )
    if isinstance(config, bytes | memoryview):
        config = bytes(config).decode("utf-8", errors="replace")
    if not isinstance(config, str):
        raise BadRow(name, f"config is {'NULL' if config is None else 'not text'}")
    try:
        version = _version(row[2])
        uid = parse_id(row[3], "uid", digits=True) if len(row) > 3 else None
        gid = parse_id(row[4], "gid", digits=True) if len(row) > 4 else None
    except ValueError as exc:
        raise BadRow(name, str(exc)) from None
    socket = row[5] if len(row) > 5 else None
    if socket is not None and not isinstance(socket, str):
        raise BadRow(name, f"socket is not text: {socket!r}")
    doc = VassalDocument(name, source, version, config, uid=uid, gid=gid, socket=socket or None)
    check_or_raise(doc, options, BadRow)
    return doc


# -- the connection ----------------------------------------------------------------


class _Link:
    """One psycopg connection, driven from worker threads one call at a time.

    Cancellation may abandon a call while its thread still uses the
    connection; then the thread closes it when the call returns. Otherwise
    :meth:`close` does, at once.
    """

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._state = "idle"  # idle, pending, running, abandoned, closed

    async def call(self, fn: Callable[[], T]) -> T:
        def work() -> T:
            with self._lock:
                if self._state == "closed":
                    raise psycopg.OperationalError("connection closed")
                self._state = "running"
            try:
                return fn()
            finally:
                with self._lock:
                    if self._state == "abandoned":
                        self._close()
                    else:
                        self._state = "idle"

        with self._lock:
            if self._state == "closed":
                raise psycopg.OperationalError("connection closed")
            self._state = "pending"
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    def close(self) -> None:
        with self._lock:
            if self._state == "running":
                self._state = "abandoned"
            elif self._state != "closed":
                self._close()

    def _close(self) -> None:
        self._state = "closed"
        if self.conn is not None:
            self.conn.close()


# -- the monitor ---------------------------------------------------------------------


class PostgresMonitor:
    """``pg://DSN;QUERY[;LISTEN channel]``: the rows of a query, polled or notified."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        check_freq(options)
        self._dsn, self.query, self.channel = parse_uri(uri)
        self.uri = _label(uri, self._dsn)
        self._options = options
        self.status = SourceStatus(self.uri, _short_label(self._dsn))
        self._guarded: str | None = None

    def _conninfo(self) -> str:
        """The DSN plus the connection defaults it does not set."""
        given = conninfo_to_dict(self._dsn)
        extra = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        return make_conninfo(self._dsn, **extra)

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Send a snapshot after every successful query, forever; closes *send* on return."""
        async with send:
            task_status.started()
            rows = LastGood[Sequence[Any]](
                self.uri,
                lambda row: row_document(row, self.uri, self._options),
                event="source.bad_row",
                what="row",
                logger=log,
            )
            while True:
                try:
                    await self._session(send, rows)
                except (psycopg.Error, OSError, trio.TooSlowError) as exc:
                    await self.status.backoff(_describe(exc), report=send)

    async def _session(
        self, send: trio.MemorySendChannel[SourceEvent], rows: LastGood[Sequence[Any]]
    ) -> None:
        """Connect, then query and wait, until something fails."""
        link = _Link()
        try:
            await link.call(lambda: self._open(link))
            assert link.conn is not None
            log.info(
                "source.connected uri=%s listen=%s",
                self.uri,
                self.channel if self.channel is not None else "-",
            )
            while True:
                with trio.fail_after(QUERY_TIMEOUT):
                    result = await link.call(lambda: self._query(link))
                docs = rows.snapshot(result)
                log.debug(
                    "source.query uri=%s rows=%d vassals=%d", self.uri, len(result), len(docs)
                )
                self.status.ok(len(docs))
                await send.send(Snapshot(self.uri, docs))
                if self.channel is None:
                    await trio.sleep(self._options.freq)
                else:
                    with trio.move_on_after(self._options.freq):
                        await self._notified(link.conn)
        finally:
            link.close()

    def _open(self, link: _Link) -> None:
        """Connect and LISTEN; blocking."""
        link.conn = psycopg.connect(self._conninfo(), autocommit=True)
        if self.channel is not None:
            link.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        self._guarded = self._guard(link.conn)

    def _guard(self, conn: psycopg.Connection[Any]) -> str | None:
        """The query that leaves oversized configs on the server, if it applies."""
        encoding = conn.info.encoding
        try:
            cur = conn.execute(f"SELECT * FROM ({self.query.rstrip().rstrip(';')}) AS t LIMIT 0")
            columns = len(cur.description or ())
            if not 3 <= columns <= 6:
                return None  # row_document says why, for every row
            guarded = guarded_query(self.query, columns, self._options.max_config_size)
            conn.execute(f"{guarded} LIMIT 0".encode(encoding))
        except (psycopg.ProgrammingError, psycopg.DataError) as exc:
            log.info(
                "source.unguarded uri=%s reason=%s: configurations are fetched whole and "
                "then checked against --max-config-size",
                self.uri,
                _describe(exc),
            )
            return None
        return guarded

    def _query(self, link: _Link) -> list[tuple[Any, ...]]:
        """Run the query; blocking."""
        conn = link.conn
        assert conn is not None
        query = self._guarded or self.query
        cur = conn.execute(query.encode(conn.info.encoding))
        if cur.description is None:
            raise psycopg.ProgrammingError("the query returns no rows (is it a SELECT?)")
        rows = cur.fetchall()
        if self._guarded is None:
            return rows
        return [unguard(row, self._options.max_config_size) for row in rows]

    async def _notified(self, conn: psycopg.Connection[Any]) -> None:
        """Return once a notification has arrived (including during the last query)."""
        while True:
            # With timeout=0 this only takes what is buffered or readable now.
            received = [n.channel for n in conn.notifies(timeout=0)]
            if received:
                log.debug("source.notified uri=%s count=%d", self.uri, len(received))
                return
            await trio.lowlevel.wait_readable(conn.fileno())


def _describe(exc: BaseException) -> str:
    return error_text(exc, too_slow=f"the query took longer than {QUERY_TIMEOUT:.0f}s")
