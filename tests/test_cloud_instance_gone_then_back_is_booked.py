"""An instance the provider said it no longer knew (a 404 or `null` for an instance just created,
before its listing caught up) that turns out to run after all: the run had ended its job and
booked the bill it could read then; the sweeper terminates the instance once it shows, and books
what it billed beyond that, so the books end at what the provider billed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cloud_fakes import FakeCloud, cloud_vendor, drive, make_deps, new_run, new_store, offer
from procure.agent.cloud_sweeper import sweep
from procure.clouds.base import Instance
from procure.models import PaymentStatus
from procure.store import Store, cloud_repo, repo


class SlowToShow(FakeCloud):
    """Its first instance is unknown to every call (get: None; terminate: a no-op, as for one
    already gone) until `shown`: then it runs, billed, like any other."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.shown = False

    def _hidden(self, instance_id: str) -> bool:
        return not self.shown and instance_id == f"{self.provider}-1"

    async def get(self, instance_id: str) -> Instance | None:
        return None if self._hidden(instance_id) else await super().get(instance_id)

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        return await super().terminate([i for i in instance_ids if not self._hidden(i)])

    async def billed(self, instance_id: str) -> int | None:
        return 0 if self._hidden(instance_id) else await super().billed(instance_id)

    async def labelled(self) -> list[Instance]:
        found = [i for i in await super().labelled() if not self._hidden(i.id)]
        await asyncio.sleep(0)  # an answer over the network: another sweeper may run meanwhile
        return found


class SlowToShowOverHttp(SlowToShow):
    """Its terminate is a network call too: two sweepers may both be past their reads of the
    instance's record when either books."""

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        await asyncio.sleep(0)
        return await super().terminate(instance_ids)


def _booked(store: Store, run_id: str) -> int:
    with store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    return sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)


def _ended_as_gone(tmp_path: Path, cloud: SlowToShow) -> tuple[Store, str]:
    """A run whose first instance was said gone (its job ended, booked at $0) and that
    completed on a second; the first then shows, running, seen active."""
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 50.0)])
    run_id = new_run(store, 100.0, hours=0.01)
    assert asyncio.run(drive(make_deps(store, {"runpod": cloud}), run_id)) == "completed"
    with store.session() as s:
        first = cloud_repo.instances_of_run(s, run_id)[0]
    assert first.status == "terminated" and first.instance_id == "runpod-1"
    assert "gone" in (first.end_reason or "")
    cloud.shown = True  # it was there all along, and runs on until a sweeper ends it
    (late,) = cloud.running()
    asyncio.run(cloud.get(late.id))  # seen active by the provider's clock
    time.sleep(0.3)
    return store, run_id


OFFERS = [
    offer("runpod", "A100-dc1", 36.0, region="r1"),
    offer("runpod", "A100-dc2", 36.0, region="r2"),
]


def test_an_instance_said_gone_that_ran_on_is_booked_as_billed(tmp_path: Path) -> None:
    """Before the fix: the job on the instance said gone ends with its bill as read then ($0),
    its record `terminated` with that instance's id; when the instance shows and the sweeper
    terminates it, the record already names it, so neither the late-launch booking nor the
    pending one applies: all it billed is left out of the run's books."""
    cloud = SlowToShow("runpod", OFFERS, job_s=0.3)
    store, run_id = _ended_as_gone(tmp_path, cloud)
    deps = make_deps(store, {"runpod": cloud})
    (late,) = cloud.running()
    assert asyncio.run(sweep(deps)) == [late.name]
    assert cloud.running() == []
    billed = cloud.total_billed()
    assert cloud.bill(late) > 0
    assert _booked(store, run_id) == billed, (
        f"the provider billed {billed} micro-USD; the run's books say {_booked(store, run_id)}"
    )
    assert asyncio.run(sweep(deps)) == []  # booked once
    assert _booked(store, run_id) == billed


def test_an_instance_said_gone_swept_by_two_workers_is_booked_once(tmp_path: Path) -> None:
    """Before the fix (of the booking above, without its conditional claim): two workers that
    sweep the instance at once both read the record's booked bill before either books, and both
    book what it billed beyond it: the run is charged twice for it."""
    cloud = SlowToShowOverHttp("runpod", OFFERS, job_s=0.3)
    store, run_id = _ended_as_gone(tmp_path, cloud)
    worker_a, worker_b = make_deps(store, {"runpod": cloud}), make_deps(store, {"runpod": cloud})

    async def both() -> list[list[str]]:
        return list(await asyncio.gather(sweep(worker_a), sweep(worker_b)))

    assert sorted(len(names) for names in asyncio.run(both())) == [1, 1]  # both swept it
    assert cloud.running() == []
    billed = cloud.total_billed()
    assert _booked(store, run_id) == billed, (
        f"the provider billed {billed} micro-USD; the run was charged {_booked(store, run_id)}"
    )
