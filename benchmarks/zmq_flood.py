"""How many bad zmq:// messages per second the emperor gets through, and what it logs.

One emperor process (``python -m trimperor zmq://tcp://127.0.0.1:PORT --stats
SOCKET``, its log in a file) and one PUSH socket. Each round sends FLOOD bad
messages of one kind, then a marker ``touch`` of a native vassal; the round
ends when the marker vassal appears in the stats document. A round's
throughput is ``(FLOOD + 1) / (marker seen - first send)``; the marker is then
destroyed. The log lines the round added are counted too.

Kinds: ``bad-name`` (``[touch, ../xN.ini, config]``), ``unknown-destroy``
(``[destroy, neverN.ini]``) and ``junk`` (1 to 8 frames of random bytes).

Run: ``python benchmarks/zmq_flood.py [--flood 20000] [--rounds 20]``; a
markdown table goes to stdout. Set ``PYTHONPATH`` to measure another checkout.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import zmq

from benchlib import (
    Janitor,
    free_port,
    percentile,
    query_stats,
    sigterm_as_interrupt,
    trimperor_command,
    wait_until,
)

KINDS = ("bad-name", "unknown-destroy", "junk")
CONFIG = b"[vassal]\ncommand = sleep 600\n"


def messages(kind: str, count: int, rng: random.Random) -> list[list[bytes]]:
    if kind == "bad-name":
        return [[b"touch", b"../x%d.ini" % i, CONFIG] for i in range(count)]
    if kind == "unknown-destroy":
        return [[b"destroy", b"never%d.ini" % i] for i in range(count)]
    return [
        [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 9))]
        for _ in range(count)
    ]


def has_vassal(stats_path: Path, name: str, present: bool) -> bool:
    names = {v["id"] for v in query_stats(stats_path)["vassals"]}
    return (name in names) == present


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=20_000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    args = parser.parse_args()
    sigterm_as_interrupt()
    rng = random.Random(13)
    results: list[tuple[str, list[float], list[int]]] = []
    with Janitor() as janitor:
        work = janitor.tempdir("trimperor-bench-flood-")
        port = free_port()
        stats = work / "stats.sock"
        log = work / "emperor.log"
        emperor = janitor.start(
            "trimperor",
            trimperor_command(f"zmq://tcp://127.0.0.1:{port}", "--stats", str(stats)),
            log,
            work,
        )
        if not wait_until(stats.exists, 30, 0.01):
            emperor.check_alive()
            raise RuntimeError("the emperor did not open its stats socket")
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(f"tcp://127.0.0.1:{port}")
        try:
            for kind in args.kinds.split(","):
                rates: list[float] = []
                lines: list[int] = []
                for round_ in range(args.rounds):
                    batch = messages(kind, args.flood, rng)
                    marker = f"marker-{kind}-{round_}.ini"
                    before = len(emperor.log_lines())
                    start = time.perf_counter()
                    for frames in batch:
                        push.send_multipart(frames)
                    push.send_multipart([b"touch", marker.encode(), CONFIG])
                    if not wait_until(partial(has_vassal, stats, marker, True), 120, 0.002):
                        emperor.check_alive()
                        raise RuntimeError(f"{marker} never appeared")
                    rates.append((args.flood + 1) / (time.perf_counter() - start))
                    push.send_multipart([b"destroy", marker.encode()])
                    wait_until(partial(has_vassal, stats, marker, False), 60, 0.01)
                    lines.append(len(emperor.log_lines()) - before)
                    print(f"{kind} round {round_ + 1}: {rates[-1]:,.0f} msg/s", file=sys.stderr)
                results.append((kind, rates, lines))
        finally:
            push.close(linger=0)
            ctx.term()
            janitor.stop_emperor(emperor)
    print(f"flood of {args.flood} messages, {args.rounds} rounds per kind\n")
    print("| kind | median msg/s | p1 msg/s (slowest 1%) | log lines per round (median) |")
    print("|---|---:|---:|---:|")
    for kind, rates, lines in results:
        print(
            f"| {kind} | {percentile(rates, 50):,.0f} | {percentile(rates, 1):,.0f} "
            f"| {percentile([float(n) for n in lines], 50):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
