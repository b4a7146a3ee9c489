"""The agent on rented cloud instances at the edges of money: an instance dearer than its offer,
a terminate refused for a while, a job that fails on its node, a bill that cannot be read, and
status reads failing; on the in-process fake clouds of `cloud_fakes`."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from cloud_fakes import (
    FakeCloud,
    FakeNodeClient,
    cloud_vendor,
    drive,
    make_deps,
    new_run,
    new_store,
    offer,
    tmp_url,
)
from procure.clouds.base import AuthError, Instance, LaunchSpec, ProviderError, RateLimited
from procure.models import PaymentStatus
from procure.store import repo


def _booked(deps, run_id):  # type: ignore[no-untyped-def]
    """The run's state and what it has booked as paid."""
    with deps.store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    return state, booked


class RepricedCloud(FakeCloud):
    """The instance comes up dearer than the offer read a moment before (a Vast.ai host's new
    ask, a RunPod pod placed on a dearer machine); the provider says so in the instance's price
    and bills that price."""

    factor = 100

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        dear = dataclasses.replace(
            spec.offer, price_per_hour=spec.offer.price_per_hour * self.factor
        )
        return await super().launch_spec(dataclasses.replace(spec, offer=dear))


def test_an_instance_dearer_than_its_offer_cannot_run_past_the_budget(tmp_path: Path) -> None:
    """Before the fix: the agent never reads the launched instance's own price: it reserves, stops
    and books by the offer's price, so an instance the provider prices 100x higher (far above the
    vendor's $10/h max price) runs on until the offer's arithmetic runs out: booked ~60x the
    budget."""
    runpod = RepricedCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=60.0, boot_s=0.5)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0)])
    deps = make_deps(store, {"runpod": runpod}, boot_timeout_s=2.0, reserve_ahead_s=2.0)
    run_id = new_run(store, 0.006, hours=0.001)  # $3.6/h offer: $0.006 buys 6 s
    asyncio.run(drive(deps, run_id))
    state, booked = _booked(deps, run_id)
    assert runpod.running() == []
    assert booked == runpod.total_billed()
    assert booked <= state.run.budget_total, (
        f"booked {booked} micro-USD on a budget of {state.run.budget_total}; the instance "
        f"cost {runpod.instances['runpod-1'].offer.price_per_hour} micro-USD/h"
    )


class SlowToTerminate(FakeCloud):
    """A provider without a billing endpoint (the agent computes its bill, as on Lambda) whose
    terminate is refused for a while (rate limited: Lambda allows about one request a second);
    it bills until it accepts the terminate, as every provider does."""

    refuse_s = 2.5
    _first: float | None = None

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        now = self.clock()
        self._first = now if self._first is None else self._first
        if now < self._first + self.refuse_s:
            raise RateLimited("429 too many requests")
        return await super().terminate(instance_ids)


def test_a_terminate_refused_for_a_while_is_booked_its_whole_bill(tmp_path: Path) -> None:
    """Before the fix: on a provider without a billing endpoint (Lambda) the bill is computed up to
    `ended_at`, set when the agent decided to end, not when the provider accepted the terminate:
    every second (Lambda: minute) the terminate was refused is billed but never booked."""
    cloud = SlowToTerminate(
        "lambda", [offer("lambda", "gpu_1x_a100", 360.0)], job_s=0.3, bills=False
    )
    store = new_store(tmp_url(tmp_path), [cloud_vendor("la", "lambda", 500.0)])
    deps = make_deps(store, {"lambda": cloud})
    run_id = new_run(store, 100.0, hours=0.01)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    _, booked = _booked(deps, run_id)
    assert cloud.running() == []
    second = 100_000  # $360/h for one second: timing noise a fixed agent may show
    assert booked >= cloud.total_billed() - second, (
        f"booked {booked} micro-USD, the provider billed {cloud.total_billed()}"
    )


