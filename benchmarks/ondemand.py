"""On-demand vassals: the wake overhead, and what 10,000 armed vassals cost.

**Wake overhead** (``--only wake``). A one-line Python server (written into
the temporary directory: it takes its listening unix socket systemd's way on
fd 3, answers ``ok`` to each connection and closes it) is measured three ways,
round after round, one at a time:

* *own*: this process binds the socket, connects, then starts the server
  itself with ``posix_spawn`` (the socket on fd 3, ``LISTEN_FDS=1``; no
  ``LISTEN_PID``, which the parent cannot know before the spawn) and waits for
  the first byte of the answer;
* *trimperor, exit 0*: a native vassal with ``socket = SOCKS/%n.sock`` and
  ``on-demand = true`` whose server exits with status 0 after one connection
  (trimperor re-arms its socket);
* *trimperor, idle*: the same server staying up, put to sleep by
  ``idle = 0.2``.

Each on-demand measurement is connect → first byte of the answer while the
vassal is armed (no process; the stats say ``armed``); the wake overhead is
its p50 minus the own p50 (issue 8's target: ≤ 3 ms; issue 3's was ≤ 5 ms).

``--background N`` adds N other on-demand vassals of the same kind to the
vassal directory (``bgNNNNN.ini``), left armed the whole time; the rounds
begin once the emperors hold all their sockets (trimperor: watched by its
epoll instance; uWSGI's emperor: bound). Issue 8's target: the wake at
10,000 armed costs ≤ 5 ms more than with one.

The same is done with a uWSGI vassal (``protocol = http``, a three-line WSGI
application, ``master``, one worker, ``idle = 1``, ``die-on-idle``): started
directly with the socket on fd 0 (as uWSGI's emperor passes it), under
``uwsgi --emperor DIR --emperor-on-demand-directory SOCKS`` and under
``trimperor DIR --on-demand-directory SOCKS --binary-path UWSGI``, both
emperors watching the *same* vassal file. The request is ``GET /`` over
HTTP/1.0; before each emperor round the vassal must be back asleep (no
process under the emperor; for trimperor also ``armed`` in its stats).

**10,000 armed vassals** (``--only armed``, ``--count``). That many native
on-demand vassals (the one-line server, exiting after one connection), each
with its own unix socket in one directory, under ``trimperor DIR --stats
SOCK --log-level warning``:

* time until every socket file exists, and until every vassal is *armed*:
  the emperor's epoll instance watches at least ``--count`` descriptors (read
  from ``/proc/PID/fdinfo``; the same test for both emperors, and it asks the
  emperor nothing);
* the emperor's RSS 2 s later and after the idle window, its threads, open
  fds and open-file limit; its own CPU time over ``--idle`` seconds, as a
  share of one core; vassal processes seen meanwhile (none expected);
* then one stats request: every vassal must be ``armed`` (and what that
  request costs: time, RSS);
* a random sample of ``--sample`` vassals is connected to, one after the
  other: each must answer (connect → first byte is recorded), and all must
  be armed again afterwards (stats: ``wakes`` = 1 for the sample), with the
  fd count unchanged;
* SIGTERM, and the time until the emperor has exited.

The same shape under ``uwsgi --emperor DIR --emperor-on-demand-directory
SOCKS`` with ``--uwsgi-count`` copies of the uWSGI vassal above (uWSGI's
emperor binds each ``SOCKS/NAME.socket`` itself; without stats, "asleep
again" is the count of its ``back to "on demand" mode`` log lines).

Run: ``python benchmarks/ondemand.py [--only wake|armed] [--rounds 30]
[--uwsgi-rounds 20] [--count 10000] [--uwsgi-count 10000] [--idle 30]
[--sample 20] [--background N]``. Progress goes to stderr, a markdown report to stdout; every
process started is stopped and every temporary directory removed on exit, on
Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchlib import (
    CLK_TCK,
    DEFAULT_RUN,
    Emperor,
    Janitor,
    RunOptions,
    add_run_options,
    cpu_ticks,
    epoll_fds,
    epoll_watches,
    fd_limits,
    fmt,
    keep_log,
    open_fds,
    percentile,
    print_log_notes,
    query_stats,
    ratio,
    run_main,
    spawn_in_session,
    status_field,
    status_field_kib,
    trimperor_command,
    uwsgi_binary,
    vassals_of,
    verdict,
    wait_until,
)

__all__ = ["ArmedResult", "WakeResult", "WakeSeries", "main", "measure", "render"]

#: Issue 8's targets (issue 3's were 5 ms, 200 MB and 1 %).
WAKE_TARGET_MS = 3.0
RSS_TARGET_MB = 60.0
CPU_TARGET_PERCENT = 0.3
#: 1 MiB in MB: the RSS target is checked in decimal megabytes, the stricter reading.
MB_PER_MIB = 1.048576

#: Give up on one answer after this long (s).
ANSWER_TIMEOUT = 30.0
#: Give up waiting for a vassal to be asleep again after this long (s).
ASLEEP_TIMEOUT = 30.0
#: Random pause before each measurement (s), so that nothing runs in step.
PHASE = 0.05
#: Settle time between "all armed" and the idle window (s).
SETTLE = 2.0

HTTP_GET = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
ENV_DROPPED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC")

SERVER = '''\
"""One-line server of benchmarks/ondemand.py: systemd's socket activation on fd 3.

