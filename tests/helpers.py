"""Shared helpers for integration tests that run real processes."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from tests.proxy import TcpProxy
from trimperor.abc import Monitor, MonitorOptions
from trimperor.core.model import Remove, Snapshot, SourceEvent, SourceProblem, Upsert
from trimperor.monitors.toolkit import SourceStatus

PYTHON = sys.executable

if TYPE_CHECKING:
    import pika

M = TypeVar("M", bound=Monitor)

#: The RabbitMQ the AMQP tests talk to (``scripts/services start``).
AMQP_BROKER = ("127.0.0.1", 5672)


@contextmanager
def system_user(name: str) -> Iterator[pwd.struct_passwd]:
    """A real unprivileged user (created for the test if missing, removed after)."""
    created = False
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
        created = True
        pw = pwd.getpwnam(name)
    try:
        yield pw
    finally:
        if created:
            subprocess.run(["userdel", name], check=False)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on *host* the OS reports free now, for a server in another process.

    The port is bound to 0 and released, so another process could take it before
    the server binds it: a server in the test's own process binds port 0 itself and
    reports the address it got instead (``port = await nursery.start(server.run)``).
    This is the one such helper; every test takes it from here.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


#: How long a wait for a condition may take before the condition is taken never to
#: come: a bound, not a measurement. It holds on a loaded machine: with two suites
#: and benchmarks at once on 2 cores (load average 12), ``import trimperor.cli``
#: alone took 4.7 s of wall time for 0.7 s of CPU, so an emperor start, a source's
#: first read and a vassal start took over the 10 s that was the bound before.
BOUND = 60.0


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in {"Z", "X"}


async def wait_for(predicate: Callable[[], bool], timeout: float = BOUND, what: str = "") -> None:
    """Poll *predicate* until true; fail after *timeout* (a bound, not a measurement)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pidfile_vassal(tmp: Path, name: str, extra: str = "", body: str = "") -> str:
    """A native vassal (INI) that writes its pid to ``name.pid`` and then sleeps.

    *body* is Python code run before the pid is written, so that a signal handler
    it installs is in place once the pid file exists.
    """
    script = tmp / f"{name}.py"
    script.write_text(
        "import os, sys, time, signal\n"
        f"{body}\n"
        f"open({str(tmp / (name + '.pid'))!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(tmp / (name + '.pid'))!r} + '.tmp', {str(tmp / (name + '.pid'))!r})\n"
        "while True:\n    time.sleep(1)\n"
    )
    return f"[vassal]\ncommand = {PYTHON} {script}\n{extra}"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class EmperorProcess:
    """``python -m trimperor ARGS`` as a real child process, output captured to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "trimperor", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        self._out.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._out.close()


def wait_gone(pids: list[int], timeout: float = BOUND) -> list[int]:
    """Blocking: wait until none of *pids* is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.02)
    return [p for p in pids if pid_alive(p)]


# -- monitors of remote sources (tests/test_monitor_*.py) -----------------------------------


class RemoteMonitor(Monitor, Protocol):
    """A monitor that reports its source's health."""

    status: SourceStatus


@asynccontextmanager
async def monitor_running(
    monitor: Monitor, capacity: int = 1000
) -> AsyncIterator[trio.MemoryReceiveChannel[SourceEvent]]:
    """Run *monitor* until the block ends; yields the channel of its events."""
    send, recv = trio.open_memory_channel[SourceEvent](capacity)
    async with recv, trio.open_nursery() as nursery:
        await nursery.start(monitor.run, send)
        yield recv
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running_monitor(
    make: Callable[[str, MonitorOptions], M], uri: str, **options: Any
) -> AsyncIterator[tuple[M, trio.MemoryReceiveChannel[SourceEvent]]]:
    """``make(uri, MonitorOptions(**options))`` running until the block ends; yields it
    and the channel of its events."""
    monitor = make(uri, MonitorOptions(**options))
    async with monitor_running(monitor) as recv:
        yield monitor, recv


async def next_change(recv: trio.MemoryReceiveChannel[SourceEvent]) -> Upsert | Remove:
    """The next Upsert or Remove (nothing else may come first)."""
    event = await next_event(recv)
    assert isinstance(event, Upsert | Remove), event
    return event


