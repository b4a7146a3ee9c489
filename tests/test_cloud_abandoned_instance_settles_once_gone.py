"""An instance whose job ended while it was still ending (its terminate accepted, but the
provider listing it `terminating` past a boot's time: `cloud_end.abandon`) is booked by the
sweeper once the provider says it is gone, though Lambda's listing of live instances never shows
it: its reservation does not stay pending for ever against the run's budget and the caps."""

from __future__ import annotations

import asyncio
import time

import pytest

from cloud_fakes import FakeCloud, cloud_vendor, make_deps, new_run, new_store, offer
from procure.agent.cloud_sweeper import sweep
from procure.agent.tick import tick
from procure.clouds.base import LABEL_PREFIX, Instance
from procure.models import PaymentStatus
from procure.store import cloud_repo, repo


class SlowToEnd(FakeCloud):
    """Lambda's ways: a terminate accepted leaves the instance `terminating` (not billed from
    then) until `finish`; its listing of live instances (`labelled`) leaves out terminating,
    terminated and preempted ones; it has no billing endpoint."""

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        out = []
        for iid in instance_ids:
            inst = self.instances.get(iid)
            if inst is None:
                continue
            if inst.ended_at is None:
                inst.ended_at, inst.status = self.clock(), "terminating"
                if inst.node:
                    inst.node.die(self.clock())
            out.append(self._view(inst))
        return out

    async def labelled(self) -> list[Instance]:
        gone = ("terminating", "terminated", "preempted")
        return [
            self._view(i)
            for i in self.instances.values()
            if i.name.startswith(LABEL_PREFIX) and i.status not in gone
        ]

    def finish(self, instance_id: str, *, forget: bool) -> None:
        """The terminate done: listed `terminated`, or (`forget`) no longer known at all."""
        self.instances[instance_id].status = "terminated"
        if forget:
            del self.instances[instance_id]


async def _until_abandoned(deps, run_id: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await tick(deps, run_id)
        with deps.store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        assert state is not None
        if state.jobs and state.jobs[0].status not in ("submitted", "running"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the job was never abandoned")


def _payments(store, run_id: str):  # type: ignore[no-untyped-def]
    with store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    return state


@pytest.mark.parametrize("forget", [False, True], ids=["listed-terminated", "forgotten"])
def test_an_abandoned_instance_is_booked_once_the_provider_says_it_is_gone(
    db_url: str, forget: bool
) -> None:
    """Before the fix: the job ended with the instance still `terminating`, its reservation
    pending "until the sweeper books it"; but the sweeper only looked at instances listed
    live, which on Lambda a terminating (then terminated, then forgotten) one never is: the
    payment stayed pending for ever, counted against the run's budget and the spend caps."""
    cloud = SlowToEnd("lambda", [offer("lambda", "gpu_1x_a100", 3600.0)], job_s=0.3, bills=False)
    cloud.bills_boot = False  # type: ignore[attr-defined]
    store = new_store(db_url, [cloud_vendor("la", "lambda", 5000.0)])
    deps = make_deps(store, {"lambda": cloud}, boot_timeout_s=0.3)
    deps.max_troubles = 3
    run_id = new_run(store, 1000.0, hours=0.01)
    asyncio.run(_until_abandoned(deps, run_id))
    with store.session() as s:
        (record,) = cloud_repo.instances_of_run(s, run_id)
    assert record.status == "terminating" and record.instance_id is not None
    (inst,) = cloud.instances.values()
    assert inst.status == "terminating"

    # Still ending: nothing is booked yet (it may bill on, as far as procure can tell).
    asyncio.run(sweep(deps))
    state = _payments(store, run_id)
    assert [p.status for p in state.payments] == [PaymentStatus.pending]

    cloud.finish(record.instance_id, forget=forget)
    asyncio.run(sweep(deps))
    state = _payments(store, run_id)
    assert not [p for p in state.payments if p.status == PaymentStatus.pending]
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    assert booked >= cloud.bill(inst) > 0  # the computed bill, erring high
    assert state.run.budget_remaining == state.run.budget_total - booked
    with store.session() as s:
        assert cloud_repo.get_instance(s, record.name).status == "terminated"  # type: ignore[union-attr]
    seen = "gone" if forget else "terminated"
    assert any(f"{seen}: no live run owns it; booked" in o.content for o in state.observations)

    # Booked once: a later sweep changes nothing.
    asyncio.run(sweep(deps))
    assert _payments(store, run_id).payments == state.payments
