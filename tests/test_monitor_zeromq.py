"""The zmq:// source: commands pushed to a PULL socket, in process and end to end."""

from __future__ import annotations

import importlib
import random
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from tests.helpers import (
    EmperorProcess,
    free_port,
    monitor_running,
    new_pid,
    next_event,
    next_upsert,
    pid_alive,
    pidfile_vassal,
    wait_for,
)
from trimperor.abc import MonitorOptions
from trimperor.core.errors import MissingExtraError, SourceError, UsageError
from trimperor.core.model import Remove, SourceEvent, Upsert
from trimperor.monitors import zeromq
from trimperor.monitors.zeromq import BadMessage, Destroy, Touch, ZmqMonitor, parse_command

pytestmark = pytest.mark.integration

CONFIG = b"[vassal]\ncommand = sleep 1000\n"
ANY_PORT = "zmq://tcp://127.0.0.1:*"


class Pushers:
    """PUSH sockets on the test's own context, all closed (linger 0) at the end."""

    def __init__(self) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socks: list[zmq.Socket[bytes]] = []

    def connect(self, endpoint: str | ZmqMonitor) -> zmq.Socket[bytes]:
        if isinstance(endpoint, ZmqMonitor):
            assert endpoint.bound is not None
            endpoint = endpoint.bound
        sock = self._ctx.socket(zmq.PUSH)
        self._socks.append(sock)
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        for sock in self._socks:
            sock.close(linger=0)
        self._ctx.term()


@pytest.fixture
def pushers() -> Iterator[Pushers]:
    p = Pushers()
    yield p
    p.close()


def running(
    monitor: ZmqMonitor,
) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[SourceEvent]]:
    return monitor_running(monitor, capacity=100)


# -- parsing (no sockets) -------------------------------------------------------------


def test_parse_command_treats_empty_parts_as_absent() -> None:
    assert parse_command([b"touch", b"a.ini"]) == Touch("a.ini")
    assert parse_command([b"touch", b"a.ini", b"", b"", b"", b""]) == Touch("a.ini")
    assert parse_command([b"touch", b"a.ini", b"cfg", b"1000", b"1001"]) == Touch(
        "a.ini", "cfg", 1000, 1001, None
    )
    assert parse_command([b"touch", b"a.ini", b"", b"", b"", b"/s.sock"]) == Touch(
        "a.ini", socket="/s.sock"
    )
    assert parse_command([b"destroy", b"a.ini", b"ignored"]) == Destroy("a.ini")


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"touch"], "1 parts"),
        ([b"touch", b"a.ini", b"c", b"1", b"2", b"s", b"extra"], "7 parts"),
        ([b"touch", b"a.ini", b"\xff"], "not UTF-8"),
        ([b"touch", b"a.ini", b"c", b"root"], "uid 'root'"),
        ([b"touch", b"a.ini", b"c", b"1", b"-1"], "gid '-1'"),
        ([b"touch", b"a.ini", b"c", b" 1"], "uid ' 1'"),
        ([b"touch", b""], "empty name"),
        ([b"reload", b"a.ini"], "unknown command 'reload'"),
    ],
)
def test_parse_command_rejects(frames: list[bytes], reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        parse_command(frames)


@pytest.mark.parametrize("uri", ["zmq://", "zmq://nonsense", "zmq://tcp://", "zmq:tcp://h:1"])
def test_malformed_uri_is_a_usage_error(uri: str) -> None:
    with pytest.raises(UsageError):
        ZmqMonitor(uri, MonitorOptions())


# -- the monitor on a real socket -------------------------------------------------------


async def test_touch_retouch_destroy(pushers: Pushers) -> None:
    monitor = ZmqMonitor(ANY_PORT, MonitorOptions())
    async with running(monitor) as events:
        assert monitor.status.state == "connected"
        push = pushers.connect(monitor)
        push.send_multipart([b"touch", b"app.ini", CONFIG])
        first = await next_upsert(events)
        assert first.doc.name == "app.ini"
        assert first.doc.text == CONFIG.decode()
        assert first.doc.source == monitor.uri == ANY_PORT
        assert first.doc.path is None
        assert (first.doc.uid, first.doc.gid, first.doc.socket) == (None, None, None)

        # Two touches in the same second are two reloads (uWSGI drops the second).
        push.send_multipart([b"touch", b"app.ini", CONFIG])
        second = await next_upsert(events)
        assert second.doc.version != first.doc.version
        assert monitor.owned == {"app.ini"}

        push.send_multipart([b"destroy", b"app.ini"])
        assert await next_event(events) == Remove(monitor.uri, "app.ini")
        assert monitor.owned == set()


async def test_optional_parts(pushers: Pushers) -> None:
    monitor = ZmqMonitor(ANY_PORT, MonitorOptions())
    async with running(monitor) as events:
        push = pushers.connect(monitor)
        # 5 parts: uid and gid, no socket (uWSGI misreads this form).
        push.send_multipart([b"touch", b"a.ini", CONFIG, b"1000", b"1001"])
        push.send_multipart([b"touch", b"b.ini", CONFIG, b"", b"", b"/run/b.sock"])
        push.send_multipart([b"touch", b"c.ini", CONFIG, b"", b"", b""])
        a, b, c = [(await next_upsert(events)).doc for _ in range(3)]
    assert (a.name, a.uid, a.gid, a.socket) == ("a.ini", 1000, 1001, None)
    assert (b.name, b.uid, b.gid, b.socket) == ("b.ini", None, None, "/run/b.sock")
    assert (c.name, c.uid, c.gid, c.socket) == ("c.ini", None, None, None)


async def test_touch_without_config_reads_a_file_in_the_working_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    pushers: Pushers,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "static.ini").write_bytes(CONFIG)
    monitor = ZmqMonitor(ANY_PORT, MonitorOptions())
    async with running(monitor) as events:
        push = pushers.connect(monitor)
        push.send_multipart([b"touch", b"missing.ini"])
        push.send_multipart([b"touch", b"static.ini"])
        doc = (await next_upsert(events)).doc
    assert doc.name == "static.ini"
    assert doc.text == CONFIG.decode()
    assert doc.path == str(tmp_path / "static.ini")
    assert "no file" in caplog.text
    assert str(tmp_path / "missing.ini") in caplog.text


