"""A job's status asked by idempotency key answers only the holder of the job's quote:
keys are the buyers' own choice and guessable, and the buyers' bearer is shared, so by key alone
anyone read another buyer's job (id, logs, checkpoint) and with its id could cancel it. procure's
own agent, recovering a job by key after dying between the payment and the submit's answer,
sends the job's quote id and still finds its job, at the gateway and at the mock vendor."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.agent import submit as agent_submit
from procure.gateway import book
from procure.vendors.client import VendorError
from test_gateway import SECRET as GATEWAY_SECRET
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
from world import SECRET, World, drive, start_world, state_of


class Killed(Exception):
    """The agent's process dying at a crash point (nothing after it runs)."""


def die_once_at_paid(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The agent dies the first time it reaches `paid`: the vendor took the money and answered,
    the agent recorded nothing of it. The points it died at."""
    died: list[str] = []

    def crash_point(name: str) -> None:
        if name == "paid" and not died:
            died.append(name)
            raise Killed(name)

    monkeypatch.setattr(agent_submit, "crash_point", crash_point)
    return died


@pytest.fixture
def gw(tmp_path: Path, sqlite_url: str) -> Iterator[GatewayWorld]:
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g
    g.stop()


def by_key(url: str, secret: str, key: str, quote_id: str | None = None) -> httpx.Response:
    """A job's status asked by key (and `quote_id` when given), with the buyers' bearer."""
    params = {"idempotencyKey": key, **({"quoteId": quote_id} if quote_id is not None else {})}
    headers = {"Authorization": f"Bearer {secret}"}
    return httpx.get(f"{url}/job-status", params=params, headers=headers, timeout=15)


def paid_job(gw: GatewayWorld, key: str) -> tuple[str, str]:
    """A job bought by hand with idempotency key `key`: its id and its quote's id."""
    q = quote(gw)
    first = submit(gw, key, q)
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], buyer(gw, key), nonce())
    paid = submit(gw, key, q, payment)
    assert paid.status_code == 200, paid.text
    return str(paid.json()["jobId"]), str(q["quoteId"])


# --- the gateway ---------------------------------------------------------------------------------


def test_a_status_by_key_answers_only_with_the_jobs_own_quote(gw: GatewayWorld) -> None:
    job_id, quote_id = paid_job(gw, "job-1")
    _, other_quote = paid_job(gw, "job-2")  # another buyer's own, valid quote
    for wrong in (None, "", other_quote, "q_0000000000000000", quote_id + "x", "q\x00"):
        seen = by_key(gw.url, GATEWAY_SECRET, "job-1", wrong)
        assert seen.status_code == 404 and job_id not in seen.text, (wrong, seen.text)
        # ... told exactly what an unknown key is told
        assert seen.json() == by_key(gw.url, GATEWAY_SECRET, "no-such-key", wrong).json()
    own = by_key(gw.url, GATEWAY_SECRET, "job-1", quote_id)
    assert own.status_code == 200 and own.json()["jobId"] == job_id
    # By its id (the buyer's own handle), as before.
    assert job_status(gw, job_id)["jobId"] == job_id
    wait_for(lambda: book.figures(gw.store)["jobs"] == {"completed": 2}, 60)
    wait_for(lambda: gw.live_pods() == [], 60)


def test_the_agent_recovers_its_gateway_job_by_key_after_dying_between_payment_and_answer(
    gw: GatewayWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    died = die_once_at_paid(monkeypatch)
    run_id = gw.world.new_run(budget=5.0, gpu_type="RTX4090", hours=1.0)
    with pytest.raises(Killed):
        asyncio.run(drive(gw.world.deps(), run_id, limit_s=90))
    assert died == ["paid"]
    [job] = state_of(gw.world, run_id).jobs
    assert job.vendor_job_id is None  # the gateway's answer died with the agent
    # Restarted, the agent asks the gateway by its key (and the job's quote): the job it paid for.
    messages = asyncio.run(drive(gw.world.deps(), run_id, limit_s=90))
    assert "Job started (reconciled)" in messages, messages
    state = state_of(gw.world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    [job] = state.jobs
    assert job.status == "completed"
    [payment] = state.payments
    assert payment.status == "completed" and payment.amount == gw.income()  # paid once
    with gw.store.session() as s:
        sold = book.job_by_key(s, job.idempotency_key)
        assert sold is not None and sold.job_id == job.vendor_job_id
    wait_for(lambda: book.figures(gw.store)["jobs"] == {"completed": 1}, 60)  # one job sold
    wait_for(lambda: gw.live_pods() == [], 60)


def test_the_agent_confirms_its_paid_gateway_job_by_key_after_a_lost_status_answer(
    gw: GatewayWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The payment found settled but the first status answer lost: the payment is booked and the
    job confirmed by key on the next tick (`confirm_started`)."""
    die_once_at_paid(monkeypatch)
    run_id = gw.world.new_run(budget=5.0, gpu_type="RTX4090", hours=1.0)
    with pytest.raises(Killed):
        asyncio.run(drive(gw.world.deps(), run_id, limit_s=90))
    deps = gw.world.deps()
    real_status = deps.vendors.status
    lost: list[dict[str, Any]] = []

    async def status_answer_lost_once(vendor: Any, **kwargs: Any) -> Any:
        if not lost:
            lost.append(kwargs)
            raise VendorError("job-status: ReadTimeout")
        return await real_status(vendor, **kwargs)

    deps.vendors.status = status_answer_lost_once  # type: ignore[method-assign]
    messages = asyncio.run(drive(deps, run_id, limit_s=90))
    assert messages[:2] == ["Payment settled; job state unknown", "Job started (reconciled)"]
    state = state_of(gw.world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    [payment] = state.payments
    assert payment.status == "completed" and payment.amount == gw.income()
    wait_for(lambda: book.figures(gw.store)["jobs"] == {"completed": 1}, 60)  # one job sold
    wait_for(lambda: gw.live_pods() == [], 60)


# --- the mock vendor -----------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url)
    yield w
    w.stop()


def test_the_mock_vendor_answers_a_status_by_key_only_with_the_jobs_quote(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    die_once_at_paid(monkeypatch)
    run_id = world.new_run()
    with pytest.raises(Killed):
        asyncio.run(drive(world.deps(), run_id))
    messages = asyncio.run(drive(world.deps(), run_id))
    assert "Job started (reconciled)" in messages, messages
    state = state_of(world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    [job] = state.jobs
    url = world.vendor_servers[job.vendor_id].url
    assert by_key(url, SECRET, job.idempotency_key).status_code == 404
    assert by_key(url, SECRET, job.idempotency_key, "q_not-its-quote").status_code == 404
    own = by_key(url, SECRET, job.idempotency_key, job.quote_id)
    assert own.status_code == 200 and own.json()["jobId"] == job.vendor_job_id
    assert world.stats(job.vendor_id)["started"] == 1
