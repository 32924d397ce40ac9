from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio.testing

from tests.etcd_server import EtcdServer
from tests.helpers import EmperorProcess, amqp_connection


def _children() -> set[int]:
    pids: set[int] = set()
    base = f"/proc/{os.getpid()}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return pids


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True, scope="session")
def own_control_socket() -> Iterator[None]:
    """Emperors the tests start without ``--control`` listen on a socket of this
    run's own, not on the machine's default (``/run/trimperor/control.sock`` as
    root), where they would meet another suite's emperors or a real one."""
    base = Path(tempfile.mkdtemp(prefix="trimp-ctl-"))
    os.environ["TRIMPEROR_CONTROL"] = str(base / "control.sock")
    yield
    os.environ.pop("TRIMPEROR_CONTROL", None)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test must leave no child process and no open file descriptor behind."""
    children, fds = _children(), _fds()
    yield
    leaked_children = _children() - children
    assert not leaked_children, f"child processes left running: {sorted(leaked_children)}"
    # listdir itself opens one fd, present in both samples.
    leaked_fds = {fd for fd in _fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked_fds, "file descriptors leaked: " + ", ".join(
        f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}" for fd in sorted(leaked_fds)
    )


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only once the test's own ``wait_all_tasks_blocked()``
    (cushion 0) has had its turn: with a threshold of exactly 0 the two race, and
    which one wins differs between Python versions."""
    return trio.testing.MockClock(autojump_threshold=0.001)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd member for the session (tests use their own key prefixes).

    Session-scoped, so set up before the leak check above; killed at the end.
    """
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def exchange() -> Iterator[str]:
    """An AMQP exchange name of the test's own, deleted afterwards if it was declared."""
    name = f"trimperor.test.{uuid.uuid4().hex[:12]}"
    yield name
    connection = amqp_connection()
    try:
        connection.channel().exchange_delete(name)
    finally:
        connection.close()


@pytest.fixture
def emperors() -> Iterator[list[EmperorProcess]]:
    """Emperor processes a test starts (append them); each is closed afterwards."""
    started: list[EmperorProcess] = []
    yield started
    for e in started:
        e.close()
