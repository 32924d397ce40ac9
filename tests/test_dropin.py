"""Drop-in for ``uwsgi --emperor``: uWSGI's command lines, wrappers and binaries.

The seed command lines (uWSGI's imperial monitor examples) run with
``uwsgi`` replaced by ``trimperor`` and every other word kept, ``--plugin``
included, against the real servers the monitor tests use (PostgreSQL on
5432, RabbitMQ on 5672, mongoeco's wire server, ZeroMQ in process).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
import trio
import zmq
from pymongo import MongoClient

from tests.helpers import (
    PYTHON,
    EmperorProcess,
    free_port,
    new_pid,
    pid_alive,
    pidfile_vassal,
    read_pid,
    read_stats_document,
    trac_ini,
    wait_for,
    write_atomic,
)
from tests.test_monitor_mongodb import mongo_server  # noqa: F401 - a session fixture
from trimperor import cli
from trimperor.core.model import Upsert, VassalDocument
from trimperor.core.vassalspec import UwsgiSpec, build_spec
from trimperor.emperor import Emperor
from trimperor.testing import FakeMonitor
from trimperor.vassals.spawner import PosixSpawner
from trimperor.vassals.uwsgi import (
    UwsgiOptions,
    binary_candidates,
    default_binary,
    resolve_binary,
    uwsgi_argv,
)

VENV_BIN = Path(PYTHON).parent
UWSGI = VENV_BIN / "uwsgi"
FAKE = Path(__file__).with_name("fake_uwsgi.py")


def werkzeug_xml(port: int, module: str = "werkzeug.testapp:test_app") -> str:
    """The seed's werkzeug.xml, on a free port and speaking HTTP (so a test can ask)."""
    return (
        "<uwsgi>\n"
        f"    <module>{module}</module>\n"
        "    <master/>\n"
        "    <processes>2</processes>\n"
        f"    <http-socket>127.0.0.1:{port}</http-socket>\n"
        "</uwsgi>\n"
    )


async def wait_http(port: int, timeout: float = 60.0, path: str = "/") -> bytes:
    """The body of the first 200 answer on *port*."""

    def get() -> bytes | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                body: bytes = r.read()
                return body if r.status == 200 else None
        except OSError:
            return None

    with trio.fail_after(timeout):
        while (body := await trio.to_thread.run_sync(get)) is None:
            await trio.sleep(0.1)
    return body


async def stop(emperor: EmperorProcess) -> None:
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait(60) == 0, emperor.text()


# -- --plugin (no processes) ------------------------------------------------------------


def test_plugins_are_built_in_and_others_are_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="trimperor"):
        cli.check_plugins(
            ["emperor_pg", "python3,emperor_zeromq", "/usr/lib/emperor_amqp_plugin.so"]
        )
    lines = [r.getMessage() for r in caplog.records]
    assert "cli.plugin_builtin plugin=emperor_pg scheme=pg" in lines
    assert "cli.plugin_builtin plugin=emperor_zeromq scheme=zmq" in lines
    assert "cli.plugin_builtin plugin=emperor_amqp scheme=amqp" in lines
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert warned[0].startswith("cli.plugin_ignored plugin=python3 ")


def test_uwsgi_spellings_are_accepted() -> None:
    args = cli.build_parser().parse_args(
        [
            "--plugin",
            "emperor_pg",
            "--plugins",
            "emperor_zeromq",
            "--emperor",
            "x",
            "--emperor-wrapper",
            "/w",
            "--emperor-wrapper-override",
            "/o1",
            "--emperor-wrapper-override",
            "/o2",
            "--emperor-wrapper-fallback",
            "/f",
            "--emperor-wrapper-attr",
            "wrapper",
        ]
    )
    assert args.plugins == ["emperor_pg", "emperor_zeromq"]
    assert args.emperor_wrapper == "/w"
    assert args.emperor_wrapper_override == ["/o1", "/o2"]
    assert args.emperor_wrapper_fallback == ["/f"]
    assert args.emperor_wrapper_attr == "wrapper"


