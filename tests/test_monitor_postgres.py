"""The pg:// source against the real PostgreSQL server (127.0.0.1:5432, trust auth).

Each test works on its own uniquely named table in database ``test`` and drops
it afterwards. Outages are made with :class:`tests.proxy.TcpProxy` between
the monitor (or the emperor process) and the server.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from tests.helpers import (
    PG_TRIGGERS,
    emperor_follows_a_polled_source,
    monitor_running,
    next_problem,
    next_snapshot,
    pidfile_vassal,
    polled_source_outage,
    polled_source_unreachable_at_start,
    versions,
    wait_for,
)
from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Snapshot, SourceEvent
from trimperor.monitors.postgres import DEFAULT_QUERY, PostgresMonitor, parse_uri

pytestmark = pytest.mark.integration

HOST, PORT = "127.0.0.1", 5432
DSN = f"host={HOST} port={PORT} user=postgres dbname=test"


class Table:
    """A fresh table ``name, config, ts, uid, gid, socket`` and a connection to fill it."""

    def __init__(self, conn: psycopg.Connection[Any], ts_type: str = "numeric") -> None:
        self.conn = conn
        self.name = f"vassals_{uuid.uuid4().hex[:10]}"
        self.execute(
            "CREATE TABLE {t} (name text, config text, ts "
            + ts_type
            + ", uid integer, gid integer, socket text)"
        )

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> None:
        """Run *query*, in which ``{t}`` stands for this table's name."""
        composed = sql.SQL(query).format(t=sql.Identifier(self.name))
        self.conn.execute(composed, params or None)

    def insert(self, name: str | None, config: str | None, ts: object = 1, *extra: Any) -> None:
        columns = ["name", "config", "ts", "uid", "gid", "socket"][: 3 + len(extra)]
        self.execute(
            "INSERT INTO {t} ("
            + ", ".join(columns)
            + ") VALUES ("
            + ", ".join(["%s"] * len(columns))
            + ")",
            (name, config, ts, *extra),
        )

    def uri(
        self,
        dsn: str = DSN,
        columns: str = "name, config, ts",
        listen: bool = False,
        order: str = "name",
    ) -> str:
        suffix = f";LISTEN {self.name}" if listen else ""
        return f"pg://{dsn};SELECT {columns} FROM {self.name} ORDER BY {order}{suffix}"


@pytest.fixture
def pg() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(DSN, autocommit=True, connect_timeout=5) as conn:
        yield conn


@pytest.fixture
def table(pg: psycopg.Connection[Any]) -> Iterator[Table]:
    t = Table(pg)
    yield t
    t.execute("DROP TABLE IF EXISTS {t} CASCADE")


@asynccontextmanager
async def running(
    uri: str, **options: Any
) -> AsyncIterator[tuple[PostgresMonitor, trio.MemoryReceiveChannel[SourceEvent]]]:
    monitor = PostgresMonitor(uri, MonitorOptions(**options))
    async with monitor_running(monitor) as recv:
        yield monitor, recv


def proxied(port: int) -> str:
    """The DSN of the server, reached through a proxy on *port*."""
    return f"host={HOST} port={port} user=postgres dbname=test"


def offers(name: str) -> Callable[[Snapshot], bool]:
    return lambda snap: name in versions(snap)


# -- the URI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "dsn", "query", "channel"),
    [
        (
            "pg://host=127.0.0.1 user=foobar dbname=emperor;SELECT name,config,ts FROM vassals",
            "host=127.0.0.1 user=foobar dbname=emperor",
            "SELECT name,config,ts FROM vassals",
            None,
        ),
        ("pg://dbname=x", "dbname=x", DEFAULT_QUERY, None),
        ("pg://dbname=x;LISTEN Vassals", "dbname=x", DEFAULT_QUERY, "vassals"),
        (
            "pg://postgresql://u@h/db;SELECT 1, 2, 3 ; listen   ch_1 ;",
            "postgresql://u@h/db",
            "SELECT 1, 2, 3",
            "ch_1",
        ),
        ('pg://dbname=x;SELECT a;LISTEN "Mixed ""Case"""', "dbname=x", "SELECT a", 'Mixed "Case"'),
        (
            "pg://dbname=x;SELECT a FROM t WHERE b = ';LISTEN x'",
            "dbname=x",
            "SELECT a FROM t WHERE b = ';LISTEN x'",
            None,
        ),
        ("pg://;SELECT a;b", "", "SELECT a;b", None),
    ],
)
def test_uri_forms(uri: str, dsn: str, query: str, channel: str | None) -> None:
    assert parse_uri(uri) == (dsn, query, channel)


