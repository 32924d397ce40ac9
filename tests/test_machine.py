"""The sans-io vassal machine: examples, and a hypothesis state machine over
random event sequences that checks the invariants after every step.

The harness plays the driver: it carries out the machine's commands on a model
of processes, sockets and timers (no real process: the machine does no I/O,
and the driver over it is tested with real processes in test_supervisor.py).
``TRIMPEROR_MACHINE_EXAMPLES`` raises the number of sequences tried.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trimperor.core.lifecycle import State
from trimperor.core.machine import (
    SIGKILL,
    Arm,
    Begin,
    BindFailed,
    CancelTimer,
    ClearBackoff,
    Command,
    Disarm,
    Event,
    Exited,
    Finish,
    Idle,
    Kill,
    Loyal,
    MachineError,
    Ready,
    Reload,
    Report,
    Restart,
    Retire,
    SendProtocol,
    Settings,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    StartTimer,
    Stop,
    StopHow,
    TimerFired,
    Update,
    VassalMachine,
    Wake,
)
from trimperor.core.policy import BackoffPolicy
from trimperor.core.uwsgi_protocol import ToVassal
from trimperor.core.vassalspec import NativeSpec, SocketSpec, UwsgiSpec, VassalSpec

POLICY = BackoffPolicy(throttle=0.5, max_throttle=8.0, loyal_after=5.0)
SETTINGS = Settings(policy=POLICY, graceful_shutdown=False, curse_tolerance=7.0)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SOCK_A = SocketSpec(address="127.0.0.1:9001", family="inet", host="127.0.0.1", port=9001)
SOCK_B = SocketSpec(address="/run/b.sock", family="unix", path="/run/b.sock")


def native(
    command: str = "a",
    stop: int = signal.SIGTERM,
    timeout: float = 10.0,
    reload: int | None = None,
    sockets: tuple[SocketSpec, ...] = (),
    on_demand: bool = False,
    kind: str = "simple",
) -> NativeSpec:
    return NativeSpec(
        name="v",
        command=(command,),
        stop_signal=stop,
        stop_timeout=timeout,
        reload_signal=reload,
        sockets=sockets,
        on_demand=on_demand,
        idle=5.0 if on_demand else None,
        type=kind,
    )


def uwsgi(path: str = "/etc/v.ini", sockets: tuple[SocketSpec, ...] = ()) -> UwsgiSpec:
    return UwsgiSpec(name="v", path=path, text="[uwsgi]\n", sockets=sockets)


def expected_stop(spec: VassalSpec) -> StopHow:
    """How a process of *spec* must be stopped, worked out apart from the machine."""
    if isinstance(spec, UwsgiSpec):
        return StopHow(None, ToVassal.STOP, SETTINGS.curse_tolerance)
    return StopHow(int(spec.stop_signal), None, spec.stop_timeout)


native_specs = st.builds(
    native,
    command=st.sampled_from(["a", "b"]),
    stop=st.sampled_from(STOP_SIGNALS),
    timeout=st.sampled_from([1.0, 10.0, 30.0]),
    reload=st.sampled_from([None, *RELOAD_SIGNALS]),
    sockets=st.sampled_from([(), (SOCK_A,), (SOCK_A, SOCK_B)]),
    on_demand=st.booleans(),
    kind=st.sampled_from(["simple", "notify"]),
).map(lambda s: s if s.sockets else replace(s, on_demand=False, idle=None))
uwsgi_specs = st.builds(
    uwsgi,
    path=st.sampled_from(["/etc/v.ini", "/etc/w.ini"]),
    sockets=st.sampled_from([(), (SOCK_A,)]),
)
specs = st.one_of(native_specs, uwsgi_specs)


class VassalModel(RuleBasedStateMachine):
    """The driver's side: processes, sockets and timers, and the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.machine: VassalMachine | None = None
        self.alive: dict[int, StopHow] = {}
        """Processes started and not yet exited, with how each must be stopped."""
        self.ran: dict[int, VassalSpec] = {}
        self.pending: int | None = None
        self.pid = 100
        self.arm: Arm | None = None
        self.live_timers: dict[int, StartTimer] = {}
        self.dead_timers: set[int] = set()
        """Timers cancelled or already fired: firing them must do nothing."""
        self.removed = False
        self.finished = False
        self.stale_procs: set[int] = set()
        self.stale_arms: set[int] = set()

    # -- the driver --------------------------------------------------------

    @property
    def m(self) -> VassalMachine:
        assert self.machine is not None
        return self.machine

    def feed(self, event: Event) -> list[Command]:
        commands = self.m.handle(event, self.now)
        for index, command in enumerate(commands):
            self.carry_out(command, commands[index + 1 :])
        return commands

    def carry_out(self, command: Command, rest: list[Command]) -> None:
        if isinstance(command, Spawn):
            assert not self.removed, "a stopped vassal was spawned again"
            assert not self.finished
            assert not self.alive, "a second process for one vassal"
            assert self.pending is None
            assert self.arm is None, "spawned while its sockets are still armed"
            assert command.spec == self.m.desired
            self.pending = command.proc
            self.ran[command.proc] = command.spec
        elif isinstance(command, Signal):
            assert command.proc in self.alive, "signal to a process that is gone"
            how = self.alive[command.proc]
            if command.signum in STOP_SIGNALS:
                assert command.group
                assert how.signum == command.signum, "stopped with another spec's signal"
                self.check_escalation(how, rest)
            elif command.signum in RELOAD_SIGNALS:
                spec = self.m.desired
                assert isinstance(spec, NativeSpec)
                assert spec.reload_signal == command.signum
                assert not command.group
                self.alive[command.proc] = expected_stop(spec)
            else:
                assert command.signum == SIGKILL
        elif isinstance(command, SendProtocol):
            assert command.proc in self.alive
            how = self.alive[command.proc]
            if command.message is ToVassal.RELOAD:
                assert isinstance(self.m.desired, UwsgiSpec)
                self.alive[command.proc] = expected_stop(self.m.desired)
            else:
                assert how.message is command.message, "a uWSGI vassal stopped by a signal's rules"
                self.check_escalation(how, rest)
        elif isinstance(command, Arm):
            assert not self.alive, "armed while a process runs"
            assert command.spec == self.m.desired
            self.arm = command
        elif isinstance(command, Disarm):
            assert self.arm is not None
            self.stale_arms.add(self.arm.arm)
            self.arm = None
        elif isinstance(command, StartTimer):
            assert command.timer not in self.live_timers
            assert command.timer not in self.dead_timers
            assert command.at >= self.now
            if command.purpose == "start":
                self.check_backoff(command.at - self.now)
            self.live_timers[command.timer] = command
        elif isinstance(command, CancelTimer):
            assert command.timer in self.live_timers, "cancelled a timer that is not running"
            self.dead_timers.add(self.live_timers.pop(command.timer).timer)
        elif isinstance(command, Finish):
            assert not self.finished
            self.finished = True
        else:
            assert isinstance(command, Report)

    def check_escalation(self, how: StopHow, rest: list[Command]) -> None:
        timers = [c for c in rest if isinstance(c, StartTimer) and c.purpose == "escalate"]
        assert timers, "a stop without a SIGKILL deadline"
        assert timers[0].at == pytest.approx(self.now + how.timeout), "stopped with another timeout"

    def check_backoff(self, delay: float) -> None:
        attempt = self.m.backoff.attempt
        if attempt == 0:
            assert delay == 0
            return
        base = min(POLICY.throttle * 2 ** (attempt - 1), POLICY.max_throttle)
        assert base - 1e-9 <= delay <= min(base * 1.1, POLICY.max_throttle) + 1e-9

    def quiet(self, event: Event) -> None:
        """An event about something already forgotten: no command at all."""
        assert self.m.handle(event, self.now) == []

    # -- rules ---------------------------------------------------------------

    @precondition(lambda self: self.machine is None)
    @rule(spec=specs, jitter=st.floats(0, 0.999))
    def begin(self, spec: VassalSpec, jitter: float) -> None:
        self.machine = VassalMachine("1", spec, SETTINGS, jitter=lambda: jitter)
        self.feed(Begin())

    def ready_for_events(self) -> bool:
        return self.machine is not None and self.pending is None

    @precondition(lambda self: self.machine is not None and self.pending is not None)
    @rule(ok=st.booleans())
    def finish_spawn(self, ok: bool) -> None:
        token, self.pending = self.pending, None
        assert token is not None
        if ok:
            self.pid += 1
            self.alive[token] = expected_stop(self.ran[token])
            self.feed(Spawned(token, self.pid))
        else:
            self.stale_procs.add(token)
            self.feed(SpawnFailed(token, "cannot exec"))

    @precondition(ready_for_events)
    @rule(dt=st.floats(0, 20))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.ready_for_events() and bool(self.live_timers))
    @rule(data=st.data())
    def a_timer_fires(self, data: st.DataObject) -> None:
        timer = data.draw(st.sampled_from(sorted(self.live_timers)))
        started = self.live_timers.pop(timer)
        self.dead_timers.add(timer)
        self.now = max(self.now, started.at)
        self.feed(TimerFired(timer))

    @precondition(lambda self: self.ready_for_events() and bool(self.dead_timers))
    @rule(data=st.data())
    def a_cancelled_timer_fires(self, data: st.DataObject) -> None:
        self.quiet(TimerFired(data.draw(st.sampled_from(sorted(self.dead_timers)))))

    @precondition(lambda self: self.ready_for_events() and bool(self.alive))
    @rule(code=st.sampled_from([0, 1, 26, -9, -15]))
    def the_process_exits(self, code: int) -> None:
        (token,) = self.alive
        del self.alive[token]
        self.stale_procs.add(token)
        self.feed(Exited(token, code))

    @precondition(lambda self: self.ready_for_events() and bool(self.stale_procs))
    @rule(data=st.data(), kind=st.sampled_from([Exited, Ready, Idle, Retire]))
    def news_of_an_old_process(self, data: st.DataObject, kind: type) -> None:
        token = data.draw(st.sampled_from(sorted(self.stale_procs)))
        self.quiet(Exited(token, 0) if kind is Exited else kind(token))

    @precondition(lambda self: self.ready_for_events() and bool(self.alive))
    @rule(kind=st.sampled_from([Ready, Idle, Retire, Loyal]))
    def the_process_says(self, kind: type) -> None:
        (token,) = self.alive
        self.feed(kind(token))

    @precondition(lambda self: self.ready_for_events() and self.arm is not None)
    @rule(bind_fails=st.booleans())
    def a_connection_arrives(self, bind_fails: bool) -> None:
        assert self.arm is not None
        if bind_fails:
            self.stale_arms.add(self.arm.arm)
            arm, self.arm = self.arm.arm, None
            self.feed(BindFailed(arm, "address in use"))
        else:
            self.feed(Wake(self.arm.arm))

    @precondition(lambda self: self.ready_for_events() and bool(self.stale_arms))
    @rule(data=st.data())
    def an_old_wake(self, data: st.DataObject) -> None:
        self.quiet(Wake(data.draw(st.sampled_from(sorted(self.stale_arms)))))

    @precondition(ready_for_events)
    @rule(spec=specs)
    def the_configuration_changes(self, spec: VassalSpec) -> None:
        self.feed(Update("v2", spec))

    @precondition(ready_for_events)
    @rule(event=st.sampled_from([Reload(), Restart(), ClearBackoff()]))
    def the_operator_asks(self, event: Event) -> None:
        self.feed(event)

    @precondition(ready_for_events)
    @rule(event=st.sampled_from([Stop(), Kill()]))
    def the_vassal_is_removed(self, event: Event) -> None:
        self.removed = True
        self.feed(event)

    # -- invariants ------------------------------------------------------------

    @invariant()
    def one_process_at_most(self) -> None:
        if self.machine is None:
            return
        assert len(self.alive) + (self.pending is not None) <= 1
        if self.pending is None:
            assert self.m.proc == (next(iter(self.alive)) if self.alive else None)

    @invariant()
    def asleep_means_no_process_and_every_socket_armed(self) -> None:
        if self.machine is None or self.m.state is not State.ARMED:
            return
        assert not self.alive
        assert self.pending is None
        assert self.arm is not None
        assert self.arm.spec.sockets == self.m.desired.sockets
        assert self.m.snapshot().sockets_state == "armed"

    @invariant()
    def timers_agree(self) -> None:
        if self.machine is None:
            return
        assert set(self.m.snapshot().timers) == set(self.live_timers)
        if self.m.state is State.WAITING:
            starts = [t for t in self.live_timers.values() if t.purpose == "start"]
            assert len(starts) <= 1

    @invariant()
    def stopped_is_the_end(self) -> None:
        if self.machine is None:
            return
        if self.m.state is State.STOPPED:
            assert self.finished
            assert not self.alive
            assert not self.live_timers
            assert self.arm is None
        else:
            assert not self.finished
        if self.m.state in (State.RUNNING, State.STARTING):
            assert self.alive or self.pending is not None


VassalModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("TRIMPEROR_MACHINE_EXAMPLES", "75")),
    stateful_step_count=40,
    deadline=None,
)
TestVassalMachine = VassalModel.TestCase


# -- examples ---------------------------------------------------------------------


def run(machine: VassalMachine, event: Event, now: float = 0.0) -> list[Command]:
    return machine.handle(event, now)


def spawned(machine: VassalMachine, now: float = 0.0, pid: int = 10) -> None:
    (spawn,) = [c for c in run(machine, Begin(), now) if isinstance(c, Spawn)]
    run(machine, Spawned(spawn.proc, pid), now)


def test_a_changed_stop_signal_stops_the_old_process_with_the_old_signal() -> None:
    machine = VassalMachine("1", native("a", stop=signal.SIGQUIT, timeout=3.0), SETTINGS)
    spawned(machine)
    commands = run(machine, Update("2", native("b", stop=signal.SIGINT, timeout=20.0)), 1.0)
    assert Signal(1, signal.SIGQUIT) in commands
    assert [c.at for c in commands if isinstance(c, StartTimer)] == [4.0]
    assert machine.state is State.RELOADING
    # The new process is started with the new spec, and stopped with it.
    commands = run(machine, Exited(1, 0), 2.0)
    assert [c for c in commands if isinstance(c, Spawn)] == [Spawn(2, machine.desired)]
    run(machine, Spawned(2, 11), 2.0)
    assert Signal(2, signal.SIGINT) in run(machine, Stop(), 3.0)


