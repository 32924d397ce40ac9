"""The etcd:// source against a real etcd member (tests/etcd_server.py)."""

from __future__ import annotations

import json
import logging
import signal
import uuid
from pathlib import Path

import pytest
import trio

from tests.etcd_server import EtcdServer
from tests.helpers import (
    EmperorProcess,
    monitor_running,
    new_pid,
    next_event,
    next_problem,
    next_snapshot,
    next_upsert,
    pid_alive,
    pidfile_vassal,
    versions,
    wait_for,
)
from tests.proxy import TcpProxy
from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Remove, Snapshot, SourceEvent, Upsert
from trimperor.fleet.etcd import Cursor, EtcdClient, KeyValue, prefix_end
from trimperor.monitors.etcd import EtcdMonitor, kv_document, parse_etcd_uri
from trimperor.monitors.toolkit import BadVassal

OPTIONS = MonitorOptions(freq=0.5)


def fresh_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}"


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "endpoints", "prefix"),
    [
        ("etcd://127.0.0.1:2379/fleet", ("127.0.0.1:2379",), "/fleet"),
        ("etcd://a:1,b:2/x/y/", ("a:1", "b:2"), "/x/y"),
        ("etcd://a:1", ("a:1",), ""),
    ],
)
def test_uri_forms(uri: str, endpoints: tuple[str, ...], prefix: str) -> None:
    assert parse_etcd_uri(uri) == (endpoints, prefix)


@pytest.mark.parametrize("uri", ["etcd://", "etcd://host/x", "etcd://h:0/x", "etcd://h:p/x"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(UsageError):
        parse_etcd_uri(uri)


def kv(name: str, value: bytes, rev: int = 7) -> KeyValue:
    return KeyValue(key=b"/p/vassals/" + name.encode(), value=value, mod_revision=rev)


def test_plain_value_and_envelope() -> None:
    doc = kv_document(kv("a.ini", b"[uwsgi]\nx = 1\n"), b"/p/vassals/", "etcd://h:1/p", OPTIONS)
    assert (doc.name, doc.version, doc.text, doc.socket) == ("a.ini", "7", "[uwsgi]\nx = 1\n", None)
    env = json.dumps({"config": "[uwsgi]\n", "socket": "/tmp/s", "uid": 1000, "gid": 1001})
    doc = kv_document(kv("b.ini", env.encode()), b"/p/vassals/", "s", OPTIONS)
    assert (doc.text, doc.socket, doc.uid, doc.gid) == ("[uwsgi]\n", "/tmp/s", 1000, 1001)
    # A JSON configuration is not mistaken for an envelope.
    native = json.dumps({"vassal": {"command": "true"}, "config": "x"})
    assert kv_document(kv("c.json", native.encode()), b"/p/vassals/", "s", OPTIONS).text == native


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("a.txt", b"x", "extension"),
        ("sub/a.ini", b"x", "'/'"),
        ("a.ini", b"\xff\xfe", "UTF-8"),
        ("a.ini", b"x" * 70_000, "max-config-size"),
        ("a.ini", b'{"config": 3}', "not a string"),
        ("a.ini", b'{"config": "x", "uid": -1}', "uid"),
    ],
)
def test_bad_values(name: str, value: bytes, reason: str) -> None:
    with pytest.raises(BadVassal, match=reason):
        kv_document(kv(name, value), b"/p/vassals/", "s", OPTIONS)


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


# -- against etcd ------------------------------------------------------------------------


def monitor(etcd: EtcdServer, prefix: str, port: int | None = None) -> EtcdMonitor:
    return EtcdMonitor(f"etcd://127.0.0.1:{port or etcd.client_port}{prefix}", OPTIONS)


