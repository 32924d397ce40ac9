"""Running real uWSGI vassals: argv, environment and the emperor's channels.

A :class:`UwsgiChannel` is created for every process start. It owns the
emperor's ends of the control socketpair (``UWSGI_EMPEROR_FD``) and, for a
configuration held in memory, of the config socketpair
(``UWSGI_EMPEROR_FD_CONFIG``), and builds the :class:`~trimperor.abc.LaunchPlan`
that hands the other ends to the child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import trio

from trimperor.abc import LaunchPlan
from trimperor.errors import SpawnError
from trimperor.uwsgi_protocol import ToVassal, config_flag, encode_config
from trimperor.vassalspec import UwsgiSpec

__all__ = ["UwsgiChannel", "UwsgiOptions", "uwsgi_argv", "uwsgi_env"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UwsgiOptions:
    """The emperor-wide settings for uWSGI vassals (uWSGI's option names in comments)."""

    binary: str = "uwsgi"  # --binary-path
    vassal_set: tuple[str, ...] = ()  # --vassal-set / --vassals-set
    include: tuple[str, ...] = ()  # --vassals-include
    include_before: tuple[str, ...] = ()  # --vassals-include-before
    inherit: tuple[str, ...] = ()  # --vassals-inherit
    inherit_before: tuple[str, ...] = ()  # --vassals-inherit-before
    graceful_shutdown: bool = False  # --emperor-graceful-shutdown
    curse_tolerance: float = 30.0  # --emperor-curse-tolerance
    required_heartbeat: float = 30.0  # --emperor-required-heartbeat
    extra_extensions: tuple[str, ...] = ()  # --emperor-extra-extension


def uwsgi_argv(spec: UwsgiSpec, options: UwsgiOptions) -> tuple[str, ...]:
    """uWSGI's argv order: binary, inherit/include (before), --set, FLAG NAME, inherit/include."""
    argv = [options.binary]
    for t in options.inherit_before:
        argv += ["--inherit", t]
    for i in options.include_before:
        argv += ["--include", i]
    for kv in options.vassal_set:
        argv += ["--set", kv]
    target = spec.path if spec.path is not None else f"emperor://{spec.name}"
    argv += [config_flag(spec.name, options.extra_extensions), target]
    for t in options.inherit:
        argv += ["--inherit", t]
    for i in options.include:
        argv += ["--include", i]
    return tuple(argv)


def uwsgi_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The emperor's environment as a vassal sees it: ``UWSGI_VASSAL_X`` becomes
    ``UWSGI_X``; ``UWSGI_RELOADS`` and the service manager's variables are removed."""
    env: dict[str, str] = {}
    for key, value in environ.items():
        if key in {
            "UWSGI_RELOADS",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "UWSGI_EMPEROR_FD",
            "UWSGI_EMPEROR_FD_CONFIG",
        }:
            continue
        env[key] = value
    for key, value in environ.items():
        if key.startswith("UWSGI_VASSAL_") and len(key) > len("UWSGI_VASSAL_"):
            env["UWSGI_" + key[len("UWSGI_VASSAL_") :]] = value
    return env


class UwsgiChannel:
    """The emperor's side of one uWSGI vassal process."""

    def __init__(
        self,
        spec: UwsgiSpec,
        options: UwsgiOptions,
        environ: Mapping[str, str],
        stdin_fd: int | None = None,
    ) -> None:
        self.spec = spec
        self.options = options
        control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._child_ends = [child_control]
        self._control = trio.socket.from_stdlib_socket(control)
        self._config: trio.socket.SocketType | None = None
        env = uwsgi_env(environ)
        env["UWSGI_EMPEROR_FD"] = str(child_control.fileno())
        if spec.path is None:
            ours, child_config = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._child_ends.append(child_config)
            self._config = trio.socket.from_stdlib_socket(ours)
            env["UWSGI_EMPEROR_FD_CONFIG"] = str(child_config.fileno())
        for end in self._child_ends:
            end.set_inheritable(True)
        self.plan = LaunchPlan(
            name=spec.name,
            argv=uwsgi_argv(spec, options),
            cwd=spec.cwd,
            env=tuple(env.items()),
            user=spec.uid,
            group=spec.gid,
            init_groups=spec.init_groups,
            as_user=spec.tyrant,
            pass_fds=tuple(end.fileno() for end in self._child_ends),
            stdin_fd=stdin_fd,
        )

    def spawned(self) -> None:
        """The child has its ends now: close ours of them."""
        for end in self._child_ends:
            end.close()
        self._child_ends = []

    async def push_config(self) -> None:
        """Send the in-memory configuration (at spawn and on every request)."""
        if self._config is None:
            return
        try:
            frame = encode_config(self.spec.text.encode())
        except ValueError as exc:
            raise SpawnError(f"{self.spec.name}: {exc}") from None
        with contextlib.suppress(OSError):
            await self._config.send(frame)  # small: fits the socket buffer at once
            log.debug("uwsgi.config_pushed name=%s bytes=%d", self.spec.name, len(frame))

    def send(self, message: ToVassal) -> bool:
        """Write one control byte without blocking; False if the vassal is gone."""
        try:
            os.write(self._control.fileno(), bytes([message]))
        except OSError as exc:
            log.warning(
                "uwsgi.send_failed name=%s message=%s error=%s",
                self.spec.name,
                message.name,
                exc.strerror,
            )
            return False
        return True

    async def messages(self) -> AsyncIterator[int]:
        """Every byte the vassal sends, until it closes its end."""
        while True:
            try:
                data = await self._control.recv(4096)
            except (OSError, trio.ClosedResourceError):
                return
            if not data:
                return
            for byte in data:
                yield byte

    def close(self) -> None:
        self.spawned()
        self._control.close()
        if self._config is not None:
            self._config.close()
