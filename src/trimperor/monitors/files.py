"""The ``dir://`` and ``glob://`` sources: vassal configurations as files.

Both monitors work the same way; they differ only in how they list candidates:

* :class:`DirMonitor` takes every regular file directly inside one directory
  whose name is a configuration name (:func:`~trimperor.core.model.is_valid_name`);
  the vassal name is the bare file name.
* :class:`GlobMonitor` takes every regular file matched by a shell pattern
  (:func:`glob.glob`, relative patterns against the current directory at scan
  time); the vassal name is the path as matched.

A monitor runs two tasks. The *scanner* lists the candidates, stats them, reads
the ones whose version changed, and sends a :class:`~trimperor.core.model.Snapshot`
when the result differs from the last one it sent. The *watcher* follows the
file system with inotify (:mod:`trimperor.monitors.inotify`, waited on by
Trio's event loop: a quiet watch costs no wake-up) and pokes the scanner as
soon as something relevant happens, or the kernel's queue overflowed. Every
scan is a full, level-triggered rescan; an unchanged file is not read again
(texts are cached by version), so a rescan costs one ``stat`` per candidate.

Without a poke, every ``freq`` seconds: while inotify watches a local file
system, the scanner only looks at the targets of symbolic links (which no
watch sees change) and rescans in full every ``_FULL_RESCAN_EVERY``-th time,
the safety net; on a network file system (other hosts' changes are not
reported), while nothing watchable exists, or while the watch cannot be set up,
it rescans in full every time, as uWSGI polls. The watcher also checks every
``freq`` seconds that it still watches the right directory (one replaced, a
missing one that appeared).

A directory that disappears counts as empty (its vassals stop) until it comes
back; any other failure to scan sends a :class:`~trimperor.core.model.SourceProblem`
and keeps the last snapshot. Scans and inotify waits run in worker threads.

A document's version is ``mtime_ns:inode:size:uid:gid``: a ``touch`` within the same
second and an atomic rename both change it. A file that cannot be read is sent
with ``text=None`` and ``error`` set (its version gets an ``:unreadable``
suffix, so that it changes again once the file becomes readable).

A candidate that is not a regular file (a FIFO, a directory named ``x.ini``, a
symbolic link loop or a dangling link) is skipped with one ``source.skipped``
line, repeated only if it goes away and comes back. A file name that is not
UTF-8 is a candidate like any other (decoded with ``surrogateescape``).

Limitations: a change to the *target* of a symlink is not watched (the look
every ``freq`` seconds sees it), and a glob whose wildcards span directories watches
the fixed part of the pattern recursively, which costs one inotify watch per
directory below it.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import SourceError, UsageError
from trimperor.core.model import Snapshot, SourceEvent, SourceProblem, VassalDocument, is_valid_name
from trimperor.core.shared import share
from trimperor.monitors import toolkit as kit
from trimperor.monitors.inotify import ENDED, IN_ISDIR, OVERFLOW, Inotify, is_remote
from trimperor.monitors.toolkit import (
    WatchingStatus,
    check_freq,
    plugin_options,
    poke,
    read_regular,
)

__all__ = ["DirMonitor", "GlobMonitor"]

log = logging.getLogger(__name__)

#: How often a file that is open for writing is looked at again (seconds).
_WRITTEN_RECHECK = 0.05
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
#: While inotify watches a local directory, the full rescan (a ``stat`` of every
#: candidate) runs every this many ``freq`` periods; the other periods only
#: look at the watched directory and at the targets of symbolic links.
_FULL_RESCAN_EVERY = 20
#: Seconds before watching again a directory that vanished as it was being watched.
_REWATCH_DELAY = 0.01

#: stat() errors that mean "this candidate is not a file": skip it.
_NOT_A_FILE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG})


class _Gone(Exception):
    """The directory does not exist (any more): the source is empty."""


# -- the blocking part: listing, stat and read (run in a worker thread) --------


def _version(st: os.stat_result) -> str:
    # The owner is part of the version: in tyrant mode it decides the user the
    # vassal runs as, so a chown must be acted on like an edit.
    return f"{st.st_mtime_ns}:{st.st_ino}:{st.st_size}:{st.st_uid}:{st.st_gid}"


def _target_version(path: str) -> str:
    """The version of what the symbolic link *path* points to, "" if nothing; blocking."""
    try:
        return _version(os.stat(path))
    except OSError:
        return ""


def _load(
    name: str,
    path: str,
    source: str,
    follow_symlinks: bool,
    cache: dict[str, VassalDocument],
    *,
    tyrant: bool = False,
    max_size: int | None = None,
    busy: set[str] | None = None,
    in_own_dir: bool = False,
) -> VassalDocument | None:
    """The document for one candidate, or None if it is not a (readable) file.

    Raises OSError when the candidate cannot even be examined (e.g. the
    directory lost its search permission): the whole scan is then a problem.
    """
    try:
        st = os.stat(path) if follow_symlinks else os.lstat(path)
    except OSError as exc:
        if exc.errno in _NOT_A_FILE:
            return None
        raise
    if not (stat.S_ISREG(st.st_mode) or (not follow_symlinks and stat.S_ISLNK(st.st_mode))):
        return None
    version = _version(st)
    cached = cache.get(name)
    if cached is not None and cached.version == version and cached.path == path:
        return cached
    if tyrant and follow_symlinks:
        # As Apache's SymLinksIfOwnerMatch: a user must not make another
        # user's configuration run from their directory (as that user).
        try:
            link = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(link.st_mode) and link.st_uid != st.st_uid:
            return _refused(
                name,
                path,
                source,
                version,
                f"symlink owned by uid {link.st_uid} points to a file owned by uid "
                f"{st.st_uid}; tyrant mode needs both to have the same owner",
            )
    if max_size is not None and st.st_size > max_size:
        return _refused(
            name,
            path,
            source,
            version,
            f"{st.st_size} bytes, over --max-config-size ({max_size}); not read",
        )
    try:
        read = _read(path, max_size)
    except _BeingWritten:
        if busy is not None:
            busy.add(name)
        return cache.get(name)  # what it was before the writer opened it, if anything
    except FileNotFoundError:
        return None  # vanished since stat(), or a dangling symlink
    except OSError as exc:
        return _unreadable(name, path, source, version, exc)
    if read is None:
        return None
    fst, data = read
    if max_size is not None and len(data) > max_size:
        return _refused(name, path, source, version, f"over --max-config-size ({max_size})")
    if follow_symlinks:
        version = _version(fst)  # describes exactly what was read
        st = fst
    return VassalDocument(
        name=name,
        source=source,
        version=version,
        text=share(data.decode("utf-8", errors="replace")),
        path=path,
        uid=st.st_uid,
        gid=st.st_gid,
        in_own_dir=in_own_dir,
    )


def _skip_reason(path: str, follow_symlinks: bool) -> str | None:
    """Why the candidate at *path* was skipped, if it exists at all; blocking."""
    try:
        lst = os.lstat(path)
    except OSError:
        return None  # vanished meanwhile: nothing to say
    if stat.S_ISLNK(lst.st_mode) and follow_symlinks:
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "a symbolic link loop"
            if exc.errno == errno.ENOENT:
                return "a dangling symbolic link"
            return f"a symbolic link that cannot be followed ({exc.strerror or exc})"
    else:
        st = lst
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(st.st_mode):
            return f"{what}, not a regular file"
    return None


@dataclass(frozen=True, slots=True)
class FileOptions:
    """What dir:// and glob:// sources take from the command line (plugin ``files``)."""

    on_demand_extension: str | None = None
    """The on-demand socket is the first line of ``NAME + EXT``."""
    on_demand_directory: str | None = None
    """The on-demand socket is ``DIR/<name without extension>.socket``."""

    @classmethod
    def of(cls, options: MonitorOptions) -> FileOptions:
        own = plugin_options(cls, options, "files")
        if own.on_demand_directory:
            return replace(own, on_demand_directory=os.path.abspath(own.on_demand_directory))
        return own


