"""Dashboard sessions from outside: a malformed or non-ASCII session cookie (or CSRF field) is a
401/403, never a 500; and logging out revokes the session on the server, so a copy of the cookie
kept by someone else no longer reads or acts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.settings import Settings
from procure.store import open_store

TOKEN = "dashboard-token"
COOKIES = [
    b"\xc3\xa9.1.1.abc",  # non-ASCII (latin-1 on the wire)
    "a.1.1.\u00e9".encode("latin-1"),
    b"a.1.1.\xff\xfe",
    b"....",
    b"a.b.c.d",
    b"x" * 300,
    b"a.99999999999999999999999.1.0000",
    b"",
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    db_url = f"sqlite:///{tmp_path / 'procure.db'}"
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    store = open_store(db_url)
    running = serve(create_app(settings, store))
    yield running
    running.stop()
    store.dispose()


@pytest.mark.parametrize("cookie", COOKIES, ids=range(len(COOKIES)))
def test_a_malformed_cookie_is_no_session_never_a_500(server: LocalServer, cookie: bytes) -> None:
    headers = {"Cookie": b"procure_session=" + cookie}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        events = http.get("/api/runs/r1/events", headers=headers)
        assert events.status_code == 401
        logout = http.post("/logout", headers=headers, data={"csrf": "x"})
        assert logout.status_code == 401
        page = http.get("/fleet", headers=headers)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")


def login(http: httpx.Client) -> str:
    answer = http.post("/login", data={"token": TOKEN, "next": "/"})
    assert answer.status_code == 303
    cookie = http.cookies.get("procure_session")
    assert cookie
    return cookie


def test_a_non_ascii_csrf_field_is_refused_not_a_500(server: LocalServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        login(http)
        answer = http.post("/logout", data={"csrf": "\u00e9\u00e9\u00e9"})
        assert answer.status_code == 403


def test_logout_revokes_the_session_on_the_server(server: LocalServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        cookie = login(http)
        page = http.get("/")
        assert page.status_code == 200
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert found is not None
        out = http.post("/logout", data={"csrf": found.group(1)})
        assert out.status_code == 303
    # Someone kept a copy of the cookie: after the logout it is worth nothing.
    stale = {"Cookie": f"procure_session={cookie}"}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/api/runs/r1/events", headers=stale).status_code == 401
        again = http.get("/", headers=stale)
        assert again.status_code == 303 and again.headers["location"].startswith("/login")
