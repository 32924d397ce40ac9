"""The bounded table of strings many vassals share (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trimperor.core import shared
from trimperor.core.model import VassalDocument
from trimperor.core.shared import MAX_SHARED_CHARS, MAX_TABLE_CHARS, share, share_all
from trimperor.core.vassalspec import NativeSpec, build_spec


def fresh(text: str) -> str:
    """An equal string that is another object."""
    return "".join(list(text))


def test_equal_strings_come_back_as_one_object() -> None:
    a = fresh("/usr/bin/python3 -m gunicorn")
    b = fresh(a)
    assert a is not b
    assert share(a) is a
    assert share(b) is a
    words = share_all([fresh("gunicorn"), fresh("-w"), fresh("4")])
    again = share_all([fresh("gunicorn"), fresh("-w"), fresh("4")])
    assert again is words


def test_long_strings_are_not_kept() -> None:
    long = "x" * (MAX_SHARED_CHARS + 1)
    before = shared.table_chars()
    assert share(long) is long
    assert share(fresh(long)) is not long
    assert shared.table_chars() == before
    many = [fresh(f"w{i}") for i in range(MAX_SHARED_CHARS)]
    assert share_all(many) is not share_all(list(many))  # too long as a whole


@given(st.lists(st.text(min_size=1, max_size=200), max_size=50))
def test_the_table_stays_bounded_and_strings_stay_equal(texts: list[str]) -> None:
    for text in texts:
        assert share(text) == text
        assert shared.table_chars() <= MAX_TABLE_CHARS


def test_a_full_table_starts_again_empty() -> None:
    chunk = "y" * (MAX_SHARED_CHARS - 8)
    for i in range(MAX_TABLE_CHARS // len(chunk) + 2):
        share(f"{i:08d}{chunk}")
    assert shared.table_chars() <= MAX_TABLE_CHARS
    first = fresh(f"{0:08d}{chunk}")
    assert share(first) is first  # forgotten when the table started again


def test_specs_from_one_template_share_their_command_and_environment() -> None:
    text = "[vassal]\ncommand = /srv/venv/bin/gunicorn -w 4 app:%n\nenv = MODE=prod\n"
    a, b = (
        build_spec(VassalDocument(f"{n}.ini", "dir:///x", "1", fresh(text)), {}, cwd="/")
        for n in ("one", "two")
    )
    assert isinstance(a, NativeSpec)
    assert isinstance(b, NativeSpec)
    assert a.command[0] is b.command[0]
    assert a.command[-1] == "app:one"
    assert b.command[-1] == "app:two"
    assert a.env[0][1] is b.env[0][1]
