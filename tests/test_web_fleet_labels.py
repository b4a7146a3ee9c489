"""The Fleet page explains itself (issue 21): a dry-run indicator, labelled cap gauges, a
sparkline with its scale, short instance ids with the whole one on hover, and a sustained-high
load shown as a signal, not red like an error."""

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


def test_fleet_page_labels(
    sqlite_url: str, tmp_path: Path, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAMBDA_LABS_DRY_RUN", raising=False)  # the default: a dry run
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
            loop.run(scan_for(ctx, 17))  # sustained high load
            page = browser.new_page()
            errors = console_errors(page)
            page.goto(server.url + "/fleet")
            assert page.locator("#dry-run").inner_text() == "dry run"
            cell = page.locator("#instances tbody td").first
            assert cell.get_attribute("title") == "i-0001"  # the whole id, however long
            assert "launches and terminates nothing" in page.locator("#dry-run-note").inner_text()
            labels = page.locator(".gauge-label").all_inner_texts()
            assert labels[0].startswith("Fleet, per hour now")
            assert "All spend, last hour" in labels
            hour = page.locator(".gauge-label", has_text="All spend, last hour")
            assert hour.get_attribute("title") == "Its cap: PROCURE_MAX_SPEND_PER_HOUR"
            scale = page.locator("#instances .spark-scale").inner_text()
            assert re.fullmatch(r"\d+–\d+%", scale)
            assert page.locator("#instances svg.spark title").count() == 1
            alarm = page.locator("#instances .pill", has_text="sustained high")
            assert "status-failed" not in (alarm.get_attribute("class") or "")
            assert "status-pending" in (alarm.get_attribute("class") or "")
            page.screenshot(path=str(screenshot_dir(tmp_path) / "fleet-labels.png"), full_page=True)
            assert errors == []
        finally:
            server.stop()
            loop.run(controller.__aexit__(None, None, None))
            store.dispose()
