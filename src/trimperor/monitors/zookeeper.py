"""The ``zoo://`` source: vassal configurations as the children of a znode.

``zoo://[user:password@]host[:port][,host[:port]...]/path[?timeout=SECONDS]``
(port 2181 by default; ``timeout`` is the session timeout asked of the
ensemble, 10 s by default, which the servers bound to 2 to 20 ticks). Each
child znode of *path* is a vassal: its name is the vassal's name with its
extension (``app.ini``), its data the configuration, and its ``mzxid`` (the
transaction that last modified it) plays the part of pg's ``ts``: a change
of data reloads the vassal, a deleted znode stops it.

Optional sibling znodes carry the extra fields of the other sources, each as
plain text: ``app.ini.socket`` (the on-demand socket; empty or absent means
"not on demand"), ``app.ini.uid`` and ``app.ini.gid`` (the owner, for tyrant
mode). A change of a sibling reloads its vassal like a change of the
configuration. A sibling without its vassal is ignored.

Credentials for digest ACLs come from the URI's userinfo or, for a URI
without one, from ``--zoo-auth-file`` (one line ``user:password``). They are
never logged: the source is named with the password hidden.

kazoo runs the session in its own threads. Its state changes and watch
notifications enter Trio with :meth:`trio.lowlevel.TrioToken.run_sync_soon`
into an unbounded channel; that is bounded in practice because ZooKeeper
fires each watch at most once until it is set again, and only a read sets it
again. Reads are kazoo's asynchronous requests (``get_async``, pipelined),
sent by its connection thread; their completions wake the task the same way.
The task reads one change at a time. After every (re)connection (kazoo forgets its
watches on every disconnection, and a new session has none) the monitor lists
and reads everything again, setting every watch again, and sends a full
:class:`~trimperor.core.model.Snapshot`; between, each change is read alone and
sent as an :class:`~trimperor.core.model.Upsert` or :class:`~trimperor.core.model.Remove`.

A lost connection, a partition, an expired session or a stopped ensemble
sends nothing that could stop a vassal: the monitor reports the problem once,
kazoo reconnects (within about a second of the servers' return), and the
snapshot that follows carries what changed meanwhile. A missing *path* or an
ACL that forbids listing it is a problem too, retried with backoff (and at
once when the path is created), never an empty snapshot.

A child that is not a vassal (no known extension), data over
``--max-config-size``, data that is not UTF-8, a sibling that does not parse
(``app.ini.uid`` that is not a number), or a znode the ACL does not let us
read is logged once (``source.bad_znode``) and left out; if the vassal had a
good configuration, that one stays. ZooKeeper itself refuses names with
``/``, ``.`` or ``..``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, unquote

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import (
    Remove,
    Snapshot,
    SourceEvent,
    SourceProblem,
    Upsert,
    VassalDocument,
    remote_name_problem,
)
from trimperor.core.stats import SourceStats
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    BadVassal,
    SourceStatus,
    check_or_raise,
    error_text,
    plugin_options,
    quiet_driver_log,
    short,
    unix_time,
)

with kit.driver_imports(__name__):
    from kazoo.client import KazooClient, KazooState
    from kazoo.exceptions import KazooException, NoAuthError, NoNodeError
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.protocol.states import KeeperState, WatchedEvent
    from kazoo.retry import KazooRetry

__all__ = ["SIBLINGS", "ZooAddress", "ZooMonitor", "ZooOptions", "ZooStatus", "parse_uri"]

log = logging.getLogger(__name__)

# kazoo logs every failed connection attempt; this module logs the outage once.
quiet_driver_log("kazoo", logging.ERROR)

DEFAULT_PORT = 2181
#: Session timeout asked of the ensemble unless the URI sets ``timeout``.
SESSION_TIMEOUT = 10.0
#: A source not connected after this long is reported (kazoo keeps trying).
CONNECT_TIMEOUT = 5.0
#: One listing or read that takes longer counts as a failure.
READ_TIMEOUT = 30.0
#: How long closing the session may delay a shutdown.
STOP_TIMEOUT = 5.0
#: kazoo's reconnection delays: from 0.1 s, doubling, at most this long.
RECONNECT_MAX = 1.0
#: Retrying a missing path or a refused listing: first delay, doubling up to the last.
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
#: Sibling znodes and what they set; their data is at most SIBLING_MAX bytes.
SIBLINGS = (".socket", ".uid", ".gid")
SIBLING_MAX = 4096


# -- the URI -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZooAddress:
    """Where the vassals are, from a ``zoo://`` URI."""

    hosts: str
    """``host:port,host:port`` as kazoo takes it."""
    path: str
    user: str | None = None
    password: str | None = None
    session_timeout: float = SESSION_TIMEOUT


