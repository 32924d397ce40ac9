"""The ``mongodb://`` source: vassal configurations as documents of a collection.

``mongodb://HOSTS,DB.COLLECTION[,FILTER]``, as uWSGI's emperor_mongodb takes it:

* HOSTS is a MongoDB host list (``h1:27017,h2:27017``, optionally with
  ``user:password@`` and ``/?options``); empty means ``127.0.0.1:27017``.
* DB.COLLECTION is the last comma-separated part before the filter if it looks
  like a namespace (a ``.``, and no ``:``, ``/`` or ``@``), otherwise uWSGI's
  default ``uwsgi.emperor.vassals`` is used. The database is the part before
  the first ``.``.
* FILTER is a JavaScript-style object (``{enabled:1}``,
  ``{env:'prod', n: {$gt: 2}}``) read by :func:`parse_filter`: keys may be bare
  identifiers, strings may be single-quoted, trailing commas are allowed.
  Nothing is evaluated.

Each matching document is a vassal: ``name``, ``config``, ``ts`` (a BSON
date, whose milliseconds are the version; a number is accepted too), and
optionally ``uid``, ``gid`` and ``socket`` (empty means not on demand). A
missing or empty ``config`` means the file named ``name`` in the emperor's
working directory; its modification time is then part of the version.

The collection is read every ``freq`` seconds with pymongo's synchronous
client in a worker thread; where the server supports change streams, a watch
on the collection triggers a read at once. A read that fails stops nothing:
the monitor reports the problem once per outage, backs off, and its next
successful read, a full snapshot, carries the removals made meanwhile. Bad
documents are logged once and left out; a document that was good and turns
bad keeps its last good version in the snapshot.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Snapshot, SourceEvent, VassalDocument, remote_name_problem
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    BadVassal,
    LastGood,
    SourceStatus,
    check_document,
    check_freq,
    check_or_raise,
    error_text,
    parse_id,
    poke_from_thread,
    read_regular,
    redact,
    static_file,
)

with kit.driver_imports(__name__):
    import bson
    from bson.codec_options import DatetimeConversion
    from pymongo import MongoClient, uri_parser
    from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

if TYPE_CHECKING:
    from pymongo.collection import Collection


__all__ = ["MongoMonitor", "document_to_vassal", "parse_filter", "parse_uri"]

log = logging.getLogger(__name__)

DEFAULT_HOSTS = "127.0.0.1:27017"
DEFAULT_NAMESPACE = "uwsgi.emperor.vassals"

#: How long a read waits for a server before it counts as failed (ms).
SERVER_SELECTION_TIMEOUT_MS = 2000
#: How long one network operation may take (ms).
SOCKET_TIMEOUT_MS = 20_000
#: How long a change stream waits on the server for news before checking in (ms).
WATCH_AWAIT_MS = 1000

_PROJECTION = {"_id": 0, "name": 1, "config": 1, "ts": 1, "uid": 1, "gid": 1, "socket": 1}
_NAMESPACE = re.compile(r"[^/\\. \"$:@?,]+\.[^/\\\"$:@?,\0]+")


# -- the filter ------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$.]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_WORDS = {"true": True, "false": False, "null": None}
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n"}
_ESCAPES |= {"r": "\r", "t": "\t"}


class _FilterParser:
    """A recursive-descent reader of JSON plus JavaScript's object-literal leniencies."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str, pos: int | None = None) -> UsageError:
        at = self.pos if pos is None else pos
        shown = repr(self.text[at : at + 10]) if at < len(self.text) else "the end"
        return UsageError(f"bad mongodb filter {self.text!r}: {what} at position {at} ({shown})")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {char!r}")
        self.pos += 1

    def document(self) -> dict[str, Any]:
        if self.peek() != "{":
            raise self.error("the filter must be an object, expected '{'")
        value = self.object()
        if self.peek():
            raise self.error("unexpected text after the filter")
        return value

    def value(self) -> Any:
        char = self.peek()
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char in {'"', "'"}:
            return self.string()
        number = _NUMBER.match(self.text, self.pos)
        if number:
            self.pos = number.end()
            literal = number.group()
            return float(literal) if number.group(1) or number.group(2) else int(literal)
        word = _BARE_KEY.match(self.text, self.pos)
        if word and word.group() in _WORDS:
            self.pos = word.end()
            return _WORDS[word.group()]
        raise self.error("expected a value (object, array, string, number, true, false, null)")

    def object(self) -> dict[str, Any]:
        self.expect("{")
        result: dict[str, Any] = {}
        while self.peek() != "}":
            key = self.key()
            self.expect(":")
            result[key] = self.value()
            if self.peek() != ",":
                break
            self.pos += 1
        self.expect("}")
        return result

    def array(self) -> list[Any]:
        self.expect("[")
        result: list[Any] = []
        while self.peek() != "]":
            result.append(self.value())
            if self.peek() != ",":
                break
            self.pos += 1
        self.expect("]")
        return result

    def key(self) -> str:
        if self.peek() in {'"', "'"}:
            return self.string()
        bare = _BARE_KEY.match(self.text, self.pos)
        if not bare:
            raise self.error("expected a key")
        self.pos = bare.end()
        return bare.group()

    def string(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                raise self.error("unterminated string", start)
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char != "\\":
                out.append(char)
                continue
            escape = self.text[self.pos : self.pos + 1]
            if escape in _ESCAPES:
                out.append(_ESCAPES[escape])
                self.pos += 1
            elif escape == "u":
                out.append(self.unicode_escape())
            else:
                raise self.error("unknown escape", self.pos - 1)

    def unicode_escape(self) -> str:
        """``\\uXXXX`` (self.pos at the ``u``), joining a UTF-16 surrogate pair."""
        code = self.hex4(self.pos + 1)
        self.pos += 5
        if 0xD800 <= code < 0xDC00 and self.text.startswith("\\u", self.pos):
            low = self.hex4(self.pos + 2)
            if 0xDC00 <= low < 0xE000:
                self.pos += 6
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        return chr(code)

    def hex4(self, at: int) -> int:
        digits = self.text[at : at + 4]
        if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.error("bad \\u escape", at - 2)
        return int(digits, 16)


def parse_filter(text: str) -> dict[str, Any]:
    """Read a JavaScript-style object literal as a query filter; raises UsageError.

    It accepts JSON, plus bare keys (``{enabled: 1}``, ``{$or: [...]}``,
    ``{a.b: 1}``), single-quoted strings and trailing commas.
    """
    return _FilterParser(text).document()


# -- the URI ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MongoSource:
    """What a ``mongodb://`` URI names."""

    hosts: str
    """A ``mongodb://`` URI for pymongo, without the namespace and filter."""
    database: str
    collection: str
    filter: dict[str, Any]
    label: str
    """The URI as given, with any password hidden."""


def parse_uri(uri: str) -> MongoSource:
    """Split ``mongodb://HOSTS,DB.COLLECTION[,FILTER]``; raises UsageError."""
    if not uri.startswith("mongodb://"):
        raise UsageError(f"not a mongodb:// URI: {uri!r}")
    body = uri.removeprefix("mongodb://")
    head, brace, text = body.partition("{")
    query: dict[str, Any] = {}
    if brace:
        if not head.rstrip().endswith(","):
            raise UsageError(f"in {redact(uri)!r}, the filter must follow a ','")
        query = parse_filter(brace + text)
        head = head.rstrip()[:-1]
    hosts, comma, last = head.rpartition(",")
    namespace = last.strip()
    if not (comma and _NAMESPACE.fullmatch(namespace)):
        hosts, namespace = head, DEFAULT_NAMESPACE
    hosts_uri = "mongodb://" + (hosts.strip() or DEFAULT_HOSTS)
    label = redact("mongodb://" + hosts) + body[len(hosts) :]
    try:
        uri_parser.parse_uri(hosts_uri)
    except (PyMongoError, ValueError) as exc:
        raise UsageError(f"bad mongodb hosts in {label!r}: {exc}") from None
    database, _, collection = namespace.partition(".")
    return MongoSource(hosts_uri, database, collection, query, label)


# -- documents ---------------------------------------------------------------------------


class BadDocument(BadVassal):
    """A document that is not a vassal; ``name`` is set if it has a usable one."""


@dataclass(frozen=True, slots=True)
class _StaticFile:
    """What a worker thread found for a document without config."""

    path: str
    version: str
    text: str | None
    error: str | None = None


#: A document read, and the static file it refers to (if it has no config).
_Found = tuple[Mapping[str, Any], _StaticFile | None]


def _version(ts: object) -> str:
    """The document's ts as a version string; raises ValueError."""
    if ts is None:
        raise ValueError("ts is missing")
    if isinstance(ts, bson.DatetimeMS):
        return str(int(ts))
    if isinstance(ts, datetime.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=datetime.UTC)
        return str(round(ts.timestamp() * 1000))
    if isinstance(ts, bson.Timestamp):
        return f"{ts.time}.{ts.inc}"
    if isinstance(ts, int | float) and not isinstance(ts, bool) and math.isfinite(ts):
        return str(ts)
    raise ValueError(f"ts is not a date or a number: {ts!r}")


def document_to_vassal(
    raw: Mapping[str, Any],
    source: str,
    options: MonitorOptions,
    static: _StaticFile | None = None,
) -> VassalDocument:
    """The vassal a collection document describes; raises :class:`BadDocument`.

    *static* is the file a document without ``config`` refers to, as read by
    :func:`_read_static`.
    """
    name = raw.get("name")
    if not isinstance(name, str):
        raise BadDocument(None, "name is missing" if name is None else "name is not a string")
    config = raw.get("config")
    if config is not None and not isinstance(config, str):
        raise BadDocument(name, f"config is not a string: {type(config).__name__}")
    socket = raw.get("socket")
    if socket is not None and not isinstance(socket, str):
        raise BadDocument(name, f"socket is not a string: {socket!r}")
    try:
        version = _version(raw.get("ts"))
        uid = parse_id(raw.get("uid"), "uid")
        gid = parse_id(raw.get("gid"), "gid")
    except ValueError as exc:
        raise BadDocument(name, str(exc)) from None
    if config:
        doc = VassalDocument(name, source, version, config, uid=uid, gid=gid, socket=socket or None)
        check_or_raise(doc, options, BadDocument)
        return doc
    # A file vassal: only its name is checked (a local file may be large).
    problem = check_document(VassalDocument(name, source, version, None), options)
    if problem is not None:
        raise BadDocument(name, problem)
    if static is None:
        raise BadDocument(name, "the static file was not looked at")
    return VassalDocument(
        name,
        source,
        f"{version}:{static.version}",
        static.text,
        path=static.path,
        error=static.error,
        uid=uid,
        gid=gid,
        socket=socket or None,
    )


class _Unchanged(Exception):
    """The static file is the one read last time."""


def _file_version(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_ino}:{st.st_size}"


def _read_static(name: str, cached: _StaticFile | None) -> _StaticFile:
    """The file *name* in the working directory; blocking.

    *cached* is what the previous read found: it is returned again, without
    reading, if the file has not changed.
    """
    path = static_file(name)

    def unchanged(_fd: int, st: os.stat_result) -> None:
        if cached is not None and cached.path == path and cached.version == _file_version(st):
            raise _Unchanged

    try:
        read = read_regular(path, check=unchanged)
    except _Unchanged:
        assert cached is not None
        return cached
    except FileNotFoundError:
        return _StaticFile(path, "missing", None, f"{path} does not exist")
    except OSError as exc:
        return _StaticFile(path, "unreadable", None, f"cannot read {path}: {exc.strerror or exc}")
    if read is None:
        return _StaticFile(path, "not-a-file", None, f"{path} is not a regular file")
    st, data = read
    version, text = _file_version(st), data.decode("utf-8", errors="replace")
    return _StaticFile(path, version, text)


# -- the monitor ---------------------------------------------------------------------------


class MongoMonitor:
    """``mongodb://HOSTS,DB.COLLECTION[,FILTER]``: documents, polled (and watched)."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        check_freq(options)
        self.source = parse_uri(uri)
        self.uri = self.source.label
        self._options = options
        self.status = SourceStatus(self.uri)
        self._files: dict[str, _StaticFile] = {}
        # One read at a time, even while an abandoned one finishes.
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Send a snapshot after every successful read, forever; closes *send* on return."""
        async with send:
            client: MongoClient[dict[str, Any]] = MongoClient(
                self.source.hosts,
                serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
                connectTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
                socketTimeoutMS=SOCKET_TIMEOUT_MS,
                datetime_conversion=DatetimeConversion.DATETIME_MS,
                appname="trimperor",
                connect=False,
            )
            try:
                collection = client[self.source.database][self.source.collection]
                pokes_send, pokes_recv = trio.open_memory_channel[None](1)
                async with trio.open_nursery() as nursery:
                    task_status.started()
                    nursery.start_soon(self._watch, collection, pokes_send)
                    await self._poll(collection, send, pokes_recv)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(client.close)

    async def _poll(
        self,
        collection: Collection[dict[str, Any]],
        send: trio.MemorySendChannel[SourceEvent],
        pokes: trio.MemoryReceiveChannel[None],
    ) -> None:
        documents = LastGood[_Found](
            self.uri,
            lambda item: document_to_vassal(item[0], self.uri, self._options, item[1]),
            event="source.bad_document",
            what="document",
            logger=log,
        )
        while True:
            try:
                found = await trio.to_thread.run_sync(
                    self._read, collection, abandon_on_cancel=True, limiter=self._limiter
                )
            except PyMongoError as exc:
                await self.status.backoff(_describe(exc), report=send)
                continue
            docs = documents.snapshot(found)
            log.debug(
                "source.query uri=%s documents=%d vassals=%d", self.uri, len(found), len(docs)
            )
            self.status.ok(len(docs))
            await send.send(Snapshot(self.uri, docs))
            with trio.move_on_after(self._options.freq):
                await pokes.receive()

    def _read(self, collection: Collection[dict[str, Any]]) -> list[_Found]:
        """Every matching document, and the static file of those without config; blocking."""
        found: list[_Found] = []
        files: dict[str, _StaticFile] = {}
        for raw in collection.find(self.source.filter, _PROJECTION):
            name = raw.get("name")
            static = None
            if (
                isinstance(name, str)
                and not raw.get("config")
                and remote_name_problem(name, self._options.extra_extensions) is None
            ):
                static = files[name] = _read_static(name, self._files.get(name))
            found.append((raw, static))
        self._files = files
        return found

    async def _watch(
        self, collection: Collection[dict[str, Any]], pokes: trio.MemorySendChannel[None]
    ) -> None:
        """Poke the poller on every change, where the server has change streams."""
        token = trio.lowlevel.current_trio_token()
        while True:
            stop = threading.Event()
            try:
                await trio.to_thread.run_sync(
                    self._follow,
                    collection,
                    stop,
                    lambda: poke_from_thread(token, pokes),
                    abandon_on_cancel=True,
                )
            except OperationFailure as exc:
                log.info(
                    "source.change_stream_unavailable uri=%s error=%s poll_every=%ss",
                    self.uri,
                    _describe(exc),
                    self._options.freq,
                )
                return
            except PyMongoError as exc:
                log.debug("source.change_stream_lost uri=%s error=%s", self.uri, _describe(exc))
            finally:
                stop.set()
            await trio.sleep(self._options.freq)

    def _follow(
        self,
        collection: Collection[dict[str, Any]],
        stop: threading.Event,
        poke: Callable[[], None],
    ) -> None:
        """Follow the collection's change stream until *stop* is set; blocking."""
        with collection.watch(max_await_time_ms=WATCH_AWAIT_MS) as stream:
            log.info("source.watching uri=%s", self.uri)
            poke()  # changes before the stream opened
            while not stop.is_set():
                if stream.try_next() is not None:
                    poke()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OperationFailure):
        return error_text(exc, detail=str((exc.details or {}).get("errmsg") or exc))
    if isinstance(exc, ConnectionFailure):
        return error_text(exc, detail=re.split(r", Timeout:| \(configured timeouts", str(exc))[0])
    return error_text(exc)
