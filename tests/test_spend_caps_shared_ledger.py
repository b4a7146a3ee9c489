"""The one spend ledger and the global caps (PROCURE_MAX_SPEND_PER_*): cloud instances counted
over the time they run, launches in flight, SQLite's write lock, instances counted once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from procure.agent.cloud_run import instance_name
from procure.clouds.base import Instance, InstanceType
from procure.fleet import actions, rails
from procure.fleet.context import FleetContext
from procure.fleet.controller import sync_instances
from procure.fleet.policy import PROVISION, Proposal
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.models import JobSpec, usd_to_micros, utcnow
from procure.store import Store, cloud_repo, ledger, open_store, repo
from procure.store.cloud_tables import CloudInstanceRow
from procure.store.spend import spend_summary
from procure.store.tables import JobRow, PaymentRow

HOURLY_CAP = ledger.SpendCaps(per_hour=usd_to_micros(10))
FLEET_PRICE = usd_to_micros(8)  # the fleet's launches, per hour


def _job(s: Session, now: datetime, run_id: str, job_id: str, *, started: datetime) -> None:
    s.add(
        JobRow(
            id=job_id,
            run_id=run_id,
            vendor_id="v",
            status="running",
            expected_cost=usd_to_micros(80),
            job_params={},
            idempotency_key=f"job-{job_id}",
            created_at=started,
            updated_at=now,
        )
    )


def _cloud_payment(
    run_id: str, job_id: str, usd: float, status: str, hours: float, at: datetime, now: datetime
) -> PaymentRow:
    """A cloud job's one payment (nonce `cloud-…`), as the agent writes and grows it."""
    return PaymentRow(
        id=f"p{job_id}",
        run_id=run_id,
        job_id=job_id,
        vendor_id="lambda",
        amount=usd_to_micros(usd),
        currency="USDC",
        status=status,
        nonce=f"cloud-p{job_id}",
        hours=hours,
        created_at=at,
        updated_at=now,
    )


def _run_with_job(s: Session, now: datetime, job_id: str, *, started: datetime) -> str:
    run = repo.create_run(
        s, user_id="u", goal="g", budget_total=usd_to_micros(1000), job_spec=JobSpec()
    )
    _job(s, now, run.id, job_id, started=started)
    return run.id


def test_a_cloud_instance_running_for_hours_still_counts_in_the_hourly_cap(db_url: str) -> None:
    """Before the fix: a run's cloud job books its whole reservation as ONE pending payment created
    at launch and grown as it runs (cloud_money.reserve), but the ledger counts payments by
    `created_at`: once the instance has run an hour its $8/h stop counting in the last hour, so the
    $10/h cap lets another $9 through (and a second run's $8/h instance: $16/h under a $10/h
    cap)."""
    store = open_store(db_url)
    now = utcnow()
    started = now - timedelta(hours=3)
    try:
        with store.session() as s:
            run_id = _run_with_job(s, now, "cj1", started=started)
            # 3 h run at $8/h, reserved 15 min ahead: what reserve() leaves on the payment.
            s.add(_cloud_payment(run_id, "cj1", 26, "pending", 3.25, started, now))
            s.add(
                CloudInstanceRow(
                    name="procure-job-t-cj1",
                    run_id=run_id,
                    job_id="cj1",
                    vendor_id="lambda",
                    provider="lambda",
                    offer={},
                    instance_id="i-cloud",
                    status="running",
                    node_token="x",
                    launched_at=started,
                    active_at=started,
                    reserved_until=now + timedelta(minutes=15),
                    fault=0,
                    created_at=started,
                    updated_at=now,
                )
            )
        with store.session() as s:
            last_hour = spend_summary(s, now)["windows"]["hour"]
            conflict = ledger.global_cap_conflict(s, HOURLY_CAP, usd_to_micros(9), now=now)
        assert last_hour >= 8, f"`procure spend` says the last hour cost ${last_hour}"
        assert conflict is not None, "a $9 payment passed a $10/h cap beside a $8/h instance"
    finally:
        store.dispose()


def _a_run_pays(store: Store, run_id: str, amount: int) -> str:
    """What `submit.start_job` does to pay: write-lock the run, ask the global caps (as
    `agent.ledger.spend_cap_blocks` does), write the job and its pending payment. The outcome:
    `paid`, `capped`, or `locked` (the store made it wait: it did not pay then)."""
    now = utcnow()
    try:
        with store.session() as s:
            repo.update_run(s, run_id)
            if ledger.global_cap_conflict(s, HOURLY_CAP, amount, now=now) is not None:
                return "capped"
            job_id = repo.new_id()
            _job(s, now, run_id, job_id, started=now)
            s.add(
                PaymentRow(
                    id=repo.new_id(),
                    run_id=run_id,
                    job_id=job_id,
                    vendor_id="v",
                    amount=amount,
                    currency="USDC",
                    status="pending",
                    nonce=f"0x{repo.new_id():0>64}",
                    created_at=now,
                    updated_at=now,
                )
            )
    except OperationalError as exc:
        if "locked" not in str(exc):
            raise
        return "locked"
    return "paid"


@dataclass
class LaunchingCloud:
    """A cloud whose launch takes a moment, during which `during_launch` runs (a worker ticking
    a run meanwhile); each launch lands one $8/h instance named after its action."""

    during_launch: Callable[[], None] = lambda: None
    listed: list[Instance] = field(default_factory=list)

    async def instance_types(self) -> list[InstanceType]:
        return [InstanceType("gpu_1x_h100_pcie", "1x H100", 1, FLEET_PRICE, ["us-east-1"])]

    async def instances(self) -> list[Instance]:
        return list(self.listed)

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        self.during_launch()
        instance_id = f"i-{len(self.listed) + 1}"
        self.listed.append(
            Instance(instance_id, name, "booting", instance_type, region, None, FLEET_PRICE)
        )
        return [instance_id]

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        return []

    async def aclose(self) -> None:
        return None


