"""The command line and the whole emperor, end to end, with real processes and files."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    EmperorProcess,
    pid_alive,
    pidfile_vassal,
    read_pid,
    read_stats_document,
    wait_for,
    write_atomic,
)
from trimperor import cli
from trimperor.abc import MonitorOptions
from trimperor.core.errors import MissingExtraError, UsageError

pytestmark = pytest.mark.integration


# -- source resolution (no processes) ------------------------------------------


def test_existing_directory_is_dir_and_anything_else_is_glob(tmp_path: Path) -> None:
    opts = MonitorOptions()
    missing = tmp_path / "not-yet"
    d, g, m, explicit = cli.resolve_sources(
        [str(tmp_path), str(tmp_path / "*.ini"), str(missing), f"glob://{tmp_path}"], opts
    )
    assert d.uri == f"dir://{tmp_path}"
    assert g.uri == f"glob://{tmp_path}/*.ini"
    assert m.uri == f"glob://{missing}"
    assert explicit.uri == f"glob://{tmp_path}"


def test_unknown_scheme_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown source scheme 'nope'.*known: .*dir, .*glob"):
        cli.resolve_sources(["nope://x"], MonitorOptions())


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_factories", lambda: {"pg": "trimperor_missing_driver:Monitor"})
    with pytest.raises(MissingExtraError, match=r"pip install 'trimperor\[pg\]'"):
        cli.resolve_sources(["pg://dbname=x"], MonitorOptions())


def test_plugin_options_reach_each_plugin_s_own_options(tmp_path: Path) -> None:
    """Plugin options keep their flags; each lands in its plugin's own options object."""
    from trimperor.monitors.amqp import AmqpMonitor
    from trimperor.monitors.files import DirMonitor
    from trimperor.monitors.zeromq import ZmqMonitor

    args = cli.build_parser().parse_args(
        [
            "--amqp-exchange=fleet",
            "--emperor-on-demand-directory=od",
            "--allow-remote-zmq",
            str(tmp_path),
        ]
    )
    settings = cli.plugin_settings(args)
    assert settings["amqp"] == {"exchange": "fleet"}
    assert settings["files"] == {"on_demand_extension": None, "on_demand_directory": "od"}
    assert settings["zmq"]["allow_remote"] is True
    assert settings["zoo"] == {"auth_file": None}
    options = MonitorOptions(plugins=settings)
    amqp, files, zmq = cli.resolve_sources(
        ["amqp://127.0.0.1", str(tmp_path), "zmq://tcp://0.0.0.0:5999"], options
    )
    assert isinstance(amqp, AmqpMonitor)
    assert amqp._exchange == "fleet"
    assert isinstance(files, DirMonitor)
    assert files._own.on_demand_directory == os.path.abspath("od")
    assert isinstance(zmq, ZmqMonitor)  # a remote bind allowed by --allow-remote-zmq
    with pytest.raises(UsageError, match=r"unknown amqp option.*: exchnage"):
        AmqpMonitor("amqp://127.0.0.1", MonitorOptions(plugins={"amqp": {"exchnage": "x"}}))


def test_shell_expansion_is_detected(tmp_path: Path) -> None:
    a, b = tmp_path / "a.ini", tmp_path / "b.ini"
    a.touch()
    b.touch()
    assert cli.expanded_by_shell([str(a), str(b)])
    assert not cli.expanded_by_shell([str(a)])
    assert not cli.expanded_by_shell([str(a), str(tmp_path)])


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--bogus", "x"])
    assert exc.value.code == 2
    assert cli.main(["--freq", "0", "/tmp"]) == 2


# -- the emperor as a real process -----------------------------------------------


@pytest.fixture
def vassals(tmp_path: Path) -> Path:
    d = tmp_path / "vassals"
    d.mkdir()
    return d


Factory = Callable[[list[str]], EmperorProcess]


@pytest.fixture
def emperor_factory(tmp_path: Path) -> Iterator[Factory]:
    started: list[EmperorProcess] = []

    def start(args: list[str]) -> EmperorProcess:
        e = EmperorProcess(args, tmp_path / f"emperor{len(started)}.log")
        started.append(e)
        return e

    yield start
    for e in started:
        e.close()


