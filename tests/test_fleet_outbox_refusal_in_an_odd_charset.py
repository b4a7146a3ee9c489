"""A Slack webhook (or the proxy before it) that refuses a message with a body in a charset it
names but does not follow is a refusal like any other: counted, the message dropped after its
tries, and the messages behind it delivered."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request, Response

from procure.fleet import outbox
from procure.httpbounds import bounded_client
from procure.local import serve
from procure.models import utcnow
from procure.store import fleet_repo, open_store


def test_a_refusal_in_a_charset_its_bytes_do_not_follow_holds_nothing_back(
    sqlite_url: str,
) -> None:
    """Before the fix: the deliverer read the refusal's text with `response.text`, which raises
    (UnicodeError, TypeError) for a charset the body does not follow (utf-16 without a BOM,
    rot13): the pass raised before the failure was recorded, the message came due again once
    its claim ran out, and raised again, for good; it was never dropped, and every Slack
    message queued behind it waited for ever."""
    got: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        payload = await request.json()
        if payload["text"] == "refused":
            return Response(
                b"invalid_payload", status_code=400, media_type="text/plain; charset=utf-16"
            )
        got.append(payload)
        return Response(b"ok", media_type="text/plain")

    server = serve(app)

    async def body() -> None:
        store = open_store(sqlite_url)
        client = bounded_client(deadline_s=5)
        try:
            with store.session() as s:
                fleet_repo.enqueue(s, "slack", {"text": "refused"}, utcnow())
                fleet_repo.enqueue(
                    s, "slack", {"text": "✅ Executed: provision_instance"}, utcnow()
                )
            for _ in range(outbox.MAX_PERMANENT_TRIES):
                await outbox.deliver_slack(store, client, f"{server.url}/hook")
            assert [m["text"] for m in got] == ["✅ Executed: provision_instance"]
            with store.session() as s:
                assert fleet_repo.outbox_counts(s).get("slack_queued", 0) == 0
        finally:
            await client.aclose()
            store.dispose()

    try:
        asyncio.run(body())
    finally:
        server.stop()
