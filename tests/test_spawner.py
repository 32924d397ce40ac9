"""The real spawner: process groups, stop escalation, parent-death signal, no leaks."""

from __future__ import annotations

import os
import resource
import signal
import socket
from pathlib import Path

import pytest
import trio

from tests.helpers import PYTHON, pid_alive, read_pid, wait_for
from trimperor.abc import LaunchPlan, Process
from trimperor.core.errors import SpawnError
from trimperor.vassals.launcher import LauncherSpawner
from trimperor.vassals.spawner import PosixSpawner, resolve_ids

pytestmark = pytest.mark.integration


AnySpawner = PosixSpawner | LauncherSpawner
#: The bits of signals 32 and 33 in /proc/PID/status masks.
GLIBC_INTERNAL = (1 << 31) | (1 << 32)


@pytest.fixture(params=["posix", "launcher"])
def spawner(request: pytest.FixtureRequest) -> AnySpawner:
    """Both spawners keep the same contract: forked here, or by the launcher."""
    return PosixSpawner() if request.param == "posix" else LauncherSpawner()


async def read_output(proc: Process) -> bytes:
    """Everything the process writes to its stdout pipe, until it closes it."""
    assert proc.output is not None
    data = b""
    async with proc.output:
        while chunk := await proc.output.receive_some():
            data += chunk
    return data


def plan(*argv: str, cwd: str = "/", logto: str | None = None) -> LaunchPlan:
    return LaunchPlan(name="t", argv=argv, cwd=cwd, env=tuple(os.environ.items()), logto=logto)


async def test_output_is_captured_and_exit_code_reported(
    spawner: AnySpawner,
) -> None:
    proc = await spawner.spawn(plan(PYTHON, "-c", "print('hello'); raise SystemExit(3)"))
    assert proc.output is not None
    data = await read_output(proc)
    assert await proc.wait() == 3
    assert data == b"hello\n"
    await proc.aclose()


async def test_logto_file(tmp_path: Path, spawner: AnySpawner) -> None:
    log = tmp_path / "out.log"
    proc = await spawner.spawn(
        plan(
            PYTHON, "-c", "import sys; print('out'); print('err', file=sys.stderr)", logto=str(log)
        )
    )
    assert proc.output is None
    assert await proc.wait() == 0
    assert log.read_text().splitlines() == ["out", "err"]


async def test_missing_program_and_cwd_are_spawn_errors(
    tmp_path: Path, spawner: AnySpawner
) -> None:
    with pytest.raises(SpawnError, match="not found"):
        await spawner.spawn(plan("/nonexistent/program"))
    with pytest.raises(SpawnError, match="working directory"):
        await spawner.spawn(plan(PYTHON, "-c", "pass", cwd=str(tmp_path / "nope")))


async def test_a_program_looked_up_in_path_that_cannot_run_is_a_spawn_error(
    tmp_path: Path, spawner: AnySpawner
) -> None:
    script = tmp_path / "app"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)  # not executable
    env = (("PATH", f"{tmp_path}:/usr/bin:/bin"),)
    with pytest.raises(SpawnError, match="'app': Permission denied"):
        await spawner.spawn(LaunchPlan("t", ("app",), "/", env))
    with pytest.raises(SpawnError, match="program 'no-such-app' not found"):
        await spawner.spawn(LaunchPlan("t", ("no-such-app",), "/", env))


async def test_sockets_are_handed_over_as_systemd_does(spawner: AnySpawner) -> None:
    """LISTEN_PID is the vassal's own pid, the command line is the vassal's own,
    and no signal is left ignored or blocked by the emperor or the launcher."""
    script = (
        'echo "$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES"; '
        "tr '\\0' ' ' < /proc/$$/cmdline; echo; "
        # grep's own masks, inherited through the shell (which blocks every
        # signal for a moment around each fork: its own are not the vassal's)
        "exec grep -E '^Sig(Ign|Blk)' /proc/self/status"
    )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        proc = await spawner.spawn(
            LaunchPlan(
                "t",
                ("sh", "-c", script),
                "/",
                (("PATH", "/usr/bin:/bin"),),
                listen_fds=(listener.fileno(),),
                listen_names=("web",),
            )
        )
        data = await read_output(proc)
        assert await proc.wait() == 0
    lines = data.decode().splitlines()
    assert lines[0] == f"{proc.pid} {proc.pid} 1 web"
    program, rest = lines[1].split(" ", 1)
    assert program.rpartition("/")[2] == "sh"
    assert rest.startswith('-c echo "$LISTEN_PID')
    masks = dict(line.split(":\t") for line in lines[2:])
    assert int(masks["SigBlk"], 16) == 0
    # glibc's posix_spawn leaves its two internal signals (32, 33: thread
    # cancellation and set*id) ignored; every glibc program installs its own
    # handlers for them as it starts. No signal a program can name is ignored.
    assert int(masks["SigIgn"], 16) & ~GLIBC_INTERNAL == 0, masks["SigIgn"]
    await proc.aclose()


