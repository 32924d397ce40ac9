"""The ldap:// source: from an entry modified in slapd to the new vassal running.

A private slapd (syncprov on, its own port and temporary directory; built as
the tests build theirs, tests/slapd.py) holds one entry ``cn=bench.ini`` whose
``trimperorConfig`` is a native vassal. trimperor follows it over syncrepl.
Each round replaces the configuration (a new round number in its command)
with one LDAP modify; the time runs from just before the modify until the new
vassal process has recorded its own start (``date +%s%N``; both clocks are
CLOCK_REALTIME). Rounds run one at a time; the first few are warm-up.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests import slapd as sl  # noqa: E402

from benchlib import Janitor, Summary, trimperor_command  # noqa: E402


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


def main() -> int:
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
                    print(f"round {n}: {ms:.1f} ms", file=sys.stderr)
            finally:
                conn.unbind_s()
            s = Summary.of(samples)
            print(
                f"ldap:// entry modified -> vassal running, {s.n} changes "
                f"({os.cpu_count()} cores, Python {platform.python_version()})\n"
            )
            print("| source | n | min | p50 | p99 | max |")
            print("|---|---|---|---|---|---|")
            print(
                f"| ldap:// syncrepl | {s.n} | {s.minimum:.1f} | {s.p50:.1f} | "
                f"{s.p99:.1f} | {s.maximum:.1f} |"
            )
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
