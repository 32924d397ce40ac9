"""The command line: read argv, set up logging and signals, run the emperor.

This is the only module that turns errors into exit codes: 0 after a clean
shutdown, 1 when a source cannot be used at start, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from trimperor import __version__
from trimperor.abc import Monitor, MonitorFactory, MonitorOptions
from trimperor.control.address import default_control_path, read_token
from trimperor.control.api import check_stats_address
from trimperor.control.hub import ControlOptions
from trimperor.core.configfile import parse
from trimperor.core.errors import MissingExtraError, SourceError, TrimperorError, UsageError
from trimperor.core.policy import BackoffPolicy
from trimperor.emperor import Emperor
from trimperor.monitors.files import DirMonitor, GlobMonitor
from trimperor.monitors.toolkit import GROUP, load_factory
from trimperor.vassals.launcher import LauncherSpawner
from trimperor.vassals.spawner import become_subreaper, raise_fd_limit
from trimperor.vassals.uwsgi import UwsgiOptions, default_binary

if TYPE_CHECKING:
    from trimperor.fleet.member import Fleet

__all__ = ["build_parser", "main", "plugin_settings", "resolve_sources"]

log = logging.getLogger("trimperor")

#: Built-in monitors, used when the package metadata is not installed.
#: The monitors that are part of the package; the others are found by their
#: entry points (``trimperor.monitors``), which are read only for those.
_BUILTIN: dict[str, MonitorFactory] = {"dir": DirMonitor, "glob": GlobMonitor}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trimperor",
        description="Keep one vassal process per configuration found in the given sources.",
        epilog="A source is scheme://... (dir, glob, and installed extras such as pg, "
        "mongodb, amqp, zmq, etcd); an existing directory means dir://, anything else glob://. "
        "Quote glob patterns. Options also answer to their uWSGI spelling "
        "(--emperor-freq, --emperor-stats, ...).",
    )
    add = p.add_argument
    add("sources", nargs="*", metavar="SOURCE", help="directory, glob or URI")
    add(
        "--emperor",
        action="append",
        default=[],
        metavar="SOURCE",
        dest="emperor",
        help="a source, as uWSGI spells it; repeatable",
    )
    add(
        "--ini",
        metavar="FILE",
        help="read emperor options from the [trimperor] or [uwsgi] section of FILE",
    )
    add(
        "--plugin",
        "--plugins",
        action="append",
        default=[],
        metavar="NAME[,NAME...]",
        dest="plugins",
        help="accepted for uWSGI command lines: the emperor monitors are built in",
    )

    g = p.add_argument_group("lifecycle")
    g.add_argument(
        "--throttle",
        "--emperor-throttle",
        type=int,
        default=1000,
        metavar="MS",
        help="first respawn delay after an early death (default 1000)",
    )
    g.add_argument(
        "--max-throttle",
        "--emperor-max-throttle",
        type=int,
        default=180_000,
        metavar="MS",
        help="longest respawn delay (default 180000)",
    )
    g.add_argument(
        "--loyal-after",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a run this long resets the backoff (default 10)",
    )
    g.add_argument(
        "--reload-mercy",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on shutdown, SIGKILL whatever still runs after this long "
        "(default: each vassal's own stop timeout)",
    )

    g = p.add_argument_group("sources")
    g.add_argument(
        "--freq",
        "--emperor-freq",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how often a source is looked at without an event, the safety net for missed "
        "events (default 3; watched directories: in full every 20th time)",
    )
    g.add_argument(
        "--nofollow",
        "--emperor-nofollow",
        action="store_true",
        help="do not follow symlinks: a link's own mtime counts",
    )
    g.add_argument(
        "--extra-extension",
        "--emperor-extra-extension",
        action="append",
        default=[],
        metavar="EXT",
        help="also accept files ending in EXT (parsed as INI); repeatable",
    )
    g.add_argument(
        "--on-demand-extension",
        "--emperor-on-demand-extension",
        dest="files.on_demand_extension",
        metavar="EXT",
        help="file vassals: read the on-demand socket from the file NAME+EXT",
    )
    g.add_argument(
        "--on-demand-directory",
        "--emperor-on-demand-directory",
        dest="files.on_demand_directory",
        metavar="DIR",
        help="file vassals: on-demand unix socket DIR/<name>.socket",
    )
    g.add_argument(
        "--max-config-size",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="every source ignores larger configurations, with a log line (default 65536)",
    )
    g.add_argument(
        "--amqp-exchange",
        dest="amqp.exchange",
        default="uwsgi.emperor",
        metavar="NAME",
        help="fanout exchange amqp:// sources consume (default uwsgi.emperor)",
    )
    g.add_argument(
        "--zoo-auth-file",
        dest="zoo.auth_file",
        metavar="FILE",
        help="zoo:// sources: digest credentials user:password from the first line of FILE",
    )

    g.add_argument(
        "--tyrant",
        "--emperor-tyrant",
        action="store_true",
        help="run every vassal as the owner of its configuration; refuse root",
    )
    g.add_argument(
        "--tyrant-initgroups",
        "--emperor-tyrant-initgroups",
        action="store_true",
        help="in tyrant mode, give vassals their owner's supplementary groups",
    )

    g = p.add_argument_group("uWSGI vassals")
    g.add_argument(
        "--binary-path",
        default=None,
        metavar="PATH",
        help="the uwsgi binary (default: the uwsgi installed beside trimperor's Python, "
        "else uwsgi on PATH); a vassal's own binary-path wins",
    )
    g.add_argument(
        "--emperor-wrapper",
        metavar="PATH",
        help="run uWSGI vassals with this program instead of --binary-path",
    )
    g.add_argument(
        "--emperor-wrapper-override",
        action="append",
        default=[],
        metavar="PATH",
        help="try this program first, before the vassal's binary; repeatable",
    )
    g.add_argument(
        "--emperor-wrapper-fallback",
        action="append",
        default=[],
        metavar="PATH",
        help="try this program when the vassal's binary cannot be run; repeatable",
    )
    g.add_argument(
        "--emperor-wrapper-attr",
        metavar="KEY",
        help="a vassal whose emperor section sets KEY runs with that program",
    )
    g.add_argument(
        "--vassal-set",
        "--vassals-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pass --set KEY=VALUE to every uWSGI vassal",
    )
    g.add_argument("--vassals-include", action="append", default=[], metavar="FILE")
    g.add_argument("--vassals-include-before", action="append", default=[], metavar="FILE")
    g.add_argument("--vassals-inherit", action="append", default=[], metavar="FILE")
    g.add_argument("--vassals-inherit-before", action="append", default=[], metavar="FILE")
    g.add_argument(
        "--graceful-shutdown",
        "--emperor-graceful-shutdown",
        action="store_true",
        help="stop uWSGI vassals with the graceful stop message (2) instead of 0",
    )
    g.add_argument(
        "--curse-tolerance",
        "--emperor-curse-tolerance",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="SIGKILL a uWSGI vassal this long after asking it to stop (default 30)",
    )
    g.add_argument(
        "--broodlord",
        "--emperor-broodlord",
        type=int,
        default=0,
        metavar="N",
        help="accepted for compatibility; zergs are not supported (a warning says so)",
    )
    g.add_argument(
        "--required-heartbeat",
        "--emperor-required-heartbeat",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after its first heartbeat, a uWSGI vassal silent this long is "
        "killed and respawned (default 30)",
    )

    g = p.add_argument_group("fleet")
    g.add_argument(
        "--cluster",
        metavar="etcd://HOST:PORT[,...]/PREFIX",
        help="join the fleet at this etcd prefix: run only the vassals placed on this node",
    )
    g.add_argument(
        "--node", metavar="NAME", help="this node's name in the fleet (default: hostname)"
    )
    g.add_argument(
        "--node-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label vassals can ask for (node-label = KEY=VALUE); repeatable",
    )
    g.add_argument(
        "--node-ttl",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="lease TTL: a dead node's vassals move after this long (default 5)",
    )

    g = p.add_argument_group("operation")
    g.add_argument(
        "--stats",
        "--emperor-stats",
        "--emperor-stats-server",
        metavar="ADDR",
        help="serve a JSON status document on host:port or a unix socket path",
    )
    g.add_argument(
        "--control",
        metavar="ADDR",
        help="control socket for trimperor ctl: a unix socket path (default "
        "$TRIMPEROR_CONTROL, else /run/trimperor/control.sock as root, else "
        "$XDG_RUNTIME_DIR/trimperor.sock), "
        "host:port (needs --control-token-file), or none",
    )
    g.add_argument(
        "--control-token-file",
        metavar="FILE",
        help="the token TCP control clients and the dashboard must present",
    )
    g.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on host:port (a bare PORT: 127.0.0.1)",
    )
    g.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="serve the web dashboard on host:port (a bare PORT: 127.0.0.1; "
        "needs --control-token-file)",
    )
    g.add_argument(
        "--logs-dir",
        metavar="DIR",
        help="also write each vassal's output to DIR/NAME.log, timestamped",
    )
    g.add_argument(
        "--log-max-bytes",
        type=int,
        default=10 * 1024 * 1024,
        metavar="BYTES",
        help="rotate a --logs-dir file at this size (default 10485760)",
    )
    g.add_argument(
        "--log-backups",
        type=int,
        default=5,
        metavar="N",
        help="rotated files kept: NAME.log.1 ... NAME.log.N (default 5)",
    )
    g.add_argument(
        "--pidfile", "--emperor-pidfile", metavar="FILE", help="write the emperor's pid to FILE"
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    _add_network_arguments(p)
    add("--version", action="version", version=f"trimperor {__version__}")
    return p


def _add_network_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network surfaces")
    g.add_argument(
        "--allow-remote-stats",
        action="store_true",
        help="let --stats listen on an address other than loopback (anyone who can connect "
        "reads the status document)",
    )
    g.add_argument(
        "--allow-remote-zmq",
        dest="zmq.allow_remote",
        action="store_true",
        help="let zmq:// sources bind an address other than loopback without CURVE "
        "(anyone who can connect runs vassals)",
    )
    g.add_argument(
        "--zmq-curve-secret",
        dest="zmq.curve_secret",
        metavar="FILE",
        help="zmq:// sources: CURVE server certificate with its secret key (zmq.auth format); "
        "with --zmq-curve-clients, only those clients are heard",
    )
    g.add_argument(
        "--zmq-curve-clients",
        dest="zmq.curve_clients",
        metavar="DIR",
        help="zmq:// sources: directory of the public certificates of allowed CURVE clients",
    )


def ini_arguments(path: str) -> list[str]:
    """Options from the ``[trimperor]`` (or else ``[uwsgi]``) section of an INI file,
    as command-line arguments: ``emperor = X`` is a source, ``key = value`` is
    ``--key value``, ``key = true`` of a flag is ``--key``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    options = parse(os.path.basename(path), text)
    section = options.section("trimperor") or options.section("uwsgi")
    if section is None:
        raise UsageError(f"{path}: no [trimperor] or [uwsgi] section")
    actions = build_parser()._actions
    flags = {s for action in actions if action.nargs == 0 for s in action.option_strings}
    known = {s for action in actions for s in action.option_strings}
    argv: list[str] = []
    for key, value in section.entries:
        option = f"--{key}"
        if option not in known or option in {"--ini", "--help", "--version"}:
            # An emperor.ini written for uWSGI holds options of uWSGI's own
            # (master, uid, logto, ...): say so, and go on with the rest.
            log.warning(
                "cli.ini_option_ignored file=%s section=%s key=%s reason=not_a_trimperor_option",
                path,
                section.name,
                key,
            )
            continue
        if option in flags:
            if value.lower() in {"true", "1", "yes", "on"}:
                argv.append(option)
        else:
            argv += [option, value]
    return argv


