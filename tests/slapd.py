"""A private OpenLDAP ``slapd`` for the ldap:// tests.

Each :class:`Slapd` lives in its own temporary directory: its own cn=config
(built with ``slapadd -n0`` from an LDIF written here, checked by
``slaptest``), its own MDB database, its own TCP port and ldapi socket. It
neither uses nor touches the system's slapd. The schemas loaded are core,
cosine, nis and inetorgperson (Debian's), trimperor's own
(``src/trimperor/monitors/ldap_schema.ldif``) and uWSGI's, which
:func:`uwsgi_schema_ldif` writes from the options the installed ``uwsgi``
binary lists, by uWSGI's naming rule (``uWSGI`` + the option in camel case).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path

import ldap
import ldap.modlist

import trimperor.monitors
from tests.helpers import free_port

SUFFIX = "dc=example,dc=org"
ROOT_DN = "cn=admin,dc=example,dc=org"
ROOT_PW = "secret"
VASSALS = f"ou=vassals,{SUFFIX}"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PW = "reader-pw"

SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
TRIMPEROR_SCHEMA = Path(trimperor.monitors.__file__).with_name("ldap_schema.ldif")
#: The uWSGI schema's OIDs (they differ between uWSGI builds anyway): a UUID arc.
UWSGI_ARC = "2.25.87826199019783069062183928312513905847"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise RuntimeError(
            f"{name} is not installed: run scripts/services (it installs slapd and ldap-utils)"
        )
    return path


def uwsgi_attribute(option: str) -> str:
    """uWSGI's LDAP attribute for *option*: ``http-socket`` -> ``uWSGIhttpSocket``."""
    head, *rest = option.split("-")
    return "uWSGI" + head + "".join(part[:1].upper() + part[1:] for part in rest)


def uwsgi_schema_ldif(uwsgi: str) -> str:
    """uWSGI's schema for every option ``uwsgi --help`` lists (cn=config form)."""
    out = subprocess.run([uwsgi, "--help"], capture_output=True, text=True, check=False).stdout
    seen: dict[str, str] = {}
    for option in re.findall(r"--([a-z][a-z0-9-]*)\b", out):
        if "--" in option or option.endswith("-"):
            continue
        attr = uwsgi_attribute(option)
        seen.setdefault(attr.lower(), attr)
    if not seen:
        raise RuntimeError(f"{uwsgi} --help listed no options")
    lines = ["dn: cn=uwsgi,cn=schema,cn=config", "objectClass: olcSchemaConfig", "cn: uwsgi"]
    names = sorted(seen.values())
    for n, attr in enumerate(names, 1):
        lines.append(
            f"olcAttributeTypes: ( {UWSGI_ARC}.1.{n} NAME '{attr}' "
            "SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )"
        )
    lines.append(
        f"olcObjectClasses: ( {UWSGI_ARC}.2.1 NAME 'uWSGIConfig' SUP top AUXILIARY "
        "MAY ( " + " $ ".join(names) + " ) )"
    )
    return "\n".join(lines) + "\n"


