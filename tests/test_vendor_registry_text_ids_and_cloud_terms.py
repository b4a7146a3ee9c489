"""What the API stores about vendors, over real HTTP on both
stores: text with a NUL character is refused alike on SQLite and PostgreSQL, a 404 does not
echo an oversized path id, and a cloud vendor's price and GPU types stay those of its terms."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import open_store

TOKEN = "h107-token"
VENDOR = {
    "vendorId": "v9",
    "name": "Nine",
    "endpoint": "http://127.0.0.1:9",
    "basePricePerHour": 1.5,
    "reliabilityScore": 0.9,
    "supportedGpuTypes": ["A100"],
}
CLOUD = {"provider": "runpod", "gpu": "a100", "maxPricePerHour": 2.5}


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Iterator[httpx.Client]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    store = open_store(db_url)
    server = serve(create_app(settings, store, budget_warnings=False))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        yield c
    server.stop()
    store.dispose()


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "Ni\x00ne"),
        ("network", "eip155:\x001"),
        ("asset", "0x\x00"),
        ("supportedGpuTypes", ["A1\x0000"]),
    ],
)
def test_a_vendor_text_with_a_nul_is_refused_on_both_stores(
    client: httpx.Client, field: str, value: object
) -> None:
    """Before the fix: SQLite stored a vendor whose name (network, asset, GPU type) held a NUL
    character while PostgreSQL refused the same PUT: the two stores disagreed."""
    answer = client.put("/api/vendors/v9", json={**VENDOR, field: value})
    assert answer.status_code == 422, answer.text
    assert client.get("/api/vendors").json() == []  # nothing stored
    # PATCH alike, on a vendor that exists
    assert client.put("/api/vendors/v9", json=VENDOR).status_code == 200
    patched = client.patch("/api/vendors/v9", json={field: value})
    assert patched.status_code == 422, patched.text
    [vendor] = client.get("/api/vendors").json()
    assert vendor[field] == VENDOR.get(field)


@pytest.mark.parametrize("method,suffix", [("DELETE", "/cooldown"), ("PATCH", "")])
def test_a_404_does_not_echo_an_oversized_vendor_id(
    client: httpx.Client, method: str, suffix: str
) -> None:
    """Before the fix: a 404 for an unknown vendor repeated the path's id uncut (5,000
    characters in, 5,000 characters back in the error message)."""
    vendor_id = "x" * 5_000
    answer = client.request(method, f"/api/vendors/{vendor_id}{suffix}", json={"name": "n"})
    assert answer.status_code == 404, answer.text
    assert len(answer.json()["error"]) < 300


@pytest.mark.parametrize("change", [{"basePricePerHour": 0.01}, {"supportedGpuTypes": ["H100"]}])
def test_a_cloud_vendors_price_and_gpus_stay_those_of_its_terms(
    client: httpx.Client, change: dict[str, object]
) -> None:
    """Before the fix: a PATCH or PUT could set a cloud vendor's price or GPU types apart from
    its stored cloud terms, so the registry (and the first-payment preview built from the
    price) said one thing while the agent rented by the terms."""
    created = client.post("/api/vendors/cloud", json=CLOUD)
    assert created.status_code == 201, created.text
    read = created.json()
    patched = client.patch(f"/api/vendors/{read['vendorId']}", json=change)
    assert patched.status_code == 422, patched.text
    assert "POST /api/vendors/cloud" in patched.json()["error"]
    put = client.put(f"/api/vendors/{read['vendorId']}", json={**read, **change})
    assert put.status_code == 422, put.text
    [after] = client.get("/api/vendors").json()
    assert after["basePricePerHour"] == 2.5 and after["supportedGpuTypes"] == ["A100"]
    # the vendor as read can still be written back, and its name changed
    renamed = client.put(f"/api/vendors/{read['vendorId']}", json={**read, "name": "Pod"})
    assert renamed.status_code == 200, renamed.text


@pytest.mark.parametrize("method,suffix", [("DELETE", "/cooldown"), ("PATCH", "")])
def test_an_unknown_vendor_id_with_a_nul_is_a_404_on_both_stores(
    client: httpx.Client, method: str, suffix: str
) -> None:
    """Before the fix: a path id holding a NUL character was a 404 on SQLite but a 422 "a
    value the store cannot keep" on PostgreSQL: the same request answered two ways."""
    answer = client.request(method, f"/api/vendors/v%009{suffix}", json={"name": "n"})
    assert answer.status_code == 404, answer.text
    assert "\x00" not in answer.json()["error"]
