"""The agent renting cloud instances: a launch whose answer was lost is looked up, never repeated
under its name, and its orphan's bill booked; a node's huge log cursor; a job done when the budget
or the deadline runs out completes the run, and no instance is rented past the deadline. On the
in-process fake clouds of `cloud_fakes` and, for the node, a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
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
    FakeInstance,
    cloud_vendor,
    drive,
    make_deps,
    new_run,
    new_store,
    offer,
    tmp_url,
)
from procure.clouds.base import CloudError, Instance, LaunchSpec, ProviderError
from procure.models import JobStatus, PaymentStatus
from procure.store import cloud_repo, repo


def _booked(store, run_id: str) -> int:  # type: ignore[no-untyped-def]
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    return sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)


class LaggingLaunch(FakeCloud):
    """The first launch creates the instance but its answer is lost (a timeout), and the
    provider's listing shows it only `lag_s` later (its list lags its launch queue); later
    launches answer at once."""

    lag_s = 0.6

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_until: dict[str, float] = {}

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        first = self.launches == 0
        made = await super().launch_spec(spec)
        if first:
            self.hidden_until[made.id] = self.clock() + self.lag_s
            raise ProviderError("POST /pods: no complete answer in time")
        return made

    def _shown(self, inst: FakeInstance) -> bool:
        return self.clock() >= self.hidden_until.get(inst.id, 0.0)

    async def find(self, name: str) -> list[Instance]:
        return [i for i in await super().find(name) if self._shown(self.instances[i.id])]

    async def labelled(self) -> list[Instance]:
        return [i for i in await super().labelled() if self._shown(self.instances[i.id])]


def test_a_launch_without_an_answer_that_lists_late_is_not_launched_again(
    tmp_path: Path,
) -> None:
    """Before the fix: a launch whose answer was lost is looked up by name on the next tick and,
    when the provider's listing does not show it yet, launched again under the same name: two
    instances billed for one job; the first is never found again and runs on, billed, after the
    run completed."""
    cloud = LaggingLaunch("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.5)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    names = [i.name for i in cloud.instances.values()]
    assert cloud.launches == 1, f"{cloud.launches} instances launched for one job: {names}"
    assert cloud.running() == []
    assert _booked(store, run_id) == cloud.total_billed() > 0


class NeverListed(LaggingLaunch):
    """The lost launch never shows in the listing (it did not happen, or lags past any
    deadline); later launches answer at once."""

    lag_s = 1e9


def test_a_launch_without_an_answer_never_listed_moves_on_without_a_second_instance(
    tmp_path: Path,
) -> None:
    """Before the fix: a launch whose answer was lost and that never shows by its name was
    launched again under the same name (two instances, one name, for one job). Fixed, it is
    looked up for a while and then given up (nothing booked for it): the run goes on with a new
    job under a new name, and completes."""
    cloud = NeverListed("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=0.5)
    deps.cooldown_s = 0.0  # one offer only: the run may rent it again at once
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    with store.session() as s:
        records = cloud_repo.instances_of_run(s, run_id)
    assert len({r.name for r in records}) == len(records) == 2
    assert records[0].instance_id is None and records[0].billed == 0
    assert cloud.launches == 2  # one per job, each under its own name
    assert len({i.name for i in cloud.instances.values()}) == 2


class RefusedLaunch(FakeCloud):
    """Every launch is refused the way a provider refuses a request to fix, not to retry
    (Lambda's 404 for an SSH key the account lacks, RunPod's 422): nothing is created."""

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        raise CloudError("POST /instance-operations/launch: Specified SSH key 'procure' not found")


def test_a_launch_the_provider_refuses_to_fix_ends_at_once_with_its_reason(
    tmp_path: Path,
) -> None:
    """Before the fix: a launch refused with a plain error (nothing launched, nothing to retry)
    was taken for one without an answer: looked up by name for minutes, then ended as "got no
    answer and it never showed", the provider's reason lost. Now it ends at once with that
    reason, and the run goes on at the next provider."""
    refusing = RefusedLaunch("lambda", [offer("lambda", "A100-l", 1.0)], bills=False)
    fine = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.3)
    store = new_store(
        tmp_url(tmp_path),
        [cloud_vendor("la", "lambda", 50.0), cloud_vendor("rp", "runpod", 50.0)],
    )
    deps = make_deps(store, {"lambda": refusing, "runpod": fine}, boot_timeout_s=600.0)
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    refused = [j for j in state.jobs if j.vendor_id == "la"]
    assert refused and all(j.status == JobStatus.failed for j in refused)
    assert all("SSH key 'procure' not found" in (j.error_message or "") for j in refused)
    assert fine.launches == 1


# --- a GPU node answering garbage --------------------------------------------------------


class _HostileNode(BaseHTTPRequestHandler):
    """A node's job runner that answers a log cursor no store column can hold."""

    cursor: int = 10**20

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._send({"id": "job-1", "status": "running", "progress": 0.1})

    def do_GET(self) -> None:
        if self.path.startswith("/jobs/job-1/logs"):
            self._send({"lines": [{"seq": 1, "text": "epoch 1"}], "next": self.cursor})
        else:
            self._send({"id": "job-1", "status": "running", "progress": 0.1})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hostile_node() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileNode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class LoopbackNodeCloud(FakeCloud):
    """Its instances' node is the server on loopback `port`."""

    port = 0

    def _view(self, inst: FakeInstance) -> Instance:
        seen = super()._view(inst)
        url = f"http://127.0.0.1:{self.port}" if seen.node_url else None
        return dataclasses.replace(seen, ip="127.0.0.1", node_url=url)


