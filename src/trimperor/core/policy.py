"""Respawn backoff as a pure function of a vassal's history and ``now``.

A vassal that exits on its own is started again after a delay that starts at
``throttle`` and doubles for every consecutive early death, up to
``max_throttle``, with a little jitter so that many vassals failing together do
not come back in lock-step. A run that lasted at least ``loyal_after`` seconds
proves the vassal healthy and resets the count. A configuration change or an
explicit reload bypasses the backoff entirely (see :func:`Backoff.reset`).

Times are seconds on whatever clock the caller uses; nothing here reads one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Backoff", "BackoffPolicy"]

#: Fraction of the delay added at most as jitter.
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    throttle: float = 1.0
    """First delay, in seconds (``--throttle`` is in milliseconds)."""
    max_throttle: float = 180.0
    """Longest delay, in seconds."""
    loyal_after: float = 10.0
    """A run at least this long resets the backoff."""

    def __post_init__(self) -> None:
        if self.throttle < 0 or self.max_throttle < 0 or self.loyal_after < 0:
            raise ValueError("backoff settings must not be negative")

    def delay(self, attempt: int, jitter: float) -> float:
        """Delay before restart number *attempt* (1 = the first early death).

        *jitter* is a number in ``[0, 1)`` supplied by the caller (usually
        ``random.random()``), so that this function stays deterministic.
        """
        if attempt <= 0:
            return 0.0
        base = min(self.throttle * 2.0 ** min(attempt - 1, 64), self.max_throttle)
        return min(base * (1.0 + JITTER * jitter), self.max_throttle)


@dataclass(frozen=True, slots=True)
class Backoff:
    """How many early deaths in a row, and when the next start may happen."""

    attempt: int = 0
    next_start: float | None = None

    def after_exit(
        self, policy: BackoffPolicy, started_at: float, now: float, jitter: float
    ) -> Backoff:
        """The state after a process that started at *started_at* died at *now*."""
        if now - started_at >= policy.loyal_after:
            # A loyal run: come back at once, like a first start.
            return Backoff(attempt=0, next_start=now)
        attempt = self.attempt + 1
        return Backoff(attempt=attempt, next_start=now + policy.delay(attempt, jitter))

    def reset(self) -> Backoff:
        """Forget the history (configuration changed, reload requested)."""
        return replace(self, attempt=0, next_start=None)
