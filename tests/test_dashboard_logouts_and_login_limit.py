"""The dashboard's sessions across restarts and against guessing: a logout is kept in the store
(a copied cookie of a logged-out session stays refused after `procure serve` restarts, and on
every other server over the same store; only live revocations are kept), and wrong tokens lock
out the address they come from, for a window that grows, answered 429 with Retry-After."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import func, inspect, select

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.store import open_store, revoked_sessions
from procure.store.tables import Base, RevokedSessionRow
from procure.web.login_limit import MAX_CLIENTS, LoginLimiter
from world import World

TOKEN = "h93-dashboard-token"


@contextmanager
def procure_serve(world: World, db_url: str) -> Iterator[LocalServer]:
    """One `procure serve` process as far as the dashboard can tell: its own app and its own
    store connections over the world's database; stopping it forgets all it held in memory."""
    settings = world.settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    store = open_store(db_url)
    server = serve(create_app(settings, store))
    try:
        yield server
    finally:
        server.stop()
        store.dispose()


def _logged_in(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url)
    assert client.post("/login", data={"token": TOKEN}).status_code == 303
    return client


def _log_out(client: httpx.Client) -> None:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/").text)
    assert found, "no CSRF field on the page"
    assert client.post("/logout", data={"csrf": found.group(1)}).status_code == 303


def _reads(url: str, cookie: str) -> int:
    """What a browser holding only `cookie` gets for the runs page (303: sent to log in)."""
    with httpx.Client(base_url=url, cookies={"procure_session": cookie}) as copy:
        return copy.get("/").status_code


def _stored(world: World) -> int:
    with world.store.session() as s:
        return int(s.scalar(select(func.count()).select_from(RevokedSessionRow)) or 0)


def test_a_logged_out_session_stays_refused_after_a_restart(world: World, db_url: str) -> None:
    """Before the fix: revocations lived in the server's memory only, so after a restart a
    copied cookie of a logged-out session read the dashboard again until its own expiry."""
    with procure_serve(world, db_url) as first:
        gone, kept = _logged_in(first.url), _logged_in(first.url)
        copied = gone.cookies["procure_session"]
        assert _reads(first.url, copied) == 200  # the copy works while the session lives
        _log_out(gone)
        assert _reads(first.url, copied) == 303
    with procure_serve(world, db_url) as restarted:
        assert _reads(restarted.url, copied) == 303  # still logged out
        assert kept.get(f"{restarted.url}/").status_code == 200  # the other session lives on
    gone.close()
    kept.close()


def test_a_logout_counts_on_every_server_over_the_store(world: World, db_url: str) -> None:
    """Before the fix: a logout was known only to the server that took it; another server over
    the same store (sharing the token) read the dashboard with a copy of its cookie."""
    with procure_serve(world, db_url) as one, procure_serve(world, db_url) as other:
        client = _logged_in(one.url)
        copied = client.cookies["procure_session"]
        assert _reads(other.url, copied) == 200  # signed with the token: good on both
        _log_out(client)
        deadline = time.monotonic() + 60
        while _reads(other.url, copied) != 303:
            assert time.monotonic() < deadline, "the other server still reads with the cookie"
            time.sleep(0.2)
        client.close()


def test_only_live_logged_in_sessions_are_kept_revoked(world: World, db_url: str) -> None:
    """Before the fix: there was no table of revocations; now it must hold one row per logout
    of a real session, nothing for forged cookies, and nothing past a session's max age."""
    with procure_serve(world, db_url) as server:
        with httpx.Client(base_url=server.url) as forger:  # hostile logouts: refused, unkept
            for n in range(50):
                forger.cookies.set("procure_session", f"{n:032x}.1.1.{'0' * 64}")
                assert forger.post("/logout", data={"csrf": "0" * 64}).status_code == 401
        assert _stored(world) == 0
        long_ago = datetime.now(UTC) - timedelta(days=40)  # past any PROCURE_SESSION_HOURS
        with world.store.session() as s:
            assert revoked_sessions.revoke(s, "f" * 32, long_ago, issued_after=long_ago)
        assert _stored(world) == 1
        client = _logged_in(server.url)
        _log_out(client)
        _log_out_twice = client.post("/logout", data={"csrf": "0" * 64})
        assert _log_out_twice.status_code == 401  # the revoked cookie cannot log out again
        client.close()
    with world.store.session() as s:  # the expired one purged, the new one kept
        (sid,) = s.scalars(select(RevokedSessionRow.sid)).all()
    assert sid != "f" * 32


def test_the_revoked_sessions_table_matches_its_migration(db_url: str) -> None:
    """Before the fix: no migration made the table that logouts are kept in."""
    store = open_store(db_url)
    try:
        with store.engine.connect() as conn:
            made = inspect(conn).has_table("revoked_sessions")
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        store.dispose()
    assert made
    assert [d for d in diff if "revoked_sessions" in repr(d)] == []


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_wrong_tokens_lock_out_their_address_for_a_growing_window(world: World) -> None:
    """Before the fix: a client could try tokens as fast as it liked, without limit."""
    with procure_serve(world, world.settings.database_url) as server:
        clock = FakeClock()
        server.app.state.dashboard_auth.logins.clock = clock
        guesser = httpx.Client(base_url=server.url)  # from 127.0.0.1
        elsewhere = httpx.Client(
            base_url=server.url, transport=httpx.HTTPTransport(local_address="127.0.0.2")
        )
        for _ in range(5):  # a few typos are free
            assert guesser.post("/login", data={"token": "guess"}).status_code == 401
        locked = guesser.post("/login", data={"token": TOKEN})  # even the right one, now
        assert locked.status_code == 429
        assert "procure_session" not in locked.cookies
        assert "try again in" in locked.text
        first_wait = int(locked.headers["retry-after"])
        assert first_wait >= 1
        # Another address is not locked out by it.
        assert elsewhere.post("/login", data={"token": TOKEN}).status_code == 303
        assert elsewhere.get("/").status_code == 200
        # After the window, another wrong token locks the address out for longer.
        clock.now += first_wait
        assert guesser.post("/login", data={"token": "guess"}).status_code == 401
        again = guesser.post("/login", data={"token": "guess"})
        assert again.status_code == 429
        assert int(again.headers["retry-after"]) > first_wait
        # After that window, the right token logs in, and the address starts afresh.
        clock.now += int(again.headers["retry-after"])
        assert guesser.post("/login", data={"token": TOKEN}).status_code == 303
        assert guesser.get("/").status_code == 200
        guesser.cookies.clear()
        assert guesser.post("/login", data={"token": "typo"}).status_code == 401
        guesser.close()
        elsewhere.close()


def test_the_limiter_forgets_the_least_recent_addresses_beyond_its_bound() -> None:
    """Before the fix: there was no limiter; now its memory must stay bounded however many
    addresses guess, the newest guessers still counted."""
    clock = FakeClock()
    limiter = LoginLimiter(clock)

    def address(n: int) -> str:
        return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"

    for n in range(MAX_CLIENTS + 500):
        limiter.failed(address(n))
    assert len(limiter.clients) == MAX_CLIENTS
    newest = address(MAX_CLIENTS + 499)
    for _ in range(4):
        limiter.failed(newest)
    assert limiter.wait_s(newest) > 0
    # An IPv6 client counts by its /64: changing the host part does not start afresh.
    for host in range(5):
        limiter.failed(f"2001:db8::{host + 1}")
    assert limiter.wait_s("2001:db8::ffff") > 0
    assert limiter.wait_s("2001:db8:0:1::1") == 0
