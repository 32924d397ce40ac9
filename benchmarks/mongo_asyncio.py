"""pymongo from trio: worker threads (today's mongodb:// monitor) against trio-asyncio.

The mongodb:// monitor reads with pymongo's synchronous client in a worker thread
(``trio.to_thread.run_sync``). pymongo also has a native asyncio client
(``AsyncMongoClient``), which trio can drive through trio-asyncio's loop. This
compares the two on what the monitor does, against mongoeco's wire server:

- **read**: one full read of a collection of ``--docs`` vassal documents (the
  monitor's poll), ``--rounds`` times: min / p50 / p99 / max in ms;
- **threads**: the threads a client adds to the process once it has read once
  (pymongo's own monitor threads, and the worker left in trio's thread cache);
- **cancel**: a read against a server that accepts the connection and never
  answers, cancelled after 0.2 s: ms from the cancel until the read returns,
  and the threads still running it one second later (an abandoned worker
  thread goes on until pymongo's own timeout);
- **close**: the client's close after the reads, plus leaving the loop (ms).

Change streams cannot be compared here: mongoeco does not implement them.

    .venv/bin/pip install trio-asyncio            # not a dependency of trimperor
    scripts/services start                        # .venv-mongo (mongoeco)
    python benchmarks/mongo_asyncio.py            # about 30 s
    python benchmarks/mongo_asyncio.py --rounds 1000 --docs 200
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from benchlib import Summary, fmt, machine_info
from sources import start_mongoeco

try:
    import trio_asyncio  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from pymongo import AsyncMongoClient, MongoClient
except ImportError as exc:  # pragma: no cover - depends on the installation
    sys.exit(f"mongo_asyncio: {exc.name} is missing: pip install trio-asyncio pymongo")

ROOT = Path(__file__).resolve().parent.parent
MONGO_PYTHON = ROOT / ".venv-mongo" / "bin" / "python"
FILTER = {"enabled": 1}
PROJECTION = {"name": 1, "config": 1, "ts": 1, "uid": 1, "gid": 1, "socket": 1}
TIMEOUT_MS = 5000


def fill(hosts: str, docs: int) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(hosts, directConnection=True)
    try:
        coll = client["bench"]["vassals"]
        coll.drop()
        now = datetime.datetime.now(datetime.UTC)
        coll.insert_many(
            [
                {
                    "name": f"v{i:04d}.ini",
                    "config": f"[vassal]\ncommand = sleep {1000 + i}\n",
                    "ts": now,
                    "enabled": 1,
                }
                for i in range(docs)
            ]
        )
    finally:
        client.close()


class Blackhole:
    """A TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.port: int = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            with contextlib.suppress(TimeoutError):
                conn, _ = self.sock.accept()
                self._held.append(conn)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for conn in self._held:
            conn.close()
        self.sock.close()


class Result:
    def __init__(self, name: str) -> None:
        self.name = name
        self.reads: list[float] = []
        self.threads = 0
        self.cancel_ms = float("nan")
        self.still_running = False
        self.close_ms = float("nan")


#: (read, close, finished): one full read; the client's close; an Event set
#: when the last read's work (the thread, or the asyncio task) has ended.
Client = tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]], threading.Event]
Factory = Callable[[str], Awaitable[Client]]


