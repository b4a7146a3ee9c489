"""The gateway from a buyer's and an operator's side: a launch whose answer was lost and that is
ended before it shows still counts against the operator's caps; another buyer's idempotency key
does not show its job; an id with a NUL is an unknown one on both stores, not a 500; an
instance's boot, first or replacing a lost one, is not taken from the buyer's paid time; a job no
region will launch waits before asking them all again."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.gateway import book
from procure.gateway import loop as gateway_loop
from procure.models import utcnow
from test_gateway import (
    TRAIN,
    GatewayWorld,
    buy,
    buyer,
    fault,
    job_status,
    quote,
    start_gateway_world,
    submit,
    wait_for,
)
from test_gateway_lost_launches_keys_and_quotes import _LostAnswerLaggingList
from test_gateway_renewal_floor_revivals_and_given_up_launches import _renew
from test_gateway_spend_and_instance_caps import gateway_db

__all__ = ["gateway_db"]  # the NUL test on SQLite and PostgreSQL, the gateway's book there too

TERMINAL = ("completed", "failed", "cancelled", "expired")
LONG = (sys.executable, TRAIN, "--steps", "4000", "--step-time", "0.05", "--checkpoint-every", "5")


@pytest.fixture
def started() -> Iterator[list[GatewayWorld]]:
    worlds: list[GatewayWorld] = []
    yield worlds
    for g in worlds:
        g.stop()


def _committed_instances(g: GatewayWorld) -> int:
    answer = httpx.get(f"{g.url}/gateway/status", headers=g.headers(), timeout=15)
    return int(answer.json()["committedInstances"])


# --- 1. a launch in doubt, ended before it shows -------------------------------------------------


def test_a_job_ended_while_its_launch_is_in_doubt_still_counts_its_pod_against_the_cap(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: a buyer cancelling its job while the launch's answer was lost (the pod
    made, the cloud's listing not showing it yet) had the launch marked terminated, found by
    name nowhere: it stopped counting against the caps while the pod billed on, and at a cap of
    one instance a second buyer was sold a second pod."""
    g = start_gateway_world(tmp_path, sqlite_url, command=LONG, max_total_instances=1)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _LostAnswerLaggingList(rt.cloud)
    job_id = buy(g, "cancelled-in-doubt", hours=10.0)
    wait_for(lambda: len(cloud.launches) == 1 and cloud.lookups >= 1, 60)
    assert len(g.live_pods()) == 1  # made, its answer lost, not listed
    httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
    wait_for(lambda: book.figures(g.store)["jobs"] == {"cancelled": 1}, 60)
    assert len(g.live_pods()) == 1  # still billing: the sweeper cannot see it yet
    refused = submit(g, "second-pod", quote(g))
    assert refused.status_code == 503 and "cap is 1" in refused.text, (
        f"sold a second instance beside one that bills, at a cap of one: {refused.text}"
    )
    cloud.lagging = False  # it shows at last: the sweeper terminates it, and it counts no more
    wait_for(lambda: g.live_pods() == [], 60)
    wait_for(lambda: _committed_instances(g) == 0, 60)
    with g.store.session() as s:
        [inst] = book.instances_of(s, job_id)
        assert inst.status == "terminated" and inst.instance_id is not None


# --- 2. a job's status by another buyer's idempotency key ----------------------------------------