Answers "ok" to every connection and closes it; with --once, exits 0 after the
first one. LISTEN_PID, when set, must be our own pid.
"""
import os
import socket
import sys

listen_pid = os.environ.get("LISTEN_PID")
if listen_pid is not None and listen_pid != str(os.getpid()):
    sys.exit("LISTEN_PID names another process")
if int(os.environ.get("LISTEN_FDS", "0")) < 1:
    sys.exit("no LISTEN_FDS")
listener = socket.socket(fileno=3)
listener.setblocking(True)
once = "--once" in sys.argv
while True:
    conn, _ = listener.accept()
    conn.sendall(b"ok\\n")
    conn.close()
    if once:
        break
'''

WSGI_APP = """\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\\n"]
"""


# -- the vassals ------------------------------------------------------------------------


def _escape(path: Path | str) -> str:
    """A path for a vassal file: shell-quoted, and % doubled for the magic variables."""
    return shlex.quote(str(path)).replace("%", "%%")


def server_argv(server: Path, once: bool) -> list[str]:
    return [sys.executable, "-I", "-S", str(server), *(["--once"] if once else [])]


def native_vassal(server: Path, socks: Path, once: bool, idle: float | None = None) -> str:
    command = " ".join(_escape(word) for word in server_argv(server, once))
    lines = [
        "[vassal]",
        f"command = {command}",
        f"socket = {str(socks).replace('%', '%%')}/%n.sock",
        "on-demand = true",
    ]
    if idle is not None:
        lines.append(f"idle = {idle}")
    return "\n".join(lines) + "\n"


def uwsgi_vassal(app: Path) -> str:
    # uWSGI hands the on-demand socket over on fd 0 as a uwsgi-protocol socket;
    # protocol = http makes it speak HTTP. idle is in whole seconds (1 is the least).
    return (
        "[uwsgi]\n"
        f"wsgi-file = {app}\n"
        "protocol = http\n"
        "master = true\n"
        "processes = 1\n"
        "idle = 1\n"
        "die-on-idle = true\n"
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENV_DROPPED}


def _native_ok(data: bytes) -> bool:
    return data.startswith(b"ok")


def _http_ok(data: bytes) -> bool:
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]


# -- measuring one answer ------------------------------------------------------------------


def first_byte(
    path: Path,
    payload: bytes,
    timeout: float = ANSWER_TIMEOUT,
    after_connect: Callable[[], None] | None = None,
) -> tuple[float, bytes]:
    """Connect to the unix socket *path*, send *payload*, read the whole answer.

    Returns (ms from just before connect() to the first byte of the answer, the
    answer). *after_connect* runs between the request and the wait (the own
    runs start the server there).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        t0 = time.perf_counter_ns()
        s.connect(str(path))
        if payload:
            s.sendall(payload)
        if after_connect is not None:
            after_connect()
        data = s.recv(4096)
        t1 = time.perf_counter_ns()
        while len(data) < 1 << 16:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return (t1 - t0) / 1e6, data


@dataclass
class WakeSeries:
    label: str
    ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.ms, q)

    def measure(
        self,
        warmup: bool,
        path: Path,
        payload: bytes,
        ok: Callable[[bytes], bool],
        after_connect: Callable[[], None] | None = None,
    ) -> bool:
        try:
            ms, data = first_byte(path, payload, after_connect=after_connect)
        except OSError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return False
        if not ok(data):
            self.failures.append(f"unexpected answer {data[:60]!r}")
            return False
        if not warmup:
            self.ms.append(ms)
        return True


@dataclass
class WakeResult:
    command_native: str = ""
    own: WakeSeries = field(default_factory=lambda: WakeSeries("own"))
    exit0: WakeSeries = field(default_factory=lambda: WakeSeries("exit0"))
    idle: WakeSeries = field(default_factory=lambda: WakeSeries("idle"))
    uwsgi_own: WakeSeries = field(default_factory=lambda: WakeSeries("uwsgi own"))
    uwsgi_emperor: WakeSeries = field(default_factory=lambda: WakeSeries("uwsgi --emperor"))
    trimperor_uwsgi: WakeSeries = field(default_factory=lambda: WakeSeries("trimperor"))
    uwsgi_measured: bool = False
    uwsgi_skipped: str = ""
    uwsgi_rounds: int = 0
    rounds: int = 0
    background: int = 0
    """Other on-demand vassals armed meanwhile (``--background``)."""
    log_notes: list[str] = field(default_factory=list)


def _vassal_doc(stats_path: Path, name: str) -> dict[str, Any] | None:
    try:
        doc = query_stats(stats_path, timeout=10)
    except (OSError, ValueError):
        return None
    for vassal in doc.get("vassals", []):
        if vassal.get("name") == name:
            found: dict[str, Any] = vassal
            return found
    return None


def _is_armed(stats_path: Path, name: str) -> bool:
    vassal = _vassal_doc(stats_path, name)
    return vassal is not None and vassal.get("state") == "armed" and vassal.get("pid") == -1


def _wait_armed(emperor: Emperor, stats_path: Path, name: str) -> None:
    if not wait_until(lambda: _is_armed(stats_path, name), ASLEEP_TIMEOUT, 0.005):
        emperor.check_alive()
        raise RuntimeError(f"{name} was not armed again within {ASLEEP_TIMEOUT:.0f} s")


