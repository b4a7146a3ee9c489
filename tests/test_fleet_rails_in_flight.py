"""The fleet's rails hold for actions in flight and between controllers: a launch waiting to be
sent again counts against the caps, passes them again and is never sent by a dry run; a scan
that outlasts its lease sends nothing twice; two controllers post each Slack message once; a
node's absurd figures cannot stop the scans; a launch whose last answer was lost is looked for."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI

from procure.clouds.base import CloudError, Instance, InstanceType, ProviderError
from procure.fleet import actions, outbox
from procure.fleet.context import FleetContext
from procure.fleet.controller import scan_once
from procure.fleet.policy import PROVISION, Proposal
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.local import serve
from procure.models import utcnow
from procure.store import fleet_repo, open_store
from test_fleet_outbox import receiver

PRICE = 1_290_000  # micro-USD per hour


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class QuietCloud:
    """A cloud whose instances have no IP yet (no node is read, so the policy proposes
    nothing on its own): the test drives the actions."""

    instances_: dict[str, Instance] = field(default_factory=dict)
    launches: list[str] = field(default_factory=list)
    terminations: list[str] = field(default_factory=list)
    launch_errors: list[CloudError] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def add(self, name: str | None = None) -> str:
        instance_id = f"i-{next(self._ids):04d}"
        self.instances_[instance_id] = Instance(
            instance_id, name, "active", "gpu_1x_a100", "us-east-1", None, PRICE
        )
        return instance_id

    def live(self) -> list[Instance]:
        return [i for i in self.instances_.values() if i.status != "terminated"]

    async def instance_types(self) -> list[InstanceType]:
        return [InstanceType("gpu_1x_a100", "1x A100", 1, PRICE, ["us-east-1"])]

    async def instances(self) -> list[Instance]:
        return self.live()

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        if self.launch_errors:
            raise self.launch_errors.pop(0)
        self.launches.append(name)
        return [self.add(name)]

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        done = []
        for instance_id in instance_ids:
            instance = self.instances_.get(instance_id)
            if instance is None or instance.status == "terminated":
                continue
            self.terminations.append(instance_id)
            self.instances_[instance_id] = replace(instance, status="terminated")
            done.append(self.instances_[instance_id])
        return done

    async def aclose(self) -> None:
        return None


def context(db_url: str, cloud: QuietCloud, *, dry_run: bool, **overrides: Any) -> FleetContext:
    values: dict[str, Any] = {"scan_interval_s": 60, "min_instances": 0, "dry_run": dry_run}
    return FleetContext(
        store=open_store(db_url),
        cloud=cloud,  # type: ignore[arg-type]
        nodes=bounded_client(deadline_s=5),
        cfg=FleetSettings(**(values | overrides)),
        clock=Clock(),
        dry_run=dry_run,
        slack=True,
    )


def launch_proposal() -> Proposal:
    return Proposal(PROVISION, None, "pool saturated", "gpu_1x_a100", "us-east-1", PRICE, {})


async def close(ctx: FleetContext) -> None:
    """As the controller leaves (or a restart after kill -9 once its lease ran out)."""
    with ctx.store.session() as s:
        fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)
    await ctx.nodes.aclose()
    ctx.store.dispose()


def test_a_launch_in_flight_counts_against_the_hourly_spend_cap(sqlite_url: str) -> None:
    """Before the fix: the hourly spend rail sums only the instances already running, not the
    launches in flight (an `executing` action backing off after a 5xx): a second launch passes the
    rail, then the first one's retry launches too, and the fleet runs above its $/h cap."""

    async def body() -> None:
        cloud = QuietCloud()
        cloud.add()  # $1.29/h running
        ctx = context(sqlite_url, cloud, dry_run=False, max_hourly_spend=3.0)
        try:
            await scan_once(ctx)
            # Launch A meets provider trouble: it stays executing and is retried later.
            cloud.launch_errors.append(ProviderError("HTTP 503 from the cloud"))
            first, status = actions.record(ctx, launch_proposal())
            assert status == "approved"
            assert await actions.carry_out(ctx, first, None) == "executing"
            # Launch B, decided while A waits out its back-off: $1.29 + $1.29 <= $3.00.
            second, status = actions.record(ctx, launch_proposal())
            if status == "approved":
                await actions.carry_out(ctx, second, None)
            for _ in range(10):  # A's back-off ends; the controller retries it
                ctx.clock.advance(minutes=5)  # type: ignore[attr-defined]
                await scan_once(ctx)
            hourly = sum(i.price_per_hour for i in cloud.live()) / 1e6
            assert hourly <= 3.0, (
                f"the fleet runs ${hourly:.2f}/h against a $3.00/h cap (launches: {cloud.launches})"
            )
        finally:
            await close(ctx)

    asyncio.run(body())


