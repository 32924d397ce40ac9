"""The ``ldap://`` source: vassals as entries of an LDAP directory, followed live.

``ldap://HOST:PORT/BASE-DN?ATTRIBUTE?SCOPE?FILTER?EXTENSIONS`` (RFC 4516;
``ldaps://`` for TLS, ``ldapi://`` with a percent-encoded socket path for a
local server). Every entry the search finds is a vassal, in one of two shapes:

- objectClass ``uWSGIConfig`` (uWSGI's own schema): every attribute
  ``uWSGI<optionInCamelCase>`` is one uWSGI option (``uWSGIhttpSocket`` is
  ``http-socket``), first value only, matched by name; the entry becomes an
  INI configuration ``[uwsgi]`` run by uWSGI. Its name is the value of the
  entry's RDN, with ``.ini`` added unless it ends so already.
- a whole configuration in one attribute, by default ``trimperorConfig``
  (trimperor's schema, ``ldap_schema.ldif`` beside this module); the URL's
  attribute field names another (``description``, ...). The name is the RDN
  value and must end in a configuration extension, which gives the format.

With both, the configuration attribute wins. ``uidNumber`` and ``gidNumber``
are the owner (tyrant mode) and ``trimperorSocket`` the on-demand socket. An
entry's version is its ``entryCSN``.

The scope defaults to ``one`` (the base's children), not RFC 4516's ``base``;
the filter to ``(|(objectClass=uWSGIConfig)(ATTRIBUTE=*))``. Extensions:
``bindname=DN`` with ``x-bindpw-file=PATH`` (a simple bind; the password is
read from the file at every connect and never logged), or ``x-sasl=EXTERNAL``
(a SASL EXTERNAL bind, as over ``ldapi://``); none of them: anonymous.

Changes are followed with RFC 4533 content synchronization (syncrepl,
``refreshAndPersist``), which OpenLDAP's syncprov overlay provides. A full
:class:`~trimperor.core.model.Snapshot` goes out after every refresh, an
:class:`~trimperor.core.model.Upsert` or :class:`~trimperor.core.model.Remove` per
change after it. The sync cookie is kept, so a reconnect only transfers what
changed meanwhile. A server without syncrepl is polled every ``freq`` seconds
instead (the log says so): each poll reads the base's ``contextCSN`` and
searches again only if it moved (every time where the server keeps none).

The blocking libldap calls run in a worker thread; the syncrepl session stays
in one until it fails or the monitor is cancelled, handing its messages to the
trio side in batches. While the directory is unreachable nothing is sent that
could stop a vassal; the monitor tries an unreachable server again every
second, and backs off (up to 30 s) on errors the server answers with. A bad entry
(bad name, no configuration, a value with a newline, oversized) is logged once
and left out, and an entry that was good keeps its last good configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from trimperor.abc import MonitorOptions
from trimperor.core.errors import UsageError
from trimperor.core.model import Remove, Snapshot, SourceEvent, Upsert, VassalDocument
from trimperor.monitors import toolkit as kit
from trimperor.monitors.toolkit import (
    RETRY_MAX,
    BadVassal,
    SourceStatus,
    check_freq,
    check_or_raise,
    error_text,
    short,
)

with kit.driver_imports(__name__):
    import ldap
    import ldap.dn
    import ldap.ldapobject
    import ldap.syncrepl

__all__ = ["LdapMonitor", "LdapUrl", "entry_document", "option_name", "parse_url"]

log = logging.getLogger(__name__)

SCHEMES = ("ldap", "ldaps", "ldapi")
DEFAULT_ATTRIBUTE = "trimperorConfig"
UWSGI_CLASS = "uwsgiconfig"
UWSGI_PREFIX = "uwsgi"
SOCKET_ATTRIBUTE = "trimperorsocket"
_PLUGIN_OPTIONS = frozenset({"plugin", "plugins", "plugin-dir", "plugins-dir"})
SYNC_OID = "1.3.6.1.4.1.4203.1.9.1.1"
#: e-syncRefreshRequired (RFC 4533): the cookie is too old; start again without it.
SYNC_REFRESH_REQUIRED = 4096
_SCOPES = {"base": ldap.SCOPE_BASE, "one": ldap.SCOPE_ONELEVEL, "sub": ldap.SCOPE_SUBTREE}
#: Seconds: connecting, and any one request outside the syncrepl session.
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
#: How often the syncrepl thread looks whether it should stop (seconds).
THREAD_POLL = 0.2
#: How long the thread waits for the next message of a batch (seconds).
DRAIN_WAIT = 1e-4
#: Messages handed to the trio side at once, at most.
BATCH = 500
#: Reconnect attempts to a server that cannot be reached are at most this far
#: apart (seconds); errors the server answers with (a bad password, a bad base
#: or filter) back off up to the toolkit's maximum instead.
RETRY_UNREACHABLE = 1.0
MAX_PASSWORD_BYTES = 4096


# -- the URL -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LdapUrl:
    """What an ``ldap://`` URL asks for."""

    server: str
    """``scheme://hostport`` as libldap takes it."""
    base: str
    attribute: str
    scope: int
    filter: str
    bind_dn: str | None = None
    password_file: str | None = None
    sasl: str | None = None


