"""The zoo:// source: a znode written in ZooKeeper, until the vassal runs.

trimperor runs as a real process (``python -m trimperor zoo://127.0.0.1:PORT/PATH
--log-level warning``) on a ZooKeeper of the benchmark's own (Debian's
``zookeeper`` package, started on a free port and a temporary data directory,
killed at the end). uWSGI never shipped a zoo:// monitor, so there is no
reference to run beside it; the target is the issue's: p50 ≤ 20 ms.

Every round is the one of ``benchmarks/sources.py`` (the same code runs it):
a random phase of 0-0.3 s, then ``create`` of the znode ``PATH/NAME.ini`` whose
data is a native vassal that records its own start (``date +%s%N``); *up* is
that record minus ``time.time_ns()`` taken just before the create was sent, so
it includes the write's round trip. Then a random phase, ``delete`` of the
znode, and *down* until the vassal's pid is gone.

Run: ``python benchmarks/zookeeper.py [--rounds 50] [--keep-logs DIR]
[--json FILE]`` (``scripts/services start`` installs ZooKeeper). Progress goes
to stderr and the report (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib import (
    Janitor,
    add_run_options,
    fmt,
    machine_info,
    progress,
    report_header,
    run_main,
    trimperor_command,
    verdict,
    write_json,
)
from sources import EVENT_PHASE, Contender, SourceResult, render, run_source

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.zk_server import ZkServer, zookeeper_missing  # noqa: E402

#: The issue's target for znode written -> vassal running (ms, median).
TARGET_P50_MS = 20.0


class ZooChannel:
    """Creates and deletes the vassal znodes with a kazoo client of its own."""

    def __init__(self, client: Any, path: str) -> None:
        self.client = client
        self.path = path

    def add(self, name: str, config: str) -> int:
        t0 = time.time_ns()
        self.client.create(f"{self.path}/{name}", config.encode())
        return t0

    def remove(self, name: str) -> int:
        t0 = time.time_ns()
        self.client.delete(f"{self.path}/{name}")
        return t0


def measure(rounds: int, keep_logs: Path | None, progress: Any) -> SourceResult:
    from kazoo.client import KazooClient

    title, change = "ZooKeeper, watches (kazoo)", "znode created"
    missing = zookeeper_missing()
    if missing is not None:
        return SourceResult("zoo", title, change, [], error=missing)
    with contextlib.ExitStack() as stack, Janitor() as janitor:
        server = ZkServer(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "zk")
        stack.callback(server.stop)
        server.start()
        client = KazooClient(server.hosts)
        client.start(timeout=30)
        stack.callback(client.close)
        stack.callback(client.stop)
        path = f"/bench-{uuid.uuid4().hex[:8]}"
        client.create(path)
        uri = f"zoo://{server.hosts}{path}"
        argv = trimperor_command(uri, "--log-level", "warning")
        shown = "python -m trimperor " + shlex.join([uri, "--log-level", "warning"])
        contender = Contender(
            "trimperor", argv, shown, ZooChannel(client, path), EVENT_PHASE, rounds
        )
        runs = run_source("zoo", [contender], janitor, random.Random(), progress, keep_logs)
        return SourceResult("zoo", title, change, runs, "uWSGI has no zoo:// monitor")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=50, help="rounds (50)")
    add_run_options(
        p, keep_logs="copy the emperor's log into DIR", json="also write the raw samples as JSON"
    )
    args = p.parse_args(argv)
    info = machine_info()
    began = time.monotonic()

    def body() -> int:
        result = measure(args.rounds, args.keep_logs, progress)
        out = report_header("trimperor benchmarks: zoo://", "zookeeper.py", argv, info)
        out += [f"Wall time: {time.monotonic() - began:.0f} s.", "", render([result])]
        if result.runs:
            up = result.runs[0].up
            out.append(
                f"Target (znode created → vassal running, p50 ≤ {TARGET_P50_MS:.0f} ms): "
                f"p50 {fmt(up.p50)} ms, p99 {fmt(up.p99)} ms ({verdict(up.p50, TARGET_P50_MS)})."
            )
        print("\n".join(out))
        write_json(args.json, {"machine": info, "result": asdict(result)})
        return 0

    return run_main(body, "was stopped and removed")


if __name__ == "__main__":
    sys.exit(main())
