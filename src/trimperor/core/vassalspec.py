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
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from trimperor.core.configfile import Options, Section, parse
from trimperor.core.errors import ConfigError, Refused
from trimperor.core.model import VassalDocument
from trimperor.core.placement import FLEET_KEYS, Placement, parse_placement
from trimperor.core.shared import share, share_all
from trimperor.core.uwsgi_protocol import MAX_CONFIG_BYTES

__all__ = [
    "NATIVE_KEYS",
    "MagicContext",
    "NativeSpec",
    "SocketSpec",
    "UwsgiSpec",
    "VassalSpec",
    "expand",
    "native_spec",
    "parse_signal",
    "parse_socket",
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
        "socket",
        "socket-mode",
        "socket-owner",
        "listen-backlog",
        "socket-nonblocking",
        "on-demand",
        "idle",
        "watchdog",
        "type",
        "health",
        "health-command",
        "health-interval",
        "health-timeout",
        "health-retries",
        "on-failure",
        "on-failure-timeout",
        "log-file",
        "log-max-bytes",
        "log-backups",
    }
    | FLEET_KEYS
)

#: One copy, on any node (frozen, so shared).
DEFAULT_PLACEMENT = Placement()

#: The section of a uWSGI configuration that holds its fleet keys (uWSGI ignores it).
FLEET_SECTION = "fleet"

#: The default listen backlog (the kernel caps it at net.core.somaxconn).
DEFAULT_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """A listening socket the emperor binds and holds for a vassal."""

    address: str
    """As written: ``host:port``, ``[v6]:port``, ``:port`` or a unix socket path."""
    family: str
    """``inet``, ``inet6`` or ``unix``."""
    host: str = ""
    port: int = 0
    path: str = ""
    mode: int = 0o660
    owner: str | None = None
    group: str | None = None
    backlog: int = DEFAULT_BACKLOG
    nonblocking: bool = False
    """Hand the socket over in non-blocking mode (systemd's ``NonBlocking=``).

    The mode belongs to the open file, which the emperor and the vassal share:
    blocking by default, as systemd does, since a plain ``accept()`` loop needs it."""

    @property
    def fd_name(self) -> str:
        """The name given in ``LISTEN_FDNAMES`` (no ``:`` allowed there)."""
        return self.address.replace(":", "_")[:255] or "socket"


def parse_socket(address: str, where: str = "socket") -> SocketSpec:
    """``host:port``, ``[v6]:port``, ``:port`` (all interfaces) or a unix socket path."""
    text = address.strip()
    if not text:
        raise ConfigError(f"{where}: empty socket address")
    if text.startswith("/") or text.startswith("./") or ":" not in text:
        if "\0" in text or len(os.fsencode(text)) > 107:
            raise ConfigError(f"{where}: the unix socket path is too long or invalid")
        return SocketSpec(address=text, family="unix", path=text)
    host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: the address needs a port number (host:port)")
    port = int(port_text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{where}: unbalanced [ ] around the IPv6 address")
        return SocketSpec(address=text, family="inet6", host=host[1:-1], port=port)
    if ":" in host:
        raise ConfigError(f"{where}: write IPv6 addresses in brackets: [ADDRESS]:PORT")
    return SocketSpec(address=text, family="inet", host=host or "0.0.0.0", port=port)


def _bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"true", "yes", "on", "1"}:
        return True
    if lowered in {"false", "no", "off", "0", ""}:
        return False
    raise ConfigError(f"{where}: the value is not true or false")


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
    sockets: tuple[SocketSpec, ...] = ()
    on_demand: bool = False
    idle: float | None = None
    watchdog: float | None = None
    type: str = "simple"
    """``simple``: running once started; ``notify``: starting until sd_notify READY=1."""
    tyrant: bool = False
    """Set by :func:`tyrant`: every path the configuration names is opened, bound
    or entered with the user's rights, never root's."""
    placement: Placement = DEFAULT_PLACEMENT
    """Where it runs in a fleet (``--cluster``); ignored without one."""
    health: str | None = None
    """``http://host:port/path``: healthy while a GET answers 2xx or 3xx."""
    health_command: tuple[str, ...] | None = None
    """Healthy while this command exits 0 (run as the vassal's user, in its chdir)."""
    health_interval: float = 10.0
    health_timeout: float = 5.0
    health_retries: int = 3
    """Failed checks in a row that make the vassal unhealthy (it is restarted)."""
    on_failure: tuple[str, ...] | None = None
    """Run after the vassal died unexpectedly or turned unhealthy."""
    on_failure_timeout: float = 30.0
    log_file: str | None = None
    """The vassal's output, timestamped, also to this file (rotated by size)."""
    log_max_bytes: int | None = None
    log_backups: int | None = None

    kind = "native"

    def launch_key(self) -> tuple[object, ...]:
        """What the process was started with; if equal, a reload signal suffices."""
        return (
            self.command,
            self.env,
            self.chdir,
            self.uid,
            self.gid,
            self.logto,
            self.sockets,
        )


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
    sockets: tuple[SocketSpec, ...] = ()
    """At most one: the on-demand socket, handed over as fd 0."""
    binary: str | None = None
    """The configuration's own ``binary-path``: the uwsgi binary for this vassal."""
    attrs: tuple[tuple[str, str], ...] = ()
    """The vassal's attributes: the entries of its ``emperor`` section."""

    kind = "uwsgi"

    @property
    def on_demand(self) -> bool:
        return bool(self.sockets)

    idle: float | None = None
    watchdog: float | None = None
    tyrant: bool = False
    placement: Placement = DEFAULT_PLACEMENT
    """From the ``[fleet]`` section; ignored without ``--cluster``."""

    def launch_key(self) -> tuple[object, ...]:
        """What a reload in place cannot change."""
        return (
            self.path is None,
            self.path,
            self.cwd,
            self.uid,
            self.gid,
            self.sockets,
            self.binary,
            self.attrs,
        )

    def attr(self, key: str) -> str | None:
        """The last value of attribute *key*, or None."""
        return next((v for k, v in reversed(self.attrs) if k == key), None)


