"""What every remote source (pg, mongodb, amqp, zmq) shares.

- :class:`SourceStatus`: the health a monitor reports in stats (connected or
  retrying, last successful read, vassal count, last error), with reconnect
  backoff.
- :func:`check_document`: name and size validation of what came over the wire.
- :class:`LastGood`: full snapshots from what a polled source (pg, mongodb)
  read, each name keeping its last good document while it is bad.
- :func:`read_file`, :func:`short`: for the push sources (amqp, zmq).
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import trio

from trimperor.abc import MonitorOptions
from trimperor.errors import UsageError
from trimperor.model import SourceEvent, SourceProblem, VassalDocument, remote_name_problem
from trimperor.stats import SourceStats

__all__ = [
    "BadVassal",
    "LastGood",
    "RateLimitedWarnings",
    "SourceStatus",
    "TooLarge",
    "check_document",
    "check_freq",
    "error_text",
    "read_file",
    "redact",
    "short",
]

log = logging.getLogger(__name__)

#: Reconnect delays: first, doubling up to the maximum.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
#: How much of an untrusted string a log line quotes.
LOG_CHARS = 200

T = TypeVar("T")


def redact(uri: str) -> str:
    """Hide a password in ``scheme://user:password@host`` and ``password=...`` forms."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        creds, _, host = rest.partition("@")
        user = creds.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in creds else rest
    words = ["password=***" if w.startswith("password=") else w for w in rest.split(" ")]
    return scheme + sep + " ".join(words)


class SourceStatus:
    """Health of one source, updated by its monitor, read by the stats server."""

    def __init__(self, uri: str, label: str | None = None) -> None:
        self.uri = uri
        self.label = label or uri
        """A short name for the source, used by repeated lines (a long URI is
        logged once per outage, with its first failure)."""
        self.state = "starting"
        self.vassals = 0
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.attempt = 0
        self.next_retry: float | None = None
        self.retry_max = RETRY_MAX
        """The longest wait between two attempts (seconds)."""
        self._pending: dict[int, tuple[str, float]] = {}
        self._tokens = itertools.count(1)

    def begin(self, what: str) -> int:
        """An operation (an HTTP fetch, ...) began: it is listed in stats until :meth:`end`."""
        token = next(self._tokens)
        self._pending[token] = (what, time.time())
        return token

    def end(self, token: int) -> None:
        self._pending.pop(token, None)

    def ok(self, vassals: int | None = None) -> None:
        """A successful read (connect, query, message)."""
        if self.state == "retrying":
            log.info("source.recovered uri=%s attempts=%d", self.label, self.attempt)
        self.state = "connected"
        self.last_ok = time.time()
        self.attempt = 0
        self.next_retry = None
        if vassals is not None:
            self.vassals = vassals

    def failed(self, error: str) -> float:
        """Record a failure; returns how long to wait before the next attempt."""
        self.attempt += 1
        delay: float = min(RETRY_FIRST * 2.0 ** (self.attempt - 1), self.retry_max)
        self.state = "retrying"
        self.last_error = error
        self.next_retry = time.time() + delay
        log.warning(
            "source.retrying uri=%s attempt=%d delay=%.1fs error=%s",
            self.uri if self.attempt == 1 else self.label,
            self.attempt,
            delay,
            error,
        )
        return delay

    async def backoff(
        self, error: str, report: trio.MemorySendChannel[SourceEvent] | None = None
    ) -> None:
        """Record a failure and sleep until the next attempt.

        With *report*, a failure that begins an outage is also sent there, once,
        as a :class:`~trimperor.model.SourceProblem`.
        """
        new_outage = self.state != "retrying"
        delay = self.failed(error)
        if report is not None and new_outage:
            await report.send(SourceProblem(self.uri, error))
        await trio.sleep(delay)

    def snapshot(self) -> SourceStats:
        return SourceStats(
            uri=self.uri,
            state=self.state,
            vassals=self.vassals,
            last_ok=self.last_ok,
            last_error=self.last_error,
            retry_attempt=self.attempt,
            next_retry=self.next_retry,
            pending=tuple(self._pending.values()),
        )


def check_document(doc: VassalDocument, options: MonitorOptions) -> str | None:
    """Why a remotely received document must be ignored, or None if it is fine."""
    problem = remote_name_problem(doc.name, options.extra_extensions)
    if problem is not None:
        return problem
    if doc.text is not None:
        size = len(doc.text.encode())
        if size > options.max_config_size:
            return (
                f"configuration of {doc.name!r} is {size} bytes, over --max-config-size "
                f"({options.max_config_size})"
            )
    return None


def check_freq(options: MonitorOptions) -> None:
    """Raise UsageError unless the rescan interval is positive."""
    if not options.freq > 0:
        raise UsageError(f"the rescan interval must be positive, not {options.freq!r}")


# -- polled sources: snapshots ----------------------------------------------------------


