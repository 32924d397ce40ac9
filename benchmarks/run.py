"""Run every benchmark and print one markdown summary: ``python benchmarks/run.py``.

Options are passed on to the benchmarks (see ``--help``); progress goes to
stderr, the summary to stdout. Every process started is stopped and every
temporary directory removed on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import latency
import ondemand
import scale
from benchlib import machine_info, sigterm_as_interrupt


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the trimperor benchmarks.")
    p.add_argument("--rounds", type=int, default=50, help="latency rounds for trimperor (50)")
    p.add_argument("--uwsgi-rounds", type=int, default=20, help="latency rounds for uWSGI (20)")
    p.add_argument("--seed", type=int, default=None, help="seed for pauses and samples")
    p.add_argument("--count", type=int, default=1000, help="scale: trimperor vassals (1000)")
    p.add_argument("--idle", type=float, default=30.0, help="idle window, s (30)")
    p.add_argument("--uwsgi-count", type=int, default=0, help="scale: uWSGI vassals (0 = skipped)")
    p.add_argument(
        "--wake-rounds", type=int, default=30, help="on-demand wake rounds, one-line server (30)"
    )
    p.add_argument(
        "--wake-uwsgi-rounds", type=int, default=20, help="on-demand wake rounds, uWSGI (20)"
    )
    p.add_argument(
        "--ondemand-count", type=int, default=10000, help="armed on-demand vassals (10000)"
    )
    p.add_argument(
        "--ondemand-uwsgi-count",
        type=int,
        default=10000,
        help="armed on-demand uWSGI vassals (10000; 0 = skipped)",
    )
    p.add_argument("--sample", type=int, default=20, help="armed vassals woken (20)")
    p.add_argument("--skip-uwsgi", action="store_true", help="no uWSGI comparison at all")
    p.add_argument("--only", choices=["latency", "scale", "ondemand"], help="run one benchmark")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the emperors' logs into DIR")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    out: list[str] = ["# trimperor benchmarks", ""]
    info = machine_info()
    out += ["| machine | |", "|---|---|"]
    out += [f"| {key} | {value.splitlines()[0] if value else ''} |" for key, value in info.items()]
    out += ["", f"Command: `python benchmarks/run.py {shlex.join(sys.argv[1:])}`".rstrip()]
    began = time.monotonic()
    lat: latency.LatencyResult | None = None
    sc: tuple[scale.ScaleResult, scale.ScaleResult | None] | None = None
    wake: ondemand.WakeResult | None = None
    armed: tuple[ondemand.ArmedResult, ondemand.ArmedResult | None] | None = None
    try:
        if args.only in (None, "latency"):
            lat = latency.measure(
                rounds=args.rounds,
                uwsgi_rounds=args.uwsgi_rounds,
                seed=args.seed,
                skip_uwsgi=args.skip_uwsgi,
                progress=progress,
                keep_logs=args.keep_logs,
            )
        if args.only in (None, "scale"):
            sc = scale.measure(
                count=args.count,
                idle=args.idle,
                uwsgi_count=0 if args.skip_uwsgi else args.uwsgi_count,
                progress=progress,
                keep_logs=args.keep_logs,
            )
        if args.only in (None, "ondemand"):
            wake, armed = ondemand.measure(
                rounds=args.wake_rounds,
                uwsgi_rounds=args.wake_uwsgi_rounds,
                count=args.ondemand_count,
                uwsgi_count=args.ondemand_uwsgi_count,
                idle=args.idle,
                sample=args.sample,
                seed=args.seed,
                skip_uwsgi=args.skip_uwsgi,
                progress=progress,
                keep_logs=args.keep_logs,
            )
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        return 130
    if lat is not None:
        out += ["", "## Reaction latency", "", latency.render(lat)]
    if sc is not None:
        out += ["", "## Scale", "", scale.render(*sc)]
    if wake is not None or armed is not None:
        out += ["", "## On-demand vassals", "", ondemand.render(wake, armed)]
    out += ["", f"Total time: {time.monotonic() - began:.0f} s."]
    print("\n".join(out))
    if lat is not None:
        for r in (lat.trimperor, lat.uwsgi):
            if r is not None and r.log_notes:
                print(f"\nlatency, {r.label} log lines worth a look ({len(r.log_notes)}):")
                for line in r.log_notes[:20]:
                    print(f"    {line}")
    if sc is not None:
        scale.print_notes(list(sc))
    ondemand.print_notes(wake, armed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
