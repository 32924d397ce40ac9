"""No process outlives its vassal or the emperor: the launcher, with real processes.

Each vassal leaves three kinds of descendants behind its main process: a
plain background child, a ``setsid`` daemon (another session, so another
process group) and a double-forked one (its parent exits at once, so it is
adopted by the subreaper). None may survive.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.helpers import EmperorProcess, pid_alive, wait_for, write_atomic
from trimperor.abc import LaunchPlan
from trimperor.vassals.launcher import LauncherSpawner

pytestmark = pytest.mark.integration


def family(marker: str) -> str:
    """A vassal whose descendants all carry *marker* in their environment."""
    return (
        "[vassal]\n"
        f"env = MARK={marker}\n"
        "command = /bin/sh -c '"
        "sleep 601 & "
        "setsid sleep 602 & "
        '(sh -c "sleep 603 &") ; '
        "exec sleep 600'\n"
    )


def pids_of(marker: str) -> list[int]:
    """The ``sleep`` processes carrying *marker*."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().split(b"\0")[0]
        except OSError:
            continue
        if f"MARK={marker}".encode() in environ and command.endswith(b"sleep"):
            found.append(int(name))
    return found


def all_four(marker: str) -> bool:
    return len(pids_of(marker)) == 4


@asynccontextmanager
async def family_running(tmp_path: Path, *args: str) -> AsyncIterator[tuple[EmperorProcess, str]]:
    """An emperor running one vassal with its three descendants; yields it and the marker."""
    marker = uuid.uuid4().hex
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    write_atomic(vassals / "family.ini", family(marker))
    e = EmperorProcess([str(vassals), *args], tmp_path / "e.log")
    try:
        await wait_for(lambda: all_four(marker), what="the vassal and its three descendants")
        yield e, marker
    finally:
        e.close()


async def test_emperor_sigkill_leaves_no_descendant(tmp_path: Path) -> None:
    async with family_running(tmp_path) as (e, marker):
        e.signal(signal.SIGKILL)
        await e.wait()
        await wait_for(lambda: not pids_of(marker), what="every descendant gone")


async def test_stopping_a_vassal_removes_its_whole_tree(tmp_path: Path) -> None:
    async with family_running(tmp_path) as (e, marker):
        (tmp_path / "vassals" / "family.ini").unlink()
        await wait_for(lambda: "vassal.exited name=family.ini" in e.text())
        await wait_for(lambda: not pids_of(marker), what="every descendant gone")
        assert e.proc.poll() is None


async def test_a_dead_launcher_takes_its_vassals_and_a_new_one_respawns_them(
    tmp_path: Path,
) -> None:
    async with family_running(tmp_path, "--throttle", "50") as (e, marker):
        first = set(pids_of(marker))
        found = re.search(r"launcher.started pid=(\d+)", e.text())
        assert found is not None
        launcher = int(found.group(1))
        os.kill(launcher, signal.SIGKILL)
        await wait_for(lambda: "launcher.died" in e.text())
        # Every process of the first generation is gone, the emperor is not...
        await wait_for(lambda: not first & set(pids_of(marker)), what="the first generation gone")
        assert e.proc.poll() is None
        # ...and a new launcher started the vassal again.
        await wait_for(lambda: len(re.findall(r"launcher.started pid=", e.text())) == 2)
        await wait_for(lambda: all_four(marker), what="the respawned family")
        assert not pid_alive(launcher)


async def test_the_launcher_works_when_its_socket_is_above_fd_1024() -> None:
    """An emperor holding thousands of armed sockets hands the launcher a high fd."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    filler = [os.dup(null) for _ in range(1100)]
    try:
        spawner = LauncherSpawner()
        with trio.fail_after(30):
            proc = await spawner.spawn(
                LaunchPlan("t", ("/bin/true",), "/", tuple(os.environ.items()), logto="/dev/null")
            )
            assert await proc.wait() == 0
        assert spawner.launcher_pid is not None
        os.kill(spawner.launcher_pid, signal.SIGKILL)
    finally:
        for fd in [*filler, null]:
            os.close(fd)


async def test_the_launcher_hands_sockets_over_at_a_low_open_file_limit() -> None:
    """Descriptors are placed from just above the highest target, not from 1000 up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    listener = socket.socket()
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the launcher inherits it
    spawner = LauncherSpawner()
    try:
        with trio.fail_after(30):
            proc = await spawner.spawn(
                LaunchPlan(
                    "t",
                    ("/bin/sh", "-c", 'test "$LISTEN_PID" = $$ && test -S /proc/self/fd/3'),
                    "/",
                    tuple(os.environ.items()),
                    logto="/dev/null",
                    listen_fds=(listener.fileno(),),
                    listen_names=("t",),
                )
            )
            assert await proc.wait() == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        listener.close()
        if spawner.launcher_pid is not None:
            os.kill(spawner.launcher_pid, signal.SIGKILL)


async def test_many_spawns_at_once_through_the_launcher() -> None:
    """A full socket buffer makes spawns wait for each other, never fail."""
    spawner = LauncherSpawner()
    env = tuple(os.environ.items())
    codes: list[int] = []

    async def one(i: int) -> None:
        proc = await spawner.spawn(LaunchPlan(f"t{i}", ("/bin/true",), "/", env, logto="/dev/null"))
        codes.append(await proc.wait())

    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(one, i)
        assert codes == [0] * 300
    finally:
        if spawner.launcher_pid is not None:
            os.kill(spawner.launcher_pid, signal.SIGKILL)


async def test_a_vassal_holds_only_its_own_descriptors(tmp_path: Path) -> None:
    """0, 1, 2 and the sockets at 3, 4: nothing of the launcher's or the emperor's."""
    spawner = LauncherSpawner()
    a, b = socket.socket(), socket.socket()
    stray = os.open(os.devnull, os.O_RDONLY)  # inheritable, in the emperor
    os.set_inheritable(stray, True)
    try:
        out = tmp_path / "fds"
        proc = await spawner.spawn(
            LaunchPlan(
                name="t",
                argv=("/bin/sh", "-c", f"ls /proc/$$/fd > {out}"),
                cwd="/",
                env=tuple(os.environ.items()),
                logto=str(tmp_path / "log"),
                listen_fds=(a.fileno(), b.fileno()),
                listen_names=("a", "b"),
            )
        )
        assert await proc.wait() == 0
        # the shell's own descriptors: 0-4 inherited (ls's output goes to a new one)
        fds = sorted(int(x) for x in out.read_text().split())
        assert [fd for fd in fds if fd <= 4] == [0, 1, 2, 3, 4]
        assert len([fd for fd in fds if fd > 4]) <= 1, fds
        await proc.aclose()
        assert spawner.launcher_pid is not None
        os.kill(spawner.launcher_pid, signal.SIGKILL)
    finally:
        os.close(stray)
        a.close()
        b.close()
