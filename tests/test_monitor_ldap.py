"""The ldap:// source against real OpenLDAP slapd servers of the tests' own.

A session slapd (with syncprov) serves most tests, each in its own
``ou=...,ou=vassals`` subtree; the outage and polling tests start slapds of
their own (tests/slapd.py builds each one's cn=config and database in a
temporary directory). Outages are made by stopping slapd, or by cutting a
:class:`tests.proxy.TcpProxy` between the monitor and slapd.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import slapd as sl
from tests.helpers import (
    EmperorProcess,
    free_port,
    new_pid,
    next_change,
    next_problem,
    next_snapshot,
    pid_alive,
    pidfile_vassal,
    read_pid,
    running_monitor,
    system_user,
    versions,
    wait_for,
)
from tests.proxy import TcpProxy
from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Remove, SourceEvent, Upsert, VassalDocument
from trimperor.monitors.ldap import (
    LdapMonitor,
    Mirror,
    entry_document,
    option_name,
    parse_url,
)
from trimperor.monitors.toolkit import BadVassal

UWSGI = str(Path(sys.executable).with_name("uwsgi"))
SERVER = Path(__file__).with_name("ondemand_server.py")
TEST_USER = "trimperor-test"


# -- the URL and entries (no server) ----------------------------------------------------


def test_url_forms() -> None:
    u = parse_url("ldap://127.0.0.1:389/ou=vassals,dc=example,dc=org")
    assert (u.server, u.base, u.attribute) == (
        "ldap://127.0.0.1:389",
        "ou=vassals,dc=example,dc=org",
        "trimperorConfig",
    )
    assert u.scope == 1
    assert u.filter == "(|(objectClass=uWSGIConfig)(trimperorConfig=*))"
    assert u.bind_dn is None
    assert u.sasl is None
    s = parse_url("ldaps://ldap.example.org/dc=x??sub?objectClass=device")
    assert (s.server, s.scope, s.filter) == ("ldaps://ldap.example.org", 2, "(objectClass=device)")
    i = parse_url("ldapi://%2Frun%2Fslapd%2Fldapi/dc=x?description?base??x-sasl=EXTERNAL")
    assert (i.server, i.attribute, i.scope, i.sasl) == (
        "ldapi://%2Frun%2Fslapd%2Fldapi",
        "description",
        0,
        "EXTERNAL",
    )
    b = parse_url("ldap://h/dc=x????bindname=cn%3Dr%2Cdc%3Dx,x-bindpw-file=%2Fetc%2Fpw")
    assert (b.bind_dn, b.password_file) == ("cn=r,dc=x", "/etc/pw")
    # a non-critical unknown extension is ignored; a critical one is refused
    assert parse_url("ldap://h/dc=x????x-other=1").base == "dc=x"
    for bad, message in [
        ("http://h/dc=x", "not an ldap"),
        ("ldap://h/notadn", "not a DN"),
        ("ldap://h/dc=x?a,b", "one attribute"),
        ("ldap://h/dc=x??deep", "scope"),
        ("ldap://h/dc=x???(a=b", "unbalanced"),
        ("ldap://h/dc=x????!x-other=1", "critical"),
        ("ldap://h/dc=x????bindname=cn%3Dr", "both bindname"),
        ("ldap://h/dc=x????x-sasl=PLAIN", "EXTERNAL only"),
        ("ldap://h/dc=x?a?b?c?d?e", "at most 5"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_url(bad)


def test_password_file_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the password file"):
        LdapMonitor(
            f"ldap://h/dc=x????bindname=cn%3Dr%2Cdc%3Dx,x-bindpw-file={tmp_path}/none",
            MonitorOptions(),
        )


def test_option_names_follow_uwsgis_rule() -> None:
    assert option_name("uWSGIhttpSocket") == "http-socket"
    assert option_name("uWSGImodule") == "module"
    assert option_name("uWSGIhttpSocketModifier1") == "http-socket-modifier1"
    assert sl.uwsgi_attribute("http-socket-modifier1") == "uWSGIhttpSocketModifier1"


def _doc(dn: str, attrs: Mapping[str, list[bytes]], size: int = 64 * 1024) -> VassalDocument:
    return entry_document(
        dn,
        attrs,
        attribute="trimperorConfig",
        source="ldap://h/dc=x",
        options=MonitorOptions(max_config_size=size),
    )


def test_entry_shapes() -> None:
    uw = _doc(
        "cn=app,dc=x",
        {
            "objectClass": [b"applicationProcess", b"uWSGIConfig"],
            "cn": [b"app"],
            "uWSGIhttpSocket": [b"127.0.0.1:9000"],
            "uWSGImodule": [b"a:b", b"ignored"],
            "uidNumber": [b"1000"],
            "gidNumber": [b"1001"],
            "entryCSN": [b"20261201.1Z#0#0#0"],
        },
    )
    assert uw.name == "app.ini"
    assert uw.text == "[uwsgi]\nhttp-socket = 127.0.0.1:9000\nmodule = a:b\n"
    assert (uw.uid, uw.gid, uw.version) == (1000, 1001, "20261201.1Z#0#0#0")
    plain = _doc(
        "cn=web.yaml+sn=x,dc=x",
        {"objectClass": [b"trimperorVassal"], "trimperorConfig": [b"uwsgi: {}"],
         "trimperorSocket": [b"/run/web.sock"]},
    )  # fmt: skip
    assert (plain.name, plain.text, plain.socket) == ("web.yaml", "uwsgi: {}", "/run/web.sock")
    assert len(plain.version) == 16  # no entryCSN: a digest of the entry


@pytest.mark.parametrize(
    ("dn", "attrs", "reason"),
    [
        ("cn=noext,dc=x", {"trimperorConfig": [b"x"]}, "does not end in a configuration"),
        ("cn=a.ini,dc=x", {"objectClass": [b"device"]}, "neither objectClass uWSGIConfig"),
        ("cn=a,dc=x", {"objectClass": [b"uWSGIConfig"]}, "no uWSGI option"),
        ("cn=a,dc=x", {"objectClass": [b"uWSGIConfig"], "uWSGIenv": [b"A=1\nB"]}, "line break"),
        ("cn=a.ini,dc=x", {"trimperorConfig": [b"\xff"]}, "not UTF-8"),
        ("cn=a.ini,dc=x", {"trimperorConfig": [b"x"], "uidNumber": [b"-1"]}, "uidNumber"),
        ("cn=a.ini,dc=x", {"trimperorConfig": [b"x" * 200]}, "over --max-config-size"),
    ],
)
def test_bad_entries(dn: str, attrs: dict[str, list[bytes]], reason: str) -> None:
    with pytest.raises(BadVassal, match=reason):
        _doc(dn, attrs, size=100)


def test_mirror_keeps_the_last_good_document_and_first_dn_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror = Mirror(lambda dn, attrs: _doc(dn, attrs, size=100), "ldap://h/dc=x")
    mirror.put("u1", "cn=a.ini,dc=x", {"trimperorConfig": [b"one"]})
    mirror.put("u2", "cn=a.ini,ou=z,dc=x", {"trimperorConfig": [b"two"]})
    assert mirror.view()["a.ini"].text == "one"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            mirror.put("u1", "cn=a.ini,dc=x", {"trimperorConfig": [b"x" * 200]})
            assert mirror.view()["a.ini"].text == "one"
    assert sum("source.bad_entry" in r.message for r in caplog.records) == 2  # size, duplicate
    mirror.drop("u1")
    assert mirror.view()["a.ini"].text == "two"


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server() -> Iterator[sl.Slapd]:
    sl.env_ok()
    s = sl.Slapd(UWSGI)
    try:
        s.start()
        s.populate()
        yield s
    finally:
        s.close()


def own_slapd(syncprov: bool = True) -> sl.Slapd:
    sl.env_ok()
    s = sl.Slapd(UWSGI, syncprov=syncprov)
    s.start()
    s.populate()
    return s


class Tree:
    """A subtree ``ou=<random>,ou=vassals`` of one test."""

    def __init__(self, server: sl.Slapd) -> None:
        self.server = server
        self.base = f"ou=t{uuid.uuid4().hex[:10]},{sl.VASSALS}"
        server.add(self.base, {"objectClass": ["organizationalUnit"], "ou": [self.base[3:14]]})

    def dn(self, rdn_value: str) -> str:
        return f"cn={rdn_value},{self.base}"

    def url(self, port: int | None = None, rest: str = "") -> str:
        return f"ldap://127.0.0.1:{port or self.server.port}/{self.base}{rest}"

    def add_plain(self, name: str, config: str, **extra: str) -> None:
        self.server.add(self.dn(name), sl.plain_entry(config, **extra))

    def add_uwsgi(self, name: str, options: dict[str, str], **extra: str) -> None:
        self.server.add(self.dn(name), sl.uwsgi_entry(options, **extra))


@pytest.fixture
def tree(server: sl.Slapd) -> Tree:
    return Tree(server)


def running(
    uri: str, **options: Any
) -> AbstractAsyncContextManager[tuple[LdapMonitor, trio.MemoryReceiveChannel[SourceEvent]]]:
    return running_monitor(LdapMonitor, uri, **options)


# -- the monitor on a live directory --------------------------------------------------------


@pytest.mark.integration
async def test_add_modify_rename_delete_both_shapes(tree: Tree) -> None:
    tree.add_plain("a.ini", "[uwsgi]\nx = 1\n")
    tree.add_uwsgi("b", {"module": "m:app", "http-socket": "127.0.0.1:1"})
    async with running(tree.url()) as (monitor, recv):
        snap = await next_snapshot(recv)
        assert sorted(versions(snap)) == ["a.ini", "b.ini"]
        assert monitor.mode == "syncrepl"
        assert monitor.status.state == "connected"
        assert monitor.status.snapshot().vassals == 2
        b = {d.name: d for d in snap.docs}["b.ini"]
        assert b.text == "[uwsgi]\nhttp-socket = 127.0.0.1:1\nmodule = m:app\n"

        tree.add_plain("c.ini", "[uwsgi]\nc = 1\n")
        added = await next_change(recv)
        assert isinstance(added, Upsert)
        assert added.doc.name == "c.ini"

        old = versions(snap)["a.ini"]
        tree.server.replace(tree.dn("a.ini"), {"trimperorConfig": ["[uwsgi]\nx = 2\n"]})
        modified = await next_change(recv)
        assert isinstance(modified, Upsert)
        assert modified.doc.text == "[uwsgi]\nx = 2\n"
        assert modified.doc.version != old

        tree.server.replace(tree.dn("b"), {sl.uwsgi_attribute("module"): ["m:other"]})
        modified = await next_change(recv)
        assert isinstance(modified, Upsert)
        assert "module = m:other" in (modified.doc.text or "")

        tree.server.rename(tree.dn("a.ini"), "cn=a2.ini")
        assert await next_change(recv) == Remove(monitor.uri, "a.ini")
        renamed = await next_change(recv)
        assert isinstance(renamed, Upsert)
        assert renamed.doc.name == "a2.ini"

        tree.server.rename(tree.dn("b"), "cn=b2")
        assert await next_change(recv) == Remove(monitor.uri, "b.ini")
        renamed = await next_change(recv)
        assert isinstance(renamed, Upsert)
        assert renamed.doc.name == "b2.ini"

        tree.server.delete(tree.dn("c.ini"))
        tree.server.delete(tree.dn("b2"))
        # Two deletes in a row: the monitor owes one Remove each, in no promised order.
        removed = {await next_change(recv), await next_change(recv)}
        assert removed == {Remove(monitor.uri, "c.ini"), Remove(monitor.uri, "b2.ini")}
        assert monitor.status.snapshot().vassals == 1


@pytest.mark.integration
async def test_resume_from_cookie_transfers_only_the_changes(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(6):
        tree.add_plain(f"v{n}.ini", f"[uwsgi]\nn = {n}\n")
    proxy = TcpProxy("127.0.0.1", tree.server.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        with caplog.at_level(logging.INFO, logger="trimperor.monitors.ldap"):
            async with running(tree.url(port)) as (monitor, recv):
                await next_snapshot(recv, lambda s: len(s.docs) == 6)
                assert monitor.cookie is not None
                proxy.cut()
                await next_problem(recv)
                tree.server.replace(tree.dn("v1.ini"), {"trimperorConfig": ["[uwsgi]\nn = 10\n"]})
                tree.server.delete(tree.dn("v2.ini"))
                proxy.restore()
                snap = await next_snapshot(recv)
                assert sorted(versions(snap)) == [f"v{n}.ini" for n in (0, 1, 3, 4, 5)]
                assert {d.name: d.text for d in snap.docs}["v1.ini"] == "[uwsgi]\nn = 10\n"
        synced = [r.message for r in caplog.records if "source.synced" in r.message]
        assert "resumed=False changes=6" in synced[0]
        # only the modified entry and the deletion came over again
        assert re.search(r"resumed=True changes=[12] vassals=5", synced[-1]), synced
        nursery.cancel_scope.cancel()


@pytest.mark.integration
async def test_bad_input_is_logged_once_and_affects_nothing_else(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    tree.add_plain("good.ini", "[uwsgi]\ng = 1\n")
    tree.add_plain("noext", "[uwsgi]\n")
    tree.add_plain("big.ini", "x" * 300)
    tree.add_uwsgi("nl", {"env": "A=1\nB=2"})
    with caplog.at_level(logging.WARNING, logger="trimperor.monitors.ldap"):
        async with running(tree.url(), max_config_size=200) as (_, recv):
            snap = await next_snapshot(recv)
            assert list(versions(snap)) == ["good.ini"]
            # a good entry turning bad keeps its last good configuration
            tree.server.replace(tree.dn("good.ini"), {"trimperorConfig": ["y" * 300]})
            tree.add_plain("other.ini", "[uwsgi]\no = 1\n")
            event = await next_change(recv)
            assert isinstance(event, Upsert)
            assert event.doc.name == "other.ini"
            tree.server.replace(tree.dn("good.ini"), {"trimperorConfig": ["z" * 300]})
            tree.server.replace(tree.dn("good.ini"), {"trimperorConfig": ["[uwsgi]\ng = 2\n"]})
            event = await next_change(recv)
            assert isinstance(event, Upsert)
            assert event.doc.text == "[uwsgi]\ng = 2\n"
    lines = [r.message for r in caplog.records if "source.bad_entry" in r.message]
    assert sum("name=noext " in m for m in lines) == 1
    assert sum("name=big.ini " in m for m in lines) == 1
    assert sum("name=nl.ini " in m and "line break" in m for m in lines) == 1
    kept = [m for m in lines if "name=good.ini" in m]
    assert len(kept) == 1
    assert "keeping its last good configuration" in kept[0]
    assert all("yyyy" not in m and "[uwsgi]" not in m for m in lines)  # no content logged


@pytest.mark.integration
async def test_binds_simple_with_a_password_file_and_sasl_external(
    tree: Tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree.add_plain("a.ini", "[uwsgi]\n")
    pw = tmp_path / "pw"
    pw.write_text(sl.READER_PW + "\n")
    reader = "bindname=" + sl.READER_DN.replace("=", "%3D").replace(",", "%2C")
    with caplog.at_level(logging.DEBUG, logger="trimperor"):
        async with running(tree.url(rest=f"????{reader},x-bindpw-file={pw}")) as (_, recv):
            assert list(versions(await next_snapshot(recv))) == ["a.ini"]
        pw.write_text("wrong-password\n")
        async with running(tree.url(rest=f"????{reader},x-bindpw-file={pw}")) as (mon, recv):
            problem = await next_problem(recv)
            assert "INVALID_CREDENTIALS" in problem.message
            assert mon.status.state == "retrying"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert sl.READER_PW not in text
    assert "wrong-password" not in text
    ldapi = tree.server.ldapi_url + "/" + tree.base + "????x-sasl=EXTERNAL"
    async with running(ldapi) as (_, recv):
        assert list(versions(await next_snapshot(recv))) == ["a.ini"]


@pytest.mark.integration
async def test_polling_fallback_without_syncprov(caplog: pytest.LogCaptureFixture) -> None:
    server = own_slapd(syncprov=False)
    try:
        tree = Tree(server)
        tree.add_plain("a.ini", "[uwsgi]\na = 1\n")
        with caplog.at_level(logging.WARNING, logger="trimperor.monitors.ldap"):
            async with running(tree.url(), freq=0.2) as (monitor, recv):
                assert list(versions(await next_snapshot(recv))) == ["a.ini"]
                assert monitor.mode == "polling"
                tree.add_plain("b.ini", "[uwsgi]\nb = 1\n")
                await next_snapshot(recv, lambda s: "b.ini" in versions(s))
                tree.server.replace(tree.dn("a.ini"), {"trimperorConfig": ["[uwsgi]\na = 2\n"]})
                await next_snapshot(
                    recv, lambda s: {d.name: d.text for d in s.docs}["a.ini"] == "[uwsgi]\na = 2\n"
                )
                tree.server.rename(tree.dn("b.ini"), "cn=c.ini")
                await next_snapshot(recv, lambda s: sorted(versions(s)) == ["a.ini", "c.ini"])
                tree.server.delete(tree.dn("a.ini"))
                await next_snapshot(recv, lambda s: list(versions(s)) == ["c.ini"])
        assert any(
            "source.polling" in r.message and "offers no content synchronization" in r.message
            for r in caplog.records
        )
    finally:
        server.close()


# -- the emperor on a live directory --------------------------------------------------------


async def emperor_running_a_and_b(
    tree: Tree, tmp_path: Path, emperors: list[EmperorProcess]
) -> tuple[EmperorProcess, int, int]:
    """An emperor on *tree*, two plain vassals added: the emperor and their pids."""
    emperor = EmperorProcess([tree.url(), "--throttle", "50"], tmp_path / "e.log")
    emperors.append(emperor)
    tree.add_plain("a.ini", pidfile_vassal(tmp_path, "a"))
    tree.add_plain("b.ini", pidfile_vassal(tmp_path, "b"))
    return emperor, await new_pid(tmp_path / "a.pid"), await new_pid(tmp_path / "b.pid")


@pytest.mark.integration
async def test_emperor_runs_reloads_renames_and_stops_plain_vassals(
    tree: Tree, tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    emperor, a, b = await emperor_running_a_and_b(tree, tmp_path, emperors)

    tree.server.replace(
        tree.dn("a.ini"), {"trimperorConfig": [pidfile_vassal(tmp_path, "a", "#2")]}
    )
    a2 = await new_pid(tmp_path / "a.pid", a)
    await wait_for(lambda: not pid_alive(a))

    tree.server.rename(tree.dn("b.ini"), "cn=b2.ini")
    b2 = await new_pid(tmp_path / "b.pid", b)
    await wait_for(lambda: not pid_alive(b))
    assert "vassal.spawned name=b2.ini" in emperor.text()

    # an unknown key: one line from the emperor, nothing else touched
    tree.add_plain("bad.ini", pidfile_vassal(tmp_path, "bad", "no-such-key = 1\n"))
    await wait_for(lambda: "config.invalid" in emperor.text())
    assert emperor.text().count("no-such-key") == 1
    assert read_pid(tmp_path / "bad.pid") is None

    tree.server.delete(tree.dn("b2.ini"))
    await wait_for(lambda: not pid_alive(b2))
    assert pid_alive(a2)
    assert pid_alive(b2) is False
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0
    assert not pid_alive(a2)


async def http_status(port: int) -> int | None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return None
    data = b""
    async with stream:
        try:
            await stream.send_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            with trio.move_on_after(5):
                while chunk := await stream.receive_some():
                    data += chunk
        except trio.BrokenResourceError:
            return None
    match = re.match(rb"HTTP/1\.[01] (\d+)", data)
    return int(match.group(1)) if match else None


async def wait_http(port: int) -> None:
    with trio.fail_after(60):
        while await http_status(port) != 200:
            await trio.sleep(0.1)


@pytest.mark.integration
async def test_uwsgi_vassal_from_schema_attributes_serves_http(
    tree: Tree, tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    emperor = EmperorProcess(
        [tree.url(), "--binary-path", UWSGI, "--throttle", "50"], tmp_path / "e.log"
    )
    emperors.append(emperor)
    port = free_port()
    options = {
        "http-socket": f"127.0.0.1:{port}",
        "module": "werkzeug.testapp:test_app",
        "master": "true",
        "processes": "1",
    }
    tree.add_uwsgi("web", options)
    await wait_http(port)
    assert "vassal.spawned name=web.ini" in emperor.text()

    # a changed attribute: uWSGI runs the new configuration
    port2 = free_port()
    tree.server.replace(tree.dn("web"), {sl.uwsgi_attribute("http-socket"): [f"127.0.0.1:{port2}"]})
    await wait_http(port2)

    # a rename: the vassal under the old name stops, the new one serves
    tree.server.rename(tree.dn("web"), "cn=web2")
    await wait_for(lambda: "vassal.spawned name=web2.ini" in emperor.text(), timeout=30)
    old = re.findall(r"vassal.spawned name=web.ini pid=(\d+)", emperor.text())
    await wait_for(lambda: not pid_alive(int(old[-1])), timeout=30)
    await wait_http(port2)

    tree.server.delete(tree.dn("web2"))
    with trio.fail_after(30):
        while await http_status(port2) is not None:
            await trio.sleep(0.1)
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0


@pytest.mark.integration
async def test_on_demand_socket_from_the_entry(
    tree: Tree, tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    emperor = EmperorProcess([tree.url()], tmp_path / "e.log")
    emperors.append(emperor)
    address = f"127.0.0.1:{free_port()}"
    config = f"[vassal]\ncommand = {sys.executable} {SERVER}\nstop-timeout = 5\n"
    tree.add_plain("lazy.ini", config, trimperorSocket=address)
    # the emperor holds the socket before anything runs
    await wait_for(lambda: "vassal.armed name=lazy.ini" in emperor.text(), timeout=20)
    assert "vassal.spawned name=lazy.ini" not in emperor.text()
    host, _, p = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(p))
    data = b""
    async with stream:
        with trio.fail_after(30):
            while chunk := await stream.receive_some():
                data += chunk
    assert int(data) > 0
    assert "vassal.wake name=lazy.ini" in emperor.text()
    assert "vassal.spawned name=lazy.ini" in emperor.text()


@pytest.mark.integration
async def test_on_demand_uwsgi_vassal_from_schema_attributes(
    tree: Tree, tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    emperor = EmperorProcess([tree.url(), "--binary-path", UWSGI], tmp_path / "e.log")
    emperors.append(emperor)
    port = free_port()
    options = {
        "module": "werkzeug.testapp:test_app",
        "protocol": "http",
        "master": "true",
        "processes": "1",
    }
    tree.add_uwsgi("lazyweb", options, trimperorSocket=f"127.0.0.1:{port}")
    await wait_for(lambda: "vassal.armed name=lazyweb.ini" in emperor.text(), timeout=20)
    assert "vassal.spawned name=lazyweb.ini" not in emperor.text()
    with trio.fail_after(60):
        assert await http_status(port) == 200  # uWSGI, woken, on the socket held as fd 0
    assert "vassal.wake name=lazyweb.ini" in emperor.text()
    emperor.signal(signal.SIGTERM)
    assert await emperor.wait() == 0


@pytest.fixture
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.fail("the tyrant test needs root")
    with system_user(TEST_USER) as pw:
        yield pw


@pytest.mark.integration
async def test_tyrant_runs_each_vassal_as_its_uid_and_gid_numbers(
    tree: Tree,
    tmp_path: Path,
    emperors: list[EmperorProcess],
    unprivileged_user: pwd.struct_passwd,
) -> None:
    pw = unprivileged_user
    emperor = EmperorProcess([tree.url(), "--tyrant"], tmp_path / "e.log")
    emperors.append(emperor)
    text = "[vassal]\ncommand = /bin/sh -c 'echo ids `id -u` `id -g`; exec sleep 600'\n"
    tree.add_plain("user.ini", text, uidNumber=str(pw.pw_uid), gidNumber=str(pw.pw_gid))
    tree.add_plain("root.ini", text, uidNumber="0", gidNumber="0")
    tree.add_plain("nobody.ini", text)
    await wait_for(lambda: f"user.ini| ids {pw.pw_uid} {pw.pw_gid}" in emperor.text(), 20)
    await wait_for(lambda: "refuses to run a vassal as root" in emperor.text())
    await wait_for(lambda: "nobody.ini: tyrant mode needs an owner" in emperor.text())
    spawned = re.search(r"vassal.spawned name=user.ini pid=(\d+)", emperor.text())
    assert spawned is not None
    pid = int(spawned.group(1))
    # the entry given to root: the vassal stops
    tree.server.replace(tree.dn("user.ini"), {"uidNumber": ["0"]})
    await wait_for(lambda: not pid_alive(pid))


@pytest.mark.integration
async def test_slapd_stopped_for_30s_then_restarted(
    tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    server = own_slapd()
    try:
        tree = Tree(server)
        emperor, a, b = await emperor_running_a_and_b(tree, tmp_path, emperors)
        server.stop()
        stopped = trio.current_time()
        # 30 s without the directory: nothing stops, the emperor keeps trying
        with trio.fail_after(60):
            while trio.current_time() - stopped < 30:
                assert pid_alive(a)
                assert pid_alive(b)
                await trio.sleep(0.5)
        assert "source.retrying" in emperor.text()
        assert len(re.findall(r"source.retrying .*ldap://", emperor.text())) >= 10
        server.start()
        await wait_for(lambda: "source.recovered" in emperor.text(), timeout=10)
        # a change made after the return is applied; nothing was restarted
        server.delete(tree.dn("b.ini"))
        await wait_for(lambda: not pid_alive(b))
        assert pid_alive(a)
        assert read_pid(tmp_path / "a.pid") == a
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        server.close()


@pytest.mark.integration
async def test_unreachable_at_start_then_up(tmp_path: Path) -> None:
    server = sl.Slapd(UWSGI)
    try:
        tree_url = f"{server.url}/{sl.VASSALS}"
        async with running(tree_url) as (monitor, recv):
            await next_problem(recv)
            assert monitor.status.state == "retrying"
            server.start()
            server.populate()
            server.add(f"cn=a.ini,{sl.VASSALS}", sl.plain_entry("[uwsgi]\n"))
            snap = await next_snapshot(recv, lambda s: bool(s.docs), timeout=20)
            assert list(versions(snap)) == ["a.ini"]
    finally:
        server.close()


@pytest.mark.integration
async def test_ldaps_with_the_servers_certificate(
    tmp_path: Path, emperors: list[EmperorProcess]
) -> None:
    server = sl.Slapd(UWSGI, tls=True)
    try:
        server.start()
        server.populate()
        server.add(f"cn=a.ini,{sl.VASSALS}", sl.plain_entry(pidfile_vassal(tmp_path, "a")))
        url = f"ldaps://127.0.0.1:{server.tls_port}/{sl.VASSALS}"
        # the system's CAs do not vouch for it: TLS fails, retried, nothing runs
        assert "LDAPTLS_CACERT" not in os.environ
        untrusted = EmperorProcess([url], tmp_path / "untrusted.log")
        emperors.append(untrusted)
        await wait_for(lambda: "source.retrying" in untrusted.text(), timeout=20)
        assert read_pid(tmp_path / "a.pid") is None
        untrusted.signal(signal.SIGTERM)
        assert await untrusted.wait() == 0

        emperor = EmperorProcess(
            [url], tmp_path / "e.log", env={"LDAPTLS_CACERT": str(server.cert)}
        )
        emperors.append(emperor)
        a = await new_pid(tmp_path / "a.pid")
        server.delete(f"cn=a.ini,{sl.VASSALS}")
        await wait_for(lambda: not pid_alive(a))
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        server.close()


@pytest.mark.integration
async def test_a_base_whose_database_has_no_syncprov_is_polled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = "dc=plain,dc=org"
    server = sl.Slapd(UWSGI, plain_suffix=plain)
    try:
        server.start()
        server.populate()
        c = server.conn()
        try:
            c.simple_bind_s(f"cn=admin,{plain}", sl.ROOT_PW)
            c.add_s(plain, [("objectClass", [b"dcObject", b"organization"]),
                            ("dc", [b"plain"]), ("o", [b"Plain"])])  # fmt: skip
            c.add_s(f"cn=a.ini,{plain}", sl._mods(sl.plain_entry("[uwsgi]\n")))
        finally:
            c.unbind_s()
        with caplog.at_level(logging.INFO, logger="trimperor.monitors.ldap"):
            async with running(f"{server.url}/{plain}", freq=0.2) as (monitor, recv):
                assert list(versions(await next_snapshot(recv))) == ["a.ini"]
                assert monitor.mode == "polling"
        # the root DSE lists the control (another database has syncprov), so
        # the search was tried first and refused
        assert any(
            "source.polling" in r.message and "refused for this base" in r.message
            for r in caplog.records
        )
        assert not any("source.retrying" in r.message for r in caplog.records)
    finally:
        server.close()


@pytest.mark.integration
async def test_over_the_size_limit_is_reported_with_a_hint(tree: Tree, tmp_path: Path) -> None:
    c = tree.server.conn()
    try:
        for n in range(510):  # slapd's default size limit is 500
            c.add_s(tree.dn(f"v{n}.ini"), sl._mods(sl.plain_entry("[uwsgi]\n")))
    finally:
        c.unbind_s()
    async with running(tree.url()) as (monitor, recv):
        problem = await next_problem(recv)
        assert "SIZELIMIT_EXCEEDED" in problem.message
        assert "olcLimits" in problem.message
        assert monitor.status.state == "retrying"
    pw = tmp_path / "pw"
    pw.write_text(sl.ROOT_PW)
    root = "bindname=" + sl.ROOT_DN.replace("=", "%3D").replace(",", "%2C")
    async with running(tree.url(rest=f"????{root},x-bindpw-file={pw}")) as (_, recv):
        snap = await next_snapshot(recv)
        assert len(snap.docs) == 510
        tree.server.delete(tree.dn("v7.ini"))
        assert await next_change(recv) == Remove(snap.source, "v7.ini")
