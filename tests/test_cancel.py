"""A user stops a run: over the API, from the CLI, and through a crash between the vendor's
cancel and its record. The job is cancelled at the vendor, no new payment starts, the run ends
`cancelled` with who and why, and ticking it afterwards changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.api.app import create_app
from procure.local import LocalServer, serve
from world import SECRET, World, drive, procure_cli, start_world, state_of

TOKEN = "cancel-test-token"
HELD_JOB_S = 3600.0
"""The vendors' jobs in `held_world`: far longer than any test, so that a job being cancelled
cannot end on its own first, however slowly a busy machine gets from its start to the cancel."""


def _patient_world(tmp_path: Path, db_url: str, job_seconds: float) -> World:
    """The `world` fixture's world, except that a vendor call may take long on a busy machine
    without being taken for a timeout (which would leave a payment in doubt for minutes)."""
    return start_world(
        tmp_path,
        db_url,
        vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0, "fail_at": 0.47}},
        job_seconds=job_seconds,
        settings_overrides={"VENDOR_TIMEOUT_S": 20.0},
    )


@pytest.fixture
def held_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """Jobs that run until cancelled (see HELD_JOB_S)."""
    w = _patient_world(tmp_path, db_url, HELD_JOB_S)
    yield w
    w.stop()


@pytest.fixture
def short_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """Jobs that end in well under a second, for a run that must finish."""
    w = _patient_world(tmp_path, db_url, 0.6)
    yield w
    w.stop()


@contextmanager
def _api_of(world: World) -> Iterator[httpx.Client]:
    settings = world.settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    server: LocalServer = serve(create_app(settings, world.store))
    try:
        yield httpx.Client(
            base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    finally:
        server.stop()


@pytest.fixture
def held_api(held_world: World) -> Iterator[httpx.Client]:
    with _api_of(held_world) as client:
        yield client


@pytest.fixture
def short_api(short_world: World) -> Iterator[httpx.Client]:
    with _api_of(short_world) as client:
        yield client


def _tick(world: World, run_id: str) -> str:
    async def once() -> str:
        deps = world.deps()
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    return asyncio.run(once())


def _vendor_view(world: World, vendor_id: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{world.vendor_servers[vendor_id].url}/job-status",
        params={"jobId": job_id},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    response.raise_for_status()
    return dict(response.json())


def _cli_env(world: World) -> dict[str, str]:
    """What a user's shell would hold to run `procure` against this world."""
    return {
        "PROCURE_DATABASE_URL": world.settings.database_url,
        "PROCURE_HOME": str(world.settings.home),
        "GPU_VENDOR_SECRET": SECRET,
        "X402_FACILITATOR_URL": world.settings.facilitator_url,
    }


def _start_job(world: World) -> tuple[str, str]:
    """A run whose job is running at vendor 2 (vendor 1 is made unavailable first). Ticks until
    the job is started: how many ticks that takes (a refusal by vendor 1, a slow answer)
    depends on the machine, not on what is tested."""
    world.faults("gpu_vendor_1", refuse_capacity=True)
    run_id = world.new_run(budget=5.0)
    messages = []
    deadline = time.monotonic() + 60
    while "Job started" not in messages[-1:]:
        assert time.monotonic() < deadline, messages
        messages.append(_tick(world, run_id))
    job = state_of(world, run_id).jobs[-1]
    assert job.status == "running" and job.vendor_job_id
    return run_id, job.vendor_job_id