def _fleet(db_url: str, cloud: LaunchingCloud) -> FleetContext:
    return FleetContext(
        store=open_store(db_url),
        cloud=cloud,  # type: ignore[arg-type]
        nodes=bounded_client(deadline_s=5),
        cfg=FleetSettings(scan_interval_s=60, min_instances=0, dry_run=False),
        caps=HOURLY_CAP,
        clock=utcnow,
        dry_run=False,
    )


async def _fleet_launches(ctx: FleetContext) -> str:
    """The controller decides one $8/h launch and carries it out; the action's status."""
    try:
        proposal = Proposal(
            PROVISION, None, "queue is long", "gpu_1x_h100_pcie", "us-east-1", FLEET_PRICE, {}
        )
        action_id, status = actions.record(ctx, proposal)
        assert status == "approved", status
        return await actions.carry_out(ctx, action_id, None)
    finally:
        await ctx.nodes.aclose()
        ctx.store.dispose()


def _last_hour(store: Store) -> int:
    with store.session() as s:
        return ledger.spent(s, "hour", now=utcnow())


def test_a_fleet_launch_in_flight_counts_against_a_run_s_cap_check(db_url: str) -> None:
    """Before the fix: the fleet counts its own launches in flight (action `executing`, instance not
    yet recorded) against the caps (rails.py), but the shared ledger the agent asks does not: a run
    that pays $5 while the fleet's $8/h launch call is under way passes the $10/h cap, and once the
    instance lands the last hour holds $13."""
    store = open_store(db_url)
    try:
        with store.session() as s:
            run_id = _run_with_job(s, utcnow(), "j0", started=utcnow())
        tried: list[str] = []
        cloud = LaunchingCloud(lambda: tried.append(_a_run_pays(store, run_id, usd_to_micros(5))))
        assert asyncio.run(_fleet_launches(_fleet(db_url, cloud))) == "executed"
        hour = _last_hour(store)
        assert hour <= usd_to_micros(10), (
            f"the last hour holds ${hour / 1e6:.2f} under a $10.00/h cap (the run: {tried})"
        )
    finally:
        store.dispose()


def test_on_sqlite_the_fleet_s_cap_check_holds_the_write_lock_until_it_records(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: on SQLite the ledger's fence is a no-op and the fleet reads the ledger before
    it holds the write lock (carry_out writes nothing before its rails), so a run can pay between
    the fleet's cap check and its `executing` record: $5 paid plus an $8/h launch under a $10/h cap.
    The run's attempt, overlapping the fleet's decision, must wait for it (here: give up locked)."""
    store = open_store(sqlite_url)
    # A worker in another process: its own connection, giving up after 1 s on a held lock.
    engine = create_engine(sqlite_url, connect_args={"timeout": 1})
    worker = Store(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
    real_check = rails.check
    tried: list[str] = []

    def check(*args: Any, **kwargs: Any) -> rails.Verdict:
        verdict = real_check(*args, **kwargs)
        if kwargs.get("approved") and not tried:  # carry_out's check, before `executing`
            tried.append(_a_run_pays(worker, run_id, usd_to_micros(5)))
        return verdict

    monkeypatch.setattr(rails, "check", check)
    try:
        with store.session() as s:
            run_id = _run_with_job(s, utcnow(), "j0", started=utcnow())
        status = asyncio.run(_fleet_launches(_fleet(sqlite_url, LaunchingCloud())))
        hour = _last_hour(store)
        assert hour <= usd_to_micros(10), (
            f"the last hour holds ${hour / 1e6:.2f} under a $10.00/h cap "
            f"(the run: {tried}, the fleet's launch: {status})"
        )
    finally:
        worker.dispose()
        store.dispose()


def test_an_agent_cloud_instance_is_counted_once_when_the_fleet_shares_the_account(
    db_url: str,
) -> None:
    """Before the fix: `procure serve --worker --fleet` with one LAMBDA_API_KEY: the fleet's scan
    records every instance of the account, the agent's own cloud-job instance (`procure-job-…`)
    included, so its hours count once as the run's payment and again as fleet instance-hours:
    `procure spend` says $32 for $16 of cloud time, and the caps refuse spend at half their
    level."""
    store = open_store(db_url)
    now = utcnow()
    started = now - timedelta(hours=2)
    try:
        with store.session() as s:
            run_id = _run_with_job(s, now, "cj2", started=started)
            job = repo.load_state(s, run_id, observations=False).jobs[0]  # type: ignore[union-attr]
            name = instance_name(job, cloud_repo.install_tag(s))
            # the 2 h the job ran at $8/h, booked as billed (cloud_money.book_end)
            s.add(_cloud_payment(run_id, "cj2", 16, "completed", 2.0, started, now))
        agents = Instance(
            "i-agent", name, "active", "gpu_1x_h100_pcie", "us-east-1", None, FLEET_PRICE
        )
        ctx = _fleet(db_url, LaunchingCloud())
        try:
            sync_instances(ctx, [agents], started)  # the fleet's scans while the job ran
            sync_instances(ctx, [], now)  # terminated: gone from the listing
        finally:
            asyncio.run(ctx.nodes.aclose())
            ctx.store.dispose()
        with store.session() as s:
            total = spend_summary(s, now)["total"]
        assert total == 16, f"`procure spend` says ${total} for $16.00 of cloud time"
    finally:
        store.dispose()
