"""The amqp:// source against the RabbitMQ on 127.0.0.1:5672 (guest/guest).

Every test uses its own exchange (``--amqp-exchange``), deleted afterwards,
so tests and other emperors on the same broker do not see each other.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    AMQP_BROKER,
    EmperorProcess,
    amqp_connection,
    amqp_publish,
    http_request_path,
    monitor_running,
    new_pid,
    next_event,
    next_upsert,
    pid_alive,
    pidfile_vassal,
    wait_for,
)
from tests.proxy import TcpProxy
from trimperor.abc import MonitorOptions
from trimperor.core.errors import MissingExtraError, UsageError
from trimperor.core.model import Remove, SourceEvent
from trimperor.monitors import amqp
from trimperor.monitors.amqp import AmqpAddress, AmqpMonitor, parse_uri

pytestmark = pytest.mark.integration

BROKER = AMQP_BROKER
CONFIG = b"[vassal]\ncommand = sleep 1000\n"


@asynccontextmanager
async def running(
    monitor: AmqpMonitor, capacity: int = 100
) -> AsyncIterator[trio.MemoryReceiveChannel[SourceEvent]]:
    """Run *monitor* until the block ends; yields its events once it is subscribed."""
    async with monitor_running(monitor, capacity) as recv:
        await wait_for(lambda: monitor.status.state == "connected")
        yield recv


def monitor_on(
    exchange: str,
    uri: str = "amqp://127.0.0.1",
    *,
    freq: float = 3.0,
    max_config_size: int = 64 * 1024,
) -> AmqpMonitor:
    options = MonitorOptions(
        freq=freq, max_config_size=max_config_size, plugins={"amqp": {"exchange": exchange}}
    )
    return AmqpMonitor(uri, options)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trimperor.monitors.amqp"]


# -- the URI (no broker) ------------------------------------------------------------------


def test_parse_uri() -> None:
    assert parse_uri("amqp://h") == AmqpAddress("h")
    assert parse_uri("amqp://h:5673/") == AmqpAddress("h", 5673)
    assert parse_uri("amqp://u:p%40ss@h/%2F") == AmqpAddress("h", 5672, "u", "p@ss", "/")
    assert parse_uri("amqp://u@h/prod") == AmqpAddress("h", 5672, "u", "guest", "prod")


@pytest.mark.parametrize(
    "uri", ["amqp://", "amqp://h:port", "amqp://h:99999", "amqp://h/?heartbeat=5", "amqps://h"]
)
def test_malformed_uri_is_a_usage_error(uri: str) -> None:
    with pytest.raises(UsageError):
        AmqpMonitor(uri, MonitorOptions())


def test_a_missing_pika_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pika", None)
    monkeypatch.delitem(sys.modules, "trimperor.monitors.amqp")
    with pytest.raises(MissingExtraError, match=r"pip install 'trimperor\[amqp\]'"):
        importlib.import_module("trimperor.monitors.amqp")


def test_password_is_redacted() -> None:
    monitor = AmqpMonitor("amqp://admin:s3cret@h/", MonitorOptions())
    assert monitor.uri == "amqp://admin:***@h/"
    assert monitor.status.snapshot().uri == monitor.uri


# -- routing key = name, body = configuration -------------------------------------------------


async def test_publish_republish_empty_body(exchange: str) -> None:
    monitor = monitor_on(exchange)
    async with running(monitor) as events:
        await amqp_publish(exchange, CONFIG, "app.ini")
        first = await next_upsert(events)
        assert (first.doc.name, first.doc.text, first.doc.path) == (
            "app.ini",
            CONFIG.decode(),
            None,
        )
        assert first.doc.source == monitor.uri == "amqp://127.0.0.1"

        await amqp_publish(exchange, CONFIG, "app.ini")  # the same message again: a reload
        second = await next_upsert(events)
        assert second.doc.version != first.doc.version

        await amqp_publish(exchange, b"", "app.ini")
        assert await next_event(events) == Remove(monitor.uri, "app.ini")
        assert monitor.owned == {}


async def test_two_emperors_on_one_exchange_both_act(exchange: str) -> None:
    one, two = monitor_on(exchange), monitor_on(exchange)
    async with running(one) as events_one, running(two) as events_two:
        await amqp_publish(exchange, CONFIG, "both.ini")
        assert (await next_upsert(events_one)).doc.name == "both.ini"
        assert (await next_upsert(events_two)).doc.name == "both.ini"


async def test_malformed_messages_are_logged_and_ignored(
    exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad: list[tuple[str, bytes]] = [
        ("../x.ini", CONFIG),
        ("x.txt", CONFIG),
        ("big.ini", b"[vassal]\ncommand = " + b"x" * 200 + b"\n"),  # over max_config_size
        ("bin.ini", b"\xff\xfe\x00junk"),
        ("", b"x.ini"),  # relative path
        ("", b"not a path at all"),
        ("", b"\x89PNG\r\n\x1a\n\x00\x00"),
        ("", b"/etc/hostname"),  # a file, but not a configuration name
        ("", b"http://127.0.0.1:9/"),  # no name in the URL
        ("", b""),
        ("", b"/" + b"a" * 5000),
    ]
    monitor = monitor_on(exchange, max_config_size=100)
    async with running(monitor) as events:
        for key, body in bad:
            await amqp_publish(exchange, body, key)
        await amqp_publish(exchange, CONFIG, "good.ini")
        assert (await next_upsert(events)).doc.name == "good.ini"
    assert sum("source.bad_message" in m for m in messages(caplog)) == len(bad)
    assert monitor.status.state != "retrying"


# -- no routing key: a path ---------------------------------------------------------------


async def test_path_bodies(exchange: str, tmp_path: Path) -> None:
    app = tmp_path / "app.ini"
    app.write_bytes(CONFIG)
    monitor = monitor_on(exchange, freq=0.05)
    async with running(monitor) as events:
        await amqp_publish(exchange, f"{app}\n")
        doc = (await next_upsert(events)).doc
        assert (doc.name, doc.path, doc.text) == ("app.ini", str(app), CONFIG.decode())

        await amqp_publish(exchange, str(app))
        assert (await next_upsert(events)).doc.version != doc.version

        # A message naming a missing file removes.
        app.unlink()
        await amqp_publish(exchange, str(app))
        assert await next_event(events) == Remove(monitor.uri, "app.ini")

        # So does deleting the file later, without a message.
        app.write_bytes(CONFIG)
        await amqp_publish(exchange, str(app))
        await next_upsert(events)
        app.unlink()
        assert await next_event(events) == Remove(monitor.uri, "app.ini")

        # Not a regular file: missing.
        (tmp_path / "dir.ini").mkdir()
        await amqp_publish(exchange, str(tmp_path / "dir.ini"))
        await amqp_publish(exchange, str(tmp_path / "never.ini"))
        await amqp_publish(exchange, CONFIG, "sentinel.ini")
        assert (await next_upsert(events)).doc.name == "sentinel.ini"


async def test_a_file_over_the_size_limit_is_ignored(
    exchange: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = tmp_path / "big.ini"
    big.write_bytes(CONFIG + b"#" * 200)
    monitor = monitor_on(exchange, max_config_size=100)
    async with running(monitor) as events:
        await amqp_publish(exchange, str(big))
        await amqp_publish(exchange, CONFIG, "sentinel.ini")
        assert (await next_upsert(events)).doc.name == "sentinel.ini"
    assert any("over --max-config-size" in m for m in messages(caplog))


# -- no routing key: a URL -------------------------------------------------------------------


class TinyHttp:
    """Just enough HTTP/1.1: ``pages[path] = (status, body)``; unknown paths are 404."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        self.hang = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            path = await http_request_path(stream)
            if path is None:
                return
            if path == "/hang/slow.ini":
                await self.hang.wait()
                return
            status, body = self.pages.get(path, (404, b"not found"))
            head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            if status == 302:
                head += f"Location: {body.decode()}\r\n"
            await stream.send_all(head.encode() + b"\r\n" + body)


