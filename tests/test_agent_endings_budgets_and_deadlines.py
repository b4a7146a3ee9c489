"""A second look at the agent renting compute: an instance whose terminate is accepted but which
stays listed live, or whose terminate is refused for ever with a changing reason; a RunPod pod id
longer than the store holds; a budget too small for an instance's boot reservation; an x402 run
past its deadline. On the in-process fake clouds of `cloud_fakes`, a loopback RunPod stand-in,
and the mock vendors and facilitator of `world` on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloud_fakes import (
    FakeCloud,
    cloud_vendor,
    make_deps,
    new_run,
    new_store,
    offer,
    tmp_url,
)
from procure.agent.cloud_sweeper import sweep
from procure.clouds.base import CloudError, Instance, LaunchSpec, ProviderError
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.settings import RunPodSettings
from procure.models import TERMINAL_RUN_STATUSES, PaymentStatus
from procure.store import cloud_repo, repo


def _observations(store, run_id: str) -> list[Any]:  # type: ignore[no-untyped-def]
    with store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    return list(state.observations)


async def _tick_until_ended_or(deps, run_id: str, ticks: int) -> str:  # type: ignore[no-untyped-def]
    """Tick `run_id` at most `ticks` times (stopping when it ends); its status."""
    from procure.agent.tick import tick

    for _ in range(ticks):
        await tick(deps, run_id)
        with deps.store.session() as s:
            run = repo.get_run(s, run_id)
        assert run is not None
        if run.status in TERMINAL_RUN_STATUSES:
            break
        await asyncio.sleep(0.01)
    return str(run.status)


# --- lead 1: a terminate accepted, the instance listed live for ever ------------------------


class StaysListed(FakeCloud):
    """Accepts every terminate (its node stops) but keeps listing the instance as active."""

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        out = await super().terminate(instance_ids)
        for iid in instance_ids:
            if iid in self.instances:
                self.instances[iid].status = "active"
        return out


def test_an_instance_listed_live_after_its_terminate_ends_the_run_saying_why(
    tmp_path: Path,
) -> None:
    """Before the fix: a provider that accepts the terminate but keeps listing the instance as
    live kept the run "Terminating" tick after tick for ever, with no word to the user (each
    tick reset the count of ticks without a way forward)."""
    cloud = StaysListed("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=0.3)
    deps.max_troubles = 5
    run_id = new_run(store, 100.0)
    status = asyncio.run(_tick_until_ended_or(deps, run_id, 400))
    assert status in TERMINAL_RUN_STATUSES, f"the run is still {status}"
    said = [o.content for o in _observations(store, run_id)]
    assert any("still lists it" in c for c in said), said[-5:]
    # The reservation stays counted (the instance may still bill) until someone books its bill.
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        (record,) = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    assert [p.status for p in state.payments] == [PaymentStatus.pending]
    assert record.status != "terminated"  # the sweeper's to terminate and book


def test_a_swept_instance_listed_live_for_ever_is_recorded_once(tmp_path: Path) -> None:
    """Before the fix: the sweeper terminates an instance no live run owns, books it and says
    so on its run; a provider that accepts the terminate but lists the instance on had it
    terminated and said again at every sweep (every 30 s), for ever: a row a sweep."""
    cloud = StaysListed("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=0.3)
    deps.max_troubles = 5
    run_id = new_run(store, 100.0)
    asyncio.run(_tick_until_ended_or(deps, run_id, 400))
    before = len(_observations(store, run_id))
    for _ in range(5):
        asyncio.run(sweep(deps))
    said = [o.content for o in _observations(store, run_id)[before:]]
    assert len(said) == 1, said
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    assert [p.status for p in state.payments] == [PaymentStatus.completed]


# --- lead 2: a terminate refused for ever with a changing reason --------------------------


class RefusesTerminate(FakeCloud):
    """Refuses every terminate with an error carrying a new request id each time."""

    ids = itertools.count(1)
    refusing = True

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        if not self.refusing:
            return await super().terminate(instance_ids)
        raise ProviderError(
            f"DELETE /pods: 503 Service Unavailable (request id r-{next(self.ids)})"
        )


def test_a_terminate_refused_for_ever_does_not_grow_the_store_every_tick(
    tmp_path: Path,
) -> None:
    """Before the fix: a terminate refused for ever, its error text changing each time (a
    request id in it), added an error observation every tick for ever: `trouble` says only
    identical repeats once, and giving up did nothing to an instance already ending."""
    cloud = RefusesTerminate("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=0.3)
    deps.max_troubles = 5
    run_id = new_run(store, 100.0)
    status = asyncio.run(_tick_until_ended_or(deps, run_id, 300))
    rows = len(_observations(store, run_id))
    assert status in TERMINAL_RUN_STATUSES, f"the run is still {status} with {rows} observations"
    said = [o.content for o in _observations(store, run_id)]
    assert any("may still be billing" in c for c in said), said[-5:]
    errors = [o.content for o in _observations(store, run_id) if o.type == "error"]
    assert len(errors) <= deps.max_troubles + 2, errors
    assert status == "completed"  # the job had finished on its node before it was ended
    # The sweeper takes the instance over: once the provider accepts its terminate, its bill is
    # booked in place of the reservation.
    cloud.refusing = False
    assert asyncio.run(sweep(deps))
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    assert [p.status for p in state.payments] == [PaymentStatus.completed]
    assert state.payments[0].amount == cloud.total_billed() > 0
    assert cloud.running() == []


# --- lead 3: a RunPod pod id longer than the store holds ------------------------------------

LONG_ID = "p" * 150  # RunPod's wire allowed up to 200 characters; the store keeps 100


class _LongIdRunPod(BaseHTTPRequestHandler):
    """createPod answers a pod whose id is 150 characters; a pod is found only by its full id
    (a cut id is a pod RunPod does not know: 404)."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _pod(self) -> dict[str, Any]:
        return {
            "id": LONG_ID,
            "name": "procure-job-x",
            "status": "RUNNING",
            "cloud": "SECURE",
            "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 1},
        }

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(201, self._pod())

    def do_GET(self) -> None:
        if self.path == f"/v2/pods/{LONG_ID}":
            self._send(200, self._pod())
        else:
            self._send(404, {"title": "Not Found", "status": 404, "detail": "pod not found"})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def long_id_runpod() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LongIdRunPod)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_runpod_pod_id_longer_than_the_store_holds_is_refused(long_id_runpod: str) -> None:
    """Before the fix: RunPod's wire took pod ids up to 200 characters while the agent stores
    the first 100; the stored id names no pod (404: "gone"), so the instance looked lost, $0
    was booked and the pod billed on, never terminated. The id is now refused at the wire."""
    settings = RunPodSettings(api_key="rpa_TEST", api_url=long_id_runpod)  # type: ignore[call-arg]
    client = RunPodCloud(settings)
    spec = LaunchSpec(
        name="procure-job-x", offer=offer("runpod", "SECURE:NVIDIA A100 80GB PCIe", 2.0)
    )

    async def scenario() -> tuple[Instance | None, Exception | None]:
        try:
            launched = await client.launch_spec(spec)
        except CloudError as exc:
            return None, exc
        stored = await client.get(launched.id[:100])  # what the agent would look up
        return stored, None

    try:
        stored, refused = asyncio.run(scenario())
    finally:
        asyncio.run(client.aclose())
    assert refused is not None, f"a {len(LONG_ID)}-character id was taken; stored id finds {stored}"
    assert "id" in str(refused)


