"""A background worker: does a unit of work every few seconds and logs it.

It stops cleanly on SIGTERM (finishing the current unit), as a well-behaved
vassal should.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
interval = float(os.environ.get("INTERVAL", "5"))
done = 0
print(f"worker {os.getpid()} started, one job every {interval}s", flush=True)
while not stopping.is_set():
    done += 1
    print(f"job {done} done", flush=True)
    deadline = time.monotonic() + interval
    stopping.wait(max(0.0, deadline - time.monotonic()))
print(f"worker stopping after {done} jobs", flush=True)
sys.exit(0)
