"""The web dashboard in headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.helpers import PYTHON, EmperorProcess, new_pid, pid_alive, pidfile_vassal, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "dashboard-token-0123456789"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trimp-dash-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def printing_vassal(base: Path, name: str) -> str:
    script = base / f"{name}.py"
    script.write_text(
        "import itertools, time\n"
        "for i in itertools.count():\n"
        "    print('tick', i, flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    return f"[vassal]\ncommand = {PYTHON} {script}\n"


def browse(url: str, base: Path, screenshot: str | None) -> None:
    """Everything the browser does (Playwright's sync API, in its own thread)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.on("dialog", lambda dialog: dialog.accept())

            # A wrong token is refused: no table, "not connected".
            page.goto(f"{url}/#token=wrong")
            expect(page.locator("#conn")).to_have_text(re.compile("not connected"))
            expect(page.locator("#vassals tbody tr")).to_have_count(0)

            page.goto(f"{url}/#token={TOKEN}")
            expect(page.locator("#conn")).to_have_text("live")
            rows = page.locator("#vassals tbody tr")
            expect(rows).to_have_count(2)
            a = page.locator('#vassals tr[data-name="a.ini"]')
            t = page.locator('#vassals tr[data-name="t.ini"]')
            expect(a.locator("td.state")).to_have_text("running")
            expect(t.locator("td.state")).to_have_text("running")
            expect(page.locator("#sources tbody tr")).to_have_count(1)

            # Killed from outside: the restart shows up live, without a reload.
            pid = int(a.locator("td.pid").inner_text())
            os.kill(pid, signal.SIGKILL)
            expect(a.locator("td.restarts")).to_have_text("1", timeout=20_000)
            expect(a.locator("td.pid")).not_to_have_text(str(pid))
            expect(a.locator("td.state")).to_have_text("running")

            # The restart button (confirmed) restarts it.
            pid = int(a.locator("td.pid").inner_text())
            a.locator("button.act-restart").click()
            expect(a.locator("td.restarts")).to_have_text("2", timeout=20_000)
            expect(a.locator("td.pid")).not_to_have_text(str(pid))
            assert not pid_alive(pid) or _wait_dead(pid)

            # Stop, then start.
            t.locator("button.act-stop").click()
            expect(t.locator("td.state")).to_have_text("stopped (ctl)", timeout=20_000)
            t.locator("button.act-start").click()
            expect(t.locator("td.state")).to_have_text("running", timeout=20_000)

            # The log tail of the selected vassal updates as it prints.
            t.locator("td.name").click()
            log = page.locator("#log")
            expect(log).to_contain_text("t.ini| tick")
            last = _last_tick(log.inner_text())
            page.wait_for_function(
                f"() => /tick {last + 3}\\b/.test(document.querySelector('#log').textContent)",
                timeout=20_000,
            )
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)

            # A page of another origin (another port on the same host), with the
            # token, cannot open the socket.
            other = browser.new_page()
            with _other_site() as site:
                other.goto(site)
                outcome = other.evaluate(
                    """(url) => new Promise((resolve) => {
                        const ws = new WebSocket(url);
                        ws.onopen = () => resolve("open");
                        ws.onerror = () => resolve("refused");
                    })""",
                    url.replace("http://", "ws://") + f"/ws?token={TOKEN}",
                )
            assert outcome == "refused"
        finally:
            browser.close()


@contextmanager
def _other_site() -> Iterator[str]:
    """Another web site: an empty page on another port of the same host."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>elsewhere</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _chromium_present() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def _last_tick(text: str) -> int:
    return max(int(m) for m in re.findall(r"tick (\d+)", text))


def _wait_dead(pid: int) -> bool:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.integration
async def test_dashboard_in_chromium(short_dir: Path) -> None:
    assert _chromium_present(), (
        f"{CHROMIUM} is missing: scripts/services installs it (apt chromium)"
    )
    (short_dir / "token").write_text(TOKEN)
    vdir = short_dir / "vassals"
    vdir.mkdir()
    (vdir / "a.ini").write_text(pidfile_vassal(short_dir, "a"))
    (vdir / "t.ini").write_text(printing_vassal(short_dir, "t"))
    emperor = EmperorProcess(
        [
            str(vdir),
            "--control",
            str(short_dir / "ctl.sock"),
            "--control-token-file",
            str(short_dir / "token"),
            "--dashboard",
            "127.0.0.1:0",
            "--throttle",
            "50",
        ],
        short_dir / "emperor.log",
    )
    try:
        await wait_for(lambda: "surface=dashboard" in emperor.text(), 20)
        addr = emperor.text().split("surface=dashboard addr=")[1].split()[0]
        await new_pid(short_dir / "a.pid")
        await trio.to_thread.run_sync(
            browse, f"http://{addr}", short_dir, os.environ.get("TRIMPEROR_DASHBOARD_SCREENSHOT")
        )
        text = emperor.text()
        assert "control.stop names=t.ini" in text
        assert "control.restart names=a.ini" in text
        assert "control.refused surface=dashboard reason=wrong token" in text
        assert "control.refused surface=dashboard reason=cross-origin" in text
        assert TOKEN not in text
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()


@pytest.mark.integration
async def test_dashboard_refuses_other_origins_and_hosts(short_dir: Path) -> None:
    from tests.test_control import http_get

    (short_dir / "token").write_text(TOKEN)
    emperor = EmperorProcess(
        [
            str(short_dir / "none"),
            "--control",
            "none",
            "--control-token-file",
            str(short_dir / "token"),
            "--dashboard",
            "0",  # a bare port: on loopback
        ],
        short_dir / "emperor.log",
    )
    try:
        await wait_for(lambda: "surface=dashboard" in emperor.text(), 20)
        addr = emperor.text().split("surface=dashboard addr=")[1].split()[0]
        head, body = await http_get(addr, "/")
        assert head.startswith("HTTP/1.1 200")
        assert "<title>trimperor</title>" in body
        assert "Content-Security-Policy" in head
        head, _ = await http_get(addr, "/app.js")
        assert head.startswith("HTTP/1.1 200")
        assert "text/javascript" in head
        head, _ = await http_get(addr, "/../pyproject.toml")
        assert head.startswith("HTTP/1.1 404")
        upgrade = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
        )
        # A page on another site, with the token: refused.
        head, _ = await http_get(
            addr, f"/ws?token={TOKEN}", upgrade + "\r\nOrigin: http://evil.test"
        )
        assert head.startswith("HTTP/1.1 403"), head
        # The dashboard's own origin: accepted.
        head, _ = await http_get(addr, f"/ws?token={TOKEN}", upgrade + f"\r\nOrigin: http://{addr}")
        assert head.startswith("HTTP/1.1 101"), head
        # DNS rebinding: a foreign Host header.
        host, port = addr.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
            with trio.fail_after(10):
                reply = await stream.receive_some()
        assert reply.startswith(b"HTTP/1.1 421")
        emperor.signal(signal.SIGTERM)
        assert await emperor.wait() == 0
    finally:
        emperor.close()
