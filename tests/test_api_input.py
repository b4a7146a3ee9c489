"""Bad input to the API gets a 4xx with a clear message, never a 500; tokens guard mutations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import open_store


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[httpx.Client]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    store = open_store(db_url)
    server = serve(create_app(settings, store))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client
    server.stop()
    store.dispose()


GOOD = {"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"goal": "Fine-tune", "budgetTotal": 5}, "userId"),
        ({"userId": "u1", "budgetTotal": 5}, "goal"),
        ({"userId": "u1", "goal": "x"}, "budgetTotal"),
        ({**GOOD, "budgetTotal": -1}, "budgetTotal"),
        ({**GOOD, "budgetTotal": 0}, "budgetTotal"),
        ({**GOOD, "budgetTotal": "five"}, "budgetTotal"),
        ({**GOOD, "budgetTotal": True}, "budgetTotal"),
        ({**GOOD, "userId": 7}, "userId"),
        ({**GOOD, "goal": ""}, "goal"),
        ({**GOOD, "hours": 0}, "hours"),
        ({**GOOD, "surprise": 1}, "surprise"),
    ],
)
def test_start_rejects_bad_bodies(api: httpx.Client, body: dict, mentions: str) -> None:
    response = api.post("/api/agent-start", json=body)
    assert response.status_code == 422
    assert mentions in response.json()["error"]


def test_start_rejects_non_json(api: httpx.Client) -> None:
    response = api.post(
        "/api/agent-start", content=b"budget=5", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "invalid request" in response.json()["error"]


def test_unknown_run_is_404(api: httpx.Client) -> None:
    tick = api.post("/api/agent-tick", json={"runId": "nope"})
    assert tick.status_code == 404 and "nope" in tick.json()["error"]
    status = api.get("/api/agent-status", params={"runId": "nope"})
    assert status.status_code == 404 and "not found" in status.json()["error"]


def test_tick_and_status_need_a_run_id(api: httpx.Client) -> None:
    assert api.post("/api/agent-tick", json={}).status_code == 422
    assert api.post("/api/agent-tick", json={"runId": 12}).status_code == 422
    missing = api.get("/api/agent-status")
    assert missing.status_code == 422 and "runId" in missing.json()["error"]


def test_start_returns_the_run_in_the_seeds_shape(api: httpx.Client) -> None:
    run = api.post("/api/agent-start", json={**GOOD, "budgetTotal": 5.25}).json()
    assert run["status"] == "running"
    assert run["budgetTotal"] == 5.25 and run["budgetRemaining"] == 5.25
    assert run["userId"] == "u1" and len(run["_id"]) == 24
    # The start answer says what the first payment may be, and that a cancel does not refund it.
    first = run.pop("firstPayment")
    assert first["refundable"] is False and "does not refund" in first["note"]
    status = api.get("/api/agent-status", params={"runId": run["_id"]}).json()
    assert status == {
        "run": run,
        "jobs": [],
        "payments": [],
        "observations": [],
        "observationsNext": None,  # the seeds' shape, plus the cursor of the next page
    }


def test_mutations_need_the_token_when_configured(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN="s3cret"
    )
    store = open_store(sqlite_url)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url) as client:
            denied = client.post("/api/agent-start", json=GOOD)
            assert denied.status_code == 401
            assert "s3cret" not in denied.text
            ok = client.post(
                "/api/agent-start", json=GOOD, headers={"Authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 201
            # Reading needs it too (unless PROCURE_PUBLIC_READ=true).
            assert client.get("/api/runs").status_code == 401
            assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).is_success
    finally:
        server.stop()


def test_vendor_prices_in_json_are_dollars_even_when_whole(api: httpx.Client) -> None:
    vendor = {
        "vendorId": "v3",
        "name": "Whole",
        "endpoint": "http://127.0.0.1:9",
        "basePricePerHour": 2,
        "reliabilityScore": 0.9,
        "supportedGpuTypes": ["A100"],
    }
    saved = api.put("/api/vendors/v3", json=vendor)
    assert saved.status_code == 200, saved.text
    listed = {v["vendorId"]: v for v in api.get("/api/vendors").json()}
    assert listed["v3"]["basePricePerHour"] == 2.0
    bad = api.put("/api/vendors/v3", json={**vendor, "reliabilityScore": 7})
    assert bad.status_code == 422
    mismatch = api.put("/api/vendors/other", json=vendor)
    assert mismatch.status_code == 400


def test_public_read_opens_reads_not_writes(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCURE_PUBLIC_READ", "true")
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN="s3cret"
    )
    store = open_store(sqlite_url)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/api/runs").status_code == 200
            assert client.get("/api/vendors").status_code == 200
            assert client.post("/api/agent-start", json=GOOD).status_code == 401
    finally:
        server.stop()


def test_a_non_ascii_bearer_token_is_refused_not_a_500(tmp_path: Path, sqlite_url: str) -> None:
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN="s3cret"
    )
    store = open_store(sqlite_url)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url) as client:
            odd = {"Authorization": "Bearer caf\xe9".encode("latin-1")}  # any byte may arrive
            assert client.post("/api/agent-start", json=GOOD, headers=odd).status_code == 401
            assert client.get("/api/runs", headers=odd).status_code == 401
    finally:
        server.stop()


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:3000"])
def test_an_open_api_does_not_answer_a_host_name_a_page_could_rebind(
    api: httpx.Client, host: str
) -> None:
    """Before the fix: with no PROCURE_API_TOKEN the API answered whatever the Host header said,
    so a web page pointing a name of its own at 127.0.0.1 (DNS rebinding) could read the runs
    and start one spending the wallet's money."""
    started = api.post("/api/agent-start", json=GOOD, headers={"Host": host})
    assert started.status_code == 421, started.text
    assert "PROCURE_API_TOKEN" in started.json()["error"]
    assert api.get("/api/runs", headers={"Host": host}).status_code == 421
    # Loopback names and IP addresses are served as before.
    for direct in ("127.0.0.1:3000", "localhost", "[::1]:3000", "procure.localhost"):
        assert api.get("/api/runs", headers={"Host": direct}).status_code == 200, direct
    assert api.get("/api/runs").json() == []  # nothing was started


def test_an_api_with_a_token_serves_any_host_name(tmp_path: Path, sqlite_url: str) -> None:
    token = "t0ken-long-enough"
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=token
    )
    store = open_store(sqlite_url)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            answer = client.get(
                "/api/runs",
                headers={"Host": "procure.example.com", "Authorization": f"Bearer {token}"},
            )
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()
        store.dispose()
