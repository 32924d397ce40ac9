"""The toolkit every monitor builds on (dir, glob, pg, mongodb, amqp, zmq, ldap, zoo, etcd).

- :class:`SourceStatus`: the health a monitor reports in stats (connected or
  retrying, last successful read, vassal count, last error), with reconnect
  backoff.
- :func:`check_document`: name and size validation of what came over the wire.
- :class:`LastGood`: full snapshots from what a polled source (pg, mongodb)
  read, each name keeping its last good document while it is bad.
- :func:`read_regular`, :func:`read_file`, :func:`short`: non-blocking reads of
  regular files (a FIFO never blocks them) and log-line helpers.
- :func:`poke`, :func:`parse_id`, :func:`error_text`, :class:`VersionCounter`,
  :func:`unix_time`: a rescan request, uid/gid values, error text for a log
  line, versions of pushed documents, a Unix time from trio's clock.
- :func:`load_factory`: the one guard for a driver that is not installed.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import BadVassal, MissingExtraError, TooLarge, UsageError
from trimperor.core.model import SourceEvent, SourceProblem, VassalDocument, remote_name_problem
from trimperor.core.stats import SourceStats

if TYPE_CHECKING:
    from trimperor.abc import MonitorFactory

__all__ = [
    "IGNORED",
    "BadVassal",
    "EventSink",
    "LastGood",
    "RateLimitedWarnings",
    "SourceStatus",
    "Started",
    "TooLarge",
    "VersionCounter",
    "WatchingStatus",
    "check_document",
    "check_freq",
    "check_or_raise",
    "declared_extra",
    "driver_imports",
    "error_text",
    "load_factory",
    "parse_id",
    "plugin_options",
    "poke",
    "poke_from_thread",
    "quiet_driver_log",
    "read_file",
    "read_regular",
    "redact",
    "short",
    "unix_time",
]

log = logging.getLogger(__name__)

#: Reconnect delays: first, doubling up to the maximum.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
#: How much of an untrusted string a log line quotes.
LOG_CHARS = 200

T = TypeVar("T")
P = TypeVar("P")

#: The types of the :class:`~trimperor.abc.Monitor` contract's ``run``.
EventSink = trio.MemorySendChannel[SourceEvent]
Started = trio.TaskStatus[None]
IGNORED: Started = trio.TASK_STATUS_IGNORED

#: Per trio run: the Unix time minus trio's clock, taken at the first call.
_UNIX_OFFSET: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("trimperor_unix_offset")


def unix_time() -> float:
    """The Unix time now, for display only: trio's clock plus an offset taken once a run.

    Timers never use it; a wall-clock step after the start does not move it.
    """
    now = trio.current_time()
    try:
        offset = _UNIX_OFFSET.get()
    except LookupError:
        offset = time.time() - now  # noqa: TID251 (the one anchor of unix_time)
        _UNIX_OFFSET.set(offset)
    return now + offset


#: The entry-point group of the monitors.
GROUP = "trimperor.monitors"


def declared_extra(module: str) -> tuple[str, str]:
    """The scheme and the extra the entry points declare for the monitor *module*.

    An entry point ``pg = "trimperor.monitors.postgres:PostgresMonitor [pg]"``
    declares that the ``pg`` scheme needs ``trimperor[pg]``; without a
    declaration (or without package metadata) the extra is named as the scheme.
    """
    from importlib.metadata import entry_points  # package metadata costs 1.5 MB of RSS

    for ep in entry_points(group=GROUP):
        if ep.module == module:
            return ep.name, ep.extras[0] if ep.extras else ep.name
    short_name = module.rpartition(".")[2]
    return short_name, short_name


@contextmanager
def driver_imports(module: str) -> Iterator[None]:
    """Around a monitor's imports of its driver: a missing one raises
    :class:`~trimperor.core.errors.MissingExtraError` naming the declared extra."""
    try:
        yield
    except ImportError as exc:
        scheme, extra = declared_extra(module)
        raise MissingExtraError(scheme, extra, exc.name or module) from None


def load_factory(scheme: str, target: str) -> MonitorFactory:
    """The monitor class an entry point names (``module:attr [extra]``).

    A driver that is not installed raises
    :class:`~trimperor.core.errors.MissingExtraError` naming the extra the entry
    point declares (else the scheme).
    """
    from importlib.metadata import EntryPoint  # only for a plugin's monitor

    ep = EntryPoint(scheme, target, GROUP)
    try:
        module = importlib.import_module(ep.module)
    except MissingExtraError:
        raise
    except ImportError as exc:
        extra = ep.extras[0] if ep.extras else scheme
        raise MissingExtraError(scheme, extra, exc.name or ep.module) from None
    factory: MonitorFactory = getattr(module, ep.attr)
    return factory


def quiet_driver_log(name: str, level: int) -> None:
    """The driver's own logger *name* logs from *level* up, unless the operator set its
    level: it would log every failed attempt, and the monitor logs an outage once."""
    driver = logging.getLogger(name)
    if driver.level == logging.NOTSET:
        driver.setLevel(level)


def poke(pokes: trio.MemorySendChannel[None]) -> None:
    """Ask a monitor's reader for a read now; one pending request is enough."""
    with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pokes.send_nowait(None)


