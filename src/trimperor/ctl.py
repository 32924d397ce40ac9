"""``trimperor ctl``: talk to a running emperor over its control socket.

Exit status: 0 when done, 1 when a command failed (an unknown vassal, ``wait``
timed out), 2 for a usage error, 3 when no emperor answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from trimperor.control.address import default_control_path, read_token
from trimperor.core.errors import TrimperorError, UsageError

__all__ = ["CtlClient", "build_parser", "connect", "default_control_path", "main", "read_token"]

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class Unreachable(TrimperorError):
    pass


_MAX_MESSAGE = 256 * 1024 * 1024
_MAX_REFUSAL = 64 * 1024


class CtlClient:
    """One blocking WebSocket client connection to the emperor.

    ``trimperor ctl`` runs once and exits, so it needs no event loop: wsproto (the
    sans-I/O WebSocket protocol trio-websocket is built on) is driven over a plain
    blocking socket (see :func:`trimperor.control.hub.connect` for the trio client).
    """

    def __init__(self, sock: socket.socket, host: str, headers: list[tuple[bytes, bytes]]):
        self._sock = sock
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._pending: deque[Event] = deque()
        self._next = 0
        self._events: deque[dict[str, Any]] = deque()
        self._sock.sendall(self._ws.send(Request(host=host, target="/", extra_headers=headers)))
        refused: RejectConnection | None = None
        body = bytearray()
        while True:
            event = self._event()
            if isinstance(event, AcceptConnection):
                return
            if isinstance(event, RejectConnection):
                refused = event
                if not event.has_body:
                    break
            elif isinstance(event, RejectData):
                body += event.data[: _MAX_REFUSAL - len(body)]
                if event.body_finished:
                    break
        text = body.decode(errors="replace").strip()
        code = refused.status_code if refused is not None else "?"
        raise Unreachable(f"refused: {text or code}")

    def _event(self) -> Event:
        """The next protocol event, reading from the socket as needed."""
        while not self._pending:
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                raise  # next_event's own timeout
            except OSError as exc:
                raise Unreachable(f"lost the connection: {exc.strerror or exc}") from None
            try:
                self._ws.receive_data(data or None)
                self._pending.extend(self._ws.events())
            except RemoteProtocolError as exc:
                raise Unreachable(f"answered with a bad WebSocket stream: {exc}") from None
            if not data and not self._pending:
                raise Unreachable("the emperor closed the connection")
        return self._pending.popleft()

    def _message(self) -> str:
        parts: list[str] = []
        size = 0
        while True:
            event = self._event()
            if isinstance(event, TextMessage):
                size += len(event.data)
                if size > _MAX_MESSAGE:
                    raise Unreachable("sent an oversized message")
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)
            elif isinstance(event, Ping):
                self._sock.sendall(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                with contextlib.suppress(OSError, LocalProtocolError):
                    self._sock.sendall(self._ws.send(event.response()))
                raise Unreachable("the emperor closed the connection")

    def _receive(self) -> dict[str, Any]:
        doc = json.loads(self._message())
        assert isinstance(doc, dict)
        return doc

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self._next += 1
        rid = self._next
        message = TextMessage(json.dumps({"id": rid, "cmd": cmd, **fields}))
        self._sock.sendall(self._ws.send(message))
        while True:
            doc = self._receive()
            if "event" in doc:
                self._events.append(doc)
            elif doc.get("id") == rid:
                return doc

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event (after ``subscribe``); TimeoutError after *timeout* seconds."""
        self._sock.settimeout(timeout)
        try:
            while not self._events:
                doc = self._receive()
                if "event" in doc:
                    return doc
            return self._events.popleft()
        finally:
            self._sock.settimeout(REQUEST_TIMEOUT)

    def close(self) -> None:
        with contextlib.suppress(OSError, LocalProtocolError):
            self._sock.sendall(self._ws.send(CloseConnection(code=1000)))
        self._sock.close()


REQUEST_TIMEOUT = 30.0


def resolve_address(given: str | None) -> str:
    return given or os.environ.get("TRIMPEROR_CONTROL") or default_control_path()


@contextmanager
def connect(address: str, token: str | None = None) -> Iterator[CtlClient]:
    where = split_address(address)
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
    try:
        if isinstance(where, tuple):
            sock = socket.create_connection(where, timeout=REQUEST_TIMEOUT)
            host = f"{where[0]}:{where[1]}"
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(REQUEST_TIMEOUT)
            sock.connect(where)
            host = "localhost"
    except OSError as exc:
        raise Unreachable(f"cannot reach the emperor at {address}: {exc.strerror or exc}") from None
    try:
        try:
            client = CtlClient(sock, host, headers)
        except Unreachable as exc:
            raise Unreachable(f"the emperor at {address} {exc}") from None
        yield client
        client.close()
    finally:
        sock.close()