#: uWSGI's emperor plugins, built into trimperor as these source schemes.
PLUGIN_SCHEMES = {
    "emperor_pg": "pg",
    "emperor_mongodb": "mongodb",
    "emperor_amqp": "amqp",
    "emperor_zeromq": "zmq",
}


def plugin_name(value: str) -> str:
    """``./emperor_pg_plugin.so`` -> ``emperor_pg``: the name uWSGI would load."""
    name = os.path.basename(value.strip())
    name = name.removesuffix(".so")
    return name.removesuffix("_plugin")


def check_plugins(values: Sequence[str]) -> None:
    """``--plugin`` values: the emperor plugins are built in (debug), anything
    else means nothing to the emperor (a warning: vassals load their own)."""
    for value in values:
        for raw in value.split(","):
            if not raw.strip():
                continue
            name = plugin_name(raw)
            scheme = PLUGIN_SCHEMES.get(name)
            if scheme is not None:
                log.debug("cli.plugin_builtin plugin=%s scheme=%s", name, scheme)
            else:
                log.warning(
                    "cli.plugin_ignored plugin=%s reason=not_an_emperor_plugin "
                    "hint=vassals_load_their_own_plugins",
                    name,
                )


def _factories() -> dict[str, str]:
    """The installed monitors' entry points, by scheme (``module:attr [extra]``)."""
    from importlib.metadata import entry_points  # package metadata: 1.5 MB of RSS

    return {ep.name: ep.value for ep in entry_points(group=GROUP) if ep.name not in _BUILTIN}