def poke_from_thread(token: trio.lowlevel.TrioToken, pokes: trio.MemorySendChannel[None]) -> None:
    """:func:`poke`, from a worker thread; nothing if the run is over."""
    with suppress(trio.RunFinishedError):
        token.run_sync_soon(poke, pokes)


def parse_id(value: object, what: str, *, digits: bool = False) -> int | None:
    """A uid or gid read from a source: None, or a non-negative integral number
    (and, with *digits*, a string of digits). Raises ValueError naming *what*."""
    if value is None:
        return None
    if digits and isinstance(value, str) and value.strip().isdigit():
        return int(value)
    # A Decimal (from a database driver) can only be one if something imported decimal.
    decimal = sys.modules.get("decimal")
    numbers = (int, float, decimal.Decimal) if decimal is not None else (int, float)
    if (
        isinstance(value, numbers)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
        and value >= 0
    ):
        return int(value)
    raise ValueError(f"{what} is not a non-negative integer: {value!r}")


class VersionCounter:
    """Versions of pushed documents (amqp, zmq): ``N@UNIX`` with N counting up
    from 1, so that every message is a new version, even within a clock tick."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def __call__(self) -> str:
        return f"{next(self._next)}@{unix_time():.6f}"


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
        self._pending[token] = (what, unix_time())
        return token

    def end(self, token: int) -> None:
        self._pending.pop(token, None)

    def ok(self, vassals: int | None = None) -> None:
        """A successful read (connect, query, message)."""
        if self.state == "retrying":
            log.info("source.recovered uri=%s attempts=%d", self.label, self.attempt)
        self.state = "connected"
        self.last_ok = unix_time()
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
        self.next_retry = unix_time() + delay
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
        as a :class:`~trimperor.core.model.SourceProblem`.
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


class WatchingStatus:
    """The health of a source that has no connection to lose (dir, glob)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def snapshot(self) -> SourceStats:
        return SourceStats(uri=self.uri, state="watching", vassals=0)


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


def check_or_raise(
    doc: VassalDocument, options: MonitorOptions, bad: type[BadVassal] = BadVassal
) -> None:
    """Raise *bad* for what :func:`check_document` finds in *doc*."""
    problem = check_document(doc, options)
    if problem is not None:
        raise bad(doc.name, problem)


def plugin_options(kind: Callable[..., P], options: MonitorOptions, plugin: str) -> P:
    """The options object *kind* of *plugin*, made of its settings in *options*
    (the defaults for those not given). Raises UsageError for an unknown one."""
    settings = options.plugins.get(plugin, {})
    try:
        return kind(**settings)
    except TypeError:
        known = getattr(kind, "__dataclass_fields__", {})
        unknown = sorted(set(settings) - set(known))
        raise UsageError(f"unknown {plugin} option(s): {', '.join(unknown) or '?'}") from None


