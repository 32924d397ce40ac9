"""Every parser and source decoder against hostile input.

For each decoder: no exception escapes but the one that means "bad input"
(which the caller turns into one log line), and no input of at most 64 KiB
costs more than 50 MB of memory or a second of CPU (timed without allocation
tracing, which slows Python several times). The bounds are far above what a
well-formed input costs (the slowest known hostile input takes about 0.15 s):
they catch amplification (alias bombs, quadratic loops), not slowness.
Generated inputs grow to the full 64 KiB by repeating a hostile fragment, since
that is how amplification attacks are built.

Inputs that would make a decoder reach outside (an amqp body naming a URL or
an absolute path) are left out: those paths have their own tests.

The examples per test are few by default, so that CI stays fast; ``nox -s
fuzz`` (``HYPOTHESIS_PROFILE=fuzz``) runs many more.
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trimperor.abc import MonitorOptions
from trimperor.core.configfile import parse
from trimperor.core.errors import ConfigError, Refused
from trimperor.core.model import SourceEvent, VassalDocument
from trimperor.core.uwsgi_protocol import decode_config, describe, encode_config
from trimperor.core.vassalspec import build_spec
from trimperor.monitors.amqp import AmqpMonitor, _Handler
from trimperor.monitors.mongodb import BadDocument, document_to_vassal
from trimperor.monitors.postgres import BadRow, row_document
from trimperor.monitors.zeromq import BadMessage, parse_command
from trimperor.vassals.notify import parse_message

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LIMIT = 64 * 1024
MAX_BYTES = 50 * 1024 * 1024
# Under coverage measurement (nox -s coverage) every line costs several times more.
MAX_CPU_SECONDS = 4.0 if "coverage" in sys.modules else 1.0
OPTIONS = MonitorOptions(max_config_size=LIMIT)


@contextmanager
def bounded(memory: bool = True) -> Iterator[None]:
    """Fail if the block burns more than a CPU second, or (with *memory*) allocates
    more than MAX_BYTES at once. Tracing allocations slows Python down several
    times, so :func:`expect_only` times one run without it and traces another."""
    if memory:
        tracemalloc.start()
    cpu = time.process_time()
    try:
        yield
    finally:
        spent = time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1] if memory else 0
        if memory:
            tracemalloc.stop()
    assert peak <= MAX_BYTES, f"{peak} bytes at peak"
    if not memory:
        assert spent <= MAX_CPU_SECONDS, f"{spent:.2f} s of CPU"


def amplified(fragment: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A text of up to 64 KiB: a prefix, then one fragment repeated."""

    def build(parts: tuple[str, str, int]) -> str:
        prefix, piece, times = parts
        return (prefix + piece * times)[: LIMIT // 4]  # characters; up to 4 bytes each

    return st.tuples(fragment, fragment, st.integers(0, 4000)).map(build)


# Pieces that mean something to at least one of the formats.
SYNTAX = st.sampled_from(
    [
        "[vassal]\n", "[uwsgi]\n", "command = x\n", "socket = :0\n", "env = A=$(HOME)\n",
        "<uwsgi>", "</uwsgi>", "<a>", "&amp;", "<!DOCTYPE x>", "<!ENTITY e 'x'>", "&e;",
        "vassal:\n", "  k: ", "&a ", "*a ", "[", "]", "{", "}", "- ", ": ", "<<: *a\n",
        "!!python/object:os.system ", '"', "'", "\\u0000", "%(x)s", "@(file)", "\x00", "\ufeff",
        "\n", "\r\n", "\t", " ", ",", "#", ";",
    ]
)  # fmt: skip
FRAGMENT = st.lists(st.one_of(SYNTAX, st.text(max_size=8)), max_size=12).map("".join)
NAMES = st.sampled_from(["a.ini", "a.xml", "a.yaml", "a.yml", "a.json", "a.js"])


def expect_only(*bad: type[BaseException]) -> Callable[..., Any]:
    """Run *fn* bounded; the only exceptions it may raise are *bad*."""

    def run(fn: Callable[..., Any], *args: Any) -> None:
        with bounded(memory=False), suppress(*bad):
            fn(*args)
        with bounded(memory=True), suppress(*bad):
            fn(*args)

    return run


ALIAS_BOMB = "\n".join(
    ["vassal:", "  a: &l [" + ", ".join(["x"] * 3000) + "]", *(f"  k{i}: *l" for i in range(1500))]
)
LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY l0 "ha">'
    + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    + "]><uwsgi><x>&l9;</x></uwsgi>"
)
KNOWN = [
    ("a.yaml", ALIAS_BOMB),
    ("a.xml", LAUGHS),
    ("a.yaml", "[" * 20000 + "]" * 20000),
    ("a.json", "[" * 30000 + "]" * 30000),
    ("a.json", '{"vassal": {' + ",".join(f'"k{i}": [1, 2]' for i in range(5000)) + "}}"),
    ("a.ini", "[vassal]\n" * 7000),
    ("a.ini", "[vassal]\nenv = " + "$(HOME)" * 9000 + "\n"),
    ("a.xml", "<uwsgi>" + "<a></a>" * 9000 + "</uwsgi>"),
]


