"""The ``amqp://`` source: vassals announced on an AMQP fanout exchange.

``amqp://[user:password@]host[:port][/vhost]`` (defaults ``guest:guest``, port
5672, vhost ``/``; ``%2F`` and friends are percent-decoded). The monitor
declares the fanout exchange ``--amqp-exchange`` (``uwsgi.emperor``), binds an
exclusive, auto-delete, server-named queue to it and consumes with manual
acknowledgements: a message is acknowledged once the event it produced was
handed to the emperor. Every emperor has its own queue, so every emperor
subscribed to the exchange acts on every message.

What a message means:

* **With a routing key**: the key is the vassal name and the body its
  configuration; an empty body removes the vassal.
* **Without one**, the body is either the absolute path of a configuration
  file (the vassal is named after the file; a missing file removes it) or an
  ``http://``/``https://`` URL whose last path segment is the vassal name (any
  answer but 200 removes it; a timeout or connection error changes nothing).

URLs are fetched concurrently (at most :data:`MAX_FETCHES` at a time; a
message past that waits for a slot), each within a total deadline of
:data:`HTTP_TIMEOUT` seconds, so a slow server delays only its own vassal.
A fetch that finishes after a later message touched the same name is
dropped. Fetches in progress are listed in the source's stats (``pending``).

In tyrant mode (``--tyrant``) a path is opened without following a symbolic
link, and a file that belongs to root (uid or gid 0) is refused before a byte
of it is read; the vassal runs as the file's owner. Errors about a file or a
configuration never quote its content.

Every message that touches a name gets a new document version, so a
re-published message reloads the vassal. Files named by a message are also
checked every ``--freq`` seconds: a deleted file removes its vassal. Invalid
messages are logged (``source.bad_message``), acknowledged and ignored.

The broker is consumed with pika's ``BlockingConnection`` in a worker thread
(pika is the driver the uWSGI documentation uses, and it is maintained by the
RabbitMQ team). Each delivery re-enters Trio with :func:`trio.from_thread.run`
and is handled there, one at a time and in order. Cancellation asks the thread
to stop through :meth:`BlockingConnection.add_callback_threadsafe`, the one
thread-safe entry point pika has, and waits for it; only a connection attempt
in progress delays that, by at most its timeout (:data:`CONNECT_TIMEOUT`).

A lost connection leaves every vassal running: the monitor retries with
backoff and, once subscribed again, acts on new messages. Nothing that was
published meanwhile is replayed (the queue went away with the connection), and
nothing is removed on reconnect.

pika logs every failed connection attempt at ERROR with a traceback; this
module turns the ``pika`` logger down to CRITICAL unless its level was set
already, and logs one ``source.retrying`` line per attempt instead.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Remove, SourceEvent, Upsert, VassalDocument, remote_name_problem
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    SourceStatus,
    TooLarge,
    VersionCounter,
    check_document,
    check_freq,
    error_text,
    plugin_options,
    quiet_driver_log,
    redact,
    short,
)

with kit.driver_imports(__name__):
    import httpx
    import pika
    import pika.exceptions

__all__ = ["AmqpAddress", "AmqpMonitor", "AmqpOptions", "parse_uri"]

log = logging.getLogger(__name__)

quiet_driver_log("pika", logging.CRITICAL)

#: Seconds a connection attempt may take (TCP connect, then the AMQP handshake).
CONNECT_TIMEOUT = 10.0
#: Seconds an HTTP fetch may take in total (connect, headers, body).
HTTP_TIMEOUT = 10.0
#: HTTP fetches in progress at the same time; later URL messages wait for a slot.
MAX_FETCHES = 8
#: Deliveries the broker may send ahead of the acknowledgements.
PREFETCH = 32
#: The longest path or URL a body without routing key may hold.
MAX_LOCATOR = 4096

_BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


# -- the URI ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AmqpAddress:
    """Where the broker is, from an ``amqp://`` URI."""

    host: str
    port: int = 5672
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"


