"""The gateway (`procure gateway`): procure's own agent buys a run from a gateway in front of the
mock RunPod and it completes on a launched instance that is terminated at the end, the gateway's
income equal to what the agent paid; a replayed payment is not charged twice; hostile buyers meet
caps; capacity refusals cost nothing."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header

from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import MockCloud, start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.pacing import Pacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.gateway import book
from procure.gateway.serve import gateway_config, start_gateway
from procure.gateway.settings import GatewayConfig
from procure.local import LocalServer
from procure.models import Vendor, usd_to_micros
from procure.payments.payer import PaymentLimits, build_payer
from procure.payments.wallet import load_or_create_account
from procure.store import Store, open_store, repo
from procure.vendors.credentials import Keyring
from procure.web.spend import spend_total
from stores import migrated_if_new
from world import World, drive, start_world, state_of

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
SECRET = "gateway-test-secret"
ZERO = "0x" + "0" * 40


@dataclass
class GatewayWorld:
    world: World
    mock: MockCloud
    cfg: GatewayConfig
    store: Store
    server: LocalServer
    vendor: Vendor

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, key: str | None = None, quote: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {SECRET}"}
        if key:
            headers["Idempotency-Key"] = key
        if quote:
            headers["X-Quote-Id"] = quote
        return headers

    def pods(self) -> list[dict[str, Any]]:
        """Every pod the mock RunPod knows (deleted ones have status `DELETED` or are gone)."""
        answer = httpx.get(
            f"{self.mock.url}/admin/state",
            headers={"Authorization": f"Bearer {self.mock.api_key}"},
            timeout=10,
        )
        answer.raise_for_status()
        return list(answer.json()["instances"])

    def live_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods() if p["status"] in ("PROVISIONING", "STARTING", "RUNNING")]

    def income(self) -> int:
        return sum(t["value"] for t in self.world.chain.transfers() if t["to"] == self.cfg.pay_to)

    def quotes_together(self, n: int, timeout_s: float = 120) -> list[int]:
        """The status codes of `n` quotes for an hour of an RTX4090 asked all at once."""

        async def ask() -> list[int]:
            async with httpx.AsyncClient(timeout=timeout_s) as client:
                asked = [
                    client.post(
                        f"{self.url}/quote",
                        json={"gpuType": "RTX4090", "hours": 1.0},
                        headers=self.headers(),
                    )
                    for _ in range(n)
                ]
                return [r.status_code for r in await asyncio.gather(*asked)]

        return asyncio.run(ask())

    def stop(self) -> None:
        self.server.stop()
        self.mock.stop()
        self.store.dispose()
        self.world.stop()


class _BilledBy:
    """The mock RunPod, its offers billed by `increment_s` (as an hourly cloud's are)."""

    def __init__(self, inner: RunPodCloud, increment_s: int) -> None:
        self.inner, self.increment_s = inner, increment_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        found = await self.inner.offers(**kwargs)
        return [replace(o, billing_increment_s=self.increment_s) for o in found]


def start_gateway_world(
    tmp: Path, db_url: str, *, increment_s: int | None = None, **options: Any
) -> GatewayWorld:
    world = start_world(tmp, db_url)
    mock = start_mock_cloud(RunPodMockConfig(provision_s=0.3, start_s=0.3))
    cloud: Any = RunPodCloud(
        RunPodSettings(_env_file=None, api_key=mock.api_key, api_url=mock.url),  # type: ignore[call-arg]
        pacer=Pacer(),
    )
    if increment_s is not None:
        cloud = _BilledBy(cloud, increment_s)
    settings: dict[str, Any] = {
        "command": (
            sys.executable,
            TRAIN,
            "--steps",
            "20",
            "--step-time",
            "0.05",
            "--checkpoint-every",
            "5",
        ),
        "checkpoint_dir": str(tmp / "checkpoints"),
        "hour_s": 60.0,
        "poll_s": 0.1,
        "sweep_every_s": 1.0,
        "gpus": ("RTX4090", "A100"),
        **options,
    }
    cfg = gateway_config(
        vendor_id="gw1",
        provider="runpod",
        facilitator_url=world.facilitator.url,
        secret=SECRET,
        home=tmp / "gateway-home",
        **settings,
    )
    store = open_store(migrated_if_new(f"sqlite:///{tmp / 'gateway.db'}"))
    server = start_gateway(cfg, store, cloud, world.facilitator.url)
    vendor = Vendor(
        vendor_id="gw1",
        name="RunPod via gateway",
        endpoint=server.url,
        base_price_per_hour=usd_to_micros(0.40),
        reliability_score=0.99,
        supported_gpu_types=["RTX4090"],  # the seeds' mock vendors do not sell it
        pay_to=cfg.pay_to,
        network=cfg.network,
        asset=cfg.asset,
        credential=Keyring.load(world.settings.home).encrypt(SECRET),
    )
    with world.store.session() as s:
        repo.save_vendor(s, vendor)
    return GatewayWorld(world, mock, cfg, store, server, vendor)


@pytest.fixture
def gw(tmp_path: Path, sqlite_url: str) -> Iterator[GatewayWorld]:
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g
    g.stop()


def wait_for(what: Callable[[], Any], limit_s: float = 30.0) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met in {limit_s} s")


# --- procure's own agent ---------------------------------------------------------------------


def test_agent_completes_a_run_bought_from_the_gateway(gw: GatewayWorld) -> None:
    run_id = gw.world.new_run(budget=5.0, gpu_type="RTX4090", hours=1.0)
    asyncio.run(drive(gw.world.deps(), run_id, limit_s=90))
    state = state_of(gw.world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    [job] = state.jobs
    assert job.vendor_id == "gw1" and job.status == "completed"
    paid = [p for p in state.payments if p.status == "completed"]
    assert [p.vendor_id for p in paid] == ["gw1"]
    # The gateway's book: income equal to what the agent paid, moved on the chain to its address.
    # (the buyer hears "completed" as the gateway starts to terminate the instance)
    wait_for(lambda: book.figures(gw.store)["jobs"] == {"completed": 1})
    figures = book.figures(gw.store)
    assert usd_to_micros(figures["incomeUsd"]) == sum(p.amount for p in paid) == gw.income()
    # RTX4090 at RunPod's community price ($0.34/h) plus the 10 % margin, for one hour.
    assert sum(p.amount for p in paid) == 374_000
    # The instance is terminated (the job's log says so, and the mock has nothing running).
    wait_for(lambda: gw.live_pods() == [])
    assert len(gw.pods()) == 1 and figures["instancesLaunched"] == 1
    # ... and on its /metrics, behind procure's scrape rule (here: the buyers' bearer).
    assert httpx.get(f"{gw.url}/metrics", timeout=15).status_code == 401
    scraped = httpx.get(f"{gw.url}/metrics", headers=gw.headers(), timeout=15).text
    assert 'procure_gateway_income_usd_total{vendor_id="gw1"} 0.374' in scraped
    assert 'procure_gateway_live_instances{vendor_id="gw1"} 0' in scraped
    # ... and on the dashboard's runs page, beside what the runs spent.
    assert spend_total(gw.store)["gateway"]["income"] == pytest.approx(0.374)
    status = httpx.get(
        f"{gw.url}/job-status",
        params={"jobId": job.vendor_job_id},
        headers=gw.headers(),
        timeout=30,
    ).json()
    assert status["status"] == "completed" and status["progress"] == 1.0
    assert any(line.startswith("step 20 loss") for line in status["logs"])
    assert status["checkpointUrl"].endswith("step-000020.json")
    assert figures["instanceCostUsd"] > 0 and figures["marginUsd"] > 0


# --- paying by hand, as any x402 client does -------------------------------------------------


def quote(gw: GatewayWorld, gpu: str = "RTX4090", hours: float = 1.0) -> dict[str, Any]:
    answer = httpx.post(
        f"{gw.url}/quote", json={"gpuType": gpu, "hours": hours}, headers=gw.headers(), timeout=30
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def signed_payment(
    gw: GatewayWorld,
    required_header: str,
    account: Any,
    nonce: str,
    valid_before: int | None = None,
) -> str:
    required = decode_payment_required_header(required_header)
    [option] = required.accepts
    limits = PaymentLimits(int(option.amount), gw.cfg.pay_to, gw.cfg.asset, gw.cfg.network)
    client = build_payer(account, nonce, limits, valid_before=valid_before)
    payload = asyncio.run(client.create_payment_payload(required))
    return encode_payment_signature_header(payload)


def buyer(gw: GatewayWorld, name: str, usd: float = 20.0) -> Any:
    account = load_or_create_account(None, gw.world.tmp / f"buyer-{name}")
    gw.world.chain.mint(account.address, usd_to_micros(usd))
    return account


def submit(
    gw: GatewayWorld, key: str, q: dict[str, Any], payment: str | None = None, **extra: Any
) -> httpx.Response:
    headers = gw.headers(key, q["quoteId"])
    if payment:
        headers["PAYMENT-SIGNATURE"] = payment
    body = {"quoteId": q["quoteId"], "jobParams": {"epochs": 2}, **extra}
    return httpx.post(f"{gw.url}/submit-job", json=body, headers=headers, timeout=30)


def nonce() -> str:
    return "0x" + uuid.uuid4().hex * 2


def test_a_payment_is_charged_once_whatever_is_replayed(gw: GatewayWorld) -> None:
    account = buyer(gw, "a")
    q = quote(gw)
    first = submit(gw, "key-1", q)
    assert first.status_code == 402
    [option] = decode_payment_required_header(first.headers["PAYMENT-REQUIRED"]).accepts
    assert int(option.amount) == usd_to_micros(q["amount"])  # never more than quoted
    assert option.pay_to == gw.cfg.pay_to
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], account, nonce())
    paid = submit(gw, "key-1", q, payment)
    assert paid.status_code == 200, paid.text
    assert "PAYMENT-RESPONSE" in paid.headers
    job_id = paid.json()["jobId"]
    # The first paid answer already says what was bought (the hours and the amount of the quote).
    assert paid.json()["paidHours"] == pytest.approx(q["hours"])
    assert paid.json()["amount"] == pytest.approx(q["amount"])
    # The same request again (a retry after a lost answer): the same job, nothing charged.
    again = submit(gw, "key-1", q, payment)
    assert again.status_code == 200 and again.json()["jobId"] == job_id
    assert again.headers.get("X-Idempotent-Replay") == "true"
    # The same payment under another key: refused, nothing charged, no second job.
    other = submit(gw, "key-2", q, payment)
    assert other.status_code in (402, 409), other.text
    assert gw.income() == usd_to_micros(q["amount"])
    figures = book.figures(gw.store)
    assert figures["paymentsReceived"] == 1
    assert sum(figures["jobs"].values()) == 1
    # The job runs to its end; the instance goes.
    done = wait_for(
        lambda: (
            s
            if (
                s := httpx.get(
                    f"{gw.url}/job-status",
                    params={"jobId": job_id},
                    headers=gw.headers(),
                    timeout=30,
                ).json()
            )["status"]
            == "completed"
            else None
        )
    )
    assert done["progress"] == 1.0
    wait_for(lambda: gw.live_pods() == [])


def test_a_cancelled_job_stops_and_its_instance_goes(gw: GatewayWorld) -> None:
    account = buyer(gw, "c")
    q = quote(gw)
    first = submit(gw, "cancel-me", q)
    paid = submit(
        gw, "cancel-me", q, signed_payment(gw, first.headers["PAYMENT-REQUIRED"], account, nonce())
    )
    job_id = paid.json()["jobId"]
    wait_for(lambda: gw.live_pods())  # an instance was launched for it
    answer = httpx.post(
        f"{gw.url}/cancel-job", json={"jobId": job_id}, headers=gw.headers(), timeout=30
    )
    assert answer.json()["status"] == "cancelled"
    wait_for(lambda: gw.live_pods() == [])
    with gw.store.session() as s:
        assert wait_for(lambda: _status(gw, job_id) == "cancelled")
        assert book.job(s, job_id) is not None


def _status(gw: GatewayWorld, job_id: str) -> str:
    with gw.store.session() as s:
        row = book.job(s, job_id)
        return row.status if row else ""


# --- hostile buyers --------------------------------------------------------------------------


def test_unpaid_and_hostile_requests_cost_the_gateway_nothing(gw: GatewayWorld) -> None:
    no_auth = httpx.post(f"{gw.url}/quote", json={"gpuType": "RTX4090", "hours": 1}, timeout=30)
    assert no_auth.status_code == 401
    for body in (
        {"gpuType": "RTX4090", "hours": 10_000},  # past max hours
        {"gpuType": "X" * 5_000, "hours": 1},
        {"gpuType": "TPU", "hours": 1},
        {"gpuType": "RTX4090", "hours": -1},
    ):
        answer = httpx.post(f"{gw.url}/quote", json=body, headers=gw.headers(), timeout=30)
        assert answer.status_code in (400, 422), (body, answer.text)
    huge = httpx.post(
        f"{gw.url}/quote",
        content=b"[" * 2_000_000,
        headers=gw.headers(),
        timeout=30,
    )
    assert huge.status_code in (400, 413)
    q = quote(gw)
    # Many unpaid submissions: only 402s, no instance, no job.
    for i in range(20):
        assert submit(gw, f"unpaid-{i}", q).status_code == 402
    no_key = httpx.post(
        f"{gw.url}/submit-job",
        json={"quoteId": q["quoteId"]},
        headers=gw.headers(quote=q["quoteId"]),
        timeout=30,
    )
    assert no_key.status_code == 400
    bad_quote = submit(gw, "k", {"quoteId": "q_nope"})
    assert bad_quote.status_code == 400 and "PAYMENT-REQUIRED" not in bad_quote.headers
    # Oversized job params with a valid payment: refused before settlement, nothing moved.
    account = buyer(gw, "h")
    first = submit(gw, "big", q)
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], account, nonce())
    big = submit(gw, "big", q, payment, jobParams={"blob": "x" * 50_000})
    assert big.status_code == 400
    assert gw.income() == 0
    assert gw.pods() == [] and book.figures(gw.store)["jobs"] == {}


