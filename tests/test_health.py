"""Health checks and on-failure hooks, with real vassals and a real HTTP server."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.helpers import PYTHON, free_port, new_pid, pid_alive, read_pid, wait_for
from tests.test_control import Running, ctl, emperor_running, status

pytestmark = pytest.mark.integration


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trimp-health-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def http_vassal(
    base: Path, name: str, port: int, sick: Path, extra: str = "", slow_start: float = 0.0
) -> str:
    """An HTTP server that answers 200, or 500 while the file *sick* exists.

    It serves the socket the emperor binds and hands over (fd 3), so the port
    listens from before the first process starts and across restarts: a check
    that comes before a slow start (*slow_start* seconds, as on a loaded machine)
    is answered late, not refused.
    """
    script = base / f"{name}.py"
    script.write_text(
        "import http.server, os, socket, time\n"
        f"time.sleep({slow_start})\n"
        f"open({str(base / (name + '.pid'))!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(base / (name + '.pid'))!r} + '.tmp', {str(base / (name + '.pid'))!r})\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        self.send_response(500 if os.path.exists({str(sick)!r}) else 200)\n"
        "        self.end_headers()\n"
        "    def log_message(self, *a):\n"
        "        pass\n"
        "server = http.server.HTTPServer(('127.0.0.1', 0), H, bind_and_activate=False)\n"
        "server.socket.close()\n"
        "server.socket = socket.socket(fileno=3)\n"
        "server.serve_forever()\n"
    )
    return f"[vassal]\ncommand = {PYTHON} {script}\nsocket = 127.0.0.1:{port}\n{extra}"


async def health_of(run: Running, name: str) -> str | None:
    rows = await status(run)
    value = rows[name]["health"]
    return value if value is None else str(value)


async def test_an_http_check_that_starts_failing_restarts_the_vassal(short_dir: Path) -> None:
    sick = short_dir / "sick"
    port = free_port()
    # The timeout is a bound for a loaded machine, not a measurement.
    checks = "health-interval = 0.2\nhealth-timeout = 30\nhealth-retries = 2\n"
    vassals = {
        "web.ini": http_vassal(
            short_dir,
            "web",
            port,
            sick,
            f"health = http://127.0.0.1:{port}/ping\n{checks}",
            # Longer than the checks' interval times retries: a start as slow as
            # a loaded machine's must not be taken for a failure.
            slow_start=1.0,
        )
    }
    async with emperor_running(short_dir, vassals) as run:
        pid = await new_pid(short_dir / "web.pid")
        with trio.fail_after(20):
            while await health_of(run, "web.ini") != "healthy":
                await trio.sleep(0.05)
        seen = len(run.emperor.text())  # only what the sick file causes counts
        sick.write_text("")
        await wait_for(lambda: "vassal.unhealthy name=web.ini" in run.emperor.text()[seen:], 20)
        unhealthy = run.emperor.text()[seen:]
        assert "HTTP 500" in unhealthy, unhealthy
        await wait_for(lambda: read_pid(short_dir / "web.pid") not in {None, pid}, 20)
        await wait_for(lambda: not pid_alive(pid))
        sick.unlink()
        with trio.fail_after(20):
            while await health_of(run, "web.ini") != "healthy":
                await trio.sleep(0.05)
        rc_rows = await status(run)
        assert rc_rows["web.ini"]["restarts"] >= 1
        assert rc_rows["web.ini"]["state"] == "running"


async def test_a_health_command_and_the_unhealthy_state_in_status(short_dir: Path) -> None:
    sick = short_dir / "sick"
    script = short_dir / "v.py"
    script.write_text(
        "import os, time\n"
        f"open({str(short_dir / 'v.pid')!r}, 'w').write(str(os.getpid()))\n"
        "while True:\n    time.sleep(1)\n"
    )
    vassal = (
        f"[vassal]\ncommand = {PYTHON} {script}\n"
        f"health-command = /bin/sh -c 'echo checking; test ! -e {sick}'\n"
        # Many retries: the failing state is seen before the restart.
        "health-interval = 0.2\nhealth-retries = 1000\n"
    )
    async with emperor_running(short_dir, {"v.ini": vassal}) as run:
        pid = await new_pid(short_dir / "v.pid")
        with trio.fail_after(20):
            while await health_of(run, "v.ini") != "healthy":
                await trio.sleep(0.05)
        assert "hook.output name=v.ini:health-command| checking" in run.emperor.text()
        sick.write_text("")
        with trio.fail_after(20):
            while await health_of(run, "v.ini") != "failing":
                await trio.sleep(0.05)
        _, out, _ = await ctl(run, "status")
        assert "running (failing)" in out
        assert read_pid(short_dir / "v.pid") == pid


async def test_on_failure_hook_gets_name_status_and_last_lines(short_dir: Path) -> None:
    report = short_dir / "report.json"
    hook = short_dir / "hook.py"
    hook.write_text(
        "import json, os, sys\n"
        f"json.dump({{k: v for k, v in os.environ.items() if k.startswith('TRIMPEROR_')}}, "
        f"open({str(report)!r} + '.tmp', 'w'))\n"
        f"os.replace({str(report)!r} + '.tmp', {str(report)!r})\n"
        "print('hook ran')\n"
        "sys.exit(4)\n"
    )
    dying = short_dir / "dying.py"
    dying.write_text(
        "import time\nprint('first words', flush=True)\nprint('last words', flush=True)\n"
        "time.sleep(0.2)\nraise SystemExit(3)\n"
    )
    hanging = short_dir / "hang.py"
    hanging.write_text("import time\ntime.sleep(3600)\n")
    vassals = {
        "d.ini": f"[vassal]\ncommand = {PYTHON} {dying}\non-failure = {PYTHON} {hook}\n",
        "h.ini": (
            f"[vassal]\ncommand = {PYTHON} {dying}\non-failure = {PYTHON} {hanging}\n"
            "on-failure-timeout = 0.5\n"
        ),
    }
    async with emperor_running(short_dir, vassals) as run:
        await wait_for(report.exists, 20)
        env = json.loads(report.read_text())
        assert env["TRIMPEROR_VASSAL"] == "d.ini"
        assert env["TRIMPEROR_REASON"] == "exited"
        assert env["TRIMPEROR_EXIT_CODE"] == "3"
        assert env["TRIMPEROR_EXIT_SIGNAL"] == ""
        assert "d.ini| first words\nd.ini| last words" in env["TRIMPEROR_LOG"]
        # The hook's own output and failure are logged; the emperor goes on.
        await wait_for(lambda: "hook.failed name=d.ini: exit status 4" in run.emperor.text(), 20)
        assert "hook.output name=d.ini:on-failure| hook ran" in run.emperor.text()
        # A hook that does not finish is killed after on-failure-timeout.
        await wait_for(
            lambda: "hook.failed name=h.ini: no result within 0.5s (killed)" in run.emperor.text(),
            20,
        )
        rows = await status(run)
        assert rows["d.ini"]["restarts"] >= 1
