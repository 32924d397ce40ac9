"""Only complete files become vassals: the emperor as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import EmperorProcess, wait_for

pytestmark = pytest.mark.integration

SLEEPER = "[vassal]\ncommand = sleep 600\n"


async def test_empty_sectionless_and_half_written_files_are_never_spawned(tmp_path: Path) -> None:
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    (vassals / "empty.ini").write_text("")
    (vassals / "typo.ini").write_text("[vasal]\ncommand = sleep 600\n")
    (vassals / "typo.yaml").write_text("vasal:\n  command: sleep 600\nother: {}\n")
    half = (vassals / "half.ini").open("w")
    half.write("[vassal]\n")
    half.flush()
    e = EmperorProcess([str(vassals), "--freq", "0.2"], tmp_path / "e.log")
    try:
        await wait_for(lambda: "empty.ini: the configuration is empty" in e.text())
        await wait_for(
            lambda: "typo.ini: no [vassal] or [uwsgi] section (found [vasal])" in e.text()
        )
        await wait_for(
            lambda: "typo.yaml: no [vassal] or [uwsgi] section (found [vasal], [other])" in e.text()
        )
        await wait_for(
            lambda: "source.incomplete" in e.text() and "name=half.ini" in e.text(),
            what="the half-written file's log line",
        )
        # Several rescans later it is still not started...
        (vassals / "ok.ini").write_text(SLEEPER)
        await wait_for(lambda: "vassal.spawned name=ok.ini" in e.text())
        assert "kind=native" in e.text()
        for name in ("empty.ini", "typo.ini", "typo.yaml", "half.ini"):
            assert f"vassal.spawned name={name}" not in e.text()
        # ...and once closed, it is.
        half.write("command = sleep 600\n")
        half.close()
        await wait_for(lambda: "vassal.spawned name=half.ini" in e.text())
        assert len(re.findall(r"vassal.spawned name=half.ini", e.text())) == 1
        assert "config.invalid name=half.ini" not in e.text()
    finally:
        half.close()
        e.close()
