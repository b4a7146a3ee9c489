"""The Vast.ai client against the mock Vast.ai over real HTTP on loopback: offers (on-demand and
bids, GPU names made canonical, prices that drift), launch → running → the node answers with the
instance's own token, bids outbid (by the admin, by the hazard, a losing bid), per-second billing
that matches the charges, terminate idempotent, pacing and Vast's 429s, every fault mapped to the
error callers branch on, the key never leaked. Every exchange is validated against Vast's spec."""

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
    RateLimited,
)
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.mock import MockCloud, start_mock_cloud
from procure.clouds.vast.mockstate import MockVastConfig, MockVastState
from procure.clouds.vast.settings import VastSettings
from procure.clouds.vast.wire import canonical_gpu
from vast_recording import Recorder, validate

KEY = "vast-TEST-key-0123456789abcdef0123"
SCALE = 0.02  # the mock's rate limits, and the client's pacing, at 2 % of Vast's


def config(**kw: Any) -> MockVastConfig:
    base: dict[str, Any] = {
        "api_key": KEY,
        "speed": 0,
        "boot_s": 60,
        "outbid_per_hour": 0,
        "rate_scale": 0,  # no limits but where a test is about them (timing on a busy CI)
    }
    return MockVastConfig(**(base | kw))


@pytest.fixture
def cloud() -> Iterator[MockCloud]:
    mock = start_mock_cloud(config())
    yield mock
    mock.stop()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    assert validate(rec.exchanges) > 0


def client(
    cloud: MockCloud, rec: Recorder | None = None, *, key: str = KEY, **kw: Any
) -> VastCloud:
    settings = VastSettings(
        VAST_API_KEY=key,
        VAST_API_URL=cloud.url,
        VAST_API_TIMEOUT_S=kw.pop("timeout_s", 5),
        VAST_PACE_SCALE=kw.pop("pace", SCALE * 1.5),
        VAST_RATE_LIMIT_RETRIES=kw.pop("retries", 0),  # each 429 seen by the test itself
    )
    return VastCloud(settings, transport=rec or Recorder(), **kw)