def test_another_buyers_idempotency_key_does_not_show_its_job_status(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: a submit with another buyer's idempotency key is refused (its job is not
    handed over as a replay), but `GET /job-status?idempotencyKey=` with the shared bearer
    answered that buyer's job to anyone: its id, logs and checkpoint, and with the id the job
    could be cancelled (`POST /cancel-job`)."""
    g = start_gateway_world(tmp_path, sqlite_url, command=LONG)
    started.append(g)
    job_id = buy(g, "job-1", hours=10.0)
    # Another buyer, knowing only that buyers name their keys so, asks by the key.
    seen = httpx.get(
        f"{g.url}/job-status", params={"idempotencyKey": "job-1"}, headers=g.headers(), timeout=15
    )
    try:
        assert seen.status_code == 404 and job_id not in seen.text, seen.text
    finally:
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
        wait_for(lambda: g.live_pods() == [], 60)


# --- 3. ids with a NUL ---------------------------------------------------------------------------


def test_an_id_with_a_nul_is_unknown_on_both_stores_not_a_server_error(
    tmp_path: Path, gateway_db: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: on PostgreSQL (which cannot compare a NUL where SQLite can) a job id, an
    idempotency key or a quote's job id with a NUL from any buyer made the gateway answer 500
    with a database traceback in its log, where SQLite answered the id unknown."""
    g = start_gateway_world(tmp_path, gateway_db)
    started.append(g)
    q = quote(g)
    nul = "gw-0123\x00"
    asked = {
        "status by id": httpx.get(
            f"{g.url}/job-status", params={"jobId": nul}, headers=g.headers(), timeout=15
        ),
        "status by key": httpx.get(
            f"{g.url}/job-status", params={"idempotencyKey": nul}, headers=g.headers(), timeout=15
        ),
        "cancel": httpx.post(
            f"{g.url}/cancel-job", json={"jobId": nul}, headers=g.headers(), timeout=15
        ),
        "renew": httpx.post(
            f"{g.url}/renew-job",
            json={"jobId": nul, "quoteId": q["quoteId"]},
            headers=g.headers("renew-nul", q["quoteId"]),
            timeout=15,
        ),
        "quote for a job": httpx.post(
            f"{g.url}/quote",
            json={"gpuType": "RTX4090", "hours": 1.0, "jobId": nul},
            headers=g.headers(),
            timeout=15,
        ),
    }
    codes = {what: answer.status_code for what, answer in asked.items()}
    assert all(code < 500 for code in codes.values()), codes
    assert codes["status by id"] == codes["status by key"] == codes["cancel"] == 404, codes


# --- 4. the first boot is not the buyer's time ---------------------------------------------------


class _SlowBoot:
    """The mock RunPod, every pod but the `spared` shown booting while `holding` (a big image
    being pulled)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.holding, self.gets = inner, True, 0
        self.spared: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, instance_id: str) -> Any:
        got = await self.inner.get(instance_id)
        self.gets += 1
        held = self.holding and got is not None and instance_id not in self.spared
        return replace(got, status="booting") if held else got


def test_a_first_boot_longer_than_the_paid_time_still_gives_the_buyer_its_paid_time(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: the paid time of a job that had never run counted from its sale while
    its instance booted: an instance booting longer than the time sold (well within the boot
    timeout) failed the job, "the paid time ran out before an instance was ready": the buyer
    charged in full, nothing run, the operator's boot paid for nothing (and a renewal meanwhile
    was refused, "its paid time ran out")."""
    g = start_gateway_world(tmp_path, sqlite_url)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _SlowBoot(rt.cloud)
    job_id = buy(g, "slow-boot", hours=0.05)  # three seconds of paid time (an hour is 60 s)
    with g.store.session() as s:
        row = book.job(s, job_id)
        assert row is not None
        paid_s = row.paid_hours * g.cfg.hour_s
        assert paid_s == pytest.approx(3.0)
        sold_at = row.created_at
    # Booting on past the paid time, counted from the sale, and looked at there.
    wait_for(lambda: utcnow() > sold_at + timedelta(seconds=paid_s + 1), 60)
    seen = cloud.gets
    wait_for(lambda: cloud.gets >= seen + 2 or job_status(g, job_id)["status"] in TERMINAL, 60)
    # ... and its buyer may still buy more time: its paid time has not even started.
    q = quote(g, hours=0.05)
    renewed = _renew(g, job_id, q["quoteId"], "slow-boot-more", buyer(g, "slow-boot"))
    assert renewed.status_code == 200, renewed.text
    released = utcnow()
    cloud.holding = False
    done = wait_for(lambda: (s := job_status(g, job_id))["status"] in TERMINAL and s, 60)
    assert done["status"] == "completed", done
    with g.store.session() as s:
        row = book.job(s, job_id)
        assert row is not None and row.paid_until is not None
        # Its paid time counted from when it ran, as a job whose instance booted quickly.
        assert row.paid_until >= released + timedelta(seconds=2 * paid_s)
    wait_for(lambda: g.live_pods() == [], 60)


# --- 5. nor is a replacement's boot ---------------------------------------------------------------


