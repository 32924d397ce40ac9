"""Frozen snapshots of the emperor's state, and their JSON form.

The stats server serialises these; it never sees a live object.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields

from trimperor.core.model import describe_version

__all__ = [
    "DocumentCache",
    "EmperorStats",
    "FleetStats",
    "SourceStats",
    "VassalStats",
    "document",
    "to_json",
]


@dataclass(frozen=True, slots=True)
class VassalStats:
    name: str
    source: str
    kind: str
    state: str
    pid: int | None
    started_at: float | None
    """Unix time of the current process's start."""
    restarts: int
    """Processes started after the first one (crashes, reloads)."""
    backoff_attempt: int
    next_start: float | None
    """Unix time of the next scheduled start, while waiting in backoff."""
    last_exit_code: int | None
    last_exit_signal: str | None
    config_version: str
    reloads: int = 0
    backoff_delay: float = 0.0
    """Seconds: the respawn delay the backoff chose after the last early death."""
    last_error: str | None = None
    ready: bool = False
    """uWSGI vassals: the vassal said it is ready (byte 1)."""
    no_app: bool = False
    """uWSGI vassals: the vassal printed "no app loaded": it runs but serves no application."""
    accepting: bool = False
    loyal: bool = False
    last_heartbeat: float | None = None
    # The rest exists for uWSGI's stats shape; all Unix times.
    born: float | None = None
    last_run: float | None = None
    last_mod: float | None = None
    last_ready: float | None = None
    last_accepting: float | None = None
    last_loyal: float | None = None
    cursed: float | None = None
    """When the vassal was asked to stop, while it is stopping."""
    uid: str | None = None
    gid: str | None = None
    on_demand: str = ""
    sockets: tuple[tuple[str, str], ...] = ()
    """(address, state): ``armed``, ``handed over`` or ``sleeping``."""
    wakes: int = 0
    last_wake: float | None = None
    first_accept: float | None = None
    """Seconds from the waking connection to the vassal's first accept (TCP)."""
    notify_ready: bool = False
    """The vassal sent sd_notify's READY=1."""
    notify_status: str | None = None
    last_watchdog: float | None = None
    held: bool = False
    health: str | None = None
    """With health checks: ``healthy``, ``failing`` or ``unhealthy`` (None before the first)."""
    """Stopped by ``trimperor ctl stop``: stays stopped until started or its config changes."""


@dataclass(frozen=True, slots=True)
class SourceStats:
    uri: str
    state: str
    """``connected`` (or ``watching``), ``retrying``, ``gone``..."""
    vassals: int
    last_ok: float | None = None
    """Unix time of the last successful read."""
    last_error: str | None = None
    retry_attempt: int = 0
    next_retry: float | None = None
    session: str | None = None
    """zoo://: the ZooKeeper session id."""
    last_event: float | None = None
    """zoo://: Unix time of the last state change or watch notification."""
    pending: tuple[tuple[str, float], ...] = ()
    """(what, since): operations in progress (``fetch URL``) and the Unix time each began."""


@dataclass(frozen=True, slots=True)
class FleetStats:
    """This node's view of the fleet (``--cluster``)."""

    uri: str
    node: str
    labels: tuple[tuple[str, str], ...]
    state: str
    """``joining`` (no lease yet), ``member`` or ``fenced`` (renewals failing)."""
    lease: str | None
    ttl: float
    nodes: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    """The live nodes as this node sees them, with their labels."""
    placement: tuple[tuple[str, tuple[str, ...]], ...]
    """Each vassal and the nodes it is placed on."""
    here: tuple[str, ...]
    """The vassals placed on this node and allowed to run here now (its share)."""


@dataclass(frozen=True, slots=True)
class EmperorStats:
    pid: int
    version: str
    sources: tuple[SourceStats, ...]
    uptime: float
    vassals: tuple[VassalStats, ...]
    uid: int = 0
    gid: int = 0
    cwd: str = "/"
    tyrant: bool = False
    fleet: FleetStats | None = None


