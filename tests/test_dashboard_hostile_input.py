"""The dashboard and the API's write endpoints under input from outside: pages stay up whatever
a node, a facilitator or a crafted request sends; an approval's time left is what approving will
judge; a stale approval is refused; a cloud vendor can be edited. Real app on loopback, real
store."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from sqlalchemy import update

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.api.app import create_app
from procure.local import LocalServer, free_port, serve
from procure.models import JobSpec, RunStatus, utcnow
from procure.settings import Settings
from procure.store import Store, fleet_repo, open_store, repo
from procure.store.fleet_tables import FleetLeaseRow


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = open_store(db_url)
    yield opened
    opened.dispose()


def _app(store: Store, db_url: str, tmp_path: Path) -> LocalServer:
    settings = Settings(
        PROCURE_DATABASE_URL=db_url,
        PROCURE_HOME=tmp_path / "home",
        X402_FACILITATOR_URL="http://127.0.0.1:9",
    )
    return serve(create_app(settings, store))


@pytest.fixture
def site(store: Store, db_url: str, tmp_path: Path) -> Iterator[str]:
    server = _app(store, db_url, tmp_path)
    yield server.url
    server.stop()


def _status(http: httpx.Client, path: str) -> tuple[int, str]:
    """A page's status and text; a connection the server dropped reads as status 0."""
    try:
        answer = http.get(path)
    except httpx.TransportError as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    return answer.status_code, answer.text


def _node_answering(body: bytes) -> tuple[LocalServer, int]:
    """A GPU node on loopback whose `GET /models` answers `body` (JSON)."""
    node = FastAPI()

    @node.get("/models")
    async def models() -> Response:
        return Response(body, media_type="application/json")

    port = free_port()
    return serve(node, port), port


def _node_row(store: Store, instance_id: str, name: str, ip: str) -> None:
    """A running instance of the fleet's, as a scan records it, whose node is at `ip`."""
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            utcnow(),
            instance_id=instance_id,
            name=name,
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip=ip,
            status="active",
            price_per_hour=1_290_000,
            launched_by=None,
        )


def _nodes_pages(server: LocalServer) -> tuple[tuple[int, str], tuple[int, str]]:
    """`GET /api/nodes` and the Nodes page: (status, body) each."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        return _status(http, "/api/nodes"), _status(http, "/nodes")


def test_a_node_answering_a_huge_model_size_leaves_the_nodes_page_up(
    store: Store, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: one GPU node whose `/models` lists a model size as a 400-digit integer (valid
    JSON) makes `size / 1e9` raise OverflowError, which `models_of` does not catch: the whole Nodes
    page and `GET /api/nodes` answer 500 instead of saying that node's models are unavailable."""
    huge = b'{"status":"ok","models":[{"name":"llama3","size":1' + b"0" * 400 + b"}]}"
    node, port = _node_answering(huge)
    monkeypatch.setenv("LAMBDA_LABS_NODE_PORT", str(port))
    _node_row(store, "i-huge", "hostile-node", "127.0.0.1")
    server = _app(store, db_url, tmp_path)
    try:
        api, page = _nodes_pages(server)
        assert api[0] == 200, api[1]
        (listed,) = json.loads(api[1])
        assert listed["instance_id"] == "i-huge"  # the node is listed, its models said
        assert page[0] == 200 and "hostile-node" in page[1], page
    finally:
        server.stop()
        node.stop()