def test_an_emperor_ini_may_list_plugins(tmp_path: Path) -> None:
    ini = tmp_path / "emperor.ini"
    ini.write_text("[uwsgi]\nplugins = emperor_pg\nemperor = /etc/vassals\n")
    assert cli.ini_arguments(str(ini)) == ["--plugins", "emperor_pg", "--emperor", "/etc/vassals"]


# -- choosing the binary (no processes) --------------------------------------------------


def test_candidates_in_uwsgi_order() -> None:
    spec = UwsgiSpec("a.ini", "/v/a.ini", "")
    plain = UwsgiOptions(binary="/b/uwsgi")
    assert binary_candidates(spec, plain) == ("/b/uwsgi",)
    wrapped = UwsgiOptions(
        binary="/b/uwsgi",
        wrapper="/w",
        wrapper_override=("/o1", "/o2"),
        wrapper_fallback=("/f",),
        wrapper_attr="wrapper",
    )
    assert binary_candidates(spec, wrapped) == ("/o1", "/o2", "/w", "/f")
    own = UwsgiSpec("a.ini", "/v/a.ini", "", binary="/usr/bin/uwsgi-core")
    assert binary_candidates(own, wrapped) == ("/o1", "/o2", "/usr/bin/uwsgi-core", "/f")
    attr = UwsgiSpec("a.ini", "/v/a.ini", "", binary="/c", attrs=(("wrapper", "/a"),))
    assert binary_candidates(attr, wrapped) == ("/o1", "/o2", "/a", "/f")
    # the attribute counts only when --emperor-wrapper-attr names it
    assert binary_candidates(attr, plain) == ("/c",)
    assert uwsgi_argv(attr, plain)[0] == "/c"


def test_the_first_runnable_candidate_wins(tmp_path: Path) -> None:
    program = tmp_path / "bin" / "uwsgi-x"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    not_executable = tmp_path / "bin" / "plain"
    not_executable.write_text("")
    program.chmod(0o755)
    path = str(program.parent)
    assert resolve_binary(("/nonexistent/uwsgi", str(not_executable), str(program)), path) == str(
        program
    )
    assert resolve_binary(("nope-not-here", "uwsgi-x"), path) == "uwsgi-x"
    assert resolve_binary(("/nonexistent/uwsgi", "nope-not-here"), path) is None


def test_binary_path_and_attributes_come_from_the_configuration(tmp_path: Path) -> None:
    rails = tmp_path / "rails.yml"
    doc = VassalDocument(
        "rails.yml",
        f"dir://{tmp_path}",
        "1",
        "uwsgi:\n  binary-path: /usr/bin/uwsgi-core\n  plugins: rack\n",
        path=str(rails),
        in_own_dir=True,
    )
    spec = build_spec(doc, {})
    assert isinstance(spec, UwsgiSpec)
    assert spec.binary == "/usr/bin/uwsgi-core"
    ini = VassalDocument(
        "a.ini",
        f"dir://{tmp_path}",
        "1",
        "[uwsgi]\nbinary-path = bin/uwsgi\n[emperor]\nwrapper = /opt/w\n",
        path=str(tmp_path / "a.ini"),
        in_own_dir=True,
    )
    spec = build_spec(ini, {})
    assert isinstance(spec, UwsgiSpec)
    assert spec.binary == str(tmp_path / "bin" / "uwsgi")  # relative to the vassal's cwd
    assert spec.attr("wrapper") == "/opt/w"
    assert spec.attr("other") is None
    # a new binary cannot be reloaded in place
    other = UwsgiSpec(spec.name, spec.path, spec.text, spec.cwd, binary="/x")
    assert other.launch_key() != spec.launch_key()


