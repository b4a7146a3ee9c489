"""RunPod's multi-GPU pods in `GET /api/offers` and on the dashboard's Offers page (in Debian's
Chromium, as the page's own tests), over the real app, the mock RunPod and the mock Vast.ai on
loopback. RunPod prices and stocks pods of one GPU
count per catalog ask, so the offers are asked count by count: pods of 2 GPUs at twice the
per-GPU list price with the stock of 2-GPU pods, each count its own offer (RunPod's offer id is
the same for every count), a count beyond the listed ones asked for when filtered on, the brief
cache kept, and a RunPod that refuses or whose rate limit is spent not asked further."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.clouds.registry import make_cloud
from procure.clouds.runpod.catalogue import GPUS
from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.vast.mock import start_mock_cloud as start_vast
from procure.models import CloudTerms, Vendor, usd_to_micros
from procure.store import open_store, repo
from test_api_offers import offers_server
from web_browser import chromium, console_errors

A100 = "NVIDIA A100 80GB PCIe"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: offers read the vendors once per ask and nothing backend-specific."""
    return sqlite_url


def start_clouds(quotas: dict[str, int] | None = None) -> tuple[Any, Any]:
    """The mock RunPod on a still clock (its rate-limit windows never roll over, so what it
    admitted can be counted) and the mock Vast.ai."""
    config = RunPodMockConfig(speed=0)
    if quotas is not None:
        config.quotas = quotas
    return start_runpod(config), start_vast()


def clients(runpod: Any, vast: Any) -> dict[str, Any]:
    return {
        "runpod": make_cloud("runpod", api_key=runpod.api_key, api_url=runpod.url),
        "vast": make_cloud("vast", api_key=vast.api_key, api_url=vast.url),
    }


def runpod_requests(runpod: Any) -> int:
    """How many requests the mock RunPod has admitted (its day window, on a still clock)."""
    with runpod.state.lock:
        return int(runpod.state.windows.get("day", (0, 0))[1])


def register_two_gpu_vendor(db_url: str) -> None:
    """A cloud vendor for RunPod pods of two A100s at most $4/h (beside the one-A100 vendor
    that `offers_server` registers)."""
    store = open_store(db_url)
    with store.session() as s:
        repo.save_vendor(
            s,
            Vendor(
                vendor_id="runpod-2xa100",
                name="runpod 2x A100",
                endpoint="cloud:runpod",
                base_price_per_hour=usd_to_micros(4.0),
                reliability_score=0.9,
                supported_gpu_types=["A100"],
                kind="cloud",
                cloud=CloudTerms(
                    provider="runpod", gpu="A100", count=2, max_price_per_hour=usd_to_micros(4.0)
                ),
            ),
        )


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[tuple[httpx.Client, Any]]:
    runpod, vast = start_clouds()
    try:
        with (
            offers_server(tmp_path, db_url, clients(runpod, vast)) as server,
            httpx.Client(base_url=server.url, timeout=90) as client,
        ):
            register_two_gpu_vendor(db_url)
            yield client, runpod
    finally:
        runpod.stop()
        vast.stop()


def runpod_rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in body["offers"] if o["source"] == "runpod"]


def one(rows: list[dict[str, Any]], tier: str, gpu_id: str, region: str) -> dict[str, Any]:
    found = [r for r in rows if r["offerId"] == f"{tier}:{gpu_id}" and r["region"] == region]
    assert len(found) == 1, (tier, gpu_id, region, rows)
    return found[0]


def list_price(gpu_id: str, tier: str) -> float:
    """The mock's per-GPU list price per hour in that tier."""
    return GPUS[gpu_id].price(tier)


