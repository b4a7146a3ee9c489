"""The fleet controller on RunPod and Vast.ai accounts, through each provider's client and its mock
over loopback HTTP: never above the price its caps were checked at, types back in stock launched,
a pod in ERROR or stuck booting terminated and replaced, a taken ask followed by the next."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.settings import RunPodSettings
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.mock import start_mock_cloud as start_vast
from procure.clouds.vast.mockstate import Machine, MockVastConfig
from procure.clouds.vast.settings import VastSettings
from procure.fleet.context import FleetContext
from procure.fleet.controller import scan_once
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.store import fleet_repo, open_store

NODE_TOKEN = "review-node-token"
BASE = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def fleet_settings(**overrides: Any) -> FleetSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "node_token": NODE_TOKEN,
        "scan_interval_s": 60,
        "min_instances": 0,
        "dry_run": False,
        "confirmation_threshold": 1000.0,
        **overrides,
    }
    return FleetSettings(**values)


@contextlib.asynccontextmanager
async def fleet(
    db_url: str, mock: Any, cloud: Any, **overrides: Any
) -> AsyncIterator[FleetContext]:
    store = open_store(db_url)
    nodes = bounded_client(deadline_s=5)
    ctx = FleetContext(
        store=store,
        cloud=cloud,
        nodes=nodes,
        cfg=fleet_settings(**overrides),
        clock=lambda: BASE + timedelta(seconds=mock.state.clock.now()),
        dry_run=False,
        mapped_ports=True,
    )
    try:
        yield ctx
    finally:
        await nodes.aclose()
        await cloud.aclose()
        store.dispose()


def vast_world(
    transport: httpx.AsyncBaseTransport | None = None, **config: Any
) -> tuple[Any, VastCloud]:
    values: dict[str, Any] = {"speed": 0, "node_token": NODE_TOKEN, "rate_scale": 0, "drift": 0}
    mock = start_vast(MockVastConfig(**(values | config)))
    cloud = VastCloud(
        VastSettings(VAST_API_KEY=mock.api_key, VAST_API_URL=mock.url, VAST_PACE_SCALE=0),
        transport=transport,
    )
    return mock, cloud


def runpod_world(**config: Any) -> tuple[Any, RunPodCloud]:
    mock = start_runpod(RunPodMockConfig(**({"speed": 0, "node_token": NODE_TOKEN} | config)))
    key = mock.state.config.api_key
    return mock, RunPodCloud(RunPodSettings(RUNPOD_API_KEY=key, RUNPOD_API_URL=mock.url))


def vast_billed_rate(mock: Any) -> float:
    """$/h the mock Vast.ai bills for every instance not destroyed (what the account pays)."""
    with mock.state.lock:
        now = mock.state.now()
        return sum(i.price for i in mock.state.instances.values() if not i.ended(now))


def test_vast_fleet_launch_never_rents_above_the_price_its_cap_was_checked_at(
    sqlite_url: str,
) -> None:
    """Before the fix: the fleet checks its hourly cap against the instance type's cheapest Vast.ai
    offer in any region, but launches the cheapest offer in its own region: a $0.40/h RTX 4090 in
    California goes through a $0.38/h cap because Quebec sells one at $0.36/h."""
    mock, cloud = vast_world()

    async def body() -> None:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="vast_1x_RTX4090",
            region="California, US",
            min_instances=1,
            max_hourly_spend=0.38,
        ) as ctx:
            for _ in range(3):
                await scan_once(ctx)
                mock.state.clock.advance(60)
            with ctx.store.session() as s:
                acts = fleet_repo.list_actions(s, limit=100)
                recorded = [(a.status, a.price_per_hour) for a in acts]
        assert vast_billed_rate(mock) <= 0.38, (
            f"the account pays ${vast_billed_rate(mock):.2f}/h against a $0.38/h cap; "
            f"actions {recorded}"
        )

    try:
        asyncio.run(body())
    finally:
        mock.stop()


def test_runpod_fleet_launches_a_type_sold_out_when_it_started_once_it_is_back(
    sqlite_url: str,
) -> None:
    """Before the fix: runPod's catalog lists only GPU types with stock now, and the controller
    learns the types (and so the default type's price) once per process: a type sold out at start-up
    is never launched again, and the pool stays under its minimum, silently, after stock comes
    back."""
    mock, cloud = runpod_world()
    a100 = "NVIDIA A100 80GB PCIe"
    stock = dict(mock.state.config.capacity[a100])
    mock.state.config.capacity[a100] = {dc: 0 for dc in stock}

    async def body() -> None:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type=f"SECURE:{a100}",
            region="US-TX-3",
            min_instances=1,
            max_hourly_spend=100,
        ) as ctx:
            await scan_once(ctx)  # sold out: nothing to launch now
            mock.state.config.capacity[a100] = stock  # back in stock
            errors = []
            for _ in range(10):
                mock.state.clock.advance(60)
                errors.append((await scan_once(ctx)).error)
        with mock.state.lock:
            pods = [p.name for p in mock.state.pods.values() if not p.deleted]
        assert pods, f"no pod launched in 10 min after the A100s came back (scan errors {errors})"

    try:
        asyncio.run(body())
    finally:
        mock.stop()


def test_vast_fleet_launches_a_type_sold_out_when_it_started_once_it_is_back(
    sqlite_url: str,
) -> None:
    """Before the fix: vast.ai's search lists only asks that can be rented now, and the controller
    learns the types once per process: a type whose every ask was rented at start-up is never
    launched again, and the pool stays under its minimum after an ask frees up."""
    mock, cloud = vast_world()
    mock.state.set_capacity(0, None, "A100", None)

    async def body() -> None:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="vast_1x_A100",
            region="Oregon, US",
            min_instances=1,
            max_hourly_spend=100,
        ) as ctx:
            await scan_once(ctx)  # every A100 ask is rented: nothing to launch now
            mock.state.set_capacity(2, None, "A100", None)
            errors = []
            for _ in range(10):
                mock.state.clock.advance(60)
                errors.append((await scan_once(ctx)).error)
        with mock.state.lock:
            live = [i.label for i in mock.state.instances.values() if not i.ended(mock.state.now())]
        assert live, f"no instance launched in 10 min after an A100 freed up (errors {errors})"

    try:
        asyncio.run(body())
    finally:
        mock.stop()


def test_runpod_pod_in_error_is_terminated_and_replaced(sqlite_url: str) -> None:
    """Before the fix: a RunPod pod in ERROR still bills (its `cost` stays > 0 until it is deleted),
    but the fleet counts it as a live member of its pool and never deletes nor replaces it: the
    account pays for a pod that does no work while the pool's one working instance is missing."""
    mock, cloud = runpod_world()

    async def body() -> None:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="SECURE:NVIDIA A40",
            region="EU-RO-1",
            min_instances=1,
            max_hourly_spend=100,
            action_cooldown_mins=5,
            confirmation_timeout_mins=5,
        ) as ctx:
            for _ in range(3):
                await scan_once(ctx)
                mock.state.clock.advance(60)
            with mock.state.lock:
                (broken,) = [p.id for p in mock.state.pods.values()]
            mock.state.make_error(broken)
            for _ in range(30):
                await scan_once(ctx)
                mock.state.clock.advance(60)
        with mock.state.lock:
            mock.state.step()
            pods = {p.id: (p.status, p.deleted) for p in mock.state.pods.values()}
            working = [p for p, (status, gone) in pods.items() if status == "RUNNING" and not gone]
        assert pods[broken][1] or working, (
            f"30 min after pod {broken} went to ERROR it still bills and nothing replaced it: "
            f"{pods}"
        )

    try:
        asyncio.run(body())
    finally:
        mock.stop()


