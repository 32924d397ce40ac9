"""On-demand vassals with real processes: held sockets, wake, idle, watchdog.

The servers are real and unmodified: a plain Python socket server
(tests/ondemand_server.py), gunicorn (LISTEN_FDS), uvicorn (--fd 3), uwsgi (fd 0).
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.helpers import free_port, wait_for
from trimperor.core.errors import ConfigError
from trimperor.core.model import Upsert, VassalDocument
from trimperor.core.policy import BackoffPolicy
from trimperor.core.vassalspec import parse_socket
from trimperor.emperor import Emperor
from trimperor.supervisor import Supervisor
from trimperor.testing import FakeMonitor
from trimperor.vassals.spawner import PosixSpawner
from trimperor.vassals.uwsgi import UwsgiOptions

SERVER = Path(__file__).with_name("ondemand_server.py")
APPS = Path(__file__).resolve().parents[1] / "examples" / "apps"
BIN = Path(sys.executable).parent


# -- addresses (pure) ---------------------------------------------------------------


def test_socket_address_forms() -> None:
    def parts(address: str) -> tuple[str, str, int]:
        s = parse_socket(address)
        return s.family, s.host, s.port

    assert parts("127.0.0.1:80") == ("inet", "127.0.0.1", 80)
    assert parts(":8080") == ("inet", "0.0.0.0", 8080)
    assert parts("[::1]:80") == ("inet6", "::1", 80)
    unix = parse_socket("/run/app.sock")
    assert (unix.family, unix.path) == ("unix", "/run/app.sock")
    for bad, message in [("::1:80", "brackets"), ("host:http", "port"), ("[::1:80", "unbalanced")]:
        with pytest.raises(ConfigError, match=message):
            parse_socket(bad)


# -- a small world ---------------------------------------------------------------------


async def fetch(address: str) -> int:
    """Connect, read the server's answer (its pid) until EOF."""
    if address.startswith("/"):
        stream: trio.abc.Stream = await trio.open_unix_socket(address)
    else:
        host, _, port = address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
    data = b""
    async with stream:
        while chunk := await stream.receive_some():
            data += chunk
    return int(data)


async def http_get(address: str, path: str = "/") -> str:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    data = b""
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        while chunk := await stream.receive_some():
            data += chunk
    return data.decode(errors="replace")


def vassal(address: str, *extra: str) -> str:
    lines = [
        "[vassal]",
        f"command = {sys.executable} {SERVER}",
        f"socket = {address}",
        "stop-timeout = 5",
        *extra,
    ]
    return "\n".join(lines) + "\n"


class World:
    def __init__(self, emperor: Emperor, source: FakeMonitor) -> None:
        self.emperor = emperor
        self.source = source
        self.versions = 0

    async def put(self, name: str, text: str) -> Supervisor:
        self.versions += 1
        await self.source.send(Upsert(VassalDocument(name, "fake://", str(self.versions), text)))
        await wait_for(lambda: self.emperor.supervisor(name) is not None)
        sup = self.emperor.supervisor(name)
        assert sup is not None
        return sup


