"""The fleet's API over real HTTP: the seed's summary, instances with figures and anomalies, the
history, approve and reject (bearer token), rollback of a provision (and the refusal to roll
back a termination), and the seed's metric names and values on /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import open_store

TOKEN = "api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[tuple[str, str]]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    store = open_store(db_url)
    server = serve(create_app(settings, store))
    yield server.url, db_url
    server.stop()
    store.dispose()


def test_approve_execute_rollback_and_metrics(api: tuple[str, str]) -> None:
    url, db_url = api

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud, confirmation_threshold=1.0) as ctx:
            await scan_for(ctx, 17)
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.get("/api/fleet/actions")).status_code == 401  # reads too
                pending = (await http.get("/api/fleet/actions?status=pending", headers=AUTH)).json()
                assert len(pending) == 1
                action_id = pending[0]["action_id"]
                path = f"/api/fleet/actions/{action_id}"
                assert (await http.post(f"{path}/approve")).status_code == 401
                approved = await http.post(f"{path}/approve", headers=AUTH)
                assert approved.status_code == 200 and approved.json()["status"] == "approved"
                again = await http.post(f"{path}/approve", headers=AUTH)
                assert again.status_code == 409
                await scan_for(ctx, 1)
                assert cloud.launches == [action_id]

                summary = (await http.get("/api/fleet/summary", headers=AUTH)).json()
                assert {k: summary[k] for k in list(summary)[:10]} == {
                    "total_actions": 1,
                    "actions_by_type": {"provision_instance": 1},
                    "total_cost_impact": 1.29,
                    "successful_actions": 1,
                    "failed_actions": 0,
                    "pending_confirmations": 0,
                    "current_hourly_spend": 2.58,
                    "max_hourly_spend": 100.0,
                    "instances_running": 2,
                    "max_instances": 10,
                }
                instances = (await http.get("/api/fleet/instances", headers=AUTH)).json()
                first = next(i for i in instances if i["launched_by"] is None)
                assert first["latest"]["gpu_util"] == 95.0
                assert first["anomalies"][0]["kind"] == "sustained_high"

                text = (await http.get("/metrics", headers=AUTH)).text
                assert (
                    'lambda_labs_autonomous_actions_total{action_type="provision_instance",'
                    'status="executed"} 1.0' in text
                )
                assert "lambda_labs_autonomous_confirmations_required_total 1.0" in text
                assert "lambda_labs_autonomous_instances_managed 2.0" in text
                assert (
                    'lambda_labs_autonomous_cost_impact_dollars{action_type="provision_instance"}'
                    " 1.29" in text
                )
                assert 'lambda_labs_gpu_utilization_percent{instance_id="i-0001"' in text
                assert (
                    'lambda_labs_instance_cost_dollars{instance_id="i-0001",'
                    'instance_type="gpu_1x_a100",period="hour"} 1.29' in text
                )

                rollback = await http.post(f"{path}/rollback", headers=AUTH)
                assert rollback.status_code == 202
                undo = rollback.json()
                assert undo["rollback_of"] == action_id and undo["status"] == "approved"
                await scan_for(ctx, 1)
                assert cloud.terminations == [undo["target_instance"]]
                statuses = {a.action_id: a.status for a in all_actions(ctx)}
                assert statuses[action_id] == "rolled_back"
                assert statuses[undo["action_id"]] == "executed"
                refused = await http.post(
                    f"/api/fleet/actions/{undo['action_id']}/rollback", headers=AUTH
                )
                assert refused.status_code == 409
                assert "termination cannot be rolled back" in refused.json()["error"]
                missing = await http.post("/api/fleet/actions/nope/reject", headers=AUTH)
                assert missing.status_code == 404

    asyncio.run(body())


def test_reject_means_no_launch(api: tuple[str, str]) -> None:
    url, db_url = api

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud, confirmation_threshold=1.0) as ctx:
            await scan_for(ctx, 17)
            (action,) = all_actions(ctx)
            async with httpx.AsyncClient(base_url=url) as http:
                answer = await http.post(
                    f"/api/fleet/actions/{action.action_id}/reject", headers=AUTH
                )
                assert answer.json()["status"] == "rejected"
                assert answer.json()["decided_by"] == "api"
            await scan_for(ctx, 5)
            assert cloud.launches == []

    asyncio.run(body())