def test_one_buyer_cannot_take_more_than_max_instances(tmp_path: Path, sqlite_url: str) -> None:
    g = start_gateway_world(
        tmp_path,
        sqlite_url,
        max_instances=1,
        command=(sys.executable, TRAIN, "--steps", "400", "--step-time", "0.05"),
    )
    try:
        account = buyer(g, "greedy")
        q1, q2 = quote(g), quote(g)
        first = submit(g, "one", q1)
        ok = submit(
            g, "one", q1, signed_payment(g, first.headers["PAYMENT-REQUIRED"], account, nonce())
        )
        assert ok.status_code == 200
        second = submit(g, "two", q2)
        refused = submit(
            g, "two", q2, signed_payment(g, second.headers["PAYMENT-REQUIRED"], account, nonce())
        )
        assert refused.status_code == 429 and "max 1" in refused.text
        assert g.income() == usd_to_micros(q1["amount"])  # the refused one was not settled
        # Another buyer is not held back by the first.
        other = buyer(g, "other")
        third = submit(g, "three", q2)
        assert (
            submit(
                g, "three", q2, signed_payment(g, third.headers["PAYMENT-REQUIRED"], other, nonce())
            ).status_code
            == 200
        )
        for job_key in ("one", "three"):
            with g.store.session() as s:
                row = book.job_by_key(s, job_key)
                assert row is not None
                job_id = row.job_id
            httpx.post(
                f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=30
            )
        # Cancelled, whether or not their instances had been launched yet: none left running.
        wait_for(lambda: book.figures(g.store)["jobs"] == {"cancelled": 2}, 60)
        wait_for(lambda: g.live_pods() == [])
        assert len(g.pods()) <= 2
    finally:
        g.stop()


