"""Run every benchmark and print one markdown summary: ``python benchmarks/run.py``.

Options are passed on to the benchmarks (see ``--help``); progress goes to
stderr, the summary to stdout. Every process started is stopped and every
temporary directory removed on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import latency
import ondemand
import scale
from benchlib import RunOptions, add_run_options, machine_info, report_header, run_main


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
    add_run_options(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _run(args, argv))


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    run = RunOptions.of(args)
    out = report_header("trimperor benchmarks", "run.py", argv, machine_info())
    began = time.monotonic()
    lat: latency.LatencyResult | None = None
    sc: tuple[scale.ScaleResult, scale.ScaleResult | None] | None = None
    wake: ondemand.WakeResult | None = None
    armed: tuple[ondemand.ArmedResult, ondemand.ArmedResult | None] | None = None
    if args.only in (None, "latency"):
        lat = latency.measure(args.rounds, args.uwsgi_rounds, run)
    if args.only in (None, "scale"):
        uwsgi_count = 0 if args.skip_uwsgi else args.uwsgi_count
        sc = scale.measure(args.count, args.idle, uwsgi_count, run=run)
    if args.only in (None, "ondemand"):
        wake, armed = ondemand.measure(
            None,
            args.wake_rounds,
            args.wake_uwsgi_rounds,
            args.ondemand_count,
            args.ondemand_uwsgi_count,
            args.idle,
            args.sample,
            run,
        )
    if lat is not None:
        out += ["", "## Reaction latency", "", latency.render(lat)]
    if sc is not None:
        out += ["", "## Scale", "", scale.render(*sc)]
    if wake is not None or armed is not None:
        out += ["", "## On-demand vassals", "", ondemand.render(wake, armed)]
    out += ["", f"Total time: {time.monotonic() - began:.0f} s."]
    print("\n".join(out))
    if lat is not None:
        latency.print_notes(lat, "latency, ")
    if sc is not None:
        scale.print_notes(list(sc))
    ondemand.print_notes(wake, armed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