def test_the_default_binary_is_beside_the_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if UWSGI.exists():
        assert default_binary() == str(UWSGI)
    venv, elsewhere = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    venv.mkdir(parents=True)
    elsewhere.mkdir()
    for d in (venv, elsewhere):
        (d / "uwsgi").write_text("#!/bin/sh\n")
        (d / "uwsgi").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert default_binary() == str(venv / "uwsgi")
    (venv / "uwsgi").unlink()
    assert default_binary() == str(elsewhere / "uwsgi")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert default_binary() == "uwsgi"


# -- the seed's command lines, --plugin included -----------------------------------------


async def seed_runs_a(
    tmp_path: Path, emperors: list[EmperorProcess], plugin: str, uri: str
) -> EmperorProcess:
    """The seed's ``--plugin PLUGIN --emperor URI --freq 0.5``, run until the vassal
    ``a`` has started, then stopped."""
    emperor = EmperorProcess(
        ["--plugin", plugin, "--emperor", uri, "--freq", "0.5"], tmp_path / "emperor.log"
    )
    emperors.append(emperor)
    await new_pid(tmp_path / "a.pid")
    await stop(emperor)
    return emperor


@pytest.mark.integration
async def test_seed_pg_command_line(tmp_path: Path, emperors: list[EmperorProcess]) -> None:
    table = f"vassals_{uuid.uuid4().hex[:10]}"
    dsn = "host=127.0.0.1 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE TABLE {table} (name text, config text, ts numeric)")
        try:
            conn.execute(
                f"INSERT INTO {table} VALUES (%s, %s, 1)",
                ("a.ini", pidfile_vassal(tmp_path, "a")),
            )
            uri = f"pg://{dsn};SELECT name,config,ts FROM {table}"
            emperor = await seed_runs_a(tmp_path, emperors, "emperor_pg", uri)
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    assert "plugin_ignored" not in emperor.text()


@pytest.mark.integration
async def test_seed_mongodb_command_line(
    tmp_path: Path,
    mongo_server: tuple[str, int],  # noqa: F811 - the fixture imported above
    emperors: list[EmperorProcess],
) -> None:
    host, port = mongo_server
    client: MongoClient[dict[str, Any]] = MongoClient(
        host, port, serverSelectionTimeoutMS=5000, directConnection=True
    )
    coll = client["emperor"][f"vassals_{uuid.uuid4().hex[:10]}"]
    try:
        import datetime

        now = datetime.datetime.now(datetime.UTC)
        coll.insert_many(
            [
                {"name": "a.ini", "config": pidfile_vassal(tmp_path, "a"), "ts": now, "enabled": 1},
                {"name": "b.ini", "config": pidfile_vassal(tmp_path, "b"), "ts": now, "enabled": 0},
            ]
        )
        uri = f"mongodb://{host}:{port},emperor.{coll.name},{{enabled:1}}"
        emperor = await seed_runs_a(tmp_path, emperors, "emperor_mongodb", uri)
        # The filter is applied: b.ini, read in the same query as a.ini, never started.
        assert "vassal.spawned name=a.ini" in emperor.text()
        assert "name=b.ini" not in emperor.text()
        assert read_pid(tmp_path / "b.pid") is None
    finally:
        coll.drop()
        client.close()


@pytest.mark.integration
async def test_seed_amqp_command_line(tmp_path: Path, emperors: list[EmperorProcess]) -> None:
    # The seed's default exchange is shared by every emperor on the broker; the
    # test uses its own (--amqp-exchange) so that other runs never see its vassal.
    exchange = f"trimperor.test.{uuid.uuid4().hex[:12]}"
    emperor = EmperorProcess(
        [
            "--plugin",
            "emperor_amqp",
            "--emperor",
            "amqp://127.0.0.1:5672",
            "--amqp-exchange",
            exchange,
        ],
        tmp_path / "emperor.log",
    )
    emperors.append(emperor)
    await wait_for(lambda: "source.subscribed" in emperor.text(), 30)
    config = tmp_path / "mydjangoapp.ini"
    write_atomic(config, pidfile_vassal(tmp_path, "mydjangoapp"))

    def publish() -> None:
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        try:
            channel = connection.channel()
            # As the migration guide writes the seed's snippet for pika 1.x.
            channel.exchange_declare(exchange=exchange, exchange_type="fanout")
            channel.basic_publish(exchange=exchange, routing_key="", body=str(config))
        finally:
            connection.close()

    try:
        await trio.to_thread.run_sync(publish)
        await new_pid(tmp_path / "mydjangoapp.pid")
        await stop(emperor)
    finally:

        def delete() -> None:
            connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
            try:
                connection.channel().exchange_delete(exchange)
            finally:
                connection.close()

        await trio.to_thread.run_sync(delete)


