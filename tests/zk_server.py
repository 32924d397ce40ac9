"""A real ZooKeeper server (Debian's ``zookeeper`` package) for the tests.

``zkServer.sh`` insists on the configuration directory of the package, so the
server class is run directly with a ``zoo.cfg`` of our own: a port and data
directory of the test's choosing. :meth:`ZkServer.stop` is an outage (the
process is killed), :meth:`ZkServer.start` on the same data a return.
``scripts/services start`` installs the package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port

__all__ = ["JAR", "ZkServer", "zookeeper_missing"]

JAR = Path("/usr/share/java/zookeeper.jar")
CONF = Path("/etc/zookeeper/conf")
#: ZooKeeper's tick: sessions may last from 2 to 20 ticks (1 to 10 s).
TICK_MS = 500
START_TIMEOUT = 60.0


def zookeeper_missing() -> str | None:
    """Why no ZooKeeper server can be started here, or None."""
    if not JAR.exists() or not CONF.is_dir():
        return f"{JAR} is missing: run scripts/services start (Debian package zookeeper)"
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"java does not run ({exc}); ZooKeeper needs a JVM"
    return None


class ZkServer:
    """One standalone ZooKeeper on ``127.0.0.1:port`` with its data in *directory*."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "zookeeper.log"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        self.config = directory / "zoo.cfg"
        self.config.write_text(
            f"tickTime={TICK_MS}\n"
            f"dataDir={directory / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=srvr,dump\n"
        )

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it answers; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    "java",
                    "-Xmx256m",
                    "-cp",
                    f"{CONF}:{JAR}",
                    f"-Dzookeeper.log.dir={self.directory}",
                    "-Dzookeeper.root.logger=WARN,CONSOLE",
                    "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                    str(self.config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ZooKeeper did not answer on port {self.port} in time")
            time.sleep(0.1)

    def four(self, word: str) -> str:
        """The server's answer to a four-letter word (``srvr``, ``dump``); raises OSError."""
        chunks = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(word.encode())
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def answers(self) -> bool:
        """Whether the server serves clients."""
        try:
            reply = self.four("srvr")
        except OSError:
            return False
        return reply.startswith("Zookeeper version") and "Mode: standalone" in reply

    def sessions(self) -> str:
        """The ids of the sessions the server keeps (from ``dump``), as text."""
        return self.four("dump").partition("ephemeral nodes dump")[0]

    def stop(self) -> None:
        """Kill the server (an outage: no goodbye to the clients); idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