def test_cancel_over_the_api_stops_the_job_and_ends_the_run(
    held_world: World, held_api: httpx.Client
) -> None:
    world, api = held_world, held_api
    run_id, vendor_job = _start_job(world)
    paid_before = [p.model_dump() for p in state_of(world, run_id).payments]

    answer = api.post(
        f"/api/runs/{run_id}/cancel", json={"requestedBy": "alice", "reason": "wrong dataset"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["run"]["status"] == "cancelled"
    assert _vendor_view(world, "gpu_vendor_2", vendor_job)["status"] == "cancelled"

    state = state_of(world, run_id)
    assert state.run.status == "cancelled"
    assert state.run.status_reason == "Cancelled by alice: wrong dataset"
    assert state.jobs[-1].status == "cancelled"
    texts = [o.content for o in state.observations]
    assert any("Cancel requested: cancelled by alice: wrong dataset" in t for t in texts)
    assert any(f"Job {vendor_job} cancelled at gpu_vendor_2" in t for t in texts)

    # Ticking a cancelled run changes nothing; cancelling again is fine.
    assert _tick(world, run_id) == "Run already cancelled"
    again = api.post(f"/api/runs/{run_id}/cancel")
    assert again.status_code == 200 and again.json()["run"]["status"] == "cancelled"
    after = state_of(world, run_id)
    assert [p.model_dump() for p in after.payments] == paid_before  # no new payment
    assert len(after.observations) == len(state.observations)  # nothing happened


def test_cancel_before_any_job_starts_nothing(held_world: World, held_api: httpx.Client) -> None:
    world, api = held_world, held_api
    run_id = world.new_run(budget=5.0)
    answer = api.post(f"/api/runs/{run_id}/cancel", json={"reason": "changed my mind"})
    assert answer.status_code == 200, answer.text
    state = state_of(world, run_id)
    assert state.run.status == "cancelled" and state.jobs == [] and state.payments == []
    assert state.run.status_reason == "Cancelled by api: changed my mind"


def test_cancel_answers_clearly_when_it_cannot(short_world: World, short_api: httpx.Client) -> None:
    world, api = short_world, short_api
    assert api.post("/api/runs/nope/cancel").status_code == 404
    run_id = world.new_run(budget=5.0)
    unauthenticated = httpx.post(f"{api.base_url}/api/runs/{run_id}/cancel")
    assert unauthenticated.status_code == 401
    assert api.post(f"/api/runs/{run_id}/cancel", json={"reason": ""}).status_code == 422
    assert api.post(f"/api/runs/{run_id}/cancel", json={"bogus": 1}).status_code == 422

    asyncio.run(drive(world.deps(), run_id, limit_s=120))
    assert state_of(world, run_id).run.status == "completed"
    finished = api.post(f"/api/runs/{run_id}/cancel")
    assert finished.status_code == 409
    assert finished.json()["error"] == (
        f"run {run_id} already completed: there is nothing to cancel"
    )


def test_cancel_is_carried_out_by_the_worker_holding_the_run(
    held_world: World, held_api: httpx.Client
) -> None:
    from procure.store import leases

    world, api = held_world, held_api
    run_id, vendor_job = _start_job(world)
    with world.store.session() as s:
        assert leases.acquire(s, run_id, "some-worker", 60)
    answer = api.post(f"/api/runs/{run_id}/cancel")
    assert answer.status_code == 202, answer.text
    assert answer.json()["run"]["cancelRequestedAt"] is not None
    assert _vendor_view(world, "gpu_vendor_2", vendor_job)["status"] == "running"

    with world.store.session() as s:  # the worker ticks it: the cancel is carried out
        leases.release(s, run_id, "some-worker")
    assert _tick(world, run_id) == "Run cancelled"
    assert _vendor_view(world, "gpu_vendor_2", vendor_job)["status"] == "cancelled"


@pytest.mark.timeout(400)  # a `procure` process takes half a minute to start on a busy machine
def test_a_crash_between_the_vendors_cancel_and_its_record(held_world: World) -> None:
    world = held_world
    run_id, vendor_job = _start_job(world)
    env = {**_cli_env(world), "PROCURE_CRASH_AT": "cancel_sent:1"}
    died = procure_cli("run", "cancel", run_id, "--reason", "budget cut", env=env)
    assert died.returncode == 137, (died.stdout, died.stderr)  # killed at the crash point
    # The vendor stopped the job; the store does not know yet.
    assert _vendor_view(world, "gpu_vendor_2", vendor_job)["status"] == "cancelled"
    state = state_of(world, run_id)
    assert state.run.status == "running" and state.run.cancel_requested_at is not None
    assert state.jobs[-1].status == "running"

    # The next tick (after the crashed CLI's short lease) asks again and records it.
    assert _tick_when_free(world, run_id) == "Run cancelled"
    state = state_of(world, run_id)
    assert state.run.status == "cancelled"
    assert state.run.status_reason is not None and "budget cut" in state.run.status_reason
    assert state.jobs[-1].status == "cancelled"
    assert len(state.payments) == 1


def _tick_when_free(world: World, run_id: str) -> str:
    from procure.store import leases

    with world.store.session() as s:  # the dead CLI's lease: free it as a supervisor would
        holder = leases.holder(s, run_id)
        if holder:
            leases.release(s, run_id, holder)
    return _tick(world, run_id)


# The cancel itself (request, vendor cancel, record) is the API's, tested on both stores above;
# what this adds is the command's wrapping, which no store changes: on PostgreSQL alone (SQLite's
# `procure run cancel`: test_cli_first_hour_errors), three `procure` processes fewer
@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.timeout(400)  # three `procure` processes
def test_cancel_from_the_cli(held_world: World) -> None:
    world = held_world
    run_id, vendor_job = _start_job(world)
    env = _cli_env(world)
    done = procure_cli("run", "cancel", run_id, env=env)
    assert done.returncode == 0, done.stderr
    assert f"run {run_id} cancelled" in done.stdout
    assert _vendor_view(world, "gpu_vendor_2", vendor_job)["status"] == "cancelled"
    again = procure_cli("run", "cancel", run_id, env=env)
    assert again.returncode == 0
    missing = procure_cli("run", "cancel", "nope", env=env)
    assert missing.returncode == 1 and "run nope not found" in missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
