"""Tyrant mode: nothing a hosted user names is opened, created or bound as root.

The emperor runs as root (as in production) and the configurations belong to
real unprivileged users created by the test. Each attempted escalation must
fail with a clear log line and leave nothing created or replaced.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import EmperorProcess, system_user, wait_for, write_atomic

pytestmark = pytest.mark.integration

SLEEPER = "[vassal]\ncommand = /bin/sh -c 'echo started `id -u`; exec sleep 600'\n"


@dataclass
class Host:
    """A shared host: a root-owned vassal directory, two users with homes."""

    root: Path
    vassals: Path
    alice: pwd.struct_passwd
    bob: pwd.struct_passwd

    def home(self, pw: pwd.struct_passwd) -> Path:
        return self.root / pw.pw_name

    def config(self, name: str, text: str, owner: pwd.struct_passwd) -> Path:
        path = self.vassals / name
        write_atomic(path, text)
        os.chown(path, owner.pw_uid, owner.pw_gid)
        return path


@pytest.fixture
def host() -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.fail("tyrant mode tests run as root, as the emperor does in production")
    # Not under pytest's own tmp_path: that is private to root, and the users
    # must reach their homes.
    root = Path(tempfile.mkdtemp(prefix="trimperor-tyrant-"))
    root.chmod(0o755)
    try:
        with system_user("trimperor-alice") as alice, system_user("trimperor-bob") as bob:
            vassals = root / "vassals"
            vassals.mkdir(mode=0o755)
            for pw in (alice, bob):
                home = root / pw.pw_name
                home.mkdir(mode=0o755)
                os.chown(home, pw.pw_uid, pw.pw_gid)
            yield Host(root, vassals, alice, bob)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def emperor(host: Host, *extra: str) -> EmperorProcess:
    return EmperorProcess([str(host.vassals), "--tyrant", *extra], host.root / "emperor.log")


async def test_logto_is_opened_as_the_user(host: Host) -> None:
    target = Path(f"/etc/trimperor-tyrant-test-{os.getpid()}")
    assert not target.exists()
    own_log = host.home(host.alice) / "out.log"
    e = emperor(host)
    try:
        host.config("evil.ini", f"{SLEEPER}logto = {target}\n", host.alice)
        host.config("good.ini", f"{SLEEPER}logto = {own_log}\n", host.alice)
        await wait_for(
            lambda: f"cannot open logto '{target}' as uid {host.alice.pw_uid}" in e.text(),
            what="the refused logto",
        )
        await wait_for(lambda: own_log.exists() and "started" in own_log.read_text())
        assert own_log.stat().st_uid == host.alice.pw_uid
        assert f"started {host.alice.pw_uid}" in own_log.read_text()
        assert not target.exists()
    finally:
        e.close()
        target.unlink(missing_ok=True)


async def test_chdir_is_entered_as_the_user(host: Host) -> None:
    private = host.root / "private"
    private.mkdir(mode=0o700)  # root's
    e = emperor(host)
    try:
        host.config("evil.ini", f"{SLEEPER}chdir = {private}\n", host.alice)
        await wait_for(
            lambda: (
                f"working directory '{private}' cannot be entered as uid {host.alice.pw_uid}"
                in e.text()
            ),
            what="the refused chdir",
        )
        assert "evil.ini| started" not in e.text()
    finally:
        e.close()


async def test_unix_socket_is_bound_as_the_user(host: Host) -> None:
    home = host.home(host.alice)
    own = home / "app.sock"
    private = host.root / "private"
    private.mkdir(mode=0o700)
    e = emperor(host)
    try:
        host.config("own.ini", f"{SLEEPER}socket = {own}\n", host.alice)
        host.config("private.ini", f"{SLEEPER}socket = {private}/app.sock\n", host.alice)
        await wait_for(own.exists, what="the user's own socket")
        st = own.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert st.st_uid == host.alice.pw_uid
        await wait_for(
            lambda: (
                f"cannot bind {private}/app.sock: Permission denied (as uid "
                f"{host.alice.pw_uid})" in e.text()
            ),
            what="the refused bind",
        )
        assert not (private / "app.sock").exists()
    finally:
        e.close()


async def test_another_users_socket_is_never_replaced(host: Host) -> None:
    # Bob's service listens in a directory Alice may write to (a shared /tmp-like one).
    shared = host.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "bob.sock"
    bob_sock = socket.socket(socket.AF_UNIX)
    bob_sock.bind(str(path))
    bob_sock.listen()
    os.chown(path, host.bob.pw_uid, host.bob.pw_gid)
    inode = path.lstat().st_ino
    e = emperor(host)
    try:
        host.config("hijack.ini", f"{SLEEPER}socket = {path}\n", host.alice)
        await wait_for(
            lambda: f"the socket there belongs to uid {host.bob.pw_uid}" in e.text(),
            what="the refused hijack",
        )
        assert path.lstat().st_ino == inode
        assert path.lstat().st_uid == host.bob.pw_uid
    finally:
        e.close()
        bob_sock.close()


async def test_socket_owner_names_only_the_user(host: Host) -> None:
    home = host.home(host.alice)
    e = emperor(host)
    try:
        host.config(
            "owner.ini",
            f"{SLEEPER}socket = {home}/a.sock\nsocket-owner = {host.bob.pw_name}\n",
            host.alice,
        )
        host.config(
            "group.ini", f"{SLEEPER}socket = {home}/b.sock\nsocket-owner = :root\n", host.alice
        )
        await wait_for(
            lambda: "socket-owner trimperor-bob is not the owner of the configuration" in e.text(),
            what="the refused socket-owner",
        )
        await wait_for(
            lambda: "names another user or a group the vassal's user is not in" in e.text(),
            what="the refused socket group",
        )
        assert not (home / "a.sock").exists()
        assert not (home / "b.sock").exists()
    finally:
        e.close()


async def test_symlink_must_belong_to_its_targets_owner(host: Host) -> None:
    # Bob's configuration, linked into the vassal directory by Alice.
    bobs = host.home(host.bob) / "app.ini"
    write_atomic(bobs, SLEEPER)
    os.chown(bobs, host.bob.pw_uid, host.bob.pw_gid)
    link = host.vassals / "linked.ini"
    link.symlink_to(bobs)
    os.lchown(link, host.alice.pw_uid, host.alice.pw_gid)
    # A link whose owner matches its target is fine.
    fine = host.vassals / "fine.ini"
    fine.symlink_to(bobs)
    os.lchown(fine, host.bob.pw_uid, host.bob.pw_gid)
    e = emperor(host)
    try:
        await wait_for(
            lambda: "linked.ini" in e.text() and "symlink" in e.text(),
            what="the refused symlink",
        )
        assert (
            f"symlink owned by uid {host.alice.pw_uid} points to a file owned by uid "
            f"{host.bob.pw_uid}" in e.text()
        )
        await wait_for(lambda: f"fine.ini| started {host.bob.pw_uid}" in e.text())
        assert "linked.ini| started" not in e.text()
    finally:
        e.close()