def _with_socket(doc: VassalDocument, options: FileOptions) -> VassalDocument:
    """uWSGI's on-demand socket discovery for file vassals; blocking.

    ``--on-demand-extension EXT``: the first line of the file ``NAME + EXT`` next
    to the configuration; else ``--on-demand-directory DIR``: the unix socket
    ``DIR/<name without extension>.socket``. The socket is part of the version,
    so that a change of it is acted on.
    """
    socket = None
    if options.on_demand_extension and doc.path is not None:
        try:
            with open(doc.path + options.on_demand_extension, "rb") as f:
                raw = f.read(4096)
        except OSError:
            raw = b""
        cut = next((i for i, b in enumerate(raw) if b < 32), len(raw))
        socket = raw[:cut].decode(errors="replace") or None
    if socket is None and options.on_demand_directory:
        stem = os.path.splitext(os.path.basename(doc.name))[0]
        socket = os.path.join(options.on_demand_directory, stem + ".socket")
    if socket is None:
        return doc
    return replace(doc, socket=socket, version=f"{doc.version}:{socket}")


def _read(path: str, max_size: int | None = None) -> tuple[os.stat_result, bytes] | None:
    """The status and content of the regular file at *path*; None if it is not one.

    At most ``max_size + 1`` bytes are read: enough to tell that it is too large.
    """
    return read_regular(path, max_size, check=_refuse_if_being_written)


