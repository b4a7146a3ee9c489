"""Slack and the audit trail, from the outbox: a failing webhook (500, then 429 with
Retry-After) gets every message later, in order, across a restart of the deliverer; the audit
entries land in the log file in the seed's shape and, with a git directory, as commits."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from fleet_fakes import FakeCloud
from fleet_world import fleet, scan_for
from procure.fleet import outbox
from procure.httpbounds import bounded_client
from procure.local import serve
from procure.models import utcnow
from procure.store import fleet_repo, open_store


def receiver(answers: list[tuple[int, dict[str, str]]]) -> tuple[FastAPI, list[dict[str, Any]]]:
    """A Slack webhook that answers from `answers` first, then 200 `ok`."""
    got: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> PlainTextResponse:
        if answers:
            status, headers = answers.pop(0)
            return PlainTextResponse("rate_limited", status_code=status, headers=headers)
        got.append(await request.json())
        return PlainTextResponse("ok")

    return app, got


def test_webhook_failures_and_429_deliver_later_nothing_lost(db_url: str, tmp_path: Path) -> None:
    app, got = receiver([(500, {}), (429, {"Retry-After": "30"})])
    server = serve(app)

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=1)
        cloud.add(util=2)
        async with fleet(db_url, cloud) as ctx:
            await scan_for(ctx, 32)  # one termination, then the cooldown blocks the other
        store = open_store(db_url)
        client = bounded_client(deadline_s=5)
        url = f"{server.url}/hook"
        try:
            assert await outbox.deliver_slack(store, client, url) == 0  # 500: back off
            later = utcnow() + timedelta(seconds=5)
            assert await outbox.deliver_slack(store, client, url, later) == 0  # 429
            with store.session() as s:
                (first, *_) = fleet_repo.due_messages(s, "slack", utcnow() + timedelta(hours=1))
                # attempts count failures of one kind in a row: the 429 starts a count of its own
                assert first.attempts == 1 and "429" in (first.last_error or "")
            store.dispose()  # the deliverer restarts: nothing is lost
            store = open_store(db_url)
            too_soon = utcnow() + timedelta(seconds=20)  # before Retry-After's 30 s
            assert await outbox.deliver_slack(store, client, url, too_soon) == 0
            done = await outbox.deliver_slack(store, client, url, utcnow() + timedelta(seconds=31))
            assert done == 2
            texts = [m["text"] for m in got]
            assert texts[0].startswith("✅ Executed: terminate_instance - Sustained low GPU")
            assert texts[1].startswith("🚫 Action blocked: terminate_instance in cooldown")
            assert all(m["blocks"][0]["type"] == "section" for m in got)
            with store.session() as s:
                assert fleet_repo.outbox_counts(s)["slack_delivered"] == 2

            log, repo = tmp_path / "audit.jsonl", tmp_path / "audit-git"
            assert await outbox.write_audit(store, log, repo) == 2
            entries = [json.loads(line) for line in log.read_text().splitlines()]
            assert [e["action"]["status"] for e in entries] == ["executed", "blocked"]
            assert set(entries[0]) == {"timestamp", "dry_run", "action"}
            assert set(entries[0]["action"]) == {
                "id",
                "type",
                "target",
                "reason",
                "cost_impact",
                "status",
            }
            commits = subprocess.run(
                ["git", "-C", str(repo), "log", "--format=%s"], capture_output=True, text=True
            ).stdout.splitlines()
            assert len(commits) == 2 and commits[0].startswith("blocked: terminate_instance")
            assert await outbox.write_audit(store, log, repo) == 0  # written once
        finally:
            await client.aclose()
            store.dispose()

    try:
        asyncio.run(body())
    finally:
        server.stop()
