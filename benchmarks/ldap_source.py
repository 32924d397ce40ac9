"""The ldap:// source: from an entry modified in slapd to the new vassal running.

A private slapd (syncprov on, its own port and temporary directory; built as
the tests build theirs, tests/slapd.py) holds one entry ``cn=bench.ini`` whose
``trimperorConfig`` is a native vassal. trimperor follows it over syncrepl.
Each round replaces the configuration (a new round number in its command)
with one LDAP modify; the time runs from just before the modify until the new
vassal process has recorded its own start (``date +%s%N``; both clocks are
CLOCK_REALTIME). Rounds run one at a time; the first few are warm-up.

For the share of the source itself, the same rounds are also run against the
monitor alone, in this process: from just before the modify until its
:class:`~trimperor.core.model.Upsert` comes out of the monitor.

    python benchmarks/ldap_source.py [--rounds 50] [--warmup 3]

Prints a markdown table (min, p50, p99, max in ms) to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import ldap
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests import slapd as sl  # noqa: E402

from benchlib import Janitor, Summary, progress, run_main, trimperor_command  # noqa: E402
from trimperor.abc import MonitorOptions  # noqa: E402
from trimperor.core.model import SourceEvent, Upsert  # noqa: E402
from trimperor.monitors.ldap import LdapMonitor  # noqa: E402


def config(marks: Path, n: int) -> str:
    return (
        "[vassal]\n"
        f"command = /bin/sh -c 'date +%%s%%N > {marks}/r{n}.tmp; "
        f"mv {marks}/r{n}.tmp {marks}/r{n}.start; exec sleep 600'\n"
        "stop-timeout = 2\n"
    )


def wait_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return path.read_text()
        except FileNotFoundError:
            time.sleep(0.0005)
    raise RuntimeError(f"{path} did not appear within {timeout:.0f} s")


async def monitor_rounds(server: sl.Slapd, url: str, dn: str, rounds: int) -> list[float]:
    """Modify -> Upsert out of an in-process monitor, *rounds* times (ms)."""
    monitor = LdapMonitor(url, MonitorOptions())
    send, recv = trio.open_memory_channel[SourceEvent](1000)
    conn = server.conn()
    samples = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run, send)
            await recv.receive()  # the snapshot after the refresh
            for n in range(rounds):
                text = f"[uwsgi]\nround = {n}\n".encode()
                t0 = time.perf_counter_ns()
                mods = [(ldap.MOD_REPLACE, "trimperorConfig", [text])]
                await trio.to_thread.run_sync(conn.modify_s, dn, mods)
                with trio.fail_after(30):
                    while not isinstance(event := await recv.receive(), Upsert):
                        pass
                samples.append((time.perf_counter_ns() - t0) / 1e6)
                assert event.doc.text == text.decode()
            nursery.cancel_scope.cancel()
    finally:
        conn.unbind_s()
    return samples


def row(label: str, s: Summary) -> str:
    return f"| {label} | {s.n} | {s.minimum:.1f} | {s.p50:.1f} | {s.p99:.1f} | {s.maximum:.1f} |"


def main() -> int:
    return run_main(_main)


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    uwsgi = Path(sys.executable).with_name("uwsgi")
    with Janitor() as janitor:
        server = sl.Slapd(str(uwsgi))
        try:
            server.start()
            server.populate()
            work = janitor.tempdir("ldap-bench-")
            marks = work / "marks"
            marks.mkdir()
            dn = sl.vassal_dn("bench.ini")
            server.add(dn, sl.plain_entry(config(marks, 0)))
            # the monitor-alone rounds use an entry the emperor does not see
            alone_base = f"ou=alone,{sl.SUFFIX}"
            alone_dn = f"cn=alone.ini,{alone_base}"
            server.add(alone_base, {"objectClass": ["organizationalUnit"], "ou": ["alone"]})
            server.add(alone_dn, sl.plain_entry("[uwsgi]\n"))
            url = f"{server.url}/{sl.VASSALS}"
            emperor = janitor.start(
                "trimperor",
                trimperor_command(url, "--log-level", "warning"),
                work / "emperor.log",
                work,
            )
            wait_file(marks / "r0.start")
            conn = server.conn()
            samples: list[float] = []
            try:
                for n in range(1, args.rounds + args.warmup + 1):
                    emperor.check_alive()
                    text = config(marks, n).encode()
                    t0 = time.time_ns()
                    conn.modify_s(dn, [(ldap.MOD_REPLACE, "trimperorConfig", [text])])
                    started = int(wait_file(marks / f"r{n}.start"))
                    ms = (started - t0) / 1e6
                    if n > args.warmup:
                        samples.append(ms)
                    progress(f"round {n}: {ms:.1f} ms")
            finally:
                conn.unbind_s()
            emperor.popen.terminate()
            emperor.popen.wait(30)
            alone = trio.run(
                monitor_rounds,
                server,
                f"{server.url}/{alone_base}",
                alone_dn,
                args.rounds + args.warmup,
            )[args.warmup :]
            print(
                f"ldap:// syncrepl, {args.rounds} changes "
                f"({os.cpu_count()} cores, Python {platform.python_version()}), ms\n"
            )
            print("| measured | n | min | p50 | p99 | max |")
            print("|---|---:|---:|---:|---:|---:|")
            print(row("emperor: entry modified -> new vassal running", Summary.of(samples)))
            print(row("monitor alone: entry modified -> Upsert", Summary.of(alone)))
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
