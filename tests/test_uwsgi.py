"""Real uWSGI vassals (uwsgi from PyPI) speaking the emperor protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.helpers import EmperorProcess, free_port, pid_alive, wait_for, write_atomic
from trimperor.core.model import Remove, Upsert, VassalDocument
from trimperor.emperor import Emperor
from trimperor.testing import FakeMonitor
from trimperor.vassals.spawner import PosixSpawner
from trimperor.vassals.uwsgi import UwsgiOptions

pytestmark = pytest.mark.integration

UWSGI = Path(sys.executable).with_name("uwsgi")
if not UWSGI.exists():  # pragma: no cover - the test command installs it
    pytest.skip("uwsgi is not installed (pip install uwsgi)", allow_module_level=True)


def werkzeug_xml(port: int, extra: str = "") -> str:
    return (
        "<uwsgi>\n"
        "    <module>werkzeug.testapp:test_app</module>\n"
        "    <master/>\n"
        "    <processes>2</processes>\n"
        f"    <http-socket>127.0.0.1:{port}</http-socket>\n"
        f"    <pidfile>%d%n.pid</pidfile>\n{extra}"
        "</uwsgi>\n"
    )


def get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        status: int = r.status
        return status


async def http_ok(port: int) -> bool:
    try:
        return await trio.to_thread.run_sync(get, port) == 200
    except OSError:
        return False


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def master_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


@pytest.fixture
def emperor_proc(tmp_path: Path) -> Iterator[list[EmperorProcess]]:
    started: list[EmperorProcess] = []
    yield started
    for e in started:
        e.close()


def last_heartbeat(stats: Path, name: str) -> float | None:
    """When the emperor's stats server (on the unix socket *stats*) saw *name*'s last heartbeat."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(stats))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None  # not listening yet
    for vassal in json.loads(data)["vassals"]:
        if vassal["name"] == name:
            seen: float | None = vassal.get("last_heartbeat")
            return seen
    return None