class FailingNode(FakeNodeClient):
    """The user's job exits with an error as soon as it starts (a bug in the script)."""

    async def submit(self, **kwargs):  # type: ignore[no-untyped-def]
        view = await super().submit(**kwargs)
        assert self.node is not None
        job = self.node.jobs[view.id]
        job.status, job.ended_progress = "failed", 0.0
        return self._view(job)


def test_a_job_that_fails_on_its_node_ends_the_run(tmp_path: Path) -> None:
    """Before the fix: a job that fails on the node is ended with `fault=False` (nothing cooled,
    nothing learned) and the run plans again at once: the same offer is rented again, and again, a
    new billed instance every few ticks, with no limit and no end but the budget."""
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=2.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0)])
    deps = make_deps(store, {"runpod": runpod})
    deps.node_client = lambda url, token: FailingNode(runpod, url, token)  # type: ignore[assignment]
    run_id = new_run(store, 100.0)
    status = asyncio.run(drive(deps, run_id, timeout_s=20, until=lambda: runpod.launches >= 6))
    assert runpod.launches < 6, f"{runpod.launches} instances rented for one broken job"
    assert status == "failed"
    assert runpod.running() == []


class NoBillingAccess(FakeCloud):
    """An API key that may launch and terminate but not read billing (RunPod and Vast.ai keys
    can be restricted per endpoint): the billing endpoint answers 403 for good."""

    async def billed(self, instance_id: str) -> int | None:
        raise AuthError("403: this API key may not read billing")


def test_a_billing_endpoint_refused_for_good_ends_the_run_on_the_computed_bill(
    tmp_path: Path,
) -> None:
    """Before the fix: after the terminate is confirmed, a `billed` that fails for good (a key
    without billing access) is retried as passing trouble on every tick, forever: the job completed
    and the instance is gone, yet the run never ends (and gains an error observation every tick);
    `max_troubles` does not help, as `give_up` is a no-op once the instance is ending."""
    runpod = NoBillingAccess("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": runpod})
    deps.max_troubles = 3
    run_id = new_run(store, 100.0, hours=0.01)

    def refusals() -> int:
        with store.session() as s:
            state = repo.load_state(s, run_id)
        assert state is not None
        return sum("billing of" in o.content for o in state.observations)

    status = asyncio.run(drive(deps, run_id, until=lambda: refusals() >= 4 * deps.max_troubles))
    assert runpod.running() == []  # the instance is gone: only the booking is left to do
    assert status == "completed", f"run still {status} after {refusals()} refused billing reads"


class StatusDown(FakeCloud):
    """Once the job runs, the provider's status reads time out (a degraded API, a 429 storm)
    while its terminate still works and the instance runs on, billed."""

    async def get(self, instance_id: str) -> Instance | None:
        inst = self.instances.get(instance_id)
        if self.node_submits and inst is not None and inst.status != "terminated":
            await asyncio.sleep(0.25)  # the client's deadline, shortened
            raise ProviderError("GET /pods/{id}: RunPod gave no complete answer in time")
        return await super().get(instance_id)


def test_status_reads_failing_still_hold_the_instance_to_its_reservation(tmp_path: Path) -> None:
    """Before the fix: `poll` returns on a failed status read before `reserve`: the reservation is
    neither extended nor enforced, so the instance runs on unreserved for `max_troubles` ticks (30 x
    the client's 30 s deadline in production: 15 minutes) before it is given up; the run is booked
    past its budget although terminating it would have worked all along."""
    runpod = StatusDown("runpod", [offer("runpod", "A100-dc1", 360.0)], job_s=60.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 500.0)])
    deps = make_deps(store, {"runpod": runpod}, boot_timeout_s=1.0, reserve_ahead_s=2.0)
    run_id = new_run(store, 0.4, hours=0.001)  # $360/h: $0.40 buys 4 s
    asyncio.run(drive(deps, run_id))
    state, booked = _booked(deps, run_id)
    assert runpod.running() == []
    assert booked == runpod.total_billed() > 0
    assert booked <= state.run.budget_total, (
        f"booked {booked} micro-USD on a budget of {state.run.budget_total}"
    )
