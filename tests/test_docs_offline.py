"""`/docs` works without the internet (issue 21): Swagger UI's assets come from procure itself,
and the page renders the API's operations in a browser that may reach nothing but loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.settings import Settings
from procure.store import open_store
from web_browser import chromium, screenshot_dir


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = open_store(url)
    running = serve(create_app(Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path), store))
    yield running
    running.stop()
    store.dispose()


def test_docs_page_names_only_local_assets(server: LocalServer) -> None:
    page = httpx.get(f"{server.url}/docs", timeout=30)
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        answer = httpx.get(f"{server.url}/docs-assets/{asset}", timeout=30)
        assert answer.status_code == 200 and len(answer.content) > 10_000


def test_docs_render_with_no_internet(server: LocalServer, tmp_path: Path) -> None:
    outside: list[str] = []

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:  # the internet is not there
            outside.append(route.request.url)
            route.abort()

    with chromium() as browser:
        page = browser.new_page()
        page.route("**/*", only_loopback)
        page.goto(f"{server.url}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert any("/api/vendors" in p.replace("\u200b", "") for p in paths)
        page.screenshot(path=str(screenshot_dir(tmp_path) / "docs-offline.png"))
    assert outside == []