def _refuse_if_being_written(fd: int, _st: os.stat_result) -> None:
    if _being_written(fd):
        raise _BeingWritten


class _BeingWritten(Exception):
    """The file is open for writing somewhere: it may be incomplete."""


def _being_written(fd: int) -> bool:
    """Whether any process has the file open for writing.

    A read lease is refused (EAGAIN) exactly then; it is released at once.
    Where leases are not available (another owner's file without CAP_LEASE, a
    file system without them), the answer is False: the file is read as it is.
    """
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    return False


def _refused(name: str, path: str, source: str, version: str, why: str) -> VassalDocument:
    """A candidate that is not read (and not started): *why* is logged once."""
    return VassalDocument(
        name=name, source=source, version=version + ":refused", text=None, path=path, error=why
    )


def _unreadable(name: str, path: str, source: str, version: str, exc: OSError) -> VassalDocument:
    return VassalDocument(
        name=name,
        source=source,
        version=version + ":unreadable",
        text=None,
        path=path,
        error=f"cannot read {path}: {exc.strerror or exc}",
    )


# -- watching --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WatchTarget:
    """The directory to watch, and which one it was (a new one means re-watch)."""

    path: str
    recursive: bool
    device: int
    inode: int


_ESCAPED = re.compile(r"\[([*?[])\]")


def _literal(part: str) -> str | None:
    """A pattern component as a plain name, or None if it has wildcards.

    ``[*]``, ``[?]`` and ``[[]`` are escapes (see :func:`glob.escape`), not wildcards.
    """
    if any(c in _ESCAPED.sub("", part) for c in "*?["):
        return None
    return _ESCAPED.sub(r"\1", part)


def _watch_target(pattern: str) -> _WatchTarget | None:
    """Where to watch for changes to the files an absolute glob *pattern* matches.

    That is the longest directory prefix without wildcards, recursively if
    wildcards remain in more than the last component. If that directory does
    not exist or cannot be read, its deepest readable ancestor, not
    recursively: the watcher moves down as the missing directories appear (or
    become readable).
    """
    parts = pattern.split(os.sep)
    fixed: list[str] = []
    for part in parts[:-1]:
        literal = _literal(part)
        if literal is None:
            break
        fixed.append(literal)
    recursive = len(parts) - len(fixed) > 1
    path = os.sep.join(fixed) or os.sep
    while True:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if (
            st is not None
            and stat.S_ISDIR(st.st_mode)
            and os.access(path, os.R_OK | os.X_OK, effective_ids=True)
        ):
            return _WatchTarget(path, recursive, st.st_dev, st.st_ino)
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path, recursive = parent, False


def _relevance(pattern: str, extra_extensions: Iterable[str]) -> Callable[[str], bool]:
    """Does a change at this path matter to *pattern*?

    It does if the path matches the pattern's leading components (a directory
    on the way to the configurations, created or removed), or the whole pattern
    with a configuration name. It may say yes too often, never too rarely: a
    rescan decides.
    """
    want = pattern.split(os.sep)
    extra = tuple(extra_extensions)

    def relevant(path: str) -> bool:
        got = path.split(os.sep)
        if len(got) > len(want):
            return False
        if not all(fnmatch.fnmatchcase(g, w) for g, w in zip(got, want, strict=False)):
            return False
        return len(got) < len(want) or is_valid_name(got[-1], extra)

    return relevant