def test_a_node_with_an_ipv6_address_leaves_the_nodes_page_up(
    store: Store, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the clouds' wire code keeps IPv6 addresses (Lambda's `node_url` even brackets
    them), but the Nodes page asks `http://{ip}:{port}/models` unbracketed: httpx raises InvalidURL
    (not an `httpx.HTTPError`, so not caught) and the Nodes page and `GET /api/nodes` answer 500."""
    monkeypatch.setenv("LAMBDA_LABS_NODE_PORT", str(free_port()))
    _node_row(store, "i-v6", "v6-node", "::1")
    server = _app(store, db_url, tmp_path)
    try:
        api, page = _nodes_pages(server)
        assert api[0] == 200, api[1]
        (listed,) = json.loads(api[1])
        assert listed["models"]["state"] in ("error", "skipped")  # nothing listens there
        assert page[0] == 200 and "v6-node" in page[1], page
    finally:
        server.stop()


def test_offers_page_refuses_a_superscript_count_plainly(site: str) -> None:
    """Before the fix: `/offers?count=²`: `str.isdigit()` is true for superscript digits but `int()`
    refuses them, so the filter check raises ValueError and the page answers 500 instead of naming
    the bad filter (422), as it does for `count=x`."""
    with httpx.Client(base_url=site, timeout=30) as http:
        plain = http.get("/offers", params={"count": "x"})
        crafted = http.get("/offers", params={"count": "\u00b2"})
    assert plain.status_code == 422 and "GPUs per instance" in plain.text
    assert crafted.status_code == 422, crafted.text
    assert "GPUs per instance" in crafted.text


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def _time_left_s(html: str, action_id: str) -> int | None:
    """The "Time left" the Fleet page shows for a pending action, in seconds."""
    row = re.search(rf'<tr data-action="{re.escape(action_id)}">(.*?)</tr>', html, re.S)
    assert row, "the action is not listed as pending"
    left = re.search(r'data-label="Time left">(\d+) min (\d+) s<', row.group(1))
    return int(left.group(1)) * 60 + int(left.group(2)) if left else None


def test_fleet_page_shows_no_time_left_on_an_approval_already_expired(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """Before the fix: the Fleet page counts an approval's time left from the controller's last
    scan, while approving judges expiry by the wall clock: with the last scan 24 minutes old, the
    page says "5 min 0 s" left and offers Approve, and the click is refused as expired."""

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud, confirmation_threshold=1.0) as ctx:
            ctx.clock.now = utcnow() - timedelta(minutes=40)  # type: ignore[attr-defined]
            await scan_for(ctx, 17)  # last scan 24 min ago; its action expired 19 min ago
            (action,) = all_actions(ctx)
            assert action.status == "pending"
            server = _app(store, db_url, tmp_path)
            try:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                    page = (await http.get("/fleet")).text
                    shown = _time_left_s(page, action.action_id)
                    answer = await http.post(
                        f"/fleet/actions/{action.action_id}/approve", data={"csrf": _csrf(page)}
                    )
            finally:
                server.stop()
            refused_as_expired = answer.status_code == 409 and "expired" in answer.text
            # Either the page says no time is left, or the approval it offers goes through.
            assert bool(shown) != refused_as_expired, (
                f"the page said {shown} s left; approving answered {answer.status_code}"
            )

    asyncio.run(body())


def test_an_approval_hours_after_its_deadline_is_refused_when_the_controller_was_down(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """Before the fix: `decide` judges expiry by the controller's last scan when that is over an
    hour old (a "clock far behind"), which is also what a stopped controller looks like: an approval
    given 2.5 hours after its 5-minute window closed is accepted, and the restarted controller
    launches a paid instance on that stale decision."""
    token = "review-token"

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud, confirmation_threshold=1.0) as ctx:
            ctx.clock.now = utcnow() - timedelta(hours=3)  # type: ignore[attr-defined]
            await scan_for(ctx, 17)  # then the controller stops for ~2 h 45 min
            with ctx.store.session() as s:  # scanned on a real clock: the wall clock then
                s.execute(update(FleetLeaseRow).values(clock_offset_s=0.0))
            (action,) = all_actions(ctx)
            assert action.status == "pending" and action.expires_at is not None
            settings = Settings(
                PROCURE_DATABASE_URL=db_url,
                PROCURE_HOME=tmp_path / "home",
                PROCURE_API_TOKEN=token,
                X402_FACILITATOR_URL="http://127.0.0.1:9",
            )
            server = serve(create_app(settings, store))
            try:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                    answer = await http.post(
                        f"/api/fleet/actions/{action.action_id}/approve",
                        headers={"Authorization": f"Bearer {token}"},
                    )
            finally:
                server.stop()
            ctx.clock.now = utcnow()  # type: ignore[attr-defined]
            await scan_for(ctx, 1)  # the controller is back
            assert cloud.launches == [], "launched on an approval given hours after expiry"
            assert answer.status_code == 409 and "expired" in answer.json()["error"]

    asyncio.run(body())


def test_event_stream_ignores_a_superscript_last_event_id(store: Store, site: str) -> None:
    """Before the fix: `Last-Event-ID: \u00b9` (a latin-1 header byte): `str.isdigit()` is true for
    it but `int()` refuses it, so the run's event stream answers 500 instead of ignoring a header it
    cannot use (as it ignores `Last-Event-ID: x`)."""
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id
    with store.session() as s:  # ended: the stream says so and closes at once
        repo.update_run(s, run_id, status=RunStatus.cancelled)
    url = f"{site}/api/runs/{run_id}/events"
    with httpx.Client(timeout=30) as http:
        plain = http.get(url, headers={"Last-Event-ID": "x"})
        crafted = http.get(url, headers={"Last-Event-ID": b"\xb9"})  # type: ignore[dict-item]
    assert plain.status_code == 200 and "event: end" in plain.text
    assert crafted.status_code == 200, crafted.text
    assert "event: end" in crafted.text


def test_a_cloud_vendor_can_be_patched_and_written_back(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """Before the fix: a cloud vendor's stored endpoint is `cloud:<provider>`, which
    `VendorRegistration`'s http(s)-only endpoint check refuses: `PATCH {"reliabilityScore": 0.5}` of
    a vendor added by `POST /api/vendors/cloud` answers 422 about an endpoint the user never sent,
    and the vendor as `GET` reads it cannot be written back with `PUT`, as the route promises."""
    token = "review-token"
    settings = Settings(
        PROCURE_DATABASE_URL=db_url,
        PROCURE_HOME=tmp_path / "home",
        PROCURE_API_TOKEN=token,
        X402_FACILITATOR_URL="http://127.0.0.1:9",
    )
    server = serve(create_app(settings, store))
    auth = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=auth) as http:
            added = http.post(
                "/api/vendors/cloud",
                json={"provider": "runpod", "gpu": "A100", "maxPricePerHour": 3},
            )
            assert added.status_code == 201, added.text
            vendor_id = added.json()["vendorId"]
            patched = http.patch(f"/api/vendors/{vendor_id}", json={"reliabilityScore": 0.5})
            (read,) = http.get("/api/vendors").json()
            written = http.put(f"/api/vendors/{vendor_id}", json={**read, "name": "RunPod A100s"})
    finally:
        server.stop()
    assert patched.status_code == 200, patched.text
    assert patched.json()["reliabilityScore"] == 0.5
    assert written.status_code == 200, written.text


def test_vendors_page_stays_up_when_the_facilitator_reports_a_huge_balance(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """Before the fix: the wallet's balance is `int(answer["atomic"])`; a facilitator answering
    `1e400` (JSON parses it as float infinity) raises OverflowError, which
    `FacilitatorLedger.balance` does not turn into SettlementLookupError: the Vendors page answers
    500 instead of saying the balance is unavailable."""
    facilitator = FastAPI()

    @facilitator.get("/balance/{address}")
    async def balance(address: str) -> Response:
        return Response(b'{"atomic": 1e400}', media_type="application/json")

    fake = serve(facilitator)
    settings = Settings(
        PROCURE_DATABASE_URL=db_url,
        PROCURE_HOME=tmp_path / "home",
        X402_FACILITATOR_URL=fake.url,
    )
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            status, text = _status(http, "/vendors")
    finally:
        server.stop()
        fake.stop()
    assert status == 200, text
    assert "unavailable" in text