VassalSpec = NativeSpec | UwsgiSpec


@dataclass(frozen=True, slots=True)
class MagicContext:
    """What uWSGI's magic variables expand to for one configuration."""

    name: str
    path: str | None
    cwd: str = "/"
    """The emperor's working directory: what a relative path or name is relative to."""

    @classmethod
    def for_doc(cls, doc: VassalDocument, cwd: str) -> MagicContext:
        return cls(doc.name, doc.path, cwd)

    def table(self) -> dict[str, str]:
        path = _absolute(self.path or self.name, self.cwd)
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
    raise ConfigError(f"{where}: unknown signal")


def _seconds(value: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{where}: the value is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(f"{where}: the value is not a number of seconds")
    if len(_SAME_SECONDS) < _SAME_SECONDS_MAX:
        seconds = _SAME_SECONDS.setdefault(seconds, seconds)
    return seconds


_KINDS = {"simple": "simple", "notify": "notify"}
#: One float object per distinct value of seconds (10,000 vassals with
#: ``stop-timeout = 5`` share one), up to this many values.
_SAME_SECONDS: dict[float, float] = {}
_SAME_SECONDS_MAX = 4096


def _absolute(path: str, cwd: str) -> str:
    """*path* made absolute against *cwd*, normalized (no file system access)."""
    return os.path.normpath(os.path.join(cwd, path))


def native_spec(
    doc: VassalDocument, section: Section, environ: Mapping[str, str], cwd: str = "/"
) -> NativeSpec:
    """Build a :class:`NativeSpec` from the ``vassal`` section of *doc*.

    *cwd* is the emperor's working directory: the vassal's own without a
    file or a ``chdir``.
    """
    name = doc.name
    unknown = [key for key in section.keys() if key not in NATIVE_KEYS]  # noqa: SIM118
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r} in the vassal section")
    ctx = MagicContext.for_doc(doc, cwd)

    def one(key: str) -> str | None:
        raw = section.get(key)
        return None if raw is None else expand(raw, ctx, environ, f"{name}: {key}")

    commands = [expand(v, ctx, environ, f"{name}: command") for v in section.get_all("command")]
    if not commands or not any(c.strip() for c in commands):
        raise ConfigError(f"{name}: the vassal section needs a command")
    if len(commands) == 1:
        try:
            argv = share_all(shlex.split(commands[0]))
        except ValueError as exc:
            raise ConfigError(f"{name}: command: {exc}") from None
    else:
        argv = share_all(commands)  # a list in YAML/JSON, or repeated keys: argv as given

    env: list[tuple[str, str]] = []
    for raw in section.get_all("env"):
        item = expand(raw, ctx, environ, f"{name}: env")
        key, sep, value = item.partition("=")
        if not sep or not key or "\0" in item:
            raise ConfigError(f"{name}: env: an entry is not KEY=VALUE")
        env.append((share(key), share(value)))

    default_dir = os.path.dirname(_absolute(doc.path, cwd)) if doc.path else cwd
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
    sockets = _sockets(name, section, ctx, environ, one)
    on_demand = _bool(one("on-demand") or "false", f"{name}: on-demand")
    if on_demand and not sockets:
        raise ConfigError(f"{name}: on-demand needs at least one socket")
    idle_raw, watchdog_raw = one("idle"), one("watchdog")
    idle = _seconds(idle_raw, f"{name}: idle") if idle_raw else None
    if idle is not None and not sockets:
        raise ConfigError(f"{name}: idle needs a socket (it counts the socket's connections)")
    watchdog = _seconds(watchdog_raw, f"{name}: watchdog") if watchdog_raw else None
    kind = _KINDS.get((one("type") or "simple").strip().lower())  # one string for all
    if kind is None:
        raise ConfigError(f"{name}: type: the value is not simple or notify")
    if (idle is not None and idle <= 0) or (watchdog is not None and watchdog <= 0):
        raise ConfigError(f"{name}: idle and watchdog must be more than 0 seconds")
    health = _health_url(one("health"), f"{name}: health")
    health_command = _argv(one("health-command"), f"{name}: health-command")
    on_failure = _argv(one("on-failure"), f"{name}: on-failure")
    interval = _seconds(one("health-interval") or "10", f"{name}: health-interval")
    timeout = _seconds(one("health-timeout") or "5", f"{name}: health-timeout")
    retries_raw = one("health-retries") or "3"
    if not retries_raw.isdigit() or int(retries_raw) < 1:
        raise ConfigError(f"{name}: health-retries {retries_raw!r} is not a positive number")
    if interval <= 0 or timeout <= 0:
        raise ConfigError(f"{name}: health-interval and health-timeout must be more than 0")
    hook_timeout = _seconds(one("on-failure-timeout") or "30", f"{name}: on-failure-timeout")
    if hook_timeout <= 0:
        raise ConfigError(f"{name}: on-failure-timeout must be more than 0")
    log_file = one("log-file") or None
    if log_file is not None and not os.path.isabs(log_file):
        log_file = os.path.join(chdir, log_file)
    if log_file is not None and logto is not None:
        raise ConfigError(f"{name}: logto and log-file: choose one")
    log_max = _count_key(one("log-max-bytes"), f"{name}: log-max-bytes", 1024)
    log_backups = _count_key(one("log-backups"), f"{name}: log-backups", 0)
    if health and health_command:
        raise ConfigError(f"{name}: health and health-command: choose one")
    return NativeSpec(
        health=health,
        health_command=health_command,
        health_interval=interval,
        health_timeout=timeout,
        health_retries=int(retries_raw),
        on_failure=on_failure,
        on_failure_timeout=hook_timeout,
        log_file=log_file,
        log_max_bytes=log_max,
        log_backups=log_backups,
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
        sockets=sockets,
        on_demand=on_demand,
        idle=idle,
        watchdog=watchdog,
        type=kind,
        placement=parse_placement(section.get_all, name),
    )