async def test_malformed_messages_are_logged_and_ignored(
    caplog: pytest.LogCaptureFixture, pushers: Pushers
) -> None:
    bad = [
        [b"touch"],
        [b"touch", b"a.ini", CONFIG, b"1", b"2", b"/s", b"seventh"],
        [b"touch", b"../x.ini", CONFIG],
        [b"touch", b"x.txt", CONFIG],
        [b"touch", b".ini/..", CONFIG],
        [b"touch", b"a" * 300 + b".ini", CONFIG],
        [b"touch", b"a.ini", b"[vassal]\ncommand = " + b"x" * 200 + b"\n"],  # over the limit
        [b"touch", b"a.ini", b"\xff\xfe junk"],
        [b"\x00\xff", b"a.ini"],
        [b"touch", b"a.ini", CONFIG, b"root"],
        [b"touch", b"a.ini", CONFIG, b"1", b"x"],
        [b"reload", b"a.ini"],
        [b"destroy", b"never-added.ini"],
        [b""],
    ]
    rng = random.Random(4)
    junk = [
        [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 9))]
        for _ in range(200)
    ]
    monitor = ZmqMonitor(ANY_PORT, MonitorOptions(max_config_size=100))
    async with running(monitor) as events:
        push = pushers.connect(monitor)
        for frames in bad:
            push.send_multipart(frames)
        push.send_multipart([b"touch", b"good.ini", CONFIG])
        assert (await next_upsert(events)).doc.name == "good.ini"
        for frames in junk:
            push.send_multipart(frames)
        push.send_multipart([b"touch", b"after-junk.ini", CONFIG])
        # Random junk is never a valid command (no valid name), so nothing in between.
        assert (await next_upsert(events)).doc.name == "after-junk.ini"
    messages = [r.getMessage() for r in caplog.records if r.name == "trimperor.monitors.zeromq"]
    # The first WARN_BURST are logged one by one, the rest summed up when the monitor stops.
    one_by_one = sum("source.bad_message uri" in m for m in messages)
    summed = [re.search(r"bad_message_suppressed .* count=(\d+)", m) for m in messages]
    suppressed = sum(int(m.group(1)) for m in summed if m is not None)
    assert one_by_one == zeromq.WARN_BURST
    assert one_by_one + suppressed == len(bad) - 1 + len(junk)
    assert sum("source.remove_unknown" in m for m in messages) == 1
    assert any("over --max-config-size" in m for m in messages)
    assert any("7 parts" in m for m in messages)


