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
monitor.

The socket is waited on natively in Trio. ``ZMQ_FD`` is edge-triggered: it
only says "look at ``ZMQ_EVENTS`` again", so the monitor drains every message
``ZMQ_EVENTS`` announces before it waits on the fd, and looks again after
each wake-up. Each run has its own :class:`zmq.Context`, terminated on exit;
the socket is closed with ``linger=0``.

Frames larger than ``max(4 * --max-config-size, 1 MiB)`` make libzmq drop the
sender's connection (``ZMQ_MAXMSGSIZE``) without a log line; a configuration
that is merely over ``--max-config-size`` is logged and ignored.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import trio

from trimperor.abc import MonitorOptions
from trimperor.errors import MissingExtraError, SourceError, UsageError
from trimperor.model import Remove, SourceEvent, Upsert, VassalDocument, remote_name_problem
from trimperor.monitors.remote import (
    SourceStatus,
    TooLarge,
    check_document,
    read_file,
    redact,
    short,
    static_file,
)

try:
    import zmq
except ImportError as exc:
    raise MissingExtraError("zmq", "zmq", exc.name or "zmq") from exc

if TYPE_CHECKING:
    from trimperor.abc import MonitorFactory

__all__ = ["Destroy", "Touch", "ZmqMonitor", "parse_command"]

log = logging.getLogger(__name__)

#: The smallest frame size limit (ZMQ_MAXMSGSIZE) a socket gets.
MIN_FRAME_LIMIT = 1 << 20

_ENDPOINT = re.compile(r"[a-z][a-z0-9+.-]*://.+")
_NUMBER = re.compile(r"[0-9]{1,10}")


class BadMessage(Exception):
    """A message from the socket that is not a command."""


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

    Names are not validated here (see :func:`~trimperor.model.remote_name_problem`).
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
        #: Where the socket is bound (``tcp://127.0.0.1:*`` resolved), once it is.
        self.bound: str | None = None
        self.status = SourceStatus(self.uri)
        self.options = options
        #: The names this monitor offered; outlives a run.
        self.owned: set[str] = set()
        self._versions = itertools.count(1)

    async def run(
        self,
        send: trio.MemorySendChannel[SourceEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, then handle commands until cancelled; closes *send*.

        An endpoint that cannot be bound raises
        :class:`~trimperor.errors.SourceError` before ``task_status.started()``.
        """
        async with send:
            context = zmq.Context()
            try:
                try:
                    sock = context.socket(zmq.PULL)
                except zmq.ZMQError as exc:
                    raise SourceError(f"{self.uri}: cannot create a socket: {exc}") from exc
                try:
                    await self._bind_and_serve(sock, send, task_status)
                finally:
                    sock.close(linger=0)
            finally:
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
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            raise SourceError(f"{self.uri}: cannot bind: {exc}") from exc
        self.bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("source.listening uri=%s endpoint=%s", self.uri, self.bound)
        self.status.ok(len(self.owned))
        task_status.started()
        fd = sock.fileno()  # ZMQ_FD
        try:
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
            log.warning("source.bad_message uri=%s reason=%s", self.uri, short(str(exc)))
        self.status.ok(len(self.owned))

    async def _destroy(self, name: str, send: trio.MemorySendChannel[SourceEvent]) -> None:
        if name not in self.owned:
            log.warning("source.remove_unknown uri=%s name=%s", self.uri, name)
            return
        log.info("source.remove uri=%s name=%s", self.uri, name)
        self.owned.discard(name)
        await send.send(Remove(self.uri, name))

    async def _touch(self, command: Touch, send: trio.MemorySendChannel[SourceEvent]) -> None:
        version = f"{next(self._versions)}@{time.time():.6f}"
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


if TYPE_CHECKING:
    _factory: MonitorFactory = ZmqMonitor
