"""The RunPod REST v2 client against the mock RunPod over real HTTP on loopback, every request and
answer validated against RunPod's spec: offers priced per GPU, a pod that boots and whose node
answers with its own token, preemption (EXITED), idempotent terminate, per-second billing that
matches the mock's books, and every bad answer turned into the right error without the key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    LaunchSpec,
    Offer,
    ProviderError,
    QuotaError,
    RateLimited,
)
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import MockCloud, start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.pacing import Pacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.clouds.runpod.wire import billed_micros
from procure.local import free_port
from runpod_helpers import Exchange, Recorder, admin, validate, validate_all

KEY = "rpa_TEST0123456789abcdefSECRET"
TOKEN = "node-token-for-this-pod-only"
RTX = "NVIDIA GeForce RTX 4090"


@pytest.fixture
def cloud() -> Iterator[MockCloud]:
    mock = start_mock_cloud(
        RunPodMockConfig(api_key=KEY, speed=0, provision_s=10, start_s=20, node_port=free_port())
    )
    yield mock
    mock.stop()


class FakeTime:
    """The pacer's clock and sleep: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def client(
    cloud: MockCloud, recorder: Recorder, *, key: str = KEY, timeout_s: float = 5, pacer: Any = None
) -> RunPodCloud:
    settings = RunPodSettings(
        RUNPOD_API_KEY=key, RUNPOD_API_URL=cloud.url, RUNPOD_API_TIMEOUT_S=timeout_s
    )
    fake = FakeTime()
    return RunPodCloud(
        settings, transport=recorder, pacer=pacer or Pacer(clock=fake.clock, sleep=fake.sleep)
    )


def faults(cloud: MockCloud, **set_: Any) -> None:
    admin(cloud.url, KEY, "POST", "/admin/faults", set_)


def spec_for(offer: Offer, name: str = "procure-job-1") -> LaunchSpec:
    return LaunchSpec(
        name=name,
        offer=offer,
        image="ghcr.io/example/procure-node:1",
        startup_script="procure gpu-worker",
        env={"GPU_WORKER_TOKEN": TOKEN},
    )


async def offer_of(c: RunPodCloud, offer_id: str, region: str) -> Offer:
    return next(o for o in await c.offers() if o.offer_id == offer_id and o.region == region)


async def until_running(c: RunPodCloud, pod_id: str) -> Instance:
    for _ in range(750):  # the node binds in the background
        inst = await c.get(pod_id)
        if inst and inst.node_url:
            return inst
        await asyncio.sleep(0.02)
    raise AssertionError(f"{pod_id} never ran")


def test_offers_are_per_gpu_prices_times_count_cheapest_first(cloud: MockCloud) -> None:
    async def scenario() -> None:
        rec = Recorder()
        c = client(cloud, rec)
        offers = await c.offers()
        assert [o.price_per_hour for o in offers] == sorted(o.price_per_hour for o in offers)
        rtx = {(o.offer_id, o.region): o for o in offers if o.gpu == "RTX4090"}
        secure, community = rtx[(f"SECURE:{RTX}", "US-TX-3")], rtx[(f"COMMUNITY:{RTX}", "EU-RO-1")]
        assert (secure.price_per_hour, community.price_per_hour) == (690_000, 340_000)
        assert secure.available == 8 and rtx[(f"SECURE:{RTX}", "CA-MTL-1")].available == 3
        assert all(o.billing_increment_s == 1 and not o.interruptible for o in offers)
        assert {o.gpu for o in await c.offers(gpu="a100")} == {"A100"}
        pairs = await c.offers(gpu_count=2)
        assert min(o.price_per_hour for o in pairs if o.gpu == "RTX4090") == 680_000
        # Stock that runs out leaves the catalog.
        admin(
            cloud.url,
            KEY,
            "POST",
            "/admin/capacity",
            {"gpu": RTX, "region": "CA-MTL-1", "count": 0},
        )
        assert not [o for o in await c.offers(gpu="RTX4090") if o.region == "CA-MTL-1"]
        types = {t.name: t for t in await c.instance_types()}
        assert types[f"COMMUNITY:{RTX}"].price_per_hour == 340_000
        assert types[f"SECURE:{RTX}"].regions_with_capacity == ["EU-RO-1", "US-TX-3"]
        await c.aclose()
        assert validate_all(rec) == len(rec.seen) >= 7

    asyncio.run(scenario())


