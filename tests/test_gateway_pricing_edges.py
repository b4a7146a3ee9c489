"""procure's gateway never sells below its costs and never launches twice for one job: a price that
rose since the quote is refused before the money moves, a sale is at least the shortest sale
(the boot is paid from the margin), and the launch's records are written together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from procure.gateway import book, instances
from procure.models import usd_to_micros
from procure.store.gateway_tables import GatewayJobRow
from test_gateway import (
    GatewayWorld,
    buyer,
    job_status,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)


class _CommunityGone:
    """The mock RunPod, its cheap community offers withdrawable (sold out) on demand: the
    cheapest offer a quote was priced on is gone by the time the job launches."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.community = inner, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        found = await self.inner.offers(**kwargs)
        return [o for o in found if self.community or not o.offer_id.startswith("COMMUNITY")]


@pytest.fixture
def gw(tmp_path: Path, sqlite_url: str) -> Any:
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g
    g.stop()


def _pay(g: GatewayWorld, key: str, q: dict[str, Any], who: str) -> httpx.Response:
    first = submit(g, key, q)
    assert first.status_code == 402, first.text
    account = buyer(g, who)
    return submit(g, key, q, signed_payment(g, first.headers["PAYMENT-REQUIRED"], account, nonce()))


def test_a_paid_job_is_never_launched_on_an_offer_dearer_than_its_quote(gw: GatewayWorld) -> None:
    """Before the fix: the quote is priced on the cheapest offer (community, $0.34/h + 10 % =
    $0.374/h); when that offer is gone before launch, the loop launches on any dearer one ($0.69/h,
    secure) without comparing it with the quote: every paid hour then costs the gateway more than it
    was paid."""
    rt = gw.server.app.state.runtime
    rt.cloud = _CommunityGone(rt.cloud)
    q = quote(gw)
    assert q["pricePerHour"] == pytest.approx(0.374)
    rt.cloud.community = False  # sold out (or repriced) between the quote and the launch
    paid = _pay(gw, "dearer", q, "dearer")
    assert paid.status_code in (200, 409), paid.text
    if paid.status_code == 409:
        return  # refused before the money moved: what a fixed gateway may do
    launched = wait_for(gw.pods)
    sold = usd_to_micros(q["pricePerHour"])
    costs = [usd_to_micros(p["cost"]) for p in launched]
    assert all(c <= sold for c in costs), (
        f"launched at {costs} micro-USD/h for a job sold at {sold} micro-USD/h"
    )


def test_a_one_second_quote_is_sold_as_the_shortest_sale(tmp_path: Path, sqlite_url: str) -> None:
    """Before the fix: `sold_hours` sells at least one billing increment (a second on RunPod), but
    the paid time starts only once the instance has booted: the boot, never sold, is paid by the
    gateway, so a buyer of one-second jobs (104 micro-USD each) makes every sale a loss in the
    book."""
    # Real hours, as in production, and `procure gateway`'s shortest sale (10 minutes).
    g = start_gateway_world(tmp_path, sqlite_url, hour_s=3600.0, min_sale_s=600.0)
    try:
        q = quote(g, hours=1e-6)
        assert q["hours"] == pytest.approx(600 / 3600)  # sold at least the shortest sale
        paid = _pay(g, "tiny", q, "tiny")
        assert paid.status_code == 200, paid.text
        terminal = {"completed", "failed", "cancelled", "expired"}
        wait_for(lambda: set(book.figures(g.store)["jobs"]) <= terminal)
        wait_for(lambda: g.live_pods() == [] and book.figures(g.store)["liveInstances"] == 0)
        logs = job_status(g, paid.json()["jobId"])["logs"]
        if not any("job started on" in line for line in logs):
            pytest.skip("the mock instance booted slower than the paid second (a busy machine)")
        figures = book.figures(g.store)
        assert figures["instancesLaunched"] == 1
        assert figures["marginUsd"] >= 0, (
            f"sold for {figures['incomeUsd']} USD, the instance cost {figures['instanceCostUsd']}"
        )
    finally:
        g.stop()


def test_a_store_error_recording_the_launch_launches_no_second_instance(
    gw: GatewayWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: `_launched` records the instance `booting` and then, in a second transaction,
    the job `booting`. If that second write fails (a kill -9 between them, or SQLite's "database is
    locked"), the job is `launching` beside a `booting` instance: `_launch` only adopts an instance
    still `launching`, so it launches another, and the first keeps running (the sweeper spares it:
    its job is live) while the buyer pays for one."""
    real = instances.book.note
    failed: list[str] = []

    def flaky(row: Any, line: str, keep: int) -> None:
        # The job's write fails once, as the launch is recorded (after the cloud launched).
        if "launched in" in line and not failed:
            failed.append(row.job_id)
            raise OperationalError("UPDATE gateway_jobs", {}, Exception("database is locked"))
        real(row, line, keep)

    monkeypatch.setattr(instances.book, "note", flaky)
    q = quote(gw)
    paid = _pay(gw, "once", q, "once")
    assert paid.status_code == 200, paid.text
    job_id = paid.json()["jobId"]
    wait_for(lambda: job_status(gw, job_id)["status"] in ("completed", "failed"))
    assert failed == [job_id]
    assert len(gw.pods()) == 1, f"one paid job, {len(gw.pods())} instances: {gw.pods()}"


def _pay_resuming(g: GatewayWorld, key: str, who: str, checkpoint: str) -> httpx.Response:
    q = quote(g)
    first = submit(g, key, q, checkpointUrl=checkpoint)
    assert first.status_code == 402, first.text
    payment = signed_payment(g, first.headers["PAYMENT-REQUIRED"], buyer(g, who), nonce())
    return submit(g, key, q, payment, checkpointUrl=checkpoint)


def test_a_buyer_resumes_from_its_own_checkpoints_only(gw: GatewayWorld) -> None:
    """A checkpoint under the gateway's folder is another buyer's work when the job it belongs
    to was another buyer's: resuming from it is refused (the job starts over), while the buyer
    whose job wrote it resumes from it."""
    first = _pay(gw, "alice-1", quote(gw), "alice")
    assert first.status_code == 200, first.text
    job_id = first.json()["jobId"]
    done = wait_for(lambda: (s := job_status(gw, job_id))["status"] == "completed" and s)
    checkpoint = done["checkpointUrl"]
    assert checkpoint and job_id in checkpoint

    stranger = _pay_resuming(gw, "mallory-1", "mallory", checkpoint)
    owner = _pay_resuming(gw, "alice-2", "alice", checkpoint)
    assert stranger.status_code == owner.status_code == 200, (stranger.text, owner.text)
    with gw.store.session() as s:
        theirs = s.get(GatewayJobRow, stranger.json()["jobId"])
        mine = s.get(GatewayJobRow, owner.json()["jobId"])
        assert theirs is not None and mine is not None
        assert theirs.resume_from is None
        assert mine.resume_from == checkpoint
