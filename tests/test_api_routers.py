"""The API's routers keep the store off the event loop: every store transaction a runs, vendors,
fleet or ops handler opens happens in a worker thread (the in-process worker shares the loop),
and the routes still answer at the same paths."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import Store, open_store, repo

VENDOR = {
    "vendorId": "v9",
    "name": "Nine",
    "endpoint": "http://127.0.0.1:9",
    "basePricePerHour": 1.0,
    "reliabilityScore": 0.9,
    "supportedGpuTypes": ["A100"],
}


def _on_the_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def watch(store: Store) -> list[str]:
    """Note each database transaction the store's sessions begin on a running event loop."""
    offenders: list[str] = []

    def began(_session: Any, _transaction: Any, _connection: Any) -> None:
        if _on_the_loop():
            offenders.append(threading.current_thread().name)

    event.listen(store.sessions, "after_begin", began)
    return offenders


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[tuple[httpx.Client, Store, list[str]]]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    store = open_store(db_url)
    offenders = watch(store)
    server = serve(create_app(settings, store))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client, store, offenders
    server.stop()
    store.dispose()


def test_no_handler_opens_a_store_transaction_on_the_event_loop(
    api: tuple[httpx.Client, Store, list[str]],
) -> None:
    client, store, offenders = api
    started = client.post("/api/agent-start", json={"userId": "u", "goal": "g", "budgetTotal": 5})
    assert started.status_code == 201
    run_id = started.json()["_id"]
    with store.session() as s:  # ended already: cancel answers 409 without ticking
        repo.update_run(s, run_id, status="failed", status_reason="test")
    offenders.clear()  # the test's own transaction above ran on no loop; keep the slate clean
    calls = [
        ("GET", "/api/runs", None, 200),
        ("GET", f"/api/runs/{run_id}", None, 200),
        ("GET", f"/api/agent-status?runId={run_id}", None, 200),
        ("GET", "/api/runs/nope", None, 404),
        ("POST", f"/api/runs/{run_id}/cancel", None, 409),
        ("PUT", "/api/vendors/v9", {**VENDOR, "credential": "s3cret"}, 200),
        ("GET", "/api/vendors", None, 200),
        ("GET", "/api/fleet/summary", None, 200),
        ("GET", "/api/fleet/instances", None, 200),
        ("GET", "/api/fleet/actions", None, 200),
        ("POST", "/api/fleet/actions/none/approve", None, 404),
        ("POST", "/api/fleet/actions/none/rollback", None, 404),
        ("GET", "/healthz", None, 200),
        ("GET", "/metrics", None, 200),
    ]
    for method, path, body, status in calls:
        answer = client.request(method, path, json=body)
        assert answer.status_code == status, (method, path, answer.text)
    assert offenders == []
    listed = client.get("/api/vendors").json()
    assert [v["vendorId"] for v in listed] == ["v9"] and listed[0]["hasCredential"] is True
    assert client.get("/healthz").json()["runs"] == {"failed": 1}
    assert "procure_runs" in client.get("/metrics").text


def test_each_resource_has_its_own_router(api: tuple[httpx.Client, Store, list[str]]) -> None:
    client, _store, _offenders = api
    document = client.get("/openapi.json").json()
    tags = {
        path: sorted({t for op in ops.values() for t in op.get("tags", [])})
        for path, ops in document["paths"].items()
    }
    assert tags["/api/agent-start"] == ["runs"] and tags["/api/runs/{run_id}/cancel"] == ["runs"]
    assert tags["/api/vendors/{vendor_id}"] == ["vendors"]
    assert tags["/api/fleet/summary"] == ["fleet"] and tags["/api/nodes"] == ["nodes"]
    assert tags["/metrics"] == ["ops"] and tags["/healthz"] == ["ops"]