# --- lead 4: a budget too small for the boot reservation ----------------------------------


def test_a_budget_too_small_for_the_boot_reservation_ends_the_run_at_once(
    tmp_path: Path,
) -> None:
    """Before the fix: an instance's intent reserves the boot timeout plus the reserve-ahead
    margin; a budget below that made every tick say "Not renting an instance" (an observation
    each), max_troubles times, and the run ended "failed: no way forward" instead of at once
    with the budget as its reason."""
    cloud = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    # $0.01 a second: the reservation is 600 + 4 seconds, $6.04; the work (0.01h) is $0.36.
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=600.0)
    run_id = new_run(store, 1.0, hours=0.01)
    status = asyncio.run(_tick_until_ended_or(deps, run_id, 3))
    with store.session() as s:
        run = repo.get_run(s, run_id)
    assert run is not None
    assert status == "failed", f"still {status} after 3 ticks"
    assert "budget" in (run.status_reason or ""), run.status_reason
    assert "no way forward" not in (run.status_reason or "")
    assert cloud.launches == 0


# --- lead 5: an x402 run past its deadline -----------------------------------------------


@pytest.fixture
def x402_world(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    """The mock vendors and facilitator on loopback; a whole job takes 4 seconds."""
    from world import start_world

    w = start_world(
        tmp_path,
        sqlite_url,
        job_seconds=4.0,
        settings_overrides={"PROCURE_FIRST_SLICE_FRACTION": 1.0},
    )
    yield w
    w.stop()


async def _in_slices(ctx: Any) -> Any:
    """A planner that buys gpu_vendor_2 in slices of 0.25 h, whatever the run."""
    from world import in_slices

    return in_slices(ctx, "gpu_vendor_2")


def test_an_x402_run_buys_nothing_after_its_deadline(x402_world: Any) -> None:
    """Before the fix: the cloud path stops at the run's deadline and ends the run `aborted`,
    but a run buying from x402 vendors went on paying slice after slice after its deadline had
    passed, to the end of the job: money spent on a run already late."""
    from world import drive as drive_x402

    run_id = x402_world.new_run(budget=5.0, gpu_type="H100")
    deadline = datetime.now(UTC) + timedelta(seconds=1.0)  # a quarter of the job's 4 seconds
    with x402_world.store.session() as s:
        repo.update_run(s, run_id, deadline=deadline)
    deps = x402_world.deps()
    deps.planner = _in_slices
    asyncio.run(drive_x402(deps, run_id))
    with x402_world.store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    late = [p for p in state.payments if p.created_at > deadline]
    assert late == [], (
        f"{len(late)} of {len(state.payments)} payments made after the deadline "
        f"(run {state.run.status}, {state.run.status_reason})"
    )
    assert state.run.status == "aborted"
    assert "deadline" in (state.run.status_reason or "")


def test_a_deadline_that_passes_while_a_slice_is_quoted_stops_its_payment(x402_world: Any) -> None:
    """Before the fix: the deadline was checked once per tick, before the next slice was quoted;
    one that passed while the vendor answered the quote (seen in the suite: 0.8 s) let the slice
    be paid anyway. It is checked again where the payment is written, under the run's lock."""
    from procure.models import utcnow
    from world import drive as drive_x402

    run_id = x402_world.new_run(budget=5.0, gpu_type="H100")
    with x402_world.store.session() as s:  # far off: the first slice is bought in time
        repo.update_run(s, run_id, deadline=datetime.now(UTC) + timedelta(hours=1))
    deps = x402_world.deps()
    deps.planner = _in_slices
    real_quote = deps.vendors.quote
    passed: list[datetime] = []

    async def deadline_passes_during_renewal_quotes(vendor, spec, *, job_id=None):  # type: ignore[no-untyped-def]
        quote = await real_quote(vendor, spec, job_id=job_id)
        if job_id is not None and not passed:  # the vendor takes its time over a renewal
            passed.append(utcnow())
            with x402_world.store.session() as s:
                repo.update_run(s, run_id, deadline=passed[0])
            await asyncio.sleep(0.05)
        return quote

    deps.vendors.quote = deadline_passes_during_renewal_quotes  # type: ignore[method-assign]
    asyncio.run(drive_x402(deps, run_id))
    with x402_world.store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None and passed, "no renewal was ever quoted"
    late = [p for p in state.payments if p.created_at > passed[0]]
    assert late == [], f"{len(late)} of {len(state.payments)} payments made after the deadline"
    assert state.run.status == "aborted"
    assert "deadline" in (state.run.status_reason or "")
