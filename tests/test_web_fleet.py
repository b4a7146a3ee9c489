"""The Fleet page in a real browser: a pending approval (from the real controller over a fake
cloud) is approved from the page with confirmation, the controller carries it out at its next
scan, and the page shows it executed; instances with their sparkline and the spend gauges."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_fakes import FakeCloud
from fleet_world import fleet, scan_for
from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import open_store
from web_browser import Loop, chromium, console_errors, screenshot_dir


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


def test_approve_a_pending_action_from_the_page(
    sqlite_url: str, tmp_path: Path, loop: Loop
) -> None:
    with chromium() as browser:
        cloud = FakeCloud()
        cloud.add(util=95)
        controller = fleet(sqlite_url, cloud, confirmation_threshold=1.0)
        ctx = loop.run(controller.__aenter__())
        store = open_store(sqlite_url)
        settings = Settings(
            PROCURE_DATABASE_URL=sqlite_url,
            PROCURE_HOME=tmp_path / "home",
            X402_FACILITATOR_URL="http://127.0.0.1:9",
        )
        server = serve(create_app(settings, store))
        try:
            loop.run(scan_for(ctx, 17))  # sustained high load: a launch that needs approval
            page = browser.new_page()
            errors = console_errors(page)
            page.goto(server.url + "/fleet")
            (row,) = page.locator("#pending tbody tr").all()
            action_id = row.get_attribute("data-action")
            assert "provision_instance" in row.inner_text()
            assert re.search(r"\d+ min \d+ s", row.inner_text())  # its time left
            assert page.locator("#instances svg.spark").count() == 1
            assert page.locator(".gauge").count() >= 1
            page.once("dialog", lambda d: d.accept())
            row.locator("button.approve").click()
            page.wait_for_url(re.compile(r"/fleet\?notice=approved$"))
            assert page.locator("#pending").count() == 0
            loop.run(scan_for(ctx, 1))  # the controller's next scan carries it out
            assert cloud.launches == [action_id]
            page.reload()
            history = page.locator(f'#history tr[data-action="{action_id}"]').inner_text()
            assert "executed" in history and "dashboard" in history
            page.screenshot(path=str(screenshot_dir(tmp_path) / "fleet-page.png"), full_page=True)
            assert errors == []
        finally:
            server.stop()
            loop.run(controller.__aexit__(None, None, None))
            store.dispose()
