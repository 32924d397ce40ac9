from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimperor.core.policy import JITTER, Backoff, BackoffPolicy

policies = st.builds(
    BackoffPolicy,
    throttle=st.floats(0, 100),
    max_throttle=st.floats(0, 1000),
    loyal_after=st.floats(0, 100),
)
jitters = st.floats(0, 1, exclude_max=True)


@given(policies, st.integers(1, 10_000), jitters)
def test_delay_is_bounded(policy: BackoffPolicy, attempt: int, jitter: float) -> None:
    delay = policy.delay(attempt, jitter)
    assert 0 <= delay <= policy.max_throttle
    base = min(policy.throttle * 2 ** min(attempt - 1, 64), policy.max_throttle)
    assert base <= delay + 1e-9
    assert delay <= base * (1 + JITTER) + 1e-9


@given(policies, st.integers(1, 60), jitters)
def test_delay_never_shrinks_with_attempts(policy: BackoffPolicy, attempt: int, j: float) -> None:
    assert policy.delay(attempt + 1, 0.0) >= policy.delay(attempt, 0.0)
    assert policy.delay(attempt + 1, j) >= policy.delay(attempt, 0.0)


def test_doubling_from_throttle_to_max() -> None:
    policy = BackoffPolicy(throttle=1.0, max_throttle=180.0)
    assert [policy.delay(n, 0.0) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 64, 128, 180]


def test_early_deaths_count_up_and_a_loyal_run_resets() -> None:
    policy = BackoffPolicy(throttle=1.0, max_throttle=60.0, loyal_after=10.0)
    b = Backoff()
    b = b.after_exit(policy, started_at=0.0, now=0.5, jitter=0.0)
    assert (b.attempt, b.next_start) == (1, 1.5)
    b = b.after_exit(policy, started_at=1.5, now=2.0, jitter=0.0)
    assert (b.attempt, b.next_start) == (2, 4.0)
    b = b.after_exit(policy, started_at=4.0, now=100.0, jitter=0.0)
    assert (b.attempt, b.next_start) == (0, 100.0)


@given(policies, st.lists(st.tuples(st.floats(0, 50), jitters), max_size=30))
def test_next_start_is_never_in_the_past(
    policy: BackoffPolicy, runs: list[tuple[float, float]]
) -> None:
    b, now = Backoff(), 0.0
    for duration, jitter in runs:
        started, now = now, now + duration
        b = b.after_exit(policy, started, now, jitter)
        assert b.next_start is not None
        assert now <= b.next_start <= now + policy.max_throttle
        now = b.next_start


def test_reset_forgets_history() -> None:
    assert Backoff(attempt=5, next_start=99.0).reset() == Backoff()


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        BackoffPolicy(throttle=-1)
