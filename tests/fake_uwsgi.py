#!/usr/bin/env python3
"""A scripted stand-in for the uwsgi binary: speaks the emperor protocol only.

Scenario from $FAKE_SCENARIO:
- heartbeat-then-silence: one heartbeat byte, then nothing (the emperor must kill it)
- idle: ready, then the idle byte 22 (voluntary shutdown); exits on the stop byte
- ask-config: reads the pushed config, appends it to $FAKE_OUT; on the reload byte
  asks for the config again (byte 2) and appends the new one
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time


def read_config(fd: int) -> bytes:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.settimeout(5)
        header = b""
        while len(header) < 4:
            header += s.recv(4 - len(header))
        (length,) = struct.unpack("<H", header[1:3])
        body = b""
        while len(body) < length:
            body += s.recv(length - len(body))
        return body


def main() -> None:
    # Like uwsgi's master, which reloads on SIGTERM: only the stop byte may end it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    scenario = os.environ["FAKE_SCENARIO"]
    with open(os.environ["FAKE_PIDFILE"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.environ["FAKE_PIDFILE"] + ".tmp", os.environ["FAKE_PIDFILE"])
    control = int(os.environ["UWSGI_EMPEROR_FD"])
    config_fd = os.environ.get("UWSGI_EMPEROR_FD_CONFIG")
    out = os.environ.get("FAKE_OUT")
    if config_fd is not None:
        body = read_config(int(config_fd))
        if out:
            with open(out, "ab") as f:
                f.write(body + b"\n--\n")
    os.write(control, bytes([1]))  # ready
    if scenario == "heartbeat-then-silence":
        os.write(control, bytes([26]))
        time.sleep(600)
    if scenario == "idle":
        os.write(control, bytes([22]))
    while True:
        message = os.read(control, 1)
        if not message or message[0] in (0, 2):
            sys.exit(0)
        if message[0] == 1 and config_fd is not None:  # reload: ask for the config again
            os.write(control, bytes([2]))
            body = read_config(int(config_fd))
            if out:
                with open(out, "ab") as f:
                    f.write(body + b"\n--\n")


if __name__ == "__main__":
    main()