async def wait_http(port: int, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not await http_ok(port):
            await trio.sleep(0.1)


async def test_werkzeug_xml_spawn_touch_crash_remove(
    tmp_path: Path, emperor_proc: list[EmperorProcess]
) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    port = free_port()
    emperor = EmperorProcess(
        [str(vassals), "--binary-path", str(UWSGI), "--throttle", "100"], tmp_path / "e.log"
    )
    emperor_proc.append(emperor)
    write_atomic(vassals / "werkzeug.xml", werkzeug_xml(port))
    await wait_http(port)
    pidfile = vassals / "werkzeug.pid"
    first = master_pid(pidfile)
    assert first is not None
    await wait_for(lambda: "vassal.ready name=werkzeug.xml" in emperor.text(), 20)

    # touch: reloaded in place, same master pid
    st = os.stat(vassals / "werkzeug.xml")
    os.utime(vassals / "werkzeug.xml", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    await wait_for(lambda: "vassal.reload_in_place name=werkzeug.xml" in emperor.text())
    await wait_for(lambda: emperor.text().count("vassal.ready name=werkzeug.xml") >= 1)
    await wait_http(port)
    assert master_pid(pidfile) == first

    # crash: respawned with a new master
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: master_pid(pidfile) not in {None, first}, 30)
    await wait_http(port)
    second = master_pid(pidfile)
    assert second is not None

    # removal: stopped, port closed
    (vassals / "werkzeug.xml").unlink()
    await wait_for(lambda: not pid_alive(second) and port_closed(port), 30)

    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0


async def test_in_memory_config_goes_over_the_config_channel(tmp_path: Path) -> None:
    port = free_port()
    source = FakeMonitor("fake://db")
    emperor = Emperor(
        [source],
        spawner=PosixSpawner(),
        uwsgi=UwsgiOptions(binary=str(UWSGI)),
        retry_interval=1,
    )
    text = (
        f"[uwsgi]\nmodule = werkzeug.testapp:test_app\nmaster = true\nprocesses = 1\n"
        f"http-socket = 127.0.0.1:{port}\n"
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            await source.send(Upsert(VassalDocument("db.ini", "fake://db", "1", text)))
            await wait_http(port)
            sup = emperor.supervisor("db.ini")
            assert sup is not None
            pid = sup.snapshot().pid
            # a new configuration: reloaded in place, and the vassal asks for it again
            port2 = free_port()
            await source.send(
                Upsert(
                    VassalDocument("db.ini", "fake://db", "2", text.replace(str(port), str(port2)))
                )
            )
            await wait_http(port2)
            assert sup.snapshot().pid == pid
            await source.send(Remove("fake://db", "db.ini"))
            await wait_for(lambda: port_closed(port2), 30)
            emperor.shutdown()


async def test_exit_26_is_not_respawned(tmp_path: Path) -> None:
    source = FakeMonitor("fake://x")
    emperor = Emperor([source], spawner=PosixSpawner(), uwsgi=UwsgiOptions(binary=str(UWSGI)))
    # uWSGI exits with 26 when it can't find its app and need-app is set? No: use
    # a hook that exits with status 26 right away.
    text = "[uwsgi]\nexec-asap = true\nexit-on-reload = true\nhook-asap = exit:26\n"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            await source.send(Upsert(VassalDocument("x.ini", "fake://x", "1", text)))
            await wait_for(lambda: emperor.supervisor("x.ini") is None, 20)
            assert emperor.registry.running() == {}
            emperor.shutdown()


def uwsgi_http_config(port: int) -> str:
    return (
        "[uwsgi]\nmodule = werkzeug.testapp:test_app\nmaster = true\nprocesses = 1\n"
        f"http-socket = 127.0.0.1:{port}\n"
    )


async def test_pg_sourced_uwsgi_vassal_gets_its_config_over_the_channel(tmp_path: Path) -> None:
    import psycopg

    port = free_port()
    table = f"vassals_{os.getpid()}_{port}"
    dsn = "host=127.0.0.1 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (name text, config text, ts bigint)")
        try:
            conn.execute(
                f"INSERT INTO {table} VALUES ('pgapp.ini', %s, 1)", (uwsgi_http_config(port),)
            )
            emperor = EmperorProcess(
                [
                    f"pg://{dsn};SELECT name, config, ts FROM {table}",
                    "--freq",
                    "0.2",
                    "--binary-path",
                    str(UWSGI),
                ],
                tmp_path / "e.log",
            )
            try:
                await wait_http(port)
                assert "getting INI configuration from emperor://pgapp.ini" in emperor.text()
                conn.execute(f"DELETE FROM {table}")
                await wait_for(lambda: port_closed(port), 30)
                emperor.signal(signal.SIGTERM)
                assert await emperor.wait() == 0
            finally:
                emperor.close()
        finally:
            conn.execute(f"DROP TABLE {table}")


async def test_zmq_sourced_uwsgi_vassal_gets_its_config_over_the_channel(tmp_path: Path) -> None:
    import zmq

    port, zport = free_port(), free_port()
    emperor = EmperorProcess(
        [f"zmq://tcp://127.0.0.1:{zport}", "--binary-path", str(UWSGI)], tmp_path / "e.log"
    )
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        await wait_for(lambda: "emperor.ready" in emperor.text())
        push.connect(f"tcp://127.0.0.1:{zport}")
        push.send_multipart([b"touch", b"zapp.ini", uwsgi_http_config(port).encode()])
        await wait_http(port)
        assert "getting INI configuration from emperor://zapp.ini" in emperor.text()
        push.send_multipart([b"destroy", b"zapp.ini"])
        await wait_for(lambda: port_closed(port), 30)
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        push.close(linger=0)
        ctx.term()
        emperor.close()


async def test_missed_heartbeat_restarts_a_real_uwsgi_vassal(tmp_path: Path) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    port = free_port()
    emperor = EmperorProcess(
        [
            str(vassals),
            "--binary-path",
            str(UWSGI),
            "--required-heartbeat",
            "2",
            "--throttle",
            "100",
            "--stats",
            str(tmp_path / "stats.sock"),
        ],
        tmp_path / "e.log",
    )
    try:
        write_atomic(vassals / "hb.xml", werkzeug_xml(port, "    <heartbeat>1</heartbeat>\n"))
        await wait_http(port)
        pidfile = vassals / "hb.pid"
        first = master_pid(pidfile)
        assert first is not None
        # freeze the whole vassal: no more heartbeats
        # the first heartbeat arms the check
        await wait_for(lambda: last_heartbeat(tmp_path / "stats.sock", "hb.xml") is not None, 30)
        os.killpg(first, signal.SIGSTOP)
        await wait_for(lambda: "vassal.heartbeat_missed name=hb.xml" in emperor.text(), 20)
        await wait_for(lambda: master_pid(pidfile) not in {None, first}, 30)
        await wait_http(port)
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()