def test_launch_boots_runs_a_node_with_its_own_token_and_bills_per_second(
    cloud: MockCloud,
) -> None:
    async def scenario() -> None:
        rec = Recorder()
        c = client(cloud, rec)
        offer = await offer_of(c, f"SECURE:{RTX}", "US-TX-3")
        booting = await c.launch_spec(spec_for(offer))
        assert (booting.status, booting.node_url, booting.region) == ("booting", None, "US-TX-3")
        assert booting.price_per_hour == 690_000 and booting.gpu == "RTX4090"
        assert [i.id for i in await c.find("procure-job-1")] == [booting.id]
        assert [i.id for i in await c.labelled()] == [booting.id]
        assert await c.find("procure-other") == []
        cloud.state.clock.advance(30)
        running = await until_running(c, booting.id)
        assert running.status == "active" and running.ip and running.ip.startswith("127.0.0.")
        # The node answers at the pod's public port, not at the private one launched.
        assert running.node_url == f"http://{running.ip}:{cloud.state.config.node_port}"
        async with httpx.AsyncClient(timeout=10) as node:
            check = await node.post(
                f"{running.node_url}/gpu-check",
                json={"agent_id": "t"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert check.status_code == 200 and check.json()["status"] == "success"
            refused = await node.post(
                f"{running.node_url}/gpu-check",
                json={"agent_id": "t"},
                headers={"Authorization": f"Bearer {KEY}"},
            )
            assert refused.status_code == 401
        # Per second from creation (PROVISIONING billed): an hour and 1.5 s is 3602 seconds.
        cloud.state.clock.advance(3600 - 30 + 1.5)
        expected = billed_micros(0.69, 3601.5)
        assert expected == round(3602 * 690_000 / 3600)
        assert await c.billed(booting.id) == expected
        books = admin(cloud.url, KEY, "GET", "/admin/billing")
        assert books["totalMicroUsd"] == expected
        assert books["instances"][0]["billedMicroUsd"] == expected
        [ended] = await c.terminate([booting.id])
        assert ended.status == "terminated"
        cloud.state.clock.advance(600)  # billing stopped with the pod
        assert await c.billed(booting.id) == expected
        assert admin(cloud.url, KEY, "GET", "/admin/billing")["totalMicroUsd"] == expected
        await c.aclose()
        validate_all(rec)

    asyncio.run(scenario())


def test_preempted_pod_is_exited_its_node_gone_and_billing_stopped(cloud: MockCloud) -> None:
    async def scenario() -> None:
        rec = Recorder()
        c = client(cloud, rec)
        pod = await c.launch_spec(spec_for(await offer_of(c, f"COMMUNITY:{RTX}", "EU-RO-1")))
        cloud.state.clock.advance(40)
        running = await until_running(c, pod.id)
        assert running.price_per_hour == 340_000
        admin(cloud.url, KEY, "POST", f"/admin/instances/{pod.id}/preempt")
        gone = await c.get(pod.id)
        assert gone is not None and gone.status == "preempted" and gone.node_url is None
        assert gone.price_per_hour == 0  # RunPod's cost is 0 once EXITED
        async with httpx.AsyncClient(timeout=2) as node:
            with pytest.raises(httpx.TransportError):
                await node.post(f"{running.node_url}/gpu-check", json={"agent_id": "t"})
        cloud.state.clock.advance(1000)
        assert await c.billed(pod.id) == billed_micros(0.34, 40)
        # Still listed (an EXITED pod exists until deleted), so the sweeper sees it.
        assert [i.status for i in await c.labelled()] == ["preempted"]
        assert [i.id for i in await c.terminate([pod.id])] == [pod.id]
        assert await c.get(pod.id) is None
        await c.aclose()
        validate_all(rec)

    asyncio.run(scenario())


def test_terminate_is_idempotent_and_the_fleet_protocol_works(cloud: MockCloud) -> None:
    async def scenario() -> None:
        rec = Recorder()
        c = client(cloud, rec)
        [pod_id] = await c.launch(
            instance_type="COMMUNITY:NVIDIA A40",
            region="EU-RO-1",
            name="procure-fleet-7",
            ssh_key_names=["ops"],
        )
        [listed] = await c.instances()
        assert (listed.id, listed.instance_type, listed.region) == (
            pod_id,
            "COMMUNITY:NVIDIA A40",
            "EU-RO-1",
        )
        assert listed.price_per_hour == 350_000 and listed.gpu == "A40"
        assert [i.id for i in await c.terminate([pod_id])] == [pod_id]
        assert await c.terminate([pod_id]) == []  # a retry after a crash: no error
        assert await c.terminate(["nosuchpod0000"]) == []
        assert await c.instances() == [] and await c.get(pod_id) is None
        await c.aclose()
        validate_all(rec)

    asyncio.run(scenario())


def test_capacity_runs_out_per_gpu_and_data_centre(cloud: MockCloud) -> None:
    async def scenario() -> None:
        rec = Recorder()
        c = client(cloud, rec)
        h100 = await offer_of(c, "SECURE:NVIDIA H100 80GB HBM3", "CA-MTL-1")
        await c.launch_spec(spec_for(h100, "procure-a"))
        await c.launch_spec(spec_for(h100, "procure-b"))
        with pytest.raises(CapacityError) as refused:
            await c.launch_spec(spec_for(h100, "procure-c"))
        assert not refused.value.retryable
        assert not [o for o in await c.offers(gpu="H100") if o.region == "CA-MTL-1"]
        # Another data centre still has the GPU.
        await c.launch_spec(spec_for(await offer_of(c, h100.offer_id, "US-TX-3"), "procure-d"))
        await c.aclose()
        validate_all(rec)

    asyncio.run(scenario())


def test_never_booting_pods_and_wrong_addresses(cloud: MockCloud) -> None:
    async def scenario() -> None:
        rec = Recorder()
        c = client(cloud, rec)
        offer = await offer_of(c, f"SECURE:{RTX}", "US-TX-3")
        faults(cloud, never_boot=True)
        stuck = await c.launch_spec(spec_for(offer, "procure-stuck"))
        faults(cloud, wrong_ip=True)
        odd = await c.launch_spec(spec_for(offer, "procure-odd"))
        cloud.state.clock.advance(3600)
        assert (await c.get(stuck.id)).status == "booting"  # type: ignore[union-attr]
        moved = await until_running(c, odd.id)
        assert moved.ip == "127.0.0.1"  # not where its node is: the caller's token check fails
        await c.aclose()
        validate_all(rec)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fault", "call", "error", "retryable"),
    [
        ({"status": 500}, "offers", ProviderError, True),
        ({"status": 503, "endpoints": ["pods"]}, "instances", ProviderError, True),
        ({"garbage": True}, "instances", ProviderError, True),
        ({"huge": True}, "instances", ProviderError, True),
        ({"hang_s": 5}, "instances", ProviderError, True),
        ({"status": 400, "endpoints": ["create"]}, "launch", CapacityError, False),
        ({"status": 402, "endpoints": ["create"]}, "launch", QuotaError, False),
        ({"status": 403}, "instances", AuthError, False),
        ({"status": 429, "retry_after_s": None}, "billed", RateLimited, True),
        ({}, "wrong-key", AuthError, False),
    ],
)
def test_bad_answers_become_errors_without_the_key(
    cloud: MockCloud,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
    call: str,
    error: type[CloudError],
    retryable: bool,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        rec = Recorder()
        key = "wrong-" + KEY if call == "wrong-key" else KEY
        # A short deadline only where the fault is a hang: a loaded machine is no hang.
        c = client(cloud, rec, key=key, timeout_s=1 if "hang_s" in fault else 15)
        offer = Offer("runpod", f"SECURE:{RTX}", "RTX4090", 1, "US-TX-3", 690_000, False, 1, 1)
        if fault.get("unknown_status"):
            await c.launch_spec(spec_for(offer))
        faults(cloud, **fault)
        with pytest.raises(error) as raised:
            if call == "offers":
                await c.offers()
            elif call == "launch":
                await c.launch_spec(spec_for(offer))
            elif call == "billed":
                await c.billed("anypod")
            else:
                await c.instances()
        assert raised.value.retryable is retryable
        assert KEY not in str(raised.value) and KEY not in repr(c)
        if isinstance(raised.value, RateLimited):
            assert raised.value.retry_after_s is None
        faults(cloud)  # cleared: the next call works
        if call != "wrong-key":
            await c.instances()
        await c.aclose()
        unreadable = {i for i, e in enumerate(rec.seen) if fault and e.status == 200}
        unreadable = unreadable if fault.keys() & {"garbage", "huge", "unknown_status"} else set()
        validate_all(rec, skip=unreadable)

    asyncio.run(scenario())
    assert KEY not in caplog.text


def test_rate_limits_429_with_retry_after_pace_the_client(cloud: MockCloud) -> None:
    async def scenario() -> None:
        rec = Recorder()
        fake = FakeTime()
        c = client(cloud, rec, pacer=Pacer(clock=fake.clock, sleep=fake.sleep))
        faults(cloud, status=429, retry_after_s=7, count=1)
        with pytest.raises(RateLimited) as raised:
            await c.instances()
        assert raised.value.retry_after_s == 7
        assert await c.instances() == []  # the fault is spent, after the pacer's wait
        assert fake.slept == [7]
        # The mock's own limit: a 3-request minute window, on the simulated clock.
        cloud.state.config.quotas["minute"] = cloud.state.windows["minute"][1] + 1
        await c.instances()  # the last one: RateLimit says r=0, so the pacer waits the reset
        with pytest.raises(RateLimited) as limited:
            await c.instances()  # the simulated clock did not move: still limited
        assert limited.value.retry_after_s is not None and limited.value.retry_after_s > 0
        assert len(fake.slept) == 2
        cloud.state.clock.advance(61)
        assert await c.instances() == []
        await c.aclose()
        assert [e.status for e in rec.seen].count(429) == 2
        validate_all(rec)

    asyncio.run(scenario())


def test_mock_refuses_what_the_spec_refuses() -> None:
    mock = start_mock_cloud(RunPodMockConfig(api_key=KEY, speed=0, nodes=False))
    try:
        with httpx.Client(base_url=mock.url, timeout=10) as http:
            missing = http.get("/v2/pods")
            assert missing.status_code == 401
            assert missing.json() == {
                "title": "Unauthorized",
                "status": 401,
                "detail": "missing bearer token",
            }
            assert missing.headers["content-type"].startswith("application/problem+json")
            auth = {"Authorization": f"Bearer {KEY}"}
            body = {"name": "procure-x", "image": "i", "gpu": {"id": RTX}, "entrypoint": ["sh"]}
            refused = http.post("/v2/pods", json=body, headers=auth)
            assert refused.status_code == 422
            assert any("entrypoint" in e for e in refused.json()["errors"])
            no_image = http.post("/v2/pods", json={"name": "x", "gpu": {"id": RTX}}, headers=auth)
            assert no_image.status_code == 422
            gone = http.get("/v2/pods/nosuchpod", headers=auth)
            assert gone.status_code == 404
            validate(_exchange(refused, "/v2/pods"))
            validate(_exchange(gone, "/v2/pods/nosuchpod"))
    finally:
        mock.stop()


def _exchange(answer: httpx.Response, path: str) -> Exchange:
    # The answer alone: these requests break the spec on purpose.
    method = answer.request.method
    return Exchange(method, path, b"", answer.status_code, answer.headers, answer.content)


def test_a_redirect_never_carries_the_key_elsewhere() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        moved = {"Location": "http://127.0.0.9:1/v2/pods"}
        return httpx.Response(302, headers=moved, stream=httpx.ByteStream(b""))

    async def scenario() -> None:
        settings = RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL="http://127.0.0.1:9")
        c = RunPodCloud(settings, transport=httpx.MockTransport(answer))
        with pytest.raises(ProviderError) as raised:
            await c.instances()
        assert KEY not in str(raised.value)
        await c.aclose()

    asyncio.run(scenario())
    assert [r.url.host for r in seen] == ["127.0.0.1"]


def test_a_pod_in_a_status_runpod_added_is_listed_not_an_error(cloud: MockCloud) -> None:
    """Before the fix: one pod in a status the client did not know made the whole listing a
    ProviderError, so every find, sweep and fleet scan of the account failed until it
    changed. It is listed now: with its port mapped, `active` (its node tells whether it
    works), never guessed gone."""

    async def scenario() -> None:
        c = client(cloud, Recorder())
        offer = Offer("runpod", f"SECURE:{RTX}", "RTX4090", 1, "US-TX-3", 690_000, False, 1, 1)
        pod = await c.launch_spec(spec_for(offer))
        faults(cloud, unknown_status=True)
        listed = {i.id: i for i in await c.instances()}
        faults(cloud)
        assert listed[pod.id].status in ("active", "unhealthy")
        assert (listed[pod.id].status == "active") == (listed[pod.id].node_url is not None)
        await c.terminate([pod.id])
        await c.aclose()

    asyncio.run(scenario())


def test_unknown_status_pod_can_still_be_terminated(cloud: MockCloud) -> None:
    async def scenario() -> None:
        c = client(cloud, Recorder())
        offer = Offer("runpod", f"SECURE:{RTX}", "RTX4090", 1, "US-TX-3", 690_000, False, 1, 1)
        pod = await c.launch_spec(spec_for(offer))
        faults(cloud, unknown_status=True)
        assert [i.id for i in await c.terminate([pod.id])] == [pod.id]
        faults(cloud)
        assert await c.get(pod.id) is None
        await c.aclose()

    asyncio.run(scenario())


def test_prices_drift_by_seed_balance_and_hourly_buckets() -> None:
    from procure.clouds.runpod.catalogue import GPUS
    from procure.clouds.runpod.mockbilling import pod_billing
    from procure.clouds.runpod.mockstate import MockRunPodState, Problem

    kind = GPUS[RTX]
    drifting = [
        MockRunPodState(RunPodMockConfig(speed=0, price_drift=0.3, seed=7, nodes=False))
        for _ in range(2)
    ]
    prices = [[s.price(kind, "SECURE", h * 3600.0) for h in range(6)] for s in drifting]
    assert prices[0] == prices[1] and len(set(prices[0])) > 1  # moves, the same for one seed
    assert all(0.69 * 0.7 - 0.01 <= p <= 0.69 * 1.3 + 0.01 for p in prices[0])

    poor = MockRunPodState(RunPodMockConfig(speed=0, balance_usd=2.0, nodes=False))
    body = {"name": "procure-x", "image": "i", "gpu": {"id": "NVIDIA H100 80GB HBM3"}}
    with pytest.raises(Problem) as refused:
        poor.create(body)  # $2.69/h: less than an hour of credits
    assert refused.value.status == 402

    state = MockRunPodState(RunPodMockConfig(speed=0, nodes=False))
    pod = state.create(body | {"gpu": {"id": RTX, "count": 2}})
    state.clock.advance(2.5 * 3600 + 0.2)
    answer = pod_billing(state, {"podId": pod.id, "bucketSize": "hour", "lastN": "5"})
    total = round(sum(r["totalAmount"] for r in answer["records"]) * 1e6)
    assert total == state.billed(pod) == billed_micros(1.38, 2.5 * 3600 + 0.2)
    assert len(answer["records"]) in (3, 4)  # the hours it ran in (the first may straddle)
