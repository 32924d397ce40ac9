"""The README's quick start, run as written on a fresh copy of the project.

A copy of the tracked files (what a fresh clone holds) goes to a temporary
directory; the README's command line (``python3 -m venv .venv && . .venv/bin/activate
&& pip install -e '.[all,examples]' && trimperor examples/vassals``) runs there in
bash, with this test's own virtualenv off ``PATH``; every port the README
promises must answer HTTP 200; then Ctrl-C (SIGINT to the process group)
must stop everything. pip installs from its usual index and may use its cache.

The examples listen on fixed ports (8001-8004), which are the machine's, not
the suite's: suites run side by side (two Pythons, two checkouts) take turns
through a lock file in the temporary directory. If a port is still taken once
the lock is held, the test fails at once and names it, rather than waiting for
an answer from someone else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import pytest
import trio
import trio.testing

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

#: Bounds, not measurements: pip may download, the examples start in parallel.
INSTALL_AND_SERVE_TIMEOUT = 900.0
STOP_TIMEOUT = 60.0


def readme_command() -> str:
    """The README's quick-start command line (the one that runs ``trimperor``)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Try it", 1)[1]
    for line in section.splitlines():
        if line.startswith("python3 -m venv") and "trimperor " in line:
            return line.strip()
    raise AssertionError("README.md: no quick-start command line under '## Try it'")


def readme_ports() -> list[int]:
    """The ports the README promises: ``http://127.0.0.1:8001/ to :8004/``."""
    section = (ROOT / "README.md").read_text().split("## Try it", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"http://127\.0\.0\.1:(\d+)/ to :(\d+)/", section.replace("\n", " "))
    assert m, "README.md: the quick start names no port range"
    return list(range(int(m.group(1)), int(m.group(2)) + 1))


def example_ports() -> list[int]:
    """The ports the example vassals announce in their comments."""
    ports: set[int] = set()
    for path in (ROOT / "examples" / "vassals").iterdir():
        ports.update(int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/", path.read_text()))
    return sorted(ports)


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def copy_project(to: Path) -> None:
    """What a fresh clone holds: the tracked files as they are in the work tree."""
    for name in tracked_files():
        source, target = ROOT / name, to / name
        if not source.is_file():
            continue  # deleted in the work tree
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        target.chmod(source.stat().st_mode & 0o777)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


#: Held while a quick start runs, by every suite on this machine.
PORTS_LOCK = Path(tempfile.gettempdir()) / "trimperor-quickstart-ports.lock"


@contextlib.asynccontextmanager
async def examples_ports_held() -> AsyncIterator[None]:
    """The lock on the examples' ports; waits while another suite's quick start runs."""
    fd = os.open(PORTS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        # A bound, not a measurement: the other quick start may install and serve.
        with trio.fail_after(INSTALL_AND_SERVE_TIMEOUT + 2 * STOP_TIMEOUT):
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


def status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            code: int = r.status
            return code
    except OSError:
        return None


def open_log(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it


def clean_environment() -> dict[str, str]:
    """This process's environment without its virtualenv: a fresh shell."""
    venv = Path(sys.prefix).resolve()
    path = [
        p
        for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if p and not Path(p).resolve().is_relative_to(venv)
    ]
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join(path)
    return env


def test_the_readme_promises_the_ports_the_examples_use() -> None:
    assert readme_ports() == example_ports() == [8001, 8002, 8003, 8004]
    assert "'.[all,examples]'" in readme_command()


async def test_the_quick_start_serves_every_port(tmp_path: Path) -> None:
    async with examples_ports_held():
        await quick_start_serves(readme_ports(), tmp_path)


async def quick_start_serves(ports: list[int], tmp_path: Path) -> None:
    busy = [p for p in ports if port_busy(p)]
    assert not busy, (
        f"port(s) {busy} on 127.0.0.1 are in use by another process; the quick start "
        f"needs {ports[0]}-{ports[-1]} free (is another trimperor examples/vassals running?)"
    )
    clone = tmp_path / "trimperor"
    copy_project(clone)
    log = tmp_path / "quickstart.log"
    with open_log(log) as out:
        proc = await trio.lowlevel.open_process(
            ["bash", "-c", readme_command()],
            cwd=clone,
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        answered: dict[int, int | None] = {}
        with trio.move_on_after(INSTALL_AND_SERVE_TIMEOUT):
            while len(answered) < len(ports):
                assert proc.poll() is None, "the quick start exited:\n" + log.read_text()[-4000:]
                for port in ports:
                    if port not in answered and await trio.to_thread.run_sync(status, port) == 200:
                        answered[port] = 200
                await trio.sleep(0.5)
        missing = [p for p in ports if p not in answered]
        assert not missing, f"no HTTP 200 on {missing}:\n" + log.read_text()[-4000:]
        # Ctrl-C: SIGINT to the foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        with trio.fail_after(STOP_TIMEOUT):
            await proc.wait()
        text = log.read_text()
        assert "emperor.shutdown signal=SIGINT" in text, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await proc.wait()


async def test_a_second_quick_start_waits_for_the_first() -> None:
    """Another process (another suite) holds the ports: this one waits, then enters."""
    holder = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(PORTS_LOCK)!r}, os.O_RDWR | os.O_CREAT, 0o666)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert (await holder.stdout.receive_some()).startswith(b"held")
        entered = trio.Event()

        async def second() -> None:
            async with examples_ports_held():
                entered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()  # its first try has failed
            assert not entered.is_set()
            await holder.stdin.aclose()  # the holder exits, and its lock goes with it
            with trio.fail_after(30):
                await entered.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await holder.wait()
        await holder.stdin.aclose()
        await holder.stdout.aclose()
