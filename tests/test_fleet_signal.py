"""The controller running procure's policy (FLEET_POLICY=procure): a job queue read from a loopback
HTTP server makes it launch a type that fits the queued jobs, through the usual rails; a queue
source that answers garbage, hangs or floods launches nothing and never crashes a scan; and an
idle instance is kept while its paid billing increment lasts, let go at its end."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet
from procure.clouds.base import InstanceType
from procure.fleet.controller import scan_once
from procure.fleet.settings import FleetSettings
from procure.fleet.signal import QueueError, parse_queue
from procure.local import LocalServer, serve


@dataclass
class MultiGpuCloud(FakeCloud):
    """The fake cloud with Lambda's A100 family (1, 2 and 8 GPUs) and its per-minute billing,
    from the end of the boot."""

    billing_increment_s: int = 60
    bills_boot: bool = False

    async def instance_types(self) -> list[InstanceType]:
        return [
            InstanceType(
                f"gpu_{n}x_a100", f"{n}x A100 (40 GB PCIe)", n, n * 1_290_000, ["us-east-1"]
            )
            for n in (1, 2, 8)
        ]


class Queue:
    """A scheduler's pending-jobs endpoint on loopback whose answer the test chooses."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.jobs: list[dict[str, Any]] = []
        self.release = threading.Event()
        app = FastAPI()

        @app.get("/pending")
        async def pending() -> Response:
            if self.mode == "garbage":
                return Response(b"<html>oops{", media_type="application/json")
            if self.mode == "bad-shape":
                return Response(b'{"jobs": [{"gpus": "2", "waitingS": -5}]}')
            if self.mode == "error":
                return Response(b'{"jobs": []}', status_code=503)
            if self.mode == "hang":
                deadline = time.monotonic() + 30
                while not self.release.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            if self.mode == "huge":  # 4 MB of valid-looking JSON, no length announced
                first = b'{"jobs": [' + b'{"gpus": 2, "waitingS": 900},' * 10

                def body() -> Iterator[bytes]:
                    yield first
                    for _ in range(64):
                        yield b'{"gpus": 2, "waitingS": 900},' * 2200
                    yield b'{"gpus": 2, "waitingS": 900}]}'

                return StreamingResponse(body(), media_type="application/json")
            return Response(
                f'{{"jobs": {json.dumps(self.jobs)}}}'.encode(), media_type="application/json"
            )

        self.server: LocalServer = serve(app)

    @property
    def url(self) -> str:
        return f"{self.server.url}/pending"

    def stop(self) -> None:
        self.release.set()
        self.server.stop()


@pytest.fixture
def queue() -> Iterator[Queue]:
    q = Queue()
    try:
        yield q
    finally:
        q.stop()


def _procure(queue: Queue | None, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "policy": "procure",
        "queue_wait_target_min": 0,
        # A loopback queue on a loaded 2-core machine can take over a second to answer (1 s
        # failed a well-formed read under load); the hanging queue's test sets a shorter one.
        "queue_timeout_s": 10.0,
        **overrides,
    }
    if queue is not None:
        values["queue_url"] = queue.url
    return values


def test_queued_two_gpu_jobs_propose_a_two_gpu_launch_through_the_rails(
    sqlite_url: str, queue: Queue
) -> None:
    queue.jobs = [{"gpus": 2, "waitingS": 130}, {"gpus": 2, "waitingS": 95}]

    async def body() -> None:
        cloud = MultiGpuCloud()
        async with fleet(sqlite_url, cloud, dry_run=True, **_procure(queue)) as ctx:
            result = await scan_once(ctx)
            assert result.error is None and result.queue_error is None
            acts = all_actions(ctx)
            # A dry run: decided and audited, blocked before the cloud, once (not per job).
            assert [(a.action_type, a.instance_type, a.status, a.block_reason) for a in acts] == [
                ("provision_instance", "gpu_2x_a100", "blocked", "dry_run")
            ]
            assert "2 job(s) queued" in acts[0].reason
            assert acts[0].metrics_before["queued_gpus"] == 4
            assert acts[0].metrics_before["policy"] == "procure"
            assert cloud.launches == []

    asyncio.run(body())


def test_a_launch_over_the_threshold_waits_for_approval(sqlite_url: str, queue: Queue) -> None:
    queue.jobs = [{"gpus": 2, "waitingS": 600}]

    async def body() -> None:
        cloud = MultiGpuCloud()
        async with fleet(sqlite_url, cloud, confirmation_threshold=1.0, **_procure(queue)) as ctx:
            await scan_once(ctx)
            acts = all_actions(ctx)
            assert [(a.instance_type, a.status) for a in acts] == [("gpu_2x_a100", "pending")]
            assert float(acts[0].cost_impact or 0) == 2.58
            assert cloud.launches == []

    asyncio.run(body())


def test_no_launch_at_an_unknown_price(sqlite_url: str, queue: Queue) -> None:
    queue.jobs = [{"gpus": 1, "waitingS": 600}]

    async def body() -> None:
        cloud = MultiGpuCloud()  # it has no H100: the configured type's price is unknown
        cfg = _procure(queue, default_instance_type="gpu_1x_h100")
        async with fleet(sqlite_url, cloud, **cfg) as ctx:
            assert (await scan_once(ctx)).queue_error is None
            assert all_actions(ctx) == [] and cloud.launches == []

    asyncio.run(body())


