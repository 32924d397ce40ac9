"""The emperor: the nursery tree, the inbox and the only place that decides.

::

    sources nursery:  one task per monitor ──► inbox ──► Registry (pure) ──► actions
    vassals nursery:  one Supervisor per vassal ◄──────────────────────────────┘

Monitors never touch vassals and supervisors never read sources. A monitor that
fails after it started is logged and restarted; it never takes the emperor down.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import trio

from trimperor import __version__
from trimperor.abc import Monitor, Spawner
from trimperor.control.api import serve_stats
from trimperor.control.health import Oversight
from trimperor.control.hub import ControlHub, ControlOptions, ControlRequest, held_stats
from trimperor.control.surfaces import serve_surfaces
from trimperor.control.vassallogs import LogFiles
from trimperor.core.errors import ConfigError, Refused, SpawnError
from trimperor.core.model import SourceEvent, VassalDocument, describe_version
from trimperor.core.policy import BackoffPolicy
from trimperor.core.reconcile import Action, Notice, Registry, Reload, Start, Stop
from trimperor.core.stats import DocumentCache, EmperorStats, SourceStats, VassalStats
from trimperor.core.vassalspec import NativeSpec, VassalSpec, build_spec, tyrant
from trimperor.supervisor import Supervisor, SupervisorContext
from trimperor.vassals.armory import Armory
from trimperor.vassals.notify import Notifier, NotifyHub
from trimperor.vassals.sockets import ConnectionTable
from trimperor.vassals.spawner import resolve_ids
from trimperor.vassals.uwsgi import UwsgiOptions

if TYPE_CHECKING:
    from trimperor.fleet.member import Fleet

__all__ = ["Emperor"]

log = logging.getLogger(__name__)

#: Characters of configuration text the inbox parses on the event loop itself.
_PARSE_HERE_MAX = 16 * 1024
#: After an event that parsed or acted on this many vassals, the C heap's free
#: pages go back to the system (what parsing a large snapshot left behind).
_TRIM_AFTER = 256

#: Seconds of work the stats document takes from the event loop before letting others run.
STATS_SLICE = 0.0005

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _TrackingStatus:
    """Wraps a TaskStatus to remember whether ``started()`` was called."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self.inner = inner
        self.started_called = False

    def started(self, value: None = None) -> None:
        self.started_called = True
        self.inner.started(value)


