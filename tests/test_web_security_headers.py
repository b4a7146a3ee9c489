"""The dashboard's pages against a foreign page: never framed (a page on another port of the
machine is same-site), no foreign or inline script, not kept in the browser's cache."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.models import JobSpec
from procure.settings import Settings
from procure.store import Store, open_store, repo
from web_browser import chromium

TOKEN = "review-web-token"
PAGES = ["/", "/runs/new", "/vendors", "/vendors/cloud/new", "/offers", "/fleet", "/nodes"]


def _serve(tmp_path: Path, token: str | None) -> tuple[LocalServer, Store, str]:
    db_url = f"sqlite:///{tmp_path / 'procure.db'}"
    extra = {"PROCURE_API_TOKEN": token} if token else {}
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, **extra)
    store = open_store(db_url)
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="ops", goal="Framed run", budget_total=5_000_000, job_spec=JobSpec()
        ).id
    return serve(create_app(settings, store)), store, run_id


@pytest.fixture(params=[None, TOKEN], ids=["open", "token"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, str]]:
    server, store, run_id = _serve(tmp_path, request.param)
    with httpx.Client(base_url=server.url, timeout=15) as http:
        if request.param:
            assert http.post("/login", data={"token": TOKEN, "next": "/"}).status_code == 303
        yield http, run_id
    server.stop()
    store.dispose()


def test_every_dashboard_page_refuses_to_be_framed_or_run_foreign_script(
    site: tuple[httpx.Client, str],
) -> None:
    """Before the fix: no dashboard page sent X-Frame-Options or a Content-Security-Policy, so
    any page on the same site (another port of this machine) could frame the run page under a
    decoy and have the operator click Cancel run or Approve, and injected markup could run
    inline script."""
    http, run_id = site
    for path in [*PAGES, f"/runs/{run_id}", "/runs/no-such-run"]:
        answer = http.get(path)
        assert answer.headers["content-type"].startswith("text/html"), path
        assert answer.headers.get("x-frame-options") == "DENY", path
        policy = answer.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in policy, path
        assert re.search(r"script-src 'self'(;|$)", policy), path
        assert answer.headers.get("x-content-type-options") == "nosniff", path


def test_the_login_page_cannot_be_framed_either(tmp_path: Path) -> None:
    """Before the fix: the login page, where the operator types the API token, could be framed
    by a foreign page."""
    server, store, _run_id = _serve(tmp_path, TOKEN)
    try:
        with httpx.Client(base_url=server.url, timeout=15) as http:
            answer = http.get("/login")
            assert answer.status_code == 200
            assert answer.headers.get("x-frame-options") == "DENY"
            refused = http.post("/login", data={"token": "wrong", "next": "/"})
            assert refused.status_code == 401
            assert refused.headers.get("x-frame-options") == "DENY"
    finally:
        server.stop()
        store.dispose()


def test_a_logged_in_page_is_not_kept_in_the_browser_cache(tmp_path: Path) -> None:
    """Before the fix: pages that need a login (spend, wallet, runs) went out without
    Cache-Control, so after Log out the browser (or a shared proxy) could still show them."""
    server, store, run_id = _serve(tmp_path, TOKEN)
    try:
        with httpx.Client(base_url=server.url, timeout=15) as http:
            assert http.post("/login", data={"token": TOKEN, "next": "/"}).status_code == 303
            for path in [*PAGES, f"/runs/{run_id}"]:
                answer = http.get(path)
                assert answer.status_code == 200, path
                assert "no-store" in answer.headers.get("cache-control", ""), path
    finally:
        server.stop()
        store.dispose()


def _decoy(target: str) -> LocalServer:
    """A foreign page on another port of this machine (same site: cookies ignore ports) that
    frames `target` under a decoy, as a clickjacking page would."""
    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    async def decoy() -> str:
        return f'<!doctype html><p>Win a GPU!</p><iframe src="{target}" width=900 height=600>'

    return serve(app)


def test_a_page_on_another_port_cannot_frame_the_cancel_button(tmp_path: Path) -> None:
    """Before the fix: a page served on another port of this machine (same site, so the
    SameSite=Strict session cookie went along) framed the logged-in run page with its Cancel
    run button live, ready to be clicked through a decoy."""
    server, store, run_id = _serve(tmp_path, TOKEN)
    decoy = _decoy(f"{server.url}/runs/{run_id}")
    try:
        with chromium() as browser:
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"{server.url}/login")
            page.fill("input[name=token]", TOKEN)
            page.click("#login-form button")
            page.wait_for_url(f"{server.url}/")
            page.goto(f"{server.url}/runs/{run_id}")
            assert page.locator("#cancel").count() == 1  # the operator sees it at home
            page.goto(decoy.url + "/", wait_until="load")  # load waits for the frame too
            framed = [f for f in page.frames if f is not page.main_frame]
            assert framed, "the decoy has no frame"
            shown = sum(f.locator("#cancel").count() for f in framed if not f.is_detached())
            assert shown == 0, "the dashboard's Cancel run button is live inside a foreign page"
            context.close()
    finally:
        decoy.stop()
        server.stop()
        store.dispose()
