"""The dashboard's "Add a cloud account" form in Debian's Chromium: reached from the vendors
page, a wrong value named by its label, the account saved and listed on the vendors page, axe
(WCAG 2.1 A/AA) clean in light and dark; behind a token, and open (no token) as well."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.settings import Settings
from procure.store import open_store, repo
from test_web_a11y import AXE, RUN_AXE, TAGS, need_axe
from web_browser import chromium, console_errors, screenshot_dir

TOKEN = "cloud-form-token"
PRICE_LABEL = "Max price (US dollars per hour)"


@contextmanager
def site(tmp_path: Path, token: str | None) -> Iterator[tuple[LocalServer, Any]]:
    """The API and dashboard on loopback over a fresh SQLite store (no vendors yet)."""
    db = f"sqlite:///{tmp_path / 'procure.db'}"
    settings = Settings(PROCURE_DATABASE_URL=db, PROCURE_HOME=tmp_path)
    if token is not None:
        settings = settings.model_copy(update={"api_token": SecretStr(token)})
    store = open_store(db)
    server = serve(create_app(settings, store, budget_warnings=False))
    try:
        yield server, store
    finally:
        server.stop()
        store.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_axe()
    with chromium() as b:
        yield b


def axe(page: Any, where: str) -> list[str]:
    return [f"{where}: {v}" for v in page.evaluate(RUN_AXE, TAGS)]


def test_a_cloud_account_added_from_the_dashboard(browser: Any, tmp_path: Path) -> None:
    shots = screenshot_dir(tmp_path)
    found: list[str] = []
    with site(tmp_path, TOKEN) as (server, store):
        url = server.url
        # Without a session: the form sends to the login page, a post is refused.
        with httpx.Client(base_url=url, timeout=15) as anonymous:
            assert anonymous.get("/vendors/cloud/new").status_code == 303
            refused = anonymous.post("/vendors/cloud/new", data={"provider": "runpod"})
            assert refused.status_code == 401
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_init_script(path=str(AXE))
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            errors = console_errors(page)
            page.goto(url + "/login?next=/vendors")
            page.get_by_label(re.compile("API token")).fill(TOKEN)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(url + "/vendors")
            found += axe(page, "vendors, empty")
            page.get_by_role("link", name="Add a cloud account").click()
            page.wait_for_url(url + "/vendors/cloud/new")
            found += axe(page, "form")

            page.get_by_label("Provider").select_option("runpod")
            page.get_by_label("GPU model").fill("A100")
            page.get_by_label("GPUs per instance").fill("2")
            page.get_by_label(PRICE_LABEL).fill("free")
            page.get_by_label("Interruptible offers").select_option("yes")
            page.get_by_label(re.compile("^Regions")).fill("US-TX-3, EU-RO-1")
            page.get_by_role("button", name="Add the cloud account").click()
            alert = page.get_by_role("alert")
            assert PRICE_LABEL in alert.inner_text()
            assert "maxPricePerHour" not in alert.inner_text()  # the form's words, not the API's
            assert page.get_by_label("GPU model").input_value() == "A100"  # kept as typed
            found += axe(page, "form with errors")
            page.screenshot(path=str(shots / "cloud-vendor-errors.png"), full_page=True)

            page.get_by_label(PRICE_LABEL).fill("2.5")
            page.get_by_role("button", name="Add the cloud account").click()
            page.wait_for_url(url + "/vendors")
            row = page.locator('tr[data-vendor="runpod-a100"]')
            assert "runpod A100 (spot)" in row.inner_text()
            assert "$2.50" in row.inner_text()
            page.screenshot(path=str(shots / "cloud-vendor-added.png"), full_page=True)
            found += axe(page, "vendors, with the cloud account")

            dark = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
            dark.add_init_script(path=str(AXE))
            dark.add_cookies(context.cookies())
            phone = dark.new_page()
            phone.goto(url + "/vendors/cloud/new")
            found += axe(phone, "form, dark phone")
            if phone.evaluate("document.documentElement.scrollWidth > window.innerWidth"):
                found.append("form, dark phone: the page scrolls sideways")
            phone.screenshot(path=str(shots / "cloud-vendor-form-dark-phone.png"), full_page=True)
            dark.close()
        finally:
            context.close()
        with store.session() as s:
            vendor = repo.get_vendor(s, "runpod-a100")
        assert vendor is not None and vendor.kind == "cloud" and vendor.cloud is not None
        assert (vendor.cloud.count, vendor.cloud.spot) == (2, True)
        assert vendor.cloud.regions == ["US-TX-3", "EU-RO-1"]
    assert found == [], "\n".join(found)
    assert errors == []


def test_the_form_works_on_an_open_dashboard(browser: Any, tmp_path: Path) -> None:
    """No token: anyone on the network may act; the form still carries a CSRF token."""
    with site(tmp_path, None) as (server, store):
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            errors = console_errors(page)
            page.goto(server.url + "/vendors")
            page.get_by_role("link", name="Add a cloud account").click()
            page.get_by_label("Provider").select_option("vast")
            page.get_by_label("GPU model").fill("h100")
            page.get_by_label(PRICE_LABEL).fill("1.75")
            page.get_by_label(re.compile("^Vendor id")).fill("vast-h100-cheap")
            page.get_by_role("button", name="Add the cloud account").click()
            page.wait_for_url(server.url + "/vendors")
            assert "vast H100" in page.locator('tr[data-vendor="vast-h100-cheap"]').inner_text()
            # Forged from elsewhere (no CSRF token): refused, nothing saved.
            forged = httpx.post(
                server.url + "/vendors/cloud/new",
                data={"provider": "lambda", "gpu": "A100", "maxPricePerHour": "1"},
                cookies={c["name"]: c["value"] for c in context.cookies()},
            )
            assert forged.status_code == 403
        finally:
            context.close()
        with store.session() as s:
            assert [v.vendor_id for v in repo.list_vendors(s)] == ["vast-h100-cheap"]
    assert errors == []


def test_each_wrong_field_is_named_by_its_label() -> None:
    from procure.web.cloud_vendor_pages import parse

    good = {"provider": "lambda", "gpu": "A100", "maxPricePerHour": "2.5"}
    body, wrong = parse(good)
    assert body is not None and wrong == []
    assert (body.count, body.reliability, body.spot, body.regions) == (1, 0.9, False, [])
    cases = {
        "provider": ("aws", "Provider:"),
        "gpu": ("A100<b>", "GPU model:"),
        "count": ("two", "GPUs per instance:"),
        "maxPricePerHour": ("inf", "Max price (US dollars per hour):"),
        "spot": ("maybe", "Interruptible offers:"),
        "regions": ("us east", "Regions:"),
        "image": ("a b", "Container image:"),
        "vendorId": ("../x", "Vendor id:"),
        "reliability": ("2", "Prior reliability:"),
    }
    for field, (value, label) in cases.items():
        body, wrong = parse({**good, field: value})
        assert body is None and len(wrong) == 1 and wrong[0].startswith(label), (field, wrong)
    body, wrong = parse({"maxPricePerHour": "0", "count": "99"})
    assert body is None
    assert [w.split(":")[0] for w in wrong] == [
        "Provider",
        "GPU model",
        "GPUs per instance",
        "Max price (US dollars per hour)",
    ]


def test_a_vast_region_typed_in_the_form_is_one_region_not_two() -> None:
    """Before the fix: the form split its regions on every comma, so Vast.ai's "Oregon, US"
    (a place and its country code, as Vast names regions and the API takes them) was saved as
    the regions "Oregon" and "US", which match no Vast offer: its runs waited for ever."""
    from procure.web.cloud_vendor_pages import parse

    body, wrong = parse(
        {
            "provider": "vast",
            "gpu": "RTX4090",
            "maxPricePerHour": "0.6",
            "regions": "Oregon, US, Quebec, CA",
        }
    )
    assert wrong == [] and body is not None
    assert body.regions == ["Oregon, US", "Quebec, CA"]
    body, wrong = parse(
        {"provider": "runpod", "gpu": "A100", "maxPricePerHour": "2", "regions": "US-TX-3,EU-RO-1"}
    )
    assert body is not None and body.regions == ["US-TX-3", "EU-RO-1"]
