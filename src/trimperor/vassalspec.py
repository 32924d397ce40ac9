"""From a parsed configuration to a vassal specification (pure).

A document with a ``vassal`` section is a *native* vassal that trimperor runs
itself; any other valid document is a *uWSGI* vassal, run by the ``uwsgi``
binary over the emperor protocol.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from trimperor.configfile import Options, Section, parse
from trimperor.errors import ConfigError, Refused
from trimperor.model import VassalDocument

__all__ = [
    "NATIVE_KEYS",
    "MagicContext",
    "NativeSpec",
    "UwsgiSpec",
    "VassalSpec",
    "expand",
    "native_spec",
    "parse_signal",
]

#: Keys a ``vassal`` section may hold; anything else is an error naming the key.
NATIVE_KEYS = frozenset(
    {
        "command",
        "env",
        "chdir",
        "uid",
        "gid",
        "stop-signal",
        "stop-timeout",
        "reload-signal",
        "logto",
    }
)


@dataclass(frozen=True, slots=True)
class NativeSpec:
    """A program trimperor runs and supervises itself."""

    name: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    chdir: str = "/"
    uid: str | None = None
    gid: str | None = None
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 10.0
    reload_signal: int | None = None
    logto: str | None = None
    init_groups: bool = True
    """With ``uid``: take the user's supplementary groups (else none)."""

    kind = "native"

    def launch_key(self) -> tuple[object, ...]:
        """What the process was started with; if equal, a reload signal suffices."""
        return (self.command, self.env, self.chdir, self.uid, self.gid, self.logto)


@dataclass(frozen=True, slots=True)
class UwsgiSpec:
    """A uWSGI configuration, run by the uwsgi binary over the emperor protocol.

    ``path`` is the file the vassal loads itself; without one (a configuration
    from a database or a message) the text goes over the config channel.
    """

    name: str
    path: str | None
    text: str
    cwd: str = "/"
    uid: str | None = None
    gid: str | None = None
    init_groups: bool = True

    kind = "uwsgi"

    def launch_key(self) -> tuple[object, ...]:
        """What a reload in place cannot change."""
        return (self.path is None, self.path, self.cwd, self.uid, self.gid)


VassalSpec = NativeSpec | UwsgiSpec


@dataclass(frozen=True, slots=True)
class MagicContext:
    """What uWSGI's magic variables expand to for one configuration."""

    name: str
    path: str | None

    @classmethod
    def for_doc(cls, doc: VassalDocument) -> MagicContext:
        return cls(doc.name, doc.path)

    def table(self) -> dict[str, str]:
        path = os.path.abspath(self.path) if self.path else os.path.abspath(self.name)
        filename = os.path.basename(path)
        stem, ext = os.path.splitext(filename)
        directory = os.path.dirname(path)
        return {
            "n": stem,
            "s": filename,
            "e": ext.lstrip("."),
            "p": path,
            "d": directory.rstrip("/") + "/",
            "c": os.path.basename(directory),
            "%": "%",
        }


_MAGIC = re.compile(r"%(.)|\$\(([^)]*)\)")


