"""The ``zmq://`` source: vassal commands pushed to a ZeroMQ PULL socket.

``zmq://ENDPOINT`` binds a PULL socket at a ZeroMQ endpoint
(``zmq://tcp://127.0.0.1:5252``, ``zmq://ipc:///run/trimperor.sock``); any
number of PUSH sockets may connect and send commands. A command is one
multipart message of 2 to 6 UTF-8 parts::

    [touch|destroy, name, config?, uid?, gid?, socket?]

An empty part is the same as a missing one. ``touch`` adds or reloads the
vassal (every touch is a change, even two in the same second); without a
config part the configuration is the file *name* in the emperor's working
directory. ``uid`` and ``gid`` are non-negative decimal integers. ``destroy``
removes a vassal this source added. Anything else is logged
(``source.bad_message``) and ignored: input from the socket never stops the
monitor. At most :data:`WARN_BURST` such lines are logged per
:data:`WARN_WINDOW` seconds; the rest are counted into one
``source.bad_message_suppressed`` line per window (the same goes for
``source.remove_unknown``), so a flood of bad messages costs a few lines.

The socket is waited on natively in Trio. ``ZMQ_FD`` is edge-triggered: it
only says "look at ``ZMQ_EVENTS`` again", so the monitor drains every message
``ZMQ_EVENTS`` announces before it waits on the fd, and looks again after
each wake-up. Each run has its own :class:`zmq.Context`, terminated on exit;
the socket is closed with ``linger=0``.

Only loopback is bound unless asked: an endpoint other than ``ipc://``,
``inproc://`` or ``tcp://`` on a loopback address (``tcp://*:P``,
``tcp://eth0:P``, ``tcp://192.0.2.1:P``, any other transport) is refused unless
CURVE is configured or ``--allow-remote-zmq`` is given (then a WARNING says
that anyone who can connect runs vassals). With ``--zmq-curve-secret FILE``
(a ``zmq.auth`` certificate holding the server's secret key) and
``--zmq-curve-clients DIR`` (the public certificates of the clients allowed),
the socket is a CURVE server and a ZAP handler (:mod:`zmq.auth`) admits only
those clients; every other connection fails its handshake and sends nothing.

Frames larger than ``max(4 * --max-config-size, 1 MiB)`` make libzmq drop the
sender's connection (``ZMQ_MAXMSGSIZE``) without a log line; a configuration
that is merely over ``--max-config-size`` is logged and ignored.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import cast

import trio

from trimperor.abc import MonitorOptions
from trimperor.control.api import is_loopback
from trimperor.core.errors import BadMessage, SourceError, UsageError
from trimperor.core.model import Remove, SourceEvent, Upsert, VassalDocument, remote_name_problem
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    RateLimitedWarnings,
    SourceStatus,
    TooLarge,
    VersionCounter,
    check_document,
    plugin_options,
    read_file,
    redact,
    short,
    static_file,
)

with kit.driver_imports(__name__):
    import zmq
    import zmq.auth
    import zmq.auth.thread

__all__ = ["BadMessage", "Destroy", "Touch", "ZmqMonitor", "ZmqOptions", "parse_command"]

log = logging.getLogger(__name__)
#: zmq.auth's own log (one line per refused client at DEBUG); quiet unless configured.
_auth_log = logging.getLogger(__name__ + ".auth")

#: The smallest frame size limit (ZMQ_MAXMSGSIZE) a socket gets.
MIN_FRAME_LIMIT = 1 << 20
#: Bad messages logged one by one per window; the rest are summed up.
WARN_BURST = 20
#: Seconds of one such window.
WARN_WINDOW = 10.0

_ENDPOINT = re.compile(r"[a-z][a-z0-9+.-]*://.+")
_NUMBER = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True, slots=True)
class Touch:
    """Add or reload *name*; ``config`` None means the static file *name*."""

    name: str
    config: str | None = None
    uid: int | None = None
    gid: int | None = None
    socket: str | None = None


@dataclass(frozen=True, slots=True)
class Destroy:
    """Remove *name*."""

    name: str


def _id(part: str | None, what: str) -> int | None:
    if part is None:
        return None
    if not _NUMBER.fullmatch(part):
        raise BadMessage(f"{what} {short(part)!r} is not a non-negative integer")
    return int(part)


def parse_command(frames: list[bytes]) -> Touch | Destroy:
    """The command one multipart message holds; raises :class:`BadMessage`.

    Names are not validated here (see :func:`~trimperor.core.model.remote_name_problem`).
    """
    if not 2 <= len(frames) <= 6:
        raise BadMessage(f"{len(frames)} parts (a command has 2 to 6)")
    try:
        parts = [frame.decode() for frame in frames]
    except UnicodeDecodeError:
        raise BadMessage("a part is not UTF-8") from None
    command, name, *rest = parts
    config, uid, gid, socket = [*(p or None for p in rest), None, None, None, None][:4]
    if not name:
        raise BadMessage("empty name")
    if command == "touch":
        return Touch(name, config, _id(uid, "uid"), _id(gid, "gid"), socket)
    if command == "destroy":
        return Destroy(name)
    raise BadMessage(f"unknown command {short(command)!r} (touch or destroy)")


def is_local_endpoint(endpoint: str) -> bool:
    """Whether a bind at *endpoint* is reachable from this host only (blocking: resolves names)."""
    transport, _, address = endpoint.partition("://")
    if transport in {"ipc", "inproc"}:
        return True
    if transport != "tcp":
        return False
    host = address.rpartition(":")[0]
    return bool(host) and host != "*" and is_loopback(host)


@dataclass(frozen=True, slots=True)
class ZmqOptions:
    """What zmq:// sources take from the command line (plugin ``zmq``)."""

    allow_remote: bool = False
    """Bind a non-loopback address without CURVE (``--allow-remote-zmq``)."""
    curve_secret: str | None = None
    """The server's CURVE secret key file, ``zmq.auth`` format (``--zmq-curve-secret``)."""
    curve_clients: str | None = None
    """The directory of the allowed clients' public keys (``--zmq-curve-clients``)."""


