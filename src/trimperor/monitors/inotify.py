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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

import trio

__all__ = ["ENDED", "IN_ISDIR", "OVERFLOW", "Inotify", "is_remote"]

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

#: What a configuration directory is watched for: every change of a name, a
#: writer's close, a change of status (``touch``, ``chmod``, ``chown``), a
#: write (``truncate``), and the end of the directory itself.
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)

#: Reported instead of a path when the kernel's queue overflowed (events were lost).
OVERFLOW = ""
#: The mask reported when the watched directory itself is gone (deleted, moved, unmounted).
ENDED = IN_IGNORED

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]

#: ``f_type`` of file systems on which other hosts change files unseen by inotify.
_REMOTE = frozenset(
    {
        0x6969,  # NFS
        0x517B,  # SMB
        0xFF534D42,  # CIFS
        0xFE534D42,  # SMB2
        0x65735546,  # FUSE (sshfs, ...)
        0x01021997,  # 9P
        0x00C36400,  # Ceph
        0x5346414F,  # AFS
        0x6B414653,  # kAFS
        0x73757245,  # Coda
        0x7461636F,  # OCFS2
        0x01161970,  # GFS2
        0x564C,  # NCP
        0x47504653,  # GPFS
        0x0BD00BD0,  # Lustre
    }
)


def is_remote(path: str) -> bool:
    """Whether *path* is on a network (or FUSE) file system; blocking.

    There, inotify does not see what other hosts change, and only a rescan can.
    """
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return False
    f_type = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return f_type in _REMOTE


class Inotify:
    """One inotify instance: add watches, then wait for batches of changes."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int | None = fd
        self._paths: dict[int, str] = {}
        self._roots: set[int] = set()

    def add(self, path: str, *, root: bool = True) -> None:
        """Watch the directory *path*; a *root*'s end is reported as :data:`ENDED`."""
        assert self._fd is not None
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
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
            at = 0
            while at + _EVENT.size <= len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, at)
                raw = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                if mask & IN_Q_OVERFLOW:
                    out.append((OVERFLOW, mask))
                    continue
                base = self._paths.get(wd)
                if base is None:
                    continue
                path = os.path.join(base, os.fsdecode(raw)) if raw else base
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                    if wd in self._roots:
                        out.append((path, ENDED))
                    if mask & IN_IGNORED:
                        del self._paths[wd]
                    continue
                if recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
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
        if self._fd is not None:
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
