"""The stats document at scale: what one costs, and what it does to wakes.

``--count`` native on-demand vassals (``ondemand.py``'s one-line server, which
exits after one connection and is re-armed) are armed under ``python -m
trimperor DIR --stats SOCK --log-level warning``. Once every socket is
watched (the emperor's epoll instance, as in ``ondemand.py``):

* *cold*: the first stats request, connect → last byte (every vassal's JSON
  is made for it);
* *warm*: ``--requests`` more, one after the other;
* *wake, quiet*: ``--wakes`` random vassals are connected to one after the
  other, connect → first byte of the answer, each re-armed before the next;
* *wake, under stats*: the same for as many other random vassals while a
  client thread asks for the stats document in a loop (the documents served
  meanwhile and their times are recorded too).

``--in-process`` measures the build alone instead, in this process: an
``Emperor`` with the test suite's fake spawner and ``--count`` armed on-demand
vassals on real unix sockets makes the document its stats server sends
(``stats_chunks``, or ``stats_document`` where there is none) ``--requests``
times after the first, while a task records the longest gap between two of
its turns (how long the event loop was held).

The same is done with ``--uwsgi-count`` uWSGI vassals (``ondemand.py``'s HTTP
vassal) under ``uwsgi --emperor DIR --emperor-on-demand-directory SOCKS
--emperor-stats SOCK2``, whose stats server answers the same way (one JSON
document per connection). ``--skip-uwsgi`` (or ``--uwsgi-count 0``) skips it.

Run: ``python benchmarks/stats.py [--count 10000] [--uwsgi-count 10000]
[--requests 30] [--wakes 20] [--seed N]``. Progress goes to stderr, a markdown
report to stdout; everything started is stopped and every temporary
directory removed on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    DEFAULT_RUN,
    Janitor,
    RunOptions,
    add_run_options,
    epoll_fds,
    epoll_watches,
    fmt,
    machine_info,
    percentile,
    run_main,
    status_field_kib,
    vassals_of,
    wait_until,
)
from ondemand import ArmedEmperor, first_byte, trimperor_armed, uwsgi_armed, uwsgi_for

__all__ = ["StatsResult", "main", "measure"]

#: Issue 8's targets: a document for 10,000 vassals, and what it may add to a wake.
BUILD_TARGET_MS = 50.0
WAKE_DELAY_TARGET_MS = 5.0


def fetch(path: Path, timeout: float = 60.0) -> tuple[float, int]:
    """One stats document from the unix socket *path*: (ms connect → last byte, bytes)."""
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        t0 = time.perf_counter_ns()
        s.connect(str(path))
        while chunk := s.recv(1 << 20):
            size += len(chunk)
        t1 = time.perf_counter_ns()
    return (t1 - t0) / 1e6, size


@dataclass
class StatsResult:
    label: str
    command: str
    count: int
    armed_s: float = math.nan
    cold_ms: float = math.nan
    size: int = 0
    warm_ms: list[float] = field(default_factory=list)
    quiet_ms: list[float] = field(default_factory=list)
    loaded_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)
    """Stats requests served while the wakes under stats ran."""
    rss_mib: float = math.nan
    hwm_mib: float = math.nan
    failures: list[str] = field(default_factory=list)
    error: str | None = None


def _wake(result: StatsResult, path: Path, payload: bytes, ok: Callable[[bytes], bool]) -> float:
    try:
        ms, data = first_byte(path, payload)
    except OSError as exc:
        result.failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
        return math.nan
    if not ok(data):
        result.failures.append(f"{path.name}: unexpected answer {data[:60]!r}")
        return math.nan
    return ms


def _run(
    janitor: Janitor,
    who: ArmedEmperor,
    count: int,
    requests: int,
    wakes: int,
    rng: random.Random,
    run: RunOptions,
) -> StatsResult:
    progress = run.progress
    result = StatsResult(who.label, who.command, count)
    base, socks, names, stats, emperor, t0 = who.start(janitor, "stats-", count, progress)
    try:
        polls: list[int] = []
        deadline = t0 + max(120.0, count * 0.03)
        while time.monotonic() < deadline and emperor.alive():
            present = len(os.listdir(socks))
            if present and not polls:
                polls = epoll_fds(emperor.pid)
            if present >= count and epoll_watches(emperor.pid, polls) >= count and stats.exists():
                result.armed_s = time.monotonic() - t0
                break
            time.sleep(0.05)
        emperor.check_alive()
        if math.isnan(result.armed_s):
            result.error = "not all armed in time"
            return result
        time.sleep(2.0)
        progress(f"  armed after {result.armed_s:.1f} s; stats requests")
        result.cold_ms, result.size = fetch(stats)
        for _ in range(requests):
            result.warm_ms.append(fetch(stats)[0])

        def wake_all(chosen: Sequence[str], into: list[float]) -> None:
            for name in chosen:
                time.sleep(rng.uniform(0.0, 0.05))
                into.append(_wake(result, socks / who.socket_name(name), who.payload, who.ok))
                # back to sleep (no process) before the next one
                if not wait_until(lambda: not vassals_of(emperor.pid), 30.0, 0.005):
                    result.failures.append("a woken vassal did not go back to sleep")

        chosen = rng.sample(names, min(2 * wakes, count))
        progress(f"  {wakes} wakes, quiet")
        wake_all(chosen[:wakes], result.quiet_ms)
        progress(f"  {wakes} wakes while a client asks for stats in a loop")
        stop = threading.Event()

        def asker() -> None:
            while not stop.is_set():
                try:
                    result.during_ms.append(fetch(stats)[0])
                except OSError as exc:
                    result.failures.append(f"stats: {type(exc).__name__}: {exc}")
                    return

        thread = threading.Thread(target=asker, daemon=True)
        thread.start()
        try:
            time.sleep(0.2)
            wake_all(chosen[wakes:], result.loaded_ms)
        finally:
            stop.set()
            thread.join(120.0)
        result.rss_mib = status_field_kib(emperor.pid, "VmRSS") / 1024
        result.hwm_mib = status_field_kib(emperor.pid, "VmHWM") / 1024
        emperor.check_alive()
        return result
    finally:
        janitor.finish(emperor, base, run.keep_logs, "stats")


def measure(
    count: int = 10000,
    uwsgi_count: int = 10000,
    requests: int = 30,
    wakes: int = 20,
    run: RunOptions = DEFAULT_RUN,
) -> tuple[StatsResult, StatsResult | None]:
    rng = random.Random(run.seed)
    extra = ["--log-level", "warning"]

    with Janitor() as janitor:
        ours = _run(janitor, trimperor_armed(extra), count, requests, wakes, rng, run)
        uwsgi = uwsgi_for(uwsgi_count, run)
        if uwsgi is None:
            return ours, None

        theirs = _run(
            janitor, uwsgi_armed(uwsgi, with_stats=True), uwsgi_count, requests, wakes, rng, run
        )
        return ours, theirs


def in_process(count: int, requests: int, progress: Callable[[str], None]) -> str:
    """The document's build in this process (``--in-process``): a markdown table."""
    import tempfile

    import trio
    import trio.lowlevel

    from trimperor.core.model import Upsert, VassalDocument
    from trimperor.emperor import Emperor
    from trimperor.testing import FakeMonitor, FakeSpawner

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[tuple[str, float, float, int]] = []

    async def run(base: str) -> None:
        source, spawner = FakeMonitor("fake://"), FakeSpawner()
        emperor = Emperor([source], spawner=spawner, environ={"HOME": "/"})
        make = getattr(emperor, "stats_chunks", emperor.stats_document)
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            for i in range(count):
                text = f"[vassal]\ncommand = app\nsocket = {base}/v{i:05d}.sock\non-demand = true\n"
                doc = VassalDocument(f"v{i:05d}.ini", "fake://", "1", text, path=f"/srv/v{i}")
                await source.send(Upsert(doc))
            while sum(s.state.value == "armed" for s in emperor._sups.values()) < count:
                await trio.sleep(0.1)
            progress(f"in process: {count} armed; documents")
            gap = 0.0

            async def ticker() -> None:
                nonlocal gap
                last = time.perf_counter()
                while True:
                    await trio.lowlevel.checkpoint()
                    now = time.perf_counter()
                    gap, last = max(gap, now - last), now

            nursery.start_soon(ticker)
            for k in range(requests + 1):
                await trio.sleep(0.05)
                gap = 0.0
                t0 = time.perf_counter()
                data = await make()
                ms = (time.perf_counter() - t0) * 1000
                size = len(data) if isinstance(data, bytes) else sum(map(len, data))
                rows.append(("first" if k == 0 else f"next {k}", ms, gap * 1000, size))
            emperor.shutdown()
            nursery.cancel_scope.cancel()

    with tempfile.TemporaryDirectory() as base:
        trio.run(run, base)
    nexts = [r[1] for r in rows[1:]]
    stalls = [r[2] for r in rows[1:]]
    lines = [
        f"In process, {count:,} armed, document of {rows[0][3]:,} bytes:",
        "",
        "| document | time ms | longest event-loop stall ms |",
        "|---|---:|---:|",
        f"| the first | {fmt(rows[0][1])} | {fmt(rows[0][2])} |",
        f"| the next {len(nexts)}, p50 (min-max) | {fmt(percentile(nexts, 50))} "
        f"({fmt(min(nexts))}-{fmt(max(nexts))}) | {fmt(percentile(stalls, 50))} "
        f"({fmt(min(stalls))}-{fmt(max(stalls))}) |",
    ]
    return "\n".join(lines)


