"""Two gateways on one store (`procure gateway` of another --vendor-id, cloud or wallet sharing a
PROCURE_DATABASE_URL): the second refuses to start, naming the one that holds the store, while
that one runs, and also while its book still holds unfinished jobs or payments (it was killed or
stopped): it would launch the first's jobs on its own cloud and drop the payments made to the
first's address. A killed gateway does not lock the store for ever (its lease expires); the same
gateway restarted, or run twice on its store, starts as before."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import MockCloud, start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.pacing import Pacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.gateway import book, storelease
from procure.gateway import loop as gateway_loop
from procure.gateway.runtime import Runtime
from procure.gateway.serve import gateway_config, start_gateway
from procure.gateway.settings import GatewayConfig
from procure.local import LocalServer, free_port
from procure.models import utcnow
from procure.store import Store, open_store
from procure.store.gateway_tables import GatewayJobRow, GatewayPaymentRow
from test_gateway import (
    SECRET,
    TRAIN,
    GatewayWorld,
    buy,
    buyer,
    job_status,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)
from test_gateway_crash import spawn

# Long enough (~8 s) for a second gateway's loop to meet the job while it runs.
LONG = (sys.executable, TRAIN, "--steps", "160", "--step-time", "0.05")


@dataclasses.dataclass
class Other:
    """A second cloud account and a gateway config of another vendor id and wallet."""

    mock: MockCloud
    cloud: RunPodCloud
    cfg: GatewayConfig

    def pods(self) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.mock.url}/admin/state",
            headers={"Authorization": f"Bearer {self.mock.api_key}"},
            timeout=10,
        )
        answer.raise_for_status()
        return list(answer.json()["instances"])


def other_gateway(gw: GatewayWorld, tmp: Path) -> Other:
    mock = start_mock_cloud(RunPodMockConfig(provision_s=0.3, start_s=0.3))
    cloud = RunPodCloud(
        RunPodSettings(_env_file=None, api_key=mock.api_key, api_url=mock.url),  # type: ignore[call-arg]
        pacer=Pacer(),
    )
    fields = dataclasses.asdict(gw.cfg)
    options = {
        k: v
        for k, v in fields.items()
        if k not in ("vendor_id", "secret", "provider", "pay_to", "network", "asset")
        and k not in ("asset_extra", "node_key")
    }
    cfg = gateway_config(
        vendor_id="gw-b",
        provider="runpod",
        facilitator_url=gw.world.facilitator.url,
        secret=SECRET,
        home=tmp / "home-b",  # its own wallet: paid to another address
        **options,
    )
    return Other(mock, cloud, cfg)


def try_start(other: Other, store: Store, facilitator_url: str) -> LocalServer | str:
    """The second gateway started on `store`: its server, or why it refused."""
    try:
        return start_gateway(other.cfg, store, other.cloud, facilitator_url)
    except Exception as exc:  # refused: the message is the operator's
        return str(exc)


@pytest.fixture
def long_gw(tmp_path: Path, sqlite_url: str) -> Iterator[GatewayWorld]:
    g = start_gateway_world(tmp_path, sqlite_url, command=LONG)
    yield g
    g.stop()


def test_a_second_gateway_is_refused_while_the_first_runs(
    long_gw: GatewayWorld, tmp_path: Path
) -> None:
    """Before the fix: the second gateway started, and its loop advanced the first's running
    job: it launched it again on its own cloud (one job, two instances, both billing)."""
    gw = long_gw
    job_id = buy(gw, "a-job")
    wait_for(lambda: job_status(gw, job_id)["status"] == "running", 60)
    other = other_gateway(gw, tmp_path)
    started = try_start(other, gw.store, gw.world.facilitator.url)
    try:
        wait_for(lambda: job_status(gw, job_id)["status"] == "completed", 90)
        assert other.pods() == []  # nothing of the first's launched on the second's account
        assert len(gw.pods()) == 1
        assert isinstance(started, str), "the second gateway started beside the first"
        assert "'gw1'" in started and "'gw-b'" in started and "runs on this store" in started
        assert "PROCURE_DATABASE_URL" in started
    finally:
        if not isinstance(started, str):
            started.stop()
        other.mock.stop()


def test_the_same_gateway_twice_on_its_store_both_serve(
    long_gw: GatewayWorld, tmp_path: Path
) -> None:
    """Several processes of one gateway (same vendor id, cloud and wallet) share its store as
    before: the second starts, and a job sold through it runs to its end."""
    gw = long_gw
    cloud = RunPodCloud(
        RunPodSettings(_env_file=None, api_key=gw.mock.api_key, api_url=gw.mock.url),  # type: ignore[call-arg]
        pacer=Pacer(),
    )
    twin = start_gateway(gw.cfg, gw.store, cloud, gw.world.facilitator.url)
    try:
        second = dataclasses.replace(gw, server=twin)
        job_id = buy(second, "twin-job")
        wait_for(lambda: job_status(gw, job_id)["status"] == "completed", 90)
        assert len(gw.pods()) == 1
    finally:
        twin.stop()


# --- a killed gateway: its book waits for it; its lease expires --------------------------------


def killed_after_settling(gw: GatewayWorld, url: str, proc: Any) -> str:
    """A job paid for, the gateway killed after the payment settled and before it was booked
    (`paid` crash point); the job's Idempotency-Key."""
    headers = {"Authorization": f"Bearer {SECRET}"}
    q = httpx.post(f"{url}/quote", json={"gpuType": "RTX4090", "hours": 1}, headers=headers)
    q.raise_for_status()
    quote_id = q.json()["quoteId"]
    paid_headers = {**headers, "Idempotency-Key": "a-paid", "X-Quote-Id": quote_id}
    first = httpx.post(f"{url}/submit-job", json={"quoteId": quote_id}, headers=paid_headers)
    assert first.status_code == 402, first.text
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], buyer(gw, "a-paid"), nonce())
    paid_headers["PAYMENT-SIGNATURE"] = payment
    with contextlib.suppress(httpx.HTTPError):  # it dies while answering
        httpx.post(f"{url}/submit-job", json={"quoteId": quote_id}, headers=paid_headers)
    assert proc.wait(timeout=120) == 137
    return "a-paid"


