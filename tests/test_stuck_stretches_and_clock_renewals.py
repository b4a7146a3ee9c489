"""Third looks: a fleet launch flapping between booting and unhealthy is terminated (one
not-working stretch), an honest gateway job slower than planned is renewed to its end, and
migration 0013 counts the log lines of gateway jobs already under way."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta

import sqlalchemy as sa
from alembic import command

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.agent import slices
from procure.models import Job, JobStatus, utcnow
from procure.store import open_store
from procure.store.db import alembic_config, make_engine


def test_a_launch_flapping_booting_and_unhealthy_is_terminated(sqlite_url: str) -> None:
    """Before the fix: stuck.py now restarts an instance's clock at every status change: a fleet
    launch in a boot loop (the cloud shows it STARTING, then ERROR, then STARTING again: a crashing
    image) never stays long enough in either state and bills forever (before: booting ran from its
    launch)."""

    async def body() -> None:
        cloud = FakeCloud(boot_scans=10_000)  # the launch never comes up
        async with fleet(sqlite_url, cloud, min_instances=1, boot_timeout_mins=10) as ctx:
            await scan_for(ctx, 1)  # the fleet launches its minimum
            [launched] = [i for i in cloud.live() if i.name == cloud.launches[0]]
            for n in range(30):  # 90 minutes: 3 minutes booting, 3 minutes unhealthy, ...
                status = "unhealthy" if n % 2 else "booting"
                now = cloud.instances_[launched.id]
                if now.status != "terminated":
                    cloud.instances_[launched.id] = replace(now, status=status)
                await scan_for(ctx, 3)
            acts = [(a.action_type, a.status, a.reason) for a in all_actions(ctx)]
            assert launched.id in cloud.terminations, (
                f"a launch that never worked still billing after 90 minutes (deadline 10): {acts}"
            )

    asyncio.run(body())


def _job(slice_hours: float) -> Job:
    now = utcnow()
    return Job(
        _id="j",
        run_id="r",
        vendor_id="gateway",
        status=JobStatus.running,
        expected_cost=1,
        idempotency_key="k",
        job_params={"hours": 1.0},
        slice_hours=slice_hours,
        created_at=now,
        updated_at=now,
    )


def test_an_honest_gateway_job_slower_than_planned_is_renewed_to_its_end() -> None:
    """Before the fix: renewal_due renews by the gateway's clock only once the work reached the
    current slice's start: a job running at 80% of its planned speed falls a slice behind after ~5
    slices, the agent stops renewing, and the gateway ends it when its paid time runs out, half the
    job unbought and unrun (the very "stopped mid-slice" that c8fe0c2 fixed)."""
    job = _job(slice_hours=0.1)
    start = utcnow()
    paid = slices.next_slice_hours(job, 0.0)  # the first slice, paid at submit
    speed = 0.8  # of the plan: 1 GPU-hour of work takes 75 minutes
    for step in range(0, 2 * 3600, 10):  # the agent polls every 10 s, as the gateway runs
        now = start + timedelta(seconds=step)
        ends_at = start + timedelta(hours=paid)  # the gateway's paidUntil: wall time paid
        progress = min(1.0, speed * step / 3600)
        if progress >= 1.0 or now >= ends_at:
            # Paid time up: fair only once the whole job is bought (no more slices to buy).
            assert slices.next_slice_hours(job, paid) <= slices.EPS, (
                f"the gateway ended the job at {progress:.0%} of its work, paid {paid:.1f} of "
                f"its {slices.job_hours(job):.1f} h: the agent never bought the next slice"
            )
            break
        if slices.renewal_due(job, paid, progress, ends_at, now):
            paid += slices.next_slice_hours(job, paid)


def test_migration_0013_counts_the_lines_of_jobs_under_way(empty_db_url: str) -> None:
    """Checked sound (kept as a guard): 0013's backfill on real rows, both stores, and back."""
    open_store(empty_db_url).dispose()
    config = alembic_config(empty_db_url)
    command.downgrade(config, "0012")
    engine = make_engine(empty_db_url)
    now = utcnow()
    row = {
        "job_id": "j1", "key": "k1", "quote_id": "q", "gpu": "A100", "payer": "0xabc",
        "nonce": "n1", "params": "{}", "status": "running", "tried_regions": "[]",
        "logs": json.dumps(["a", "b", "c"]), "created_at": now, "updated_at": now,
    }  # fmt: skip
    try:
        with engine.begin() as c:
            c.execute(
                sa.text(
                    f"INSERT INTO gateway_jobs ({', '.join(row)}) "
                    f"VALUES ({', '.join(':' + k for k in row)})"
                ),
                row,
            )
        command.upgrade(config, "0013")
        with engine.begin() as c:
            total = c.execute(sa.text("SELECT logs_total FROM gateway_jobs")).scalar_one()
        assert total == 3
        command.downgrade(config, "0012")
        command.upgrade(config, "head")
    finally:
        engine.dispose()