def test_a_dry_run_never_sends_an_interrupted_action(sqlite_url: str) -> None:
    """Before the fix: a live controller died mid-launch (its action left `executing`); the operator
    restarts it in dry run (`procure fleet run` without --live) and the dry run launches a real,
    billed instance: carry_out skips the rails, dry run included, for an `executing` action."""

    async def body() -> None:
        cloud = QuietCloud()
        live = context(sqlite_url, cloud, dry_run=False)
        try:
            action_id, status = actions.record(live, launch_proposal())
            assert status == "approved"
            with live.store.session() as s:  # where a kill -9 after "executing" leaves it
                row = fleet_repo.get_action(s, action_id)
                assert row is not None
                fleet_repo.set_status(s, row, "executing", live.clock(), attempts=1)
        finally:
            await close(live)
        dry = context(sqlite_url, cloud, dry_run=True)
        try:
            await scan_once(dry)
            assert cloud.launches == [], "a dry run sent a launch to the cloud"
        finally:
            await close(dry)

    asyncio.run(body())


def test_a_retried_launch_passes_an_instance_cap_lowered_meanwhile(sqlite_url: str) -> None:
    """Before the fix: a launch backing off after a 5xx is retried without passing the rails again:
    the operator lowers LAMBDA_LABS_MAX_INSTANCES to the one instance already running and restarts
    the controller, and the retry still launches a second instance (the caps "always apply")."""

    async def body() -> None:
        cloud = QuietCloud()
        cloud.add()
        ctx = context(sqlite_url, cloud, dry_run=False, max_instances=3)
        try:
            await scan_once(ctx)
            cloud.launch_errors.append(ProviderError("HTTP 503 from the cloud"))
            action_id, status = actions.record(ctx, launch_proposal())
            assert status == "approved"
            assert await actions.carry_out(ctx, action_id, None) == "executing"
        finally:
            await close(ctx)
        # Restarted with a cap of one instance (it already runs one).
        lowered = context(sqlite_url, cloud, dry_run=False, max_instances=1)
        lowered.clock.advance(minutes=30)  # type: ignore[attr-defined]
        try:
            await scan_once(lowered)
            assert len(cloud.live()) <= 1, (
                f"{len(cloud.live())} instances run against a cap of 1 ({cloud.launches})"
            )
        finally:
            await close(lowered)

    asyncio.run(body())


@dataclass
class LostAnswerCloud(QuietCloud):
    """Every launch lands, but its answer is lost (a timeout): ambiguous, not a refusal."""

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        self.launches.append(name)
        self.add(name)
        raise ProviderError("no complete answer within 30s")


def test_a_launch_whose_last_answer_was_lost_is_found_by_name(
    sqlite_url: str,
) -> None:
    """Before the fix: on its last attempt a launch whose answer is lost (timeout: it may have
    landed) is marked failed and announced "❌ Action failed" without looking for its instance by
    name, while the instance it launched runs and bills: the audit trail says nothing was
    launched."""

    async def body() -> None:
        cloud = LostAnswerCloud()
        ctx = context(sqlite_url, cloud, dry_run=False, max_launch_attempts=1)
        try:
            await scan_once(ctx)
            action_id, status = actions.record(ctx, launch_proposal())
            assert status == "approved"
            await actions.carry_out(ctx, action_id, None)
            for _ in range(5):
                ctx.clock.advance(minutes=5)  # type: ignore[attr-defined]
                await scan_once(ctx)
            running = [i.id for i in cloud.live() if i.name == action_id]
            with ctx.store.session() as s:
                row = fleet_repo.get_action(s, action_id)
                assert row is not None
                status = row.status
            assert not (status == "failed" and running), (
                f"action {action_id} is {status} while its instance {running} runs"
            )
        finally:
            await close(ctx)

    asyncio.run(body())