def parse_uri(uri: str) -> ZooAddress:
    """``zoo://[user:password@]host[:port][,...]/path[?timeout=S]``; raises UsageError."""
    # A malformed URI may hold a password anywhere before its last '@'.
    shown = "zoo://***@" + uri.rpartition("@")[2] if "@" in uri else uri
    if not uri.startswith("zoo://"):
        raise UsageError(f"not a zoo:// URI: {shown!r}")
    rest, _, query = uri.removeprefix("zoo://").partition("?")
    netloc, slash, path = rest.partition("/")
    creds, at, hostlist = netloc.rpartition("@")
    user = password = None
    if at:
        raw_user, colon, raw_password = creds.partition(":")
        if not raw_user or not colon:
            raise UsageError(f"{shown}: credentials must be user:password")
        user, password = unquote(raw_user), unquote(raw_password)
    hosts = [_host(h, shown) for h in hostlist.split(",")]
    path = "/" + path.strip("/") if slash else ""
    if not path:
        raise UsageError(f"{shown}: no path (zoo://host:port/path: its children are the vassals)")
    parts = path.split("/")[1:]
    if any(p in {"", ".", ".."} for p in parts if path != "/") or "\0" in path:
        raise UsageError(f"{shown}: bad znode path {path!r}")
    timeout = SESSION_TIMEOUT
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key != "timeout":
            raise UsageError(f"{shown}: unknown parameter {key!r} (known: timeout)")
        try:
            timeout = float(values[-1])
        except ValueError:
            timeout = math.nan
        if not 0.1 <= timeout <= 3600:
            raise UsageError(f"{shown}: timeout must be seconds between 0.1 and 3600")
    return ZooAddress(",".join(hosts), path, user, password, timeout)