def _wait_childless(emperor: Emperor, settle: float) -> None:
    if not wait_until(lambda: not vassals_of(emperor.pid), ASLEEP_TIMEOUT, 0.005):
        emperor.check_alive()
        raise RuntimeError(f"{emperor.label}: a vassal still runs after {ASLEEP_TIMEOUT:.0f} s")
    time.sleep(settle)


def _log_notes(emperor: Emperor, words: Sequence[str]) -> list[str]:
    return [
        f"{emperor.label}: {line}"
        for line in emperor.log_lines()
        if any(word in line for word in words)
    ]


TRIMPEROR_WORDS = ("WARNING", "ERROR", "CRITICAL", "Traceback")
UWSGI_WORDS = ("error", "DAMN", "throttling", "NO MERCY", "unable")


def _background(vassals: Path, text: str, count: int) -> None:
    """*count* other vassals (``bgNNNNN.ini``) of the same text, to stay armed."""
    for i in range(count):
        (vassals / f"bg{i:05d}.ini").write_text(text)


def _wait_watched(emperor: Emperor, count: int) -> None:
    """Until trimperor's epoll instance watches *count* sockets (it arms them lazily)."""
    polls: list[int] = []

    def watched() -> bool:
        nonlocal polls
        polls = polls or epoll_fds(emperor.pid)
        return epoll_watches(emperor.pid, polls) >= count

    if not wait_until(watched, max(120.0, count * 0.03), 0.05):
        emperor.check_alive()
        raise RuntimeError(f"{emperor.label}: fewer than {count} sockets armed in time")


