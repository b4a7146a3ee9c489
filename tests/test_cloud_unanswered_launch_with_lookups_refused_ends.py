"""A launch left without an answer, on a provider that then refuses every lookup by name (a key
revoked, an account suspended), does not hold its run for ever: past the boot timeout the job
ends with nothing booked, as a launch never listed does (`cloud_launch.lookup`), so a cancel is
carried out and the run moves on; should the instance have landed after all, the sweeper
terminates it and books it as a late launch once the provider answers again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloud_fakes import FakeCloud, cloud_vendor, drive, make_deps, new_run, new_store, offer
from procure.agent.cloud_sweeper import sweep
from procure.clouds.base import AuthError, Instance, LaunchSpec, ProviderError
from procure.models import PaymentStatus, utcnow
from procure.store import cloud_repo, repo


class RevokedMidLaunch(FakeCloud):
    """The launch is made but its answer is lost (a timeout); from then on the key is refused
    for every call until `restored`."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.revoked = False

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        await super().launch_spec(spec)  # it lands
        self.revoked = True
        raise ProviderError("POST /pods: RunPod gave no complete answer in time")

    def _refused(self) -> None:
        if self.revoked:
            raise AuthError("GET /pods: RunPod refused the API key (401 denied)")

    async def find(self, name: str) -> list[Instance]:
        self._refused()
        return await super().find(name)

    async def labelled(self) -> list[Instance]:
        self._refused()
        return await super().labelled()

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        self._refused()
        return await super().terminate(instance_ids)


def test_a_cancel_ends_a_run_whose_unanswered_launch_cannot_be_looked_up(
    tmp_path: Path,
) -> None:
    """Before the fix: the instance record stays `launching` with its launch tried, and every
    tick asks the provider for it by name, refused; `give_up` does nothing for a `launching`
    record that already has an outcome, so neither `max_troubles` nor the user's cancel ever
    ends the run: it stays running, its reservation held, for as long as the key is refused."""
    cloud = RevokedMidLaunch("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=30.0)
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=0.5)
    deps.max_troubles = 3
    run_id = new_run(store, 100.0)
    asyncio.run(drive(deps, run_id, until=lambda: cloud.revoked))
    with store.session() as s:
        repo.update_run(s, run_id, cancel_requested_at=utcnow(), cancel_reason="not needed")
    status = asyncio.run(drive(deps, run_id, timeout_s=20))
    assert status == "cancelled"
    with store.session() as s:
        state = repo.load_state(s, run_id)
        (record,) = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    assert record.status == "terminated" and record.billed == 0
    assert not [p for p in state.payments if p.status == PaymentStatus.pending]

    # The key works again: the instance that landed is swept and booked as billed.
    cloud.revoked = False
    (landed,) = cloud.running()
    assert asyncio.run(sweep(deps)) == [landed.name]
    assert cloud.running() == []
    with store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    assert booked == cloud.total_billed() > 0
