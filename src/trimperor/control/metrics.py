"""Prometheus metrics (``--metrics host:port``), from the emperor's snapshots.

Every scrape reads one immutable snapshot; nothing is counted twice and no
live object is touched. Served by a small HTTP/1.1 responder on trio, so the
collector runs in the emperor's own thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator

import trio

from trimperor.core.errors import UsageError
from trimperor.core.stats import EmperorStats

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - depends on the install
    raise UsageError(
        "--metrics needs the prometheus_client module: pip install 'trimperor[metrics]'"
    ) from None

TYPE_CHECKING = False
if TYPE_CHECKING:
    from trimperor.control.hub import ControlHub

__all__ = ["STATES", "EmperorCollector", "serve_metrics"]

log = logging.getLogger(__name__)

#: Every state a vassal can be in (each always exported, 0 when empty).
STATES = (
    "waiting",
    "starting",
    "running",
    "reloading",
    "stopping",
    "armed",
    "sleeping",
    "stopped",
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EmperorCollector(Collector):
    def __init__(self, snapshot: Callable[[], EmperorStats], hub: ControlHub | None) -> None:
        self._snapshot = snapshot
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        by_state = Counter(v.state for v in stats.vassals)
        g = GaugeMetricFamily("trimperor_vassals", "Vassals by state", labels=["state"])
        for state in sorted(set(STATES) | set(by_state)):
            g.add_metric([state], by_state.get(state, 0))
        yield g
        g = GaugeMetricFamily("trimperor_vassals_held", "Vassals stopped by trimperor ctl stop")
        g.add_metric([], sum(1 for v in stats.vassals if v.held))
        yield g
        restarts = CounterMetricFamily(
            "trimperor_vassal_restarts", "Processes started after the first one", labels=["vassal"]
        )
        wakes = CounterMetricFamily(
            "trimperor_vassal_wakes", "On-demand wake-ups", labels=["vassal"]
        )
        up = GaugeMetricFamily(
            "trimperor_vassal_up", "1 while the vassal has a process", labels=["vassal", "kind"]
        )
        cpu = GaugeMetricFamily(
            "trimperor_vassal_cpu_percent",
            "CPU use of the vassal's main process, percent of one core",
            labels=["vassal"],
        )
        rss = GaugeMetricFamily(
            "trimperor_vassal_rss_bytes",
            "Resident memory of the vassal's main process",
            labels=["vassal"],
        )
        healthy = GaugeMetricFamily(
            "trimperor_vassal_healthy",
            "1 while its health checks pass, 0 while they fail (vassals with checks)",
            labels=["vassal"],
        )
        for v in stats.vassals:
            if v.health is not None:
                healthy.add_metric([v.name], 1 if v.health == "healthy" else 0)
        yield healthy
        pids = [v.pid for v in stats.vassals if v.pid is not None]
        sampler = self._hub.sampler if self._hub is not None else None
        usage = sampler.sample(pids) if sampler is not None else {}
        for v in stats.vassals:
            restarts.add_metric([v.name], v.restarts)
            wakes.add_metric([v.name], v.wakes)
            up.add_metric([v.name, v.kind], 1 if v.pid is not None else 0)
            if v.pid is not None and v.pid in usage:
                c, r = usage[v.pid]
                if c is not None:
                    cpu.add_metric([v.name], c)
                if r is not None:
                    rss.add_metric([v.name], r)
        yield from (restarts, wakes, up, cpu, rss)
        src = GaugeMetricFamily(
            "trimperor_source_up", "1 while the source is connected", labels=["source", "state"]
        )
        owned = GaugeMetricFamily(
            "trimperor_source_vassals", "Vassals the source offers", labels=["source"]
        )
        for s in stats.sources:
            src.add_metric([s.uri, s.state], 1 if s.state in {"connected", "watching"} else 0)
            owned.add_metric([s.uri], s.vassals)
        yield src
        yield owned
        g = GaugeMetricFamily("trimperor_uptime_seconds", "Seconds since the emperor started")
        g.add_metric([], stats.uptime)
        yield g
        if self._hub is not None:
            events = CounterMetricFamily(
                "trimperor_events", "Events published by the emperor", labels=["kind"]
            )
            for kind, n in sorted(self._hub.counts.items()):
                events.add_metric([kind], n)
            yield events
            for metric, what, hist in (
                (
                    "trimperor_spawn_seconds",
                    "From deciding to start a vassal's process to its spawn",
                    self._hub.spawn_seconds,
                ),
                (
                    "trimperor_wake_seconds",
                    "From an on-demand vassal's first connection to its spawn",
                    self._hub.wake_seconds,
                ),
            ):
                h = HistogramMetricFamily(metric, what)
                h.add_metric([], hist.cumulative(), sum_value=hist.total)
                yield h
            g = GaugeMetricFamily("trimperor_control_clients", "Connected control clients")
            g.add_metric([], self._hub.clients)
            yield g


async def serve_metrics(
    addr: str,
    snapshot: Callable[[], EmperorStats],
    hub: ControlHub | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    from trimperor.control.api import parse_address
    from trimperor.control.surfaces import _read_head, _respond, _tcp_listener

    where = parse_address(f"127.0.0.1:{addr}" if addr.isdigit() else addr)
    if not isinstance(where, tuple):
        raise UsageError("--metrics takes host:port")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EmperorCollector(snapshot, hub))
    try:
        listener, shown = await _tcp_listener(*where)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {addr!r}: {exc.strerror}") from None

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a scrape must never take the emperor down
            log.exception("metrics.scrape_failed")

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            head = await _read_head(stream)
            if head is None or head.method not in {"GET", "HEAD"}:
                await _respond(stream, "400 Bad Request", b"bad request\n")
                return
            path = head.target.split("?", 1)[0]
            if path not in {"/", "/metrics"}:
                await _respond(stream, "404 Not Found", b"not found\n")
                return
            await _respond(stream, "200 OK", generate_latest(registry), CONTENT_TYPE)

    log.info("metrics.listening addr=%s", shown)
    with contextlib.closing(listener.socket):
        task_status.started(shown)
        await trio.serve_listeners(handle, [listener])
