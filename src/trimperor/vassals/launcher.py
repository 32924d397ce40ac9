"""The emperor's end of the launcher (see ``_launcher.py`` for the other end).

:class:`LauncherSpawner` is the :class:`~trimperor.abc.Spawner` the command line
uses: every vassal is started by one small launcher process that is the
subreaper of them all, so that no descendant (double-forked, ``setsid``)
outlives its vassal's stop or the emperor's death, even by ``kill -9``.

Why a process and not the emperor itself: the emperor could be the subreaper,
but nothing would then remain to clean up after *its* death; and forking the
large emperor costs more the larger it is (measurements in docs/design.md).
The launcher is started with ``vfork`` (no ``preexec_fn``), so starting it
costs the same whatever the emperor's size.

When the launcher dies, its vassals die with it (parent-death signal); their
exits are reported as ``SIGKILL`` and the next spawn starts a new launcher.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from trimperor.abc import LaunchPlan
from trimperor.core.errors import SpawnError
from trimperor.vassals.spawner import _open_log, resolve_ids, vassal_nofile

__all__ = ["TAG", "LauncherProcess", "LauncherSpawner"]

log = logging.getLogger(__name__)

PROGRAM = Path(__file__).with_name("_launcher.py")
#: Every vassal's environment names the spawn it belongs to, so that the
#: launcher recognises its orphans (must match ``_launcher.TAG``).
TAG = "TRIMPEROR_VASSAL_ID"
_MAX_MESSAGE = 4 * 1024 * 1024 - 4096
#: How long a spawn may wait for the launcher's answer (seconds).
_ANSWER_TIMEOUT = 30.0


class LauncherProcess:
    """A vassal started by the launcher; its exit is reported by the launcher."""

    def __init__(
        self,
        pid: int,
        output: trio.lowlevel.FdStream | None,
        errors: trio.lowlevel.FdStream | None = None,
    ) -> None:
        self._pid = pid
        self._output = output
        self._errors = errors
        self._returncode: int | None = None
        self._exited = trio.Event()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def output(self) -> trio.lowlevel.FdStream | None:
        return self._output

    @property
    def errors(self) -> trio.lowlevel.FdStream | None:
        return self._errors

    def _exit(self, returncode: int) -> None:
        if self._returncode is None:
            self._returncode = returncode
            self._exited.set()

    def signal_group(self, sig: int) -> None:
        if self._returncode is not None:
            return
        try:
            os.killpg(self._pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

    def send(self, sig: int) -> None:
        if self._returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    async def aclose(self) -> None:
        """Kill the whole group, wait for the exit, release the output. Safe twice."""
        if self._returncode is None:
            self.signal_group(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await self.wait()
        for stream in (self._output, self._errors):
            if stream is not None:
                await stream.aclose()


@dataclass
class _Pending:
    read_fd: int | None
    err_fd: int | None = None
    done: trio.Event = field(default_factory=trio.Event)
    process: LauncherProcess | None = None
    error: str | None = None
    abandoned: bool = False

    def close(self) -> None:
        """The spawn failed: our ends of its output pipes are not needed."""
        for fd in (self.read_fd, self.err_fd):
            if fd is not None:
                os.close(fd)
        self.read_fd = self.err_fd = None


class LauncherSpawner:
    """Spawns through one launcher process, started on first use.

    *adopt_orphans*: the emperor is itself a child subreaper (the command line
    makes it one), so that the descendants of a launcher that died come to it;
    it then kills and reaps them. Leave it off in a process that has children
    of its own to keep (a test runner).
    """

    def __init__(self, *, adopt_orphans: bool = False) -> None:
        self._adopt = adopt_orphans
        self._sock: trio.socket.SocketType | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._procs: dict[int, LauncherProcess] = {}
        self._starting = trio.Lock()
        self._sending = trio.Lock()  # one writer at a time on the socket (trio's rule)

    @property
    def launcher_pid(self) -> int | None:
        return self._popen.pid if self._popen is not None and self._sock is not None else None

    async def _ensure(self) -> trio.socket.SocketType:
        async with self._starting:
            if self._sock is not None:
                return self._sock
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                # No preexec_fn: subprocess uses vfork, whatever the emperor's size.
                self._popen = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-I", "-S", str(PROGRAM), str(theirs.fileno())],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            except OSError as exc:
                ours.close()
                raise SpawnError(f"cannot start the launcher: {exc}") from None
            finally:
                theirs.close()
            sock = trio.socket.from_stdlib_socket(ours)
            self._sock = sock
            log.info("launcher.started pid=%s", self._popen.pid)
            trio.lowlevel.spawn_system_task(self._read, sock, self._popen)
            return sock

    async def _read(self, sock: trio.socket.SocketType, popen: subprocess.Popen[bytes]) -> None:
        """Answers and exits from the launcher, until it goes away."""
        try:
            while True:
                data = await sock.recv(65536)
                if not data:
                    break
                try:
                    self._message(json.loads(data))
                except (ValueError, KeyError, TypeError):
                    log.error("launcher.bad_message size=%d", len(data))
        except OSError as exc:
            log.error("launcher.read_failed error=%s", exc)
        except trio.Cancelled:
            sock.close()
            with contextlib.suppress(OSError):
                popen.wait(timeout=5)  # it kills everything once our end closes
            raise
        self._lost(sock, popen)

    def _message(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "spawned":
            pending = self._pending.pop(message["id"])
            output = (
                trio.lowlevel.FdStream(pending.read_fd) if pending.read_fd is not None else None
            )
            errors = trio.lowlevel.FdStream(pending.err_fd) if pending.err_fd is not None else None
            proc = LauncherProcess(message["pid"], output, errors)
            self._procs[proc.pid] = proc
            pending.process = proc
            if pending.abandoned:
                proc.signal_group(signal.SIGKILL)
            pending.done.set()
        elif op == "failed":
            pending = self._pending.pop(message["id"])
            pending.close()
            pending.error = str(message["error"])
            pending.done.set()
        elif op == "exit":
            exited = self._procs.pop(message["pid"], None)
            if exited is not None:
                exited._exit(int(message["returncode"]))
        elif op == "hello":
            log.debug("launcher.ready pid=%s", message["pid"])

    def _lost(self, sock: trio.socket.SocketType, popen: subprocess.Popen[bytes]) -> None:
        """The launcher died: its vassals died with it."""
        sock.close()
        if self._sock is sock:
            self._sock = None
        try:
            status = popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            popen.kill()
            status = popen.wait()
        log.error(
            "launcher.died pid=%s status=%s vassals=%d; their processes are killed, a new "
            "launcher starts with the next spawn",
            popen.pid,
            status,
            len(self._procs),
        )
        for proc in list(self._procs.values()):
            proc.signal_group(signal.SIGKILL)
            proc._exit(-signal.SIGKILL)
        self._procs.clear()
        for pending in list(self._pending.values()):
            pending.close()
            pending.error = "the launcher died"
            pending.done.set()
        self._pending.clear()
        if self._adopt:
            _reap_adopted()

    async def spawn(self, plan: LaunchPlan) -> LauncherProcess:
        uid, gid, groups = resolve_ids(plan.user, plan.group, plan.init_groups)
        sock = await self._ensure()
        ident = next(self._ids)
        fds: list[int] = []
        mine: list[int] = []  # opened here, closed once sent
        read_fd: int | None = None
        err_fd: int | None = None
        logto = None
        stderr_index = None
        if plan.logto is not None and plan.as_user and uid is not None:
            logto = plan.logto  # opened by the child, as the user
        elif plan.logto is not None:
            mine.append(await trio.to_thread.run_sync(_open_log, plan.logto, None))
        else:
            read_fd, write_fd = os.pipe()
            err_fd, err_write = os.pipe()
            mine += [write_fd, err_write]
            stderr_index = 1
        try:
            stdout_index = 0 if mine else None
            fds += mine
            stdin_index = None
            if plan.stdin_fd is not None:
                stdin_index = len(fds)
                fds.append(plan.stdin_fd)
            passed = []
            for fd in plan.pass_fds:
                passed.append([len(fds), fd])
                fds.append(fd)
            listen = []
            for fd in plan.listen_fds:
                listen.append(len(fds))
                fds.append(fd)
            env = dict(plan.env)
            env[TAG] = f"{os.getpid()}.{ident}"
            if plan.listen_fds:
                env["LISTEN_FDS"] = str(len(plan.listen_fds))
                env["LISTEN_FDNAMES"] = ":".join(plan.listen_names)
            request = {
                "op": "spawn",
                "id": ident,
                "argv": list(plan.argv),
                "env": env,
                "cwd": plan.cwd,
                "uid": uid,
                "gid": gid,
                "groups": list(groups) if groups is not None else None,
                "logto": logto,
                "stdout": stdout_index,
                "stderr": stderr_index,
                "stdin": stdin_index,
                "pass": passed,
                "listen": listen,
                "nofile": vassal_nofile(),
            }
            data = json.dumps(request).encode()
            if len(data) > _MAX_MESSAGE:
                raise SpawnError(f"the command line and environment are {len(data)} bytes")
            pending = self._pending[ident] = _Pending(read_fd, err_fd)
            read_fd = err_fd = None  # the pending record owns them now
            try:
                async with self._sending:  # a full socket buffer: the next waits its turn
                    await sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
            except OSError as exc:
                self._pending.pop(ident, None)
                pending.close()
                raise SpawnError(f"cannot reach the launcher: {exc}") from None
        finally:
            for leftover in (*mine, read_fd, err_fd):
                if leftover is not None:
                    os.close(leftover)
        # The answer comes within milliseconds; if we were cancelled meanwhile,
        # the process would run with nobody to stop it.
        with trio.CancelScope(shield=True), trio.move_on_after(_ANSWER_TIMEOUT):
            await pending.done.wait()
        if not pending.done.is_set():
            pending.abandoned = True
            raise SpawnError("the launcher did not answer")
        if pending.error is not None:
            raise SpawnError(pending.error)
        assert pending.process is not None
        return pending.process


def _reap_adopted() -> None:
    """Kill and reap what a dead launcher left us (the emperor is their subreaper).

    Only with *adopt_orphans*: the emperor then has no children but launchers.
    """
    me = os.getpid()
    for _ in range(100):
        adopted = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == me:
                adopted.append(int(name))
        if not adopted:
            return
        for pid in adopted:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