async def next_event(recv: trio.MemoryReceiveChannel[SourceEvent]) -> SourceEvent:
    with trio.fail_after(30):  # a bound, not a measurement
        return await recv.receive()


async def next_upsert(recv: trio.MemoryReceiveChannel[SourceEvent]) -> Upsert:
    event = await next_event(recv)
    assert isinstance(event, Upsert), event
    return event


async def next_snapshot(
    recv: trio.MemoryReceiveChannel[SourceEvent],
    predicate: Callable[[Snapshot], bool] = lambda s: True,
    timeout: float = BOUND,
) -> Snapshot:
    """The next snapshot that satisfies *predicate* (earlier events are dropped)."""
    with trio.fail_after(timeout):
        async for event in recv:
            if isinstance(event, Snapshot) and predicate(event):
                return event
    raise AssertionError("the monitor closed its channel")


async def next_problem(recv: trio.MemoryReceiveChannel[SourceEvent]) -> SourceProblem:
    with trio.fail_after(BOUND):
        async for event in recv:
            if isinstance(event, SourceProblem):
                return event
    raise AssertionError("the monitor closed its channel")


def versions(snap: Snapshot) -> dict[str, str]:
    return {doc.name: doc.version for doc in snap.docs}


async def new_pid(pidfile: Path, old: int | None = None) -> int:
    """Wait until *pidfile* holds a pid other than *old*, and return it."""
    await wait_for(lambda: read_pid(pidfile) not in {None, old})
    pid = read_pid(pidfile)
    assert pid is not None
    return pid


async def polled_source_outage(
    server: tuple[str, int],
    monitor_at: Callable[[int], RemoteMonitor],
    remove_b: Callable[[], object],
) -> None:
    """A polled source (pg, mongodb) offering a.ini and b.ini, through an outage.

    The monitor ``monitor_at(port)`` reads *server* through a
    :class:`~tests.proxy.TcpProxy` listening on *port*. Once the proxy is cut,
    it must report a problem and send no snapshot, even after *remove_b* has
    removed b.ini at the source; once restored, its next snapshot is a.ini alone.
    """
    proxy = TcpProxy(*server)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        monitor = monitor_at(port)
        async with monitor_running(monitor) as recv:
            await next_snapshot(recv, lambda s: len(s.docs) == 2)
            proxy.cut()
            problem = await next_problem(recv)
            assert problem.source == monitor.uri
            assert monitor.status.state == "retrying"
            at_removal = monitor.status.attempt
            remove_b()
            # While cut, nothing can tell the emperor b.ini is gone: an attempt made
            # wholly after the removal fails too, and no snapshot is sent.
            await wait_for(lambda: monitor.status.attempt >= at_removal + 2, timeout=60)
            while True:
                try:
                    event = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                assert not isinstance(event, Snapshot), event
            proxy.restore()
            snap = await next_snapshot(recv)
            assert list(versions(snap)) == ["a.ini"]
            assert monitor.status.state == "connected"
        nursery.cancel_scope.cancel()


async def polled_source_unreachable_at_start(
    server: tuple[str, int], monitor_at: Callable[[int], RemoteMonitor]
) -> None:
    """A polled source offering a.ini alone, cut off while the monitor starts.

    ``monitor_at(port)`` reads *server* through a cut proxy on *port*: it must
    start at once, report a problem, and send a.ini once the proxy is restored.
    """
    proxy = TcpProxy(*server)
    proxy.cut()
    send, recv = trio.open_memory_channel[SourceEvent](1000)
    async with recv, trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        monitor = monitor_at(port)
        with trio.fail_after(30):  # start() does not wait for the database (it is cut off)
            await nursery.start(monitor.run, send)
        await next_problem(recv)
        assert monitor.status.state == "retrying"
        proxy.restore()
        snap = await next_snapshot(recv)
        assert list(versions(snap)) == ["a.ini"]
        nursery.cancel_scope.cancel()