def admin(cloud: MockCloud, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {KEY}"}
    if body is None:
        answer = httpx.get(f"{cloud.url}{path}", headers=headers)
    else:
        answer = httpx.post(f"{cloud.url}{path}", json=body, headers=headers)
    answer.raise_for_status()
    return answer.json()


def advance(cloud: MockCloud, seconds: float) -> None:
    admin(cloud, "/admin/clock", {"advance_s": seconds})


def spec(offer: Offer, name: str = "procure-job-1", **kw: Any) -> LaunchSpec:
    return LaunchSpec(name=name, offer=offer, image="procure/node:1", **kw)


async def cheapest(c: VastCloud, gpu: str = "RTX4090", spot: bool = False) -> Offer:
    return next(o for o in await c.offers(gpu=gpu) if o.interruptible is spot)


async def until(read: Any, ok: Any, what: str) -> Any:
    """Poll `read()` until `ok(value)`, within a generous deadline."""
    async with asyncio.timeout(20):
        while True:
            value = await read()
            if ok(value):
                return value
            await asyncio.sleep(0.03)
    raise AssertionError(what)


def billed(cloud: MockCloud, instance_id: str) -> int:
    rows = admin(cloud, "/admin/billing")["instances"]
    return next(r["billedMicroUsd"] for r in rows if r["id"] == instance_id)


def test_offers_are_canonical_cheapest_first_with_bids_and_prices_that_drift(
    cloud: MockCloud, recorder: Recorder
) -> None:
    async def scenario() -> None:
        c = client(cloud, recorder)
        offers = await c.offers()
        assert [o.price_per_hour for o in offers] == sorted(o.price_per_hour for o in offers)
        assert {o.gpu for o in offers} == {"RTX4090", "A100", "H100"}
        assert all(o.provider == "vast" and o.billing_increment_s == 1 for o in offers)
        assert "Tokyo, JP" not in {o.region for o in offers}  # no direct port: unreachable
        bid = await cheapest(c, spot=True)
        ondemand = next(o for o in offers if o.offer_id == bid.offer_id and not o.interruptible)
        assert bid.min_bid_per_hour == bid.price_per_hour < ondemand.price_per_hour
        assert ondemand.region == "Quebec, CA" and ondemand.gpu_count == 1
        advance(cloud, 3 * 600)  # three drift periods later
        again = await c.offers(gpu="RTX 4090")
        moved = next(o for o in again if o.offer_id == ondemand.offer_id and not o.interruptible)
        assert moved.price_per_hour != ondemand.price_per_hour
        assert abs(moved.price_per_hour - 360_000) <= 36_000  # within the ±10 % drift
        await c.aclose()

    asyncio.run(scenario())
    # The drift is deterministic by seed.
    a, b = MockVastState(config(seed=7)), MockVastState(config(seed=7))
    m = a.config.machines[0]
    assert [a.price(m, t * 600.0) for t in range(5)] == [b.price(m, t * 600.0) for t in range(5)]


def test_canonical_gpu_names() -> None:
    names = [
        "RTX 4090",
        "A100 SXM4",
        "A100 PCIE",
        "H100 SXM",
        "H100 NVL",
        "RTX A6000",
        "Tesla V100",
    ]
    assert [canonical_gpu(n) for n in names] == [
        "RTX4090", "A100", "A100", "H100", "H100", "A6000", "V100",
    ]  # fmt: skip


def test_launch_boots_runs_its_node_bills_per_second_and_terminates_once(
    cloud: MockCloud, recorder: Recorder
) -> None:
    async def scenario() -> None:
        c = client(cloud, recorder)
        offer = await cheapest(c, "A100")
        env = {"GPU_WORKER_TOKEN": "node-token-of-job-1", "JOB": "42"}
        launched = await c.launch_spec(spec(offer, env=env, startup_script="procure gpu-worker"))
        assert (launched.status, launched.name, launched.price_per_hour) == (
            "booting", "procure-job-1", offer.price_per_hour,
        )  # fmt: skip
        sent = next(x.request for x in recorder.exchanges if x.method == "PUT")
        assert sent["env"] == env | {"-p 9876:9876": "1"} and sent["label"] == "procure-job-1"
        assert sent["onstart"] == "procure gpu-worker" and "price" not in sent
        got = await c.get(launched.id)
        assert got is not None and got.status == "booting" and got.node_url is None
        advance(cloud, 30)  # loading: the GPU is not billed
        got = await c.get(launched.id)
        assert got is not None and got.status == "booting" and billed(cloud, launched.id) == 0
        advance(cloud, 30)
        got = await until(lambda: c.get(launched.id), lambda i: i.node_url, "no node_url")
        assert got.status == "active" and got.gpu == "A100" and got.ip
        assert got.node_url.startswith(f"http://{got.ip}:")
        async with httpx.AsyncClient(timeout=10) as node:
            url = f"{got.node_url}/gpu-check"
            ok = await node.post(
                url, json={"agent_id": "t"}, headers={"Authorization": "Bearer node-token-of-job-1"}
            )
            assert ok.status_code == 200 and ok.json()
            assert (
                await node.post(url, headers={"Authorization": f"Bearer {KEY}"})
            ).status_code == 401
        assert [i.id for i in await c.find("procure-job-1")] == [launched.id]
        assert await c.find("procure-job-2") == []
        assert [i.id for i in await c.labelled()] == [launched.id]
        advance(cloud, 3600)  # an hour running, billed per second at the launch's price
        assert billed(cloud, launched.id) == got.price_per_hour
        charged = await c.billed(launched.id)
        assert charged is not None and abs(charged - got.price_per_hour) <= 500  # 3 decimals
        [gone] = await c.terminate([launched.id])
        assert gone.id == launched.id
        assert await c.get(launched.id) is None
        assert await c.terminate([launched.id]) == []  # a retry after a crash: no error
        assert await c.find("procure-job-1") == []
        advance(cloud, 3600)  # nothing more after the end
        assert billed(cloud, launched.id) == got.price_per_hour
        async with httpx.AsyncClient(timeout=2) as node:

            async def down() -> bool:
                try:
                    await node.post(f"{got.node_url}/gpu-check")
                except httpx.TransportError:
                    return True
                return False

            await until(down, bool, "the node outlived its instance")
        await c.aclose()

    asyncio.run(scenario())


def test_bids_are_outbid_by_the_admin_by_a_losing_bid_and_at_the_hazard_rate(
    cloud: MockCloud, recorder: Recorder
) -> None:
    async def scenario() -> None:
        c = client(cloud, recorder)
        offer = await cheapest(c, "RTX4090", spot=True)
        bid = await c.launch_spec(spec(offer, "procure-bid-1"))
        sent = [x.request for x in recorder.exchanges if x.method == "PUT"][-1]
        assert sent["price"] == offer.min_bid_per_hour / 1e6 and bid.interruptible
        low = await c.launch_spec(spec(offer, "procure-bid-2", bid_per_hour=1_000))
        got = await c.get(low.id)  # a losing bid is paused at once: never runs
        assert got is not None and got.status == "preempted"
        advance(cloud, 60)
        running = await c.get(bid.id)
        assert running is not None and running.status == "active"
        advance(cloud, 100)
        admin(cloud, f"/admin/instances/{bid.id}/preempt", {})
        outbid = await c.get(bid.id)
        assert outbid is not None and outbid.status == "preempted" and outbid.node_url is None
        paid = billed(cloud, bid.id)
        assert paid == round(offer.min_bid_per_hour * 100 / 3600)
        advance(cloud, 600)
        assert billed(cloud, bid.id) == paid and billed(cloud, low.id) == 0  # paused: unbilled
        # An on-demand instance's host dies only when the admin says so.
        od = await c.launch_spec(spec(await cheapest(c, "H100"), "procure-od-1"))
        advance(cloud, 60)
        admin(cloud, f"/admin/instances/{od.id}/preempt", {})
        dead = await c.get(od.id)
        assert dead is not None and dead.status == "preempted"
        await c.terminate([bid.id, low.id, od.id])
        await c.aclose()

    asyncio.run(scenario())


def test_the_outbid_hazard_is_deterministic_by_seed() -> None:
    def outbids(seed: int) -> list[float | None]:
        state = MockVastState(config(seed=seed, outbid_per_hour=2.0, nodes=False))
        made = [
            state.create(
                7_100_004,
                label=f"b{n}",
                image="i",
                env={},
                onstart=None,
                runtype="args",
                price=1.0,
                cancel_unavail=False,
            )
            for n in range(2)
        ]
        return [i.preempted_at for i in made]

    first = outbids(3)
    assert first == outbids(3) and first != outbids(4)
    assert all(t is not None and t > 60 for t in first)  # after it started running
    state = MockVastState(config(seed=3, outbid_per_hour=2.0))
    inst = state.create(
        7_100_004, label="b", image="i", env={}, onstart=None,
        runtype="args", price=1.0, cancel_unavail=False,
    )  # fmt: skip
    assert inst.preempted_at is not None
    state.clock.advance(inst.preempted_at + 1)
    assert state.actual_status(inst, state.now()) == "stopped"


def test_fleet_protocol_types_launch_and_instances(cloud: MockCloud, recorder: Recorder) -> None:
    async def scenario() -> None:
        c = client(cloud, recorder)
        types = {t.name: t for t in await c.instance_types()}
        rtx = types["vast_1x_RTX4090"]
        assert rtx.gpus == 1 and {"California, US", "Quebec, CA"} <= set(rtx.regions_with_capacity)
        assert types["vast_8x_H100"].gpus == 8
        [instance_id] = await c.launch(
            instance_type="vast_1x_RTX4090", region="California, US", name="procure-act-1",
            ssh_key_names=[],
        )  # fmt: skip
        [inst] = await c.instances()
        assert (inst.id, inst.name, inst.instance_type, inst.region) == (
            instance_id, "procure-act-1", "vast_1x_RTX4090", "California, US",
        )  # fmt: skip
        # Another region's ask at or under the price checked: Vast.ai's regions are locations.
        [elsewhere] = await c.launch(
            instance_type="vast_1x_RTX4090", region="Atlantis", name="x", ssh_key_names=[],
            max_price_per_hour=rtx.price_per_hour,
        )  # fmt: skip
        assert elsewhere != instance_id
        with pytest.raises(CapacityError):  # none as cheap as the caps were checked against
            await c.launch(
                instance_type="vast_1x_RTX4090", region="California, US", name="y",
                ssh_key_names=[], max_price_per_hour=rtx.price_per_hour - 1,
            )  # fmt: skip
        await c.terminate([instance_id])
        await c.aclose()

    asyncio.run(scenario())


def test_capacity_runs_out(cloud: MockCloud, recorder: Recorder) -> None:
    async def scenario() -> None:
        c = client(cloud, recorder)
        offer = await cheapest(c, "H100")
        admin(cloud, "/admin/capacity", {"gpu": "H100", "count": 0})
        assert await c.offers(gpu="H100") == []
        with pytest.raises(CapacityError) as raised:
            await c.launch_spec(spec(offer))
        assert not raised.value.retryable
        admin(cloud, "/admin/capacity", {"offer_id": int(offer.offer_id), "count": 1})
        first = await c.launch_spec(spec(offer))
        with pytest.raises(CapacityError):  # its one slot is taken
            await c.launch_spec(spec(offer, "procure-job-2"))
        await c.terminate([first.id])
        await c.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"status": 500}, ProviderError),
        ({"status": 503}, ProviderError),
        ({"garbage": True}, ProviderError),
        ({"huge": True}, ProviderError),
        ({"hang_s": 2}, ProviderError),
        ({"rate_limit": True}, RateLimited),
    ],
)
def test_faults_map_to_retryable_errors_without_the_key(
    cloud: MockCloud,
    recorder: Recorder,
    fault: dict[str, Any],
    error: type[CloudError],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        # A short deadline only where the fault is a hang: a loaded machine is no hang.
        c = client(cloud, recorder, timeout_s=0.5 if "hang_s" in fault else 15)
        offer = await cheapest(c)
        calls = [
            ("search", lambda: c.offers()),
            ("create", lambda: c.launch_spec(spec(offer))),
            ("show", lambda: c.get("30000001")),
            ("list", lambda: c.find("procure-job-1")),
            ("destroy", lambda: c.terminate(["30000001"])),
            ("charges", lambda: c.billed("30000001")),
        ]
        for endpoint, call in calls[1:3] if "hang_s" in fault else calls:
            admin(cloud, "/admin/faults", fault | {"endpoint": endpoint})
            with pytest.raises(error) as raised:
                await call()
            assert raised.value.retryable, endpoint
            assert KEY not in str(raised.value) and KEY not in repr(c)
            if isinstance(raised.value, RateLimited):
                assert raised.value.retry_after_s and raised.value.retry_after_s > 0
        await c.aclose()

    asyncio.run(scenario())
    assert KEY not in caplog.text


def test_a_bad_key_a_bad_bid_and_an_unknown_status(cloud: MockCloud, recorder: Recorder) -> None:
    async def scenario() -> None:
        bad = client(cloud, recorder, key="wrong-key")
        with pytest.raises(AuthError) as raised:
            await bad.find("procure-job-1")
        assert "wrong-key" not in str(raised.value) and not raised.value.retryable
        await bad.aclose()
        c = client(cloud, recorder)
        offer = await cheapest(c, spot=True)
        with pytest.raises(CloudError) as refused:  # Vast's ceiling on a bid is $128/h
            await c.launch_spec(spec(offer, bid_per_hour=500_000_000))
        assert type(refused.value) is CloudError and not refused.value.retryable
        admin(cloud, "/admin/faults", {"endpoint": "create", "status": 400})
        with pytest.raises(CloudError) as invalid:  # Vast's invalid_args: fix, do not retry
            await c.launch_spec(spec(offer))
        assert type(invalid.value) is CloudError and "invalid_args" in str(invalid.value)
        inst = await c.launch_spec(spec(offer))
        advance(cloud, 60)
        admin(cloud, "/admin/faults", {"unknown_status": True})
        got = await c.get(inst.id)
        # A status procure does not know, with the node's port mapped: its node decides (read
        # as active; a node that never answers is judged stuck), never killed for the word.
        assert got is not None and got.status == "active" and got.node_url is not None
        admin(cloud, "/admin/faults", {"clear": True, "never_boot": True})
        stuck = await c.launch_spec(spec(await cheapest(c, "A100"), "procure-job-2"))
        advance(cloud, 3600)
        got = await c.get(stuck.id)
        assert got is not None and got.status == "booting" and billed(cloud, stuck.id) == 0
        await c.terminate([inst.id, stuck.id])
        await c.aclose()

    asyncio.run(scenario())


def test_pacing_keeps_under_vasts_limits_and_429s_back_off(recorder: Recorder) -> None:
    cloud = start_mock_cloud(config(rate_scale=0.5, nodes=False))  # list: one per 0.5 s

    async def scenario() -> None:
        paced = client(cloud, recorder, pace=0.6)
        for _ in range(3):
            assert await paced.find("x") == []
        assert cloud.state.rate_limited == 0
        await paced.aclose()
        eager = client(cloud, recorder, pace=0)  # no pacing: Vast answers 429, no Retry-After
        with pytest.raises(RateLimited) as raised:  # the same key just called
            await eager.find("x")
        assert raised.value.retry_after_s and raised.value.retry_after_s >= 0.5
        await eager.find("x")  # the client waits out its back-off by itself
        with pytest.raises(RateLimited):
            await eager.find("x")
        limited = [x for x in recorder.exchanges if x.status == 429]
        assert limited and all("retry-after" not in x.content_type for x in limited)
        await eager.aclose()

    try:
        asyncio.run(scenario())
    finally:
        cloud.stop()
    # The 429 shapes: plain text for search, Vast's error envelope for destroy.
    mock = start_mock_cloud(config(rate_scale=10))
    try:
        url, auth = mock.url, {"Authorization": f"Bearer {KEY}"}
        body = {"type": "on-demand", "limit": 5, "order": [["dph_total", "asc"]]}
        first = httpx.post(f"{url}/api/v0/bundles/", json=body | {"num_gpus": {"lte": "1"}})
        prices = [o["dph_total"] for o in first.json()["offers"]]
        assert first.status_code == 200 and prices == sorted(prices) and len(prices) == 5
        assert {o["num_gpus"] for o in first.json()["offers"]} == {1}  # "1": the SDK's strings
        second = httpx.post(f"{url}/api/v0/bundles/", json=body)
        assert second.status_code == 429 and "retry-after" not in second.headers
        assert second.text.startswith("API requests too frequent")
        httpx.delete(f"{url}/api/v0/instances/1/", headers=auth)
        gone = httpx.delete(f"{url}/api/v0/instances/1/", headers=auth)
        assert gone.status_code == 429 and gone.json()["error"] == "rate_limit_exceeded"
        assert httpx.get(f"{url}/api/v1/instances", headers=auth).status_code == 200  # no slash
        no_image = httpx.put(f"{url}/api/v0/asks/7100001/", json={"label": "x"}, headers=auth)
        assert no_image.status_code == 400 and no_image.json()["error"] == "invalid_args"
        assert httpx.get(f"{url}/api/v1/instances/").status_code == 401
    finally:
        mock.stop()


def test_find_pages_through_many_instances() -> None:
    mock = start_mock_cloud(config(nodes=False, rate_scale=0))
    try:

        async def scenario() -> list[Instance]:
            c = client(mock, pace=0)
            offer = await cheapest(c, "H100")
            mock.state.set_capacity(40, int(offer.offer_id), None, None)
            for n in range(28):
                await c.launch_spec(spec(offer, f"procure-job-{n}" if n else "other"))
            found = await c.find("procure-job-27")
            everything = await c.labelled()
            assert len(everything) == 27 and len(await c.instances()) == 28
            await c.aclose()
            return found

        [last] = asyncio.run(scenario())
        assert last.name == "procure-job-27"
    finally:
        mock.stop()


def test_a_429_is_waited_out_and_retried_as_vasts_sdk_does(recorder: Recorder) -> None:
    cloud = start_mock_cloud(config(rate_scale=0.5, nodes=False))  # list: one per 0.5 s

    async def scenario() -> None:
        first = client(cloud, recorder, pace=0)
        await first.find("x")
        await first.aclose()
        # Another process (a new client knows nothing of the last call): Vast answers 429,
        # the client backs off and tries again by itself.
        second = client(cloud, recorder, pace=0, retries=2)
        assert await second.find("x") == []
        await second.aclose()
        statuses = [x.status for x in recorder.exchanges]
        assert 429 in statuses and statuses[-1] == 200

    try:
        asyncio.run(scenario())
    finally:
        cloud.stop()
