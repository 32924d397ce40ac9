"""Bad input and hostile peers at the sources: amqp paths and URLs, zmq, stats, files, pg.

Real brokers and servers throughout: RabbitMQ on 127.0.0.1:5672, real ZeroMQ
sockets, real HTTP and stats sockets, real files. Tyrant tests run the
emperor as root with an unprivileged user the test creates.
"""

from __future__ import annotations

import logging
import math
import os
import pwd
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from decimal import Decimal
from functools import partial
from pathlib import Path

import psycopg
import pytest
import trio
import zmq
import zmq.auth
from psycopg import sql
from zmq.utils.monitor import recv_monitor_message

from tests.helpers import (
    PYTHON,
    EmperorProcess,
    amqp_publish,
    free_port,
    http_request_path,
    monitor_running,
    next_snapshot,
    next_upsert,
    system_user,
    wait_for,
)
from trimperor.abc import MonitorOptions
from trimperor.cli import EscapingFilter, main
from trimperor.control import api
from trimperor.core.errors import ConfigError, UsageError
from trimperor.core.model import SourceEvent, VassalDocument
from trimperor.core.stats import EmperorStats, SourceStats, VassalStats, to_json
from trimperor.core.vassalspec import build_spec
from trimperor.monitors import amqp, zeromq
from trimperor.monitors.amqp import AmqpMonitor
from trimperor.monitors.files import DirMonitor
from trimperor.monitors.postgres import BadRow, PostgresMonitor, row_document
from trimperor.monitors.zeromq import ZmqMonitor

USER = "trimperor-test-src"
SECRET = "S3CRET-do-not-print"


# -- configuration values never appear in errors (no I/O) ------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("env", SECRET),
        ("stop-signal", SECRET),
        ("stop-timeout", SECRET),
        ("reload-signal", SECRET),
        ("idle", SECRET),
        ("watchdog", SECRET),
        ("type", SECRET),
        ("socket-mode", SECRET),
        ("listen-backlog", SECRET),
        ("socket", f"{SECRET}:port"),
        ("socket", f"/{SECRET}" + "x" * 120),
        ("socket", f"{SECRET}:1:2"),
        ("socket", f"[{SECRET}:1"),
        ("on-demand", SECRET),
    ],
)
def test_errors_name_the_key_never_the_value(key: str, value: str) -> None:
    text = f"[vassal]\ncommand = sleep 1\n{key} = {value}\n"
    doc = VassalDocument("app.ini", "amqp://h", "1", text, path="/srv/app.ini")
    with pytest.raises(ConfigError) as exc:
        build_spec(doc, {})
    assert SECRET.lower() not in str(exc.value).lower()
    assert str(exc.value).startswith("app.ini")
    assert key in str(exc.value)


def test_a_twice_listed_socket_is_named_by_key_only() -> None:
    text = f"[vassal]\ncommand = x\nsocket = /run/{SECRET}\nsocket = /run/{SECRET}\n"
    with pytest.raises(ConfigError, match="socket: an address is listed twice") as exc:
        build_spec(VassalDocument("a.ini", "s", "1", text), {})
    assert SECRET not in str(exc.value)