async def test_lifecycle_through_files(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    emperor = emperor_factory([str(vassals), "--freq", "60", "--throttle", "50"])
    pidfile = tmp_path / "app.pid"
    write_atomic(vassals / "app.ini", pidfile_vassal(tmp_path, "app", body="print('hi there')"))
    await wait_for(lambda: read_pid(pidfile) is not None)
    first = read_pid(pidfile)
    assert first is not None
    await wait_for(lambda: "app.ini| hi there" in emperor.text())

    # touch: reload (sub-second precision)
    st = os.stat(vassals / "app.ini")
    os.utime(vassals / "app.ini", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    await wait_for(lambda: read_pid(pidfile) not in {None, first})
    second = read_pid(pidfile)
    assert second is not None
    await wait_for(lambda: not pid_alive(first))

    # crash: respawned
    os.kill(second, signal.SIGKILL)
    await wait_for(lambda: read_pid(pidfile) not in {None, second})
    third = read_pid(pidfile)
    assert third is not None
    assert "vassal.backoff name=app.ini attempt=1" in emperor.text()

    # a broken edit keeps it running
    write_atomic(vassals / "app.ini", "[vassal]\ncommand = x\nnonsense = 1\n")
    await wait_for(lambda: "unknown key 'nonsense'" in emperor.text())
    assert pid_alive(third)

    # removal: stopped, not respawned
    (vassals / "app.ini").unlink()
    await wait_for(lambda: not pid_alive(third))
    await wait_for(lambda: "vassal.finished name=app.ini" in emperor.text())  # final state
    assert read_pid(pidfile) == third

    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0
    assert "emperor.stopped" in emperor.text()
    assert read_pid(pidfile) == third  # never respawned while the emperor ran


async def test_sigterm_stops_all_vassals_and_exits_0(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    for i in range(5):
        write_atomic(vassals / f"v{i}.ini", pidfile_vassal(tmp_path, f"v{i}"))
    emperor = emperor_factory([str(vassals)])
    await wait_for(lambda: all(read_pid(tmp_path / f"v{i}.pid") for i in range(5)))
    pids = [read_pid(tmp_path / f"v{i}.pid") or 0 for i in range(5)]
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0
    assert not [p for p in pids if pid_alive(p)]


async def test_sigterm_kills_a_vassal_that_ignores_it_after_stop_timeout(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    body = "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    write_atomic(
        vassals / "stubborn.ini", pidfile_vassal(tmp_path, "s", "stop-timeout = 0.5\n", body)
    )
    emperor = emperor_factory([str(vassals)])
    await wait_for(lambda: read_pid(tmp_path / "s.pid") is not None)
    pid = read_pid(tmp_path / "s.pid") or 0
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0
    assert not pid_alive(pid)
    assert "vassal.stop_timeout name=stubborn.ini" in emperor.text()


async def test_sighup_reloads_every_vassal(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    write_atomic(vassals / "a.ini", pidfile_vassal(tmp_path, "a"))
    write_atomic(
        vassals / "b.yaml",
        f"vassal:\n  command: [{json.dumps(sys.executable)}, "
        f"{json.dumps(str(tmp_path / 'a.py'))}]\n  env: [UNUSED=1]\n",
    )
    emperor = emperor_factory([str(vassals)])
    await wait_for(lambda: read_pid(tmp_path / "a.pid") is not None)
    await wait_for(lambda: emperor.text().count("vassal.spawned") == 2)
    emperor.signal(signal.SIGHUP)
    await wait_for(lambda: emperor.text().count("vassal.spawned") == 4)
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0


async def test_vassals_die_when_the_emperor_is_killed(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    write_atomic(vassals / "a.ini", pidfile_vassal(tmp_path, "a"))
    emperor = emperor_factory([str(vassals)])
    await wait_for(lambda: read_pid(tmp_path / "a.pid") is not None)
    pid = read_pid(tmp_path / "a.pid") or 0
    emperor.signal(signal.SIGKILL)
    await emperor.wait()
    await wait_for(lambda: not pid_alive(pid))


async def test_unreadable_directory_at_start_exits_1(
    tmp_path: Path, emperor_factory: Factory
) -> None:
    (tmp_path / "file").write_text("")
    emperor = emperor_factory([f"dir://{tmp_path / 'file'}"])
    assert await emperor.wait() == 1
    assert str(tmp_path / "file") in emperor.text()


async def test_unquoted_pattern_warning(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    for name in ("a.ini", "b.ini"):
        write_atomic(vassals / name, pidfile_vassal(tmp_path, name[0]))
    emperor = emperor_factory([str(vassals / "a.ini"), str(vassals / "b.ini")])
    await wait_for(lambda: read_pid(tmp_path / "b.pid") is not None)
    assert emperor.text().count("cli.unquoted_pattern") == 1
    assert "Quote the pattern" in emperor.text()
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0


async def test_stats_on_a_unix_socket(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    write_atomic(vassals / "a.ini", pidfile_vassal(tmp_path, "a"))
    sock_path = tmp_path / "stats.sock"
    emperor = emperor_factory([str(vassals), "--stats", str(sock_path)])
    await wait_for(lambda: read_pid(tmp_path / "a.pid") is not None and sock_path.exists())
    await wait_for(
        lambda: "vassal.spawned" in emperor.text() and "stats.listening" in emperor.text()
    )

    doc = await trio.to_thread.run_sync(read_stats_document, sock_path)
    assert doc["pid"] == emperor.proc.pid
    assert doc["emperor"] == [f"dir://{vassals}"]
    vassals_info = doc["vassals"]
    assert isinstance(vassals_info, list)
    assert len(vassals_info) == 1
    v = vassals_info[0]
    assert v["name"] == "a.ini"
    assert v["pid"] == read_pid(tmp_path / "a.pid")
    assert v["source"] == f"dir://{vassals}"
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0
    assert not sock_path.exists()


def test_every_option_and_its_uwsgi_spelling_reaches_the_emperor(tmp_path: Path) -> None:
    """Builds everything main() builds; the source then fails at start (exit 1)."""
    (tmp_path / "file").write_text("")
    args = [
        "--emperor-throttle",
        "10",
        "--emperor-max-throttle",
        "100",
        "--loyal-after",
        "1",
        "--reload-mercy",
        "5",
        "--emperor-freq",
        "1",
        "--emperor-nofollow",
        "--emperor-extra-extension",
        "cfg",
        "--emperor-on-demand-extension",
        ".sock",
        "--emperor-on-demand-directory",
        str(tmp_path),
        "--max-config-size",
        "100",
        "--amqp-exchange",
        "x",
        "--emperor-tyrant",
        "--emperor-tyrant-initgroups",
        "--binary-path",
        "/usr/bin/uwsgi",
        "--vassal-set",
        "a=1",
        "--vassals-include",
        "i",
        "--vassals-include-before",
        "ib",
        "--vassals-inherit",
        "t",
        "--vassals-inherit-before",
        "tb",
        "--emperor-graceful-shutdown",
        "--emperor-curse-tolerance",
        "3",
        "--emperor-broodlord",
        "2",
        "--emperor-required-heartbeat",
        "4",
        "--emperor-stats",
        str(tmp_path / "s.sock"),
        "--emperor-pidfile",
        str(tmp_path / "pid"),
        "--log-level",
        "error",
        "--emperor",
        f"dir://{tmp_path / 'file'}",
    ]
    assert cli.main(args) == 1
    assert (tmp_path / "pid").read_text().strip() == str(os.getpid())


def test_ini_file_supplies_emperor_options(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    ini = tmp_path / "emperor.ini"
    ini.write_text(
        f"[uwsgi]\nemperor = dir://{tmp_path / 'file'}\nemperor-freq = 2\n"
        f"emperor-pidfile = {tmp_path / 'pid'}\nemperor-tyrant = true\n"
    )
    assert cli.main(["--ini", str(ini)]) == 1  # got as far as the (broken) source
    assert (tmp_path / "pid").exists()
    ini.write_text(f"[uwsgi]\nemperor = dir://{tmp_path / 'file'}\nmaster = true\nlogto = /tmp/x\n")
    assert cli.main(["--ini", str(ini)]) == 1  # uWSGI's own options are skipped, not fatal
    ini.write_text("[other]\nx = 1\n")
    assert cli.main(["--ini", str(ini)]) == 2


async def test_sigusr1_logs_status_and_sigurg_clears_backoff(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    # a vassal that dies at once: its first backoff is ten minutes long
    write_atomic(vassals / "crash.ini", "[vassal]\ncommand = /bin/sh -c 'echo started; exit 3'\n")
    emperor = emperor_factory([str(vassals), "--throttle", "600000", "--max-throttle", "600000"])
    await wait_for(lambda: "attempt=1" in emperor.text())  # the next start is 600 s away
    emperor.signal(signal.SIGUSR1)
    await wait_for(lambda: "vassal.status name=crash.ini state=waiting" in emperor.text())
    started = emperor.text().count("crash.ini| started")
    emperor.signal(signal.SIGURG)
    await wait_for(lambda: "emperor.clear_throttles" in emperor.text())
    # far sooner than the 600 s backoff: only the cleared throttle can start it
    await wait_for(lambda: emperor.text().count("crash.ini| started") > started, 60)
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0


async def test_second_sigint_kills_at_once(
    vassals: Path, tmp_path: Path, emperor_factory: Factory
) -> None:
    body = "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, signal.SIG_IGN)"
    write_atomic(vassals / "s.ini", pidfile_vassal(tmp_path, "s", "stop-timeout = 600\n", body))
    emperor = emperor_factory([str(vassals)])
    await wait_for(lambda: read_pid(tmp_path / "s.pid") is not None)
    pid = read_pid(tmp_path / "s.pid") or 0
    emperor.signal(signal.SIGINT)
    await wait_for(lambda: "vassal.stopping name=s.ini" in emperor.text())
    assert pid_alive(pid)
    emperor.signal(signal.SIGINT)
    assert await emperor.wait(timeout=10) == 0
    assert not pid_alive(pid)
    assert "emperor.kill_all" in emperor.text()
