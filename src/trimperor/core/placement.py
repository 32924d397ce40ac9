"""Where each vassal of a fleet runs: rendezvous hashing, as a pure function.

Every emperor of a fleet computes the same answer from the same catalogue
(vassal names and their :class:`Placement`) and the same live nodes, so no
leader is needed. For one vassal, the candidate nodes are those matching its
constraints (``node = GLOB`` on the node's name, ``node-label = KEY=VALUE``,
all of them); each candidate gets a score, a hash of (node, vassal), and the
vassal goes to the ``N`` highest scores (``placement = N``, default 1), or to
every candidate (``placement = all``).

Rendezvous (highest random weight) hashing moves little: when a node joins,
only the vassals for which the new node's score beats the current owners' move
to it (about 1/n of them); when a node leaves, only its own vassals move, each
to its next-highest candidate. Nothing else changes owner.

Pure: no I/O, no clock, no randomness beyond the hash.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from trimperor.core.errors import ConfigError

__all__ = [
    "FLEET_KEYS",
    "Node",
    "Placement",
    "assign",
    "candidates",
    "owners",
    "parse_placement",
    "score",
]

#: The keys of a vassal's placement (in ``[vassal]``, or a uWSGI file's ``[fleet]``).
FLEET_KEYS = frozenset({"placement", "node", "node-label", "on-partition"})

#: Upper bound of ``placement = N``.
MAX_COPIES = 1000


@dataclass(frozen=True, slots=True)
class Placement:
    """How many nodes run a vassal, and which nodes may."""

    copies: int | None = 1
    """How many nodes run it; None: every matching node (``placement = all``)."""
    node: str | None = None
    """A glob the node's name must match."""
    labels: tuple[tuple[str, str], ...] = ()
    """Labels the node must carry, every one of them."""
    on_partition: str | None = None
    """``stop`` or ``keep`` when this node loses etcd; None: the default."""

    @property
    def exclusive(self) -> bool:
        """Placed on a limited number of nodes (not ``all``)."""
        return self.copies is not None

    @property
    def fenced(self) -> bool:
        """Stopped when this node cannot renew its lease.

        The default is ``stop`` for a vassal placed on N nodes (another node
        takes it over once the lease expires) and ``keep`` for ``all`` (no
        other node would start it).
        """
        if self.on_partition is None:
            return self.exclusive
        return self.on_partition == "stop"


@dataclass(frozen=True, slots=True)
class Node:
    """A live member of the fleet."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()


def parse_placement(get_all: Callable[[str], tuple[str, ...]], where: str) -> Placement:
    """A :class:`Placement` from the fleet keys; ``get_all(key)`` gives a key's values.

    Raises ConfigError naming what is wrong.
    """

    def one(key: str) -> str | None:
        values = get_all(key)
        return values[-1].strip() if values else None

    copies: int | None = 1
    raw = one("placement")
    if raw is not None and raw != "":
        if raw.lower() == "all":
            copies = None
        elif raw.isdigit() and 1 <= int(raw) <= MAX_COPIES:
            copies = int(raw)
        else:
            raise ConfigError(
                f"{where}: placement {raw!r} is not 'all' or a number 1..{MAX_COPIES}"
            )
    node = one("node") or None
    labels = []
    for item in get_all("node-label"):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: node-label {item!r} is not KEY=VALUE")
        labels.append((key.strip(), value.strip()))
    partition = (one("on-partition") or "").lower() or None
    if partition not in {None, "stop", "keep"}:
        raise ConfigError(f"{where}: on-partition {partition!r} is not stop or keep")
    placement = Placement(copies, node, tuple(sorted(set(labels))), partition)
    return _ANYWHERE if placement == _ANYWHERE else placement  # one object for most vassals


_ANYWHERE = Placement()


def matches(placement: Placement, node: Node) -> bool:
    if placement.node is not None and not fnmatch.fnmatchcase(node.name, placement.node):
        return False
    have = dict(node.labels)
    return all(have.get(key) == value for key, value in placement.labels)


def score(vassal: str, node: str) -> int:
    """The rendezvous weight of *node* for *vassal* (stable across hosts and runs)."""
    digest = hashlib.blake2b(
        node.encode("utf-8", "surrogateescape") + b"\0" + vassal.encode("utf-8", "surrogateescape"),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big")


def candidates(placement: Placement, nodes: Iterable[Node]) -> list[Node]:
    """The nodes that may run a vassal with *placement*."""
    return [n for n in nodes if matches(placement, n)]


def owners(name: str, placement: Placement, nodes: Iterable[Node]) -> tuple[str, ...]:
    """The nodes that run *name*, best first (all matching nodes, by name, for ``all``)."""
    found = candidates(placement, nodes)
    if placement.copies is None:
        return tuple(sorted({n.name for n in found}))
    ranked = sorted({n.name for n in found}, key=lambda n: (score(name, n), n), reverse=True)
    return tuple(ranked[: placement.copies])


def assign(catalogue: Mapping[str, Placement], nodes: Iterable[Node]) -> dict[str, tuple[str, ...]]:
    """Every vassal's owners; a vassal no node matches has none."""
    members = list(nodes)
    return {name: owners(name, p, members) for name, p in catalogue.items()}