async def emperor_follows_a_polled_source(
    tmp_path: Path,
    server: tuple[str, int],
    uri_at: Callable[[int], str],
    *,
    freq: float,
    add: Callable[[], object],
    reload_a: Callable[[], object],
    stop_b: Callable[[], object],
    remove_a: Callable[[], object],
    retries: int = 1,
) -> None:
    """The emperor, on a polled source (pg, mongodb), through its life and an outage.

    The emperor (``--freq`` *freq*) reads the source ``uri_at(port)``: *server*
    through a :class:`~tests.proxy.TcpProxy` on *port*. The source changes by the
    callables: *add* offers a.ini and b.ini, :func:`pidfile_vassal` ``a`` and
    ``b`` in *tmp_path*; *reload_a* changes a.ini's version; *stop_b* takes b.ini
    away; *remove_a* takes a.ini away while the proxy is cut, after the emperor
    has logged *retries* failed attempts. The emperor must start, reload and
    stop the vassals accordingly, keep a.ini through the outage, stop it once
    the source is back, and exit 0 on SIGTERM.
    """
    proxy = TcpProxy(*server)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        emperor = EmperorProcess(
            [uri_at(port), "--freq", str(freq), "--throttle", "50"], tmp_path / "emperor.log"
        )
        try:
            a_pid, b_pid = tmp_path / "a.pid", tmp_path / "b.pid"
            add()
            first_a, b = await new_pid(a_pid), await new_pid(b_pid)

            reload_a()
            a = await new_pid(a_pid, first_a)
            await wait_for(lambda: not pid_alive(first_a))

            stop_b()
            await wait_for(lambda: not pid_alive(b))

            # outage: the removal made meanwhile is applied once it ends
            proxy.cut()
            await wait_for(
                lambda: (
                    "source.retrying" in emperor.text() and f"attempt={retries}" in emperor.text()
                )
            )
            remove_a()
            # an attempt made wholly after the removal has failed: a.ini is kept
            await wait_for(lambda: f"attempt={retries + 2} delay=" in emperor.text(), timeout=60)
            assert pid_alive(a)
            proxy.restore()
            await wait_for(lambda: not pid_alive(a))
            assert "source.recovered" in emperor.text()

            emperor.signal(signal.SIGTERM)
            assert await emperor.wait() == 0
        finally:
            emperor.close()
        nursery.cancel_scope.cancel()


#: The triggers of docs/sources/pg.md, for a table named {table}: keeps ts
#: current and sends one NOTIFY {table} per statement that changes rows.
PG_TRIGGERS = """
CREATE FUNCTION {table}_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW IS NOT DISTINCT FROM OLD THEN
        RETURN NEW;
    END IF;
    NEW.ts := extract(epoch FROM clock_timestamp());
    RETURN NEW;
END $$;
CREATE TRIGGER {table}_touch BEFORE INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {table}_touch();

CREATE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{table}', TG_OP);
    RETURN NULL;
END $$;
CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {table}_notify();
"""


def amqp_connection() -> pika.BlockingConnection:
    """A blocking connection to :data:`AMQP_BROKER` (close it)."""
    import pika

    return pika.BlockingConnection(pika.ConnectionParameters(*AMQP_BROKER))


def _amqp_publish(exchange: str, body: bytes, key: str) -> None:
    connection = amqp_connection()
    try:
        connection.channel().basic_publish(exchange, key, body)
    finally:
        connection.close()


async def amqp_publish(exchange: str, body: bytes | str, key: str = "") -> None:
    """Publish *body* to *exchange* with routing key *key*, from a worker thread."""
    data = body.encode() if isinstance(body, str) else body
    await trio.to_thread.run_sync(_amqp_publish, exchange, data, key)


async def http_request_path(stream: trio.SocketStream) -> str | None:
    """The path of the HTTP request read from *stream* (None if it closes first)."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        request += chunk
    return request.split(b" ", 2)[1].decode()


def trac_ini(port: int, env: Path, *extra: str) -> str:
    """A uWSGI vassal serving the Trac environment *env* on 127.0.0.1:*port*, two
    workers, then the *extra* lines."""
    return (
        "[uwsgi]\n"
        "master = true\n"
        "processes = 2\n"
        "module = trac.web.main:dispatch_request\n"
        f"env = TRAC_ENV={env}\n"
        f"http-socket = 127.0.0.1:{port}\n"
    ) + "".join(f"{line}\n" for line in extra)


def read_stats_document(path: Path) -> dict[str, Any]:
    """The stats document an emperor serves on the unix socket *path* (blocking)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    doc: dict[str, Any] = json.loads(data)
    return doc
