"""Scale: many vassals in one directory.

1,000 native vassals (``--count``) are written into an empty directory, each
``/bin/sh -c 'echo $$ > PIDS/%n; exec sleep 3600'``. Then ``trimperor DIR
--log-level warning`` is started (its output goes to a log file) and this
measures:

* **start**: from starting the emperor until every vassal has written its pid
  file (the directory of pid files is listed every 10 ms);
* **RSS**: the emperor's VmRSS once all run, after the idle window, and its
  peak (VmHWM), from /proc/PID/status; the target is checked against the peak,
  in decimal megabytes (the stricter reading of "60 MB");
* **idle CPU**: after a 2 s settle, the emperor's own utime + stime
  (/proc/PID/stat) over ``--idle`` seconds (default 30), divided by the window:
  the share of one core. Vassals that died or were restarted meanwhile are
  counted;
* **stop**: from SIGTERM to the emperor until it has exited *and* no vassal
  pid is left (no /proc entry, or a zombie), polled every 10 ms.

``--uwsgi-count N`` measures the same for ``uwsgi --emperor`` with N uWSGI
vassals (a master and one worker each, on a unix socket, no app; the pid is
the master's, recorded by an ``exec-asap`` hook). It is off by default
because uWSGI vassals are heavy: each is two processes and about 7.5 MB of
proportional set size here, so 1,000 of them are 2,000 processes and ~7.5 GB.
uWSGI's emperor is stopped with SIGTERM too (it then stops its vassals).

Run: ``python benchmarks/scale.py [--count 1000] [--idle 30] [--uwsgi-count 0]``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from benchlib import (
    CLK_TCK,
    DEFAULT_RUN,
    Janitor,
    RunOptions,
    add_run_options,
    fmt,
    is_gone,
    print_log_notes,
    read_pid_file,
    run_main,
    status_field,
    status_field_kib,
    trimperor_command,
    uwsgi_binary,
    verdict,
)
from benchlib import (
    cpu_ticks as _cpu_ticks,
)

__all__ = ["ScaleResult", "main", "measure", "render"]

#: Settle time between "all running" and the start of the idle window (seconds).
SETTLE = 2.0
#: Polling interval while waiting for vassals to start or stop (seconds).
POLL = 0.01


@dataclass
class ScaleResult:
    label: str
    command: str
    count: int
    started: int = 0
    start_s: float = math.nan
    first_s: float = math.nan
    rss_running_mib: float = math.nan
    rss_idle_mib: float = math.nan
    hwm_mib: float = math.nan
    threads: str = ""
    fds: int = 0
    idle_window_s: float = math.nan
    idle_cpu_percent: float = math.nan
    vassals_lost_while_idle: int = 0
    vassals_restarted_while_idle: int = 0
    emperor_exit_s: float = math.nan
    stop_s: float = math.nan
    exit_status: int | None = None
    left_after_stop: int = 0
    log_notes: list[str] = field(default_factory=list)
    log_lines: int = 0
    error: str = ""


def native_vassal(pids: Path) -> str:
    return f"[vassal]\ncommand = /bin/sh -c 'echo $$ > {pids}/%n; exec sleep 3600'\n"


def uwsgi_vassal(pids: Path, run: Path) -> str:
    return f"[uwsgi]\nmaster = true\nsocket = {run}/%n.sock\nexec-asap = echo $PPID > {pids}/%n\n"


def _read_pids(pids: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for name in os.listdir(pids):
        pid = read_pid_file(pids / name)
        if pid is not None:
            found[name] = pid
    return found


def _run(
    janitor: Janitor,
    label: str,
    argv_for: Callable[[Path], list[str]],
    command: str,
    vassal_text: Callable[[Path, Path], str],
    count: int,
    idle: float,
    start_timeout: float,
    stop_timeout: float,
    interesting: Sequence[str],
    run: RunOptions,
) -> ScaleResult:
    result = ScaleResult(label, command, count)
    base = janitor.tempdir(f"{label.split(maxsplit=1)[0]}-scale-")
    vassals, pids, rundir = base / "vassals", base / "pids", base / "run"
    for d in (vassals, pids, rundir):
        d.mkdir()
    text = vassal_text(pids, rundir)
    progress = run.progress
    for i in range(count):
        (vassals / f"v{i:04d}.ini").write_text(text)
    progress(f"scale: {label}, {count} vassals")

    t0 = time.monotonic()
    emperor = janitor.start(label, argv_for(vassals), base / "emperor.log", base)
    try:
        # -- start -------------------------------------------------------------------
        deadline = t0 + start_timeout
        while True:
            present = len(os.listdir(pids))
            now = time.monotonic()
            if present and math.isnan(result.first_s):
                result.first_s = now - t0
            if present >= count:
                result.start_s = now - t0
                break
            if now > deadline or not emperor.alive():
                break
            time.sleep(POLL)
        running = _read_pids(pids)
        janitor.track(running.values())
        result.started = len(running)
        if not emperor.alive():
            result.error = f"the emperor exited ({emperor.popen.returncode}) during start"
            return result
        if result.started < count:
            result.error = f"only {result.started}/{count} vassals started in {start_timeout:.0f} s"
        progress(f"  {result.started} running after {time.monotonic() - t0:.1f} s")
        result.rss_running_mib = status_field_kib(emperor.pid, "VmRSS") / 1024

        # -- idle --------------------------------------------------------------------
        time.sleep(SETTLE)
        before = _read_pids(pids)
        janitor.track(before.values())
        c0, w0 = _cpu_ticks(emperor.pid), time.monotonic()
        progress(f"  idle for {idle:.0f} s")
        time.sleep(idle)
        c1, w1 = _cpu_ticks(emperor.pid), time.monotonic()
        result.idle_window_s = w1 - w0
        result.idle_cpu_percent = 100 * (c1 - c0) / CLK_TCK / (w1 - w0)
        result.rss_idle_mib = status_field_kib(emperor.pid, "VmRSS") / 1024
        result.hwm_mib = status_field_kib(emperor.pid, "VmHWM") / 1024
        result.threads = status_field(emperor.pid, "Threads")
        result.fds = len(os.listdir(f"/proc/{emperor.pid}/fd"))
        after = _read_pids(pids)
        janitor.track(after.values())
        result.vassals_lost_while_idle = sum(1 for pid in after.values() if is_gone(pid))
        result.vassals_restarted_while_idle = sum(
            1 for name, pid in after.items() if before.get(name, pid) != pid
        )

        # -- stop --------------------------------------------------------------------
        progress("  SIGTERM")
        left = set(after.values())
        t1 = time.monotonic()
        os.kill(emperor.pid, signal.SIGTERM)
        deadline = t1 + stop_timeout
        while time.monotonic() < deadline:
            if math.isnan(result.emperor_exit_s) and not emperor.alive():
                result.emperor_exit_s = time.monotonic() - t1
            left = {pid for pid in left if not is_gone(pid)}
            if not left and not math.isnan(result.emperor_exit_s):
                result.stop_s = time.monotonic() - t1
                break
            time.sleep(POLL)
        result.exit_status = emperor.popen.poll()
        result.left_after_stop = len(left)
        if math.isnan(result.stop_s):
            result.error = (
                f"after {stop_timeout:.0f} s: emperor "
                f"{'exited' if result.exit_status is not None else 'still running'}, "
                f"{len(left)} vassal(s) left"
            )
        return result
    finally:
        result.log_lines, result.log_notes = emperor.notes(interesting)
        janitor.finish(emperor, base, run.keep_logs, "scale")


def measure(
    count: int = 1000,
    idle: float = 30.0,
    uwsgi_count: int = 0,
    log_level: str = "warning",
    run: RunOptions = DEFAULT_RUN,
) -> tuple[ScaleResult, ScaleResult | None]:
    with Janitor() as janitor:
        extra = ["--log-level", log_level, *run.trimperor_args]
        ours = _run(
            janitor,
            "trimperor",
            lambda d: trimperor_command(str(d), *extra),
            " ".join(["python -m trimperor DIR", *extra]),
            lambda pids, run: native_vassal(pids),
            count,
            idle,
            start_timeout=max(60.0, count * 0.06),
            stop_timeout=60.0,
            interesting=("WARNING", "ERROR", "CRITICAL", "Traceback"),
            run=run,
        )
        theirs = None
        uwsgi = uwsgi_binary()
        if uwsgi_count > 0 and uwsgi is not None:
            theirs = _run(
                janitor,
                "uwsgi --emperor",
                lambda d: [uwsgi, "--emperor", str(d)],
                "uwsgi --emperor DIR",
                uwsgi_vassal,
                uwsgi_count,
                idle,
                start_timeout=max(120.0, uwsgi_count * 0.5),
                stop_timeout=max(120.0, uwsgi_count * 0.2),
                interesting=("error", "ERROR", "DAMN"),
                run=run,
            )
        return ours, theirs


# -- output -------------------------------------------------------------------------------------

TARGETS = {
    "start": 10.0,
    "rss": 60.0,
    "cpu": 1.0,
    "stop": 5.0,
}


#: 1 MiB in MB (10^6 bytes): the RSS target is read as decimal megabytes, the stricter way.
MB_PER_MIB = 1.048576


def _mem(mib: float) -> str:
    return f"{fmt(mib)} MiB = {fmt(mib * MB_PER_MIB)} MB"


_verdict = partial(verdict, missed="**missed**")


def render(ours: ScaleResult, theirs: ScaleResult | None) -> str:
    runs = [ours] + ([theirs] if theirs else [])
    head = "| measure | target (trimperor) | " + " | ".join(
        f"{r.label} ({r.count} vassals)" for r in runs
    )
    lines = [head + " |", "|---|---|" + "---:|" * len(runs)]

    def row(what: str, target: str, cells: list[str]) -> None:
        lines.append(f"| {what} | {target} | " + " | ".join(cells) + " |")

    row("vassals started", "all", [f"{r.started}/{r.count}" for r in runs])
    row("time to first vassal (s)", "", [fmt(r.first_s, 2) for r in runs])
    row("time until all run (s)", "≤ 10", [fmt(r.start_s, 2) for r in runs])
    row("emperor RSS, all running", "", [_mem(r.rss_running_mib) for r in runs])
    row("emperor RSS after idle", "≤ 60 MB", [_mem(r.rss_idle_mib) for r in runs])
    row("emperor peak RSS (VmHWM)", "", [_mem(r.hwm_mib) for r in runs])
    row("emperor threads / open fds", "", [f"{r.threads or 'n/a'} / {r.fds}" for r in runs])
    row(
        f"emperor CPU while idle ({fmt(ours.idle_window_s, 0)} s, % of a core)",
        "≤ 1",
        [fmt(r.idle_cpu_percent, 2) for r in runs],
    )
    row(
        "vassals died / restarted while idle",
        "0 / 0",
        [f"{r.vassals_lost_while_idle} / {r.vassals_restarted_while_idle}" for r in runs],
    )
    row("SIGTERM → emperor exited (s)", "", [fmt(r.emperor_exit_s, 2) for r in runs])
    row("SIGTERM → emperor and all vassals gone (s)", "≤ 5", [fmt(r.stop_s, 2) for r in runs])
    row("emperor exit status", "0", [str(r.exit_status) for r in runs])
    lines.append("")
    lines.append(
        "trimperor targets: "
        f"all running ≤ 10 s: {_verdict(ours.start_s, TARGETS['start'])}; "
        f"RSS ≤ 60 MB: {_verdict(ours.hwm_mib * MB_PER_MIB, TARGETS['rss'])}; "
        f"idle CPU ≤ 1 %: {_verdict(ours.idle_cpu_percent, TARGETS['cpu'])}; "
        f"stop ≤ 5 s: {_verdict(ours.stop_s, TARGETS['stop'])}."
    )
    if theirs is None:
        lines.append("uWSGI not measured (use --uwsgi-count N; each uWSGI vassal is 2 processes).")
    for r in runs:
        if r.error:
            lines.append(f"**{r.label}**: {r.error}.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Scale: many vassals in one directory.")
    p.add_argument("--count", type=int, default=1000, help="trimperor vassals (default 1000)")
    p.add_argument("--idle", type=float, default=30.0, help="idle window, seconds (default 30)")
    p.add_argument(
        "--uwsgi-count",
        type=int,
        default=0,
        help="uWSGI vassals for uwsgi --emperor (default 0: skipped; they are heavy)",
    )
    p.add_argument("--log-level", default="warning", help="trimperor's --log-level (warning)")
    add_run_options(p, trimperor_arg="extra argument")
    return p.parse_args(argv)


def print_notes(results: Sequence[ScaleResult | None]) -> None:
    for r in results:
        if r is not None:
            print_log_notes(
                f"{r.label} log: {len(r.log_notes)} of {r.log_lines} lines worth a look",
                r.log_notes,
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run = RunOptions.of(args)
        ours, theirs = measure(args.count, args.idle, args.uwsgi_count, args.log_level, run)
        print(render(ours, theirs))
        print_notes([ours, theirs])
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
