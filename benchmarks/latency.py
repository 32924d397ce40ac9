"""Reaction latency: a configuration file appears or disappears, until the vassal runs or is gone.

For each emperor (trimperor, then ``uwsgi --emperor`` at its defaults) on an
empty temporary directory, every round:

1. sleep a random 0-0.3 s (so that uWSGI's 3 s polling is not in lock-step
   with the drops), write ``.rNNN.ini.tmp`` and ``os.replace`` it to
   ``rNNN.ini`` (an atomic rename; the emperors ignore the dot-tmp name);
2. *up* = the vassal's own record of its start (``date +%s%N``, written by the
   vassal process) minus ``time.time_ns()`` taken just before the rename.
   Both are CLOCK_REALTIME;
3. sleep a random 0-0.3 s, remove the file;
4. *down* = from just before the removal until the vassal's pid has no
   ``/proc`` entry or is a zombie, polled every millisecond.

The trimperor vassal is native: ``/bin/sh -c 'date ... > MARK; echo $$ >
PIDFILE; exec sleep 600'``. The uWSGI vassal is the same written as a uWSGI
config: a master with one worker on a unix socket and no app (uWSGI stays up
in "full dynamic mode"), whose ``exec-asap`` hook records the time and the
master's pid (the hook's ``$PPID``). Each emperor gets 2 s to start up, then
one unmeasured warm-up round.

Run: ``python benchmarks/latency.py [--rounds 50] [--uwsgi-rounds 20]``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from benchlib import (
    Emperor,
    Janitor,
    Summary,
    fmt,
    is_gone,
    keep_log,
    ratio,
    read_pid_file,
    sigterm_as_interrupt,
    trimperor_command,
    uwsgi_binary,
    wait_until,
)

__all__ = ["EmperorLatency", "LatencyResult", "main", "measure", "render"]

#: Give up on one appearance or disappearance after this long (seconds).
TRIMPEROR_TIMEOUT = 10.0
UWSGI_TIMEOUT = 20.0
#: Time given to an emperor to start up before the warm-up round (seconds).
STARTUP = 2.0
#: The random pause before each drop and each removal (seconds). For uWSGI it
#: is one whole polling period: with only 0-0.3 s, the rounds fall into step
#: with its 3 s scan (every drop was seen ~2.8 s later in a trial run).
MAX_PHASE = 0.3
UWSGI_MAX_PHASE = 3.0


@dataclass
class EmperorLatency:
    label: str
    command: str
    rounds: int
    up_ms: list[float] = field(default_factory=list)
    down_ms: list[float] = field(default_factory=list)
    missed_up: int = 0
    missed_down: int = 0
    died_early: int = 0
    log_notes: list[str] = field(default_factory=list)

    @property
    def up(self) -> Summary:
        return Summary.of(self.up_ms)

    @property
    def down(self) -> Summary:
        return Summary.of(self.down_ms)


@dataclass
class LatencyResult:
    trimperor: EmperorLatency
    uwsgi: EmperorLatency | None
    uwsgi_skipped: str = ""


# -- the vassals ----------------------------------------------------------------------------


def native_vassal(marks: Path) -> str:
    # %% is a literal % after trimperor's magic-variable expansion (%s is the file name).
    return (
        "[vassal]\n"
        f"command = /bin/sh -c 'date +%%s%%N > {marks}/%n.start; "
        f"echo $$ > {marks}/%n.pid; exec sleep 600'\n"
    )


def uwsgi_vassal(marks: Path, run: Path) -> str:
    # exec-asap runs through /bin/sh in the master before anything else, so
    # $PPID is the master; %% is a literal % after uWSGI's expansion.
    return (
        "[uwsgi]\n"
        "master = true\n"
        f"socket = {run}/%n.sock\n"
        f"exec-asap = date +%%s%%N > {marks}/%n.start; echo $PPID > {marks}/%n.pid\n"
    )


# -- one emperor ------------------------------------------------------------------------------


def _rounds(
    emperor: Emperor,
    janitor: Janitor,
    result: EmperorLatency,
    vassals: Path,
    marks: Path,
    text: str,
    timeout: float,
    max_phase: float,
    rng: random.Random,
    progress: Callable[[str], None],
) -> None:
    time.sleep(STARTUP)
    for i in range(result.rounds + 1):  # round 0 is the warm-up
        warmup = i == 0
        name = f"r{i:03d}"
        conf = vassals / f"{name}.ini"
        tmp = vassals / f".{name}.ini.tmp"
        mark = marks / f"{name}.start"
        pid_file = marks / f"{name}.pid"
        emperor.check_alive()

        time.sleep(rng.uniform(0, max_phase))
        tmp.write_text(text)
        t0 = time.time_ns()
        os.replace(tmp, conf)
        started = wait_until(
            partial(_written, mark, pid_file),
            timeout,
        )
        pid: int | None = None
        if started:
            started_ns = read_pid_file(mark)
            pid = read_pid_file(pid_file)
            assert started_ns is not None and pid is not None
            janitor.track([pid])
            if not warmup:
                result.up_ms.append((started_ns - t0) / 1e6)
        elif not warmup:
            result.missed_up += 1

        time.sleep(rng.uniform(0, max_phase))
        if pid is not None and is_gone(pid):
            result.died_early += 1
        t1 = time.time_ns()
        conf.unlink()
        if pid is None:
            # It never showed up: give it the time to, then let it go.
            time.sleep(1.0)
            late = read_pid_file(pid_file)
            if late is not None:
                janitor.track([late])
                wait_until(partial(is_gone, late), timeout)
            continue
        if wait_until(partial(is_gone, pid), timeout):
            if not warmup:
                result.down_ms.append((time.time_ns() - t1) / 1e6)
        elif not warmup:
            result.missed_down += 1
            result.log_notes.append(
                f"{name}: pid {pid} still running {timeout:.0f} s after removal"
            )
        if not warmup and (i % 10 == 0 or i == result.rounds):
            progress(f"  {result.label}: {i}/{result.rounds} rounds")


def _written(*paths: Path) -> bool:
    return all(read_pid_file(path) is not None for path in paths)


def _notes(emperor: Emperor, interesting: Sequence[str]) -> list[str]:
    return [line for line in emperor.log_lines() if any(w in line for w in interesting)]


def measure_trimperor(
    janitor: Janitor,
    rounds: int,
    rng: random.Random,
    extra_args: Sequence[str],
    progress: Callable[[str], None],
    keep_logs: Path | None = None,
) -> EmperorLatency:
    base = janitor.tempdir("trimperor-latency-")
    vassals, marks = base / "vassals", base / "marks"
    vassals.mkdir()
    marks.mkdir()
    argv = trimperor_command(str(vassals), *extra_args)
    result = EmperorLatency(
        "trimperor", " ".join(["python -m trimperor", "DIR", *extra_args]), rounds
    )
    emperor = janitor.start("trimperor", argv, base / "emperor.log", base)
    try:
        _rounds(
            emperor,
            janitor,
            result,
            vassals,
            marks,
            native_vassal(marks),
            TRIMPEROR_TIMEOUT,
            MAX_PHASE,
            rng,
            progress,
        )
    finally:
        result.log_notes += _notes(emperor, ("WARNING", "ERROR", "CRITICAL", "Traceback"))
        janitor.stop_emperor(emperor)
        keep_log(emperor, keep_logs, "latency")
        janitor.remove_dir(base)
    return result


def measure_uwsgi(
    janitor: Janitor,
    uwsgi: str,
    rounds: int,
    rng: random.Random,
    progress: Callable[[str], None],
    keep_logs: Path | None = None,
) -> EmperorLatency:
    base = janitor.tempdir("uwsgi-latency-")
    vassals, marks, run = base / "vassals", base / "marks", base / "run"
    for d in (vassals, marks, run):
        d.mkdir()
    argv = [uwsgi, "--emperor", str(vassals)]
    result = EmperorLatency("uwsgi --emperor", "uwsgi --emperor DIR", rounds)
    emperor = janitor.start("uwsgi", argv, base / "emperor.log", base)
    try:
        _rounds(
            emperor,
            janitor,
            result,
            vassals,
            marks,
            uwsgi_vassal(marks, run),
            UWSGI_TIMEOUT,
            UWSGI_MAX_PHASE,
            rng,
            progress,
        )
    finally:
        result.log_notes += _notes(emperor, ("error", "ERROR", "DAMN"))
        janitor.stop_emperor(emperor)
        keep_log(emperor, keep_logs, "latency")
        janitor.remove_dir(base)
    return result


def measure(
    rounds: int = 50,
    uwsgi_rounds: int = 20,
    seed: int | None = None,
    skip_uwsgi: bool = False,
    trimperor_args: Sequence[str] = (),
    progress: Callable[[str], None] = print,
    keep_logs: Path | None = None,
) -> LatencyResult:
    rng = random.Random(seed)
    with Janitor() as janitor:
        progress(f"latency: trimperor, {rounds} rounds")
        ours = measure_trimperor(janitor, rounds, rng, trimperor_args, progress, keep_logs)
        uwsgi = uwsgi_binary()
        if skip_uwsgi or uwsgi_rounds <= 0:
            return LatencyResult(ours, None, "skipped on request")
        if uwsgi is None:
            return LatencyResult(ours, None, "uwsgi is not installed")
        progress(f"latency: uwsgi --emperor, {uwsgi_rounds} rounds")
        theirs = measure_uwsgi(janitor, uwsgi, uwsgi_rounds, rng, progress, keep_logs)
        return LatencyResult(ours, theirs)


# -- output -------------------------------------------------------------------------------------


def _row(what: str, s: Summary) -> str:
    return f"| {what} | {s.n} | {fmt(s.minimum)} | {fmt(s.p50)} | {fmt(s.p99)} | {fmt(s.maximum)} |"


def render(result: LatencyResult) -> str:
    """A markdown report: one table of order statistics, the ratios and the targets."""
    lines = [
        "| emperor, event | n | min ms | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    runs = [result.trimperor] + ([result.uwsgi] if result.uwsgi else [])
    for r in runs:
        lines.append(_row(f"{r.label}, file added → vassal running", r.up))
        lines.append(_row(f"{r.label}, file removed → vassal gone", r.down))
    lines.append("")
    for r in runs:
        problems = []
        if r.missed_up:
            problems.append(f"{r.missed_up} vassal(s) never started within the timeout")
        if r.missed_down:
            problems.append(f"{r.missed_down} vassal(s) never stopped within the timeout")
        if r.died_early:
            problems.append(f"{r.died_early} vassal(s) died before their file was removed")
        if problems:
            lines.append(f"**{r.label}**: " + "; ".join(problems) + ".")
    if result.uwsgi is not None:
        t, u = result.trimperor, result.uwsgi
        lines.append(
            "Ratios uwsgi / trimperor: "
            f"up p50 {fmt(ratio(u.up.p50, t.up.p50))}x, "
            f"up p99 {fmt(ratio(u.up.p99, t.up.p99))}x, "
            f"down p50 {fmt(ratio(u.down.p50, t.down.p50))}x, "
            f"down p99 {fmt(ratio(u.down.p99, t.down.p99))}x."
        )
    else:
        lines.append(f"uWSGI not measured: {result.uwsgi_skipped}.")
    up = result.trimperor.up
    lines.append("")
    lines.append(
        f"trimperor targets (file added → running): p50 ≤ 20 ms: {fmt(up.p50)} ms "
        f"({_verdict(up.p50, 20)}); p99 ≤ 100 ms: {fmt(up.p99)} ms ({_verdict(up.p99, 100)})."
    )
    return "\n".join(lines)


def _verdict(value: float, target: float) -> str:
    if math.isnan(value):
        return "not measured"
    return "met" if value <= target else "MISSED"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=50, help="trimperor rounds (default 50)")
    p.add_argument(
        "--uwsgi-rounds",
        type=int,
        default=20,
        help="uwsgi --emperor rounds, each takes 1-4 s (default 20; 0 skips uWSGI)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the random pauses")
    p.add_argument("--skip-uwsgi", action="store_true", help="measure trimperor only")
    p.add_argument(
        "--trimperor-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for trimperor, repeatable (e.g. --trimperor-arg=--log-level=debug)",
    )
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the emperors' logs into DIR")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    try:
        result = measure(
            rounds=args.rounds,
            uwsgi_rounds=args.uwsgi_rounds,
            seed=args.seed,
            skip_uwsgi=args.skip_uwsgi,
            trimperor_args=args.trimperor_arg,
            progress=lambda s: print(s, file=sys.stderr, flush=True),
            keep_logs=args.keep_logs,
        )
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(render(result))
    for r in (result.trimperor, result.uwsgi):
        if r is not None and r.log_notes:
            print(f"\n{r.label} log lines worth a look ({len(r.log_notes)}):")
            for line in r.log_notes[:20]:
                print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