# -- the monitors ------------------------------------------------------------------


class _FileMonitor:
    """What :class:`DirMonitor` and :class:`GlobMonitor` share: everything but listing."""

    uri: str
    #: Whether a first scan that cannot list the source is a :class:`SourceError`.
    _strict_start = False
    #: Whether a uWSGI vassal runs in the directory of its file (dir://, as uWSGI).
    _in_own_dir = False

    def __init__(self, options: MonitorOptions) -> None:
        check_freq(options)
        self._options = options
        self._own = FileOptions.of(options)
        # Scans get their own thread, so that many watchers (each holding one
        # of Trio's default worker threads) can never starve them.
        self._limiter = trio.CapacityLimiter(1)
        self._written: set[str] = set()
        """Files that were open for writing at the last scan (not read yet)."""
        #: Candidates skipped at the last scan, and why (each is logged once).
        self._skipped: dict[str, str] = {}
        #: Whether inotify watches the source on a local file system (then a
        #: full rescan is only the occasional safety net).
        self._watched = False
        #: Symbolic links among the candidates at the last scan, and the
        #: version of their target then ("" if it could not be followed).
        self._links: dict[str, str] = {}

    @property
    def status(self) -> WatchingStatus:
        """A file source has no connection to lose: it is always watching."""
        return WatchingStatus(self.uri)

    def _candidates(self) -> Iterator[tuple[str, str]]:
        """(vassal name, absolute path) of every configuration name, one at a time;
        blocking. A rescan so holds one entry at a time, not 10,000 at once (their
        strings would leave the allocator's pools fragmented, scan after scan).

        Raises :class:`_Gone` if there is nothing to list, OSError if listing failed.
        """
        raise NotImplementedError

    def _pattern(self) -> str:
        """An absolute glob pattern for the files, to decide what to watch."""
        raise NotImplementedError

    def _scan(
        self, cache: dict[str, VassalDocument]
    ) -> tuple[tuple[VassalDocument, ...], dict[str, VassalDocument]]:
        """Everything the source offers now, and the new cache; blocking."""
        docs: dict[str, VassalDocument] = {}
        loaded: dict[str, VassalDocument] = {}
        """As read (the cache): without the on-demand socket, which is looked up anew."""
        busy: set[str] = set()
        skipped: dict[str, str] = {}
        links: dict[str, str] = {}
        follow = self._options.follow_symlinks
        for name, path in self._candidates():
            doc = _load(
                name,
                path,
                self.uri,
                self._options.follow_symlinks,
                cache,
                tyrant=self._options.tyrant,
                max_size=self._options.max_config_size,
                busy=busy,
                in_own_dir=self._in_own_dir,
            )
            if doc is not None:
                key = doc.name  # an unchanged file's: the string the cache holds
                if follow:
                    if doc is cache.get(key):  # unchanged: so is whether it is a link
                        if path in self._links:
                            links[path] = self._links[path]
                    elif os.path.islink(path):
                        links[path] = _target_version(path)
                if self._in_own_dir and not doc.in_own_dir:
                    doc = replace(doc, in_own_dir=True)
                if key in busy and doc.socket is not None:
                    docs[key] = doc  # the document sent before, standing in: as it was
                    continue
                if doc.error is None and key not in busy:
                    loaded[key] = doc
                docs[key] = _with_socket(doc, self._own)
                continue
            if name in busy:
                continue  # open for writing, and new: not there yet
            reason = _skip_reason(path, self._options.follow_symlinks)
            if reason is not None:
                if follow and "symbolic link" in reason:
                    links[path] = _target_version(path)
                skipped[path] = reason
                if self._skipped.get(path) != reason:
                    log.warning("source.skipped uri=%s path=%s reason=%s", self.uri, path, reason)
        self._skipped = skipped
        self._links = links
        for name in sorted(busy - self._written):
            log.info(
                "source.incomplete uri=%s name=%s reason=open for writing; read once closed",
                self.uri,
                name,
            )
        self._written = busy
        return tuple(docs[name] for name in sorted(docs)), loaded

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Send a snapshot now and whenever the files change; closes *send* on return.

        A directory that cannot be listed at start raises
        :class:`~trimperor.core.errors.SourceError` before ``task_status.started()``.
        """
        async with send:
            scanner = _Scanner(self, send)
            await scanner.first()
            pokes_send, pokes_recv = trio.open_memory_channel[None](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_forever, pokes_send)
                task_status.started()
                quiet = 0  # freq periods since the last full rescan
                while True:
                    # A file open for writing is looked at again soon: its writer
                    # may close it through a path no watch sees (a symlink's target).
                    wait = _WRITTEN_RECHECK if self._written else self._options.freq
                    poked = False
                    with trio.move_on_after(wait):
                        await pokes_recv.receive()
                        poked = True
                    if not (poked or self._written or not self._watched):
                        # inotify sees every change here but those to the targets
                        # of symbolic links: look at those, and rescan in full only
                        # now and then (the safety net).
                        quiet += 1
                        if quiet < _FULL_RESCAN_EVERY and not await trio.to_thread.run_sync(
                            self._links_changed, limiter=self._limiter
                        ):
                            continue
                    quiet = 0
                    await scanner.rescan()

    def _links_changed(self) -> bool:
        """Whether a symbolic link's target changed since the last scan; blocking."""
        return any(_target_version(path) != v for path, v in self._links.items())

    async def _watch_forever(self, pokes: trio.MemorySendChannel[None]) -> None:
        """Follow the file system and poke the scanner; survives every failure."""
        failure: str | None = None
        while True:
            pattern = self._pattern()
            target = await trio.to_thread.run_sync(_watch_target, pattern, limiter=self._limiter)
            if target is None:
                await trio.sleep(self._options.freq)
                continue
            try:
                await self._watch(pattern, target, pokes)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    # Gone between the look and the watch: look again at once.
                    await trio.sleep(_REWATCH_DELAY)
                    continue
                # The rescan every freq seconds still works; try again later.
                message = f"{type(exc).__name__}: {exc}"
                if message != failure:
                    log.warning(
                        "source.watch_failed uri=%s path=%s error=%s; polling every %ss",
                        self.uri,
                        target.path,
                        message,
                        self._options.freq,
                    )
                    failure = message
                await trio.sleep(self._options.freq)
            else:
                failure = None

    async def _watch(
        self, pattern: str, target: _WatchTarget, pokes: trio.MemorySendChannel[None]
    ) -> None:
        """Watch *target* until it is no longer the right place to watch."""
        relevant = _relevance(pattern, self._options.extra_extensions)
        depth = pattern.count(os.sep)  # that of the files the pattern names
        remote = await trio.to_thread.run_sync(is_remote, target.path, limiter=self._limiter)
        with Inotify() as watch:
            if target.recursive:
                await trio.to_thread.run_sync(watch.add_tree, target.path, limiter=self._limiter)
            else:
                watch.add(target.path)
            log.debug(
                "source.watching uri=%s path=%s recursive=%s remote=%s",
                self.uri,
                target.path,
                target.recursive,
                remote,
            )
            # On a network file system other hosts' changes are not reported:
            # the full rescan every freq seconds stays.
            self._watched = not remote
            poke(pokes)  # what changed before the watch existed
            batch: list[tuple[str, int]] | None = None
            try:
                while True:
                    if batch is not None:
                        if any(path == OVERFLOW for path, _ in batch):
                            log.info("source.overflow uri=%s action=rescan", self.uri)
                            poke(pokes)
                        elif any(relevant(path) for path, _ in batch):
                            log.debug("source.changed uri=%s changes=%d", self.uri, len(batch))
                            poke(pokes)
                        if any(mask == ENDED for _, mask in batch):
                            poke(pokes)
                            return
                    if self._pattern() != pattern:
                        return  # a relative glob pattern and a new working directory
                    # Only a change of a directory, or of a name on the way to the
                    # files (or none for freq seconds) can move the place to watch;
                    # a file's change goes straight to the scan.
                    if batch is None or any(
                        mask & IN_ISDIR or path.count(os.sep) < depth for path, mask in batch
                    ):
                        now = await trio.to_thread.run_sync(
                            _watch_target, pattern, limiter=self._limiter
                        )
                        if now != target:
                            return  # e.g. a missing directory appeared meanwhile
                    batch = None
                    # Every freq seconds, check that this is still the place to
                    # watch (the directory may have been replaced).
                    with trio.move_on_after(self._options.freq):
                        batch = await watch.changes(recursive=target.recursive)
            finally:
                self._watched = False


