"""Shared helpers for the benchmarks: statistics, /proc readings, cleanup, and main().

Every emperor a benchmark starts is registered with a :class:`Janitor`, which
on exit (normal, exception, Ctrl-C or SIGTERM) sends SIGTERM to the emperor's
process group, SIGKILLs it if it lingers, kills any vassal pid the benchmark
recorded that is still alive, and removes the temporary directories.

A script's ``main()`` is its own options plus :func:`add_run_options` (the
ones every emperor benchmark shares, read back with :meth:`RunOptions.of`),
its measurement inside :func:`run_main` (SIGTERM is Ctrl-C, and an interrupt
exits 130 once everything is cleaned up), and its report under
:func:`report_header`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "DEFAULT_RUN",
    "Emperor",
    "Janitor",
    "Rounds",
    "RunOptions",
    "Summary",
    "SummaryOf",
    "add_run_options",
    "argv0",
    "children",
    "cpu_ticks",
    "epoll_fds",
    "epoll_watches",
    "fd_limits",
    "free_port",
    "interrupts_deferred",
    "is_gone",
    "machine_info",
    "open_fds",
    "percentile",
    "print_log_notes",
    "proc_state",
    "progress",
    "query_stats",
    "report_header",
    "run_main",
    "sigterm_as_interrupt",
    "spawn_in_session",
    "status_field_kib",
    "summary_row",
    "trimperor_command",
    "uwsgi_binary",
    "vassals_of",
    "verdict",
    "write_json",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- statistics --------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0..100) by linear interpolation between closest ranks.

    This is NumPy's default ("linear") method: with 50 samples p99 lies between
    the largest and the second largest value.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Order statistics of a set of durations, in milliseconds."""

    n: int
    minimum: float
    p50: float
    p99: float
    maximum: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Summary:
        if not values_ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        return cls(
            n=len(values_ms),
            minimum=min(values_ms),
            p50=percentile(values_ms, 50),
            p99=percentile(values_ms, 99),
            maximum=max(values_ms),
        )


class SummaryOf:
    """A read-only attribute: the :class:`Summary` of a list field of the same object.

    ``up = SummaryOf("up_ms")`` in a result record makes ``result.up`` the order
    statistics of ``result.up_ms``.
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, obj: object, owner: type | None = None) -> Summary:
        return Summary.of(getattr(obj, self.field))


def ratio(a: float, b: float) -> float:
    """a / b, or NaN when either is missing or b is not positive."""
    if math.isnan(a) or math.isnan(b) or b <= 0:
        return math.nan
    return a / b


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def summary_row(what: str, s: Summary) -> str:
    """A markdown row: what, n, min, p50, p99, max (ms, one decimal)."""
    return f"| {what} | {s.n} | {fmt(s.minimum)} | {fmt(s.p50)} | {fmt(s.p99)} | {fmt(s.maximum)} |"


@dataclass
class Rounds:
    """One emperor's add/remove rounds: durations in ms and what went wrong."""

    label: str
    command: str
    rounds: int
    up_ms: list[float] = field(default_factory=list)
    down_ms: list[float] = field(default_factory=list)
    missed_up: int = 0
    missed_down: int = 0
    died_early: int = 0
    log_notes: list[str] = field(default_factory=list)
    up = SummaryOf("up_ms")
    down = SummaryOf("down_ms")

    def problems(self, removed: str = "their removal") -> list[str]:
        """What went wrong, in words (empty if nothing)."""
        problems = []
        if self.missed_up:
            problems.append(f"{self.missed_up} vassal(s) never started within the timeout")
        if self.missed_down:
            problems.append(f"{self.missed_down} vassal(s) never stopped within the timeout")
        if self.died_early:
            problems.append(f"{self.died_early} vassal(s) died before {removed}")
        return problems


def verdict(value: float, target: float, missed: str = "MISSED") -> str:
    """Whether *value* is at most *target*: "met", *missed*, or "not measured" (NaN)."""
    if math.isnan(value):
        return "not measured"
    return "met" if value <= target else missed


# -- /proc ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain ") ".
    return data[data.rfind(b")") + 2 :].decode().split()


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, Z, ...), or None if there is none."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def is_gone(pid: int) -> bool:
    """True once the process has exited: no /proc entry, or a zombie / dead entry."""
    return proc_state(pid) in (None, "Z", "X")


