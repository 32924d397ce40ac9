"""The armory: armed on-demand vassals are records with no task and no nursery;
one task waits on all their sockets and wakes the one a connection arrives at.
And the launcher such an emperor starts late, with its descriptors above 1024."""

from __future__ import annotations

import os
import resource
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.helpers import wait_for
from trimperor import emperor as emperor_module
from trimperor.abc import LaunchPlan
from trimperor.core.model import Remove, Snapshot, Upsert, VassalDocument
from trimperor.core.policy import BackoffPolicy
from trimperor.core.vassalspec import NativeSpec
from trimperor.emperor import Emperor
from trimperor.supervisor import Supervisor
from trimperor.testing import FakeMonitor
from trimperor.vassals.launcher import LauncherSpawner
from trimperor.vassals.spawner import PosixSpawner

pytestmark = pytest.mark.integration

SERVER = Path(__file__).with_name("ondemand_server.py")
COUNT = 50


def count_tasks() -> int:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    seen, todo = 0, [root]
    while todo:
        task = todo.pop()
        seen += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return seen


def vassal(path: Path) -> str:
    return (
        f"[vassal]\ncommand = {sys.executable} {SERVER}\nsocket = {path}\n"
        "on-demand = true\nstop-timeout = 5\n"
    )


async def fetch(path: Path) -> str:
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
    return data.decode(errors="replace")


@pytest.fixture
async def emperor() -> AsyncIterator[tuple[Emperor, FakeMonitor]]:
    source = FakeMonitor("fake://")
    emperor = Emperor(
        [source], spawner=PosixSpawner(), policy=BackoffPolicy(throttle=0.05, max_throttle=0.5)
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            yield emperor, source
            emperor.shutdown()


async def test_armed_vassals_cost_no_task_and_the_first_connection_wakes_one(
    emperor: tuple[Emperor, FakeMonitor], tmp_path: Path
) -> None:
    emp, source = emperor
    before = count_tasks()
    for i in range(COUNT):
        doc = VassalDocument(f"v{i}.ini", "fake://", "1", vassal(tmp_path / f"v{i}.sock"))
        await source.send(Upsert(doc))

    def sups() -> list[Supervisor]:
        return [s for i in range(COUNT) if (s := emp.supervisor(f"v{i}.ini")) is not None]

    await wait_for(lambda: len(sups()) == COUNT and all(s.dormant for s in sups()), timeout=60)
    assert all(s.snapshot().state == "armed" for s in sups())
    # Fifty armed vassals, and not one task more than before them.
    assert count_tasks() <= before

    target = sups()[7]
    pid = int(await fetch(tmp_path / "v7.sock"))
    snap = target.snapshot()
    assert snap.wakes == 1
    assert snap.pid == pid
    # The others were not woken.
    assert all(s.snapshot().wakes == 0 and s.dormant for s in sups() if s is not target)
    # Stopping a dormant vassal still works: it runs again to stop, and ends.
    other = sups()[3]
    await source.send(Upsert(VassalDocument("v3.ini", "fake://", "2", vassal(tmp_path / "x.sock"))))
    await wait_for(lambda: other.snapshot().config_version == "2" and other.dormant)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(tmp_path / "x.sock"))  # rebound to the new address, armed there
    await wait_for(lambda: other.snapshot().wakes == 1, timeout=30)


