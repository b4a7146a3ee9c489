"""The HTTP API against concurrent writers and what it shows: a PATCH keeps a change made while
it ran, a vendor made a cloud account meanwhile is not turned into an x402 one, no page runs a
script from another site, and a node echoing the fleet's node token does not show it."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from procure.api.app import create_app
from procure.api.serverless import create_serverless_app
from procure.local import serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import Store, fleet_repo, open_store, repo
from stores import migrated_sqlite
from test_vendor_writes import AUTH, TOKEN, VENDOR, api  # noqa: F401  (api: a fixture)

DEADLINE_S = 30.0


class HeldRead:
    """Holds the second read of one vendor made while armed (a PATCH's read inside its write,
    after its first read outside it) until released: another request then runs in between."""

    def __init__(self, vendor_id: str = "v9") -> None:
        self.vendor_id = vendor_id
        self.real = repo.get_vendor
        self.armed = False
        self.calls = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, s: Any, vendor_id: str) -> Any:
        hold = False
        with self.lock:
            if self.armed and vendor_id == self.vendor_id:
                self.calls += 1
                if self.calls == 2:
                    hold, self.armed = True, False
        if hold:
            self.held.set()
            assert self.release.wait(DEADLINE_S), "the held read was never released"
        return self.real(s, vendor_id)


def test_a_patch_does_not_undo_a_change_made_while_it_ran(
    api: tuple[httpx.Client, Store],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the fix: a PATCH wrote back every field as it had read them at its start, so a
    change committed meanwhile (another PATCH of the price, a move of the endpoint) was silently
    undone by a PATCH that named only the vendor's name."""
    client, _store = api
    gate = HeldRead()
    monkeypatch.setattr(repo, "get_vendor", gate)
    answers: dict[str, httpx.Response] = {}

    def rename() -> None:
        answers["rename"] = client.patch("/api/vendors/v9", json={"name": "Nine renamed"})

    gate.armed = True
    renaming = threading.Thread(target=rename)
    renaming.start()
    try:
        assert gate.held.wait(DEADLINE_S), "the rename never reached its write"
        moved = client.patch(
            "/api/vendors/v9",
            json={"basePricePerHour": 3.0, "endpoint": "http://127.0.0.1:19", "credential": "n3w"},
        )
        assert moved.status_code == 200, moved.text
    finally:
        gate.release.set()
        renaming.join(DEADLINE_S)
    assert answers["rename"].status_code == 200, answers["rename"].text
    [vendor] = client.get("/api/vendors").json()
    assert vendor["name"] == "Nine renamed"
    assert vendor["basePricePerHour"] == 3.0
    assert vendor["endpoint"] == "http://127.0.0.1:19"
    assert vendor["hasCredential"] is True