@pytest.fixture
async def world() -> AsyncIterator[World]:
    source = FakeMonitor("fake://")
    emperor = Emperor(
        [source],
        spawner=PosixSpawner(),
        policy=BackoffPolicy(throttle=0.05, max_throttle=0.5),
        uwsgi=UwsgiOptions(binary=str(BIN / "uwsgi")),
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            yield World(emperor, source)
            emperor.shutdown()


def state(sup: Supervisor) -> str:
    return sup.snapshot().state


# -- behaviour ---------------------------------------------------------------------------

pytestmark = pytest.mark.integration


async def test_armed_until_the_first_connection(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    sup = await world.put("a.ini", vassal(address, "on-demand = true"))
    await wait_for(lambda: state(sup) == "armed")
    snap = sup.snapshot()
    assert snap.pid is None
    assert snap.wakes == 0
    assert snap.sockets == ((address, "armed"),)
    pid = await fetch(address)
    snap = sup.snapshot()
    assert snap.pid == pid
    assert snap.wakes == 1
    assert snap.state == "running"
    assert snap.sockets == ((address, "handed over"),)
    assert await fetch(address) == pid  # the same process serves the next one


async def test_unix_socket_mode_and_owner(world: World, tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    sup = await world.put("u.ini", vassal(path, "on-demand = true", "socket-mode = 600"))
    await wait_for(lambda: state(sup) == "armed")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert await fetch(path) == sup.snapshot().pid


async def test_fifty_concurrent_first_connections_all_succeed(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    sup = await world.put("c.ini", vassal(address, "on-demand = true"))
    await wait_for(lambda: state(sup) == "armed")
    pids: list[int] = []

    async def one() -> None:
        pids.append(await fetch(address))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert len(pids) == 50
    assert len(set(pids)) == 1
    assert sup.snapshot().wakes == 1


async def test_idle_sleep_and_wake_five_times(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    sup = await world.put("i.ini", vassal(address, "on-demand = true", "idle = 0.3"))
    seen = set()
    for cycle in range(5):
        await wait_for(lambda: state(sup) == "armed")
        seen.add(await fetch(address))
        assert sup.snapshot().wakes == cycle + 1
    assert len(seen) == 5
    assert sup.snapshot().last_exit_code is not None or sup.snapshot().last_exit_signal


async def test_exit_0_rearms_and_fds_stay_flat_over_100_cycles(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    sup = await world.put("x.ini", vassal(address, "on-demand = true", "env = EXIT_AFTER=1"))
    await wait_for(lambda: state(sup) == "armed")
    pids = {await fetch(address)}
    await wait_for(lambda: state(sup) == "armed")
    fds = len(os.listdir("/proc/self/fd"))
    # Every wake is served: a late READY=1 (after the exit was seen) used to
    # crash the supervisor and reset the connection in flight.
    for _ in range(100):
        pids.add(await fetch(address))
        await wait_for(lambda: state(sup) == "armed")
    assert len(pids) == 101
    assert len(os.listdir("/proc/self/fd")) == fds
    snap = sup.snapshot()
    assert snap.backoff_attempt == 0  # a clean exit on demand is not a crash
    assert snap.wakes >= 101
    assert snap.restarts == 0  # a wake is not a restart


async def test_restart_under_load_refuses_no_connection(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    text = vassal(address)
    sup = await world.put("l.ini", text)
    await wait_for(lambda: state(sup) == "running")
    results: list[int] = []
    failures: list[BaseException] = []
    done = trio.Event()

    async def client() -> None:
        while not done.is_set():
            try:
                results.append(await fetch(address))
            except (OSError, ValueError) as exc:
                failures.append(exc)

    def served_by(generations: int) -> Callable[[], bool]:
        return lambda: len(set(results)) >= generations

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(client)
        for i in range(3):
            # the clients have been served by this generation: restart it under them
            await wait_for(served_by(i + 1), timeout=60)
            await world.put("l.ini", text + f"; restart {i}\n")
        await wait_for(lambda: sup.restarts >= 3 and state(sup) == "running", timeout=60)
        await wait_for(served_by(4), timeout=60)  # and by the last one
        done.set()
    assert failures == []
    assert len(set(results)) >= 4  # served by every generation of the process


async def test_config_change_while_asleep_and_rebind(world: World) -> None:
    old, new = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    sup = await world.put("r.ini", vassal(old, "on-demand = true"))
    await wait_for(lambda: state(sup) == "armed")
    await world.put("r.ini", vassal(new, "on-demand = true"))
    await wait_for(lambda: sup.snapshot().sockets == ((new, "armed"),))
    assert sup.snapshot().pid is None  # a change while asleep starts nothing
    with pytest.raises(OSError, match="all attempts to connect"):  # trio's refused connect
        await fetch(old)
    assert await fetch(new) == sup.snapshot().pid


async def test_bind_failure_is_that_vassals_problem_only(world: World) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = f"127.0.0.1:{blocker.getsockname()[1]}"
    try:
        bad = await world.put("bad.ini", vassal(taken, "on-demand = true"))
        good_address = f"127.0.0.1:{free_port()}"
        good = await world.put("good.ini", vassal(good_address, "on-demand = true"))
        await wait_for(lambda: bad.snapshot().backoff_attempt >= 2)
        assert f"cannot bind {taken}: address already in use" in (bad.snapshot().last_error or "")
        assert await fetch(good_address) == good.snapshot().pid
    finally:
        blocker.close()
    await wait_for(lambda: state(bad) == "armed", 10)


async def test_watchdog_expiry_restarts_the_vassal(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    sup = await world.put("w.ini", vassal(address, "watchdog = 0.5", "env = WATCHDOG_PINGS=3"))
    await wait_for(lambda: sup.snapshot().notify_ready)
    first = sup.snapshot().pid
    assert sup.snapshot().notify_status == "serving"
    await wait_for(lambda: sup.snapshot().pid not in {None, first}, 20)
    assert sup.snapshot().last_exit_signal == "SIGKILL"


async def test_gunicorn_takes_listen_fds(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    text = (
        "[vassal]\n"
        f"command = {BIN / 'gunicorn'} --workers 2 hello:app\n"
        f"chdir = {APPS}\n"
        f"socket = {address}\n"
        "on-demand = true\n"
        "idle = 1\n"
    )
    sup = await world.put("g.ini", text)
    for _ in range(2):
        await wait_for(lambda: state(sup) == "armed", 20)
        reply = await http_get(address)
        assert " 200 " in reply.splitlines()[0]
        assert "hello from pid" in reply


async def test_uvicorn_takes_fd_3(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    text = (
        "[vassal]\n"
        f"command = {BIN / 'uvicorn'} --fd 3 clock:app\n"
        f"chdir = {APPS}\n"
        f"socket = {address}\n"
        "on-demand = true\n"
    )
    sup = await world.put("v.ini", text)
    await wait_for(lambda: state(sup) == "armed")
    reply = await http_get(address)
    assert " 200 " in reply.splitlines()[0]


@pytest.mark.skipif(not (BIN / "uwsgi").exists(), reason="uwsgi is not installed")
async def test_uwsgi_vassal_on_fd_0_goes_back_to_on_demand(world: World, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    text = (
        "[uwsgi]\nmodule = werkzeug.testapp:test_app\nprotocol = http\nmaster = true\n"
        "processes = 1\nidle = 1\ndie-on-idle = true\n"
    )
    world.versions += 1
    doc = VassalDocument("u.ini", "fake://", str(world.versions), text, socket=address)
    await world.source.send(Upsert(doc))
    await wait_for(lambda: world.emperor.supervisor("u.ini") is not None)
    sup = world.emperor.supervisor("u.ini")
    assert sup is not None
    for cycle in range(2):
        await wait_for(lambda: state(sup) == "armed", 30)
        reply = await http_get(address)
        assert " 200 " in reply.splitlines()[0]
        assert sup.snapshot().wakes == cycle + 1


async def test_notify_from_a_child_of_the_vassal_is_attributed(
    world: World, tmp_path: Path
) -> None:
    """A worker of a ``type = notify`` vassal speaks for it (its own NOTIFY_SOCKET)."""
    script = tmp_path / "send.py"
    script.write_text(
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'READY=1\\nSTATUS=from a worker', '\\0' + os.environ['NOTIFY_SOCKET'][1:])\n"
        # A worker still alive when its message is read (the next test: one that has exited).
        "import time; time.sleep(5)\n"
    )
    gate = tmp_path / "gate"
    text = (
        "[vassal]\ntype = notify\ncommand = /bin/sh -c "
        f"'while [ ! -e {gate} ]; do sleep 0.01; done; {sys.executable} {script}; exec sleep 600'\n"
    )
    sup = await world.put("n.ini", text)
    await wait_for(lambda: state(sup) == "starting")  # type = notify: until READY=1
    gate.touch()
    await wait_for(lambda: state(sup) == "running")
    assert sup.snapshot().notify_ready
    assert sup.snapshot().notify_status == "from a worker"


def notify_script(
    path: Path, message: bytes, *, setsid: bool = False, uid: int | None = None
) -> Path:
    """A helper that sends *message* to NOTIFY_SOCKET and exits at once."""
    path.write_text(
        "import os, socket\n"
        + ("os.setsid()\n" if setsid else "")
        + (f"os.setgid({uid}); os.setuid({uid})\n" if uid is not None else "")
        + "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        + f"s.sendto({message!r}, '\\0' + os.environ['NOTIFY_SOCKET'][1:])\n"
        + f"print('sent by uid', os.getuid(), {message!r}, flush=True)\n"
    )
    return path


async def test_notify_from_a_short_lived_helper_in_its_own_session_is_attributed(
    world: World, tmp_path: Path
) -> None:
    """``systemd-notify --ready`` from a script: the helper has exited (and was in a
    session of its own) by the time its message is read. A shared socket that names
    the sender by its process group cannot tell whose it was; the vassal's own can."""
    helper = notify_script(tmp_path / "ready.py", b"READY=1\nSTATUS=from a helper", setsid=True)
    text = (
        "[vassal]\ntype = notify\ncommand = /bin/sh -c "
        f"'{sys.executable} {helper}; exec sleep 600'\n"
    )
    sup = await world.put("h.ini", text)
    await wait_for(lambda: state(sup) == "running")
    assert sup.snapshot().notify_ready
    assert sup.snapshot().notify_status == "from a helper"


@pytest.mark.skipif(os.geteuid() != 0, reason="sends as another user: needs root")
async def test_a_vassals_notify_socket_ignores_other_users(world: World, tmp_path: Path) -> None:
    """The socket's abstract name is visible to every local user: only the vassal's user
    (or the emperor's) is heard. A message from nobody changes nothing."""
    foreign = notify_script(tmp_path / "foreign.py", b"READY=1\nSTATUS=foreign", uid=65534)
    own = notify_script(tmp_path / "own.py", b"STATUS=own")
    text = (
        "[vassal]\ntype = notify\ncommand = /bin/sh -c "
        f"'{sys.executable} {foreign}; {sys.executable} {own}; exec sleep 600'\n"
    )
    sup = await world.put("f.ini", text)
    await wait_for(lambda: sup.snapshot().notify_status == "own")  # after the foreign one
    lines = [d["line"] for d in world.emperor.hub.logs(["f.ini"], 20)]
    assert any("sent by uid 65534" in line for line in lines), lines
    assert not sup.snapshot().notify_ready
    assert state(sup) == "starting"


NAIVE = Path(__file__).with_name("naive_server.py")


async def test_a_naive_blocking_accept_server_serves_request_after_request(world: World) -> None:
    # systemd hands sockets over blocking unless NonBlocking=true; a server that
    # just calls accept() in a loop must not die on its second accept.
    address = f"127.0.0.1:{free_port()}"
    text = f"[vassal]\ncommand = {sys.executable} {NAIVE}\nsocket = {address}\non-demand = true\n"
    sup = await world.put("naive.ini", text)
    await wait_for(lambda: state(sup) == "armed")
    pids = [await fetch(address) for _ in range(20)]
    assert pids[0] > 0
    assert set(pids) == {pids[0]}
    assert sup.snapshot().restarts == 0


async def test_socket_nonblocking_hands_over_non_blocking(world: World) -> None:
    address = f"127.0.0.1:{free_port()}"
    text = (
        f"[vassal]\ncommand = {sys.executable} {NAIVE}\nsocket = {address}\n"
        "on-demand = true\nsocket-nonblocking = true\n"
    )
    sup = await world.put("nb.ini", text)
    await wait_for(lambda: state(sup) == "armed")
    # The first accept may find the connection that woke it; the answer says the mode.
    assert await fetch(address) < 0


async def test_idle_means_no_connection_accepted_short_requests_included(
    world: World, tmp_path: Path
) -> None:
    # One short request per second for 60 s never leaves the vassal idle for
    # 20 s; a look at the connections open at one instant per second would
    # (almost) never see one, and put a busy site to sleep every ~21 s.
    idle = 20
    tcp = f"127.0.0.1:{free_port()}"
    unix = str(tmp_path / "site.sock")
    sups = {}
    for name, address in (("tcp.ini", tcp), ("unix.ini", unix)):
        text = (
            f"[vassal]\ncommand = {sys.executable} {NAIVE}\nsocket = {address}\n"
            f"on-demand = true\nidle = {idle}\n"
        )
        sup = sups[address] = await world.put(name, text)
        await wait_for(partial(lambda s: state(s) == "armed", sup))

    async def traffic(address: str) -> None:
        sup = sups[address]
        first = await fetch(address)
        for _ in range(60):
            await trio.sleep(1)
            assert await fetch(address) == first
            assert state(sup) == "running", "put to sleep while busy"
        assert sup.snapshot().wakes == 1
        quiet_from = trio.current_time()
        await wait_for(lambda: state(sup) == "armed", timeout=idle + 30)
        assert trio.current_time() - quiet_from >= idle  # not a moment early

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for address in sups:
                nursery.start_soon(traffic, address)