async def test_url_bodies(
    exchange: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(amqp, "HTTP_TIMEOUT", 0.2)
    http = TinyHttp()
    http.pages["/confs/web.ini"] = (200, CONFIG)
    http.pages["/confs/big.ini"] = (200, CONFIG + b"#" * 200)
    http.pages["/moved/web.ini"] = (302, b"/confs/web.ini")
    monitor = monitor_on(exchange, max_config_size=100)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, http.handle, 0, host="127.0.0.1"))
        base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with running(monitor) as events:
            await amqp_publish(exchange, f"{base}/confs/web.ini")
            doc = (await next_upsert(events)).doc
            assert (doc.name, doc.text, doc.path) == ("web.ini", CONFIG.decode(), None)

            await amqp_publish(exchange, f"{base}/moved/web.ini")  # redirects are followed
            assert (await next_upsert(events)).doc.version != doc.version

            # Timeouts and oversized answers change nothing; unknown names are not removed.
            await amqp_publish(exchange, f"{base}/hang/slow.ini")
            await amqp_publish(exchange, f"{base}/confs/big.ini")
            await amqp_publish(exchange, f"{base}/confs/other.ini")
            await amqp_publish(exchange, CONFIG, "sentinel.ini")
            assert (await next_upsert(events)).doc.name == "sentinel.ini"

            del http.pages["/confs/web.ini"]
            await amqp_publish(exchange, f"{base}/confs/web.ini")
            assert await next_event(events) == Remove(monitor.uri, "web.ini")
            # Fetches run concurrently: the hanging one ends at its deadline.
            await wait_for(
                lambda: any("source.http_failed" in m and "slow.ini" in m for m in messages(caplog))
            )
            http.hang.set()
        nursery.cancel_scope.cancel()
    log = messages(caplog)
    assert any("source.http_failed" in m and "slow.ini" in m for m in log)
    assert any("over --max-config-size" in m for m in log)
    assert any("source.http_status" in m and "status=404" in m for m in log)


