"""The stats document stays the same document with its caches.

Supervisors hand out the same snapshot while nothing it shows changed, the
document keeps each vassal's JSON until its snapshot changes, and the emperor
makes it a slice at a time. Every test here compares that document with one
made from scratch (fresh snapshots, :func:`trimperor.core.stats.to_json`) after
each kind of change.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import wait_for
from trimperor.control import api
from trimperor.core.model import Remove, Upsert, VassalDocument
from trimperor.core.policy import BackoffPolicy
from trimperor.core.stats import (
    DocumentCache,
    EmperorStats,
    FleetStats,
    SourceStats,
    VassalStats,
    to_json,
    vassal_doc,
    vassal_part,
)
from trimperor.emperor import Emperor
from trimperor.supervisor import Supervisor
from trimperor.testing import FakeMonitor, FakeSpawner
from trimperor.vassals.spawner import PosixSpawner

SERVER = Path(__file__).with_name("ondemand_server.py")


def vassal_stats(name: str, **changes: Any) -> VassalStats:
    base = VassalStats(
        name=name,
        source="fake://",
        kind="native",
        state="running",
        pid=4242,
        started_at=1_700_000_000.5,
        restarts=0,
        backoff_attempt=0,
        next_start=None,
        last_exit_code=None,
        last_exit_signal=None,
        config_version="mtime=1700000000.25 size=40",
        born=1_700_000_000.0,
        sockets=(("127.0.0.1:8000", "handed over"),),
        notify_status='says "hi"\nover two lines',
    )
    return replace(base, **changes)


def emperor_stats(
    vassals: tuple[VassalStats, ...], fleet: FleetStats | None = None
) -> EmperorStats:
    return EmperorStats(
        pid=1,
        version="0.1",
        sources=(SourceStats("fake://", "watching", len(vassals)),),
        uptime=12.3456,
        vassals=vassals,
        fleet=fleet,
    )


# -- the document's own cache (pure) ------------------------------------------------------


def test_cached_document_is_to_json_through_changes() -> None:
    cache = DocumentCache()
    fleet = FleetStats(
        "etcd://h/f", "n1", (("zone", "a"),), "member", "l1", 10.0, (("n1", ()),), (), ()
    )
    for vassals in [(), (vassal_stats("a.ini"),)]:
        for f in (None, fleet):
            stats = emperor_stats(vassals, f)
            assert cache.encode(stats) == to_json(stats).encode()

    vassals = tuple(vassal_stats(f"v{i:03d}.ini") for i in range(300))
    stats = emperor_stats(vassals)
    first = cache.encode(stats)
    assert first == to_json(stats).encode()
    part = cache.part("v007.ini")
    assert part is not None
    # an equal snapshot (a new object) keeps the part; a changed one does not
    cache.put(replace(vassals[7]))
    assert cache.part("v007.ini") is part
    changed = list(vassals)
    changed[7] = replace(vassals[7], state="waiting", pid=None, backoff_attempt=2, restarts=3)
    changed[8] = replace(vassals[8], sockets=(("127.0.0.1:8000", "armed"),), wakes=4)
    changed[9] = replace(vassals[9], last_error="boom")
    stats = emperor_stats(tuple(changed))
    assert cache.encode(stats) == to_json(stats).encode()  # with a blacklist entry now
    assert cache.part("v007.ini") is not part
    assert json.loads(cache.encode(stats))["blacklist"][0]["id"] == "v007.ini"

    # vassals go and come: their parts are forgotten, the document follows
    fewer = emperor_stats((*changed[:10], vassal_stats("zz.ini")))
    assert cache.encode(fewer) == to_json(fewer).encode()
    assert len(cache) == 11
    assert cache.encode(stats) == to_json(stats).encode()


# -- the emperor's document, with fake processes (unit) -----------------------------------

NATIVE = "[vassal]\ncommand = app {arg}\n"


def doc(name: str, arg: str = "1", version: str = "1") -> VassalDocument:
    return VassalDocument(name, "fake://", version, NATIVE.format(arg=arg), path=f"/srv/{name}")


def fresh(emperor: Emperor) -> dict[str, Any]:
    """The document made from scratch: every snapshot rebuilt, serialised at once."""
    vassals = tuple(
        sup._make_snapshot() for sup in sorted(emperor._sups.values(), key=lambda s: s.name)
    )
    content: dict[str, Any] = json.loads(to_json(replace(emperor.snapshot(), vassals=vassals)))
    return content


def without_uptime(document: bytes | str) -> dict[str, Any]:
    content: dict[str, Any] = json.loads(document)
    content.pop("uptime")
    return content


async def check(emperor: Emperor) -> dict[str, Any]:
    """The emperor's cached, sliced document is the fresh one; returns it."""
    await trio.testing.wait_all_tasks_blocked()
    for sup in emperor._sups.values():
        assert sup.snapshot() == sup._make_snapshot(), sup.name
    got = without_uptime(await emperor.stats_document())
    want = fresh(emperor)
    want.pop("uptime")
    assert got == want
    return got