def _resolve(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    try:
        uid, gid, _ = resolve_ids(user, group, init_groups=False)
    except SpawnError as exc:
        raise ConfigError(str(exc)) from None
    return uid, gid


def _log_files(control: ControlOptions | None) -> LogFiles:
    if control is None:
        return LogFiles(None)
    return LogFiles(control.logs_dir, control.log_max_bytes, control.log_backups)


def _source_stats(monitor: Monitor, owned: int) -> SourceStats:
    return replace(monitor.status.snapshot(), vassals=owned)


@cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _return_free_memory() -> None:
    """Give the free pages of the C heap back to the system; blocking (a thread).

    Python frees the objects of a parsed snapshot, but the allocator keeps their
    pages: 10,000 armed vassals are about 2 MB smaller in RSS after this.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Emperor:
    def __init__(
        self,
        monitors: Sequence[Monitor],
        *,
        spawner: Spawner,
        policy: BackoffPolicy | None = None,
        environ: Mapping[str, str] | None = None,
        extra_extensions: Iterable[str] = (),
        stats_address: str | None = None,
        retry_interval: float = 3.0,
        uwsgi: UwsgiOptions | None = None,
        tyrant: bool = False,
        tyrant_initgroups: bool = False,
        fleet: Fleet | None = None,
        control: ControlOptions | None = None,
    ) -> None:
        self.monitors = tuple(monitors)
        self._spawner = spawner
        self._policy = policy or BackoffPolicy()
        self._environ = dict(os.environ if environ is None else environ)
        self._cwd = os.getcwd()
        self._extra_extensions = tuple(extra_extensions)
        self._stats_address = stats_address
        self._retry = retry_interval
        self.tyrant = tyrant
        self._tyrant_initgroups = tyrant_initgroups
        self._uwsgi = uwsgi or UwsgiOptions(extra_extensions=self._extra_extensions)
        self.registry: Registry[VassalSpec] = Registry(self._parse)
        self._parsed: dict[int, VassalSpec | Exception] = {}
        self._send, self._recv = trio.open_memory_channel[SourceEvent | ControlRequest](1024)
        self._sups: dict[str, Supervisor] = {}
        self._stopping: set[str] = set()
        """Vassals told to stop whose supervisor has not finished yet. Once it has, the
        registry says whether the name should run again (its desired spec, the only copy)."""
        self._respawning: set[str] = set()
        """Vassals whose supervisor crashed, waiting to be started afresh."""
        self._vassals: trio.Nursery | None = None
        self._armory: Armory | None = None
        self._context: SupervisorContext | None = None
        """What every supervisor refers to (made once the armory runs)."""
        self._shutdown = trio.Event()
        self._notifier = Notifier(self._environ)
        self._connections = ConnectionTable()
        self._notify_hub = NotifyHub()  # one read of /proc/net serves every vassal
        self._started_at = 0.0
        self._wall_offset = 0.0
        self.stats_bound: Any = None
        self._stats_cache = DocumentCache()
        self._stats_changed: set[str] = set()
        self._stats_lock = trio.Lock()  # one patching of the kept document at a time
        """Vassals whose part of the stats document may be out of date (they say so)."""
        # --cluster: the names of vassals placed on other nodes.
        self._fleet = fleet
        self._parked: set[str] = set()
        """Vassals the registry wants running that are placed on other nodes (their
        spec is the registry's: :meth:`Registry.desired` when they are placed here)."""
        # control surfaces (trimperor ctl, dashboard, metrics)
        self._control = control
        self.hub = ControlHub(log_files=_log_files(control))
        self._held: dict[str, VassalStats] = {}
        """Vassals stopped by ``ctl stop``: their last stats, until started or changed."""
        self.control_bound: dict[str, str] = {}
        # health checks and on-failure hooks (they run in the services nursery)
        self._oversight = Oversight(
            self._sups, self._stopping, spawner, self._environ, self.hub, self._shutdown
        )

    # -- control (from the CLI's signal handler, or tests) -------------------

    def shutdown(self) -> None:
        """Stop every vassal gracefully and in parallel, then return from run()."""
        self._shutdown.set()

    def kill_all(self) -> None:
        """SIGKILL every vassal's process group now."""
        for sup in self._sups.values():
            sup.kill()

    def reload_all(self) -> None:
        log.info("emperor.reload_all vassals=%d", len(self._sups))
        for name, sup in self._sups.items():
            if name not in self._stopping:
                sup.reload()

    def clear_throttles(self) -> None:
        """Forget every vassal's backoff; those waiting for a restart start now."""
        log.info("emperor.clear_throttles")
        for name, sup in self._sups.items():
            if name not in self._stopping:
                sup.clear_backoff()

    def log_status(self) -> None:
        """One log line per vassal (SIGUSR1)."""
        for v in self.snapshot().vassals:
            log.info(
                "vassal.status name=%s state=%s pid=%s restarts=%d backoff=%d source=%s",
                v.name,
                v.state,
                v.pid,
                v.restarts,
                v.backoff_attempt,
                v.source,
            )

    def supervisor(self, name: str) -> Supervisor | None:
        return self._sups.get(name)

    def control_snapshot(self) -> EmperorStats:
        """The snapshot the control surfaces show: with the vassals ``ctl stop`` holds."""
        stats = self.snapshot()
        held = [s for n, s in self._held.items() if n not in self._sups]
        vassals = [
            replace(
                v,
                held=v.name in self._held,
                health=self._oversight.health(v.name),
            )
            if v.name in self._held or self._oversight.health(v.name) is not None
            else v
            for v in stats.vassals
        ]
        return replace(stats, vassals=tuple(sorted(vassals + held, key=lambda v: v.name)))

    def snapshot(self) -> EmperorStats:
        return self._emperor_stats(tuple(self._sups[n].snapshot() for n in sorted(self._sups)))

    async def stats_document(self) -> bytes:
        """The stats document (``--stats``), as one byte string."""
        return b"".join(await self.stats_chunks())

    async def stats_chunks(self) -> Iterable[bytes]:
        """The stats document in pieces, made without holding up the event loop.

        The document is kept between requests (:class:`~trimperor.core.stats.DocumentCache`)
        and patched with the vassals that changed since: each supervisor puts its
        name in :attr:`_stats_changed` when something it shows changes, so the
        others are not even asked. The patching yields to the event loop every
        :data:`STATS_SLICE` seconds (it matters for the first document, when
        every vassal's JSON is made), and a vassal changing meanwhile is taken
        up by the next document.
        """
        async with self._stats_lock:
            return await self._patch_stats()

    async def _patch_stats(self) -> Iterable[bytes]:
        cache, changed = self._stats_cache, self._stats_changed
        until = trio.current_time() + STATS_SLICE
        for i, name in enumerate(list(changed)):
            if name in changed:
                changed.discard(name)
                sup = self._sups.get(name)
                if sup is None:
                    cache.drop(name)
                else:
                    cache.put(sup.snapshot())
            if i % 16 == 15 and trio.current_time() > until:
                await trio.lowlevel.checkpoint()
                until = trio.current_time() + STATS_SLICE
        cache.arrange()
        return cache.chunks(self._emperor_stats(cache.vassals()))

    def _emperor_stats(self, vassals: tuple[VassalStats, ...]) -> EmperorStats:
        now = trio.current_time()
        return EmperorStats(
            pid=os.getpid(),
            version=__version__,
            sources=tuple(_source_stats(m, self.registry.count(m.uri)) for m in self.monitors),
            uptime=now - self._started_at,
            vassals=vassals,
            uid=os.getuid(),
            gid=os.getgid(),
            cwd=os.getcwd(),
            tyrant=self.tyrant,
            fleet=(
                self._fleet.snapshot({n: s.placement for n, s in self.registry.running().items()})
                if self._fleet is not None
                else None
            ),
        )

    # -- the tree -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started_at = trio.current_time()
        self._wall_offset = time.time() - self._started_at  # noqa: TID251 (stats epochs)
        log.info(
            "emperor.start pid=%s version=%s sources=%s",
            os.getpid(),
            __version__,
            ",".join(m.uri for m in self.monitors),
        )
        async with trio.open_nursery() as services:
            # One NOTIFY_SOCKET for every native vassal; it outlives them all.
            await services.start(self._notify_hub.run)
            # Connections arriving at held sockets, for idle (one task for all).
            services.start_soon(self._connections.arrivals.run)
            # The first connection at armed sockets, for on demand (one task for all).
            self._armory = Armory()
            await services.start(self._armory.run)
            # What every supervisor refers to: one record for all.
            self._context = SupervisorContext(
                self._spawner,
                self._environ,
                uwsgi=self._uwsgi,
                connections=self._connections,
                notify_hub=self._notify_hub,
                observer=self._observe,
                armory=self._armory,
                resume=self._resume,
                changed=self._stats_changed,
            )
            if self._fleet is not None:
                self._fleet.attach(
                    running=self._sups.__contains__,
                    changed=self._placement_changed,
                    kill=self._fence_kill,
                )
                await services.start(self._fleet.run)
            self._oversight.nursery = services
            services.start_soon(self._watch_sources)
            if self._control is not None:
                self.control_bound = await services.start(
                    serve_surfaces,
                    self._control,
                    self.hub,
                    self.control_snapshot,
                    self._submit_control,
                )
            async with trio.open_nursery() as vassals:
                self._vassals = vassals
                try:
                    async with trio.open_nursery() as sources:
                        sources.start_soon(self._inbox_loop)
                        for monitor in self.monitors:
                            await sources.start(self._run_monitor, monitor)
                        if self._stats_address is not None:
                            self.stats_bound = await sources.start(
                                partial(serve_stats, document=self.stats_chunks),
                                self._stats_address,
                                self.snapshot,
                            )
                        log.info("emperor.ready vassals=%d", len(self._sups))
                        self._notifier.send(READY="1", STATUS=self._status_line())
                        task_status.started()
                        await self._shutdown.wait()
                        sources.cancel_scope.cancel()
                finally:
                    self._notifier.send(STOPPING="1", STATUS="The Emperor is stopping")
                    if self._sups:
                        log.info("emperor.stopping vassals=%d", len(self._sups))
                    if self._fleet is not None:
                        self._fleet.leave()
                    for name, sup in self._sups.items():
                        self._stopping.add(name)
                        sup.stop()
            services.cancel_scope.cancel()
        self.hub.log_files.close_all()
        log.info("emperor.stopped")

    async def _run_monitor(
        self, monitor: Monitor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        status = _TrackingStatus(task_status)
        while True:
            try:
                await monitor.run(self._send.clone(), task_status=status)
                log.warning("source.ended uri=%s restart_in=%ss", monitor.uri, self._retry)
            except Exception as exc:
                if not status.started_called:
                    raise
                log.exception(
                    "source.crashed uri=%s error=%r restart_in=%ss",
                    monitor.uri,
                    exc,
                    self._retry,
                )
            if not status.started_called:
                status.started()
            await trio.sleep(self._retry)

    async def _inbox_loop(self) -> None:
        async for event in self._recv:
            if isinstance(event, ControlRequest):
                try:
                    self._handle_control(event)
                except Exception:
                    log.exception("emperor.bad_control_request command=%s", event.command)
                    event.reply({}, {"": "internal error; see the emperor's log"})
                continue
            # Parsing is bounded (sizes, no YAML aliases) but still CPU work
            # proportional to the input: do it off the event loop, so that no
            # document can delay a wake, a stop or a heartbeat.
            # A few small documents parse in microseconds, less than a thread
            # hand-off costs: those stay here.
            docs = self.registry.to_parse(event)
            if sum(len(doc.text or "") for doc in docs) > _PARSE_HERE_MAX:
                self._parsed = await trio.to_thread.run_sync(self._parse_all, docs)
            try:
                actions = self.registry.handle(event)
            except Exception:
                log.exception("emperor.bad_event event=%r", event)
                continue
            finally:
                self._parsed = {}
            for action in actions:
                self._apply(action)
            large = len(docs) + len(actions) >= _TRIM_AFTER
            del event, docs, actions  # nothing of a large snapshot kept until the next event
            if large:
                await trio.to_thread.run_sync(_return_free_memory)
            if self._fleet is not None:
                self._fleet.set_catalogue(
                    {n: s.placement for n, s in self.registry.running().items()}
                )
                self._placement_changed()

    def _parse_all(self, docs: list[VassalDocument]) -> dict[int, VassalSpec | Exception]:
        """In a worker thread: each document's spec, or the error parsing raised."""
        parsed: dict[int, VassalSpec | Exception] = {}
        for doc in docs:
            try:
                parsed[id(doc)] = self._parse_now(doc)
            except Exception as exc:  # re-raised where handle() parses it
                parsed[id(doc)] = exc
        return parsed

    # -- decisions --------------------------------------------------------------

    def _parse(self, doc: VassalDocument) -> VassalSpec:
        done = self._parsed.get(id(doc))
        if done is None:
            return self._parse_now(doc)
        if isinstance(done, Exception):
            raise done
        return done

    def _parse_now(self, doc: VassalDocument) -> VassalSpec:
        spec = build_spec(doc, self._environ, self._extra_extensions, cwd=self._cwd)
        if self.tyrant:
            spec = tyrant(spec, doc, _resolve, self._tyrant_initgroups)
            if isinstance(spec, NativeSpec) and spec.log_file is not None:
                # The emperor writes log files as itself: never at a vassal owner's choice.
                raise Refused(
                    f"{doc.name}: log-file is not allowed in tyrant mode (the emperor would "
                    "write it with its own rights); use logto, or --logs-dir"
                )
        return spec

    def _apply(self, action: Action[VassalSpec]) -> None:
        if isinstance(action, Notice):
            where = f" name={action.name}" if action.name else ""
            log.log(
                _LEVELS.get(action.level, logging.WARNING),
                "%s%s source=%s reason=%s",
                action.event,
                where,
                action.source,
                action.message,
            )
        elif isinstance(action, Start):
            self._unhold(action.name, "its configuration changed")
            if action.name not in self._sups and action.name not in self._respawning:
                self._start(action)
            # else the old one is stopping: the registry's spec starts once it is gone
        elif isinstance(action, Reload):
            self._unhold(action.name, "its configuration changed")
            if action.name in self._stopping or action.name in self._respawning:
                pass  # starts with the registry's (new) spec once the old one is gone
            elif action.name not in self._sups:
                self._start(Start(action.name, action.source, action.version, action.spec))
            else:
                shown = describe_version(action.version)  # mtime=... size=... for a file
                if shown == action.version:
                    shown = f"version={shown}"
                log.info("vassal.reload name=%s %s", action.name, shown)
                self._sups[action.name].update(action.version, action.spec)
                self._oversight.ensure(action.name)
                self._configure_log(action.name, action.spec)
        elif isinstance(action, Stop):
            if self._held.pop(action.name, None) is not None and action.name not in self._sups:
                self.hub.forget(action.name)  # stopped by ctl, now removed: gone for good
            self._parked.discard(action.name)
            sup = self._sups.get(action.name)
            if sup is not None and action.name not in self._stopping:
                log.info("vassal.remove name=%s", action.name)
                self._stopping.add(action.name)
                sup.stop()

    def _status_line(self) -> str:
        return f"The Emperor is governing {len(self._sups)} vassals"

    # -- the fleet (--cluster): only the vassals placed on this node run ---------------

    def _placement_changed(self) -> None:
        """Start the parked vassals placed here now; stop those placed elsewhere."""
        fleet = self._fleet
        if fleet is None or self._shutdown.is_set():
            return
        for name in list(self._parked):
            start = self.registry.desired(name)
            if start is None:
                self._parked.discard(name)  # no longer wanted (a Stop is on its way)
            elif fleet.here(name, start.spec.placement):
                self._parked.discard(name)
                if name not in self._sups and name not in self._respawning:
                    self._start(start)
        desired = self.registry.running()
        for name, sup in self._sups.items():
            spec = desired.get(name)
            if name in self._stopping or spec is None or fleet.here(name, spec.placement):
                continue
            log.info("vassal.not_here name=%s reason=%s", name, fleet.reason(name, spec.placement))
            self._stopping.add(name)  # once stopped, parked again by _start
            sup.stop()

    def _fence_kill(self) -> None:
        """This node lost its lease: SIGKILL the fenced vassals still stopping."""
        for name, sup in self._sups.items():
            if name in self._stopping and sup.spec.placement.fenced:
                log.error("vassal.fence_kill name=%s: still running, killed", name)
                with contextlib.suppress(trio.BrokenResourceError):  # it has just ended
                    sup.kill()

    def _start(self, action: Start[VassalSpec]) -> None:
        assert self._vassals is not None
        if self._fleet is not None and not self._fleet.here(action.name, action.spec.placement):
            self._parked.add(action.name)
            return

        assert self._context is not None
        sup = Supervisor(
            action.name, action.source, action.version, action.spec, self._context, self._policy
        )
        self._sups[action.name] = sup
        self._oversight.ensure(action.name)
        self._configure_log(action.name, action.spec)
        self._notifier.status(self._status_line())
        if not sup.begin_armed():
            self._vassals.start_soon(self._run_supervisor, sup)

    def _resume(self, sup: Supervisor) -> None:
        """Run a dormant supervisor again (one method for all: no closure per vassal)."""
        assert self._vassals is not None
        self._vassals.start_soon(self._run_supervisor, sup)

    async def _run_supervisor(self, sup: Supervisor) -> None:
        crashed = False
        try:
            await sup.run()
        except Exception:
            # A bug in a supervisor must not take the emperor (and every other
            # vassal) down: its process was killed on the way out; start afresh.
            log.exception("vassal.supervisor_crashed name=%s restart_in=%ss", sup.name, self._retry)
            crashed = True
        finally:
            if sup.dormant:
                return  # noqa: B012 - dormant: run() returned, no exception to lose
            if self._sups.get(sup.name) is sup:
                del self._sups[sup.name]
                self._stats_changed.add(sup.name)
                if not self._shutdown.is_set():
                    self._notifier.status(self._status_line())
            if sup.retired and sup.name not in self._stopping:
                self.registry.retired(sup.name)
            was_stopping = sup.name in self._stopping
            self._stopping.discard(sup.name)
            if self._fleet is not None:
                self._fleet.wake()  # a claim this node held may go now
            if crashed and not was_stopping and not self._shutdown.is_set():
                # Reloads arriving meanwhile change the registry's spec, started below.
                self._respawning.add(sup.name)
                try:
                    await trio.sleep(self._retry)
                finally:
                    self._respawning.discard(sup.name)
            if (was_stopping or crashed) and not self._shutdown.is_set():
                self._start_desired(sup.name)
            if sup.name in self._held:
                self._held[sup.name] = held_stats(sup.snapshot())
            elif sup.name not in self._sups and self.registry.owner(sup.name) is None:
                self.hub.forget(sup.name)

    def _start_desired(self, name: str) -> None:
        """Start *name* if the registry wants it running and nothing holds it back."""
        if name in self._sups or name in self._held or name in self._respawning:
            return
        start = self.registry.desired(name)
        if start is not None:
            self._start(start)

    async def _watch_sources(self) -> None:
        """Publish every change of a source's state (connected, retrying, ...)."""
        seen: dict[str, str] = {}
        while True:
            for monitor in self.monitors:
                snap = _source_stats(monitor, 0)
                if seen.get(monitor.uri) != snap.state:
                    if monitor.uri in seen:
                        self.hub.emit(
                            "source", None, uri=monitor.uri, state=snap.state, error=snap.last_error
                        )
                    seen[monitor.uri] = snap.state
            await trio.sleep(1.0)

    def _configure_log(self, name: str, spec: VassalSpec) -> None:
        if isinstance(spec, NativeSpec):
            self.hub.log_files.configure(name, spec.log_file, spec.log_max_bytes, spec.log_backups)
        else:
            self.hub.log_files.configure(name, None, None, None)

    def _observe(self, kind: str, name: str, **fields: Any) -> None:
        """What supervisors report: published, and watched for failures (hooks)."""
        self.hub.emit(kind, name, **fields)
        self._oversight.observe(kind, name, fields)

    # -- control requests (trimperor ctl, the dashboard) ---------------------------

    async def _submit_control(self, req: ControlRequest) -> None:
        """Into the inbox; answered at once while shutting down (nobody reads it then)."""
        if self._shutdown.is_set():
            req.reply({}, dict.fromkeys(req.names or ("*",), "the emperor is shutting down"))
            return
        await self._send.send(req)

    def _unhold(self, name: str, why: str) -> None:
        if self._held.pop(name, None) is not None:
            log.info("vassal.unheld name=%s: %s", name, why)

    def _handle_control(self, req: ControlRequest) -> None:
        """One control command, answered at once: the emperor decides, as for sources."""
        known = set(self._sups) | set(self._held)
        names = sorted(known) if req.all else list(dict.fromkeys(req.names))
        done: dict[str, str] = {}
        errors: dict[str, str] = {}
        stopping = self._shutdown.is_set()
        for name in names:
            if stopping:
                errors[name] = "the emperor is shutting down"
            elif name not in known:
                errors[name] = "no such vassal"
            else:
                outcome = self._control_one(req, name)
                if outcome.startswith("!"):
                    errors[name] = outcome[1:]
                else:
                    done[name] = outcome
        log.info(
            "control.%s names=%s done=%d errors=%d",
            req.command,
            ",".join(names) or "-",
            len(done),
            len(errors),
        )
        self.hub.emit("control", command=req.command, names=names, errors=errors)
        req.reply(done, errors)

    def _control_one(self, req: ControlRequest, name: str) -> str:
        """What happened to *name*; a leading ``!`` marks an error."""
        sup = self._sups.get(name)
        gone = sup is None or name in self._stopping
        if req.command == "stop":
            if name in self._held:
                return "already stopped"
            assert sup is not None
            self._held[name] = held_stats(sup.snapshot())
            if name not in self._stopping:
                self._stopping.add(name)
                sup.stop()
            log.info("vassal.held name=%s: stopped by control until started", name)
            return "stopping"
        if req.command in {"start", "restart"} and name in self._held:
            start = self.registry.desired(name)
            if start is None:
                return "!its configuration cannot run"
            del self._held[name]
            if sup is None and name not in self._respawning:
                self._start(start)
            # else still stopping: the registry's spec starts once it is gone
            log.info("vassal.unheld name=%s: started by control", name)
            return "starting"
        if gone or sup is None:
            return "!it is stopping"
        if req.command == "start":
            if sup.state.value == "waiting":
                sup.clear_backoff()
                return "starting now"
            return "already running"
        if req.command == "restart":
            sup.restart()
            return "restarting"
        if req.command == "reload":
            sup.reload()
            return "reloading"
        if req.command == "signal":
            assert req.signal is not None
            if not sup.send_signal(req.signal):
                return "!it has no process"
            return f"sent {signal.Signals(req.signal).name}"
        return f"!unknown command {req.command}"
