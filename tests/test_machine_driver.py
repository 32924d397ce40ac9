"""The Supervisor driving its machine with real processes: a configuration
change stops the old process with the signal it was started with."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio

from tests.helpers import wait_for
from trimperor.core.policy import BackoffPolicy
from trimperor.core.vassalspec import NativeSpec
from trimperor.supervisor import Supervisor, SupervisorContext
from trimperor.vassals.spawner import PosixSpawner

pytestmark = pytest.mark.integration

#: Writes the name of the signal that stopped it to argv[1], then exits.
TRAP = """
import signal, sys, time
out = sys.argv[1]
def stop(signum, frame):
    with open(out, "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(s, stop)
open(out + ".up", "w").close()
while True:
    time.sleep(1)
"""


def trap(tmp_path: Path, tag: str, stop_signal: int) -> NativeSpec:
    script = tmp_path / "trap.py"
    script.write_text(TRAP)
    return NativeSpec(
        name="trap.ini",
        command=(sys.executable, str(script), str(tmp_path / tag)),
        chdir=str(tmp_path),
        stop_signal=stop_signal,
        stop_timeout=30.0,
    )


async def test_a_changed_stop_signal_reaches_only_the_new_process(tmp_path: Path) -> None:
    sup = Supervisor(
        "trap.ini",
        "fake://",
        "v1",
        trap(tmp_path, "old", signal.SIGQUIT),
        SupervisorContext(PosixSpawner(), {}),
        BackoffPolicy(throttle=0.05),
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await wait_for((tmp_path / "old.up").exists)
            sup.update("v2", trap(tmp_path, "new", signal.SIGINT))
            await wait_for((tmp_path / "new.up").exists)
            assert (tmp_path / "old").read_text() == "SIGQUIT"
            sup.stop()
            await sup.finished.wait()
    assert (tmp_path / "new").read_text() == "SIGINT"
    assert sup.snapshot().state == "stopped"
    assert sup.restarts == 1
    assert sup.reloads == 1
