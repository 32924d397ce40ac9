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
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from benchlib import (
    DEFAULT_RUN,
    Emperor,
    Janitor,
    Rounds,
    RunOptions,
    add_run_options,
    fmt,
    is_gone,
    print_log_notes,
    ratio,
    read_pid_file,
    run_main,
    summary_row,
    trimperor_command,
    uwsgi_binary,
    verdict,
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


class EmperorLatency(Rounds):
    """One emperor's rounds (see :class:`benchlib.Rounds`)."""


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


def _measure_one(
    janitor: Janitor,
    result: EmperorLatency,
    argv_for: Callable[[Path], list[str]],
    vassal_for: Callable[[Path, Path], str],
    timeout: float,
    max_phase: float,
    interesting: Sequence[str],
    rng: random.Random,
    run: RunOptions,
) -> EmperorLatency:
    """One emperor (started by ``argv_for(vassals)``, its vassal ``vassal_for(marks, run)``)."""
    label = result.label.split(maxsplit=1)[0]
    base = janitor.tempdir(f"{label}-latency-")
    vassals, marks, rundir = base / "vassals", base / "marks", base / "run"
    for d in (vassals, marks, rundir):
        d.mkdir()
    emperor = janitor.start(label, argv_for(vassals), base / "emperor.log", base)
    try:
        _rounds(
            emperor,
            janitor,
            result,
            vassals,
            marks,
            vassal_for(marks, rundir),
            timeout,
            max_phase,
            rng,
            run.progress,
        )
    finally:
        result.log_notes += _notes(emperor, interesting)
        janitor.finish(emperor, base, run.keep_logs, "latency")
    return result


def measure_trimperor(
    janitor: Janitor, rounds: int, rng: random.Random, run: RunOptions
) -> EmperorLatency:
    extra = list(run.trimperor_args)
    return _measure_one(
        janitor,
        EmperorLatency("trimperor", " ".join(["python -m trimperor", "DIR", *extra]), rounds),
        lambda vassals: trimperor_command(str(vassals), *extra),
        lambda marks, _: native_vassal(marks),
        TRIMPEROR_TIMEOUT,
        MAX_PHASE,
        ("WARNING", "ERROR", "CRITICAL", "Traceback"),
        rng,
        run,
    )


def measure_uwsgi(
    janitor: Janitor, uwsgi: str, rounds: int, rng: random.Random, run: RunOptions
) -> EmperorLatency:
    return _measure_one(
        janitor,
        EmperorLatency("uwsgi --emperor", "uwsgi --emperor DIR", rounds),
        lambda vassals: [uwsgi, "--emperor", str(vassals)],
        uwsgi_vassal,
        UWSGI_TIMEOUT,
        UWSGI_MAX_PHASE,
        ("error", "ERROR", "DAMN"),
        rng,
        run,
    )


def measure(
    rounds: int = 50, uwsgi_rounds: int = 20, run: RunOptions = DEFAULT_RUN
) -> LatencyResult:
    rng = random.Random(run.seed)
    with Janitor() as janitor:
        run.progress(f"latency: trimperor, {rounds} rounds")
        ours = measure_trimperor(janitor, rounds, rng, run)
        uwsgi = uwsgi_binary()
        if run.skip_uwsgi or uwsgi_rounds <= 0:
            return LatencyResult(ours, None, "skipped on request")
        if uwsgi is None:
            return LatencyResult(ours, None, "uwsgi is not installed")
        run.progress(f"latency: uwsgi --emperor, {uwsgi_rounds} rounds")
        theirs = measure_uwsgi(janitor, uwsgi, uwsgi_rounds, rng, run)
        return LatencyResult(ours, theirs)


# -- output -------------------------------------------------------------------------------------


def render(result: LatencyResult) -> str:
    """A markdown report: one table of order statistics, the ratios and the targets."""
    lines = [
        "| emperor, event | n | min ms | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    runs = [result.trimperor] + ([result.uwsgi] if result.uwsgi else [])
    for r in runs:
        lines.append(summary_row(f"{r.label}, file added → vassal running", r.up))
        lines.append(summary_row(f"{r.label}, file removed → vassal gone", r.down))
    lines.append("")
    for r in runs:
        problems = r.problems("their file was removed")
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
        f"({verdict(up.p50, 20)}); p99 ≤ 100 ms: {fmt(up.p99)} ms ({verdict(up.p99, 100)})."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=50, help="trimperor rounds (default 50)")
    p.add_argument(
        "--uwsgi-rounds",
        type=int,
        default=20,
        help="uwsgi --emperor rounds, each takes 1-4 s (default 20; 0 skips uWSGI)",
    )
    add_run_options(
        p,
        seed="seed for the random pauses",
        skip_uwsgi="measure trimperor only",
        trimperor_arg="extra argument for trimperor, repeatable "
        "(e.g. --trimperor-arg=--log-level=debug)",
    )
    return p.parse_args(argv)


def print_notes(result: LatencyResult, what: str = "") -> None:
    for r in (result.trimperor, result.uwsgi):
        if r is not None:
            print_log_notes(
                f"{what}{r.label} log lines worth a look ({len(r.log_notes)})", r.log_notes
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        result = measure(args.rounds, args.uwsgi_rounds, RunOptions.of(args))
        print(render(result))
        print_notes(result)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
