"""A MongoDB wire-protocol server for the tests: mongoeco's, in memory.

No real ``mongod`` can be installed on the project's machines; mongoeco
(PyPI ``mongoeco[wire]``) speaks enough of the protocol for pymongo's CRUD.
It needs Python >= 3.13, so it runs as its own process from the venv that
``scripts/services start`` builds::

    .venv-mongo/bin/python scripts/mongoeco_server.py PORT [SQLITE_FILE]

PORT 0 picks a free port. Once listening it prints one line,
``ready 127.0.0.1:PORT``, and serves until SIGINT or SIGTERM (or until its
standard input, when it is a pipe, closes: so it never outlives the test run
that started it).
With SQLITE_FILE the data persists in that file; otherwise it lives in memory.

Known gaps: change streams (``$changeStream``) and legacy OP_QUERY finds are
not supported.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys

from mongoeco.wire import AsyncMongoEcoProxyServer  # type: ignore[import-not-found]


async def _stdin_closed() -> None:
    """Return when standard input reaches end of file (the parent went away)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(port: int, sqlite_path: str | None) -> None:
    engine = None
    if sqlite_path is not None:
        from mongoeco.engines import SQLiteEngine  # type: ignore[import-not-found]

        engine = SQLiteEngine(sqlite_path)
    async with AsyncMongoEcoProxyServer(host="127.0.0.1", port=port, engine=engine) as server:
        address = server.address
        print(f"ready {address.host}:{address.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watchdog = None
        if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
            watchdog = asyncio.create_task(_stdin_closed())
            watchdog.add_done_callback(lambda _: stop.set())
        try:
            await stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3 or not argv[1].isdigit():
        print(f"usage: {argv[0]} PORT [SQLITE_FILE]", file=sys.stderr)
        return 2
    asyncio.run(serve(int(argv[1]), argv[2] if len(argv) == 3 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
