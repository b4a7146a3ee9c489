"""A seller still settling a payment, at the edges: a slice replayed after its Retry-After, the
job's paid time running out meanwhile, the ledger asked during the wait, a completed payment's
words, a busy vendor before anything was signed. Each was a bug found in review."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.local as local
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from test_agent_payment_in_doubt import Wire, release, set_mode, sliced_run
from test_unknown_settlement import FlakySettle, agent_transfers, flaky_client, started
from world import drive, start_world, state_of


class StatusWire(Wire):
    """`Wire` that also keeps the job statuses the vendor reported."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.url.path != "/job-status":
            return response
        body = await response.aread()
        with contextlib.suppress(ValueError, AttributeError):
            self.statuses.append(str(json.loads(body).get("status")))
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Body(body), request=request
        )


class _Body(httpx.AsyncByteStream):
    """A body already read, to be read again (once) by the client."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


def test_last_renewal_settled_on_ask_again_is_not_bought_twice(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's LAST slice is answered 503 (settling); asked again after Retry-After it
    replays. The poll that got the replay must not buy that slice again: the job needs 1 h,
    four payments of 0.25 h, each paid once."""

    clients: list[FlakySettle] = []
    monkeypatch.setattr(local, "facilitator_client", flaky_client(clients))
    world = start_world(tmp_path, sqlite_url, job_seconds=6.0)
    wire = StatusWire()

    async def hold_last_renewal(request: httpx.Request) -> None:
        if request.url.path != "/renew-job":
            return
        key = request.headers.get("Idempotency-Key") or ""
        keys = list(dict.fromkeys(e.key for e in wire.log if e.path == "/renew-job"))
        if key not in keys and len(keys) == 2:  # the third (last) slice: its settle goes astray
            set_mode(clients, "held")
        elif any(e.status == 503 and e.key == key for e in wire.log) and any(
            c.held for c in clients
        ):
            await release(world, clients)  # settled before the agent asks again: a replay
            set_mode(clients, "ok")

    wire.before = hold_last_renewal
    try:
        run_id, deps, address = sliced_run(world, wire)
        asyncio.run(drive(deps, run_id))
        state = state_of(world, run_id)
        answers = [(e.key, e.status, e.replay) for e in wire.log if e.path == "/renew-job"]
        assert any(a[1] == 503 for a in answers), answers
        assert state.run.status == "completed", state.run.status_reason
        paid = agent_transfers(world, address)
        hours = sum(p.hours or 0 for p in state.payments if p.status == "completed")
        assert len(paid) == started(world) == 4, (answers, [p.hours for p in state.payments])
        assert hours == pytest.approx(1.0), [p.hours for p in state.payments]
    finally:
        world.stop()