def _secs(t: float | None) -> int:
    return int(t) if t is not None else 0


def _id(value: str | None) -> int:
    return int(value) if value is not None and value.isdigit() else 0


_VASSAL_FIELDS = tuple(f.name for f in fields(VassalStats))
#: uWSGI's keys that are also fields (given uWSGI's values), then the other fields
#: in their order, read in one call (the fields are flat: no copy needed, as asdict's).
_UWSGI_KEYS = frozenset(
    [
        "id",
        "pid",
        "born",
        "last_mod",
        "last_heartbeat",
        "loyal",
        "ready",
        "accepting",
        "last_loyal",
        "last_ready",
        "last_accepting",
        "first_run",
        "last_run",
        "cursed",
        "zerg",
        "on_demand",
        "uid",
        "gid",
        "monitor",
        "respawns",
    ]
)
_OTHER_FIELDS = tuple(k for k in _VASSAL_FIELDS if k not in _UWSGI_KEYS)
_other_fields = operator.attrgetter(*_OTHER_FIELDS)


def vassal_doc(v: VassalStats) -> dict[str, object]:
    """One vassal: uWSGI's emperor stats keys (in its order), then trimperor's."""
    doc: dict[str, object] = {
        "id": v.name,
        "pid": v.pid if v.pid is not None else -1,
        "born": _secs(v.born),
        "last_mod": _secs(v.last_mod),
        "last_heartbeat": _secs(v.last_heartbeat),
        "loyal": int(v.loyal),
        "ready": int(v.ready),
        "accepting": int(v.accepting),
        "last_loyal": _secs(v.last_loyal),
        "last_ready": _secs(v.last_ready),
        "last_accepting": _secs(v.last_accepting),
        "first_run": _secs(v.born),
        "last_run": _secs(v.last_run),
        "cursed": _secs(v.cursed),
        "zerg": 0,
        "on_demand": v.on_demand,
        "uid": _id(v.uid),
        "gid": _id(v.gid),
        "monitor": v.source,
        "respawns": v.restarts,
    }
    doc.update(zip(_OTHER_FIELDS, _other_fields(v), strict=True))
    doc["config_version_text"] = describe_version(v.config_version)
    doc["sockets"] = [{"address": a, "state": st} for a, st in v.sockets]
    return doc


#: Encodes a dict of scalars on one line, its items separated by a NUL: JSON
#: escapes every control character inside strings, so each NUL is a separator.
#: The C encoder does it; ``indent`` would take the pure-Python one, ~10x slower.
_FLAT = json.JSONEncoder(separators=("\0", ": "))
_SOCKETS = '\0"sockets": 0\0'
"""The ``sockets`` item's place holder (the key appears once, and a quote inside a
string is escaped, so nothing else encodes to this)."""


def _flat_lines(d: dict[str, object], pad: str) -> str:
    """*d*'s items, one per line at *pad* (``indent=2``'s text between the braces)."""
    return pad + _FLAT.encode(d)[1:-1].replace("\0", "," + pad)


def vassal_part(v: VassalStats) -> bytes:
    """The vassal's part of the document: ``json.dumps(vassal_doc(v), indent=2)``
    with every line but the first 4 spaces in (its place in ``vassals``), exactly,
    made by the C encoder (the first document at 10,000 vassals makes 10,000)."""
    doc = vassal_doc(v)
    sockets = doc["sockets"]
    assert isinstance(sockets, list)
    doc["sockets"] = 0
    before, _, after = _FLAT.encode(doc)[1:-1].partition(_SOCKETS)
    pad = "\n      "
    if sockets:
        items = ",\n        ".join(
            "{" + _flat_lines(s, "\n          ") + "\n        }" for s in sockets
        )
        listed = "[\n        " + items + "\n      ]"
    else:
        listed = "[]"
    sep = "," + pad
    text = (
        "{"
        + pad
        + before.replace("\0", sep)
        + sep
        + '"sockets": '
        + listed
        + sep
        + after.replace("\0", sep)
        + "\n    }"
    )
    return text.encode()