class BadVassal(Exception):
    """What a source read is not a vassal; ``name`` is set if it has a usable one."""

    def __init__(self, name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason


class LastGood(Generic[T]):
    """Turns what a source read into snapshots, remembering each name's last good document.

    *parse* makes a document of one item read (a row, a document) or raises
    :class:`BadVassal`. A bad item is logged on *logger* as *event*, at WARNING
    the first time and at DEBUG while it stays the same; if its name had a good
    document at the previous read, that one stays in the snapshot. Of two good
    items with one name, the first wins ("the first *what* wins").
    """

    def __init__(
        self,
        source: str,
        parse: Callable[[T], VassalDocument],
        *,
        event: str,
        what: str,
        logger: logging.Logger,
    ) -> None:
        self._source = source
        self._parse = parse
        self._message = event + " uri=%s name=%s reason=%s%s"
        self._duplicate = f"duplicate name; the first {what} wins"
        self._log = logger
        self._good: dict[str, VassalDocument] = {}
        self._reported: set[tuple[str | None, str]] = set()

    def snapshot(self, items: Iterable[T]) -> tuple[VassalDocument, ...]:
        docs: dict[str, VassalDocument] = {}
        reported: set[tuple[str | None, str]] = set()
        for item in items:
            try:
                doc = self._parse(item)
            except BadVassal as bad:
                kept = self._good.get(bad.name) if bad.name is not None else None
                self._report(reported, bad.name, bad.reason, kept is not None)
                if kept is not None and bad.name not in docs:
                    docs[kept.name] = kept
                continue
            if doc.name in docs:
                self._report(reported, doc.name, self._duplicate, False)
                continue
            docs[doc.name] = doc
        self._reported = reported
        self._good = docs
        return tuple(docs[name] for name in sorted(docs))

    def _report(
        self, reported: set[tuple[str | None, str]], name: str | None, reason: str, kept: bool
    ) -> None:
        key = (name, reason)
        reported.add(key)
        self._log.log(
            logging.DEBUG if key in self._reported else logging.WARNING,
            self._message,
            self._source,
            name,
            reason,
            "; keeping its last good configuration" if kept else "",
        )


# -- push sources: files and log lines -----------------------------------------------------


class RateLimitedWarnings:
    """At most *burst* WARNING lines per *window* seconds for one kind of bad input.

    The first *burst* reasons in a window are logged as they come; the rest
    are counted, and :meth:`flush` (called every *window* seconds by
    :meth:`summaries`) logs one ``EVENT_suppressed`` line with their number
    and the last reason. A flood of bad messages therefore costs a few lines.
    """

    def __init__(
        self, logger: logging.Logger, event: str, uri: str, burst: int = 5, window: float = 10.0
    ) -> None:
        self._log = logger
        self._event = event
        self._uri = uri
        self._burst = burst
        self.window = window
        self._logged = 0
        self._suppressed = 0
        self._last = ""

    def warn(self, reason: str) -> None:
        if self._logged < self._burst:
            self._logged += 1
            self._log.warning("%s uri=%s reason=%s", self._event, self._uri, short(reason))
        else:
            self._suppressed += 1
            self._last = reason

    def flush(self) -> None:
        """Log the summary of the window that ends, and begin a new one."""
        if self._suppressed:
            self._log.warning(
                "%s_suppressed uri=%s count=%d window=%gs last_reason=%s",
                self._event,
                self._uri,
                self._suppressed,
                self.window,
                short(self._last),
            )
        self._logged = self._suppressed = 0

    async def summaries(self) -> None:
        """Flush every window, until cancelled (and once more then)."""
        try:
            while True:
                await trio.sleep(self.window)
                self.flush()
        finally:
            self.flush()


class TooLarge(Exception):
    """A file over the size limit :func:`read_file` was given."""


def read_file(path: str, limit: int) -> bytes | None:
    """The contents of the regular file at *path*, None if there is none; blocking.

    Raises :class:`TooLarge` past *limit* bytes, OSError if it cannot be read.
    """
    try:
        # O_NONBLOCK: a FIFO must not block the open; fstat() rejects it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise TooLarge
    return data


def error_text(exc: BaseException) -> str:
    """``Type: detail`` for a log line, with a detail even when ``str(exc)`` is
    empty (pika's ``AMQPConnectionError`` keeps the cause in its args)."""
    detail = str(exc).strip()
    if not detail and exc.args:
        detail = ", ".join(str(a).strip() or repr(a) for a in exc.args)
    lines = detail.splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"


def short(text: str) -> str:
    """*text*, cut to :data:`LOG_CHARS` characters for a log line."""
    return text if len(text) <= LOG_CHARS else text[:LOG_CHARS] + "..."


def static_file(name: str) -> str:
    """A file named *name* in the emperor's working directory (uWSGI's fallback)."""
    return os.path.join(os.getcwd(), name)