def parse_uri(uri: str) -> AmqpAddress:
    """``amqp://[user:password@]host[:port][/vhost]``; raises UsageError."""
    parts = urlsplit(uri)
    if parts.scheme != "amqp":
        raise UsageError(f"not an amqp:// URI: {redact(uri)!r}")
    if parts.query or parts.fragment:
        raise UsageError(f"{redact(uri)}: query strings and fragments are not supported")
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{redact(uri)}: bad port: {exc}") from None
    if not parts.hostname:
        raise UsageError(f"{redact(uri)}: no broker host")
    vhost = unquote(parts.path[1:]) if parts.path else ""
    return AmqpAddress(
        host=parts.hostname,
        port=port or 5672,
        user=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=vhost or "/",
    )


# -- the consumer thread -------------------------------------------------------------


class _Consumer:
    """One broker connection, run by :meth:`run` in a worker thread.

    *on_ready* (sync) and *on_message* (async, ``(routing_key, body)``) are
    called in Trio. :meth:`stop` may be called from any thread, any number of
    times; ``run`` then returns promptly.
    """

    def __init__(
        self,
        uri: str,
        params: Any,
        exchange: str,
        on_ready: Callable[[str], None],
        on_message: Callable[[str, bytes], Awaitable[None]],
    ) -> None:
        self._uri = uri
        self._params = params
        self._exchange = exchange
        self._on_ready = on_ready
        self._on_message = on_message
        self._lock = threading.Lock()
        self._stopping = False
        self._connection: Any = None
        self._channel: Any = None

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            connection = self._connection
        if connection is not None:
            # Closed already: the thread is on its way out.
            with suppress(pika.exceptions.AMQPError):
                connection.add_callback_threadsafe(self._halt)

    def _halt(self) -> None:
        """In the pika thread: end ``start_consuming``."""
        if self._channel is not None and self._channel.is_open:
            self._channel.stop_consuming()

    def run(self) -> None:
        """Connect, subscribe, deliver until stopped; raises on a broker problem."""
        connection = pika.BlockingConnection(self._params)
        try:
            with self._lock:
                if self._stopping:
                    return
                self._connection = connection
            channel = self._declare_exchange(connection)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, self._exchange)
            channel.basic_qos(prefetch_count=PREFETCH)
            channel.basic_consume(queue, self._deliver)
            self._channel = channel
            trio.from_thread.run_sync(self._on_ready, queue)
            with self._lock:
                if self._stopping:
                    return
            channel.start_consuming()
        finally:
            with self._lock:
                self._connection = None
            if connection.is_open:
                with suppress(*_BROKER_ERRORS):  # it is going away either way
                    connection.close()

    def _declare_exchange(self, connection: Any) -> Any:
        """Declare the fanout exchange as uWSGI does; use an existing one as it is.

        A declaration whose flags differ from an existing exchange's (say, one
        made durable by another program) fails with 406 PRECONDITION_FAILED and
        closes the channel; a passive declaration on a new channel then only
        checks that the exchange exists.
        """
        channel = connection.channel()
        try:
            channel.exchange_declare(self._exchange, exchange_type="fanout")
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            log.info(
                "source.exchange_exists uri=%s exchange=%s: declared with other flags; used as is",
                self._uri,
                self._exchange,
            )
            channel = connection.channel()
            channel.exchange_declare(self._exchange, passive=True)
        return channel

    def _deliver(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """In the pika thread: hand one delivery to Trio, then acknowledge it."""
        try:
            trio.from_thread.run(self._on_message, method.routing_key or "", body)
        except (trio.Cancelled, trio.RunFinishedError):
            # Shutting down: leave it unacknowledged (the queue dies with us).
            with self._lock:
                self._stopping = True
            channel.stop_consuming()
            return
        channel.basic_ack(method.delivery_tag)


async def _stop_on_cancel(consumer: _Consumer) -> None:
    try:
        await trio.sleep_forever()
    finally:
        consumer.stop()


# -- blocking file helpers (worker threads) --------------------------------------------


def _is_file(path: str) -> bool:
    """False only when *path* is certainly not a regular file (any more)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True  # cannot tell (permissions, I/O): keep it


def _gone(paths: dict[str, str]) -> list[str]:
    return [name for name, path in paths.items() if not _is_file(path)]


def _http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=HTTP_TIMEOUT,
        follow_redirects=True,
        limits=httpx.Limits(max_connections=MAX_FETCHES),
    )


class _Removed:
    """What a fetch answered with a status other than 200: the name goes away."""


_REMOVE = _Removed()


class _NotAllowed(Exception):
    """Tyrant mode: a path message names a file the monitor must not read."""


def _read_locator(path: str, limit: int, tyrant: bool) -> tuple[os.stat_result, bytes] | None:
    """The status and content of the regular file at *path*, None if there is none; blocking.

    In tyrant mode the last component must not be a symbolic link, and the
    owner is checked on the open descriptor before anything is read: a file
    of root's raises :class:`_NotAllowed`. Raises :class:`TooLarge` past
    *limit* bytes, OSError if the file cannot be read.
    """
    # O_NONBLOCK: a FIFO must not block the open; fstat() rejects it.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if tyrant else 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if tyrant and exc.errno == errno.ELOOP:
            raise _NotAllowed(
                f"{path} is a symbolic link; tyrant mode reads only the file itself"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if tyrant and (st.st_uid == 0 or st.st_gid == 0):
            raise _NotAllowed(
                f"{path} belongs to uid {st.st_uid}, gid {st.st_gid}; tyrant mode reads no "
                "file of root's for a message"
            )
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise TooLarge
    return st, data


# -- the monitor -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Owned:
    """A name this monitor offered, and the file it came from (None: not a file)."""

    version: str
    path: str | None


@dataclass(frozen=True, slots=True)
class AmqpOptions:
    """What amqp:// sources take from the command line (plugin ``amqp``)."""

    exchange: str = "uwsgi.emperor"
    """The fanout exchange consumed (``--amqp-exchange``)."""


class AmqpMonitor:
    """``amqp://[user:password@]host[:port][/vhost]``: vassals announced on a fanout exchange."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        address = parse_uri(uri)
        own = plugin_options(AmqpOptions, options, "amqp")
        if not own.exchange:
            raise UsageError("the AMQP exchange name must not be empty")
        check_freq(options)
        self.uri = redact(uri)
        self.address = address
        self.status = SourceStatus(self.uri)
        self.options = options
        self._exchange = own.exchange
        self._params = pika.ConnectionParameters(
            host=address.host,
            port=address.port,
            virtual_host=address.vhost,
            credentials=pika.PlainCredentials(address.user, address.password),
            connection_attempts=1,
            socket_timeout=CONNECT_TIMEOUT,
            stack_timeout=CONNECT_TIMEOUT,
            client_properties={"connection_name": f"trimperor {self.uri}"},
        )
        # What this monitor offered; it outlives a run, so that a restarted
        # run can still remove what an earlier one added.
        self.owned: dict[str, _Owned] = {}
        self._versions = VersionCounter()
        # The consumer thread lives as long as the connection: give it its own
        # token rather than hold one of Trio's default worker threads.
        self._thread_limiter = trio.CapacityLimiter(1)

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Consume the exchange until cancelled, reconnecting with backoff; closes *send*."""
        async with send:
            log.info("source.connecting uri=%s exchange=%s", self.uri, self._exchange)
            task_status.started()
            # Building a client loads the CA certificates: not in Trio's thread.
            http = await trio.to_thread.run_sync(_http_client)
            async with http, trio.open_nursery() as nursery:
                handler = _Handler(self, send, http, nursery)
                nursery.start_soon(handler.watch_files)
                while True:
                    error = await self._consume(handler.message)
                    await self.status.backoff(error)

    async def _consume(self, on_message: Callable[[str, bytes], Awaitable[None]]) -> str:
        """One connection, until it is lost; returns what went wrong."""
        consumer = _Consumer(self.uri, self._params, self._exchange, self._subscribed, on_message)
        error = "the broker cancelled the subscription"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_cancel, consumer)
            try:
                await trio.to_thread.run_sync(consumer.run, limiter=self._thread_limiter)
            except _BROKER_ERRORS as exc:
                error = short(error_text(exc))
            nursery.cancel_scope.cancel()
        return error

    def next_version(self) -> str:
        """A version no earlier message had: every message is a change."""
        return self._versions()

    def _subscribed(self, queue: str) -> None:
        log.info("source.subscribed uri=%s exchange=%s queue=%s", self.uri, self._exchange, queue)
        self.status.ok(len(self.owned))


