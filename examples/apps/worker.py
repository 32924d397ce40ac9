"""A background worker: does a unit of work every few seconds and logs it.

It stops cleanly on SIGTERM (finishing the current unit), as a well-behaved
vassal should.
"""

from __future__ import annotations

import os
import signal
import sys
import time

running = True


def stop(signum: int, frame: object) -> None:
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
interval = float(os.environ.get("INTERVAL", "5"))
done = 0
print(f"worker {os.getpid()} started, one job every {interval}s", flush=True)
while running:
    done += 1
    print(f"job {done} done", flush=True)
    deadline = time.monotonic() + interval
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
print(f"worker stopping after {done} jobs", flush=True)
sys.exit(0)