class _Scanner:
    """The scanning half of one :meth:`_FileMonitor.run`: what was sent, what is cached.

    Snapshots are sent when they differ from the last one sent (the first one
    always), and after a problem clears, so that the emperor hears the source
    is healthy again. A problem is sent once per distinct message, not on every
    failed rescan.
    """

    def __init__(self, monitor: _FileMonitor, send: trio.MemorySendChannel[SourceEvent]) -> None:
        self._monitor = monitor
        self._send = send
        self._uri = monitor.uri
        self._cache: dict[str, VassalDocument] = {}
        self._sent: tuple[VassalDocument, ...] | None = None
        self._gone = False
        self._problem: str | None = None

    async def first(self) -> None:
        """The initial scan: raises SourceError if a strict source cannot be listed."""
        if self._monitor._strict_start:
            try:
                docs = await self._scan()
            except (_Gone, OSError) as exc:
                raise SourceError(f"{self._uri}: cannot list the directory: {exc}") from exc
            await self._publish(docs)
        else:
            await self.rescan()

    async def rescan(self) -> None:
        try:
            docs = await self._scan()
        except _Gone as exc:
            if not self._gone:
                log.warning("source.gone uri=%s error=%s; its vassals stop", self._uri, exc)
                self._gone = True
            docs = ()
        except OSError as exc:
            message = f"cannot scan: {exc}"
            if message != self._problem:
                log.warning("source.problem uri=%s error=%s", self._uri, message)
                self._problem = message
                await self._send.send(SourceProblem(self._uri, message))
            return
        else:
            if self._gone:
                log.info("source.back uri=%s", self._uri)
                self._gone = False
        await self._publish(docs)

    async def _scan(self) -> tuple[VassalDocument, ...]:
        # What was sent stands in for a file that is being written; the
        # versions of failed reads never match, so those are read again.
        known = {doc.name: doc for doc in self._sent or ()}
        known.update(self._cache)
        docs, self._cache = await trio.to_thread.run_sync(
            self._monitor._scan, known, limiter=self._monitor._limiter
        )
        return docs

    async def _publish(self, docs: tuple[VassalDocument, ...]) -> None:
        recovered = self._problem is not None
        if recovered:
            log.info("source.recovered uri=%s", self._uri)
            self._problem = None
        if docs == self._sent and not recovered:
            log.debug("source.unchanged uri=%s vassals=%d", self._uri, len(docs))
            return
        before = set(self._sent or ())
        for doc in docs:
            if doc.error is not None and doc not in before:
                log.warning(
                    "source.unreadable uri=%s name=%s error=%s", self._uri, doc.name, doc.error
                )
        log.info("source.rescan uri=%s vassals=%d", self._uri, len(docs))
        await self._send.send(Snapshot(self._uri, docs))
        self._sent = docs


