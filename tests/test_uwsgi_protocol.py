"""The emperor protocol, pure parts and against a scripted vassal process.

The scripted vassal (tests/fake_uwsgi.py) stands in for uwsgi where a test
needs exact control of the bytes (missed heartbeats, the idle byte); the real
uwsgi binary is exercised in tests/test_uwsgi.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import read_pid, wait_for
from trimperor.core.model import Upsert, VassalDocument
from trimperor.core.uwsgi_protocol import (
    MAX_CONFIG_BYTES,
    config_flag,
    decode_config,
    describe,
    encode_config,
)
from trimperor.core.vassalspec import UwsgiSpec
from trimperor.emperor import Emperor
from trimperor.testing import FakeMonitor
from trimperor.vassals.spawner import PosixSpawner
from trimperor.vassals.uwsgi import UwsgiOptions, uwsgi_argv, uwsgi_env

FAKE = Path(__file__).with_name("fake_uwsgi.py")


def test_config_frame_bytes() -> None:
    assert encode_config(b"[uwsgi]\n") == bytes([115, 8, 0, 0]) + b"[uwsgi]\n"
    assert encode_config(b"x" * 300)[:4] == bytes([115, 0x2C, 0x01, 0])


@given(st.binary(min_size=1, max_size=MAX_CONFIG_BYTES))
def test_config_frame_round_trip(body: bytes) -> None:
    assert decode_config(encode_config(body)) == body


def test_oversized_and_empty_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 65535"):
        encode_config(b"x" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ValueError, match="empty"):
        encode_config(b"")


def test_flag_by_suffix() -> None:
    assert [config_flag(n) for n in ("a.xml", "a.ini", "a.yml", "a.yaml", "a.js", "a.json")] == [
        "--xml",
        "--ini",
        "--yaml",
        "--yaml",
        "--json",
        "--json",
    ]
    assert config_flag("a.conf", ("conf",)) == "--config"
    assert config_flag("a.txt") == "--inherit"
    assert describe(26) == "heartbeat"
    assert describe(99) == "unknown(99)"


def test_argv_order_and_names() -> None:
    opts = UwsgiOptions(
        binary="/usr/bin/uwsgi",
        vassal_set=("a=1",),
        include=("i.ini",),
        include_before=("ib.ini",),
        inherit=("t.ini",),
        inherit_before=("tb.ini",),
    )
    spec = UwsgiSpec("app.ini", "/v/app.ini", "", cwd="/v")
    assert uwsgi_argv(spec, opts) == (
        "/usr/bin/uwsgi",
        "--inherit",
        "tb.ini",
        "--include",
        "ib.ini",
        "--set",
        "a=1",
        "--ini",
        "/v/app.ini",
        "--inherit",
        "t.ini",
        "--include",
        "i.ini",
    )
    memory = UwsgiSpec("db.yaml", None, "uwsgi: {}")
    assert uwsgi_argv(memory, UwsgiOptions())[1:] == ("--yaml", "emperor://db.yaml")


def test_environment_rules() -> None:
    env = uwsgi_env(
        {
            "PATH": "/bin",
            "UWSGI_VASSAL_SOCKET": "/tmp/s.sock",
            "UWSGI_RELOADS": "3",
            "NOTIFY_SOCKET": "/run/n",
            "UWSGI_EMPEROR_FD": "9",
        }
    )
    assert env == {
        "PATH": "/bin",
        "UWSGI_VASSAL_SOCKET": "/tmp/s.sock",
        "UWSGI_SOCKET": "/tmp/s.sock",
    }


def scripted_emperor(
    tmp_path: Path, scenario: str, **options: float
) -> tuple[Emperor, FakeMonitor, Path]:
    """An emperor whose uWSGI vassals are tests/fake_uwsgi.py running *scenario*."""
    pidfile = tmp_path / "v.pid"
    env = {
        **os.environ,
        "FAKE_SCENARIO": scenario,
        "FAKE_PIDFILE": str(pidfile),
        "FAKE_OUT": str(tmp_path / "configs.txt"),
    }
    source = FakeMonitor("fake://t")
    uwsgi = UwsgiOptions(binary=str(FAKE), **options)  # type: ignore[arg-type]
    emperor = Emperor([source], spawner=PosixSpawner(), environ=env, uwsgi=uwsgi)
    return emperor, source, pidfile


@pytest.mark.integration
async def test_missed_heartbeat_restarts_the_vassal(tmp_path: Path) -> None:
    emperor, source, pidfile = scripted_emperor(
        tmp_path, "heartbeat-then-silence", required_heartbeat=0.5
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            await source.send(Upsert(VassalDocument("v.ini", "fake://t", "1", "[uwsgi]\n")))
            await wait_for(lambda: read_pid(pidfile) is not None)
            first = read_pid(pidfile)
            await wait_for(lambda: read_pid(pidfile) not in {None, first}, 20)
            sup = emperor.supervisor("v.ini")
            assert sup is not None
            assert sup.snapshot().last_exit_signal == "SIGKILL"
            emperor.shutdown()


@pytest.mark.integration
async def test_idle_byte_without_socket_stops_the_vassal(tmp_path: Path) -> None:
    emperor, source, pidfile = scripted_emperor(tmp_path, "idle")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            await source.send(Upsert(VassalDocument("v.ini", "fake://t", "1", "[uwsgi]\n")))
            await wait_for(lambda: read_pid(pidfile) is not None)
            await wait_for(lambda: emperor.supervisor("v.ini") is None)
            assert emperor.registry.running() == {}
            # a new version of the configuration starts it again
            await source.send(Upsert(VassalDocument("v.ini", "fake://t", "2", "[uwsgi]\n")))
            await wait_for(lambda: emperor.supervisor("v.ini") is not None)
            emperor.shutdown()


@pytest.mark.integration
async def test_config_request_gets_the_current_config(tmp_path: Path) -> None:
    emperor, source, _ = scripted_emperor(tmp_path, "ask-config")
    out = tmp_path / "configs.txt"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(emperor.run)
            await source.send(Upsert(VassalDocument("v.ini", "fake://t", "1", "[uwsgi]\na=1\n")))
            await wait_for(lambda: out.exists() and out.read_text().count("\n--\n") >= 1)
            await source.send(Upsert(VassalDocument("v.ini", "fake://t", "2", "[uwsgi]\na=2\n")))
            await wait_for(lambda: "a=2" in out.read_text())
            text = out.read_text()
            assert text.index("a=1") < text.index("a=2")
            sup = emperor.supervisor("v.ini")
            assert sup is not None
            assert sup.restarts == 0
            emperor.shutdown()


def test_fake_vassal_is_executable() -> None:
    assert os.access(FAKE, os.X_OK), f"chmod +x {FAKE}"
    assert sys.executable