class RentedFirst(httpx.AsyncHTTPTransport):
    """Loopback HTTP, except that the first ask the client tries to rent is rented by someone
    else just before its request arrives (Vast.ai's market moves between search and create)."""

    def __init__(self) -> None:
        super().__init__()
        self.mock: Any = None
        self.taken: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "PUT" and path.startswith("/api/v0/asks/") and not self.taken:
            ask = int(path.strip("/").split("/")[-1])
            self.taken.append(ask)
            self.mock.state.set_capacity(0, ask, None, None)
        return await super().handle_async_request(request)


def test_vast_fleet_launch_takes_the_next_ask_when_its_ask_is_taken(
    sqlite_url: str,
) -> None:
    """Before the fix: the fleet's Vast.ai launch rents only the cheapest matching ask: when another
    renter takes it between the search and the create (404 no_such_ask), the whole launch fails
    although a second ask of the same type in the same region is free, and the pool stays under its
    minimum until the action cooldown has passed."""
    rtx = {"nvml_name": "NVIDIA GeForce RTX 4090"}
    machines = [
        Machine(7_200_001, "RTX 4090", 1, "California, US", 0.40, **rtx),
        Machine(7_200_002, "RTX 4090", 1, "California, US", 0.40, **rtx),  # as cheap
    ]
    transport = RentedFirst()
    mock, cloud = vast_world(transport, machines=machines, boot_s=60)
    transport.mock = mock

    async def body() -> list[str]:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="vast_1x_RTX4090",
            region="California, US",
            min_instances=1,
            max_hourly_spend=100,
        ) as ctx:
            for _ in range(10):
                await scan_once(ctx)
                mock.state.clock.advance(60)
            with ctx.store.session() as s:
                return [f"{a.status}: {a.error_message}" for a in fleet_repo.list_actions(s)]

    try:
        history = asyncio.run(body())
    finally:
        mock.stop()
    with mock.state.lock:
        now = mock.state.now()
        live = [i.machine.ask_id for i in mock.state.instances.values() if not i.ended(now)]
    assert transport.taken == [7_200_001]
    assert live == [7_200_002], f"10 min with a free ask and no instance; actions {history}"


