#!/usr/bin/env python3
"""A plain socket server for on-demand tests: takes its sockets systemd's way.

For every connection it answers ``<pid>\\n`` and closes. Environment:
- ``EXIT_AFTER=N``: exit with status 0 after N connections;
- ``WATCHDOG_PINGS=N``: send N ``WATCHDOG=1`` notifications, then go silent;
- ``SLOW=S``: sleep S seconds before answering each connection.

SIGTERM stops it gracefully: the connection it has accepted is answered first
(a server killed between accept and answer would drop a client, which is the
server's fault, not the emperor's).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


def main() -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit(f"LISTEN_PID is {os.environ.get('LISTEN_PID')}, not {os.getpid()}")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    count = int(os.environ["LISTEN_FDS"])
    names = os.environ["LISTEN_FDNAMES"].split(":")
    assert len(names) == count, names
    sockets = [socket.socket(fileno=3 + i) for i in range(count)]
    selector = selectors.DefaultSelector()
    for s in sockets:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    notify("READY=1\nSTATUS=serving")
    exit_after = int(os.environ.get("EXIT_AFTER", "0"))
    pings = int(os.environ.get("WATCHDOG_PINGS", "-1"))
    slow = float(os.environ.get("SLOW", "0"))
    served = 0
    while not stopping:
        if pings > 0:
            notify("WATCHDOG=1")
            pings -= 1
        for key, _ in selector.select(timeout=0.05):
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.setblocking(True)
                if slow:
                    time.sleep(slow)
                conn.sendall(f"{os.getpid()}\n".encode())
            served += 1
            if exit_after and served >= exit_after:
                sys.exit(0)


if __name__ == "__main__":
    main()