class DirMonitor(_FileMonitor):
    """``dir:///path``: every configuration file directly inside one directory."""

    _strict_start = True
    _in_own_dir = True

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        super().__init__(options)
        path = uri.removeprefix("dir://")
        if not path:
            raise UsageError(f"no directory in {uri!r}")
        self.path = os.path.abspath(path)
        self.uri = f"dir://{self.path}"

    def _candidates(self) -> Iterator[tuple[str, str]]:
        extra = self._options.extra_extensions
        try:
            entries = os.scandir(self.path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise _Gone(str(exc)) from exc
        with entries:
            for e in entries:
                if is_valid_name(e.name, extra):
                    yield e.name, e.path

    def _pattern(self) -> str:
        return os.path.join(glob.escape(self.path), "*")


class GlobMonitor(_FileMonitor):
    """``glob://pattern``: every configuration file the shell pattern matches."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        super().__init__(options)
        pattern = uri.removeprefix("glob://")
        if not pattern:
            raise UsageError(f"no pattern in {uri!r}")
        self.pattern = pattern
        self.uri = f"glob://{pattern}"

    def _candidates(self) -> Iterator[tuple[str, str]]:
        extra = self._options.extra_extensions
        for match in glob.iglob(self.pattern):
            if is_valid_name(match, extra):
                yield match, os.path.abspath(match)

    def _pattern(self) -> str:
        return os.path.abspath(self.pattern)
