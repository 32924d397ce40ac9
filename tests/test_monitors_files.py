"""The dir:// and glob:// monitors, on real files with real inotify.

Event-driven tests use a rescan interval of a minute, so that only inotify can
satisfy them within the waiting bound. No test measures a duration; timeouts
are only bounds on waiting.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.helpers import wait_for
from trimperor.abc import MonitorOptions
from trimperor.core.errors import SourceError, UsageError
from trimperor.core.model import Snapshot, SourceEvent, SourceProblem, VassalDocument
from trimperor.monitors import files
from trimperor.monitors.files import DirMonitor, FileOptions, GlobMonitor
from trimperor.monitors.inotify import Inotify, fs_type, is_remote

EVENTS = MonitorOptions(freq=60)
"""Only inotify can deliver a change within the waiting bound."""

BOUND = 20.0
"""A generous bound on waiting (a loaded machine is slow), still far below ``EVENTS``' minute."""


def version_of(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_ino}:{st.st_size}:{st.st_uid}:{st.st_gid}"


def names(snap: Snapshot) -> list[str]:
    return [d.name for d in snap.docs]


def doc(snap: Snapshot, name: str) -> VassalDocument:
    (found,) = (d for d in snap.docs if d.name == name)
    return found


class Source:
    """What a running monitor has sent so far."""

    def __init__(self, recv: trio.MemoryReceiveChannel[SourceEvent]) -> None:
        self.recv = recv
        self.snapshots: list[Snapshot] = []
        self.problems: list[SourceProblem] = []

    async def next_event(self) -> SourceEvent:
        event = await self.recv.receive()
        if isinstance(event, Snapshot):
            self.snapshots.append(event)
        elif isinstance(event, SourceProblem):
            self.problems.append(event)
        return event

    async def until(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """The first snapshot, from now on, for which *predicate* holds."""
        with trio.fail_after(BOUND):
            while True:
                event = await self.next_event()
                if isinstance(event, Snapshot) and predicate(event):
                    return event

    async def until_names(self, *expected: str) -> Snapshot:
        return await self.until(lambda s: names(s) == sorted(expected))

    async def until_problem(self) -> SourceProblem:
        with trio.fail_after(BOUND):
            while True:
                event = await self.next_event()
                if isinstance(event, SourceProblem):
                    return event


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


async def threads_settled(before: set[int]) -> None:
    """Wait until the file descriptors opened since *before* are closed.

    A file source's scans run in worker threads, which may still hold a
    descriptor for a moment after the monitor returned; the leak check of
    ``conftest.py`` must not see them.
    """
    with trio.fail_after(BOUND):
        while True:
            if not open_fds() - before:
                return
            await trio.sleep(0.01)


def inotify_fds(fds: set[int]) -> list[int]:
    """Those of *fds* that are inotify instances."""
    found = []
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                found.append(fd)
        except FileNotFoundError:
            pass
    return found


@asynccontextmanager
async def running(monitor: DirMonitor | GlobMonitor) -> AsyncIterator[Source]:
    before = open_fds()
    send, recv = trio.open_memory_channel[SourceEvent](100)
    with recv:
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run, send)
            yield Source(recv)
            nursery.cancel_scope.cancel()
    await threads_settled(before)


# -- construction ------------------------------------------------------------------


def test_dir_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DirMonitor(f"dir://{tmp_path}", EVENTS).uri == f"dir://{tmp_path}"
    assert DirMonitor(f"{tmp_path}/", EVENTS).uri == f"dir://{tmp_path}"
    monkeypatch.chdir(tmp_path)
    assert DirMonitor("dir://vassals", EVENTS).uri == f"dir://{tmp_path}/vassals"
    assert DirMonitor("vassals", EVENTS).path == f"{tmp_path}/vassals"