OFF_SITE = re.compile(r"""<(?:script|link)\b[^>]*?(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


@pytest.mark.parametrize("which", ["api", "serverless"])
def test_no_page_of_the_api_runs_a_script_from_another_site(tmp_path: Path, which: str) -> None:
    """Before the fix: /redoc (FastAPI's default, left on) loaded ReDoc's script, unpinned
    (`redoc@2`), from cdn.jsdelivr.net, and the serverless app's /docs Swagger's as well: a script
    from a third party ran on the API's own origin, where it could use the dashboard's session
    cookie or an open API to start runs that spend the wallet's money."""
    url = migrated_sqlite(tmp_path / "procure.db")
    settings = Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    store = open_store(url)
    app = create_app(settings, store) if which == "api" else create_serverless_app(settings, store)
    server = serve(app)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for path in ("/redoc", "/docs"):
                page = client.get(path)
                assert page.status_code in (200, 404), (path, page.status_code)
                if page.status_code == 200:
                    assert not OFF_SITE.search(page.text), (path, OFF_SITE.findall(page.text))
    finally:
        server.stop()
        store.dispose()


def test_a_vendor_registered_as_a_cloud_account_meanwhile_is_not_turned_into_an_x402_one(
    api: tuple[httpx.Client, Store],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the fix: a PUT of a new x402 vendor checked the id against the registry before its
    write; a cloud account registered under that id in between was then overwritten with the
    PUT's endpoint and credential while it stayed a cloud vendor (200 to both callers)."""
    client, _store = api
    gate = HeldRead("lambda-a100")
    monkeypatch.setattr(repo, "get_vendor", gate)
    answers: dict[str, httpx.Response] = {}
    x402 = {**VENDOR, "vendorId": "lambda-a100"}

    def register() -> None:
        answers["put"] = client.put("/api/vendors/lambda-a100", json=x402)

    gate.armed = True
    registering = threading.Thread(target=register)
    registering.start()
    try:
        assert gate.held.wait(DEADLINE_S), "the PUT never reached its write"
        cloud = client.post(
            "/api/vendors/cloud", json={"provider": "lambda", "gpu": "A100", "maxPricePerHour": 2}
        )
        assert cloud.status_code == 201, cloud.text
    finally:
        gate.release.set()
        registering.join(DEADLINE_S)
    assert answers["put"].status_code in (409, 422), answers["put"].text
    vendor = next(v for v in client.get("/api/vendors").json() if v["vendorId"] == "lambda-a100")
    assert vendor["kind"] == "cloud"
    assert vendor["endpoint"] == "cloud:lambda"
    assert vendor["hasCredential"] is False


NODE_TOKEN = "h104-node-token-7f3a9c"


def test_a_node_echoing_the_node_token_does_not_show_it_to_api_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: GET /api/nodes put a node's `/models` error text in its answer with only
    the remembered secrets scrubbed, and the fleet's node token (sent to every node, shared by
    all) was never remembered: a node that echoed it showed it to anyone who may read the API."""
    node = FastAPI()

    @node.get("/models")
    async def models() -> dict[str, Any]:
        return {"status": "error", "error": f"token {NODE_TOKEN} is not this node's"}

    node_server = serve(node)
    monkeypatch.setenv("LAMBDA_LABS_NODE_TOKEN", NODE_TOKEN)
    monkeypatch.setenv("LAMBDA_LABS_NODE_PORT", str(node_server.port))
    url = migrated_sqlite(tmp_path / "procure.db")
    store = open_store(url)
    now = utcnow()
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            now,
            instance_id="i-echo",
            name="echo",
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip="127.0.0.1",
            status="active",
            price_per_hour=1_290_000,
            launched_by=None,
            node_url=f"http://127.0.0.1:{node_server.port}",  # as the fleet's scan checked it
        )
        fleet_repo.add_samples(
            s, [{"instance_id": "i-echo", "taken_at": now, "reachable": True, "gpu_util": 5.0}]
        )
    settings = Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as client:
            answer = client.get("/api/nodes")
        assert answer.status_code == 200, answer.text
        [shown] = answer.json()
        assert shown["models"]["state"] == "error", shown
        assert NODE_TOKEN not in answer.text
    finally:
        server.stop()
        node_server.stop()
        store.dispose()


def test_a_token_from_a_secret_file_and_a_lowercase_scheme_are_let_in(tmp_path: Path) -> None:
    """Before the fix: PROCURE_API_TOKEN read from a secret file kept its trailing newline, which
    no client can send (the API was locked to everyone), and `bearer` in lower case was refused
    although HTTP's scheme names are case-insensitive."""
    url = migrated_sqlite(tmp_path / "procure.db")
    settings = Settings(
        PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN + "\n"
    )
    store = open_store(url)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}"):
                answer = client.get("/api/runs", headers={"Authorization": header})
                assert answer.status_code == 200, (header, answer.status_code)
            for wrong in (f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer  {TOKEN}", "Bearer"):
                answer = client.get("/api/runs", headers={"Authorization": wrong})
                assert answer.status_code == 401, (wrong, answer.status_code)
    finally:
        server.stop()
        store.dispose()
