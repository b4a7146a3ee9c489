"""The seeds' recovery story through the HTTP API: vendor 1 fails part-way, vendor 2 completes."""

from __future__ import annotations

import time
from typing import Any

import httpx
from sqlalchemy import text

from procure.api.app import create_app
from procure.local import serve
from world import TERMINAL, World


def tick_until_done(api: httpx.Client, run_id: str, limit_s: float = 60) -> list[dict[str, Any]]:
    results = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        response = api.post("/api/agent-tick", json={"runId": run_id})
        assert response.status_code == 200, response.text
        results.append(response.json())
        status = api.get("/api/agent-status", params={"runId": run_id}).json()
        if status["run"]["status"] in TERMINAL:
            return results
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish: {results[-3:]}")


def test_recovery_story_over_http(world: World) -> None:
    server = serve(create_app(world.settings, world.store))
    try:
        api = httpx.Client(base_url=server.url, timeout=30)
        started = api.post(
            "/api/agent-start", json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}
        )
        assert started.status_code == 201, started.text
        run = started.json()
        assert run["status"] == "running"
        assert run["budgetTotal"] == 5 and run["budgetRemaining"] == 5
        run_id = run["_id"]

        results = tick_until_done(api, run_id)
        messages = [r["message"] for r in results]
        assert messages[0] == "Job started"
        assert results[0]["action"]["vendorId"] == "gpu_vendor_1"
        assert "Job failed" in messages and messages[-1] == "Job completed"

        status = api.get("/api/agent-status", params={"runId": run_id}).json()
    finally:
        server.stop()

    assert set(status) == {"run", "jobs", "payments", "observations", "observationsNext"}
    assert status["observationsNext"] is None  # the whole history fits in the first page
    assert status["run"]["status"] == "completed"
    job1, job2 = status["jobs"]
    assert (job1["vendorId"], job1["status"]) == ("gpu_vendor_1", "failed")
    assert job1["errorMessage"] == "Vendor crashed at 47% progress"
    assert (job2["vendorId"], job2["status"]) == ("gpu_vendor_2", "completed")
    assert job2["artifactUrl"] == "https://mock-storage/gpu_vendor_2/model-final.bin"
    assert job2["metrics"]["epochs"] == 3

    payments = status["payments"]
    assert [(p["vendorId"], p["status"]) for p in payments] == [
        ("gpu_vendor_1", "completed"),
        ("gpu_vendor_2", "completed"),
    ]
    tx_ids = [p["x402TxId"] for p in payments]
    assert all(t and t.startswith("0x") and len(t) == 66 for t in tx_ids)
    assert tx_ids[0] != tx_ids[1]
    paid = sum(p["amount"] for p in payments)
    assert status["run"]["budgetRemaining"] == round(5 - paid, 6)
    # Vendor 2 resumed from vendor 1's checkpoint at 25%: it was paid for the 0.75h left.
    assert [p["amount"] for p in payments] == [1.4, 1.575]
    assert job2["startProgress"] == 0.25
    assert job2["jobParams"]["resumeFrom"] == job1["checkpointUrl"]

    # The money really moved on the chain, to each vendor's registered payee, once.
    chain = world.chain
    for vendor_id, amount in (("gpu_vendor_1", 1_400_000), ("gpu_vendor_2", 1_575_000)):
        payee = world.vendors[vendor_id].pay_to
        assert payee is not None
        assert chain.balance_of(payee) == amount
        to_payee = [t for t in chain.transfers() if t["to"] == payee]
        assert [t["tx_hash"] for t in to_payee] == [
            p["x402TxId"] for p in payments if p["vendorId"] == vendor_id
        ]

    types = {o["type"] for o in status["observations"]}
    assert {"agent_reasoning", "payment_event", "job_log", "error"} <= types
    contents = [o["content"] for o in status["observations"]]
    assert "Epoch 1/3 loss=1.50" in contents
    assert any("gpu_vendor_1 failed at 47%" in c for c in contents)
    assert any("switching to gpu_vendor_2" in c for c in contents)


def test_secrets_never_appear_in_the_store_or_responses(world: World) -> None:
    from world import SECRET

    key = (
        (world.settings.home / "wallet.key").read_text().strip()
        if (world.settings.home / "wallet.key").exists()
        else None
    )
    server = serve(create_app(world.settings, world.store))
    try:
        api = httpx.Client(base_url=server.url, timeout=30)
        run_id = api.post(
            "/api/agent-start", json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}
        ).json()["_id"]
        tick_until_done(api, run_id)
        bodies = [
            api.get("/api/agent-status", params={"runId": run_id}).text,
            api.get("/api/vendors").text,
            api.get("/api/runs").text,
            api.get("/metrics").text,
        ]
    finally:
        server.stop()
    assert key is not None
    # The vendors' credential (GPU_VENDOR_SECRET for the seeds) is stored encrypted: neither
    # it, its ciphertext nor the key that opens it is shown.
    with world.store.session() as s:
        stored = [c for (c,) in s.execute(text("SELECT credential FROM vendors")) if c]
    assert len(stored) == 2 and not any(SECRET in c for c in stored)
    credential_key = (world.settings.home / "secret.key").read_text().strip()
    for body in bodies:
        assert SECRET not in body
        assert key.removeprefix("0x") not in body
        assert credential_key not in body
        assert not any(c in body for c in stored)
