"""A cancel that arrives once a job has finished on its node (its instance still being
terminated) changes nothing: the job is what it was, and its buyer is told so at once, not
`cancelled` (a terminal status: a buyer stops asking and never sees the work it paid for)."""

from __future__ import annotations

from pathlib import Path

import httpx

from procure.gateway import book
from test_gateway import GatewayWorld, buy, job_status, start_gateway_world, wait_for
from test_gateway_renewals_checkpoints_and_status import _TerminateFails


def test_a_cancel_asked_while_a_completed_job_is_being_ended_leaves_it_completed(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: a cancel was recorded on a job already `ending` after its node reported
    it completed (its instance's terminate refused for a while by the cloud): its status read
    `cancelled`, without its artifact, until the instance was gone, and only then `completed`;
    a buyer that stops at a terminal status kept `cancelled` and lost the finished work."""
    g = start_gateway_world(tmp_path, sqlite_url)
    try:
        rt = g.server.app.state.runtime
        rt.cloud = cloud = _TerminateFails(rt.cloud)  # the instance cannot be terminated yet
        job_id = buy(g, "finished")
        wait_for(lambda: _state(g, job_id) == ("ending", "completed"), 60)
        answer = httpx.post(
            f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "completed", answer.json()
        shown = job_status(g, job_id)
        assert shown["status"] == "completed" and shown["artifactUrl"], shown
        cloud.failing = False
        wait_for(lambda: _state(g, job_id)[0] == "completed", 60)
        assert job_status(g, job_id)["status"] == "completed"
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


def _state(g: GatewayWorld, job_id: str) -> tuple[str, str | None]:
    with g.store.session() as s:
        row = book.job(s, job_id)
        return (row.status, row.outcome) if row is not None else ("", None)
