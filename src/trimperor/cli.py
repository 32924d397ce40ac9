"""The command line: read argv, set up logging and signals, run the emperor.

This is the only module that turns errors into exit codes: 0 after a clean
shutdown, 1 when a source cannot be used at start, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

import trio

from trimperor import __version__
from trimperor.abc import Monitor, MonitorFactory, MonitorOptions
from trimperor.emperor import Emperor
from trimperor.errors import MissingExtraError, SourceError, TrimperorError, UsageError
from trimperor.policy import BackoffPolicy
from trimperor.spawner import PosixSpawner

__all__ = ["build_parser", "main", "resolve_sources"]

log = logging.getLogger("trimperor")

#: Which extra provides each optional source (for the one-line error).
EXTRAS = {"pg": "pg", "mongodb": "mongodb", "amqp": "amqp", "zmq": "zmq"}

#: Built-in monitors, used when the package metadata is not installed.
_BUILTIN = {
    "dir": "trimperor.monitors.files:DirMonitor",
    "glob": "trimperor.monitors.files:GlobMonitor",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trimperor",
        description="Keep one vassal process per configuration found in the given sources.",
        epilog="A source is scheme://... (dir, glob, and installed extras such as pg, "
        "mongodb, amqp, zmq); an existing directory means dir://, anything else glob://. "
        "Quote glob patterns.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="directory, glob or URI")
    p.add_argument(
        "--throttle",
        type=int,
        default=1000,
        metavar="MS",
        help="first respawn delay after an early death (default 1000)",
    )
    p.add_argument(
        "--max-throttle",
        type=int,
        default=180_000,
        metavar="MS",
        help="longest respawn delay (default 180000)",
    )
    p.add_argument(
        "--loyal-after",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a run this long resets the backoff (default 10)",
    )
    p.add_argument(
        "--freq",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="full rescan interval, the safety net for missed events (default 3)",
    )
    p.add_argument(
        "--nofollow", action="store_true", help="do not follow symlinks: a link's own mtime counts"
    )
    p.add_argument(
        "--extra-extension",
        action="append",
        default=[],
        metavar="EXT",
        help="also accept files ending in EXT (parsed as INI); repeatable",
    )
    p.add_argument(
        "--stats",
        metavar="ADDR",
        help="serve a JSON status document on host:port or a unix socket path",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    p.add_argument("--version", action="version", version=f"trimperor {__version__}")
    return p


def _factories() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group="trimperor.monitors")}
    return {**_BUILTIN, **found}


def _load(scheme: str, target: str) -> MonitorFactory:
    module_name, _, attr = target.partition(":")
    try:
        module = __import__(module_name, fromlist=[attr])
    except MissingExtraError:
        raise
    except ImportError as exc:
        extra = EXTRAS.get(scheme, scheme)
        raise MissingExtraError(scheme, extra, exc.name or module_name) from None
    factory: MonitorFactory = getattr(module, attr)
    return factory


def resolve_sources(args: Sequence[str], options: MonitorOptions) -> list[Monitor]:
    """uWSGI's rules: ``scheme://`` picks that monitor; an existing directory is
    ``dir``; anything else (including a path that does not exist yet) is ``glob``."""
    factories = _factories()
    monitors: list[Monitor] = []
    for arg in args:
        scheme, sep, _ = arg.partition("://")
        if sep and scheme.isidentifier():
            if scheme not in factories:
                known = ", ".join(sorted(factories))
                raise UsageError(f"unknown source scheme {scheme!r} in {arg!r} (known: {known})")
        else:
            scheme = "dir" if os.path.isdir(arg) else "glob"
        monitors.append(_load(scheme, factories[scheme])(arg, options))
    return monitors


def expanded_by_shell(args: Sequence[str]) -> bool:
    """Several plain existing files: the shell probably expanded an unquoted pattern."""
    return len(args) > 1 and all("://" not in a and os.path.isfile(a) for a in args)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(message)s",
        stream=sys.stderr,
    )


async def _serve(emperor: Emperor) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:

            async def signals() -> None:
                stopping = False
                async for signum in sigs:
                    if signum == signal.SIGHUP:
                        emperor.reload_all()
                    elif stopping and signum == signal.SIGINT:
                        log.warning("emperor.kill_all: second SIGINT")
                        emperor.kill_all()
                    else:
                        name = signal.Signals(signum).name
                        log.info("emperor.shutdown signal=%s", name)
                        stopping = True
                        emperor.shutdown()

            nursery.start_soon(signals)
            await emperor.run()
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    code = 0
    try:
        if args.throttle < 0 or args.max_throttle < 0 or args.loyal_after < 0 or args.freq <= 0:
            raise UsageError("--throttle, --max-throttle, --loyal-after must be >= 0, --freq > 0")
        options = MonitorOptions(
            freq=args.freq,
            follow_symlinks=not args.nofollow,
            extra_extensions=tuple(args.extra_extension),
        )
        if expanded_by_shell(args.sources):
            log.warning(
                "cli.unquoted_pattern: %d plain files were given; the shell probably expanded "
                "an unquoted pattern, so files added later will not be seen. Quote the "
                'pattern: trimperor "/path/*.ini"',
                len(args.sources),
            )
        monitors = resolve_sources(args.sources, options)
        emperor = Emperor(
            monitors,
            spawner=PosixSpawner(),
            policy=BackoffPolicy(
                throttle=args.throttle / 1000,
                max_throttle=args.max_throttle / 1000,
                loyal_after=args.loyal_after,
            ),
            extra_extensions=options.extra_extensions,
            stats_address=args.stats,
            retry_interval=args.freq,
        )
        trio.run(_serve, emperor)
    except* UsageError as group:
        log.error("%s", _first(group))
        code = 2
    except* SourceError as group:
        log.error("%s", _first(group))
        code = code or 1
    except* TrimperorError as group:
        log.error("%s", _first(group))
        code = code or 1
    return code


def _first(group: BaseExceptionGroup[TrimperorError]) -> TrimperorError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, TrimperorError)
    return exc