def test_count_2_lists_runpod_pods_of_two_at_their_price_and_stock(
    api: tuple[httpx.Client, Any],
) -> None:
    client, _ = api
    answer = client.get("/api/offers", params={"count": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["errors"] == []
    pods = runpod_rows(body)
    assert pods and all(o["gpuCount"] == 2 for o in body["offers"])
    for o in pods:  # twice RunPod's per-GPU list price, for the whole pod
        tier, gpu_id = o["offerId"].split(":", 1)
        assert o["pricePerHour"] == pytest.approx(2 * list_price(gpu_id, tier))
    secure = one(pods, "SECURE", A100, "US-TX-3")
    assert secure["pricePerHour"] == pytest.approx(3.28)
    assert secure["vendorId"] == "runpod-2xa100"  # the vendor that buys pods of two A100s
    # The stock of 2-GPU pods: EU-RO-1's 4 free A100s hold two such pods (RunPod says LOW)
    # where they hold four 1-GPU pods (MEDIUM).
    assert one(pods, "SECURE", A100, "EU-RO-1")["available"] == 1
    single = runpod_rows(client.get("/api/offers", params={"count": 1}).json())
    assert one(single, "SECURE", A100, "EU-RO-1")["available"] == 3
    assert one(single, "SECURE", A100, "US-TX-3")["vendorId"] == "runpod-a100"
    # Pods of 4: Montreal's 2 free H100s hold none, Texas's 8 hold two.
    four = runpod_rows(client.get("/api/offers", params={"count": 4, "gpu": "H100"}).json())
    assert {(o["region"], o["gpuCount"]) for o in four} == {("US-TX-3", 4)}
    assert one(four, "SECURE", H100, "US-TX-3")["pricePerHour"] == pytest.approx(
        4 * list_price(H100, "SECURE")
    )


def test_every_count_is_its_own_offer_and_the_clouds_are_asked_once_per_15_s(
    api: tuple[httpx.Client, Any],
) -> None:
    client, runpod = api
    body = client.get("/api/offers").json()
    assert body["errors"] == []
    offers = body["offers"]
    prices = [o["pricePerHour"] for o in offers]
    assert prices == sorted(prices)  # cheapest first, over every count
    pods = runpod_rows(body)
    assert {o["gpuCount"] for o in pods} == {1, 2, 4, 8}
    keys = [(o["offerId"], o["region"], o["gpuCount"]) for o in pods]
    assert len(keys) == len(set(keys))  # one offer id, several counts: each listed once
    same = [o for o in pods if o["offerId"] == f"SECURE:{A100}" and o["region"] == "US-TX-3"]
    per_gpu = list_price(A100, "SECURE")
    assert {o["gpuCount"]: o["pricePerHour"] for o in same} == {
        1: pytest.approx(per_gpu),
        2: pytest.approx(2 * per_gpu),
        4: pytest.approx(4 * per_gpu),
        8: pytest.approx(8 * per_gpu),  # US-TX-3 has 8 free A100s: one pod of 8
    }
    asked = runpod_requests(runpod)

    # Other filters and other counts listed above: the same answer, RunPod not asked again.
    for params in ({"count": 2}, {"count": 8, "gpu": "A100"}, {"spot": "false"}, {}):
        again = client.get("/api/offers", params=params).json()
        assert again["askedAt"] == body["askedAt"]
    assert runpod_requests(runpod) == asked

    # A count beyond the listed ones is asked for (both tiers), then kept as briefly.
    three = client.get("/api/offers", params={"count": 3}).json()
    assert three["errors"] == []
    pods3 = runpod_rows(three)
    assert pods3 and all(o["gpuCount"] == 3 for o in three["offers"])
    assert one(pods3, "SECURE", A100, "US-TX-3")["pricePerHour"] == pytest.approx(
        3 * list_price(A100, "SECURE")
    )
    assert runpod_requests(runpod) == asked + 2
    client.get("/api/offers", params={"count": 3, "gpu": "A100"})
    assert runpod_requests(runpod) == asked + 2


def test_a_spent_rate_limit_keeps_what_runpod_answered_and_holds_nothing_up(
    tmp_path: Path, db_url: str
) -> None:
    # Five catalog asks a minute: pods of 1 and 2 GPUs (two tiers each) and the secure tier of
    # pods of 4 answer; then RunPod's RateLimit header says the minute is spent, and the
    # client's pacer waits it out (a minute) before its next call: the page does not wait.
    runpod, vast = start_clouds({"minute": 5, "hour": 1000, "day": 1000})
    try:
        with (
            offers_server(tmp_path, db_url, clients(runpod, vast)) as server,
            httpx.Client(base_url=server.url, timeout=90) as client,
        ):
            body = client.get("/api/offers").json()
            assert len(body["errors"]) == 1, body["errors"]
            said = body["errors"][0]
            assert said.startswith("runpod (pods of 4 GPUs): no answer within")
            assert said.endswith("(pods of 8 GPUs not asked)")
            assert {o["gpuCount"] for o in runpod_rows(body)} == {1, 2}
            assert any(o["source"] == "vast" for o in body["offers"])  # never fatal to others
            assert runpod_requests(runpod) == 5  # nothing sent past the limit
    finally:
        runpod.stop()
        vast.stop()


def test_runpod_refusing_one_count_is_named_and_asked_no_further(
    tmp_path: Path, db_url: str
) -> None:
    runpod, vast = start_clouds()
    try:
        fault = {"endpoints": ["catalog"], "status": 429, "count": 1, "retry_after_s": 60}
        headers = {"Authorization": f"Bearer {runpod.api_key}"}
        httpx.post(f"{runpod.url}/admin/faults", json=fault, headers=headers).raise_for_status()
        with (
            offers_server(tmp_path, db_url, clients(runpod, vast)) as server,
            httpx.Client(base_url=server.url, timeout=90) as client,
        ):
            body = client.get("/api/offers").json()
            assert len(body["errors"]) == 1, body["errors"]
            said = body["errors"][0]
            assert said.startswith("runpod (pods of 1 GPU): ") and "429" in said
            assert said.endswith("(pods of 2, 4, 8 GPUs not asked)")
            assert runpod_rows(body) == []
            assert any(o["source"] == "vast" for o in body["offers"])
            assert runpod_requests(runpod) == 1  # its Retry-After is the agent's wait too
    finally:
        runpod.stop()
        vast.stop()


@pytest.fixture
def site(tmp_path: Path, db_url: str) -> Iterator[str]:
    runpod, vast = start_clouds()
    try:
        with offers_server(tmp_path, db_url, clients(runpod, vast)) as server:
            register_two_gpu_vendor(db_url)
            yield server.url
    finally:
        runpod.stop()
        vast.stop()


def test_the_offers_page_filtered_to_two_gpus_shows_runpods_two_gpu_pods(site: str) -> None:
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors = console_errors(page)
        try:
            page.goto(site + "/offers")
            counts = page.locator("table.offers tbody tr[data-source=runpod] td:nth-child(3)")
            assert set(counts.all_inner_texts()) == {"1", "2", "4", "8"}

            page.get_by_label("GPU model").fill("A100")
            page.get_by_label("GPUs per instance").fill("2")
            page.get_by_role("button", name="Show offers").click()
            page.wait_for_url(re.compile(r"/offers\?gpu=A100&count=2&"))
            row = page.locator(
                f'table.offers tbody tr[data-source=runpod][data-offer="SECURE:{A100}"]'
                '[data-region="US-TX-3"]'
            )
            assert row.count() == 1
            cells = row.locator("td").all_inner_texts()
            assert cells[2] == "2"
            assert cells[3] == f"${2 * list_price(A100, 'SECURE'):.3f}"  # $3.280 a pod
            assert cells[7] == "runpod-2xa100"
            shown = page.locator("table.offers tbody tr td:nth-child(3)").all_inner_texts()
            assert shown and set(shown) == {"2"}
        finally:
            context.close()
    assert errors == []