# -- AMQP: path messages in tyrant mode (root, a real unprivileged user) ----------------------


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.fail("tyrant mode tests run as root (as the emperor does in production)")
    with system_user(USER) as pw:
        yield pw


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can search (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="trimperor-src-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


REPORTING = "[vassal]\nchdir = /\ncommand = /bin/sh -c 'echo ids `id -u` `id -g`; exec sleep 600'\n"


@pytest.mark.integration
async def test_tyrant_amqp_path_messages_read_only_the_owners_files(
    tmp_path: Path, public_dir: Path, unprivileged_user: pwd.struct_passwd, exchange: str
) -> None:
    pw = unprivileged_user
    # root's file: refused before it is read, and nothing of it is quoted
    root_file = public_dir / "root.ini"
    root_file.write_text(f"[vassal]\ncommand = sleep 1\nenv = {SECRET}\n")
    root_file.chmod(0o600)
    # the user's link to root's file: refused (not followed)
    link = public_dir / "link.ini"
    link.symlink_to(root_file)
    os.lchown(link, pw.pw_uid, pw.pw_gid)
    # the user's broken file: the error names the key, not the value
    broken = public_dir / "broken.ini"
    broken.write_text(f"[vassal]\ncommand = sleep 1\nstop-signal = {SECRET}\n")
    os.chown(broken, pw.pw_uid, pw.pw_gid)
    # the user's good file: runs as the user
    good = public_dir / "good.ini"
    good.write_text(REPORTING)
    os.chown(good, pw.pw_uid, pw.pw_gid)

    emperor = EmperorProcess(
        ["--tyrant", "--amqp-exchange", exchange, "amqp://127.0.0.1"], tmp_path / "e.log"
    )
    try:
        await wait_for(lambda: "source.subscribed" in emperor.text(), timeout=30)
        for path in (root_file, link, broken, good):
            await amqp_publish(exchange, str(path))
        found: list[re.Match[str]] = []

        def reported() -> bool:
            found[:] = list(re.finditer(r"good.ini\| ids (\d+) (\d+)", emperor.text()))
            return bool(found)

        await wait_for(reported, timeout=30)
        assert (int(found[0].group(1)), int(found[0].group(2))) == (pw.pw_uid, pw.pw_gid)
        await wait_for(lambda: "broken.ini: stop-signal: unknown signal" in emperor.text())
        text = emperor.text()
        assert re.search(r"source.refused .*name=root.ini .*belongs to uid 0, gid 0", text)
        assert re.search(r"source.refused .*name=link.ini .*symbolic link", text)
        assert "vassal.spawned name=root.ini" not in text
        assert "vassal.spawned name=link.ini" not in text
        assert SECRET not in text

        # giving the file to root stops its vassal at the next message
        spawned = re.search(r"vassal.spawned name=good.ini pid=(\d+)", text)
        assert spawned is not None
        os.chown(good, 0, 0)
        await amqp_publish(exchange, str(good))
        await wait_for(lambda: "vassal.remove name=good.ini" in emperor.text())
    finally:
        emperor.close()


# -- AMQP: slow HTTP servers -----------------------------------------------------------------


class SlowHttp:
    """An HTTP server: ``/trickle/*`` sends its body a byte per 50 ms, forever;
    ``/held/*`` answers once ``release`` is set; anything else answers at once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.release = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        # The client gives up on a trickle at its deadline: a reset here is expected.
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._answer(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            path = await http_request_path(stream)
            if path is None:
                return
            with_length = "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n"
            if path.startswith("/trickle/"):
                await stream.send_all(with_length.format(10**6).encode())
                while True:  # every read succeeds: only a total deadline ends this
                    await stream.send_all(b"#")
                    await trio.sleep(0.05)
            if path.startswith("/held/"):
                await self.release.wait()
            await stream.send_all(with_length.format(len(self.body)).encode() + self.body)


@asynccontextmanager
async def amqp_with_http(
    exchange: str, http: SlowHttp
) -> AsyncIterator[tuple[AmqpMonitor, trio.MemoryReceiveChannel[SourceEvent], str]]:
    """An AMQP monitor on *exchange*, connected, beside *http* on a port of its own:
    yields the monitor, its events and the server's base URL."""
    monitor = AmqpMonitor(
        "amqp://127.0.0.1", MonitorOptions(plugins={"amqp": {"exchange": exchange}})
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, http.handle, 0, host="127.0.0.1"))
        base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with monitor_running(monitor) as events:
            await wait_for(lambda: monitor.status.state == "connected")
            yield monitor, events, base
        nursery.cancel_scope.cancel()


CONFIG = b"[vassal]\ncommand = sleep 1000\n"


