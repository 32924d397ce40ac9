"""One vassal as a sans-io state machine: events and ``now`` in, commands out.

:class:`VassalMachine` is the vassal's whole bookkeeping: its lifecycle state
(every change goes through :func:`trimperor.core.lifecycle.step`), its backoff, its
counters, the spec it should run (*desired*) and the spec its live process was
started with (*running*, with the stop settings taken from it). It does no I/O
and reads no clock, in the manner of :class:`trimperor.core.reconcile.Registry`: a
driver (the trio :class:`~trimperor.supervisor.Supervisor`, or a test) carries
out the :data:`Command` values it returns and feeds back what happened.

Three tokens keep late news harmless:

- every :class:`Spawn` names a process token; :class:`Exited`, :class:`Ready`,
  :class:`Idle`, :class:`Retire` and :class:`Loyal` about another token are
  ignored (a process that is already forgotten);
- every :class:`Arm` names an arming; a :class:`Wake` of an older one is ignored;
- every :class:`StartTimer` names a timer; a :class:`TimerFired` for a timer
  that was cancelled (or already fired) is ignored, so a cancelled timer never
  produces a command, whatever the driver's race.

Contract with the driver: a :class:`Spawn` is answered by :class:`Spawned` or
:class:`SpawnFailed` before any other event is fed in (the driver awaits the
spawn); :class:`Arm` may be answered by :class:`BindFailed` at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from trimperor.core.lifecycle import Act, Ev, State, step
from trimperor.core.policy import Backoff, BackoffPolicy
from trimperor.core.uwsgi_protocol import EXILE_CODE, ToVassal
from trimperor.core.vassalspec import NativeSpec, UwsgiSpec, VassalSpec

__all__ = [
    "SIGKILL",
    "Arm",
    "Begin",
    "BindFailed",
    "CancelTimer",
    "ClearBackoff",
    "Command",
    "Disarm",
    "Event",
    "Exited",
    "Finish",
    "Idle",
    "Kill",
    "Loyal",
    "MachineError",
    "MachineSnapshot",
    "Ready",
    "Reload",
    "Report",
    "Restart",
    "Retire",
    "SendProtocol",
    "Settings",
    "Signal",
    "Spawn",
    "SpawnFailed",
    "Spawned",
    "StartTimer",
    "Stop",
    "StopHow",
    "TimerFired",
    "Update",
    "VassalMachine",
    "Wake",
]

#: The one signal number POSIX fixes (the machine imports no ``signal``).
SIGKILL: Final = 9
#: States in which the vassal's process is up and wanted.
UP: Final = (State.RUNNING, State.STARTING)


class MachineError(Exception):
    """The driver broke the machine's contract (a bug in the driver)."""


# -- events (driver -> machine) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """The driver is ready: start the vassal (or arm its sockets)."""


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: int


@dataclass(frozen=True, slots=True)
class Spawned:
    proc: int
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    proc: int
    error: str


@dataclass(frozen=True, slots=True)
class BindFailed:
    """The sockets of an :class:`Arm` could not be bound."""

    arm: int
    error: str


@dataclass(frozen=True, slots=True)
class Exited:
    proc: int
    returncode: int | None


@dataclass(frozen=True, slots=True)
class Ready:
    """sd_notify READY=1 from the process."""

    proc: int


@dataclass(frozen=True, slots=True)
class Idle:
    """No connection for ``idle`` seconds, or uWSGI's idle byte with a socket."""

    proc: int


@dataclass(frozen=True, slots=True)
class Retire:
    """The process asked to be stopped (uWSGI's idle byte without a socket)."""

    proc: int


@dataclass(frozen=True, slots=True)
class Loyal:
    """The process proved healthy (uWSGI's loyal byte): forget the backoff."""

    proc: int


@dataclass(frozen=True, slots=True)
class Wake:
    """A connection is waiting on the sockets of arming *arm*."""

    arm: int


@dataclass(frozen=True, slots=True)
class Update:
    """A new desired configuration."""

    version: str
    spec: VassalSpec


@dataclass(frozen=True, slots=True)
class Reload:
    """Explicit reload: the reload signal or protocol if the spec has one, else restart."""


@dataclass(frozen=True, slots=True)
class Restart:
    """Restart the process now, whatever its reload signal."""


@dataclass(frozen=True, slots=True)
class ClearBackoff:
    """Forget the backoff; a vassal waiting for its restart starts now."""


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Kill:
    """Stop at once with SIGKILL."""


