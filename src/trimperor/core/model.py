"""Values that flow between the layers: vassal documents and source events.

Monitors turn the outside world into :data:`SourceEvent` values and send them to
the emperor's inbox. Events are *level-triggered*: besides single upserts and
removals, a monitor sends a full :class:`Snapshot` of what it owns after every
(re)connect or rescan, and the emperor diffs. A lost notification therefore
heals at the next snapshot, and a source that cannot be reached sends nothing
(rather than an empty snapshot), so it never means "everything was deleted".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "VALID_EXTENSIONS",
    "Remove",
    "Snapshot",
    "SourceEvent",
    "SourceProblem",
    "Upsert",
    "VassalDocument",
    "describe_version",
    "is_valid_name",
    "remote_name_problem",
]

#: File name endings that make a configuration, as uWSGI defines them.
VALID_EXTENSIONS: tuple[str, ...] = (".ini", ".xml", ".yml", ".yaml", ".json", ".js")

#: Names must be shorter than this many bytes (uWSGI's limit).
MAX_NAME_BYTES = 255


def is_valid_name(name: str, extra_extensions: Iterable[str] = ()) -> bool:
    """Whether *name* is a vassal configuration name.

    The match is on the end of the name and case-sensitive; editor leftovers
    such as ``app.ini~`` or ``.app.ini.swp`` therefore do not match.
    """
    if not name:
        return False
    # A character is at most 4 bytes encoded: most names need no encoding to tell
    # (the directory monitors ask this of every file, every rescan).
    if len(name) * 4 >= MAX_NAME_BYTES and len(os.fsencode(name)) >= MAX_NAME_BYTES:
        return False
    endings = VALID_EXTENSIONS
    extra = tuple(extra_extensions)
    if extra:
        endings += tuple(map(normalize_extension, extra))
    return name.endswith(endings)


def normalize_extension(ext: str) -> str:
    """``ini`` and ``.ini`` both mean ``.ini``."""
    return ext if ext.startswith(".") else "." + ext


def remote_name_problem(name: str, extra_extensions: Iterable[str] = ()) -> str | None:
    """Why *name*, received from a remote source, is not a vassal name (None if it is).

    Besides :func:`is_valid_name`, a remote name must not be able to point
    anywhere in the file system: no ``/``, no NUL, not ``.`` or ``..``.
    """
    if not name:
        return "empty name"
    if "/" in name or "\0" in name:
        return f"name {name!r} contains '/' or NUL"
    if name in {".", ".."}:
        return f"name {name!r} is not allowed"
    if len(os.fsencode(name)) >= MAX_NAME_BYTES:
        return f"name is {len(os.fsencode(name))} bytes long (the limit is {MAX_NAME_BYTES - 1})"
    if not is_valid_name(name, extra_extensions):
        return f"name {name!r} does not end in a configuration extension"
    return None


#: A file source's version: ``mtime_ns:inode:size:uid:gid``, then what follows.
_FILE_VERSION = re.compile(r"(\d+):(\d+):(\d+):(\d+):(\d+)(?::(.*))?", re.DOTALL)


def describe_version(version: str) -> str:
    """A version as a person reads it: a file's is ``mtime=... size=...``
    (UTC, to the millisecond) instead of its raw stat fields; any other
    source's version is shown as it is."""
    m = _FILE_VERSION.fullmatch(version)
    if m is None:
        return version
    mtime_ns, _, size, _, _, rest = m.groups()
    import datetime  # here: only stats need it, and it costs half a MB of RSS

    try:
        when = datetime.datetime.fromtimestamp(int(mtime_ns) / 1e9, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return version
    text = f"mtime={when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')} size={size}"
    if rest == "unreadable":
        text += " unreadable"
    elif rest:
        text += f" socket={rest}"
    return text


@dataclass(frozen=True, slots=True)
class VassalDocument:
    """One vassal configuration as a source sees it, before it is parsed.

    ``version`` is opaque: any change of it (a new mtime, a new row timestamp,
    a new message) means "this configuration changed, reload the vassal".
    ``text`` is the configuration itself; ``path`` is where it lives on disk,
    if it does (uWSGI vassals read their file themselves). ``error`` is set,
    and ``text`` is None, when the source saw the name but could not read it.
    ``in_own_dir``: a uWSGI vassal runs in the directory of its file (as uWSGI
    runs a ``dir://`` vassal), not in the emperor's working directory.
    """

    name: str
    source: str
    version: str
    text: str | None
    path: str | None = None
    error: str | None = None
    uid: int | None = None
    gid: int | None = None
    socket: str | None = None
    in_own_dir: bool = False


@dataclass(frozen=True, slots=True)
class Upsert:
    """A vassal configuration appeared or changed."""

    doc: VassalDocument

    @property
    def source(self) -> str:
        return self.doc.source


@dataclass(frozen=True, slots=True)
class Remove:
    """The source no longer offers this name."""

    source: str
    name: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the source offers right now; names it owned and left out are gone."""

    source: str
    docs: tuple[VassalDocument, ...]


@dataclass(frozen=True, slots=True)
class SourceProblem:
    """The source could not be read; nothing it owns is touched."""

    source: str
    message: str


SourceEvent = Upsert | Remove | Snapshot | SourceProblem
