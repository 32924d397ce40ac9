"""One task that waits for the first connection on every armed socket.

An armed on-demand vassal is a record, not a task: its supervisor registers
its held sockets here and returns (it is *dormant*), and :meth:`Armory.run`,
one task for all of them, waits on an epoll instance of its own that holds
every armed socket (that instance is itself one descriptor in trio's loop).
The first socket of a vassal that turns readable disarms all of that vassal's
sockets and calls its ``armory_wake``, which starts the vassal's work again. No
connection is accepted here: it waits in the backlog for the vassal.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Iterable
from typing import Protocol

import trio

__all__ = ["Armed", "Armory"]

log = logging.getLogger(__name__)

#: Readiness events taken from the epoll instance per wake-up of the task.
_BATCH = 1024


class Armed(Protocol):
    """What is armed: told which of its sockets a connection arrived at."""

    def armory_wake(self, fd: int) -> None: ...


class Armory:
    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._owner: dict[int, Armed] = {}
        """fd -> the vassal it was armed for."""
        self._armed: dict[Armed, tuple[int, ...]] = {}
        """The vassal -> its armed fds (no callback object per vassal: 10,000 armed)."""

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, key: Armed, fds: Iterable[int]) -> None:
        """Wait for a connection on any of *fds*; then call ``key.armory_wake(fd)`` once."""
        self.disarm(key)
        if self._epoll is None:
            self._epoll = select.epoll()
        fds = tuple(fds)
        for fd in fds:
            self._epoll.register(fd, select.EPOLLIN)
            self._owner[fd] = key
        self._armed[key] = fds

    def disarm(self, key: Armed) -> None:
        """Stop waiting for *key*'s sockets (call before closing any of them)."""
        fds = self._armed.pop(key, None)
        if fds is None or self._epoll is None:
            return
        for fd in fds:
            self._owner.pop(fd, None)
            with contextlib.suppress(OSError):  # closed meanwhile: gone already
                self._epoll.unregister(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake armed vassals, forever."""
        if self._epoll is None:
            self._epoll = select.epoll()
        epoll = self._epoll
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, _BATCH):
                    key = self._owner.get(fd)
                    if key is None:
                        continue
                    self.disarm(key)
                    try:
                        key.armory_wake(fd)
                    except Exception:  # one vassal's bug must not stop the others' wakes
                        log.exception("armory.wake_failed fd=%s", fd)
        finally:
            self._armed.clear()
            self._owner.clear()
            self._epoll = None
            epoll.close()
