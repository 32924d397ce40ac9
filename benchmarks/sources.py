"""Remote sources: a change made in a database, a broker or a socket, until the vassal runs.

For each remote source, trimperor runs as a real process (``python -m
trimperor URI --log-level warning``) and, where Debian's uWSGI has the
imperial monitor and it works here, ``uwsgi-core --plugin emperor_X --emperor
URI --emperor-freq 1`` runs beside it on a source of its own (its own table or
endpoint). Both are measured in the same command, their rounds interleaved
(one trimperor round, one uWSGI round, ...) so that the load of the shared
machine weighs on both alike.

Sources and changes (add / remove):

- **pg-poll**: ``INSERT`` / ``DELETE`` of a row (autocommit), trimperor
  ``--freq 1``; uWSGI reference: ``emperor_pg`` with ``--emperor-freq 1``.
- **pg-listen**: the same with ``;LISTEN channel`` and the NOTIFY trigger of
  ``docs/sources/pg.md``, trimperor ``--freq 60`` (the safety net only); no
  uWSGI reference (``emperor_pg`` cannot LISTEN: compare with pg-poll).
- **mongodb**: ``insert_one`` / ``delete_one`` on mongoeco, ``--freq 1``; no
  uWSGI reference (``emperor_mongodb`` does not work against mongoeco).
- **amqp**: publish to a fanout exchange of the run's own (routing key = the
  name, body = the config; an empty body removes); no uWSGI reference (see
  ``UWSGI_SKIPS``).
- **zmq**: ``[touch, name, config]`` / ``[destroy, name]`` from a PUSH socket
  to the emperor's PULL endpoint; uWSGI reference: ``emperor_zeromq``.

Every round:

1. sleep a random phase: 0 to one polling period (1 s) for polled sources,
   0-0.3 s for event-driven ones, so that changes fall at random points of the
   emperors' scans;
2. make the change; *up* is the vassal's own record of its start (``date
   +%s%N``, written by the vassal process) minus ``time.time_ns()`` taken just
   before the change was sent (before the autocommit ``INSERT``, the
   ``insert_one``, the ``basic_publish``, the ``send_multipart``): it includes
   the commit or the publish itself;
3. sleep a random phase, then remove the vassal the source's way;
4. *down*: from just before the removal until the vassal's pid has no
   ``/proc`` entry or is a zombie, polled every millisecond. uWSGI vassals also
   record when the emperor's stop message reached them (``hook-emperor-stop``),
   which separates the monitor's reaction from the ~1 s a uWSGI master takes to
   bury its worker.

The vassals (names and paths are spelled out: no magic variables but ``%%``)::

    ; trimperor, a native vassal
    [vassal]
    command = /bin/sh -c 'date +%%s%%N > MARKS/t001.start; echo $$ > MARKS/t001.pid; exec sleep 600'

    ; uWSGI: a master and one worker, no app ("full dynamic mode")
    [uwsgi]
    master = true
    socket = RUN/u001.sock
    exec-asap = date +%%s%%N > MARKS/u001.start; echo $PPID > MARKS/u001.pid
    hook-emperor-stop = exec:date +%%s%%N > MARKS/u001.stop

Each emperor gets 2 s to start, then an unmeasured warm-up round (repeated,
up to 3 times, until the vassal shows up: an AMQP message published before
the emperor's queue is bound is lost).

What each source needs and what is cleaned up (on exit, on Ctrl-C, on
SIGTERM): PostgreSQL gets a role of its own with a random password (uWSGI's
``emperor_pg`` needs a password over TCP on machines with scram
authentication), tables, trigger functions; all are dropped at the end.
MongoDB is mongoeco's wire server (``.venv-mongo``, see ``scripts/services``),
started on a free port and stopped at the end. AMQP uses a fanout exchange
named after the run, deleted at the end. Every emperor's process group is
stopped and the temporary directories are removed.

Run: ``python benchmarks/sources.py [--only pg-poll,pg-listen,mongodb,amqp,zmq]
[--rounds 100] [--poll-rounds 40] [--uwsgi-rounds 30] [--skip-uwsgi]
[--keep-logs DIR] [--json FILE]``. Progress goes to stderr and the report
(markdown) to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from benchlib import (
    Emperor,
    Janitor,
    Rounds,
    SummaryOf,
    add_run_options,
    fmt,
    free_port,
    interrupts_deferred,
    is_gone,
    keep_log,
    machine_info,
    progress,
    ratio,
    read_pid_file,
    report_header,
    run_main,
    summary_row,
    trimperor_command,
    wait_until,
    write_json,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import PG_TRIGGERS

if TYPE_CHECKING:
    import psycopg

__all__ = ["SOURCES", "Run", "SourceResult", "main", "measure", "render"]

ROOT = Path(__file__).resolve().parent.parent
#: Every source, in the order they run.
SOURCES = ("pg-poll", "pg-listen", "mongodb", "amqp", "zmq")
#: The sources measured by polling.
POLLED = ("pg-poll", "mongodb")
#: The polling period of every polled emperor (trimperor --freq, uWSGI --emperor-freq).
FREQ = 1.0
#: trimperor's safety-net period when it listens (docs/sources/pg.md suggests 60).
LISTEN_FREQ = 60.0
#: Random phase before each change for event-driven sources (s).
EVENT_PHASE = 0.3
#: Give up on one appearance or disappearance after this long (s).
TRIMPEROR_TIMEOUT = 10.0
UWSGI_TIMEOUT = 20.0
#: Time given to the emperors to start before the warm-up (s).
STARTUP = 2.0
WARMUP_ATTEMPTS = 3
#: The target of issue 4: a pg LISTEN change visible within this long (ms).
LISTEN_TARGET_MS = 50.0
DEFAULT_PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
DEFAULT_AMQP = ("127.0.0.1", 5672, "guest", "guest")

UWSGI_SKIPS = {
    "pg-listen": "uWSGI's emperor_pg only polls (it has no LISTEN); compare with pg-poll",
    "mongodb": (
        "uWSGI's emperor_mongodb reads with legacy OP_QUERY finds, which mongoeco (the only "
        "MongoDB-compatible server installable here) refuses: it never spawns a vassal"
    ),
    "amqp": (
        "uWSGI's emperor_amqp asks for channel_max = 0, which RabbitMQ 3.10 refuses unless the "
        "broker's configuration allows it; the shared broker is not reconfigured or restarted"
    ),
}


# -- results ---------------------------------------------------------------------------------


@dataclass
class Run(Rounds):
    """One emperor on one source."""

    #: uWSGI only: removal until the vassal got the emperor's stop message.
    told_ms: list[float] = field(default_factory=list)
    warmup_attempts: int = 0
    told = SummaryOf("told_ms")


@dataclass
class SourceResult:
    key: str
    title: str
    change: str
    runs: list[Run]
    uwsgi_skipped: str = ""
    error: str = ""


# -- changes --------------------------------------------------------------------------------


class Channel(Protocol):
    """How one emperor's source is changed. Both return ``time.time_ns()`` taken just before."""

    def add(self, name: str, config: str) -> int: ...

    def remove(self, name: str) -> int: ...