def check_freq(options: MonitorOptions) -> None:
    """Raise UsageError unless the rescan interval is positive."""
    if not options.freq > 0:
        raise UsageError(f"the rescan interval must be positive, not {options.freq!r}")


# -- polled sources: snapshots ----------------------------------------------------------


class LastGood(Generic[T]):
    """Turns what a source read into snapshots, remembering each name's last good document.

    *parse* makes a document of one item read (a row, a document, a key) or raises
    :class:`BadVassal`. A bad item is logged on *logger* as *event*, at WARNING
    the first time and at DEBUG while it stays the same; if its name had a good
    document at the previous read, that one stays in the snapshot. Of two good
    items with one name, the first wins ("the first *what* wins"). A source
    that also follows changes (etcd's watch) applies them with :meth:`change`
    and :meth:`forget`. Names are shown in log lines through *shown*.
    """

    def __init__(
        self,
        source: str,
        parse: Callable[[T], VassalDocument],
        *,
        event: str,
        what: str,
        logger: logging.Logger,
        shown: Callable[[str | None], str] = str,
    ) -> None:
        self._source = source
        self._parse = parse
        self._message = event + " uri=%s name=%s reason=%s%s"
        self._duplicate = f"duplicate name; the first {what} wins"
        self._log = logger
        self._shown = shown
        self._good: dict[str, VassalDocument] = {}
        self._reported: set[tuple[str | None, str]] = set()

    @property
    def good(self) -> Mapping[str, VassalDocument]:
        """Each name's last good document."""
        return self._good

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

    def change(self, item: T) -> VassalDocument | None:
        """One item changed: its new document, or None if it is bad (logged; its
        name keeps its last good document)."""
        try:
            doc = self._parse(item)
        except BadVassal as bad:
            kept = bad.name is not None and bad.name in self._good
            self._report(self._reported, bad.name, bad.reason, kept)
            return None
        self._good[doc.name] = doc
        return doc

    def forget(self, name: str) -> bool:
        """*name* is gone from the source; whether it had a good document."""
        return self._good.pop(name, None) is not None

    def _report(
        self, reported: set[tuple[str | None, str]], name: str | None, reason: str, kept: bool
    ) -> None:
        key = (name, reason)
        level = logging.DEBUG if key in self._reported else logging.WARNING
        reported.add(key)
        self._log.log(
            level,
            self._message,
            self._source,
            self._shown(name),
            short(reason),
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


def read_regular(
    path: str,
    limit: int | None = None,
    *,
    nofollow: bool = False,
    check: Callable[[int, os.stat_result], None] | None = None,
) -> tuple[os.stat_result, bytes] | None:
    """The status and content of the regular file at *path*; None if it is not one; blocking.

    The open does not block (O_NONBLOCK: a FIFO put there is rejected by the
    fstat that follows). *check*, given the descriptor and its status, may
    raise to refuse the file before anything is read. At most ``limit + 1``
    bytes are read: enough to tell that it is too large. OSError (a missing
    file included) is the caller's.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags)
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if check is not None:
            check(fd, st)
        return st, f.read() if limit is None else f.read(limit + 1)


def read_file(path: str, limit: int) -> bytes | None:
    """The contents of the regular file at *path*, None if there is none; blocking.

    Raises :class:`~trimperor.core.errors.TooLarge` past *limit* bytes, OSError if it
    cannot be read.
    """
    try:
        read = read_regular(path, limit)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    if read is None:
        return None
    if len(read[1]) > limit:
        raise TooLarge
    return read[1]


def error_text(
    exc: BaseException, *, too_slow: str | None = None, detail: str | None = None
) -> str:
    """``Type: detail`` for a log line, with a detail even when ``str(exc)`` is
    empty (pika's ``AMQPConnectionError`` keeps the cause in its args).

    *too_slow* is the whole text for a :class:`trio.TooSlowError` (a timeout
    the monitor set); *detail* replaces ``str(exc)`` (a driver's own message).
    """
    if too_slow is not None and isinstance(exc, trio.TooSlowError):
        return too_slow
    detail = (str(exc) if detail is None else detail).strip()
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