def split_address(addr: str) -> tuple[str, int] | str:
    """``host:port`` or ``[v6]:port`` -> (host, port); anything else is a path."""
    if "/" in addr or ":" not in addr:
        return addr
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"bad address {addr!r}: port must be a number")
    return host.strip("[]") or "127.0.0.1", int(port)


# -- output --------------------------------------------------------------------


_COLOURS = {
    "running": "32",
    "starting": "36",
    "armed": "36",
    "sleeping": "36",
    "waiting": "33",
    "reloading": "33",
    "stopping": "33",
    "stopped": "31",
}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)


def state_text(row: dict[str, Any]) -> str:
    state = str(row["state"])
    if row.get("held"):
        return f"{state} (ctl)" if state == "stopped" else f"{state} (ctl stop)"
    if row.get("health") in {"unhealthy", "failing"}:
        return f"{state} ({row['health']})"
    if state == "waiting" and row.get("backoff_attempt"):
        return f"waiting (backoff {row['backoff_attempt']})"
    return state


def last_error(row: dict[str, Any]) -> str:
    if row.get("held") and row["state"] == "stopped":
        return "stopped by ctl: trimperor ctl start " + str(row["name"])
    if row.get("last_error"):
        return str(row["last_error"])
    if row["state"] != "waiting":
        return ""  # a deliberate stop or restart is no error
    if row.get("last_exit_signal"):
        return f"killed by {row['last_exit_signal']}"
    if row.get("last_exit_code"):
        return f"exit status {row['last_exit_code']}"
    return ""


