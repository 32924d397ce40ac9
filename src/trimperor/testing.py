"""Fakes for testing code that uses a spawner or a monitor.

:class:`FakeSpawner` hands out :class:`FakeProcess` objects that a test makes
exit, crash or ignore signals; combined with ``trio.testing.MockClock`` they
test backoff and stop timeouts in virtual milliseconds. :class:`FakeMonitor`
is a source whose events the test sends by hand.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterable

import trio

from trimperor.abc import LaunchPlan, MonitorOptions
from trimperor.core.errors import SpawnError
from trimperor.core.model import SourceEvent
from trimperor.monitors.toolkit import WatchingStatus

__all__ = ["FakeMonitor", "FakeProcess", "FakeSpawner"]

_pids = itertools.count(100_000)


class FakeProcess:
    """A pretend process. It dies from any signal not in ``ignore``."""

    def __init__(self, plan: LaunchPlan, ignore: Iterable[int] = ()) -> None:
        self.plan = plan
        self.ignore = set(ignore)
        self.signals: list[int] = []
        self.started_at = trio.current_time()
        self._pid = next(_pids)
        self._returncode: int | None = None
        self._exited = trio.Event()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def output(self) -> None:
        return None

    @property
    def errors(self) -> None:
        return None

    def exit(self, code: int) -> None:
        """Make the process exit with *code* (negative: killed by that signal)."""
        if self._returncode is None:
            self._returncode = code
            self._exited.set()

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL or sig not in self.ignore:
            self.exit(-sig)

    def send(self, sig: int) -> None:
        """A signal to the leader only: recorded, never fatal (a reload signal)."""
        self.signals.append(sig)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode


class FakeSpawner:
    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.fail_with: str | None = None
        self.ignore: set[int] = set()
        self._changed = trio.Event()

    async def spawn(self, plan: LaunchPlan) -> FakeProcess:
        if self.fail_with is not None:
            raise SpawnError(self.fail_with)
        proc = FakeProcess(plan, self.ignore)
        self.spawned.append(proc)
        self._changed.set()
        self._changed = trio.Event()
        return proc

    async def wait_spawned(self, count: int) -> FakeProcess:
        """Wait until *count* processes were spawned in total; return the last."""
        while len(self.spawned) < count:
            await self._changed.wait()
        return self.spawned[count - 1]

    def alive(self) -> list[FakeProcess]:
        return [p for p in self.spawned if p.returncode is None]


class FakeMonitor:
    """A monitor whose events come from the test: ``await mon.send(event)``."""

    def __init__(self, uri: str = "fake://", options: MonitorOptions | None = None) -> None:
        self.uri = uri
        self.status = WatchingStatus(uri)
        self._send, self._recv = trio.open_memory_channel[SourceEvent](100)

    async def send(self, event: SourceEvent) -> None:
        await self._send.send(event)

    async def run(
        self,
        send: trio.MemorySendChannel[SourceEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        async with send:
            async for event in self._recv:
                await send.send(event)