def status_at(url: str, job_id: str) -> str:
    answer = httpx.get(
        f"{url}/job-status",
        params={"jobId": job_id},
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=10,
    )
    return str(answer.json().get("status"))


def nothing_left(store: Store) -> bool:
    with store.session() as s:
        return storelease.unfinished(s) == (0, 0, 0)


def pending_job(store: Store) -> tuple[str, str] | None:
    with store.session() as s:
        job = s.query(GatewayJobRow).one_or_none()
        payment = s.query(GatewayPaymentRow).one_or_none()
        if job is None or payment is None:
            return None
        return job.status, payment.status


@pytest.mark.timeout(400)
def test_a_killed_gateways_book_waits_for_it_and_its_lease_expires(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: a second gateway started on the store of one killed between settling a
    payment and booking it saw the payment's nonce used (paid to the first's address, not its
    own), dropped it and deleted the job the buyer had paid for."""
    gw = start_gateway_world(tmp_path, sqlite_url, store_lease_s=3.0, hour_s=3600.0)
    gw.server.stop()  # the first gateway runs as a child process instead
    db = f"sqlite:///{tmp_path / 'child-gateway.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    other = other_gateway(gw, tmp_path)
    store = open_store(db)
    proc = spawn(gw, tmp_path, port, "paid:1", db=db)
    started: LocalServer | str | None = None
    try:
        key = killed_after_settling(gw, url, proc)
        assert pending_job(store) == ("unpaid", "pending")
        # Killed holding its lease: the second is refused as beside a running one...
        started = try_start(other, store, gw.world.facilitator.url)
        assert isinstance(started, str) and "runs on this store" in started, started
        # ...and once that lease has expired, still refused while the first's book holds the
        # paid job: only the first can book it (paid to its address) and run it.
        refused = wait_for(
            lambda: (
                isinstance(s := try_start(other, store, gw.world.facilitator.url), str)
                and "runs on this store" not in s
                and s
            ),
            60,
        )
        started = refused
        assert isinstance(refused, str), refused
        assert "'gw1'" in refused and "1 live job" in refused, refused
        assert "PROCURE_DATABASE_URL" in refused
        assert pending_job(store) == ("unpaid", "pending")
        assert other.pods() == []
        # The first, restarted, books the payment and runs the job.
        proc = spawn(gw, tmp_path, port, None, db=db)
        with store.session() as s:
            job = book.job_by_key(s, key)
            assert job is not None
            job_id = job.job_id
        wait_for(lambda: status_at(url, job_id) == "completed", 120)
        # Killed with nothing left to do (its instance ended), its lease expires and the
        # second may start.
        wait_for(lambda: gw.live_pods() == [] and nothing_left(store), 60)
        proc.kill()
        proc.wait(timeout=30)
        started = wait_for(
            lambda: (
                not isinstance(s := try_start(other, store, gw.world.facilitator.url), str) and s
            ),
            60,
        )
        assert other.pods() == []
    finally:
        if started is not None and not isinstance(started, str):
            started.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        other.mock.stop()
        store.dispose()
        gw.mock.stop()
        gw.store.dispose()
        gw.world.stop()


# --- the store's lease itself, on both backends ------------------------------------------------


def config(vendor_id: str, pay_to: str, lease_s: float = 60.0) -> GatewayConfig:
    return GatewayConfig(
        vendor_id=vendor_id,
        secret="s",
        provider="runpod",
        pay_to=pay_to,
        network="eip155:84532",
        asset="0x" + "1" * 40,
        asset_extra={},
        node_key="k",
        store_lease_s=lease_s,
    )


def live_job(store: Store, job_id: str = "gw-left", status: str = "running") -> None:
    """A job of the book, live (`status`), as a sale would have written it."""
    now = utcnow()
    with store.session() as s:
        s.add(
            GatewayJobRow(
                job_id=job_id,
                key=f"key-{job_id}",
                quote_id="q",
                gpu="RTX4090",
                payer="0x" + "2" * 40,
                nonce="0x01",
                params={},
                status=status,
                created_at=now,
                updated_at=now,
            )
        )


def test_the_store_is_one_gateways_until_its_book_is_done(db_url: str) -> None:
    """Before the fix: nothing recorded whose the store's book was; any gateway took it."""
    store = open_store(db_url)
    a, b = config("gw-a", "0x" + "a" * 40), config("gw-b", "0x" + "b" * 40)
    same_id_other_wallet = config("gw-a", "0x" + "c" * 40)
    try:
        storelease.claim(a, store)
        storelease.claim(a, store)  # another process of the same gateway
        for other in (b, same_id_other_wallet):
            with pytest.raises(storelease.GatewayConflict, match=r"'gw-a' .* runs on this store"):
                storelease.claim(other, store)
        live_job(store)
        storelease.release(a, store)  # stopped, with a job still running on its cloud
        with pytest.raises(storelease.GatewayConflict, match=r"1 live job\(s\)"):
            storelease.claim(b, store)
        assert storelease.renew(a, store)  # restarted, it is its own store still
        with store.session() as s:
            s.get(GatewayJobRow, "gw-left").status = "completed"  # type: ignore[union-attr]
        storelease.release(a, store)
        storelease.claim(b, store)  # nothing of gw-a's left: gw-b may have the store
        assert not storelease.renew(a, store)  # gw-a, back, acts on nothing
        with store.session() as s:
            assert not storelease.ours(s, a) and storelease.ours(s, b)
    finally:
        store.dispose()


