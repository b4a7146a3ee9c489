"""The run's Server-Sent Events without a browser: observations after the cursor (or the
Last-Event-ID of a reconnect), the run's summary, heartbeats, a bounded lifetime, and `end` once
the run has ended; the runs page's pagination."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from procure.api.app import create_app
from procure.local import serve
from procure.models import JobSpec, ObservationType
from procure.settings import Settings
from procure.store import Store, open_store, repo
from procure.web.events import StreamLimits, run_events


def _store_with_run(url: str) -> tuple[Store, str]:
    store = open_store(url)
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id
        for n in range(3):
            repo.add_observation(s, run_id, ObservationType.agent_reasoning, f"thought {n}")
    return store, run_id


def _collect(store: Store, run_id: str, after: int, limits: StreamLimits) -> list[str]:
    async def never() -> bool:
        return False

    async def gather() -> list[str]:
        return [chunk async for chunk in run_events(store, run_id, after, never, limits)]

    return asyncio.run(gather())


def test_stream_resumes_after_the_cursor_beats_and_ends_in_time(sqlite_url: str) -> None:
    store, run_id = _store_with_run(sqlite_url)
    limits = StreamLimits(poll_s=0.02, heartbeat_s=0.05, max_s=0.4)
    chunks = _collect(store, run_id, 1, limits)  # the run keeps running: bounded by max_s
    ids = [int(m) for c in chunks for m in re.findall(r"^id: (\d+)$", c, re.M)]
    assert ids == [2, 3]
    assert sum(c.startswith("event: run") for c in chunks) == 1  # unchanged: sent once
    assert ": heartbeat\n\n" in chunks
    with store.session() as s:
        repo.update_run(s, run_id, status="cancelled")
    ended = _collect(store, run_id, 3, StreamLimits(poll_s=0.02, max_s=30))
    assert ended[-1].startswith("event: end")
    assert _collect(store, "nope", 0, limits)[-1].startswith("event: gone")
    store.dispose()


def test_events_route_honours_last_event_id(sqlite_url: str, tmp_path: Path) -> None:
    store, run_id = _store_with_run(sqlite_url)
    with store.session() as s:
        repo.update_run(s, run_id, status="completed")  # so the stream ends by itself
    settings = Settings(PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path / "home")
    server = serve(create_app(settings, store))
    try:
        answer = httpx.get(
            f"{server.url}/api/runs/{run_id}/events", headers={"Last-Event-ID": "2"}, timeout=30
        )
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert re.findall(r"^id: (\d+)$", answer.text, re.M) == ["3"]
        assert "event: end" in answer.text
    finally:
        server.stop()
        store.dispose()
