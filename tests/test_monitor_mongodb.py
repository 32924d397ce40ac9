"""The mongodb:// source, against mongoeco's MongoDB wire-protocol server.

No real ``mongod`` can be installed on the project's machines. These tests
run against mongoeco (PyPI ``mongoeco[wire]``, Python >= 3.13), which
``scripts/services start`` installs into ``.venv-mongo``; a session fixture
starts ``scripts/mongoeco_server.py`` on a free port and stops it at the
end. mongoeco has no change streams, so only the polling path runs here.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import select
import signal
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from pymongo import MongoClient
from pymongo.collection import Collection

from tests.helpers import (
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
from trimperor.core.model import SourceEvent
from trimperor.monitors.mongodb import (
    DEFAULT_NAMESPACE,
    MongoMonitor,
    parse_filter,
    parse_uri,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MONGO_PYTHON = ROOT / ".venv-mongo" / "bin" / "python"
SERVER = ROOT / "scripts" / "mongoeco_server.py"
DB = "trimperor_test"


# -- the filter parser (no server) -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{enabled:1}", {"enabled": 1}),
        ("{}", {}),
        (" { } ", {}),
        ("{env:'prod', n: {$gt: 2}}", {"env": "prod", "n": {"$gt": 2}}),
        (
            "{\"a.b\": [1, 'x', true, false, null, -2.5e3]}",
            {"a.b": [1, "x", True, False, None, -2500.0]},
        ),
        ("{a.b: 1, $or: [{x: 1}, {y: 2},],}", {"a.b": 1, "$or": [{"x": 1}, {"y": 2}]}),
        (
            "{s: 'it\\'s', t: \"q\\\"\", u: '\\u00e9\\ud83d\\ude00', v: 'a\"b'}",
            {"s": "it's", "t": 'q"', "u": "é😀", "v": 'a"b'},
        ),
        ("{n: 0, f: 0.5, e: 1E2, m: -0}", {"n": 0, "f": 0.5, "e": 100.0, "m": 0}),
        ("{'quoted key': 1, 2: 'two'}", {"quoted key": 1, "2": "two"}),
        ("{a: 1, a: 2}", {"a": 2}),
    ],
)
def test_filter_parser(text: str, expected: dict[str, Any]) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "position", "what"),
    [
        ("{enabled 1}", 9, "expected ':'"),
        ("{a: 1", 5, "expected '}'"),
        ("{a: prod}", 4, "expected a value"),
        ("[1]", 0, "must be an object"),
        ("{a: 1} x", 7, "unexpected text after the filter"),
        ("{a: 'x}", 4, "unterminated string"),
        ("{a: 01}", 5, "expected '}'"),
        ("{a: 1,, b: 2}", 6, "expected a key"),
        ("{a: '\\x41'}", 5, "unknown escape"),
        ("{a: '\\u12'}", 5, "bad \\u escape"),
        ("", 0, "must be an object"),
    ],
)
def test_filter_errors_name_the_position(text: str, position: int, what: str) -> None:
    with pytest.raises(UsageError, match=rf"{re.escape(what)}.* at position {position}\b"):
        parse_filter(text)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_identifier = st.from_regex(r"\A[A-Za-z_$][A-Za-z0-9_$.]{0,8}\Z")


@given(st.dictionaries(st.text(), _json, max_size=5))
def test_filter_parser_reads_any_json_object(value: dict[str, Any]) -> None:
    assert parse_filter(json.dumps(value)) == value
    assert parse_filter(json.dumps(value, indent=1, ensure_ascii=False)) == value


def _lenient(value: Any, bare: bool) -> str:
    """*value* written the way a person would in a shell: bare keys, single quotes."""
    if isinstance(value, dict):
        items = (f"{_key(k, bare)}: {_lenient(v, bare)}" for k, v in value.items())
        return "{" + ", ".join(items) + (",}" if value else "}")
    if isinstance(value, str):
        return _single(value)
    return json.dumps(value)


def _key(key: str, bare: bool) -> str:
    return key if bare and re.fullmatch(r"[A-Za-z0-9_$][A-Za-z0-9_$.]*", key) else _single(key)


def _single(text: str) -> str:
    return "'" + json.dumps(text)[1:-1].replace('\\"', '"').replace("'", "\\'") + "'"


@given(st.dictionaries(_identifier, st.dictionaries(_identifier, _json, max_size=3), max_size=4))
def test_filter_parser_reads_bare_keys_and_single_quotes(value: dict[str, Any]) -> None:
    assert parse_filter(_lenient(value, bare=True)) == value
    assert parse_filter(_lenient(value, bare=False)) == value


# -- the URI (no server) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "hosts", "namespace", "query"),
    [
        (
            "mongodb://127.0.0.1:27107,emperor.vassals,{enabled:1}",
            "mongodb://127.0.0.1:27107",
            "emperor.vassals",
            {"enabled": 1},
        ),
        ("mongodb://h1:1,h2:2,emperor.vassals", "mongodb://h1:1,h2:2", "emperor.vassals", {}),
        ("mongodb://h1:1,h2:2", "mongodb://h1:1,h2:2", DEFAULT_NAMESPACE, {}),
        ("mongodb://h1,h2", "mongodb://h1,h2", DEFAULT_NAMESPACE, {}),
        ("mongodb://h1:1,{a: 1}", "mongodb://h1:1", DEFAULT_NAMESPACE, {"a": 1}),
        (
            "mongodb://u:pw@h1,h2:2/?replicaSet=rs,db.coll.sub, {a: {$in: [1, 2]}}",
            "mongodb://u:pw@h1,h2:2/?replicaSet=rs",
            "db.coll.sub",
            {"a": {"$in": [1, 2]}},
        ),
        ("mongodb://", "mongodb://127.0.0.1:27017", DEFAULT_NAMESPACE, {}),
        ("mongodb://,emperor.vassals", "mongodb://127.0.0.1:27017", "emperor.vassals", {}),
        # Ambiguous, so documented: a last part that looks like DB.COLLECTION is one.
        ("mongodb://h,db.example.com", "mongodb://h", "db.example.com", {}),
        ("mongodb://db.example.com", "mongodb://db.example.com", DEFAULT_NAMESPACE, {}),
    ],
)
def test_uri_forms(uri: str, hosts: str, namespace: str, query: dict[str, Any]) -> None:
    source = parse_uri(uri)
    assert source.hosts == hosts
    assert f"{source.database}.{source.collection}" == namespace
    assert source.filter == query


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("mongodb://h:1,db.c,{enabled 1}", "expected ':' at position 9"),
        ("mongodb://h:1,db.c{a:1}", "must follow a ','"),
        ("mongodb://h:port,db.c", "bad mongodb hosts"),
        ("mongodb://u:secret@h:port,db.c", r"u:\*\*\*@h"),
    ],
)
def test_bad_uris_are_usage_errors(uri: str, match: str) -> None:
    with pytest.raises(UsageError, match=match) as exc:
        MongoMonitor(uri, MonitorOptions())
    assert "secret" not in str(exc.value)


def test_the_password_never_shows() -> None:
    monitor = MongoMonitor("mongodb://user:s3cr3t@h1:1,h2:2,db.c,{a: 'b@c'}", MonitorOptions())
    assert monitor.uri == "mongodb://user:***@h1:1,h2:2,db.c,{a: 'b@c'}"
    assert "s3cr3t" not in monitor.status.snapshot().uri


# -- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """mongoeco's wire server on a free port, for the whole session.

    Session-scoped fixtures are set up before the function-scoped leak check
    of tests/conftest.py, so the server process is not taken for a leak.
    """
    if not MONGO_PYTHON.exists():
        pytest.skip(f"{MONGO_PYTHON} is missing: run scripts/services start")
    errors = tmp_path_factory.mktemp("mongoeco") / "server.log"
    with open(errors, "wb") as err:
        proc = subprocess.Popen(
            [str(MONGO_PYTHON), str(SERVER), "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        readable, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if readable else b""
        if not line.startswith(b"ready "):
            pytest.fail(f"mongoeco did not start: {line!r}\n{errors.read_text()}")
        host, _, port = line.split()[1].decode().rpartition(":")
        yield host, int(port)
    finally:
        proc.stdin.close()  # the server exits when its stdin closes...
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # ...or when killed
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def collection(mongo_server: tuple[str, int]) -> Iterator[Collection[dict[str, Any]]]:
    host, port = mongo_server
    client: MongoClient[dict[str, Any]] = MongoClient(
        host, port, serverSelectionTimeoutMS=5000, directConnection=True
    )
    coll = client[DB][f"vassals_{uuid.uuid4().hex[:10]}"]
    try:
        yield coll
        coll.drop()
    finally:
        client.close()


def ts(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def uri_for(coll: Collection[dict[str, Any]], port: int, query: str = "") -> str:
    return f"mongodb://127.0.0.1:{port},{DB}.{coll.name}" + (f",{query}" if query else "")


@asynccontextmanager
async def running(
    uri: str, **options: Any
) -> AsyncIterator[tuple[MongoMonitor, trio.MemoryReceiveChannel[SourceEvent]]]:
    monitor = MongoMonitor(uri, MonitorOptions(**options))
    async with monitor_running(monitor) as recv:
        yield monitor, recv


# -- the monitor on its own ---------------------------------------------------------------------


async def test_documents_become_vassals_and_changes_follow(
    collection: Collection[dict[str, Any]],
    mongo_server: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    collection.insert_many(
        [
            {"name": "a.ini", "config": "[vassal]\ncommand = a\n", "ts": ts(1), "enabled": 1},
            {
                "name": "b.ini",
                "config": "[vassal]\ncommand = b\n",
                "ts": ts(2.5),
                "uid": 1000,
                "gid": 1001.0,  # the mongo shell's numbers are doubles
                "socket": "",
                "enabled": 1,
            },
            {"name": "c.ini", "config": "x", "ts": 3, "socket": "/run/c.sock", "enabled": 1},
            {"name": "off.ini", "config": "x", "ts": ts(1), "enabled": 0},
        ]
    )
    uri = uri_for(collection, mongo_server[1], "{enabled:1}")
    with caplog.at_level(logging.INFO, "trimperor.monitors.mongodb"):
        async with running(uri, freq=0.05) as (monitor, recv):
            snap = await next_snapshot(recv)
            assert snap.source == monitor.uri == uri
            a, b, c = snap.docs
            assert (a.name, a.text, a.version, a.source) == (
                "a.ini",
                "[vassal]\ncommand = a\n",
                "1000",
                uri,
            )
            assert (a.uid, a.gid, a.socket, a.path) == (None, None, None, None)
            assert (b.version, b.uid, b.gid, b.socket) == ("2500", 1000, 1001, None)
            assert (c.version, c.socket) == ("3", "/run/c.sock")
            assert monitor.status.state == "connected"

            collection.update_one({"name": "a.ini"}, {"$set": {"ts": ts(1.001)}})
            snap = await next_snapshot(recv, lambda s: versions(s)["a.ini"] != "1000")
            assert versions(snap) == {"a.ini": "1001", "b.ini": "2500", "c.ini": "3"}

            collection.delete_one({"name": "b.ini"})
            snap = await next_snapshot(recv, lambda s: "b.ini" not in versions(s))
            collection.update_one({"name": "c.ini"}, {"$set": {"enabled": 0}})
            snap = await next_snapshot(recv, lambda s: "c.ini" not in versions(s))
            assert list(versions(snap)) == ["a.ini"]
    # mongoeco has no change streams: said once, then polling goes on.
    assert caplog.text.count("source.change_stream_unavailable") == 1
    assert "$changeStream" in caplog.text


async def test_empty_config_means_a_file_in_the_working_directory(
    collection: Collection[dict[str, Any]],
    mongo_server: tuple[str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.ini").write_text("[vassal]\ncommand = one\n")
    collection.insert_many(
        [
            {"name": "file.ini", "config": "", "ts": ts(1)},
            {"name": "missing.ini", "ts": ts(1)},
        ]
    )
    async with running(uri_for(collection, mongo_server[1]), freq=0.05) as (_, recv):
        snap = await next_snapshot(recv)
        present, missing = snap.docs
        assert present.name == "file.ini"
        assert present.text == "[vassal]\ncommand = one\n"
        assert present.path == str(tmp_path / "file.ini")
        assert present.version.startswith("1000:")
        assert missing.name == "missing.ini"
        assert missing.text is None
        assert missing.error is not None
        assert "does not exist" in missing.error

        # The file changes, the document does not: a new version all the same.
        st = os.stat(tmp_path / "file.ini")
        (tmp_path / "file.ini").write_text("[vassal]\ncommand = two\n")
        os.utime(tmp_path / "file.ini", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        snap = await next_snapshot(recv, lambda s: s.docs[0].version != present.version)
        assert snap.docs[0].text == "[vassal]\ncommand = two\n"

        (tmp_path / "missing.ini").write_text("[vassal]\ncommand = three\n")
        snap = await next_snapshot(recv, lambda s: s.docs[1].text is not None)
        assert snap.docs[1].error is None


async def test_bad_documents_are_logged_and_left_out(
    collection: Collection[dict[str, Any]],
    mongo_server: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = "[vassal]\ncommand = true\n"
    collection.insert_many(
        [
            {"name": "good.ini", "config": good, "ts": ts(100), "n": 0},
            {"name": "../x.ini", "config": good, "ts": ts(1)},
            {"name": "x.txt", "config": good, "ts": ts(1)},
            {"name": "", "config": good, "ts": ts(1)},
            {"config": good, "ts": ts(1)},
            {"name": 7, "config": good, "ts": ts(1)},
            {"name": "numcfg.ini", "config": 12, "ts": ts(1)},
            {"name": "nots.ini", "config": good},
            {"name": "badts.ini", "config": good, "ts": "soon"},
            {"name": "baduid.ini", "config": good, "ts": ts(1), "uid": -1},
            {"name": "big.ini", "config": good + "#" * 200, "ts": ts(1)},
            {"name": "good.ini", "config": good, "ts": ts(200), "n": 1},
        ]
    )
    uri = uri_for(collection, mongo_server[1])
    with caplog.at_level(logging.WARNING, "trimperor.monitors.mongodb"):
        async with running(uri, freq=0.05, max_config_size=100) as (_, recv):
            snap = await next_snapshot(recv)
            assert versions(snap) == {"good.ini": "100000"}
            for expected in (
                "name=../x.ini reason=name '../x.ini' contains '/'",
                "name=x.txt reason=name 'x.txt' does not end in a configuration extension",
                "name= reason=empty name",
                "name=None reason=name is missing",
                "name=None reason=name is not a string",
                "name=numcfg.ini reason=config is not a string: int",
                "name=nots.ini reason=ts is missing",
                "name=badts.ini reason=ts is not a date or a number: 'soon'",
                "name=baduid.ini reason=uid is not a non-negative integer: -1",
                "name=big.ini reason=configuration of 'big.ini' is 224 bytes, over",
                "name=good.ini reason=duplicate name",
            ):
                assert expected in caplog.text, expected
            await next_snapshot(recv)
            await next_snapshot(recv)
            assert caplog.text.count("name=badts.ini") == 1  # once, not at every poll

            # A good document turning bad keeps its last good version...
            collection.delete_one({"name": "good.ini", "n": 1})
            collection.update_one({"name": "good.ini"}, {"$set": {"ts": "later"}})
            await wait_for(lambda: "keeping its last good" in caplog.text)
            snap = await next_snapshot(recv)
            assert versions(snap) == {"good.ini": "100000"}
            assert snap.docs[0].text == good
            # ...until it is gone.
            collection.delete_one({"name": "good.ini"})
            await next_snapshot(recv, lambda s: not s.docs)


class FakeChangeStream:
    """Stands in for ``Collection.watch()`` (mongoeco has no change streams):
    reports one change each time *changed* is set."""

    def __init__(self, changed: threading.Event) -> None:
        self.changed = changed

    def __enter__(self) -> FakeChangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def try_next(self) -> dict[str, Any] | None:
        if self.changed.wait(0.05):
            self.changed.clear()
            return {"operationType": "insert"}
        return None


async def test_a_change_stream_triggers_a_read_at_once(
    collection: Collection[dict[str, Any]],
    mongo_server: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    changed = threading.Event()
    monkeypatch.setattr(Collection, "watch", lambda self, **kw: FakeChangeStream(changed))
    collection.insert_one({"name": "a.ini", "config": "x", "ts": ts(1)})
    with caplog.at_level(logging.INFO, "trimperor.monitors.mongodb"):
        async with running(uri_for(collection, mongo_server[1]), freq=60) as (_, recv):
            await next_snapshot(recv)
            await wait_for(lambda: "source.watching" in caplog.text)
            collection.insert_one({"name": "b.ini", "config": "x", "ts": ts(1)})
            changed.set()
            # freq is 60 s: within the bound only the change stream can bring this one.
            snap = await next_snapshot(recv, lambda s: len(s.docs) == 2, timeout=20)
            assert list(versions(snap)) == ["a.ini", "b.ini"]


async def test_a_filter_the_server_refuses_is_retried(
    collection: Collection[dict[str, Any]], mongo_server: tuple[str, int]
) -> None:
    uri = uri_for(collection, mongo_server[1], "{$bogus: 1}")
    async with running(uri, freq=0.05) as (monitor, recv):
        problem = await next_problem(recv)
        assert "$bogus" in problem.message
        assert monitor.status.state == "retrying"


async def test_outage_stops_nothing_and_heals_after(
    collection: Collection[dict[str, Any]], mongo_server: tuple[str, int]
) -> None:
    collection.insert_many(
        [
            {"name": "a.ini", "config": "[vassal]\ncommand = a\n", "ts": ts(1)},
            {"name": "b.ini", "config": "[vassal]\ncommand = b\n", "ts": ts(1)},
        ]
    )
    await polled_source_outage(
        mongo_server,
        lambda port: MongoMonitor(uri_for(collection, port), MonitorOptions(freq=0.05)),
        lambda: collection.delete_one({"name": "b.ini"}),
    )


async def test_an_unreachable_server_at_start_is_retried(
    collection: Collection[dict[str, Any]], mongo_server: tuple[str, int]
) -> None:
    collection.insert_one({"name": "a.ini", "config": "x", "ts": ts(1)})
    await polled_source_unreachable_at_start(
        mongo_server,
        lambda port: MongoMonitor(uri_for(collection, port), MonitorOptions(freq=0.05)),
    )


# -- the emperor, end to end -------------------------------------------------------------------


async def test_emperor_end_to_end_with_an_outage(
    collection: Collection[dict[str, Any]], mongo_server: tuple[str, int], tmp_path: Path
) -> None:
    def add() -> None:
        collection.insert_many(
            [
                {"name": n, "config": pidfile_vassal(tmp_path, n[0]), "ts": ts(1), "enabled": 1}
                for n in ("a.ini", "b.ini")
            ]
        )

    await emperor_follows_a_polled_source(
        tmp_path,
        mongo_server,
        lambda port: uri_for(collection, port, "{enabled: 1}"),
        freq=0.1,
        add=add,
        # ts changes: reload
        reload_a=lambda: collection.update_one({"name": "a.ini"}, {"$set": {"ts": ts(2)}}),
        # no longer matched by the filter: stopped
        stop_b=lambda: collection.update_one({"name": "b.ini"}, {"$set": {"enabled": 0}}),
        remove_a=lambda: collection.delete_one({"name": "a.ini"}),
    )
