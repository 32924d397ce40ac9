"""The uWSGI emperor protocol, sans-io.

Single bytes on an ``AF_UNIX`` stream socketpair, in both directions, plus a
framed configuration push on a second socketpair for configurations that live
in memory (``--ini emperor://NAME``). Byte values and framing are uWSGI's; see
``docs/uwsgi.md``.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CONFIG_MODIFIER1",
    "MAX_CONFIG_BYTES",
    "ToEmperor",
    "ToVassal",
    "config_flag",
    "encode_config",
]


class ToVassal(enum.IntEnum):
    """Emperor -> vassal."""

    STOP = 0
    """Stop now (uWSGI's "brutal" stop of the vassal's workers)."""
    RELOAD = 1
    """Graceful reload: the vassal's master re-execs itself; its pid stays."""
    GRACEFUL_STOP = 2
    """Graceful stop (sent instead of STOP with ``--graceful-shutdown``)."""


class ToEmperor(enum.IntEnum):
    """Vassal -> emperor."""

    READY = 1
    CONFIG_REQUEST = 2
    ACCEPTING = 5
    LOYAL = 17
    IDLE = 22
    """Voluntary shutdown: back to on-demand if it has a socket, else stop."""
    HEARTBEAT = 26
    SOS = 30
    """All workers busy: asks for a zerg (broodlord mode)."""


#: An exit status that means "do not respawn me".
EXILE_CODE = 26

#: The frame header's first byte.
CONFIG_MODIFIER1 = 115

#: The length field is 16 bits wide.
MAX_CONFIG_BYTES = 0xFFFF


def encode_config(body: bytes) -> bytes:
    """``[115][len: u16 little-endian][0]`` followed by the body.

    uWSGI writes the length in host byte order, which is little-endian on every
    platform it runs on; a body over 65535 bytes cannot be framed (uWSGI would
    silently corrupt it) and raises ValueError.
    """
    if not body:
        raise ValueError("an empty configuration cannot be sent (the vassal exits)")
    if len(body) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"configuration is {len(body)} bytes; the emperor protocol carries at most "
            f"{MAX_CONFIG_BYTES}"
        )
    return struct.pack("<BHB", CONFIG_MODIFIER1, len(body), 0) + body


def decode_config(frame: bytes) -> bytes:
    """The inverse of :func:`encode_config` (for tests and fake vassals)."""
    if len(frame) < 4:
        raise ValueError("short frame")
    _, length, _ = struct.unpack("<BHB", frame[:4])
    body = frame[4 : 4 + length]
    if len(body) != length:
        raise ValueError("truncated frame")
    return body


def config_flag(name: str, extra_extensions: tuple[str, ...] = ()) -> str:
    """The uwsgi option that loads a file of this name: by suffix, later rules win."""
    flag = "--inherit"
    if name.endswith(".xml"):
        flag = "--xml"
    if name.endswith(".ini"):
        flag = "--ini"
    if name.endswith((".yml", ".yaml")):
        flag = "--yaml"
    if name.endswith((".js", ".json")):
        flag = "--json"
    for ext in extra_extensions:
        if name.endswith(ext if ext.startswith(".") else "." + ext):
            flag = "--config"
    return flag


def describe(byte: int) -> str:
    try:
        return ToEmperor(byte).name.lower()
    except ValueError:
        return f"unknown({byte})"
