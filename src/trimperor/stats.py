"""Frozen snapshots of the emperor's state, and their JSON form.

The stats server serialises these; it never sees a live object.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["EmperorStats", "VassalStats", "to_json"]


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
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class EmperorStats:
    pid: int
    version: str
    sources: tuple[str, ...]
    uptime: float
    vassals: tuple[VassalStats, ...]


def to_json(stats: EmperorStats) -> str:
    doc = {
        "emperor": {
            "pid": stats.pid,
            "version": stats.version,
            "sources": list(stats.sources),
            "uptime": round(stats.uptime, 3),
            "vassals": len(stats.vassals),
        },
        "vassals": [asdict(v) for v in stats.vassals],
    }
    return json.dumps(doc, indent=2) + "\n"
