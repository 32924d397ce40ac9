"""What owning every process costs: spawn time by emperor size, and clean-up after a SIGKILL.

``python benchmarks/processes.py [--rounds 200] [--ballast-mb 300] [--kills 10] [--vassals 20]``

1. **Spawn time against the emperor's size.** The same ``/bin/true`` plan is
   spawned by both spawners, first from this small process, then after it
   has grown by ``--ballast-mb`` of touched memory (what 10,000 vassals cost
   an emperor). ``PosixSpawner`` forks this process (a Python ``preexec_fn``
   rules out vfork); ``LauncherSpawner`` asks the small launcher process. The
   figure is the time from ``spawn()`` to the pid being known, median and p90.
2. **Emperor SIGKILL -> every vassal process gone.** ``python -m trimperor DIR``
   runs ``--vassals`` vassals, each leaving a background child, a ``setsid``
   daemon and a double-forked process besides its main one. The emperor is
   SIGKILLed; the figure is the time until none of those processes is left
   (polled every millisecond), over ``--kills`` runs, and how many survived.
   uWSGI's emperor has no equivalent to compare with: its vassals are uWSGI
   masters that clean up after themselves, and anything they started outside
   their process group is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Sequence

import trio

from benchlib import Janitor, machine_info, percentile, run_main, trimperor_command, wait_until
from trimperor.abc import LaunchPlan
from trimperor.vassals.launcher import LauncherSpawner
from trimperor.vassals.spawner import PosixSpawner

PLAN = LaunchPlan("bench", ("/bin/true",), "/", (("PATH", "/usr/bin:/bin"),))


async def spawn_times(rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for name, spawner in (("fork (PosixSpawner)", PosixSpawner()), ("launcher", LauncherSpawner())):
        times = []
        for i in range(rounds + 1):
            t = time.perf_counter()
            proc = await spawner.spawn(PLAN)
            spent = time.perf_counter() - t
            await proc.wait()
            if proc.output is not None:
                await proc.output.aclose()
            if i:  # the first one starts the launcher
                times.append(spent * 1000)
        results[name] = times
    return results


def family(marker: str) -> str:
    return (
        "[vassal]\n"
        f"env = MARK={marker}\n"
        "command = /bin/sh -c 'sleep 601 & setsid sleep 602 & "
        '(sh -c "sleep 603 &") ; exec sleep 600\'\n'
    )


def marked(marker: str) -> list[int]:
    found = []
    needle = f"MARK={marker}".encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found


def kill_round(janitor: Janitor, vassals: int) -> tuple[float, int]:
    """One emperor, SIGKILLed: seconds until its processes are gone, and survivors."""
    tmp = janitor.tempdir("trimperor-bench-")
    marker = uuid.uuid4().hex
    vassals_dir = tmp / "vassals"
    vassals_dir.mkdir()
    for i in range(vassals):
        (vassals_dir / f"v{i}.ini").write_text(family(marker))
    emperor = janitor.start(
        "trimperor", trimperor_command(str(vassals_dir)), tmp / "emperor.log", tmp
    )
    try:
        if not wait_until(lambda: len(marked(marker)) >= 4 * vassals, 60, 0.01):
            raise RuntimeError("the vassals did not all start")
        t = time.perf_counter()
        emperor.popen.kill()
        emperor.popen.wait()
        wait_until(lambda: not marked(marker), 10)
        spent = time.perf_counter() - t
        left = marked(marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return spent, len(left)
    finally:
        for pid in marked(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        janitor.stop_emperor(emperor)
        janitor.remove_dir(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200, help="spawns per spawner and size (200)")
    p.add_argument("--ballast-mb", type=int, default=300, help="the large emperor's extra MB (300)")
    p.add_argument("--kills", type=int, default=10, help="emperor SIGKILL runs (10)")
    p.add_argument("--vassals", type=int, default=20, help="vassals per emperor (20)")
    args = p.parse_args(argv)
    print("# Process ownership benchmarks\n")
    info = machine_info()
    print(", ".join(f"{k}: {v}" for k, v in info.items()), "\n")

    print("## Spawn time against the emperor's size (ms, from spawn() to a pid)\n")
    grown = f"+{args.ballast_mb} MB"
    print(f"| spawner | small emperor p50 / p90 | {grown} p50 / p90 | growth of p50 |")
    print("|---|---|---|---|")
    small = trio.run(spawn_times, args.rounds)
    ballast = bytearray(args.ballast_mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touched: the pages are really mapped
    large = trio.run(spawn_times, args.rounds)
    for name in small:
        a, b = small[name], large[name]
        print(
            f"| {name} | {statistics.median(a):.2f} / {percentile(a, 90):.2f} | "
            f"{statistics.median(b):.2f} / {percentile(b, 90):.2f} | "
            f"{statistics.median(b) - statistics.median(a):+.2f} |"
        )
    del ballast

    print(f"\n## Emperor SIGKILL -> every process gone ({args.vassals} vassals x 4 processes)\n")
    times, survivors = [], 0
    with Janitor() as janitor:
        for _ in range(args.kills):
            spent, left = kill_round(janitor, args.vassals)
            times.append(spent * 1000)
            survivors += left
    print("| runs | p50 (ms) | max (ms) | processes left |")
    print("|---|---|---|---|")
    print(f"| {args.kills} | {statistics.median(times):.0f} | {max(times):.0f} | {survivors} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
