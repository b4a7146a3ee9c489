"""The gateway: a node's log cannot claim a job done with a
non-finite progress; a launch whose answer was lost is never made again under its name while
the cloud's listing lags (two billed instances for one job); another buyer's idempotency key
never hands over its job; one buyer's quotes cannot lock the others out; a renewal booked after
its job ran out of paid time gives the time it paid for."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.gateway.serve as gateway_serve
from procure.clouds.base import CloudError, ProviderError
from procure.gateway import book, launches
from procure.gateway import loop as gateway_loop
from procure.models import usd_to_micros
from procure.payments.settlements import SettlementLookupError
from test_gateway import (
    TRAIN,
    GatewayWorld,
    buy,
    buyer,
    job_status,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)
from test_gateway_renewal_in_doubt import renew_in_doubt, run_out_of_paid_time, running_job
from test_unknown_settlement import FlakySettle, flaky_client, paid_out, pending

# --- a node's progress lines -----------------------------------------------------------------

CHECKPOINTS_AT_A_THIRD = """
import sys, time
print("PROCURE_PROGRESS 0.3", flush=True)
print("PROCURE_PROGRESS " + sys.argv[1], flush=True)
print("PROCURE_CHECKPOINT file:///nowhere/ck-1.json", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("claim", ["inf", "1e999"])
def test_a_non_finite_progress_line_does_not_make_a_checkpoint_look_complete(
    tmp_path: Path, sqlite_url: str, claim: str
) -> None:
    """Before the fix: the gateway read `PROCURE_PROGRESS inf` (or 1e999) from a node's log as
    1.0, so the checkpoint written after it, a third of the way in, was shown to the buyer as
    the whole job's (`checkpointProgress` 1.0): a buyer resuming elsewhere would skip two thirds
    of its work."""
    script = tmp_path / "third.py"
    script.write_text(CHECKPOINTS_AT_A_THIRD)
    g = start_gateway_world(tmp_path, sqlite_url, command=(sys.executable, str(script), claim))
    try:
        job_id = buy(g, "a-third")
        shown = wait_for(lambda: (s := job_status(g, job_id)).get("checkpointUrl") and s, 60)
        assert shown["checkpointProgress"] == pytest.approx(0.3), shown
        assert shown["status"] == "running" and shown["progress"] < 1.0, shown
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


# --- a launch whose answer was lost, the listing lagging ------------------------------------


class _LostAnswerLaggingList:
    """The mock RunPod, its first createPod's answer lost (the pod is made, the gateway hears a
    timeout) and that pod missing from its listing while `lagging` (as a provider's listing
    shows a launch a little after it was made)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.lagging, self.hidden = inner, True, set[str]()
        self.launches: list[str] = []
        self.lookups = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def launch_spec(self, spec: Any) -> Any:
        self.launches.append(spec.name)
        got = await self.inner.launch_spec(spec)
        if len(self.launches) == 1:
            self.hidden.add(got.id)
            raise ProviderError("createPod: read timed out")
        return got

    def _shown(self, found: list[Any]) -> list[Any]:
        return [i for i in found if not (self.lagging and i.id in self.hidden)]

    async def find(self, name: str) -> list[Any]:
        self.lookups += 1
        return self._shown(await self.inner.find(name))

    async def labelled(self) -> list[Any]:
        return self._shown(await self.inner.labelled())

    async def instances(self) -> list[Any]:
        return self._shown(await self.inner.instances())


@pytest.fixture
def lagging_gw(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[GatewayWorld, Any]]:
    g = start_gateway_world(tmp_path, sqlite_url)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _LostAnswerLaggingList(rt.cloud)
    yield g, cloud
    g.stop()


def test_a_launch_whose_answer_was_lost_is_not_made_again_while_the_listing_lags(
    lagging_gw: tuple[GatewayWorld, Any],
) -> None:
    """Before the fix: a createPod that timed out (the pod made) was looked up by name at the
    next poll; the cloud's listing did not show it yet, so the gateway launched again under the
    same name: two pods billing for one job, the first never terminated while the job lived
    (the sweeper spares every instance bearing a live job's name)."""
    g, cloud = lagging_gw
    job_id = buy(g, "lost-answer")
    # Several polls looked for it and saw nothing (or launched again).
    wait_for(lambda: cloud.lookups >= 5 or len(cloud.launches) > 1)
    assert len(cloud.launches) == 1 and len(g.pods()) == 1, cloud.launches
    cloud.lagging = False  # the listing catches up: the pod is adopted
    wait_for(lambda: job_status(g, job_id)["status"] == "completed", 60)
    wait_for(lambda: g.live_pods() == [], 60)
    assert len(g.pods()) == 1 and len(cloud.launches) == 1, cloud.launches


class _RefusedOnce:
    """The mock RunPod refusing the first createPod with a request to fix, not to retry (a 4xx
    naming what is wrong): nothing is made."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.launches, self.lookups = inner, list[str](), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def launch_spec(self, spec: Any) -> Any:
        self.launches.append(spec.name)
        if len(self.launches) == 1:
            raise CloudError("createPod 400: networkVolumeId nv-1 is not in this data center")
        return await self.inner.launch_spec(spec)

    async def find(self, name: str) -> list[Any]:
        self.lookups += 1
        return await self.inner.find(name)


def test_a_launch_refused_to_fix_moves_on_at_once(tmp_path: Path, sqlite_url: str) -> None:
    """Before the fix: a launch refused with an error that is not a provider's trouble (nothing
    made) was taken for one without an answer: looked up by name poll after poll for minutes
    before the job was launched elsewhere."""
    g = start_gateway_world(tmp_path, sqlite_url)
    try:
        rt = g.server.app.state.runtime
        rt.cloud = cloud = _RefusedOnce(rt.cloud)
        job_id = buy(g, "refused-once")
        wait_for(lambda: len(cloud.launches) >= 2, 60)
        assert cloud.lookups <= 1, f"{cloud.lookups} lookups of a launch that was refused"
        wait_for(lambda: job_status(g, job_id)["status"] == "completed", 60)
        wait_for(lambda: g.live_pods() == [], 60)
        assert len(g.pods()) == 1
    finally:
        g.stop()


def test_a_launch_never_listed_is_given_up_and_made_again_under_a_new_name(
    lagging_gw: tuple[GatewayWorld, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other half of the fix above: a launch that never shows by its name is given up after
    a while, and the job launched again under a new name (its own attempt), so a pod that lands
    after all is the sweeper's, not the job's."""
    g, cloud = lagging_gw
    monkeypatch.setattr(launches, "LAUNCH_LOOKUP_S", 0.5)
    job_id = buy(g, "never-listed")
    wait_for(lambda: job_status(g, job_id)["status"] == "completed", 60)
    assert len(cloud.launches) == 2 and len(set(cloud.launches)) == 2, cloud.launches
    cloud.lagging = False  # the first pod shows at last: no live job owns it, it is swept
    wait_for(lambda: g.live_pods() == [], 60)


# --- idempotency keys are a buyer's own --------------------------------------------------------


def test_another_buyers_idempotency_key_never_hands_over_its_job(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: idempotency keys were shared by every buyer: a second buyer whose key
    happened to be one a first buyer had used (its own quote, paying or not) was answered the
    first buyer's job (its id, logs and checkpoint, which the shared bearer can then cancel) as
    a replay, told its job was accepted and charged nothing."""
    job = (sys.executable, TRAIN, "--steps", "600", "--step-time", "0.05")
    g = start_gateway_world(tmp_path, sqlite_url, command=job)
    try:
        first = buyer(g, "first")
        q1 = quote(g)
        asked = submit(g, "job-1", q1)
        paid_header = signed_payment(g, asked.headers["PAYMENT-REQUIRED"], first, nonce())
        paid = submit(g, "job-1", q1, paid_header)
        assert paid.status_code == 200, paid.text
        job_id = paid.json()["jobId"]
        # A second buyer, its own quote, the same key: not the first buyer's job.
        second = buyer(g, "second")
        before = g.world.chain.balance_of(second.address)
        q2 = quote(g)
        unpaid = submit(g, "job-1", q2)
        assert unpaid.status_code == 409 and job_id not in unpaid.text, unpaid.text
        assert unpaid.headers.get("X-Idempotent-Replay") is None
        # ... nor when it pays (a header naming the second buyer): refused before money moves.
        asked2 = httpx.post(
            f"{g.url}/submit-job",
            json={"quoteId": q1["quoteId"], "jobParams": {"epochs": 2}},
            headers=g.headers("fresh-key", q1["quoteId"]),
            timeout=30,
        )
        assert asked2.status_code == 402, asked2.text
        theirs = signed_payment(g, asked2.headers["PAYMENT-REQUIRED"], second, nonce())
        stolen = submit(g, "job-1", q1, theirs)
        assert stolen.status_code == 409 and job_id not in stolen.text, stolen.text
        assert g.world.chain.balance_of(second.address) == before
        # The first buyer's own retries still answer its job, charging nothing more.
        again = submit(g, "job-1", q1)
        assert again.status_code == 200 and again.json()["jobId"] == job_id, again.text
        replay = submit(g, "job-1", q1, paid_header)
        assert replay.status_code == 200 and replay.json()["jobId"] == job_id, replay.text
        assert replay.headers.get("X-Idempotent-Replay") == "true"
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


# --- open quotes -----------------------------------------------------------------------------


def test_a_buyer_filling_the_open_quotes_does_not_lock_others_out(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: the open quotes' cap was one count shared by every buyer and a quote needs
    no payment, so one buyer asking for quotes in a loop filled it and every other buyer was
    refused (429) until its quotes expired (5 minutes each, for ever while it went on)."""
    g = start_gateway_world(tmp_path, sqlite_url, max_open_quotes=5)
    try:
        for _ in range(12):  # a hostile buyer, well past the cap
            quote(g)
        q = quote(g)  # another buyer is still quoted ...
        paid = buy_on(g, "after-the-flood", q)  # ... and can buy on it
        assert paid.status_code == 200, paid.text
        # The book of quotes stays bounded all the same.
        assert book.figures(g.store)["openQuotes"] <= 5
        httpx.post(f"{g.url}/cancel-job", json={"jobId": paid.json()["jobId"]}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


def buy_on(g: GatewayWorld, key: str, q: dict[str, Any]) -> httpx.Response:
    asked = submit(g, key, q)
    assert asked.status_code == 402, asked.text
    account = buyer(g, key)
    return submit(g, key, q, signed_payment(g, asked.headers["PAYMENT-REQUIRED"], account, nonce()))


# --- a renewal booked after its job ended ------------------------------------------------------


class _Ledger:
    """The facilitator's ledger, unreachable while `down`."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.down = inner, True

    async def lookup(self, payer: str, nonce: str) -> Any:
        if self.down:
            raise SettlementLookupError("facilitator unreachable")
        return await self.inner.lookup(payer, nonce)


def test_a_renewal_booked_after_its_job_expired_buys_the_time_it_paid_for(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a job whose renewal's settle answer was lost is held past its paid time
    only a while; with the facilitator's ledger unreachable through that hold, the job ended
    `expired`, and when the ledger came back showing the renewal paid it was booked on the
    ended job: the buyer's money taken, its paid hours grown, and no time given (no refund)."""
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    job = (
        sys.executable,
        TRAIN,
        "--steps",
        "2000",
        "--step-time",
        "0.05",
        "--checkpoint-every",
        "5",
    )
    g = start_gateway_world(tmp_path, sqlite_url, command=job)
    try:
        facilitator = clients[0]
        rt = g.server.app.state.runtime
        account = buyer(g, "renewer")
        job_id, q1 = running_job(g, account)
        wait_for(lambda: job_status(g, job_id).get("checkpointUrl"), 60)
        facilitator.mode = "held"  # the renewal's settle answer never comes
        rt.ledger = ledger = _Ledger(rt.ledger)  # ... and the ledger cannot say
        q2, _, _ = renew_in_doubt(g, job_id, account)
        monkeypatch.setattr(gateway_loop, "AUTH_WINDOW_S", 0.5)  # the hold is short here
        run_out_of_paid_time(g, job_id)
        wait_for(lambda: job_status(g, job_id)["status"] == "expired", 60)
        wait_for(lambda: g.live_pods() == [], 60)
        # The renewal had settled after all; the ledger answers again and it is booked.
        assert facilitator.release(g.world.facilitator.url) == 1
        ledger.down = False
        wait_for(lambda: pending(g) == [], 60)
        assert [t["value"] for t in paid_out(g)] == [
            usd_to_micros(q1["amount"]),
            usd_to_micros(q2["amount"]),
        ]
        # The time it paid for is given: the job runs again, from its last checkpoint.
        shown = wait_for(lambda: (s := job_status(g, job_id))["status"] == "running" and s, 60)
        assert shown["paidHours"] == pytest.approx(q1["hours"] + q2["hours"])
        assert any("resuming from" in line for line in shown["logs"]), shown["logs"]
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()
