"""A job that finished on its node within its paid time is what it was (completed, its artifact
shown), even when the gateway hears of it only once the paid time is over: the loop reaches each
job in turn, a node may not answer for a moment, and a buyer sizes its paid time to its job."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from procure.gpu.jobclient import NodeJobError
from procure.models import utcnow
from procure.store.gateway_tables import GatewayJobRow
from test_gateway import buy, job_status, start_gateway_world, wait_for


class _Unheard:
    """The gateway's node clients, the nodes' job statuses not reaching the gateway while
    `deaf` (a node unreachable for a moment); when each status was seen, and what it was, is
    kept (`said`)."""

    def __init__(self, factory: Any) -> None:
        self.factory, self.deaf = factory, True
        self.said: list[tuple[datetime, str]] = []

    def __call__(self, url: str, token: str, host: str) -> _Client:
        return _Client(self, self.factory(url, token, host))

    def first_seen(self, status: str) -> datetime | None:
        return next((at for at, said in self.said if said == status), None)


class _Client:
    def __init__(self, outer: _Unheard, inner: Any) -> None:
        self.outer, self.inner = outer, inner

    async def __aenter__(self) -> _Client:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.inner.__aexit__(kind, exc, tb)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def status(self, job_id: str) -> dict[str, Any]:
        answer = await self.inner.status(job_id)
        self.outer.said.append((utcnow(), str(answer["status"])))
        if self.outer.deaf:
            raise NodeJobError("status: no answer (the node is unreachable for a moment)")
        return dict(answer)


def test_a_job_that_completed_within_its_paid_time_is_completed_however_late_it_is_seen(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: each poll of a running job first compared the clock with its paid time
    and, past it, ended the job `expired` without asking its node: a job that completed a moment
    before its paid time ran out, seen by the loop a moment after, was reported `expired` (no
    artifact, its node told to cancel), so its buyer took its finished work for unfinished
    and paid for it again elsewhere."""
    g = start_gateway_world(tmp_path, sqlite_url)
    try:
        rt = g.server.app.state.runtime
        rt.node = unheard = _Unheard(rt.node)
        job_id = buy(g, "on-time")
        done_at = wait_for(lambda: unheard.first_seen("completed"), 60)
        # It completed before `done_at`: its paid time ends there, and is over when the gateway
        # hears the node again.
        with g.store.session() as s:
            row = s.get(GatewayJobRow, job_id)
            assert row is not None and row.status == "running" and row.paid_until is not None
            assert done_at < row.paid_until
            row.paid_until = done_at
        wait_for(lambda: utcnow() > done_at)
        unheard.deaf = False
        ended = wait_for(
            lambda: (
                (s := job_status(g, job_id))["status"] in ("completed", "expired", "failed") and s
            ),
            60,
        )
        assert ended["status"] == "completed", ended["logs"][-4:]
        assert ended["artifactUrl"] and ended["progress"] == 1.0
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()
