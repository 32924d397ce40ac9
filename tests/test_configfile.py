"""Tests for trimperor.core.configfile: the four formats, their errors, and dump()."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimperor.core.configfile import (
    Format,
    Options,
    Section,
    dump,
    format_of,
    parse,
    parse_ini,
    parse_json,
    parse_xml,
    parse_yaml,
)
from trimperor.core.errors import ConfigError

Parser = Callable[[str, str], Options]

UWSGI_XML = """\
<uwsgi>
    <module>werkzeug.testapp:test_app</module>
    <master/>
    <processes>4</processes>
    <socket>127.0.0.1:3031</socket>
</uwsgi>
"""

UWSGI_INI = """\
[uwsgi]
master = true
processes = 2
module = trac.web.main:dispatch_request
env = TRAC_ENV=/opt/project001
socket = 127.0.0.1:3032
"""

UWSGI_YAML = """\
uwsgi:
    plugins: rack
    rack: config.ru
    master: 1
    processes: 8
    socket: 127.0.0.1:3033
    post-buffering: 4096
    chdir: /opt/railsapp001
"""

NATIVE_INI = "[vassal]\ncommand = gunicorn app:app\nenv = A=1\nenv = B=2\n"

NATIVE_YAML = "vassal: {command: [python3, -m, http.server], env: [A=1]}"


def one_section(name: str, *entries: tuple[str, str]) -> Options:
    return Options((Section(name, entries),))


# Valid input -------------------------------------------------------------------


def test_uwsgi_xml() -> None:
    assert parse("app.xml", UWSGI_XML) == one_section(
        "uwsgi",
        ("module", "werkzeug.testapp:test_app"),
        ("master", "true"),
        ("processes", "4"),
        ("socket", "127.0.0.1:3031"),
    )


def test_uwsgi_ini() -> None:
    assert parse("app.ini", UWSGI_INI) == one_section(
        "uwsgi",
        ("master", "true"),
        ("processes", "2"),
        ("module", "trac.web.main:dispatch_request"),
        ("env", "TRAC_ENV=/opt/project001"),
        ("socket", "127.0.0.1:3032"),
    )


def test_uwsgi_yaml() -> None:
    assert parse("app.yml", UWSGI_YAML) == one_section(
        "uwsgi",
        ("plugins", "rack"),
        ("rack", "config.ru"),
        ("master", "1"),
        ("processes", "8"),
        ("socket", "127.0.0.1:3033"),
        ("post-buffering", "4096"),
        ("chdir", "/opt/railsapp001"),
    )


def test_native_ini() -> None:
    section = parse("app.ini", NATIVE_INI).section("vassal")
    assert section == Section(
        "vassal", (("command", "gunicorn app:app"), ("env", "A=1"), ("env", "B=2"))
    )
    assert section.get_all("env") == ("A=1", "B=2")


def test_native_yaml() -> None:
    assert parse("app.yaml", NATIVE_YAML) == one_section(
        "vassal",
        ("command", "python3"),
        ("command", "-m"),
        ("command", "http.server"),
        ("env", "A=1"),
    )


def test_native_json() -> None:
    text = '{"vassal": {"command": ["python3", "-m", "http.server"], "env": "A=1"}}'
    assert parse("app.json", text) == parse("app.yaml", NATIVE_YAML)
    assert parse("app.js", text) == parse("app.yaml", NATIVE_YAML)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("app.ini", "[uwsgi]\nenv = A=1\nmaster = true\nenv = B=2\n"),
        ("app.xml", "<uwsgi><env>A=1</env><master/><env>B=2</env></uwsgi>"),
        ("app.yaml", "uwsgi:\n  env: A=1\n  master: true\n  env: B=2\n"),
        ("app.json", '{"uwsgi": {"env": "A=1", "master": true, "env": "B=2"}}'),
    ],
)
def test_repeated_keys_accumulate(name: str, text: str) -> None:
    section = parse(name, text).section("uwsgi")
    assert section is not None
    assert section.entries == (("env", "A=1"), ("master", "true"), ("env", "B=2"))
    assert section.get_all("env") == ("A=1", "B=2")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("app.ini", "[uwsgi]\nmaster = true\n[other]\nx = 1\n[uwsgi]\nenv = A=1\n"),
        ("app.yaml", "uwsgi: {master: true}\nother: {x: 1}\nuwsgi: {env: A=1}\n"),
        ("app.json", '{"uwsgi": {"master": true}, "other": {"x": 1}, "uwsgi": {"env": "A=1"}}'),
    ],
)
def test_repeated_sections_merge_into_the_first(name: str, text: str) -> None:
    assert parse(name, text) == Options(
        (
            Section("uwsgi", (("master", "true"), ("env", "A=1"))),
            Section("other", (("x", "1"),)),
        )
    )


def test_section_and_options_accessors() -> None:
    section = Section("s", (("a", "1"), ("b", "2"), ("a", "3")))
    assert section.get("a") == "3"
    assert section.get("missing") is None
    assert section.get("missing", "x") == "x"
    assert section.get_all("a") == ("1", "3")
    assert section.get_all("missing") == ()
    assert section.keys() == ("a", "b")
    assert "b" in section
    assert "c" not in section
    assert 1 not in section
    options = Options((section, Section("t", ())))
    assert options.section("t") == Section("t", ())
    assert options.section("u") is None
    assert "s" in options
    assert "u" not in options


# INI ---------------------------------------------------------------------------


def test_ini_comments_flags_and_raw_values() -> None:
    text = (
        "\ufeff# leading comment\n"
        "; another\n"
        "\n"
        "  [ uwsgi ]  \n"
        "   # indented comment\n"
        "master\n"
        "  socket   =   /tmp/%n.sock  \n"
        "env = PATH=$(PATH):/opt/bin # not a comment\n"
        "empty =\n"
        "quoted = 'x' \"y\"\n"
    )
    assert parse_ini("app.ini", text) == one_section(
        "uwsgi",
        ("master", "true"),
        ("socket", "/tmp/%n.sock"),
        ("env", "PATH=$(PATH):/opt/bin # not a comment"),
        ("empty", ""),
        ("quoted", "'x' \"y\""),
    )


def test_ini_crlf() -> None:
    assert parse_ini("app.ini", "[uwsgi]\r\nmaster = true\r\n") == one_section(
        "uwsgi", ("master", "true")
    )


# XML ---------------------------------------------------------------------------


def test_xml_empty_elements_attributes_and_comments() -> None:
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<uwsgi id="ignored">\n'
        "  <!-- a comment -->\n"
        "  <master></master>\n"
        "  <vacuum>   </vacuum>\n"
        '  <socket proto="x">\n    127.0.0.1:3031\n  </socket>\n'
        "  <route>^/a&amp;b&lt;c&gt; last:</route>\n"
        "  <raw><![CDATA[<&>]]></raw>\n"
        "</uwsgi>\n"
    )
    assert parse_xml("app.xml", text) == one_section(
        "uwsgi",
        ("master", "true"),
        ("vacuum", "true"),
        ("socket", "127.0.0.1:3031"),
        ("route", "^/a&b<c> last:"),
        ("raw", "<&>"),
    )


# YAML and JSON -----------------------------------------------------------------


def test_yaml_scalars_are_strings_as_written() -> None:
    text = (
        "uwsgi:\n"
        "  master: true\n"
        "  vacuum: no\n"
        "  die-on-term: False\n"
        "  logto: ~\n"
        "  pidfile:\n"
        "  chmod-socket: 0660\n"
        "  harakiri: 1.50\n"
        "  quoted: 'true'\n"
        "  seconds: 1:30\n"
    )
    assert parse_yaml("app.yaml", text) == one_section(
        "uwsgi",
        ("master", "true"),
        ("vacuum", "false"),
        ("die-on-term", "false"),
        ("logto", ""),
        ("pidfile", ""),
        ("chmod-socket", "0660"),
        ("harakiri", "1.50"),
        ("quoted", "true"),
        ("seconds", "1:30"),
    )


def test_json_scalars_are_strings_as_written() -> None:
    text = '\ufeff{"uwsgi": {"a": true, "b": false, "c": null, "d": 1.50, "e": 4, "f": [1, "x"]}}'
    assert parse_json("app.json", text) == one_section(
        "uwsgi",
        ("a", "true"),
        ("b", "false"),
        ("c", ""),
        ("d", "1.50"),
        ("e", "4"),
        ("f", "1"),
        ("f", "x"),
    )


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_yaml, ""),
        (parse_yaml, "# only a comment\n"),
        (parse_yaml, "~"),
        (parse_json, "null"),
        (parse_json, "{}"),
    ],
)
def test_empty_documents(parser: Parser, text: str) -> None:
    assert parser("app", text) == Options(())


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_yaml, "vassal:\nuwsgi: {}\n"),
        (parse_json, '{"vassal": null, "uwsgi": {}}'),
        (parse_ini, "[vassal]\n[uwsgi]\n"),
    ],
)
def test_empty_sections(parser: Parser, text: str) -> None:
    assert parser("app", text) == Options((Section("vassal", ()), Section("uwsgi", ())))


def test_yaml_list_of_one_and_of_none() -> None:
    text = "uwsgi:\n  env: [A=1]\n  plugins: []\n  master: true\n"
    assert parse_yaml("app.yaml", text) == one_section("uwsgi", ("env", "A=1"), ("master", "true"))


# format_of and parse -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("app.ini", "ini"),
        ("/etc/vassals/app.xml", "xml"),
        ("app.yml", "yaml"),
        ("app.yaml", "yaml"),
        ("app.json", "json"),
        ("app.js", "json"),
        ("app.d/x.ini", "ini"),
        ("APP.INI", None),
        ("app.Yaml", None),
        ("app.ini~", None),
        ("app.ini.bak", None),
        ("app.cfg", None),
        ("ini", None),
        ("", None),
    ],
)
def test_format_of(name: str, fmt: Format | None) -> None:
    assert format_of(name) == fmt


@pytest.mark.parametrize(
    ("name", "extensions", "fmt"),
    [
        ("app.cfg", ["cfg"], "ini"),
        ("app.cfg", [".cfg"], "ini"),
        ("app.conf", ["cfg", "conf"], "ini"),
        ("app.xcfg", ["cfg"], None),
        ("cfg", ["cfg"], None),
        ("app.CFG", ["cfg"], None),
        ("app.json", ["json"], "json"),
        ("app.", ["", "."], None),
    ],
)
def test_format_of_extra_extensions(name: str, extensions: list[str], fmt: Format | None) -> None:
    assert format_of(name, extensions) == fmt


def test_parse_by_extra_extension() -> None:
    assert parse("app.cfg", NATIVE_INI, ["cfg"]) == parse("app.ini", NATIVE_INI)


def test_parse_unknown_format() -> None:
    with pytest.raises(ConfigError, match=r"^app\.ini~: unknown format"):
        parse("app.ini~", NATIVE_INI)


# Broken input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("app.ini", "master = true\n[uwsgi]\n", "app.ini:1: "),
        ("app.ini", "# comment\n\nmaster = true\n", "app.ini:3: "),
        ("app.ini", "[uwsgi]\nmaster = true\n\n= 2\n", "app.ini:4: "),
        ("app.ini", "[uwsgi]\nmaster = true\n[oops\n", "app.ini:3: "),
        ("app.ini", "[uwsgi]\n[uwsgi] ; comment\n", "app.ini:2: "),
        ("app.ini", "[uwsgi]\n[ ]\n", "app.ini:2: "),
        ("app.xml", "<uwsgi>\n  <master/>\n  <socket>x</sockt>\n</uwsgi>\n", "app.xml:3:14: "),
        ("app.xml", "<uwsgi>\n  <a>&bogus;</a>\n</uwsgi>\n", "app.xml:2:6: "),
        ("app.xml", "<uwsgi>\n  <master/>\n", "app.xml:3:1: "),
        ("app.xml", "", "app.xml:1:1: "),
        ("app.xml", "<uwsgi/>\n<uwsgi/>\n", "app.xml:2:1: "),
        ("app.xml", "<uwsgi>\n  <a>\ud800</a>\n</uwsgi>\n", "app.xml:2:6: "),
        ("app.yaml", "uwsgi:\n  master: true\n socket: x\n", "app.yaml:3:2: "),
        ("app.yaml", "uwsgi:\n  env: [A=1, B=2\n", "app.yaml:3:1: "),
        ("app.yaml", "uwsgi:\n  env: *nope\n", "app.yaml:2:8: "),
        ("app.yaml", "uwsgi:\n  env: a\x07\n", "app.yaml:2:9: "),
        ("app.yaml", "uwsgi: {}\n---\nother: {}\n", "app.yaml:2:1: "),
        # (a trailing comma is reported at different places by Python 3.11 and 3.13)
        ("app.json", '{"uwsgi": {\n  "master": true\n  "x": 1}}', "app.json:3:3: "),
        ("app.json", '{"uwsgi":\n  {"master": }}', "app.json:2:14: "),
        ("app.json", "", "app.json:1:1: "),
        ("app.json", '\ufeff{"uwsgi" {}}', "app.json:1:11: "),
    ],
)
def test_syntax_errors_name_the_line(name: str, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(name, text)
    assert str(info.value).startswith(where)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("app.yaml", "- uwsgi\n", "app.yaml:1:1: the top level must map"),
        ("app.yaml", "uwsgi: 3\n", "app.yaml:1:8: section 'uwsgi' must map"),
        ("app.yaml", "uwsgi:\n  env:\n    A: 1\n", "app.yaml:3:5: section 'uwsgi', option 'env'"),
        ("app.yaml", "uwsgi:\n  env: [A=1, [B]]\n", "app.yaml:2:14: section 'uwsgi', option 'env'"),
        ("app.yaml", "uwsgi:\n  env: [{A: 1}]\n", "app.yaml:2:9: section 'uwsgi', option 'env'"),
        ("app.yaml", "uwsgi:\n  [a]: 1\n", "app.yaml:2:3: an option name in section 'uwsgi'"),
        ("app.yaml", "uwsgi:\n  '': 1\n", "app.yaml:2:3: empty option name"),
        ("app.yaml", "'': {}\n", "app.yaml:1:1: empty section name"),
        (
            "app.yaml",
            "uwsgi:\n  env: !!binary aGk=\n",
            "app.yaml:2:8: section 'uwsgi', option 'env'",
        ),
        ("app.yaml", "uwsgi:\n  env: !!bool maybe\n", "app.yaml:2:8: the value is not a boolean"),
        ("app.yaml", "uwsgi: !!set {a}\n", "app.yaml:1:8: unsupported tag"),
        ("app.json", "[]", "app.json: the top level must map"),
        ("app.json", '"uwsgi"', "app.json: the top level must map"),
        ("app.json", '{"uwsgi": []}', "app.json: section 'uwsgi' must map"),
        ("app.json", '{"uwsgi": {"env": {"A": 1}}}', "app.json: section 'uwsgi', option 'env'"),
        ("app.json", '{"uwsgi": {"env": ["A=1", []]}}', "app.json: section 'uwsgi', option 'env'"),
        ("app.json", '{"uwsgi": {"": 1}}', "app.json: empty option name"),
        ("app.json", "[" * 100_000, "app.json: nested too deeply"),
        ("app.xml", "<uwsgi><env><A>1</A></env></uwsgi>", "app.xml: <env> holds elements"),
    ],
)
def test_shape_errors_name_the_section_and_key(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(name, text)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "text",
    [
        # billion laughs
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
        ' <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">\n]>\n'
        "<uwsgi><a>&lol2;</a></uwsgi>\n",
        # external entity
        '<?xml version="1.0"?>\n<!DOCTYPE uwsgi [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        "<uwsgi><a>&xxe;</a></uwsgi>\n",
        '<?xml version="1.0"?>\n<!doctype uwsgi>\n<uwsgi/>\n',
    ],
)
def test_xml_refuses_doctype(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^app\.xml:2:1: DOCTYPE and ENTITY"):
        parse_xml("app.xml", text)


# dump ----------------------------------------------------------------------------


def test_dump_ini() -> None:
    options = Options(
        (
            Section("uwsgi", (("master", "true"), ("env", "A=1"), ("pidfile", ""))),
            Section("empty", ()),
        )
    )
    assert dump(options, "ini") == ("[uwsgi]\nmaster = true\nenv = A=1\npidfile =\n\n[empty]\n")


def test_dump_xml() -> None:
    options = one_section("uwsgi", ("master", "true"), ("route", "a&b <c>]]>\r\nd"))
    text = dump(options, "xml")
    assert text == (
        "<uwsgi>\n"
        "    <master>true</master>\n"
        "    <route>a&amp;b &lt;c&gt;]]&gt;&#13;\nd</route>\n"
        "</uwsgi>\n"
    )
    assert parse_xml("app.xml", text) == options
    assert parse_xml("app.xml", dump(parse("app.xml", UWSGI_XML), "xml")) == parse(
        "app.xml", UWSGI_XML
    )


def test_dump_yaml_quotes_what_is_not_a_plain_string() -> None:
    options = one_section(
        "vassal", ("command", "python3"), ("command", "-m"), ("master", "true"), ("n", "")
    )
    assert dump(options, "yaml") == (
        "vassal:\n  command:\n  - python3\n  - -m\n  master: 'true'\n  n: ''\n"
    )


def test_dump_json() -> None:
    options = Options(
        (
            Section("vassal", (("command", "python3"), ("command", "-m"), ("n", "é"))),
            Section("empty", ()),
        )
    )
    assert dump(options, "json") == (
        '{\n  "vassal": {\n    "command": ["python3", "-m"],\n    "n": "é"\n  },\n'
        '  "empty": {}\n}\n'
    )


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_dump_interleaved_keys_repeats_them(fmt: Format) -> None:
    options = one_section("uwsgi", ("route", "a"), ("route-run", "b"), ("route", "c"))
    assert parse(f"app.{fmt}", dump(options, fmt)) == options


@pytest.mark.parametrize(
    ("options", "fmt"),
    [
        (Options((Section("a", ()), Section("a", ()))), "ini"),
        (Options((Section("", ()),)), "yaml"),
        (one_section("a", ("", "x")), "json"),
        (one_section("a", ("k", "two\nlines")), "ini"),
        (one_section("a", ("k", "cr\rcr")), "ini"),
        (one_section("a", ("k", " padded")), "ini"),
        (one_section("a", ("k=v", "x")), "ini"),
        (one_section("a", ("#k", "x")), "ini"),
        (one_section("a", ("[k", "x")), "ini"),
        (one_section(" a", ("k", "x")), "ini"),
        (Options(()), "xml"),
        (Options((Section("a", ()), Section("b", ()))), "xml"),
        (one_section("a", ("k", "")), "xml"),
        (one_section("a", ("k", "x ")), "xml"),
        (one_section("a", ("k", "nul\x00")), "xml"),
        (one_section("a", ("1k", "x")), "xml"),
        (one_section("a", ("ns:k", "x")), "xml"),
        (one_section("a b", ("k", "x")), "xml"),
        (one_section("a", ("k", "x")), "toml"),
    ],
)
def test_dump_refuses_what_would_not_read_back(options: Options, fmt: Format) -> None:
    with pytest.raises(ValueError, match=r"cannot|XML holds|unknown format"):
        dump(options, fmt)


# Properties ----------------------------------------------------------------------


def options_of(
    names: st.SearchStrategy[str], keys: st.SearchStrategy[str], values: st.SearchStrategy[str]
) -> st.SearchStrategy[Options]:
    """Options with up to three distinct sections; a few common keys so that keys repeat."""
    entries = st.lists(st.tuples(st.sampled_from(["env", "a"]) | keys, values), max_size=6)
    sections = st.lists(st.tuples(names, entries), max_size=3, unique_by=lambda s: s[0])
    return sections.map(lambda ss: Options(tuple(Section(n, tuple(e)) for n, e in ss)))


_ini_line = st.text(st.characters(exclude_characters="\n\r")).map(str.strip)
_ini_key = st.text(st.characters(exclude_characters="\n\r=")).map(str.strip)
INI_OPTIONS = options_of(
    _ini_line.filter(bool), _ini_key.filter(lambda k: k != "" and k[0] not in "#;["), _ini_line
)

_xml_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9._-]{0,8}", fullmatch=True)
_xml_illegal = "".join(map(chr, [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xFFFE, 0xFFFF]))
_xml_value = (
    st.text(st.characters(codec="utf-8", exclude_characters=_xml_illegal))
    .map(str.strip)
    .filter(bool)
)
XML_OPTIONS = st.builds(
    lambda name, entries: one_section(name, *entries),
    _xml_name,
    st.lists(st.tuples(st.sampled_from(["env", "a"]) | _xml_name, _xml_value), max_size=6),
)

ANY_OPTIONS = options_of(st.text(min_size=1), st.text(min_size=1), st.text())


@given(INI_OPTIONS)
def test_ini_round_trip(options: Options) -> None:
    assert parse_ini("app.ini", dump(options, "ini")) == options


@given(XML_OPTIONS)
def test_xml_round_trip(options: Options) -> None:
    assert parse_xml("app.xml", dump(options, "xml")) == options


@given(ANY_OPTIONS)
def test_yaml_round_trip(options: Options) -> None:
    assert parse_yaml("app.yaml", dump(options, "yaml")) == options


@given(ANY_OPTIONS)
def test_json_round_trip(options: Options) -> None:
    assert parse_json("app.json", dump(options, "json")) == options


# Characters that make up the syntax of the four formats, to reach past the first line.
SYNTAX = st.text(st.sampled_from(list("[]=#;<>/!&{}:,-'\"?*|~ \t\nab01")))


@pytest.mark.parametrize("parser", [parse_ini, parse_xml, parse_yaml, parse_json])
@settings(max_examples=200)
@given(text=st.text() | SYNTAX)
def test_parsers_fail_only_with_config_error(parser: Parser, text: str) -> None:
    try:
        options = parser("fuzz.cfg", text)
    except ConfigError as exc:
        error = str(exc)
    else:
        assert isinstance(options, Options)
        return
    assert error.startswith("fuzz.cfg")  # the error names the file


def test_yaml_aliases_are_refused() -> None:
    # A few kilobytes of aliases can stand for gigabytes of options.
    items = ", ".join(["x"] * 3000)
    bomb = "\n".join(["vassal:", f"  a: &l [{items}]", *(f"  k{i}: *l" for i in range(1500))])
    with pytest.raises(ConfigError, match=r"^x.yaml:3:7: aliases \(\*name\) are not supported"):
        parse("x.yaml", bomb)
    # An anchor alone is harmless.
    assert parse("x.yaml", "vassal:\n  a: &l [1, 2]\n").section("vassal") is not None


@pytest.mark.parametrize(
    "text",
    [
        "vassal:\n  command: !!bool hunter2\n",
        "vassal:\n  command: !hunter2 x\n",
        "vassal:\n  command: *hunter2\n",
        "vassal: !hunter2\n  command: x\n",
    ],
)
def test_yaml_errors_never_quote_the_document(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse("a.yaml", text)
    assert "hunter2" not in str(info.value)
