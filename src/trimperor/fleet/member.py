"""Fleet membership on etcd: leases, claims and fencing for ``--cluster``.

Each emperor of a fleet is a *node*. It keeps a lease (TTL ``--node-ttl``) on
``PREFIX/nodes/NAME`` (value: ``{"labels": {...}}``), renews it every quarter
of the TTL, and watches ``PREFIX/nodes/`` for the other members. Where each
vassal runs is :func:`trimperor.core.placement.owners` of the live nodes: every node
computes the same answer, there is no leader.

**At most one copy of a ``placement = 1`` vassal.** Owning it by the hash is
not enough to run it: a node must also hold its *claim*, the key
``PREFIX/claims/NAME`` (value: the node's name), created with a transaction
that succeeds only if the key does not exist, and attached to the node's
lease. A node gives up a claim only after its copy has stopped (it deletes the
key), and a dead node's claims vanish with its lease. So a new owner starts a
moved vassal only after the old copy is gone, or after the old node's lease
has expired.

**Fencing.** A node that cannot renew its lease for half the TTL stops the
vassals placed with ``on-partition = stop`` (the default for ``placement = N``),
and kills what is still running at 80% of the TTL: etcd cannot have expired
the lease before a full TTL after the last renewal was sent, so they are gone
before another node can claim them. ``placement = all`` vassals keep running
by default (no other node would start them). Once a renewal succeeds again,
the node takes its vassals back (with a new lease if the old one expired).

The emperor drives this through :meth:`Fleet.attach` (callbacks), tells it the
catalogue (:meth:`Fleet.set_catalogue`) and asks :meth:`Fleet.here` before
running a vassal.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial

import trio

from trimperor.core.errors import UsageError
from trimperor.core.placement import Node, Placement, owners
from trimperor.core.stats import FleetStats
from trimperor.fleet.etcd import Cursor, EtcdClient, EtcdError, KeyValue, WatchEvent, follow
from trimperor.monitors.etcd import parse_etcd_uri

__all__ = ["Fleet", "parse_label"]

log = logging.getLogger(__name__)

#: Fractions of the TTL after the last renewal was sent: stop, then kill.
FENCE_AFTER = 0.5
KILL_AFTER = 0.8
#: Renewals per TTL.
RENEWALS = 4
#: How often the fencing deadlines are checked (seconds).
FENCE_STEP = 0.05
#: Claim requests in flight at once.
CLAIMS_IN_FLIGHT = 16

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,126}")


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value); raises UsageError."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--node-label {text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


class Fleet:
    """This node's membership of the fleet at ``etcd://.../PREFIX``."""

    def __init__(
        self,
        uri: str,
        node: str,
        labels: Mapping[str, str] | None = None,
        *,
        ttl: float = 5.0,
    ) -> None:
        self.endpoints, prefix = parse_etcd_uri(uri)
        if not _NODE_NAME.fullmatch(node):
            raise UsageError(f"--node {node!r}: use 1-127 letters, digits and . _ : @ - (no '/')")
        if not 1 <= ttl <= 3600:
            raise UsageError(f"--node-ttl {ttl!r}: between 1 and 3600 seconds")
        self.uri = uri
        self.node = node
        self.labels = dict(labels or {})
        self.ttl = ttl
        self._nodes_prefix = (prefix + "/nodes/").encode()
        self._claims_prefix = (prefix + "/claims/").encode()
        self._me = Node(node, tuple(sorted(self.labels.items())))
        #: The other members as the last watch saw them (this node included).
        self.nodes: dict[str, Node] = {}
        #: vassal -> (holder node, its lease) as last seen.
        self.claims: dict[str, tuple[str, int]] = {}
        self.lease = 0
        self.renewed_at: float | None = None
        """trio time at which the last successful renewal (or grant) was sent."""
        self.fenced = True
        self._expired = False
        self._leaving = False
        self._catalogue: dict[str, Placement] = {}
        self._running: Callable[[str], bool] = lambda name: False
        self._changed: Callable[[], None] = lambda: None
        self._kill: Callable[[], None] = lambda: None
        self._wake = trio.Event()
        self._view: tuple[Node, ...] = (self._me,)
        self._bad_nodes: set[str] = set()
        # owners() of the current view, by (name, placement); cleared when it changes.
        self._owners: dict[tuple[str, Placement], tuple[str, ...]] = {}
        self._watch_scope = trio.CancelScope()

    # -- what the emperor uses --------------------------------------------------------

    def attach(
        self,
        *,
        running: Callable[[str], bool],
        changed: Callable[[], None],
        kill: Callable[[], None],
    ) -> None:
        """*running(name)*: a copy still runs here; *changed()*: ask :meth:`here`
        again for every vassal; *kill()*: SIGKILL the fenced vassals still running."""
        self._running, self._changed, self._kill = running, changed, kill

    def set_catalogue(self, catalogue: Mapping[str, Placement]) -> None:
        """Every vassal the sources offer (and that parses), with its placement."""
        if catalogue != self._catalogue:
            self._catalogue = dict(catalogue)
            self.wake()

    def wake(self) -> None:
        """Something changed: look at the claims again (a vassal stopped, ...)."""
        self._wake.set()

    def leave(self) -> None:
        """The emperor is shutting down: claim nothing more."""
        self._leaving = True

    def live_nodes(self) -> tuple[Node, ...]:
        return self._view

    def owners(self, name: str, placement: Placement) -> tuple[str, ...]:
        key = (name, placement)
        found = self._owners.get(key)
        if found is None:
            if len(self._owners) > 4 * len(self._catalogue) + 1000:
                self._owners.clear()
            found = self._owners[key] = owners(name, placement, self._view)
        return found

    def holds(self, name: str) -> bool:
        return self.lease != 0 and self.claims.get(name) == (self.node, self.lease)

    def here(self, name: str, placement: Placement) -> bool:
        """Whether *name* should run on this node now."""
        return self.reason(name, placement) is None

    def reason(self, name: str, placement: Placement) -> str | None:
        """Why *name* must not run here now (None: it may)."""
        if placement.fenced and self.fenced:
            return "fenced (no lease renewal)" if self.renewed_at is not None else "not joined"
        where = self.owners(name, placement)
        if self.node not in where:
            return f"placed on {','.join(where) or 'no matching node'}"
        if placement.copies == 1 and not self.holds(name):
            holder = self.claims.get(name)
            return f"waiting for the claim (held by {holder[0]})" if holder else "not claimed"
        return None

    def snapshot(self, placed: Mapping[str, Placement]) -> FleetStats:
        return FleetStats(
            uri=self.uri,
            node=self.node,
            labels=tuple(sorted(self.labels.items())),
            state=("joining" if self.renewed_at is None else "fenced" if self.fenced else "member"),
            lease=f"{self.lease:x}" if self.lease else None,
            ttl=self.ttl,
            nodes=tuple((n.name, n.labels) for n in self._view),
            placement=tuple((name, self.owners(name, p)) for name, p in sorted(placed.items())),
            here=tuple(sorted(n for n, p in placed.items() if self.here(n, p))),
        )

    # -- the tasks ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, keep the lease, follow members and claims; leave on cancellation."""
        log.info(
            "fleet.start uri=%s node=%s labels=%s ttl=%ss",
            self.uri,
            self.node,
            ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())) or "-",
            self.ttl,
        )
        # Requests are bounded well below the TTL, so that fencing is not late.
        timeout = max(self.ttl / RENEWALS, 0.25)
        async with EtcdClient(self.endpoints, timeout=timeout) as client:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, self._membership, client)
                    nursery.start_soon(self._guarded, self._fence)
                    nursery.start_soon(self._guarded, self._watches, client)
                    nursery.start_soon(self._guarded, self._claims_worker, client)
                    task_status.started()
            finally:
                await self._revoke(client)

    async def _guarded(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run *task* forever: a bug in it is logged and it starts again, the
        emperor and its vassals go on."""
        while True:
            try:
                await task(*args)
            except Exception:
                log.exception("fleet.task_crashed node=%s task=%s", self.node, task.__name__)
            await trio.sleep(1.0)

    async def _revoke(self, client: EtcdClient) -> None:
        if not self.lease or self._expired:
            return
        lease, self.lease = self.lease, 0
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await client.revoke(lease)
                log.info("fleet.left node=%s", self.node)
            except EtcdError as exc:
                log.warning("fleet.leave_failed node=%s error=%s", self.node, exc)

    async def _membership(self, client: EtcdClient) -> None:
        """Hold a lease and the node key; renew; join again after an expiry."""
        period = self.ttl / RENEWALS
        failing = False
        while True:
            try:
                sent = trio.current_time()
                with trio.fail_after(period):
                    lease = await client.grant(math.ceil(self.ttl))
                value = json.dumps({"labels": self.labels}, sort_keys=True).encode()
                with trio.fail_after(period):
                    created = await client.create(self._node_key(), value, lease)
                if not created:
                    with trio.move_on_after(period):
                        await client.revoke(lease)
                    log.error(
                        "fleet.node_name_taken node=%s: another emperor holds it (or this "
                        "one's previous run, until its lease expires); retrying",
                        self.node,
                    )
                    await trio.sleep(self.ttl / 2)
                    continue
            except (EtcdError, trio.TooSlowError) as exc:
                if not failing:
                    log.warning("fleet.join_failed node=%s error=%s", self.node, exc or "timeout")
                failing = True
                await trio.sleep(period)
                continue
            failing = False
            # Vassals kept through a partition (on-partition = keep) hold
            # claims of the expired lease: take them again before they count.
            kept = await self._reclaim(client, lease) if self._expired else {}
            self.claims.update(kept)
            self.lease = lease
            self._expired = False
            log.info("fleet.joined node=%s lease=%x", self.node, lease)
            self._renewed(sent)
            await self._keep(client, period)
            # The lease expired: whatever it held (our claims) is gone. It
            # stays in self.lease until the next one, so that kept vassals
            # still count as held; nothing is claimed with it.
            self._expired = True
            if not self.fenced:  # revoked by hand while renewals worked
                self.fenced = True
                log.error("fleet.fenced node=%s: the lease is gone", self.node)
                self._call(self._changed)
                self._call(self._kill)

    async def _reclaim(self, client: EtcdClient, lease: int) -> dict[str, tuple[str, int]]:
        """Claim again, under *lease*, what this node held and still runs."""
        found: dict[str, tuple[str, int]] = {}
        for name, holder in list(self.claims.items()):
            if holder != (self.node, self.lease) or not self._running(name):
                continue
            key = self._claims_prefix + name.encode()
            try:
                with trio.fail_after(self.ttl / RENEWALS):
                    if await client.create(key, self.node.encode(), lease):
                        found[name] = (self.node, lease)
                        continue
                    kvs, _ = await client.range(key)
            except (EtcdError, trio.TooSlowError):
                continue
            if kvs:
                found[name] = (kvs[0].value.decode(errors="replace"), kvs[0].lease)
        if found:
            log.info("fleet.reclaimed node=%s vassals=%d", self.node, len(found))
        return found

    async def _keep(self, client: EtcdClient, period: float) -> None:
        """Renew the lease every *period* from a thread; return once it expired.

        The renewals run in a worker thread with blocking HTTP, so that an
        event loop busy for seconds (a thousand vassals starting at once) does
        not let the lease lapse. This task only reads what the thread did.
        """
        renewer = _Renewer(self.endpoints, self.lease, period)
        # trio's default clock is perf_counter plus an offset: the thread's
        # stamps (perf_counter) become trio times with it.
        offset = trio.current_time() - time.perf_counter()
        failing = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, renewer.run, abandon_on_cancel=True)
                )
                while not renewer.expired:
                    await trio.sleep(period / 4)
                    if renewer.last_ok is not None:
                        self._renewed(renewer.last_ok + offset)
                    if renewer.failing and not failing:
                        log.warning("fleet.renew_failed node=%s error=%s", self.node, renewer.error)
                        self._restart_watches()
                    elif failing and not renewer.failing:
                        log.info("fleet.renewed node=%s", self.node)
                    failing = renewer.failing
                nursery.cancel_scope.cancel()
        finally:
            renewer.stop.set()
        log.error("fleet.lease_expired node=%s lease=%x; joining again", self.node, self.lease)

    def _renewed(self, sent: float) -> None:
        if self.renewed_at is not None and sent <= self.renewed_at:
            return
        self.renewed_at = sent
        if self.fenced:
            self.fenced = False
            log.info("fleet.member node=%s", self.node)
            self._call(self._changed)
            self.wake()

    def _call(self, callback: Callable[[], None]) -> None:
        """Call one of the emperor's callbacks; a bug there must not end the fleet."""
        try:
            callback()
        except Exception:
            log.exception("fleet.callback_failed node=%s", self.node)

    async def _fence(self) -> None:
        """Stop, then kill, the fenced vassals when renewals stop succeeding."""
        killed = False
        while True:
            await trio.sleep(FENCE_STEP)
            if self.renewed_at is None:
                continue
            age = trio.current_time() - self.renewed_at
            if age < self.ttl * FENCE_AFTER:
                killed = False
                continue
            if not self.fenced:
                self.fenced = True
                log.error(
                    "fleet.fenced node=%s: no lease renewal for %.1fs; stopping the vassals "
                    "placed with on-partition = stop",
                    self.node,
                    age,
                )
                self._call(self._changed)
            if age >= self.ttl * KILL_AFTER and not killed:
                killed = True
                log.debug("fleet.fence_kill node=%s", self.node)
                self._call(self._kill)

    def _node_key(self) -> bytes:
        return self._nodes_prefix + self.node.encode()

    async def _watches(self, client: EtcdClient) -> None:
        """Follow members and claims; start over (with a new list) when told to.

        A stream over a network that went silent never ends by itself: once
        renewals fail, :meth:`_restart_watches` makes both reconnect.
        """
        while True:
            async with trio.open_nursery() as nursery:
                self._watch_scope = nursery.cancel_scope
                nursery.start_soon(
                    self._follow,
                    client,
                    self._nodes_prefix,
                    self._nodes_listed,
                    self._nodes_changed,
                )
                nursery.start_soon(
                    self._follow,
                    client,
                    self._claims_prefix,
                    self._claims_listed,
                    self._claims_changed,
                )
            log.debug("fleet.watches_restarted node=%s", self.node)

    def _restart_watches(self) -> None:
        self._watch_scope.cancel()

    async def _follow(
        self,
        client: EtcdClient,
        prefix: bytes,
        listed: Callable[[list[KeyValue]], bool],
        changed: Callable[[list[WatchEvent]], bool],
    ) -> None:
        """List and watch *prefix*; *listed* and *changed* say whether what
        they applied can change what runs here (else only the claims are
        looked at again)."""
        cursor = Cursor()
        delay = 0.25

        async def on_list(kvs: list[KeyValue], revision: int) -> None:
            nonlocal delay
            delay = 0.25
            self._updated(listed(kvs))

        async def on_events(events: list[WatchEvent], revision: int) -> None:
            nonlocal delay
            delay = 0.25
            self._updated(changed(events))

        while True:
            try:
                await follow(client, prefix, cursor, on_list=on_list, on_events=on_events)
            except (EtcdError, trio.TooSlowError) as exc:
                log.debug("fleet.watch_failed prefix=%r error=%s", prefix, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, self.ttl)
                continue

    def _updated(self, here: bool = True) -> None:
        view = dict(self.nodes)
        view[self.node] = self._me
        members = tuple(view[n] for n in sorted(view))
        if members != self._view:
            self._view = members
            self._owners.clear()
            here = True
        if here:
            self._call(self._changed)
        self.wake()

    # members

    def _node(self, kv: KeyValue) -> Node | None:
        try:
            name = kv.key.removeprefix(self._nodes_prefix).decode()
            value = json.loads(kv.value)
            labels = value.get("labels", {}) if isinstance(value, dict) else None
            if not isinstance(labels, dict):
                raise ValueError("labels is not an object")
            pairs = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        except (UnicodeDecodeError, ValueError) as exc:
            key = kv.key.decode(errors="replace")
            if key not in self._bad_nodes:
                self._bad_nodes.add(key)
                log.warning("fleet.bad_node key=%r error=%s", key[:200], exc)
            return None
        return Node(name, pairs)

    def _nodes_listed(self, kvs: list[KeyValue]) -> bool:
        nodes = {}
        for kv in kvs:
            node = self._node(kv)
            if node is not None:
                nodes[node.name] = node
        self._log_members(nodes)
        self.nodes = nodes
        return True

    def _nodes_changed(self, events: list[WatchEvent]) -> bool:
        nodes = dict(self.nodes)
        for event in events:
            if event.type == "delete":
                nodes.pop(
                    event.kv.key.removeprefix(self._nodes_prefix).decode(errors="replace"), None
                )
            else:
                node = self._node(event.kv)
                if node is not None:
                    nodes[node.name] = node
        self._log_members(nodes)
        self.nodes = nodes
        return True

    def _log_members(self, nodes: Mapping[str, Node]) -> None:
        for name in sorted(set(nodes) - set(self.nodes)):
            log.info("fleet.node_joined node=%s", name)
        for name in sorted(set(self.nodes) - set(nodes)):
            log.info("fleet.node_left node=%s", name)

    # claims

    def _claim_name(self, kv: KeyValue) -> str:
        return kv.key.removeprefix(self._claims_prefix).decode(errors="replace")

    def _claims_listed(self, kvs: list[KeyValue]) -> bool:
        self.claims = {
            self._claim_name(kv): (kv.value.decode(errors="replace"), kv.lease) for kv in kvs
        }
        return True

    def _claims_changed(self, events: list[WatchEvent]) -> bool:
        """Apply claim events; whether one of them is (or was) this node's."""
        mine = False
        for event in events:
            name = self._claim_name(event.kv)
            old = self.claims.get(name)
            if event.type == "delete":
                self.claims.pop(name, None)
                new = None
            else:
                new = self.claims[name] = (event.kv.value.decode(errors="replace"), event.kv.lease)
            mine = mine or any(c is not None and c[0] == self.node for c in (old, new))
        return mine

    async def _claims_worker(self, client: EtcdClient) -> None:
        """Claim what this node owns and nobody holds; release what it no longer runs."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self._settle_claims(client)
            except (EtcdError, trio.TooSlowError) as exc:
                log.debug("fleet.claims_failed error=%s", exc or "timeout")
                await trio.sleep(0.2)
                self.wake()

    async def _settle_claims(self, client: EtcdClient) -> None:
        if not self.lease or self._expired:
            return
        lease = self.lease
        wanted = [
            name
            for name, placement in self._catalogue.items()
            if placement.copies == 1
            and name not in self.claims
            and self.node in self.owners(name, placement)
        ]
        releases = []
        for name, holder in self.claims.items():
            if holder != (self.node, lease) or self._running(name):
                continue
            placement = self._catalogue.get(name)
            if (
                placement is None
                or placement.copies != 1
                or self.node not in self.owners(name, placement)
            ):
                releases.append(name)
        if not wanted and not releases:
            return
        failed: list[BaseException] = []
        limiter = trio.CapacityLimiter(CLAIMS_IN_FLIGHT)

        async def claim(name: str) -> None:
            async with limiter:
                if self._leaving or self.fenced or self.lease != lease:
                    return
                key = self._claims_prefix + name.encode()
                try:
                    if await client.create(key, self.node.encode(), lease):
                        log.info("fleet.claimed name=%s node=%s", name, self.node)
                        self.claims[name] = (self.node, lease)
                        return
                    kvs, _ = await client.range(key)
                except (EtcdError, trio.TooSlowError) as exc:
                    failed.append(exc)
                    return
                if kvs:
                    self.claims[name] = (kvs[0].value.decode(errors="replace"), kvs[0].lease)

        async def release(name: str) -> None:
            async with limiter:
                key = self._claims_prefix + name.encode()
                try:
                    if await client.delete_if_lease(key, lease):
                        log.info("fleet.released name=%s node=%s", name, self.node)
                except (EtcdError, trio.TooSlowError) as exc:
                    failed.append(exc)
                    return
                self.claims.pop(name, None)

        async with trio.open_nursery() as nursery:
            for name in releases:
                nursery.start_soon(release, name)
            for name in wanted:
                nursery.start_soon(claim, name)
        self._call(self._changed)
        if failed:
            raise EtcdError(str(failed[0]) or "timeout")


class _Renewer:
    """Lease renewals in a worker thread: blocking HTTP, one request per period.

    The trio side reads ``last_ok`` (``time.perf_counter()`` when the last
    successful renewal was sent), ``failing``, ``error`` and ``expired``.
    """

    def __init__(self, endpoints: Sequence[str], lease: int, period: float) -> None:
        self.endpoints = list(endpoints)
        self.lease = lease
        self.period = period
        self.stop = threading.Event()
        self.last_ok: float | None = None
        self.failing = False
        self.error = ""
        self.expired = False
        self._current = 0

    def run(self) -> None:
        wait = self.period
        while not self.stop.wait(wait):
            sent = time.perf_counter()
            try:
                ttl = self._keepalive()
            except (OSError, ValueError, http.client.HTTPException) as exc:
                # Soon again, on the next member (or the same one, electing a leader).
                self.error = f"{self.endpoints[self._current]}: {type(exc).__name__}: {exc}"
                self.failing = True
                self._current = (self._current + 1) % len(self.endpoints)
                wait = self.period / 5
                continue
            wait = self.period
            if ttl <= 0:
                self.expired = True
                return
            self.last_ok = sent
            self.failing = False

    def _keepalive(self) -> int:
        host, _, port = self.endpoints[self._current].rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=self.period / 2)
        try:
            body = json.dumps({"ID": str(self.lease)})
            conn.request("POST", "/v3/lease/keepalive", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read(64 * 1024)
        finally:
            conn.close()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        answer = json.loads(data)
        result = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(result, dict):
            raise ValueError("a malformed keep-alive answer")
        return int(result.get("TTL") or 0)