def by_name(content: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in content["vassals"]}


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['\0"sockets": 0\0', '"sockets": 0', "\u2028", "\\", '"']
)
#: A clock reading (stats times are the emperor's, never infinite or NaN).
_TIME = st.none() | st.floats(min_value=0.0, max_value=2.0**40)


@settings(max_examples=200, deadline=None)
@given(
    name=_TEXT,
    status=st.none() | _TEXT,
    error=st.none() | _TEXT,
    sockets=st.lists(st.tuples(_TEXT, _TEXT), max_size=3),
    born=_TIME,
    wakes=st.integers(),
    uid=st.none() | st.sampled_from(["0", "1000", "www-data"]),
)
def test_a_vassal_part_is_exactly_the_indented_json(
    name: str,
    status: str | None,
    error: str | None,
    sockets: list[tuple[str, str]],
    born: float | None,
    wakes: int,
    uid: str | None,
) -> None:
    """The C-encoder part is byte for byte ``json.dumps(..., indent=2)``, indented into
    ``vassals``, whatever the strings hold (NULs, quotes, the place holder itself)."""
    v = vassal_stats(
        name,
        notify_status=status,
        last_error=error,
        sockets=tuple(sockets),
        born=born,
        wakes=wakes,
        uid=uid,
    )
    reference = json.dumps(vassal_doc(v), indent=2).replace("\n", "\n    ").encode()
    assert vassal_part(v) == reference


def test_a_vassal_document_has_uwsgi_keys_then_every_other_field() -> None:
    """uWSGI's keys first (with uWSGI's values), then each other field once, in order."""
    v = vassal_stats("a.ini", uid="33", wakes=2)
    doc = vassal_doc(v)
    uwsgi = list(doc)[: list(doc).index("respawns") + 1]
    assert uwsgi[:3] == ["id", "pid", "born"]
    assert doc["uid"] == 33
    assert doc["respawns"] == v.restarts
    others = [f.name for f in fields(VassalStats) if f.name not in uwsgi]
    assert list(doc)[len(uwsgi) :] == [*others, "config_version_text"]
    for key in others:
        if key != "sockets":
            assert doc[key] == getattr(v, key)


