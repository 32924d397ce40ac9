"""One vassal supervisor: the trio driver of a :class:`~trimperor.core.machine.VassalMachine`.

Every decision about the vassal (its state, backoff, counters, the spec its
process runs, how that process is stopped) is the machine's. The supervisor
feeds it events (commands from the emperor, completions of its own tasks:
a process exited, a timer fired, a connection arrived) and carries out the
commands it answers with: spawn, signal, send a protocol message, arm or
disarm the sockets, start or cancel a timer (a cancel scope each), log. It
also speaks the uWSGI channel, sd_notify and the log pump, which report to
the machine through the same inbox. Everything runs in the vassal's nursery.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any

import trio

from trimperor.abc import LaunchPlan, Process, Spawner
from trimperor.core.errors import SpawnError
from trimperor.core.lifecycle import State
from trimperor.core.machine import (
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
    MachineSnapshot,
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
    TimerFired,
    Update,
    VassalMachine,
    Wake,
)
from trimperor.core.policy import Backoff, BackoffPolicy
from trimperor.core.stats import VassalStats
from trimperor.core.uwsgi_protocol import EXILE_CODE, ToEmperor, ToVassal, describe
from trimperor.core.vassalspec import NativeSpec, UwsgiSpec, VassalSpec
from trimperor.vassals.armory import Armory
from trimperor.vassals.notify import NotifyHub, PrivateNotify
from trimperor.vassals.sockets import ConnectionTable, HeldSocket, bind
from trimperor.vassals.spawner import resolve_ids
from trimperor.vassals.uwsgi import UwsgiChannel, UwsgiOptions, announce_binary

__all__ = ["Supervisor", "SupervisorContext", "native_plan"]

log = logging.getLogger(__name__)
vassal_log = logging.getLogger("trimperor.vassal")

#: Variables of the emperor's own service manager that must not leak into vassals.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")
_MAX_LINE = 64 * 1024
#: The event logged when a vassal misses its heartbeat or watchdog deadline.
_MISSED = {"heartbeat": "vassal.heartbeat_missed", "watchdog": "vassal.watchdog_missed"}
#: What uWSGI prints when its configuration loaded no application.
_NO_APP = b"no app loaded"
#: States in which the vassal's process is up and wanted.
_UP = (State.RUNNING, State.STARTING)
_STAMPED: dict[int, str] = {
    ToEmperor.READY: "last_ready",
    ToEmperor.ACCEPTING: "last_accepting",
    ToEmperor.LOYAL: "last_loyal",
}


@lru_cache(maxsize=8)
def _settings(policy: BackoffPolicy, graceful_shutdown: bool, curse_tolerance: float) -> Settings:
    """One (frozen) Settings for every vassal that has the same."""
    return Settings(policy, graceful_shutdown, curse_tolerance)


def native_plan(spec: NativeSpec, environ: Mapping[str, str]) -> LaunchPlan:
    env = {k: v for k, v in environ.items() if k not in _PRIVATE_ENV}
    env.update(spec.env)
    return LaunchPlan(
        name=spec.name,
        argv=spec.command,
        cwd=spec.chdir,
        env=tuple(env.items()),
        user=spec.uid,
        group=spec.gid,
        init_groups=spec.init_groups,
        logto=spec.logto,
        as_user=spec.tyrant,
    )


@dataclass(slots=True, eq=False, frozen=True)
class SupervisorContext:
    """What every supervisor of one emperor refers to: one record, not ten fields each.

    An emperor makes one and hands it to each of its supervisors. One made with
    only a spawner and an environment has a connection table and uWSGI options
    of its own.
    """

    spawner: Spawner
    environ: Mapping[str, str]
    plan_for: Callable[[NativeSpec, Mapping[str, str]], LaunchPlan] = native_plan
    uwsgi: UwsgiOptions = field(default_factory=UwsgiOptions)
    connections: ConnectionTable = field(default_factory=ConnectionTable)
    notify_hub: NotifyHub | None = None
    observer: Callable[..., None] | None = None
    """``observer(kind, name, **fields)``: state changes, spawns, exits, backoff, output."""
    armory: Armory | None = None
    resume: Callable[[Supervisor], None] | None = None
    """Runs :meth:`Supervisor.run` again (in the emperor's nursery) for a dormant vassal."""
    changed: set[str] | None = None
    """Where a supervisor puts its name when something its stats show changes."""


#: Shared by every supervisor until it holds a process or a timer (never written to:
#: the first entry replaces it with a dict of the supervisor's own).
_NONE: Mapping[Any, Any] = {}


class Supervisor:
    """Keeps one vassal alive until told to stop. Create, then ``nursery.start(sup.run)``.

    An armed vassal that was never woken is a record of its own fields only (slots, no
    inbox, no event, no dict of processes or timers): those are made when first needed.
    """

    __slots__ = (
        "_announced",
        "_arm_id",
        "_arm_scope",
        "_begun",
        "_channel",
        "_ctx",
        "_deferred",
        "_done",
        "_error",
        "_finished",
        "_first_accept_pending",
        "_hearing",
        "_held",
        "_inbox",
        "_machine",
        "_nursery",
        "_procs",
        "_snap",
        "_timers",
        "_times",
        "_wall_offset",
        "accepting",
        "dormant",
        "first_accept",
        "last_heartbeat",
        "last_watchdog",
        "loyal",
        "name",
        "no_app",
        "notify_ready",
        "notify_status",
        "ready",
        "source",
    )

    def __init__(
        self,
        name: str,
        source: str,
        version: str,
        spec: VassalSpec,
        context: SupervisorContext,
        policy: BackoffPolicy,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        # Change tracking first: every assignment below goes through __setattr__.
        object.__setattr__(self, "_snap", None)
        object.__setattr__(self, "_ctx", context)
        self.name = name
        if context.changed is not None:
            context.changed.add(name)
        self.source = source
        self._machine = VassalMachine(
            version,
            spec,
            _settings(policy, self._ctx.uwsgi.graceful_shutdown, self._ctx.uwsgi.curse_tolerance),
            jitter=jitter,
        )
        self._channel: UwsgiChannel | None = None
        self.ready = self.accepting = self.loyal = False
        self.no_app = False
        """uWSGI vassals: the vassal said "no app loaded" (it serves nothing)."""
        self._announced = False
        self.last_heartbeat: float | None = None
        self._times: dict[str, float] = {}
        """trio-clock times of events shown in stats: born, last_mod, last_ready, ..."""
        self._inbox: (
            tuple[trio.MemorySendChannel[Event], trio.MemoryReceiveChannel[Event]] | None
        ) = None
        """Opened by the first event; dropped (empty) while dormant."""
        self._procs: Mapping[int, Process] = _NONE
        """The live process by the machine's token (one at most)."""
        self._timers: Mapping[int, trio.CancelScope] = _NONE
        self._nursery: trio.Nursery | None = None
        self._wall_offset = 0.0
        self._finished: trio.Event | None = None
        self._done = False
        # on demand
        self._held: tuple[HeldSocket, ...] = ()
        """The sockets held for the vassal, in no particular order."""
        self._arm_scope: trio.CancelScope | None = None
        self._arm_id = 0
        self.first_accept: float | None = None
        """Seconds from the waking connection to the vassal's first accept (TCP)."""
        # sd_notify
        self.notify_ready = False
        self.notify_status: str | None = None
        self.last_watchdog: float | None = None
        self._error: str | None = None
        """An error the driver saw that the machine does not (config refused)."""
        self.dormant = False
        """Armed with no task: the armory waits on its sockets."""
        self._begun = False
        self._deferred: Sequence[Command] = ()
        """Commands of the first step that :meth:`begin_armed` left to :meth:`run`."""
        self._first_accept_pending: tuple[HeldSocket, int, float] | None = None
        self._hearing: trio.CancelScope | None = None
        """``type = notify``: the live process's own NOTIFY_SOCKET, heard until it exits."""

    # -- the machine's state, read-only ---------------------------------------

    @property
    def spec(self) -> VassalSpec:
        """The desired spec, as the machine holds it (the emperor's registry owns it: the
        same object); a new one given to :meth:`update` shows once the machine took it."""
        return self._machine.desired

    @property
    def version(self) -> str:
        return self._machine.version

    @property
    def finished(self) -> trio.Event:
        """Set once the vassal is finished (made on first use)."""
        if self._finished is None:
            self._finished = trio.Event()
            if self._done:
                self._finished.set()
        return self._finished

    @property
    def state(self) -> State:
        return self._machine.state

    @property
    def backoff(self) -> Backoff:
        return self._machine.backoff

    @property
    def backoff_delay(self) -> float:
        """Seconds of the last respawn delay the backoff chose."""
        return self._machine.backoff_delay

    @property
    def restarts(self) -> int:
        """Spawns after the first one, not counting on-demand wakes (``wakes``)."""
        return self._machine.restarts

    @property
    def wakes(self) -> int:
        return self._machine.wakes

    @property
    def reloads(self) -> int:
        return self._machine.reloads

    @property
    def retired(self) -> bool:
        """True when the vassal itself asked not to be respawned."""
        return self._machine.retired

    @property
    def last_returncode(self) -> int | None:
        return self._machine.last_returncode

    @property
    def last_error(self) -> str | None:
        return self._machine.last_error or self._error

    @property
    def _proc(self) -> Process | None:
        token = self._machine.proc
        return self._procs.get(token) if token is not None else None

    # -- commands (called by the emperor, never block) ----------------------

    def update(self, version: str, spec: VassalSpec) -> None:
        """A new configuration: restart, or send the reload signal if that is enough."""
        self._stamp("last_mod")
        self._post(Update(version, spec))

    def reload(self) -> None:
        """Explicit reload (SIGHUP to the emperor)."""
        self._post(Reload())

    def clear_backoff(self) -> None:
        """Forget the backoff; if waiting for a restart, start now (SIGURG)."""
        self._post(ClearBackoff())

    def stop(self) -> None:
        self._post(Stop())

    def restart(self) -> None:
        """Restart the process now (``ctl restart``), whatever its reload signal."""
        self._post(Restart())

    def send_signal(self, sig: int) -> bool:
        """Send *sig* to the vassal's main process; False if it has none."""
        proc = self._proc
        if proc is None:
            return False
        proc.send(sig)
        return True

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._ctx.observer is not None:
            try:
                self._ctx.observer(kind, self.name, **fields)
            except Exception:  # an observer's bug must not touch the vassal
                log.exception("vassal.observer_failed name=%s event=%s", self.name, kind)

    def kill(self) -> None:
        self._post(Kill())

    def _post(self, event: Event) -> None:
        if self._done:
            return  # finished: nothing reads the inbox any more
        self._open_inbox()[0].send_nowait(event)
        if self.dormant and self._ctx.resume is not None:
            self.dormant = False
            self._ctx.resume(self)

    def _open_inbox(
        self,
    ) -> tuple[trio.MemorySendChannel[Event], trio.MemoryReceiveChannel[Event]]:
        if self._inbox is None:
            self._inbox = trio.open_memory_channel[Event](math.inf)
        return self._inbox

    # -- the loop -----------------------------------------------------------

    def begin_armed(self) -> bool:
        """Take the first step of an on-demand vassal now, without a task.

        With an armory, a sleeping vassal is a record: its sockets are bound
        and armed here, and no task is started (10,000 of them started at once
        would only live until they went dormant, and leave the memory they
        took fragmented). False, having done nothing, when the vassal is not
        on demand; :meth:`run` takes the first step then. Commands that need a
        task (a failed bind's backoff timer) are left to :meth:`run`, which
        ``resume()`` starts.
        """
        if (
            self._begun
            or self._ctx.armory is None
            or self._ctx.resume is None
            or not self._machine.desired.on_demand
        ):
            return False
        self._begin()
        self.dormant = True
        commands = self._machine.handle(Begin(), trio.current_time())
        self._touch()
        for i, command in enumerate(commands):
            if isinstance(command, Report):
                self._report(command)
            elif isinstance(command, Arm):
                self._disarm()
                if self._bind_sockets(command.spec):
                    self._arm(command.arm)
                else:
                    self._deferred = commands[i + 1 :]
                    self._post(BindFailed(command.arm, self._error or "cannot bind"))
                    return True
            else:  # needs a task: run() carries out the rest
                self._deferred = commands[i:]
                self.dormant = False
                assert self._ctx.resume is not None
                self._ctx.resume(self)
                return True
        log.debug("vassal.dormant name=%s", self.name)
        return True

    def _begin(self) -> None:
        self._begun = True
        self._wall_offset = time.time() - trio.current_time()  # noqa: TID251 (stats epochs)
        self._stamp("born", "last_mod")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until the vassal is finished; or, with an armory, until it is armed
        and has nothing else to do: then it is :attr:`dormant`, a record with
        no task, and ``resume()`` runs it again on the next event or wake."""
        dormant = False
        first = not self._begun
        if first:
            self._begin()
        self.dormant = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                if self._first_accept_pending is not None:
                    nursery.start_soon(self._time_first_accept, *self._first_accept_pending)
                    self._first_accept_pending = None
                if first:
                    await self._feed(Begin())
                deferred, self._deferred = self._deferred, ()
                for command in deferred:
                    await self._do(command)
                while not self._machine.finished:
                    if self._can_sleep(nursery):
                        dormant = True
                        break
                    # Armed with work still running (a log pump draining): look again soon.
                    armed = self._ctx.armory is not None and self.state is State.ARMED
                    event: Event | None = None
                    recv = self._open_inbox()[1]
                    with trio.move_on_after(0.05 if armed else math.inf):
                        event = await recv.receive()
                    if event is not None:
                        await self._feed(event)
                nursery.cancel_scope.cancel()
        except BaseException:
            dormant = False
            raise
        finally:
            self._nursery = None
            if dormant:
                self.dormant = True
                self._inbox = None  # empty (see _can_sleep): the next event opens another
                log.debug("vassal.dormant name=%s", self.name)
            else:
                self._done = True
                await self._reap()
                self._release()
                if self._finished is not None:
                    self._finished.set()
                log.info("vassal.finished name=%s", self.name)

    def _can_sleep(self, nursery: trio.Nursery) -> bool:
        return (
            self._ctx.armory is not None
            and self._ctx.resume is not None
            and self.state is State.ARMED
            and not nursery.child_tasks
            and (self._inbox is None or self._inbox[1].statistics().current_buffer_used == 0)
        )

    async def _reap(self) -> None:
        for proc in self._procs.values():
            # Cancelled or crashed: nothing may outlive us.
            with trio.CancelScope(shield=True):
                proc.signal_group(signal.SIGKILL)
                await _close(proc)
        self._procs = _NONE

    def _release(self) -> None:
        """Release the inbox, the channel and the sockets."""
        if self._inbox is not None:
            self._inbox[0].close()
            self._inbox[1].close()
            self._inbox = None
        self._disarm()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for held in self._held:
            held.close()
        self._held = ()
        self._touch()

    async def _feed(self, event: Event) -> None:
        """One event into the machine; carry out its commands in order."""
        if isinstance(event, Exited) and event.proc == self._machine.proc:
            self._record_exit(event.proc)
        commands = self._machine.handle(event, trio.current_time())
        self._touch()
        for command in commands:
            await self._do(command)

    async def _do(self, command: Command) -> None:
        if isinstance(command, Spawn):
            await self._spawn(command)
        elif isinstance(command, Signal):
            proc = self._procs.get(command.proc)
            if proc is not None and proc.returncode is None:
                if command.group:
                    proc.signal_group(command.signum)
                else:
                    proc.send(command.signum)
        elif isinstance(command, SendProtocol):
            self._send_protocol(command)
        elif isinstance(command, Arm):
            self._disarm()  # before a rebind closes any of the armed sockets
            if self._bind_sockets(command.spec):
                self._arm(command.arm)
            else:
                await self._feed(BindFailed(command.arm, self._error or "cannot bind"))
        elif isinstance(command, Disarm):
            self._disarm()
        elif isinstance(command, StartTimer):
            self._start_timer(command)
        elif isinstance(command, CancelTimer):
            scope = self._timers.get(command.timer)
            if scope is not None:
                self._forget_timer(command.timer)
                scope.cancel()
        elif isinstance(command, Report):
            self._report(command)
        elif isinstance(command, Finish):
            self._disarm()

    def _start_timer(self, command: StartTimer) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._timers = {**self._timers, command.timer: scope}

        async def timer() -> None:
            with scope:
                await trio.sleep_until(command.at)
                self._post(TimerFired(command.timer))
            self._forget_timer(command.timer)

        self._nursery.start_soon(timer)

    def _forget_timer(self, timer: int) -> None:
        if timer in self._timers:
            timers = {t: s for t, s in self._timers.items() if t != timer}
            self._timers = timers if timers else _NONE

    def _report(self, report: Report) -> None:
        f = dict(report.fields)
        event = report.event
        if event == "state":
            log.debug(
                "vassal.state name=%s %s->%s on %s", self.name, f["previous"], f["state"], f["on"]
            )
            self._emit("state", state=f["state"], previous=f["previous"], on=f["on"])
        elif event == "backoff":
            log.warning(
                "vassal.backoff name=%s attempt=%d delay=%.3fs",
                self.name,
                f["attempt"],
                f["delay"],
            )
            self._emit("backoff", attempt=f["attempt"], delay=f["delay"])
        elif event == "respawn":
            log.info("vassal.respawn name=%s", self.name)
        elif event == "backoff_reset":
            log.info("vassal.backoff_reset name=%s", self.name)
        elif event == "exiled":
            log.warning(
                "vassal.exiled name=%s code=%d respawn=on_configuration_change",
                self.name,
                EXILE_CODE,
            )
        elif event == "asleep":
            log.info("vassal.asleep name=%s reason=exited sockets=armed", self.name)
        elif event == "idle":
            log.info("vassal.idle name=%s action=sleep", self.name)
            self._sockets_are("sleeping")
        elif event == "stopping":
            if "message" in f:
                log.info(
                    "vassal.stopping name=%s pid=%s message=%s timeout=%ss",
                    self.name,
                    f["pid"],
                    f["message"],
                    f["timeout"],
                )
            else:
                signum = f["signum"]
                assert isinstance(signum, int)
                log.info(
                    "vassal.stopping name=%s pid=%s signal=%s timeout=%ss",
                    self.name,
                    f["pid"],
                    signal.Signals(signum).name,
                    f["timeout"],
                )
            if self.state is State.STOPPING:
                self._stamp("cursed")
        elif event == "stop_timeout":
            log.warning(
                "vassal.stop_timeout name=%s pid=%s action=sigkill_group", self.name, f["pid"]
            )
        elif event == "kill":
            log.warning("vassal.kill name=%s pid=%s", self.name, f["pid"])
        elif event == "reload_signal":
            signum = f["signum"]
            assert isinstance(signum, int)
            log.info(
                "vassal.reload_signal name=%s pid=%s signal=%s",
                self.name,
                f["pid"],
                signal.Signals(signum).name,
            )
        elif event == "spawn_failed":
            log.error("vassal.spawn_failed name=%s error=%s", self.name, f["error"])
        # spawned, exited, reload_in_place, bind_failed: logged where they happen

    def _send_protocol(self, command: SendProtocol) -> None:
        proc = self._procs.get(command.proc)
        channel = self._channel
        if proc is None or channel is None:
            return
        if command.message is ToVassal.RELOAD:
            spec = self._machine.running
            assert isinstance(spec, UwsgiSpec)
            channel.spec = spec
            self.ready = self.accepting = self.no_app = False
            log.info("vassal.reload_in_place name=%s pid=%s", self.name, proc.pid)
            if not channel.send(ToVassal.RELOAD):
                proc.signal_group(signal.SIGKILL)
        else:
            channel.send(command.message)

    async def _spawn(self, command: Spawn) -> None:
        assert self._nursery is not None
        spec = command.spec
        channel = None
        private = None
        try:
            if not self._bind_sockets(spec):
                raise SpawnError(self._error or "cannot bind the sockets")
            by_spec = {h.spec: h.fd for h in self._held}
            fds = tuple(by_spec[s] for s in spec.sockets)
            if isinstance(spec, UwsgiSpec):
                channel = UwsgiChannel(
                    spec, self._ctx.uwsgi, self._ctx.environ, stdin_fd=fds[0] if fds else None
                )
                plan = channel.plan
            else:
                plan = self._ctx.plan_for(spec, self._ctx.environ)
                env = dict(plan.env)
                if self._ctx.notify_hub is not None and spec.type == "notify":
                    private = await PrivateNotify.open()
                    env["NOTIFY_SOCKET"] = private.address
                elif self._ctx.notify_hub is not None:
                    env["NOTIFY_SOCKET"] = self._ctx.notify_hub.address
                if spec.watchdog is not None:
                    env["WATCHDOG_USEC"] = str(int(spec.watchdog * 1_000_000))
                plan = replace(
                    plan,
                    env=tuple(env.items()),
                    listen_fds=fds,
                    listen_names=tuple(s.fd_name for s in spec.sockets),
                )
            proc = await self._ctx.spawner.spawn(plan)
        except (SpawnError, OSError) as exc:
            if channel is not None:
                channel.close()
            if private is not None:
                private.close()
            await self._feed(SpawnFailed(command.proc, str(exc)))
            return
        token = command.proc
        self._procs = {**self._procs, token: proc}
        self._error = None
        self.ready = self.accepting = self.loyal = self.no_app = self._announced = False
        self.last_heartbeat = self.last_watchdog = None
        self.notify_ready, self.notify_status = False, None
        self._sockets_are("handed over")
        if private is not None:
            assert isinstance(spec, NativeSpec)
            self._hearing = trio.CancelScope()
            self._nursery.start_soon(self._hear, self._hearing, private, spec, token, proc)
        elif self._ctx.notify_hub is not None and isinstance(spec, NativeSpec):
            self._ctx.notify_hub.register(proc.pid, partial(self._on_notify, token, proc))
        if spec.idle is not None and self._held:
            self._nursery.start_soon(self._watch_idle, token, proc, spec.idle)
        if channel is not None:
            channel.spawned()
            self._channel = channel
            self._nursery.start_soon(self._converse, token, channel, proc)
        self._stamp("cursed", forget=True)
        log.info("vassal.spawned name=%s pid=%s kind=%s", self.name, proc.pid, spec.kind)
        self._emit("spawn", pid=proc.pid)
        self._nursery.start_soon(self._wait, token, proc)
        if proc.output is not None:
            self._nursery.start_soon(self._pump, proc.output, "stdout")
        if proc.errors is not None:
            self._nursery.start_soon(self._pump, proc.errors, "stderr")
        await self._feed(Spawned(token, proc.pid))

    async def _wait(self, token: int, proc: Process) -> None:
        await proc.wait()
        self._post(Exited(token, proc.returncode))

    def _record_exit(self, token: int) -> None:
        proc = self._procs[token]
        procs = {t: p for t, p in self._procs.items() if t != token}
        self._procs = procs if procs else _NONE
        rc = proc.returncode
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._ctx.notify_hub is not None:
            self._ctx.notify_hub.unregister(proc.pid)
        if self._hearing is not None:
            self._hearing.cancel()
            self._hearing = None
        how = f"signal={signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"code={rc}"
        log.info("vassal.exited name=%s pid=%s %s", self.name, proc.pid, how)
        self._emit(
            "exit",
            pid=proc.pid,
            code=rc if rc is not None and rc >= 0 else None,
            signal=signal.Signals(-rc).name if rc is not None and rc < 0 else None,
        )

    async def _converse(self, token: int, channel: UwsgiChannel, proc: Process) -> None:
        """Speak the emperor protocol with one uWSGI vassal process."""
        try:
            await channel.push_config()
        except SpawnError as exc:
            self._error = str(exc)
            log.error("vassal.config_refused name=%s error=%s", self.name, exc)
        async for byte in channel.messages():
            if proc is not self._proc:
                return
            if byte in _STAMPED:
                self._stamp(_STAMPED[byte])
            if byte == ToEmperor.READY:
                self.ready = True
                if self.no_app:
                    log.warning("vassal.ready name=%s pid=%s no_app=true", self.name, proc.pid)
                else:
                    log.info("vassal.ready name=%s pid=%s", self.name, proc.pid)
            elif byte == ToEmperor.ACCEPTING:
                self.accepting = True
            elif byte == ToEmperor.LOYAL:
                if not self.loyal:
                    log.info("vassal.loyal name=%s", self.name)
                self.loyal = True
                self._post(Loyal(token))
            elif byte == ToEmperor.CONFIG_REQUEST:
                try:
                    await channel.push_config()
                except SpawnError as exc:
                    log.error("vassal.config_refused name=%s error=%s", self.name, exc)
            elif byte == ToEmperor.HEARTBEAT:
                first = self.last_heartbeat is None
                self.last_heartbeat = trio.current_time()
                if first:
                    assert self._nursery is not None
                    self._nursery.start_soon(
                        self._watch_deadline, proc, "heartbeat", self._ctx.uwsgi.required_heartbeat
                    )
            elif byte == ToEmperor.IDLE:
                if channel.spec.on_demand:
                    log.info("vassal.idle name=%s action=back_to_on_demand", self.name)
                    self._post(Idle(token))
                else:
                    log.info("vassal.idle name=%s action=stop reason=vassal_asked", self.name)
                    self._post(Retire(token))
            elif byte == ToEmperor.SOS:
                log.info("vassal.sos name=%s broodlord=unsupported", self.name)
            else:
                log.debug("vassal.message name=%s byte=%s", self.name, describe(byte))

    # -- on demand ------------------------------------------------------------

    def _bind_sockets(self, spec: VassalSpec) -> bool:
        """Hold exactly the sockets of *spec*; False (and logged) on failure."""
        wanted = set(spec.sockets)
        self._touch()  # the held sockets are shown in stats
        kept = []
        for held in self._held:
            if held.spec in wanted:
                kept.append(held)
            else:
                log.info("socket.closed name=%s address=%s", self.name, held.spec.address)
                held.close()
        self._held = tuple(kept)
        for sock in spec.sockets:
            if any(held.spec == sock for held in self._held):
                continue
            try:
                self._held = (*self._held, bind(sock, spec.uid, spec.gid, as_user=spec.tyrant))
            except SpawnError as exc:
                self._error = str(exc)
                log.error("vassal.bind_failed name=%s error=%s", self.name, exc)
                return False
        return True

    def _arm(self, arm_id: int) -> None:
        """Wait for the first connection on any held socket, without accepting it."""
        self._disarm()
        self._sockets_are("armed")
        log.info(
            "vassal.armed name=%s sockets=%s",
            self.name,
            ",".join(h.spec.address for h in self._held),
        )
        if self._ctx.armory is not None:
            self._arm_id = arm_id
            self._ctx.armory.arm(self, [h.fd for h in self._held])
            return
        scope = self._arm_scope = trio.CancelScope()

        async def wait_for_connection(held: HeldSocket) -> None:
            try:
                await held.wait_readable()
            except trio.ClosedResourceError:
                return  # rebound meanwhile; a new arming is under way
            if not scope.cancel_called:
                scope.cancel()
                self._wake(held, arm_id)

        assert self._nursery is not None

        async def arm() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for held in list(self._held):
                        nursery.start_soon(wait_for_connection, held)

        self._nursery.start_soon(arm)

    def _disarm(self) -> None:
        if self._ctx.armory is not None:
            self._ctx.armory.disarm(self)
        if self._arm_scope is not None:
            self._arm_scope.cancel()
            self._arm_scope = None

    def armory_wake(self, fd: int) -> None:
        """The armory saw a connection on *fd*: wake."""
        for held in self._held:
            if held.fd == fd:
                self._wake(held, self._arm_id)
                return

    def _wake(self, held: HeldSocket, arm_id: int) -> None:
        woke = trio.current_time()
        log.info("vassal.wake name=%s address=%s", self.name, held.spec.address)
        before = held.pending()
        if before and self._nursery is not None:
            self._nursery.start_soon(self._time_first_accept, held, before, woke)
        elif before:
            self._first_accept_pending = (held, before, woke)  # timed once resumed
        self._post(Wake(arm_id))

    async def _time_first_accept(self, held: HeldSocket, before: int, woke: float) -> None:
        """Time until the accept queue shrinks: the vassal's first accept (TCP only)."""
        with trio.move_on_after(30):
            while True:
                pending = held.pending()
                if pending is None or pending < before:
                    self.first_accept = trio.current_time() - woke
                    return
                await trio.sleep(0.001)

    async def _watch_idle(self, token: int, proc: Process, idle: float) -> None:
        """Put the vassal to sleep after *idle* seconds without a client connection."""
        step = min(1.0, idle / 4)
        quiet_since: float | None = None
        arrivals = self._ctx.connections.arrivals
        for held in self._held:
            arrivals.watch(held)
        arrived: int | None = None
        while proc is self._proc and self.state in _UP:
            open_now = sum(self._ctx.connections.connections(h) for h in self._held)
            open_now += sum(h.pending() or 0 for h in self._held)
            # Connections that came and went since the last look count too.
            counts = [arrivals.count(h) for h in self._held]
            seen = None if None in counts else sum(c or 0 for c in counts)
            fresh = seen is not None and seen != arrived
            arrived = seen
            now = trio.current_time()
            if open_now or fresh:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= idle:
                self._post(Idle(token))
                return
            await trio.sleep(step)

    # -- sd_notify ----------------------------------------------------------------

    async def _hear(
        self,
        scope: trio.CancelScope,
        private: PrivateNotify,
        spec: NativeSpec,
        token: int,
        proc: Process,
    ) -> None:
        """The process's own NOTIFY_SOCKET, until it exits: any sender running as the
        vassal's user (or the emperor's) speaks for it."""
        with scope, private:
            uids = {os.getuid()}
            if spec.uid is not None:
                # A user name may be looked up in a directory service: not in the loop.
                # Gone since the spawn: only the emperor's user is heard.
                with contextlib.suppress(SpawnError):
                    uid = (await trio.to_thread.run_sync(resolve_ids, spec.uid, None))[0]
                    if uid is not None:
                        uids.add(uid)
            await private.run(partial(self._on_notify, token, proc), frozenset(uids))

    def _on_notify(self, token: int, proc: Process, fields: dict[str, str]) -> None:
        """A message on the shared NOTIFY_SOCKET from this vassal's process group,
        or on the process's own (``type = notify``) from any of its processes."""
        if proc is not self._proc:
            return
        if fields.get("READY") == "1" and not self.notify_ready:
            self.notify_ready = True
            log.info("vassal.ready name=%s pid=%s", self.name, proc.pid)
            self._post(Ready(token))
        if "STATUS" in fields:
            self.notify_status = fields["STATUS"]
        if fields.get("STOPPING") == "1":
            log.info("vassal.stopping_notified name=%s pid=%s", self.name, proc.pid)
        if fields.get("WATCHDOG") == "1" and self.spec.watchdog is not None:
            first = self.last_watchdog is None
            self.last_watchdog = trio.current_time()
            if first:
                assert self._nursery is not None
                self._nursery.start_soon(self._watch_deadline, proc, "watchdog", self.spec.watchdog)
        elif fields.get("WATCHDOG") == "trigger":
            log.warning("vassal.watchdog_triggered name=%s pid=%s", self.name, proc.pid)
            proc.signal_group(signal.SIGKILL)

    def _wall(self, key: str) -> float | None:
        t = self._times.get(key)
        return None if t is None else t + self._wall_offset

    def _last(self, what: str) -> float | None:
        return self.last_heartbeat if what == "heartbeat" else self.last_watchdog

    async def _watch_deadline(self, proc: Process, what: str, limit: float) -> None:
        """Once the first *what* (uWSGI heartbeat, sd_notify watchdog) arrived, one
        must arrive every *limit* seconds, or the process group is killed (and
        respawned with backoff)."""
        while proc is self._proc and (seen := self._last(what)) is not None:
            deadline = seen + limit
            if trio.current_time() >= deadline:
                log.warning(
                    "%s name=%s pid=%s limit=%ss action=sigkill_group",
                    _MISSED[what],
                    self.name,
                    proc.pid,
                    limit,
                )
                proc.signal_group(signal.SIGKILL)
                return
            await trio.sleep_until(deadline)

    async def _pump(self, stream: trio.abc.ReceiveStream, which: str) -> None:
        buf = b""
        try:
            async with stream:
                while chunk := await stream.receive_some(65536):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    if len(buf) > _MAX_LINE:
                        lines.append(buf)
                        buf = b""
                    for line in lines:
                        self._log_line(line, which)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        if buf:
            self._log_line(buf, which)

    def _log_line(self, line: bytes, which: str = "stdout") -> None:
        text = line.decode(errors="replace").rstrip()
        vassal_log.info("%s| %s", self.name, text)
        self._emit("log", line=text, stream=which)
        if self._channel is not None and not self._announced:
            self._announced = announce_binary(self._channel.program, line)
        if isinstance(self.spec, UwsgiSpec) and not self.no_app and _NO_APP in line:
            self.no_app = True
            log.warning(
                "vassal.no_app name=%s pid=%s binary=%s",
                self.name,
                self._proc.pid if self._proc is not None else None,
                self._channel.program if self._channel is not None else None,
            )

    # -- observation ---------------------------------------------------------

    # Change tracking. ``_snap`` is the vassal's current snapshot, or None once
    # something it shows may have changed; the change that clears it puts the
    # vassal's name in ``_changed`` (the emperor's set of vassals whose part of
    # the stats document must be made again). Every attribute assignment counts
    # (``__setattr__``); what changes in place (the machine, ``_times``, the held
    # sockets and their states) calls :meth:`_touch` itself.
    _snap: VassalStats | None
    _ctx: SupervisorContext

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if self._snap is not None:
            self._touch()

    def _touch(self) -> None:
        """Something shown in stats may have changed."""
        if self._snap is not None:
            object.__setattr__(self, "_snap", None)
            if self._ctx.changed is not None:
                self._ctx.changed.add(self.name)

    def _stamp(self, *keys: str, forget: bool = False) -> None:
        """Record (or forget) the trio-clock time of events shown in stats: now."""
        now = trio.current_time()
        for key in keys:
            if forget:
                self._times.pop(key, None)
            else:
                self._times[key] = now
        self._touch()

    def _sockets_are(self, state: str) -> None:
        for held in self._held:
            held.state = state
        self._touch()

    def snapshot(self) -> VassalStats:
        """The vassal's frozen stats; the same object again while nothing it shows changed."""
        snap = self._snap
        if snap is None:
            snap = self._make_snapshot()
            object.__setattr__(self, "_snap", snap)
        return snap

    def _make_snapshot(self, m: MachineSnapshot | None = None) -> VassalStats:
        if m is None:
            m = self._machine.snapshot()
        rc = m.last_returncode
        next_start = m.next_start + self._wall_offset if m.next_start is not None else None
        return VassalStats(
            name=self.name,
            source=self.source,
            kind=self.spec.kind,
            state=m.state.value,
            pid=m.pid,
            started_at=m.started_at + self._wall_offset if m.started_at is not None else None,
            restarts=m.restarts,
            backoff_attempt=m.backoff_attempt,
            backoff_delay=m.backoff_delay,
            next_start=next_start,
            last_exit_code=rc if rc is not None and rc >= 0 else None,
            last_exit_signal=signal.Signals(-rc).name if rc is not None and rc < 0 else None,
            config_version=self.version,
            reloads=m.reloads,
            last_error=m.last_error or self._error,
            ready=self.ready,
            no_app=self.no_app,
            accepting=self.accepting,
            loyal=self.loyal,
            last_heartbeat=(
                self.last_heartbeat + self._wall_offset if self.last_heartbeat is not None else None
            ),
            born=self._wall("born"),
            last_run=m.last_run + self._wall_offset if m.last_run is not None else None,
            last_mod=self._wall("last_mod"),
            last_ready=self._wall("last_ready"),
            last_accepting=self._wall("last_accepting"),
            last_loyal=self._wall("last_loyal"),
            cursed=self._wall("cursed") if m.state is State.STOPPING else None,
            uid=self.spec.uid,
            gid=self.spec.gid,
            on_demand=",".join(s.address for s in self.spec.sockets) if self.spec.on_demand else "",
            sockets=tuple((h.spec.address, h.state) for h in self._held),
            wakes=m.wakes,
            last_wake=m.last_wake + self._wall_offset if m.last_wake is not None else None,
            first_accept=self.first_accept,
            notify_ready=self.notify_ready,
            notify_status=self.notify_status,
            last_watchdog=(
                self.last_watchdog + self._wall_offset if self.last_watchdog is not None else None
            ),
        )


async def _close(proc: Process) -> None:
    aclose = getattr(proc, "aclose", None)
    if aclose is not None:
        await aclose()
    else:
        await proc.wait()
