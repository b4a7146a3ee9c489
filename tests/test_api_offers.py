"""`GET /api/offers` over HTTP with the real app: the mock RunPod and Vast.ai clouds, a Lambda
that answers 500 (named in `errors`, never fatal), registered x402 and cloud vendors; cheapest
first, the filters, the brief cache that spares the clouds, bounded parameters, and the token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from procure.agent import offers_cache
from procure.agent.runtime import make_deps
from procure.api.app import create_app
from procure.clouds.registry import make_cloud
from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.vast.mock import start_mock_cloud as start_vast
from procure.local import LocalServer, serve
from procure.models import CloudTerms, Vendor, usd_to_micros
from procure.settings import Settings
from procure.store import Store, open_store, repo

TOKEN = "offers-token"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: offers read the vendors once and nothing backend-specific."""
    return sqlite_url


@dataclass
class Clouds:
    """The mock RunPod and Vast.ai, and a Lambda that answers every request with a 500."""

    runpod: Any
    vast: Any
    broken: LocalServer
    broken_hits: list[str] = field(default_factory=list)

    def clients(self) -> dict[str, Any]:
        return {
            "runpod": make_cloud("runpod", api_key=self.runpod.api_key, api_url=self.runpod.url),
            "vast": make_cloud("vast", api_key=self.vast.api_key, api_url=self.vast.url),
            "lambda": make_cloud("lambda", api_key="lambda-key", api_url=self.broken.url),
        }


def broken_lambda(hits: list[str]) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def fail(request: Request, path: str) -> JSONResponse:
        hits.append(request.url.path)
        error = {"code": "global/unknown", "message": "the offers service fell over"}
        return JSONResponse({"error": error}, status_code=500)

    return app


@pytest.fixture
def clouds() -> Iterator[Clouds]:
    hits: list[str] = []
    runpod, vast, broken = start_runpod(), start_vast(), serve(broken_lambda(hits))
    try:
        yield Clouds(runpod, vast, broken, hits)
    finally:
        for server in (runpod, vast, broken):
            server.stop()


def register_vendors(store: Store) -> None:
    """One x402 vendor and one cloud vendor (RunPod A100 at most $2/h)."""
    with store.session() as s:
        repo.save_vendor(
            s,
            Vendor(
                vendor_id="x402-a100",
                name="x402 A100",
                endpoint="http://127.0.0.1:9",
                base_price_per_hour=usd_to_micros(1.05),
                reliability_score=0.9,
                supported_gpu_types=["A100"],
            ),
        )
        repo.save_vendor(
            s,
            Vendor(
                vendor_id="runpod-a100",
                name="runpod A100",
                endpoint="cloud:runpod",
                base_price_per_hour=usd_to_micros(2.0),
                reliability_score=0.9,
                supported_gpu_types=["A100"],
                kind="cloud",
                cloud=CloudTerms(
                    provider="runpod", gpu="A100", count=1, max_price_per_hour=usd_to_micros(2.0)
                ),
            ),
        )


