"""A real etcd member for the tests, on free ports and a temporary data directory.

``scripts/services start`` installs Debian's ``etcd-server``; nothing starts a
daemon. :class:`EtcdServer` runs one member as a child process: ``start()``
waits until ``/health`` answers, ``stop()`` kills it (an outage: the data
directory stays), ``start()`` again is the return on the same data.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

__all__ = ["EtcdCluster", "EtcdServer"]


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


class EtcdServer:
    """One etcd member listening on 127.0.0.1 (client and peer ports chosen here)."""

    def __init__(self, directory: Path, name: str = "t") -> None:
        self.directory = directory
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "etcd.log"
        #: ``name=peer-url,...`` of every member (a cluster sets it); itself alone by default.
        self.initial_cluster = ""

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout: float = 30.0, wait: bool = True) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: run scripts/services start (Debian etcd-server)")
        peer = self.peer_url
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--data-dir",
                    str(self.directory / "data"),
                    "--name",
                    self.name,
                    "--listen-client-urls",
                    self.url,
                    "--advertise-client-urls",
                    self.url,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--initial-cluster",
                    self.initial_cluster or f"{self.name}={peer}",
                    "--log-level",
                    "warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"etcd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"etcd did not become healthy in {timeout}s:\n{self.log.read_text()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    # -- a few calls for test set-up (blocking, plain HTTP) ------------------------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the JSON gateway; retried while the cluster elects a leader (503)."""
        deadline = time.monotonic() + 20
        data = json.dumps(body).encode()
        while True:
            req = urllib.request.Request(self.url + path, data=data, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    result: dict[str, Any] = json.load(resp)
                    return result
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code != 503 or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def put(self, key: str, value: str | bytes) -> int:
        answer = self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> int:
        answer = self.call("/v3/kv/deleterange", {"key": b64(key)})
        return int(answer["header"]["revision"])

    def get(self, key: str) -> bytes | None:
        answer = self.call("/v3/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def keys(self, prefix: str) -> dict[str, bytes]:
        end = prefix.encode()[:-1] + bytes([prefix.encode()[-1] + 1])
        answer = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in answer.get("kvs") or []
        }

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def revision(self) -> int:
        answer = self.call("/v3/kv/range", {"key": b64("\0")})
        return int(answer["header"]["revision"])


class EtcdCluster:
    """Three (or *size*) etcd members on loopback ports, one data directory each."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.members = []
        for i in range(size):
            member_dir = directory / f"m{i}"
            member_dir.mkdir()
            self.members.append(EtcdServer(member_dir, f"m{i}"))
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    def start(self) -> None:
        # Members wait for each other (a quorum) before they are healthy.
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_healthy(60)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def endpoints(self, first: int = 0) -> str:
        """Every client address, starting with member *first*."""
        order = self.members[first:] + self.members[:first]
        return ",".join(m.address for m in order)

    def live(self) -> EtcdServer:
        return next(m for m in self.members if m.proc is not None)