def status_table(rows: Sequence[dict[str, Any]], colour: bool = False) -> str:
    head = ["NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS", "WAKES", "CPU%", "RSS", "ERROR"]
    table = [head]
    for r in rows:
        table.append(
            [
                str(r["name"]),
                str(r["kind"]),
                state_text(r),
                str(r["pid"]) if r["pid"] is not None else "-",
                _duration(r["uptime"]),
                str(r["restarts"]),
                str(r["wakes"]),
                f"{r['cpu']:.1f}" if r["cpu"] is not None else "-",
                _bytes(r["rss"]),
                last_error(r),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = []
    for i, row in enumerate(table):
        cells = [cell.ljust(widths[j]) for j, cell in enumerate(row)]
        if colour and i:
            code = _COLOURS.get(str(rows[i - 1]["state"]))
            if code:
                cells[2] = f"\033[{code}m{cells[2]}\033[0m"
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def log_line(doc: dict[str, Any]) -> str:
    """``12:00:01.123 web.ini| a line``; a line of stderr is marked ``web.ini|!``."""
    mark = "|!" if doc.get("stream") == "stderr" else "|"
    return f"{_clock(float(doc['time']))} {doc.get('name', '-')}{mark} {doc.get('line', '')}"


def event_line(doc: dict[str, Any]) -> str:
    skip = {"event", "seq", "time", "name"}
    details = " ".join(f"{k}={v}" for k, v in doc.items() if k not in skip and v is not None)
    return f"{_clock(float(doc['time']))} {doc['event']} {doc.get('name', '-')} {details}".rstrip()


# -- commands ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trimperor ctl",
        description="Watch and steer a running emperor through its control socket.",
        epilog="The socket is --control, else $TRIMPEROR_CONTROL, else the default path "
        "(/run/trimperor/control.sock as root, else $XDG_RUNTIME_DIR/trimperor.sock).",
    )
    p.add_argument("--control", metavar="ADDR", help="socket path or host:port")
    p.add_argument(
        "--token-file",
        "--control-token-file",
        dest="token_file",
        metavar="FILE",
        help="the token, for a TCP control socket ($TRIMPEROR_TOKEN_FILE)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="a table of the vassals")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--json", action="store_true", help="the full status as JSON")
    for cmd, what in (
        ("start", "start vassals stopped by ctl stop (or waiting in backoff)"),
        ("stop", "stop vassals; they stay stopped until started or their config changes"),
        ("restart", "restart the vassals' processes"),
        ("reload", "reload the vassals (their reload signal, else a restart)"),
    ):
        s = sub.add_parser(cmd, help=what)
        s.add_argument("names", nargs="*", metavar="NAME")
        s.add_argument("--all", action="store_true", help="every vassal")
    s = sub.add_parser("signal", help="send a signal to the vassals' main processes")
    s.add_argument("signal", metavar="SIGNAL", help="name (HUP, USR1, ...) or number")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--all", action="store_true", help="every vassal")
    s = sub.add_parser("logs", help="the merged, timestamped output of the vassals")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="default 50")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s = sub.add_parser("events", help="what happened: state changes, spawns, exits, backoff")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="default 50")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s = sub.add_parser("wait", help="wait until a vassal reaches a state (exit 0) or time out (1)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--state", default="running", help="default running")
    s.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="default 30")
    return p


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    token_file = args.token_file or os.environ.get("TRIMPEROR_TOKEN_FILE")
    token = read_token(token_file) if token_file else None
    address = resolve_address(args.control)
    with connect(address, token) as client:
        cmd = args.command
        if cmd == "status":
            reply = client.request("status", names=args.names)
            rows = reply["vassals"]
            missing = sorted(set(args.names) - {r["name"] for r in rows})
            if args.json:
                print(json.dumps(reply, indent=2), file=out)
            else:
                print(
                    status_table(rows, colour=out.isatty() and "NO_COLOR" not in os.environ),
                    file=out,
                )
            for name in missing:
                print(f"trimperor ctl: no such vassal: {name}", file=err)
            return EXIT_FAILED if missing else 0
        if cmd in {"start", "stop", "restart", "reload", "signal"}:
            if not args.names and not args.all:
                raise UsageError(f"{cmd}: name at least one vassal, or --all")
            fields: dict[str, Any] = {"names": args.names, "all": args.all}
            if cmd == "signal":
                fields["signal"] = args.signal
            reply = client.request(cmd, **fields)
            if not reply.get("ok", False) and "error" in reply:
                print(f"trimperor ctl: {reply['error']}", file=err)
                return EXIT_FAILED
            for name, what in reply.get("done", {}).items():
                print(f"{name}: {what}", file=out)
            for name, why in reply.get("errors", {}).items():
                print(f"trimperor ctl: {name}: {why}", file=err)
            return 0 if reply.get("ok") else EXIT_FAILED
        if cmd == "logs":
            if args.follow:
                client.request("subscribe", names=args.names, events=False, logs=True)
            reply = client.request("logs", names=args.names, n=max(args.lines, 0))
            last = 0.0
            for doc in reply["lines"]:
                print(log_line(doc), file=out, flush=True)
                last = max(last, float(doc["time"]))
            if args.follow:
                while True:
                    doc = client.next_event()
                    if doc["event"] == "log" and float(doc["time"]) > last:
                        print(log_line(doc), file=out, flush=True)
            return 0
        if cmd == "events":
            show = json.dumps if args.json else event_line
            if args.follow:
                client.request("subscribe", names=args.names)
            reply = client.request("events", n=max(args.lines, 0))
            seen = 0
            for doc in reply["events"]:
                if not args.names or doc.get("name") in args.names:
                    print(show(doc), file=out, flush=True)
                seen = max(seen, int(doc["seq"]))
            if args.follow:
                while True:
                    doc = client.next_event()
                    if int(doc["seq"]) > seen:
                        print(show(doc), file=out, flush=True)
            return 0
        if cmd == "wait":
            client.request("subscribe", names=[args.name])
            state = None
            deadline = time.monotonic() + args.timeout
            with contextlib.suppress(TimeoutError, ValueError):
                reply = client.request("status", names=[args.name])
                # A vassal not there yet (its file is being deployed) is waited for too.
                if reply["vassals"]:
                    state = reply["vassals"][0]["state"]
                    if state == args.state:
                        return 0
                while True:
                    doc = client.next_event(deadline - time.monotonic())
                    if doc["event"] == "state":
                        state = doc["state"]
                        if state == args.state:
                            return 0
            where = f"is {state}" if state else "is no vassal (yet)"
            print(
                f"trimperor ctl: {args.name} {where}, not {args.state}, after {args.timeout}s",
                file=err,
            )
            return EXIT_FAILED
    raise UsageError(f"unknown command {args.command}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[2:] if argv is None else argv))
    try:
        return _run(args, sys.stdout, sys.stderr)
    except Unreachable as exc:
        sys.stderr.write(f"trimperor ctl: {exc}\n")
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        return 0
    except (TimeoutError, OSError) as exc:
        sys.stderr.write(f"trimperor ctl: the emperor did not answer: {exc}\n")
        return EXIT_UNREACHABLE
    except UsageError as exc:
        sys.stderr.write(f"trimperor ctl: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
