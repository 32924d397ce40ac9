"""Shared helpers for integration tests that run real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

PYTHON = sys.executable


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in {"Z", "X"}


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
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

    *body* is Python code run before the sleep loop.
    """
    script = tmp / f"{name}.py"
    script.write_text(
        "import os, sys, time, signal\n"
        f"open({str(tmp / (name + '.pid'))!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(tmp / (name + '.pid'))!r} + '.tmp', {str(tmp / (name + '.pid'))!r})\n"
        f"{body}\n"
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


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Blocking: wait until none of *pids* is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.02)
    return [p for p in pids if pid_alive(p)]
