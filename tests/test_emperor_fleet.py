"""The emperor's fleet filter, with a fake monitor, a fake spawner and a scripted fleet.

The fleet here is :class:`trimperor.fleet.member.Fleet` with its etcd side replaced
by the test (no etcd runs): the test says which vassals are placed on this
node and when the view changes. tests/test_fleet.py runs the real thing.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tests.helpers import free_port
from trimperor.core.model import Remove, Upsert, VassalDocument
from trimperor.core.placement import Placement
from trimperor.emperor import Emperor
from trimperor.fleet.member import Fleet
from trimperor.testing import FakeMonitor, FakeSpawner


class ScriptedFleet(Fleet):
    """A fleet membership whose answers the test sets."""

    def __init__(self) -> None:
        super().__init__("etcd://127.0.0.1:1/test", "here")
        self.placed: set[str] = set()
        self.catalogue: dict[str, Placement] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def set_catalogue(self, catalogue: object) -> None:
        assert isinstance(catalogue, dict)
        self.catalogue = dict(catalogue)

    def reason(self, name: str, placement: Placement) -> str | None:
        if placement.fenced and self.fenced:
            return "fenced"
        return None if name in self.placed else "placed elsewhere"

    def move(self, *, here: set[str] | None = None, fenced: bool | None = None) -> None:
        if here is not None:
            self.placed = here
        if fenced is not None:
            self.fenced = fenced
        self._changed()

    def kill_fenced(self) -> None:
        self._kill()


def doc(name: str, version: str = "1", extra: str = "") -> VassalDocument:
    text = f"[vassal]\ncommand = app {version}\n{extra}"
    return VassalDocument(name, "fake://a", version, text, path=f"/srv/{name}")


@dataclass
class World:
    emperor: Emperor
    source: FakeMonitor
    spawner: FakeSpawner
    fleet: ScriptedFleet


@pytest.fixture
async def world() -> AsyncIterator[World]:
    source, spawner, fleet = FakeMonitor("fake://a"), FakeSpawner(), ScriptedFleet()
    fleet.fenced = False
    emperor = Emperor([source], spawner=spawner, environ={}, fleet=fleet)
    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        yield World(emperor, source, spawner, fleet)
        emperor.shutdown()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_only_vassals_placed_here_run(world: World) -> None:
    await world.source.send(Upsert(doc("a.ini")))
    await world.source.send(Upsert(doc("b.ini", extra="placement = all\n")))
    await settle()
    assert world.spawner.spawned == []
    assert world.fleet.catalogue == {"a.ini": Placement(), "b.ini": Placement(None)}
    world.fleet.move(here={"b.ini"})
    proc = await world.spawner.wait_spawned(1)
    assert proc.plan.name == "b.ini"
    await settle()
    assert len(world.spawner.spawned) == 1


async def test_moving_away_stops_and_moving_back_starts(world: World) -> None:
    world.fleet.placed = {"a.ini"}
    await world.source.send(Upsert(doc("a.ini")))
    first = await world.spawner.wait_spawned(1)
    world.fleet.move(here=set())
    await settle()
    assert first.returncode == -signal.SIGTERM
    assert world.spawner.alive() == []
    # Still desired: a change while it runs elsewhere starts nothing here...
    await world.source.send(Upsert(doc("a.ini", version="2")))
    await settle()
    assert len(world.spawner.spawned) == 1
    # ...and moving back runs the latest configuration.
    world.fleet.move(here={"a.ini"})
    second = await world.spawner.wait_spawned(2)
    assert second.plan.argv == ("app", "2")


async def test_a_removed_vassal_does_not_come_back(world: World) -> None:
    await world.source.send(Upsert(doc("a.ini")))
    await settle()
    await world.source.send(Remove("fake://a", "a.ini"))
    await settle()
    assert world.fleet.catalogue == {}
    world.fleet.move(here={"a.ini"})
    await settle()
    assert world.spawner.spawned == []


async def test_fencing_stops_placed_vassals_and_kills_the_stubborn(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    world.fleet.placed = {"one.ini", "all.ini"}
    world.spawner.ignore = {signal.SIGTERM}
    await world.source.send(Upsert(doc("one.ini")))
    await world.source.send(Upsert(doc("all.ini", extra="placement = all\n")))
    await world.spawner.wait_spawned(2)
    one, every = (
        next(p for p in world.spawner.spawned if p.plan.name == n) for n in ("one.ini", "all.ini")
    )
    world.fleet.move(fenced=True)
    await settle()
    assert one.signals == [signal.SIGTERM]
    assert one.returncode is None
    world.fleet.kill_fenced()
    await settle()
    assert one.returncode == -signal.SIGKILL
    assert every.returncode is None  # placement = all keeps running by default
    world.fleet.move(fenced=False)
    await world.spawner.wait_spawned(3)
    assert world.spawner.spawned[2].plan.name == "one.ini"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_an_on_demand_vassal_is_armed_only_where_it_is_placed(world: World) -> None:
    port = free_port()
    extra = f"socket = 127.0.0.1:{port}\non-demand = true\n"
    await world.source.send(Upsert(doc("site.ini", extra=extra)))
    await settle()
    assert not _listening(port)  # placed elsewhere: no socket here
    world.fleet.move(here={"site.ini"})
    await settle()
    assert _listening(port)  # armed; the first connection spawns it
    await world.spawner.wait_spawned(1)
    world.fleet.move(here=set())
    await settle()
    assert world.spawner.alive() == []
    assert not _listening(port)
