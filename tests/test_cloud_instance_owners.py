"""Every instance the agent launches has its owner, and the sweeper knows which are its own: two
procure installs on one cloud account never sweep each other's instances, a swept instance's bill
is booked even when it cannot be read at once, and so is a launch that landed after its job
ended."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cloud_fakes import FakeCloud, cloud_vendor, drive, make_deps, new_run, new_store, offer
from procure.agent.cloud_sweeper import sweep
from procure.clouds.base import ProviderError
from procure.models import PaymentStatus, utcnow
from procure.store import cloud_repo, repo


def _booked(store, run_id: str) -> int:  # type: ignore[no-untyped-def]
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    return sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)


def test_a_second_install_on_the_same_account_leaves_the_firsts_instances_alone(
    tmp_path: Path,
) -> None:
    """Before the fix: two procure installs (two stores) on one cloud account: each agent's sweeper
    takes every `procure-job-…` instance its own store does not know for an orphan, so the second
    install's sweeper terminates the first's live, paid-for instance mid-job (the gateway avoids
    this with a per-vendor label; the agent's names carry nothing of the install)."""
    shared = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=30.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store_a = new_store(f"sqlite:///{tmp_path / 'a' / 'p.db'}", [cloud_vendor("rp", "runpod", 10)])
    store_b = new_store(f"sqlite:///{tmp_path / 'b' / 'p.db'}", [cloud_vendor("rp", "runpod", 10)])
    deps_a = make_deps(store_a, {"runpod": shared})
    deps_b = make_deps(store_b, {"runpod": shared})
    run_a = new_run(store_a, 100.0)
    asyncio.run(drive(deps_a, run_a, until=lambda: bool(shared.running())))
    (mine,) = shared.running()

    swept = asyncio.run(sweep(deps_b))  # the other install's worker, on its own schedule

    assert swept == [], f"install B swept install A's live instance {swept}"
    assert shared.instances[mine.id].status != "terminated"


class _BillLater(FakeCloud):
    """A provider whose billing endpoint fails for a while (5xx) after a terminate."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.bill_failures = 0

    async def billed(self, instance_id: str) -> int | None:
        if self.bill_failures:
            self.bill_failures -= 1
            raise ProviderError("billing: 503")
        return await super().billed(instance_id)


def test_a_bill_unreadable_when_the_sweeper_terminates_is_booked_computed(tmp_path: Path) -> None:
    """Before the fix: the sweeper terminates an ended run's instance, then its bill read fails
    once: it gives up on it (`continue`) as if the terminate had failed, but the instance is gone
    from the next listing, so no later sweep comes back: the run's money is never booked (its
    payment stays pending for ever and the record says the instance still runs)."""
    cloud = _BillLater("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=30.0)
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0)
    asyncio.run(
        drive(deps, run_id, until=lambda: any(i.status == "active" for i in cloud.running()))
    )
    with store.session() as s:
        repo.update_run(s, run_id, status="failed")  # ended without ending its instance
    cloud.bill_failures = 1
    asyncio.run(sweep(deps))  # terminates it; the bill read fails
    assert cloud.running() == []
    asyncio.run(sweep(deps))  # and the next sweeps, with the billing endpoint back
    asyncio.run(sweep(deps))

    with store.session() as s:
        (inst,) = cloud_repo.instances_of_run(s, run_id)
    assert cloud.total_billed() > 0
    assert inst.status == "terminated", f"the record still says {inst.status}"
    assert _booked(store, run_id) == cloud.total_billed()


class LateLaunch(FakeCloud):
    """A launch whose answer is lost (a timeout) and that shows in the listing only later (the
    provider's list lags its launch queue): `land()` makes it appear."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.held: list[object] = []

    async def launch_spec(self, spec):  # type: ignore[no-untyped-def]
        self.held.append(spec)
        raise ProviderError("timed out")

    async def land(self) -> None:
        spec = self.held.pop(0)
        await FakeCloud.launch_spec(self, spec)  # type: ignore[arg-type]


def test_a_launch_that_lands_after_its_run_ended_is_swept_and_booked(
    tmp_path: Path,
) -> None:
    """Before the fix: a launch whose answer was lost, on a run cancelled before the instance shows
    in the listing, is ended as 'nothing launched' (booked $0); when the instance appears the
    sweeper terminates it but books nothing, because its record already says terminated: what the
    provider billed for it never reaches the run's books or the global caps."""
    cloud = LateLaunch("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=30.0)
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 500.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0)
    asyncio.run(drive(deps, run_id, until=lambda: bool(cloud.held)))
    with store.session() as s:
        repo.update_run(s, run_id, cancel_requested_at=utcnow())
    assert asyncio.run(drive(deps, run_id)) in ("cancelled", "aborted")
    asyncio.run(cloud.land())  # it was launched after all
    (late,) = cloud.running()

    deadline = time.monotonic() + 15  # it boots and bills a little before the next sweep
    while cloud.total_billed() == 0 and time.monotonic() < deadline:
        asyncio.run(cloud.get(late.id))
        time.sleep(0.02)
    assert asyncio.run(sweep(deps)) == [late.name]
    assert cloud.running() == []
    assert cloud.total_billed() > 0
    assert _booked(store, run_id) == cloud.total_billed()