class Shim(httpx.AsyncBaseTransport):
    """The agent's transport to the vendors, with `answer(request, forward)` deciding what each
    exchange gets; every exchange is logged as (sent, answered, path, signed, status)."""

    def __init__(self, answer: Any) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.answer = answer
        self.log: list[tuple[float, float, str, bool, int]] = []

    async def forward(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.time()
        response = await self.answer(request, self.forward)
        signed = bool(request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT"))
        self.log.append((sent, time.time(), request.url.path, signed, response.status_code))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def settling(retry_after: str) -> httpx.Response:
    body = httpx.ByteStream(b'{"error": "still being settled"}')
    return httpx.Response(503, headers={"Retry-After": retry_after}, stream=body)


def signed(request: httpx.Request) -> bool:
    return bool(request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT"))


def paid_then_settling(retry_after: str) -> Any:
    """A seller that takes the paid submit-job (the money moves, the job starts) yet answers it
    503 'still being settled' with `retry_after`."""

    async def answer(request: httpx.Request, forward: Any) -> httpx.Response:
        response = await forward(request)
        if request.url.path == "/submit-job" and signed(request) and response.status_code == 200:
            await response.aread()  # the job started and the money moved: the answer is lost
            await response.aclose()
            return settling(retry_after)
        return response

    return answer


def test_ledger_is_asked_while_the_seller_asks_for_time(tmp_path: Path, sqlite_url: str) -> None:
    """The seller asks for 600 s but the ledger already shows the payment used and the job
    runs: the agent should see that from the ledger (its own word on money), not leave the
    paid job unwatched until the authorisation runs out (~300 s)."""
    world = start_world(tmp_path, sqlite_url)
    shim = Shim(paid_then_settling("600"))
    run_id = world.new_run()
    deps = world.deps(vendor_transport=shim)

    async def scenario() -> list[str]:
        try:
            first = (await tick(deps, run_id)).message
            assert first.startswith("Payment in doubt"), first
            assert len(agent_transfers(world, deps.account.address)) == 1  # the money moved
            messages = [first]
            for _ in range(10):
                messages.append((await tick(deps, run_id)).message)
                if state_of(world, run_id).jobs[0].status != "submitted":
                    break
                await asyncio.sleep(0.2)
            return messages
        finally:
            await close_deps(deps)

    try:
        messages = asyncio.run(scenario())
        state = state_of(world, run_id)
        assert state.jobs[0].status == "running", messages
        assert state.payments[0].status == "completed", messages
    finally:
        world.stop()


def test_completed_payment_no_longer_says_it_is_being_settled(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Once the money is found moved, the payment is completed: the API/run page should not
    keep `errorMessage: being settled by ...` and `askAgainAt` on it."""
    world = start_world(tmp_path, sqlite_url)
    shim = Shim(paid_then_settling("1"))
    run_id = world.new_run()
    deps = world.deps(vendor_transport=shim)
    try:
        asyncio.run(drive(deps, run_id))
        state = state_of(world, run_id)
        assert state.run.status == "completed", state.run.status_reason
        [payment] = state.payments
        assert payment.status == "completed"
        shown = payment.to_json()
        assert "askAgainAt" in shown  # camelCase, as the other fields
        # kept: until then plus a grace its seller may not have booked it (the job is kept)
        assert shown["askAgainAt"] is not None, shown
        assert "being settled" not in (shown["errorMessage"] or ""), shown
    finally:
        world.stop()


def test_unsigned_503_with_retry_after_is_not_told_as_holding_our_payment(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A seller busy before any 402 (503 + Retry-After: 2, twice; nothing was ever signed):
    its Retry-After is honoured and no note says it holds our payment."""
    world = start_world(tmp_path, sqlite_url)
    busy = {"left": 2}

    async def answer(request: httpx.Request, forward: Any) -> httpx.Response:
        if request.url.path == "/submit-job" and not signed(request) and busy["left"]:
            busy["left"] -= 1
            return settling("2")
        return await forward(request)

    shim = Shim(answer)
    run_id = world.new_run()
    deps = world.deps(vendor_transport=shim)
    try:
        asyncio.run(drive(deps, run_id))
        state = state_of(world, run_id)
        assert state.run.status == "completed", state.run.status_reason
        problems = []
        claims = [o.content for o in state.observations if "cannot confirm yet" in o.content]
        if claims:  # nothing was signed: the seller holds no payment of ours
            problems.append(f"claimed held: {claims}")
        first_busy = next(e for e in shim.log if e[2] == "/submit-job" and e[4] == 503)
        again = next(e for e in shim.log if e[2] == "/submit-job" and e[0] >= first_busy[1])
        if again[0] < first_busy[1] + 2 - 1e-3:
            problems.append(f"asked again {again[0] - first_busy[1]:.2f} s after Retry-After: 2")
        assert problems == []
    finally:
        world.stop()


def test_renewal_in_doubt_when_paid_time_runs_out_is_not_paid_for_twice(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last slice's settle answer goes astray (the seller answers 503, then 409, with
    Retry-After) and the job reaches its paid limit meanwhile (the vendor reports it expired).
    The agent used to stop the job; the slice then settled and it bought the same hours again
    in a new job: 1.25 h paid for a 1 h job. Now the job is kept while its vendor settles the
    slice, which then runs it on: the hours are paid once."""
    from test_agent_payment_in_doubt import tick_until

    clients: list[FlakySettle] = []
    monkeypatch.setattr(local, "facilitator_client", flaky_client(clients))
    world = start_world(
        tmp_path,
        sqlite_url,
        job_seconds=4.0,
        vendor_overrides={"gpu_vendor_2": {"grace_seconds": 1.0}},
    )
    wire = StatusWire()

    async def hold_last_renewal(request: httpx.Request) -> None:
        if request.url.path != "/renew-job":
            return
        key = request.headers.get("Idempotency-Key") or ""
        keys = list(dict.fromkeys(e.key for e in wire.log if e.path == "/renew-job"))
        if key not in keys and len(keys) == 2:
            set_mode(clients, "held")

    wire.before = hold_last_renewal
    try:
        run_id, deps, address = sliced_run(world, wire)

        async def scenario() -> list[str]:
            try:
                messages = await tick_until(deps, run_id, lambda: "expired" in wire.statuses)
                [job] = state_of(world, run_id).jobs
                assert job.status == "running"  # kept: the slice in doubt may yet run it on
            except BaseException:
                await close_deps(deps)
                raise
            assert await release(world, clients) == 1  # the slice's money moves after all
            set_mode(clients, "ok")
            return messages + await drive(deps, run_id)

        messages = asyncio.run(scenario())
        state = state_of(world, run_id)
        assert state.run.status == "completed", state.run.status_reason
        hours = sum(p.hours or 0 for p in state.payments if p.status == "completed")
        paid = agent_transfers(world, address)
        assert hours == pytest.approx(1.0), (
            [(p.job_id[-4:], p.hours, p.status) for p in state.payments],
            [j.status for j in state.jobs],
            len(paid),
            messages[-12:],
        )
    finally:
        world.stop()
