"""A fleet of three emperors on this machine, on a real etcd (tests/etcd_server.py).

Each node is ``python -m trimperor etcd://.../P --cluster etcd://.../P --node X``;
where a vassal runs is read from /proc (the emperor's live children). A
sampler counts copies every 10 ms for the whole test: a ``placement = 1``
vassal never runs twice.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import trio

from tests.etcd_server import EtcdCluster, EtcdServer
from tests.fleet_helpers import LocalFleet
from tests.helpers import wait_for
from tests.proxy import TcpProxy
from trimperor.core.placement import Node, Placement, owners

pytestmark = pytest.mark.integration

SINGLE = [f"s{i}.ini" for i in range(9)]


def expected(names: Iterable[str], nodes: Iterable[str]) -> dict[str, set[str]]:
    """Where the hash puts each placement = 1 vassal on *nodes*."""
    members = [Node(n) for n in nodes]
    return {name: set(owners(name, Placement(), members)) for name in names}


class Sampler:
    """Counts the copies of each vassal every 10 ms; remembers the worst."""

    def __init__(self, fleet: LocalFleet, single: Iterable[str]) -> None:
        self.fleet = fleet
        self.single = set(single)
        self.worst: dict[str, int] = {}
        self.samples = 0
        self.doubles: list[tuple[str, set[str]]] = []

    async def run(self) -> None:
        while True:
            for name, nodes in self.fleet.where().items():
                if name in self.single and len(nodes) > 1:
                    self.doubles.append((name, nodes))
                self.worst[name] = max(self.worst.get(name, 0), len(nodes))
            self.samples += 1
            await trio.sleep(0.01)


def subset(where: dict[str, set[str]], names: Iterable[str]) -> dict[str, set[str]]:
    return {n: where.get(n, set()) for n in names}


async def test_placement_failover_rejoin_and_all(etcd: EtcdServer, tmp_path: Path) -> None:
    fleet = LocalFleet(etcd, tmp_path, ttl=3.0)
    with fleet.running():
        for name in SINGLE:
            fleet.put(name)
        fleet.put("everywhere.ini", "placement = all\n")
        fleet.put("two.ini", "placement = 2\n")
        fleet.put("only-b.ini", "node = b\n")
        for name in "abc":
            fleet.add(name)
        sampler = Sampler(fleet, [*SINGLE, "only-b.ini"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.run)
            want = {
                **expected(SINGLE, "abc"),
                "everywhere.ini": {"a", "b", "c"},
                "two.ini": set(owners("two.ini", Placement(2), [Node(n) for n in "abc"])),
                "only-b.ini": {"b"},
            }
            await wait_for(lambda: fleet.where() == want, 30)
            assert fleet.live_members() == {"a", "b", "c"}
            before = fleet.pids()

            # kill -9 of c: its vassals run elsewhere; nothing else restarts.
            on_c = {n for n in SINGLE if want[n] == {"c"}}
            assert on_c, "the hash put nothing on c; change the names"
            fleet.nodes["c"].kill()
            await wait_for(
                lambda: subset(fleet.where(), SINGLE) == expected(SINGLE, "ab"),
                fleet.ttl + 15,
            )
            now = fleet.pids()
            for (name, node), pid in before.items():
                if node != "c" and name in SINGLE and name not in on_c:
                    assert now.get((name, node)) == pid, f"{name} on {node} restarted"
            await wait_for(lambda: fleet.where().get("everywhere.ini") == {"a", "b"})

            # A change while c is down: a new vassal, applied when it is back.
            fleet.put("late.ini", "placement = all\n")
            await wait_for(lambda: fleet.where().get("late.ini") == {"a", "b"})

            # c rejoins: only its share moves back.
            settled = fleet.pids()
            fleet.nodes["c"].start()
            await wait_for(lambda: subset(fleet.where(), SINGLE) == expected(SINGLE, "abc"), 30)
            await wait_for(lambda: fleet.where().get("late.ini") == {"a", "b", "c"})
            now = fleet.pids()
            for (name, node), pid in settled.items():
                if name in SINGLE and name not in on_c:
                    assert now.get((name, node)) == pid, f"{name} on {node} restarted"
            assert fleet.where()["only-b.ini"] == {"b"}

            # Removing a vassal stops every copy.
            fleet.delete("everywhere.ini")
            await wait_for(lambda: "everywhere.ini" not in fleet.where())
            nursery.cancel_scope.cancel()
        assert not sampler.doubles, sampler.doubles[:5]
        assert sampler.samples > 100

        # A clean shutdown leaves the fleet at once (its lease is revoked).
        emperor = fleet.nodes["a"].emperor
        assert emperor is not None
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
        assert "fleet.left node=a" in emperor.text()
        await wait_for(lambda: fleet.live_members() == {"b", "c"})


async def test_a_node_cut_from_etcd_stops_before_another_starts(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    fleet = LocalFleet(etcd, tmp_path, ttl=3.0)
    proxy = TcpProxy("127.0.0.1", etcd.client_port)
    with fleet.running():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.run)
            for name in SINGLE:
                fleet.put(name)
            fleet.put("kept.ini", "on-partition = keep\nnode = c\n")
            fleet.put("all.ini", "placement = all\n")
            fleet.add("a")
            fleet.add("b")
            c = fleet.add("c", f"127.0.0.1:{port}")
            sampler = Sampler(fleet, SINGLE)
            nursery.start_soon(sampler.run)
            want = expected(SINGLE, "abc")
            await wait_for(lambda: subset(fleet.where(), SINGLE) == want, 30)
            await wait_for(lambda: fleet.where().get("kept.ini") == {"c"})
            await wait_for(lambda: fleet.where().get("all.ini") == {"a", "b", "c"})
            on_c = {n for n in SINGLE if want[n] == {"c"}}
            assert on_c

            proxy.cut()
            # c stops what others will take over; a and b start it once c's lease is gone.
            await wait_for(lambda: "fleet.fenced node=c" in c.text(), 10)
            await wait_for(
                lambda: subset(fleet.where(), SINGLE) == expected(SINGLE, "ab"), fleet.ttl + 15
            )
            # on-partition = keep, and placement = all (keep by default), stay on c.
            assert "c" in fleet.where()["kept.ini"]
            assert fleet.where()["all.ini"] == {"a", "b", "c"}
            # A removal made while c is cut off is applied once it is back.
            fleet.delete("all.ini")
            await wait_for(lambda: fleet.where().get("all.ini") == {"c"})

            kept = c.running()["kept.ini"]
            proxy.restore()
            await wait_for(lambda: subset(fleet.where(), SINGLE) == want, 30)
            await wait_for(lambda: "all.ini" not in fleet.where())
            assert "fleet.joined node=c" in c.text()
            # The kept vassal ran through the partition and its end.
            assert c.running()["kept.ini"] == kept
            nursery.cancel_scope.cancel()
        assert not sampler.doubles, sampler.doubles[:5]


async def test_labels_and_bad_node_keys(etcd: EtcdServer, tmp_path: Path) -> None:
    fleet = LocalFleet(etcd, tmp_path, ttl=3.0)
    with fleet.running():
        etcd.put(f"{fleet.prefix}/nodes/broken", "not json")
        fleet.put("ssd.ini", "node-label = disk=ssd\nplacement = all\n")
        fleet.put("nowhere.ini", "node-label = disk=tape\n")
        a = fleet.add("a", labels=("disk=ssd",))
        fleet.add("b", labels=("disk=hdd",))
        fleet.add("c", labels=("disk=ssd", "zone=x"))
        await wait_for(lambda: fleet.where().get("ssd.ini") == {"a", "c"}, 30)
        await wait_for(lambda: "fleet.bad_node" in a.text())
        assert a.text().count("fleet.bad_node") == 1
        assert "nowhere.ini" not in fleet.where()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd cluster on loopback ports, for one test."""
    (tmp_path / "etcd3").mkdir()
    cluster = EtcdCluster(tmp_path / "etcd3")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_three_member_etcd_loses_a_member(etcd3: EtcdCluster, tmp_path: Path) -> None:
    # Every node talks to m0 first; m1 stays up and serves the test's own requests.
    fleet = LocalFleet(etcd3.members[1], tmp_path, ttl=10.0)
    with fleet.running():
        for name in SINGLE:
            fleet.put(name)
        for name in "abc":
            fleet.add(name, etcd3.endpoints(0))
        want = expected(SINGLE, "abc")
        await wait_for(lambda: fleet.where() == want, 30)
        before = fleet.pids()
        etcd3.members[0].stop()
        # The sources and the memberships move on to m1 and m2.
        fleet.put("after.ini", "placement = all\n")
        await wait_for(lambda: fleet.where().get("after.ini") == {"a", "b", "c"}, 30)
        fleet.delete(SINGLE[0])
        await wait_for(lambda: SINGLE[0] not in fleet.where())
        assert fleet.live_members() == {"a", "b", "c"}
        now = fleet.pids()
        for key, pid in before.items():
            if key[0] != SINGLE[0]:
                assert now.get(key) == pid, f"{key} restarted"
        for node in fleet.nodes.values():
            assert "fleet.fenced" not in node.text()