@pytest.mark.integration
async def test_seed_zmq_command_line(tmp_path: Path, emperors: list[EmperorProcess]) -> None:
    port = free_port()
    emperor = EmperorProcess(
        ["--plugin", "emperor_zeromq", "--emperor", f"zmq://tcp://127.0.0.1:{port}"],
        tmp_path / "emperor.log",
    )
    emperors.append(emperor)
    await wait_for(lambda: "source.listening" in emperor.text(), 30)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = zmq.Socket(ctx, zmq.PUSH)
    try:
        s.connect(f"tcp://127.0.0.1:{port}")
        # The seed's snippet with bytes frames (pyzmq refuses str).
        s.send_multipart([b"touch", b"foo.ini", pidfile_vassal(tmp_path, "foo").encode()])
        await new_pid(tmp_path / "foo.pid")
        await stop(emperor)
    finally:
        s.close(linger=0)
        ctx.term()


# -- wrappers and binaries, with real uWSGI -----------------------------------------------


def wrapper_script(where: Path, name: str, target: Path) -> Path:
    """A program that notes its arguments in NAME.args and execs *target*."""
    script = where / name
    script.write_text(f'#!/bin/sh\necho "$@" > "{where}/{name}.args"\nexec "{target}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.integration
async def test_emperor_wrapper_runs_uwsgi_vassals(
    tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    assert UWSGI.exists(), f"{UWSGI} is missing: pip install --group test"
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    wrapper = wrapper_script(tmp_path, "wrap", UWSGI)
    port = free_port()
    write_atomic(vassals / "werkzeug.xml", werkzeug_xml(port))
    emperor = EmperorProcess(
        [str(vassals), "--emperor-wrapper", str(wrapper)], tmp_path / "emperor.log"
    )
    emperors.append(emperor)
    assert b"Werkzeug" in await wait_http(port)
    assert (tmp_path / "wrap.args").read_text().split() == ["--xml", str(vassals / "werkzeug.xml")]
    assert f"uwsgi.binary path={wrapper} " in emperor.text()
    await stop(emperor)


@pytest.mark.integration
async def test_override_fallback_and_attribute(tmp_path: Path) -> None:
    """The override is tried first, the fallback after the vassal's own binary,
    and --emperor-wrapper-attr's attribute replaces the vassal's binary."""
    first = wrapper_script(tmp_path, "first", FAKE)
    last = wrapper_script(tmp_path, "last", FAKE)
    attr = wrapper_script(tmp_path, "attr", FAKE)
    env = {**os.environ, "FAKE_SCENARIO": "ask-config"}

    async def run_one(options: UwsgiOptions, text: str, expect: str) -> None:
        pidfile = tmp_path / f"{expect}.pid"
        source = FakeMonitor("fake://t")
        emperor = Emperor(
            [source],
            spawner=PosixSpawner(),
            environ={**env, "FAKE_PIDFILE": str(pidfile)},
            uwsgi=options,
        )
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(emperor.run)
                await source.send(Upsert(VassalDocument("v.ini", "fake://t", "1", text)))
                await wait_for(lambda: read_pid(pidfile) is not None)
                assert (tmp_path / f"{expect}.args").exists()
                emperor.shutdown()

    missing = str(tmp_path / "not-installed")
    await run_one(
        UwsgiOptions(binary=str(FAKE), wrapper_override=(missing, str(first))),
        "[uwsgi]\n",
        "first",
    )
    await run_one(
        UwsgiOptions(binary=missing, wrapper_fallback=(missing + "2", str(last))),
        "[uwsgi]\n",
        "last",
    )
    await run_one(
        UwsgiOptions(binary=missing, wrapper_attr="wrapper"),
        f"[uwsgi]\nbinary-path = {missing}\n[emperor]\nwrapper = {attr}\n",
        "attr",
    )


@pytest.mark.integration
async def test_nothing_runnable_is_one_clear_error(tmp_path: Path) -> None:
    source = FakeMonitor("fake://t")
    missing = str(tmp_path / "not-installed")
    emperor = Emperor(
        [source],
        spawner=PosixSpawner(),
        uwsgi=UwsgiOptions(binary=missing, wrapper_fallback=("no-such-uwsgi",)),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            await source.send(Upsert(VassalDocument("v.ini", "fake://t", "1", "[uwsgi]\n")))

            def failed() -> bool:
                sup = emperor.supervisor("v.ini")
                return sup is not None and sup.last_error is not None

            await wait_for(failed)
            sup = emperor.supervisor("v.ini")
            assert sup is not None
            assert sup.last_error is not None
            assert f"tried {missing}, no-such-uwsgi" in sup.last_error
            emperor.shutdown()


def path_without_the_venv() -> str:
    return os.pathsep.join(
        p
        for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if p and Path(p).resolve() != VENV_BIN.resolve()
    )


@pytest.mark.integration
async def test_the_default_binary_is_the_venvs_with_the_venv_off_path(
    tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    assert UWSGI.exists(), f"{UWSGI} is missing: pip install --group test"
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    port = free_port()
    write_atomic(vassals / "werkzeug.xml", werkzeug_xml(port))
    emperor = EmperorProcess(
        [str(vassals)], tmp_path / "emperor.log", env={"PATH": path_without_the_venv()}
    )
    emperors.append(emperor)
    assert b"Werkzeug" in await wait_http(port)
    await wait_for(lambda: "vassal.ready name=werkzeug.xml" in emperor.text(), 30)
    text = emperor.text()
    assert f"uwsgi.binary path={UWSGI} version=2." in text, text
    assert "vassal.no_app" not in text
    await stop(emperor)


@pytest.mark.integration
async def test_no_app_loaded_shows_in_stats_and_log(
    tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    port = free_port()
    write_atomic(vassals / "broken.xml", werkzeug_xml(port, module="no_such_module_here:app"))
    stats = tmp_path / "stats.sock"
    emperor = EmperorProcess(
        [str(vassals), "--binary-path", str(UWSGI), "--stats", str(stats)],
        tmp_path / "emperor.log",
    )
    emperors.append(emperor)
    await wait_for(lambda: "vassal.no_app name=broken.xml" in emperor.text(), 30)

    doc = await trio.to_thread.run_sync(read_stats_document, stats)
    (vassal,) = doc["vassals"]
    assert vassal["id"] == "broken.xml"
    assert vassal["no_app"] is True
    assert pid_alive(vassal["pid"])
    await stop(emperor)


# -- the seed's four files from one emperor ---------------------------------------------

DEBIAN_UWSGI = Path("/usr/bin/uwsgi-core")
RACK_APP = 'run lambda { |env| [200, {"content-type" => "text/plain"}, ["ok from rack"]] }\n'


def debian_uwsgi_installed() -> bool:
    return os.path.exists(DEBIAN_UWSGI) and os.path.exists("/usr/lib/uwsgi/plugins/rack_plugin.so")


def seed_werkzeug_xml(port: int) -> str:
    return (
        "<uwsgi>\n"
        "    <module>werkzeug.testapp:test_app</module>\n"
        "    <master/>\n"
        "    <processes>4</processes>\n"
        f"    <http-socket>127.0.0.1:{port}</http-socket>\n"
        "</uwsgi>\n"
    )


def seed_rails_yml(port: int, app: Path) -> str:
    """The seed's rails.yml on Debian's uWSGI (PyPI's has no rack plugin)."""
    return (
        "uwsgi:\n"
        f"    binary-path: {DEBIAN_UWSGI}\n"
        "    plugins: rack\n"
        "    rack: config.ru\n"
        "    master: 1\n"
        "    processes: 2\n"
        f"    http-socket: 127.0.0.1:{port}\n"
        "    post-buffering: 4096\n"
        f"    chdir: {app}\n"
    )


def seed_django_ini(port: int, project_dir: Path) -> str:
    """The seed's django.ini with Django's modern module (``myapp.wsgi:application``)."""
    return (
        "[uwsgi]\n"
        f"http-socket = 127.0.0.1:{port}\n"
        "threads = 4\n"
        "master = 1\n"
        "env = DJANGO_SETTINGS_MODULE=myapp.settings\n"
        "module = myapp.wsgi:application\n"
        f"chdir = {project_dir}\n"
    )


@pytest.mark.integration
async def test_the_seeds_four_files_from_one_emperor(
    tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    """werkzeug.xml, trac.ini and django.ini on the venv's uWSGI, rails.yml on
    Debian's uwsgi-core with the rack plugin, all in one directory (the seed's
    files with test ports and paths, and ``http-socket`` so that HTTP can ask)."""
    from tests.test_uwsgi_apps import make_django_project, make_trac_env

    assert debian_uwsgi_installed(), (
        "Debian's uwsgi-core and uwsgi-plugin-rack-ruby3.1 are missing: run scripts/services start"
    )
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    rails = tmp_path / "railsapp001"
    rails.mkdir()
    (rails / "config.ru").write_text(RACK_APP)
    django = await make_django_project(tmp_path / "djangoapp001", "myapp")
    trac = await make_trac_env(tmp_path / "project001")
    ports = {name: free_port() for name in ("werkzeug", "trac", "rails", "django")}
    write_atomic(vassals / "werkzeug.xml", seed_werkzeug_xml(ports["werkzeug"]))
    write_atomic(vassals / "trac.ini", trac_ini(ports["trac"], trac))
    write_atomic(vassals / "rails.yml", seed_rails_yml(ports["rails"], rails))
    write_atomic(vassals / "django.ini", seed_django_ini(ports["django"], django))

    emperor = EmperorProcess([str(vassals)], tmp_path / "emperor.log")
    emperors.append(emperor)
    try:
        assert b"Werkzeug" in await wait_http(ports["werkzeug"], 120)
        assert b"ok from rack" in await wait_http(ports["rails"], 120)
        assert b"ok from django" in await wait_http(ports["django"], 120)
        assert b"Trac" in await wait_http(ports["trac"], 120)
        names = ("werkzeug.xml", "trac.ini", "rails.yml", "django.ini")
        await wait_for(lambda: all(f"vassal.ready name={n}" in emperor.text() for n in names), 60)
        text = emperor.text()
        assert f"uwsgi.binary path={DEBIAN_UWSGI} version=2." in text, text
        assert f"uwsgi.binary path={UWSGI} version=2." in text, text
        assert "vassal.no_app" not in text, text
        await stop(emperor)
    finally:
        # uWSGI masters lead their own sessions; the emperor stops them, and
        # nothing may outlive a failed test either.
        emperor.close()


# -- first-run messages -------------------------------------------------------------------


@pytest.mark.integration
async def test_no_argument_prints_the_usage() -> None:
    result = await trio.run_process(
        [PYTHON, "-m", "trimperor"], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith("usage: trimperor "), err
    assert "cli.usage_error error=no source given" in err


def test_errors_say_why_even_when_str_is_empty() -> None:
    from pika.adapters.utils.connection_workflow import AMQPConnectorSocketConnectError

    from trimperor.monitors.toolkit import error_text

    # What pika raises when the broker refuses the connection.
    cause = AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "Connection refused"))
    exc = pika.exceptions.AMQPConnectionError(cause)
    assert str(exc) == ""  # why this is needed
    assert error_text(exc) == (
        "AMQPConnectionError: AMQPConnectorSocketConnectError: "
        "ConnectionRefusedError(111, 'Connection refused')"
    )
    assert error_text(pika.exceptions.AMQPConnectionError()) == "AMQPConnectionError: no detail"
    assert error_text(OSError("two\nlines")) == "OSError: two"


@pytest.mark.integration
async def test_an_unreachable_broker_says_why(tmp_path: Path) -> None:
    from tests.helpers import monitor_running
    from trimperor.abc import MonitorOptions
    from trimperor.monitors.amqp import AmqpMonitor

    monitor = AmqpMonitor(f"amqp://127.0.0.1:{free_port()}", MonitorOptions())
    async with monitor_running(monitor):
        await wait_for(lambda: monitor.status.last_error is not None, 20)
    error = monitor.status.last_error
    assert error is not None
    assert error.startswith("AMQPConnectionError: ")
    assert "refused" in error.lower(), error


@pytest.mark.integration
async def test_the_pg_retry_line_names_the_query_once(caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers import monitor_running
    from trimperor.abc import MonitorOptions
    from trimperor.monitors.postgres import PostgresMonitor

    uri = f"pg://host=127.0.0.1 port={free_port()} dbname=emperor;SELECT name,config,ts FROM v"
    monitor = PostgresMonitor(uri, MonitorOptions())
    with caplog.at_level(logging.WARNING, logger="trimperor"):
        async with monitor_running(monitor):
            await wait_for(lambda: monitor.status.attempt >= 3, 30)
    lines = [r.getMessage() for r in caplog.records if "source.retrying" in r.getMessage()]
    assert len(lines) >= 3
    assert "SELECT" in lines[0]
    assert "attempt=1" in lines[0]
    for line in lines[1:]:
        assert "SELECT" not in line
        assert line.startswith("source.retrying uri=pg://127.0.0.1:")


def test_versions_read_as_mtime_and_size() -> None:
    from trimperor.core.model import describe_version

    assert (
        describe_version("1796150843592047357:4245729:354:0:0")
        == "mtime=2026-12-01T18:47:23.592Z size=354"
    )
    assert describe_version("1796150843592047357:4245729:354:0:0:unreadable").endswith(
        "size=354 unreadable"
    )
    assert describe_version("1796150843592047357:1:2:3:4:127.0.0.1:9000").endswith(
        "size=2 socket=127.0.0.1:9000"
    )
    assert describe_version("7@1700000000.5") == "7@1700000000.5"  # other sources: as they are


async def test_throttle_level_is_milliseconds(autojump_clock: trio.testing.MockClock) -> None:
    """A vassal that never ran (its program is missing) has no last run: its
    blacklist entry still says how long the backoff waits, never a timestamp."""
    from trimperor.core.policy import BackoffPolicy
    from trimperor.core.stats import EmperorStats, to_json
    from trimperor.core.vassalspec import NativeSpec
    from trimperor.supervisor import Supervisor, SupervisorContext
    from trimperor.testing import FakeSpawner

    spawner = FakeSpawner()
    spawner.fail_with = "program 'app' not found"
    policy = BackoffPolicy(throttle=1.0, max_throttle=8.0)
    spec = NativeSpec(name="app.ini", command=("app",))
    context = SupervisorContext(spawner, {})
    sup = Supervisor("app.ini", "fake://", "v1", spec, context, policy, jitter=lambda: 0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(3.5)  # attempts at 0, 1 and 3: the next waits 4 s
        snap = sup.snapshot()
        sup.stop()
    doc = json.loads(to_json(EmperorStats(1, "x", (), 0.0, (snap,))))
    (entry,) = doc["blacklist"]
    assert entry["throttle_level"] == 4000
    assert doc["vassals"][0]["backoff_delay"] == 4.0