async def test_emperor_document_follows_every_state_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, spawner = FakeMonitor("fake://"), FakeSpawner()
    emperor = Emperor(
        [source], spawner=spawner, policy=BackoffPolicy(throttle=1.0), environ={"HOME": "/"}
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        assert (await check(emperor))["vassals"] == []
        for name in ("a.ini", "b.ini", "c.ini"):
            await source.send(Upsert(doc(name)))
        first = await spawner.wait_spawned(3)
        await check(emperor)

        sup = emperor.supervisor("a.ini")
        assert sup is not None
        assert sup.snapshot() is sup.snapshot()  # nothing changed: the same snapshot

        # a crash: waiting in backoff, then running again with one restart
        spawner.spawned[0].exit(1)
        await trio.testing.wait_all_tasks_blocked()
        assert by_name(await check(emperor))["a.ini"]["state"] == "waiting"
        await spawner.wait_spawned(4)
        assert by_name(await check(emperor))["a.ini"]["restarts"] == 1

        # a new configuration: restarted with it
        await source.send(Upsert(doc("b.ini", arg="2", version="2")))
        await spawner.wait_spawned(5)
        assert by_name(await check(emperor))["b.ini"]["config_version"] == "2"

        # a reload signal, a cleared throttle, a removal and an addition
        emperor.reload_all()
        await check(emperor)
        emperor.clear_throttles()
        await check(emperor)
        await source.send(Remove("fake://", "c.ini"))
        await wait_for(lambda: emperor.supervisor("c.ini") is None)
        assert first.returncode is not None
        assert set(by_name(await check(emperor))) == {"a.ini", "b.ini"}
        await source.send(Upsert(doc("d.ini")))
        await spawner.wait_spawned(6)
        assert set(by_name(await check(emperor))) == {"a.ini", "b.ini", "d.ini"}
        emperor.shutdown()


async def test_many_vassals_are_made_a_slice_at_a_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document for many vassals lets other tasks run while it is made."""
    import trimperor.emperor as emperor_module

    monkeypatch.setattr(emperor_module, "STATS_SLICE", -1.0)  # every 32 vassals
    source, spawner = FakeMonitor("fake://"), FakeSpawner()
    emperor = Emperor([source], spawner=spawner, environ={"HOME": "/"})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        for i in range(200):
            await source.send(Upsert(doc(f"v{i:03d}.ini")))
        await spawner.wait_spawned(200)
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as ticking:
            ticking.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            before = ticks
            document = await emperor.stats_document()  # the first: every vassal's part made
            assert ticks - before >= 200 // 16  # the ticker ran between the slices
            ticking.cancel_scope.cancel()
        assert len(json.loads(document)["vassals"]) == 200
        await check(emperor)
        emperor.shutdown()


async def test_a_document_asks_only_the_vassals_that_changed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unchanged vassals are not asked for their snapshot: they said nothing changed."""
    source, spawner = FakeMonitor("fake://"), FakeSpawner()
    emperor = Emperor(
        [source], spawner=spawner, policy=BackoffPolicy(throttle=1.0), environ={"HOME": "/"}
    )
    asked: list[str] = []
    snapshot = Supervisor.snapshot

    def counting(sup: Supervisor) -> VassalStats:
        asked.append(sup.name)
        return snapshot(sup)

    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        for i in range(50):
            await source.send(Upsert(doc(f"v{i:02d}.ini")))
        await spawner.wait_spawned(50)
        await check(emperor)
        monkeypatch.setattr(Supervisor, "snapshot", counting)
        await emperor.stats_document()
        assert asked == []
        crashed = next(p for p in spawner.spawned if p.plan.name == "v07.ini")
        crashed.exit(1)
        await trio.testing.wait_all_tasks_blocked()
        await emperor.stats_document()
        assert asked == ["v07.ini"]
        monkeypatch.undo()
        assert by_name(await check(emperor))["v07.ini"]["state"] == "waiting"
        emperor.shutdown()


# Steps of the random test below: (what, vassal number, argument).
_STEP = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.booleans()),  # on demand or not
    st.tuples(st.just("update"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 3), st.none()),
    st.tuples(st.just("exit"), st.integers(0, 3), st.sampled_from([0, 1, 26, -9])),
    st.tuples(st.just("wake"), st.integers(0, 3), st.none()),
    st.tuples(st.sampled_from(["reload", "clear"]), st.none(), st.none()),
    st.tuples(st.just("time"), st.none(), st.sampled_from([0.01, 0.5, 2.0, 30.0])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_STEP, min_size=1, max_size=20))