def resolve_sources(args: Sequence[str], options: MonitorOptions) -> list[Monitor]:
    """uWSGI's rules: ``scheme://`` picks that monitor; an existing directory is
    ``dir``; anything else (including a path that does not exist yet) is ``glob``."""
    plugins: dict[str, str] | None = None
    monitors: list[Monitor] = []
    for arg in args:
        scheme, sep, _ = arg.partition("://")
        if not (sep and scheme.isidentifier()):
            scheme = "dir" if os.path.isdir(arg) else "glob"
        factory = _BUILTIN.get(scheme)
        if factory is None:
            plugins = _factories() if plugins is None else plugins
            if scheme not in plugins:
                known = ", ".join(sorted({*_BUILTIN, *plugins}))
                raise UsageError(f"unknown source scheme {scheme!r} in {arg!r} (known: {known})")
            factory = load_factory(scheme, plugins[scheme])
        monitors.append(factory(arg, options))
    return monitors


def plugin_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each plugin's options, by plugin: an option whose ``dest`` is
    ``PLUGIN.KEY`` (``amqp.exchange``) is the plugin's own, not a shared one."""
    plugins: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        plugin, dot, key = dest.partition(".")
        if dot:
            plugins.setdefault(plugin, {})[key] = value
    return plugins


def expanded_by_shell(args: Sequence[str]) -> bool:
    """Several plain existing files: the shell probably expanded an unquoted pattern."""
    return len(args) > 1 and all("://" not in a and os.path.isfile(a) for a in args)


