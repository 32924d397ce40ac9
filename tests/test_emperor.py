"""The emperor's decisions, with a fake monitor and a fake spawner."""

from __future__ import annotations

import json
import logging
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from trimperor.control.hub import ControlRequest
from trimperor.core.model import Remove, Snapshot, SourceProblem, Upsert, VassalDocument
from trimperor.emperor import Emperor
from trimperor.testing import FakeMonitor, FakeProcess, FakeSpawner
from trimperor.vassals.uwsgi import default_binary

NATIVE = "[vassal]\ncommand = app {arg}\n"


def doc(name: str, arg: str = "1", version: str = "1", source: str = "fake://a") -> VassalDocument:
    return VassalDocument(name, source, version, NATIVE.format(arg=arg), path=f"/srv/{name}")


@dataclass
class World:
    emperor: Emperor
    a: FakeMonitor
    b: FakeMonitor
    spawner: FakeSpawner


@pytest.fixture
async def world() -> AsyncIterator[World]:
    a, b, spawner = FakeMonitor("fake://a"), FakeMonitor("fake://b"), FakeSpawner()
    emperor = Emperor([a, b], spawner=spawner, environ={"HOME": "/root"})
    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        yield World(emperor, a, b, spawner)
        emperor.shutdown()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def stubborn_web(world: World) -> FakeProcess:
    """web.ini running, and deaf to SIGTERM: its stop lasts until the stop timeout."""
    world.spawner.ignore = {signal.SIGTERM}
    await world.a.send(Upsert(doc("web.ini")))
    return await world.spawner.wait_spawned(1)


async def test_spawn_reload_remove(world: World) -> None:
    await world.a.send(Upsert(doc("web.ini")))
    proc = await world.spawner.wait_spawned(1)
    assert proc.plan.argv == ("app", "1")
    assert proc.plan.cwd == "/srv"
    assert ("HOME", "/root") in proc.plan.env
    await world.a.send(Upsert(doc("web.ini", arg="2", version="2")))
    new = await world.spawner.wait_spawned(2)
    assert new.plan.argv == ("app", "2")
    assert proc.returncode == -signal.SIGTERM
    await world.a.send(Remove("fake://a", "web.ini"))
    await settle()
    assert world.spawner.alive() == []
    assert world.emperor.snapshot().vassals == ()