@pytest.mark.integration
async def test_a_slow_url_does_not_block_later_messages(
    exchange: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(amqp, "HTTP_TIMEOUT", 1.0)
    http = SlowHttp(CONFIG)
    async with amqp_with_http(exchange, http) as (monitor, events, base):
        await amqp_publish(exchange, f"{base}/trickle/stuck.ini")
        await amqp_publish(exchange, f"{base}/fast/quick.ini")
        await amqp_publish(exchange, CONFIG, "keyed.ini")
        names = {(await next_upsert(events)).doc.name for _ in range(2)}
        assert names == {"quick.ini", "keyed.ini"}
        # the stuck fetch is in the source's stats, and in the stats document
        pending = monitor.status.snapshot().pending
        assert [what for what, _ in pending] == [f"fetch {base}/trickle/stuck.ini"]
        document = to_json(EmperorStats(1, "v", (monitor.status.snapshot(),), 0.0, ()))
        assert "trickle/stuck.ini" in document
        # ... until its total deadline ends it, changing nothing
        await wait_for(lambda: not monitor.status.snapshot().pending)
        log = [r.getMessage() for r in caplog.records if r.name == amqp.log.name]
        assert any("source.http_failed" in m and "stuck.ini" in m for m in log)
        assert "stuck.ini" not in monitor.owned
        await amqp_publish(exchange, CONFIG, "after.ini")
        assert (await next_upsert(events)).doc.name == "after.ini"


@pytest.mark.integration
async def test_a_fetch_overtaken_by_a_later_message_is_dropped(
    exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    http = SlowHttp(b"[vassal]\ncommand = old\n")
    async with amqp_with_http(exchange, http) as (monitor, events, base):
        await amqp_publish(exchange, f"{base}/held/app.ini")
        await wait_for(lambda: bool(monitor.status.snapshot().pending))
        await amqp_publish(exchange, CONFIG, "app.ini")
        assert (await next_upsert(events)).doc.text == CONFIG.decode()
        http.release.set()
        await wait_for(lambda: not monitor.status.snapshot().pending)
        await amqp_publish(exchange, CONFIG, "sentinel.ini")
        # nothing from the old fetch came in between
        assert (await next_upsert(events)).doc.name == "sentinel.ini"
    assert any("source.http_superseded" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
async def test_fetches_are_bounded(exchange: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqp, "MAX_FETCHES", 2)
    http = SlowHttp(CONFIG)
    async with amqp_with_http(exchange, http) as (monitor, events, base):
        for i in range(5):
            await amqp_publish(exchange, f"{base}/held/h{i}.ini")
        await wait_for(lambda: len(monitor.status.snapshot().pending) == 2)
        http.release.set()
        names = {(await next_upsert(events)).doc.name for _ in range(5)}
        assert names == {f"h{i}.ini" for i in range(5)}


# -- zmq and stats: loopback unless allowed ----------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["tcp://*:5999", "tcp://0.0.0.0:5999", "tcp://[::]:5999", "tcp://eth0:5999"]
)
def test_a_remote_zmq_endpoint_needs_permission(endpoint: str) -> None:
    with pytest.raises(UsageError, match="--allow-remote-zmq"):
        ZmqMonitor(f"zmq://{endpoint}", MonitorOptions())
    ZmqMonitor(f"zmq://{endpoint}", MonitorOptions(plugins={"zmq": {"allow_remote": True}}))


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5999", "tcp://localhost:5999", "tcp://[::1]:*", "ipc:///x"]
)
def test_local_zmq_endpoints_need_nothing(endpoint: str) -> None:
    ZmqMonitor(f"zmq://{endpoint}", MonitorOptions())


@pytest.mark.parametrize("addr", [":9191", "0.0.0.0:9191", "[::]:9191"])
def test_a_remote_stats_address_needs_permission(addr: str) -> None:
    with pytest.raises(UsageError, match="--allow-remote-stats"):
        api.check_stats_address(addr, allow_remote=False)
    api.check_stats_address(addr, allow_remote=True)
    api.check_stats_address("127.0.0.1:9191", allow_remote=False)
    api.check_stats_address("localhost:9191", allow_remote=False)
    api.check_stats_address("/run/trimperor.stats", allow_remote=False)


@pytest.mark.integration
@pytest.mark.parametrize(
    "args",
    [
        ["zmq://tcp://*:{port}"],
        ["--stats", ":{port}", "{dir}"],
    ],
)
async def test_the_cli_refuses_remote_binds(tmp_path: Path, args: list[str]) -> None:
    port = free_port()
    argv = [a.format(port=port, dir=tmp_path) for a in args]
    emperor = EmperorProcess(argv, tmp_path / "e.log")
    try:
        assert await emperor.wait() == 2
    finally:
        emperor.close()
    assert "--allow-remote-" in emperor.text()
    assert "emperor.ready" not in emperor.text()


@pytest.mark.integration
async def test_allow_remote_zmq_binds_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    emperor = EmperorProcess(
        [f"zmq://tcp://*:{port}", "--allow-remote-zmq", "--stats", f"127.0.0.1:{free_port()}"],
        tmp_path / "e.log",
    )
    try:
        await wait_for(lambda: "emperor.ready" in emperor.text(), timeout=30)
        assert "source.unauthenticated" in emperor.text()
        emperor.signal(2)
        assert await emperor.wait() == 0
    finally:
        emperor.close()


# -- zmq: CURVE ----------------------------------------------------------------------------


@pytest.fixture
def curve(tmp_path: Path) -> dict[str, Path]:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    shutil.copy(client_public, allowed)
    return {
        "server_public": Path(server_public),
        "server_secret": Path(server_secret),
        "client_secret": Path(client_secret),
        "stranger_secret": Path(stranger_secret),
        "allowed": allowed,
    }


def _push(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer whose handshake failed
    return sock


_monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}


def watch(sock: zmq.Socket[bytes]) -> None:
    """Follow *sock*'s connection events (a ZeroMQ socket monitor); before connect()."""
    _monitors[sock] = sock.get_monitor_socket()


async def handshake_failed(sock: zmq.Socket[bytes], event: int) -> None:
    monitor = _monitors.pop(sock)
    seen: list[int] = []

    def failed() -> bool:
        with suppress(zmq.Again):
            while True:
                seen.append(recv_monitor_message(monitor, zmq.NOBLOCK)["event"])
        return event in seen

    try:
        await wait_for(failed)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def _curve_push(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    secret: Path,
    server: Path,
    *,
    watched: bool = False,
) -> zmq.Socket[bytes]:
    sock = _push(ctx, endpoint)
    if watched:
        watch(sock)
    public, secret_key = zmq.auth.load_certificate(secret)
    server_public, _ = zmq.auth.load_certificate(server)
    sock.curve_publickey = public
    assert secret_key is not None
    sock.curve_secretkey = secret_key
    sock.curve_serverkey = server_public
    sock.connect(endpoint)
    return sock


def zmq_options(**settings: str) -> MonitorOptions:
    """Options with the zmq plugin's *settings* (``curve_secret``, ...)."""
    return MonitorOptions(plugins={"zmq": settings})


@pytest.mark.integration
async def test_curve_admits_only_the_allowed_clients(curve: dict[str, Path]) -> None:
    options = zmq_options(
        curve_secret=str(curve["server_secret"]), curve_clients=str(curve["allowed"])
    )
    # CURVE makes a remote endpoint acceptable without --allow-remote-zmq
    ZmqMonitor("zmq://tcp://*:5999", options)
    monitor = ZmqMonitor("zmq://tcp://127.0.0.1:*", options)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with monitor_running(monitor) as events:
            assert monitor.bound is not None
            plain = _push(ctx, monitor.bound)
            watch(plain)
            plain.connect(monitor.bound)
            stranger = _curve_push(
                ctx, monitor.bound, curve["stranger_secret"], curve["server_public"], watched=True
            )
            client = _curve_push(ctx, monitor.bound, curve["client_secret"], curve["server_public"])
            client.send_multipart([b"touch", b"client.ini", CONFIG])
            assert (await next_upsert(events)).doc.name == "client.ini"
            # The others' handshakes fail (seen by their own socket monitors) ...
            await handshake_failed(plain, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            await handshake_failed(stranger, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            # ... so they have no peer to send to, and nothing of theirs arrives.
            for sock, name in ((plain, b"plain.ini"), (stranger, b"stranger.ini")):
                with pytest.raises(zmq.Again):
                    sock.send_multipart([b"touch", name, CONFIG], zmq.NOBLOCK)
            client.send_multipart([b"touch", b"again.ini", CONFIG])
            assert (await next_upsert(events)).doc.name == "again.ini"
            for sock in (plain, stranger, client):
                sock.close(linger=0)
    finally:
        _monitors.clear()
        ctx.destroy(linger=0)  # closes every socket left (on failure), then terminates
    assert monitor.owned == {"client.ini", "again.ini"}


def test_curve_options_are_checked(curve: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs both"):
        ZmqMonitor("zmq://tcp://127.0.0.1:*", zmq_options(curve_secret=str(curve["server_secret"])))
    with pytest.raises(UsageError, match="no secret key"):
        ZmqMonitor(
            "zmq://tcp://127.0.0.1:*",
            zmq_options(
                curve_secret=str(curve["server_public"]), curve_clients=str(curve["allowed"])
            ),
        )
    with pytest.raises(UsageError, match="cannot load"):
        ZmqMonitor(
            "zmq://tcp://127.0.0.1:*",
            zmq_options(
                curve_secret=str(tmp_path / "missing"), curve_clients=str(curve["allowed"])
            ),
        )


# -- zmq: floods -----------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_flood_of_bad_messages_is_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    monitor = ZmqMonitor("zmq://tcp://127.0.0.1:*", MonitorOptions())
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    flood = 2000
    try:
        async with monitor_running(monitor) as events:
            assert monitor.bound is not None
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(monitor.bound)
            for i in range(flood):
                push.send_multipart([b"touch", b"../x%d.ini" % i, CONFIG])
            for i in range(flood):
                push.send_multipart([b"destroy", b"never%d.ini" % i])
            push.send_multipart([b"touch", b"done.ini", CONFIG])
            assert (await next_upsert(events)).doc.name == "done.ini"
            push.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    lines = [r.getMessage() for r in caplog.records if r.name == zeromq.log.name]
    for event in ("source.bad_message", "source.remove_unknown"):
        assert sum(m.startswith(event + " ") for m in lines) == zeromq.WARN_BURST
        summaries = [m for m in lines if m.startswith(event + "_suppressed")]
        counts = [int(re.search(r"count=(\d+)", m).group(1)) for m in summaries]  # type: ignore[union-attr]
        assert sum(counts) == flood - zeromq.WARN_BURST
    assert len(lines) < 100


# -- the stats server: many idle clients -------------------------------------------------------


def _big_stats() -> EmperorStats:
    """A status document of about 1 MB: far more than a socket buffer holds."""
    vassals = tuple(
        VassalStats(
            name=f"vassal-{i:05d}.ini",
            source="dir:///srv/vassals",
            kind="native",
            state="running",
            pid=1000 + i,
            started_at=0.0,
            restarts=0,
            backoff_attempt=0,
            next_start=None,
            last_exit_code=None,
            last_exit_signal=None,
            config_version="1",
        )
        for i in range(1000)
    )
    return EmperorStats(
        1, "test", (SourceStats("dir:///srv/vassals", "watching", 1000),), 0, vassals
    )


def established(port: int) -> int:
    """Server-side TCP connections of 127.0.0.1:*port* still established (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == "01")


@pytest.mark.integration
async def test_a_slow_stats_reader_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "SEND_TIMEOUT", 0.5)
    stats = _big_stats()
    async with trio.open_nursery() as nursery:
        shown = await nursery.start(api.serve_stats, "127.0.0.1:0", lambda: stats)
        port = int(shown.rpartition(":")[2])
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        try:
            await sock.connect(("127.0.0.1", port))
            await wait_for(lambda: established(port) == 1)
            await wait_for(lambda: established(port) == 0)  # closed by the server
        finally:
            sock.close()
        nursery.cancel_scope.cancel()


async def _read_until_closed(port: int) -> bytes:
    """Everything the server on 127.0.0.1:*port* sends on one connection."""
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            data = bytearray()
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
    return bytes(data)


@pytest.mark.integration
async def test_a_document_slower_to_make_than_the_send_timeout_is_still_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The send timeout is the client's time to read, not the emperor's time to make the
    document (the first one of 10,000 vassals takes about a second on a busy host)."""
    monkeypatch.setattr(api, "SEND_TIMEOUT", 0.2)
    stats = _big_stats()
    wanted = to_json(stats).encode()
    made = trio.Event()

    async def slow_document() -> bytes:
        await trio.sleep(0.5)  # longer than SEND_TIMEOUT: the build being measured
        made.set()
        return wanted

    async with trio.open_nursery() as nursery:
        shown = await nursery.start(
            partial(api.serve_stats, document=slow_document), "127.0.0.1:0", lambda: stats
        )
        port = int(shown.rpartition(":")[2])
        data = await _read_until_closed(port)
        assert made.is_set()
        assert data == wanted
        nursery.cancel_scope.cancel()


@pytest.mark.integration
async def test_idle_stats_clients_do_not_stop_an_answer() -> None:
    stats = _big_stats()
    size = len(to_json(stats).encode())
    assert size > 500_000
    async with trio.open_nursery() as nursery:
        shown = await nursery.start(api.serve_stats, "127.0.0.1:0", lambda: stats)
        port = int(shown.rpartition(":")[2])
        idle: list[trio.socket.SocketType] = []
        try:
            for _ in range(500):
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                await sock.connect(("127.0.0.1", port))
                idle.append(sock)  # connected, never reads
            # the server keeps at most MAX_CLIENTS of them; the oldest were closed
            await wait_for(lambda: established(port) <= api.MAX_CLIENTS, timeout=30)
            data = await _read_until_closed(port)
            assert len(data) == size
        finally:
            for sock in idle:
                sock.close()
        nursery.cancel_scope.cancel()


# -- files: odd names and odd files ------------------------------------------------------------


@asynccontextmanager
async def files_running(
    monitor: DirMonitor,
) -> AsyncIterator[trio.MemoryReceiveChannel[SourceEvent]]:
    """Run *monitor*; afterwards wait until its worker threads closed their descriptors."""
    before = set(os.listdir("/proc/self/fd"))
    async with monitor_running(monitor) as events:
        yield events
    with trio.fail_after(10):
        while set(os.listdir("/proc/self/fd")) - before:
            await trio.sleep(0.01)


@pytest.mark.integration
async def test_a_non_utf8_file_name_does_not_stop_the_watcher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # freq 600: only inotify can report the second file within the test's bound
    monitor = DirMonitor(str(tmp_path), MonitorOptions(freq=600))
    async with files_running(monitor) as events:
        assert (await next_snapshot(events)).docs == ()
        bad = os.path.join(os.fsencode(tmp_path), b"\xff.ini")
        fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        # the undecodable name is reported by inotify and is a candidate like any other
        snap = await next_snapshot(events)
        assert [d.name for d in snap.docs] == [os.fsdecode(b"\xff.ini")]
        (tmp_path / "good.ini").write_text("[vassal]\ncommand = sleep 1\n")
        with trio.fail_after(30):
            while True:
                snap = await next_snapshot(events)
                if "good.ini" in {d.name for d in snap.docs}:
                    break
    lines = [r.getMessage() for r in caplog.records if "watch" in r.getMessage()]
    assert not any("source.watch_failed" in m for m in lines), lines
    assert not any("source.watch_restarted" in m for m in lines), lines


@pytest.mark.integration
async def test_odd_candidates_are_skipped_with_one_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / "fifo.ini")
    (tmp_path / "dir.ini").mkdir()
    (tmp_path / "loop.ini").symlink_to(tmp_path / "loop.ini")
    (tmp_path / "good.ini").write_text("[vassal]\ncommand = sleep 1\n")
    monitor = DirMonitor(str(tmp_path), MonitorOptions(freq=0.05))
    async with files_running(monitor) as events:
        snap = await next_snapshot(events)
        assert [d.name for d in snap.docs] == ["good.ini"]
        # several rescans later, still one line each
        for _ in range(5):
            (tmp_path / "good.ini").write_text("[vassal]\ncommand = sleep 2\n")
            await next_snapshot(events)
    skipped = [r.getMessage() for r in caplog.records if "source.skipped" in r.getMessage()]
    assert len(skipped) == 3, skipped
    assert any("fifo.ini reason=a FIFO" in m for m in skipped)
    assert any("dir.ini reason=a directory" in m for m in skipped)
    assert any("loop.ini reason=a symbolic link loop" in m for m in skipped)


@pytest.mark.integration
async def test_control_characters_in_names_are_escaped_in_the_log(tmp_path: Path) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    (vassals / "evil\nFAKE forged line.ini").write_text("[vassal]\ncommand = sleep 600\n")
    (vassals / "bad\r\x1b[2Jname.ini").write_text("[vassal]\n")
    emperor = EmperorProcess([str(vassals)], tmp_path / "e.log")
    try:
        await wait_for(lambda: "vassal.spawned" in emperor.text(), timeout=30)
        await wait_for(lambda: "needs a command" in emperor.text())
        emperor.signal(2)
        assert await emperor.wait() == 0
    finally:
        emperor.close()
    raw = (tmp_path / "e.log").read_bytes()
    assert b"evil\\nFAKE forged line.ini" in raw
    assert b"bad\\r\\x1b[2Jname.ini" in raw
    assert not any(line.startswith(b"FAKE") for line in raw.split(b"\n"))
    assert b"\x1b" not in raw
    assert b"\r" not in raw


def test_the_escaping_filter() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, "name=%s n=%d", ("a\nb\udcff\t", 3), None)
    assert EscapingFilter().filter(record)
    assert record.getMessage() == "name=a\\nb\\udcff\t n=3"


# -- the pidfile -----------------------------------------------------------------------------


@pytest.mark.integration
def test_an_unwritable_pidfile_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    pidfile = blocker / "emperor.pid"  # under a regular file: ENOTDIR
    assert main([str(tmp_path), "--pidfile", str(pidfile)]) == 1
    assert "cannot write pidfile" in caplog.text
    # a full disk (RLIMIT_FSIZE 0 makes every write fail, as ENOSPC would)
    full = tmp_path / "full.pid"

    def no_writes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    proc = subprocess.run(
        [PYTHON, "-m", "trimperor", str(tmp_path / "vassals"), "--pidfile", str(full)],
        preexec_fn=no_writes,
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert b"cannot write pidfile" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    """A directory holding an empty ``emperor.pid``, where not even root may create a file."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "emperor.pid").write_text("")
    subprocess.run(["chattr", "+i", str(path)], check=True)  # EPERM on create, for root too
    yield path
    subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.integration
async def test_a_pidfile_made_for_the_emperor_in_a_locked_directory_is_written_in_place(
    tmp_path: Path, locked: Path
) -> None:
    pidfile = locked / "emperor.pid"
    missing = EmperorProcess(
        [str(tmp_path), "--pidfile", str(locked / "other.pid")], tmp_path / "m.log"
    )
    try:
        assert await missing.wait() == 1
    finally:
        missing.close()
    assert "cannot write pidfile" in missing.text()
    emperor = EmperorProcess([str(tmp_path), "--pidfile", str(pidfile)], tmp_path / "e.log")
    try:
        await wait_for(lambda: pidfile.read_text() == f"{emperor.proc.pid}\n", timeout=30)
        emperor.signal(2)
        assert await emperor.wait() == 0
    finally:
        emperor.close()
    assert sorted(os.listdir(locked)) == ["emperor.pid"]


# -- pg: ts --------------------------------------------------------------------------------------


def test_pg_ts_beyond_a_float_is_refused_like_infinity() -> None:
    options = MonitorOptions()
    for bad in (Decimal("1e400"), "1e400", "-1e400", math.inf):
        with pytest.raises(BadRow, match="ts is not a finite number"):
            row_document(("a.ini", "x", bad), "pg://", options)
    assert row_document(("a.ini", "x", Decimal("1e300")), "pg://", options).version == "1E+300"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("ts_type", "huge", "infinite"),
    [("numeric", "1e400", "Infinity"), ("text", "1e400", "-1e400")],
)
async def test_pg_rows_with_ts_1e400_or_infinity_are_refused(
    caplog: pytest.LogCaptureFixture, ts_type: str, huge: str, infinite: str
) -> None:
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    table = f"vassals_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        ident = sql.Identifier(table)
        create = "CREATE TABLE {} (name text, config text, ts " + ts_type + ")"
        conn.execute(sql.SQL(create).format(ident))
        try:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} VALUES ('huge.ini', 'x', %s), "
                    "('inf.ini', 'x', %s), ('ok.ini', 'x', '1700000000.5')"
                ).format(ident),
                (huge, infinite),
            )
            uri = f"pg://{dsn};SELECT name, config, ts FROM {table} ORDER BY name"
            monitor = PostgresMonitor(uri, MonitorOptions(freq=60))
            async with monitor_running(monitor) as events:
                snap = await next_snapshot(events)
            assert [d.name for d in snap.docs] == ["ok.ini"]
        finally:
            conn.execute(sql.SQL("DROP TABLE {}").format(ident))
    refused = [
        r.getMessage() for r in caplog.records if "ts is not a finite number" in r.getMessage()
    ]
    assert any("huge.ini" in m for m in refused), refused
    assert any("inf.ini" in m for m in refused), refused
    assert all(len(m) < 400 for m in refused)  # not a 400-digit number
