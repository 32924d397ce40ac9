from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimperor.core.errors import ConfigError
from trimperor.core.model import VassalDocument
from trimperor.core.vassalspec import (
    MagicContext,
    NativeSpec,
    UwsgiSpec,
    build_spec,
    expand,
    parse_signal,
)

ENV = {"HOME": "/home/app", "PORT": "8080"}


def spec_of(name: str, text: str, path: str | None = "/etc/vassals/sub/app.ini") -> NativeSpec:
    doc = VassalDocument(name, "dir:///etc/vassals", "1", text, path=path, in_own_dir=True)
    s = build_spec(doc, ENV)
    assert isinstance(s, NativeSpec)
    return s


def test_magic_variables() -> None:
    ctx = MagicContext("app.ini", "/etc/vassals/sub/app.ini")
    assert expand("%n %s %e %p %d %c %% %x", ctx, ENV, "w") == (
        "app app.ini ini /etc/vassals/sub/app.ini /etc/vassals/sub/ sub % %x"
    )
    assert expand("$(HOME)/run/$(PORT)", ctx, ENV, "w") == "/home/app/run/8080"
    with pytest.raises(ConfigError, match="'NOPE' is not set"):
        expand("$(NOPE)", ctx, ENV, "app.ini: command")


def test_defaults_and_shell_like_split() -> None:
    s = spec_of("app.ini", "[vassal]\ncommand = gunicorn -b '127.0.0.1:80' \"a b\" %n:app\n")
    assert s.command == ("gunicorn", "-b", "127.0.0.1:80", "a b", "app:app")
    assert s.chdir == "/etc/vassals/sub"
    assert (s.stop_signal, s.stop_timeout, s.reload_signal) == (signal.SIGTERM, 10.0, None)
    assert s.env == ()
    assert s.logto is None
    assert s.uid is None


def test_every_key() -> None:
    s = spec_of(
        "app.ini",
        "[vassal]\ncommand = run\nenv = A=1\nenv = B=x=y\nchdir = work\nuid = www-data\n"
        "gid = 33\nstop-signal = INT\nstop-timeout = 2.5\nreload-signal = SIGHUP\n"
        "logto = %n.log\n",
    )
    assert s.env == (("A", "1"), ("B", "x=y"))
    assert s.chdir == "/etc/vassals/sub/work"
    assert s.logto == "/etc/vassals/sub/work/app.log"
    assert (s.uid, s.gid) == ("www-data", "33")
    assert (s.stop_signal, s.stop_timeout, s.reload_signal) == (signal.SIGINT, 2.5, signal.SIGHUP)


def test_list_command_in_yaml_and_json() -> None:
    y = spec_of("a.yaml", "vassal:\n  command: [python3, -m, http.server, '80']\n")
    assert y.command == ("python3", "-m", "http.server", "80")
    j = spec_of("a.json", '{"vassal": {"command": ["echo", "a b"]}}')
    assert j.command == ("echo", "a b")
    x = spec_of("a.xml", "<vassal><command>echo hi</command></vassal>")
    assert x.command == ("echo", "hi")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[vassal]\ncommand = x\nsockets = :80\n", "unknown key 'sockets'"),
        ("[vassal]\nenv = A=1\n", "needs a command"),
        ("[vassal]\ncommand = 'unclosed\n", "command: No closing quotation"),
        ("[vassal]\ncommand = x\nenv = NOEQUALS\n", "not KEY=VALUE"),
        ("[vassal]\ncommand = x\nstop-signal = BOGUS\n", "stop-signal: unknown signal"),
        ("[vassal]\ncommand = x\nstop-timeout = soon\n", "not a number of seconds"),
        ("[vassal]\ncommand = x\nstop-timeout = -1\n", "not a number of seconds"),
        ("[vassal]\ncommand = $(MISSING)\n", "'MISSING' is not set"),
    ],
)
def test_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        spec_of("app.ini", text)
    assert str(exc.value).startswith("app.ini")


