"""A job queue (FLEET_QUEUE_URL) answering a `waitingS` that is a whole number too large for a
float is a queue refused and recorded, like any malformed answer, never an exception that stops
the fleet's scans."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Response

from fleet_world import all_actions, fleet
from procure.fleet.controller import scan_once
from procure.local import serve
from test_fleet_signal import MultiGpuCloud

HUGE = "1" + "0" * 400  # valid JSON; float() of it raises OverflowError


def test_a_queue_waiting_beyond_a_float_is_refused_and_the_scans_go_on(sqlite_url: str) -> None:
    """Before the fix: `parse_queue` asks `math.isfinite` of `waitingS`, which raises
    OverflowError for an integer beyond a float's range; `read_queue` ("never raises") does not
    catch it, so every scan raises and the fleet stops acting (no idle instance let go, no
    launch for the queue) for as long as the scheduler answers so."""
    answer = f'{{"jobs": [{{"gpus": 1, "waitingS": {HUGE}}}]}}'
    app = FastAPI()

    @app.get("/pending")
    async def pending() -> Response:
        return Response(answer.encode(), media_type="application/json")

    server = serve(app)

    async def body() -> None:
        cloud = MultiGpuCloud()
        cfg = {
            "policy": "procure",
            "queue_wait_target_min": 0,
            "queue_timeout_s": 10.0,
            "queue_url": f"{server.url}/pending",
        }
        async with fleet(sqlite_url, cloud, **cfg) as ctx:
            result = await scan_once(ctx)
            assert result.error is None  # the scan itself went well
            assert result.queue_error is not None and "waitingS" in result.queue_error
            assert all_actions(ctx) == [] and cloud.launches == []  # nothing bought on garbage

    try:
        asyncio.run(body())
    finally:
        server.stop()