def test_a_gateway_killed_holding_the_store_frees_it_once_its_lease_lapses(db_url: str) -> None:
    """The lease of a gateway killed without stopping (never released) lapses: the store is
    not locked for ever."""
    store = open_store(db_url)
    a, b = config("gw-a", "0x" + "a" * 40, lease_s=1.0), config("gw-b", "0x" + "b" * 40)
    try:
        storelease.claim(a, store)

        def taken() -> bool:
            try:
                storelease.claim(b, store)
            except storelease.GatewayConflict as exc:
                assert "runs on this store" in str(exc)
                return False
            return True

        wait_for(taken, 30)
    finally:
        store.dispose()


def test_a_gateway_whose_store_was_taken_sells_nothing(long_gw: GatewayWorld) -> None:
    """Before the fix: a gateway went on selling into a store another gateway had taken (its
    own lease lapsed while it stalled): the other would have launched the job on its cloud.
    Now the sale is refused before any money moves."""
    gw = long_gw
    storelease.release(gw.cfg, gw.store)  # as if its lease lapsed: its book has nothing live
    storelease.claim(config("gw-b", "0x" + "b" * 40), gw.store)
    q = quote(gw)
    key = "after-the-takeover"
    first = submit(gw, key, q)
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], buyer(gw, key), nonce())
    refused = submit(gw, key, q, payment)
    assert refused.status_code == 503, refused.text
    assert "no longer holds its store" in refused.text
    assert gw.income() == 0
    with gw.store.session() as s:
        assert book.job_by_key(s, key) is None


def test_a_gateway_steps_nothing_once_another_took_its_store(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the loop learnt it had lost the store only at its next heartbeat (a
    third of a lease, ~20 s), stepping the other gateway's jobs on its own cloud meanwhile."""
    store = open_store(db_url)
    a, b = config("gw-a", "0x" + "a" * 40), config("gw-b", "0x" + "b" * 40)
    stepped: list[str] = []

    async def step_all(_rt: Any) -> None:
        stepped.append("step")

    async def one_pass() -> None:
        rt = Runtime(cfg=a, store=store, cloud=None)  # type: ignore[arg-type]
        stop = asyncio.Event()
        rt.wake.set()
        task = asyncio.create_task(gateway_loop.run_loop(rt, stop))
        await asyncio.sleep(0)  # the loop's first pass runs to its first wait
        stop.set()
        await asyncio.wait_for(task, 30)
        assert rt.holds_store is False  # and its sales are refused, as `ours` says

    monkeypatch.setattr(gateway_loop, "step_all", step_all)
    monkeypatch.setattr(gateway_loop, "sweep", step_all)
    monkeypatch.setattr(gateway_loop, "recover_payments", step_all)
    try:
        storelease.claim(a, store)
        storelease.release(a, store)  # its lease lapsed while it still ran
        storelease.claim(b, store)  # gw-b took the store
        asyncio.run(one_pass())
        assert stepped == []
    finally:
        store.dispose()
