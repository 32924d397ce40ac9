"""What every remote source (pg, mongodb, amqp, zmq) shares.

- :class:`SourceStatus`: the health a monitor reports in stats (connected or
  retrying, last successful read, vassal count, last error), with reconnect
  backoff.
- :func:`check_document`: name and size validation of what came over the wire.
"""

from __future__ import annotations

import logging
import os
import time

import trio

from trimperor.abc import MonitorOptions
from trimperor.model import VassalDocument, remote_name_problem
from trimperor.stats import SourceStats

__all__ = ["SourceStatus", "check_document", "redact"]

log = logging.getLogger(__name__)

#: Reconnect delays: first, doubling up to the maximum.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0


def redact(uri: str) -> str:
    """Hide a password in ``scheme://user:password@host`` and ``password=...`` forms."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        creds, _, host = rest.partition("@")
        user = creds.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in creds else rest
    words = ["password=***" if w.startswith("password=") else w for w in rest.split(" ")]
    return scheme + sep + " ".join(words)


class SourceStatus:
    """Health of one source, updated by its monitor, read by the stats server."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.state = "starting"
        self.vassals = 0
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.attempt = 0
        self.next_retry: float | None = None

    def ok(self, vassals: int | None = None) -> None:
        """A successful read (connect, query, message)."""
        if self.state == "retrying":
            log.info("source.recovered uri=%s after=%d attempts", self.uri, self.attempt)
        self.state = "connected"
        self.last_ok = time.time()
        self.attempt = 0
        self.next_retry = None
        if vassals is not None:
            self.vassals = vassals

    def failed(self, error: str) -> float:
        """Record a failure; returns how long to wait before the next attempt."""
        self.attempt += 1
        delay: float = min(RETRY_FIRST * 2.0 ** (self.attempt - 1), RETRY_MAX)
        self.state = "retrying"
        self.last_error = error
        self.next_retry = time.time() + delay
        log.warning(
            "source.retrying uri=%s attempt=%d delay=%.1fs error=%s",
            self.uri,
            self.attempt,
            delay,
            error,
        )
        return delay

    async def backoff(self, error: str) -> None:
        """Record a failure and sleep until the next attempt."""
        await trio.sleep(self.failed(error))

    def snapshot(self) -> SourceStats:
        return SourceStats(
            uri=self.uri,
            state=self.state,
            vassals=self.vassals,
            last_ok=self.last_ok,
            last_error=self.last_error,
            retry_attempt=self.attempt,
            next_retry=self.next_retry,
        )


def check_document(doc: VassalDocument, options: MonitorOptions) -> str | None:
    """Why a remotely received document must be ignored, or None if it is fine."""
    problem = remote_name_problem(doc.name, options.extra_extensions)
    if problem is not None:
        return problem
    if doc.text is not None:
        size = len(doc.text.encode())
        if size > options.max_config_size:
            return (
                f"configuration of {doc.name!r} is {size} bytes, over --max-config-size "
                f"({options.max_config_size})"
            )
    return None


def static_file(name: str) -> str:
    """A file named *name* in the emperor's working directory (uWSGI's fallback)."""
    return os.path.join(os.getcwd(), name)