def test_the_boot_of_an_instance_replacing_a_lost_one_is_not_taken_from_the_paid_time(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: a job's paid time, which starts only once its first instance has booted,
    ran on through the boot of the instance the gateway launched to replace one it lost: the
    buyer paid for the gateway's new boot (minutes on a real cloud) in time it never ran."""
    long_enough = (sys.executable, TRAIN, "--steps", "200", "--step-time", "0.05")
    g = start_gateway_world(tmp_path, sqlite_url, command=(*long_enough, "--checkpoint-every", "5"))
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _SlowBoot(rt.cloud)
    cloud.holding = False
    job_id = buy(g, "lost-once", hours=1.0)  # 60 s of paid time: it runs on through the test
    wait_for(lambda: job_status(g, job_id)["status"] == "running", 60)
    with g.store.session() as s:
        row = book.job(s, job_id)
        assert row is not None and row.paid_until is not None
        paid_until = row.paid_until
    [pod] = g.live_pods()
    cloud.spared, cloud.holding = {pod["id"]}, True  # the replacement boots slowly
    lost = httpx.post(
        f"{g.mock.url}/admin/instances/{pod['id']}/preempt",
        headers={"Authorization": f"Bearer {g.mock.api_key}"},
        timeout=15,
    )
    assert lost.status_code == 200, lost.text

    def replacement() -> Any:
        with g.store.session() as s:
            rows = book.instances_of(s, job_id)
        return len(rows) == 2 and rows[1].status == "booting" and rows[1]

    second = wait_for(replacement, 60)
    seen = cloud.gets
    wait_for(lambda: cloud.gets >= seen + 10, 60)  # a second of boot, at least
    released = utcnow()
    cloud.holding = False
    wait_for(lambda: job_status(g, job_id)["status"] == "running", 60)
    with g.store.session() as s:
        row = book.job(s, job_id)
        assert row is not None and row.paid_until is not None
        boot = released - second.launched_at
        assert row.paid_until >= paid_until + boot, (row.paid_until, paid_until, boot)
    httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
    wait_for(lambda: g.live_pods() == [], 60)


# --- 6. launches refused everywhere --------------------------------------------------------------


class _Launches:
    """The mock RunPod, counting its launch calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.launches = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def launch_spec(self, spec: Any) -> Any:
        self.launches += 1
        return await self.inner.launch_spec(spec)


def test_a_job_no_region_will_launch_waits_before_asking_every_region_again(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a paid job whose launch every region refused (the cloud listing capacity
    it would not give, as clouds do) was launched again every poll for its whole paid time: a
    launch call on the operator's account and a failed instance row in the book each time,
    about 1,350 an hour per job at the default poll on a three-region cloud."""
    g = start_gateway_world(tmp_path, sqlite_url)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _Launches(rt.cloud)
    steps = [0]
    step_all = gateway_loop.step_all

    async def counted(runtime: Any) -> None:
        steps[0] += 1
        await step_all(runtime)

    monkeypatch.setattr(gateway_loop, "step_all", counted)
    fault(g, endpoints=["create"], status=400)  # "no longer any instances available"
    job_id = buy(g, "refused-everywhere", hours=10.0)

    def tried() -> Any:
        with g.store.session() as s:
            rows = book.instances_of(s, job_id)
        # Every region asked and each refusal recorded (the last may still be in flight).
        done = all(r.status == "failed" for r in rows)
        return len({r.region for r in rows}) >= 3 and done and rows

    first = wait_for(tried, 60)
    assert all(r.status == "failed" and r.instance_id is None for r in first)
    after = steps[0]
    wait_for(lambda: steps[0] >= after + 30, 60)  # thirty polls on
    with g.store.session() as s:
        rows = book.instances_of(s, job_id)
    assert len(rows) <= len(first) + 1 and cloud.launches <= len(first) + 1, (
        f"{cloud.launches} launches, {len(rows)} rows: {[r.region for r in rows]}"
    )
    shown = job_status(g, job_id)
    assert shown["status"] == "queued" and any("again" in line for line in shown["logs"]), shown
    httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
    wait_for(lambda: job_status(g, job_id)["status"] == "cancelled", 60)
