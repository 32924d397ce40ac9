"""Frozen snapshots of the emperor's state, and their JSON form.

The stats server serialises these; it never sees a live object.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["EmperorStats", "SourceStats", "VassalStats", "to_json"]


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
    ready: bool = False
    """uWSGI vassals: the vassal said it is ready (byte 1)."""
    accepting: bool = False
    loyal: bool = False
    last_heartbeat: float | None = None


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


@dataclass(frozen=True, slots=True)
class EmperorStats:
    pid: int
    version: str
    sources: tuple[SourceStats, ...]
    uptime: float
    vassals: tuple[VassalStats, ...]


def to_json(stats: EmperorStats) -> str:
    doc = {
        "emperor": {
            "pid": stats.pid,
            "version": stats.version,
            "sources": [asdict(s) for s in stats.sources],
            "uptime": round(stats.uptime, 3),
            "vassals": len(stats.vassals),
        },
        "vassals": [asdict(v) for v in stats.vassals],
    }
    return json.dumps(doc, indent=2) + "\n"