def test_no_sequence_of_changes_leaves_a_stale_part(steps: list[tuple[str, Any, Any]]) -> None:
    """Whatever happens to the vassals, the kept document patched after each step is the
    one made from scratch (and each supervisor's snapshot its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_changes, steps, Path(tmp), clock=trio.testing.MockClock(autojump_threshold=0))


def _woken(sup: Supervisor) -> bool:
    return sup.state.value != "armed"


async def _changes(steps: list[tuple[str, Any, Any]], tmp: Path) -> None:
    source, spawner = FakeMonitor("fake://"), FakeSpawner()
    emperor = Emperor(
        [source],
        spawner=spawner,
        policy=BackoffPolicy(throttle=0.2, max_throttle=5.0),
        environ={"HOME": "/"},
    )
    versions: dict[str, int] = {}

    def text(name: str, on_demand: bool) -> str:
        if not on_demand:
            return NATIVE.format(arg=versions[name])
        return (
            f"[vassal]\ncommand = app {versions[name]}\nsocket = {tmp / name}.sock\n"
            "on-demand = true\n"
        )

    # No time bound here: the clock jumps whenever the tasks wait on a thread.
    async with trio.open_nursery() as nursery:
        await nursery.start(emperor.run)
        for what, number, arg in steps:
            name = f"v{number}.ini" if number is not None else ""
            sup = emperor.supervisor(name)
            if what in ("add", "update") and (what == "add") == (name not in versions):
                versions[name] = versions.get(name, 0) + 1
                document = VassalDocument(
                    name, "fake://", str(versions[name]), text(name, arg), path=f"/srv/{name}"
                )
                await source.send(Upsert(document))
            elif what == "remove" and versions.pop(name, None) is not None:
                await source.send(Remove("fake://", name))
            elif what == "exit":
                for proc in spawner.alive():
                    if proc.plan.name == name:
                        proc.exit(arg)
            elif what == "wake" and sup is not None and sup.state.value == "armed":
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(str(tmp / f"{name}.sock"))
                    await wait_for(partial(_woken, sup))
            elif what == "reload":
                emperor.reload_all()
            elif what == "clear":
                emperor.clear_throttles()
            elif what == "time":
                await trio.sleep(arg)
            await check(emperor)  # after every step: the kept document patched step by step
        emperor.shutdown()


# -- the server: one document shared by the clients that ask at once ------------------------


async def _read_all(path: str) -> bytes:
    stream = await trio.open_unix_socket(path)
    data = b""
    async with stream:
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def test_clients_asking_at_once_share_one_document(tmp_path: Path) -> None:
    made = 0
    release = trio.Event()

    async def document() -> bytes:
        nonlocal made
        made += 1
        await release.wait()
        return f'{{"made": {made}}}\n'.encode()

    path = str(tmp_path / "stats.sock")
    results: list[bytes] = []

    async def client() -> None:
        results.append(await _read_all(path))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: api.serve_stats(
                    path,
                    lambda: emperor_stats(()),
                    document=document,
                    task_status=task_status,
                )
            )
            async with trio.open_nursery() as clients:
                for _ in range(3):
                    clients.start_soon(client)
                await wait_for(lambda: made == 1)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
            assert results == [b'{"made": 1}\n'] * 3
            assert made == 1
            # asked after that one was made: made anew
            assert await _read_all(path) == b'{"made": 2}\n'
            nursery.cancel_scope.cancel()


# -- with real processes: the stats socket of an emperor (integration) -----------------------


async def _query(path: str) -> dict[str, Any]:
    return without_uptime(await _read_all(path))


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[tuple[Emperor, FakeMonitor, str]]:
    source = FakeMonitor("fake://")
    stats = str(tmp_path / "stats.sock")
    emperor = Emperor(
        [source],
        spawner=PosixSpawner(),
        policy=BackoffPolicy(throttle=0.05, max_throttle=0.5),
        stats_address=stats,
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            yield emperor, source, stats
            emperor.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.integration
async def test_stats_socket_document_follows_real_vassals(
    real: tuple[Emperor, FakeMonitor, str], tmp_path: Path
) -> None:
    emperor, source, stats = real
    address = f"127.0.0.1:{_free_port()}"
    on_demand = (
        f"[vassal]\ncommand = {sys.executable} {SERVER}\nsocket = {address}\non-demand = true\n"
    )
    plain = f"[vassal]\ncommand = {sys.executable} -c 'import time; time.sleep(600)'\n"
    await source.send(Upsert(VassalDocument("od.ini", "fake://", "1", on_demand)))
    await source.send(Upsert(VassalDocument("plain.ini", "fake://", "1", plain)))

    async def settled(predicate: Any) -> dict[str, Any]:
        """The socket's document once *predicate* holds for it, checked against a fresh one."""
        while not predicate(by_name(got := await _query(stats))):
            await trio.sleep(0.02)
        for _ in range(10):  # a change between the two reads: ask again
            want = fresh(emperor)
            want.pop("uptime")
            if got == want:
                break
            await trio.sleep(0.02)
            got = await _query(stats)
        assert got == want
        return got

    with trio.fail_after(60):
        await settled(
            lambda v: (
                v.get("od.ini", {}).get("state") == "armed"
                and v.get("plain.ini", {}).get("state") == "running"
            )
        )
        # wake the on-demand vassal with a connection
        host, _, port = address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            while await stream.receive_some():
                pass
        got = await settled(lambda v: v["od.ini"]["state"] == "running")
        assert by_name(got)["od.ini"]["wakes"] == 1
        assert by_name(got)["od.ini"]["restarts"] == 0  # a wake is no restart
        assert by_name(got)["od.ini"]["sockets"] == [{"address": address, "state": "handed over"}]
        # kill the plain one: restarted, counted
        sup = emperor.supervisor("plain.ini")
        assert sup is not None
        pid = sup.snapshot().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        got = await settled(
            lambda v: v["plain.ini"]["state"] == "running" and v["plain.ini"]["pid"] != pid
        )
        assert by_name(got)["plain.ini"]["restarts"] == 1
        assert by_name(got)["plain.ini"]["last_exit_signal"] == "SIGKILL"
        # removed: gone from the document
        await source.send(Remove("fake://", "plain.ini"))
        got = await settled(lambda v: "plain.ini" not in v)
        assert set(by_name(got)) == {"od.ini"}