def cpu_ticks(pid: int) -> int:
    """utime + stime of *pid* (its own, not its children's), in clock ticks."""
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    # stat(5): utime is field 14, stime 15; fields[0] is field 3 (state).
    return int(fields[11]) + int(fields[12])


def status_field_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status, such as VmRSS or VmHWM, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    raise KeyError(key)


def status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return value.strip()
    raise KeyError(key)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def argv0(pid: int) -> str | None:
    """The program a process runs (the first word of its command line), None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None


def read_pid_file(path: Path) -> int | None:
    """The pid in *path*, or None while the file is missing or half-written."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if not text.endswith("\n"):
        return None
    return int(text)


def vassals_of(pid: int) -> list[int]:
    """The vassal processes an emperor runs: its children, or its launcher's.

    trimperor spawns through a launcher process (a child of the emperor), uWSGI's
    emperor forks its vassals itself.
    """
    found: list[int] = []
    for child in children(pid):
        if "_launcher.py" in _cmdline(child):
            found += children(child)
        else:
            found.append(child)
    return found


def children(pid: int) -> list[int]:
    """The direct children of *pid* (from every one of its threads), from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(word) for word in f.read().split()]
        except OSError:
            continue
    return found


def open_fds(pid: int) -> int:
    """How many file descriptors *pid* has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def epoll_fds(pid: int) -> list[int]:
    """The descriptors of *pid* that are epoll instances."""
    found: list[int] = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[eventpoll]":
                found.append(int(name))
    return found


def epoll_watches(pid: int, fds: Iterable[int]) -> int:
    """How many descriptors the epoll instances *fds* of *pid* watch (``tfd:`` lines
    of /proc/PID/fdinfo): for an emperor, the sockets it waits on, among others."""
    total = 0
    for fd in fds:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            total += f.read().count(b"\ntfd:")
    return total


def fd_limits(pid: int | None = None) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of *pid* (from /proc), or of this process."""
    if pid is None:
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                words = line.split()
                return int(words[3]), int(words[4])
    raise KeyError("Max open files")


# -- processes -----------------------------------------------------------------------


def trimperor_command(*args: str) -> list[str]:
    """How the benchmarks start trimperor: this interpreter, ``-m trimperor``."""
    return [sys.executable, "-m", "trimperor", *args]


def uwsgi_binary() -> str | None:
    """The ``uwsgi`` next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "uwsgi"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uwsgi")