def parse_url(url: str) -> LdapUrl:
    """Parse an RFC 4516 URL; raises UsageError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise UsageError(f"not an ldap://, ldaps:// or ldapi:// URL: {url!r}")
    hostport, _, rest = rest.partition("/")
    fields = rest.split("?")
    if len(fields) > 5:
        raise UsageError(f"{url!r}: an LDAP URL has at most 5 '?'-separated parts after the host")
    fields += [""] * (5 - len(fields))
    dn, attrs, scope_text, filt = (urllib.parse.unquote(f) for f in fields[:4])
    exts = fields[4]
    if dn and not ldap.dn.is_dn(dn):
        raise UsageError(f"{url!r}: {dn!r} is not a DN")
    names = [a.strip() for a in attrs.split(",") if a.strip()]
    if len(names) > 1:
        raise UsageError(f"{url!r}: name one attribute holding the configuration, not {len(names)}")
    attribute = names[0] if names else DEFAULT_ATTRIBUTE
    if not attribute.replace("-", "").replace(";", "").isalnum() or not attribute[0].isalpha():
        raise UsageError(f"{url!r}: {attribute!r} is not an attribute name")
    scope_key = scope_text.strip().lower() or "one"
    if scope_key not in _SCOPES:
        raise UsageError(f"{url!r}: the scope is base, one or sub, not {scope_text!r}")
    filt = filt.strip() or f"(|(objectClass=uWSGIConfig)({attribute}=*))"
    if not filt.startswith("("):
        filt = f"({filt})"
    if filt.count("(") != filt.count(")"):
        raise UsageError(f"{url!r}: unbalanced parentheses in the filter {filt!r}")
    found: dict[str, str] = {}
    for ext in exts.split(",") if exts else []:
        critical = ext.startswith("!")
        key, _, value = ext.removeprefix("!").partition("=")
        key = urllib.parse.unquote(key).strip().lower()
        value = urllib.parse.unquote(value)
        if key in {"bindname", "x-bindpw-file", "x-sasl"}:
            found[key] = value
        elif critical:
            raise UsageError(f"{url!r}: unknown critical extension {key!r}")
        else:
            log.warning("source.ldap_extension_ignored url=%s extension=%s", url, key)
    sasl = found.get("x-sasl")
    if sasl is not None and sasl.upper() != "EXTERNAL":
        raise UsageError(f"{url!r}: x-sasl supports EXTERNAL only, not {sasl!r}")
    bind_dn = found.get("bindname")
    password_file = found.get("x-bindpw-file")
    if sasl is not None and (bind_dn or password_file):
        raise UsageError(f"{url!r}: x-sasl=EXTERNAL takes no bindname or x-bindpw-file")
    if (bind_dn is None) != (password_file is None):
        raise UsageError(f"{url!r}: a simple bind needs both bindname and x-bindpw-file")
    if bind_dn is not None and not ldap.dn.is_dn(bind_dn):
        raise UsageError(f"{url!r}: bindname {bind_dn!r} is not a DN")
    return LdapUrl(
        server=f"{scheme.lower()}://{hostport}",
        base=dn,
        attribute=attribute,
        scope=_SCOPES[scope_key],
        filter=filt,
        bind_dn=bind_dn,
        password_file=password_file,
        sasl="EXTERNAL" if sasl is not None else None,
    )


def _read_password(path: str) -> str:
    """The password in *path* (a trailing newline removed); raises OSError or ValueError."""
    with open(path, "rb") as f:
        data = f.read(MAX_PASSWORD_BYTES + 1)
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password file {path} is over {MAX_PASSWORD_BYTES} bytes")
    return data.decode().removesuffix("\n").removesuffix("\r")


# -- entries -----------------------------------------------------------------------------


def option_name(attribute: str) -> str:
    """The uWSGI option an attribute of its schema stands for: ``uWSGIhttpSocket`` ->
    ``http-socket``. Every capital letter after the prefix begins a new word."""
    rest = attribute[len(UWSGI_PREFIX) :]
    return "".join("-" + c.lower() if c.isupper() else c for c in rest).lstrip("-")


def _text(values: list[bytes], attribute: str) -> str:
    try:
        return values[0].decode()
    except UnicodeDecodeError:
        raise ValueError(f"{attribute} is not UTF-8") from None


def _number(attrs: Mapping[str, list[bytes]], key: str) -> int | None:
    values = attrs.get(key.lower())
    if not values:
        return None
    text = values[0].decode(errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{key} is not a non-negative integer: {short(text)!r}")
    return int(text)


def entry_document(
    dn: str,
    attrs: Mapping[str, list[bytes]],
    *,
    attribute: str,
    source: str,
    options: MonitorOptions,
) -> VassalDocument:
    """The vassal an entry describes; raises :class:`BadVassal`."""
    try:
        rdn = ldap.dn.str2dn(dn)[0]
        name = rdn[0][1]
    except (ldap.DECODING_ERROR, IndexError, ValueError):
        raise BadVassal(None, f"the DN {short(dn)!r} has no usable RDN") from None
    by_key = {k.lower(): (k, v) for k, v in attrs.items() if v}
    classes = {v.decode(errors="replace").lower() for v in attrs_values(by_key, "objectclass")}
    try:
        if attribute.lower() in by_key:
            text = _text(by_key[attribute.lower()][1], attribute)
        elif UWSGI_CLASS in classes:
            if not name.endswith(".ini"):
                name += ".ini"
            text = _uwsgi_ini(by_key.values())
        else:
            raise ValueError(f"neither objectClass uWSGIConfig nor a {attribute} attribute")
        lowered = {k: v for k, (_, v) in by_key.items()}
        uid = _number(lowered, "uidNumber")
        gid = _number(lowered, "gidNumber")
        socket_values = lowered.get(SOCKET_ATTRIBUTE)
        socket = _text(socket_values, "trimperorSocket").strip() if socket_values else None
    except ValueError as exc:
        raise BadVassal(name, str(exc)) from None
    csn = lowered.get("entrycsn")
    if csn:
        version = csn[0].decode(errors="replace")
    else:
        digest = hashlib.sha256()
        for key in sorted(lowered):
            for value in sorted(lowered[key]):
                digest.update(key.encode() + b"\0" + value + b"\0")
        version = digest.hexdigest()[:16]
    doc = VassalDocument(
        name=name,
        source=source,
        version=version,
        text=text,
        uid=uid,
        gid=gid,
        socket=socket or None,
    )
    check_or_raise(doc, options)
    return doc


def attrs_values(by_key: Mapping[str, tuple[str, list[bytes]]], key: str) -> list[bytes]:
    found = by_key.get(key)
    return found[1] if found else []


def _uwsgi_ini(attributes: Iterable[tuple[str, list[bytes]]]) -> str:
    """``[uwsgi]`` with one option per ``uWSGI*`` attribute; raises ValueError."""
    lines = ["[uwsgi]"]

    # Plugins first (uWSGI learns a plugin's options by loading it), then by name.
    def order(kv: tuple[str, list[bytes]]) -> tuple[bool, str]:
        name = option_name(kv[0])
        return (name not in _PLUGIN_OPTIONS, name)

    for attr, values in sorted(attributes, key=order):
        if not attr.lower().startswith(UWSGI_PREFIX) or len(attr) == len(UWSGI_PREFIX):
            continue
        value = _text(values, attr)
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"{attr} holds a line break or NUL")
        lines.append(f"{option_name(attr)} = {value}")
    if len(lines) == 1:
        raise ValueError("objectClass uWSGIConfig but no uWSGI option")
    return "\n".join(lines) + "\n"


class Mirror:
    """The entries the directory has, each parsed once; what the emperor should run.

    Keyed by entryUUID (a rename keeps it). A bad entry is logged once per
    reason; if its name had a good document before, that one stays. Of two
    entries with one name, the one whose DN sorts first wins. The names whose
    vassal may have changed since the last :meth:`take_changed` are tracked,
    so that a change costs work for its own name only.
    """

    def __init__(
        self, parse: Callable[[str, Mapping[str, list[bytes]]], VassalDocument], uri: str
    ) -> None:
        self._parse = parse
        self._uri = uri
        self.dns: dict[str, str] = {}
        self._docs: dict[str, VassalDocument] = {}
        self._by_name: dict[str, set[str]] = {}
        self._changed: set[str] = set()
        self._reported: dict[str, str] = {}
        self._duplicates: set[tuple[str, str]] = set()

    def _set(self, uuid: str, doc: VassalDocument | None) -> None:
        old = self._docs.pop(uuid, None)
        if old is not None:
            self._changed.add(old.name)
            owners = self._by_name[old.name]
            owners.discard(uuid)
            if not owners:
                del self._by_name[old.name]
        if doc is not None:
            self._docs[uuid] = doc
            self._by_name.setdefault(doc.name, set()).add(uuid)
            self._changed.add(doc.name)

    def put(self, uuid: str, dn: str, attrs: Mapping[str, list[bytes]]) -> None:
        self.dns[uuid] = dn
        try:
            doc = self._parse(dn, attrs)
        except BadVassal as bad:
            old = self._docs.get(uuid)
            kept = old is not None and old.name == bad.name
            if not kept:
                self._set(uuid, None)
            if self._reported.get(uuid) != bad.reason:
                log.warning(
                    "source.bad_entry uri=%s dn=%s name=%s reason=%s%s",
                    self._uri,
                    short(dn),
                    bad.name,
                    bad.reason,
                    "; keeping its last good configuration" if kept else "",
                )
            self._reported[uuid] = bad.reason
            return
        self._reported.pop(uuid, None)
        self._set(uuid, doc)

    def drop(self, uuid: str) -> None:
        self.dns.pop(uuid, None)
        self._set(uuid, None)
        self._reported.pop(uuid, None)

    def replace_all(self, entries: Iterable[tuple[str, str, Mapping[str, list[bytes]]]]) -> None:
        seen = set()
        for uuid, dn, attrs in entries:
            seen.add(uuid)
            self.put(uuid, dn, attrs)
        for uuid in set(self.dns) - seen:
            self.drop(uuid)

    def winner(self, name: str) -> VassalDocument | None:
        """The document that runs as *name*, if any."""
        owners = self._by_name.get(name)
        if not owners:
            return None
        if len(owners) == 1:
            return self._docs[next(iter(owners))]
        first, *others = sorted(owners, key=lambda u: self.dns.get(u, ""))
        for uuid in others:
            key = (name, self.dns.get(uuid, ""))
            if key not in self._duplicates:
                self._duplicates.add(key)
                log.warning(
                    "source.bad_entry uri=%s dn=%s name=%s reason=duplicate name; "
                    "the entry %s wins",
                    self._uri,
                    short(key[1]),
                    name,
                    short(self.dns.get(first, "")),
                )
        return self._docs[first]

    def take_changed(self) -> set[str]:
        """The names touched since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def view(self) -> dict[str, VassalDocument]:
        """Every name and the document that runs as it."""
        self._changed = set()
        docs = {}
        for name in self._by_name:
            doc = self.winner(name)
            if doc is not None:
                docs[name] = doc
        return docs


