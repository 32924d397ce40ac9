"""Health checks (``health = http://...``, ``health-command``) and ``on-failure`` hooks.

A :class:`HealthWatch` runs beside a native vassal's supervisor while the
vassal's configuration asks for checks: every ``health-interval`` seconds it
checks the running process; after ``health-retries`` failures in a row the
vassal is *unhealthy*, and the watch asks for a restart. Commands (checks and
hooks) run through the spawner as the vassal's own user, in its directory,
bounded in time; their failures are logged, never fatal.
"""

from __future__ import annotations

import logging
import signal
import urllib.parse
from collections.abc import Callable, Container, Iterable, Mapping
from functools import partial
from typing import Any, Protocol

import trio

from trimperor.abc import LaunchPlan, Spawner
from trimperor.core.errors import SpawnError
from trimperor.core.stats import VassalStats
from trimperor.core.vassalspec import NativeSpec

__all__ = ["HealthWatch", "Oversight", "check_http", "run_command"]

log = logging.getLogger(__name__)

_PRIVATE_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")
_MAX_HEAD = 8192


async def check_http(url: str, limit: float) -> str | None:
    """None if a GET of *url* answers 2xx or 3xx within *limit* seconds, else why not."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\n"
        "User-Agent: trimperor-health\r\nConnection: close\r\n\r\n"
    ).encode()
    head = b""
    with trio.move_on_after(limit):
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                while b"\r\n" not in head and len(head) < _MAX_HEAD:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
        except OSError as exc:
            return f"cannot connect: {exc.strerror or exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"connection lost: {exc}"
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[1].isdigit():
            return "not an HTTP answer"
        code = int(status[1])
        return None if 200 <= code < 400 else f"HTTP {code}"
    return f"no answer within {limit}s"


def _plan(
    spec: NativeSpec,
    label: str,
    argv: tuple[str, ...],
    environ: Mapping[str, str],
    extra: Mapping[str, str],
) -> LaunchPlan:
    env = {k: v for k, v in environ.items() if k not in _PRIVATE_ENV}
    env.update(spec.env)
    env.update(extra)
    return LaunchPlan(
        name=f"{spec.name}:{label}",
        argv=argv,
        cwd=spec.chdir,
        env=tuple(env.items()),
        user=spec.uid,
        group=spec.gid,
        init_groups=spec.init_groups,
    )


async def run_command(
    spawner: Spawner,
    spec: NativeSpec,
    label: str,
    argv: tuple[str, ...],
    environ: Mapping[str, str],
    limit: float,
    extra: Mapping[str, str] | None = None,
) -> str | None:
    """Run *argv* for vassal *spec* (``label``: ``health-command``, ``on-failure``).

    Returns None if it exited 0 within *limit* seconds, else why not. Its output is
    logged line by line; after that its process group is killed.
    """
    plan = _plan(spec, label, argv, environ, extra or {})
    try:
        proc = await spawner.spawn(plan)
    except SpawnError as exc:
        return f"cannot start: {exc}"
    try:
        with trio.move_on_after(limit) as scope:
            async with trio.open_nursery() as nursery:
                if proc.output is not None:
                    nursery.start_soon(_pump, proc.output, plan.name)
                await proc.wait()
        if scope.cancelled_caught:
            proc.signal_group(signal.SIGKILL)
            return f"no result within {limit}s (killed)"
    finally:
        if proc.returncode is None:
            with trio.CancelScope(shield=True):
                proc.signal_group(signal.SIGKILL)
                await proc.wait()
        aclose = getattr(proc, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                await aclose()
    rc = proc.returncode
    if rc == 0:
        return None
    if rc is not None and rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


async def _pump(stream: trio.abc.ReceiveStream, label: str) -> None:
    buf = b""
    try:
        while chunk := await stream.receive_some(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if len(buf) > 65536:
                lines.append(buf)
                buf = b""
            for line in lines:
                log.info("hook.output name=%s| %s", label, line.decode(errors="replace"))
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    if buf:
        log.info("hook.output name=%s| %s", label, buf.decode(errors="replace"))


class HealthWatch:
    """Checks one vassal while its configuration asks for it; see the module doc.

    *current* returns the vassal's spec and the pid of its running process
    (None while it has none); *unhealthy* is called once per unhealthy process.
    """

    def __init__(
        self,
        name: str,
        spawner: Spawner,
        environ: Mapping[str, str],
        current: Callable[[], tuple[NativeSpec | None, int | None]],
        unhealthy: Callable[[str], None],
        emit: Callable[..., None],
    ) -> None:
        self.name = name
        self._spawner = spawner
        self._environ = environ
        self._current = current
        self._unhealthy = unhealthy
        self._emit = emit
        self.state: str | None = None
        """None (no check yet), ``healthy``, ``failing`` or ``unhealthy``."""
        self.failures = 0

    @staticmethod
    def wanted(spec: Any) -> bool:
        return isinstance(spec, NativeSpec) and bool(spec.health or spec.health_command)

    async def _check(self, spec: NativeSpec) -> str | None:
        if spec.health:
            return await check_http(spec.health, spec.health_timeout)
        assert spec.health_command is not None
        return await run_command(
            self._spawner,
            spec,
            "health-command",
            spec.health_command,
            self._environ,
            spec.health_timeout,
        )

    def _set(self, state: str | None, **fields: Any) -> None:
        if state != self.state:
            self._emit("health", self.name, state=state, **fields)
        self.state = state

    async def run(self) -> None:
        """Until the configuration no longer asks for checks (or cancelled)."""
        checked_pid: int | None = None
        while True:
            spec, pid = self._current()
            if spec is None or not self.wanted(spec):
                return
            await trio.sleep(spec.health_interval)
            spec, pid = self._current()
            if spec is None or not self.wanted(spec):
                return
            if pid is None:
                continue
            if pid != checked_pid:
                checked_pid, self.failures = pid, 0
                self._set(None)
            why = await self._check(spec)
            if self._current()[1] != pid:
                continue  # restarted meanwhile: that check says nothing
            if why is None:
                if self.state != "healthy":
                    log.info("vassal.healthy name=%s pid=%s", self.name, pid)
                self.failures = 0
                self._set("healthy")
                continue
            self.failures += 1
            log.warning(
                "vassal.health_failed name=%s pid=%s attempt=%d/%d: %s",
                self.name,
                pid,
                self.failures,
                spec.health_retries,
                why,
            )
            if self.failures < spec.health_retries:
                self._set("failing", reason=why)
                continue
            log.error(
                "vassal.unhealthy name=%s pid=%s: %d checks failed, restarting it (%s)",
                self.name,
                pid,
                self.failures,
                why,
            )
            self._set("unhealthy", reason=why)
            self._unhealthy(why)


class Supervised(Protocol):
    """What :class:`Oversight` needs of a vassal supervisor."""

    @property
    def spec(self) -> Any: ...

    @property
    def last_returncode(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...

    def restart(self) -> None: ...

    def snapshot(self) -> VassalStats: ...


class Oversight:
    """Every vassal's :class:`HealthWatch` and ``on-failure`` hooks.

    Reads the emperor's table of supervisors (*sups*, *stopping*) and asks a
    supervisor to restart when its vassal turns unhealthy; it changes nothing
    else. Watches and hooks run in :attr:`nursery` (set once the emperor runs).
    """

    def __init__(
        self,
        sups: Mapping[str, Supervised],
        stopping: Container[str],
        spawner: Spawner,
        environ: Mapping[str, str],
        hub: _Hub,
        shutdown: trio.Event,
    ) -> None:
        self._sups = sups
        self._stopping = stopping
        self._spawner = spawner
        self._environ = environ
        self._hub = hub
        self._shutdown = shutdown
        self.nursery: trio.Nursery | None = None
        self._watches: dict[str, HealthWatch] = {}
        self._hooks: set[str] = set()

    def health(self, name: str) -> str | None:
        watch = self._watches.get(name)
        return watch.state if watch is not None else None

    def observe(self, kind: str, name: str, fields: Mapping[str, Any]) -> None:
        """A supervisor's event: a death while running is a failure."""
        if (
            kind == "state"
            and fields.get("on") == "exited"
            and fields.get("previous") in {"running", "starting"}
            and fields.get("state") == "waiting"
        ):
            self.failed(name, "exited")

    def failed(self, name: str, reason: str, detail: str = "") -> None:
        sup = self._sups.get(name)
        spec = sup.spec if sup is not None else None
        if (
            sup is None
            or not isinstance(spec, NativeSpec)
            or spec.on_failure is None
            or self.nursery is None
            or self._shutdown.is_set()
        ):
            return
        if name in self._hooks:
            log.warning("hook.skipped name=%s: the previous on-failure hook still runs", name)
            return
        rc = sup.last_returncode if reason == "exited" else None
        lines = [f"{d['name']}| {d['line']}" for d in self._hub.logs([name], 20)]
        env = {
            "TRIMPEROR_VASSAL": name,
            "TRIMPEROR_REASON": reason,
            "TRIMPEROR_DETAIL": detail,
            "TRIMPEROR_EXIT_CODE": str(rc) if rc is not None and rc >= 0 else "",
            "TRIMPEROR_EXIT_SIGNAL": signal.Signals(-rc).name if rc is not None and rc < 0 else "",
            "TRIMPEROR_RESTARTS": str(max(sup.restarts, 0)),
            "TRIMPEROR_LOG": "\n".join(lines)[-16384:],
        }
        self._hooks.add(name)
        self.nursery.start_soon(self._run_hook, name, spec, spec.on_failure, env)

    async def _run_hook(
        self, name: str, spec: NativeSpec, argv: tuple[str, ...], env: dict[str, str]
    ) -> None:
        try:
            log.info("hook.start name=%s reason=%s", name, env["TRIMPEROR_REASON"])
            why = await run_command(
                self._spawner, spec, "on-failure", argv, self._environ, spec.on_failure_timeout, env
            )
            if why is None:
                log.info("hook.done name=%s", name)
            else:
                log.warning("hook.failed name=%s: %s", name, why)
            self._hub.emit("hook", name, ok=why is None, error=why)
        except Exception:
            log.exception("hook.crashed name=%s", name)
        finally:
            self._hooks.discard(name)

    def ensure(self, name: str) -> None:
        """Start checking *name* if its configuration asks for it and nothing checks it yet."""
        sup = self._sups.get(name)
        if (
            sup is None
            or self.nursery is None
            or name in self._watches
            or not HealthWatch.wanted(sup.spec)
        ):
            return
        watch = HealthWatch(
            name,
            self._spawner,
            self._environ,
            partial(self._target, name),
            partial(self._unhealthy, name),
            self._hub.emit,
        )
        self._watches[name] = watch
        self.nursery.start_soon(self._run_watch, watch)

    def _target(self, name: str) -> tuple[NativeSpec | None, int | None]:
        sup = self._sups.get(name)
        if sup is None or name in self._stopping or not isinstance(sup.spec, NativeSpec):
            return None, None
        snap = sup.snapshot()
        return sup.spec, snap.pid if snap.state == "running" else None

    def _unhealthy(self, name: str, why: str) -> None:
        sup = self._sups.get(name)
        if sup is not None and name not in self._stopping:
            sup.restart()
            self.failed(name, "unhealthy", why)

    async def _run_watch(self, watch: HealthWatch) -> None:
        try:
            await watch.run()
        except Exception:
            log.exception("health.crashed name=%s", watch.name)
        finally:
            if self._watches.get(watch.name) is watch:
                del self._watches[watch.name]


class _Hub(Protocol):
    def emit(self, kind: str, name: str | None = None, **fields: Any) -> None: ...

    def logs(self, names: Iterable[str], n: int) -> list[dict[str, Any]]: ...