def _head(stats: EmperorStats) -> dict[str, object]:
    """The document's keys before ``vassals``."""
    return {
        "version": stats.version,
        "pid": stats.pid,
        "uid": stats.uid,
        "gid": stats.gid,
        "cwd": stats.cwd,
        "emperor": [s.uri for s in stats.sources],
        "emperor_tyrant": int(stats.tyrant),
        "throttle_level": 0,
    }


def _tail(
    stats: EmperorStats, in_backoff: Iterable[VassalStats] | None = None
) -> dict[str, object]:
    """The document's keys after ``vassals`` (*in_backoff*: those of them with a backoff)."""
    doc: dict[str, object] = {
        "blacklist": [
            {
                "id": v.name,
                "throttle_level": round(max(0.0, v.backoff_delay) * 1000),
                "attempt": v.backoff_attempt,
                "first_attempt": _secs(v.born),
                "last_attempt": _secs(v.last_run),
            }
            for v in (stats.vassals if in_backoff is None else in_backoff)
            if v.backoff_attempt
        ],
        "uptime": round(stats.uptime, 3),
        "sources": [asdict(s) for s in stats.sources],
    }
    if stats.fleet is not None:
        f = stats.fleet
        doc["fleet"] = {
            "uri": f.uri,
            "node": f.node,
            "labels": dict(f.labels),
            "state": f.state,
            "lease": f.lease,
            "ttl": f.ttl,
            "nodes": [{"name": n, "labels": dict(labels)} for n, labels in f.nodes],
            "placement": {name: list(where) for name, where in f.placement},
            "here": list(f.here),
        }
    return doc


def document(stats: EmperorStats) -> dict[str, object]:
    """The stats document as one dict (what :func:`to_json` serialises)."""
    return {**_head(stats), "vassals": [vassal_doc(v) for v in stats.vassals], **_tail(stats)}


def to_json(stats: EmperorStats) -> str:
    """The stats document: a superset of uWSGI's emperor stats, valid JSON.

    uWSGI's keys come first and keep their meaning (``pid`` is -1 for a vassal
    with no process, times are integer Unix seconds, flags are 0 or 1), so
    tools written for ``uwsgi --emperor-stats`` keep working; trimperor's own
    keys follow. :class:`DocumentCache` makes the same text, faster.
    """
    return json.dumps(document(stats), indent=2) + "\n"


#: Vassals per piece: :meth:`DocumentCache.chunks` joins this many parts at a time.
BLOCK = 128
_SEP = b",\n    "


class Pieces:
    """A stats document as byte strings, its runs of vassals joined as they are
    iterated (each time: several clients may be sent the same document)."""

    __slots__ = ("_block", "_head", "_parts", "_tail")

    def __init__(self, head: bytes, parts: list[bytes], tail: bytes, block: int) -> None:
        self._head, self._parts, self._tail, self._block = head, parts, tail, block

    def __iter__(self) -> Iterator[bytes]:
        head, parts, tail = self._head, self._parts, self._tail
        if not parts:
            yield from (head[:-2], b',\n  "vassals": [],\n', tail[2:], b"\n")
            return
        yield head[:-2]
        yield b',\n  "vassals": [\n    '
        for i in range(0, len(parts), self._block):
            yield (b"" if i == 0 else _SEP) + _SEP.join(parts[i : i + self._block])
        yield from (b"\n  ],\n", tail[2:], b"\n")


