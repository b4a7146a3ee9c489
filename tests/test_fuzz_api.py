"""Property-based fuzzing of the API from its own /openapi.json (schemathesis over hypothesis):
every operation the document lists (today's and any added later), with valid and invalid
inputs, with the bearer token and without, never answers a 5xx, every error it gives is in the
`{"error": ...}` envelope, and the server still serves afterwards. It runs on each backend
against a real server on loopback (uvicorn, the request bounds, the store)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.transport.requests import ManagedCookiesSession

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.models import JobSpec
from procure.settings import Settings
from procure.store import open_store, repo
from procure.vendors.registry import default_vendors
from world import POSTGRES_ENV, postgres_database

TOKEN = "fuzz-token"
EXAMPLES = 30


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fuzz_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend for the whole module (as conftest's `db_url`, module-wide)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'procure.db'}"
        return
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def server(fuzz_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """The API, with a token set, some vendors and a run in its store."""
    store = open_store(fuzz_db)
    with store.session() as s:
        for vendor in default_vendors():
            repo.save_vendor(s, vendor)
        repo.create_run(s, user_id="u", goal="g", budget_total=5_000_000, job_spec=JobSpec())
    live = serve(
        create_app(
            Settings(
                PROCURE_DATABASE_URL=fuzz_db,
                PROCURE_HOME=tmp_path_factory.mktemp("home"),
                PROCURE_API_TOKEN=TOKEN,
                # Nothing a fuzzed tick reaches may hang the test.
                VENDOR_TIMEOUT_S=1,
                X402_FACILITATOR_URL="http://127.0.0.1:9",
            ),
            store,
        )
    )
    try:
        yield live
    finally:
        live.stop()
        store.dispose()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    """One client for every call (kept-alive connections, no proxy lookup per request): the
    fuzzing's cost is then the server's, not the client's. schemathesis' own kind: no cookie
    kept from one call to the next, no redirect to another host followed."""
    with ManagedCookiesSession() as s:
        s.trust_env = False
        yield s


def _document() -> dict[str, Any]:
    """What /openapi.json serves (checked below against the live server's)."""
    store = open_store("sqlite:///:memory:")
    try:
        return create_app(Settings(PROCURE_API_TOKEN=TOKEN), store).openapi()
    finally:
        store.dispose()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def _check(response: Any, who: str) -> None:
    assert response.status_code < 500, (
        f"{who}: {response.request.method} {response.request.url} -> {response.status_code}: "
        f"{response.text[:500]}"
    )
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), (who, body)
        assert "detail" not in body, (who, body)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_makes_the_api_fail(
    case: Any, server: LocalServer, session: requests.Session
) -> None:
    url = server.url
    with_token = case.call(url, session, headers={"Authorization": f"Bearer {TOKEN}"})
    _check(with_token, "with the token")
    wrong = case.call(url, session, headers={"Authorization": "Bearer wrong"})
    _check(wrong, "with a wrong token")
    without = case.call(url, session)
    _check(without, "without a token")
    if case.method.upper() not in ("GET", "HEAD", "OPTIONS"):  # mutations need the token
        assert wrong.status_code >= 400, wrong.text
        assert without.status_code >= 400, without.text


def test_the_server_still_serves_after_the_fuzzing(server: LocalServer) -> None:
    health = httpx.get(f"{server.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    served = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served == DOCUMENT  # what was fuzzed is what is served: every route in it
    assert "/api/agent-start" in served["paths"]