def test_bad_connection_string_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="bad connection string"):
        PostgresMonitor("pg://nonsense;SELECT 1", MonitorOptions())


@pytest.mark.parametrize(
    "uri",
    [
        "pg://host=h password=s3cr3t dbname=d;SELECT 1",
        "pg://host=h password='s3cr3t' dbname=d;SELECT 1",
        "pg://postgresql://user:s3cr3t@h/d;SELECT 1",
        "pg://postgresql://user@h/d?password=s3cr3t;SELECT 1",
    ],
)
def test_the_password_never_shows(uri: str) -> None:
    monitor = PostgresMonitor(uri, MonitorOptions())
    assert "s3cr3t" not in monitor.uri
    assert "s3cr3t" not in monitor.status.snapshot().uri
    assert monitor.uri.endswith(";SELECT 1")


# -- the monitor on its own ---------------------------------------------------------------


async def test_rows_become_documents_and_changes_follow(table: Table) -> None:
    table.insert("a.ini", "[vassal]\ncommand = a\n", 1)
    table.insert("b.ini", "[vassal]\ncommand = b\n", 2, 1000, 1001, "")
    table.insert("c.ini", "[vassal]\ncommand = c\n", 3, None, None, "127.0.0.1:9999")
    columns = "name, config, ts, uid, gid, socket"
    async with running(table.uri(columns=columns), freq=0.05) as (monitor, recv):
        snap = await next_snapshot(recv)
        assert snap.source == monitor.uri
        a, b, c = snap.docs
        assert (a.name, a.text, a.version, a.source) == (
            "a.ini",
            "[vassal]\ncommand = a\n",
            "1",
            monitor.uri,
        )
        assert (a.uid, a.gid, a.socket, a.path) == (None, None, None, None)
        assert (b.uid, b.gid, b.socket) == (1000, 1001, None)  # empty socket: not on demand
        assert c.socket == "127.0.0.1:9999"
        assert monitor.status.state == "connected"
        assert monitor.status.vassals == 3

        table.execute("UPDATE {t} SET ts = 1.25 WHERE name = 'a.ini'")
        snap = await next_snapshot(recv, lambda s: versions(s)["a.ini"] != "1")
        assert versions(snap) == {"a.ini": "1.25", "b.ini": "2", "c.ini": "3"}

        table.execute("DELETE FROM {t} WHERE name = 'b.ini'")
        snap = await next_snapshot(recv, lambda s: "b.ini" not in versions(s))
        assert versions(snap) == {"a.ini": "1.25", "c.ini": "3"}

        table.execute("DELETE FROM {t}")
        snap = await next_snapshot(recv, lambda s: not s.docs)


async def test_a_postgresql_uri_as_dsn(table: Table) -> None:
    table.insert("a.ini", "[vassal]\ncommand = a\n")
    uri = table.uri(dsn=f"postgresql://postgres@{HOST}:{PORT}/test?application_name=t")
    async with running(uri, freq=0.05) as (monitor, recv):
        snap = await next_snapshot(recv)
        assert list(versions(snap)) == ["a.ini"]
        assert monitor.uri == uri


async def test_listen_reacts_without_waiting_for_freq(table: Table) -> None:
    table.conn.execute(PG_TRIGGERS.format(table=table.name).encode())
    table.insert("a.ini", "[vassal]\ncommand = a\n")
    async with running(table.uri(listen=True), freq=60) as (_, recv):
        first = await next_snapshot(recv)
        assert list(versions(first)) == ["a.ini"]

        # freq is 60 s: within a 20 s bound only NOTIFY can bring these (the speed is
        # measured by benchmarks/sources.py --only pg-listen, not here).
        for i in range(5):
            table.insert(f"n{i}.ini", "[vassal]\ncommand = n\n")
            snap = await next_snapshot(recv, offers(f"n{i}.ini"), timeout=20)

        before = versions(snap)
        table.execute("UPDATE {t} SET config = config || '# edited' WHERE name = 'a.ini'")
        snap = await next_snapshot(recv, lambda s: versions(s)["a.ini"] != before["a.ini"], 20)
        assert snap.docs[0].text == "[vassal]\ncommand = a\n# edited"

        table.execute("DELETE FROM {t} WHERE name LIKE 'n%'")
        snap = await next_snapshot(recv, lambda s: list(versions(s)) == ["a.ini"], 20)


