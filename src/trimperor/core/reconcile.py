"""The emperor's bookkeeping as a sans-io state machine.

:class:`Registry` receives :data:`~trimperor.core.model.SourceEvent` values and
answers with the :data:`Action` values the emperor must carry out. It decides
who owns a name (the first source that offers it), whether a document changed
(its version), whether it parses, and whether the running vassal is started,
reloaded, kept on its last good configuration, or stopped. It does no I/O and
reads no clock, in the manner of h11's ``Connection``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from trimperor.core.errors import ConfigError, Refused
from trimperor.core.model import (
    Remove,
    Snapshot,
    SourceEvent,
    SourceProblem,
    Upsert,
    VassalDocument,
)

__all__ = ["Action", "Notice", "Registry", "Reload", "Start", "Stop", "Unsupported"]

S = TypeVar("S")


class Unsupported(Refused):
    """The document is valid but names a kind of vassal this build cannot run."""

    event = "vassal.unsupported"


@dataclass(frozen=True, slots=True)
class Start(Generic[S]):
    name: str
    source: str
    version: str
    spec: S


@dataclass(frozen=True, slots=True)
class Reload(Generic[S]):
    name: str
    source: str
    version: str
    spec: S


@dataclass(frozen=True, slots=True)
class Stop:
    name: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the operator should read in the log. ``event`` is a stable key."""

    event: str
    name: str
    source: str
    message: str
    level: str = "warning"


Action = Start[S] | Reload[S] | Stop | Notice


@dataclass(slots=True)
class _Owned(Generic[S]):
    source: str
    version: str | None = None
    spec: S | None = None  # the configuration the vassal runs (last good one)
    running: bool = False


@dataclass(slots=True)
class Registry(Generic[S]):
    """Desired state: name -> owning source and the configuration to run.

    *parse* turns a document into a spec, raising
    :class:`~trimperor.core.errors.ConfigError` for a broken one and
    :class:`Unsupported` for one this build cannot run.
    """

    parse: Callable[[VassalDocument], S]
    _owned: dict[str, _Owned[S]] = field(default_factory=dict)
    # Every source's current offers, in the order they were first made.
    _offers: dict[str, dict[str, VassalDocument]] = field(default_factory=dict)
    _conflicts: set[tuple[str, str]] = field(default_factory=set)

    # -- queries -----------------------------------------------------------

    def owner(self, name: str) -> str | None:
        owned = self._owned.get(name)
        return owned.source if owned else None

    def running(self) -> dict[str, S]:
        """The specs of every vassal that should be running now."""
        return {name: o.spec for name, o in self._owned.items() if o.running and o.spec is not None}

    def desired(self, name: str) -> Start[S] | None:
        """How to start *name* again (after ``ctl stop``), if it should run."""
        owned = self._owned.get(name)
        if owned is None or not owned.running or owned.spec is None or owned.version is None:
            return None
        return Start(name, owned.source, owned.version, owned.spec)

    def names(self, source: str) -> frozenset[str]:
        return frozenset(self._offers.get(source, ()))

    def count(self, source: str) -> int:
        """How many vassals *source* offers (``len(names(source))``, without the copy)."""
        return len(self._offers.get(source, ()))

    def to_parse(self, event: SourceEvent) -> list[VassalDocument]:
        """The documents :meth:`handle` would parse for *event* (new versions).

        Lets the caller parse them beforehand, elsewhere (off its event loop);
        a document left out is simply parsed by :meth:`handle` itself.
        """
        if isinstance(event, Upsert):
            docs: tuple[VassalDocument, ...] = (event.doc,)
        elif isinstance(event, Snapshot):
            docs = event.docs
        else:
            return []
        wanted = []
        for doc in docs:
            owned = self._owned.get(doc.name)
            if doc.text is None or doc.error is not None:
                continue
            if owned is None or (owned.source == doc.source and owned.version != doc.version):
                wanted.append(doc)
        return wanted

    # -- what the emperor reports back ------------------------------------------

    def retired(self, name: str) -> None:
        """The vassal stopped itself for good (uWSGI exit 26, idle without socket).

        It stays owned, but is no longer running: the next change of its
        document starts it again.
        """
        owned = self._owned.get(name)
        if owned is not None:
            owned.running = False

    # -- events ------------------------------------------------------------

    def handle(self, event: SourceEvent) -> list[Action[S]]:
        if isinstance(event, Upsert):
            return self._upsert(event.doc)
        if isinstance(event, Remove):
            return self._remove(event.source, event.name)
        if isinstance(event, Snapshot):
            return self._snapshot(event)
        if isinstance(event, SourceProblem):
            return [Notice("source.problem", "", event.source, event.message)]
        raise TypeError(f"not a source event: {event!r}")

    def _snapshot(self, snap: Snapshot) -> list[Action[S]]:
        actions: list[Action[S]] = []
        present = {doc.name for doc in snap.docs}
        for name in list(self._offers.get(snap.source, ())):
            if name not in present:
                actions += self._remove(snap.source, name)
        for doc in snap.docs:
            if doc.source != snap.source:
                raise ValueError(f"snapshot of {snap.source} holds a document of {doc.source}")
            actions += self._upsert(doc)
        return actions

    def _upsert(self, doc: VassalDocument) -> list[Action[S]]:
        offers = self._offers.setdefault(doc.source, {})
        offers[doc.name] = doc
        owned = self._owned.get(doc.name)
        if owned is None:
            owned = self._owned[doc.name] = _Owned(doc.source)
        elif owned.source != doc.source:
            key = (doc.source, doc.name)
            if key in self._conflicts:
                return []
            self._conflicts.add(key)
            return [
                Notice(
                    "vassal.name_taken",
                    doc.name,
                    doc.source,
                    f"name already owned by {owned.source}; ignored until it is released",
                )
            ]
        return self._apply(doc, owned)

    def _apply(self, doc: VassalDocument, owned: _Owned[S]) -> list[Action[S]]:
        if owned.version == doc.version:
            return []
        owned.version = doc.version
        try:
            if doc.error is not None or doc.text is None:
                raise ConfigError(f"{doc.name}: cannot read: {doc.error or 'no content'}")
            spec = self.parse(doc)
        except ConfigError as exc:
            if owned.running:
                return [
                    Notice(
                        "config.broken",
                        doc.name,
                        doc.source,
                        f"{exc}; the vassal keeps running its last good configuration",
                        "error",
                    )
                ]
            return [Notice("config.invalid", doc.name, doc.source, f"{exc}; not started", "error")]
        except Refused as exc:
            actions: list[Action[S]] = [Notice(exc.event, doc.name, doc.source, str(exc), "error")]
            if owned.running:
                owned.running = False
                owned.spec = None
                actions.append(Stop(doc.name))
            return actions
        if owned.running and owned.spec is not None:
            owned.spec = spec
            return [Reload(doc.name, doc.source, doc.version, spec)]
        owned.spec = spec
        owned.running = True
        return [Start(doc.name, doc.source, doc.version, spec)]

    def _remove(self, source: str, name: str) -> list[Action[S]]:
        self._offers.get(source, {}).pop(name, None)
        self._conflicts.discard((source, name))
        owned = self._owned.get(name)
        if owned is None or owned.source != source:
            return []
        del self._owned[name]
        actions: list[Action[S]] = [Stop(name)] if owned.running else []
        # Hand the name over to the next source that offers it (sources in the
        # order they first reported).
        for other, offers in self._offers.items():
            if name in offers:
                self._conflicts.discard((other, name))
                actions += self._upsert(offers[name])
                break
        return actions
