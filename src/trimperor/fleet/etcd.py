"""A small etcd v3 client on the JSON gateway, with h11 on trio sockets.

etcd serves its gRPC API as JSON over HTTP (``POST /v3/kv/range`` ...), keys
and values in base64, 64-bit numbers as strings. That needs no gRPC or
protobuf: HTTP/1.1 is spoken with h11 (the sans-io protocol library under
httpx) over trio's own sockets, so that a request cancelled or cut at any point
leaves no half-closed stream behind, and a watch is one socket for its life.
Only what trimperor uses is here: range, put, delete, two compare-and-set
transactions, watch (a streamed response, one JSON message per line), leases
(grant, keep-alive, revoke) and compaction (for the tests).

Every failure of the outside world (connection refused or lost, timeout, an
error answer) is an :class:`EtcdError`; a watch from a compacted revision is
:class:`Compacted`. With several endpoints, a request that cannot connect is
tried on the next one, each once.

:func:`follow` is the list-then-watch loop the etcd source and the fleet
membership share: a full list, then a watch from the next revision that
resumes after a lost connection from the last revision it applied, and lists
again if etcd has compacted that revision away.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from trimperor.core.errors import SourceError

try:
    import h11
except ImportError as exc:  # pragma: no cover - depends on the installation
    from trimperor.core.errors import MissingExtraError

    raise MissingExtraError("etcd", "etcd", exc.name or "h11") from None

__all__ = [
    "Compacted",
    "Cursor",
    "EtcdClient",
    "EtcdError",
    "KeyValue",
    "WatchEvent",
    "follow",
    "prefix_end",
]

log = logging.getLogger(__name__)

#: Longest line of a watch stream (one message, possibly many events) or answer.
MAX_MESSAGE = 64 * 1024 * 1024
#: Keys per range request.
PAGE = 256


class EtcdError(SourceError):
    """etcd could not be reached or refused a request."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str
    """``put`` or ``delete``."""
    kv: KeyValue


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise EtcdError("etcd sent invalid base64") from None


def _int(value: object) -> int:
    if value is None:
        return 0
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        raise EtcdError(f"etcd sent a bad number: {value!r}") from None


def _kv(raw: object) -> KeyValue:
    if not isinstance(raw, dict):
        raise EtcdError("etcd sent a malformed key-value")
    return KeyValue(
        key=_unb64(raw.get("key")),
        value=_unb64(raw.get("value")),
        mod_revision=_int(raw.get("mod_revision")),
        create_revision=_int(raw.get("create_revision")),
        lease=_int(raw.get("lease")),
    )


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with *prefix*."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return b"\0"  # every key


def _revision(answer: dict[str, Any]) -> int:
    header = answer.get("header")
    return _int(header.get("revision")) if isinstance(header, dict) else 0


