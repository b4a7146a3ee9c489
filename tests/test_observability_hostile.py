"""Observability and notifications under hostile input: /metrics counters never go back, node
figures from Prometheus are bounded and never merged across instances, budget warnings and the
audit trail are delivered once (a broken git mirror or a webhook always failing holds nothing up),
and runs ticked through the API log their events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from fleet_fakes import FakeCloud
from fleet_world import fleet, scan_for
from procure import warnings
from procure.api.app import create_app
from procure.fleet import outbox
from procure.fleet.controller import scan_once
from procure.httpbounds import bounded_client
from procure.local import LocalServer, serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import Store, fleet_repo, open_store
from procure.store.fleet_tables import OutboxRow
from prometheus_harness import eventually
from world import start_world

TOKEN = "review-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[str]:
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN
    )
    store = open_store(sqlite_url)
    server = serve(create_app(settings, store))
    yield server.url
    server.stop()
    store.dispose()


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    opened = open_store(sqlite_url)
    yield opened
    opened.dispose()


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter sample of a scrape, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_fleet_action_counter_never_goes_back_when_an_action_moves_on(
    api: str, sqlite_url: str
) -> None:
    """Before the fix: `lambda_labs_autonomous_actions_total{action_type,status}` counts the
    actions' *current* status, so approving a pending action makes the `pending` counter drop (and
    `approved`, `executing` rise then fall): Prometheus reads each drop as a counter reset, and
    increase()/rate() over it report actions that never happened."""

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(sqlite_url, cloud, confirmation_threshold=1.0) as ctx:
            await scan_for(ctx, 17)
            async with httpx.AsyncClient(base_url=api) as http:
                before = counters((await http.get("/metrics", headers=AUTH)).text)
                pending = (await http.get("/api/fleet/actions?status=pending", headers=AUTH)).json()
                assert len(pending) == 1
                path = f"/api/fleet/actions/{pending[0]['action_id']}/approve"
                assert (await http.post(path, headers=AUTH)).status_code == 200
                await scan_for(ctx, 1)
                after = counters((await http.get("/metrics", headers=AUTH)).text)
        went_back = {k: (v, after.get(k, 0.0)) for k, v in before.items() if after.get(k, 0.0) < v}
        assert not went_back, f"counters went backwards between two scrapes: {went_back}"

    asyncio.run(body())


def test_a_broken_audit_git_repository_never_repeats_audit_lines(
    tmp_path: Path, store: Store
) -> None:
    """Before the fix: `write_audit` appends the entries to the JSON-lines log, then fails on the
    --audit-git repository (here a path that cannot be a directory) before marking them written:
    every time the claim runs out (CLAIM_S) the same entries are appended again, so the audit log
    repeats each action without end while git stays broken."""
    log_file = tmp_path / "audit.jsonl"
    not_a_dir = tmp_path / "audit-repo"
    not_a_dir.write_text("a file where the audit repository should be")
    with store.session() as s:
        fleet_repo.enqueue(s, "audit", {"action": {"id": "a-1", "status": "executed"}}, utcnow())
    for _ in range(3):
        with contextlib.suppress(OSError):  # run_outbox logs it and carries on
            asyncio.run(outbox.write_audit(store, log_file, not_a_dir))
        with store.session() as s:  # CLAIM_S (5 minutes) go by before run_outbox's next try
            s.execute(update(OutboxRow).values(next_attempt_at=utcnow()))
    lines = log_file.read_text().splitlines()
    assert len(lines) == 1, f"one action, {len(lines)} audit lines: {lines}"


def test_budget_warning_commits_in_the_audit_git_repository_name_the_budget(
    tmp_path: Path, store: Store
) -> None:
    """Before the fix: a ledger or fleet budget warning is an audit entry without an `action`, but
    `write_audit` builds every commit message from the action's status, type and id: each warning
    shows in `git log` of the --audit-git repository as "None: None None"."""
    now = utcnow()
    crossing = warnings.Crossing("ledger", "day", now.strftime("%Y-%m-%d"), 90, 100, 0.8)
    with store.session() as s:
        assert warnings.record(s, crossing, now)
    repo = tmp_path / "audit-repo"
    written = asyncio.run(outbox.write_audit(store, tmp_path / "audit.jsonl", repo))
    assert written == 1
    subjects = subprocess.run(
        ["git", "-C", str(repo), "log", "--format=%s"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    assert len(subjects) == 1
    assert "None" not in subjects[0], f"the warning's commit reads {subjects[0]!r}"


class PickyHook:
    """A generic webhook whose handler crashes (500) on one payload and takes the others."""

    def __init__(self, crashes_on: str) -> None:
        self.received: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> JSONResponse:
            payload = await request.json()
            if payload.get("budget") == crashes_on:
                return JSONResponse({"error": "internal"}, 500)
            self.received.append(payload)
            return JSONResponse({"ok": True})

        self.server: LocalServer = serve(app)
        self.url = f"{self.server.url}/hook"


def test_a_warning_the_webhook_always_fails_on_is_dropped_in_the_end(
    store: Store,
) -> None:
    """Before the fix: `warnings.deliver` retries a 5xx for ever and holds the queue behind it,
    unlike the fleet outbox it says it follows (dropped after MAX_SERVER_ERROR_TRIES): one warning
    the webhook's handler always fails on keeps every later budget warning from being sent."""
    now = utcnow()
    with store.session() as s:
        assert warnings.record(s, warnings.Crossing("ledger", "hour", "h", 90, 100, 0.8), now)
        assert warnings.record(s, warnings.Crossing("ledger", "day", "d", 90, 100, 0.8), now)
        # The first warning has failed with 500 for as long as the fleet outbox would try.
        s.execute(
            update(OutboxRow)
            .where(OutboxRow.channel == warnings.WEBHOOK)
            .where(OutboxRow.payload["budget"].as_string() == "hour")
            .values(attempts=outbox.MAX_SERVER_ERROR_TRIES - 1, last_error="HTTP 500: boom")
        )
    hook = PickyHook(crashes_on="hour")

    async def once() -> int:
        async with bounded_client(deadline_s=5) as client:
            return await warnings.deliver(store, client, warnings.WEBHOOK, hook.url)

    try:
        asyncio.run(once())
    finally:
        hook.server.stop()
    assert [p["budget"] for p in hook.received] == ["day"], "the later warning was never sent"