# -- the broker: declaration, outages, shutdown --------------------------------------------


async def test_an_existing_exchange_with_other_flags_is_used(
    exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def declare_durable() -> None:
        connection = amqp_connection()
        try:
            connection.channel().exchange_declare(exchange, "fanout", durable=True)
        finally:
            connection.close()

    await trio.to_thread.run_sync(declare_durable)
    monitor = monitor_on(exchange)
    async with running(monitor) as events:
        await amqp_publish(exchange, CONFIG, "app.ini")
        assert (await next_upsert(events)).doc.name == "app.ini"
    assert any("source.exchange_exists" in m for m in messages(caplog))


async def test_outage_stops_nothing_and_the_monitor_reconnects(
    exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = TcpProxy(*BROKER)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        monitor = monitor_on(exchange, f"amqp://guest:guest@127.0.0.1:{port}/")
        async with running(monitor) as events:
            await amqp_publish(exchange, CONFIG, "app.ini")
            await next_upsert(events)

            proxy.cut()
            await wait_for(lambda: monitor.status.state == "retrying")
            assert monitor.status.snapshot().last_error
            # Published while nobody listens: gone (no replay), and not a removal.
            await amqp_publish(exchange, b"", "app.ini")
            proxy.restore()
            await wait_for(lambda: monitor.status.state == "connected")

            await amqp_publish(exchange, CONFIG, "after.ini")
            assert (await next_upsert(events)).doc.name == "after.ini"
            assert set(monitor.owned) == {"app.ini", "after.ini"}
        nursery.cancel_scope.cancel()
    assert "guest:guest" not in caplog.text
    assert any("source.subscribed" in m for m in messages(caplog))


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("amqp://guest:wrong@127.0.0.1/", "ProbableAuthenticationError"),
        ("amqp://127.0.0.1:1/", "AMQPConnectionError"),
    ],
)
async def test_an_unreachable_broker_is_retried_not_fatal(
    uri: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = AmqpMonitor(uri, MonitorOptions())
    send, recv = trio.open_memory_channel[SourceEvent](1)
    with trio.fail_after(60):  # a bound, not a measurement
        async with trio.open_nursery() as nursery, recv:
            await nursery.start(monitor.run, send)
            await wait_for(lambda: monitor.status.state == "retrying")
            nursery.cancel_scope.cancel()
    assert "wrong" not in caplog.text
    assert error in (monitor.status.last_error or "")


async def test_shutdown_while_a_message_waits_for_the_emperor(exchange: str) -> None:
    """The emperor's inbox is full: the handler blocks, cancellation still ends it."""
    monitor = monitor_on(exchange)
    with trio.fail_after(60):  # a bound: ending must not hang
        async with running(monitor, capacity=0) as recv:
            await amqp_publish(exchange, CONFIG, "app.ini")
            # the delivery has reached the handler, which now waits to hand it over
            await wait_for(lambda: recv.statistics().tasks_waiting_send == 1)


# -- end to end: the real emperor ------------------------------------------------------------


async def test_emperor_lifecycle_through_amqp_with_an_outage(exchange: str, tmp_path: Path) -> None:
    proxy = TcpProxy(*BROKER)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        emperor = EmperorProcess(
            [f"amqp://127.0.0.1:{port}", "--amqp-exchange", exchange, "--throttle", "50"],
            tmp_path / "emperor.log",
        )
        try:
            await wait_for(lambda: "source.subscribed" in emperor.text())
            config = pidfile_vassal(tmp_path, "app")
            pidfile = tmp_path / "app.pid"

            await amqp_publish(exchange, config, "app.ini")
            first = await new_pid(pidfile)

            await amqp_publish(exchange, config, "app.ini")
            second = await new_pid(pidfile, first)

            proxy.cut()
            await wait_for(lambda: "source.retrying" in emperor.text())
            assert pid_alive(second)
            proxy.restore()
            await wait_for(lambda: emperor.text().count("source.subscribed") == 2)
            assert pid_alive(second)

            await amqp_publish(exchange, config, "app.ini")
            third = await new_pid(pidfile, second)

            await amqp_publish(exchange, b"", "app.ini")
            await wait_for(lambda: not pid_alive(third))
            assert emperor.proc.poll() is None

            emperor.signal(signal.SIGTERM)
            assert await emperor.wait() == 0
        finally:
            emperor.close()
        nursery.cancel_scope.cancel()