class Slapd:
    """One private slapd; :meth:`start`, :meth:`stop`, and helpers to edit entries."""

    def __init__(
        self,
        uwsgi: str,
        *,
        syncprov: bool = True,
        port: int | None = None,
        tls: bool = False,
        plain_suffix: str | None = None,
    ) -> None:
        """*plain_suffix*: also serve this suffix, from a database without syncprov."""
        # A short path: the ldapi socket's must fit in sun_path.
        self.dir = Path(tempfile.mkdtemp(prefix="slapd-"))
        self.syncprov = syncprov
        self.plain_suffix = plain_suffix
        self.port = port or free_port()
        self.sock = self.dir / "ldapi"
        self.tls_port = free_port() if tls else None
        self.cert = self.dir / "cert.pem"
        if tls:
            # A self-signed certificate for 127.0.0.1; clients trust it by
            # LDAPTLS_CACERT (or OPT_X_TLS_CACERTFILE).
            subprocess.run(
                [
                    _tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(self.dir / "key.pem"), "-out", str(self.cert),
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(self.dir / "slapd.log", "wb")  # noqa: SIM115
        (self.dir / "data").mkdir()
        (self.dir / "plain").mkdir()
        (self.dir / "slapd.d").mkdir()
        (self.dir / "uwsgi.ldif").write_text(uwsgi_schema_ldif(uwsgi))
        (self.dir / "config.ldif").write_text(self._config())
        subprocess.run(
            [
                _tool("slapadd"),
                "-n0",
                "-F",
                str(self.dir / "slapd.d"),
                "-l",
                str(self.dir / "config.ldif"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [_tool("slaptest"), "-u", "-F", str(self.dir / "slapd.d")],
            check=True,
            capture_output=True,
        )

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldapi_url(self) -> str:
        return "ldapi://" + urllib.parse.quote(str(self.sock), safe="")

    def _config(self) -> str:
        d = self.dir
        modules = "olcModuleLoad: back_mdb\n" + (
            "olcModuleLoad: syncprov\n" if self.syncprov else ""
        )
        schemas = "".join(
            f"include: file://{p}\n"
            for p in (
                SCHEMA_DIR / "core.ldif",
                SCHEMA_DIR / "cosine.ldif",
                SCHEMA_DIR / "nis.ldif",
                SCHEMA_DIR / "inetorgperson.ldif",
                d / "uwsgi.ldif",
                TRIMPEROR_SCHEMA,
            )
        )
        external_root = "gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth"
        overlay = (
            (
                "\ndn: olcOverlay={0}syncprov,olcDatabase={1}mdb,cn=config\n"
                "objectClass: olcOverlayConfig\nobjectClass: olcSyncProvConfig\n"
                "olcOverlay: {0}syncprov\n"
            )
            if self.syncprov
            else ""
        )
        if self.plain_suffix:
            overlay += (
                "\ndn: olcDatabase={2}mdb,cn=config\nobjectClass: olcDatabaseConfig\n"
                f"objectClass: olcMdbConfig\nolcDatabase: {{2}}mdb\nolcDbDirectory: {d}/plain\n"
                f"olcSuffix: {self.plain_suffix}\nolcRootDN: cn=admin,{self.plain_suffix}\n"
                f"olcRootPW: {ROOT_PW}\nolcAccess: to * by * read\n"
            )
        return (
            f"dn: cn=config\nobjectClass: olcGlobal\ncn: config\n"
            f"olcPidFile: {d}/slapd.pid\nolcArgsFile: {d}/slapd.args\n"
            + (
                f"olcTLSCertificateFile: {self.cert}\nolcTLSCertificateKeyFile: {d}/key.pem\n"
                if self.tls_port
                else ""
            )
            + "\n"
            f"dn: cn=module{{0}},cn=config\nobjectClass: olcModuleList\ncn: module{{0}}\n"
            f"olcModulePath: {MODULE_DIR}\n{modules}\n"
            f"dn: cn=schema,cn=config\nobjectClass: olcSchemaConfig\ncn: schema\n\n"
            f"{schemas}\n"
            "dn: olcDatabase={-1}frontend,cn=config\nobjectClass: olcDatabaseConfig\n"
            "objectClass: olcFrontendConfig\nolcDatabase: {-1}frontend\n\n"
            "dn: olcDatabase={0}config,cn=config\nobjectClass: olcDatabaseConfig\n"
            f"olcDatabase: {{0}}config\nolcAccess: to * by dn.exact={external_root} manage "
            "by * none\n\n"
            "dn: olcDatabase={1}mdb,cn=config\nobjectClass: olcDatabaseConfig\n"
            f"objectClass: olcMdbConfig\nolcDatabase: {{1}}mdb\nolcDbDirectory: {d}/data\n"
            f"olcSuffix: {SUFFIX}\nolcRootDN: {ROOT_DN}\nolcRootPW: {ROOT_PW}\n"
            "olcDbIndex: objectClass eq\nolcDbIndex: entryUUID,entryCSN eq\n"
            "olcAccess: to attrs=userPassword by self write by anonymous auth by * none\n"
            f"olcAccess: to * by dn.exact={external_root} read by * read\n"
            f"{overlay}"
        )

    def start(self) -> None:
        """Start it (again, on the same data) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [
                _tool("slapd"),
                "-d",
                "0",
                "-h",
                f"{self.url}/ {self.ldapi_url}"
                + (f" ldaps://127.0.0.1:{self.tls_port}/" if self.tls_port else ""),
                "-F",
                str(self.dir / "slapd.d"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.conn().unbind_s()
                return
            except ldap.LDAPError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        "slapd exited at start: " + (self.dir / "slapd.log").read_text()
                    ) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- editing the directory as its root DN ------------------------------------------

    def conn(self) -> ldap.ldapobject.LDAPObject:
        c = ldap.initialize(self.url)
        c.set_option(ldap.OPT_NETWORK_TIMEOUT, 5)
        c.set_option(ldap.OPT_TIMEOUT, 10)
        c.simple_bind_s(ROOT_DN, ROOT_PW)
        return c

    def populate(self) -> None:
        """The suffix, ``ou=vassals`` and a reader with a password."""
        c = self.conn()
        try:
            c.add_s(
                SUFFIX,
                _mods(
                    {
                        "objectClass": ["dcObject", "organization"],
                        "dc": ["example"],
                        "o": ["Example"],
                    }
                ),
            )
            c.add_s(VASSALS, _mods({"objectClass": ["organizationalUnit"], "ou": ["vassals"]}))
            c.add_s(
                READER_DN,
                _mods(
                    {
                        "objectClass": ["person"],
                        "cn": ["reader"],
                        "sn": ["reader"],
                        "userPassword": [READER_PW],
                    }
                ),
            )
        finally:
            c.unbind_s()

    def add(self, dn: str, attrs: Mapping[str, Iterable[str]]) -> None:
        c = self.conn()
        try:
            c.add_s(dn, _mods(attrs))
        finally:
            c.unbind_s()

    def replace(self, dn: str, attrs: Mapping[str, Iterable[str]]) -> None:
        c = self.conn()
        try:
            c.modify_s(
                dn, [(ldap.MOD_REPLACE, k, [v.encode() for v in vs]) for k, vs in attrs.items()]
            )
        finally:
            c.unbind_s()

    def delete(self, dn: str) -> None:
        c = self.conn()
        try:
            c.delete_s(dn)
        finally:
            c.unbind_s()

    def rename(self, dn: str, new_rdn: str) -> None:
        c = self.conn()
        try:
            c.rename_s(dn, new_rdn, delold=1)
        finally:
            c.unbind_s()


def _mods(attrs: Mapping[str, Iterable[str]]) -> list[tuple[str, list[bytes]]]:
    return [(k, [v.encode() for v in vs]) for k, vs in attrs.items()]


def vassal_dn(rdn_value: str) -> str:
    return f"cn={ldap.dn.escape_dn_chars(rdn_value)},{VASSALS}"


def plain_entry(config: str, **extra: str) -> dict[str, list[str]]:
    attrs = {"objectClass": ["applicationProcess", "trimperorVassal"], "trimperorConfig": [config]}
    attrs.update({k: [v] for k, v in extra.items()})
    return attrs


def uwsgi_entry(options: dict[str, str], **extra: str) -> dict[str, list[str]]:
    attrs: dict[str, list[str]] = {"objectClass": ["applicationProcess", "uWSGIConfig"]}
    if extra:
        attrs["objectClass"].append("trimperorVassal")
    attrs.update({uwsgi_attribute(k): [v] for k, v in options.items()})
    attrs.update({k: [v] for k, v in extra.items()})
    return attrs


def env_ok() -> None:
    """Fail (not skip) when the server is missing."""
    for tool in ("slapd", "slapadd", "slaptest"):
        _tool(tool)
    if not (MODULE_DIR / "syncprov.so").exists() and not any(MODULE_DIR.glob("syncprov*")):
        raise RuntimeError(f"the syncprov module is missing from {MODULE_DIR}")
    os.stat(SCHEMA_DIR / "nis.ldif")