def _series(values: Sequence[float]) -> str:
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return "n/a"
    return f"{fmt(percentile(ok, 50))} / {fmt(percentile(ok, 99))} / {fmt(max(ok))} (n={len(ok)})"


def render(ours: StatsResult, theirs: StatsResult | None) -> str:
    runs = [r for r in (ours, theirs) if r is not None]
    lines = [
        "| measure | " + " | ".join(f"{r.label}, {r.count:,} armed" for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]

    def row(what: str, cells: list[str]) -> None:
        lines.append(f"| {what} | " + " | ".join(cells) + " |")

    row("all armed (s)", [fmt(r.armed_s, 2) for r in runs])
    row("first stats request, connect → last byte (ms)", [fmt(r.cold_ms) for r in runs])
    row("document size (MB)", [fmt(r.size / 1e6, 2) for r in runs])
    row("next requests, p50 / p99 / max (ms)", [_series(r.warm_ms) for r in runs])
    row("wake, quiet: p50 / p99 / max (ms)", [_series(r.quiet_ms) for r in runs])
    row("wake, stats asked in a loop: p50 / p99 / max (ms)", [_series(r.loaded_ms) for r in runs])
    row(
        "stats requests during those wakes, p50 / p99 / max (ms)",
        [_series(r.during_ms) for r in runs],
    )
    row(
        "emperor RSS at the end / peak (MiB)",
        [f"{fmt(r.rss_mib)} / {fmt(r.hwm_mib)}" for r in runs],
    )
    lines.append("")
    for r in runs:
        quiet = [v for v in r.quiet_ms if not math.isnan(v)]
        loaded = [v for v in r.loaded_ms if not math.isnan(v)]
        if quiet and loaded:
            lines.append(
                f"- {r.label}: wake p50 under stats minus quiet: "
                f"{fmt(percentile(loaded, 50) - percentile(quiet, 50))} ms "
                f"(target ≤ {WAKE_DELAY_TARGET_MS:g}); max minus quiet p50: "
                f"{fmt(max(loaded) - percentile(quiet, 50))} ms"
            )
        if r.warm_ms:
            lines.append(
                f"- {r.label}: stats request p50 {fmt(percentile(r.warm_ms, 50))} ms "
                f"(target ≤ {BUILD_TARGET_MS:g} ms for the build, which the request includes)"
            )
        if r.failures:
            lines.append(f"- {r.label}: {len(r.failures)} failures, first: {r.failures[0]}")
        if r.error:
            lines.append(f"- {r.label}: {r.error}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The stats document at scale, and wakes meanwhile.")
    p.add_argument("--count", type=int, default=10000, help="armed native vassals (10000)")
    p.add_argument(
        "--uwsgi-count", type=int, default=10000, help="armed uWSGI vassals (10000; 0 skips)"
    )
    p.add_argument("--requests", type=int, default=30, help="warm stats requests (30)")
    p.add_argument("--wakes", type=int, default=20, help="wakes, quiet and under stats (20)")
    add_run_options(p, seed="seed for the sample and pauses", skip_uwsgi="measure trimperor only")
    p.add_argument(
        "--in-process", action="store_true", help="measure the build alone, in this process"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run = RunOptions.of(args)
        run.progress(f"machine: {machine_info()}")
        if args.in_process:
            print(in_process(args.count, args.requests, run.progress))
            return 0
        ours, theirs = measure(args.count, args.uwsgi_count, args.requests, args.wakes, run)
        print(render(ours, theirs))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