def test_glob_uri_keeps_the_pattern() -> None:
    assert GlobMonitor("glob://apps/*/*.ini", EVENTS).uri == "glob://apps/*/*.ini"
    assert GlobMonitor("/etc/app*.ini", EVENTS).uri == "glob:///etc/app*.ini"


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        DirMonitor("dir://", EVENTS)
    with pytest.raises(UsageError):
        GlobMonitor("glob://", EVENTS)
    with pytest.raises(UsageError):
        DirMonitor("/srv", MonitorOptions(freq=0))


# -- dir: start ----------------------------------------------------------------------


async def test_initial_snapshot(tmp_path: Path) -> None:
    (tmp_path / "a.ini").write_text("[uwsgi]\nhttp = :8000\n")
    (tmp_path / "b.yaml").write_text("uwsgi: {}\n")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        snap = await src.until(lambda s: True)
        assert snap.source == f"dir://{tmp_path}"
        assert names(snap) == ["a.ini", "b.yaml"]
        a = doc(snap, "a.ini")
        assert a.source == snap.source
        assert a.text == "[uwsgi]\nhttp = :8000\n"
        assert a.path == str(tmp_path / "a.ini")
        assert a.version == version_of((tmp_path / "a.ini").stat())
        assert a.error is None


async def test_empty_directory_sends_empty_snapshot(tmp_path: Path) -> None:
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        assert (await src.until(lambda s: True)).docs == ()


async def test_missing_directory_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    send, _recv = trio.open_memory_channel[SourceEvent](1)
    with pytest.raises(SourceError, match=r"nope.*No such file"):
        await DirMonitor(str(missing), EVENTS).run(send)


async def test_file_instead_of_directory_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    send, _recv = trio.open_memory_channel[SourceEvent](1)
    async with trio.open_nursery() as nursery:
        with pytest.raises(SourceError, match=r"file.*Not a directory"):
            await nursery.start(DirMonitor(str(tmp_path / "file"), EVENTS).run, send)


# -- dir: changes --------------------------------------------------------------------


async def test_create(tmp_path: Path) -> None:
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names()
        (tmp_path / "app.ini").write_text("x")
        snap = await src.until_names("app.ini")
        assert doc(snap, "app.ini").text == "x"