def expand(value: str, ctx: MagicContext, environ: Mapping[str, str], where: str) -> str:
    """Expand ``%n %s %e %p %d %c %%`` and ``$(VAR)`` in *value*.

    An unknown ``%x`` is left as it is (uWSGI has many more, none of which
    make sense for a native vassal); an unset ``$(VAR)`` is an error.
    """
    table = ctx.table()

    def sub(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return table.get(m.group(1), m.group(0))
        var = m.group(2)
        if var not in environ:
            raise ConfigError(f"{where}: environment variable {var!r} is not set")
        return environ[var]

    return _MAGIC.sub(sub, value)


def parse_signal(value: str, where: str) -> int:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` -> 15."""
    text = value.strip()
    if text.isdigit():
        number = int(text)
        if number in {s.value for s in signal.Signals}:
            return number
    else:
        upper = text.upper()
        candidate = upper if upper.startswith("SIG") else "SIG" + upper
        member = signal.Signals.__members__.get(candidate)
        if member is not None:
            return member.value
    raise ConfigError(f"{where}: unknown signal {value!r}")


def _seconds(value: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(f"{where}: {value!r} is not a number of seconds")
    return seconds


def native_spec(doc: VassalDocument, section: Section, environ: Mapping[str, str]) -> NativeSpec:
    """Build a :class:`NativeSpec` from the ``vassal`` section of *doc*."""
    name = doc.name
    unknown = [key for key in section.keys() if key not in NATIVE_KEYS]  # noqa: SIM118
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r} in the vassal section")
    ctx = MagicContext.for_doc(doc)

    def one(key: str) -> str | None:
        raw = section.get(key)
        return None if raw is None else expand(raw, ctx, environ, f"{name}: {key}")

    commands = [expand(v, ctx, environ, f"{name}: command") for v in section.get_all("command")]
    if not commands or not any(c.strip() for c in commands):
        raise ConfigError(f"{name}: the vassal section needs a command")
    if len(commands) == 1:
        try:
            argv = tuple(shlex.split(commands[0]))
        except ValueError as exc:
            raise ConfigError(f"{name}: command: {exc}") from None
    else:
        argv = tuple(commands)  # a list in YAML/JSON, or repeated keys: argv as given

    env: list[tuple[str, str]] = []
    for raw in section.get_all("env"):
        item = expand(raw, ctx, environ, f"{name}: env")
        key, sep, value = item.partition("=")
        if not sep or not key or "\0" in item:
            raise ConfigError(f"{name}: env {raw!r} is not KEY=VALUE")
        env.append((key, value))

    default_dir = os.path.dirname(os.path.abspath(doc.path)) if doc.path else os.getcwd()
    chdir = one("chdir") or default_dir
    if not os.path.isabs(chdir):
        chdir = os.path.join(default_dir, chdir)
    logto = one("logto")
    if logto is not None and not os.path.isabs(logto):
        logto = os.path.join(chdir, logto)

    stop_signal = parse_signal(one("stop-signal") or "TERM", f"{name}: stop-signal")
    reload_raw = one("reload-signal")
    reload_signal = parse_signal(reload_raw, f"{name}: reload-signal") if reload_raw else None
    stop_timeout = _seconds(one("stop-timeout") or "10", f"{name}: stop-timeout")
    return NativeSpec(
        name=name,
        command=argv,
        env=tuple(env),
        chdir=chdir,
        uid=one("uid") or None,
        gid=one("gid") or None,
        stop_signal=stop_signal,
        stop_timeout=stop_timeout,
        reload_signal=reload_signal,
        logto=logto or None,
    )


def tyrant(
    spec: VassalSpec,
    doc: VassalDocument,
    resolve: Callable[[str | None, str | None], tuple[int | None, int | None]],
    initgroups: bool = False,
) -> VassalSpec:
    """Tyrant mode: the vassal runs as the owner of its configuration.

    The owner is the file's (or, for remote sources, the uid and gid fields).
    Root is refused, and so is a native vassal whose ``uid``/``gid`` keys name
    anyone else: a user who can write a file must not run programs as another.
    *resolve* turns user and group names into numbers. Supplementary groups are
    dropped unless *initgroups* (then the owner's groups from the group database).
    """
    if doc.uid is None or doc.gid is None:
        raise Refused(
            f"{doc.name}: tyrant mode needs an owner (uid and gid) for every vassal, "
            "and this source gave none"
        )
    if doc.uid == 0 or doc.gid == 0:
        where = doc.path or doc.name
        raise Refused(
            f"{doc.name}: tyrant mode refuses to run a vassal as root: {where} belongs to "
            f"uid {doc.uid}, gid {doc.gid}; give it to the user the vassal should run as "
            "(chown USER:GROUP)"
        )
    if isinstance(spec, NativeSpec):
        asked_uid, asked_gid = resolve(spec.uid, spec.gid)
        for key, asked, owner in (("uid", asked_uid, doc.uid), ("gid", asked_gid, doc.gid)):
            if asked is not None and asked != owner:
                raise Refused(
                    f"{doc.name}: {key} {asked} differs from the owner of the configuration "
                    f"({owner}); in tyrant mode a vassal always runs as its owner"
                )
    return replace(spec, uid=str(doc.uid), gid=str(doc.gid), init_groups=initgroups)


def build_spec(
    doc: VassalDocument, environ: Mapping[str, str], extra_extensions: Iterable[str] = ()
) -> VassalSpec:
    """Parse *doc* and decide what kind of vassal it is. Raises ConfigError."""
    if doc.text is None:
        raise ConfigError(f"{doc.name}: cannot read: {doc.error or 'no content'}")
    options: Options = parse(doc.name, doc.text, extra_extensions)
    section = options.section("vassal")
    if section is not None:
        return native_spec(doc, section, environ)
    # uWSGI runs a dir:// vassal in the watched directory and everything else
    # in the emperor's own working directory.
    if doc.path is not None and doc.source.startswith("dir://"):
        cwd = os.path.dirname(os.path.abspath(doc.path))
    else:
        cwd = os.getcwd()
    return UwsgiSpec(
        name=doc.name,
        path=os.path.abspath(doc.path) if doc.path is not None else None,
        text=doc.text,
        cwd=cwd,
    )
