"""Server-Sent Events of a run: its append-only observations after a cursor (the observation
id, so a reconnect resumes with Last-Event-ID), and its summary whenever it changes. The store is
polled in a thread; the stream is bounded (heartbeats, a batch limit, a maximum lifetime)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from procure.models import TERMINAL_RUN_STATUSES, Observation, PaymentStatus, RunState, utcnow
from procure.store import Store, repo
from procure.web import queries, views
from procure.web.templating import templates

BATCH = 200


@dataclass(frozen=True)
class StreamLimits:
    poll_s: float = 0.5
    heartbeat_s: float = 15.0
    # Then the client's EventSource reconnects with Last-Event-ID. Short, because uvicorn's
    # graceful shutdown waits for open streams: this bounds how long an open tab delays it.
    max_s: float = 60.0


def _event(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _observation(o: Observation) -> dict[str, Any]:
    html = templates.get_template("_observation.html").render(o=o, kind=views.KIND)
    return {**o.to_json(), "html": html}


def _fragments(summary: dict[str, Any]) -> dict[str, Any]:
    """The changing parts of the run page, rendered as on the page itself."""
    run = summary["run"]
    render = templates.get_template("_run_live.html").module  # type: ignore[attr-defined]
    return {
        "status": run.status,
        "progress": run.progress,
        "spent": summary["spent"],
        "ended": summary["ended"],
        "html": {
            "summary": str(render.summary_block(summary)),
            "jobs": str(render.jobs_table(summary)),
            "payments": str(render.payments_table(summary)),
            "burn": str(summary["burn"]),
            "progress-chart": str(summary["progress_chart"]),
        },
    }


def poll(
    store: Store, run_id: str, after: int
) -> tuple[list[Observation], RunState | None, datetime | None]:
    """One look at the store (sync: run in a thread): new observations, the run's state and
    when a worker next ticks it."""
    with store.session() as s:
        observations = repo.list_observations(s, run_id, after_id=after, limit=BATCH)
        state = repo.load_state(s, run_id, observations=False)
        next_check = queries.next_tick_at(s, run_id)
    return observations, state, next_check


def _version(state: RunState, next_check: datetime | None, *, now: datetime | None = None) -> str:
    """Changes whenever anything the summary shows changes (every write bumps updated_at); while
    a payment is in doubt, also when its next check moves, and once it is due with no tick yet
    (the banner then says so: nothing is written meanwhile)."""
    stamps = [state.run.updated_at, *(j.updated_at for j in state.jobs)]
    stamps += [p.updated_at for p in state.payments]
    version = f"{len(state.jobs)}/{len(state.payments)}/{max(stamps).isoformat()}"
    if next_check is not None and any(p.status == PaymentStatus.pending for p in state.payments):
        due = next_check <= (now or utcnow())
        version += f"/{next_check.isoformat()}/{'due' if due else 'ahead'}"
    return version


async def run_events(
    store: Store,
    run_id: str,
    after: int,
    disconnected: Callable[[], Awaitable[bool]],
    limits: StreamLimits = StreamLimits(),
    *,
    auth_window_s: float | None = None,
) -> AsyncIterator[str]:
    started = last_sent = time.monotonic()
    last_version: str | None = None
    yield "retry: 2000\n\n"
    while time.monotonic() - started < limits.max_s and not await disconnected():
        observations, state, next_check = await asyncio.to_thread(poll, store, run_id, after)
        if state is None:
            yield _event("gone", {"runId": run_id})
            return
        for o in observations:
            after = o.id
            yield _event("observation", _observation(o), o.id)
        version = _version(state, next_check)
        if version != last_version:
            last_version = version
            shown = views.summary(state, next_check=next_check, auth_window_s=auth_window_s)
            yield _event("run", _fragments(shown))
        if state.run.status in TERMINAL_RUN_STATUSES and len(observations) < BATCH:
            # Nothing more will come: say so, so the page stops listening (no reconnect loop).
            yield _event("end", {"status": state.run.status})
            return
        now = time.monotonic()
        if observations:
            last_sent = now
        elif now - last_sent >= limits.heartbeat_s:
            last_sent = now
            yield ": heartbeat\n\n"  # keeps proxies and the client from dropping it
        if len(observations) < BATCH:
            await asyncio.sleep(limits.poll_s)
