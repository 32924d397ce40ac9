"""A fleet on etcd: reaction, failover, and 1,000 vassals over 3 then 4 nodes.

Starts its own etcd member (Debian ``etcd-server``, on free ports, in a
temporary directory) and trimperor emperors as real processes, each
``python -m trimperor etcd://E/P --cluster etcd://E/P --node nX``, all on this
machine. Where a vassal runs is read from /proc: each vassal is
``bash -c 'exec -a fleetbench-NAME sleep 100000'``, a child of the emperor
that runs it.

1. **put → running**: 3 nodes. Each round puts a new key (a vassal with
   ``placement = 1``) and times, from just before the HTTP put, until the
   vassal's own start record (``date +%s%N``, written in the working directory
   of the node that runs it, so it also says where). The node must be the
   rendezvous-hash owner. Then the key is deleted and the time until the
   process is gone is recorded too.
2. **failover**: 3 nodes, 30 vassals; ``kill -9`` of one emperor (its vassals
   die with it); the time until every one of its vassals runs on its new
   owner, polled every millisecond. The node is started again and the fleet
   settles before the next kill; victims rotate.
3. **scale**: 1,000 keys; first, for reference, one emperor without
   ``--cluster`` and the time until all run; then 3 emperors started at once,
   and the time until every vassal runs where the hash says. Then a fourth
   node joins: time until the fleet matches the 4-node answer, how many
   vassals moved, how many the hash says should (ideal: those whose owner
   changed, about 1/4), and how many others restarted (should be 0).

Usage::

    python benchmarks/fleet.py                  # all three, about 3 minutes
    python benchmarks/fleet.py --only put,failover --rounds 50 --kills 10
    python benchmarks/fleet.py --ttl 5 --vassals 1000

A markdown report goes to stdout. Everything started (etcd, emperors, vassals)
is killed at the end, on Ctrl-C or SIGTERM, and the temporary directory removed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchlib import (
    Emperor,
    Janitor,
    Summary,
    argv0,
    free_port,
    is_gone,
    machine_info,
    summary_row,
    vassals_of,
)
from trimperor.core.placement import Node, Placement, owners

PREFIX = "/bench"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class Etcd:
    def __init__(self, directory: Path) -> None:
        self.client = free_port()
        peer = free_port()
        url = f"http://127.0.0.1:{self.client}"
        binary = shutil.which("etcd")
        if binary is None:
            sys.exit("etcd is not installed: run scripts/services start")
        self.log = open(directory / "etcd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                "--data-dir",
                str(directory / "etcd"),
                "--name",
                "b",
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"b=http://127.0.0.1:{peer}",
                "--log-level",
                "warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = url
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    if json.load(resp).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        sys.exit("etcd did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client}"

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer: dict[str, Any] = json.load(resp)
            return answer

    def put(self, key: str, value: str) -> None:
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def delete_prefix(self, prefix: str) -> None:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        self.call("/v3/kv/deleterange", {"key": b64(prefix), "range_end": b64(end)})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def vassal(name: str, extra: str = "") -> str:
    return (
        "[vassal]\n"
        f"command = /bin/bash -c 'date +%%s%%N > {name}.start; "
        f"exec -a fleetbench-{name} sleep 100000'\n"
        "stop-timeout = 5\n"
        f"{extra}"
    )


class Bench:
    def __init__(self, janitor: Janitor, root: Path, ttl: float) -> None:
        self.janitor = janitor
        self.root = root
        self.ttl = ttl
        self.etcd = Etcd(root)
        self.emperors: dict[str, Emperor] = {}
        self.starts = 0
        self.log_level = "warning"

    def start(self, node: str, cluster: bool = True) -> None:
        home = self.root / node
        home.mkdir(exist_ok=True)
        self.starts += 1
        uri = f"etcd://{self.etcd.address}{PREFIX}"
        argv = [sys.executable, "-m", "trimperor", uri, "--log-level", self.log_level]
        if cluster:
            argv += ["--cluster", uri, "--node", node, "--node-ttl", str(self.ttl)]
        self.emperors[node] = self.janitor.start(
            node, argv, self.root / f"{node}-{self.starts}.log", home
        )

    def kill(self, node: str) -> None:
        emperor = self.emperors.pop(node)
        os.kill(emperor.pid, signal.SIGKILL)
        emperor.popen.wait()

    def stop_all(self) -> None:
        for emperor in self.emperors.values():
            emperor.terminate()
        self.emperors.clear()

    def _vassals(self) -> Iterator[tuple[str, str, int]]:
        """(vassal name, node, pid) of every benchmark vassal the emperors run."""
        for node, emperor in self.emperors.items():
            for pid in vassals_of(emperor.pid):
                program = argv0(pid)
                if program is not None and program.startswith("fleetbench-"):
                    yield program.removeprefix("fleetbench-"), node, pid

    def where(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for name, node, pid in self._vassals():
            if not is_gone(pid):
                found.setdefault(name, set()).add(node)
        return found

    def pids(self) -> dict[str, tuple[str, int]]:
        return {name: (node, pid) for name, node, pid in self._vassals()}

    def wait(self, check: Callable[[], bool], timeout: float, step: float = 0.001) -> float:
        """Seconds until *check* holds; raises after *timeout*."""
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout:
                raise RuntimeError("timed out")
            for emperor in self.emperors.values():
                emperor.check_alive()
            time.sleep(step)
        return time.monotonic() - start


def hrw(names: list[str], nodes: list[str]) -> dict[str, set[str]]:
    """Where the hash puts each vassal (``NAME.ini``), by NAME."""
    members = [Node(n) for n in nodes]
    return {name: set(owners(name + ".ini", Placement(), members)) for name in names}


def bench_put(
    b: Bench, rounds: int, rnd: random.Random, cluster: bool = True
) -> dict[str, Summary]:
    """Put -> running on 3 nodes; without *cluster*, one emperor on the etcd source alone."""
    nodes = ["n1", "n2", "n3"] if cluster else ["n1"]
    for node in nodes:
        b.start(node, cluster)
    b.etcd.put(f"{PREFIX}/vassals/warm.ini", vassal("warm"))
    b.wait(lambda: "warm" in b.where(), 30)
    ups: list[float] = []
    downs: list[float] = []
    for i in range(rounds):
        name = f"{'p' if cluster else 'q'}{i:03d}"
        (owner,) = hrw([name], nodes)[name]
        time.sleep(rnd.uniform(0, 0.2))
        mark = b.root / owner / f"{name}.start"
        t0 = time.time_ns()
        b.etcd.put(f"{PREFIX}/vassals/{name}.ini", vassal(name))
        b.wait(lambda: mark.exists() and mark.read_text().endswith("\n"), 30)  # noqa: B023
        ups.append((int(mark.read_text()) - t0) / 1e6)
        b.wait(lambda: b.where().get(name) == {owner}, 30)  # noqa: B023
        (_, pid) = b.pids()[name]
        time.sleep(rnd.uniform(0, 0.2))
        t1 = time.monotonic()
        b.etcd.delete(f"{PREFIX}/vassals/{name}.ini")
        b.wait(lambda: is_gone(pid), 30)  # noqa: B023
        downs.append((time.monotonic() - t1) * 1000)
    b.stop_all()
    b.etcd.delete_prefix(PREFIX + "/")
    if not cluster:
        return {
            "etcd source, no --cluster: put → vassal running": Summary.of(ups),
            "etcd source, no --cluster: delete → vassal gone": Summary.of(downs),
        }
    return {
        "fleet of 3: put → vassal running on its owner": Summary.of(ups),
        "fleet of 3: delete → vassal gone": Summary.of(downs),
    }


def bench_failover(b: Bench, kills: int, count: int) -> tuple[Summary, Summary]:
    nodes = ["n1", "n2", "n3"]
    names = [f"f{i:02d}" for i in range(count)]
    for name in names:
        b.etcd.put(f"{PREFIX}/vassals/{name}.ini", vassal(name))
    for node in nodes:
        b.start(node)
    want = hrw(names, nodes)
    b.wait(lambda: b.where() == want, 60, 0.01)
    whole: list[float] = []
    first: list[float] = []
    for k in range(kills):
        victim = nodes[k % 3]
        rest = [n for n in nodes if n != victim]
        after = hrw(names, rest)
        moved = [n for n in names if want[n] == {victim}]
        t0 = time.monotonic()
        b.kill(victim)
        seen_first: float | None = None
        while True:
            where = b.where()
            if seen_first is None and any(where.get(n) == after[n] for n in moved):
                seen_first = time.monotonic() - t0
            if all(where.get(n) == after[n] for n in moved):
                break
            if time.monotonic() - t0 > 60:
                raise RuntimeError("failover timed out")
            time.sleep(0.001)
        whole.append((time.monotonic() - t0) * 1000)
        first.append((seen_first or 0) * 1000)
        print(
            f"  kill {k + 1}: {victim}, {len(moved)} vassals, {whole[-1]:.0f} ms", file=sys.stderr
        )
        b.start(victim)
        b.wait(lambda: b.where() == want, 60, 0.01)
    b.stop_all()
    b.etcd.delete_prefix(PREFIX + "/")
    return Summary.of(first), Summary.of(whole)


def bench_scale(b: Bench, count: int) -> dict[str, float]:
    names = [f"v{i:04d}" for i in range(count)]
    for name in names:
        b.etcd.put(f"{PREFIX}/vassals/{name}.ini", vassal(name))
    # The reference: one emperor, no --cluster, the same vassals.
    b.start("solo", cluster=False)
    solo = b.wait(lambda: len(b.where()) == count, 300, 0.05)
    b.stop_all()
    three = ["n1", "n2", "n3"]
    want = hrw(names, three)
    t0 = time.monotonic()
    for node in three:
        b.start(node)
    converge = b.wait(lambda: b.where() == want, 300, 0.05)
    before = b.pids()
    four = [*three, "n4"]
    want4 = hrw(names, four)
    ideal = sum(1 for n in names if want[n] != want4[n])
    t1 = time.monotonic()
    b.start("n4")
    rejoin = b.wait(lambda: b.where() == want4, 300, 0.05)
    after = b.pids()
    moved = sum(1 for n in names if before[n][0] != after[n][0])
    restarted = sum(1 for n in names if before[n][0] == after[n][0] and before[n] != after[n])
    b.stop_all()
    b.etcd.delete_prefix(PREFIX + "/")
    del t0, t1
    return {
        "vassals": count,
        "solo_s": solo,
        "converge_s": converge,
        "join_s": rejoin,
        "moved": moved,
        "ideal": ideal,
        "restarted_unmoved": restarted,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="put,failover,scale")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--failover-vassals", type=int, default=30)
    parser.add_argument("--vassals", type=int, default=1000)
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    only = set(args.only.split(","))
    rnd = random.Random(args.seed)
    lines = ["## Fleet on etcd", ""]
    with Janitor() as janitor:
        root = janitor.tempdir("trimperor-fleet-bench-")
        if os.environ.get("FLEET_BENCH_KEEP"):
            print(f"logs in {root}", file=sys.stderr)
        bench = Bench(janitor, root, args.ttl)
        try:
            lines += ["| machine | |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in machine_info().items()]
            lines += [f"| command | `python benchmarks/fleet.py {' '.join(sys.argv[1:])}` |", ""]
            if "put" in only:
                print("put -> running ...", file=sys.stderr)
                lines += [
                    "| event (ms) | n | min | p50 | p99 | max |",
                    "|---|---:|---:|---:|---:|---:|",
                ]
                results = {
                    **bench_put(bench, args.rounds, rnd, cluster=False),
                    **bench_put(bench, args.rounds, rnd),
                }
                for label, s in results.items():
                    lines.append(summary_row(label, s))
                lines.append("")
            if "failover" in only:
                print("failover ...", file=sys.stderr)
                first, whole = bench_failover(bench, args.kills, args.failover_vassals)
                lines += [
                    f"Failover, `--node-ttl {args.ttl:g}`, {args.failover_vassals} vassals on 3 "
                    f"nodes, {args.kills} kills (ms from `kill -9` of an emperor):",
                    "",
                    "| | n | min | p50 | p99 | max |",
                    "|---|---:|---:|---:|---:|---:|",
                ]
                for label, s in (("first vassal running elsewhere", first), ("all of them", whole)):
                    lines.append(summary_row(label, s))
                lines.append("")
            if "scale" in only:
                print("scale ...", file=sys.stderr)
                r = bench_scale(bench, args.vassals)
                lines += [
                    f"| {r['vassals']:,}-vassal fleet | |",
                    "|---|---|",
                    f"| vassals | {r['vassals']} |",
                    f"| reference: 1 emperor, no `--cluster`, started → all running "
                    f"| {r['solo_s']:.2f} s |",
                    f"| 3 emperors started → every vassal on its owner | {r['converge_s']:.2f} s |",
                    f"| a 4th node joins → fleet matches the 4-node answer | {r['join_s']:.2f} s |",
                    f"| vassals moved / moves the hash asks for | {r['moved']} / {r['ideal']} "
                    f"({100 * r['moved'] / r['vassals']:.1f} %; ideal 1/4 = 25 %) |",
                    f"| other vassals restarted | {r['restarted_unmoved']} |",
                    "",
                ]
        finally:
            bench.stop_all()
            bench.etcd.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