Event = (
    Begin
    | TimerFired
    | Spawned
    | SpawnFailed
    | BindFailed
    | Exited
    | Ready
    | Idle
    | Retire
    | Loyal
    | Wake
    | Update
    | Reload
    | Restart
    | ClearBackoff
    | Stop
    | Kill
)

# -- commands (machine -> driver) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """Bind the spec's sockets, start a process, answer Spawned or SpawnFailed."""

    proc: int
    spec: VassalSpec


@dataclass(frozen=True, slots=True)
class Signal:
    """Send *signum* to the process group of *proc* (to its main process only
    when not *group*: a reload signal)."""

    proc: int
    signum: int
    group: bool = True


@dataclass(frozen=True, slots=True)
class SendProtocol:
    """Send a uWSGI emperor-protocol message to *proc* over its channel."""

    proc: int
    message: ToVassal


@dataclass(frozen=True, slots=True)
class Arm:
    """Hold exactly *spec*'s sockets and wait for the first connection on any."""

    arm: int
    spec: VassalSpec


@dataclass(frozen=True, slots=True)
class Disarm:
    """Stop waiting for a connection (the sockets stay held)."""


@dataclass(frozen=True, slots=True)
class StartTimer:
    timer: int
    at: float
    purpose: str
    """``start`` (the next start after backoff) or ``escalate`` (SIGKILL after
    the stop timeout)."""


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: int


@dataclass(frozen=True, slots=True)
class Report:
    """Something to log and to tell observers; ``event`` is a stable key."""

    event: str
    fields: tuple[tuple[str, object], ...] = ()

    def get(self, key: str) -> object:
        return dict(self.fields).get(key)


@dataclass(frozen=True, slots=True)
class Finish:
    """The vassal is stopped for good: release everything."""


Command = Spawn | Signal | SendProtocol | Arm | Disarm | StartTimer | CancelTimer | Report | Finish


# -- the machine ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    graceful_shutdown: bool = False
    """uWSGI vassals: stop with GRACEFUL_STOP instead of STOP."""
    curse_tolerance: float = 30.0
    """uWSGI vassals: seconds from the stop message to SIGKILL."""


@dataclass(frozen=True, slots=True)
class StopHow:
    """How one process is stopped: a signal, or a protocol message; then SIGKILL."""

    signum: int | None
    message: ToVassal | None
    timeout: float


def stop_how(spec: VassalSpec, settings: Settings) -> StopHow:
    if isinstance(spec, UwsgiSpec):
        message = ToVassal.GRACEFUL_STOP if settings.graceful_shutdown else ToVassal.STOP
        return StopHow(None, message, settings.curse_tolerance)
    return StopHow(int(spec.stop_signal), None, spec.stop_timeout)


@dataclass(slots=True)
class _Proc:
    token: int
    spec: VassalSpec
    stop: StopHow
    pid: int | None = None
    started_at: float | None = None
    escalation: int | None = None


@dataclass(frozen=True, slots=True)
class MachineSnapshot:
    """The machine's state at one instant (trio-clock times), for stats."""

    state: State
    version: str
    desired: VassalSpec
    running: VassalSpec | None
    pid: int | None
    proc: int | None
    started_at: float | None
    restarts: int
    wakes: int
    reloads: int
    backoff_attempt: int
    backoff_delay: float
    next_start: float | None
    last_returncode: int | None
    last_error: str | None
    retired: bool
    sockets_state: str
    """``held``, ``armed``, ``handed over`` or ``sleeping``."""
    last_run: float | None
    last_wake: float | None
    cursed: float | None
    timers: tuple[int, ...]
    """Live timers (started, not cancelled, not fired)."""


#: No early death yet (frozen: one object for every machine).
_NO_BACKOFF: Final = Backoff()
#: The live timers of a machine that has none (shared; never written to).
_NO_TIMERS: Mapping[int, str] = {}