class EtcdClient:
    """Requests to one etcd cluster, given its client endpoints (``host:port``).

    Use as ``async with EtcdClient([...]) as client``.
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._current = 0
        self._idle: list[_Connection] = []
        self._open = False

    async def __aenter__(self) -> EtcdClient:
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._open = False
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _next_endpoint(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    async def _connect(self, endpoint: str) -> _Connection:
        host, _, port = endpoint.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        return _Connection(stream, endpoint)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST *body* to *path*; the decoded answer. Raises EtcdError.

        A member that cannot be reached (refused, reset, silent past the
        client's timeout) is left for the next endpoint, each tried once. A
        caller that needs a shorter bound wraps the call in ``trio.fail_after``.
        """
        assert self._open, "use the client as an async context manager"
        data = json.dumps(body).encode()
        last: EtcdError | None = None
        for _ in self.endpoints:
            endpoint = self.endpoint
            try:
                with trio.fail_after(self.timeout):
                    status, content = await self._exchange(endpoint, path, data)
            except (_Failed, trio.TooSlowError) as exc:
                last = EtcdError(f"{endpoint}: {exc or 'no answer in time'}")
                self._next_endpoint()
                continue
            return _answer(endpoint, status, content)
        assert last is not None
        raise last

    async def _exchange(self, endpoint: str, path: str, data: bytes) -> tuple[int, bytes]:
        """One request on an idle connection (or a new one if that was stale)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.endpoint != endpoint:
                conn.close()
                continue
            try:
                answer = await conn.exchange(path, data)
            except _Stale:
                conn.close()
                continue
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return answer
        try:
            conn = await self._connect(endpoint)
        except OSError as exc:
            raise _Failed(f"cannot connect: {exc}") from None
        try:
            answer = await conn.exchange(path, data)
        except _Stale as exc:
            conn.close()
            raise _Failed(str(exc)) from None
        except BaseException:
            conn.close()
            raise
        self._release(conn)
        return answer

    def _release(self, conn: _Connection) -> None:
        if self._open and conn.reusable() and len(self._idle) < 16:
            self._idle.append(conn)
        else:
            conn.close()

    # -- kv ------------------------------------------------------------------------

    async def range(self, key: bytes, end: bytes | None = None) -> tuple[list[KeyValue], int]:
        """The key-values from *key* up to *end* (just *key* without), and the revision.

        Read in pages of :data:`PAGE` keys, all at the revision of the first
        page: one consistent view, however large, in bounded answers.
        """
        kvs: list[KeyValue] = []
        revision = 0
        start = key
        while True:
            body: dict[str, Any] = {"key": _b64(start), "limit": str(PAGE)}
            if end is not None:
                body["range_end"] = _b64(end)
            if revision:
                body["revision"] = str(revision)
            answer = await self.call("/v3/kv/range", body)
            page = answer.get("kvs") or []
            if not isinstance(page, list):
                raise EtcdError("etcd sent a malformed range answer")
            kvs += [_kv(kv) for kv in page]
            revision = revision or _revision(answer)
            if end is None or not answer.get("more") or not page:
                return kvs, revision
            start = kvs[-1].key + b"\0"

    async def range_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        return await self.range(prefix, prefix_end(prefix))

    async def count_prefix(self, prefix: bytes) -> tuple[int, int]:
        """How many keys start with *prefix*, and the revision (a cheap liveness probe)."""
        body = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "count_only": True}
        answer = await self.call("/v3/kv/range", body)
        return _int(answer.get("count")), _revision(answer)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self.call("/v3/kv/put", body))

    async def delete(self, key: bytes, end: bytes | None = None) -> int:
        body: dict[str, Any] = {"key": _b64(key)}
        if end is not None:
            body["range_end"] = _b64(end)
        return _revision(await self.call("/v3/kv/deleterange", body))

    async def create(self, key: bytes, value: bytes, lease: int = 0) -> bool:
        """Put *key* only if it does not exist; whether it was created."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        answer = await self.call(
            "/v3/kv/txn",
            {
                "compare": [{"target": "CREATE", "key": _b64(key), "create_revision": "0"}],
                "success": [{"request_put": put}],
            },
        )
        return bool(answer.get("succeeded"))

    async def delete_if_lease(self, key: bytes, lease: int) -> bool:
        """Delete *key* only if it is attached to *lease*; whether it was deleted."""
        answer = await self.call(
            "/v3/kv/txn",
            {
                "compare": [{"target": "LEASE", "key": _b64(key), "lease": str(lease)}],
                "success": [{"request_delete_range": {"key": _b64(key)}}],
            },
        )
        return bool(answer.get("succeeded"))

    async def compact(self, revision: int) -> None:
        await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases ----------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        lease = _int(answer.get("ID"))
        if not lease:
            raise EtcdError(f"lease not granted: {answer.get('error') or 'no ID'}")
        return lease

    async def keepalive(self, lease: int) -> int:
        """Renew *lease*; its new TTL, 0 if etcd no longer knows it (it expired)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result")
        if not isinstance(result, dict):
            raise EtcdError("etcd sent a malformed keep-alive answer")
        return _int(result.get("TTL"))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    # -- watch -------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(
        self, key: bytes, end: bytes | None, start_revision: int
    ) -> AsyncIterator[AsyncIterator[tuple[int, list[WatchEvent]]]]:
        """A watch from *start_revision*: yields an iterator of (revision, events).

        Raises :class:`Compacted` if that revision is gone, EtcdError when the
        stream breaks (the iterator never ends normally while etcd is there).

        The stream is read with h11 on a trio socket of its own: it lives as
        long as the watch, and ends with the block.
        """
        create: dict[str, Any] = {"key": _b64(key), "start_revision": str(start_revision)}
        if end is not None:
            create["range_end"] = _b64(end)
        body = json.dumps({"create_request": create}).encode()
        endpoint = self.endpoint
        try:
            with trio.fail_after(self.timeout):
                conn = await self._connect(endpoint)
        except (OSError, trio.TooSlowError) as exc:
            self._next_endpoint()
            raise EtcdError(f"cannot connect to {endpoint}: {exc or 'timeout'}") from None
        try:
            try:
                with trio.fail_after(self.timeout):
                    status = await conn.send_request("/v3/watch", body)
            except trio.TooSlowError:
                raise EtcdError(f"{endpoint}: no answer to the watch in time") from None
            except _Failed as exc:
                raise EtcdError(f"{endpoint}: watch: {exc}") from None
            if status != 200:
                raise EtcdError(f"{endpoint}: the watch answered HTTP {status}")
            yield _Messages(conn, endpoint)
        finally:
            conn.close()


class _Failed(Exception):
    """The connection broke or the peer spoke no HTTP."""


class _Stale(_Failed):
    """The peer closed the connection before answering (an idle one it dropped)."""


class _Connection:
    """One HTTP/1.1 connection (h11 on a trio socket): requests one at a time."""

    def __init__(self, stream: trio.SocketStream, endpoint: str) -> None:
        self._stream = stream
        self.endpoint = endpoint
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)

    def close(self) -> None:
        # SocketStream.aclose() only checkpoints after closing; close at once.
        self._stream.socket.close()

    def reusable(self) -> bool:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    async def send_request(self, target: str, body: bytes) -> int:
        """Send a POST of *body*; the answer's status code, once its headers are in."""
        conn = self._conn
        headers = [
            ("Host", self.endpoint),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
        data = conn.send(h11.Request(method="POST", target=target, headers=headers)) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            await self._stream.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Stale(f"{type(exc).__name__}: {exc}") from None
        first = True
        while True:
            event = await self._next(stale_ok=first)
            first = False
            if isinstance(event, h11.Response):
                return event.status_code

    async def exchange(self, target: str, body: bytes) -> tuple[int, bytes]:
        status = await self.send_request(target, body)
        content = bytearray()
        while (chunk := await self.chunk()) is not None:
            content += chunk
            if len(content) > MAX_MESSAGE:
                raise _Failed(f"an answer over {MAX_MESSAGE} bytes")
        return status, bytes(content)

    async def _next(self, stale_ok: bool = False) -> object:
        while True:
            try:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self._stream.receive_some(65536)
                    if not data and stale_ok:
                        raise _Stale("the connection was closed before an answer")
                    self._conn.receive_data(data)
                    continue
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if stale_ok:
                    raise _Stale(f"{type(exc).__name__}: {exc}") from None
                raise _Failed(f"{type(exc).__name__}: {exc}") from None
            except h11.ProtocolError as exc:
                raise _Failed(f"{type(exc).__name__}: {exc}") from None
            if isinstance(event, h11.ConnectionClosed):
                raise _Failed("the connection was closed")
            return event

    async def chunk(self) -> bytes | None:
        """The next piece of the answer's body; None at its end."""
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None


class _Messages:
    """The messages of a watch stream, one JSON object per line."""

    def __init__(self, conn: _Connection, endpoint: str) -> None:
        self._conn = conn
        self._endpoint = endpoint
        self._buffer = b""
        self._lines: list[bytes] = []

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> tuple[int, list[WatchEvent]]:
        while True:
            while self._lines:
                line = self._lines.pop(0)
                if line.strip():
                    message = _watch_message(line)
                    if message is not None:
                        return message
            try:
                chunk = await self._conn.chunk()
            except _Failed as exc:
                raise EtcdError(f"{self._endpoint}: watch: {exc}") from None
            if chunk is None:
                raise EtcdError(f"{self._endpoint}: the watch stream ended")
            self._buffer += chunk
            if b"\n" not in chunk:
                if len(self._buffer) > MAX_MESSAGE:
                    raise EtcdError(f"a watch message over {MAX_MESSAGE} bytes")
                continue
            *self._lines, self._buffer = self._buffer.split(b"\n")


def _answer(endpoint: str, status: int, content: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise EtcdError(f"{endpoint}: answered {status} with no JSON object")
    if status != 200 or "error" in answer:
        message = answer.get("message") or answer.get("error") or f"HTTP {status}"
        raise EtcdError(f"{endpoint}: {str(message)[:200]}")
    return answer


def _watch_message(line: bytes) -> tuple[int, list[WatchEvent]] | None:
    try:
        message = json.loads(line)
    except ValueError:
        raise EtcdError("etcd sent a watch message that is not JSON") from None
    if not isinstance(message, dict):
        raise EtcdError("etcd sent a malformed watch message")
    if "error" in message:
        error = message["error"]
        text = error.get("message") if isinstance(error, dict) else error
        raise EtcdError(f"watch failed: {str(text)[:200]}")
    result = message.get("result")
    if not isinstance(result, dict):
        raise EtcdError("etcd sent a malformed watch message")
    if result.get("canceled"):
        compact = _int(result.get("compact_revision"))
        if compact:
            raise Compacted(compact)
        raise EtcdError(f"watch canceled: {str(result.get('cancel_reason') or '')[:200]}")
    raw_events = result.get("events") or []
    if not isinstance(raw_events, list):
        raise EtcdError("etcd sent malformed watch events")
    events = [
        WatchEvent("delete" if ev.get("type") == "DELETE" else "put", _kv(ev.get("kv")))
        for ev in raw_events
        if isinstance(ev, dict)
    ]
    if result.get("created") and not events:
        return None
    return _revision(result), events


class Cursor:
    """Where a :func:`follow` loop is: the last revision applied (0: list first)."""

    def __init__(self) -> None:
        self.revision = 0


async def follow(
    client: EtcdClient,
    prefix: bytes,
    cursor: Cursor,
    *,
    on_list: Callable[[list[KeyValue], int], Awaitable[None]],
    on_events: Callable[[list[WatchEvent], int], Awaitable[None]],
) -> None:
    """List *prefix*, then watch it; returns only by raising EtcdError.

    With a revision in *cursor* (from an earlier call that failed), the watch
    resumes after it without listing; if etcd has compacted it, or without
    one, a full list comes first (*on_list*). *cursor* follows what was applied.
    """
    end = prefix_end(prefix)
    while True:
        if not cursor.revision:
            kvs, revision = await client.range(prefix, end)
            await on_list(kvs, revision)
            cursor.revision = revision
        try:
            async with client.watch(prefix, end, cursor.revision + 1) as messages:
                async for rev, events in messages:
                    if events:
                        revision = max(cursor.revision, *(e.kv.mod_revision for e in events))
                        await on_events(events, revision)
                        cursor.revision = revision
                    elif rev > cursor.revision:
                        cursor.revision = rev
        except Compacted as exc:
            log.info(
                "etcd.compacted endpoint=%s revision=%d oldest=%d; listing again",
                client.endpoint,
                cursor.revision,
                exc.compact_revision,
            )
            cursor.revision = 0
