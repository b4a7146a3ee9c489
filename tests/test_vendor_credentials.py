"""Each vendor's credential goes only to that vendor, is stored encrypted and never shown; and
registering a vendor checks every field (422 in the error envelope, never a 500).

Real servers on loopback: the API, the seeds' world (facilitator and two mock vendors), and a
third "vendor" that only records the headers it receives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from procure.agent.runtime import close_deps
from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.models import JobSpec, Quote
from procure.settings import Settings
from procure.store import open_store, repo
from procure.vendors.client import VendorClient, VendorError
from procure.vendors.credentials import KEY_ENV, KEY_FILE, CredentialError, Keyring
from world import SECRET, World, drive, start_world, state_of

OWN = "v3-own-credential-Zq81"
PAY_TO = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"


class Recorder:
    """A loopback "vendor" that records every request's path and headers. It answers a quote
    (for vendor `v3`) when `quotes` is set, a 404 to job-status, and a 503 to anything else."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.quotes = False
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
        async def anything(path: str, request: Request) -> JSONResponse:
            path = path.rsplit("/", 1)[-1]  # the endpoint may have a path of its own
            self.seen.append((path, {k.lower(): v for k, v in request.headers.items()}))
            if path == "quote" and self.quotes:
                return JSONResponse(
                    {
                        "quoteId": "q1",
                        "vendorId": "v3",
                        "gpuType": "A100",
                        "hours": 1.0,
                        "pricePerHour": 0.5,
                        "amount": 0.5,
                    }
                )
            if path == "job-status":
                return JSONResponse({"error": "unknown job"}, status_code=404)
            return JSONResponse({"error": "down"}, status_code=503)

        self.server: LocalServer = serve(app)

    @property
    def url(self) -> str:
        return self.server.url

    def authorizations(self) -> list[str | None]:
        return [headers.get("authorization") for _, headers in self.seen]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.server.stop()