def _health_url(value: str | None, where: str) -> str | None:
    if not value:
        return None
    url = urllib.parse.urlsplit(value.strip())
    if url.scheme != "http" or not url.hostname:
        raise ConfigError(f"{where}: {value!r} is not an http://host[:port]/path address")
    try:
        url.port  # noqa: B018 - validates it
    except ValueError:
        raise ConfigError(f"{where}: {value!r} has a bad port") from None
    return value.strip()


def _count_key(value: str | None, where: str, least: int) -> int | None:
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit() or int(value) < least:
        raise ConfigError(f"{where}: {value!r} is not a whole number >= {least}")
    return int(value)


def _argv(value: str | None, where: str) -> tuple[str, ...] | None:
    if not value or not value.strip():
        return None
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _sockets(
    name: str,
    section: Section,
    ctx: MagicContext,
    environ: Mapping[str, str],
    one: Callable[[str], str | None],
) -> tuple[SocketSpec, ...]:
    mode_raw = one("socket-mode")
    try:
        mode = int(mode_raw, 8) if mode_raw else 0o660
    except ValueError:
        raise ConfigError(f"{name}: socket-mode: the value is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{name}: socket-mode: the value is not a file mode")
    owner_raw = one("socket-owner")
    owner = group = None
    if owner_raw:
        owner, _, group_part = owner_raw.partition(":")
        group = group_part or None
    backlog_raw = one("listen-backlog")
    if backlog_raw is not None and (not backlog_raw.isdigit() or int(backlog_raw) < 1):
        raise ConfigError(f"{name}: listen-backlog: the value is not a positive number")
    backlog = int(backlog_raw) if backlog_raw else DEFAULT_BACKLOG
    nonblocking_raw = one("socket-nonblocking")
    nonblocking = (
        _bool(nonblocking_raw, f"{name}: socket-nonblocking") if nonblocking_raw else False
    )
    specs = []
    seen: set[str] = set()
    for raw in section.get_all("socket"):
        address = expand(raw, ctx, environ, f"{name}: socket")
        spec = parse_socket(address, f"{name}: socket")
        if spec.address in seen:
            raise ConfigError(f"{name}: socket: an address is listed twice")
        seen.add(spec.address)
        specs.append(
            replace(
                spec,
                mode=mode,
                owner=owner or None,
                group=group,
                backlog=backlog,
                nonblocking=nonblocking,
            )
        )
    return tuple(specs)


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
    for sock in spec.sockets:
        if sock.owner is None:
            continue
        asked_uid, _ = resolve(sock.owner, None)
        if asked_uid is not None and asked_uid != doc.uid:
            raise Refused(
                f"{doc.name}: socket-owner {sock.owner} is not the owner of the configuration "
                f"({doc.uid}); in tyrant mode a socket belongs to the vassal's user"
            )
    return replace(spec, uid=str(doc.uid), gid=str(doc.gid), init_groups=initgroups, tyrant=True)