def test_a_node_answering_a_huge_log_cursor_does_not_crash_the_tick(
    tmp_path: Path, hostile_node: int
) -> None:
    """Before the fix: the node's log cursor is taken as any int at least the last one, and
    written to the job's integer column: a cursor past what the store holds raises in every
    tick of the run (the worker logs a tick error and tries again), so the job never ends and
    its instance stays billed until the budget runs out."""
    cloud = LoopbackNodeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=60.0)
    cloud.port = hostile_node
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud})
    deps.node_client = None  # the real HTTP node client
    deps.max_troubles = 3
    run_id = new_run(store, 100.0)

    def first_job_ended() -> bool:
        with store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        assert state is not None
        return bool(state.jobs) and state.jobs[0].status == JobStatus.failed

    asyncio.run(drive(deps, run_id, until=first_job_ended))
    first = cloud.instances["runpod-1"]
    assert first.status == "terminated"
    with store.session() as s:
        (record, *_) = cloud_repo.instances_of_run(s, run_id)
    assert record.status == "terminated" and record.billed == cloud.bill(first)


# --- a job done when the money runs out ----------------------------------------------------


def test_a_job_done_when_the_budget_runs_out_completes_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: each poll first extends the reservation and, when the budget cannot take
    another billing increment, ends the instance `stopped` without reading the node: a job that
    finished since the last poll (fully paid for) is booked as stopped for lack of budget and the
    run is aborted at its last checkpoint instead of completed."""
    cloud = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=1.0)
    now = [0.0]
    cloud.clock = lambda: now[0]  # the provider's (and its node's) clock, moved by hand
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=5.0, reserve_ahead_s=4.0)
    run_id = new_run(store, 0.1, hours=0.0002)  # $36/h: $0.10 buys 10 s of it
    asyncio.run(drive(deps, run_id, until=lambda: bool(cloud.instances)))
    now[0] += 1.0  # booted
    asyncio.run(drive(deps, run_id, until=lambda: cloud.node_submits > 0))
    now[0] += 2.0  # the job finishes on its node between two polls ...
    late = datetime.now(UTC) + timedelta(seconds=9.5)  # ... 9.5 s into its 10 s of budget
    monkeypatch.setattr("procure.agent.cloud_money.utcnow", lambda: late)
    status = asyncio.run(drive(deps, run_id))
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    assert cloud.running() == []
    assert status == "completed", (
        f"run {status} ({state.run.status_reason}); its job: {state.jobs[0].error_message}"
    )
    assert _booked(store, run_id) == cloud.total_billed() > 0


def test_a_job_done_when_the_deadline_passes_completes_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: once the run's deadline has passed, the next tick ends the instance
    `stopped` without reading its node: a job that finished (in time) since the last poll is
    booked as stopped and the run ends without its completed job."""
    cloud = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=1.0)
    now = [0.0]
    cloud.clock = lambda: now[0]
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0, hours=0.0002)
    with store.session() as s:
        repo.update_run(s, run_id, deadline=datetime.now(UTC) + timedelta(hours=1))
    asyncio.run(drive(deps, run_id, until=lambda: bool(cloud.instances)))
    now[0] += 1.0  # booted
    asyncio.run(drive(deps, run_id, until=lambda: cloud.node_submits > 0))
    now[0] += 2.0  # the job finishes on its node; then the deadline passes before the next poll
    with store.session() as s:
        repo.update_run(s, run_id, deadline=datetime.now(UTC) - timedelta(seconds=1))
    status = asyncio.run(drive(deps, run_id))
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    assert cloud.running() == []
    assert status == "completed", (
        f"run {status} ({state.run.status_reason}); its job: {state.jobs[0].error_message}"
    )
    assert _booked(store, run_id) == cloud.total_billed() > 0