def _raise_fd_limit(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _wake_native(
    janitor: Janitor,
    result: WakeResult,
    rounds: int,
    rng: random.Random,
    run: RunOptions,
    background: int = 0,
) -> None:
    base = janitor.tempdir("trimperor-wake-")
    vassals, socks = base / "vassals", base / "socks"
    vassals.mkdir()
    socks.mkdir()
    server = base / "server.py"
    server.write_text(SERVER)
    (vassals / "exit0.ini").write_text(native_vassal(server, socks, once=True))
    (vassals / "idle.ini").write_text(native_vassal(server, socks, once=False, idle=0.2))
    _background(vassals, native_vassal(server, socks, once=True), background)
    stats = base / "stats.sock"
    extra = ["--stats", str(stats), "--log-level", "warning", *run.trimperor_args]
    result.command_native = " ".join(["python -m trimperor DIR", *extra]).replace(
        str(stats), "STATS"
    )
    own_path = base / "own.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(own_path))
    listener.listen(64)
    env = _clean_env() | {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "own.sock"}
    argv = server_argv(server, once=True)
    emperor = janitor.start(
        "trimperor", trimperor_command(str(vassals), *extra), base / "e.log", base
    )
    try:
        if background:
            run.progress(f"wake: waiting for {background} other vassals to be armed")
            _wait_watched(emperor, background + 2)
        for name in ("exit0.ini", "idle.ini"):
            _wait_armed(emperor, stats, name)
        run.progress(f"wake: one-line server, {rounds} rounds (own, exit 0, idle)")
        pids: list[int] = []

        def spawn_own() -> None:
            pid = spawn_in_session(argv, env, {3: listener.fileno()}, base / "own.log")
            janitor.adopt(pid)
            pids.append(pid)

        for i in range(rounds + 1):  # round 0 is the warm-up
            warmup = i == 0
            pids.clear()
            time.sleep(rng.uniform(0, PHASE))
            result.own.measure(warmup, own_path, b"", _native_ok, spawn_own)
            for pid in pids:
                code = janitor.reap(pid)
                if code != 0:
                    result.own.failures.append(f"own server exited with {code}")
            for series, name in ((result.exit0, "exit0"), (result.idle, "idle")):
                emperor.check_alive()
                time.sleep(rng.uniform(0, PHASE))
                series.measure(warmup, socks / f"{name}.sock", b"", _native_ok)
                _wait_armed(emperor, stats, f"{name}.ini")
            if not warmup and (i % 10 == 0 or i == rounds):
                run.progress(f"  {i}/{rounds} rounds")
    finally:
        listener.close()
        result.log_notes += _log_notes(emperor, TRIMPEROR_WORDS)
        janitor.finish(emperor, base, run.keep_logs, "wake")


def _wake_uwsgi(
    janitor: Janitor,
    result: WakeResult,
    uwsgi: str,
    rounds: int,
    rng: random.Random,
    run: RunOptions,
    background: int = 0,
) -> None:
    base = janitor.tempdir("uwsgi-wake-")
    vassals, u_socks, t_socks = base / "vassals", base / "uwsgi-socks", base / "trimperor-socks"
    for d in (vassals, u_socks, t_socks):
        d.mkdir()
    app = base / "app.py"
    app.write_text(WSGI_APP)
    ini = vassals / "app.ini"
    ini.write_text(uwsgi_vassal(app))
    _background(vassals, uwsgi_vassal(app), background)
    stats = base / "stats.sock"
    own_path = base / "own.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(own_path))
    listener.listen(64)
    env = _clean_env()
    theirs = janitor.start(
        "uwsgi",
        [uwsgi, "--emperor", str(vassals), "--emperor-on-demand-directory", str(u_socks)],
        base / "uwsgi.log",
        base,
    )
    ours = janitor.start(
        "trimperor",
        trimperor_command(
            str(vassals),
            "--on-demand-directory",
            str(t_socks),
            "--binary-path",
            uwsgi,
            "--stats",
            str(stats),
            "--log-level",
            "warning",
            *run.trimperor_args,
        ),
        base / "trimperor.log",
        base,
    )
    try:
        u_sock, t_sock = u_socks / "app.socket", t_socks / "app.socket"
        if not wait_until(u_sock.exists, 30, 0.01):
            theirs.check_alive()
            raise RuntimeError(f"uwsgi --emperor did not bind {u_sock} within 30 s")
        if background:
            run.progress(f"wake: waiting for {background} other uWSGI vassals to be armed")
            if not wait_until(
                lambda: len(os.listdir(u_socks)) > background, max(120.0, background * 0.03), 0.05
            ):
                theirs.check_alive()
                raise RuntimeError(f"uwsgi --emperor did not bind {background + 1} sockets")
            _wait_watched(ours, background + 1)
        _wait_armed(ours, stats, "app.ini")
        run.progress(f"wake: uWSGI vassal, {rounds} rounds (own, uwsgi --emperor, trimperor)")
        pids: list[int] = []

        def spawn_own() -> None:
            pid = spawn_in_session([uwsgi, "--ini", str(ini)], env, {0: listener.fileno()})
            janitor.adopt(pid)
            pids.append(pid)

        for i in range(rounds + 1):
            warmup = i == 0
            pids.clear()
            time.sleep(rng.uniform(0, PHASE))
            result.uwsgi_own.measure(warmup, own_path, HTTP_GET, _http_ok, spawn_own)
            for pid in pids:
                janitor.reap(pid, kill=True)
            theirs.check_alive()
            time.sleep(rng.uniform(0, PHASE))
            result.uwsgi_emperor.measure(warmup, u_sock, HTTP_GET, _http_ok)
            _wait_childless(theirs, 0.2)
            ours.check_alive()
            time.sleep(rng.uniform(0, PHASE))
            result.trimperor_uwsgi.measure(warmup, t_sock, HTTP_GET, _http_ok)
            _wait_armed(ours, stats, "app.ini")
            _wait_childless(ours, 0.2)
            if not warmup and (i % 5 == 0 or i == rounds):
                run.progress(f"  {i}/{rounds} rounds")
        result.uwsgi_measured = True
    finally:
        listener.close()
        result.log_notes += _log_notes(ours, TRIMPEROR_WORDS)
        result.log_notes += _log_notes(theirs, UWSGI_WORDS)
        for emperor in (ours, theirs):
            janitor.stop_emperor(emperor)
            keep_log(emperor, run.keep_logs, "wake-uwsgi-vassal")
        janitor.remove_dir(base)


def measure_wake(
    janitor: Janitor,
    rounds: int = 30,
    uwsgi_rounds: int = 20,
    run: RunOptions = DEFAULT_RUN,
    background: int = 0,
) -> WakeResult:
    rng = random.Random(run.seed)
    result = WakeResult(rounds=rounds, uwsgi_rounds=uwsgi_rounds, background=background)
    _raise_fd_limit(2 * background)
    _wake_native(janitor, result, rounds, rng, run, background)
    uwsgi = uwsgi_binary()
    if run.skip_uwsgi or uwsgi_rounds <= 0:
        result.uwsgi_skipped = "skipped on request"
    elif uwsgi is None:
        result.uwsgi_skipped = "uwsgi is not installed"
    else:
        _wake_uwsgi(janitor, result, uwsgi, uwsgi_rounds, rng, run, background)
    return result


# -- many armed vassals ---------------------------------------------------------------------


@dataclass
class ArmedResult:
    label: str
    command: str
    count: int
    sockets: int = 0
    first_socket_s: float = math.nan
    all_sockets_s: float = math.nan
    all_armed_s: float = math.nan
    """Until the emperor's epoll instance watches at least one socket per vassal."""
    epoll_watches: int = 0
    armed: int | None = None
    """Vassals in state ``armed`` per the stats after the idle window (trimperor only)."""
    stats_query_s: float = math.nan
    """How long one stats document with every vassal took to arrive."""
    fd_soft: int = 0
    fd_hard: int = 0
    rss_armed_mib: float = math.nan
    """2 s after all are armed."""
    rss_idle_mib: float = math.nan
    hwm_idle_mib: float = math.nan
    rss_stats_mib: float = math.nan
    """After one stats request (trimperor only)."""
    hwm_mib: float = math.nan
    threads: str = ""
    fds: int = 0
    processes_while_idle: int = 0
    idle_window_s: float = math.nan
    idle_cpu_percent: float = math.nan
    sample: int = 0
    sample_ms: list[float] = field(default_factory=list)
    sample_failures: list[str] = field(default_factory=list)
    rearmed: str = ""
    asleep_after_sample_s: float = math.nan
    fds_after_sample: int = 0
    rss_after_sample_mib: float = math.nan
    stop_s: float = math.nan
    exit_status: int | None = None
    log_lines: int = 0
    log_notes: list[str] = field(default_factory=list)
    error: str = ""


def native_text(base: Path) -> str:
    """The one-line server's vassal for an armed directory *base* (writes the server)."""
    server = base / "server.py"
    server.write_text(SERVER)
    return native_vassal(server, base / "socks", once=True)


def uwsgi_text(base: Path) -> str:
    """The uWSGI on-demand vassal for an armed directory *base* (writes the app)."""
    app = base / "app.py"
    app.write_text(WSGI_APP)
    return uwsgi_vassal(app)


@dataclass(frozen=True)
class ArmedEmperor:
    """One emperor over a directory of on-demand vassals, and how to wake them."""

    label: str
    #: The emperor's argv from (vassals, socks, stats), three paths in its directory.
    argv_for: Callable[[Path, Path, Path], list[str]]
    command: str
    vassal_text: Callable[[Path], str]
    #: A vassal's socket file in socks/, from its name without ``.ini``.
    socket_name: Callable[[str], str]
    payload: bytes
    ok: Callable[[bytes], bool]

    def start(
        self, janitor: Janitor, prefix: str, count: int, progress: Callable[[str], None]
    ) -> tuple[Path, Path, list[str], Path, Emperor, float]:
        """A temporary directory with *count* vassals ``vNNNNN.ini`` of ``vassal_text(base)``
        in ``vassals/`` and an empty ``socks/``, and the emperor started on it: (base,
        socks, names, stats socket, emperor, ``time.monotonic()`` just before its start)."""
        base = janitor.tempdir(prefix)
        vassals, socks, stats = base / "vassals", base / "socks", base / "stats.sock"
        vassals.mkdir()
        socks.mkdir()
        text = self.vassal_text(base)
        names = [f"v{i:05d}" for i in range(count)]
        for name in names:
            (vassals / f"{name}.ini").write_text(text)
        argv = self.argv_for(vassals, socks, stats)
        progress(f"{self.label}: {count} on-demand vassals")
        t0 = time.monotonic()
        emperor = janitor.start(self.label, argv, base / "emperor.log", base)
        return base, socks, names, stats, emperor, t0


def trimperor_armed(extra: Sequence[str]) -> ArmedEmperor:
    """trimperor with ``--stats`` and *extra*, on one-line-server vassals."""
    return ArmedEmperor(
        "trimperor",
        lambda d, socks, stats: trimperor_command(str(d), "--stats", str(stats), *extra),
        " ".join(["python -m trimperor DIR --stats STATS", *extra]),
        native_text,
        lambda name: f"{name}.sock",
        b"",
        _native_ok,
    )


def uwsgi_armed(uwsgi: str, with_stats: bool) -> ArmedEmperor:
    """``uwsgi --emperor DIR --emperor-on-demand-directory SOCKS`` (and ``--emperor-stats``)."""
    shown = "uwsgi --emperor DIR --emperor-on-demand-directory SOCKS"

    def argv(d: Path, socks: Path, stats: Path) -> list[str]:
        extra = ["--emperor-stats", str(stats)] if with_stats else []
        return [uwsgi, "--emperor", str(d), "--emperor-on-demand-directory", str(socks), *extra]

    return ArmedEmperor(
        "uwsgi --emperor",
        argv,
        shown + (" --emperor-stats STATS" if with_stats else ""),
        uwsgi_text,
        lambda name: f"{name}.socket",
        HTTP_GET,
        _http_ok,
    )


def uwsgi_for(count: int, run: RunOptions) -> str | None:
    """The uwsgi binary to run *count* armed vassals with (None: uWSGI is skipped or
    missing), the open-file soft limit raised for them: uWSGI's emperor does not raise
    its own limit, it inherits ours."""
    uwsgi = uwsgi_binary()
    if run.skip_uwsgi or count <= 0 or uwsgi is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        run.progress(f"  raised the open-file soft limit from {soft} to {hard} for uWSGI")
    return uwsgi


def _armed_run(
    janitor: Janitor,
    who: ArmedEmperor,
    count: int,
    idle: float,
    sample: int,
    use_stats: bool,
    words: Sequence[str],
    rng: random.Random,
    run: RunOptions,
) -> ArmedResult:
    label = who.label
    result = ArmedResult(label, who.command, count, sample=min(sample, count))
    prefix = f"{label.split(maxsplit=1)[0]}-armed-"
    progress = run.progress
    base, socks, names, stats, emperor, t0 = who.start(
        janitor, prefix, count, lambda s: progress(f"armed: {s}")
    )
    try:
        # -- every socket bound, every vassal armed ----------------------------------------
        # Armed = the emperor waits for the socket to become readable: its epoll
        # instance watches it (the same test for both emperors, and no request
        # to the emperor that would cost it memory or time).
        deadline = t0 + max(120.0, count * 0.03)
        polls: list[int] = []
        while True:
            present = len(os.listdir(socks))
            now = time.monotonic()
            if present and math.isnan(result.first_socket_s):
                result.first_socket_s = now - t0
                polls = epoll_fds(emperor.pid)
            if present >= count and math.isnan(result.all_sockets_s):
                result.all_sockets_s = now - t0
            if present >= count and epoll_watches(emperor.pid, polls) >= count:
                result.all_armed_s = time.monotonic() - t0
                break
            if now > deadline or not emperor.alive():
                break
            time.sleep(0.05)
        result.sockets = len(os.listdir(socks))
        result.epoll_watches = epoll_watches(emperor.pid, polls)
        emperor.check_alive()
        progress(
            f"  {result.sockets} sockets after {fmt(result.all_sockets_s, 2)} s, "
            f"{result.epoll_watches} watched by epoll after {fmt(result.all_armed_s, 2)} s"
        )
        if result.sockets < count:
            result.error = f"only {result.sockets}/{count} sockets exist"
        result.fd_soft, result.fd_hard = fd_limits(emperor.pid)

        # -- idle ------------------------------------------------------------------------------
        time.sleep(SETTLE)
        result.rss_armed_mib = status_field_kib(emperor.pid, "VmRSS") / 1024
        c0, w0 = cpu_ticks(emperor.pid), time.monotonic()
        progress(f"  idle for {idle:.0f} s")
        seen: set[int] = set(vassals_of(emperor.pid))
        end = w0 + idle
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            seen.update(vassals_of(emperor.pid))
        c1, w1 = cpu_ticks(emperor.pid), time.monotonic()
        result.idle_window_s = w1 - w0
        result.idle_cpu_percent = 100 * (c1 - c0) / CLK_TCK / (w1 - w0)
        result.processes_while_idle = len(seen)
        result.rss_idle_mib = status_field_kib(emperor.pid, "VmRSS") / 1024
        result.hwm_idle_mib = status_field_kib(emperor.pid, "VmHWM") / 1024
        result.threads = status_field(emperor.pid, "Threads")
        result.fds = open_fds(emperor.pid)

        # -- what the stats say ----------------------------------------------------------------
        if use_stats:
            asked = time.monotonic()
            doc = query_stats(stats, timeout=60)
            result.stats_query_s = time.monotonic() - asked
            result.armed = sum(1 for v in doc["vassals"] if v.get("state") == "armed")
            result.rss_stats_mib = status_field_kib(emperor.pid, "VmRSS") / 1024

        # -- a sample wakes ------------------------------------------------------------------
        chosen = rng.sample(names, result.sample)
        progress(f"  waking {len(chosen)} random vassals")
        for name in chosen:
            path = socks / who.socket_name(name)
            try:
                ms, data = first_byte(path, who.payload)
            except OSError as exc:
                result.sample_failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if who.ok(data):
                result.sample_ms.append(ms)
            else:
                result.sample_failures.append(f"{name}: unexpected answer {data[:60]!r}")
        t_sample = time.monotonic()
        if wait_until(lambda: not vassals_of(emperor.pid), 60.0, 0.01):
            result.asleep_after_sample_s = time.monotonic() - t_sample
        time.sleep(0.5)
        if use_stats:
            doc = query_stats(stats, timeout=60)
            by_name = {v["name"]: v for v in doc["vassals"]}
            armed = sum(1 for v in doc["vassals"] if v.get("state") == "armed")
            woke = sum(1 for name in chosen if by_name.get(f"{name}.ini", {}).get("wakes") == 1)
            result.rearmed = (
                f"{armed}/{count} armed; {woke}/{len(chosen)} of the sample with wakes = 1"
            )
        else:
            back = sum(1 for line in emperor.log_lines() if 'back to "on demand" mode' in line)
            result.rearmed = f'{back}/{len(chosen)} "back to on demand mode" lines in its log'
        result.fds_after_sample = open_fds(emperor.pid)
        result.rss_after_sample_mib = status_field_kib(emperor.pid, "VmRSS") / 1024
        result.hwm_mib = status_field_kib(emperor.pid, "VmHWM") / 1024

        # -- stop --------------------------------------------------------------------------------
        progress("  SIGTERM")
        t1 = time.monotonic()
        os.kill(emperor.pid, signal.SIGTERM)
        if wait_until(lambda: not emperor.alive(), 60.0, 0.01):
            result.stop_s = time.monotonic() - t1
        result.exit_status = emperor.popen.poll()
        return result
    finally:
        result.log_lines, result.log_notes = emperor.notes(words)
        janitor.finish(emperor, base, run.keep_logs, "armed")


def measure_armed(
    janitor: Janitor,
    count: int = 10000,
    uwsgi_count: int = 10000,
    idle: float = 30.0,
    sample: int = 20,
    run: RunOptions = DEFAULT_RUN,
) -> tuple[ArmedResult, ArmedResult | None]:
    rng = random.Random(run.seed)
    progress = run.progress
    extra = ["--log-level", "warning", *run.trimperor_args]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 100:
        progress(
            f"  warning: the hard open-file limit ({hard}) is below {count} vassals + 100: "
            "trimperor (which raises its soft limit to the hard one) cannot bind them all"
        )

    ours = _armed_run(
        janitor,
        trimperor_armed(extra),
        count,
        idle,
        sample,
        use_stats=True,
        words=TRIMPEROR_WORDS,
        rng=rng,
        run=run,
    )
    uwsgi = uwsgi_for(uwsgi_count, run)
    if uwsgi is None:
        return ours, None

    theirs = _armed_run(
        janitor,
        uwsgi_armed(uwsgi, with_stats=False),
        uwsgi_count,
        idle,
        sample,
        use_stats=False,
        words=UWSGI_WORDS,
        rng=rng,
        run=run,
    )
    return ours, theirs


def measure(
    only: str | None = None,
    rounds: int = 30,
    uwsgi_rounds: int = 20,
    count: int = 10000,
    uwsgi_count: int = 10000,
    idle: float = 30.0,
    sample: int = 20,
    run: RunOptions = DEFAULT_RUN,
    background: int = 0,
) -> tuple[WakeResult | None, tuple[ArmedResult, ArmedResult | None] | None]:
    """Both parts (or *only* ``wake`` or ``armed``); everything is cleaned up after."""
    wake = armed = None
    with Janitor() as janitor:
        if only in (None, "wake"):
            wake = measure_wake(janitor, rounds, uwsgi_rounds, run, background)
        if only in (None, "armed"):
            armed = measure_armed(janitor, count, uwsgi_count, idle, sample, run)
    return wake, armed


# -- output -------------------------------------------------------------------------------------


_verdict = partial(verdict, missed="**missed**")


def _series_row(what: str, s: WakeSeries) -> str:
    return (
        f"| {what} | {len(s.ms)} | {fmt(min(s.ms, default=math.nan))} | {fmt(s.p(50))} "
        f"| {fmt(s.p(90))} | {fmt(max(s.ms, default=math.nan))} | {len(s.failures)} |"
    )


def render_wake(r: WakeResult) -> str:
    head = [
        "| server, how it starts | n | min ms | p50 ms | p90 ms | max ms | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    among = f", among {r.background:,} other armed vassals" if r.background else ""
    lines = [
        f"One-line Python server (`python -I -S server.py`), {r.rounds} rounds{among}, "
        "connect → first byte of the answer:",
        "",
        *head,
        _series_row("started directly, socket on fd 3 (own)", r.own),
        _series_row("trimperor, on demand, exits 0 after one connection", r.exit0),
        _series_row("trimperor, on demand, `idle = 0.2`", r.idle),
        "",
    ]
    own = r.own.p(50)
    over_exit = r.exit0.p(50) - own
    over_idle = r.idle.p(50) - own
    lines.append(
        f"Wake overhead (p50 minus own p50): exit 0 {fmt(over_exit)} ms, idle "
        f"{fmt(over_idle)} ms; target ≤ {WAKE_TARGET_MS:.0f} ms: "
        f"{_verdict(over_exit, WAKE_TARGET_MS)} / {_verdict(over_idle, WAKE_TARGET_MS)}. "
        f"trimperor: `{r.command_native}`."
    )
    if not r.uwsgi_measured:
        lines += ["", f"uWSGI vassal not measured: {r.uwsgi_skipped or 'failed'}."]
        return "\n".join(lines)
    lines += [
        "",
        f"uWSGI vassal (`protocol = http`, one worker, `idle = 1`, `die-on-idle`), "
        f"{r.uwsgi_rounds} rounds{among}, connect → first byte of the answer to `GET /`:",
        "",
        *head,
        _series_row("`uwsgi --ini`, started directly, socket on fd 0 (own)", r.uwsgi_own),
        _series_row("`uwsgi --emperor DIR --emperor-on-demand-directory SOCKS`", r.uwsgi_emperor),
        _series_row(
            "`trimperor DIR --on-demand-directory SOCKS --binary-path UWSGI`", r.trimperor_uwsgi
        ),
        "",
    ]
    u, t, o = r.uwsgi_emperor.p(50), r.trimperor_uwsgi.p(50), r.uwsgi_own.p(50)
    lines.append(
        f"Cold first request p50: uwsgi --emperor {fmt(u)} ms, trimperor {fmt(t)} ms, "
        f"ratio uwsgi / trimperor {fmt(ratio(u, t), 2)}x. Over the vassal's own start "
        f"(p50 {fmt(o)} ms): uwsgi --emperor {fmt(u - o)} ms, trimperor {fmt(t - o)} ms."
    )
    return "\n".join(lines)


def _mem(mib: float) -> str:
    return f"{fmt(mib)} MiB ({fmt(mib * MB_PER_MIB)} MB)"


def render_armed(ours: ArmedResult, theirs: ArmedResult | None) -> str:
    runs = [ours] + ([theirs] if theirs else [])
    lines = [
        "| measure | target (trimperor) | "
        + " | ".join(f"{r.label}, {r.count} vassals" for r in runs)
        + " |",
        "|---|---|" + "---:|" * len(runs),
    ]

    def row(what: str, target: str, cells: list[str]) -> None:
        lines.append(f"| {what} | {target} | " + " | ".join(cells) + " |")

    row("socket files", "all", [f"{r.sockets}/{r.count}" for r in runs])
    row("time to the first socket (s)", "", [fmt(r.first_socket_s, 2) for r in runs])
    row("time until all sockets exist (s)", "", [fmt(r.all_sockets_s, 2) for r in runs])
    row(
        "time until all are armed: epoll watches ≥ count (s)",
        "",
        [f"{fmt(r.all_armed_s, 2)} ({r.epoll_watches} watched)" for r in runs],
    )
    row("emperor RSS, 2 s after all armed", "", [_mem(r.rss_armed_mib) for r in runs])
    rss_target = f"≤ {RSS_TARGET_MB:.0f} MB"
    row("emperor RSS after the idle window", rss_target, [_mem(r.rss_idle_mib) for r in runs])
    row("emperor peak RSS (VmHWM) until then", "", [_mem(r.hwm_idle_mib) for r in runs])
    row("emperor threads / open fds", "", [f"{r.threads or 'n/a'} / {r.fds}" for r in runs])
    row("emperor open-file limit soft / hard", "", [f"{r.fd_soft} / {r.fd_hard}" for r in runs])
    row("vassal processes seen while idle", "0", [str(r.processes_while_idle) for r in runs])
    row(
        f"emperor CPU while idle ({fmt(ours.idle_window_s, 0)} s, % of a core)",
        f"≤ {CPU_TARGET_PERCENT}",
        [fmt(r.idle_cpu_percent, 2) for r in runs],
    )
    row(
        "stats after the idle window: armed / time for the document (s)",
        "all",
        [
            f"{r.armed}/{r.count} / {fmt(r.stats_query_s, 2)}" if r.armed is not None else "n/a"
            for r in runs
        ],
    )
    row(
        "emperor RSS after that one stats request",
        "",
        [_mem(r.rss_stats_mib) if r.armed is not None else "n/a" for r in runs],
    )
    row(
        "random sample: answered",
        "all",
        [f"{len(r.sample_ms)}/{r.sample}" for r in runs],
    )
    row(
        "sample: connect → first byte, p50 / max (ms)",
        "",
        [
            f"{fmt(percentile(r.sample_ms, 50))} / {fmt(max(r.sample_ms, default=math.nan))}"
            for r in runs
        ],
    )
    row("after the sample", "all armed", [r.rearmed for r in runs])
    row(
        "after the sample: asleep (s) / open fds / RSS",
        "",
        [
            f"{fmt(r.asleep_after_sample_s, 2)} / {r.fds_after_sample} / "
            f"{fmt(r.rss_after_sample_mib)} MiB"
            for r in runs
        ],
    )
    row("emperor peak RSS (VmHWM) at the end", "", [_mem(r.hwm_mib) for r in runs])
    row("SIGTERM → emperor exited (s)", "", [fmt(r.stop_s, 2) for r in runs])
    row("emperor exit status", "0", [str(r.exit_status) for r in runs])
    lines.append("")
    woke_all = len(ours.sample_ms) == ours.sample and not ours.sample_failures
    lines.append(
        "trimperor targets: "
        f"RSS {rss_target}: {_verdict(ours.rss_idle_mib * MB_PER_MIB, RSS_TARGET_MB)} after "
        f"the idle window, {_verdict(ours.hwm_idle_mib * MB_PER_MIB, RSS_TARGET_MB)} at the "
        "peak until then; "
        f"idle CPU ≤ {CPU_TARGET_PERCENT} %: "
        f"{_verdict(ours.idle_cpu_percent, CPU_TARGET_PERCENT)}; "
        f"every sampled vassal woke: {'met' if woke_all else '**missed**'}."
    )
    for r in runs:
        if r.error:
            lines.append(f"**{r.label}**: {r.error}.")
        for failure in r.sample_failures[:5]:
            lines.append(f"**{r.label}** sample failure: {failure}")
    lines.append("")
    lines.append("Commands: " + "; ".join(f"`{r.command}`" for r in runs) + ".")
    return "\n".join(lines)


def render(wake: WakeResult | None, armed: tuple[ArmedResult, ArmedResult | None] | None) -> str:
    parts: list[str] = []
    if wake is not None:
        parts += ["### Wake overhead", "", render_wake(wake)]
    if armed is not None:
        parts += ["", "### Armed on-demand vassals", "", render_armed(*armed)]
    return "\n".join(parts).strip()


def print_notes(
    wake: WakeResult | None, armed: tuple[ArmedResult, ArmedResult | None] | None
) -> None:
    if wake is not None:
        failures = [
            (s.label, f)
            for s in (
                wake.own,
                wake.exit0,
                wake.idle,
                wake.uwsgi_own,
                wake.uwsgi_emperor,
                wake.trimperor_uwsgi,
            )
            for f in s.failures
        ]
        if failures:
            print(f"\nwake: {len(failures)} failed measurement(s):")
            for label, failure in failures[:20]:
                print(f"    {label}: {failure}")
        print_log_notes(f"wake: log lines worth a look ({len(wake.log_notes)})", wake.log_notes)
    for r in armed or ():
        if r is not None:
            print_log_notes(
                f"armed, {r.label} log: {len(r.log_notes)} of {r.log_lines} lines", r.log_notes
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="On-demand vassals: wake overhead, many armed.")
    p.add_argument("--only", choices=["wake", "armed"], help="run one part")
    p.add_argument("--rounds", type=int, default=30, help="wake rounds, one-line server (30)")
    p.add_argument(
        "--uwsgi-rounds", type=int, default=20, help="wake rounds, uWSGI vassal (20; 0 skips)"
    )
    p.add_argument("--count", type=int, default=10000, help="armed native vassals (10000)")
    p.add_argument(
        "--uwsgi-count", type=int, default=10000, help="armed uWSGI vassals (10000; 0 skips)"
    )
    p.add_argument("--idle", type=float, default=30.0, help="idle window, seconds (30)")
    p.add_argument("--sample", type=int, default=20, help="armed vassals woken (20)")
    add_run_options(
        p,
        seed="seed for pauses and the sample",
        skip_uwsgi="measure trimperor only",
        trimperor_arg="extra argument",
    )
    p.add_argument(
        "--background",
        type=int,
        default=0,
        metavar="N",
        help="wake: N other on-demand vassals armed meanwhile (0)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run = RunOptions.of(args)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        run.progress(f"open-file limit here: soft {soft}, hard {hard}")
        wake, armed = measure(
            args.only,
            args.rounds,
            args.uwsgi_rounds,
            args.count,
            args.uwsgi_count,
            args.idle,
            args.sample,
            run,
            args.background,
        )
        print(render(wake, armed))
        print_notes(wake, armed)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
