"""One vassal supervisor: a process, its log pump and its timers, in one nursery.

The supervisor is a small event loop over its own inbox. The emperor posts
commands (new configuration, reload, stop, kill) and the supervisor's own tasks
post what happened (process exited, timer fired); every event goes through
:func:`trimperor.lifecycle.step`, and the supervisor carries out the actions the
table names. Nothing else changes its state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio

from trimperor.abc import LaunchPlan, Process, Spawner
from trimperor.errors import SpawnError
from trimperor.lifecycle import Act, Ev, State, step
from trimperor.notify import NotifyHub
from trimperor.policy import Backoff, BackoffPolicy
from trimperor.sockets import ConnectionTable, HeldSocket, bind
from trimperor.stats import VassalStats
from trimperor.uwsgi import UwsgiChannel, UwsgiOptions, announce_binary
from trimperor.uwsgi_protocol import EXILE_CODE, ToEmperor, ToVassal, describe
from trimperor.vassalspec import NativeSpec, SocketSpec, UwsgiSpec, VassalSpec

__all__ = ["Supervisor", "native_plan"]

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


@dataclass(frozen=True, slots=True)
class _Post:
    event: Ev
    payload: Any = None


class Supervisor:
    """Keeps one vassal alive until told to stop. Create, then ``nursery.start(sup.run)``."""

    def __init__(
        self,
        name: str,
        source: str,
        version: str,
        spec: VassalSpec,
        spawner: Spawner,
        policy: BackoffPolicy,
        environ: Mapping[str, str],
        *,
        plan_for: Callable[[NativeSpec, Mapping[str, str]], LaunchPlan] | None = None,
        jitter: Callable[[], float] = random.random,
        uwsgi: UwsgiOptions | None = None,
        connections: ConnectionTable | None = None,
        notify_hub: NotifyHub | None = None,
        observer: Callable[..., None] | None = None,
    ) -> None:
        self.name = name
        self._observer = observer
        """``observer(kind, name, **fields)``: state changes, spawns, exits, backoff, output."""
        self.source = source
        self.version = version
        self.spec = spec
        self._spawner = spawner
        self._policy = policy
        self._environ = environ
        self._plan_for = plan_for or native_plan
        self._jitter = jitter
        self._uwsgi = uwsgi or UwsgiOptions()
        self._channel: UwsgiChannel | None = None
        self.retired = False
        """True when the vassal itself asked not to be respawned."""
        self.ready = self.accepting = self.loyal = False
        self.no_app = False
        """uWSGI vassals: the vassal said "no app loaded" (it serves nothing)."""
        self._announced = False
        self.last_heartbeat: float | None = None
        self._times: dict[str, float] = {}
        """trio-clock times of events shown in stats: born, last_run, last_mod, ..."""
        self._send, self._recv = trio.open_memory_channel[_Post](math.inf)
        self.state = State.WAITING
        self.backoff = Backoff()
        self.backoff_delay = 0.0
        """Seconds of the last respawn delay the backoff chose."""
        self._timer_gen = 0
        self._proc: Process | None = None
        self._nursery: trio.Nursery | None = None
        self._started_at: float | None = None
        self._wall_offset = 0.0
        self.restarts = 0
        """Spawns after the first one, not counting on-demand wakes (``wakes``)."""
        self._spawned_once = False
        self._woken = False
        self._running_spec: VassalSpec | None = None
        """The spec the live process was started with: it is stopped with its
        settings, even after the desired spec changed (see update())."""
        self.reloads = 0
        self.last_returncode: int | None = None
        self.last_error: str | None = None
        self.finished = trio.Event()
        # on demand
        self._held: dict[SocketSpec, HeldSocket] = {}
        self._connections = connections or ConnectionTable()
        self._arm_gen = 0
        self._arm_scope: trio.CancelScope | None = None
        self.wakes = 0
        self.first_accept: float | None = None
        """Seconds from the waking connection to the vassal's first accept (TCP)."""
        # sd_notify
        self._notify_hub = notify_hub
        self.notify_ready = False
        self.notify_status: str | None = None
        self.last_watchdog: float | None = None

    # -- commands (called by the emperor, never block) ----------------------

    def update(self, version: str, spec: VassalSpec) -> None:
        """A new configuration: restart, or send the reload signal if that is enough."""
        old = self.spec
        self.version, self.spec = version, spec
        self._times["last_mod"] = trio.current_time()
        in_place = (
            isinstance(spec, NativeSpec)
            and isinstance(old, NativeSpec)
            and spec.reload_signal is not None
            and spec.launch_key() == old.launch_key()
        ) or (
            isinstance(spec, UwsgiSpec)
            and isinstance(old, UwsgiSpec)
            and spec.launch_key() == old.launch_key()
        )
        self._post(Ev.SIGNAL if in_place else Ev.RESTART)

    def reload(self) -> None:
        """Explicit reload (SIGHUP to the emperor)."""
        in_place = isinstance(self.spec, UwsgiSpec) or (
            isinstance(self.spec, NativeSpec) and self.spec.reload_signal is not None
        )
        self._post(Ev.SIGNAL if in_place else Ev.RESTART)

    def clear_backoff(self) -> None:
        """Forget the backoff; if waiting for a restart, start now (SIGURG)."""
        if self.state is State.WAITING:
            self._post(Ev.RESTART)
        else:
            self.backoff = self.backoff.reset()

    def stop(self) -> None:
        self._post(Ev.STOP)

    def restart(self) -> None:
        """Restart the process now (``ctl restart``), whatever its reload signal."""
        self._post(Ev.RESTART)

    def send_signal(self, sig: int) -> bool:
        """Send *sig* to the vassal's main process; False if it has none."""
        if self._proc is None:
            return False
        self._proc.send(sig)
        return True

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._observer is not None:
            try:
                self._observer(kind, self.name, **fields)
            except Exception:  # an observer's bug must not touch the vassal
                log.exception("vassal.observer_failed name=%s event=%s", self.name, kind)

    def kill(self) -> None:
        self._post(Ev.KILL)

    def _post(self, event: Ev, payload: Any = None) -> None:
        # Already finished: its loop closed the receiving end, or run() its own.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(_Post(event, payload))

    # -- the loop -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._wall_offset = time.time() - trio.current_time()
        self._times["born"] = self._times["last_mod"] = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                if self._bind_sockets():
                    first = Ev.REARM if self.spec.on_demand else Ev.TIMER
                    await self._dispatch(_Post(first, self._timer_gen))
                else:
                    await self._dispatch(_Post(Ev.SPAWN_FAILED))
                async with self._recv:
                    async for post in self._recv:
                        await self._dispatch(post)
                        if self.state is State.STOPPED:
                            break
                nursery.cancel_scope.cancel()
        finally:
            self._send.close()
            if self._proc is not None:
                # Cancelled or crashed: nothing may outlive us.
                with trio.CancelScope(shield=True):
                    self._proc.signal_group(signal.SIGKILL)
                    await _close(self._proc)
                self._proc = None
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            for held in self._held.values():
                held.close()
            self._held.clear()
            self.finished.set()
            log.info("vassal.finished name=%s", self.name)

    async def _dispatch(self, post: _Post) -> None:
        ev = post.event
        if ev is Ev.EXITED and post.payload is not self._proc:
            return  # a process we already forgot
        if (
            ev in (Ev.READY, Ev.IDLE)
            and post.payload is not None
            and post.payload is not self._proc
        ):
            return  # about a process that has exited since (its exit was queued first)
        if ev in (Ev.TIMER, Ev.REARM) and post.payload != self._timer_gen:
            return  # a timer that was cancelled by a reset
        if ev is Ev.WAKE and (post.payload != self._arm_gen or self.state is not State.ARMED):
            return  # an old wake-up
        if ev is Ev.EXITED:
            self._record_exit(post.payload)
            if (
                self.state in _UP
                and isinstance(self.spec, UwsgiSpec)
                and self.last_returncode == EXILE_CODE
            ):
                log.warning(
                    "vassal.exiled name=%s code=%d respawn=on_configuration_change",
                    self.name,
                    EXILE_CODE,
                )
                self.retired = True
                ev = Ev.EXILED
            elif self.state in _UP and self.spec.on_demand and self.last_returncode == 0:
                log.info("vassal.asleep name=%s reason=exited sockets=armed", self.name)
                ev = Ev.SLEPT
        if ev is Ev.RETIRE:
            self.retired = True
        tr = step(self.state, ev)
        if tr.next is not self.state:
            log.debug(
                "vassal.state name=%s %s->%s on %s",
                self.name,
                self.state.value,
                tr.next.value,
                ev.value,
            )
        if tr.next is not self.state:
            self._emit("state", state=tr.next.value, previous=self.state.value, on=ev.value)
        self.state = tr.next
        for act in tr.actions:
            await self._act(act, post)

    async def _act(self, act: Act, post: _Post) -> None:
        now = trio.current_time()
        if act is Act.SPAWN:
            await self._spawn()
        elif act is Act.SCHEDULE:
            started = self._started_at if post.event is Ev.EXITED else now
            self.backoff = self.backoff.after_exit(
                self._policy, started if started is not None else now, now, self._jitter()
            )
            delay = (self.backoff.next_start or now) - now
            self.backoff_delay = delay if self.backoff.attempt else 0.0
            if self.backoff.attempt:
                log.warning(
                    "vassal.backoff name=%s attempt=%d delay=%.3fs",
                    self.name,
                    self.backoff.attempt,
                    delay,
                )
                self._emit("backoff", attempt=self.backoff.attempt, delay=round(delay, 3))
            else:
                log.info("vassal.respawn name=%s", self.name)
            self._schedule(self.backoff.next_start or now)
        elif act is Act.RESET_BACKOFF:
            if self.backoff.attempt:
                log.info("vassal.backoff_reset name=%s", self.name)
            self.backoff = self.backoff.reset()
            self._timer_gen += 1
            self.reloads += 1
        elif act is Act.TERMINATE:
            if self.state is State.SLEEPING:
                log.info("vassal.idle name=%s action=sleep", self.name)
                for held in self._held.values():
                    held.state = "sleeping"
            self._terminate()
        elif act is Act.KILL:
            if self._proc is not None:
                log.warning("vassal.kill name=%s pid=%s", self.name, self._proc.pid)
                self._proc.signal_group(signal.SIGKILL)
        elif act is Act.SEND_RELOAD:
            # Reloaded in place, the process runs the new spec from now on.
            self._running_spec = self.spec
            if self._channel is not None and isinstance(self.spec, UwsgiSpec):
                self._channel.spec = self.spec
                self.ready = self.accepting = self.no_app = False
                log.info(
                    "vassal.reload_in_place name=%s pid=%s",
                    self.name,
                    self._proc.pid if self._proc else None,
                )
                if not self._channel.send(ToVassal.RELOAD) and self._proc is not None:
                    self._proc.signal_group(signal.SIGKILL)
                return
            assert isinstance(self.spec, NativeSpec) and self.spec.reload_signal is not None
            if self._proc is not None:
                sig = self.spec.reload_signal
                log.info(
                    "vassal.reload_signal name=%s pid=%s signal=%s",
                    self.name,
                    self._proc.pid,
                    signal.Signals(sig).name,
                )
                self._proc.send(sig)
        elif act is Act.ARM:
            if self._bind_sockets():
                self._arm()
            else:
                await self._dispatch(_Post(Ev.SPAWN_FAILED))
        elif act is Act.REBIND:
            self._disarm()
            if not self._bind_sockets():
                await self._dispatch(_Post(Ev.SPAWN_FAILED))
            elif not self.spec.on_demand:
                self._post(Ev.WAKE, self._arm_gen)
            else:
                self._arm()
        elif act is Act.FINISH:
            pass

    async def _spawn(self) -> None:
        assert self._nursery is not None
        channel = None
        try:
            if not self._bind_sockets():
                raise SpawnError(self.last_error or "cannot bind the sockets")
            fds = tuple(self._held[s].fd for s in self.spec.sockets)
            if isinstance(self.spec, UwsgiSpec):
                channel = UwsgiChannel(
                    self.spec, self._uwsgi, self._environ, stdin_fd=fds[0] if fds else None
                )
                plan = channel.plan
            else:
                plan = self._plan_for(self.spec, self._environ)
                env = dict(plan.env)
                if self._notify_hub is not None:
                    env["NOTIFY_SOCKET"] = self._notify_hub.address
                if self.spec.watchdog is not None:
                    env["WATCHDOG_USEC"] = str(int(self.spec.watchdog * 1_000_000))
                plan = replace(
                    plan,
                    env=tuple(env.items()),
                    listen_fds=fds,
                    listen_names=tuple(s.fd_name for s in self.spec.sockets),
                )
            proc = await self._spawner.spawn(plan)
        except (SpawnError, OSError) as exc:
            if channel is not None:
                channel.close()
            self.last_error = str(exc)
            log.error("vassal.spawn_failed name=%s error=%s", self.name, exc)
            await self._dispatch(_Post(Ev.SPAWN_FAILED))
            return
        self._proc = proc
        self.ready = self.accepting = self.loyal = self.no_app = self._announced = False
        self.last_heartbeat = self.last_watchdog = None
        self.notify_ready, self.notify_status = False, None
        for held in self._held.values():
            held.state = "handed over"
        if self._notify_hub is not None and isinstance(self.spec, NativeSpec):
            self._notify_hub.register(proc.pid, partial(self._on_notify, proc))
        if self.spec.idle is not None and self._held:
            self._nursery.start_soon(self._watch_idle, proc, self.spec.idle)
        if channel is not None:
            channel.spawned()
            self._channel = channel
            self._nursery.start_soon(self._converse, channel, proc)
        self._started_at = self._times["last_run"] = trio.current_time()
        self._times.pop("cursed", None)
        if self._spawned_once and not self._woken:
            self.restarts += 1
        self._spawned_once, self._woken = True, False
        self._running_spec = self.spec
        self.last_error = None
        log.info("vassal.spawned name=%s pid=%s kind=%s", self.name, proc.pid, self.spec.kind)
        self._emit("spawn", pid=proc.pid)
        self._nursery.start_soon(self._wait, proc)
        if proc.output is not None:
            self._nursery.start_soon(self._pump, proc.output)
        notify_type = isinstance(self.spec, NativeSpec) and self.spec.type == "notify"
        await self._dispatch(_Post(Ev.SPAWNED_NOTIFY if notify_type else Ev.SPAWNED))

    async def _wait(self, proc: Process) -> None:
        await proc.wait()
        self._post(Ev.EXITED, proc)

    def _record_exit(self, proc: Process) -> None:
        rc = proc.returncode
        self.last_returncode = rc
        self._proc = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._notify_hub is not None:
            self._notify_hub.unregister(proc.pid)
        how = f"signal={signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"code={rc}"
        log.info("vassal.exited name=%s pid=%s %s", self.name, proc.pid, how)
        self._emit(
            "exit",
            pid=proc.pid,
            code=rc if rc is not None and rc >= 0 else None,
            signal=signal.Signals(-rc).name if rc is not None and rc < 0 else None,
        )

    def _schedule(self, when: float) -> None:
        assert self._nursery is not None
        self._timer_gen += 1
        gen = self._timer_gen

        async def timer() -> None:
            await trio.sleep_until(when)
            self._post(Ev.REARM if self.spec.on_demand else Ev.TIMER, gen)

        self._nursery.start_soon(timer)

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        assert self._nursery is not None
        if self.state is State.STOPPING:
            self._times["cursed"] = trio.current_time()
        if self._channel is not None:
            # uWSGI: the stop message; SIGTERM would make its master reload.
            message = ToVassal.GRACEFUL_STOP if self._uwsgi.graceful_shutdown else ToVassal.STOP
            timeout = self._uwsgi.curse_tolerance
            log.info(
                "vassal.stopping name=%s pid=%s message=%s timeout=%ss",
                self.name,
                proc.pid,
                message.name,
                timeout,
            )
            self._channel.send(message)
        else:
            stop_signal, timeout = signal.SIGTERM, 10.0
            running = self._running_spec or self.spec
            if isinstance(running, NativeSpec):
                stop_signal = signal.Signals(running.stop_signal)
                timeout = running.stop_timeout
            log.info(
                "vassal.stopping name=%s pid=%s signal=%s timeout=%ss",
                self.name,
                proc.pid,
                signal.Signals(stop_signal).name,
                timeout,
            )
            proc.signal_group(stop_signal)

        async def escalate() -> None:
            await trio.sleep(timeout)
            if proc.returncode is None:
                log.warning(
                    "vassal.stop_timeout name=%s pid=%s action=sigkill_group",
                    self.name,
                    proc.pid,
                )
                proc.signal_group(signal.SIGKILL)

        self._nursery.start_soon(escalate)

    async def _converse(self, channel: UwsgiChannel, proc: Process) -> None:
        """Speak the emperor protocol with one uWSGI vassal process."""
        try:
            await channel.push_config()
        except SpawnError as exc:
            self.last_error = str(exc)
            log.error("vassal.config_refused name=%s error=%s", self.name, exc)
        async for byte in channel.messages():
            if proc is not self._proc:
                return
            if byte in _STAMPED:
                self._times[_STAMPED[byte]] = trio.current_time()
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
                self.backoff = self.backoff.reset()
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
                        self._watch_deadline, proc, "heartbeat", self._uwsgi.required_heartbeat
                    )
            elif byte == ToEmperor.IDLE:
                if self.spec.on_demand:
                    log.info("vassal.idle name=%s action=back_to_on_demand", self.name)
                    self._post(Ev.IDLE)
                else:
                    log.info("vassal.idle name=%s action=stop reason=vassal_asked", self.name)
                    self._post(Ev.RETIRE)
            elif byte == ToEmperor.SOS:
                log.info("vassal.sos name=%s broodlord=unsupported", self.name)
            else:
                log.debug("vassal.message name=%s byte=%s", self.name, describe(byte))

    # -- on demand ------------------------------------------------------------

    def _bind_sockets(self) -> bool:
        """Hold exactly the sockets of the current spec; False (and logged) on failure."""
        wanted = set(self.spec.sockets)
        for spec in list(self._held):
            if spec not in wanted:
                log.info("socket.closed name=%s address=%s", self.name, spec.address)
                self._held.pop(spec).close()
        for spec in self.spec.sockets:
            if spec in self._held:
                continue
            try:
                self._held[spec] = bind(
                    spec, self.spec.uid, self.spec.gid, as_user=self.spec.tyrant
                )
            except SpawnError as exc:
                self.last_error = str(exc)
                log.error("vassal.bind_failed name=%s error=%s", self.name, exc)
                return False
        return True

    def _arm(self) -> None:
        """Wait for the first connection on any held socket, without accepting it."""
        assert self._nursery is not None
        self._disarm()
        self._arm_gen += 1
        gen = self._arm_gen
        for held in self._held.values():
            held.state = "armed"
        log.info(
            "vassal.armed name=%s sockets=%s",
            self.name,
            ",".join(h.spec.address for h in self._held.values()),
        )
        scope = self._arm_scope = trio.CancelScope()

        async def wait_for_connection(held: HeldSocket) -> None:
            try:
                await held.wait_readable()
            except trio.ClosedResourceError:
                return  # rebound meanwhile; a new arming is under way
            if gen == self._arm_gen and self.state is State.ARMED:
                scope.cancel()
                self._wake(held)

        async def arm() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for held in list(self._held.values()):
                        nursery.start_soon(wait_for_connection, held)

        self._nursery.start_soon(arm)

    def _disarm(self) -> None:
        if self._arm_scope is not None:
            self._arm_scope.cancel()
            self._arm_scope = None

    def _wake(self, held: HeldSocket) -> None:
        assert self._nursery is not None
        self.wakes += 1
        self._woken = True
        self._times["last_wake"] = woke = trio.current_time()
        log.info("vassal.wake name=%s address=%s", self.name, held.spec.address)
        self._post(Ev.WAKE, self._arm_gen)
        before = held.pending()
        if before:
            self._nursery.start_soon(self._time_first_accept, held, before, woke)

    async def _time_first_accept(self, held: HeldSocket, before: int, woke: float) -> None:
        """Time until the accept queue shrinks: the vassal's first accept (TCP only)."""
        with trio.move_on_after(30):
            while True:
                pending = held.pending()
                if pending is None or pending < before:
                    self.first_accept = trio.current_time() - woke
                    return
                await trio.sleep(0.001)

    async def _watch_idle(self, proc: Process, idle: float) -> None:
        """Put the vassal to sleep after *idle* seconds without a client connection."""
        step = min(1.0, idle / 4)
        quiet_since: float | None = None
        arrivals = self._connections.arrivals
        for held in self._held.values():
            arrivals.watch(held)
        arrived: int | None = None
        while proc is self._proc and self.state in _UP:
            open_now = sum(self._connections.connections(h) for h in self._held.values())
            open_now += sum(h.pending() or 0 for h in self._held.values())
            # Connections that came and went since the last look count too.
            counts = [arrivals.count(h) for h in self._held.values()]
            seen = None if None in counts else sum(c or 0 for c in counts)
            fresh = seen is not None and seen != arrived
            arrived = seen
            now = trio.current_time()
            if open_now or fresh:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= idle:
                self._post(Ev.IDLE, proc)
                return
            await trio.sleep(step)

    # -- sd_notify ----------------------------------------------------------------

    def _on_notify(self, proc: Process, fields: dict[str, str]) -> None:
        """A message on the shared NOTIFY_SOCKET from this vassal's process group."""
        if proc is not self._proc:
            return
        if fields.get("READY") == "1" and not self.notify_ready:
            self.notify_ready = True
            log.info("vassal.ready name=%s pid=%s", self.name, proc.pid)
            self._post(Ev.READY, proc)
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
                    _MISSED[what] + " name=%s pid=%s limit=%ss action=sigkill_group",
                    self.name,
                    proc.pid,
                    limit,
                )
                proc.signal_group(signal.SIGKILL)
                return
            await trio.sleep_until(deadline)

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
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
                        self._log_line(line)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        if buf:
            self._log_line(buf)

    def _log_line(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        vassal_log.info("%s| %s", self.name, text)
        self._emit("log", line=text)
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

    _snapshot_cache: tuple[int, dict[str, float], list[tuple[str, str]], VassalStats] | None = None
    _changes = 0
    """Bumped by every attribute assignment: with ``_times`` and the held sockets'
    states (changed in place), it covers every input of :meth:`snapshot`."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name != "_snapshot_cache":
            object.__setattr__(self, "_changes", self._changes + 1)

    def snapshot(self) -> VassalStats:
        """The vassal's frozen stats; the same object again while nothing it shows changed.

        Unchanged (no attribute assigned, no time stamped, no socket's state
        changed since the last call) costs a few comparisons, and the stats
        document then reuses the vassal's JSON.
        """
        cached = self._snapshot_cache
        sockets = [(h.spec.address, h.state) for h in self._held.values()]
        if (
            cached is not None
            and cached[0] == self._changes
            and cached[1] == self._times
            and cached[2] == sockets
        ):
            return cached[3]
        snap = self._make_snapshot()
        self._snapshot_cache = (self._changes, dict(self._times), sockets, snap)
        return snap

    def _make_snapshot(self) -> VassalStats:
        rc = self.last_returncode
        next_start = None
        if self.state is State.WAITING and self.backoff.next_start is not None:
            next_start = self.backoff.next_start + self._wall_offset
        return VassalStats(
            name=self.name,
            source=self.source,
            kind=self.spec.kind,
            state=self.state.value,
            pid=self._proc.pid if self._proc is not None else None,
            started_at=(
                self._started_at + self._wall_offset
                if self._proc is not None and self._started_at is not None
                else None
            ),
            restarts=self.restarts,
            backoff_attempt=self.backoff.attempt,
            backoff_delay=self.backoff_delay if self.backoff.attempt else 0.0,
            next_start=next_start,
            last_exit_code=rc if rc is not None and rc >= 0 else None,
            last_exit_signal=signal.Signals(-rc).name if rc is not None and rc < 0 else None,
            config_version=self.version,
            reloads=self.reloads,
            last_error=self.last_error,
            ready=self.ready,
            no_app=self.no_app,
            accepting=self.accepting,
            loyal=self.loyal,
            last_heartbeat=(
                self.last_heartbeat + self._wall_offset if self.last_heartbeat is not None else None
            ),
            born=self._wall("born"),
            last_run=self._wall("last_run"),
            last_mod=self._wall("last_mod"),
            last_ready=self._wall("last_ready"),
            last_accepting=self._wall("last_accepting"),
            last_loyal=self._wall("last_loyal"),
            cursed=self._wall("cursed") if self.state is State.STOPPING else None,
            uid=self.spec.uid,
            gid=self.spec.gid,
            on_demand=",".join(s.address for s in self.spec.sockets) if self.spec.on_demand else "",
            sockets=tuple((h.spec.address, h.state) for h in self._held.values()),
            wakes=self.wakes,
            last_wake=self._wall("last_wake"),
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