async def test_broken_config_keeps_the_running_vassal(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await world.a.send(Upsert(doc("web.ini")))
    proc = await world.spawner.wait_spawned(1)
    broken = VassalDocument(
        "web.ini", "fake://a", "2", "[vassal]\nbogus = 1\n", path="/srv/web.ini"
    )
    with caplog.at_level(logging.ERROR):
        await world.a.send(Upsert(broken))
        await settle()
    assert "unknown key 'bogus'" in caplog.text
    assert "keeps running its last good configuration" in caplog.text
    assert proc.returncode is None
    assert len(world.spawner.spawned) == 1


async def test_new_broken_file_starts_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        await world.a.send(Upsert(VassalDocument("x.ini", "fake://a", "1", "[vassal]\n")))
        await settle()
    assert "needs a command" in caplog.text
    assert world.spawner.spawned == []


async def test_uwsgi_vassal_gets_the_emperor_protocol(world: World) -> None:
    text = "[uwsgi]\nsocket = :3031\n"
    await world.a.send(Upsert(VassalDocument("u.ini", "fake://a", "1", text, path="/srv/u.ini")))
    proc = await world.spawner.wait_spawned(1)
    assert proc.plan.argv == (default_binary(), "--ini", "/srv/u.ini")
    env = dict(proc.plan.env)
    assert env["UWSGI_EMPEROR_FD"] == str(proc.plan.pass_fds[0])
    assert "UWSGI_EMPEROR_FD_CONFIG" not in env
    await world.a.send(Upsert(VassalDocument("m.ini", "fake://a", "1", text)))
    proc = await world.spawner.wait_spawned(2)
    assert proc.plan.argv == (default_binary(), "--ini", "emperor://m.ini")
    assert "UWSGI_EMPEROR_FD_CONFIG" in dict(proc.plan.env)
    assert len(proc.plan.pass_fds) == 2


async def test_name_conflict_between_sources(world: World) -> None:
    await world.a.send(Upsert(doc("web.ini", arg="a")))
    await world.b.send(Upsert(doc("web.ini", arg="b", source="fake://b")))
    await world.spawner.wait_spawned(1)
    await settle()
    assert len(world.spawner.spawned) == 1
    await world.a.send(Snapshot("fake://a", ()))
    second = await world.spawner.wait_spawned(2)
    assert second.plan.argv == ("app", "b")
    [vassal] = world.emperor.snapshot().vassals
    assert vassal.source == "fake://b"


async def test_source_problem_touches_nothing(world: World) -> None:
    await world.a.send(Snapshot("fake://a", (doc("x.ini"), doc("y.ini"))))
    await world.spawner.wait_spawned(2)
    await world.a.send(SourceProblem("fake://a", "unreachable"))
    await settle()
    assert len(world.spawner.alive()) == 2


async def test_readd_while_stopping_waits_for_the_old_process(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    old = await stubborn_web(world)
    await world.a.send(Remove("fake://a", "web.ini"))
    await settle()
    await world.a.send(Upsert(doc("web.ini", arg="2", version="2")))
    await settle()
    assert len(world.spawner.spawned) == 1  # the old one is still within its stop timeout
    new = await world.spawner.wait_spawned(2)
    assert old.returncode == -signal.SIGKILL
    assert new.plan.argv == ("app", "2")


async def test_reload_all(world: World) -> None:
    await world.a.send(Snapshot("fake://a", (doc("x.ini"), doc("y.ini"))))
    await world.spawner.wait_spawned(2)
    world.emperor.reload_all()
    await world.spawner.wait_spawned(4)
    await settle()
    assert len(world.spawner.alive()) == 2


async def test_shutdown_stops_everything_in_parallel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, spawner = FakeMonitor("fake://a"), FakeSpawner()
    spawner.ignore = {signal.SIGTERM}
    emperor = Emperor([a], spawner=spawner, environ={})
    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        await a.send(Snapshot("fake://a", tuple(doc(f"v{i}.ini") for i in range(20))))
        await spawner.wait_spawned(20)
        t0 = trio.current_time()
        emperor.shutdown()
    # each ignores SIGTERM: all are killed after one stop timeout (10 s), not 20 of them
    assert trio.current_time() - t0 == pytest.approx(10.0)
    assert spawner.alive() == []


async def test_stats_server(world: World, tmp_path: object) -> None:
    await world.a.send(Upsert(doc("web.ini")))
    proc = await world.spawner.wait_spawned(1)
    snap = world.emperor.snapshot()
    assert [s.uri for s in snap.sources] == ["fake://a", "fake://b"]
    [v] = snap.vassals
    assert (v.name, v.kind, v.state, v.pid, v.restarts) == (
        "web.ini",
        "native",
        "running",
        proc.pid,
        0,
    )


async def test_stats_json_over_tcp() -> None:
    a, spawner = FakeMonitor("fake://a"), FakeSpawner()
    emperor = Emperor([a], spawner=spawner, environ={}, stats_address="127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        await a.send(Upsert(doc("web.ini")))
        await spawner.wait_spawned(1)
        host, _, port = emperor.stats_bound.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        data = b""
        async with stream:
            while chunk := await stream.receive_some():
                data += chunk
        doc_ = json.loads(data)
        assert [s["uri"] for s in doc_["sources"]] == ["fake://a"]
        assert doc_["version"]
        # uWSGI's keys first, in uWSGI's order
        assert list(doc_)[:9] == [
            "version",
            "pid",
            "uid",
            "gid",
            "cwd",
            "emperor",
            "emperor_tyrant",
            "throttle_level",
            "vassals",
        ]
        assert doc_["emperor"] == ["fake://a"]
        [v] = doc_["vassals"]
        assert list(v)[:20] == [
            "id",
            "pid",
            "born",
            "last_mod",
            "last_heartbeat",
            "loyal",
            "ready",
            "accepting",
            "last_loyal",
            "last_ready",
            "last_accepting",
            "first_run",
            "last_run",
            "cursed",
            "zerg",
            "on_demand",
            "uid",
            "gid",
            "monitor",
            "respawns",
        ]
        assert v["id"] == "web.ini"
        assert v["monitor"] == "fake://a"
        assert v["respawns"] == 0
        for key in (
            "name",
            "source",
            "kind",
            "state",
            "pid",
            "started_at",
            "restarts",
            "backoff_attempt",
            "next_start",
            "last_exit_code",
            "last_exit_signal",
            "config_version",
        ):
            assert key in v
        assert v["state"] == "running"
        emperor.shutdown()


async def test_sd_notify_when_run_by_systemd(tmp_path: Path) -> None:
    """NOTIFY_SOCKET: READY=1 and the STATUS line uWSGI's emperor sends."""
    path = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    a, spawner = FakeMonitor("fake://a"), FakeSpawner()
    emperor = Emperor([a], spawner=spawner, environ={"NOTIFY_SOCKET": path})
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            ready = (await sock.recv(4096)).decode()
            assert ready.splitlines() == ["READY=1", "STATUS=The Emperor is governing 0 vassals"]
            await a.send(Upsert(doc("web.ini")))
            assert (await sock.recv(4096)) == b"STATUS=The Emperor is governing 1 vassals"
            proc = await spawner.wait_spawned(1)
            # the vassal gets a socket of its own, never the emperor's
            assert dict(proc.plan.env)["NOTIFY_SOCKET"].startswith("@trimperor/")
            emperor.shutdown()
        assert (await sock.recv(4096)).startswith(b"STOPPING=1")


async def test_large_snapshots_are_parsed_off_the_event_loop(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    padding = "; " + "x" * 500 + "\n"
    docs = [
        VassalDocument(f"v{i}.ini", "fake://a", "1", NATIVE.format(arg=i) + padding * 2)
        for i in range(40)
    ]
    broken = VassalDocument("broken.ini", "fake://a", "1", "[vassal]\nbogus = 1\n")
    with caplog.at_level(logging.ERROR):
        await world.a.send(Snapshot("fake://a", (*docs, broken)))
        await world.spawner.wait_spawned(40)
    args = sorted(p.plan.argv[1] for p in world.spawner.spawned)
    assert args == sorted(str(i) for i in range(40))
    assert "unknown key 'bogus'" in caplog.text


async def test_changes_while_stopping_start_the_latest_configuration(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    old = await stubborn_web(world)
    await world.a.send(Remove("fake://a", "web.ini"))
    await world.a.send(Upsert(doc("web.ini", arg="2", version="2")))
    await world.a.send(Upsert(doc("web.ini", arg="3", version="3")))
    await settle()
    assert len(world.spawner.spawned) == 1  # the old one is still within its stop timeout
    new = await world.spawner.wait_spawned(2)
    assert old.returncode == -signal.SIGKILL
    assert new.plan.argv == ("app", "3")
    sup = world.emperor.supervisor("web.ini")
    desired = world.emperor.registry.desired("web.ini")
    assert sup is not None
    assert desired is not None
    assert sup.spec is desired.spec  # one owner: the registry's object, not a copy
    assert sup.version == "3"
    await settle()
    assert len(world.spawner.spawned) == 2


async def test_removed_again_while_stopping_starts_nothing(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    old = await stubborn_web(world)
    await world.a.send(Remove("fake://a", "web.ini"))
    await world.a.send(Upsert(doc("web.ini", arg="2", version="2")))
    await world.a.send(Remove("fake://a", "web.ini"))
    await old.wait()
    await trio.sleep(30)
    assert len(world.spawner.spawned) == 1
    assert world.emperor.supervisor("web.ini") is None


async def _control(emperor: Emperor, command: str, *names: str) -> dict[str, object]:
    req = ControlRequest(command, names)
    await emperor._submit_control(req)
    await req.done.wait()
    return req.result


async def test_ctl_stop_then_start_while_stopping(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    old = await stubborn_web(world)
    assert (await _control(world.emperor, "stop", "web.ini"))["done"] == {"web.ini": "stopping"}
    assert (await _control(world.emperor, "start", "web.ini"))["done"] == {"web.ini": "starting"}
    await settle()
    assert len(world.spawner.spawned) == 1  # the old one is still within its stop timeout
    new = await world.spawner.wait_spawned(2)
    assert old.returncode == -signal.SIGKILL
    assert new.plan.argv == ("app", "1")
    await trio.sleep(30)
    assert world.spawner.alive() == [new]


async def test_ctl_stop_then_source_removed_while_stopping(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    old = await stubborn_web(world)
    await _control(world.emperor, "stop", "web.ini")
    await world.a.send(Remove("fake://a", "web.ini"))
    await old.wait()
    await trio.sleep(30)
    assert len(world.spawner.spawned) == 1
    assert world.emperor.control_snapshot().vassals == ()
    # offered again: a new vassal, not held
    await world.a.send(Upsert(doc("web.ini", arg="2", version="2")))
    new = await world.spawner.wait_spawned(2)
    assert new.plan.argv == ("app", "2")


async def test_ctl_stopped_vassal_stays_stopped_after_its_old_process_ends(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    old = await stubborn_web(world)
    await _control(world.emperor, "stop", "web.ini")
    await old.wait()
    await trio.sleep(30)
    assert len(world.spawner.spawned) == 1
    assert [v.held for v in world.emperor.control_snapshot().vassals] == [True]