class _Spawned(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_a_snapshot_of_on_demand_vassals_starts_no_task_for_them(
    emperor: tuple[Emperor, FakeMonitor], tmp_path: Path
) -> None:
    """They are armed as the snapshot is taken: not one short-lived task per vassal
    (10,000 of those at once left the emperor's memory fragmented: +38 MB of RSS)."""
    emp, source = emperor
    docs = tuple(
        VassalDocument(f"s{i}.ini", "fake://", "1", vassal(tmp_path / f"s{i}.sock"))
        for i in range(COUNT)
    )
    spawned = _Spawned()
    trio.lowlevel.add_instrument(spawned)
    try:
        await source.send(Snapshot("fake://", docs))

        def sups() -> list[Supervisor]:
            return [s for i in range(COUNT) if (s := emp.supervisor(f"s{i}.ini")) is not None]

        await wait_for(lambda: len(sups()) == COUNT and all(s.dormant for s in sups()))
    finally:
        trio.lowlevel.remove_instrument(spawned)
    assert all(s.snapshot().state == "armed" for s in sups())
    assert spawned.count < COUNT // 5, spawned.count
    # And they wake as before.
    assert int(await fetch(tmp_path / "s3.sock")) == sups()[3].snapshot().pid


async def test_a_dormant_vassal_holds_only_what_waking_it_needs(
    emperor: tuple[Emperor, FakeMonitor], tmp_path: Path
) -> None:
    """10,000 armed vassals are 10,000 of these records: no instance dictionaries, no
    inbox, no event, no process or timer table until the vassal first needs one."""
    emp, source = emperor
    await source.send(Upsert(VassalDocument("a.ini", "fake://", "1", vassal(tmp_path / "a.sock"))))
    await wait_for(lambda: (s := emp.supervisor("a.ini")) is not None and s.dormant)
    sup = emp.supervisor("a.ini")
    assert sup is not None
    assert sup.snapshot().state == "armed"
    machine = sup._machine
    held = list(sup._held)
    for record in (sup, machine, *held):
        assert not hasattr(record, "__dict__"), type(record).__name__
    assert sup._inbox is None
    assert sup._finished is None
    assert not sup._procs
    assert not sup._timers
    assert not machine._timers
    desired = emp.registry.desired("a.ini")
    assert desired is not None
    assert sup.spec is desired.spec is machine.desired
    # It still wakes, and finishes when removed (its event made on demand).
    await fetch(tmp_path / "a.sock")
    await wait_for(lambda: sup.snapshot().wakes == 1)
    await source.send(Remove("fake://", "a.ini"))
    with trio.fail_after(30):
        await sup.finished.wait()


async def test_vassals_from_one_template_share_what_they_have_in_common(
    emperor: tuple[Emperor, FakeMonitor], tmp_path: Path
) -> None:
    """One record of the emperor's collaborators, one argument vector, one text: what
    makes 10,000 armed vassals fit in the emperor's memory target."""
    emp, source = emperor
    text = vassal(tmp_path / "%n.sock")
    docs = tuple(VassalDocument(f"t{i}.ini", "fake://", "1", "".join(list(text))) for i in range(3))
    await source.send(Snapshot("fake://", docs))

    def sups() -> list[Supervisor]:
        return [s for i in range(3) if (s := emp.supervisor(f"t{i}.ini")) is not None]

    await wait_for(lambda: len(sups()) == 3 and all(s.dormant for s in sups()))
    first, *others = sups()
    for other in others:
        assert isinstance(other.spec, NativeSpec)
        assert isinstance(first.spec, NativeSpec)
        assert other._ctx is first._ctx
        assert other.spec.command is first.spec.command
        assert other.spec.sockets[0].address != first.spec.sockets[0].address


async def test_a_launcher_started_by_an_emperor_holding_many_sockets_works(
    tmp_path: Path,
) -> None:
    """The launcher starts on first use, often after 10,000 sockets are held:
    its own descriptors are then above 1024, where select() cannot go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"the test needs an open-file limit of 1200 (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
    try:
        spawner = LauncherSpawner()
        plan = LaunchPlan(name="t", argv=("/bin/sh", "-c", "exit 7"), cwd=str(tmp_path), env=())
        with trio.fail_after(30):
            proc = await spawner.spawn(plan)
            assert await proc.wait() == 7
            await proc.aclose()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_large_batch_gives_the_free_heap_back(
    emperor: tuple[Emperor, FakeMonitor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a snapshot that started hundreds of vassals the emperor returns the C
    heap's free pages (glibc's malloc_trim); after a single change it does not."""
    emp, source = emperor
    calls: list[None] = []
    monkeypatch.setattr(emperor_module, "_return_free_memory", lambda: calls.append(None))
    await source.send(Upsert(VassalDocument("one.ini", "fake://", "1", vassal(tmp_path / "o"))))
    await wait_for(lambda: (s := emp.supervisor("one.ini")) is not None and s.dormant)
    assert calls == []
    count = emperor_module._TRIM_AFTER
    docs = tuple(
        VassalDocument(f"b{i}.ini", "fake://", "1", vassal(tmp_path / f"b{i}.sock"))
        for i in range(count)
    )
    await source.send(Snapshot("fake://", docs))
    await wait_for(lambda: len(calls) == 1)
    assert all(emp.supervisor(f"b{i}.ini") is not None for i in range(count))
    # The real one runs here (glibc) and changes nothing a vassal holds.
    emperor_module._malloc_trim.cache_clear()
    monkeypatch.undo()
    emperor_module._return_free_memory()
    assert int(await fetch(tmp_path / "b3.sock")) > 0
