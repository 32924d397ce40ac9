"""The exception tree. Every error trimperor raises on purpose is a TrimperorError.

The subclasses say whose fault it is, so that the CLI (the only place that turns
errors into exit codes) and the log can tell the operator where to look.
"""

from __future__ import annotations

__all__ = [
    "BadMessage",
    "BadVassal",
    "ConfigError",
    "InternalError",
    "MissingExtraError",
    "Refused",
    "SourceError",
    "SpawnError",
    "TooLarge",
    "TrimperorError",
    "UsageError",
]


class TrimperorError(Exception):
    """The root of every error trimperor raises on purpose."""


class UsageError(TrimperorError):
    """The command line is wrong (unknown scheme, bad option value)."""


class ConfigError(TrimperorError):
    """A vassal configuration is broken: the user's file, row or message.

    The message names the vassal and, where known, the line or position.
    """


class BadVassal(ConfigError):
    """What a source read is not a vassal; ``name`` is set if it has a usable one."""

    def __init__(self, name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason


class TooLarge(ConfigError):
    """A configuration (a file, a fetched document) over --max-config-size."""


class BadMessage(ConfigError):
    """A message from a push source (a zmq command) that is not one."""


class Refused(TrimperorError):
    """A valid configuration that must not run (tyrant rules, unsupported kind).

    Unlike a :class:`ConfigError`, which keeps a running vassal on its last good
    configuration, a refusal stops it.
    """

    event = "vassal.refused"


class SourceError(TrimperorError):
    """A configuration source cannot be read (directory gone, database down)."""


class MissingExtraError(UsageError):
    """A source needs an optional dependency that is not installed."""

    def __init__(self, scheme: str, extra: str, module: str) -> None:
        super().__init__(
            f"the {scheme}:// source needs the {module!r} module: pip install 'trimperor[{extra}]'"
        )
        self.scheme = scheme
        self.extra = extra


class SpawnError(TrimperorError):
    """A vassal process could not be started (missing program, bad uid, ...)."""


class InternalError(TrimperorError):
    """trimperor broke one of its own rules (an impossible lifecycle step): a bug."""