class VassalMachine:
    """One vassal's state and decisions. See the module docstring."""

    __slots__ = (
        "_arm",
        "_armed",
        "_begun",
        "_jitter",
        "_next_proc",
        "_next_timer",
        "_out",
        "_pending",
        "_proc",
        "_settings",
        "_spawned_once",
        "_start_timer",
        "_timers",
        "_woken",
        "backoff",
        "backoff_delay",
        "cursed",
        "desired",
        "last_error",
        "last_returncode",
        "last_run",
        "last_wake",
        "reloads",
        "restarts",
        "retired",
        "sockets_state",
        "state",
        "version",
        "wakes",
    )

    def __init__(
        self,
        version: str,
        spec: VassalSpec,
        settings: Settings = Settings(),
        *,
        jitter: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._settings = settings
        self._jitter = jitter
        self.version = version
        self.desired: VassalSpec = spec
        self.state = State.WAITING
        self.backoff = _NO_BACKOFF
        self.backoff_delay = 0.0
        self.restarts = 0
        """Spawns after the first one, not counting on-demand wakes (``wakes``)."""
        self.wakes = 0
        self.reloads = 0
        self.retired = False
        self.last_returncode: int | None = None
        self.last_error: str | None = None
        self.sockets_state = "held"
        self.last_run: float | None = None
        self.last_wake: float | None = None
        self.cursed: float | None = None
        self._proc: _Proc | None = None
        self._pending = False
        self._next_proc = 0
        self._arm = 0
        self._armed = False
        self._next_timer = 0
        self._timers: Mapping[int, str] = _NO_TIMERS
        self._start_timer: int | None = None
        self._spawned_once = False
        self._woken = False
        self._begun = False
        self._out: list[Command] = _NO_COMMANDS
        """The commands of the event being handled (a fresh list in :meth:`handle`)."""

    # -- reading -------------------------------------------------------------

    @property
    def running(self) -> VassalSpec | None:
        """The spec the live process was started (or last reloaded in place) with."""
        return self._proc.spec if self._proc is not None else None

    @property
    def proc(self) -> int | None:
        """The token of the live process (or of the one being spawned)."""
        return self._proc.token if self._proc is not None else None

    @property
    def finished(self) -> bool:
        return self.state is State.STOPPED

    def stop_how(self) -> StopHow | None:
        return self._proc.stop if self._proc is not None else None

    def snapshot(self) -> MachineSnapshot:
        proc = self._proc
        return MachineSnapshot(
            state=self.state,
            version=self.version,
            desired=self.desired,
            running=proc.spec if proc is not None else None,
            pid=proc.pid if proc is not None else None,
            proc=proc.token if proc is not None else None,
            started_at=proc.started_at if proc is not None else None,
            restarts=self.restarts,
            wakes=self.wakes,
            reloads=self.reloads,
            backoff_attempt=self.backoff.attempt,
            backoff_delay=self.backoff_delay if self.backoff.attempt else 0.0,
            next_start=self.backoff.next_start if self.state is State.WAITING else None,
            last_returncode=self.last_returncode,
            last_error=self.last_error,
            retired=self.retired,
            sockets_state=self.sockets_state,
            last_run=self.last_run,
            last_wake=self.last_wake,
            cursed=self.cursed if self.state is State.STOPPING else None,
            timers=tuple(sorted(self._timers)),
        )

    # -- feeding -------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Command]:
        """Feed one event; the commands to carry out, in order."""
        self._out = []
        if self.state is State.STOPPED:
            return []  # final: nothing ever happens again
        if self._pending and not isinstance(event, (Spawned, SpawnFailed)):
            raise MachineError(f"{type(event).__name__} fed while a spawn is pending")
        self._handle(event, now)
        out, self._out = self._out, _NO_COMMANDS
        return out

    def _handle(self, event: Event, now: float) -> None:
        proc = self._proc
        current = proc.token if proc is not None else None
        if isinstance(event, Begin):
            if self._begun:
                raise MachineError("Begin fed twice")
            self._begun = True
            self._step(Ev.REARM if self.desired.on_demand else Ev.TIMER, now)
        elif isinstance(event, TimerFired):
            purpose = self._timers.get(event.timer)
            self._forget(event.timer)
            if purpose is None:
                return  # cancelled or already fired
            if purpose == "start":
                self._start_timer = None
                self._step(Ev.REARM if self.desired.on_demand else Ev.TIMER, now)
            elif proc is not None and proc.escalation == event.timer:
                proc.escalation = None
                self._report("stop_timeout", pid=proc.pid, action="sigkill_group")
                self._emit(Signal(proc.token, SIGKILL))
        elif isinstance(event, Spawned):
            self._spawned(event, now)
        elif isinstance(event, SpawnFailed):
            if not self._pending or event.proc != current:
                raise MachineError(f"SpawnFailed for {event.proc}, not the pending spawn")
            self._pending = False
            self._proc = None
            self.last_error = event.error
            self._report("spawn_failed", error=event.error)
            self._step(Ev.SPAWN_FAILED, now)
        elif isinstance(event, BindFailed):
            if event.arm == self._arm and self._armed and self.state is State.ARMED:
                self._armed = False
                self.last_error = event.error
                self._report("bind_failed", error=event.error)
                self._step(Ev.SPAWN_FAILED, now)
        elif isinstance(event, Exited):
            if proc is None or event.proc != current:
                return  # a process we already forgot
            self._exited(proc, event.returncode, now)
        elif isinstance(event, (Ready, Idle, Retire, Loyal)):
            if event.proc != current:
                return  # about a process that has exited since
            if isinstance(event, Ready):
                self._step(Ev.READY, now)
            elif isinstance(event, Idle):
                self._step(Ev.IDLE, now)
            elif isinstance(event, Retire):
                self.retired = True
                self._step(Ev.RETIRE, now)
            else:
                self.backoff = self.backoff.reset()
        elif isinstance(event, Wake):
            if event.arm != self._arm or not self._armed or self.state is not State.ARMED:
                return  # an old wake-up
            self.wakes += 1
            self._woken = True
            self.last_wake = now
            self._step(Ev.WAKE, now)
        elif isinstance(event, Update):
            old = self.desired
            self.version, self.desired = event.version, event.spec
            self._step(Ev.SIGNAL if _in_place(old, event.spec) else Ev.RESTART, now)
        elif isinstance(event, Reload):
            spec = self.desired
            in_place = isinstance(spec, UwsgiSpec) or spec.reload_signal is not None
            self._step(Ev.SIGNAL if in_place else Ev.RESTART, now)
        elif isinstance(event, Restart):
            self._step(Ev.RESTART, now)
        elif isinstance(event, ClearBackoff):
            if self.state is State.WAITING:
                self._step(Ev.RESTART, now)
            else:
                self.backoff = self.backoff.reset()
        elif isinstance(event, Stop):
            self._step(Ev.STOP, now)
        elif isinstance(event, Kill):
            self._step(Ev.KILL, now)
        else:  # pragma: no cover - exhaustive
            raise MachineError(f"unknown event {event!r}")

    def _spawned(self, event: Spawned, now: float) -> None:
        proc = self._proc
        if not self._pending or proc is None or event.proc != proc.token:
            raise MachineError(f"Spawned for {event.proc}, not the pending spawn")
        self._pending = False
        proc.pid, proc.started_at = event.pid, now
        self.last_run = now
        self.cursed = None
        if self._spawned_once and not self._woken:
            self.restarts += 1
        self._spawned_once, self._woken = True, False
        self.last_error = None
        self.sockets_state = "handed over"
        self._report("spawned", pid=event.pid, kind=proc.spec.kind)
        notify = isinstance(proc.spec, NativeSpec) and proc.spec.type == "notify"
        self._step(Ev.SPAWNED_NOTIFY if notify else Ev.SPAWNED, now)

    def _exited(self, proc: _Proc, returncode: int | None, now: float) -> None:
        self.last_returncode = returncode
        self._proc = None
        if proc.escalation is not None:
            self._cancel(proc.escalation)
        self._report("exited", pid=proc.pid, returncode=returncode)
        ev = Ev.EXITED
        if self.state in UP and isinstance(proc.spec, UwsgiSpec) and returncode == EXILE_CODE:
            self._report("exiled", code=EXILE_CODE, respawn="on_configuration_change")
            self.retired = True
            ev = Ev.EXILED
        elif self.state in UP and proc.spec.on_demand and returncode == 0:
            self._report("asleep", reason="exited", sockets="armed")
            ev = Ev.SLEPT
        self._step(ev, now, started_at=proc.started_at)

    # -- the table -----------------------------------------------------------

    def _step(self, ev: Ev, now: float, *, started_at: float | None = None) -> None:
        tr = step(self.state, ev)
        if tr.next is not self.state:
            self._report("state", state=tr.next.value, previous=self.state.value, on=ev.value)
        self.state = tr.next
        for act in tr.actions:
            self._act(act, ev, now, started_at)

    def _act(self, act: Act, ev: Ev, now: float, started_at: float | None) -> None:
        if act is Act.SPAWN:
            self._spawn()
        elif act is Act.SCHEDULE:
            started = started_at if ev is Ev.EXITED and started_at is not None else now
            self.backoff = self.backoff.after_exit(
                self._settings.policy, started, now, self._jitter()
            )
            when = self.backoff.next_start if self.backoff.next_start is not None else now
            delay = when - now
            self.backoff_delay = delay if self.backoff.attempt else 0.0
            if self.backoff.attempt:
                self._report("backoff", attempt=self.backoff.attempt, delay=round(delay, 3))
            else:
                self._report("respawn")
            self._cancel_start()
            self._start_timer = self._timer(when, "start")
        elif act is Act.RESET_BACKOFF:
            if self.backoff.attempt:
                self._report("backoff_reset")
            self.backoff = self.backoff.reset()
            self._cancel_start()
            self.reloads += 1
        elif act is Act.TERMINATE:
            if self.state is State.SLEEPING:
                self._report("idle", action="sleep")
                self.sockets_state = "sleeping"
            self._terminate(now)
        elif act is Act.KILL:
            if self._proc is not None:
                self._report("kill", pid=self._proc.pid)
                self._emit(Signal(self._proc.token, SIGKILL))
        elif act is Act.SEND_RELOAD:
            self._send_reload()
        elif act is Act.ARM:
            self._arm_sockets()
        elif act is Act.REBIND:
            self._disarm()
            if self.desired.on_demand:
                self._arm_sockets()
            else:
                self._step(Ev.WAKE, now)  # no longer on demand: start it
        elif act is Act.FINISH:
            self._disarm()
            for timer in list(self._timers):
                self._cancel(timer)
            self._start_timer = None
            self._emit(Finish())

    def _spawn(self) -> None:
        self._disarm()
        self._next_proc += 1
        spec = self.desired
        self._proc = _Proc(self._next_proc, spec, stop_how(spec, self._settings))
        self._pending = True
        self._emit(Spawn(self._next_proc, spec))

    def _terminate(self, now: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if self.state is State.STOPPING:
            self.cursed = now
        how = proc.stop
        if how.message is not None:
            self._report("stopping", pid=proc.pid, message=how.message.name, timeout=how.timeout)
            self._emit(SendProtocol(proc.token, how.message))
        else:
            assert how.signum is not None
            self._report("stopping", pid=proc.pid, signum=how.signum, timeout=how.timeout)
            self._emit(Signal(proc.token, how.signum))
        if proc.escalation is not None:
            self._cancel(proc.escalation)
        proc.escalation = self._timer(now + how.timeout, "escalate")

    def _send_reload(self) -> None:
        proc = self._proc
        spec = self.desired
        if proc is None:
            return
        # Reloaded in place, the process runs the new spec from now on, and
        # is stopped the way the new spec says.
        if isinstance(proc.spec, UwsgiSpec) and isinstance(spec, UwsgiSpec):
            proc.spec, proc.stop = spec, stop_how(spec, self._settings)
            self._report("reload_in_place", pid=proc.pid)
            self._emit(SendProtocol(proc.token, ToVassal.RELOAD))
        elif isinstance(spec, NativeSpec) and spec.reload_signal is not None:
            proc.spec, proc.stop = spec, stop_how(spec, self._settings)
            self._report("reload_signal", pid=proc.pid, signum=int(spec.reload_signal))
            self._emit(Signal(proc.token, int(spec.reload_signal), group=False))

    def _arm_sockets(self) -> None:
        self._arm += 1
        self._armed = True
        self.sockets_state = "armed"
        self._emit(Arm(self._arm, self.desired))

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self._emit(Disarm())

    # -- timers and output ---------------------------------------------------

    def _timer(self, at: float, purpose: str) -> int:
        self._next_timer += 1
        self._timers = {**self._timers, self._next_timer: purpose}
        self._emit(StartTimer(self._next_timer, at, purpose))
        return self._next_timer

    def _cancel(self, timer: int) -> None:
        if timer in self._timers:
            self._forget(timer)
            self._emit(CancelTimer(timer))

    def _forget(self, timer: int) -> None:
        if timer in self._timers:
            left = {t: p for t, p in self._timers.items() if t != timer}
            self._timers = left if left else _NO_TIMERS

    def _cancel_start(self) -> None:
        if self._start_timer is not None:
            self._cancel(self._start_timer)
            self._start_timer = None

    def _emit(self, command: Command) -> None:
        self._out.append(command)

    def _report(self, event: str, **fields: object) -> None:
        self._out.append(Report(event, tuple(fields.items())))


#: What ``_out`` is between events: shared, and never appended to (``handle`` makes a
#: list of its own before feeding).
_NO_COMMANDS: list[Command] = []


def _in_place(old: VassalSpec, new: VassalSpec) -> bool:
    """Whether a change from *old* to *new* is a reload in place, not a restart."""
    if isinstance(new, NativeSpec) and isinstance(old, NativeSpec):
        return new.reload_signal is not None and new.launch_key() == old.launch_key()
    if isinstance(new, UwsgiSpec) and isinstance(old, UwsgiSpec):
        return new.launch_key() == old.launch_key()
    return False