def test_no_capacity_is_a_clean_refusal_before_payment(gw: GatewayWorld) -> None:
    answer = httpx.post(
        f"{gw.mock.url}/admin/capacity",
        json={"gpu": "NVIDIA A100 80GB PCIe", "dataCenterId": "US-TX-3", "count": 0},
        headers={"Authorization": f"Bearer {gw.mock.api_key}"},
    )
    assert answer.status_code == 200, answer.text
    httpx.post(
        f"{gw.mock.url}/admin/capacity",
        json={"gpu": "NVIDIA A100 80GB PCIe", "dataCenterId": "EU-RO-1", "count": 0},
        headers={"Authorization": f"Bearer {gw.mock.api_key}"},
    ).raise_for_status()
    refused = httpx.post(
        f"{gw.url}/quote", json={"gpuType": "A100", "hours": 1}, headers=gw.headers()
    )
    assert refused.status_code == 409 and "capacity" in refused.text
    assert gw.pods() == [] and gw.income() == 0


def test_a_quote_sells_at_least_the_clouds_billing_increment(
    tmp_path: Path, sqlite_url: str
) -> None:
    g = start_gateway_world(tmp_path, sqlite_url, increment_s=3600)  # an hourly cloud
    try:
        short = httpx.post(
            f"{g.url}/quote", json={"gpuType": "A100", "hours": 0.25}, headers=g.headers()
        )
        assert short.status_code == 200, short.text
        q = short.json()
        # A buyer stopping after 15 minutes leaves the gateway billed a whole hour: it sells one.
        assert q["hours"] == 1.0 and q["amount"] == q["pricePerHour"]
        long = httpx.post(
            f"{g.url}/quote", json={"gpuType": "A100", "hours": 2.5}, headers=g.headers()
        ).json()
        assert long["hours"] == 2.5 and long["amount"] == round(2.5 * long["pricePerHour"], 6)
    finally:
        g.stop()