def runpod_billed_rate(mock: Any) -> float:
    """$/h the mock RunPod bills now: every pod not EXITED nor deleted, at its `cost`."""
    with mock.state.lock:
        mock.state.step()
        return sum(p.cost for p in mock.state.pods.values() if p.ended_at is None)


def test_runpod_fleet_checks_its_hourly_cap_against_the_price_of_now(
    sqlite_url: str,
) -> None:
    """Before the fix: the controller learns RunPod's prices once per process and checks its hourly
    cap against them: an hour later the A40 costs $0.59/h instead of $0.25/h, and the fleet replaces
    a lost pod at $0.59/h under a $0.50/h cap."""
    mock, cloud = runpod_world(price_drift=0.5, seed=0)  # A40 secure: $0.25 at hour 0, $0.59 at 1

    async def body() -> None:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="SECURE:NVIDIA A40",
            region="EU-RO-1",
            min_instances=1,
            max_hourly_spend=0.50,
        ) as ctx:
            for _ in range(7):  # the first pod, at $0.25/h, then an hour of scans
                await scan_once(ctx)
                mock.state.clock.advance(600)
            with mock.state.lock:
                (first,) = list(mock.state.pods)
            mock.state.preempt(first)  # the platform stops it: billing ends, the pool is short
            for _ in range(3):
                await scan_once(ctx)
                mock.state.clock.advance(60)
        assert runpod_billed_rate(mock) <= 0.50, (
            f"the account pays ${runpod_billed_rate(mock):.2f}/h against a $0.50/h cap"
        )

    try:
        asyncio.run(body())
    finally:
        mock.stop()


def test_runpod_pod_stuck_provisioning_is_terminated_and_replaced(sqlite_url: str) -> None:
    """Before the fix: runPod bills a pod from its creation, PROVISIONING included. A pod that never
    finishes booting counts as the fleet's booting member for ever: it fills the pool's minimum and
    holds back every launch, so the account pays for it indefinitely and no working pod ever
    comes."""
    mock, cloud = runpod_world()
    admin = {"Authorization": f"Bearer {mock.state.config.api_key}"}

    async def body() -> None:
        async with fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="SECURE:NVIDIA A40",
            region="EU-RO-1",
            min_instances=1,
            max_hourly_spend=100,
            action_cooldown_mins=5,
            confirmation_timeout_mins=5,
        ) as ctx:
            async with httpx.AsyncClient(base_url=mock.url, headers=admin) as http:
                (await http.post("/admin/faults", json={"never_boot": True})).raise_for_status()
                await scan_once(ctx)  # launches the pod that will never boot
                (await http.post("/admin/faults", json={})).raise_for_status()
            for _ in range(60):
                mock.state.clock.advance(60)
                await scan_once(ctx)
        with mock.state.lock:
            mock.state.step()
            pods = {p.id: (p.status, p.deleted) for p in mock.state.pods.values()}
        running = [p for p, (status, gone) in pods.items() if status == "RUNNING" and not gone]
        assert running, f"an hour on, the pool has no running pod (pods: {pods})"

    try:
        asyncio.run(body())
    finally:
        mock.stop()
