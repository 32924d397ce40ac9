"""File-system work done as a vassal's user, never as root on its behalf.

In tyrant mode a hosted user writes the configuration, so every path it names
(a log file, a unix socket, a working directory) must be opened, created,
bound or removed with that user's rights. Forking a helper per path would
cost milliseconds in a large emperor; instead the work runs in a short-lived
thread whose *file-system* credentials alone are the user's: Linux keeps
``fsuid``, ``fsgid`` and the supplementary groups per thread, and a non-zero
``fsuid`` drops the file capabilities (``CAP_DAC_OVERRIDE``, ``CAP_CHOWN``,
``CAP_FOWNER``) for that thread. Permission checks, ownership of created
files and sockets, sticky directories and symlink protections then apply as
they would to the user. The thread ends with the work, so its credentials
can never leak into other work.

glibc's ``setgroups()`` changes every thread of the process, so the groups are
set with the raw system call; ``setfsuid``/``setfsgid`` are per thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from trimperor.core.errors import SpawnError

__all__ = ["LIBC", "Credentials", "call_as", "run_as"]

T = TypeVar("T")

# (setgroups, setfsuid, setfsgid) system call numbers.
_SYSCALLS = {
    "x86_64": (116, 122, 123),
    "aarch64": (159, 151, 152),
}

LIBC: ctypes.CDLL | None = None
"""The C library, for the calls Python does not wrap (None where it cannot be loaded)."""
with contextlib.suppress(OSError):
    LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc_syscall = None if LIBC is None else LIBC.syscall


@dataclass(frozen=True, slots=True)
class Credentials:
    """Whose rights file-system work runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _become(creds: Credentials) -> None:  # pragma: no cover - runs in a worker thread
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or _libc_syscall is None:
        raise SpawnError(f"acting as a vassal's user is not supported on {platform.machine()}")
    nr_setgroups, nr_setfsuid, nr_setfsgid = numbers
    groups = (ctypes.c_uint * max(1, len(creds.groups)))(*creds.groups)
    if _libc_syscall(nr_setgroups, len(creds.groups), groups) != 0:
        reason = os.strerror(ctypes.get_errno())
        raise SpawnError(f"cannot take the groups of uid {creds.uid}: {reason}")
    _libc_syscall(nr_setfsgid, creds.gid)
    _libc_syscall(nr_setfsuid, creds.uid)
    # Neither call reports failure; asking again with an invalid id returns the
    # current value.
    if _libc_syscall(nr_setfsuid, -1) != creds.uid or _libc_syscall(nr_setfsgid, -1) != creds.gid:
        raise SpawnError(f"cannot take the file-system identity of uid {creds.uid}")


def call_as(creds: Credentials | None, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` with *creds*' file-system rights; blocking.

    With ``None`` (or when the emperor is not root, and so cannot be anyone
    else), *fn* runs here as it is.
    """
    if creds is None or os.geteuid() != 0:
        return fn(*args)
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            _become(creds)
            result.append(fn(*args))
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=work, name=f"as-uid-{creds.uid}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def run_as(creds: Credentials | None, fn: Callable[..., T], *args: object) -> T:
    """:func:`call_as` from a trio task, off the event loop."""
    if creds is None or os.geteuid() != 0:
        return fn(*args)
    return await trio.to_thread.run_sync(call_as, creds, fn, *args)