class _Handler:
    """What one run does with messages and watched files; everything here runs in Trio.

    Messages are handled one at a time, in order: the consumer thread waits
    for each to finish before it acknowledges it and delivers the next. An
    HTTP fetch is the exception: it runs in *nursery*, and the message is
    done once the fetch has a slot. While a name is being fetched, every
    message that touches it bumps its generation; a fetch only acts if none
    did meanwhile. Names with no fetch in flight are not tracked.
    """

    def __init__(
        self,
        monitor: AmqpMonitor,
        send: trio.MemorySendChannel[SourceEvent],
        http: httpx.AsyncClient,
        nursery: trio.Nursery,
    ) -> None:
        self._uri = monitor.uri
        self._options = monitor.options
        self._status = monitor.status
        self._owned = monitor.owned
        self._next_version = monitor.next_version
        self._send = send
        self._http = http
        self._nursery = nursery
        self._fetch_slots = trio.Semaphore(MAX_FETCHES)
        self._generations: dict[str, int] = {}
        self._fetching: dict[str, int] = {}  # fetches in flight (or waiting) per name
        self._counter = itertools.count(1)

    async def message(self, routing_key: str, body: bytes) -> None:
        if routing_key:
            await self._config(routing_key, body)
        else:
            await self._locator(body)
        self._status.ok(len(self._owned))

    def _touch(self, name: str) -> None:
        """A message touched *name*: a fetch of it in flight must not act any more."""
        if name in self._fetching:
            self._generations[name] = next(self._counter)

    async def watch_files(self) -> None:
        """Every ``freq`` seconds, remove the vassals whose file was deleted."""
        while True:
            await trio.sleep(self._options.freq)
            looked_at = dict(self._owned)
            paths = {name: o.path for name, o in looked_at.items() if o.path is not None}
            if not paths:
                continue
            for name in await trio.to_thread.run_sync(_gone, paths):
                # Only if no message touched the name while we looked.
                if self._owned.get(name) is looked_at[name]:
                    log.info(
                        "source.file_gone uri=%s name=%s path=%s", self._uri, name, paths[name]
                    )
                    self._touch(name)
                    await self._remove(name)

    # -- the three kinds of message ----------------------------------------------------

    async def _config(self, name: str, body: bytes) -> None:
        """Routing key = name, body = configuration; an empty body removes."""
        if not self._name_ok(name):
            return
        self._touch(name)
        if not body:
            await self._remove(name)
            return
        if len(body) > self._options.max_config_size:
            self._bad(
                f"configuration of {name!r} is {len(body)} bytes, over --max-config-size "
                f"({self._options.max_config_size})"
            )
            return
        try:
            text = body.decode()
        except UnicodeDecodeError:
            self._bad(f"configuration of {name!r} is not UTF-8")
            return
        await self._upsert(VassalDocument(name, self._uri, self._next_version(), text))

    async def _locator(self, body: bytes) -> None:
        """No routing key: the body is an absolute path or an http(s) URL."""
        if len(body) > MAX_LOCATOR:
            self._bad(f"body of {len(body)} bytes without routing key")
            return
        try:
            where = body.decode().strip()
        except UnicodeDecodeError:
            self._bad("body without routing key is not UTF-8")
            return
        if where.startswith(("http://", "https://")):
            await self._fetch(where)
        elif os.path.isabs(where) and "\0" not in where:
            await self._read(where)
        else:
            # Not quoted: it may be a configuration published without its key.
            self._bad(
                f"body of {len(body)} bytes without routing key is neither an absolute path "
                "nor a URL"
            )

    async def _read(self, path: str) -> None:
        name = os.path.basename(path)
        if not self._name_ok(name):
            return
        self._touch(name)
        limit = self._options.max_config_size
        version = self._next_version()
        try:
            read = await trio.to_thread.run_sync(_read_locator, path, limit, self._options.tyrant)
        except TooLarge:
            self._bad(f"{path} is over --max-config-size ({limit} bytes)")
            return
        except _NotAllowed as exc:
            log.warning("source.refused uri=%s name=%s reason=%s", self._uri, name, exc)
            if name in self._owned:
                await self._remove(name)
            return
        except OSError as exc:
            error = f"cannot read {path}: {exc.strerror or exc}"
            await self._upsert(
                VassalDocument(name, self._uri, version, None, path=path, error=error)
            )
            return
        if read is None:
            log.info("source.file_missing uri=%s path=%s", self._uri, path)
            await self._remove(name)
            return
        st, data = read
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self._bad(f"{path} is not UTF-8")
            return
        doc = VassalDocument(
            name, self._uri, version, text, path=path, uid=st.st_uid, gid=st.st_gid
        )
        await self._upsert(doc)

    async def _fetch(self, url: str) -> None:
        """Start fetching *url* once a slot is free; the fetch runs on its own."""
        name = unquote(urlsplit(url).path.rpartition("/")[2])
        if not self._name_ok(name):
            return
        generation = next(self._counter)
        self._generations[name] = generation
        self._fetching[name] = self._fetching.get(name, 0) + 1
        try:
            await self._fetch_slots.acquire()
        except BaseException:
            self._fetched(name)
            raise
        self._nursery.start_soon(self._fetch_in_slot, url, name, generation)

    def _fetched(self, name: str) -> None:
        """A fetch of *name* ended; forget the name once none is left."""
        self._fetching[name] -= 1
        if not self._fetching[name]:
            del self._fetching[name]
            del self._generations[name]

    async def _fetch_in_slot(self, url: str, name: str, generation: int) -> None:
        shown = redact(url)
        token = self._status.begin(f"fetch {shown}")
        try:
            with trio.move_on_after(HTTP_TIMEOUT) as deadline:
                result = await self._fetch_one(url, shown)
            if deadline.cancelled_caught:
                log.warning(
                    "source.http_failed uri=%s url=%s error=no answer within %ss",
                    self._uri,
                    shown,
                    HTTP_TIMEOUT,
                )
                return
        finally:
            self._status.end(token)
            self._fetch_slots.release()
        try:
            # Acting (handing the event to the emperor) is outside the deadline.
            if result is not None and self._current(name, generation, shown):
                if isinstance(result, _Removed):
                    await self._remove(name)
                else:
                    await self._upsert(
                        VassalDocument(name, self._uri, self._next_version(), result)
                    )
        finally:
            self._fetched(name)

    def _current(self, name: str, generation: int, shown: str) -> bool:
        """Whether no message touched *name* since the fetch of *shown* began."""
        if self._generations.get(name) == generation:
            return True
        log.info("source.http_superseded uri=%s url=%s name=%s", self._uri, shown, name)
        return False

    async def _fetch_one(self, url: str, shown: str) -> str | _Removed | None:
        """The configuration at *url*, :data:`_REMOVE` for a status other than 200,
        or None if the fetch failed (logged)."""
        limit = self._options.max_config_size
        chunks: list[bytes] = []
        try:
            async with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    log.info(
                        "source.http_status uri=%s url=%s status=%d",
                        self._uri,
                        shown,
                        response.status_code,
                    )
                    return _REMOVE
                size = 0
                # Stop reading past the limit by cancelling the read: returning
                # from the loop would leave httpx's nested generators unfinished.
                with trio.CancelScope() as reading:
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            reading.cancel()
                        else:
                            chunks.append(chunk)
                if size > limit:
                    self._bad(f"{shown} is over --max-config-size ({limit} bytes)")
                    return None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = short(error_text(exc))
            log.warning("source.http_failed uri=%s url=%s error=%s", self._uri, shown, error)
            return None
        try:
            return b"".join(chunks).decode()
        except UnicodeDecodeError:
            self._bad(f"{shown} is not UTF-8")
            return None

    # -- helpers --------------------------------------------------------------------------

    def _bad(self, reason: str) -> None:
        log.warning("source.bad_message uri=%s reason=%s", self._uri, short(reason))

    def _name_ok(self, name: str) -> bool:
        problem = remote_name_problem(name, self._options.extra_extensions)
        if problem is not None:
            self._bad(problem)
        return problem is None

    async def _upsert(self, doc: VassalDocument) -> None:
        problem = check_document(doc, self._options)
        if problem is not None:
            self._bad(problem)
            return
        log.info("source.upsert uri=%s name=%s version=%s", self._uri, doc.name, doc.version)
        self._owned[doc.name] = _Owned(doc.version, doc.path)
        await self._send.send(Upsert(doc))

    async def _remove(self, name: str) -> None:
        if self._owned.pop(name, None) is None:
            log.info("source.remove_unknown uri=%s name=%s", self._uri, name)
            return
        log.info("source.remove uri=%s name=%s", self._uri, name)
        await self._send.send(Remove(self._uri, name))
