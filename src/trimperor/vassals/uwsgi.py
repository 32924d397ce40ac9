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
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import trio

from trimperor.abc import LaunchPlan
from trimperor.core.errors import SpawnError
from trimperor.core.uwsgi_protocol import ToVassal, config_flag, encode_config
from trimperor.core.vassalspec import UwsgiSpec

__all__ = [
    "UwsgiChannel",
    "UwsgiOptions",
    "announce_binary",
    "binary_candidates",
    "default_binary",
    "resolve_binary",
    "uwsgi_argv",
    "uwsgi_env",
]

log = logging.getLogger(__name__)


def default_binary() -> str:
    """The ``uwsgi`` installed beside this Python (a venv's ``bin/``), else the
    one on ``PATH``, else the bare name (the spawn error then says it is missing).

    The directory of :data:`sys.executable` is taken as it is, without
    resolving symlinks: a venv's ``python`` links to the base interpreter.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "uwsgi")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("uwsgi") or "uwsgi"


@dataclass(frozen=True, slots=True)
class UwsgiOptions:
    """The emperor-wide settings for uWSGI vassals (uWSGI's option names in comments)."""

    binary: str = field(default_factory=default_binary)  # --binary-path
    vassal_set: tuple[str, ...] = ()  # --vassal-set / --vassals-set
    include: tuple[str, ...] = ()  # --vassals-include
    include_before: tuple[str, ...] = ()  # --vassals-include-before
    inherit: tuple[str, ...] = ()  # --vassals-inherit
    inherit_before: tuple[str, ...] = ()  # --vassals-inherit-before
    graceful_shutdown: bool = False  # --emperor-graceful-shutdown
    curse_tolerance: float = 30.0  # --emperor-curse-tolerance
    required_heartbeat: float = 30.0  # --emperor-required-heartbeat
    extra_extensions: tuple[str, ...] = ()  # --emperor-extra-extension
    wrapper: str | None = None  # --emperor-wrapper
    wrapper_override: tuple[str, ...] = ()  # --emperor-wrapper-override
    wrapper_fallback: tuple[str, ...] = ()  # --emperor-wrapper-fallback
    wrapper_attr: str | None = None  # --emperor-wrapper-attr


def binary_candidates(spec: UwsgiSpec, options: UwsgiOptions) -> tuple[str, ...]:
    """The programs to try for *spec*, in order.

    The overrides come first and the fallbacks last, as uWSGI tries them. The
    one in between is, from the most specific: the vassal's attribute named by
    ``--emperor-wrapper-attr``, its own ``binary-path``, ``--emperor-wrapper``,
    then ``--binary-path`` (or the default binary).
    """
    attr = spec.attr(options.wrapper_attr) if options.wrapper_attr else None
    main = attr or spec.binary or options.wrapper or options.binary
    return tuple(dict.fromkeys((*options.wrapper_override, main, *options.wrapper_fallback)))


def resolve_binary(candidates: tuple[str, ...], path: str | None) -> str | None:
    """The first candidate that can be executed (a path, or a name looked up in
    *path*, the vassal's ``PATH``), or None."""
    for program in candidates:
        if "/" in program:
            if os.path.isfile(program) and os.access(program, os.X_OK):
                return program
        elif shutil.which(program, path=path if path is not None else os.defpath):
            return program
    return None


#: Binaries whose version was logged already (once per binary, per emperor).
_announced: set[str] = set()
_STARTING = re.compile(rb"\*\*\* Starting uWSGI (\S+)")


def announce_binary(program: str, line: bytes) -> bool:
    """Log *program* and its version, read from uWSGI's first output line
    (``*** Starting uWSGI 2.0.28 (64bit) on ...``), the first time a vassal
    run by it prints that line. True once the program is announced."""
    if program in _announced:
        return True
    m = _STARTING.search(line)
    if m is None:
        return False
    _announced.add(program)
    log.info("uwsgi.binary path=%s version=%s", program, m.group(1).decode(errors="replace"))
    return True


def uwsgi_argv(
    spec: UwsgiSpec, options: UwsgiOptions, binary: str | None = None
) -> tuple[str, ...]:
    """uWSGI's argv order: binary, inherit/include (before), --set, FLAG NAME, inherit/include.

    *binary* is the program chosen among :func:`binary_candidates` (by default the first).
    """
    argv = [binary or binary_candidates(spec, options)[0]]
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
        env = uwsgi_env(environ)
        candidates = binary_candidates(spec, options)
        binary = resolve_binary(candidates, env.get("PATH"))
        if binary is None:
            raise SpawnError(
                f"no uWSGI binary found (tried {', '.join(candidates)}); "
                "install uwsgi (pip install uwsgi) or give --binary-path"
            )
        self.binary = binary
        """The program run: the first of :func:`binary_candidates` that exists."""
        self.program = (
            binary if "/" in binary else shutil.which(binary, path=env.get("PATH")) or binary
        )
        """The same, as a path."""
        control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._child_ends = [child_control]
        self._control = trio.socket.from_stdlib_socket(control)
        self._config: trio.socket.SocketType | None = None
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
            argv=uwsgi_argv(spec, options, binary),
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