# -- the connection ----------------------------------------------------------------------


class _Consumer(ldap.ldapobject.LDAPObject, ldap.syncrepl.SyncreplConsumer):  # type: ignore[misc]
    """A connection whose syncrepl callbacks append to :attr:`batch`."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.batch: list[tuple[Any, ...]] = []

    def syncrepl_entry(self, dn: str, attrs: dict[str, list[bytes]], uuid: str) -> None:
        self.batch.append(("entry", uuid, dn, attrs))

    def syncrepl_delete(self, uuids: list[str]) -> None:
        self.batch.append(("delete", list(uuids)))

    def syncrepl_present(self, uuids: list[str] | None, refreshDeletes: bool = False) -> None:
        self.batch.append(("present", None if uuids is None else list(uuids), refreshDeletes))

    def syncrepl_refreshdone(self) -> None:
        self.batch.append(("refreshdone",))

    def syncrepl_set_cookie(self, cookie: str) -> None:
        self.batch.append(("cookie", cookie))

    def syncrepl_get_cookie(self) -> None:
        return None


class _NoSync(Exception):
    """The server does not do RFC 4533 content synchronization here."""


# -- the monitor -------------------------------------------------------------------------


class LdapMonitor:
    """``ldap://HOST/BASE?ATTRIBUTE?SCOPE?FILTER?EXTENSIONS``: a directory's entries, live."""

    def __init__(self, uri: str, options: MonitorOptions) -> None:
        check_freq(options)
        self._url = parse_url(uri)
        self.uri = uri
        self._options = options
        if self._url.password_file is not None:
            try:
                _read_password(self._url.password_file)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise UsageError(
                    f"{uri}: cannot read the password file {self._url.password_file}: {exc}"
                ) from None
        self.status = SourceStatus(self.uri)
        self.mode = "starting"
        """``syncrepl`` or ``polling`` once connected."""
        self.cookie: str | None = None
        self._mirror = Mirror(
            lambda dn, attrs: entry_document(
                dn, attrs, attribute=self._url.attribute, source=self.uri, options=options
            ),
            self.uri,
        )
        self._sent: dict[str, VassalDocument] | None = None
        self._no_sync = False

    async def run(self, send: kit.EventSink, *, task_status: kit.Started = kit.IGNORED) -> None:
        """Follow the directory forever; closes *send* on return."""
        async with send:
            task_status.started()
            while True:
                try:
                    await self._session(send)
                except (ldap.LDAPError, OSError, ValueError) as exc:
                    if _result_code(exc) == SYNC_REFRESH_REQUIRED:
                        log.info("source.sync_refresh_required uri=%s", self.uri)
                        self.cookie = None
                        continue
                    unreachable = isinstance(
                        exc, ldap.SERVER_DOWN | ldap.CONNECT_ERROR | ldap.TIMEOUT | OSError
                    )
                    self.status.retry_max = RETRY_UNREACHABLE if unreachable else RETRY_MAX
                    await self.status.backoff(_describe(exc), report=send)

    async def _session(self, send: trio.MemorySendChannel[SourceEvent]) -> None:
        """Connect, then follow (syncrepl) or poll until something fails."""
        conn = await trio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
        try:
            reason = "the server offers no content synchronization (RFC 4533 syncrepl)"
            if self._no_sync:
                reason = "content synchronization was refused for this base"
            elif await trio.to_thread.run_sync(lambda: _supports_sync(conn)):
                try:
                    await self._syncrepl(conn, send)
                    return
                except _NoSync:
                    # Advertised, but not for this base's database: poll from now on.
                    self._no_sync = True
                    reason = "content synchronization was refused for this base"
            await self._poll(conn, send, reason)
        finally:
            _close(conn)

    def _connect(self) -> _Consumer:
        """Open and bind a connection; blocking."""
        url = self._url
        conn = _Consumer(url.server)
        try:
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
            conn.set_option(ldap.OPT_REFERRALS, 0)
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, CONNECT_TIMEOUT)
            conn.set_option(ldap.OPT_TIMEOUT, REQUEST_TIMEOUT)
            for opt, value in (
                ("OPT_X_KEEPALIVE_IDLE", 10),
                ("OPT_X_KEEPALIVE_PROBES", 3),
                ("OPT_X_KEEPALIVE_INTERVAL", 5),
            ):
                if hasattr(ldap, opt) and not url.server.startswith("ldapi:"):
                    conn.set_option(getattr(ldap, opt), value)
            if url.sasl is not None:
                conn.sasl_external_bind_s()
            elif url.bind_dn is not None:
                assert url.password_file is not None
                conn.simple_bind_s(url.bind_dn, _read_password(url.password_file))
            else:
                conn.simple_bind_s("", "")
        except BaseException:
            _close(conn)
            raise
        return conn

    # -- syncrepl ----------------------------------------------------------------------

    async def _syncrepl(self, conn: _Consumer, send: trio.MemorySendChannel[SourceEvent]) -> None:
        batches, received = trio.open_memory_channel[list[tuple[Any, ...]]](math.inf)
        stop = threading.Event()
        token = trio.lowlevel.current_trio_token()
        resumed = self.cookie is not None

        def hand_over(batch: list[tuple[Any, ...]]) -> None:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                batches.send_nowait(batch)

        def deliver(batch: list[tuple[Any, ...]]) -> None:
            token.run_sync_soon(hand_over, batch)

        stopper_scope = trio.CancelScope()

        async def stopper() -> None:
            with stopper_scope:
                try:
                    await trio.sleep_forever()
                finally:
                    stop.set()

        # The thread's error is raised outside the nursery, so that the caller
        # sees the LDAPError itself rather than a group around it.
        error: Exception | None = None
        async with received, trio.open_nursery() as nursery:
            nursery.start_soon(stopper)
            nursery.start_soon(self._apply, received, send, resumed)
            try:
                await trio.to_thread.run_sync(
                    lambda: self._sync_thread(conn, self.cookie, deliver, stop)
                )
            except (ldap.LDAPError, _NoSync) as exc:
                error = exc
            finally:
                stopper_scope.cancel()
                # Everything the thread handed over is in the channel by now
                # (its hand-overs ran before its return was reported): _apply
                # takes it all, cookie included, and ends.
                batches.close()
        if error is not None:
            raise error

    def _sync_thread(
        self,
        conn: _Consumer,
        cookie: str | None,
        deliver: Callable[[list[tuple[Any, ...]]], None],
        stop: threading.Event,
    ) -> None:
        """The syncrepl session: search, then hand over what arrives; blocking.

        Returns when *stop* is set or the server ends the search.
        """
        try:
            msgid = conn.syncrepl_search(
                self._url.base,
                self._url.scope,
                mode="refreshAndPersist",
                cookie=cookie,
                filterstr=self._url.filter,
                attrlist=["*", "entryCSN"],
            )
            running = True
            while running and not stop.is_set():
                try:
                    running = conn.syncrepl_poll(msgid=msgid, timeout=THREAD_POLL)
                    # What is already there joins this batch; a wait of 0 would
                    # be a poll, which python-ldap's result4 mishandles.
                    while running and len(conn.batch) < BATCH:
                        running = conn.syncrepl_poll(msgid=msgid, timeout=DRAIN_WAIT)
                except ldap.TIMEOUT:
                    pass
                if conn.batch:
                    batch, conn.batch = conn.batch, []
                    deliver(batch)
        except ldap.UNAVAILABLE_CRITICAL_EXTENSION:
            raise _NoSync from None
        finally:
            conn.batch = []
        if not running:
            log.info("source.sync_ended uri=%s", self.uri)

    async def _apply(
        self,
        received: trio.MemoryReceiveChannel[list[tuple[Any, ...]]],
        send: trio.MemorySendChannel[SourceEvent],
        resumed: bool,
    ) -> None:
        """Apply what the syncrepl thread hands over to the mirror, and tell the emperor."""
        present: set[str] = set()
        refreshed = False
        changed = 0
        async for batch in received:
            dirty = False
            for ev in batch:
                dirty = dirty or (refreshed and ev[0] in {"entry", "delete"})
                kind = ev[0]
                if kind == "entry":
                    self._mirror.put(ev[1], ev[2], {k: list(v) for k, v in ev[3].items()})
                    changed += 1
                elif kind == "delete":
                    for uuid in ev[1]:
                        self._mirror.drop(uuid)
                    changed += len(ev[1])
                elif kind == "present":
                    uuids, deletes = ev[1], ev[2]
                    if uuids is not None:
                        present.update(uuids)
                    else:
                        if not deletes:
                            # The end of a present phase: what was not named is gone.
                            for uuid in set(self._mirror.dns) - present:
                                self._mirror.drop(uuid)
                                changed += 1
                                dirty = dirty or refreshed
                        present = set()
                elif kind == "cookie":
                    self.cookie = ev[1]
                elif kind == "refreshdone":
                    refreshed = True
                    docs = self._mirror.view()
                    log.info(
                        "source.synced uri=%s mode=syncrepl resumed=%s changes=%d vassals=%d",
                        self.uri,
                        resumed,
                        changed,
                        len(docs),
                    )
                    if self.mode != "syncrepl":
                        self.mode = "syncrepl"
                        log.info("source.connected uri=%s mode=syncrepl", self.uri)
                    self.status.ok(len(docs))
                    await send.send(Snapshot(self.uri, tuple(docs[n] for n in sorted(docs))))
                    self._sent = docs
            if refreshed and dirty:
                await self._send_changes(send)

    async def _send_changes(self, send: trio.MemorySendChannel[SourceEvent]) -> None:
        """Tell the emperor about the names the last batch touched."""
        sent = self._sent if self._sent is not None else {}
        self._sent = sent
        events: list[SourceEvent] = []
        for name in sorted(self._mirror.take_changed()):
            doc = self._mirror.winner(name)
            if doc is None:
                if sent.pop(name, None) is not None:
                    events.append(Remove(self.uri, name))
            elif sent.get(name) != doc:
                sent[name] = doc
                events.append(Upsert(doc))
        self.status.ok(len(sent))
        # Removals first: a rename frees the old name before the new one starts.
        for event in sorted(events, key=lambda e: not isinstance(e, Remove)):
            await send.send(event)

    # -- polling -----------------------------------------------------------------------

    async def _poll(
        self, conn: _Consumer, send: trio.MemorySendChannel[SourceEvent], reason: str
    ) -> None:
        """Search every ``freq`` seconds, unless the base's contextCSN stayed the same."""
        if self.mode != "polling":
            log.warning(
                "source.polling uri=%s every=%.1fs reason=%s (OpenLDAP: the syncprov "
                "overlay on the database of %s)",
                self.uri,
                self._options.freq,
                reason,
                self._url.base or "the root",
            )
            self.mode = "polling"
        last_csn: tuple[bytes, ...] | None = None
        while True:
            csn = await trio.to_thread.run_sync(lambda: self._context_csn(conn))
            if csn is None or csn != last_csn:
                entries = await trio.to_thread.run_sync(lambda: self._search(conn))
                self._mirror.replace_all(entries)
                docs = self._mirror.view()
                log.debug(
                    "source.polled uri=%s entries=%d vassals=%d",
                    self.uri,
                    len(entries),
                    len(docs),
                )
                self.status.ok(len(docs))
                await send.send(Snapshot(self.uri, tuple(docs[n] for n in sorted(docs))))
                self._sent = docs
                last_csn = csn
            else:
                self.status.ok()
            await trio.sleep(self._options.freq)

    def _context_csn(self, conn: _Consumer) -> tuple[bytes, ...] | None:
        """The contextCSN values of the base (or its naming context), None if none; blocking."""
        for base in (self._url.base, *self._naming_contexts(conn)):
            try:
                res = conn.search_ext_s(
                    base,
                    ldap.SCOPE_BASE,
                    "(objectClass=*)",
                    ["contextCSN"],
                    timeout=REQUEST_TIMEOUT,
                )
            except ldap.NO_SUCH_OBJECT:
                continue
            for _, attrs in res:
                values = {k.lower(): v for k, v in attrs.items()}.get("contextcsn")
                if values:
                    return tuple(sorted(values))
        return None

    def _naming_contexts(self, conn: _Consumer) -> list[str]:
        res = conn.search_ext_s(
            "", ldap.SCOPE_BASE, "(objectClass=*)", ["namingContexts"], timeout=REQUEST_TIMEOUT
        )
        found = []
        base = self._url.base.lower()
        for _, attrs in res:
            for value in {k.lower(): v for k, v in attrs.items()}.get("namingcontexts", []):
                context = value.decode(errors="replace")
                if context and base.endswith(context.lower()) and context.lower() != base:
                    found.append(context)
        return found

    def _search(self, conn: _Consumer) -> list[tuple[str, str, dict[str, list[bytes]]]]:
        res = conn.search_ext_s(
            self._url.base,
            self._url.scope,
            self._url.filter,
            ["*", "entryUUID", "entryCSN"],
            timeout=REQUEST_TIMEOUT,
        )
        out = []
        for dn, attrs in res:
            if dn is None:  # a search reference
                continue
            lowered = {k.lower(): v for k, v in attrs.items()}
            uuid = lowered.get("entryuuid", [dn.encode()])[0].decode(errors="replace")
            out.append((uuid, dn, attrs))
        return out