def test_other_files_are_uwsgi_vassals() -> None:
    text = "[uwsgi]\nsocket = :3031\n"
    doc = VassalDocument("u.ini", "dir:///v", "1", text, path="/v/u.ini", in_own_dir=True)
    assert build_spec(doc, ENV) == UwsgiSpec("u.ini", "/v/u.ini", text, cwd="/v")


def test_the_working_directory_comes_from_the_caller() -> None:
    """Without ``in_own_dir`` a vassal runs in the directory the caller passes;
    relative paths and magic variables are taken against it, not the process's."""
    text = "[uwsgi]\nsocket = :3031\n"
    doc = VassalDocument("u.ini", "glob://v/*.ini", "1", text, path="v/u.ini")
    assert build_spec(doc, ENV, cwd="/srv") == UwsgiSpec("u.ini", "/srv/v/u.ini", text, cwd="/srv")
    native = VassalDocument("n.ini", "pg://", "1", "[vassal]\ncommand = run %p\n")
    spec = build_spec(native, ENV, cwd="/srv")
    assert isinstance(spec, NativeSpec)
    assert spec.command == ("run", "/srv/n.ini")
    assert spec.chdir == "/srv"


def test_unreadable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Permission denied"):
        build_spec(VassalDocument("u.ini", "s", "1", None, error="Permission denied"), ENV)


def test_parse_signal_forms() -> None:
    assert parse_signal("term", "w") == parse_signal("SIGTERM", "w") == parse_signal("15", "w")
    with pytest.raises(ConfigError):
        parse_signal("999", "w")


@given(st.text(max_size=40))
def test_expand_never_raises_on_text_without_env_refs(text: str) -> None:
    ctx = MagicContext("a.ini", "/x/a.ini")
    if "$(" in text:
        return
    out = expand(text, ctx, {}, "w")
    assert isinstance(out, str)
    assert expand(text.replace("%", "%%"), ctx, {}, "w") == text


def test_in_memory_uwsgi_config_over_the_protocol_limit_is_refused() -> None:
    text = "[uwsgi]\n" + "x = " + "y" * 65535 + "\n"
    with pytest.raises(ConfigError, match="carries at most 65535"):
        build_spec(VassalDocument("big.ini", "pg://", "1", text), ENV)
    # a file vassal reads its file itself: no limit
    assert isinstance(
        build_spec(VassalDocument("big.ini", "dir://", "1", text, path="/v/b.ini"), ENV), UwsgiSpec
    )


def test_a_socket_from_the_source_makes_a_native_vassal_on_demand() -> None:
    doc = VassalDocument("a.ini", "pg://", "1", "[vassal]\ncommand = x\n", socket="/run/a.sock")
    spec = build_spec(doc, ENV)
    assert isinstance(spec, NativeSpec)
    assert spec.on_demand
    assert [s.address for s in spec.sockets] == ["/run/a.sock"]
    empty = build_spec(
        VassalDocument("a.ini", "pg://", "1", "[vassal]\ncommand = x\n", socket=""), ENV
    )
    assert isinstance(empty, NativeSpec)
    assert not empty.on_demand
    assert empty.sockets == ()


@pytest.mark.parametrize(
    "line",
    [
        "stop-timeout = hunter2",
        "stop-signal = hunter2",
        "env = hunter2",
        "type = hunter2",
        "socket-mode = hunter2",
        "listen-backlog = hunter2",
        "socket = hunter2:http",
        "socket = [hunter2:80",
        "socket = hunter2::2:80",
        "on-demand = hunter2",
    ],
)
def test_errors_never_quote_values(line: str) -> None:
    # A configuration may hold secrets (or be a file it should not be): an
    # error names the file and the key, never the value.
    doc = VassalDocument(
        "a.ini", "dir:///v", "1", f"[vassal]\ncommand = x\n{line}\n", path="/v/a.ini"
    )
    with pytest.raises(ConfigError) as info:
        build_spec(doc, {})
    assert "hunter2" not in str(info.value)