def test_a_run_past_its_deadline_ends_instead_of_renting_again(tmp_path: Path) -> None:
    """Before the fix: the instance is stopped at the run's deadline, then the planner rents
    again and the next tick stops that one at once, and again, every tick, forever: the run never
    ends and gains a job, a payment, an instance record and three observations per tick."""
    cloud = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=60.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0, hours=0.01)
    with store.session() as s:
        repo.update_run(s, run_id, deadline=datetime.now(UTC) + timedelta(hours=1))
    asyncio.run(drive(deps, run_id, until=lambda: cloud.node_submits > 0))
    with store.session() as s:
        repo.update_run(s, run_id, deadline=datetime.now(UTC) - timedelta(seconds=1))

    def jobs() -> int:
        with store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        assert state is not None
        return len(state.jobs)

    status = asyncio.run(drive(deps, run_id, until=lambda: jobs() >= 5))
    assert cloud.running() == []
    assert jobs() == 1, f"{jobs()} jobs after the deadline passed (run {status})"
    assert status in ("aborted", "failed", "completed")
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    assert "deadline" in (state.run.status_reason or "")
    assert _booked(store, run_id) == cloud.total_billed() > 0


# --- an orphan of a crash, swept ----------------------------------------------------------


class Killed(BaseException):
    """A kill at a crash point: not an Exception, so nothing catches it on the way up."""


def test_an_orphan_launched_before_a_crash_is_booked_its_bill_without_a_billing_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the record of a launch gets its launch time only once the launch answered
    and was recorded; killed in between, and the run then ended without it, the sweeper
    terminates the orphan and books its bill computed from no launch time at all: $0 on a
    provider without a billing endpoint (Lambda), whatever it ran and billed."""
    from procure.agent import cloud_run
    from procure.agent.cloud_sweeper import sweep

    cloud = FakeCloud("lambda", [offer("lambda", "gpu_1x_a100", 36.0)], job_s=60.0, bills=False)
    now = [0.0]
    cloud.clock = lambda: now[0]
    store = new_store(tmp_url(tmp_path), [cloud_vendor("la", "lambda", 50.0)])
    deps = make_deps(store, {"lambda": cloud})
    run_id = new_run(store, 100.0)

    def kill_at_paid(name: str) -> None:
        if name == "paid":
            raise Killed(name)

    monkeypatch.setattr(cloud_run, "crash_point", kill_at_paid)
    with pytest.raises(Killed):  # launched, not recorded
        asyncio.run(drive(deps, run_id))
    (orphan,) = cloud.running()
    now[0] += 1.0
    assert asyncio.run(cloud.get(orphan.id)).status == "active"  # type: ignore[union-attr]
    now[0] += 600.0  # it runs ten minutes; the run ends meanwhile without it
    later = datetime.now(UTC) + timedelta(seconds=601)
    monkeypatch.setattr("procure.agent.cloud_money.utcnow", lambda: later)
    with store.session() as s:
        repo.update_run(s, run_id, status="failed")
    assert asyncio.run(sweep(deps)) == [orphan.name]
    assert cloud.running() == []
    billed = cloud.total_billed()
    assert billed >= 6_000_000  # ten minutes at $36/h
    assert _booked(store, run_id) >= billed, (
        f"the provider billed {billed} micro-USD; the run's books say {_booked(store, run_id)}"
    )
