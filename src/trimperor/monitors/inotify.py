"""A minimal inotify watch for the file sources, waited on by Trio's event loop.

The kernel's queue is a file descriptor: Trio waits for it to become readable
with the rest of its I/O, so a quiet watch costs no wake-up at all, and a
change is seen as soon as the kernel reports it (no polling step, no debounce
thread). Every event read at once is handed over as one batch.

Only what the file sources need: watch a directory (and, for a recursive
watch, every directory below it, including the ones created later), and
report ``(path, mask)`` pairs. An overflow of the kernel's queue is reported as
:data:`OVERFLOW`, a watch that ended (its directory deleted, moved or
unmounted) as :data:`ENDED`: the caller rescans and watches again. Linux only.

The instance, its watches and the event records come from ``inotify_simple``;
what is here is waiting on its descriptor with trio and what a file source
makes of the events. (watchfiles, used before, wakes its watcher thread every
few milliseconds to poll, which a host of 10,000 idle vassals pays for all day.)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

import trio
from inotify_simple import INotify, parse_events
from inotify_simple import flags as f

__all__ = ["ENDED", "IN_ISDIR", "OVERFLOW", "Inotify", "fs_type", "is_remote"]

IN_ISDIR = f.ISDIR
_GONE = f.IGNORED | f.DELETE_SELF | f.MOVE_SELF | f.UNMOUNT

#: What a configuration directory is watched for: every change of a name, a
#: writer's close, a change of status (``touch``, ``chmod``, ``chown``), a
#: write (``truncate``), and the end of the directory itself.
MASK = (
    f.MODIFY
    | f.ATTRIB
    | f.CLOSE_WRITE
    | f.MOVED_FROM
    | f.MOVED_TO
    | f.CREATE
    | f.DELETE
    | f.DELETE_SELF
    | f.MOVE_SELF
    | f.ONLYDIR
)

#: Reported instead of a path when the kernel's queue overflowed (events were lost).
OVERFLOW = ""
#: The mask reported when the watched directory itself is gone (deleted, moved, unmounted).
ENDED = int(f.IGNORED)

#: File system types (``/proc/self/mountinfo``) on which other hosts change files
#: unseen by inotify.
_REMOTE = frozenset(
    {"nfs", "nfs4", "smbfs", "cifs", "smb3", "9p", "ceph", "afs", "coda", "ocfs2", "gfs2"}
    | {"ncpfs", "gpfs", "lustre", "glusterfs"}
)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def fs_type(real: str, mountinfo: Iterable[str]) -> str:
    """The type of the file system holding the real path *real*, from the lines of
    ``/proc/self/mountinfo``: that of the longest mount point above it (a later
    mount on the same point wins, as it hides the earlier one)."""
    best, kind = "", ""
    for line in mountinfo:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest.split():
            continue
        point = _unescape(parts[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, rest.split()[0]
    return kind


def is_remote(path: str) -> bool:
    """Whether *path* is on a network (or FUSE) file system; blocking.

    There, inotify does not see what other hosts change, and only a rescan can.
    """
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
            kind = fs_type(os.path.realpath(path), info)
    except OSError:
        return False
    return kind in _REMOTE or kind.startswith("fuse")  # sshfs, s3fs, ...: anything FUSE


class Inotify:
    """One inotify instance: add watches, then wait for batches of changes."""

    def __init__(self) -> None:
        self._watch: INotify | None = INotify(nonblocking=True)
        self._fd: int | None = self._watch.fileno()
        self._paths: dict[int, str] = {}
        self._roots: set[int] = set()

    def add(self, path: str, *, root: bool = True) -> None:
        """Watch the directory *path*; a *root*'s end is reported as :data:`ENDED`."""
        assert self._watch is not None
        wd: int = self._watch.add_watch(path, MASK)
        self._paths[wd] = path
        if root:
            self._roots.add(wd)

    def add_tree(self, path: str) -> None:
        """Watch *path* and every directory below it (not following links)."""
        self.add(path)
        self._add_below(path)

    def _add_below(self, path: str) -> None:
        for top, dirs, _files in os.walk(path, followlinks=False):
            for name in dirs:
                sub = os.path.join(top, name)
                try:
                    self.add(sub, root=False)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                        raise

    async def changes(self, *, recursive: bool = False) -> list[tuple[str, int]]:
        """Wait for the next batch: ``(path, mask)`` for every event read at once.

        With *recursive*, a directory created below is watched before the batch
        is returned (what was created in it meanwhile is in the caller's rescan).
        """
        assert self._fd is not None
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            out: list[tuple[str, int]] = []
            for event in parse_events(data):
                wd, mask, name = event.wd, event.mask, event.name
                if mask & f.Q_OVERFLOW:
                    out.append((OVERFLOW, mask))
                    continue
                base = self._paths.get(wd)
                if base is None:
                    continue
                path = os.path.join(base, name) if name else base
                if mask & _GONE:
                    if wd in self._roots:
                        out.append((path, ENDED))
                    if mask & f.IGNORED:
                        del self._paths[wd]
                    continue
                if recursive and mask & f.ISDIR and mask & (f.CREATE | f.MOVED_TO):
                    try:
                        self.add(path, root=False)
                        self._add_below(path)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                            raise
                out.append((path, mask))
            if out:
                return out

    def close(self) -> None:
        if self._watch is not None and self._fd is not None:
            trio.lowlevel.notify_closing(self._fd)
            self._watch.close()
            self._watch = self._fd = None

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
