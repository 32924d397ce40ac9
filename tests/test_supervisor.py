"""Lifecycle transitions on a fake spawner and trio's MockClock (virtual time)."""

from __future__ import annotations

import itertools
import signal
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from trimperor.core.lifecycle import State
from trimperor.core.policy import BackoffPolicy
from trimperor.core.vassalspec import NativeSpec
from trimperor.supervisor import Supervisor, SupervisorContext
from trimperor.testing import FakeSpawner

POLICY = BackoffPolicy(throttle=1.0, max_throttle=8.0, loyal_after=10.0)


def spec(**kw: object) -> NativeSpec:
    base: dict[str, object] = {"name": "app.ini", "command": ("app",), "chdir": "/"}
    base.update(kw)
    return NativeSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
async def running() -> AsyncIterator[tuple[Supervisor, FakeSpawner]]:
    spawner = FakeSpawner()
    sup = Supervisor(
        "app.ini",
        "fake://",
        "v1",
        spec(),
        SupervisorContext(spawner, {}),
        POLICY,
        jitter=lambda: 0.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        yield sup, spawner
        sup.kill()
        sup.stop()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_crash_respawns_with_doubling_backoff(
    autojump_clock: trio.testing.MockClock, running: tuple[Supervisor, FakeSpawner]
) -> None:
    sup, spawner = running
    first = await spawner.wait_spawned(1)
    starts = [trio.current_time()]
    for n in range(2, 7):
        spawner.spawned[-1].exit(1)
        await spawner.wait_spawned(n)
        starts.append(trio.current_time())
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0]  # capped at max_throttle
    assert sup.snapshot().backoff_attempt == 5
    assert sup.snapshot().restarts == 5
    assert first.returncode == 1


async def test_loyal_run_resets_backoff(
    autojump_clock: trio.testing.MockClock, running: tuple[Supervisor, FakeSpawner]
) -> None:
    sup, spawner = running
    for n in range(1, 4):
        (await spawner.wait_spawned(n)).exit(1)
    proc = await spawner.wait_spawned(4)
    assert sup.backoff.attempt == 3
    await trio.sleep(11)  # longer than loyal_after
    t0 = trio.current_time()
    proc.exit(0)
    await spawner.wait_spawned(5)
    assert trio.current_time() == t0
    assert sup.backoff.attempt == 0
    assert sup.snapshot().last_exit_code == 0


async def test_state_and_next_start_visible_while_waiting(
    autojump_clock: trio.testing.MockClock, running: tuple[Supervisor, FakeSpawner]
) -> None:
    sup, spawner = running
    (await spawner.wait_spawned(1)).exit(-signal.SIGSEGV)
    await settle()
    snap = sup.snapshot()
    assert snap.state == "waiting"
    assert snap.pid is None
    assert snap.next_start is not None
    assert snap.last_exit_signal == "SIGSEGV"
    assert snap.backoff_attempt == 1


async def test_config_change_bypasses_backoff(
    autojump_clock: trio.testing.MockClock, running: tuple[Supervisor, FakeSpawner]
) -> None:
    sup, spawner = running
    for n in range(1, 5):
        (await spawner.wait_spawned(n)).exit(1)
    await settle()
    assert sup.state is State.WAITING
    assert sup.backoff.attempt == 4
    t0 = trio.current_time()
    sup.update("v2", spec(command=("app", "--fixed")))
    proc = await spawner.wait_spawned(5)
    assert trio.current_time() == t0
    assert proc.plan.argv == ("app", "--fixed")
    assert sup.backoff.attempt == 0
    # the stale backoff timer must not start a second process
    await trio.sleep(100)
    assert len(spawner.alive()) == 1


async def test_reload_restarts_gracefully(
    autojump_clock: trio.testing.MockClock, running: tuple[Supervisor, FakeSpawner]
) -> None:
    sup, spawner = running
    old = await spawner.wait_spawned(1)
    sup.update("v2", spec(command=("app", "v2")))
    new = await spawner.wait_spawned(2)
    assert old.signals == [signal.SIGTERM]
    assert new.plan.argv == ("app", "v2")
    assert sup.snapshot().config_version == "v2"
    assert sup.state is State.RUNNING