#: What :class:`EscapingFilter` escapes: C0 and C1 controls but tab, DEL, the
#: Unicode line separators, and lone surrogates (undecodable file name bytes).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class EscapingFilter(logging.Filter):
    """Escapes control characters in every log message, so one record is one line.

    Names and errors come from files, rows and messages anyone may write; a
    ``\\n`` in a file name must not forge a log line. Tracebacks are left as
    they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg = _CONTROL.sub(_escape, message)
            record.args = None
        return True


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapingFilter())
    # Vassal output is what the operator asked to see, whatever the level.
    logging.getLogger("trimperor.vassal").setLevel(logging.INFO)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    # pymongo logs its topology at DEBUG, and its fork hook repeats that in
    # every vassal's child before exec; keep --log-level debug about trimperor.
    logging.getLogger("pymongo").setLevel(logging.WARNING)


def not_a_source(arg: str) -> bool:
    """A bare word such as ``status``: no scheme, no glob character, not a path that exists."""
    return "://" not in arg and not any(c in arg for c in "*?[") and not os.path.exists(arg)


def control_options(args: argparse.Namespace) -> ControlOptions:
    token = read_token(args.control_token_file) if args.control_token_file else None
    explicit = args.control is not None
    # $TRIMPEROR_CONTROL, which ctl reads too, moves the default: where both meet.
    default = os.environ.get("TRIMPEROR_CONTROL") or default_control_path()
    control = args.control if explicit else default
    if control is not None and control.lower() in {"none", "off", ""}:
        control = None
    logs_dir = None
    if args.logs_dir:
        logs_dir = os.path.abspath(args.logs_dir)
        try:
            os.makedirs(logs_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--logs-dir {args.logs_dir}: {exc.strerror}") from None
    if args.log_max_bytes < 1024 or args.log_backups < 0:
        raise UsageError("--log-max-bytes must be >= 1024 and --log-backups >= 0")
    return ControlOptions(
        logs_dir=logs_dir,
        log_max_bytes=args.log_max_bytes,
        log_backups=args.log_backups,
        control=control,
        control_explicit=explicit,
        token=token,
        metrics=args.metrics,
        dashboard=args.dashboard,
    )


def write_pidfile(path: str) -> None:
    """Write the pid to a new file next to *path*, then rename it into place.

    A failure (a missing or read-only directory, a full disk) leaves nothing
    behind, not even an empty file, and is a :class:`PidfileError` (exit 1).
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except PermissionError:
        # A directory we may not write to, and a pidfile made for us in it: write it in place.
        _rewrite_pidfile(path)
        return
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None
    try:
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None