def test_a_node_reporting_a_huge_figure_cannot_stop_the_scans(db_url: str) -> None:
    """Before the fix: a node's `/gpu-check` answering a finite but huge `memory_used_mb` (1e20)
    passes `nodes.figures` unclipped; storing the sample overflows the integer column, so every scan
    raises and the whole fleet stops acting for as long as that one node answers so."""
    app = FastAPI()

    @app.post("/gpu-check")
    async def gpu_check() -> dict[str, Any]:
        return {"gpus": [{"utilization_gpu_pct": 3, "memory_used_mb": 1e20}]}

    server = serve(app)

    async def body() -> None:
        cloud = QuietCloud()
        cloud.add()
        cloud.instances_["i-0001"] = replace(cloud.instances_["i-0001"], ip="127.0.0.1")
        ctx = context(db_url, cloud, dry_run=False, node_port=server.port)
        try:
            result = await scan_once(ctx)  # raises today: the fleet's loop logs and retries
            assert result.instances == 1
        finally:
            await close(ctx)

    try:
        asyncio.run(body())
    finally:
        server.stop()


def test_two_controllers_deliver_each_slack_message_once(sqlite_url: str) -> None:
    """Before the fix: `procure fleet run` starts its outbox deliverer whether or not it holds the
    fleet lease, and a deliverer posts what it read as due without claiming it first: two
    controllers on one store (the documented standby set-up) post every Slack message twice."""
    app, received = receiver([])  # a Slack-like webhook that answers 200 `ok`
    server = serve(app)

    async def body() -> None:
        store = open_store(sqlite_url)
        with store.session() as s:
            fleet_repo.enqueue(s, "slack", {"text": "✅ Executed: provision_instance"}, utcnow())
        first, second = bounded_client(deadline_s=5), bounded_client(deadline_s=5)
        url = f"{server.url}/hook"
        try:
            # Each controller's deliverer runs its pass (every second, in run_outbox).
            await asyncio.gather(
                outbox.deliver_slack(store, first, url), outbox.deliver_slack(store, second, url)
            )
            got = [m["text"] for m in received]
            assert got == ["✅ Executed: provision_instance"], f"Slack received {got}"
        finally:
            await first.aclose()
            await second.aclose()
            store.dispose()

    try:
        asyncio.run(body())
    finally:
        server.stop()


@dataclass
class SlowLaunchCloud(QuietCloud):
    """The first launch lands only when the test says so (a slow cloud, within its deadline)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        self.launches.append(name)
        if len(self.launches) == 1:
            self.entered.set()
            await self.gate.wait()
        return [self.add(name)]


def test_a_scan_outlasting_its_lease_launches_nothing_twice(
    sqlite_url: str,
) -> None:
    """Before the fix: the fleet lease is taken once at the start of a scan and never checked again:
    when a scan outlasts it (a slow cloud), a second controller takes the lease, sees the first's
    launch as an interrupted `executing` action not yet in the listing, and launches it again: two
    instances for one action, past the instance cap."""

    async def body() -> None:
        cloud = SlowLaunchCloud()
        one = context(sqlite_url, cloud, dry_run=False, lease_s=1.5, max_instances=1)
        two = context(sqlite_url, cloud, dry_run=False, lease_s=1.5, max_instances=1)
        try:
            await scan_once(one)  # controller one holds the lease
            action_id, status = actions.record(one, launch_proposal())
            assert status == "approved"
            launching = asyncio.create_task(actions.carry_out(one, action_id, None))
            await asyncio.wait_for(cloud.entered.wait(), 15)
            deadline = asyncio.get_running_loop().time() + 15
            while not (result := await scan_once(two)).leased:  # once one's lease runs out
                assert asyncio.get_running_loop().time() < deadline, "lease never ran out"
                await asyncio.sleep(0.1)
            cloud.gate.set()
            await launching
            assert cloud.launches == [action_id], (
                f"one action launched {len(cloud.launches)} times ({result.carried_out})"
            )
        finally:
            cloud.gate.set()
            await close(one)
            await close(two)

    asyncio.run(body())
