"""Contracts between the layers: what a monitor and a spawner look like.

Typing only; implementations live in :mod:`trimperor.monitors` and
:mod:`trimperor.vassals.spawner` (and fakes in :mod:`trimperor.testing`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from trimperor.core.model import SourceEvent
    from trimperor.core.stats import SourceStats

__all__ = [
    "LaunchPlan",
    "Monitor",
    "MonitorFactory",
    "MonitorOptions",
    "Process",
    "SourceHealth",
    "Spawner",
]


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    """Settings every monitor receives from the command line."""

    freq: float = 3.0
    """Seconds between full rescans (the safety net for missed events)."""
    follow_symlinks: bool = True
    extra_extensions: tuple[str, ...] = ()
    max_config_size: int = 64 * 1024
    """Every source ignores (and logs) configurations larger than this, in bytes."""
    tyrant: bool = False
    """Tyrant mode: sources refuse what could make one user run as another (a
    symlink whose owner is not its target's), and those that read files named by
    a message check their owner first."""
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Each plugin's own settings, by plugin name (``files``, ``amqp``, ``zoo``,
    ``zmq``): the CLI fills them from the plugin's options (``--amqp-exchange``
    is ``plugins["amqp"]["exchange"]``), and the plugin reads them into its own
    options object (:class:`~trimperor.monitors.amqp.AmqpOptions`, ...)."""


class SourceHealth(Protocol):
    """What a monitor reports about its source (connected, retrying, ...)."""

    def snapshot(self) -> SourceStats: ...


class Monitor(Protocol):
    """Turns one source into :data:`~trimperor.core.model.SourceEvent` values.

    ``run`` validates the source first and raises
    :class:`~trimperor.core.errors.SourceError` if it cannot be used at all (an
    unreadable directory at start); once it calls ``task_status.started()`` it
    must never raise for a problem of the outside world: it logs, sends a
    :class:`~trimperor.core.model.SourceProblem` and retries.
    """

    uri: str

    @property
    def status(self) -> SourceHealth:
        """The source's health, as the stats server and ``ctl`` show it."""

    async def run(
        self,
        send: trio.MemorySendChannel[SourceEvent],
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None: ...


class MonitorFactory(Protocol):
    def __call__(self, uri: str, options: MonitorOptions) -> Monitor: ...


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything needed to start one vassal process; no policy left to decide."""

    name: str
    argv: tuple[str, ...]
    cwd: str
    env: tuple[tuple[str, str], ...]
    user: str | None = None
    """User name or number to run as; None keeps the emperor's."""
    group: str | None = None
    init_groups: bool = True
    """When changing user: the user's supplementary groups (initgroups), else none."""
    logto: str | None = None
    as_user: bool = False
    """Tyrant mode: open ``logto`` and enter ``cwd`` with the user's rights only
    (the configuration's author is not trusted with root's)."""
    pass_fds: tuple[int, ...] = ()
    stdin_fd: int | None = None
    listen_fds: tuple[int, ...] = ()
    """Sockets handed over systemd's way: moved to fds 3, 4, ... in the child,
    with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` (the child's own pid)."""
    listen_names: tuple[str, ...] = ()


class Process(Protocol):
    """A started vassal process, leader of its own process group."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code, or minus the signal number."""

    async def wait(self) -> int:
        """Wait until the process has exited, kill what is left of its group, reap it."""

    @property
    def output(self) -> trio.abc.ReceiveStream | None:
        """The vassal's stdout (and its stderr too, if :attr:`errors` is None),
        unless they go to a file."""

    @property
    def errors(self) -> trio.abc.ReceiveStream | None:
        """The vassal's stderr, when it is read apart from its stdout."""

    def send(self, sig: int) -> None:
        """Send *sig* to the main process only (a reload signal for its master)."""

    def signal_group(self, sig: int) -> None:
        """Send *sig* to the whole process group; no error if it is already gone."""


class Spawner(Protocol):
    async def spawn(self, plan: LaunchPlan) -> Process:
        """Start the process. Raises :class:`~trimperor.core.errors.SpawnError`."""
