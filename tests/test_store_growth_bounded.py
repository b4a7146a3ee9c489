"""Invariant 8 (bounded input): what an outside party (a facilitator down, a cloud's long label, an
LLM saying the same, a vendor flooding its log) cannot make grow in the store tick after tick."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from procure import warnings
from procure.agent import joblogs
from procure.agent.outcomes import new_payment
from procure.agent.runtime import close_deps, make_deps
from procure.agent.tick import tick
from procure.api.app import create_app
from procure.fleet import cap_warnings
from procure.local import LocalServer, serve
from procure.models import (
    Job,
    JobSpec,
    JobStatus,
    ObservationType,
    PaymentStatus,
    usd_to_micros,
    utcnow,
)
from procure.settings import Settings
from procure.store import Store, fleet_repo, open_store, repo
from procure.store.fleet_tables import OutboxRow
from procure.vendors.registry import default_vendors

# --- a facilitator whose ledger is down ------------------------------------------------------


@pytest.fixture
def broken_ledger() -> Iterator[LocalServer]:
    """A facilitator that answers every settlement lookup 503 (an outage)."""
    app = FastAPI()

    @app.get("/authorizations/{payer}/{nonce}")
    async def lookup(payer: str, nonce: str) -> JSONResponse:
        return JSONResponse({"error": "maintenance"}, status_code=503)

    server = serve(app)
    yield server
    server.stop()


async def _ticks(settings: Settings, store: Store, run_id: str, n: int) -> list[str]:
    """`n` ticks of the run, as a worker makes them; what each said."""
    deps = make_deps(settings, store, clouds={})
    try:
        return [(await tick(deps, run_id)).message for _ in range(n)]
    finally:
        await close_deps(deps)


def test_a_ledger_outage_is_said_once_not_every_tick(
    tmp_path: Path, db_url: str, broken_ledger: LocalServer
) -> None:
    """Before the fix: a run whose payment is in doubt asks the facilitator's ledger each tick;
    while the ledger is down, each tick appends another "Cannot reconcile yet" error observation
    (every second under the worker), so an outage of a day writes ~86,400 rows per run that are
    never pruned."""
    settings = Settings(
        PROCURE_DATABASE_URL=db_url,
        PROCURE_HOME=tmp_path / "home",
        X402_FACILITATOR_URL=broken_ledger.url,
    )
    store = open_store(db_url)
    vendor = default_vendors()[1]
    now = utcnow()
    with store.session() as s:
        repo.save_vendor(s, vendor)
        run = repo.create_run(
            s,
            user_id="u1",
            goal="Fine-tune",
            budget_total=usd_to_micros(5),
            job_spec=JobSpec(),
        )
        job = Job(
            _id=repo.new_id(),
            run_id=run.id,
            vendor_id=vendor.vendor_id,
            status=JobStatus.submitted,
            expected_cost=usd_to_micros(1),
            job_params={},
            idempotency_key="",
            created_at=now,
            updated_at=now,
        )
        job.idempotency_key = f"job-{job.id}"
        repo.insert_job(s, job)
        repo.insert_payment(s, new_payment(run.id, job.id, vendor, usd_to_micros(1), 1.0))

    try:
        messages = asyncio.run(_ticks(settings, store, run.id, 20))
        assert set(messages) == {"Payment outcome unknown"}, messages  # waiting, as it should
        with store.session() as s:
            said = [
                o.content
                for o in repo.list_observations(s, run.id, limit=1000)
                if o.content.startswith("Cannot reconcile yet")
            ]
        # The same outage said once (as a run waiting for the same reason says it once), not
        # once per tick.
        assert len(said) <= 2, f"{len(said)} identical observations for 20 ticks: {said[:2]}"
    finally:
        store.dispose()


# --- the fleet, on an account that holds an instance it did not name ------------------------


def test_a_long_instance_label_on_the_account_is_cut_and_the_scans_go_on(db_url: str) -> None:
    """Before the fix: vast.ai documents instance labels of up to 1,024 characters (and procure's
    client takes them), but `fleet_instances.name` is VARCHAR(255): on PostgreSQL one instance
    labelled with 300 characters on the same account fails `sync_instances` in every scan, so the
    fleet never again reads a node, terminates an idle instance or books instance-hours."""
    from procure.clouds.base import LaunchSpec
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.mock import start_mock_cloud
    from procure.clouds.vast.mockstate import MockVastConfig
    from procure.clouds.vast.settings import VastSettings
    from procure.fleet.context import FleetContext
    from procure.fleet.controller import scan_once
    from procure.fleet.settings import FleetSettings
    from procure.httpbounds import bounded_client
    from procure.store import fleet_repo

    mock = start_mock_cloud(MockVastConfig(speed=0, node_token="t", rate_scale=0))
    cloud = VastCloud(
        VastSettings(VAST_API_KEY=mock.api_key, VAST_API_URL=mock.url, VAST_PACE_SCALE=0)
    )
    store = open_store(db_url)
    long_label = "team-notebook " + "x" * 286  # 300 characters, set in Vast.ai's console

    async def body() -> None:
        offer = next(o for o in await cloud.offers() if not o.interruptible)
        await cloud.launch_spec(LaunchSpec(name=long_label, offer=offer))
        mock.state.clock.advance(3600)
        ctx = FleetContext(
            store=store,
            cloud=cloud,  # type: ignore[arg-type]
            nodes=bounded_client(deadline_s=10),
            cfg=FleetSettings(
                _env_file=None,  # type: ignore[call-arg]
                node_token="t",
                min_instances=0,
                dry_run=True,
            ),
            mapped_ports=True,
        )
        try:
            result = await scan_once(ctx)
        finally:
            await ctx.nodes.aclose()
            await cloud.aclose()
        assert result.instances == 1
        with store.session() as s:
            assert len(fleet_repo.live_instances(s)) == 1  # billed from now on

    try:
        asyncio.run(body())
    finally:
        store.dispose()
        mock.stop()


# --- an LLM planner while a run waits --------------------------------------------------------

WAIT = json.dumps(
    {"action": "wait", "vendorId": None, "reason": "Every vendor is cooling down; waiting."}
)


@pytest.fixture
def waiting_llm() -> Iterator[LocalServer]:
    """An OpenAI-compatible endpoint whose model answers `wait`, the same way every time."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions() -> JSONResponse:
        return JSONResponse(
            {
                "id": "chatcmpl-review",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": WAIT},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    server = serve(app)
    yield server
    server.stop()


def test_llm_planner_s_same_answer_is_kept_once_while_a_run_waits(
    tmp_path: Path, db_url: str, waiting_llm: LocalServer
) -> None:
    """Before the fix: with the LLM planner, a run that waits (its vendors cooling down, or the
    global spend cap reached, which may last a month) asks the model every tick (every second under
    the worker) and stores its raw answer (up to 2,000 characters) as a new observation each time,
    though the answer repeats (a heuristic planner's repeated reason is said once)."""
    settings = Settings(
        PROCURE_DATABASE_URL=db_url,
        PROCURE_HOME=tmp_path / "home",
        PLANNER_MODE="llm",
        FIREWORKS_API_KEY="k",
        FIREWORKS_MODEL="m",
        LLM_BASE_URL=f"{waiting_llm.url}/v1",
        LLM_TIMEOUT_S=10.0,
    )  # type: ignore[call-arg]
    store = open_store(db_url)
    with store.session() as s:
        for vendor in default_vendors():  # both cooling down for a day: nothing to do but wait
            repo.save_vendor(s, vendor)
            repo.cool_down(s, vendor.vendor_id, utcnow() + timedelta(days=1))
        run = repo.create_run(
            s, user_id="u1", goal="Fine-tune", budget_total=usd_to_micros(5), job_spec=JobSpec()
        )

    try:
        messages = asyncio.run(_ticks(settings, store, run.id, 20))
        assert set(messages) == {"Waiting"}, messages
        with store.session() as s:
            observed = repo.list_observations(s, run.id, limit=1000)
        answers = [o.content for o in observed if o.type == ObservationType.llm_response]
        reasons = [o.content for o in observed if o.type == ObservationType.agent_reasoning]
        # One wait, said once (or twice), as the heuristic planner's waiting run says it: not
        # a copy of the model's answer per tick, and its reason pushed out of the last four
        # observations (the window `recent_contents` dedupes in) and so said again and again.
        assert len(answers) + len(reasons) <= 3, (
            f"20 ticks stored {len(answers)} copies of one LLM answer and "
            f"{len(reasons)} of its reason"
        )
    finally:
        store.dispose()


# --- a vendor that floods its log -------------------------------------------------------------


@pytest.fixture
def flooding_vendor() -> Iterator[LocalServer]:
    """A vendor whose job runs on, answering 201 new log lines at every other status call (its
    log starts over in between: a restarted log, or a vendor that means harm)."""
    app = FastAPI()
    calls = [0]

    @app.get("/job-status")
    async def status(jobId: str) -> JSONResponse:
        calls[0] += 1
        lines = [f"step {i}" for i in range(201)] if calls[0] % 2 else []
        return JSONResponse({"jobId": jobId, "status": "running", "progress": 0.5, "logs": lines})

    server = serve(app)
    yield server
    server.stop()


def test_a_flooding_vendor_adds_no_note_past_the_runs_log_limit(
    tmp_path: Path, db_url: str, flooding_vendor: LocalServer
) -> None:
    """Before the fix: past LINES_PER_RUN a run keeps no more log lines and says so once, but the "N
    log lines dropped" note for a poll with more than LINES_PER_POLL new lines is written at every
    such poll, limit or not: a vendor answering 201 new lines per poll adds a row per poll for as
    long as its job runs."""
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path / "home")
    store = open_store(db_url)
    vendor = default_vendors()[1].model_copy(update={"endpoint": flooding_vendor.url})
    now = utcnow()
    with store.session() as s:
        repo.save_vendor(s, vendor)
        run = repo.create_run(
            s, user_id="u1", goal="Fine-tune", budget_total=usd_to_micros(5), job_spec=JobSpec()
        )
        job = Job(
            _id=repo.new_id(),
            run_id=run.id,
            vendor_id=vendor.vendor_id,
            vendor_job_id="vj-1",
            status=JobStatus.running,
            expected_cost=usd_to_micros(1),
            job_params={},
            idempotency_key="",
            progress=0.5,
            progressed_at=now,
            created_at=now,
            updated_at=now,
        )
        job.idempotency_key = f"job-{job.id}"
        repo.insert_job(s, job)
        payment = new_payment(run.id, job.id, vendor, usd_to_micros(1), 1.0)
        payment.status = PaymentStatus.completed
        repo.insert_payment(s, payment)
        repo.refresh_budget(s, run.id)
        # The run already kept its 5,000 lines and said that later ones are not kept.
        repo.update_run(s, run.id, log_lines=joblogs.LINES_PER_RUN + 1)

    try:
        messages = asyncio.run(_ticks(settings, store, run.id, 20))
        assert all(m.startswith("Job running") for m in messages), messages
        with store.session() as s:
            notes = [
                o.content
                for o in repo.list_observations(s, run.id, limit=1000)
                if "log lines dropped" in o.content
            ]
        assert notes == [], f"{len(notes)} notes for 20 polls of a run keeping no lines: {notes[0]}"
    finally:
        store.dispose()


def test_procure_serve_alone_prunes_delivered_warnings(db_url: str) -> None:
    """Before the fix: only the fleet's outbox loop pruned delivered messages; under `procure
    serve` without the fleet, every warning's Slack and webhook rows stayed for good."""
    store = open_store(db_url)
    old = utcnow() - timedelta(days=8)
    try:
        with store.session() as s:
            fleet_repo.enqueue(s, warnings.WEBHOOK, {"text": "old warning"}, old)
            (message,) = s.query(OutboxRow).all()
            fleet_repo.mark_delivered(s, message.id, old)

        async def one_pass() -> int:
            task = asyncio.create_task(
                cap_warnings.run_warnings(store, warnings.WarningSettings(), every_s=3600)
            )
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    with store.session() as s:
                        left = s.query(OutboxRow).count()
                    if left == 0:
                        return 0
                    await asyncio.sleep(0.05)
                return left
            finally:
                task.cancel()

        assert asyncio.run(one_pass()) == 0, "a delivered warning from a week ago was kept"
    finally:
        store.dispose()


def test_procure_serve_alone_writes_the_warnings_audit_entries(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a ledger cap's warning queues an entry for the fleet's audit trail, which
    only the fleet's outbox loop wrote; under `procure serve` without the fleet it stayed queued
    for good (and the audit log never had it)."""
    audit = tmp_path / "audit" / "fleet-audit.jsonl"
    monkeypatch.setenv("LAMBDA_LABS_AUDIT_LOG", str(audit))
    store = open_store(db_url)
    try:
        with store.session() as s:
            entry = {"timestamp": "2026-12-07T06:00:00Z", "warning": {"scope": "ledger"}}
            fleet_repo.enqueue(s, "audit", entry, utcnow())
        settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)  # type: ignore[call-arg]
        server = serve(create_app(settings, store))
        try:
            deadline = time.monotonic() + 60
            while not (audit.exists() and audit.read_text().strip()):
                assert time.monotonic() < deadline, "the warning's audit entry was never written"
                time.sleep(0.1)
        finally:
            server.stop()
        assert [json.loads(line)["warning"] for line in audit.read_text().splitlines()] == [
            {"scope": "ledger"}
        ]
        with store.session() as s:
            left = s.query(OutboxRow).filter(OutboxRow.delivered_at.is_(None)).count()
        assert left == 0
    finally:
        store.dispose()