def spawn_in_session(
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: Mapping[int, int],
    log_path: Path | None = None,
) -> int:
    """Start *argv* with ``posix_spawn`` as the leader of a new session; return its pid.

    *fds* maps a target descriptor in the child to a descriptor of ours (for
    example ``{3: listener.fileno()}``, or ``{0: ...}`` as uWSGI's emperor does);
    the child gets nothing else but stdin from /dev/null (unless mapped) and
    stdout and stderr appended to *log_path* (or /dev/null). Register the pid
    with :meth:`Janitor.adopt`.
    """
    opened: list[int] = []
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        opened.append(null)
        out = null
        if log_path is not None:
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            opened.append(out)
        actions: list[tuple[int, int, int]] = []
        for target in (0, 1, 2):
            if target not in fds:
                actions.append((os.POSIX_SPAWN_DUP2, null if target == 0 else out, target))
        for target, source in fds.items():
            if source == target:
                # dup2 onto itself would leave close-on-exec set.
                os.set_inheritable(source, True)
            else:
                actions.append((os.POSIX_SPAWN_DUP2, source, target))
        return os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions, setsid=True)
    finally:
        for fd in opened:
            os.close(fd)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago, for a server that must be
    told its port on its command line (etcd, a ZeroMQ endpoint, a uWSGI http socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def query_stats(path: Path, timeout: float = 30.0) -> dict[str, Any]:
    """trimperor's stats document, read from its ``--stats`` unix socket."""
    chunks: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    return doc


class Emperor:
    """An emperor process in its own session, its output in a log file."""

    def __init__(
        self,
        label: str,
        argv: Sequence[str],
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.label = label
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.label} exited with status {self.popen.returncode}; "
                f"see its log:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def notes(self, words: Sequence[str]) -> tuple[int, list[str]]:
        """How many lines its log has, and those that contain one of *words*."""
        lines = self.log_lines()
        return len(lines), [line for line in lines if any(w in line for w in words)]

    def terminate(
        self, grace: float = 15.0, sig: int | None = signal.SIGTERM, group: bool = True
    ) -> None:
        """Send *sig* to the process group (to the process alone unless *group*; no
        signal at all with None), SIGKILL the group after *grace* seconds; reap."""
        if self.popen.poll() is None:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    (os.killpg if group else os.kill)(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Whatever is left of the group (the emperor, or uWSGI vassals that share it).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


class Janitor:
    """Cleans up everything a benchmark started, however it ends."""

    def __init__(self) -> None:
        self._emperors: list[Emperor] = []
        self._pids: set[int] = set()
        self._groups: set[int] = set()
        self._adopted: set[int] = set()
        self._dirs: list[Path] = []

    def __enter__(self) -> Janitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def tempdir(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        self._dirs.append(path)
        return path

    def start(self, label: str, argv: Sequence[str], log_path: Path, cwd: Path) -> Emperor:
        return self.register(Emperor(label, argv, log_path, cwd))

    def register(self, emperor: Emperor) -> Emperor:
        """An :class:`Emperor` started by hand (any process leading its own session)."""
        self._emperors.append(emperor)
        return emperor

    def track(self, pids: Iterable[int]) -> None:
        """Vassal pids to kill at cleanup if they are still there."""
        self._pids.update(pids)

    def track_group(self, pid: int) -> None:
        """A vassal that leads its own process group (a uWSGI master under trimperor):
        the whole group is killed at cleanup if it is still there."""
        self._groups.add(pid)

    def adopt(self, pid: int) -> None:
        """A child of this process leading its own session (see :func:`spawn_in_session`)."""
        self._adopted.add(pid)

    def reap(self, pid: int, kill: bool = False, timeout: float = 10.0) -> int | None:
        """Wait for an adopted child (SIGKILL its session first if *kill*, or at the
        timeout); return its wait status as a return code, None if it was not ours."""
        if pid not in self._adopted:
            return None
        if kill:
            _kill_session(pid)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() >= deadline:
                _kill_session(pid)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.001)
        self._adopted.discard(pid)
        return os.waitstatus_to_exitcode(status)

    def _kill_adopted(self) -> None:
        for pid in sorted(self._adopted):
            _kill_session(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._adopted.clear()

    def stop_emperor(
        self,
        emperor: Emperor,
        sig: int | None = signal.SIGTERM,
        grace: float = 15.0,
        group: bool = True,
    ) -> None:
        """Stop *emperor* (see :meth:`Emperor.terminate`) and the vassals tracked."""
        emperor.terminate(grace, sig, group)
        self._kill_vassals()
        if emperor in self._emperors:
            self._emperors.remove(emperor)

    def finish(self, emperor: Emperor, base: Path, keep_logs: Path | None, what: str) -> None:
        """The end of one measured emperor: stop it, keep its log, remove its directory."""
        self.stop_emperor(emperor)
        keep_log(emperor, keep_logs, what)
        self.remove_dir(base)

    def _kill_vassals(self) -> None:
        for pid in sorted(self._pids):
            if is_gone(pid):
                continue
            # Only what looks like one of ours: a pid may in theory be reused.
            if any(word in _cmdline(pid) for word in ("sleep", "uwsgi", "sh")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._pids.clear()
        for pid in sorted(self._groups):
            if not is_gone(pid) and "uwsgi" in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self._groups.clear()

    def remove_dir(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        if path in self._dirs:
            self._dirs.remove(path)

    def cleanup(self) -> None:
        # Ctrl-C again while cleaning up should not leave processes behind.
        with interrupts_deferred():
            self._kill_adopted()
            for emperor in reversed(self._emperors):
                emperor.terminate()
            self._emperors.clear()
            self._kill_vassals()
            for path in self._dirs:
                shutil.rmtree(path, ignore_errors=True)
            self._dirs.clear()


def _kill_session(pid: int) -> None:
    """SIGKILL the process group led by *pid* (a session leader), and *pid* itself."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done (then raise KeyboardInterrupt):
    a second Ctrl-C during cleanup must not leave processes behind."""
    pending: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise KeyboardInterrupt


def keep_log(emperor: Emperor, directory: Path | None, what: str) -> None:
    """Copy the emperor's log to DIRECTORY/LABEL-WHAT.log, if a directory is given."""
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        shutil.copyfile(
            emperor.log_path, directory / f"{emperor.label.split(maxsplit=1)[0]}-{what}.log"
        )


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (and SIGHUP) behave like Ctrl-C, so that cleanup runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def progress(message: str) -> None:
    """Progress goes to stderr (the report to stdout)."""
    print(message, file=sys.stderr, flush=True)


def print_log_notes(heading: str, notes: Sequence[str], limit: int = 20) -> None:
    """The log lines worth a look, under *heading*, at most *limit* of them."""
    if notes:
        print(f"\n{heading}:")
        for line in notes[:limit]:
            print(f"    {line}")


# -- main() ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """What every emperor benchmark is told besides its sizes (see :func:`add_run_options`)."""

    seed: int | None = None
    skip_uwsgi: bool = False
    trimperor_args: Sequence[str] = ()
    progress: Callable[[str], None] = print
    keep_logs: Path | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> RunOptions:
        """The options :func:`add_run_options` added, as parsed; progress to stderr."""
        return cls(
            seed=getattr(args, "seed", None),
            skip_uwsgi=getattr(args, "skip_uwsgi", False),
            trimperor_args=getattr(args, "trimperor_args", ()),
            progress=progress,
            keep_logs=getattr(args, "keep_logs", None),
        )


#: The default of a ``run: RunOptions`` parameter: no seed, uWSGI too, progress printed.
DEFAULT_RUN = RunOptions()


def add_run_options(
    p: argparse.ArgumentParser,
    *,
    seed: str | None = None,
    skip_uwsgi: str | None = None,
    trimperor_arg: str | None = None,
    keep_logs: str = "copy the emperors' logs into DIR",
    json: str | None = None,
) -> None:
    """The options the benchmarks share, each added when its help text is given:
    ``--seed N``, ``--skip-uwsgi``, ``--trimperor-arg ARG`` (repeatable),
    ``--keep-logs DIR`` (always) and ``--json FILE``."""
    if seed is not None:
        p.add_argument("--seed", type=int, default=None, help=seed)
    if skip_uwsgi is not None:
        p.add_argument("--skip-uwsgi", action="store_true", help=skip_uwsgi)
    if trimperor_arg is not None:
        p.add_argument(
            "--trimperor-arg",
            action="append",
            default=[],
            dest="trimperor_args",
            metavar="ARG",
            help=trimperor_arg,
        )
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help=keep_logs)
    if json is not None:
        p.add_argument("--json", type=Path, metavar="FILE", help=json)


def run_main(body: Callable[[], int], cleaned: str = "was stopped") -> int:
    """Run a benchmark's *body* with SIGTERM and SIGHUP as Ctrl-C; on an interrupt say
    so and return 130 (the janitors in *body* have cleaned up by then)."""
    sigterm_as_interrupt()
    try:
        return body()
    except KeyboardInterrupt:
        print(f"interrupted; everything started {cleaned}", file=sys.stderr)
        return 130


def report_header(
    title: str, script: str, argv: Sequence[str] | None, info: Mapping[str, str]
) -> list[str]:
    """The top of a markdown report: its title, the machine table, the command."""
    given = list(sys.argv[1:] if argv is None else argv)
    out = [f"# {title}", "", "| machine | |", "|---|---|"]
    out += [f"| {k} | {v.splitlines()[0] if v else ''} |" for k, v in info.items()]
    out += ["", f"Command: `python benchmarks/{script} {shlex.join(given)}`".rstrip()]
    return out


def write_json(path: Path | None, doc: object, indent: int = 1) -> None:
    """Write *doc* as JSON to *path*, if a path is given."""
    if path is not None:
        path.write_text(json.dumps(doc, indent=indent) + "\n")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.001) -> bool:
    """Poll *predicate* until it is true or *timeout* seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# -- the machine -----------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """What the figures were measured on."""
    uwsgi = uwsgi_binary()
    uwsgi_version = "not installed"
    if uwsgi is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            uwsgi_version = subprocess.run(
                [uwsgi, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
    trimperor_version = subprocess.run(
        trimperor_command("--version"), capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    trimperor_path = subprocess.run(
        [sys.executable, "-c", "import trimperor; print(trimperor.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trimperor": f"{trimperor_version or 'unknown'} ({trimperor_path or '?'})",
        "uwsgi": uwsgi_version,
        "CPU busy at start (1 s sample, all cores)": f"{cpu_busy_percent():.0f} %",
        "load average at start (1/5/15 min)": load,
    }


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_busy_percent(window: float = 1.0) -> float:
    """How busy the machine's CPUs are (everyone's work), over *window* seconds."""
    b0, t0 = _cpu_times()
    time.sleep(window)
    b1, t1 = _cpu_times()
    return 100 * (b1 - b0) / max(1, t1 - t0)