def _rewrite_pidfile(path: str) -> None:
    """Write the pid into the existing regular file *path* (never creating one)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PidfileError(f"cannot write pidfile {path}: not a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


class PidfileError(TrimperorError):
    """The pidfile cannot be written: the environment's fault, not the command line's."""


_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGURG,
    signal.SIGWINCH,
)


async def _serve(
    emperor: Emperor, reload_mercy: float | None = None, pidfile: str | None = None
) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*_SIGNALS) as sigs:
            # Only now: whoever reads the pid may signal it, and is heard.
            if pidfile:
                write_pidfile(pidfile)

            async def mercy() -> None:
                assert reload_mercy is not None
                await trio.sleep(reload_mercy)
                log.warning("emperor.reload_mercy seconds=%s action=kill_all", reload_mercy)
                emperor.kill_all()

            async def signals() -> None:
                stopping = False
                async for signum in sigs:
                    if signum == signal.SIGHUP:
                        emperor.reload_all()
                    elif signum == signal.SIGUSR1:
                        emperor.log_status()
                    elif signum == signal.SIGURG:
                        emperor.clear_throttles()
                    elif signum == signal.SIGWINCH:
                        # Sources are event-driven and rescan every --freq seconds.
                        log.info("emperor.rescan action=none reason=sources_are_event_driven")
                    elif stopping and signum == signal.SIGINT:
                        log.warning("emperor.kill_all signal=SIGINT reason=second_signal")
                        emperor.kill_all()
                    else:
                        name = signal.Signals(signum).name
                        log.info("emperor.shutdown signal=%s", name)
                        if not stopping and reload_mercy is not None:
                            nursery.start_soon(mercy)
                        stopping = True
                        emperor.shutdown()

            nursery.start_soon(signals)
            await emperor.run()
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """The program. Without *argv* (the console script, ``python -m trimperor``)
    this process is the emperor's own, and it also becomes the child subreaper
    of its vassals' descendants; given *argv* (from tests), it does not.
    """
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ctl":
        from trimperor.ctl import main as ctl_main

        return ctl_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    code = 0
    try:
        if args.ini:
            # The file's options first, so that the command line wins.
            args = parser.parse_args(ini_arguments(args.ini) + argv)
        check_plugins(args.plugins)
        sources = [*args.sources, *args.emperor]
        if not sources:
            parser.print_usage(sys.stderr)
            raise UsageError("no source given (a directory, a glob or a URI)")
        if args.throttle < 0 or args.max_throttle < 0 or args.loyal_after < 0 or args.freq <= 0:
            raise UsageError("--throttle, --max-throttle, --loyal-after must be >= 0, --freq > 0")
        options = MonitorOptions(
            freq=args.freq,
            follow_symlinks=not args.nofollow,
            extra_extensions=tuple(args.extra_extension),
            max_config_size=args.max_config_size,
            tyrant=args.tyrant,
            plugins=plugin_settings(args),
        )
        if args.stats is not None:
            check_stats_address(args.stats, allow_remote=args.allow_remote_stats)
        if args.broodlord:
            log.warning(
                "cli.broodlord_unsupported broodlord=%d zergs=not_spawned sos=logged",
                args.broodlord,
            )
        if expanded_by_shell(sources):
            log.warning(
                "cli.unquoted_pattern files=%d reason=shell_expanded_the_pattern "
                "hint='Quote the pattern, as in trimperor \"/path/*.ini\"'",
                len(args.sources),
            )
        for arg in sources:
            if not_a_source(arg):
                log.warning(
                    "cli.not_a_source arg=%s: no such file or directory, and no pattern; "
                    "watching it anyway. A command for a running emperor? trimperor ctl %s",
                    arg,
                    arg,
                )
        monitors = resolve_sources(sources, options)
        fleet = _fleet(args)
        emperor = Emperor(
            monitors,
            spawner=LauncherSpawner(adopt_orphans=own_process and become_subreaper()),
            policy=BackoffPolicy(
                throttle=args.throttle / 1000,
                max_throttle=args.max_throttle / 1000,
                loyal_after=args.loyal_after,
            ),
            extra_extensions=options.extra_extensions,
            stats_address=args.stats,
            retry_interval=args.freq,
            tyrant=args.tyrant,
            tyrant_initgroups=args.tyrant_initgroups,
            fleet=fleet,
            control=control_options(args),
            uwsgi=UwsgiOptions(
                binary=args.binary_path or default_binary(),
                wrapper=args.emperor_wrapper,
                wrapper_override=tuple(args.emperor_wrapper_override),
                wrapper_fallback=tuple(args.emperor_wrapper_fallback),
                wrapper_attr=args.emperor_wrapper_attr,
                vassal_set=tuple(args.vassal_set),
                include=tuple(args.vassals_include),
                include_before=tuple(args.vassals_include_before),
                inherit=tuple(args.vassals_inherit),
                inherit_before=tuple(args.vassals_inherit_before),
                graceful_shutdown=args.graceful_shutdown,
                curse_tolerance=args.curse_tolerance,
                required_heartbeat=args.required_heartbeat,
                extra_extensions=options.extra_extensions,
            ),
        )
        raise_fd_limit()
        trio.run(_serve, emperor, args.reload_mercy, args.pidfile)
    except* UsageError as group:
        log.error("cli.usage_error error=%s", _first(group))
        code = 2
    except* SourceError as group:
        log.error("cli.source_error error=%s", _first(group))
        code = code or 1
    except* TrimperorError as group:
        log.error("cli.error error=%s", _first(group))
        code = code or 1
    return code


def _fleet(args: argparse.Namespace) -> Fleet | None:
    """The fleet membership of --cluster, or None."""
    if not args.cluster:
        if args.node or args.node_label:
            raise UsageError("--node and --node-label need --cluster")
        return None
    try:
        from trimperor.fleet.member import Fleet, parse_label
    except ImportError as exc:
        raise MissingExtraError("etcd", "etcd", exc.name or "h11") from None
    labels = dict(parse_label(text) for text in args.node_label)
    node = args.node or socket.gethostname().split(".")[0]
    return Fleet(args.cluster, node, labels, ttl=args.node_ttl)


def _first(group: BaseExceptionGroup[TrimperorError]) -> TrimperorError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, TrimperorError)
    return exc