async def test_modify(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    path.write_text("one")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        before = doc(await src.until_names("app.ini"), "app.ini")
        path.write_text("two, longer")
        snap = await src.until(lambda s: doc(s, "app.ini").text == "two, longer")
        assert doc(snap, "app.ini").version != before.version
        assert doc(snap, "app.ini").version == version_of(path.stat())


async def test_touch_within_the_same_second(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    path.write_text("same")
    mtime = path.stat().st_mtime_ns
    second, fraction = divmod(mtime, 10**9)
    touched = second * 10**9 + (fraction + 10**9 // 2) % 10**9
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        before = doc(await src.until_names("app.ini"), "app.ini")
        os.utime(path, ns=(touched, touched))
        snap = await src.until(lambda s: doc(s, "app.ini").version != before.version)
        after = doc(snap, "app.ini")
        assert after.version == version_of(path.stat())
        assert after.text == "same"


async def test_atomic_rename(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    path.write_text("old")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        before = doc(await src.until_names("app.ini"), "app.ini")
        tmp = tmp_path / "app.ini.tmp"  # not a configuration name
        tmp.write_text("new")  # same size as before
        os.replace(tmp, path)
        snap = await src.until(lambda s: doc(s, "app.ini").text == "new")
        assert names(snap) == ["app.ini"]
        assert doc(snap, "app.ini").version != before.version
    assert all(names(s) == ["app.ini"] for s in src.snapshots)


async def test_delete(tmp_path: Path) -> None:
    (tmp_path / "a.ini").write_text("a")
    (tmp_path / "b.ini").write_text("b")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names("a.ini", "b.ini")
        (tmp_path / "a.ini").unlink()
        await src.until_names("b.ini")


async def test_invalid_names_ignored(tmp_path: Path) -> None:
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names()
        for name in ("app.ini~", ".app.ini.swp", "notes.txt", "APP.INI"):
            (tmp_path / name).write_text("x")
        (tmp_path / "ok.ini").write_text("x")  # the marker: everything before is seen
        await src.until_names("ok.ini")
    assert all(names(s) in ([], ["ok.ini"]) for s in src.snapshots)


async def test_subdirectories_ignored(tmp_path: Path) -> None:
    (tmp_path / "sub.ini").mkdir()
    (tmp_path / "sub.ini" / "inner.ini").write_text("x")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names()
        (tmp_path / "more.ini").mkdir()
        (tmp_path / "more.ini" / "deep.ini").write_text("x")
        (tmp_path / "ok.ini").write_text("x")
        await src.until_names("ok.ini")
    assert all(names(s) in ([], ["ok.ini"]) for s in src.snapshots)


async def test_extra_extension(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("x")
    (tmp_path / "b.ini").write_text("x")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names("b.ini")
    options = MonitorOptions(freq=60, extra_extensions=("conf",))
    async with running(DirMonitor(str(tmp_path), options)) as src:
        await src.until_names("a.conf", "b.ini")
        (tmp_path / "c.conf").write_text("x")
        await src.until_names("a.conf", "b.ini", "c.conf")


async def test_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    path.write_text("old")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names("app.ini")
        st = path.stat()
        # New content, but the same size, inode and mtime: the same version.
        with path.open("r+") as f:
            f.write("new")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        (tmp_path / "marker.ini").write_text("x")  # forces a rescan
        snap = await src.until_names("app.ini", "marker.ini")
        assert doc(snap, "app.ini").text == "old"  # served from the cache
        os.utime(path)
        snap = await src.until(lambda s: doc(s, "app.ini").text == "new")


async def test_rescan_without_change_sends_nothing(tmp_path: Path) -> None:
    (tmp_path / "app.ini").write_text("x")
    async with running(DirMonitor(str(tmp_path), MonitorOptions(freq=0.05))) as src:
        await src.until_names("app.ini")
        (tmp_path / "notes.txt").write_text("x")  # an event that changes nothing
        with trio.move_on_after(0.5):
            event = await src.next_event()
            pytest.fail(f"unexpected event {event!r}")


# -- dir: symlinks -------------------------------------------------------------------


async def test_symlink_followed(tmp_path: Path) -> None:
    vassals, elsewhere = tmp_path / "vassals", tmp_path / "elsewhere"
    vassals.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "real.ini"
    target.write_text("real")
    (vassals / "app.ini").symlink_to(target)
    (vassals / "dangling.ini").symlink_to(elsewhere / "missing.ini")
    # The target is outside the watched directory: only the rescan sees it change.
    async with running(DirMonitor(str(vassals), MonitorOptions(freq=0.05))) as src:
        app = doc(await src.until_names("app.ini"), "app.ini")
        assert app.text == "real"
        assert app.path == str(vassals / "app.ini")
        assert app.version == version_of(target.stat())
        os.utime(target, ns=(10**18, 10**18))
        snap = await src.until(lambda s: doc(s, "app.ini").version != app.version)
        assert doc(snap, "app.ini").version == version_of(target.stat())


async def test_symlink_not_followed(tmp_path: Path) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    target = tmp_path / "real.ini"
    target.write_text("real")
    link = vassals / "app.ini"
    link.symlink_to(target)
    (vassals / "dangling.ini").symlink_to(tmp_path / "missing.ini")
    options = MonitorOptions(freq=60, follow_symlinks=False)
    async with running(DirMonitor(str(vassals), options)) as src:
        app = doc(await src.until_names("app.ini"), "app.ini")
        assert app.text == "real"
        assert app.version == version_of(link.lstat())
        assert app.version != version_of(target.stat())


# -- dir: unreadable and vanishing ---------------------------------------------------


async def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok.ini").write_text("ok")
    (tmp_path / "secret.ini").write_text("secret")
    real_read = files._read

    def read(path: str, max_size: int | None = None) -> tuple[os.stat_result, bytes] | None:
        if path.endswith("secret.ini"):
            raise PermissionError(13, "Permission denied", path)
        return real_read(path, max_size)

    monkeypatch.setattr(files, "_read", read)
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        snap = await src.until_names("ok.ini", "secret.ini")
        secret = doc(snap, "secret.ini")
        assert secret.text is None
        assert secret.error is not None
        assert "Permission denied" in secret.error
        assert doc(snap, "ok.ini").text == "ok"
        monkeypatch.setattr(files, "_read", real_read)
        os.chmod(tmp_path / "secret.ini", 0o600)  # an event, not a new mtime
        snap = await src.until(lambda s: doc(s, "secret.ini").text == "secret")
        # The version changes, so that the emperor takes the readable file.
        assert doc(snap, "secret.ini").version != secret.version


def _permissions_enforced() -> bool:
    """False for root with CAP_DAC_OVERRIDE, who reads everything."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe"
        path.write_text("")
        path.chmod(0)
        try:
            path.read_text()
        except PermissionError:
            return True
        return False


needs_permissions = pytest.mark.skipif(
    not _permissions_enforced(), reason="file permissions are not enforced for this user"
)


@needs_permissions
async def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = tmp_path / "secret.ini"
    path.write_text("secret")
    path.chmod(0)
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        snap = await src.until_names("secret.ini")
        assert doc(snap, "secret.ini").text is None
        path.chmod(0o600)
        await src.until(lambda s: doc(s, "secret.ini").text == "secret")


async def test_listing_problem_keeps_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.ini").write_text("a")
    monitor = DirMonitor(str(tmp_path), EVENTS)
    async with running(monitor) as src:
        await src.until_names("a.ini")

        def broken() -> list[tuple[str, str]]:
            raise PermissionError(13, "Permission denied", str(tmp_path))

        monkeypatch.setattr(monitor, "_candidates", broken)
        (tmp_path / "b.ini").write_text("b")
        problem = await src.until_problem()
        assert problem.source == monitor.uri
        assert "Permission denied" in problem.message
        assert [names(s) for s in src.snapshots] == [["a.ini"]]
        monkeypatch.undo()
        (tmp_path / "c.ini").write_text("c")
        await src.until_names("a.ini", "b.ini", "c.ini")


@needs_permissions
async def test_unreadable_directory_for_real(tmp_path: Path) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    (vassals / "a.ini").write_text("a")
    try:
        async with running(DirMonitor(str(vassals), EVENTS)) as src:
            await src.until_names("a.ini")
            vassals.chmod(0)
            assert "Permission denied" in (await src.until_problem()).message
            vassals.chmod(0o700)
            # Sent again although unchanged: the source is healthy again.
            await src.until_names("a.ini")
            assert [names(s) for s in src.snapshots] == [["a.ini"], ["a.ini"]]
    finally:
        vassals.chmod(0o700)


async def test_directory_removed_and_recreated(tmp_path: Path) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    (vassals / "a.ini").write_text("a")
    async with running(DirMonitor(str(vassals), EVENTS)) as src:
        await src.until_names("a.ini")
        shutil.rmtree(vassals)
        await src.until_names()
        vassals.mkdir()
        (vassals / "b.ini").write_text("b")
        await src.until_names("b.ini")
        (vassals / "c.ini").write_text("c")  # watched again
        await src.until_names("b.ini", "c.ini")


async def test_directory_replaced(tmp_path: Path) -> None:
    vassals, new = tmp_path / "vassals", tmp_path / "new"
    vassals.mkdir()
    new.mkdir()
    (vassals / "a.ini").write_text("a")
    (new / "b.ini").write_text("b")
    async with running(DirMonitor(str(vassals), EVENTS)) as src:
        await src.until_names("a.ini")
        os.rename(vassals, tmp_path / "old")
        os.rename(new, vassals)
        await src.until_names("b.ini")
        (vassals / "c.ini").write_text("c")  # the new directory is watched
        await src.until_names("b.ini", "c.ini")


async def test_cancellation_is_prompt(tmp_path: Path) -> None:
    before = open_fds()
    watching = len(inotify_fds(before))
    send, recv = trio.open_memory_channel[SourceEvent](10)
    with trio.fail_after(BOUND):  # far below the watcher's 60 s timeout
        async with trio.open_nursery() as nursery:
            await nursery.start(DirMonitor(str(tmp_path), EVENTS).run, send)
            # an inotify instance more: the watch is established
            await wait_for(lambda: len(inotify_fds(open_fds())) > watching, timeout=BOUND)
            nursery.cancel_scope.cancel()
    with recv:
        assert isinstance(recv.receive_nowait(), Snapshot)
        # run() closes its send channel when it ends.
        with pytest.raises(trio.EndOfChannel):
            await recv.receive()
    await threads_settled(before)


# -- glob ----------------------------------------------------------------------------


async def test_glob_relative_pattern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "apps" / "app1").mkdir(parents=True)
    (tmp_path / "apps" / "app1" / "app1.ini").write_text("one")
    (tmp_path / "apps" / "app1" / "app1.ini~").write_text("backup")
    (tmp_path / "apps" / "other").mkdir()
    (tmp_path / "apps" / "other" / "other.ini").write_text("x")
    async with running(GlobMonitor("glob://apps/app*/app*.ini", EVENTS)) as src:
        snap = await src.until_names("apps/app1/app1.ini")
        assert snap.source == "glob://apps/app*/app*.ini"
        one = doc(snap, "apps/app1/app1.ini")
        assert one.path == str(tmp_path / "apps" / "app1" / "app1.ini")
        assert one.text == "one"
        # A directory that comes to match after the start.
        (tmp_path / "apps" / "app3").mkdir()
        (tmp_path / "apps" / "app3" / "app3.ini").write_text("three")
        snap = await src.until_names("apps/app1/app1.ini", "apps/app3/app3.ini")
        assert doc(snap, "apps/app3/app3.ini").text == "three"
        (tmp_path / "apps" / "app1" / "app1.ini").unlink()
        await src.until_names("apps/app3/app3.ini")


async def test_glob_absolute_pattern(tmp_path: Path) -> None:
    (tmp_path / "a.ini").write_text("a")
    (tmp_path / "b.xml").write_text("<uwsgi/>")
    (tmp_path / "dir.ini").mkdir()
    pattern = f"{tmp_path}/*.*"
    async with running(GlobMonitor(pattern, EVENTS)) as src:
        await src.until_names(f"{tmp_path}/a.ini", f"{tmp_path}/b.xml")
        (tmp_path / "c.json").write_text("{}")
        (tmp_path / "c.txt").write_text("")
        snap = await src.until_names(f"{tmp_path}/a.ini", f"{tmp_path}/b.xml", f"{tmp_path}/c.json")
        assert doc(snap, f"{tmp_path}/c.json").path == str(tmp_path / "c.json")


async def test_glob_literal_path(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    async with running(GlobMonitor(str(path), EVENTS)) as src:
        await src.until_names()
        path.write_text("x")
        await src.until_names(str(path))


async def test_glob_directory_created_later(tmp_path: Path) -> None:
    """Nothing to watch at start: the watcher moves down as directories appear."""
    async with running(GlobMonitor(f"{tmp_path}/srv/apps/*/*.ini", EVENTS)) as src:
        await src.until_names()
        (tmp_path / "srv" / "apps" / "x").mkdir(parents=True)
        (tmp_path / "srv" / "apps" / "x" / "x.ini").write_text("x")
        await src.until_names(f"{tmp_path}/srv/apps/x/x.ini")
        (tmp_path / "srv" / "apps" / "y").mkdir()
        (tmp_path / "srv" / "apps" / "y" / "y.ini").write_text("y")
        await src.until_names(f"{tmp_path}/srv/apps/x/x.ini", f"{tmp_path}/srv/apps/y/y.ini")


# -- the watch helpers ---------------------------------------------------------------


def test_watch_target(tmp_path: Path) -> None:
    (tmp_path / "apps").mkdir()
    target = files._watch_target(f"{tmp_path}/apps/app*/app*.ini")
    assert target is not None
    assert (target.path, target.recursive) == (f"{tmp_path}/apps", True)
    target = files._watch_target(f"{tmp_path}/apps/*.ini")
    assert target is not None
    assert (target.path, target.recursive) == (f"{tmp_path}/apps", False)
    target = files._watch_target(f"{tmp_path}/missing/deeper/*/*.ini")
    assert target is not None
    assert (target.path, target.recursive) == (str(tmp_path), False)
    (tmp_path / "a[1]*").mkdir()
    escaped = files._watch_target(os.path.join(glob.escape(f"{tmp_path}/a[1]*"), "*"))
    assert escaped is not None
    assert (escaped.path, escaped.recursive) == (f"{tmp_path}/a[1]*", False)


def test_on_demand_socket_discovery(tmp_path: Path) -> None:

    conf = tmp_path / "app.ini"
    conf.write_text("[uwsgi]\n")
    doc = VassalDocument("app.ini", "dir://x", "1", "[uwsgi]\n", path=str(conf))
    _with_socket = files._with_socket
    assert _with_socket(doc, FileOptions()) is doc
    by_dir = _with_socket(doc, FileOptions(on_demand_directory="/run/od"))
    assert by_dir.socket == "/run/od/app.socket"
    assert by_dir.version == "1:/run/od/app.socket"
    (tmp_path / "app.ini.sock").write_bytes(b"127.0.0.1:9000\nignored")
    by_ext = _with_socket(doc, FileOptions(on_demand_extension=".sock"))
    assert by_ext.socket == "127.0.0.1:9000"
    # the side file wins over the directory, and an empty one means none
    both = FileOptions(on_demand_extension=".sock", on_demand_directory="/run/od")
    assert _with_socket(doc, both).socket == "127.0.0.1:9000"
    (tmp_path / "app.ini.sock").write_bytes(b"")
    assert _with_socket(doc, FileOptions(on_demand_extension=".sock")) is doc


@pytest.mark.parametrize("setting", ["on_demand_directory", "on_demand_extension"])
def test_a_rescan_reads_no_unchanged_file_with_on_demand_sockets(
    tmp_path: Path, setting: str
) -> None:
    """The socket is part of the version sent; the rescan still knows the file
    it read (same text object: not read again), and reads again a changed one."""
    for name in ("a.ini", "b.ini"):
        (tmp_path / name).write_text("[uwsgi]\nmaster = true\n")
        (tmp_path / f"{name}.sock").write_text(f"/run/{name}.sock\n")
    value = str(tmp_path / "od") if setting == "on_demand_directory" else ".sock"
    options = MonitorOptions(freq=1, plugins={"files": {setting: value}})
    monitor = DirMonitor(str(tmp_path), options)
    first, cache = monitor._scan({})
    assert all(d.socket for d in first)
    again, cache = monitor._scan(cache)
    assert again == first
    assert all(a.text is f.text for a, f in zip(again, first, strict=True))
    (tmp_path / "b.ini").write_text("[uwsgi]\nmaster = false\n")
    changed, cache = monitor._scan(cache)
    assert changed[0].text is first[0].text
    assert changed[1].text == "[uwsgi]\nmaster = false\n"


async def test_file_over_the_size_limit_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.ini"
    big.write_text("[vassal]\ncommand = x\n" + "; padding\n" * 200)
    (tmp_path / "small.ini").write_text("[vassal]\ncommand = x\n")
    options = MonitorOptions(freq=0.05, max_config_size=1000)
    async with running(DirMonitor(str(tmp_path), options)) as src:
        snap = await src.until_names("big.ini", "small.ini")
        assert doc(snap, "small.ini").text is not None
        refused = doc(snap, "big.ini")
        assert refused.text is None
        assert refused.error == "2021 bytes, over --max-config-size (1000); not read"


async def test_a_file_open_for_writing_is_read_once_closed(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    with path.open("w") as writer:
        writer.write("[vassal]\n")
        writer.flush()
        async with running(DirMonitor(str(tmp_path), MonitorOptions(freq=60))) as src:
            assert names(await src.until(lambda s: True)) == []
            writer.write("command = x\n")
            writer.flush()
            # Still open: every rescan (one per change) leaves it out.
            (tmp_path / "other.ini").write_text("[vassal]\ncommand = y\n")
            snap = await src.until_names("other.ini")
            assert "app.ini" not in names(snap)
            writer.close()
            snap = await src.until_names("app.ini", "other.ini")
            assert doc(snap, "app.ini").text == "[vassal]\ncommand = x\n"


async def test_a_running_file_rewritten_in_place_keeps_its_last_version(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    path.write_text("[vassal]\ncommand = old\n")
    async with running(DirMonitor(str(tmp_path), MonitorOptions(freq=60))) as src:
        first = doc(await src.until_names("app.ini"), "app.ini")
        with path.open("w") as writer:
            writer.write("[vassal]\n")
            writer.flush()
            (tmp_path / "other.ini").write_text("[vassal]\ncommand = y\n")
            snap = await src.until_names("app.ini", "other.ini")
            assert doc(snap, "app.ini") == first
            writer.write("command = new\n")
        snap = await src.until(lambda s: doc(s, "app.ini").text == "[vassal]\ncommand = new\n")


# -- the safety net: a full rescan only now and then -------------------------------


async def test_periodic_looks_do_not_rescan_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While inotify watches, a period without an event lists no file; a change
    is still picked up at once, and the full rescan still comes, only rarely."""
    (tmp_path / "app.ini").write_text("x")
    monitor = DirMonitor(str(tmp_path), MonitorOptions(freq=0.01))
    listed = looks = 0
    candidates, links_changed = monitor._candidates, monitor._links_changed

    def counting_candidates() -> Iterator[tuple[str, str]]:
        nonlocal listed
        listed += 1
        return candidates()

    def counting_looks() -> bool:
        nonlocal looks
        looks += 1
        return links_changed()

    monkeypatch.setattr(monitor, "_candidates", counting_candidates)
    monkeypatch.setattr(monitor, "_links_changed", counting_looks)
    async with running(monitor) as src:
        await src.until_names("app.ini")
        await wait_for(lambda: looks >= 3)
        listed_before, looks_before = listed, looks
        await wait_for(lambda: looks >= looks_before + files._FULL_RESCAN_EVERY // 2)
        # at most one full rescan in that many looks (the safety net's turn)
        assert listed - listed_before <= 1
        (tmp_path / "new.ini").write_text("y")
        await src.until_names("app.ini", "new.ini")
        # and the safety net still runs: the directory is listed again without an event
        after = listed
        await wait_for(lambda: listed > after, timeout=BOUND)


async def test_a_dangling_link_whose_target_appears_is_picked_up(tmp_path: Path) -> None:
    """The target is outside the watch: the periodic look at links sees it."""
    vassals, elsewhere = tmp_path / "vassals", tmp_path / "elsewhere"
    vassals.mkdir()
    elsewhere.mkdir()
    (vassals / "app.ini").symlink_to(elsewhere / "later.ini")
    async with running(DirMonitor(str(vassals), MonitorOptions(freq=0.05))) as src:
        await src.until_names()
        (elsewhere / "later.ini").write_text("there")
        snap = await src.until_names("app.ini")
        assert doc(snap, "app.ini").text == "there"


async def test_an_inotify_overflow_heals_with_a_rescan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Events lost to a full kernel queue: the overflow itself triggers a rescan."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events is {limit}: too many events to overflow quickly")
    # Events about names that are no configuration: each alone pokes nothing.
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a")
    b.write_text("b")
    caplog.set_level(logging.DEBUG, logger="trimperor.monitors.files")
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names()
        await wait_for(lambda: "source.watching" in caplog.text)
        # Blocking on purpose: Trio cannot read the queue meanwhile, so it overflows.
        # Alternating names, so that the kernel cannot merge the events.
        for i in range(limit // 2 + 10):
            os.utime(a, ns=(i, i))
            os.utime(b, ns=(i, i))
        (tmp_path / "late.ini").write_text("late")  # its event is lost
        await src.until_names("late.ini")
    assert "source.overflow" in caplog.text


async def test_a_failing_watch_falls_back_to_rescans_every_freq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_inotify() -> Inotify:
        raise OSError(24, "inotify_init1: Too many open files")

    monkeypatch.setattr(files, "Inotify", no_inotify)
    async with running(DirMonitor(str(tmp_path), MonitorOptions(freq=0.05))) as src:
        await src.until_names()
        await wait_for(lambda: "source.watch_failed" in caplog.text)
        (tmp_path / "app.ini").write_text("x")
        await src.until_names("app.ini")


async def test_a_directory_gone_as_it_is_watched_is_watched_again_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removed between the look and inotify_add_watch: no wait for the next period."""
    add = Inotify.add
    failed: list[str] = []

    def vanishing(self: Inotify, path: str, *, root: bool = True) -> None:
        if not failed:
            failed.append(path)
            raise FileNotFoundError(2, "inotify_add_watch: No such file or directory", path)
        add(self, path, root=root)

    monkeypatch.setattr(Inotify, "add", vanishing)
    async with running(DirMonitor(str(tmp_path), EVENTS)) as src:
        await src.until_names()
        await wait_for(lambda: bool(failed))
        # freq is a minute: only a watch set up again at once sees this
        (tmp_path / "app.ini").write_text("x")
        await src.until_names("app.ini")


MOUNTINFO = [
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n",
    "30 22 0:40 / /srv/shared rw shared:9 - nfs4 host:/export rw,vers=4.2\n",
    "31 30 0:41 / /srv/shared/local\\040dir rw - tmpfs tmpfs rw\n",
    "32 22 0:42 / /mnt/box rw - fuse.sshfs user@host: rw\n",
]


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/etc/vassals", "ext4"),
        ("/srv/shared/vassals", "nfs4"),
        ("/srv/shared", "nfs4"),
        ("/srv/sharedother", "ext4"),  # a prefix of the name is not a mount above it
        ("/srv/shared/local dir/v", "tmpfs"),  # an escaped space, the deeper mount wins
        ("/mnt/box/v", "fuse.sshfs"),
    ],
)
def test_the_file_system_of_a_path_is_the_deepest_mount_above_it(path: str, kind: str) -> None:
    assert fs_type(path, MOUNTINFO) == kind


def test_the_configuration_directory_of_the_tests_is_local(tmp_path: Path) -> None:
    assert not is_remote(str(tmp_path))


@pytest.mark.parametrize("kind", ["dir", "glob"])
def test_a_rescan_of_unchanged_files_keeps_the_cached_names(tmp_path: Path, kind: str) -> None:
    """A rescan that finds nothing new keeps no string it made: the documents, and
    the cache's names, are the ones it already had (made anew each time, 10,000
    names left the allocator's pools fragmented, a rescan after the other)."""
    for i in range(3):
        (tmp_path / f"v{i}.ini").write_text("[vassal]\ncommand = sleep 1\n")
    monitor = (
        DirMonitor(str(tmp_path), EVENTS)
        if kind == "dir"
        else GlobMonitor(f"glob://{tmp_path}/*.ini", EVENTS)
    )
    docs, cache = monitor._scan({})
    assert len(docs) == 3
    again, cache_again = monitor._scan(cache)
    assert all(a is b for a, b in zip(again, docs, strict=True))
    for new, old in zip(sorted(cache_again), sorted(cache), strict=True):
        assert new is old