@pytest.fixture
def healthy(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = start_world(tmp_path, db_url)
    yield w
    w.stop()


@pytest.fixture
def api_of(healthy: World) -> Iterator[httpx.Client]:
    server = serve(create_app(healthy.settings, healthy.store))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()


def third(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "vendorId": "v3",
        "name": "Elsewhere",
        "endpoint": endpoint,
        "basePricePerHour": 0.5,
        "reliabilityScore": 0.99,
        "supportedGpuTypes": ["A100"],
        **extra,
    }


def stored_credential(world: World, vendor_id: str) -> str | None:
    with world.store.session() as s:
        return s.execute(
            text("SELECT credential FROM vendors WHERE vendor_id = :v"), {"v": vendor_id}
        ).scalar_one()


def store_vendor(world: World, vendor_id: str) -> Any:
    with world.store.session() as s:
        vendor = repo.get_vendor(s, vendor_id)
    assert vendor is not None
    return vendor


async def talk_to(world: World, vendor_id: str, client: VendorClient | None = None) -> None:
    """Quote, job-status and cancel-job with the agent's own client and the stored vendor."""
    deps = world.deps()
    client = client or deps.vendors
    vendor = store_vendor(world, vendor_id)
    try:
        await client.quote(vendor, JobSpec())
        assert await client.status(vendor, vendor_job_id="j1") is None
        with pytest.raises(VendorError):
            await client.cancel(vendor, "j1")
    finally:
        if client is not deps.vendors:
            await client.aclose()
        await close_deps(deps)


async def quote_from(world: World, vendor_id: str) -> Quote:
    deps = world.deps()
    try:
        return await deps.vendors.quote(store_vendor(world, vendor_id), JobSpec())
    finally:
        await close_deps(deps)


# --- credentials go to their owner only -------------------------------------------------------


def test_a_third_vendor_gets_its_own_credential_and_never_the_seeds(
    healthy: World, api_of: httpx.Client, recorder: Recorder
) -> None:
    recorder.quotes = True
    # Registered without a credential: no Authorization header at all.
    saved = api_of.put("/api/vendors/v3", json=third(recorder.url))
    assert saved.status_code == 200, saved.text
    assert saved.json()["hasCredential"] is False
    asyncio.run(talk_to(healthy, "v3"))
    assert [p for p, _ in recorder.seen] == ["quote", "job-status", "cancel-job"]
    assert recorder.authorizations() == [None, None, None]

    # Given its own: that one, and only that one, on every call.
    recorder.seen.clear()
    saved = api_of.put("/api/vendors/v3", json=third(recorder.url, credential=OWN))
    assert saved.status_code == 200, saved.text
    assert saved.json()["hasCredential"] is True
    asyncio.run(talk_to(healthy, "v3"))
    assert recorder.authorizations() == [f"Bearer {OWN}"] * 3
    assert not any(SECRET in json.dumps(h) for _, h in recorder.seen)

    # The seeds' vendors still get theirs (GPU_VENDOR_SECRET): the mock answers a quote only
    # with it.
    quote = asyncio.run(quote_from(healthy, "gpu_vendor_1"))
    assert quote.vendor_id == "gpu_vendor_1"


def test_the_agent_tries_the_third_vendor_without_the_seeds_credential_and_still_completes(
    healthy: World, api_of: httpx.Client, recorder: Recorder
) -> None:
    # The cheapest, most reliable vendor is the recorder (down: 503): the agent goes there
    # first, then completes the run at the seeds' vendors with their own credential.
    assert api_of.put("/api/vendors/v3", json=third(recorder.url)).status_code == 200
    run_id = healthy.new_run()
    messages = asyncio.run(drive(healthy.deps(), run_id))
    state = state_of(healthy, run_id)
    assert state.run.status == "completed", messages
    assert recorder.seen, "the agent never tried the third vendor"
    assert recorder.authorizations() == [None] * len(recorder.seen)
    assert not any(SECRET in json.dumps(h) for _, h in recorder.seen)
    assert {j.vendor_id for j in state.jobs} <= {"gpu_vendor_1", "gpu_vendor_2"}


def test_changing_the_endpoint_drops_the_credential(
    healthy: World, api_of: httpx.Client, recorder: Recorder
) -> None:
    assert api_of.put("/api/vendors/v3", json=third(recorder.url, credential=OWN)).is_success
    first = stored_credential(healthy, "v3")
    assert first is not None

    # Same endpoint, no credential: kept (e.g. a price change).
    again = api_of.put("/api/vendors/v3", json=third(recorder.url, basePricePerHour=0.6))
    assert again.json()["hasCredential"] is True
    assert stored_credential(healthy, "v3") == first

    # Elsewhere without the credential again: dropped, and nothing is sent there.
    moved = api_of.put("/api/vendors/v3", json=third(f"{recorder.url}/elsewhere"))
    assert moved.status_code == 200, moved.text
    assert moved.json()["hasCredential"] is False
    assert stored_credential(healthy, "v3") is None
    recorder.quotes = True
    asyncio.run(talk_to(healthy, "v3"))
    assert recorder.authorizations() == [None, None, None]

    # Elsewhere with a credential: kept; an explicit null drops it.
    assert api_of.put("/api/vendors/v3", json=third(recorder.url, credential=OWN)).is_success
    assert stored_credential(healthy, "v3") is not None
    dropped = api_of.put("/api/vendors/v3", json=third(recorder.url, credential=None))
    assert dropped.json()["hasCredential"] is False
    assert stored_credential(healthy, "v3") is None


def test_credentials_are_stored_encrypted_and_never_shown(
    healthy: World, api_of: httpx.Client, recorder: Recorder
) -> None:
    put = api_of.put("/api/vendors/v3", json=third(recorder.url, credential=OWN))
    assert put.status_code == 200
    assert api_of.put("/api/vendors/v4", json=third(recorder.url, vendorId="v4")).is_success

    stored = {v: stored_credential(healthy, v) for v in ("gpu_vendor_1", "gpu_vendor_2", "v3")}
    keyring = Keyring.load(healthy.settings.home)
    assert keyring.decrypt(stored["v3"] or "") == OWN
    assert keyring.decrypt(stored["gpu_vendor_1"] or "") == SECRET
    for ciphertext in stored.values():
        assert ciphertext and OWN not in ciphertext and SECRET not in ciphertext
    assert stored_credential(healthy, "v4") is None

    listed = api_of.get("/api/vendors")
    assert listed.status_code == 200
    shown = {v["vendorId"]: v for v in listed.json()}
    assert {k: v["hasCredential"] for k, v in shown.items()} == {
        "gpu_vendor_1": True,
        "gpu_vendor_2": True,
        "v3": True,
        "v4": False,
    }
    key = (healthy.settings.home / KEY_FILE).read_text().strip()
    for body in (listed.text, put.text, api_of.get("/openapi.json").text):
        assert OWN not in body and SECRET not in body and key not in body
        for ciphertext in stored.values():
            assert ciphertext and ciphertext not in body
    assert all("credential" not in v for v in shown.values())
    # Nor in a repr (the domain model's, as a log line would show it).
    assert stored["v3"] not in repr(store_vendor(healthy, "v3"))


def test_a_credential_this_key_cannot_open_sends_nothing_and_warns(
    healthy: World,
    api_of: httpx.Client,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder.quotes = True
    assert api_of.put("/api/vendors/v3", json=third(recorder.url, credential=OWN)).is_success
    other_key = Keyring(Fernet.generate_key())  # e.g. a worker started with another key
    with caplog.at_level(logging.WARNING, logger="procure.vendors.client"):
        asyncio.run(talk_to(healthy, "v3", VendorClient(other_key, timeout_s=5)))
    assert recorder.authorizations() == [None, None, None]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("v3" in w and "cannot be decrypted" in w for w in warnings), warnings
    assert len(warnings) == 1  # once per credential, not per call
    assert not any(OWN in w for w in warnings)


# --- the key ----------------------------------------------------------------------------------


def test_the_key_file_is_created_private_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    home = tmp_path / "home"
    first = Keyring.load(home)
    path = home / KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = first.encrypt("s3cret")
    assert Keyring.load(home).decrypt(token) == "s3cret"
    assert "s3cret" not in token and "s3cret" not in repr(first)


def test_procure_secret_key_wins_and_a_bad_one_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shared = Fernet.generate_key().decode()
    monkeypatch.setenv(KEY_ENV, shared)
    token = Keyring.load(tmp_path / "worker-a").encrypt("s3cret")
    assert Keyring.load(tmp_path / "worker-b").decrypt(token) == "s3cret"  # same key, any home
    assert not (tmp_path / "worker-a" / KEY_FILE).exists()
    with pytest.raises(CredentialError, match="cannot be decrypted"):
        Keyring(Fernet.generate_key()).decrypt(token)
    with pytest.raises(CredentialError, match="cannot be decrypted"):
        Keyring(shared).decrypt("not a token")
    monkeypatch.setenv(KEY_ENV, "not-a-key")
    with pytest.raises(CredentialError, match="not a Fernet key"):
        Keyring.load(tmp_path)


# --- registration is validated ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("api")
    url = f"sqlite:///{tmp / 'procure.db'}"
    store = open_store(url)
    server = serve(create_app(Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp), store))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()
    store.dispose()


GOOD = third("http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"basePricePerHour": "abc"}, "basePricePerHour"),
        ({"basePricePerHour": "Infinity"}, "basePricePerHour"),
        ({"basePricePerHour": "1.40"}, "basePricePerHour"),
        ({"basePricePerHour": 1e20}, "basePricePerHour"),
        ({"basePricePerHour": 1e308}, "basePricePerHour"),
        ({"basePricePerHour": 10**30}, "basePricePerHour"),
        ({"basePricePerHour": 10_000.01}, "basePricePerHour"),
        ({"basePricePerHour": -5}, "basePricePerHour"),
        ({"basePricePerHour": True}, "basePricePerHour"),
        ({"basePricePerHour": None}, "basePricePerHour"),
        ({"successes": 1e30}, "successes"),
        ({"successes": 10**30}, "successes"),
        ({"failures": -1}, "failures"),
        ({"failures": 1.5}, "failures"),
        ({"gpuHours": -1}, "gpuHours"),
        ({"gpuHours": 1e300}, "gpuHours"),
        ({"reliabilityScore": 7}, "reliabilityScore"),
        ({"reliabilityScore": -0.1}, "reliabilityScore"),
        ({"payTo": "0xnotanaddress"}, "payTo"),
        ({"payTo": PAY_TO.lower()[2:]}, "payTo"),  # no 0x
        ({"payTo": PAY_TO[:-1] + ("a" if PAY_TO[-1] != "a" else "b")}, "payTo"),
        ({"payTo": PAY_TO.swapcase().replace("0X", "0x")}, "payTo"),  # wrong checksum
        ({"payTo": 12}, "payTo"),
        ({"endpoint": "ftp://x"}, "endpoint"),
        ({"endpoint": "not a url"}, "endpoint"),
        ({"endpoint": "http://"}, "endpoint"),
        ({"endpoint": "http://host:99999"}, "endpoint"),
        ({"endpoint": "http://user:pw@host"}, "endpoint"),
        ({"endpoint": "http://host/?a=1"}, "endpoint"),
        ({"endpoint": "http://h\u00e9st"}, "endpoint"),
        ({"endpoint": "http://" + "h" * 500}, "endpoint"),
        ({"endpoint": "javascript:alert(1)"}, "endpoint"),
        ({"supportedGpuTypes": ["A100"] * 33}, "supportedGpuTypes"),
        ({"supportedGpuTypes": ["x" * 65]}, "supportedGpuTypes"),
        ({"supportedGpuTypes": [1]}, "supportedGpuTypes"),
        ({"supportedGpuTypes": "A100"}, "supportedGpuTypes"),
        ({"name": "n" * 201}, "name"),
        ({"name": ""}, "name"),
        ({"vendorId": "v" * 65}, "vendorId"),
        ({"vendorId": "v 3"}, "vendorId"),
        ({"vendorId": "v3/../x"}, "vendorId"),
        ({"network": "n" * 65}, "network"),
        ({"asset": ""}, "asset"),
        ({"credential": ""}, "credential"),
        ({"credential": "has space"}, "credential"),
        ({"credential": "line\r\nX-Injected: 1"}, "credential"),
        ({"credential": "caf\u00e9"}, "credential"),
        ({"credential": "c" * 4097}, "credential"),
        ({"credential": 12}, "credential"),
        ({"createdAt": "not a date"}, "createdAt"),  # read-only: ignored, yet checked
        ({"credentail": "typo"}, "credentail"),
    ],
)
def test_bad_registrations_are_422_naming_the_field(
    bare_api: httpx.Client, change: dict[str, Any], field: str
) -> None:
    body = {**GOOD, **change}
    vendor_id = body["vendorId"] if isinstance(body["vendorId"], str) else "v3"
    response = bare_api.put(f"/api/vendors/{vendor_id}", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in error
    if isinstance(change.get("credential"), str) and change["credential"]:
        assert change["credential"] not in response.text


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_json_literals_are_422(bare_api: httpx.Client, literal: str) -> None:
    body = json.dumps(GOOD).replace('"basePricePerHour": 0.5', f'"basePricePerHour": {literal}')
    assert literal in body
    response = bare_api.put(
        "/api/vendors/v3", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "basePricePerHour" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b"null", b'"v3"', b"{", b"not json"],
)
def test_bodies_that_are_not_a_vendor_are_422(bare_api: httpx.Client, body: bytes) -> None:
    response = bare_api.put(
        "/api/vendors/v3", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "error" in response.json()


def test_the_path_and_the_body_must_name_the_same_vendor(bare_api: httpx.Client) -> None:
    response = bare_api.put("/api/vendors/other", json=GOOD)
    assert response.status_code == 400
    assert "vendorId" in response.json()["error"]


def test_the_largest_valid_registration_is_stored_on_each_backend(
    tmp_path: Path, db_url: str
) -> None:
    store = open_store(db_url)
    server = serve(create_app(Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path), store))
    vendor_id = "V" * 64
    body = {
        "vendorId": vendor_id,
        "name": "n" * 200,
        "endpoint": "https://" + "h" * 480 + ".example/",
        "basePricePerHour": 10_000,
        "reliabilityScore": 1,
        "supportedGpuTypes": ["g" * 64] * 32,
        "payTo": PAY_TO.lower(),
        "network": "n" * 64,
        "asset": "a" * 64,
        "successes": 10**9,
        "failures": 10**9,
        "gpuHours": 1e9,
        "credential": "~" * 4096,
    }
    try:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            response = api.put(f"/api/vendors/{vendor_id}", json=body)
            assert response.status_code == 200, response.text
            saved = response.json()
            assert saved["payTo"] == PAY_TO  # stored checksummed
            assert saved["endpoint"] == body["endpoint"].rstrip("/")  # paths are appended
            assert saved["basePricePerHour"] == 10_000
            assert saved["hasCredential"] is True
            zero = api.put(
                "/api/vendors/v0", json={**GOOD, "vendorId": "v0", "basePricePerHour": 0}
            )
            assert zero.status_code == 200, zero.text
            assert "~" * 4096 not in api.get("/api/vendors").text
    finally:
        server.stop()
        store.dispose()