@pytest.mark.integration
async def test_list_then_watch(etcd: EtcdServer) -> None:
    prefix = fresh_prefix()
    rev = etcd.put(f"{prefix}/vassals/a.ini", "[uwsgi]\na = 1\n")
    etcd.put(f"{prefix}/other/b.ini", "not a vassal key")
    async with monitor_running(monitor(etcd, prefix)) as recv:
        snap = await next_snapshot(recv)
        assert versions(snap) == {"a.ini": str(rev)}
        rev_b = etcd.put(f"{prefix}/vassals/b.ini", "[uwsgi]\nb = 1\n")
        up = await next_upsert(recv)
        assert (up.doc.name, up.doc.version) == ("b.ini", str(rev_b))
        assert up.doc.text == "[uwsgi]\nb = 1\n"
        etcd.delete(f"{prefix}/vassals/a.ini")
        event = await next_event(recv)
        assert event == Remove(snap.source, "a.ini")


@pytest.mark.integration
async def test_bad_keys_get_one_line_and_keep_the_last_good(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = fresh_prefix()
    etcd.put(f"{prefix}/vassals/good.ini", "[uwsgi]\n")
    etcd.put(f"{prefix}/vassals/bad.txt", "x")
    caplog.set_level(logging.DEBUG, "trimperor.monitors.etcd")
    async with monitor_running(monitor(etcd, prefix)) as recv:
        snap = await next_snapshot(recv)
        assert list(versions(snap)) == ["good.ini"]
        etcd.put(f"{prefix}/vassals/good.ini", b"\xff")  # turns bad: nothing is sent
        etcd.put(f"{prefix}/vassals/c.ini", "[uwsgi]\n")
        up = await next_upsert(recv)
        assert up.doc.name == "c.ini"
    lines = [r for r in caplog.records if r.getMessage().startswith("source.bad_key")]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert "bad.txt" in lines[0].getMessage()
    assert "keeping its last good" in lines[1].getMessage()
    assert all("\xff" not in r.getMessage() for r in lines)


async def drain_until(
    recv: trio.MemoryReceiveChannel[SourceEvent], want: dict[str, str]
) -> dict[str, str]:
    """Apply events to a name -> version map until it equals *want*."""
    state: dict[str, str] = {}
    with trio.fail_after(15):
        while state != want:
            event = await recv.receive()
            if isinstance(event, Snapshot):
                state = versions(event)
            elif isinstance(event, Upsert):
                state[event.doc.name] = event.doc.version
            elif isinstance(event, Remove):
                state.pop(event.name, None)
    return state


@pytest.mark.integration
async def test_an_outage_stops_nothing_and_the_watch_resumes(etcd: EtcdServer) -> None:
    prefix = fresh_prefix()
    key = f"{prefix}/vassals/"
    etcd.put(key + "a.ini", "[uwsgi]\n")
    etcd.put(key + "b.ini", "[uwsgi]\n")
    proxy = TcpProxy("127.0.0.1", etcd.client_port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        mon = monitor(etcd, prefix, port)
        async with monitor_running(mon) as recv:
            await next_snapshot(recv, lambda s: len(s.docs) == 2)
            proxy.cut()
            await next_problem(recv)
            assert mon.status.state == "retrying"
            etcd.delete(key + "b.ini")
            rev_c = etcd.put(key + "c.ini", "[uwsgi]\n")
            with trio.move_on_after(0.3):
                async for event in recv:
                    raise AssertionError(f"an event while cut: {event!r}")
            proxy.restore()
            # Resumed from the last revision: the changes arrive as events, not a snapshot.
            with trio.fail_after(15):
                seen: list[SourceEvent] = []
                while len(seen) < 2:
                    seen.append(await recv.receive())
            assert not any(isinstance(e, Snapshot) for e in seen), seen
            assert Remove(mon.uri, "b.ini") in seen
            assert any(isinstance(e, Upsert) and e.doc.version == str(rev_c) for e in seen)
        nursery.cancel_scope.cancel()


@pytest.mark.integration
async def test_a_compacted_revision_means_a_new_snapshot(etcd: EtcdServer) -> None:
    prefix = fresh_prefix()
    key = f"{prefix}/vassals/"
    etcd.put(key + "a.ini", "[uwsgi]\n")
    proxy = TcpProxy("127.0.0.1", etcd.client_port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        async with monitor_running(monitor(etcd, prefix, port)) as recv:
            await next_snapshot(recv, lambda s: len(s.docs) == 1)
            proxy.cut()
            await next_problem(recv)
            etcd.delete(key + "a.ini")
            rev = etcd.put(key + "b.ini", "[uwsgi]\n")
            etcd.put(f"{prefix}/noise", "x")
            etcd.compact(etcd.revision())
            proxy.restore()
            snap = await next_snapshot(recv)
            assert versions(snap) == {"b.ini": str(rev)}
        nursery.cancel_scope.cancel()


@pytest.mark.integration
async def test_an_unreachable_cluster_at_start_is_retried(etcd: EtcdServer) -> None:
    prefix = fresh_prefix()
    etcd.put(f"{prefix}/vassals/a.ini", "[uwsgi]\n")
    proxy = TcpProxy("127.0.0.1", etcd.client_port)
    proxy.cut()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        # The second endpoint is the real one: a refused connection moves on to it.
        mon = EtcdMonitor(f"etcd://127.0.0.1:{port},{etcd.address}{prefix}", OPTIONS)
        async with monitor_running(mon) as recv:
            snap = await next_snapshot(recv)
            assert list(versions(snap)) == ["a.ini"]
        mon = monitor(etcd, prefix, port)
        async with monitor_running(mon) as recv:
            await next_problem(recv)
            proxy.restore()
            snap = await next_snapshot(recv)
            assert list(versions(snap)) == ["a.ini"]
        nursery.cancel_scope.cancel()


@pytest.mark.integration
async def test_client_leases_and_create(etcd: EtcdServer) -> None:
    prefix = fresh_prefix().encode()
    async with EtcdClient([etcd.address]) as client:
        lease = await client.grant(30)
        assert await client.keepalive(lease) > 0
        assert await client.create(prefix + b"/k", b"1", lease)
        assert not await client.create(prefix + b"/k", b"2")
        kvs, _ = await client.range(prefix + b"/k")
        assert [(k.value, k.lease) for k in kvs] == [(b"1", lease)]
        assert not await client.delete_if_lease(prefix + b"/k", lease + 1)
        await client.revoke(lease)
        assert await client.keepalive(lease) == 0
        assert (await client.range(prefix + b"/k"))[0] == []
        assert Cursor().revision == 0


@pytest.mark.integration
async def test_emperor_runs_vassals_from_etcd(etcd: EtcdServer, tmp_path: Path) -> None:
    prefix = fresh_prefix()
    key = f"{prefix}/vassals/"
    emperor = EmperorProcess(
        [f"etcd://{etcd.address}{prefix}", "--freq", "0.5"], tmp_path / "emperor.log"
    )
    try:
        etcd.put(key + "a.ini", pidfile_vassal(tmp_path, "a"))
        first = await new_pid(tmp_path / "a.pid")
        etcd.put(key + "a.ini", pidfile_vassal(tmp_path, "a", "env = V=2\n"))
        second = await new_pid(tmp_path / "a.pid", first)
        await wait_for(lambda: not pid_alive(first))
        etcd.delete(key + "a.ini")
        await wait_for(lambda: not pid_alive(second))
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()


@pytest.mark.integration
async def test_a_large_prefix_is_listed_in_pages(etcd: EtcdServer) -> None:
    prefix = fresh_prefix()
    names = [f"v{i:04d}.ini" for i in range(600)]
    for name in names:
        etcd.put(f"{prefix}/vassals/{name}", "[uwsgi]\n")
    etcd.put(f"{prefix}/vassalt", "after the range")
    async with EtcdClient([etcd.address]) as client:
        kvs, revision = await client.range_prefix(f"{prefix}/vassals/".encode())
        assert [kv.key.decode().rpartition("/")[2] for kv in kvs] == names
        assert revision == etcd.revision()
    async with monitor_running(monitor(etcd, prefix)) as recv:
        snap = await next_snapshot(recv)
        assert sorted(versions(snap)) == names
