"""Slack's incoming-webhook rules, on both stores, over real HTTP: message text escaped (`&`, `<`,
`>`) so a name cannot ping `<!channel>` or hide a link; a permanent refusal (400, 403, 404, 410)
is tried a bounded number of times, recorded and dropped, never holding back the messages
behind it; only 429 and 5xx wait (Retry-After) and keep the order."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from procure.fleet import outbox
from procure.fleet.notify import headline, slack_message
from procure.httpbounds import bounded_client
from procure.local import LocalServer, serve
from procure.models import utcnow
from procure.store import Store, fleet_repo, open_store
from procure.store.fleet_tables import ActionRow, OutboxRow

# What Slack answers for each permanent refusal (its incoming-webhook error list)
REFUSALS = {
    400: "invalid_payload",
    403: "invalid_token",
    404: "no_service",
    410: "channel_is_archived",
}


class Hook:
    """A Slack webhook: `BAD<status>` in a text gets that refusal; `SLOW` gets 503 once."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.tries: Counter[str] = Counter()
        self.app = FastAPI()
        self.app.post("/hook")(self.hook)

    async def hook(self, request: Request) -> PlainTextResponse:
        text = (await request.json())["text"]
        self.tries[text] += 1
        for status, said in REFUSALS.items():
            if f"BAD{status}" in text:
                return PlainTextResponse(said, status_code=status)
        if "SLOW" in text and self.tries[text] == 1:
            return PlainTextResponse("service_unavailable", 503, {"Retry-After": "120"})
        self.got.append(text)
        return PlainTextResponse("ok")


@pytest.fixture
def hook() -> Iterator[tuple[Hook, LocalServer]]:
    receiver = Hook()
    server = serve(receiver.app)
    yield receiver, server
    server.stop()


def row(reason: str, status: str = "executed") -> ActionRow:
    return ActionRow(
        action_id=f"act-{abs(hash(reason)) % 10**8}",
        action_type="terminate_instance",
        target_instance="i-0001",
        reason=reason,
        cost_impact=Decimal("-1.29"),
        status=status,
        dry_run=False,
    )


def enqueue(store: Store, *reasons: str) -> None:
    with store.session() as s:
        for reason in reasons:
            action = row(reason)
            text = headline(action)
            assert text is not None
            fleet_repo.enqueue(s, "slack", slack_message(action, text), utcnow())


def deliver(store: Store, url: str, now_in_s: float = 0) -> int:
    async def once() -> int:
        async with bounded_client(deadline_s=10) as client:
            return await outbox.deliver_slack(
                store, client, url, utcnow() + timedelta(seconds=now_in_s)
            )

    return asyncio.run(once())


def queued(store: Store) -> int:
    with store.session() as s:
        return fleet_repo.outbox_counts(s).get("slack_queued", 0)


def test_names_cannot_ping_or_link(db_url: str, hook: tuple[Hook, LocalServer]) -> None:
    receiver, server = hook
    store = open_store(db_url)
    try:
        enqueue(store, "vendor <!channel> & <https://evil.example|your bank> said <@U123>")
        assert deliver(store, f"{server.url}/hook") == 1
    finally:
        store.dispose()
    (text,) = receiver.got
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|your bank&gt;" in text
    assert "&lt;@U123&gt;" in text and "<" not in text and ">" not in text


def test_permanent_refusals_are_dropped_and_block_nothing(
    db_url: str, hook: tuple[Hook, LocalServer]
) -> None:
    receiver, server = hook
    url = f"{server.url}/hook"
    store = open_store(db_url)
    try:
        enqueue(store, "BAD400", "first", "BAD403", "second", "BAD404", "BAD410", "third")
        assert deliver(store, url) == 3  # every good one, on the first pass
        assert [t.rsplit(" - ", 1)[1] for t in receiver.got] == ["first", "second", "third"]
        for _ in range(outbox.MAX_PERMANENT_TRIES + 2):  # passes enough to drop every bad one
            deliver(store, url)
        assert queued(store) == 0
        bad = {t.rsplit(" - ", 1)[1]: n for t, n in receiver.tries.items() if "BAD" in t}
        assert bad == {f"BAD{status}": outbox.MAX_PERMANENT_TRIES for status in REFUSALS}
        with store.session() as s:
            errors = sorted(r.last_error or "" for r in s.query(OutboxRow) if r.last_error)
        assert errors == [f"dropped: HTTP {code}: {said}" for code, said in REFUSALS.items()]
    finally:
        store.dispose()


def test_only_429_and_5xx_wait_for_retry_after_in_order(
    db_url: str, hook: tuple[Hook, LocalServer]
) -> None:
    receiver, server = hook
    url = f"{server.url}/hook"
    store = open_store(db_url)
    try:
        enqueue(store, "SLOW", "after")
        assert deliver(store, url) == 0  # 503, Retry-After 120: the webhook is down for now
        assert deliver(store, url, now_in_s=60) == 0  # the message behind it waits too
        assert deliver(store, url, now_in_s=121) == 2
        assert [t.rsplit(" - ", 1)[1] for t in receiver.got] == ["SLOW", "after"]
        assert queued(store) == 0
    finally:
        store.dispose()
