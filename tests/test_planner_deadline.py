"""Deadlines from the API to the planner: a run started with `deadline` or `deadlineHours` is
planned against it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from procure.agent.context import PlanContext
from procure.agent.planner import plan_cost_aware
from procure.api.app import create_app
from procure.models import JobSpec, usd_to_micros
from procure.settings import Settings
from procure.store import open_store, repo
from procure.vendors.registry import default_vendors


def api(tmp_path: Path, url: str) -> TestClient:
    settings = Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path)  # type: ignore[call-arg]
    return TestClient(create_app(settings, open_store(url)), base_url="http://127.0.0.1")


def start(client: TestClient, **extra: object) -> dict[str, object]:
    body = {"userId": "u", "goal": "train", "budgetTotal": 50, "hours": 10, **extra}
    response = client.post("/api/agent-start", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_deadline_hours_and_iso_deadline_are_kept(tmp_path: Path, sqlite_url: str) -> None:
    with api(tmp_path, sqlite_url) as client:
        before = datetime.now(UTC)
        relative = start(client, deadlineHours=12)
        absolute = start(client, deadline="2030-01-02T03:04:05Z")
        none = start(client)
        both = client.post(
            "/api/agent-start",
            json={
                "userId": "u",
                "goal": "g",
                "budgetTotal": 5,
                "deadline": "2030-01-01T00:00:00Z",
                "deadlineHours": 1,
            },
        )
    due = datetime.fromisoformat(str(relative["deadline"]))
    assert before + timedelta(hours=12) <= due <= datetime.now(UTC) + timedelta(hours=12)
    assert datetime.fromisoformat(str(absolute["deadline"])) == datetime(
        2030, 1, 2, 3, 4, 5, tzinfo=UTC
    )
    assert none["deadline"] is None
    assert both.status_code == 422 and "not both" in both.json()["error"]


def test_a_stored_deadline_steers_the_planner(tmp_path: Path, sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    now = datetime.now(UTC)
    with store.session() as s:
        for vendor in default_vendors():
            repo.save_vendor(s, vendor)
        # Vendor 1 has failed a lot for us; vendor 2 has not.
        repo.record_vendor_outcome(s, "gpu_vendor_1", success=False, gpu_hours=2.0)
        repo.record_vendor_outcome(s, "gpu_vendor_1", success=False, gpu_hours=2.0)
        runs = {
            name: repo.create_run(
                s,
                user_id="u",
                goal="train",
                budget_total=usd_to_micros("50"),
                job_spec=JobSpec(hours=10, checkpoint_every=0.05),
                deadline=None if hours is None else now + timedelta(hours=hours),
            ).id
            for name, hours in (("open", None), ("tight", 10.3))
        }
    chosen = {}
    for name, run_id in runs.items():
        with store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
            vendors = repo.list_vendors(s)
        assert state is not None
        chosen[name] = plan_cost_aware(PlanContext(state=state, vendors=vendors, now=now))
    assert chosen["open"].vendor_id == "gpu_vendor_1"  # cheaper, even so
    assert chosen["tight"].vendor_id == "gpu_vendor_2"  # 18 minutes of slack: no room to fail
    assert "p(miss deadline)" in chosen["tight"].reason