@contextmanager
def offers_server(
    tmp_path: Path, db_url: str, clouds: dict[str, Any], token: str | None = None
) -> Iterator[LocalServer]:
    """`procure serve` with these cloud clients as the agent's (no worker: nothing to tick)."""
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    if token is not None:
        settings = settings.model_copy(update={"api_token": SecretStr(token)})
    store = open_store(db_url)
    register_vendors(store)
    app = create_app(
        settings, store, deps_factory=lambda: make_deps(settings, store, clouds=clouds)
    )
    server = serve(app)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(tmp_path: Path, db_url: str, clouds: Clouds) -> Iterator[httpx.Client]:
    with (
        offers_server(tmp_path, db_url, clouds.clients()) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


def prices(offers: list[dict[str, Any]]) -> list[float]:
    return [o["pricePerHour"] for o in offers]


def test_every_offer_cheapest_first_with_a_broken_cloud_named(
    api: httpx.Client, clouds: Clouds
) -> None:
    answer = api.get("/api/offers")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    offers = body["offers"]
    assert prices(offers) == sorted(prices(offers))
    assert {o["source"] for o in offers} == {"runpod", "vast", "x402"}
    assert body["clouds"] == ["lambda", "runpod", "vast"]
    # Lambda's 500 is said plainly, and the other clouds' offers still come
    assert len(body["errors"]) == 1 and body["errors"][0].startswith("lambda:")
    assert clouds.broken_hits
    x402 = [o for o in offers if o["source"] == "x402"]
    assert x402 == [
        {
            "source": "x402",
            "vendorId": "x402-a100",
            "offerId": "x402-a100",
            "gpu": "A100",
            "gpuCount": 1,
            "region": "http://127.0.0.1:9",
            "pricePerHour": 1.05,
            "interruptible": False,
            "available": 1,
            "billingIncrementS": None,
        }
    ]
    a100 = [
        o for o in offers if o["source"] == "runpod" and o["gpu"] == "A100" and o["gpuCount"] == 1
    ]
    assert a100 and all(o["vendorId"] == "runpod-a100" for o in a100)  # within its $2/h
    assert all(
        o["vendorId"] is None for o in offers if o["source"] == "runpod" and o["gpu"] != "A100"
    )
    assert any(o["interruptible"] for o in offers if o["source"] == "vast")  # Vast.ai bids


def test_filters_and_the_cache_spares_the_clouds(api: httpx.Client, clouds: Clouds) -> None:
    first = api.get("/api/offers", params={"gpu": "a100", "count": 1, "maxPrice": 1.5}).json()
    asked = len(clouds.broken_hits)
    assert first["offers"]
    assert all(o["gpu"] == "A100" and o["gpuCount"] == 1 for o in first["offers"])
    assert all(o["pricePerHour"] <= 1.5 for o in first["offers"])
    assert {o["source"] for o in first["offers"]} >= {"runpod", "x402"}
    spot = api.get("/api/offers", params={"spot": "true"}).json()["offers"]
    assert spot and all(o["interruptible"] and o["source"] == "vast" for o in spot)
    on_demand = api.get("/api/offers", params={"spot": "false"}).json()["offers"]
    assert on_demand and not any(o["interruptible"] for o in on_demand)
    for _ in range(5):
        again = api.get("/api/offers").json()
        assert again["errors"] and again["askedAt"] == first["askedAt"]
    assert len(clouds.broken_hits) == asked  # other filters, other callers: the clouds asked once
    none = api.get("/api/offers", params={"gpu": "B200"}).json()
    assert none["offers"] == []


BAD = [
    {"count": "0"},
    {"count": "17"},
    {"count": "two"},
    {"maxPrice": "-1"},
    {"maxPrice": "nan"},
    {"maxPrice": "1e400"},
    {"gpu": "<script>"},
    {"gpu": "A" * 41},
    {"gpu": ""},
    {"spot": "maybe"},
]


def test_bad_parameters_are_422(tmp_path: Path, db_url: str) -> None:
    with (
        offers_server(tmp_path, db_url, {}) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        for params in BAD:
            answer = client.get("/api/offers", params=params)
            assert answer.status_code == 422, (params, answer.text)
            assert answer.json()["error"].startswith("invalid request")
        assert client.get("/api/offers").status_code == 200


def hanging_lambda() -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET"])
    async def hang(path: str) -> JSONResponse:
        await asyncio.sleep(2.5)  # past the route's (shortened) deadline, short of the client's
        return JSONResponse({"data": {}})

    return app


def test_a_cloud_that_hangs_is_named_and_x402_offers_still_come(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offers_cache, "DEADLINE_S", 0.5)
    hanging = serve(hanging_lambda())
    try:
        lam = {"lambda": make_cloud("lambda", api_key="lambda-key", api_url=hanging.url)}
        with (
            offers_server(tmp_path, db_url, lam) as server,
            httpx.Client(base_url=server.url, timeout=30) as client,
        ):
            body = client.get("/api/offers").json()
            assert body["errors"] == ["the clouds (lambda) did not answer within 0.5 s"]
            assert [o["vendorId"] for o in body["offers"]] == ["x402-a100"]
    finally:
        hanging.stop()


def test_reads_need_the_token_unless_public(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        offers_server(tmp_path, db_url, {}, token=TOKEN) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert client.get("/api/offers").status_code == 401
        assert (
            client.get("/api/offers", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        answer = client.get("/api/offers", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200
        assert answer.json()["clouds"] == [] and answer.json()["errors"] == []
        assert [o["vendorId"] for o in answer.json()["offers"]] == ["x402-a100"]
        page = client.get("/offers", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        login = client.post("/login", data={"token": TOKEN, "next": "/offers"})
        assert login.status_code == 303 and login.headers["location"] == "/offers"
        assert client.get("/offers").status_code == 200  # the dashboard's login counts here
        assert 'name="csrf"' in client.get("/offers").text  # its log-out form
    monkeypatch.setenv("PROCURE_PUBLIC_READ", "true")
    with (
        offers_server(tmp_path, db_url, {}, token=TOKEN) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert client.get("/api/offers").status_code == 200
        assert client.get("/offers").status_code == 200