def test_without_a_queue_nothing_is_launched(sqlite_url: str) -> None:
    async def body() -> None:
        cloud = MultiGpuCloud()
        async with fleet(sqlite_url, cloud, **_procure(None)) as ctx:
            result = await scan_once(ctx)
            assert result.error is None and result.queue_error is None
            assert all_actions(ctx) == [] and cloud.launches == []

    asyncio.run(body())


@pytest.mark.parametrize("mode", ["garbage", "bad-shape", "error", "hang", "huge"])
def test_a_broken_queue_source_launches_nothing_and_is_recorded(
    sqlite_url: str, queue: Queue, mode: str
) -> None:
    queue.mode = mode

    async def body() -> None:
        cloud = MultiGpuCloud()
        timeout = {"queue_timeout_s": 3.0} if mode == "hang" else {}
        async with fleet(sqlite_url, cloud, **_procure(queue, **timeout)) as ctx:
            result = await scan_once(ctx)
            assert result.queue_error and result.queue_error.startswith("queue: ")
            assert result.error is None  # the scan itself went well
            assert all_actions(ctx) == [] and cloud.launches == []
            queue.mode, queue.jobs = "ok", [{"gpus": 1, "waitingS": 60}]
            queue.release.set()
            ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
            assert (await scan_once(ctx)).queue_error is None  # it recovers
            assert [a.instance_type for a in all_actions(ctx)] == ["gpu_1x_a100"]

    asyncio.run(body())


def test_a_failed_queue_read_never_calls_off_a_boot_its_job_waits_for(
    sqlite_url: str, queue: Queue
) -> None:
    """Billed by the hour, a boot no queued job needs is called off before it ends; a queue
    read that fails says nothing about the job it was launched for: it is left to boot."""
    queue.jobs = [{"gpus": 1, "waitingS": 600}]

    async def body() -> None:
        cloud = MultiGpuCloud(billing_increment_s=3600, boot_scans=100)
        booting = cloud.add(util=0)
        cfg = _procure(queue, queue_wait_target_min=30, action_cooldown_mins=0)
        async with fleet(sqlite_url, cloud, **cfg) as ctx:
            await scan_once(ctx)  # its job waits for it: nothing to do
            assert all_actions(ctx) == [] and cloud.launches == []
            queue.mode = "error"
            for _ in range(5):  # its boot nears its end while the queue cannot be read
                ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
                result = await scan_once(ctx)
                assert result.queue_error == "queue: HTTP 503"
            assert all_actions(ctx) == [] and cloud.terminations == []
            queue.mode, queue.jobs = "ok", []  # read again: its job went elsewhere
            ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
            assert (await scan_once(ctx)).queue_error is None
            acts = all_actions(ctx)
            assert [(a.action_type, a.target_instance) for a in acts] == [
                ("terminate_instance", booting)
            ]
            assert "found a place elsewhere" in acts[0].reason

    asyncio.run(body())


def test_an_idle_instance_is_kept_while_paid_and_let_go_at_the_increment_end(
    sqlite_url: str,
) -> None:
    async def body() -> None:
        cloud = MultiGpuCloud()
        idle = cloud.add(util=2)
        cfg = _procure(None, scan_interval_s=10, action_cooldown_mins=0)
        async with fleet(sqlite_url, cloud, **cfg) as ctx:
            for _ in range(4):  # 0, 10, 20, 30 s into its first paid minute: free to keep
                await scan_once(ctx)
                ctx.clock.advance(seconds=10)  # type: ignore[attr-defined]
            assert all_actions(ctx) == [] and cloud.terminations == []
            ctx.clock.advance(seconds=10)  # type: ignore[attr-defined]
            await scan_once(ctx)  # 50 s: its minute ends before the next scan
            acts = all_actions(ctx)
            assert [(a.action_type, a.target_instance, a.status) for a in acts] == [
                ("terminate_instance", idle, "executed")
            ]
            assert "paid 1-min increment ends" in acts[0].reason
            assert cloud.terminations == [idle]

    asyncio.run(body())


def test_the_policy_setting() -> None:
    assert FleetSettings().policy == "seed"  # the seed's rule unless asked
    cfg = FleetSettings(FLEET_POLICY=" Procure ", FLEET_QUEUE_WAIT_TARGET_MIN=5)
    assert (cfg.policy, cfg.queue_wait_target_min) == ("procure", 5)
    with pytest.raises(ValueError):
        FleetSettings(FLEET_POLICY="fastest")
    with pytest.raises(ValueError):
        FleetSettings(FLEET_QUEUE_URL="file:///etc/passwd")


def test_parse_queue_refuses_any_malformed_job() -> None:
    assert parse_queue({"jobs": [{"gpus": 2, "waitingS": 130}, {"gpus": 1}]}) == (
        (2, 130.0),
        (1, 0.0),
    )
    for bad in (
        [],
        {"jobs": {}},
        {"jobs": [{"gpus": True}]},
        {"jobs": [{"gpus": 0}]},
        {"jobs": [{"gpus": 10**6}]},
        {"jobs": [{"gpus": 1, "waitingS": "long"}]},
        {"jobs": [{"gpus": 1}] * 10_001},
    ):
        with pytest.raises(QueueError):
            parse_queue(bad)
