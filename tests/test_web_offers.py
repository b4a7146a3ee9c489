"""The Offers page in a real browser (Debian's Chromium via Playwright) over the real app, the
mock RunPod and Vast.ai clouds and a Lambda that answers 500: the table cheapest first, the
filters as a GET form, the broken cloud said plainly, a bad filter refused, and axe-core's
WCAG 2.1 A/AA checks (light at desktop width, dark at phone width)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_api_offers import Clouds, clouds, offers_server  # noqa: F401 (clouds: a fixture)
from test_web_a11y import AXE, SIZES, check, need_axe
from web_browser import chromium, console_errors, screenshot_dir


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def site(tmp_path: Path, db_url: str, clouds: Clouds) -> Iterator[str]:  # noqa: F811
    with offers_server(tmp_path, db_url, clouds.clients()) as server:
        yield server.url


def cells(page: Any, column: int) -> list[str]:
    return page.locator(f"table.offers tbody tr td:nth-child({column})").all_inner_texts()


def dollars(texts: list[str]) -> list[float]:
    return [float(t.strip().lstrip("$")) for t in texts]


def test_offers_page_filters_and_names_the_broken_cloud(
    site: str, browser: Any, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors = console_errors(page)
    try:
        page.goto(site + "/")
        page.get_by_role("link", name="Offers").click()
        page.wait_for_url(site + "/offers")
        assert page.get_by_role("link", name="Offers").get_attribute("aria-current") == "page"
        everything = dollars(cells(page, 4))
        assert everything and everything == sorted(everything)  # cheapest first
        assert set(cells(page, 1)) == {"runpod", "vast", "x402"}
        broken = page.locator(".cloud-error").all_inner_texts()
        assert len(broken) == 1 and broken[0].startswith("lambda:")
        assert "interruptible" in cells(page, 6)  # Vast.ai's bids
        page.screenshot(path=str(screenshot_dir(tmp_path) / "offers.png"), full_page=True)

        page.get_by_label("GPU model").fill("A100")
        page.get_by_label("Max $/h").fill("1.5")
        page.get_by_role("button", name="Show offers").click()
        page.wait_for_url(re.compile(r"/offers\?gpu=A100&count=&maxPrice=1\.5&spot=$"))
        assert set(cells(page, 2)) == {"A100"}
        assert max(dollars(cells(page, 4))) <= 1.5
        assert "x402-a100" in cells(page, 8)
        assert "runpod-a100" in cells(page, 8)  # the cloud vendor it would be bought through
        assert page.get_by_label("GPU model").input_value() == "A100"  # the form keeps them
        page.screenshot(path=str(screenshot_dir(tmp_path) / "offers-a100.png"), full_page=True)

        page.get_by_label("GPU model").fill("")
        page.get_by_label("Max $/h").fill("")
        page.get_by_label("Kind").select_option(label="interruptible")
        page.get_by_role("button", name="Show offers").click()
        page.wait_for_url(re.compile(r"spot=true$"))
        kinds = cells(page, 6)
        assert kinds and set(kinds) == {"interruptible"}

        page.goto(site + "/offers?count=99")
        alert = page.get_by_role("alert")
        assert "GPUs per instance: a whole number from 1 to 16" in alert.inner_text()
        assert page.locator("table.offers").count() == 0
    finally:
        context.close()
    assert [e for e in errors if "status of 422" not in e] == []


def test_offers_page_passes_axe(site: str, browser: Any, tmp_path: Path) -> None:
    need_axe()
    found: list[str] = []
    for theme, size in (("light", "desktop"), ("dark", "phone")):  # test_web_a11y does all
        context = browser.new_context(viewport=SIZES[size], color_scheme=theme)
        context.add_init_script(path=str(AXE))
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(site + "/offers?count=99")
            found += check(page, f"offers-refused {theme} {size}")
            page.goto(site + "/offers")
            found += check(page, f"offers {theme} {size}")
            shot = screenshot_dir(tmp_path) / f"offers-{theme}-{size}.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert found == [], "\n".join(found)
