"""Emperors of one fleet on this machine, and where their vassals run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.etcd_server import EtcdServer
from tests.helpers import PYTHON, EmperorProcess

__all__ = ["FleetNode", "LocalFleet", "vassal_config"]

SLEEPER = "import sys, time\nwhile True:\n    time.sleep(60)\n"


def vassal_config(tmp: Path, name: str, extra: str = "") -> str:
    """A native vassal that sleeps; its argv ends with *name* (to find it in /proc)."""
    script = tmp / "sleeper.py"
    if not script.exists():
        script.write_text(SLEEPER)
    return f"[vassal]\ncommand = {PYTHON} {script} {name}\nstop-timeout = 5\n{extra}"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
    return found


def _vassals(emperor: int) -> list[int]:
    """The emperor's vassal processes: the children of its launcher."""
    found: list[int] = []
    for child in _children(emperor):
        argv = _argv(child)
        if argv and any(arg.endswith("_launcher.py") for arg in argv):
            found += _children(child)
        else:
            found.append(child)
    return found


def _argv(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] in {"Z", "X"}:
                return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


class FleetNode:
    """One emperor of the fleet: ``--cluster`` and an ``etcd://`` source on *address*."""

    def __init__(
        self,
        name: str,
        address: str,
        prefix: str,
        tmp: Path,
        ttl: float,
        labels: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.address = address
        self.prefix = prefix
        self.tmp = tmp
        self.ttl = ttl
        self.labels = labels
        self.emperor: EmperorProcess | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        args = [
            f"etcd://{self.address}{self.prefix}",
            "--cluster",
            f"etcd://{self.address}{self.prefix}",
            "--node",
            self.name,
            "--node-ttl",
            str(self.ttl),
            "--freq",
            "0.5",
            "--throttle",
            "100",
        ]
        for label in self.labels:
            args += ["--node-label", label]
        log = self.tmp / f"emperor-{self.name}-{self.starts}.log"
        self.emperor = EmperorProcess(args, log)

    def running(self) -> dict[str, int]:
        """Vassal name -> pid of what this emperor runs now (its live vassals)."""
        if self.emperor is None or self.emperor.proc.poll() is not None:
            return {}
        found = {}
        for pid in _vassals(self.emperor.proc.pid):
            argv = _argv(pid)
            if argv and len(argv) >= 3 and argv[-2].endswith("sleeper.py"):
                found[argv[-1]] = pid
        return found

    def text(self) -> str:
        return self.emperor.text() if self.emperor is not None else ""

    def kill(self) -> None:
        """kill -9 (its vassals die with it: parent-death signal)."""
        if self.emperor is not None:
            self.emperor.close()
            self.emperor = None

    def close(self) -> None:
        self.kill()


class LocalFleet:
    """Several nodes on one etcd prefix."""

    def __init__(self, etcd: EtcdServer, tmp: Path, ttl: float = 2.0) -> None:
        self.etcd = etcd
        self.tmp = tmp
        self.ttl = ttl
        self.prefix = f"/fleet-{uuid.uuid4().hex[:8]}"
        self.nodes: dict[str, FleetNode] = {}

    def add(self, name: str, address: str | None = None, labels: tuple[str, ...] = ()) -> FleetNode:
        node = FleetNode(
            name, address or self.etcd.address, self.prefix, self.tmp, self.ttl, labels
        )
        self.nodes[name] = node
        node.start()
        return node

    def put(self, name: str, extra: str = "") -> None:
        self.etcd.put(f"{self.prefix}/vassals/{name}", vassal_config(self.tmp, name, extra))

    def delete(self, name: str) -> None:
        self.etcd.delete(f"{self.prefix}/vassals/{name}")

    def where(self) -> dict[str, set[str]]:
        """Vassal name -> the nodes running a copy."""
        found: dict[str, set[str]] = {}
        for node in self.nodes.values():
            for name in node.running():
                found.setdefault(name, set()).add(node.name)
        return found

    def pids(self) -> dict[tuple[str, str], int]:
        return {
            (name, node.name): pid
            for node in self.nodes.values()
            for name, pid in node.running().items()
        }

    def live_members(self) -> set[str]:
        return {k.rpartition("/")[2] for k in self.etcd.keys(f"{self.prefix}/nodes/")}

    @contextmanager
    def running(self) -> Iterator[LocalFleet]:
        try:
            yield self
        finally:
            for node in self.nodes.values():
                node.close()
