"""Control socket: ``ctl status`` with many vassals, event latency, idle subscribers.

``--count`` native vassals (default 1,000, each ``sleep 3600``) run under
``trimperor DIR --control SOCK --log-level warning``. Once all are running and
``--settle`` seconds (default 10) have passed:

* **status (API)**: ``--status-runs`` status requests (default 50) over one
  WebSocket connection to the control socket, request sent to full reply
  parsed: what the emperor costs an asking client;
* **status (CLI)**: the same number of ``trimperor ctl status`` runs, each a new
  process (interpreter start, imports, connection, table), wall time;
* **event latency**: ``--kills`` vassals (default 100) are killed with SIGKILL,
  one at a time, while one client is subscribed. Two figures per kill: from
  the emperor's emit to the subscriber (the ``time`` field of the ``exit``
  event vs. the wall clock when the subscriber has parsed it, same machine),
  and from the ``kill()`` call to the subscriber (includes noticing the death);
* **stop events**: the same number of vassals are stopped with ``stop`` requests
  on a second connection; the ``state`` event (``stopping``) is timed from its
  emit and from the request, with no respawn in the way (a respawn right
  after a death blocks the emperor's thread while the spawn runs);
* **idle CPU, 50 subscribers**: the emperor's utime + stime over ``--idle``
  seconds (default 20) with no client, then with 50 subscribed clients that
  receive nothing (no vassal changes), as shares of one core.

With ``--no-respawn`` the emperor runs with ``--loyal-after 100000 --throttle
600000``: killed vassals wait ten minutes instead of being respawned at once,
so no spawn runs while the event travels (they are started again afterwards).

Run: ``python benchmarks/control.py [--count 1000] [--status-runs 50] [--kills 100] [--idle 20]
[--no-respawn]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from benchlib import (
    CLK_TCK,
    Janitor,
    Summary,
    cpu_ticks,
    fmt,
    run_main,
    trimperor_command,
    write_json,
)
from trimperor.control.hub import ControlClient, connect


async def wait_running(sock: str, count: int, timeout: float) -> dict[str, dict[str, Any]]:
    with trio.fail_after(timeout):
        while True:
            try:
                async with connect(sock) as client:
                    reply = await client.request("status")
                rows = {r["name"]: r for r in reply["vassals"]}
                # A vassal is "running" from the spawn request on; its pid comes with
                # the launcher's answer.
                if len(rows) == count and all(
                    r["state"] == "running" and isinstance(r.get("pid"), int) for r in rows.values()
                ):
                    return rows
            except Exception:
                pass
            await trio.sleep(0.2)


async def status_api(sock: str, runs: int) -> list[float]:
    times = []
    async with connect(sock) as client:
        for _ in range(runs):
            t0 = time.perf_counter()
            reply = await client.request("status")
            times.append((time.perf_counter() - t0) * 1000)
            assert reply["ok"]
    return times


def status_cli(sock: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run(
            trimperor_command("ctl", "--control", sock, "status"),
            capture_output=True,
            check=True,
        )
        times.append((time.perf_counter() - t0) * 1000)
        assert out.stdout.count(b"\n") > 1
    return times


async def event_latency(
    sock: str, rows: dict[str, dict[str, Any]], kills: int
) -> tuple[list[float], list[float]]:
    emitted, killed = [], []
    async with connect(sock) as client:
        await client.request("subscribe")
        running = [name for name in sorted(rows) if isinstance(rows[name].get("pid"), int)]
        for name in running[:kills]:
            pid = rows[name]["pid"]
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(30):
                while True:
                    ev = await client.next_event()
                    if ev["event"] == "exit" and ev.get("name") == name:
                        now = time.time()
                        emitted.append((now - ev["time"]) * 1000)
                        killed.append((now - t_kill) * 1000)
                        break
    return emitted, killed


async def stop_latency(
    sock: str, rows: dict[str, dict[str, Any]], count: int
) -> tuple[list[float], list[float]]:
    """``stop`` requests on one connection, the ``stopping`` event on another."""
    emitted, asked = [], []
    async with connect(sock) as watcher, connect(sock) as steer:
        await watcher.request("subscribe")
        names = sorted(rows)[-count:]
        for name in names:
            t_ask = time.time()
            await steer.request("stop", names=[name])
            with trio.fail_after(30):
                while True:
                    ev = await watcher.next_event()
                    if ev["event"] == "state" and ev.get("name") == name:
                        now = time.time()
                        emitted.append((now - ev["time"]) * 1000)
                        asked.append((now - t_ask) * 1000)
                        break
        await steer.request("start", names=names)
    return emitted, asked


async def idle_cpu(pid: int, sock: str, seconds: float, subscribers: int) -> float:
    async with trio.open_nursery() as nursery:
        ready = 0

        async def subscriber() -> None:
            nonlocal ready
            async with connect(sock) as client:
                await client.request("subscribe", logs=True)
                ready += 1
                await _drain(client)

        for _ in range(subscribers):
            nursery.start_soon(subscriber)
        with trio.fail_after(60):
            while ready < subscribers:
                await trio.sleep(0.05)
        await trio.sleep(2)  # settle
        t0, c0 = time.monotonic(), cpu_ticks(pid)
        await trio.sleep(seconds)
        share = (cpu_ticks(pid) - c0) / CLK_TCK / (time.monotonic() - t0)
        nursery.cancel_scope.cancel()
    return share * 100


async def _drain(client: ControlClient) -> None:
    while True:
        await client.next_event()


async def measure(args: argparse.Namespace, janitor: Janitor) -> dict[str, Any]:
    base = janitor.tempdir("trimperor-bench-control-")
    vassals = base / "vassals"
    vassals.mkdir()
    for i in range(args.count):
        (vassals / f"v{i:04d}.ini").write_text("[vassal]\ncommand = sleep 3600\n")
    sock = str(base / "ctl.sock")
    emperor = janitor.start(
        "trimperor",
        trimperor_command(
            str(vassals),
            "--control",
            sock,
            "--log-level",
            "warning",
            # Every death is early and waits 10 minutes: nothing respawns meanwhile.
            *(["--loyal-after", "100000", "--throttle", "600000"] if args.no_respawn else []),
        ),
        base / "emperor.log",
        base,
    )
    rows = await wait_running(sock, args.count, 300)
    janitor.track(r["pid"] for r in rows.values())
    await trio.sleep(args.settle)  # the start of 1,000 vassals is still settling
    result: dict[str, Any] = {"count": args.count}
    result["status_api"] = Summary.of(await status_api(sock, args.status_runs))
    result["status_cli"] = Summary.of(
        await trio.to_thread.run_sync(status_cli, sock, args.status_runs)
    )
    emitted, killed = await event_latency(sock, rows, args.kills)
    result["event_emit"] = Summary.of(emitted)
    result["event_kill"] = Summary.of(killed)
    if args.no_respawn:
        async with connect(sock) as client:
            await client.request("start", all=True)  # those waiting start now
    await wait_running(sock, args.count, 300)
    emitted, asked = await stop_latency(sock, rows, args.kills)
    result["stop_emit"] = Summary.of(emitted)
    result["stop_ask"] = Summary.of(asked)
    await wait_running(sock, args.count, 300)
    result["idle_0"] = await idle_cpu(emperor.pid, sock, args.idle, 0)
    result["idle_50"] = await idle_cpu(emperor.pid, sock, args.idle, 50)
    emperor.check_alive()
    emperor.terminate()
    return result


def render(r: dict[str, Any]) -> str:
    lines = [
        f"vassals: {r['count']}",
        "| measurement | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for key, label in (
        ("status_api", "status request over the socket (API)"),
        ("status_cli", "`trimperor ctl status` (new process each)"),
        ("event_emit", "event: emit -> subscriber"),
        ("event_kill", "event: kill() -> subscriber"),
        ("stop_emit", "event (ctl stop): emit -> subscriber"),
        ("stop_ask", "event (ctl stop): request sent -> subscriber"),
    ):
        s: Summary = r[key]
        lines.append(f"| {label} | {s.n} | {fmt(s.p50)} | {fmt(s.p99)} | {fmt(s.maximum)} |")
    lines.append(
        f"idle CPU of the emperor: {fmt(r['idle_0'], 2)} % with no client, "
        f"{fmt(r['idle_50'], 2)} % with 50 subscribers"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--status-runs", type=int, default=50)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--idle", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait once all run")
    p.add_argument(
        "--no-respawn",
        action="store_true",
        help="killed vassals are not respawned during the kill phase (no spawn in the way)",
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args()

    def body() -> int:
        with Janitor() as janitor:
            result = trio.run(measure, args, janitor)
        print(render(result))
        doc = {k: (v.__dict__ if isinstance(v, Summary) else v) for k, v in result.items()}
        write_json(args.json, doc, indent=2)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
