"""Real applications (Django, Trac) as real uWSGI vassals of a real trimperor.

The vassal files are the seed's ``django.ini`` and ``trac.ini`` (see
``docs/migrating-from-uwsgi.md``) with test ports and paths, ``http-socket``
instead of ``socket`` so that a plain HTTP client can talk to them, and a
``pidfile`` so that the test learns the uWSGI master's pid. The Django project
is generated with ``django-admin startproject`` and the Trac environment with
``trac-admin ... initenv``, both in the test's temporary directory.

For each application: it spawns and serves (HTTP 200); a ``touch`` reloads it
in place (same master pid, uWSGI logs its graceful re-spawn); a SIGKILL to the
master is a crash and the emperor starts a new master; removing the file stops
it (pid gone, port closed). Werkzeug (``werkzeug.xml``) is covered in
``tests/test_uwsgi.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.helpers import EmperorProcess, free_port, pid_alive, trac_ini, wait_for, write_atomic

pytestmark = pytest.mark.integration

PYTHON = sys.executable
UWSGI = Path(PYTHON).with_name("uwsgi")
TRAC_ADMIN = Path(PYTHON).with_name("trac-admin")
if not UWSGI.exists():  # pragma: no cover - the test command installs it
    pytest.skip("uwsgi is not installed (pip install uwsgi)", allow_module_level=True)

#: Bounds, not measurements: how long one step may take before the test fails.
BOOT_TIMEOUT = 30.0
STEP_TIMEOUT = 30.0


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


async def http_ok(url: str) -> bool:
    try:
        return await trio.to_thread.run_sync(http_status, url) == 200
    except OSError:
        return False


async def wait_http_ok(url: str, timeout: float = BOOT_TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not await http_ok(url):
            await trio.sleep(0.05)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def touch(path: Path) -> None:
    """``touch PATH``: the mtime becomes now (and certainly moves forward)."""
    st = os.stat(path)
    mtime = max(time.time_ns(), st.st_mtime_ns + 1_000_000)
    os.utime(path, ns=(mtime, mtime))


@dataclass
class Vassals:
    """What a test started, so that nothing outlives it even when it fails."""

    emperors: list[EmperorProcess] = field(default_factory=list)
    masters: set[int] = field(default_factory=set)

    def cleanup(self) -> None:
        for pid in self.masters:
            # A uWSGI vassal leads its own session: its workers are in its group.
            if pid_alive(pid) and b"uwsgi" in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        for emperor in self.emperors:
            emperor.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def started() -> Iterator[Vassals]:
    v = Vassals()
    yield v
    v.cleanup()


# -- the applications --------------------------------------------------------------

DJANGO_VIEW = """

from django.http import HttpResponse


def trimperor_ok(request):
    return HttpResponse("ok from django")