def _curve_keys(options: ZmqOptions, uri: str) -> tuple[bytes, bytes] | None:
    """The server's (public, secret) CURVE keys, or None without CURVE; raises UsageError."""
    secret_file, clients = options.curve_secret, options.curve_clients
    if secret_file is None and clients is None:
        return None
    if secret_file is None or clients is None:
        raise UsageError(f"{uri}: CURVE needs both --zmq-curve-secret and --zmq-curve-clients")
    if not zmq.has("curve"):
        raise UsageError(f"{uri}: this libzmq was built without CURVE")
    if not os.path.isdir(clients):
        raise UsageError(f"{uri}: --zmq-curve-clients {clients}: not a directory")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{uri}: --zmq-curve-secret {secret_file}: cannot load a certificate: "
            f"{type(exc).__name__}"
        ) from None
    if not secret:
        raise UsageError(f"{uri}: --zmq-curve-secret {secret_file} holds no secret key")
    return public, secret


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is waiting (``ZMQ_EVENTS``); also re-arms ``ZMQ_FD``."""
    events = cast("int", sock.getsockopt(zmq.EVENTS))
    return bool(events & zmq.POLLIN)


class ZmqMonitor:
    """``zmq://ENDPOINT``: commands from a PULL socket bound at ENDPOINT."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        endpoint = uri.removeprefix("zmq://")
        if not uri.startswith("zmq://") or not _ENDPOINT.fullmatch(endpoint):
            raise UsageError(
                f"{redact(uri)!r} is not zmq://ENDPOINT (e.g. zmq://tcp://127.0.0.1:5252)"
            )
        self.uri = redact(uri)
        self.endpoint = endpoint
        self._own = plugin_options(ZmqOptions, options, "zmq")
        self._curve = _curve_keys(self._own, self.uri)
        self._local = is_local_endpoint(endpoint)
        if not self._local and self._curve is None and not self._own.allow_remote:
            raise UsageError(
                f"{self.uri}: {endpoint} is reachable from other hosts, and anyone who can "
                "connect would run vassals as the emperor's user; bind tcp://127.0.0.1:PORT "
                "or ipc://PATH, configure CURVE (--zmq-curve-secret, --zmq-curve-clients), "
                "or pass --allow-remote-zmq"
            )
        #: Where the socket is bound (``tcp://127.0.0.1:*`` resolved), once it is.
        self.bound: str | None = None
        self.status = SourceStatus(self.uri)
        self.options = options
        #: The names this monitor offered; outlives a run.
        self.owned: set[str] = set()
        self._versions = VersionCounter()
        self._bad = RateLimitedWarnings(
            log, "source.bad_message", self.uri, WARN_BURST, WARN_WINDOW
        )
        self._unknown = RateLimitedWarnings(
            log, "source.remove_unknown", self.uri, WARN_BURST, WARN_WINDOW
        )

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Bind, then handle commands until cancelled; closes *send*.

        An endpoint that cannot be bound raises
        :class:`~trimperor.core.errors.SourceError` before ``task_status.started()``.
        """
        async with send:
            context = zmq.Context()
            auth: zmq.auth.thread.ThreadAuthenticator | None = None
            try:
                if self._curve is not None:
                    auth = zmq.auth.thread.ThreadAuthenticator(context, log=_auth_log)
                    auth.start()
                    assert self._own.curve_clients is not None  # see _curve_keys
                    auth.configure_curve(domain="*", location=self._own.curve_clients)
                try:
                    sock = context.socket(zmq.PULL)
                except zmq.ZMQError as exc:
                    raise SourceError(f"{self.uri}: cannot create a socket: {exc}") from exc
                try:
                    await self._bind_and_serve(sock, send, task_status)
                finally:
                    sock.close(linger=0)
            finally:
                if auth is not None:
                    auth.stop()
                context.term()

    async def _bind_and_serve(
        self,
        sock: zmq.Socket[bytes],
        send: trio.MemorySendChannel[SourceEvent],
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            sock.setsockopt(zmq.LINGER, 0)
            limit = max(4 * self.options.max_config_size, MIN_FRAME_LIMIT)
            sock.setsockopt(zmq.MAXMSGSIZE, limit)
            if self._curve is not None:
                public, secret = self._curve
                sock.curve_server = True
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise SourceError(f"{self.uri}: cannot bind: {exc}") from exc
        self.bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info(
            "source.listening uri=%s endpoint=%s curve=%s",
            self.uri,
            self.bound,
            "on" if self._curve is not None else "off",
        )
        if not self._local and self._curve is None:
            log.warning(
                "source.unauthenticated uri=%s endpoint=%s: --allow-remote-zmq without CURVE; "
                "anyone who can connect runs vassals as uid %d",
                self.uri,
                self.bound,
                os.getuid(),
            )
        self.status.ok(len(self.owned))
        task_status.started()
        fd = sock.fileno()  # ZMQ_FD
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._bad.summaries)
                nursery.start_soon(self._unknown.summaries)
                await self._serve(sock, fd, send)
        finally:
            trio.lowlevel.notify_closing(fd)

    async def _serve(
        self, sock: zmq.Socket[bytes], fd: int, send: trio.MemorySendChannel[SourceEvent]
    ) -> None:
        while True:
            # ZMQ_FD is edge-triggered: drain what ZMQ_EVENTS announces first.
            while _readable(sock):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                await self._handle(frames, send)
                await trio.lowlevel.checkpoint()
            await trio.lowlevel.wait_readable(fd)

    async def _handle(self, frames: list[bytes], send: trio.MemorySendChannel[SourceEvent]) -> None:
        try:
            command = parse_command(frames)
            problem = remote_name_problem(command.name, self.options.extra_extensions)
            if problem is not None:
                raise BadMessage(problem)
            if isinstance(command, Destroy):
                await self._destroy(command.name, send)
            else:
                await self._touch(command, send)
        except BadMessage as exc:
            self._bad.warn(str(exc))
        self.status.ok(len(self.owned))

    async def _destroy(self, name: str, send: trio.MemorySendChannel[SourceEvent]) -> None:
        if name not in self.owned:
            self._unknown.warn(f"destroy of {name}, which this source did not add")
            return
        log.info("source.remove uri=%s name=%s", self.uri, name)
        self.owned.discard(name)
        await send.send(Remove(self.uri, name))

    async def _touch(self, command: Touch, send: trio.MemorySendChannel[SourceEvent]) -> None:
        version = self._versions()
        path = None
        text = command.config
        if text is None:
            path = static_file(command.name)
            limit = self.options.max_config_size
            try:
                data = await trio.to_thread.run_sync(read_file, path, limit)
            except TooLarge:
                raise BadMessage(f"{path} is over --max-config-size ({limit} bytes)") from None
            except OSError as exc:
                raise BadMessage(f"cannot read {path}: {exc.strerror or exc}") from None
            if data is None:
                raise BadMessage(f"touch without configuration, and no file {path}")
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise BadMessage(f"{path} is not UTF-8") from None
        doc = VassalDocument(
            command.name,
            self.uri,
            version,
            text,
            path=path,
            uid=command.uid,
            gid=command.gid,
            socket=command.socket,
        )
        problem = check_document(doc, self.options)
        if problem is not None:
            raise BadMessage(problem)
        log.info("source.upsert uri=%s name=%s version=%s", self.uri, doc.name, version)
        self.owned.add(command.name)
        await send.send(Upsert(doc))