def test_a_file_turned_into_uwsgi_does_not_signal_the_old_native_process_by_protocol() -> None:
    machine = VassalMachine("1", native(), SETTINGS)
    spawned(machine)
    commands = run(machine, Update("2", uwsgi()), 1.0)
    assert Signal(1, signal.SIGTERM) in commands
    assert not [c for c in commands if isinstance(c, SendProtocol)]


def test_a_uwsgi_vassal_is_stopped_by_message_never_by_sigterm() -> None:
    machine = VassalMachine("1", uwsgi(), SETTINGS)
    spawned(machine)
    commands = run(machine, Update("2", native()), 1.0)
    assert SendProtocol(1, ToVassal.STOP) in commands
    assert not [c for c in commands if isinstance(c, Signal)]


def test_the_stop_timeout_escalates_to_sigkill_and_a_cancelled_deadline_does_nothing() -> None:
    machine = VassalMachine("1", native(timeout=2.0), SETTINGS)
    spawned(machine)
    commands = run(machine, Stop(), 1.0)
    (deadline,) = [c for c in commands if isinstance(c, StartTimer)]
    assert Signal(1, SIGKILL) in run(machine, TimerFired(deadline.timer), 3.0)
    assert run(machine, TimerFired(deadline.timer), 3.0) == []
    assert Finish() in run(machine, Exited(1, -9), 3.1)
    assert machine.finished
    assert run(machine, Restart(), 4.0) == []


