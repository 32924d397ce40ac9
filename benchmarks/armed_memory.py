"""Where the memory of armed on-demand vassals goes, in the emperor's own process.

An :class:`~trimperor.emperor.Emperor` with the directory monitor and the fake
spawner (nothing is ever spawned: no vassal is woken) watches ``--count`` native
on-demand vassal files, each with one unix socket; once all are armed, the RSS
is printed with a ``tracemalloc`` breakdown of what was allocated since the
emperor started, by file and line (or by file, ``--by filename``)::

    python benchmarks/armed_memory.py --count 10000
    python benchmarks/armed_memory.py --count 10000 --no-trace   # RSS only

tracemalloc costs memory and time of its own: read the RSS from ``--no-trace``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import trio

from benchlib import status_field_kib
from trimperor.abc import MonitorOptions
from trimperor.core.lifecycle import State
from trimperor.emperor import Emperor
from trimperor.monitors.files import DirMonitor
from trimperor.testing import FakeSpawner


def rss_kib() -> int:
    return status_field_kib(os.getpid(), "VmRSS")


def hwm_kib() -> int:
    return status_field_kib(os.getpid(), "VmHWM")


def write_vassals(base: Path, count: int) -> Path:
    vassals, socks = base / "vassals", base / "socks"
    vassals.mkdir()
    socks.mkdir()
    text = f"[vassal]\ncommand = /bin/true\nsocket = {socks}/%n.sock\non-demand = true\n"
    for i in range(count):
        (vassals / f"v{i:05d}.ini").write_text(text)
    return vassals


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vassals = write_vassals(Path(tmp), args.count)
        gc.collect()
        before = rss_kib()
        if not args.no_trace:
            tracemalloc.start(args.frames)
            start = tracemalloc.take_snapshot()
        t0 = time.monotonic()
        monitor = DirMonitor(f"dir://{vassals}", MonitorOptions(freq=args.freq))
        emperor = Emperor([monitor], spawner=FakeSpawner(), environ={})
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            while True:
                sups = [emperor.supervisor(f"v{i:05d}.ini") for i in range(args.count)]
                if all(s is not None and s.state is State.ARMED and s.dormant for s in sups):
                    break
                await trio.sleep(0.1)
            armed_after = time.monotonic() - t0
            await trio.sleep(args.settle)
            gc.collect()
            after = rss_kib()
            print(f"vassals: {args.count}, all armed after {armed_after:.2f} s", file=sys.stderr)
            print(f"peak RSS (VmHWM): {hwm_kib() / 1024:.1f} MiB", file=sys.stderr)
            print(
                f"RSS: {before / 1024:.1f} MiB before the emperor, {after / 1024:.1f} MiB "
                f"with all armed: {(after - before) * 1024 / max(args.count, 1):.0f} B a vassal",
                file=sys.stderr,
            )
            if args.trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                trimmed = rss_kib()
                print(
                    f"RSS after malloc_trim(0): {trimmed / 1024:.1f} MiB: "
                    f"{(trimmed - before) * 1024 / max(args.count, 1):.0f} B a vassal",
                    file=sys.stderr,
                )
            if not args.no_trace:
                snap = tracemalloc.take_snapshot()
                stats = snap.compare_to(start, args.by)
                total = sum(s.size_diff for s in stats)
                print(
                    f"tracemalloc: {total / 1024 / 1024:.1f} MiB allocated since start, "
                    f"{total / max(args.count, 1):.0f} B a vassal; top {args.top}:",
                    file=sys.stderr,
                )
                for s in stats[: args.top]:
                    frame = s.traceback[-1]
                    where = f"{frame.filename.rsplit('/src/', 1)[-1]}:{frame.lineno}"
                    if args.by == "filename":
                        where = frame.filename.rsplit("/src/", 1)[-1]
                    print(
                        f"{s.size_diff / max(args.count, 1):8.0f} B/vassal "
                        f"{s.count_diff:8d} blocks  {where}",
                        file=sys.stderr,
                    )
                tracemalloc.stop()
            emperor.shutdown()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Memory of armed on-demand vassals, in-process.")
    p.add_argument("--count", type=int, default=10000, help="armed vassals (10000)")
    p.add_argument("--top", type=int, default=30, help="lines of the breakdown (30)")
    p.add_argument("--by", choices=["lineno", "filename", "traceback"], default="lineno")
    p.add_argument("--frames", type=int, default=1, help="frames kept per allocation (1)")
    p.add_argument("--freq", type=float, default=3.0, help="the monitor's rescan period (3)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before measuring (2)")
    p.add_argument("--trim", action="store_true", help="also the RSS after malloc_trim(0)")
    p.add_argument("--no-trace", action="store_true", help="RSS only, without tracemalloc")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.pop("NOTIFY_SOCKET", None)
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
