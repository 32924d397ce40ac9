"""One copy of the strings many vassals have in common.

Ten thousand vassals made from one template have ten thousand copies of the same
interpreter path, the same arguments and often the same configuration text.
:func:`share` hands back the copy seen first, so that each is kept once.

Unlike :func:`sys.intern`, the table is bounded: strings (and argument vectors)
longer than :data:`MAX_SHARED_CHARS` are never kept, and once the table holds
:data:`MAX_TABLE_CHARS` characters it starts again empty (the strings already
shared stay shared by whoever holds them; only the table lets go). Whatever a
source sends, the table holds at most about that much, and a vassal that is
gone leaves at most its share of it behind until the next fresh start.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MAX_SHARED_CHARS", "MAX_TABLE_CHARS", "share", "share_all"]

#: Strings longer than this are not looked up (a configuration of a few lines is shorter).
MAX_SHARED_CHARS = 4096
#: The table starts again empty when it holds this many characters.
MAX_TABLE_CHARS = 1 << 20


class _Table:
    __slots__ = ("chars", "strings", "tuples")

    def __init__(self) -> None:
        self.strings: dict[str, str] = {}
        self.tuples: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.chars = 0

    def share(self, text: str) -> str:
        if len(text) > MAX_SHARED_CHARS:
            return text
        kept = self.strings.get(text)
        if kept is not None:
            return kept
        self._room(len(text))
        self.strings[text] = text
        return text

    def share_all(self, texts: Iterable[str]) -> tuple[str, ...]:
        words = tuple(map(self.share, texts))
        size = len(words) + sum(map(len, words))
        if size > MAX_SHARED_CHARS:
            return words
        kept = self.tuples.get(words)
        if kept is not None:
            return kept
        self._room(size)
        self.tuples[words] = words
        return words

    def _room(self, chars: int) -> None:
        # Threads may share (a monitor's scan runs in one): under the GIL the
        # worst a race does is miscount, and the bound stays approximate only.
        if self.chars + chars > MAX_TABLE_CHARS:
            self.strings.clear()
            self.tuples.clear()
            self.chars = 0
        self.chars += chars


_TABLE = _Table()


def share(text: str) -> str:
    """*text*, or an equal string seen before (the same object each time)."""
    return _TABLE.share(text)


def share_all(texts: Iterable[str]) -> tuple[str, ...]:
    """:func:`share` of each, as a tuple, itself shared (an argument vector)."""
    return _TABLE.share_all(texts)


def table_chars() -> int:
    """Characters the table holds now (for tests)."""
    return _TABLE.chars