def test_a_per_second_cloud_sells_the_hours_asked_for(gw: GatewayWorld) -> None:
    q = httpx.post(
        f"{gw.url}/quote", json={"gpuType": "A100", "hours": 0.25}, headers=gw.headers()
    ).json()
    assert q["hours"] == 0.25 and q["amount"] == round(0.25 * q["pricePerHour"], 6)


# --- capacity after payment ------------------------------------------------------------------


def fault(gw: GatewayWorld, **faults: Any) -> None:
    answer = httpx.post(
        f"{gw.mock.url}/admin/faults",
        json=faults,
        headers={"Authorization": f"Bearer {gw.mock.api_key}"},
    )
    assert answer.status_code == 200, answer.text


def buy(gw: GatewayWorld, key: str, hours: float = 1.0) -> str:
    q = quote(gw, hours=hours)
    first = submit(gw, key, q)
    account = buyer(gw, key)
    paid = submit(
        gw, key, q, signed_payment(gw, first.headers["PAYMENT-REQUIRED"], account, nonce())
    )
    assert paid.status_code == 200, paid.text
    return str(paid.json()["jobId"])


def job_status(gw: GatewayWorld, job_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{gw.url}/job-status", params={"jobId": job_id}, headers=gw.headers())
    return dict(answer.json())


def test_a_launch_refused_after_payment_goes_to_another_region(gw: GatewayWorld) -> None:
    fault(gw, endpoints=["create"], status=400, count=1)  # "no longer any instances available"
    job_id = buy(gw, "elsewhere")
    done = wait_for(lambda: (s := job_status(gw, job_id))["status"] == "completed" and s)
    assert any("launch refused: CapacityError" in line for line in done["logs"])
    wait_for(lambda: gw.live_pods() == [])
    [pod] = gw.pods()
    with gw.store.session() as s:
        first, second = book.instances_of(s, job_id)
    assert (first.status, first.instance_id) == ("failed", None)
    assert second.region != first.region and second.instance_id == pod["id"]


def test_no_capacity_within_the_paid_time_fails_the_job_with_the_reason(
    gw: GatewayWorld,
) -> None:
    fault(gw, endpoints=["create"], status=400)  # every launch refused, in every region
    job_id = buy(gw, "nowhere", hours=0.05)  # three seconds of paid time (an hour is 60 s)
    failed = wait_for(lambda: (s := job_status(gw, job_id))["status"] == "failed" and s)
    assert "no instance could be launched within the paid time" in failed["error"]
    assert "CapacityError" in failed["error"]
    assert gw.pods() == []
    fault(gw)


# --- paid time -------------------------------------------------------------------------------


def test_a_renewal_extends_the_paid_time_and_its_end_stops_the_job(
    tmp_path: Path, sqlite_url: str
) -> None:
    g = start_gateway_world(
        tmp_path,
        sqlite_url,
        command=(
            sys.executable,
            TRAIN,
            "--steps",
            "2000",
            "--step-time",
            "0.05",
            "--checkpoint-every",
            "5",
        ),
    )
    try:
        job_id = buy(g, "sliced", hours=0.1)  # six seconds (an hour is 60 s)
        wait_for(lambda: job_status(g, job_id)["status"] == "running")
        q = quote(g, hours=0.1)
        headers = g.headers("slice-2", q["quoteId"])
        body = {"jobId": job_id, "quoteId": q["quoteId"]}
        first = httpx.post(f"{g.url}/renew-job", json=body, headers=headers)
        assert first.status_code == 402
        payment = signed_payment(g, first.headers["PAYMENT-REQUIRED"], buyer(g, "slicer"), nonce())
        renewed = httpx.post(
            f"{g.url}/renew-job",
            json=body,
            headers={**headers, "PAYMENT-SIGNATURE": payment},
            timeout=30,
        )
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["paidHours"] == pytest.approx(0.2)
        replay = httpx.post(
            f"{g.url}/renew-job",
            json=body,
            headers={**headers, "PAYMENT-SIGNATURE": payment},
            timeout=30,
        )
        assert replay.headers.get("X-Idempotent-Replay") == "true"
        # The same key on another job's renewal is refused, not answered with this job's.
        other = httpx.post(
            f"{g.url}/renew-job",
            json={**body, "jobId": "some-other-job"},
            headers={**headers, "PAYMENT-SIGNATURE": payment},
            timeout=30,
        )
        assert other.status_code == 409 and "another job" in other.json()["error"]
        ended = wait_for(lambda: (s := job_status(g, job_id))["status"] == "expired" and s, 60)
        assert 0 < ended["progress"] < 1 and ended["checkpointUrl"]
        assert ended["paidHours"] == pytest.approx(0.2)
        wait_for(lambda: g.live_pods() == [])
        figures = book.figures(g.store)
        assert figures["paymentsReceived"] == 2
        assert usd_to_micros(figures["incomeUsd"]) == g.income()
    finally:
        g.stop()


# --- the book, on both stores ----------------------------------------------------------------


def test_the_book_counts_each_payment_once_and_drops_unsettled_ones(db_url: str) -> None:
    from datetime import timedelta

    from alembic import command

    from procure.models import utcnow
    from procure.store.db import alembic_config
    from procure.store.gateway_tables import GatewayJobRow

    store = open_store(db_url)
    try:
        now = utcnow()

        def unpaid(job_id: str, nonce_: str) -> None:
            with store.session() as s:
                s.add(
                    GatewayJobRow(
                        job_id=job_id,
                        key=f"key-{job_id}",
                        quote_id="q",
                        gpu="A100",
                        payer="0xabc",
                        nonce=nonce_,
                        params={},
                        status="unpaid",
                        paid_hours=0.0,
                        amount=0,
                        attempt=0,
                        tried_regions=[],
                        progress=0.0,
                        logs=[],
                        log_cursor=0,
                        cancel_requested=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                book.add_payment(
                    s,
                    nonce=nonce_,
                    job_id=job_id,
                    kind="submit",
                    key=f"key-{job_id}",
                    payer="0xABC",
                    amount=1_500_000,
                    hours=1.0,
                )

        unpaid("gw-1", "0x01")
        unpaid("gw-2", "0x02")
        with store.session() as s:
            assert book.live_jobs_of(s, "0xAbC") == 2  # one buyer, however it spells itself
        for _ in range(2):  # booked twice (a retry after a crash): counted once
            with store.session() as s:
                book.settled(s, "0x01", "0xtx1", 3600.0)
        with store.session() as s:
            book.unsettled(s, "0x02")
            assert book.job(s, "gw-2") is None and not book.nonce_seen(s, "0x02")
            row = book.job(s, "gw-1")
            assert row is not None and (row.status, row.amount, row.paid_hours) == (
                "paid",
                1_500_000,
                1.0,
            )
            row.paid_until = now + timedelta(hours=1)
            book.add_payment(
                s,
                nonce="0x03",
                job_id="gw-1",
                kind="renew",
                key="slice",
                payer="0xABC",
                amount=500_000,
                hours=0.5,
            )
        with store.session() as s:
            book.settled(s, "0x03", "0xtx3", 3600.0)
        figures = book.figures(store)
        assert figures["incomeUsd"] == 2.0 and figures["paymentsReceived"] == 2
        assert figures["jobs"] == {"paid": 1}
        with store.session() as s:
            row = book.job(s, "gw-1")
            assert row is not None and row.paid_hours == 1.5
            assert row.paid_until is not None and row.paid_until > now + timedelta(hours=1.4)
        lines = book.prometheus_lines(store, "gw1")
        assert 'procure_gateway_income_usd_total{vendor_id="gw1"} 2.0' in lines
    finally:
        store.dispose()
    # The migration goes down and up again cleanly.
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "0006")
    command.upgrade(cfg, "head")


def test_a_preempted_instance_is_replaced_and_the_job_resumes(
    tmp_path: Path, sqlite_url: str
) -> None:
    g = start_gateway_world(
        tmp_path,
        sqlite_url,
        command=(
            sys.executable,
            TRAIN,
            "--steps",
            "100",
            "--step-time",
            "0.05",
            "--checkpoint-every",
            "5",
        ),
    )
    try:
        job_id = buy(g, "preempted")
        running = wait_for(
            lambda: (
                (s := job_status(g, job_id))["status"] == "running"
                and (s["checkpointProgress"] or 0) >= 0.1
                and s
            )
        )
        [pod] = g.live_pods()
        answer = httpx.post(
            f"{g.mock.url}/admin/instances/{pod['id']}/preempt",
            headers={"Authorization": f"Bearer {g.mock.api_key}"},
        )
        assert answer.status_code == 200, answer.text
        done = wait_for(lambda: (s := job_status(g, job_id))["status"] == "completed" and s, 60)
        # Relaunched elsewhere, resuming from a checkpoint at least as far as the one seen.
        [resumed] = [line for line in done["logs"] if ", resuming from " in line]
        seen = running["checkpointUrl"].rsplit("step-", 1)[1]
        assert resumed.rsplit("step-", 1)[1] >= seen
        assert any("resumed from step" in line for line in done["logs"])
        wait_for(lambda: g.live_pods() == [])
        assert len(g.pods()) == 2
    finally:
        g.stop()