def build_spec(
    doc: VassalDocument,
    environ: Mapping[str, str],
    extra_extensions: Iterable[str] = (),
    *,
    cwd: str = "/",
) -> VassalSpec:
    """Parse *doc* and decide what kind of vassal it is. Raises ConfigError.

    *cwd* is the emperor's working directory (the caller reads it once): where
    a vassal runs unless its document says otherwise, and what relative paths
    are relative to.
    """
    if doc.text is None:
        raise ConfigError(f"{doc.name}: cannot read: {doc.error or 'no content'}")
    options: Options = parse(doc.name, doc.text, extra_extensions)
    section = options.section("vassal")
    fleet = options.section(FLEET_SECTION)
    if section is not None:
        if fleet is not None:
            raise ConfigError(
                f"{doc.name}: a native vassal takes its fleet keys in the vassal section, "
                f"not in [{FLEET_SECTION}]"
            )
        spec = native_spec(doc, section, environ, cwd)
        if doc.socket:
            # A socket from the source (pg's 6th column, ...) makes the vassal
            # on demand on it, as it would a uWSGI vassal.
            extra = parse_socket(doc.socket, f"{doc.name}: socket")
            if extra not in spec.sockets:
                spec = replace(spec, sockets=(extra, *spec.sockets))
            spec = replace(spec, on_demand=True)
        return spec
    if options.section("uwsgi") is None:
        # An empty file, one still being written, or a typo in the section
        # name: launching it as a uWSGI vassal would only crash-loop.
        found = [f"[{section.name}]" for section in options.sections]
        if not found:
            raise ConfigError(f"{doc.name}: the configuration is empty")
        raise ConfigError(f"{doc.name}: no [vassal] or [uwsgi] section (found {', '.join(found)})")
    # uWSGI runs a dir:// vassal in the watched directory and everything else
    # in the emperor's own working directory: the source says which.
    path = _absolute(doc.path, cwd) if doc.path is not None else None
    if path is not None and doc.in_own_dir:
        cwd = os.path.dirname(path)
    if doc.path is None and len(doc.text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{doc.name}: the configuration is {len(doc.text.encode())} bytes; a uWSGI vassal "
            f"receives it over the emperor protocol, which carries at most {MAX_CONFIG_BYTES}"
        )
    sockets: tuple[SocketSpec, ...] = ()
    if doc.socket:  # an empty value means "not on demand" (uWSGI would bind "")
        sockets = (replace(parse_socket(doc.socket, f"{doc.name}: socket"), mode=0o666),)
    uwsgi_section = options.section("uwsgi")
    binary = uwsgi_section.get("binary-path") if uwsgi_section is not None else None
    if binary is not None:
        binary = binary.strip()
        if not binary or "\0" in binary:
            raise ConfigError(f"{doc.name}: binary-path {binary!r} is not a program")
        if "/" in binary and not os.path.isabs(binary):
            binary = os.path.join(cwd, binary)
    attrs_section = options.section("emperor")
    placement = DEFAULT_PLACEMENT
    if fleet is not None:
        unknown = [key for key in fleet.keys() if key not in FLEET_KEYS]  # noqa: SIM118
        if unknown:
            raise ConfigError(f"{doc.name}: unknown key {unknown[0]!r} in the fleet section")
        placement = parse_placement(fleet.get_all, doc.name)
    return UwsgiSpec(
        name=doc.name,
        path=path,
        text=doc.text,
        cwd=cwd,
        sockets=sockets,
        binary=binary,
        attrs=attrs_section.entries if attrs_section is not None else (),
        placement=placement,
    )