urlpatterns.append(path("", trimperor_ok))
"""


async def make_django_project(where: Path, project: str) -> Path:
    """``django-admin startproject`` plus a view at ``/``; DEBUG off, 127.0.0.1 allowed."""
    os.mkdir(where)
    await trio.run_process(
        [PYTHON, "-m", "django", "startproject", project, str(where)],
        capture_stdout=True,
        capture_stderr=True,
    )
    configure_django(where / project)
    return where


def configure_django(package: Path) -> None:
    settings = package / "settings.py"
    text = settings.read_text()
    assert "DEBUG = True" in text
    assert "ALLOWED_HOSTS = []" in text
    text = text.replace("DEBUG = True", "DEBUG = False").replace(
        "ALLOWED_HOSTS = []", 'ALLOWED_HOSTS = ["127.0.0.1", "localhost"]'
    )
    settings.write_text(text)
    urls = package / "urls.py"
    urls.write_text(urls.read_text() + DJANGO_VIEW)


def django_ini(port: int, project_dir: Path, project: str) -> str:
    # The seed's django.ini, with module = <project>.wsgi:application (the
    # seed's WSGIHandler() form predates Django 1.4's project layout).
    return (
        "[uwsgi]\n"
        f"http-socket = 127.0.0.1:{port}\n"
        "threads = 4\n"
        "master = 1\n"
        f"env = DJANGO_SETTINGS_MODULE={project}.settings\n"
        f"module = {project}.wsgi:application\n"
        f"chdir = {project_dir}\n"
        "pidfile = %d%n.pid\n"
    )


async def make_trac_env(env: Path) -> Path:
    """``trac-admin ENV initenv NAME sqlite:db/trac.db`` (non-interactive)."""
    await trio.run_process(
        [str(TRAC_ADMIN), str(env), "initenv", "trimperor test", "sqlite:db/trac.db"],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert (env / "VERSION").exists()
    return env


# -- the scenario --------------------------------------------------------------------


async def spawn_touch_crash_remove(
    tmp_path: Path, started: Vassals, name: str, text: str, port: int
) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    url = f"http://127.0.0.1:{port}/"
    conf = vassals / name
    pidfile = vassals / (conf.stem + ".pid")
    emperor = EmperorProcess(
        [str(vassals), "--binary-path", str(UWSGI), "--throttle", "100"],
        tmp_path / "emperor.log",
    )
    started.emperors.append(emperor)

    def log_count(line: str) -> int:
        return emperor.text().count(line)

    # spawn: the file appears, the application answers
    write_atomic(conf, text)
    await wait_http_ok(url)
    first = read_pid(pidfile)
    assert first is not None
    started.masters.add(first)
    assert f"vassal.spawned name={name} pid={first}" in emperor.text()
    await wait_for(lambda: log_count(f"vassal.ready name={name} pid={first}") == 1, STEP_TIMEOUT)

    # touch: reloaded in place; uWSGI re-execs its master, whose pid stays
    respawned = f"{name}| gracefully (RE)spawned uWSGI master process (pid: {first})"
    assert log_count(respawned) == 0
    touch(conf)
    await wait_for(lambda: log_count(f"vassal.reload_in_place name={name}") == 1, STEP_TIMEOUT)
    await wait_for(lambda: log_count(respawned) == 1, STEP_TIMEOUT)
    await wait_http_ok(url)
    assert read_pid(pidfile) == first
    assert pid_alive(first)

    # crash: SIGKILL to the master; the emperor starts a new one
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: read_pid(pidfile) not in {None, first}, STEP_TIMEOUT)
    second = read_pid(pidfile)
    assert second is not None
    started.masters.add(second)
    await wait_http_ok(url)
    assert f"vassal.spawned name={name} pid={second}" in emperor.text()
    assert not pid_alive(first)

    # removal: the vassal stops and its port closes
    conf.unlink()
    await wait_for(lambda: not pid_alive(second) and port_closed(port), STEP_TIMEOUT)
    await wait_for(lambda: f"vassal.finished name={name}" in emperor.text(), STEP_TIMEOUT)

    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0
    text_out = emperor.text()
    assert "supervisor_crashed" not in text_out
    assert "emperor.stopped" in text_out

    # The emperor's stop message (byte 0): uWSGI kills its workers and exits 0.
    # (SIGTERM would make a uWSGI 2.0 master reload: it would exit 1 here, only
    # because its file is gone.)
    assert f"vassal.exited name={name} pid={second} code=0" in text_out


async def test_django_ini_spawn_touch_crash_remove(tmp_path: Path, started: Vassals) -> None:
    project = "trimperorsite"
    project_dir = await make_django_project(tmp_path / "djangoapp001", project)
    port = free_port()
    await spawn_touch_crash_remove(
        tmp_path, started, "django.ini", django_ini(port, project_dir, project), port
    )


async def test_trac_ini_spawn_touch_crash_remove(tmp_path: Path, started: Vassals) -> None:
    env = await make_trac_env(tmp_path / "project001")
    port = free_port()
    await spawn_touch_crash_remove(
        tmp_path, started, "trac.ini", trac_ini(port, env, "pidfile = %d%n.pid"), port
    )