def _host(text: str, shown: str) -> str:
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        addr, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
        host = f"[{addr}]"
    else:
        addr, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        host = addr
    if not addr:
        raise UsageError(f"{shown}: no host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        # Quoted only if no password can be in it (see parse_uri).
        raise UsageError(f"{shown}: bad port" + ("" if "***" in shown else f" {port!r}"))
    return f"{host}:{port or DEFAULT_PORT}"


def read_auth_file(path: str) -> tuple[str, str]:
    """``user:password`` from the first line of *path*; raises UsageError."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline(4096).rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --zoo-auth-file {path}: {exc}") from None
    user, colon, password = line.partition(":")
    if not user or not colon:
        raise UsageError(f"--zoo-auth-file {path}: the first line must be user:password")
    return user, password


def _label(uri: str) -> str:
    """*uri* with the password hidden (an '@' in the password too)."""
    rest = uri.removeprefix("zoo://")
    netloc = rest.partition("/")[0].partition("?")[0]
    if "@" not in netloc:
        return uri
    creds, _, hosts = netloc.rpartition("@")
    return "zoo://" + creds.partition(":")[0] + ":***@" + hosts + rest[len(netloc) :]


# -- znodes to documents ------------------------------------------------------------------


def sibling_of(name: str, extra_extensions: Iterable[str] = ()) -> tuple[str, str] | None:
    """``(vassal, field)`` if *name* is a sibling znode (``app.ini.socket``), else None."""
    for suffix in SIBLINGS:
        stem = name.removesuffix(suffix)
        if stem != name and remote_name_problem(stem, extra_extensions) is None:
            return stem, suffix[1:]
    return None


def vassal_of(name: str, extra_extensions: Iterable[str] = ()) -> str:
    """The vassal a change of the znode *name* concerns."""
    sibling = sibling_of(name, extra_extensions)
    return sibling[0] if sibling is not None else name


#: What a read of a znode gave: (data, mzxid), or why it cannot be read.
Node = tuple[bytes, int] | str


def _sibling_text(name: str, node: Node) -> str:
    if isinstance(node, str):
        raise BadVassal(name.rpartition(".")[0], f"{name}: {node}")
    data = node[0]
    if len(data) > SIBLING_MAX:
        raise BadVassal(name.rpartition(".")[0], f"{name} is over {SIBLING_MAX} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadVassal(name.rpartition(".")[0], f"{name} is not UTF-8 text") from None


def _id(name: str, text: str) -> int | None:
    if not text:
        return None
    if not text.isascii() or not text.isdigit():
        raise BadVassal(
            name.rpartition(".")[0], f"{name} is not a non-negative integer: {short(text)!r}"
        )
    return int(text)


def build_document(
    name: str, nodes: dict[str, Node], source: str, options: MonitorOptions
) -> VassalDocument:
    """The vassal *name* from the znodes read (its own and its siblings'); raises BadVassal."""
    problem = remote_name_problem(name, options.extra_extensions)
    if problem is not None:
        raise BadVassal(name, problem)
    node = nodes[name]
    if isinstance(node, str):
        raise BadVassal(name, node)
    data, mzxid = node
    if len(data) > options.max_config_size:
        raise BadVassal(
            name,
            f"configuration of {name!r} is {len(data)} bytes, over --max-config-size "
            f"({options.max_config_size})",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadVassal(name, f"the data is not UTF-8 text (byte {exc.start})") from None
    version = str(mzxid)
    fields: dict[str, str] = {}
    for suffix in SIBLINGS:
        sibling = nodes.get(name + suffix)
        if sibling is not None:
            fields[suffix[1:]] = _sibling_text(name + suffix, sibling)
            if not isinstance(sibling, str):
                version += f"+{suffix[1:]}@{sibling[1]}"
    doc = VassalDocument(
        name=name,
        source=source,
        version=version,
        text=text,
        uid=_id(name + ".uid", fields.get("uid", "")),
        gid=_id(name + ".gid", fields.get("gid", "")),
        socket=fields.get("socket") or None,
    )
    check_or_raise(doc, options)
    return doc


class _Offer:
    """What the monitor has told the emperor: each vassal's last good document.

    A bad znode is logged at WARNING the first time and at DEBUG while its
    reason stays the same; if its vassal had a good document, that one stays.
    """

    def __init__(self, source: str) -> None:
        self._source = source
        self.sent: dict[str, VassalDocument] = {}
        self._reported: dict[str, str] = {}

    def update(self, name: str, result: VassalDocument | BadVassal | None) -> SourceEvent | None:
        """The event, if any, that tells the emperor *name* is now *result* (None: gone)."""
        if result is None:
            self._reported.pop(name, None)
            if self.sent.pop(name, None) is not None:
                return Remove(self._source, name)
            return None
        if isinstance(result, BadVassal):
            self._report(name, result.reason, name in self.sent)
            return None
        self._reported.pop(name, None)
        if self.sent.get(name) == result:
            return None
        self.sent[name] = result
        return Upsert(result)

    def snapshot(self, results: dict[str, VassalDocument | BadVassal]) -> Snapshot:
        sent: dict[str, VassalDocument] = {}
        for name, result in results.items():
            if isinstance(result, BadVassal):
                kept = self.sent.get(name)
                self._report(name, result.reason, kept is not None)
                if kept is not None:
                    sent[name] = kept
            else:
                self._reported.pop(name, None)
                sent[name] = result
        self._reported = {n: r for n, r in self._reported.items() if n in results}
        self.sent = sent
        return Snapshot(self._source, tuple(sent[n] for n in sorted(sent)))

    def _report(self, name: str, reason: str, kept: bool) -> None:
        again = self._reported.get(name) == reason
        self._reported[name] = reason
        log.log(
            logging.DEBUG if again else logging.WARNING,
            "source.bad_znode uri=%s name=%s reason=%s%s",
            self._source,
            short(name),
            reason,
            "; keeping its last good configuration" if kept else "",
        )


# -- status ----------------------------------------------------------------------------


class ZooStatus(SourceStatus):
    """A :class:`SourceStatus` with kazoo's states (``connecting``, ``connected``,
    ``suspended``, ``lost``), the session id and the time of the last event."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.state = "connecting"
        self.session: str | None = None
        self.last_event: float | None = None

    def event(self) -> None:
        self.last_event = unix_time()

    def snapshot(self) -> SourceStats:
        return replace(super().snapshot(), session=self.session, last_event=self.last_event)


# -- kazoo to trio ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StateNote:
    state: str


@dataclass(frozen=True, slots=True)
class _WatchNote:
    path: str | None
    kind: str


_Note = _StateNote | _WatchNote


class _Bridge:
    """Hands calls from kazoo's threads to the Trio task that made it."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.send, self.recv = trio.open_memory_channel[_Note](math.inf)

    def post(self, note: _Note) -> None:
        """From any thread."""
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._deliver, note)

    def _deliver(self, note: _Note) -> None:
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self.send.send_nowait(note)

    def on_state(self, state: str) -> None:
        """kazoo's connection listener (its connection thread)."""
        self.post(_StateNote(str(state)))

    def on_watch(self, event: WatchedEvent) -> None:
        """kazoo's watch callback (its callback thread); one bound method for every watch,
        so that setting a watch again on the same znode does not add a callback."""
        self.post(_WatchNote(event.path, str(event.type)))


_READ_ERRORS = (KazooException, KazooTimeoutError, trio.TooSlowError)


class _Failed(Exception):
    """Reading failed in a way that another reconnection will not mend by itself."""


# -- the monitor ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZooOptions:
    """What zoo:// sources take from the command line (plugin ``zoo``)."""

    auth_file: str | None = None
    """Without credentials in the URI: ``user:password`` from this file (``--zoo-auth-file``)."""


class ZooMonitor:
    """``zoo://hosts/path``: the children of a znode, watched."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        self.address = parse_uri(uri)
        self.uri = _label(uri)
        self._options = options
        self._auth: tuple[str, str] | None = None
        if self.address.user is not None and self.address.password is not None:
            self._auth = (self.address.user, self.address.password)
        elif (auth_file := plugin_options(ZooOptions, options, "zoo").auth_file) is not None:
            self._auth = read_auth_file(auth_file)
        self.status = ZooStatus(self.uri)
        self._in_outage = False
        self._last_failure: str | None = None

    def _client(self) -> KazooClient:
        return KazooClient(
            hosts=self.address.hosts,
            timeout=self.address.session_timeout,
            auth_data=[("digest", f"{self._auth[0]}:{self._auth[1]}")] if self._auth else None,
            connection_retry=KazooRetry(
                max_tries=-1, delay=0.1, backoff=2, max_jitter=0.1, max_delay=RECONNECT_MAX
            ),
            randomize_hosts=True,
        )

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Follow the children of the path forever; closes *send* on return."""
        async with send:
            task_status.started()
            offer = _Offer(self.uri)
            while True:
                try:
                    await self._session(send, offer)
                except _Failed as exc:
                    await self.status.backoff(str(exc), report=None if self._in_outage else send)
                    self._in_outage = True

    async def _session(self, send: trio.MemorySendChannel[SourceEvent], offer: _Offer) -> None:
        """One kazoo client, through its reconnections, until authentication fails."""
        bridge = _Bridge()
        client = self._client()
        client.add_listener(bridge.on_state)
        tree = _Tree(self, client, bridge.on_watch, offer, send)
        connected = False
        try:
            await trio.to_thread.run_sync(client.start_async)
            wake_at = trio.current_time() + CONNECT_TIMEOUT
            while True:
                notes = await _receive(bridge.recv, wake_at)
                wake_at = math.inf
                if notes is None and not connected:
                    await self._outage(
                        send, f"no server of {self.address.hosts} answers yet (still trying)"
                    )
                for note in notes or ():
                    self.status.event()
                    if isinstance(note, _WatchNote):
                        tree.fired(note.path)
                    else:
                        connected = await self._state(note.state, client, send, tree)
                if not connected or not tree.pending():
                    continue
                try:
                    with trio.fail_after(READ_TIMEOUT):
                        await tree.refresh()
                except _READ_ERRORS as exc:
                    self._read_failed(exc)
                    await self._outage(send, _describe(exc))
                    wake_at = trio.current_time() + tree.retry_delay
                    tree.retry_delay = min(tree.retry_delay * 2, RETRY_MAX)
                else:
                    if tree.pending():  # a read found more to read
                        wake_at = trio.current_time()
                    tree.retry_delay = RETRY_FIRST
                    self._last_failure = None
                    if self._in_outage:
                        log.info("source.recovered uri=%s", self.uri)
                        self._in_outage = False
        finally:
            bridge.send.close()
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                await trio.to_thread.run_sync(_close, client, abandon_on_cancel=True)

    async def _state(
        self,
        state: str,
        client: KazooClient,
        send: trio.MemorySendChannel[SourceEvent],
        tree: _Tree,
    ) -> bool:
        """Act on a kazoo state change; returns whether the client is connected."""
        if state == KazooState.CONNECTED:
            session_id = client.client_id[0] if client.client_id else None
            session = f"0x{session_id:x}" if session_id is not None else None
            same = session == self.status.session
            self.status.session = session
            self.status.state = "connected"
            self.status.attempt = 0
            self.status.next_retry = None
            log.info(
                "source.connected uri=%s session=%s%s",
                self.uri,
                session,
                " (resumed)" if same else "",
            )
            tree.resync()
            return True
        if state == KazooState.SUSPENDED:
            self.status.state = "suspended"
            log.warning(
                "source.suspended uri=%s session=%s: connection lost, reconnecting; "
                "vassals keep running",
                self.uri,
                self.status.session,
            )
            await self._outage(send, "connection to ZooKeeper lost (suspended)")
            return False
        # LOST: the session expired (kazoo then starts a new one), or the client
        # stopped: authentication failed (SASL; digest credentials never fail
        # here, the ACLs do), after which kazoo does not reconnect.
        self.status.state = "lost"
        if client.client_state in {KeeperState.AUTH_FAILED, KeeperState.CLOSED}:
            raise _Failed(f"the ZooKeeper client stopped ({client.client_state})")
        log.warning(
            "source.session_lost uri=%s session=%s: a new session follows; vassals keep running",
            self.uri,
            self.status.session,
        )
        await self._outage(send, "ZooKeeper session lost")
        return False

    async def _outage(self, send: trio.MemorySendChannel[SourceEvent], message: str) -> None:
        """Record a problem; the first one since the last good read is also sent."""
        self.status.last_error = message
        if not self._in_outage:
            self._in_outage = True
            await send.send(SourceProblem(self.uri, message))

    def _read_failed(self, exc: BaseException) -> None:
        reason = _describe(exc)
        log.log(
            logging.WARNING if reason != self._last_failure else logging.DEBUG,
            "source.read_failed uri=%s path=%s error=%s",
            self.uri,
            self.address.path,
            reason,
        )
        self._last_failure = reason


async def _receive(recv: trio.MemoryReceiveChannel[_Note], deadline: float) -> list[_Note] | None:
    """The next notes (all that are waiting), or None at *deadline*."""
    with trio.move_on_at(deadline):
        notes = [await recv.receive()]
        while True:
            try:
                notes.append(recv.receive_nowait())
            except trio.WouldBlock:
                return notes
    return None


def _close(client: KazooClient) -> None:
    try:
        client.stop()
    finally:
        client.close()


def _describe(exc: BaseException) -> str:
    return error_text(exc, too_slow=f"a read took longer than {READ_TIMEOUT:.0f}s")


# -- the tree -----------------------------------------------------------------------------


class _Tree:
    """The children of the path as last read, and what is to be read again."""

    def __init__(
        self,
        monitor: ZooMonitor,
        client: KazooClient,
        watch: Callable[[WatchedEvent], None],
        offer: _Offer,
        send: trio.MemorySendChannel[SourceEvent],
    ) -> None:
        self._monitor = monitor
        self._path = monitor.address.path
        self._client = client
        self._watch = watch
        self._offer = offer
        self._send = send
        self._extra = monitor._options.extra_extensions
        self.children: set[str] = set()
        self.nodes: dict[str, Node] = {}
        self.full = True
        self.children_dirty = False
        self.dirty: set[str] = set()
        self.retry_delay = RETRY_FIRST

    def _znode(self, name: str) -> str:
        return self._path.rstrip("/") + "/" + name

    def _vassal_of(self, name: str) -> str:
        return vassal_of(name, self._extra)

    def resync(self) -> None:
        """After a (re)connection: everything is read again (the watches are gone)."""
        self.full = True

    def fired(self, path: str | None) -> None:
        if path is None:  # a session event given to the watches: read everything
            self.full = True
        elif path == self._path:
            self.children_dirty = True
        elif os.path.dirname(path) == self._path:
            self.dirty.add(os.path.basename(path))

    def pending(self) -> bool:
        return self.full or self.children_dirty or bool(self.dirty)

    async def refresh(self) -> None:
        """Read what is to be read; send what changed. Raises KazooException."""
        if self.full:
            await self._read_all()
        else:
            if self.children_dirty:
                await self._read_children()
            if self.dirty:
                names, self.dirty = self.dirty, set()
                await self._read_nodes(names & self.children)

    async def _read_all(self) -> None:
        self.children_dirty = False
        self.dirty.clear()
        children = await self._list()
        nodes = await self._read(children)
        self.full = False
        self.children = set(children)
        self.nodes = nodes
        options = self._monitor._options
        results: dict[str, VassalDocument | BadVassal] = {}
        for name in self.children:
            if self._vassal_of(name) == name:
                result = self._build(name, options)
                if result is not None:
                    results[name] = result
            elif self._vassal_of(name) not in self.children:
                log.debug("source.lone_sibling uri=%s name=%s", self._monitor.uri, short(name))
        snapshot = self._offer.snapshot(results)
        self._monitor.status.ok(len(snapshot.docs))
        log.debug(
            "source.listed uri=%s znodes=%d vassals=%d",
            self._monitor.uri,
            len(children),
            len(snapshot.docs),
        )
        await self._send.send(snapshot)

    async def _read_children(self) -> None:
        self.children_dirty = False
        known = frozenset(self.children)
        children = await self._list()
        fresh = await self._read(set(children) - known)
        new = set(children) - known
        gone = known - set(children)
        self.children = set(children)
        for name in gone:
            self.nodes.pop(name, None)
        self.nodes.update(fresh)
        await self._changed({self._vassal_of(n) for n in new | gone})

    async def _read_nodes(self, names: set[str]) -> None:
        fresh = await self._read(names)
        for name in names - set(fresh):  # gone meanwhile: the children watch tells
            self.nodes.pop(name, None)
            self.children_dirty = True
        self.nodes.update(fresh)
        await self._changed({self._vassal_of(n) for n in names})

    async def _changed(self, vassals: Iterable[str]) -> None:
        options = self._monitor._options
        events = []
        for name in sorted(vassals):
            event = self._offer.update(name, self._build(name, options))
            if event is not None:
                log.debug("source.change uri=%s name=%s", self._monitor.uri, short(name))
                events.append(event)
        self._monitor.status.ok(len(self._offer.sent))
        for event in events:
            await self._send.send(event)

    def _build(self, name: str, options: MonitorOptions) -> VassalDocument | BadVassal | None:
        """The vassal *name* as now read; None if there is no such znode."""
        if name not in self.children:
            return None
        problem = remote_name_problem(name, options.extra_extensions)
        if problem is not None:
            return BadVassal(name, problem)
        if name not in self.nodes:
            return None
        try:
            return build_document(name, self.nodes, self._monitor.uri, options)
        except BadVassal as bad:
            return bad

    # kazoo's requests: sent by its connection thread, awaited here

    async def _list(self) -> list[str]:
        try:
            children: list[str] = await _result(
                self._client.get_children_async(self._path, watch=self._watch)
            )
        except NoNodeError:
            # Told when it is created; until then nothing changes for the emperor.
            await _result(self._client.exists_async(self._path, watch=self._watch))
            raise NoNodeError(f"{self._path} does not exist") from None
        except NoAuthError:
            raise NoAuthError(f"not allowed to list {self._path} (check the credentials)") from None
        return children

    async def _read(self, names: Iterable[str]) -> dict[str, Node]:
        """The data of the vassal and sibling znodes among *names*, with data watches set.

        The requests are pipelined. Znodes that do not exist (any more) are left out.
        """
        pending: list[tuple[str, Any]] = []
        for name in names:
            if self._vassal_of(name) == name and remote_name_problem(name, self._extra):
                continue  # not a vassal: its name says all
            pending.append((name, self._client.get_async(self._znode(name), watch=self._watch)))
        nodes: dict[str, Node] = {}
        for name, request in pending:
            try:
                data, stat = await _result(request)
            except NoNodeError:
                continue
            except NoAuthError:
                nodes[name] = "not allowed to read it (check the ACL and the credentials)"
                continue
            nodes[name] = (data or b"", stat.mzxid)
        return nodes


async def _result(request: Any) -> Any:
    """The value of a kazoo request (an ``IAsyncResult``), or its exception.

    kazoo calls back in its completion thread; the callback wakes this task
    with ``run_sync_soon``. A cancelled wait leaves the request to finish alone.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def completed(_: object) -> None:
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    request.rawlink(completed)
    await done.wait()
    return request.get_nowait()