class DocumentCache:
    """The stats document, kept between requests and patched where vassals changed.

    It holds each vassal's snapshot and JSON part (the very text :func:`to_json`
    puts in the document), in name order. :meth:`put` and :meth:`drop` are
    told about the vassals that changed (the emperor learns it from the
    supervisors, without asking the others); a part is made again only when
    its snapshot differs from the one it was made from. :meth:`chunks` then
    gives the document as a few dozen byte strings (the head, runs of
    :data:`BLOCK` parts joined as they are sent, the tail): a document for
    10,000 vassals of which a few changed costs those few parts, and the
    document is never kept whole. :meth:`encode` makes it from a whole
    :class:`EmperorStats` and gives exactly :func:`to_json`'s text, as bytes.
    """

    def __init__(self, block: int = BLOCK) -> None:
        self._block = block
        self._parts: dict[str, tuple[VassalStats, bytes]] = {}
        self._order: list[str] = []
        """The names in document order; re-sorted when names come or go."""
        self._reorder = False
        self._index: dict[str, int] = {}
        self._snaps: list[VassalStats] = []
        """The snapshots in document order (while no names came or went since arranged)."""
        self._vassals: tuple[VassalStats, ...] | None = ()
        self._backoff: dict[str, VassalStats] = {}
        """The vassals with a backoff (the document's ``blacklist``)."""

    def __len__(self) -> int:
        return len(self._parts)

    def part(self, name: str) -> bytes | None:
        """The JSON part kept for the vassal *name*."""
        hit = self._parts.get(name)
        return hit[1] if hit is not None else None

    def put(self, v: VassalStats) -> None:
        """*v* is the vassal's snapshot now (it is new, or it may have changed)."""
        hit = self._parts.get(v.name)
        if hit is not None and (hit[0] is v or hit[0] == v):
            if hit[0] is not v:
                self._parts[v.name] = (v, hit[1])
                self._replace(v)
            return
        text = vassal_part(v)
        self._parts[v.name] = (v, text)
        if v.backoff_attempt:
            self._backoff[v.name] = v
        else:
            self._backoff.pop(v.name, None)
        if hit is None:
            self._reorder = True
            self._vassals = None
        elif not self._reorder:
            self._replace(v)

    def _replace(self, v: VassalStats) -> None:
        if not self._reorder:
            self._snaps[self._index[v.name]] = v
        self._vassals = None

    def drop(self, name: str) -> None:
        """The vassal *name* is gone."""
        self._backoff.pop(name, None)
        if self._parts.pop(name, None) is not None:
            self._reorder = True
            self._vassals = None

    def _arrange(self, order: list[str] | None = None) -> None:
        if order is None:
            if not self._reorder:
                return
            order = sorted(self._parts)
        if self._reorder or order != self._order:
            self._order = order
            self._index = {n: i for i, n in enumerate(order)}
            self._snaps = [self._parts[n][0] for n in order]
            self._vassals = None
        self._reorder = False

    def arrange(self) -> None:
        """Put the parts in document order, if names came or went since."""
        self._arrange()

    def vassals(self) -> tuple[VassalStats, ...]:
        """The snapshots, in document order (what :meth:`chunks` wants in its stats)."""
        self._arrange()
        if self._vassals is None:
            self._vassals = tuple(self._snaps)
        return self._vassals

    def chunks(self, stats: EmperorStats) -> Pieces:
        """The document, in pieces; *stats* holds :meth:`vassals` (its head and tail differ).

        The parts are taken now (changes meanwhile are the next document's);
        runs of :data:`BLOCK` of them are joined as the pieces are iterated, so
        the cache holds the parts once and never the whole document (10,000
        vassals: 12 MB less).
        """
        self._arrange()
        head = json.dumps(_head(stats), indent=2).encode()  # b"{\n  ...\n}"
        in_backoff = [self._backoff[n] for n in sorted(self._backoff, key=self._index.__getitem__)]
        tail = json.dumps(_tail(stats, in_backoff), indent=2).encode()
        return Pieces(head, [self._parts[n][1] for n in self._order], tail, self._block)

    def encode(self, stats: EmperorStats) -> bytes:
        """The document for *stats*, whatever the cache held before."""
        names = [v.name for v in stats.vassals]
        for gone in set(self._parts).difference(names):
            self.drop(gone)
        for v in stats.vassals:
            self.put(v)
        self._arrange(names)
        return b"".join(self.chunks(stats))
