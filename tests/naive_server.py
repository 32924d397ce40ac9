#!/usr/bin/env python3
"""The plainest systemd-style server: ``socket(fileno=3)`` and a blocking accept loop.

Answers every connection with its pid, negated if the socket was handed over
in non-blocking mode (so that a test can see the mode it got).
"""

from __future__ import annotations

import os
import socket


def main() -> None:
    listener = socket.socket(fileno=3)
    sign = 1 if os.get_blocking(3) else -1
    while True:
        conn, _ = listener.accept()  # BlockingIOError here if handed over non-blocking
        with conn:
            conn.sendall(f"{sign * os.getpid()}\n".encode())


if __name__ == "__main__":
    main()