async def test_bad_rows_are_logged_and_left_out(
    pg: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    table = Table(pg, ts_type="text")
    try:
        good = "[vassal]\ncommand = true\n"
        table.insert("good.ini", good, "100")
        table.insert("float.ini", good, "1.5e9")
        table.insert("../x.ini", good, "1")
        table.insert("x.txt", good, "1")
        table.insert("", good, "1")
        table.insert(None, good, "1")
        table.insert("nullcfg.ini", None, "1")
        table.insert("nullts.ini", good, None)
        table.insert("badts.ini", good, "soon")
        table.insert("big.ini", good + "#" * 200, "1")
        table.insert("good.ini", good, "200")  # a duplicate: the first row wins
        with caplog.at_level(logging.WARNING, "trimperor.monitors.postgres"):
            uri = table.uri(order="name, ts")
            async with running(uri, freq=0.05, max_config_size=100) as (_, recv):
                snap = await next_snapshot(recv)
                assert versions(snap) == {"float.ini": "1.5e9", "good.ini": "100"}
                for expected in (
                    "name=../x.ini reason=name '../x.ini' contains '/'",
                    "name=x.txt reason=name 'x.txt' does not end in a configuration extension",
                    "name= reason=empty name",
                    "name=None reason=name is NULL",
                    "name=nullcfg.ini reason=config is NULL",
                    "name=nullts.ini reason=ts is NULL",
                    "name=badts.ini reason=ts is not a number: 'soon'",
                    # measured by the server, never sent
                    "name=big.ini reason=configuration is 224 bytes, over --max-config-size "
                    "(100); not fetched",
                    "name=good.ini reason=duplicate name",
                ):
                    assert expected in caplog.text, expected
                # Logged once, not at every poll.
                await next_snapshot(recv)
                await next_snapshot(recv)
                assert caplog.text.count("name=badts.ini") == 1

                # A good row turning bad keeps its last good document...
                table.execute("DELETE FROM {t} WHERE name = 'good.ini' AND ts = '200'")
                table.execute("UPDATE {t} SET config = NULL, ts = '300' WHERE name = 'good.ini'")
                await wait_for(lambda: "keeping its last good" in caplog.text)
                snap = await next_snapshot(recv)
                assert versions(snap) == {"float.ini": "1.5e9", "good.ini": "100"}
                assert snap.docs[1].text == good
                # ...until the row is gone.
                table.execute("DELETE FROM {t} WHERE name = 'good.ini'")
                snap = await next_snapshot(recv, lambda s: "good.ini" not in versions(s))
                assert versions(snap) == {"float.ini": "1.5e9"}
    finally:
        table.execute("DROP TABLE {t}")


@pytest.mark.parametrize(
    ("columns", "count"),
    [("name, config", 2), ("name, config, ts, uid, gid, socket, 7", 7)],
)
async def test_wrong_column_count(
    table: Table, caplog: pytest.LogCaptureFixture, columns: str, count: int
) -> None:
    table.insert("a.ini", "[vassal]\ncommand = a\n")
    async with running(table.uri(columns=columns), freq=0.05) as (monitor, recv):
        snap = await next_snapshot(recv)
        assert snap.docs == ()
        assert monitor.status.state == "connected"
    assert f"name=a.ini reason=the query returns {count} columns, not 3 to 6" in caplog.text


async def test_a_failing_query_retries_and_stops_nothing(table: Table) -> None:
    missing = f"{table.name}_later"
    uri = f"pg://{DSN};SELECT name, config, ts FROM {missing}"
    async with running(uri, freq=0.05) as (monitor, recv):
        problem = await next_problem(recv)
        assert problem.source == monitor.uri
        assert "UndefinedTable" in problem.message
        assert monitor.status.state == "retrying"
        assert monitor.status.last_error is not None
        assert "does not exist" in monitor.status.last_error
        table.execute("ALTER TABLE {t} RENAME TO " + missing)
        table.name = missing
        table.insert("a.ini", "[vassal]\ncommand = a\n")
        snap = await next_snapshot(recv)  # the first event after the problem
        assert list(versions(snap)) == ["a.ini"]
        assert monitor.status.state == "connected"


async def test_not_a_select_is_a_problem(table: Table) -> None:
    uri = f"pg://{DSN};UPDATE {table.name} SET ts = 1"
    async with running(uri, freq=0.05) as (_, recv):
        problem = await next_problem(recv)
        assert "no rows" in problem.message


async def test_outage_stops_nothing_and_heals_after(table: Table) -> None:
    table.insert("a.ini", "[vassal]\ncommand = a\n")
    table.insert("b.ini", "[vassal]\ncommand = b\n")
    await polled_source_outage(
        (HOST, PORT),
        lambda port: PostgresMonitor(
            table.uri(dsn=proxied(port), listen=True), MonitorOptions(freq=0.05)
        ),
        lambda: table.execute("DELETE FROM {t} WHERE name = 'b.ini'"),
    )


async def test_an_unreachable_server_at_start_is_retried(table: Table) -> None:
    table.insert("a.ini", "[vassal]\ncommand = a\n")
    await polled_source_unreachable_at_start(
        (HOST, PORT),
        lambda port: PostgresMonitor(table.uri(dsn=proxied(port)), MonitorOptions(freq=0.05)),
    )


async def test_cancel_during_a_slow_query_is_prompt_and_closes_the_connection(
    table: Table,
) -> None:
    table.insert("a.ini", "[vassal]\ncommand = a\n")
    fds_before = set(os.listdir("/proc/self/fd"))
    # A query that would run for an hour: ending well within the bound is "prompt".
    uri = f"pg://{DSN};SELECT name, config, ts FROM {table.name}, pg_sleep(3600)"
    activity = (
        "SELECT pid FROM pg_stat_activity WHERE state = 'active'"
        " AND query LIKE '%%pg_sleep(3600)%%' AND pid <> pg_backend_pid()"
    )

    def slow_queries() -> list[int]:
        return [row[0] for row in table.conn.execute(activity.encode(), ()).fetchall()]

    try:
        with trio.fail_after(60):
            async with running(uri, freq=0.05):
                await wait_for(lambda: bool(slow_queries()))  # running in its thread now
        # The abandoned thread closes the connection once the query returns: end it now.
        for pid in slow_queries():
            table.conn.execute(b"SELECT pg_cancel_backend(%s)", (pid,))
        await wait_for(lambda: set(os.listdir("/proc/self/fd")) <= fds_before, timeout=60)
    finally:
        for pid in slow_queries():  # never leave the query holding the table
            table.conn.execute(b"SELECT pg_cancel_backend(%s)", (pid,))


# -- the emperor, end to end -------------------------------------------------------------


async def test_emperor_end_to_end_with_listen_and_an_outage(table: Table, tmp_path: Path) -> None:
    table.conn.execute(PG_TRIGGERS.format(table=table.name).encode())

    def add() -> None:
        table.insert("a.ini", pidfile_vassal(tmp_path, "a"))
        table.insert("b.ini", pidfile_vassal(tmp_path, "b"))

    await emperor_follows_a_polled_source(
        tmp_path,
        (HOST, PORT),
        lambda port: table.uri(dsn=proxied(port), listen=True),
        freq=60,
        add=add,
        # ts changes (the trigger sets it): reload
        reload_a=lambda: table.execute(
            "UPDATE {t} SET config = config || '# 2' WHERE name = 'a.ini'"
        ),
        stop_b=lambda: table.execute("DELETE FROM {t} WHERE name = 'b.ini'"),
        remove_a=lambda: table.execute("DELETE FROM {t} WHERE name = 'a.ini'"),
        # attempt=2: a reconnection has failed too, the line is really down
        retries=2,
    )


def test_fraction_of_ts_is_kept() -> None:
    from decimal import Decimal

    from trimperor.monitors.postgres import BadRow, row_document

    opts = MonitorOptions()
    doc = row_document(("a.ini", "x", Decimal("1700000000.123456")), "pg://", opts)
    assert doc.version == "1700000000.123456"
    assert row_document(("a.ini", "x", 17), "pg://", opts).version == "17"
    for bad in (math.nan, math.inf, True, "1.2.3", b"1"):
        with pytest.raises(BadRow, match="ts is not"):
            row_document(("a.ini", "x", bad), "pg://", opts)
    with pytest.raises(BadRow, match="uid is not a non-negative integer"):
        row_document(("a.ini", "x", 1, -1), "pg://", opts)
    assert row_document(("a.ini", "x", 1, "42", Decimal(7)), "pg://", opts).gid == 7
