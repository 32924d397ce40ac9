"""The zoo:// source against a real ZooKeeper (Debian's ``zookeeper`` package).

A session fixture runs one server (tests/zk_server.py) on a free port and a
temporary data directory; each test works under its own znode and removes it
afterwards. The outage test runs a server of its own, to stop and restart it;
partitions and session expiry go through :class:`tests.proxy.TcpProxy`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import BadArgumentsError
from kazoo.protocol.serialization import Create
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from tests.helpers import (
    EmperorProcess,
    free_port,
    new_pid,
    next_change,
    next_problem,
    next_snapshot,
    pid_alive,
    pidfile_vassal,
    read_pid,
    read_stats_document,
    running_monitor,
    system_user,
    versions,
    wait_for,
)
from tests.proxy import TcpProxy
from tests.zk_server import ZkServer, zookeeper_missing
from trimperor.abc import MonitorOptions
from trimperor.cli import build_parser, plugin_settings, resolve_sources
from trimperor.core.errors import UsageError
from trimperor.core.model import Remove, Snapshot, SourceEvent, Upsert, VassalDocument
from trimperor.monitors.toolkit import BadVassal
from trimperor.monitors.zookeeper import (
    ZooAddress,
    ZooMonitor,
    _Offer,
    build_document,
    parse_uri,
    sibling_of,
)

integration = pytest.mark.integration
GOOD = "[vassal]\ncommand = true\n"
USER = "trimperor-test"

# -- the URI (no server) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("zoo://127.0.0.1:2181/vassals", ZooAddress("127.0.0.1:2181", "/vassals")),
        ("zoo://zk1,zk2:2182/a/b/", ZooAddress("zk1:2181,zk2:2182", "/a/b")),
        ("zoo://[::1]:2183,[::1]/v", ZooAddress("[::1]:2183,[::1]:2181", "/v")),
        ("zoo://u:p%40ss@h/v", ZooAddress("h:2181", "/v", "u", "p@ss")),
        ("zoo://h/v?timeout=2.5", ZooAddress("h:2181", "/v", session_timeout=2.5)),
        ("zoo://h/", ZooAddress("h:2181", "/")),
    ],
)
def test_uri_forms(uri: str, address: ZooAddress) -> None:
    assert parse_uri(uri) == address


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("zoo://h", "no path"),
        ("zoo:///v", "no host"),
        ("zoo://h:0/v", "bad port"),
        ("zoo://h:x/v", "bad port"),
        ("zoo://h/a//b", "bad znode path"),
        ("zoo://h/a/../b", "bad znode path"),
        ("zoo://h/v?timeout=0", "timeout must be"),
        ("zoo://h/v?chroot=1", "unknown parameter"),
        ("zoo://user@h/v", "credentials must be user:password"),
    ],
)
def test_bad_uris_are_usage_errors(uri: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ZooMonitor(uri, MonitorOptions())


def test_the_password_never_shows(tmp_path: Path) -> None:
    monitor = ZooMonitor("zoo://admin:s3%2Fcr@t@h1:1,h2/v", MonitorOptions())
    assert monitor.uri == "zoo://admin:***@h1:1,h2/v"
    assert "s3" not in repr(monitor.status.snapshot())
    assert monitor.address.password == "s3/cr@t"
    # Not percent-encoded, a '/' ends the host list: the error hides the password.
    with pytest.raises(UsageError) as error:
        ZooMonitor("zoo://admin:s3/cr@t@h1:1,h2/v", MonitorOptions())
    assert "s3" not in str(error.value)
    assert "zoo://***@h1:1,h2/v" in str(error.value)
    auth = tmp_path / "auth"
    auth.write_text("admin:s3cr3t\n")
    monitor = ZooMonitor("zoo://h/v", MonitorOptions(plugins={"zoo": {"auth_file": str(auth)}}))
    assert monitor.uri == "zoo://h/v"
    assert monitor._auth == ("admin", "s3cr3t")
    auth.write_text("no colon\n")
    with pytest.raises(UsageError, match="user:password"):
        ZooMonitor("zoo://h/v", MonitorOptions(plugins={"zoo": {"auth_file": str(auth)}}))
    with pytest.raises(UsageError, match="cannot read --zoo-auth-file"):
        ZooMonitor(
            "zoo://h/v", MonitorOptions(plugins={"zoo": {"auth_file": str(tmp_path / "missing")}})
        )


def test_the_auth_file_option_reaches_the_monitor(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text("emperor:pw\n")
    args = build_parser().parse_args(["--zoo-auth-file", str(auth), "zoo://h/v"])
    (monitor,) = resolve_sources(args.sources, MonitorOptions(plugins=plugin_settings(args)))
    assert isinstance(monitor, ZooMonitor)
    assert monitor._auth == ("emperor", "pw")


def test_znodes_to_documents() -> None:
    opts = MonitorOptions(max_config_size=100)
    nodes: dict[str, Any] = {
        "a.ini": (b"x", 7),
        "a.ini.socket": (b" 127.0.0.1:9000\n", 9),
        "a.ini.uid": (b"1000", 10),
        "a.ini.gid": (b"", 11),
        "b.ini": (b"\xff", 1),
        "c.ini": (b"#" * 101, 1),
        "d.ini": (b"x", 1),
        "d.ini.uid": (b"root", 2),
        "e.ini": "not allowed to read it",
    }
    a = build_document("a.ini", nodes, "zoo://h/v", opts)
    assert (a.text, a.version, a.socket, a.uid, a.gid) == (
        "x",
        "7+socket@9+uid@10+gid@11",
        "127.0.0.1:9000",
        1000,
        None,
    )
    for name, reason in (
        ("b.ini", "not UTF-8"),
        ("c.ini", "101 bytes, over --max-config-size"),
        ("d.ini", "d.ini.uid is not a non-negative integer: 'root'"),
        ("e.ini", "not allowed to read it"),
        ("x.txt", "does not end in a configuration extension"),
        ("..", "not allowed"),
        ("a/b.ini", "contains '/'"),
    ):
        with pytest.raises(BadVassal, match=re.escape(reason)):
            build_document(name, {name: (b"x", 1), **nodes}, "", opts)
    assert sibling_of("a.ini.socket") == ("a.ini", "socket")
    assert sibling_of("a.ini.gid") == ("a.ini", "gid")
    assert sibling_of("a.socket") is None  # not the sibling of a vassal name


def test_last_good_documents_and_what_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    offer = _Offer("zoo://h/v")
    good = VassalDocument("a.ini", "zoo://h/v", "1", "x")
    assert offer.update("a.ini", good) == Upsert(good)
    assert offer.update("a.ini", good) is None  # the same document again
    with caplog.at_level(logging.WARNING):
        assert offer.update("a.ini", BadVassal("a.ini", "broken")) is None
        assert offer.update("a.ini", BadVassal("a.ini", "broken")) is None
    assert caplog.text.count("reason=broken; keeping its last good configuration") == 1
    # A snapshot keeps the last good document of a bad vassal, drops what is gone.
    b = VassalDocument("b.ini", "zoo://h/v", "1", "y")
    snap = offer.snapshot({"a.ini": BadVassal("a.ini", "broken"), "b.ini": b})
    assert [d.name for d in snap.docs] == ["a.ini", "b.ini"]
    assert offer.update("a.ini", None) == Remove("zoo://h/v", "a.ini")
    assert offer.update("a.ini", None) is None
    assert offer.snapshot({}).docs == ()


# -- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    """One ZooKeeper for the session, on a free port, killed at the end.

    Session-scoped fixtures are set up before the function-scoped leak check
    of tests/conftest.py, so the server process is not taken for a leak.
    """
    missing = zookeeper_missing()
    if missing is not None:
        pytest.fail(missing)
    server = ZkServer(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Tree:
    """A fresh znode under which a test puts its vassals, and a client to do it."""

    def __init__(self, client: KazooClient, hosts: str) -> None:
        self.client = client
        self.hosts = hosts
        self.path = f"/t-{uuid.uuid4().hex[:10]}"
        client.create(self.path)

    def uri(self, hosts: str | None = None, query: str = "") -> str:
        return f"zoo://{hosts or self.hosts}{self.path}{query}"

    def put(self, name: str, data: str | bytes) -> None:
        """Create or change the child *name*."""
        raw = data.encode() if isinstance(data, str) else data
        path = f"{self.path}/{name}"
        if self.client.exists(path):
            self.client.set(path, raw)
        else:
            self.client.create(path, raw)

    def delete(self, name: str) -> None:
        self.client.delete(f"{self.path}/{name}")

    def mzxid(self, name: str) -> str:
        return str(self.client.exists(f"{self.path}/{name}").mzxid)


def _client(hosts: str) -> KazooClient:
    client = KazooClient(hosts)
    client.start(timeout=30)
    return client


def _close(client: KazooClient) -> None:
    client.stop()
    client.close()


@pytest.fixture
def tree(zk_server: ZkServer) -> Iterator[Tree]:
    client = _client(zk_server.hosts)
    try:
        t = Tree(client, zk_server.hosts)
        yield t
        client.delete(t.path, recursive=True)
    finally:
        _close(client)


def running(
    uri: str, **options: Any
) -> AbstractAsyncContextManager[tuple[ZooMonitor, trio.MemoryReceiveChannel[SourceEvent]]]:
    return running_monitor(ZooMonitor, uri, **options)


# -- the monitor on its own -------------------------------------------------------------------


@integration
async def test_create_change_delete(tree: Tree) -> None:
    tree.put("a.ini", "[vassal]\ncommand = a\n")
    tree.put("b.yaml", "vassal:\n  command: b\n")
    async with running(tree.uri()) as (monitor, recv):
        snap = await next_snapshot(recv)
        assert snap.source == monitor.uri == tree.uri()
        assert versions(snap) == {"a.ini": tree.mzxid("a.ini"), "b.yaml": tree.mzxid("b.yaml")}
        assert snap.docs[0].text == "[vassal]\ncommand = a\n"
        assert (snap.docs[0].uid, snap.docs[0].gid, snap.docs[0].socket) == (None, None, None)

        status = monitor.status.snapshot()
        assert (status.state, status.vassals) == ("connected", 2)
        assert status.session is not None
        assert status.session.startswith("0x")
        assert status.last_event is not None

        tree.put("a.ini", "[vassal]\ncommand = a2\n")
        change = await next_change(recv)
        assert isinstance(change, Upsert)
        assert (change.doc.name, change.doc.text) == ("a.ini", "[vassal]\ncommand = a2\n")
        assert change.doc.version == tree.mzxid("a.ini")

        tree.put("c.json", '{"vassal": {"command": "c"}}')
        change = await next_change(recv)
        assert isinstance(change, Upsert)
        assert change.doc.name == "c.json"

        tree.delete("b.yaml")
        assert await next_change(recv) == Remove(monitor.uri, "b.yaml")
        assert monitor.status.vassals == 2


@integration
async def test_siblings_carry_socket_uid_and_gid(tree: Tree) -> None:
    tree.put("a.ini", GOOD)
    tree.put("a.ini.socket", "127.0.0.1:9000")
    tree.put("a.ini.uid", "1000\n")
    tree.put("a.ini.gid", "1001")
    tree.put("b.ini", GOOD)
    tree.put("b.ini.socket", "")  # empty: not on demand
    tree.put("lone.ini.socket", "127.0.0.1:1")  # no lone.ini: ignored
    async with running(tree.uri()) as (_, recv):
        snap = await next_snapshot(recv)
        a, b = snap.docs
        assert (a.socket, a.uid, a.gid) == ("127.0.0.1:9000", 1000, 1001)
        assert a.version == "+".join(
            [tree.mzxid("a.ini")]
            + [f"{f}@{tree.mzxid('a.ini.' + f)}" for f in ("socket", "uid", "gid")]
        )
        assert (b.name, b.socket) == ("b.ini", None)

        tree.put("a.ini.socket", "127.0.0.1:9001")  # a new socket reloads
        change = await next_change(recv)
        assert isinstance(change, Upsert)
        assert change.doc.socket == "127.0.0.1:9001"
        tree.delete("a.ini.uid")
        change = await next_change(recv)
        assert isinstance(change, Upsert)
        assert change.doc.uid is None
        assert change.doc.version == (
            f"{tree.mzxid('a.ini')}+socket@{tree.mzxid('a.ini.socket')}"
            f"+gid@{tree.mzxid('a.ini.gid')}"
        )
        tree.put("lone.ini", GOOD)  # the sibling counts once its vassal exists
        change = await next_change(recv)
        assert isinstance(change, Upsert)
        assert change.doc.socket == "127.0.0.1:1"


@integration
async def test_extra_extensions_and_their_siblings(tree: Tree) -> None:
    tree.put("site.conf", GOOD)
    tree.put("site.conf.uid", "1000")
    async with running(tree.uri(), extra_extensions=("conf",)) as (_, recv):
        snap = await next_snapshot(recv)
        assert [(d.name, d.uid) for d in snap.docs] == [("site.conf", 1000)]


@integration
async def test_bad_input_is_logged_once_and_affects_nothing_else(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    tree.put("good.ini", GOOD)
    tree.put("notes.txt", "x")
    tree.put("big.ini", GOOD + "#" * 200)
    tree.put("latin1.ini", "[vassal]\ncommand = caf\xe9\n".encode("latin-1"))
    tree.put("owner.ini", GOOD)
    tree.put("owner.ini.uid", "www-data")
    # The server itself refuses names that could leave the path (kazoo's own
    # path check is bypassed to ask it).
    for bad in ("..", "."):
        result = tree.client.handler.async_result()
        tree.client._call(Create(f"{tree.path}/{bad}", b"x", OPEN_ACL_UNSAFE, 0), result)
        with pytest.raises(BadArgumentsError):
            result.get(timeout=10)
    with caplog.at_level(logging.WARNING, "trimperor.monitors.zookeeper"):
        async with running(tree.uri(), max_config_size=100) as (_, recv):
            snap = await next_snapshot(recv)
            assert list(versions(snap)) == ["good.ini"]
            for expected in (
                "name=notes.txt reason=name 'notes.txt' does not end in a configuration extension",
                "name=big.ini reason=configuration of 'big.ini' is 224 bytes, over "
                "--max-config-size (100)",
                "name=latin1.ini reason=the data is not UTF-8 text (byte 22)",
                "name=owner.ini reason=owner.ini.uid is not a non-negative integer: 'www-data'",
            ):
                assert caplog.text.count(expected) == 1, expected

            # A good vassal turning bad keeps its last good configuration...
            tree.put("good.ini", b"\xff\xfe")
            await wait_for(lambda: "keeping its last good configuration" in caplog.text)
            # ...and other changes go on meanwhile.
            tree.put("other.ini", GOOD)
            change = await next_change(recv)
            assert isinstance(change, Upsert)
            assert change.doc.name == "other.ini"
            # A fixed one comes back; the one that stays bad is not logged again.
            tree.put("good.ini", GOOD + "# fixed\n")
            tree.put("notes.txt", "y")
            change = await next_change(recv)
            assert isinstance(change, Upsert)
            assert change.doc.text == GOOD + "# fixed\n"
            tree.delete("big.ini")
            tree.put("big.ini", "[vassal]\ncommand = small\n")
            change = await next_change(recv)
            assert isinstance(change, Upsert)
            assert change.doc.name == "big.ini"
            assert caplog.text.count("name=notes.txt") == 1


@integration
async def test_a_missing_path_is_a_problem_until_it_is_created(tree: Tree) -> None:
    uri = f"zoo://{tree.hosts}{tree.path}/later"
    async with running(uri) as (monitor, recv):
        problem = await next_problem(recv)
        assert "does not exist" in problem.message
        assert monitor.status.last_error is not None
        tree.client.create(f"{tree.path}/later")
        tree.client.create(f"{tree.path}/later/a.ini", GOOD.encode())
        snap = await next_snapshot(recv, lambda s: bool(s.docs))
        assert list(versions(snap)) == ["a.ini"]


@integration
async def test_digest_credentials_from_the_uri_or_a_file(
    zk_server: ZkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    admin = _client(zk_server.hosts)
    path = f"/auth-{uuid.uuid4().hex[:8]}"
    try:
        admin.add_auth("digest", "emperor:s3cr3t")
        acl = [make_digest_acl("emperor", "s3cr3t", all=True)]
        admin.create(path, acl=acl)
        admin.create(f"{path}/a.ini", GOOD.encode(), acl=acl)
        auth_file = tmp_path / "zoo-auth"
        auth_file.write_text("emperor:s3cr3t\n")
        with caplog.at_level(logging.DEBUG, "trimperor"):
            async with running(f"zoo://{zk_server.hosts}{path}") as (monitor, recv):
                problem = await next_problem(recv)
                assert "not allowed to list" in problem.message
                assert monitor.status.state == "connected"
            for uri, options in (
                (f"zoo://emperor:s3cr3t@{zk_server.hosts}{path}", {}),
                (
                    f"zoo://{zk_server.hosts}{path}",
                    {"plugins": {"zoo": {"auth_file": str(auth_file)}}},
                ),
            ):
                async with running(uri, **options) as (monitor, recv):
                    snap = await next_snapshot(recv)
                    assert list(versions(snap)) == ["a.ini"]
        assert "s3cr3t" not in caplog.text
    finally:
        admin.delete(path, recursive=True)
        _close(admin)


@integration
async def test_a_thousand_znodes(tree: Tree) -> None:
    for start in range(0, 1000, 250):
        txn = tree.client.transaction()
        for i in range(start, start + 250):
            txn.create(f"{tree.path}/v{i:04d}.ini", f"[vassal]\ncommand = v{i}\n".encode())
        results = txn.commit()
        assert not [r for r in results if isinstance(r, Exception)]
    async with running(tree.uri()) as (_, recv):
        snap = await next_snapshot(recv, timeout=60)
        assert len(snap.docs) == 1000
        assert snap.docs[999].text == "[vassal]\ncommand = v999\n"
        tree.put("v0500.ini", "[vassal]\ncommand = changed\n")
        change = await next_change(recv)
        assert isinstance(change, Upsert)
        assert change.doc.name == "v0500.ini"
        tree.delete("v0001.ini")
        assert isinstance(await next_change(recv), Remove)


@integration
async def test_a_partition_stops_nothing_and_heals_after(tree: Tree) -> None:
    tree.put("a.ini", GOOD)
    tree.put("b.ini", GOOD)
    proxy = TcpProxy("127.0.0.1", int(tree.hosts.rpartition(":")[2]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        # The longest session the server allows (20 ticks): the cut stays within it.
        async with running(tree.uri(f"127.0.0.1:{port}", "?timeout=10")) as (monitor, recv):
            await next_snapshot(recv, lambda s: len(s.docs) == 2)
            session = monitor.status.session
            proxy.cut()
            problem = await next_problem(recv)
            assert "lost" in problem.message
            assert monitor.status.state == "suspended"
            tree.delete("b.ini")
            tree.put("a.ini", GOOD + "# changed meanwhile\n")
            # Cut off, nothing tells the emperor b.ini is gone.
            with trio.move_on_after(0.5):
                async for event in recv:
                    assert not isinstance(event, Snapshot | Remove | Upsert), event
            proxy.restore()
            snap = await next_snapshot(recv)
            assert versions(snap) == {"a.ini": tree.mzxid("a.ini")}
            assert monitor.status.state == "connected"
            assert monitor.status.session == session  # within the session timeout
        nursery.cancel_scope.cancel()


class StallingProxy(TcpProxy):
    """A :class:`TcpProxy` that can also ``stall()``: connections stay open and
    new ones are accepted, but no byte goes through until ``resume()`` (a
    silent partition: only timeouts can tell)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self._flowing = trio.Event()
        self._flowing.set()

    def stall(self) -> None:
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def _copy(  # type: ignore[override]
        self, src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await src.receive_some(65536):
                await self._flowing.wait()
                await dst.send_all(data)
        done.cancel()


@integration
@pytest.mark.parametrize("how", ["cut", "stall"])
async def test_an_expired_session_is_followed_by_a_new_one_and_a_snapshot(
    zk_server: ZkServer, tree: Tree, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    tree.put("a.ini", GOOD)
    tree.put("b.ini", GOOD)
    proxy = StallingProxy("127.0.0.1", zk_server.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        async with running(tree.uri(f"127.0.0.1:{port}", "?timeout=2")) as (monitor, recv):
            await next_snapshot(recv, lambda s: len(s.docs) == 2)
            session = monitor.status.session
            assert session is not None
            assert session in zk_server.sessions()
            if how == "cut":  # connections dropped, new ones refused
                proxy.cut()
            else:  # nothing goes through: kazoo's read timeout must notice
                proxy.stall()
            await next_problem(recv)
            assert monitor.status.state == "suspended"
            tree.delete("b.ini")
            tree.put("c.ini", GOOD)
            # The server ends the session after 2 s of silence.
            await wait_for(lambda: session not in zk_server.sessions(), timeout=30)
            async for event in _until(recv, 0.3):
                assert not isinstance(event, Snapshot | Remove | Upsert), event
            proxy.restore()
            proxy.resume()
            snap = await next_snapshot(recv, timeout=30)
            assert sorted(versions(snap)) == ["a.ini", "c.ini"]
            assert monitor.status.state == "connected"
            assert monitor.status.session not in {None, session}
            assert "source.session_lost" in caplog.text
            # The new session watches again.
            tree.put("d.ini", GOOD)
            change = await next_change(recv)
            assert isinstance(change, Upsert)
            assert change.doc.name == "d.ini"
        nursery.cancel_scope.cancel()


async def _until(
    recv: trio.MemoryReceiveChannel[SourceEvent], seconds: float
) -> AsyncIterator[SourceEvent]:
    """The events that arrive within *seconds* (a window to check for, not a wait)."""
    with trio.move_on_after(seconds):
        async for event in recv:
            yield event


@integration
async def test_an_unreachable_server_at_start_is_reported_and_awaited(tree: Tree) -> None:
    tree.put("a.ini", GOOD)
    proxy = TcpProxy("127.0.0.1", int(tree.hosts.rpartition(":")[2]))
    proxy.cut()
    send, recv = trio.open_memory_channel[SourceEvent](100)
    async with recv, trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        monitor = ZooMonitor(tree.uri(f"127.0.0.1:{port}"), MonitorOptions())
        with trio.fail_after(30):  # start() does not wait for the server (it is cut off)
            await nursery.start(monitor.run, send)
        problem = await next_problem(recv)
        assert "answers yet" in problem.message
        assert monitor.status.state == "connecting"
        proxy.restore()
        snap = await next_snapshot(recv, timeout=30)
        assert list(versions(snap)) == ["a.ini"]
        nursery.cancel_scope.cancel()


# -- the emperor, end to end ---------------------------------------------------------------


@integration
async def test_emperor_creates_reloads_and_stops_vassals(tree: Tree, tmp_path: Path) -> None:
    stats = tmp_path / "stats.sock"
    emperor = EmperorProcess(
        [tree.uri(), "--throttle", "50", "--stats", str(stats)], tmp_path / "emperor.log"
    )
    try:
        a_pid, b_pid = tmp_path / "a.pid", tmp_path / "b.pid"
        tree.put("a.ini", pidfile_vassal(tmp_path, "a"))
        tree.put("b.ini", pidfile_vassal(tmp_path, "b"))
        tree.put("broken.ini", b"\xff")  # logged; nothing else is affected
        first_a, b = await new_pid(a_pid), await new_pid(b_pid)
        assert "source.bad_znode" in emperor.text()
        await wait_for(lambda: "stats.listening" in emperor.text())
        (source,) = (await trio.to_thread.run_sync(read_stats_document, stats))["sources"]
        assert (source["uri"], source["state"], source["vassals"]) == (tree.uri(), "connected", 2)
        assert source["session"].startswith("0x")
        assert source["last_event"] > 0

        tree.put("a.ini", pidfile_vassal(tmp_path, "a", extra="# edited\n"))
        a = await new_pid(a_pid, first_a)
        await wait_for(lambda: not pid_alive(first_a))

        tree.delete("b.ini")
        await wait_for(lambda: not pid_alive(b))
        assert pid_alive(a)

        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
        assert not pid_alive(a)
    finally:
        emperor.close()


@integration
async def test_emperor_on_demand_socket_from_a_sibling(tree: Tree, tmp_path: Path) -> None:
    port = free_port()
    emperor = EmperorProcess([tree.uri()], tmp_path / "emperor.log")
    try:
        tree.put("lazy.ini", pidfile_vassal(tmp_path, "lazy"))
        tree.put("lazy.ini.socket", f"127.0.0.1:{port}")
        await wait_for(lambda: "vassal.armed name=lazy.ini" in emperor.text())
        assert read_pid(tmp_path / "lazy.pid") is None  # asleep until a connection
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pid = await new_pid(tmp_path / "lazy.pid")
        assert pid_alive(pid)
        # An empty socket: no longer on demand; the vassal is reloaded and runs.
        tree.put("lazy.ini.socket", "")
        await new_pid(tmp_path / "lazy.pid", pid)
    finally:
        emperor.close()


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.fail("the tyrant test runs vassals as another user and needs root")
    with system_user(USER) as pw:
        yield pw


@integration
async def test_emperor_tyrant_runs_vassals_as_the_uid_and_gid_siblings(
    tree: Tree, tmp_path: Path, unprivileged_user: pwd.struct_passwd
) -> None:
    pw = unprivileged_user
    # A system shell reports its ids: the user can reach neither the test's
    # interpreter nor its temporary directory.
    text = "[vassal]\ncommand = /bin/sh -c 'echo ids `id -u` `id -g`; exec sleep 600'\n"
    emperor = EmperorProcess([tree.uri(), "--tyrant"], tmp_path / "emperor.log")
    try:
        tree.put("user.ini", text)
        tree.put("user.ini.uid", str(pw.pw_uid))
        tree.put("user.ini.gid", str(pw.pw_gid))
        tree.put("root.ini", text)
        tree.put("root.ini.uid", "0")
        tree.put("root.ini.gid", "0")
        tree.put("nobody.ini", text)  # no owner at all
        await wait_for(lambda: f"user.ini| ids {pw.pw_uid} {pw.pw_gid}" in emperor.text())
        await wait_for(lambda: "refuses to run a vassal as root" in emperor.text())
        await wait_for(lambda: "nobody.ini: tyrant mode needs an owner" in emperor.text())
        spawned = re.search(r"vassal.spawned name=user.ini pid=(\d+)", emperor.text())
        assert spawned is not None
        pid = int(spawned.group(1))
        # Giving the vassal to root stops it.
        tree.put("user.ini.uid", "0")
        await wait_for(lambda: not pid_alive(pid))
    finally:
        emperor.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ZkServer]:
    """A ZooKeeper of this test's own, to stop and start again."""
    missing = zookeeper_missing()
    if missing is not None:
        pytest.fail(missing)
    server = ZkServer(tmp_path / "zookeeper")
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: How long the outage test keeps ZooKeeper stopped (the scenario, not a wait).
OUTAGE = 30.0


@integration
async def test_emperor_through_zookeeper_stopped_and_restarted(
    own_server: ZkServer, tmp_path: Path
) -> None:
    client = _client(own_server.hosts)
    tree = Tree(client, own_server.hosts)
    emperor = EmperorProcess([tree.uri()], tmp_path / "emperor.log")
    try:
        a_pid, b_pid, c_pid = (tmp_path / f"{n}.pid" for n in "abc")
        tree.put("a.ini", pidfile_vassal(tmp_path, "a"))
        tree.put("b.ini", pidfile_vassal(tmp_path, "b"))
        first_a, b = await new_pid(a_pid), await new_pid(b_pid)
        # A change made just before the servers stop is applied.
        tree.put("a.ini", pidfile_vassal(tmp_path, "a", extra="# 2\n"))
        a = await new_pid(a_pid, first_a)
        _close(client)

        own_server.stop()
        await wait_for(lambda: "source.suspended" in emperor.text())
        with trio.move_on_after(OUTAGE):
            while True:  # nothing stops while ZooKeeper is away
                assert pid_alive(a)
                assert pid_alive(b)
                await trio.sleep(0.5)
        own_server.start()
        client = _client(own_server.hosts)
        tree.client = client
        # Changes made after it returned are applied.
        tree.delete("b.ini")
        tree.put("c.ini", pidfile_vassal(tmp_path, "c"))
        await wait_for(lambda: not pid_alive(b), timeout=15)
        await new_pid(c_pid)
        assert pid_alive(a)
        assert read_pid(a_pid) == a
        assert "source.recovered" in emperor.text()
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()
        _close(client)