@dataclass
class Contender:
    """What is needed to start one emperor on one source and to drive it."""

    label: str  # "trimperor" or "uwsgi"
    argv: list[str]
    shown: str  # argv with secrets hidden
    channel: Channel
    phase: float
    rounds: int


# -- the vassals -----------------------------------------------------------------------------


def native_vassal(marks: Path, name: str) -> str:
    return (
        "[vassal]\n"
        f"command = /bin/sh -c 'date +%%s%%N > {marks}/{name}.start; "
        f"echo $$ > {marks}/{name}.pid; exec sleep 600'\n"
    )


def uwsgi_vassal(marks: Path, run: Path, name: str) -> str:
    return (
        "[uwsgi]\n"
        "master = true\n"
        f"socket = {run}/{name}.sock\n"
        f"exec-asap = date +%%s%%N > {marks}/{name}.start; echo $PPID > {marks}/{name}.pid\n"
        f"hook-emperor-stop = exec:date +%%s%%N > {marks}/{name}.stop\n"
    )


def uwsgi_core() -> str | None:
    """Debian's uwsgi-core, which has the emperor_pg and emperor_zeromq plugins."""
    return shutil.which("uwsgi-core")


def uwsgi_has_plugin(binary: str, plugin: str) -> bool:
    try:
        out = subprocess.run(
            [binary, "--plugin", plugin, "--imperial-monitor-list"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=20,
            check=False,
            cwd="/",
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    scheme = {"emperor_pg": "pg", "emperor_zeromq": "zmq"}[plugin]
    listing = out.split("loaded imperial monitors", 1)[-1].split("end of imperial", 1)[0]
    return scheme in listing.split()


def uwsgi_version(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    return "unknown"


def uwsgi_argv(binary: str, plugin: str, uri: str) -> list[str]:
    return [binary, "--plugin", plugin, "--emperor", uri, "--emperor-freq", f"{FREQ:g}"]


def hide(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def guarded(fn: Callable[[], object]) -> Callable[[], None]:
    """*fn* as a cleanup callback: a Ctrl-C while it runs is held until it is done."""

    def run() -> None:
        with interrupts_deferred():
            fn()

    return run


# -- PostgreSQL ------------------------------------------------------------------------------


class PgTable:
    """A vassal table of its own, with docs/sources/pg.md's triggers; changed as the admin."""

    def __init__(self, admin: psycopg.Connection[Any], table: str, channel: str) -> None:
        self.admin = admin
        self.table = table
        self.channel = channel

    def add(self, name: str, config: str) -> int:
        t0 = time.time_ns()
        self.admin.execute(
            f"INSERT INTO {self.table} (name, config) VALUES (%s, %s)",
            (name, config),
        )
        return t0

    def remove(self, name: str) -> int:
        t0 = time.time_ns()
        self.admin.execute(
            f"DELETE FROM {self.table} WHERE name = %s",
            (name,),
        )
        return t0


#: docs/sources/pg.md's table (its triggers are tests.helpers.PG_TRIGGERS), with names
#: of the run's own.
PG_TABLE = """
CREATE TABLE {t} (
    name   text PRIMARY KEY,
    config text NOT NULL,
    ts     numeric NOT NULL DEFAULT extract(epoch FROM clock_timestamp()),
    uid    integer,
    gid    integer,
    socket text
);
GRANT SELECT ON {t} TO {role};
"""


def pg_setup(
    stack: contextlib.ExitStack, admin_dsn: str, labels: Sequence[str]
) -> tuple[str, str, dict[str, PgTable]]:
    """A role with a password and one table per emperor; returns (dsn, password, tables)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    tag = f"trimperor_bench_{os.getpid()}_{secrets.token_hex(3)}"
    password = secrets.token_hex(16)
    admin = psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10)
    stack.callback(guarded(admin.close))
    tables = {label: PgTable(admin, f"{tag}_{label[0]}", f"{tag}_{label[0]}") for label in labels}

    def drop() -> None:
        for t in tables.values():
            with contextlib.suppress(psycopg.Error):
                admin.execute(f"DROP TABLE IF EXISTS {t.table} CASCADE")
                admin.execute(f"DROP FUNCTION IF EXISTS {t.table}_touch()")
                admin.execute(f"DROP FUNCTION IF EXISTS {t.table}_notify()")
        with contextlib.suppress(psycopg.Error):
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (tag,),
            )
        # A terminated session may take a moment to go; DROP ROLE does not mind sessions,
        # only privileges and owned objects (the tables are gone).
        for _ in range(20):
            try:
                admin.execute(f"DROP ROLE IF EXISTS {tag}")
                break
            except psycopg.Error:
                time.sleep(0.25)

    stack.callback(guarded(drop))
    admin.execute(f"CREATE ROLE {tag} LOGIN PASSWORD '{password}'")
    for t in tables.values():
        admin.execute(PG_TABLE.format(t=t.table, role=tag))
        admin.execute(PG_TRIGGERS.format(table=t.table).encode())
    params = conninfo_to_dict(admin_dsn)
    dsn = make_conninfo(
        "",
        host=str(params.get("host", "127.0.0.1")),
        port=str(params.get("port", "5432")),
        dbname=str(params.get("dbname", "postgres")),
        user=tag,
        password=password,
    )
    return dsn, password, tables


# -- MongoDB (mongoeco) ----------------------------------------------------------------------


def start_mongoeco(stack: contextlib.ExitStack, python: Path) -> str:
    """mongoeco's wire server on a free port; returns HOST:PORT. Stopped with the stack."""
    proc = subprocess.Popen(
        [str(python), str(ROOT / "scripts" / "mongoeco_server.py"), "0"],
        stdin=subprocess.PIPE,  # it exits when this closes, even if we are killed
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )

    def stop() -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    stack.callback(guarded(stop))
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        raise RuntimeError(f"mongoeco did not start (said {' '.join(line)!r})")
    return line[1]


class MongoCollection:
    def __init__(self, collection: Any) -> None:
        self.collection = collection

    def add(self, name: str, config: str) -> int:
        ts = datetime.datetime.now(datetime.UTC)
        t0 = time.time_ns()
        self.collection.insert_one({"name": name, "config": config, "ts": ts})
        return t0

    def remove(self, name: str) -> int:
        t0 = time.time_ns()
        self.collection.delete_one({"name": name})
        return t0


# -- AMQP --------------------------------------------------------------------------------------


class AmqpExchange:
    def __init__(self, channel: Any, exchange: str) -> None:
        self.channel = channel
        self.exchange = exchange

    def add(self, name: str, config: str) -> int:
        t0 = time.time_ns()
        self.channel.basic_publish(self.exchange, name, config.encode())
        return t0

    def remove(self, name: str) -> int:
        t0 = time.time_ns()
        self.channel.basic_publish(self.exchange, name, b"")
        return t0


# -- ZeroMQ ------------------------------------------------------------------------------------


class ZmqPush:
    def __init__(self, push: Any) -> None:
        self.push = push

    def add(self, name: str, config: str) -> int:
        t0 = time.time_ns()
        self.push.send_multipart([b"touch", name.encode(), config.encode()])
        return t0

    def remove(self, name: str) -> int:
        t0 = time.time_ns()
        self.push.send_multipart([b"destroy", name.encode()])
        return t0


# -- the sources -------------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int
    poll_rounds: int
    uwsgi_rounds: int
    skip_uwsgi: bool
    pg_admin_dsn: str
    mongo_python: Path
    trimperor_args: Sequence[str]


def _trimperor(uri: str, shown_uri: str, opts: Options, *extra: str) -> tuple[list[str], str]:
    args = [uri, "--log-level", "warning", *extra, *opts.trimperor_args]
    shown = [shown_uri, "--log-level", "warning", *extra, *opts.trimperor_args]
    return trimperor_command(*args), "python -m trimperor " + shlex.join(shown)


def _uwsgi_for(key: str, plugin: str, opts: Options) -> tuple[str | None, str]:
    """Debian's uwsgi-core if it can be the reference for *key*, else why not."""
    if opts.skip_uwsgi or opts.uwsgi_rounds <= 0:
        return None, "skipped on request"
    if key in UWSGI_SKIPS:
        return None, UWSGI_SKIPS[key]
    binary = uwsgi_core()
    if binary is None:
        return None, (
            "Debian's uwsgi-core is not installed (apt-get install --no-install-recommends "
            "uwsgi-core uwsgi-plugin-emperor-pg)"
        )
    if not uwsgi_has_plugin(binary, plugin):
        return None, f"uwsgi-core has no {plugin} plugin here"
    return binary, ""


def setup_pg(
    stack: contextlib.ExitStack, opts: Options, listen: bool
) -> tuple[list[Contender], str]:
    key = "pg-listen" if listen else "pg-poll"
    binary, skipped = _uwsgi_for(key, "emperor_pg", opts)
    labels = ["trimperor"] + (["uwsgi"] if binary else [])
    dsn, password, tables = pg_setup(stack, opts.pg_admin_dsn, labels)
    contenders = []
    t = tables["trimperor"]
    uri = f"pg://{dsn};SELECT name,config,ts FROM {t.table}"
    if listen:
        uri += f";LISTEN {t.channel}"
    extra = ("--freq", f"{LISTEN_FREQ if listen else FREQ:g}")
    argv, shown = _trimperor(uri, hide(uri, password), opts, *extra)
    contenders.append(
        Contender(
            "trimperor",
            argv,
            shown,
            t,
            EVENT_PHASE if listen else FREQ,
            opts.rounds if listen else opts.poll_rounds,
        )
    )
    if binary:
        u = tables["uwsgi"]
        # emperor_pg reads ts as whole seconds: give it an integer.
        uri = f"pg://{dsn};SELECT name,config,floor(ts)::bigint FROM {u.table}"
        argv = uwsgi_argv(binary, "emperor_pg", uri)
        contenders.append(
            Contender("uwsgi", argv, hide(shlex.join(argv), password), u, FREQ, opts.uwsgi_rounds)
        )
    return contenders, skipped


def setup_mongodb(stack: contextlib.ExitStack, opts: Options) -> tuple[list[Contender], str]:
    import pymongo

    if not opts.mongo_python.is_file():
        raise RuntimeError(
            f"{opts.mongo_python} is missing: run scripts/services start (it builds .venv-mongo)"
        )
    address = start_mongoeco(stack, opts.mongo_python)
    client: Any = pymongo.MongoClient(
        f"mongodb://{address}/?directConnection=true", serverSelectionTimeoutMS=5000
    )
    stack.callback(guarded(client.close))
    namespace = f"bench.vassals_{os.getpid()}"
    db, coll = namespace.split(".", 1)
    collection = client[db][coll]
    collection.insert_one({"name": "probe.ini", "config": "", "ts": 0})
    collection.delete_many({})
    stack.callback(guarded(partial(collection.drop)))
    uri = f"mongodb://{address},{namespace}"
    argv, shown = _trimperor(uri, uri, opts, "--freq", f"{FREQ:g}")
    _, skipped = _uwsgi_for("mongodb", "", opts)
    return [
        Contender("trimperor", argv, shown, MongoCollection(collection), FREQ, opts.poll_rounds)
    ], skipped


def setup_amqp(stack: contextlib.ExitStack, opts: Options) -> tuple[list[Contender], str]:
    import pika

    host, port, user, password = DEFAULT_AMQP
    exchange = f"trimperor.bench.{os.getpid()}.{secrets.token_hex(3)}"
    params = pika.ConnectionParameters(
        host, port, credentials=pika.PlainCredentials(user, password), heartbeat=0
    )
    connection = pika.BlockingConnection(params)
    stack.callback(guarded(connection.close))
    channel = connection.channel()
    # The flags trimperor (and uWSGI) declare it with: fanout, not durable, not auto-delete.
    channel.exchange_declare(exchange, exchange_type="fanout", durable=False, auto_delete=False)

    def delete() -> None:
        with contextlib.suppress(Exception):
            channel.exchange_delete(exchange)

    stack.callback(guarded(delete))
    uri = f"amqp://{host}:{port}"
    argv, shown = _trimperor(uri, uri, opts, "--amqp-exchange", exchange)
    _, skipped = _uwsgi_for("amqp", "", opts)
    return [
        Contender(
            "trimperor", argv, shown, AmqpExchange(channel, exchange), EVENT_PHASE, opts.rounds
        )
    ], skipped


def setup_zmq(stack: contextlib.ExitStack, opts: Options) -> tuple[list[Contender], str]:
    import zmq

    ctx = zmq.Context()
    stack.callback(guarded(partial(ctx.term)))
    binary, skipped = _uwsgi_for("zmq", "emperor_zeromq", opts)
    contenders = []
    for label in ["trimperor"] + (["uwsgi"] if binary else []):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(endpoint)
        stack.callback(guarded(partial(push.close, 0)))
        uri = f"zmq://{endpoint}"
        if label == "trimperor":
            argv, shown = _trimperor(uri, uri, opts)
            rounds = opts.rounds
        else:
            assert binary is not None
            argv = uwsgi_argv(binary, "emperor_zeromq", uri)
            shown, rounds = shlex.join(argv), opts.uwsgi_rounds
        contenders.append(Contender(label, argv, shown, ZmqPush(push), EVENT_PHASE, rounds))
    return contenders, skipped


TITLES = {
    "pg-poll": ("PostgreSQL, polling (`--freq 1`)", "INSERT committed (autocommit)"),
    "pg-listen": (
        "PostgreSQL, `;LISTEN` + NOTIFY trigger (`--freq 60`)",
        "INSERT committed (autocommit)",
    ),
    "mongodb": ("MongoDB (mongoeco), polling (`--freq 1`)", "document inserted"),
    "amqp": ("AMQP (RabbitMQ), fanout exchange", "message published"),
    "zmq": ("ZeroMQ, PUSH to the emperor's PULL", "message sent"),
}


def setup(key: str, stack: contextlib.ExitStack, opts: Options) -> tuple[list[Contender], str]:
    if key == "pg-poll":
        return setup_pg(stack, opts, listen=False)
    if key == "pg-listen":
        return setup_pg(stack, opts, listen=True)
    if key == "mongodb":
        return setup_mongodb(stack, opts)
    if key == "amqp":
        return setup_amqp(stack, opts)
    if key == "zmq":
        return setup_zmq(stack, opts)
    raise ValueError(key)


# -- the rounds ----------------------------------------------------------------------------------


@dataclass
class Live:
    """A contender whose emperor runs."""

    contender: Contender
    emperor: Emperor
    run: Run
    marks: Path
    sockets: Path
    timeout: float
    done: int = 0

    def config(self, name: str) -> str:
        if self.contender.label == "uwsgi":
            return uwsgi_vassal(self.marks, self.sockets, name)
        return native_vassal(self.marks, name)


def _written(*paths: Path) -> bool:
    return all(read_pid_file(path) is not None for path in paths)


def one_round(live: Live, name: str, janitor: Janitor, rng: random.Random, measured: bool) -> bool:
    """Add, wait, remove, wait; returns whether the vassal showed up."""
    c, run = live.contender, live.run
    start, pid_file, stop = (live.marks / f"{name}.{ext}" for ext in ("start", "pid", "stop"))
    live.emperor.check_alive()
    time.sleep(rng.uniform(0, c.phase))
    t0 = c.channel.add(f"{name}.ini", live.config(name))
    pid: int | None = None
    if wait_until(partial(_written, start, pid_file), live.timeout):
        started_ns, pid = read_pid_file(start), read_pid_file(pid_file)
        assert started_ns is not None and pid is not None
        janitor.track([pid])
        if measured:
            run.up_ms.append((started_ns - t0) / 1e6)
    elif measured:
        run.missed_up += 1

    time.sleep(rng.uniform(0, c.phase))
    if pid is not None and is_gone(pid) and measured:
        run.died_early += 1
    t1 = c.channel.remove(f"{name}.ini")
    if pid is None:
        # Give a late vassal the time to show up, then to go.
        time.sleep(1.0)
        late = read_pid_file(pid_file)
        if late is not None:
            janitor.track([late])
            wait_until(partial(is_gone, late), live.timeout)
        return False
    if wait_until(partial(is_gone, pid), live.timeout):
        gone_ns = time.time_ns()
        if measured:
            run.down_ms.append((gone_ns - t1) / 1e6)
            told = read_pid_file(stop)
            if told is not None:
                run.told_ms.append((told - t1) / 1e6)
    elif measured:
        run.missed_down += 1
        run.log_notes.append(f"{name}: pid {pid} still running {live.timeout:.0f} s after removal")
    return True


INTERESTING = {
    "trimperor": ("WARNING", "ERROR", "CRITICAL", "Traceback", "warning", "error"),
    "uwsgi": ("error", "ERROR", "DAMN", "cursed", "blacklist", "Traceback"),
}


def run_source(
    key: str,
    contenders: Sequence[Contender],
    janitor: Janitor,
    rng: random.Random,
    progress: Callable[[str], None],
    keep_logs: Path | None,
) -> list[Run]:
    base = janitor.tempdir(f"trimperor-sources-{key}-")
    lives: list[Live] = []
    try:
        for c in contenders:
            home = base / c.label
            marks, sockets = home / "marks", home / "run"
            marks.mkdir(parents=True)
            sockets.mkdir()
            emperor = janitor.start(f"{c.label} {key}", c.argv, home / "emperor.log", home)
            timeout = UWSGI_TIMEOUT if c.label == "uwsgi" else TRIMPEROR_TIMEOUT
            lives.append(Live(c, emperor, Run(c.label, c.shown, c.rounds), marks, sockets, timeout))
        time.sleep(STARTUP)
        for live in lives:
            for attempt in range(1, WARMUP_ATTEMPTS + 1):
                live.run.warmup_attempts = attempt
                if one_round(live, f"{live.contender.label[0]}w{attempt}", janitor, rng, False):
                    break
            else:
                raise RuntimeError(
                    f"{key}: {live.contender.label}'s warm-up vassal never started; its log:\n"
                    + live.emperor.log_tail()
                )
        # Interleave: one round of each contender in turn, until each has done its rounds.
        while any(live.done < live.run.rounds for live in lives):
            for live in lives:
                if live.done >= live.run.rounds:
                    continue
                live.done += 1
                name = f"{live.contender.label[0]}{live.done:03d}"
                one_round(live, name, janitor, rng, True)
                if live.done % 10 == 0 or live.done == live.run.rounds:
                    progress(f"  {key}: {live.contender.label} {live.done}/{live.run.rounds}")
    finally:
        for live in lives:
            words = INTERESTING[live.contender.label]
            live.run.log_notes += [
                line for line in live.emperor.log_lines() if any(w in line for w in words)
            ]
            janitor.stop_emperor(live.emperor)
            keep_log(live.emperor, keep_logs, key)
        janitor.remove_dir(base)
    return [live.run for live in lives]


def measure(
    only: Sequence[str],
    opts: Options,
    seed: int | None,
    progress: Callable[[str], None],
    keep_logs: Path | None = None,
) -> list[SourceResult]:
    rng = random.Random(seed)
    results = []
    with Janitor() as janitor:
        for key in only:
            title, change = TITLES[key]
            progress(f"sources: {key}")
            with contextlib.ExitStack() as stack:
                try:
                    contenders, skipped = setup(key, stack, opts)
                except Exception as exc:  # a missing service: report it, go on
                    results.append(SourceResult(key, title, change, [], error=repr(exc)))
                    progress(f"  {key}: not measured: {exc!r}")
                    continue
                runs = run_source(key, contenders, janitor, rng, progress, keep_logs)
                results.append(SourceResult(key, title, change, runs, skipped))
    return results


# -- output ------------------------------------------------------------------------------------


def render(results: Sequence[SourceResult]) -> str:
    out: list[str] = []
    for r in results:
        out += [f"### {r.key}: {r.title}", ""]
        if r.error:
            out += [f"Not measured: {r.error}", ""]
            continue
        for run in r.runs:
            out.append(f"- {run.label}: `{run.command}`")
        out += [
            "",
            "| emperor, event | n | min ms | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for run in r.runs:
            out.append(summary_row(f"{run.label}: {r.change} → vassal running", run.up))
            out.append(summary_row(f"{run.label}: removed → vassal gone", run.down))
            if run.told_ms:
                out.append(
                    summary_row(f"{run.label}: removed → stop message reached the vassal", run.told)
                )
        out.append("")
        for run in r.runs:
            problems = run.problems()
            if run.warmup_attempts > 1:
                problems.append(f"the warm-up took {run.warmup_attempts} attempts")
            if problems:
                out.append(f"**{run.label}**: " + "; ".join(problems) + ".")
        by = {run.label: run for run in r.runs}
        if "uwsgi" in by and "trimperor" in by:
            t, u = by["trimperor"], by["uwsgi"]
            out.append(
                "Ratios uWSGI / trimperor: "
                f"up p50 {fmt(ratio(u.up.p50, t.up.p50))}x, "
                f"up p99 {fmt(ratio(u.up.p99, t.up.p99))}x, "
                f"down p50 {fmt(ratio(u.down.p50, t.down.p50))}x, "
                f"down p99 {fmt(ratio(u.down.p99, t.down.p99))}x (uWSGI's down includes its "
                "master burying its worker, about 1 s); uWSGI stop message reached / trimperor "
                f"down: p50 {fmt(ratio(u.told.p50, t.down.p50))}x, "
                f"p99 {fmt(ratio(u.told.p99, t.down.p99))}x."
            )
        else:
            out.append(f"uWSGI not measured: {r.uwsgi_skipped}.")
        if r.key in POLLED and r.runs:
            n = min(run.up.n for run in r.runs)
            out.append(
                f"Polled: each change lands at a random point of a {FREQ:g} s period, so the "
                f"medians carry a sampling error of about ±{500 / math.sqrt(max(n, 1)):.0f} ms "
                f"(one standard error with n = {n}); p99 is about one period."
            )
        if r.key == "pg-listen" and "trimperor" in by:
            up = by["trimperor"].up
            verdict = (
                "not measured"
                if math.isnan(up.p99)
                else ("met" if up.p99 <= LISTEN_TARGET_MS else "MISSED")
            )
            out.append(
                f"Target (change visible in ≤ {LISTEN_TARGET_MS:.0f} ms), read as the p99 of "
                f"INSERT → vassal running: {fmt(up.p99)} ms ({verdict}); p50 {fmt(up.p50)} ms."
            )
        out.append("")
        for run in r.runs:
            if run.log_notes:
                out.append(f"{run.label} log lines worth a look ({len(run.log_notes)}):")
                out.append("")
                out += [f"    {line}" for line in _dedup(run.log_notes)[:15]]
                out.append("")
    return "\n".join(out)


def _dedup(lines: Sequence[str]) -> list[str]:
    """Lines with their times and numbers masked, counted once each."""
    seen: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in lines:
        k = re.sub(r"\d+", "N", line)
        seen[k] = seen.get(k, 0) + 1
        first.setdefault(k, line)
    return [f"{first[k]}" + (f"  (x{n})" if n > 1 else "") for k, n in seen.items()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument(
        "--only",
        default=",".join(SOURCES),
        help=f"comma-separated sources to run (default: all, {','.join(SOURCES)})",
    )
    p.add_argument(
        "--rounds", type=int, default=100, help="trimperor rounds, event-driven sources (100)"
    )
    p.add_argument(
        "--poll-rounds", type=int, default=40, help="trimperor rounds, polled sources (40)"
    )
    p.add_argument("--uwsgi-rounds", type=int, default=30, help="uWSGI rounds (30; 0 skips)")
    add_run_options(
        p,
        skip_uwsgi="measure trimperor only",
        seed="seed for the random phases",
        trimperor_arg="extra argument for trimperor, repeatable",
        json="also write the raw samples as JSON",
    )
    p.add_argument(
        "--pg-admin-dsn",
        default=os.environ.get("TRIMPEROR_BENCH_PG", DEFAULT_PG_ADMIN),
        help="libpq DSN allowed to create roles and tables (default: $TRIMPEROR_BENCH_PG or "
        f"{DEFAULT_PG_ADMIN!r})",
    )
    p.add_argument(
        "--mongo-python",
        type=Path,
        default=ROOT / ".venv-mongo" / "bin" / "python",
        help="a Python with mongoeco[wire] (default: .venv-mongo/bin/python)",
    )
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SOURCES]
    if unknown:
        p.error(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})
    info = machine_info()
    binary = uwsgi_core()
    info["uwsgi"] = (
        f"Debian uwsgi-core {uwsgi_version(binary)} ({binary})" if binary else "not installed"
    )
    began = time.monotonic()

    def body() -> int:
        results = measure(args.only, opts, args.seed, progress, args.keep_logs)
        out = report_header("trimperor benchmarks: remote sources", "sources.py", argv, info)
        out += [f"Wall time: {time.monotonic() - began:.0f} s.", "", render(results)]
        print("\n".join(out))
        write_json(args.json, {"machine": info, "results": [asdict(r) for r in results]})
        return 0

    return run_main(body, "was stopped and removed")


if __name__ == "__main__":
    sys.exit(main())