async def test_reload_signal_when_only_touched(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    s = spec(reload_signal=signal.SIGHUP)
    sup = Supervisor("app.ini", "fake://", "v1", s, SupervisorContext(spawner, {}), POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        proc = await spawner.wait_spawned(1)
        sup.update("v2", s)  # a touch: same command
        await settle()
        assert proc.signals == [signal.SIGHUP]
        sup.reload()  # SIGHUP to the emperor
        await settle()
        assert proc.signals == [signal.SIGHUP, signal.SIGHUP]
        sup.update("v3", spec(reload_signal=signal.SIGHUP, command=("other",)))
        await spawner.wait_spawned(2)  # a changed command needs a restart
        assert len(spawner.alive()) == 1
        sup.stop()


async def test_stop_escalates_to_sigkill_after_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spawner = FakeSpawner()
    spawner.ignore = {signal.SIGTERM}
    sup = Supervisor(
        "app.ini", "fake://", "v1", spec(stop_timeout=7.0), SupervisorContext(spawner, {}), POLICY
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        proc = await spawner.wait_spawned(1)
        t0 = trio.current_time()
        sup.stop()
        await sup.finished.wait()
        assert trio.current_time() - t0 == pytest.approx(7.0)
        assert proc.signals == [signal.SIGTERM, signal.SIGKILL]
    assert sup.state is State.STOPPED
    assert len(spawner.spawned) == 1  # nothing respawns a stopped vassal


async def test_custom_stop_signal_and_quick_exit(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    s = spec(stop_signal=signal.SIGQUIT)
    sup = Supervisor("app.ini", "fake://", "v1", s, SupervisorContext(spawner, {}), POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        proc = await spawner.wait_spawned(1)
        t0 = trio.current_time()
        sup.stop()
        await sup.finished.wait()
        assert trio.current_time() == t0
        assert proc.signals == [signal.SIGQUIT]


async def test_spawn_failure_backs_off_and_recovers(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    spawner.fail_with = "program 'app' not found"
    sup = Supervisor(
        "app.ini", "fake://", "v1", spec(), SupervisorContext(spawner, {}), POLICY, jitter=lambda: 0
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(3.5)  # attempts at 0, 1 and 3
        snap = sup.snapshot()
        assert snap.state == "waiting"
        assert snap.backoff_attempt == 3
        assert snap.last_error == "program 'app' not found"
        spawner.fail_with = None
        await spawner.wait_spawned(1)
        assert trio.current_time() == pytest.approx(7.0)
        assert sup.snapshot().last_error is None
        sup.stop()


async def test_stop_while_waiting_finishes_at_once(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    sup = Supervisor("app.ini", "fake://", "v1", spec(), SupervisorContext(spawner, {}), POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        (await spawner.wait_spawned(1)).exit(3)
        await settle()
        sup.stop()
        await sup.finished.wait()
    assert len(spawner.spawned) == 1


async def test_kill_during_slow_stop(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    spawner.ignore = {signal.SIGTERM}
    sup = Supervisor(
        "app.ini", "fake://", "v1", spec(stop_timeout=60), SupervisorContext(spawner, {}), POLICY
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        proc = await spawner.wait_spawned(1)
        sup.stop()
        await trio.sleep(1)
        sup.kill()  # second SIGINT
        await sup.finished.wait()
        assert trio.current_time() == pytest.approx(1.0)
        assert proc.returncode == -signal.SIGKILL


async def test_cancellation_kills_the_process(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    sup = Supervisor("app.ini", "fake://", "v1", spec(), SupervisorContext(spawner, {}), POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        proc = await spawner.wait_spawned(1)
        nursery.cancel_scope.cancel()
    assert proc.returncode == -signal.SIGKILL


async def test_the_old_process_is_stopped_with_the_settings_it_was_started_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spawner = FakeSpawner()
    sup = Supervisor(
        "app.ini",
        "fake://",
        "v1",
        spec(stop_signal=signal.SIGQUIT),
        SupervisorContext(spawner, {}),
        POLICY,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        old = await spawner.wait_spawned(1)
        # The new configuration changes the command and the stop signal: the
        # old process still gets its own stop signal, the new one the new.
        sup.update("v2", spec(command=("app", "v2"), stop_signal=signal.SIGINT))
        new = await spawner.wait_spawned(2)
        assert old.signals == [signal.SIGQUIT]
        sup.stop()
        await sup.finished.wait()
        assert new.signals == [signal.SIGINT]