async def measure(
    factories: dict[str, Factory], hosts: str, blackhole: int, rounds: int
) -> list[Result]:
    """Reads interleaved (one per client in turn), so that the shared machine's
    load weighs on both alike; then the cancel and the close of each."""
    results = {name: Result(name) for name in factories}
    clients = {}
    for name, make in factories.items():
        # The threads each client adds: its own, and the worker a read leaves in
        # trio's thread cache.
        before = threading.active_count()
        clients[name] = await make(hosts)
        await clients[name][0]()  # connect and warm up
        results[name].threads = threading.active_count() - before
    for _ in range(rounds):
        for name, (read, _, _) in clients.items():
            t0 = time.perf_counter()
            await read()
            results[name].reads.append((time.perf_counter() - t0) * 1000)
    for name, (_, close, _) in clients.items():
        t0 = time.perf_counter()
        await close()
        results[name].close_ms = (time.perf_counter() - t0) * 1000

    for name, make in factories.items():
        stuck_read, stuck_close, finished = await make(f"127.0.0.1:{blackhole}")
        cancelled_at = 0.0
        with trio.CancelScope() as scope:

            async def cancel_soon(scope: trio.CancelScope = scope) -> None:
                nonlocal cancelled_at
                await trio.sleep(0.2)
                cancelled_at = time.perf_counter()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_soon)
                await stuck_read()
        results[name].cancel_ms = (time.perf_counter() - cancelled_at) * 1000
        await trio.sleep(1.0)
        results[name].still_running = not finished.is_set()
        with trio.move_on_after(10):
            await stuck_close()
    return list(results.values())


#: Both clients alike: one server, no discovery, connect on the first read.
CLIENT_OPTIONS: dict[str, Any] = {
    "directConnection": True,
    "serverSelectionTimeoutMS": TIMEOUT_MS,
    "connectTimeoutMS": TIMEOUT_MS,
    "connect": False,
}


async def thread_client(hosts: str) -> Client:
    client: MongoClient[dict[str, Any]] = MongoClient(hosts, **CLIENT_OPTIONS)
    coll = client["bench"]["vassals"]
    limiter = trio.CapacityLimiter(1)
    finished = threading.Event()

    def blocking() -> list[dict[str, Any]]:
        finished.clear()
        try:
            return list(coll.find(FILTER, PROJECTION))
        finally:
            finished.set()

    async def read() -> int:
        found = await trio.to_thread.run_sync(blocking, abandon_on_cancel=True, limiter=limiter)
        return len(found)

    async def close() -> None:
        await trio.to_thread.run_sync(client.close)

    return read, close, finished


async def asyncio_client(hosts: str) -> Client:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(hosts, **CLIENT_OPTIONS)
    coll = client["bench"]["vassals"]
    finished = threading.Event()

    async def aread() -> list[dict[str, Any]]:
        finished.clear()
        try:
            return await coll.find(FILTER, PROJECTION).to_list()
        finally:
            finished.set()

    async def read() -> int:
        return len(await trio_asyncio.aio_as_trio(aread)())

    async def close() -> None:
        await trio_asyncio.aio_as_trio(client.close)()

    return read, close, finished


async def run(hosts: str, rounds: int) -> list[Result]:
    hole = Blackhole()
    try:
        async with trio_asyncio.open_loop():
            return await measure(
                {"worker threads (today)": thread_client, "trio-asyncio": asyncio_client},
                hosts,
                hole.port,
                rounds,
            )
    finally:
        hole.close()


def report(results: list[Result], args: argparse.Namespace) -> str:
    info = machine_info()
    lines = [
        f"`python benchmarks/mongo_asyncio.py --rounds {args.rounds} --docs {args.docs}` "
        f"on {info.get('cpu', '?')}, Python {info.get('python', '?')}, mongoeco's wire server:",
        "",
        "| client | read min / **p50** / p99 / max (ms) | threads | cancel (ms) "
        "| read still running 1 s after cancel | close (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = Summary.of(r.reads)
        lines.append(
            f"| {r.name} | {fmt(s.minimum, 2)} / **{fmt(s.p50, 2)}** / {fmt(s.p99, 2)} / "
            f"{fmt(s.maximum, 2)} | {r.threads} | {fmt(r.cancel_ms, 2)} | "
            f"{'yes' if r.still_running else 'no'} | {fmt(r.close_ms, 2)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--docs", type=int, default=50)
    args = parser.parse_args()
    if not MONGO_PYTHON.exists():
        sys.exit(f"mongo_asyncio: {MONGO_PYTHON} is missing: run scripts/services start")
    with contextlib.ExitStack() as stack:
        hosts = start_mongoeco(stack, MONGO_PYTHON)
        fill(hosts, args.docs)
        results = trio.run(run, hosts, args.rounds)
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
