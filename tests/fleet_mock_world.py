"""The fleet controller against the real mock Lambda Cloud over HTTP (through `LambdaCloud`): the
mock's clock is manual and the controller's clock reads it, so a test plays minutes in
milliseconds; each mock instance runs a real GPU node on 127.0.0.N."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.context import FleetContext
from procure.fleet.controller import ScanResult, scan_once
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.local import free_port
from procure.store import open_store

KEY = "mock-key-e2e"
NODE_TOKEN = "node-token-e2e"
BASE = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
# Alembic's migration context is process-wide: controllers on threads open their stores in turn.
_OPENING = threading.Lock()


def start_mock(jobs: list[JobSpec] | None = None, **config: Any) -> MockCloud:
    values: dict[str, Any] = {
        "api_key": KEY,
        "speed": 0,  # manual: only the test moves simulated time
        "boot_s": 60,
        "node_port": free_port(),
        "node_token": NODE_TOKEN,
        "workload": list(jobs or []),
        **config,
    }
    return start_mock_cloud(MockCloudConfig(**values))


def lambda_cloud(mock: MockCloud, *, key: str = KEY, timeout_s: float = 10) -> LambdaCloud:
    settings = LambdaSettings(api_key=key, api_url=mock.url, timeout_s=timeout_s)
    return LambdaCloud(settings, pacer=unpaced())


def fleet_settings(mock: MockCloud, **overrides: Any) -> FleetSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "node_port": mock.state.config.node_port,
        "node_token": NODE_TOKEN,
        "ssh_key_names": ["e2e"],
        "region": "us-east-1",
        "scan_interval_s": 60,
        "min_instances": 0,
        "dry_run": False,
        "confirmation_threshold": 100.0,
        **overrides,
    }
    return FleetSettings(**values)


@contextlib.asynccontextmanager
async def controller(
    db_url: str, mock: MockCloud, *, timeout_s: float = 10, **overrides: Any
) -> AsyncIterator[FleetContext]:
    with _OPENING:
        store = open_store(db_url)
    cloud = lambda_cloud(mock, timeout_s=timeout_s)
    nodes = bounded_client(deadline_s=5)
    ctx = FleetContext(
        store=store,
        cloud=cloud,
        nodes=nodes,
        cfg=fleet_settings(mock, **overrides),
        clock=lambda: BASE + timedelta(seconds=mock.state.clock.now()),
        dry_run=False,
    )
    try:
        yield ctx
    finally:
        await nodes.aclose()
        await cloud.aclose()
        if ctx.cloud is not cloud:  # a test swapped it (a wrong key)
            await ctx.cloud.aclose()  # type: ignore[attr-defined]
        store.dispose()


async def launch(mock: MockCloud, name: str) -> str:
    """An instance launched by hand (not by the controller)."""
    cloud = lambda_cloud(mock)
    try:
        ids = await cloud.launch(
            instance_type="gpu_1x_a100", region="us-east-1", name=name, ssh_key_names=["e2e"]
        )
    finally:
        await cloud.aclose()
    return ids[0]


async def minutes(ctx: FleetContext, mock: MockCloud, n: int) -> list[ScanResult]:
    """A scan, then a simulated minute, `n` times."""
    results = []
    for _ in range(n):
        results.append(await scan_once(ctx))
        mock.state.clock.advance(60)
    return results


def statuses(mock: MockCloud) -> dict[str, str]:
    with mock.state.lock:
        mock.state.step()
        return {i.name: i.status for i in mock.state.instances.values()}
