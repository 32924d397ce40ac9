"""The ``etcd://`` source: vassal configurations as keys of an etcd v3 cluster.

``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``: the vassals are the keys
``PREFIX/vassals/NAME`` (NAME with its extension, ``app.ini``). A key's value
is the configuration itself, or a JSON envelope ``{"config": "...", "socket":
"...", "uid": 1000, "gid": 1000}`` (an object with a ``config`` string and no
other keys than those four; ``socket`` makes the vassal on demand). The
version of a vassal is the key's ``mod_revision``.

The monitor lists the prefix (a :class:`~trimperor.core.model.Snapshot`), then
watches it from the next revision: a put is an
:class:`~trimperor.core.model.Upsert`, a delete a :class:`~trimperor.core.model.Remove`.
After a lost connection it watches again from the last revision it applied,
so that nothing made meanwhile is missed; if etcd has compacted that revision
away, it lists again (a new snapshot). An unreachable cluster stops nothing:
the monitor reports the problem once, backs off and retries. While a watch is
open, a cheap count request every ``freq`` seconds proves the member is still
there (a silent network does not end a stream).

A bad key (a name that is not a vassal name, or a value that is not UTF-8,
too large, or a broken envelope) gets one log line and is left out; a name
whose value turns bad keeps its last good configuration.

Requests go to etcd's JSON gateway over HTTP (``trimperor[etcd]``, httpx):
plain ``http://`` endpoints; put TLS in front with a local proxy if needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Remove, Snapshot, SourceEvent, Upsert, VassalDocument
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    BadVassal,
    LastGood,
    SourceStatus,
    check_freq,
    check_or_raise,
    parse_id,
    short,
)

with kit.driver_imports(__name__):
    from trimperor.fleet.etcd import Cursor, EtcdClient, EtcdError, KeyValue, WatchEvent, follow

__all__ = ["EtcdMonitor", "kv_document", "parse_etcd_uri"]

log = logging.getLogger(__name__)

#: What an envelope may hold besides the configuration.
_ENVELOPE_KEYS = frozenset({"config", "socket", "uid", "gid"})
#: Bytes an envelope may add to --max-config-size (quoting, the other fields).
_ENVELOPE_SLACK = 4096


def parse_etcd_uri(uri: str, scheme: str = "etcd") -> tuple[tuple[str, ...], str]:
    """``etcd://h1:p1,h2:p2/PREFIX`` -> (endpoints, prefix without a trailing ``/``).

    Raises UsageError.
    """
    head = f"{scheme}://"
    if not uri.startswith(head):
        raise UsageError(f"not an {head} URI: {uri!r}")
    hosts, slash, path = uri.removeprefix(head).partition("/")
    endpoints = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"{uri!r}: {item!r} is not HOST:PORT")
        endpoints.append(f"{host}:{port}")
    prefix = (slash + path).rstrip("/")
    if any(c in prefix for c in "\0\n"):
        raise UsageError(f"{uri!r}: the prefix holds a NUL or newline")
    return tuple(endpoints), prefix


def kv_document(
    kv: KeyValue, vassals: bytes, source: str, options: MonitorOptions
) -> VassalDocument:
    """The vassal of the key-value *kv* (its key under *vassals*); raises BadVassal."""
    try:
        name = kv.key.removeprefix(vassals).decode("utf-8")
    except UnicodeDecodeError:
        raise BadVassal(None, f"key {kv.key!r} is not UTF-8") from None
    limit = options.max_config_size + _ENVELOPE_SLACK
    if len(kv.value) > limit:
        raise BadVassal(
            name,
            f"the value of {name!r} is {len(kv.value)} bytes, over --max-config-size "
            f"({options.max_config_size})",
        )
    try:
        text = kv.value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadVassal(name, "the value is not UTF-8") from None
    uid = gid = None
    socket = None
    envelope = _envelope(text)
    if envelope is not None:
        config = envelope.get("config")
        if not isinstance(config, str):
            raise BadVassal(name, "the envelope's config is not a string")
        raw_socket = envelope.get("socket")
        if raw_socket is not None and not isinstance(raw_socket, str):
            raise BadVassal(name, "the envelope's socket is not a string")
        try:
            uid = parse_id(envelope.get("uid"), "uid")
            gid = parse_id(envelope.get("gid"), "gid")
        except ValueError as exc:
            raise BadVassal(name, str(exc)) from None
        text, socket = config, raw_socket or None
    doc = VassalDocument(
        name=name,
        source=source,
        version=str(kv.mod_revision),
        text=text,
        uid=uid,
        gid=gid,
        socket=socket,
    )
    check_or_raise(doc, options)
    return doc


def _envelope(text: str) -> dict[str, object] | None:
    """The envelope *text* is, or None if it is a plain configuration."""
    if not text.lstrip().startswith("{") or '"config"' not in text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and "config" in value and set(value) <= _ENVELOPE_KEYS:
        return value
    return None


class EtcdMonitor:
    """``etcd://HOST:PORT[,...]/PREFIX``: the keys ``PREFIX/vassals/NAME``, listed and watched."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        check_freq(options)
        self.endpoints, self.prefix = parse_etcd_uri(uri)
        self.uri = uri
        self._vassals = (self.prefix + "/vassals/").encode()
        self._options = options
        self.status = SourceStatus(uri)
        self._docs = LastGood(
            uri,
            self._parse,
            event="source.bad_key",
            what="key",
            logger=log,
            shown=lambda name: short(repr(name)),
        )
        self._client: EtcdClient | None = None

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        async with send:
            task_status.started()
            cursor = Cursor()
            async with EtcdClient(self.endpoints, timeout=10.0) as client:
                self._client = client
                while True:
                    try:
                        await self._session(client, cursor, send)
                    except EtcdError as exc:
                        await self.status.backoff(str(exc), report=send)

    async def _session(
        self,
        client: EtcdClient,
        cursor: Cursor,
        send: trio.MemorySendChannel[SourceEvent],
    ) -> None:
        failure: list[EtcdError] = []

        async def watch() -> None:
            await follow(
                client,
                self._vassals,
                cursor,
                on_list=lambda kvs, rev: self._listed(kvs, rev, send),
                on_events=lambda events, rev: self._events(events, send),
            )

        async def guarded(fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except EtcdError as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, watch)
            nursery.start_soon(guarded, lambda: self._probe(client))
        if failure:
            raise failure[0]

    async def _probe(self, client: EtcdClient) -> None:
        """A count request every freq seconds: the member still answers."""
        while True:
            await trio.sleep(self._options.freq)
            bound = max(self._options.freq, 2.0)
            try:
                with trio.fail_after(bound):
                    await client.count_prefix(self._vassals)
            except trio.TooSlowError:
                raise EtcdError(f"{client.endpoint}: no answer in {bound:.1f}s") from None
            self.status.ok()

    @property
    def _endpoint(self) -> str:
        return self._client.endpoint if self._client is not None else "-"

    def _parse(self, kv: KeyValue) -> VassalDocument:
        return kv_document(kv, self._vassals, self.uri, self._options)

    async def _listed(
        self, kvs: list[KeyValue], revision: int, send: trio.MemorySendChannel[SourceEvent]
    ) -> None:
        docs = self._docs.snapshot(kvs)
        log.info(
            "source.listed uri=%s endpoint=%s revision=%d vassals=%d",
            self.uri,
            self._endpoint,
            revision,
            len(docs),
        )
        self.status.ok(len(docs))
        await send.send(Snapshot(self.uri, docs))

    async def _events(
        self, events: list[WatchEvent], send: trio.MemorySendChannel[SourceEvent]
    ) -> None:
        for event in events:
            if event.type == "delete":
                try:
                    name = event.kv.key.removeprefix(self._vassals).decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if self._docs.forget(name):
                    await send.send(Remove(self.uri, name))
                continue
            doc = self._docs.change(event.kv)
            if doc is not None:
                await send.send(Upsert(doc))
        self.status.ok(len(self._docs.good))