def test_an_exit_is_respawned_with_backoff_and_a_cancelled_start_never_fires() -> None:
    machine = VassalMachine("1", native(), SETTINGS)
    spawned(machine, now=0.0)
    commands = run(machine, Exited(1, 1), 1.0)
    (start,) = [c for c in commands if isinstance(c, StartTimer)]
    assert start.at == 1.0 + POLICY.throttle
    assert machine.backoff.attempt == 1
    commands = run(machine, Restart(), 1.1)  # a reload bypasses the backoff
    assert CancelTimer(start.timer) in commands
    assert [c for c in commands if isinstance(c, Spawn)]
    run(machine, Spawned(2, 11), 1.1)
    assert run(machine, TimerFired(start.timer), 1.5) == []
    assert machine.restarts == 1
    assert machine.reloads == 1


def test_on_demand_sleeps_wakes_and_does_not_count_wakes_as_restarts() -> None:
    machine = VassalMachine("1", native(sockets=(SOCK_A,), on_demand=True), SETTINGS)
    (arm,) = [c for c in run(machine, Begin()) if isinstance(c, Arm)]
    assert machine.state is State.ARMED
    commands = run(machine, Wake(arm.arm), 1.0)
    assert Disarm() in commands
    assert [c for c in commands if isinstance(c, Spawn)]
    run(machine, Spawned(1, 10), 1.0)
    run(machine, Idle(1), 9.0)
    assert machine.snapshot().state is State.SLEEPING
    commands = run(machine, Exited(1, 0), 9.5)
    (arm2,) = [c for c in commands if isinstance(c, Arm)]
    assert machine.state is State.ARMED
    assert machine.snapshot().sockets_state == "armed"
    assert run(machine, Wake(arm.arm), 10.0) == []  # the old arming
    run(machine, Wake(arm2.arm), 10.0)
    assert machine.wakes == 2
    assert machine.restarts == 0


def test_news_while_a_spawn_is_pending_breaks_the_contract() -> None:
    machine = VassalMachine("1", native(), SETTINGS)
    run(machine, Begin())
    with pytest.raises(MachineError):
        run(machine, Stop())
