"""`POST /api/vendors/cloud` over real HTTP on both stores: a cloud account registered as a vendor
and listed by `GET /api/vendors`, bad values refused with 422, an x402 vendor's id with 409, and
the bearer token required when one is set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from procure.api.app import create_app
from procure.local import serve
from procure.settings import Settings
from procure.store import open_store

TOKEN = "cloud-vendors-token"
X402 = {
    "vendorId": "seller",
    "name": "Seller",
    "endpoint": "http://127.0.0.1:9",
    "basePricePerHour": 1.0,
    "reliabilityScore": 0.9,
    "supportedGpuTypes": ["A100"],
}


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Iterator[httpx.Client]:
    """The API behind a token, on each store; the client sends the token."""
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    settings = settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    store = open_store(db_url)
    server = serve(create_app(settings, store, budget_warnings=False))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=15, headers=headers) as c:
        yield c
    server.stop()
    store.dispose()


def listed(client: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = client.get("/api/vendors")
    assert answer.status_code == 200
    return {v["vendorId"]: v for v in answer.json()}


def test_a_cloud_account_is_registered_and_listed(client: httpx.Client) -> None:
    body = {
        "provider": "runpod",
        "gpu": "a100",
        "maxPricePerHour": 2.5,
        "count": 2,
        "spot": True,
        "regions": ["US-TX-3", "EU-RO-1"],
        "image": "ghcr.io/acme/train:1",
    }
    created = client.post("/api/vendors/cloud", json=body)
    assert created.status_code == 201, created.text
    vendor = created.json()
    assert vendor["vendorId"] == "runpod-a100"
    assert vendor["kind"] == "cloud"
    assert vendor["endpoint"] == "cloud:runpod"
    assert vendor["cloud"] == {
        "provider": "runpod",
        "gpu": "A100",
        "count": 2,
        "maxPricePerHour": 2.5,
        "spot": True,
        "regions": ["US-TX-3", "EU-RO-1"],
        "image": "ghcr.io/acme/train:1",
    }
    assert vendor["basePricePerHour"] == 2.5
    assert vendor["supportedGpuTypes"] == ["A100"]
    assert vendor["reliabilityScore"] == 0.9
    assert vendor == listed(client)["runpod-a100"]  # the answer is what GET lists

    # The same id again replaces the cloud terms: 200, one vendor, the new price.
    again = client.post(
        "/api/vendors/cloud",
        json={"provider": "runpod", "gpu": "A100", "maxPricePerHour": 3, "reliability": 0.5},
    )
    assert again.status_code == 200, again.text
    vendors = listed(client)
    assert list(vendors) == ["runpod-a100"]
    assert vendors["runpod-a100"]["cloud"]["maxPricePerHour"] == 3.0
    assert vendors["runpod-a100"]["cloud"]["spot"] is False
    assert vendors["runpod-a100"]["reliabilityScore"] == 0.5

    named = client.post(
        "/api/vendors/cloud",
        json={"provider": "vast", "gpu": "H100", "maxPricePerHour": 0.001, "vendorId": "cheap.1"},
    )
    assert named.status_code == 201, named.text
    assert listed(client)["cheap.1"]["cloud"]["provider"] == "vast"


def test_an_x402_vendors_id_is_a_conflict(client: httpx.Client) -> None:
    assert client.put("/api/vendors/seller", json=X402).status_code == 200
    taken = client.post(
        "/api/vendors/cloud",
        json={"provider": "lambda", "gpu": "A100", "maxPricePerHour": 2, "vendorId": "seller"},
    )
    assert taken.status_code == 409
    assert "seller" in taken.json()["error"]
    assert listed(client)["seller"]["kind"] == "x402"  # left as it was


GOOD = {"provider": "lambda", "gpu": "A100", "maxPricePerHour": 2.5}
BAD = [
    ({"provider": "aws"}, "provider"),
    ({"gpu": ""}, "gpu"),
    ({"gpu": "A100<script>"}, "gpu"),
    ({"count": 0}, "count"),
    ({"count": 17}, "count"),
    ({"count": "2"}, "count"),
    ({"maxPricePerHour": 0}, "maxPricePerHour"),
    ({"maxPricePerHour": -1}, "maxPricePerHour"),
    ({"maxPricePerHour": 0.0001}, "maxPricePerHour"),
    ({"maxPricePerHour": 1e6}, "maxPricePerHour"),
    ({"maxPricePerHour": "2.5"}, "maxPricePerHour"),
    ({"reliability": 1.5}, "reliability"),
    ({"spot": "yes"}, "spot"),
    ({"regions": ["us east"]}, "regions"),
    ({"regions": "us-east-1"}, "regions"),
    ({"regions": ["r"] * 33}, "regions"),
    ({"image": "a b"}, "image"),
    ({"vendorId": "../x"}, "vendorId"),
    ({"vendorId": "x" * 65}, "vendorId"),
    ({"surprise": 1}, "surprise"),
]


def test_bad_values_are_422_and_nothing_is_saved(client: httpx.Client) -> None:
    for change, field in BAD:
        answer = client.post("/api/vendors/cloud", json={**GOOD, **change})
        assert answer.status_code == 422, (change, answer.text)
        assert field in answer.json()["error"], (change, answer.text)
    for raw in ('{"provider": "lambda", "gpu": "A100", "maxPricePerHour": NaN}', "[]", "{"):
        answer = client.post(
            "/api/vendors/cloud", content=raw, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code in (400, 422), (raw, answer.text)
    missing = client.post("/api/vendors/cloud", json={"provider": "lambda", "gpu": "A100"})
    assert missing.status_code == 422
    assert "maxPricePerHour" in missing.json()["error"]
    huge = client.post("/api/vendors/cloud", json={**GOOD, "image": "i" * 5_000_000}, timeout=30)
    assert huge.status_code in (413, 422)
    assert listed(client) == {}


def test_the_token_is_required(client: httpx.Client) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        refused = client.post("/api/vendors/cloud", json=GOOD, headers=headers)
        assert refused.status_code == 401
        assert "token" in refused.json()["error"]
    assert listed(client) == {}