async def test_a_frame_over_the_frame_limit_drops_only_that_message(pushers: Pushers) -> None:
    monitor = ZmqMonitor(ANY_PORT, MonitorOptions(max_config_size=100))
    async with running(monitor) as events:
        push = pushers.connect(monitor)
        push.send_multipart([b"touch", b"huge.ini", b"#" * (2 << 20)])
        # libzmq drops the connection; the PUSH socket reconnects by itself.
        with trio.fail_after(30):
            while True:  # paces the retries: sends again until the reconnection is made
                push.send_multipart([b"touch", b"after.ini", CONFIG])
                with trio.move_on_after(0.2):
                    event = await events.receive()
                    break
        assert isinstance(event, Upsert)
        assert event.doc.name == "after.ini"


async def test_ipc_endpoint(tmp_path: Path, pushers: Pushers) -> None:
    uri = f"zmq://ipc://{tmp_path}/emperor.sock"
    monitor = ZmqMonitor(uri, MonitorOptions())
    async with running(monitor) as events:
        assert (tmp_path / "emperor.sock").is_socket()
        pushers.connect(monitor).send_multipart([b"touch", b"a.ini", CONFIG])
        assert (await next_upsert(events)).doc.source == uri


async def test_endpoint_in_use_is_a_source_error_before_started() -> None:
    first = ZmqMonitor(ANY_PORT, MonitorOptions())
    async with running(first):
        assert first.bound is not None
        second = ZmqMonitor(f"zmq://{first.bound}", MonitorOptions())
        send, recv = trio.open_memory_channel[SourceEvent](1)
        async with trio.open_nursery() as nursery:
            with recv, pytest.raises(SourceError, match="cannot bind"):
                await nursery.start(second.run, send)


async def test_cancellation_is_prompt_while_waiting(pushers: Pushers) -> None:
    monitor = ZmqMonitor(ANY_PORT, MonitorOptions())
    with trio.fail_after(30):  # nothing is sent: without cancellation it would wait forever
        async with running(monitor):
            await trio.testing.wait_all_tasks_blocked()  # the monitor waits for a message


def test_a_missing_pyzmq_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zmq", None)
    monkeypatch.delitem(sys.modules, "trimperor.monitors.zeromq")
    with pytest.raises(MissingExtraError, match=r"pip install 'trimperor\[zmq\]'"):
        importlib.import_module("trimperor.monitors.zeromq")


# -- end to end: the real emperor --------------------------------------------------------


async def test_emperor_exits_1_when_the_endpoint_is_taken(tmp_path: Path, pushers: Pushers) -> None:
    taken = ZmqMonitor(ANY_PORT, MonitorOptions())
    async with running(taken):
        emperor = EmperorProcess([f"zmq://{taken.bound}"], tmp_path / "emperor.log")
        try:
            assert await emperor.wait() == 1
            assert "cannot bind" in emperor.text()
        finally:
            emperor.close()


async def test_emperor_lifecycle_through_zmq(tmp_path: Path, pushers: Pushers) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    emperor = EmperorProcess(
        [f"zmq://{endpoint}", "--freq", "60", "--throttle", "50"], tmp_path / "emperor.log"
    )
    try:
        await wait_for(lambda: "emperor.ready" in emperor.text())
        push = pushers.connect(endpoint)
        config = pidfile_vassal(tmp_path, "app").encode()
        pidfile = tmp_path / "app.pid"

        push.send_multipart([b"touch", b"app.ini", config])
        first = await new_pid(pidfile)

        # Garbage in between: logged, the emperor and the vassal carry on.
        for frames in ([b"touch"], [b"\xff", b"\xfe"], [b"touch", b"../x.ini", config]):
            push.send_multipart(frames)
        push.send_multipart([b"destroy", b"unknown.ini"])

        push.send_multipart([b"touch", b"app.ini", config])
        second = await new_pid(pidfile, first)
        await wait_for(lambda: not pid_alive(first))

        push.send_multipart([b"destroy", b"app.ini"])
        await wait_for(lambda: not pid_alive(second))
        assert emperor.proc.poll() is None
        log = emperor.text()
        assert log.count("source.bad_message") == 3
        assert "source.remove_unknown" in log

        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()
