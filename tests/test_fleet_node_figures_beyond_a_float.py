"""A node's `/gpu-check` answer whose figure is a whole number too large for a float (JSON
allows any length of digits) is read as a clamped figure, never an exception that stops the
fleet's scans."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any

from fastapi import FastAPI

from procure.fleet.controller import scan_once
from procure.local import serve
from procure.store import fleet_repo
from test_fleet_rails_in_flight import QuietCloud, close, context

HUGE = 10**400  # a valid JSON number; float() of it raises OverflowError


def test_a_node_reporting_an_integer_beyond_a_float_cannot_stop_the_scans(db_url: str) -> None:
    """Before the fix: `nodes.bounded` asks `math.isfinite` of the node's figure, which raises
    OverflowError for an integer beyond a float's range; `read_node` ("never raises") does not
    catch it, so every scan raises and the whole fleet stops acting (no caps kept, no instance
    ended) for as long as that one node answers so."""
    app = FastAPI()

    @app.post("/gpu-check")
    async def gpu_check() -> dict[str, Any]:
        return {"gpus": [{"utilization_gpu_pct": 3, "memory_used_mb": HUGE, "power_w": -HUGE}]}

    server = serve(app)

    async def body() -> None:
        cloud = QuietCloud()
        cloud.add()
        cloud.instances_["i-0001"] = replace(cloud.instances_["i-0001"], ip="127.0.0.1")
        ctx = context(db_url, cloud, dry_run=False, node_port=server.port)
        try:
            result = await scan_once(ctx)
            assert result.instances == 1
            with ctx.store.session() as s:
                (sample,) = fleet_repo.samples_since(
                    s, ["i-0001"], ctx.clock() - timedelta(minutes=1)
                )
                # Clamped to the column's bound, as a huge float is; a negative one to 0.
                assert sample.reachable and sample.memory_used_mb == 10_000_000
                assert sample.power_w == 0.0 and sample.gpu_util == 3.0
        finally:
            await close(ctx)

    try:
        asyncio.run(body())
    finally:
        server.stop()
