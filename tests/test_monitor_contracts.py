"""Every monitor keeps the Monitor contract, and every entry point names its extra.

Needs every source's driver installed (``.[all,ldap]``, as scripts/test and nox install).
"""

from __future__ import annotations

import importlib.metadata
import re

import pytest

from trimperor.abc import MonitorFactory, MonitorOptions
from trimperor.core.errors import MissingExtraError
from trimperor.monitors.amqp import AmqpMonitor
from trimperor.monitors.etcd import EtcdMonitor
from trimperor.monitors.files import DirMonitor, GlobMonitor
from trimperor.monitors.ldap import LdapMonitor
from trimperor.monitors.mongodb import MongoMonitor
from trimperor.monitors.postgres import PostgresMonitor
from trimperor.monitors.toolkit import GROUP, declared_extra, load_factory
from trimperor.monitors.zeromq import ZmqMonitor
from trimperor.monitors.zookeeper import ZooMonitor

#: mypy checks that each class is a MonitorFactory making a Monitor (status included).
FACTORIES: dict[str, MonitorFactory] = {
    "dir": DirMonitor,
    "glob": GlobMonitor,
    "pg": PostgresMonitor,
    "mongodb": MongoMonitor,
    "amqp": AmqpMonitor,
    "zmq": ZmqMonitor,
    "ldap": LdapMonitor,
    "ldaps": LdapMonitor,
    "ldapi": LdapMonitor,
    "zoo": ZooMonitor,
    "etcd": EtcdMonitor,
}
#: One URI each scheme's monitor accepts without a server (nothing is connected).
URIS = {
    "dir": "dir:///",
    "glob": "glob:///nonexistent/*.ini",
    "pg": "pg://dbname=x",
    "mongodb": "mongodb://127.0.0.1/",
    "amqp": "amqp://127.0.0.1",
    "zmq": "zmq://tcp://127.0.0.1:*",
    "ldap": "ldap://127.0.0.1/dc=example",
    "ldaps": "ldaps://127.0.0.1/dc=example",
    "ldapi": "ldapi:///dc=example",
    "zoo": "zoo://127.0.0.1/vassals",
    "etcd": "etcd://127.0.0.1:2379/vassals",
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def test_every_entry_point_is_a_known_monitor_with_its_extra() -> None:
    eps = _entry_points()
    assert set(eps) == set(FACTORIES)
    extras = set(importlib.metadata.metadata("trimperor").get_all("Provides-Extra") or ())
    for scheme, ep in eps.items():
        assert load_factory(scheme, ep.value) is FACTORIES[scheme]
        if scheme in ("dir", "glob"):
            assert ep.extras == []  # built in: no extra
            continue
        (extra,) = ep.extras
        assert extra in extras, f"{scheme}: [{extra}] is not an extra of the package"
        name, declared = declared_extra(ep.module)
        assert declared == extra
        assert _entry_points()[name].module == ep.module


@pytest.mark.parametrize("scheme", sorted(FACTORIES))
def test_every_monitor_reports_its_status(scheme: str) -> None:
    monitor = FACTORIES[scheme](URIS[scheme], MonitorOptions())
    snap = monitor.status.snapshot()
    assert snap.uri == monitor.uri
    assert snap.state in ("starting", "connecting", "watching")  # nothing tried yet


def test_a_missing_driver_names_the_extra_its_entry_point_declares() -> None:
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'trimperor[zoo]'")):
        load_factory("zoo", "trimperor_no_such_driver:Monitor [zoo]")
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'trimperor[nope]'")):
        load_factory("nope", "trimperor_no_such_driver:Monitor")


def test_every_error_trimperor_raises_is_a_trimperor_error() -> None:
    from trimperor.control.hub import ControlRefused
    from trimperor.core.errors import (
        BadMessage,
        BadVassal,
        ConfigError,
        InternalError,
        Refused,
        SourceError,
        TooLarge,
        TrimperorError,
    )
    from trimperor.core.lifecycle import InvalidTransition
    from trimperor.core.reconcile import Unsupported
    from trimperor.ctl import Unreachable
    from trimperor.fleet.etcd import EtcdError
    from trimperor.monitors.mongodb import BadDocument
    from trimperor.monitors.postgres import BadRow

    kinds: dict[type[Exception], type[TrimperorError]] = {
        BadVassal: ConfigError,
        BadRow: ConfigError,
        BadDocument: ConfigError,
        TooLarge: ConfigError,
        BadMessage: ConfigError,
        Unsupported: Refused,
        InvalidTransition: InternalError,
        EtcdError: SourceError,
        Unreachable: TrimperorError,
        ControlRefused: TrimperorError,
    }
    for exc, kind in kinds.items():
        assert issubclass(exc, kind), f"{exc.__name__} is not a {kind.__name__}"