async def test_each_vassal_leads_its_own_group_and_grandchildren_die_with_it(
    tmp_path: Path, spawner: AnySpawner
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([{PYTHON!r}, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    proc = await spawner.spawn(plan(PYTHON, "-c", code))
    await wait_for(lambda: read_pid(pidfile) is not None)
    grandchild = read_pid(pidfile)
    assert grandchild is not None
    assert os.getpgid(proc.pid) == proc.pid
    assert os.getpgid(grandchild) == proc.pid
    proc.signal_group(signal.SIGTERM)
    assert await proc.wait() == -signal.SIGTERM
    await wait_for(lambda: not pid_alive(grandchild))
    await proc.aclose()


async def test_leftover_group_members_are_killed_when_the_leader_exits(
    tmp_path: Path, spawner: AnySpawner
) -> None:
    pidfile = tmp_path / "orphan.pid"
    code = (
        "import subprocess, signal\n"
        f"p = subprocess.Popen([{PYTHON!r}, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
    )
    proc = await spawner.spawn(plan(PYTHON, "-c", code))
    assert await proc.wait() == 0
    orphan = read_pid(pidfile)
    assert orphan is not None
    await wait_for(lambda: not pid_alive(orphan))
    await proc.aclose()


async def test_vassal_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: an intermediate process spawns a vassal, then is SIGKILLed."""
    pidfile = tmp_path / "vassal.pid"
    code = (
        "import os, sys, trio\n"
        "from trimperor.abc import LaunchPlan, Process\n"
        "from trimperor.vassals.spawner import PosixSpawner\n"
        "async def main():\n"
        f"    p = await PosixSpawner().spawn(LaunchPlan('v', ({PYTHON!r}, '-c', "
        "'import time; time.sleep(600)'), '/', tuple(os.environ.items()), logto='/dev/null'))\n"
        f"    open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "    await trio.sleep(600)\n"
        "trio.run(main)\n"
    )
    parent = await trio.lowlevel.open_process([PYTHON, "-c", code])
    try:
        await wait_for(lambda: read_pid(pidfile) is not None)
        vassal = read_pid(pidfile)
        assert vassal is not None
        assert pid_alive(vassal)
        parent.kill()
        await parent.wait()
        await wait_for(lambda: not pid_alive(vassal))
    finally:
        parent.kill()
        await parent.wait()


def test_resolve_ids() -> None:
    assert resolve_ids(None, None) == (None, None, None)
    uid, gid, _ = resolve_ids("root", None)
    assert (uid, gid) == (0, 0)
    assert resolve_ids("0", "0")[:2] == (0, 0)
    with pytest.raises(SpawnError, match="unknown user"):
        resolve_ids("no-such-user-here", None)
    with pytest.raises(SpawnError, match="unknown group"):
        resolve_ids(None, "no-such-group-here")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_runs_as_another_user(tmp_path: Path, spawner: AnySpawner) -> None:
    out = tmp_path / "id.log"
    os.chmod(tmp_path, 0o777)
    proc = await spawner.spawn(
        LaunchPlan("t", ("/usr/bin/id", "-u"), "/", (), user="nobody", logto=str(out))
    )
    assert await proc.wait() == 0
    assert out.read_text().strip() == str(resolve_ids("nobody", None)[0])


async def test_vassals_keep_the_open_file_limit_the_emperor_was_started_with(
    tmp_path: Path, spawner: AnySpawner
) -> None:
    from trimperor.vassals import spawner as spawner_module

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.skip("the hard limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        assert spawner_module.raise_fd_limit() == (hard, hard)
        out = tmp_path / "limit"
        proc = await spawner.spawn(plan("/bin/sh", "-c", "ulimit -n", logto=str(out)))
        assert await proc.wait() == 0
        assert out.read_text().strip() == "1024"
    finally:
        spawner_module._VASSAL_NOFILE = None
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