def with_known(test: Callable[..., None]) -> Callable[..., None]:
    for name, text in KNOWN:
        test = example(name=name, text=text)(test)
    return test


@given(name=NAMES, text=amplified(FRAGMENT))
@with_known
def test_config_files(name: str, text: str) -> None:
    expect_only(ConfigError)(parse, name, text)


@given(name=NAMES, text=amplified(FRAGMENT))
@with_known
def test_vassal_specs(name: str, text: str) -> None:
    doc = VassalDocument(name, "fuzz://", "1", text, path=f"/srv/{name}")
    expect_only(ConfigError, Refused)(build_spec, doc, {"HOME": "/root"})


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["1e400", "Infinity", "-1", "NaN", "../x.ini", "a\n.ini", "a.ini"]),
)


@given(row=st.lists(st.one_of(SCALARS, amplified(FRAGMENT)), max_size=8))
def test_pg_rows(row: list[Any]) -> None:
    expect_only(BadRow)(row_document, row, "pg://fuzz", OPTIONS)


@given(
    raw=st.dictionaries(
        st.sampled_from(["name", "config", "ts", "uid", "gid", "socket", "_id", "x"]),
        st.one_of(SCALARS, amplified(FRAGMENT), st.lists(SCALARS, max_size=4)),
        max_size=8,
    )
)
def test_mongodb_documents(raw: dict[str, Any]) -> None:
    expect_only(BadDocument)(document_to_vassal, raw, "mongodb://fuzz", OPTIONS)


@given(frames=st.lists(st.one_of(st.binary(max_size=64), amplified(FRAGMENT).map(str.encode))))
def test_zmq_frames(frames: list[bytes]) -> None:
    expect_only(BadMessage)(parse_command, frames)


@given(data=st.binary(max_size=LIMIT))
def test_sd_notify_messages(data: bytes) -> None:
    with bounded(memory=False):
        parse_message(data)
    with bounded():
        fields = parse_message(data)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())


@given(frame=st.binary(max_size=LIMIT))
def test_uwsgi_config_frames(frame: bytes) -> None:
    expect_only(ValueError)(decode_config, frame)


@given(body=st.binary(min_size=1, max_size=0xFFFF))
def test_uwsgi_config_frames_round_trip(body: bytes) -> None:
    assert decode_config(encode_config(body)) == body


@pytest.mark.parametrize("byte", range(256))
def test_uwsgi_protocol_bytes(byte: int) -> None:
    assert isinstance(describe(byte), str)


ROUTING_KEYS = st.one_of(
    st.just(""),
    st.sampled_from(["a.ini", "../a.ini", "a/b.ini", "a.txt", ".ini", "a\n.ini", "a.yaml"]),
    st.text(max_size=40),
)
LOCAL_BODIES = (
    amplified(FRAGMENT).map(str.encode).filter(lambda b: not b.lstrip().startswith((b"/", b"http")))
)


@given(key=ROUTING_KEYS, body=st.one_of(LOCAL_BODIES, st.binary(max_size=4096)))
async def test_amqp_messages(key: str, body: bytes) -> None:
    if not key and body.lstrip().startswith((b"/", b"http")):
        return  # a locator: reads a file or fetches a URL (tests/test_monitor_amqp.py)
    send, recv = trio.open_memory_channel[SourceEvent](10)
    monitor = AmqpMonitor("amqp://127.0.0.1", OPTIONS)
    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery, recv:
        handler = _Handler(monitor, send, http, nursery)
        with bounded(memory=False):
            await handler.message(key, body)
        with bounded():
            await handler.message(key, body)
