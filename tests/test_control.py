"""The control socket and ``trimperor ctl``, against a real emperor and real vassals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionRejected, WebSocketConnection

from tests.helpers import (
    PYTHON,
    EmperorProcess,
    new_pid,
    pid_alive,
    pidfile_vassal,
    read_pid,
    wait_for,
    write_atomic,
)
from trimperor.control.hub import ControlClient, connect
from trimperor.ctl import status_table


@dataclass
class Running:
    dir: Path
    """Scratch directory: vassal scripts and pid files."""
    vassals: Path
    sock: str
    emperor: EmperorProcess


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A unix socket path must stay under 108 bytes: pytest's tmp_path may not.
    d = Path(tempfile.mkdtemp(prefix="trimp-ctl-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def emperor_running(
    base: Path, vassals: dict[str, str], extra: list[str] | None = None
) -> AsyncIterator[Running]:
    vdir = base / "vassals"
    vdir.mkdir()
    for name, text in vassals.items():
        (vdir / name).write_text(text)
    sock = str(base / "ctl.sock")
    emperor = EmperorProcess(
        [str(vdir), "--control", sock, "--throttle", "50", *(extra or [])], base / "emperor.log"
    )
    try:
        await wait_for(lambda: os.path.exists(sock) or emperor.proc.poll() is not None, 20)
        assert emperor.proc.poll() is None, emperor.text()
        yield Running(base, vdir, sock, emperor)
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0, emperor.text()
    finally:
        emperor.close()


async def ctl(run: Running, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await trio.run_process(
        [PYTHON, "-m", "trimperor", "ctl", "--control", run.sock, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def status(run: Running) -> dict[str, dict[str, Any]]:
    async with connect(run.sock) as client:
        reply = await client.request("status")
    return {row["name"]: row for row in reply["vassals"]}


async def wait_state(run: Running, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            row = (await status(run)).get(name)
            if row is not None and row["state"] == state and row["pid"] != -2:
                return row
            await trio.sleep(0.05)


def printing_vassal(base: Path, name: str, every: float = 0.05) -> str:
    script = base / f"{name}.py"
    script.write_text(
        "import itertools, sys, time\n"
        "for i in itertools.count():\n"
        f"    print('line', i, flush=True)\n"
        f"    time.sleep({every})\n"
    )
    return f"[vassal]\ncommand = {PYTHON} {script}\n"


# -- trimperor ctl ----------------------------------------------------------------------


@pytest.mark.integration
async def test_ctl_status_table_json_and_unknown_names(short_dir: Path) -> None:
    vassals = {"a.ini": pidfile_vassal(short_dir, "a"), "b.ini": pidfile_vassal(short_dir, "b")}
    async with emperor_running(short_dir, vassals) as run:
        a = await new_pid(short_dir / "a.pid")
        await new_pid(short_dir / "b.pid")
        await wait_state(run, "a.ini", "running")
        await wait_state(run, "b.ini", "running")

        rc, out, err = await ctl(run, "status")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:5] == ["NAME", "KIND", "STATE", "PID", "UPTIME"]
        assert "CPU%" in lines[0]
        assert "RSS" in lines[0]
        row = next(line for line in lines if line.startswith("a.ini"))
        assert "native" in row
        assert "running" in row
        assert str(a) in row
        assert "\033[" not in out  # no colour when not on a terminal

        rc, out, _ = await ctl(run, "status", "a.ini", "--json")
        assert rc == 0
        doc = json.loads(out)
        (only,) = doc["vassals"]
        assert only["name"] == "a.ini"
        assert only["pid"] == a
        assert only["state"] == "running"
        assert only["rss"] > 0
        assert only["cpu"] is not None
        assert only["restarts"] == 0
        assert doc["sources"][0]["uri"].endswith("vassals")

        rc, _, err = await ctl(run, "status", "nope.ini")
        assert rc == 1
        assert "no such vassal: nope.ini" in err
        rc, _, err = await ctl(run, "restart", "nope.ini")
        assert rc == 1
        assert "nope.ini: no such vassal" in err
        # A client that says goodbye and goes is no error of the emperor's.
        assert "control.connection_failed" not in run.emperor.text()
        assert "Traceback" not in run.emperor.text()


@pytest.mark.integration
async def test_ctl_stop_holds_a_vassal_until_started_or_its_config_changes(
    short_dir: Path,
) -> None:
    vassals = {"a.ini": pidfile_vassal(short_dir, "a"), "b.ini": pidfile_vassal(short_dir, "b")}
    async with emperor_running(short_dir, vassals) as run:
        a = await new_pid(short_dir / "a.pid")
        b = await new_pid(short_dir / "b.pid")

        rc, out, err = await ctl(run, "stop", "a.ini")
        assert rc == 0, err
        assert "a.ini: stopping" in out
        await wait_for(lambda: not pid_alive(a))
        row = await wait_state(run, "a.ini", "stopped")
        assert row["held"] is True
        # Its supervisor has finished; a new snapshot of the directory (b.ini touched,
        # and so reloaded) lists a.ini too: still stopped.
        await wait_for(lambda: "vassal.finished name=a.ini" in run.emperor.text())
        spawned = run.emperor.text().count("vassal.spawned name=a.ini")
        st = os.stat(run.vassals / "b.ini")
        os.utime(run.vassals / "b.ini", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        b = await new_pid(short_dir / "b.pid", b)
        assert run.emperor.text().count("vassal.spawned name=a.ini") == spawned
        assert read_pid(short_dir / "a.pid") == a
        rc, out, _ = await ctl(run, "status")
        assert "stopped (ctl)" in out
        assert "trimperor ctl start a.ini" in out
        rc, out, _ = await ctl(run, "stop", "a.ini")
        assert rc == 0
        assert "already stopped" in out

        rc, out, _ = await ctl(run, "start", "a.ini")
        assert rc == 0
        assert "a.ini: starting" in out
        a2 = await new_pid(short_dir / "a.pid", a)
        assert (await wait_state(run, "a.ini", "running"))["held"] is False

        # Stopped again, then its configuration changes: it runs the new one.
        await ctl(run, "stop", "a.ini")
        await wait_for(lambda: not pid_alive(a2))
        write_atomic(run.vassals / "a.ini", pidfile_vassal(short_dir, "a", "env = V=2\n"))
        a3 = await new_pid(short_dir / "a.pid", a2)
        assert pid_alive(a3)

        # --all
        rc, out, _ = await ctl(run, "stop", "--all")
        assert rc == 0
        assert "a.ini: stopping" in out
        assert "b.ini: stopping" in out
        await wait_for(lambda: not pid_alive(a3) and not pid_alive(b))
        rc, out, _ = await ctl(run, "start", "--all")
        assert rc == 0, out
        await new_pid(short_dir / "a.pid", a3)
        await new_pid(short_dir / "b.pid", b)
        rc, _, err = await ctl(run, "stop")
        assert rc == 2
        assert "--all" in err

        # Stopped, then its configuration removed: forgotten.
        await ctl(run, "stop", "b.ini")
        await wait_state(run, "b.ini", "stopped")
        (run.vassals / "b.ini").unlink()
        with trio.fail_after(20):
            while "b.ini" in await status(run):
                await trio.sleep(0.05)
        async with connect(run.sock) as client:
            assert (await client.request("logs", names=["b.ini"]))["lines"] == []


@pytest.mark.integration
async def test_ctl_restart_reload_and_signal(short_dir: Path) -> None:
    usr1 = short_dir / "usr1"
    body = (
        "def on_usr1(*_):\n"
        f"    open({str(usr1)!r}, 'a').write('x')\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\n"
    )
    vassals = {
        "a.ini": pidfile_vassal(short_dir, "a", body=body),
        "r.ini": pidfile_vassal(short_dir, "r", "reload-signal = USR1\n", body=body),
    }
    async with emperor_running(short_dir, vassals) as run:
        a = await new_pid(short_dir / "a.pid")
        r = await new_pid(short_dir / "r.pid")
        await wait_state(run, "a.ini", "running")

        rc, out, _ = await ctl(run, "restart", "a.ini")
        assert rc == 0
        assert "a.ini: restarting" in out
        a2 = await new_pid(short_dir / "a.pid", a)
        await wait_for(lambda: not pid_alive(a))
        assert (await wait_state(run, "a.ini", "running"))["restarts"] == 1

        # reload: a vassal with a reload signal gets it (same process) ...
        rc, out, _ = await ctl(run, "reload", "r.ini")
        assert rc == 0
        assert "r.ini: reloading" in out
        await wait_for(usr1.exists)
        assert pid_alive(r)
        assert read_pid(short_dir / "r.pid") == r
        # ... one without is restarted.
        rc, out, _ = await ctl(run, "reload", "a.ini")
        assert rc == 0
        a3 = await new_pid(short_dir / "a.pid", a2)

        usr1.unlink()
        rc, out, _ = await ctl(run, "signal", "USR1", "a.ini")
        assert rc == 0
        assert "a.ini: sent SIGUSR1" in out
        await wait_for(usr1.exists)
        assert pid_alive(a3)
        rc, _, err = await ctl(run, "signal", "NOPE", "a.ini")
        assert rc == 1
        assert "unknown signal" in err


@pytest.mark.integration
async def test_ctl_logs_are_timestamped_merged_and_followed(short_dir: Path) -> None:
    vassals = {"p.ini": printing_vassal(short_dir, "p"), "q.ini": printing_vassal(short_dir, "q")}
    async with emperor_running(short_dir, vassals, ["--log-level", "warning"]) as run:
        # Both vassals have printed (either may start first on a loaded machine).
        await wait_for(
            lambda: all(f"{v}| line 3" in run.emperor.text() for v in ("p.ini", "q.ini"))
        )
        # Vassal output reaches the log whatever --log-level says, with time and name.
        first = next(ln for ln in run.emperor.text().splitlines() if "p.ini| line 0" in ln)
        assert first[:4].isdigit()
        assert first[4] == "-"

        rc, out, _ = await ctl(run, "logs", "-n", "5")
        assert rc == 0
        lines = out.splitlines()
        assert len(lines) == 5
        assert {ln.split()[2] for ln in lines} <= {"p.ini|", "q.ini|"}
        assert all(ln[:4].isdigit() for ln in lines)
        stamps = [ln[:23] for ln in lines]  # "YYYY-MM-DD HH:MM:SS.mmm"
        assert sorted(stamps) == stamps  # merged by time (lines of one ms in any order)

        rc, out, _ = await ctl(run, "logs", "p.ini", "-n", "3")
        lines = out.splitlines()
        assert len(lines) == 3
        assert all(" p.ini| line " in ln for ln in lines)

        # -f keeps printing new lines
        async with trio.open_nursery() as nursery:
            argv = [PYTHON, "-m", "trimperor", "ctl", "--control", run.sock, "logs", "-f"]
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    [*argv, "-n", "1", "q.ini"],
                    stdout=subprocess.PIPE,
                    check=False,
                )
            )
            seen: list[int] = []
            buf = b""
            with trio.fail_after(20):
                while len(seen) < 4:
                    buf += await proc.stdout.receive_some()
                    *done, buf = buf.split(b"\n")
                    for ln in done:
                        assert b" q.ini| line " in ln, ln
                        seen.append(int(ln.rsplit(b" ", 1)[1]))
            assert seen == sorted(seen)
            assert len(set(seen)) == len(seen)
            proc.terminate()


@pytest.mark.integration
async def test_ctl_events_and_wait(short_dir: Path) -> None:
    vassals = {"a.ini": pidfile_vassal(short_dir, "a")}
    async with emperor_running(short_dir, vassals) as run:
        a = await new_pid(short_dir / "a.pid")
        rc, _, _ = await ctl(run, "wait", "a.ini", "--state", "running", "--timeout", "20")
        assert rc == 0
        rc, out, _ = await ctl(run, "events")
        assert rc == 0
        assert f"spawn a.ini pid={a}" in out
        assert "state a.ini state=running" in out

        async with connect(run.sock) as client:
            await client.request("subscribe")
            os.kill(a, signal.SIGKILL)  # from outside
            seen = {}
            with trio.fail_after(20):
                while "spawn" not in seen:
                    ev = await client.next_event()
                    seen[ev["event"]] = ev
            assert seen["exit"]["signal"] == "SIGKILL"
            assert seen["exit"]["pid"] == a
            assert seen["spawn"]["pid"] != a

            # wait --state stopped, answered by an event once it has subscribed
            result: list[int] = []
            async with trio.open_nursery() as nursery:

                async def waiter() -> None:
                    code, _, _ = await ctl(
                        run, "wait", "a.ini", "--state", "stopped", "--timeout", "20"
                    )
                    result.append(code)

                nursery.start_soon(waiter)
                with trio.fail_after(20):
                    while (await client.request("status"))["emperor"]["clients"] < 2:
                        await trio.sleep(0.05)
                await client.request("stop", names=["a.ini"])
            assert result == [0]

        rc, _, err = await ctl(run, "wait", "a.ini", "--state", "armed", "--timeout", "0.5")
        assert rc == 1
        assert "not armed" in err
        rc, _, err = await ctl(run, "wait", "nope.ini", "--timeout", "0.5")
        assert rc == 1
        assert "nope.ini is no vassal (yet), not running" in err

        # A vassal that appears while waiting (a deploy script's case).
        async with trio.open_nursery() as nursery:
            codes: list[int] = []

            async def wait_new() -> None:
                codes.append((await ctl(run, "wait", "new.ini", "--timeout", "30"))[0])

            nursery.start_soon(wait_new)
            async with connect(run.sock) as client:
                with trio.fail_after(20):  # the waiter has subscribed
                    while (await client.request("status"))["emperor"]["clients"] < 2:
                        await trio.sleep(0.05)
            (run.vassals / "new.ini").write_text(pidfile_vassal(short_dir, "new"))
        assert codes == [0]


@pytest.mark.integration
async def test_ctl_without_an_emperor_exits_3(short_dir: Path) -> None:
    proc = await trio.run_process(
        [PYTHON, "-m", "trimperor", "ctl", "status"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "TRIMPEROR_CONTROL": str(short_dir / "none.sock")},
    )
    assert proc.returncode == 3
    assert b"cannot reach the emperor at" in proc.stderr
    assert b"none.sock" in proc.stderr


@pytest.mark.integration
async def test_bare_word_warns_and_points_to_ctl(short_dir: Path) -> None:
    emperor = EmperorProcess(["status", "--control", "none"], short_dir / "e.log")
    try:
        await wait_for(lambda: "emperor.ready" in emperor.text(), 20)
        assert "cli.not_a_source arg=status" in emperor.text()
        assert "trimperor ctl status" in emperor.text()
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()


# -- the WebSocket API -------------------------------------------------------------


@asynccontextmanager
async def raw_ws(sock: str) -> AsyncIterator[WebSocketConnection]:
    stream = await trio.open_unix_socket(sock)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")
        yield ws
        with trio.move_on_after(2):
            await ws.aclose()
        nursery.cancel_scope.cancel()


async def ask(ws: WebSocketConnection, message: str | bytes) -> dict[str, Any]:
    await ws.send_message(message)
    with trio.fail_after(10):
        doc = json.loads(await ws.get_message())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.integration
async def test_api_bad_requests_get_error_replies(short_dir: Path) -> None:
    async with emperor_running(short_dir, {"a.ini": pidfile_vassal(short_dir, "a")}) as run:
        await new_pid(short_dir / "a.pid")
        assert stat.S_IMODE(os.stat(run.sock).st_mode) == 0o600
        async with raw_ws(run.sock) as ws:
            reply = await ask(ws, "{not json")
            assert reply["ok"] is False
            assert "malformed message" in reply["error"]
            reply = await ask(ws, "[1, 2]")
            assert reply["ok"] is False
            assert "JSON object" in reply["error"]
            reply = await ask(ws, b"\x00\x01")
            assert reply["ok"] is False
            assert "binary" in reply["error"]
            reply = await ask(ws, json.dumps({"id": 7, "cmd": "explode"}))
            assert reply == {
                "ok": False,
                "id": 7,
                "error": reply["error"],
            }
            assert "unknown command 'explode'" in reply["error"]
            reply = await ask(ws, json.dumps({"id": 8, "cmd": "stop", "names": "a.ini"}))
            assert reply["ok"] is False
            assert "list of strings" in reply["error"]
            reply = await ask(ws, json.dumps({"id": 9, "cmd": "logs", "n": -1}))
            assert reply["ok"] is False
            reply = await ask(ws, json.dumps({"id": 10, "cmd": "status"}))
            assert reply["ok"] is True
            assert reply["vassals"][0]["name"] == "a.ini"
        # A broken handshake, and plain HTTP: refused, nothing else.
        for head in (
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01 not http at all\r\n\r\n",
        ):
            raw = await trio.open_unix_socket(run.sock)
            async with raw:
                await raw.send_all(head)
                with trio.fail_after(15):
                    answer = await raw.receive_some()
            assert answer.startswith(b"HTTP/1.1 4"), answer
        # An oversized message closes that connection, nothing else.
        async with raw_ws(run.sock) as ws:
            await ws.send_message("x" * (200 * 1024))
            with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(10):
                await ws.get_message()
        assert (await status(run))["a.ini"]["state"] == "running"


@pytest.mark.integration
async def test_a_client_that_never_reads_is_dropped_and_does_not_slow_the_emperor(
    short_dir: Path,
) -> None:
    vassals = {"p.ini": printing_vassal(short_dir, "p", every=0.0005)}
    async with emperor_running(short_dir, vassals, ["--log-level", "warning"]) as run:
        stream = await trio.open_unix_socket(run.sock)
        async with stream, trio.open_nursery() as nursery:
            lazy = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")
            await lazy.send_message(json.dumps({"cmd": "subscribe", "logs": True}))
            # ... and never read again. Meanwhile the emperor answers others at once.
            with trio.fail_after(60):
                while "control.client_dropped" not in run.emperor.text():
                    async with connect(run.sock) as client:
                        with trio.fail_after(10):
                            reply = await client.request("status")
                    assert reply["vassals"][0]["state"] == "running"
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        rows = await status(run)
        assert rows["p.ini"]["state"] == "running"


@pytest.mark.integration
async def test_fifty_subscribers_each_get_every_event(short_dir: Path) -> None:
    async with emperor_running(short_dir, {"a.ini": pidfile_vassal(short_dir, "a")}) as run:
        a = await new_pid(short_dir / "a.pid")
        await wait_state(run, "a.ini", "running")
        clients: list[ControlClient] = []
        got: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:

            async def subscriber(task_status: trio.TaskStatus[None]) -> None:
                async with connect(run.sock) as client:
                    reply = await client.request("subscribe", names=["a.ini"])
                    assert reply["ok"]
                    clients.append(client)
                    task_status.started()
                    while True:
                        ev = await client.next_event()
                        if ev["event"] == "spawn":
                            got.append(ev)
                            return

            for _ in range(50):
                await nursery.start(subscriber)
            rows = await status(run)
            assert len(clients) == 50
            assert rows["a.ini"]["pid"] == a
            os.kill(a, signal.SIGKILL)
            with trio.fail_after(30):
                while len(got) < 50:
                    await trio.sleep(0.05)
        assert len({ev["seq"] for ev in got}) == 1
        new = got[0]["pid"]
        assert new != a
        assert pid_alive(new)


# -- TCP: token and origin ----------------------------------------------------------------


@pytest.mark.integration
async def test_tcp_control_needs_the_token_and_refuses_other_origins(short_dir: Path) -> None:
    token = "s3cret-token-0123456789"
    (short_dir / "token").write_text(token + "\n")
    vdir = short_dir / "vassals"
    vdir.mkdir()
    (vdir / "a.ini").write_text(pidfile_vassal(short_dir, "a"))
    emperor = EmperorProcess(
        [str(vdir), "--control", "127.0.0.1:0", "--control-token-file", str(short_dir / "token")],
        short_dir / "e.log",
    )
    try:
        await wait_for(lambda: "control.listening surface=tcp" in emperor.text(), 20)
        addr = emperor.text().split("control.listening surface=tcp addr=")[1].split()[0]
        url = f"ws://{addr}/"

        host, port = addr.rsplit(":", 1)

        async def refused(headers: list[tuple[bytes, bytes]], path: str = "/") -> int:
            stream = await trio.open_tcp_stream(host, int(port))
            with pytest.raises(ExceptionGroup) as info:
                async with stream, trio.open_nursery() as nursery:
                    await trio_websocket.wrap_client_stream(
                        nursery, stream, addr, path, extra_headers=headers
                    )
            rejected = info.value.exceptions[0]
            assert isinstance(rejected, ConnectionRejected), info.value
            return rejected.status_code

        assert await refused([]) == 401  # missing
        assert await refused([(b"Authorization", b"Bearer wrong-token-wrong-token")]) == 401
        assert await refused([], "/?token=wrong") == 401
        # A browser on another site, even with the token:
        assert (
            await refused(
                [(b"Authorization", f"Bearer {token}".encode()), (b"Origin", b"http://evil.test")]
            )
            == 403
        )
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
        ) as ws:
            assert (await ask(ws, json.dumps({"cmd": "ping"})))["pong"] is True
        async with trio_websocket.open_websocket_url(f"{url}?token={token}") as ws:
            assert (await ask(ws, json.dumps({"cmd": "ping"})))["pong"] is True

        env = {"TRIMPEROR_CONTROL": addr}
        proc = await trio.run_process(
            [PYTHON, "-m", "trimperor", "ctl", "--token-file", str(short_dir / "token"), "status"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **env},
        )
        assert proc.returncode == 0, proc.stderr
        assert b"a.ini" in proc.stdout
        proc = await trio.run_process(
            [PYTHON, "-m", "trimperor", "ctl", "status"],
            capture_stderr=True,
            capture_stdout=True,
            check=False,
            env={**os.environ, **env},
        )
        assert proc.returncode == 3
        assert b"refused" in proc.stderr
        assert "control.refused surface=tcp reason=cross-origin" in emperor.text()
        assert token not in emperor.text()
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()


@pytest.mark.integration
async def test_tcp_control_without_a_token_is_a_usage_error(short_dir: Path) -> None:
    emperor = EmperorProcess([str(short_dir), "--control", "127.0.0.1:0"], short_dir / "e.log")
    try:
        assert await emperor.wait() == 2
        assert "needs --control-token-file" in emperor.text()
    finally:
        emperor.close()


def test_status_table_marks_held_and_backoff() -> None:
    base: dict[str, Any] = {
        "kind": "native",
        "pid": None,
        "uptime": None,
        "restarts": 3,
        "wakes": 0,
        "cpu": None,
        "rss": None,
        "last_error": None,
        "last_exit_code": 1,
        "last_exit_signal": None,
        "backoff_attempt": 2,
    }
    rows: list[dict[str, Any]] = [
        {**base, "name": "a", "state": "waiting", "held": False},
        {**base, "name": "b", "state": "stopped", "held": True},
        {
            **base,
            "name": "c",
            "state": "running",
            "held": False,
            "pid": 42,
            "uptime": 3725.0,
            "cpu": 1.25,
            "rss": 3 * 1024 * 1024,
            "backoff_attempt": 0,
            "last_exit_code": None,
        },
    ]
    table = status_table(rows, colour=True).splitlines()
    assert "waiting (backoff 2)" in table[1]
    assert "exit status 1" in table[1]
    assert "stopped (ctl)" in table[2]
    assert "trimperor ctl start b" in table[2]
    assert "1h02m" in table[3]
    assert "1.2" in table[3]
    assert "3.0M" in table[3]
    assert "\033[32m" in table[3]


# -- metrics --------------------------------------------------------------------------


async def http_get(addr: str, path: str, headers: str = "") -> tuple[str, str]:
    host, port = addr.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    extra = headers or "Connection: close"
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data or not headers:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


@pytest.mark.integration
async def test_prometheus_metrics(short_dir: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    sock = short_dir / "c.sock"
    vassals = {
        "a.ini": pidfile_vassal(short_dir, "a"),
        "b.ini": pidfile_vassal(short_dir, "b"),
        "c.ini": pidfile_vassal(short_dir, "c", f"socket = {sock}\non-demand = true\n"),
    }
    async with emperor_running(short_dir, vassals, ["--metrics", "127.0.0.1:0"]) as run:
        await wait_state(run, "c.ini", "armed")
        client = await trio.open_unix_socket(str(sock))  # wakes c.ini
        await new_pid(short_dir / "c.pid")
        await client.aclose()
        a = await new_pid(short_dir / "a.pid")
        await new_pid(short_dir / "b.pid")
        await wait_state(run, "a.ini", "running")
        await wait_state(run, "b.ini", "running")
        await ctl(run, "restart", "a.ini")
        await new_pid(short_dir / "a.pid", a)
        await ctl(run, "stop", "b.ini")
        await wait_state(run, "b.ini", "stopped")
        await wait_state(run, "a.ini", "running")
        text = run.emperor.text()
        addr = text.split("metrics.listening addr=")[1].split()[0]
        head, body = await http_get(addr, "/metrics")
        assert head.startswith("HTTP/1.1 200")
        assert "text/plain; version=0.0.4" in head
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples["trimperor_vassals", (("state", "running"),)] == 2
        assert samples["trimperor_vassals", (("state", "stopped"),)] == 1
        assert samples["trimperor_vassals", (("state", "armed"),)] == 0
        assert samples["trimperor_vassals_held", ()] == 1
        assert samples["trimperor_vassal_restarts_total", (("vassal", "a.ini"),)] == 1
        assert samples["trimperor_vassal_up", (("kind", "native"), ("vassal", "a.ini"))] == 1
        assert samples["trimperor_vassal_up", (("kind", "native"), ("vassal", "b.ini"))] == 0
        assert samples["trimperor_vassal_rss_bytes", (("vassal", "a.ini"),)] > 0
        assert ("trimperor_vassal_cpu_percent", (("vassal", "a.ini"),)) in samples
        (source,) = [k for k in samples if k[0] == "trimperor_source_up"]
        assert samples[source] == 1
        assert samples["trimperor_events_total", (("kind", "spawn"),)] >= 3
        assert samples["trimperor_spawn_seconds_count", ()] >= 3
        assert samples["trimperor_spawn_seconds_bucket", (("le", "+Inf"),)] >= 3
        assert samples["trimperor_wake_seconds_count", ()] == 1
        assert samples["trimperor_vassal_wakes_total", (("vassal", "c.ini"),)] == 1
        head, _ = await http_get(addr, "/nope")
        assert head.startswith("HTTP/1.1 404")


# -- log files ----------------------------------------------------------------------------


@pytest.mark.integration
async def test_ctl_logs_marks_stderr(short_dir: Path) -> None:
    script = short_dir / "both.py"
    script.write_text(
        "import sys, time\n"
        "print('to stdout', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "time.sleep(600)\n"
    )
    vassals = {"b.ini": f"[vassal]\ncommand = {PYTHON} {script}\n"}
    async with emperor_running(short_dir, vassals) as run:
        await wait_for(lambda: "b.ini| to stderr" in run.emperor.text())
        rc, out, _ = await ctl(run, "logs", "b.ini", "-n", "10")
        assert rc == 0
        lines = out.splitlines()
        assert any(ln.endswith(" b.ini| to stdout") for ln in lines), lines
        assert any(ln.endswith(" b.ini|! to stderr") for ln in lines), lines


@pytest.mark.integration
async def test_logs_dir_files_are_timestamped_and_rotated_by_size(short_dir: Path) -> None:
    logs = short_dir / "logs"
    vassals = {"p.ini": printing_vassal(short_dir, "p", every=0.002)}
    extra = ["--logs-dir", str(logs), "--log-max-bytes", "2048", "--log-backups", "2"]
    async with emperor_running(short_dir, vassals, extra) as run:
        log = logs / "p.ini.log"

        def first_line(path: Path) -> str | None:
            try:
                return path.read_text().split("\n", 1)[0]
            except FileNotFoundError:  # between two renames
                return None

        await wait_for(lambda: first_line(logs / "p.ini.log.2") is not None, 30)
        # Once two backups exist, older ones are removed, not kept as .3.
        first_of_2 = first_line(logs / "p.ini.log.2")
        await wait_for(lambda: first_line(logs / "p.ini.log.2") not in {None, first_of_2}, 30)
        await ctl(run, "stop", "p.ini")
        await wait_state(run, "p.ini", "stopped")
        assert not (logs / "p.ini.log.3").exists()
        for path in (log, logs / "p.ini.log.1", logs / "p.ini.log.2"):
            assert path.stat().st_size <= 2048
        lines = (logs / "p.ini.log.1").read_text().splitlines()
        assert lines
        assert all(" p.ini| line " in ln and ln[:4].isdigit() for ln in lines)
        numbers = [int(ln.rsplit(" ", 1)[1]) for ln in lines]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # nothing lost
        assert "vassal.log_rotated name=p.ini" in run.emperor.text()


@pytest.mark.integration
async def test_an_unwritable_logs_dir_is_logged_once_and_the_vassal_runs(short_dir: Path) -> None:
    logs = short_dir / "logs"
    logs.mkdir()
    (logs / "p.ini.log").mkdir()  # a directory where the file should be
    vassals = {"p.ini": printing_vassal(short_dir, "p")}
    async with emperor_running(short_dir, vassals, ["--logs-dir", str(logs)]) as run:
        await wait_for(lambda: "p.ini| line 20" in run.emperor.text(), 30)
        assert run.emperor.text().count("vassal.log_file_failed name=p.ini") == 1
        assert (await status(run))["p.ini"]["state"] == "running"


@pytest.mark.integration
async def test_ctl_reads_large_replies(short_dir: Path) -> None:
    script = short_dir / "long.py"
    script.write_text(
        "import time\n"
        "for i in range(200):\n"
        "    print(str(i).rjust(4, '0') + 'x' * 3000, flush=True)\n"
        "time.sleep(3600)\n"
    )
    vassals = {"long.ini": f"[vassal]\ncommand = {PYTHON} {script}\n"}
    async with emperor_running(short_dir, vassals) as run:
        await wait_for(lambda: "long.ini| 0199" in run.emperor.text(), 30)
        rc, out, err = await ctl(run, "logs", "-n", "200")
        assert rc == 0, err
        lines = out.splitlines()
        assert len(lines) == 200  # a reply of about 600 kB, in a 64-bit-length frame
        assert lines[0].split("| ")[1].startswith("0000x")
        assert lines[-1].endswith("x" * 3000)


def test_log_file_is_refused_in_tyrant_mode() -> None:
    from trimperor.core.errors import Refused
    from trimperor.core.model import VassalDocument
    from trimperor.emperor import Emperor
    from trimperor.testing import FakeSpawner

    emperor = Emperor([], spawner=FakeSpawner(), tyrant=True)
    text = "[vassal]\ncommand = sleep 1\nlog-file = /etc/owned-by-root\n"
    doc = VassalDocument("a.ini", "dir:///v", "1", text, path="/v/a.ini", uid=65534, gid=65534)
    with pytest.raises(Refused, match="log-file is not allowed in tyrant mode"):
        emperor._parse(doc)
    ok = VassalDocument(
        "a.ini",
        "dir:///v",
        "1",
        text.replace("log-file", "logto"),
        uid=65534,
        gid=65534,
        path="/v/a.ini",
    )
    emperor._parse(ok)


@pytest.mark.integration
async def test_a_vassals_own_log_file_is_rotated_by_its_own_limits(short_dir: Path) -> None:
    script = short_dir / "p.py"
    script.write_text(
        "import itertools, time\n"
        "for i in itertools.count():\n"
        "    print('line', i, flush=True)\n"
        "    time.sleep(0.002)\n"
    )
    own = short_dir / "own" / "p.log"
    own.parent.mkdir()
    vassal = (
        f"[vassal]\ncommand = {PYTHON} {script}\nlog-file = {own}\n"
        "log-max-bytes = 1024\nlog-backups = 1\n"
    )
    backup, older = own.with_name("p.log.1"), own.with_name("p.log.2")
    async with emperor_running(short_dir, {"p.ini": vassal}) as run:
        await wait_for(backup.exists, 30)
        await ctl(run, "stop", "p.ini")
        await wait_state(run, "p.ini", "stopped")
        assert not older.exists()
        assert own.stat().st_size <= 1024
        assert backup.stat().st_size <= 1024
        lines = backup.read_text().splitlines()
        assert lines
        assert all(" p.ini| line " in ln for ln in lines)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("log-file = a.log\nlogto = b.log\n", "logto and log-file: choose one"),
        ("log-file = a.log\nlog-max-bytes = 10\n", "log-max-bytes: '10' is not a whole number"),
        ("health = https://x/\n", "is not an http://host"),
        ("health = http://h/\nhealth-command = true\n", "choose one"),
        ("health-retries = 0\n", "health-retries '0'"),
        ("on-failure = 'unterminated\n", "on-failure"),
    ],
)
def test_bad_log_health_and_hook_keys_are_config_errors(extra: str, error: str) -> None:
    from trimperor.core.errors import ConfigError
    from trimperor.core.model import VassalDocument
    from trimperor.core.vassalspec import build_spec

    text = f"[vassal]\ncommand = sleep 1\n{extra}"
    doc = VassalDocument("a.ini", "dir:///v", "1", text, path="/v/a.ini")
    with pytest.raises(ConfigError, match=re.escape(error)):
        build_spec(doc, {}, ())


@pytest.mark.integration
async def test_source_state_changes_are_events(short_dir: Path) -> None:
    """A pg:// source whose table does not exist yet retries, then connects."""
    import uuid

    import psycopg

    from tests.test_monitor_postgres import DSN

    name = f"ctl_{uuid.uuid4().hex[:10]}"
    uri = f"pg://{DSN};SELECT name, config, ts FROM {name}"
    extra = ["--emperor", uri, "--freq", "0.2"]
    with psycopg.connect(DSN, autocommit=True, connect_timeout=5) as conn:
        try:
            async with emperor_running(short_dir, {}, extra) as run, connect(run.sock) as client:
                await client.request("subscribe")
                with trio.fail_after(20):
                    while True:
                        reply = await client.request("status")
                        pg = [s for s in reply["sources"] if s["uri"].startswith("pg://")]
                        if pg and pg[0]["state"] == "retrying":
                            break
                        await trio.sleep(0.05)
                conn.execute(f"CREATE TABLE {name} (name text, config text, ts numeric)")
                with trio.fail_after(20):
                    while True:
                        ev = await client.next_event()
                        if ev["event"] == "source" and ev["state"] == "connected":
                            break
                assert ev["uri"].startswith("pg://")
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_proc_sampler_reads_cpu_and_rss_of_a_process() -> None:
    from trimperor.control.hub import ProcSampler

    sampler = ProcSampler()
    me = os.getpid()
    cpu, rss = sampler.sample([me])[me]
    assert cpu is not None
    assert rss is not None
    assert rss > 1024 * 1024
    spent = time.process_time() + 0.2
    while time.process_time() < spent:  # busy: 0.2 s of CPU, however long that takes
        pass
    cpu, _ = sampler.sample([me])[me]
    assert cpu is not None
    assert cpu > 0.0
    assert sampler.sample([2**22 + 12345]) == {2**22 + 12345: (None, None)}
