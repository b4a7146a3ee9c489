"""The dashboard's access rules: with PROCURE_API_TOKEN set, a login form (a wrong token is
refused) gives a signed HTTP-only session cookie that never holds the token; pages and the event
stream need it unless PROCURE_PUBLIC_READ; every mutating form needs the session's CSRF token;
without a token the dashboard is open and says so."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.models import JobSpec
from procure.store import repo
from web_browser import chromium, console_errors, dashboard, screenshot_dir
from world import World, state_of

TOKEN = "dashboard-test-token"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def _run(world: World) -> str:
    with world.store.session() as s:
        return repo.create_run(
            s, user_id="ops", goal="Guarded run", budget_total=5_000_000, job_spec=JobSpec()
        ).id


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def test_login_with_the_token_and_a_wrong_one_refused(
    world: World, browser: Any, tmp_path: Path
) -> None:
    run_id = _run(world)
    with dashboard(world, token=TOKEN) as server:
        context = browser.new_context()
        page = context.new_page()
        errors = console_errors(page)
        page.goto(f"{server.url}/runs/{run_id}")
        page.wait_for_url(re.compile(r"/login\?next="))  # asked for the token first
        page.screenshot(path=str(screenshot_dir(tmp_path) / "login-page.png"))
        page.fill("input[name=token]", "not-the-token")
        page.click("#login-form button")
        assert page.locator("#login-error").inner_text() == "Wrong token."
        page.screenshot(path=str(screenshot_dir(tmp_path) / "login-refused.png"))
        page.fill("input[name=token]", TOKEN)
        page.click("#login-form button")
        page.wait_for_url(f"**/runs/{run_id}")  # back where the user was going
        assert page.locator("#run-status").inner_text() == "running"
        assert page.locator("#open-banner").count() == 0
        page.wait_for_selector("#live-state:text('live')")  # the stream accepts the session
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert TOKEN not in cookie["value"]
        # Logging out ends the session.
        page.click("text=Log out")
        page.wait_for_url("**/login")
        page.goto(f"{server.url}/vendors")
        page.wait_for_url(re.compile(r"/login\?next="))
        context.close()
        assert errors == []  # the refused login's 401 is expected; nothing else


def test_reads_need_a_session_or_the_bearer(world: World) -> None:
    run_id = _run(world)
    with dashboard(world, token=TOKEN) as server, httpx.Client(base_url=server.url) as http:
        for path in ("/", f"/runs/{run_id}", "/vendors", "/runs/new"):
            assert http.get(path).status_code == 303, path  # to the login form
        assert http.get(f"/api/runs/{run_id}/events").status_code == 401
        http.cookies.set("procure_session", "0" * 32 + ".1.1." + "0" * 64)  # forged
        assert http.get("/").status_code == 303
        http.cookies.clear()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        with http.stream("GET", f"/api/runs/{run_id}/events", headers=bearer) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")


def test_public_read_shows_pages_but_not_buttons(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCURE_PUBLIC_READ", "true")
    run_id = _run(world)
    with dashboard(world, token=TOKEN) as server, httpx.Client(base_url=server.url) as http:
        page = http.get(f"/runs/{run_id}")
        assert page.status_code == 200 and "Read-only view" in page.text
        assert 'id="cancel"' not in page.text
        assert http.post(f"/runs/{run_id}/cancel", data={"csrf": "x"}).status_code == 401
    assert state_of(world, run_id).run.status == "running"


def test_a_post_without_the_csrf_token_is_refused(world: World) -> None:
    run_id = _run(world)
    with dashboard(world, token=TOKEN) as server, httpx.Client(base_url=server.url) as http:
        login = http.post("/login", data={"token": TOKEN, "next": f"/runs/{run_id}"})
        assert login.status_code == 303
        csrf = _csrf(http.get(f"/runs/{run_id}").text)
        cancel = f"/runs/{run_id}/cancel"
        assert http.post(cancel).status_code == 403
        assert http.post(cancel, data={"csrf": "0" * 64}).status_code == 403
        start = {"goal": "g", "budgetTotal": "1", "hours": "1", "gpuType": "A100"}
        assert http.post("/runs/new", data={**start, "userId": "u"}).status_code == 403
        assert state_of(world, run_id).run.status == "running"
        # Another session's token does not fit this one.
        with httpx.Client(base_url=server.url) as other:
            other.post("/login", data={"token": TOKEN})
            assert other.post(cancel, data={"csrf": csrf}).status_code == 403
        done = http.post(cancel, data={"csrf": csrf})
        assert done.status_code == 303
    assert state_of(world, run_id).run.status == "cancelled"


def test_without_a_token_the_dashboard_is_open_and_says_so(world: World, browser: Any) -> None:
    run_id = _run(world)
    with dashboard(world) as server:
        context = browser.new_context()
        page = context.new_page()
        errors = console_errors(page)
        page.goto(server.url + "/")
        assert "dashboard is open to anyone" in page.locator("#open-banner").inner_text()
        assert page.locator("text=Log in").count() == 0
        context.close()
        assert errors == []
        # Open, but its forms still carry CSRF: a cross-site POST cannot cancel a run.
        with httpx.Client(base_url=server.url) as http:
            assert http.post(f"/runs/{run_id}/cancel").status_code == 403
    assert state_of(world, run_id).run.status == "running"