def test_runs_driven_through_agent_tick_log_their_run_events(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix: the run log (`procure.runs`) says "Job started", "Job completed", ... only
    for ticks of the in-process worker: a run driven through `POST /api/agent-tick` (the seeds' way,
    `procure serve --no-worker`, the serverless API) logs that it started and then nothing."""
    caplog.set_level(logging.INFO, logger="procure.runs")
    world = start_world(tmp_path, sqlite_url)
    server = serve(create_app(world.settings, world.store, budget_warnings=False))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            start = {"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}
            run_id = http.post("/api/agent-start", json=start).json()["_id"]

            def finished() -> bool:
                http.post("/api/agent-tick", json={"runId": run_id})
                return http.get(f"/api/runs/{run_id}").json()["run"]["status"] != "running"

            eventually(finished, "the run ended", 60)
            assert http.get(f"/api/runs/{run_id}").json()["run"]["status"] == "completed"
    finally:
        server.stop()
        world.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "procure.runs"]
    assert lines[0].startswith(f"run {run_id} started")
    assert f"run {run_id}: Job completed" in lines, f"the run log says only {lines}"


def dcgm_prometheus(series: dict[str, list[tuple[str, float]]]) -> LocalServer:
    """A Prometheus on loopback answering instant queries of dcgm-exporter series."""
    app = FastAPI()

    @app.get("/api/v1/query")
    async def query(request: Request) -> JSONResponse:
        name = request.query_params.get("query", "")
        result = [
            {"metric": {"__name__": name, "instance": target, "gpu": "0"}, "value": [1.0, repr(v)]}
            for target, v in series.get(name, [])
        ]
        return JSONResponse(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    return serve(app)


def test_one_nodes_absurd_dcgm_figure_is_clamped_and_the_scans_go_on(sqlite_url: str) -> None:
    """Before the fix: with FLEET_PROMETHEUS_URL, figures are only checked to be finite (the
    /gpu-check path bounds each one): a node whose exporter reports 1e30 MiB of framebuffer in use
    makes the sample's integer overflow its column, so every scan fails before it decides anything,
    for the whole fleet (idle instances are never terminated)."""
    cloud = FakeCloud()
    instance = cloud.add(util=50)
    target = f"{cloud.instances_[instance].ip}:9400"
    prometheus = dcgm_prometheus(
        {
            "DCGM_FI_DEV_GPU_UTIL": [(target, 50.0)],
            "DCGM_FI_DEV_GPU_TEMP": [(target, 60.0)],
            "DCGM_FI_DEV_POWER_USAGE": [(target, 300.0)],
            "DCGM_FI_DEV_FB_USED": [(target, 1e30)],
            "DCGM_FI_DEV_XID_ERRORS": [(target, 0.0)],
        }
    )

    async def body() -> None:
        async with fleet(sqlite_url, cloud, prometheus_url=prometheus.url) as ctx:
            result = await scan_once(ctx)
            (view,) = result.views
            assert view.id == instance and view.latest is not None

    try:
        asyncio.run(body())
    finally:
        prometheus.stop()


def test_prometheus_figures_of_two_instances_on_one_host_are_never_merged(sqlite_url: str) -> None:
    """Before the fix: vast.ai and RunPod put several rented instances behind one public IP, each
    with its own mapped port (`node_url`), and procure's node serves dcgm's names on that port. The
    Prometheus source matches a series to an instance by IP alone, so two instances on one host get
    the mean of both: the idle one reads 50 % and is never terminated as idle."""
    cloud = FakeCloud()
    busy, idle = cloud.add(util=100), cloud.add(util=0)
    shared_ip = cloud.instances_[busy].ip
    for instance, port in ((busy, 40001), (idle, 40002)):
        cloud.instances_[instance] = replace(
            cloud.instances_[instance], ip=shared_ip, node_url=f"http://{shared_ip}:{port}"
        )
    series = {
        "DCGM_FI_DEV_GPU_UTIL": [(f"{shared_ip}:40001", 100.0), (f"{shared_ip}:40002", 0.0)],
        "DCGM_FI_DEV_GPU_TEMP": [(f"{shared_ip}:40001", 80.0), (f"{shared_ip}:40002", 30.0)],
        "DCGM_FI_DEV_POWER_USAGE": [(f"{shared_ip}:40001", 300.0), (f"{shared_ip}:40002", 50.0)],
        "DCGM_FI_DEV_FB_USED": [(f"{shared_ip}:40001", 9000.0), (f"{shared_ip}:40002", 0.0)],
        "DCGM_FI_DEV_XID_ERRORS": [(f"{shared_ip}:40001", 0.0), (f"{shared_ip}:40002", 0.0)],
    }
    prometheus = dcgm_prometheus(series)

    async def body() -> None:
        async with fleet(sqlite_url, cloud, prometheus_url=prometheus.url) as ctx:
            views = {v.id: v for v in (await scan_once(ctx)).views}
            latest = views[idle].latest
            assert latest is not None
            assert latest.gpu_util in (None, 0.0), (
                f"the idle instance reads {latest.gpu_util} % (its neighbour's GPU mixed in)"
            )

    try:
        asyncio.run(body())
    finally:
        prometheus.stop()


def test_a_process_without_the_webhook_url_leaves_warnings_to_one_with_it(
    store: Store,
) -> None:
    """Before the fix: `procure serve` and `procure fleet run` both run the warnings' delivery on
    one store. One started without PROCURE_WARNING_WEBHOOK_URL (set only where the operator wants
    it) marks every queued warning delivered ("no destination configured"), so the process that has
    the URL finds nothing left: the budget warning never reaches the webhook."""
    now = utcnow()
    with store.session() as s:
        assert warnings.record(s, warnings.Crossing("ledger", "day", "d", 90, 100, 0.8), now)
    hook = PickyHook(crashes_on="none")

    async def both() -> None:
        async with bounded_client(deadline_s=5) as client:
            await warnings.deliver(store, client, warnings.WEBHOOK, None)  # the other process
            await warnings.deliver(store, client, warnings.WEBHOOK, hook.url)

    try:
        asyncio.run(both())
    finally:
        hook.server.stop()
    assert [p["budget"] for p in hook.received] == ["day"], "the warning was never sent"
