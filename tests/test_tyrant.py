"""Tyrant mode: every vassal runs as the owner of its configuration."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import EmperorProcess, pid_alive, system_user, wait_for, write_atomic
from trimperor.core.errors import Refused
from trimperor.core.model import VassalDocument
from trimperor.core.vassalspec import NativeSpec, UwsgiSpec, tyrant

USER = "trimperor-test"


def resolve(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    return (None if user is None else int(user), None if group is None else int(group))


def doc(uid: int | None, gid: int | None) -> VassalDocument:
    return VassalDocument("a.ini", "dir:///v", "1", "", path="/v/a.ini", uid=uid, gid=gid)


def test_runs_as_owner() -> None:
    spec = tyrant(NativeSpec("a.ini", ("x",)), doc(1000, 1001), resolve)
    assert isinstance(spec, NativeSpec)
    assert (spec.uid, spec.gid, spec.init_groups) == ("1000", "1001", False)
    u = tyrant(UwsgiSpec("a.ini", "/v/a.ini", ""), doc(1000, 1001), resolve, initgroups=True)
    assert isinstance(u, UwsgiSpec)
    assert (u.uid, u.gid, u.init_groups) == ("1000", "1001", True)


def test_root_is_refused_with_the_rule_and_the_owner() -> None:
    with pytest.raises(
        Refused, match=r"refuses to run a vassal as root: /v/a.ini belongs to uid 0"
    ):
        tyrant(NativeSpec("a.ini", ("x",)), doc(0, 1001), resolve)
    with pytest.raises(Refused, match="gid 0"):
        tyrant(NativeSpec("a.ini", ("x",)), doc(1000, 0), resolve)


def test_no_owner_is_refused() -> None:
    with pytest.raises(Refused, match="needs an owner"):
        tyrant(NativeSpec("a.ini", ("x",)), doc(None, None), resolve)


def test_native_uid_key_cannot_name_someone_else() -> None:
    with pytest.raises(Refused, match="uid 33 differs from the owner"):
        tyrant(NativeSpec("a.ini", ("x",), uid="33"), doc(1000, 1000), resolve)
    ok = tyrant(NativeSpec("a.ini", ("x",), uid="1000"), doc(1000, 1000), resolve)
    assert isinstance(ok, NativeSpec)
    assert ok.uid == "1000"


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("tyrant mode tests need root")
    with system_user(USER) as pw:
        yield pw


@pytest.mark.integration
async def test_tyrant_end_to_end(tmp_path: Path, unprivileged_user: pwd.struct_passwd) -> None:
    pw = unprivileged_user
    # The vassal runs in its configuration's directory, entered as its user:
    # not under pytest's tmp_path, which only root may enter.
    vassals = Path(tempfile.mkdtemp(prefix="trimperor-tyrant-"))
    vassals.chmod(0o755)
    # A system shell that reports its ids in the emperor's log: the unprivileged
    # user can reach neither the test's interpreter nor its temporary directory.
    text = "[vassal]\ncommand = /bin/sh -c 'echo ids `id -u` `id -g` `id -G`; exec sleep 600'\n"
    emperor = EmperorProcess([str(vassals), "--tyrant"], tmp_path / "e.log")
    try:
        user_file = vassals / "user.ini"
        write_atomic(user_file, text)
        os.chown(user_file, pw.pw_uid, pw.pw_gid)
        root_file = vassals / "root.ini"
        write_atomic(root_file, text)
        found: list[re.Match[str]] = []

        def reported() -> bool:
            found[:] = list(re.finditer(r"user.ini\| ids (\d+) (\d+) ([\d ]+)", emperor.text()))
            return bool(found)

        await wait_for(reported)
        uid, gid, groups = found[0].groups()
        assert (int(uid), int(gid)) == (pw.pw_uid, pw.pw_gid)
        # no supplementary groups without --tyrant-initgroups
        assert groups.split() == [str(pw.pw_gid)]
        await wait_for(lambda: "refuses to run a vassal as root" in emperor.text())
        assert "root.ini belongs to uid 0, gid 0" in emperor.text()
        spawned = re.search(r"vassal.spawned name=user.ini pid=(\d+)", emperor.text())
        assert spawned is not None
        pid = int(spawned.group(1))
        # giving the file to root stops the vassal
        os.chown(user_file, 0, 0)
        await wait_for(lambda: not pid_alive(pid))
    finally:
        emperor.close()
        shutil.rmtree(vassals, ignore_errors=True)