def _close(conn: _Consumer) -> None:
    with contextlib.suppress(ldap.LDAPError):
        conn.unbind_ext()


def _supports_sync(conn: _Consumer) -> bool:
    """Whether the root DSE lists the RFC 4533 control; blocking."""
    res = conn.search_ext_s(
        "", ldap.SCOPE_BASE, "(objectClass=*)", ["supportedControl"], timeout=REQUEST_TIMEOUT
    )
    for _, attrs in res:
        for key, values in attrs.items():
            if key.lower() == "supportedcontrol" and SYNC_OID.encode() in values:
                return True
    return False


def _result_code(exc: BaseException) -> int | None:
    info = exc.args[0] if exc.args else None
    code = info.get("result") if isinstance(info, dict) else None
    return code if isinstance(code, int) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ldap.SIZELIMIT_EXCEEDED):
        return (
            "SIZELIMIT_EXCEEDED: the search finds more entries than the server's size limit "
            "for this bind allows; raise it for the emperor's bind DN (OpenLDAP: olcLimits "
            "... size=unlimited; slapd's default is 500)"
        )
    info = exc.args[0] if exc.args else None
    if isinstance(info, dict):
        desc = str(info.get("desc", "")).strip()
        extra = str(info.get("info", "")).strip()
        text = f"{desc}: {extra}" if extra else desc
        return f"{type(exc).__name__}: {short(text or 'no detail')}"
    return short(error_text(exc, too_slow="the server took too long"))
