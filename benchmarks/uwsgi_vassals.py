"""The same uWSGI vassal under ``uwsgi --emperor`` and under ``trimperor``, in one command.

The vassal is the seed's Werkzeug test application on an HTTP socket::

    [uwsgi]
    module = werkzeug.testapp:test_app
    master = true
    processes = 2
    http-socket = 127.0.0.1:PORT
    pidfile = RUN/%n.pid

Both emperors run at their defaults on an empty temporary directory:
``uwsgi --emperor DIR`` and ``python -m trimperor DIR --binary-path UWSGI
--log-level warning``. Each round:

1. sleep a random phase (0-3 s for uWSGI, whose directory monitor polls every
   3 s, so that drops are not in step with its scans; 0-0.3 s for trimperor),
   then drop the file with an atomic ``os.replace``;
2. *up* = from just before the rename until ``GET /`` answers 200 (a refused
   connection is retried after 2 ms; a request that connects waits for its
   answer, so the first worker able to serve ends the measurement);
3. sleep a random phase, then remove the file;
4. *down* = from just before the removal until nothing listens on the port
   any more (read from ``/proc/net/tcp``, polled every millisecond; probing with
   ``connect()`` would fill the dying vassal's listen queue and then hang on
   SYN retransmits, adding up to a second). Then, unmeasured, wait until the
   master process is gone before the next round.

Each emperor gets one unmeasured warm-up round first.

The vassal's own times, without any emperor, are the floor both emperors are
compared against (the target is trimperor within 50 ms of them):

* *own boot*: ``uwsgi --ini FILE`` started directly, with a control socketpair
  on ``UWSGI_EMPEROR_FD`` as an emperor would give it, from ``exec`` to the
  first 200;
* *own stop*: byte 0 written on that socketpair (the emperor's stop message;
  the master answers with the same "kill them all" it runs on SIGINT) until
  nothing listens on the port;
* as a cross-check, the same without an emperor channel: boot, then SIGINT.

Run: ``python benchmarks/uwsgi_vassals.py [--uwsgi-rounds 10] [--trimperor-rounds 20]
[--own-rounds 10] [--keep-logs DIR] [--json FILE]``. Progress goes to stderr and
the report (markdown) to stdout. Every process started is stopped and every
temporary directory removed on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import random
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from benchlib import (
    Emperor,
    Janitor,
    add_run_options,
    fmt,
    free_port,
    is_gone,
    keep_log,
    percentile,
    progress,
    ratio,
    run_main,
    trimperor_command,
    wait_until,
    write_json,
)
from benchlib import uwsgi_binary as _uwsgi_binary

__all__ = ["main"]

#: The issue's target: trimperor within this much of the vassal's own times (ms).
TARGET_MS = 50.0
#: Give up on one appearance or disappearance after this long (s).
UP_TIMEOUT = 20.0
DOWN_TIMEOUT = 30.0
#: Random pause before each drop and each removal (s).
UWSGI_PHASE = 3.0
TRIMPEROR_PHASE = 0.3
#: Time given to an emperor to start before its warm-up round (s).
STARTUP = 1.0


# -- statistics --------------------------------------------------------------------------------


@dataclass
class Series:
    """Durations of one kind, in milliseconds."""

    values: list[float] = field(default_factory=list)
    missed: int = 0

    @property
    def p50(self) -> float:
        return percentile(self.values, 50)

    def row(self) -> str:
        v = self.values
        if not v:
            return f"n/a | n/a | n/a | 0 (missed {self.missed})"
        missed = f" (missed {self.missed})" if self.missed else ""
        return f"{fmt(min(v), 0)} | **{fmt(self.p50, 0)}** | {fmt(max(v), 0)} | {len(v)}{missed}"


@dataclass
class EmperorRun:
    label: str
    command: str
    rounds: int
    up: Series = field(default_factory=Series)
    down: Series = field(default_factory=Series)
    notes: list[str] = field(default_factory=list)


@dataclass
class OwnRun:
    boot: Series = field(default_factory=Series)
    stop: Series = field(default_factory=Series)
    plain_boot: Series = field(default_factory=Series)
    sigint_stop: Series = field(default_factory=Series)


# -- probes ------------------------------------------------------------------------------------


def http_status(port: int) -> int | None:
    """The status of ``GET /``, or None if nothing accepted the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:PORT (or the wildcard address)."""
    wanted = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and local.endswith(wanted):
                return True
    return False


def time_until_200(port: int, since: float, timeout: float) -> float | None:
    """Seconds from *since* (a ``perf_counter`` value) until ``GET /`` answers 200,
    or None after *timeout*."""
    deadline = since + timeout
    while time.perf_counter() < deadline:
        if http_status(port) == 200:
            return time.perf_counter() - since
        time.sleep(0.002)
    return None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# -- the vassal --------------------------------------------------------------------------------


def vassal_ini(port: int, run: Path) -> str:
    return (
        "[uwsgi]\n"
        "module = werkzeug.testapp:test_app\n"
        "master = true\n"
        "processes = 2\n"
        f"http-socket = 127.0.0.1:{port}\n"
        f"pidfile = {run}/%n.pid\n"
    )


def uwsgi_binary(given: str | None) -> str:
    if given:
        return given
    found = _uwsgi_binary()
    if found is None:
        raise SystemExit("uwsgi not found: pip install uwsgi, or pass --uwsgi PATH")
    return found


# -- the vassal on its own ---------------------------------------------------------------------


def measure_own(
    janitor: Janitor, uwsgi: str, rounds: int, progress: Callable[[str], None]
) -> OwnRun:
    """Boot and stop of the vassal without an emperor's detection in the way."""
    base = janitor.tempdir("uwsgi-vassal-own-")
    run = base / "run"
    run.mkdir()
    port = free_port()
    conf = base / "app.ini"
    conf.write_text(vassal_ini(port, run))
    log = base / "vassal.log"
    result = OwnRun()

    for i in range(rounds + 1):  # round 0 is the warm-up
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {**os.environ, "UWSGI_EMPEROR_FD": str(theirs.fileno())}
            env.pop("UWSGI_RELOADS", None)
            t0 = time.perf_counter()
            argv = [uwsgi, "--ini", str(conf)]
            vassal = janitor.register(Emperor("uwsgi", argv, log, base, env, [theirs.fileno()]))
            theirs.close()
            up, down = _boot_and_stop(janitor, vassal, t0, port, partial(ours.send, b"\x00"))
            if i:
                _record(result.boot, up)
                _record(result.stop, down)
        finally:
            ours.close()
            theirs.close()
        if i and i % 5 == 0:
            progress(f"  vassal on its own (emperor channel, byte 0): {i}/{rounds}")

    plain_rounds = max(1, rounds // 2)
    for i in range(plain_rounds + 1):
        t0 = time.perf_counter()
        vassal = janitor.start("uwsgi", [uwsgi, "--ini", str(conf)], log, base)
        up, down = _boot_and_stop(
            janitor, vassal, t0, port, partial(vassal.popen.send_signal, signal.SIGINT)
        )
        if i:
            _record(result.plain_boot, up)
            _record(result.sigint_stop, down)
    progress(f"  vassal on its own (no emperor, SIGINT): {plain_rounds}/{plain_rounds}")
    return result


def _boot_and_stop(
    janitor: Janitor, vassal: Emperor, t0: float, port: int, stop: Callable[[], object]
) -> tuple[float | None, float | None]:
    """Seconds from *t0* (when *vassal* was started) until it answers 200, and from
    ``stop()`` until nothing listens on *port* (None for a timeout); then reap it."""
    up = time_until_200(port, t0, UP_TIMEOUT)
    t1 = time.perf_counter()
    stop()
    down_ok = wait_until(lambda: not listening(port), DOWN_TIMEOUT)
    down = time.perf_counter() - t1 if down_ok else None
    janitor.stop_emperor(vassal, None, DOWN_TIMEOUT)
    return up, down


def _record(series: Series, seconds: float | None) -> None:
    if seconds is None:
        series.missed += 1
    else:
        series.values.append(seconds * 1000)


# -- one emperor -------------------------------------------------------------------------------


def measure_emperor(
    janitor: Janitor,
    label: str,
    argv_for: Callable[[Path], list[str]],
    shown: str,
    stop_signal: int,
    rounds: int,
    phase: float,
    rng: random.Random,
    progress: Callable[[str], None],
    keep_logs: Path | None,
    own_group: bool,
) -> EmperorRun:
    base = janitor.tempdir(f"{label}-vassals-")
    vassals, run = base / "vassals", base / "run"
    vassals.mkdir()
    run.mkdir()
    port = free_port()
    text = vassal_ini(port, run)
    log = base / "emperor.log"
    result = EmperorRun(label, shown, rounds)
    emperor: Emperor = janitor.start(label, argv_for(vassals), log, base)
    try:
        time.sleep(STARTUP)
        for i in range(rounds + 1):  # round 0 is the warm-up
            emperor.check_alive()
            conf, tmp = vassals / "app.ini", vassals / ".app.ini.tmp"
            pidfile = run / "app.pid"
            pidfile.unlink(missing_ok=True)
            tmp.write_text(text)

            time.sleep(rng.uniform(0, phase))
            t0 = time.perf_counter()
            os.replace(tmp, conf)
            up = time_until_200(port, t0, UP_TIMEOUT)
            pid = read_pid(pidfile)
            if pid is not None and own_group:
                janitor.track_group(pid)

            time.sleep(rng.uniform(0, phase))
            t1 = time.perf_counter()
            conf.unlink()
            down_ok = wait_until(lambda: not listening(port), DOWN_TIMEOUT)
            t2 = time.perf_counter()
            if pid is not None and not wait_until(partial(is_gone, pid), DOWN_TIMEOUT):
                result.notes.append(f"round {i}: master {pid} still alive after removal")
            if i:
                _record(result.up, up)
                _record(result.down, t2 - t1 if down_ok else None)
            if i and (i % 5 == 0 or i == rounds):
                progress(f"  {label}: {i}/{rounds} rounds")
    finally:
        janitor.stop_emperor(emperor, stop_signal, group=False)
        if label == "trimperor":
            result.notes += emperor.notes((" WARNING ", " ERROR "))[1][:20]
        keep_log(emperor, keep_logs, "uwsgi-vassals")
    return result


# -- the report --------------------------------------------------------------------------------


def render(
    uwsgi_run: EmperorRun | None, trim: EmperorRun | None, own: OwnRun | None, command: str
) -> str:
    out = ["## The same uWSGI vassal under `uwsgi --emperor` and `trimperor`", ""]
    out += [f"Command: `{command}`", ""]
    out += ["| what | up min / **p50** / max (ms) | n | down min / **p50** / max (ms) | n |"]
    out += ["|---|---|---|---|---|"]

    def emperor_row(r: EmperorRun) -> str:
        up, down = r.up.row().rsplit(" | ", 1), r.down.row().rsplit(" | ", 1)
        ups, downs = up[0].replace(" | ", " / "), down[0].replace(" | ", " / ")
        return f"| `{r.command}` | {ups} | {up[1]} | {downs} | {down[1]} |"

    for r in (uwsgi_run, trim):
        if r is not None:
            out.append(emperor_row(r))
    if own is not None:
        for what, a, b in (
            ("vassal on its own: exec to 200; byte 0 on its emperor fd", own.boot, own.stop),
            ("vassal on its own, no emperor: exec to 200; SIGINT", own.plain_boot, own.sigint_stop),
        ):
            up, down = a.row().rsplit(" | ", 1), b.row().rsplit(" | ", 1)
            ups, downs = up[0].replace(" | ", " / "), down[0].replace(" | ", " / ")
            out.append(f"| {what} | {ups} | {up[1]} | {downs} | {down[1]} |")
    out.append("")

    if uwsgi_run is not None and trim is not None:
        up_ratio = ratio(uwsgi_run.up.p50, trim.up.p50)
        down_ratio = ratio(uwsgi_run.down.p50, trim.down.p50)
        out.append(
            f"p50 ratio uWSGI / trimperor: up **{fmt(up_ratio, 1)}x**, "
            f"down **{fmt(down_ratio, 1)}x**."
        )
    if trim is not None and own is not None:
        extra_up = trim.up.p50 - own.boot.p50
        extra_down = trim.down.p50 - own.stop.p50
        out.append("")
        out.append(
            f"trimperor minus the vassal's own time (p50): up **{fmt(extra_up, 0)} ms** "
            f"({_verdict(extra_up)}), down **{fmt(extra_down, 0)} ms** ({_verdict(extra_down)}); "
            f"target: within {TARGET_MS:.0f} ms."
        )
    notes = [(r.label, n) for r in (uwsgi_run, trim) if r is not None for n in r.notes]
    if notes:
        out += ["", "Notes from the runs:", ""]
        out += [f"- {label}: `{note.strip()}`" for label, note in notes]
    return "\n".join(out) + "\n"


def _verdict(extra_ms: float) -> str:
    if math.isnan(extra_ms):
        return "n/a"
    return "meets the target" if extra_ms <= TARGET_MS else "misses the target"


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, help="rounds for both emperors (overrides the two below)")
    p.add_argument("--uwsgi-rounds", type=int, default=10, help="uwsgi --emperor rounds (10)")
    p.add_argument("--trimperor-rounds", type=int, default=20, help="trimperor rounds (20)")
    p.add_argument(
        "--own-rounds", type=int, default=10, help="rounds of the vassal on its own (10)"
    )
    p.add_argument("--uwsgi", metavar="PATH", help="the uwsgi binary (default: the venv's)")
    add_run_options(
        p,
        seed="seed for the random phases",
        skip_uwsgi="do not run uwsgi --emperor",
        keep_logs="copy the emperors' logs here",
        json="also write the raw figures here",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rounds is not None:
        args.uwsgi_rounds = args.trimperor_rounds = args.rounds
    uwsgi = uwsgi_binary(args.uwsgi)
    rng = random.Random(args.seed)
    command = "python benchmarks/uwsgi_vassals.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )

    def body() -> int:
        uwsgi_run = None
        with Janitor() as janitor:
            progress("the vassal on its own")
            own = measure_own(janitor, uwsgi, args.own_rounds, progress)
            progress("trimperor")
            trim = measure_emperor(
                janitor,
                "trimperor",
                lambda d: trimperor_command(
                    str(d), "--binary-path", uwsgi, "--log-level", "warning"
                ),
                "python -m trimperor DIR --binary-path UWSGI --log-level warning",
                signal.SIGTERM,
                args.trimperor_rounds,
                TRIMPEROR_PHASE,
                rng,
                progress,
                args.keep_logs,
                own_group=True,
            )
            if not args.skip_uwsgi:
                progress("uwsgi --emperor")
                uwsgi_run = measure_emperor(
                    janitor,
                    "uwsgi",
                    lambda d: [uwsgi, "--emperor", str(d)],
                    "uwsgi --emperor DIR",
                    signal.SIGINT,
                    args.uwsgi_rounds,
                    UWSGI_PHASE,
                    rng,
                    progress,
                    args.keep_logs,
                    own_group=False,
                )
        print(render(uwsgi_run, trim, own, command.strip()))
        doc = {
            "command": command.strip(),
            "uwsgi": asdict(uwsgi_run) if uwsgi_run else None,
            "trimperor": asdict(trim),
            "own": asdict(own),
        }
        write_json(args.json, doc, indent=2)
        return 0

    return run_main(body, "was stopped and removed")


if __name__ == "__main__":
    sys.exit(main())
