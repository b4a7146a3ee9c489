"""Writing a vendor as a newcomer does (issue 21): a vendor read with GET can be written back
with PUT, a PUT that leaves out network and asset keeps them, PATCH changes only what it names,
and a cooldown can be cleared."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from procure.api.app import create_app
from procure.local import serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import Store, open_store, repo

TOKEN = "first-hour-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VENDOR = {
    "vendorId": "v9",
    "name": "Nine",
    "endpoint": "http://127.0.0.1:9",
    "basePricePerHour": 1.5,
    "reliabilityScore": 0.9,
    "supportedGpuTypes": ["A100"],
    "network": "eip155:31337",
    "asset": "0x" + "ab" * 20,
    "credential": "s3cret",
}


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[tuple[httpx.Client, Store]]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    store = open_store(db_url)
    server = serve(create_app(settings, store))
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as client:
        assert client.put("/api/vendors/v9", json=VENDOR).status_code == 200
        yield client, store
    server.stop()
    store.dispose()


def one(client: httpx.Client) -> dict:
    [vendor] = client.get("/api/vendors").json()
    return vendor


def test_a_vendor_read_can_be_written_back_as_it_is(api: tuple[httpx.Client, Store]) -> None:
    client, _ = api
    read = one(client)
    assert {"createdAt", "cooldownUntil", "hasCredential", "learnedReliability"} <= set(read)
    read["name"] = "Nine renamed"
    written = client.put("/api/vendors/v9", json=read)
    assert written.status_code == 200, written.text
    after = one(client)
    assert after["name"] == "Nine renamed"
    assert after["createdAt"] == read["createdAt"]  # read-only: ignored, not taken
    assert after["hasCredential"] is True  # same endpoint: the credential is kept


def test_a_put_without_network_and_asset_keeps_them(api: tuple[httpx.Client, Store]) -> None:
    client, _ = api
    body = {k: v for k, v in VENDOR.items() if k not in ("network", "asset", "credential")}
    assert client.put("/api/vendors/v9", json={**body, "name": "N"}).status_code == 200
    after = one(client)
    assert after["network"] == VENDOR["network"] and after["asset"] == VENDOR["asset"]
    # named as null, they are cleared: the user asked for it
    cleared = client.put("/api/vendors/v9", json={**body, "network": None, "asset": None})
    assert cleared.json()["network"] is None and cleared.json()["asset"] is None


def test_patch_changes_only_what_it_names(api: tuple[httpx.Client, Store]) -> None:
    client, _ = api
    patched = client.patch("/api/vendors/v9", json={"basePricePerHour": 2.25})
    assert patched.status_code == 200, patched.text
    after = one(client)
    assert after["basePricePerHour"] == 2.25
    assert after["name"] == "Nine" and after["network"] == VENDOR["network"]
    assert after["hasCredential"] is True
    assert client.patch("/api/vendors/nope", json={"name": "x"}).status_code == 404
    bad = client.patch("/api/vendors/v9", json={"reliabilityScore": 7})
    assert bad.status_code == 422 and "reliabilityScore" in bad.text
    assert client.patch("/api/vendors/v9", json=[1]).status_code == 422
    assert client.patch("/api/vendors/v9", json={"vendorId": "other"}).status_code == 400
    assert one(client)["basePricePerHour"] == 2.25  # nothing refused was written
    assert httpx.patch(client.base_url.join("/api/vendors/v9"), json={}).status_code == 401


def test_a_cooldown_can_be_cleared(api: tuple[httpx.Client, Store]) -> None:
    client, store = api
    with store.session() as s:
        repo.cool_down(s, "v9", utcnow() + timedelta(seconds=300))
    assert one(client)["cooldownUntil"] is not None
    cleared = client.delete("/api/vendors/v9/cooldown")
    assert cleared.status_code == 200 and cleared.json()["cooldownUntil"] is None
    assert one(client)["cooldownUntil"] is None
    assert client.delete("/api/vendors/nope/cooldown").status_code == 404


def test_the_openapi_document_marks_read_only_fields(api: tuple[httpx.Client, Store]) -> None:
    client, _ = api
    doc = client.get("/openapi.json").json()
    props = doc["components"]["schemas"]["VendorRegistration"]["properties"]
    for name in ("createdAt", "cooldownUntil", "hasCredential", "learnedReliability"):
        assert props[name].get("readOnly") is True, name
    assert props["credential"].get("writeOnly") is True
    patch = doc["paths"]["/api/vendors/{vendor_id}"]["patch"]
    schema = patch["requestBody"]["content"]["application/json"]["schema"]
    assert "required" not in schema and "basePricePerHour" in schema["properties"]
