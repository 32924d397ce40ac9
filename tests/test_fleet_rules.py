"""The fleet's rules without etcd: what may run here, given a view of the fleet.

The membership's state is set by hand here (it comes from etcd in
tests/test_fleet.py, which runs the same rules against real emperors).
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from trimperor.cli import main
from trimperor.core.errors import UsageError
from trimperor.core.placement import Node, Placement, owners
from trimperor.core.stats import EmperorStats, to_json
from trimperor.fleet.member import Fleet, parse_label


def fleet_of(node: str, others: list[str]) -> Fleet:
    fleet = Fleet("etcd://127.0.0.1:2379/f", node)
    fleet.nodes = {n: Node(n) for n in [node, *others]}
    fleet._updated()
    return fleet


def member(fleet: Fleet) -> None:
    fleet.lease = 42
    fleet._renewed(0.0)


def test_placement_1_needs_the_hash_and_the_claim() -> None:
    fleet = fleet_of("a", ["b", "c"])
    member(fleet)
    mine = [n for n in (f"v{i}.ini" for i in range(30)) if fleet.owners(n, Placement()) == ("a",)]
    theirs = [n for n in (f"v{i}.ini" for i in range(30)) if n not in mine]
    assert mine
    assert theirs
    name = mine[0]
    assert not fleet.here(name, Placement())
    assert fleet.reason(name, Placement()) == "not claimed"
    fleet.claims[name] = ("b", 7)  # the old owner still holds it
    assert "held by b" in (fleet.reason(name, Placement()) or "")
    fleet.claims[name] = ("a", 42)
    assert fleet.here(name, Placement())
    fleet.claims[theirs[0]] = ("a", 42)  # a claim is not enough either
    assert not fleet.here(theirs[0], Placement())


def test_fencing_stops_placed_vassals_and_keeps_all_by_default() -> None:
    fleet = fleet_of("a", ["b"])
    member(fleet)
    everywhere, keep = Placement(None), Placement(on_partition="keep")
    name = next(n for n in (f"v{i}.ini" for i in range(30)) if fleet.owners(n, keep) == ("a",))
    fleet.claims[name] = ("a", 42)
    assert fleet.here(name, Placement())
    assert fleet.here(name, keep)
    fleet.fenced = True
    assert not fleet.here(name, Placement())
    assert fleet.reason(name, Placement()) == "fenced (no lease renewal)"
    assert fleet.here(name, keep)
    assert fleet.here("x.ini", everywhere)
    assert not fleet.here("x.ini", Placement(None, on_partition="stop"))


def test_before_joining_only_unfenced_vassals_run() -> None:
    fleet = Fleet("etcd://127.0.0.1:2379/f", "a")
    assert fleet.live_nodes() == (Node("a"),)
    assert fleet.here("x.ini", Placement(None))
    assert fleet.reason("x.ini", Placement(2)) == "not joined"
    assert fleet.snapshot({}).state == "joining"
    member(fleet)
    assert fleet.snapshot({}).state == "member"
    fleet.fenced = True
    assert fleet.snapshot({}).state == "fenced"


def test_the_view_always_holds_this_node_with_its_labels() -> None:
    fleet = Fleet("etcd://h:1/f", "a", {"disk": "ssd"})
    fleet.nodes = {"b": Node("b")}
    fleet._updated()
    assert fleet.live_nodes() == (Node("a", (("disk", "ssd"),)), Node("b"))
    ssd = Placement(None, labels=(("disk", "ssd"),))
    assert owners("x.ini", ssd, fleet.live_nodes()) == ("a",)


def test_stats_view() -> None:
    fleet = fleet_of("a", ["b"])
    member(fleet)
    snap = fleet.snapshot({"x.ini": Placement(None)})
    assert snap.state == "member"
    assert snap.lease == "2a"
    assert snap.placement == (("x.ini", ("a", "b")),)
    assert snap.here == ("x.ini",)


@pytest.mark.parametrize("node", ["", "a/b", "-x", "a" * 200])
def test_bad_node_names(node: str) -> None:
    with pytest.raises(UsageError, match="--node"):
        Fleet("etcd://h:1/f", node)


def test_labels_and_ttl() -> None:
    assert parse_label(" zone = a ") == ("zone", "a")
    with pytest.raises(UsageError):
        parse_label("zone")
    with pytest.raises(UsageError, match="node-ttl"):
        Fleet("etcd://h:1/f", "a", ttl=0.5)


def test_cli_needs_cluster_for_node() -> None:
    assert main(["/nonexistent-dir", "--node", "a"]) == 2
    assert main(["/nonexistent-dir", "--cluster", "etcd://h:1/f", "--node-label", "x"]) == 2
    assert main(["/nonexistent-dir", "--cluster", "zk://h:1/f"]) == 2


def test_the_stats_document_has_the_fleet() -> None:
    fleet = fleet_of("a", ["b"])
    member(fleet)
    stats = EmperorStats(
        pid=1,
        version="0",
        sources=(),
        uptime=1.0,
        vassals=(),
        fleet=fleet.snapshot({"x.ini": Placement(None), "y.ini": Placement(node="b")}),
    )
    doc = json.loads(to_json(stats))["fleet"]
    assert doc["node"] == "a"
    assert doc["state"] == "member"
    assert [n["name"] for n in doc["nodes"]] == ["a", "b"]
    assert doc["placement"] == {"x.ini": ["a", "b"], "y.ini": ["b"]}
    assert doc["here"] == ["x.ini"]


async def test_a_crashing_task_is_logged_and_restarted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet("etcd://h:1/f", "a")
    runs: list[int] = []

    async def buggy() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("a bug")
        await trio.sleep_forever()

    with trio.move_on_after(10):
        await fleet._guarded(buggy)
    assert len(runs) == 3
    assert caplog.text.count("fleet.task_crashed") == 2
