"""Vast.ai's charges at the path Vast's SDK calls, an offer priced with the disk its launch asks
for, a search for a GPU model the market lacks that gives up once nothing new comes, and two
fleets on one store: one fleet's nodes answering is no verdict on another fleet's silent ones.
Each test drives the real client or controller over loopback HTTP and a real store."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.clouds.base import LaunchSpec
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.mock import MockCloud, start_mock_cloud
from procure.clouds.vast.mockstate import Machine, MockVastConfig
from procure.clouds.vast.pacing import Pacer
from procure.clouds.vast.settings import VastSettings
from procure.fleet.controller import scan_once
from test_fleet_on_runpod_and_vast import fleet as vast_fleet
from test_fleet_on_runpod_and_vast import vast_world
from test_fleet_silent_nodes_and_short_listings import NodelessCloud


def test_a_fleet_running_its_own_image_is_not_judged_silent_by_another_fleets_nodes(
    db_url: str,
) -> None:
    """Before the fix: whether "some node of the fleet has answered" was read from every sample
    on the store (and every instance row), whichever fleet took it: a fleet running its own image
    (no procure node) on a store where another fleet's nodes had answered within the samples'
    retention had each instance terminated as "active, its node silent" one boot timeout after
    launch, and replaced, for ever."""

    async def body() -> None:
        with_nodes = FakeCloud()
        async with fleet(db_url, with_nodes, fleet_name="gpu-nodes", min_instances=1,
                         boot_timeout_mins=10, high_gpu_threshold=100) as first:  # fmt: skip
            await scan_for(first, 5)  # its node answers; the fleet is then stopped
        assert with_nodes.terminations == [] and len(with_nodes.launches) == 1
        own_image = NodelessCloud(_ids=itertools.count(101))  # ids and IPs apart from the first
        async with fleet(db_url, own_image, fleet_name="own-image", min_instances=1,
                         boot_timeout_mins=10, high_gpu_threshold=100) as second:  # fmt: skip
            await scan_for(second, 60)
            acts = [(a.action_type, a.target_instance, a.status, a.reason)
                    for a in all_actions(second)]  # fmt: skip
            assert own_image.terminations == [], acts
            assert len(own_image.launches) == 1, acts

    asyncio.run(body())


# --- Vast.ai's charges, at the path Vast's own SDK calls ------------------------------------


class _VastCharges(BaseHTTPRequestHandler):
    """Vast.ai's charges as its SDK (vast-cli: `endpoint = '/api/v0/charges/'`) reaches them:
    the path with its trailing slash; the slashless one is only redirected there (a server that
    routes with strict slashes), which a client that follows no redirects cannot read."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.seen.append(path)
        if path == "/api/v0/charges/":
            row = {"type": "instance", "source": "instance-4242", "amount": 1.234, "start": 1,
                   "end": 2, "description": "Instance 4242 Charges", "items": []}  # fmt: skip
            self._send(200, {"success": True, "count": 1, "total": 1, "results": [row],
                             "next_token": None})  # fmt: skip
        elif path == "/api/v0/charges":
            query = self.path[len(path) :]
            self._send(308, {"detail": "redirect"}, {"Location": f"/api/v0/charges/{query}"})
        else:
            self._send(404, {"success": False, "error": "not_found", "msg": "no such path"})

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def vast_charges() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VastCharges)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_instances_vast_charges_are_read_at_the_path_vasts_sdk_calls(vast_charges: str) -> None:
    """Before the fix: the client asked `GET /api/v0/charges` where Vast's SDK asks
    `/api/v0/charges/` (every other call of the client keeps Vast's trailing slash): a Vast that
    routes only its own path answers a redirect the client does not follow, and what Vast
    charged an instance was never read."""

    async def scenario() -> int | None:
        settings = VastSettings(VAST_API_KEY="vast-charges-key", VAST_API_URL=vast_charges,
                                VAST_PACE_SCALE=0, VAST_RATE_LIMIT_RETRIES=0)  # fmt: skip
        c = VastCloud(settings)
        try:
            return await c.billed("4242")
        finally:
            await c.aclose()

    assert asyncio.run(scenario()) == 1_234_000, _VastCharges.seen


# --- an offer priced with the disk its launch asks for ---------------------------------------


def _disk_market() -> MockCloud:
    """One RTX 4090 host whose disk costs $1.80/GB a month: $0.02/h for Vast's default 8 GB,
    $0.05/h for 20 GB, beside its GPU's $0.40/h."""
    host = Machine(7_200_001, "RTX 4090", 1, "California, US", 0.40, storage_cost=1.8)
    config = MockVastConfig(
        api_key="vast-disk-key",
        speed=0,
        boot_s=0,  # running at once: its disk and its GPU billed the same hour
        drift=0.0,
        outbid_per_hour=0,
        rate_scale=0,
        nodes=False,
        machines=[host],
    )
    return start_mock_cloud(config)


def _client(mock: MockCloud, **kw: Any) -> VastCloud:
    settings = VastSettings(VAST_API_KEY=mock.api_key, VAST_API_URL=mock.url, VAST_PACE_SCALE=0,
                            VAST_RATE_LIMIT_RETRIES=0)  # fmt: skip
    return VastCloud(settings, **kw)


def _an_hour_of(mock: MockCloud, *, interruptible: bool) -> tuple[int, int, int | None, int | None]:
    """An RTX4090 offer of that kind launched and run an hour: its price as offered, as
    launched and as listed, and what Vast charged for the hour."""

    async def scenario() -> tuple[int, int, int | None, int | None]:
        c = _client(mock)
        try:
            offers = await c.offers(gpu="RTX4090")
            offer = next(o for o in offers if o.interruptible == interruptible)
            spec = LaunchSpec(name="procure-job-hour", offer=offer, image="procure/node:1")
            launched = await c.launch_spec(spec)
            mock.state.clock.advance(3600)  # an hour running (a bid never outbid)
            listed = await c.get(launched.id)
            return (
                offer.price_per_hour,
                launched.price_per_hour,
                listed.price_per_hour if listed else None,
                await c.billed(launched.id),
            )
        finally:
            await c.aclose()

    try:
        return asyncio.run(scenario())
    finally:
        mock.stop()


def test_a_vast_offers_price_is_what_its_launch_is_billed_disk_included() -> None:
    """Before the fix: the search asked for no disk, so Vast priced each offer with its default
    8 GB, while every launch asks for 20 GB: the price shown, compared and checked against the
    caps was $0.42/h, the instance billed $0.45/h (and listed at it)."""
    mock = _disk_market()

    shown, launched, listed, charged = _an_hour_of(mock, interruptible=False)
    assert charged == 450_000  # Vast's charges for the hour: GPU and 20 GB of disk
    assert shown == launched == listed == charged, (shown, launched, listed, charged)


# --- a search for a GPU model the market lacks -----------------------------------------------


class _PriceFilterIgnored(httpx.AsyncBaseTransport):
    """A Vast that ignores the search's price filter (or answers from a cache): every answer is
    the same cheapest page, whatever `dph_total` the client asks past."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v0/bundles/":
            body = json.loads(request.content)
            body.pop("dph_total", None)
            headers = {k: v for k, v in request.headers.items() if k != "content-length"}
            request = httpx.Request(request.method, request.url, headers=headers, json=body)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _crowd_market(asks: int) -> MockCloud:
    """`asks` RTX 4090 asks and no H100 at all."""
    crowd = [Machine(8_300_000 + n, "RTX 4090", 1, "Texas, US", 0.30 + n / 10_000)
             for n in range(asks)]  # fmt: skip
    config = MockVastConfig(api_key="vast-crowd-key", speed=0, drift=0.0, outbid_per_hour=0,
                            rate_scale=0, nodes=False, machines=crowd)  # fmt: skip
    return start_mock_cloud(config)


def _waited_for_absent_h100(mock: MockCloud, **kw: Any) -> tuple[list[Any], float]:
    """`offers(gpu="H100")` on a client paced as against Vast (a search a second), on a clock
    that moves only when the pacer waits: the seconds the caller waited for its answer."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    pacer = Pacer(1.0, clock=lambda: now[0], sleep=sleep)

    async def scenario() -> list[Any]:
        c = _client(mock, pacer=pacer, **kw)
        try:
            return await c.offers(gpu="H100")
        finally:
            await c.aclose()

    try:
        return asyncio.run(scenario()), pacer.waited_s
    finally:
        mock.stop()


def test_a_vast_search_whose_answers_bring_nothing_new_gives_up() -> None:
    """Before the fix: a search for a model absent from the first answer went on past the
    answer's highest price; when Vast's answer did not move (the price filter ignored), each
    answer brought nothing new and the client asked again, six answers for on-demand and six
    for bids: 11 s of paced searches to learn nothing."""
    offers, waited = _waited_for_absent_h100(_crowd_market(600), transport=_PriceFilterIgnored())
    assert offers == []
    # Each kind: its first answer, one past the cut's price, and no more once nothing is new.
    assert waited <= 5.0, f"waited {waited:g} s of paced searches for no H100"


def test_a_gpu_model_absent_from_the_whole_market_is_not_searched_for_again_among_bids() -> None:
    """Before the fix: once the on-demand search had read the whole market (its last answer not
    full) and found no H100, the same hosts' bids were read through again, answer by answer: an
    absent model cost the caller twice the market's paced searches."""
    offers, waited = _waited_for_absent_h100(_crowd_market(1_200))
    assert offers == []
    # The market in three answers (500, 500, 200), each a second apart: then no bid search.
    assert waited <= 2.0, f"waited {waited:g} s of paced searches for no H100"


# --- a fleet launch lost on Vast.ai (its host died) ------------------------------------------


def test_a_fleet_launch_whose_vast_host_died_is_destroyed_not_left_billing_its_disk(
    sqlite_url: str,
) -> None:
    """Before the fix: a fleet instance the cloud shows lost (Vast.ai's host offline or its
    container exited, a RunPod pod EXITED) was ended in the fleet's ledger and replaced, but left
    on the account: Vast.ai bills its disk until it is destroyed (and its GPU again, should the
    host come back), while the fleet counts it at nothing, for ever."""
    host = {"storage_cost": 3.6}  # $/GB a month: 20 GB of disk, $0.10/h
    machines = [
        Machine(7_400_001, "RTX 4090", 1, "California, US", 0.40, **host),
        Machine(7_400_002, "RTX 4090", 1, "California, US", 0.41, **host),
    ]
    mock, cloud = vast_world(boot_s=60, machines=machines)

    def destroyed(instance_id: int) -> bool:
        with mock.state.lock:
            inst = mock.state.instances[instance_id]
            return inst.destroyed_at is not None and inst.destroyed_at <= mock.state.now()

    def billed(instance_id: int) -> int:
        with mock.state.lock:
            return mock.state.billed_micros(mock.state.instances[instance_id])

    async def minutes(ctx: Any, n: int) -> None:
        for _ in range(n):
            await scan_once(ctx)
            mock.state.clock.advance(60)

    async def body() -> None:
        async with vast_fleet(sqlite_url, mock, cloud, default_instance_type="vast_1x_RTX4090",
                              region="California, US", min_instances=1, max_hourly_spend=100,
                              high_gpu_threshold=100, boot_timeout_mins=10) as ctx:  # fmt: skip
            await minutes(ctx, 5)
            [first] = list(mock.state.instances)
            mock.state.preempt(first)  # its host dies: offline
            await minutes(ctx, 60)
            acts = [(a.action_type, a.target_instance, a.status, a.reason)
                    for a in all_actions(ctx)]  # fmt: skip
            assert len(mock.state.instances) == 2, acts  # replaced once, as before
            after_an_hour = billed(first)
            mock.state.clock.advance(10 * 3600)
            assert destroyed(first), (
                f"lost an hour ago, still on the account: billed ${after_an_hour / 1e6:.3f}, "
                f"${billed(first) / 1e6:.3f} ten hours later; {acts}"
            )
            assert any(a[:3] == ("terminate_instance", str(first), "executed") for a in acts)

    try:
        asyncio.run(body())
    finally:
        mock.stop()


# --- an eight-GPU offer priced past the first answers that hold the model ----------------------


def test_a_vast_eight_gpu_offer_is_found_past_answers_holding_one_gpu_bundles() -> None:
    """Before the fix: a search for a GPU model stopped at the first answer holding any offer of
    it, whatever its GPU count: asked for eight H100s, it stopped at a one-H100 bundle ($2.20/h)
    and never read as far as the eight-GPU one ($17.20/h): `offers(gpu="H100", gpu_count=8)`
    was empty and a fleet launch of `vast_8x_H100` failed "no offer", though Vast sold one."""
    crowd = [Machine(8_400_000 + n, "RTX 4090", 1, "Texas, US", 0.30 + n / 10_000)
             for n in range(600)]  # fmt: skip
    a100s = [Machine(8_500_000 + n, "A100 SXM4", 1, "Oregon, US", 2.30 + n / 1_000)
             for n in range(450)]  # fmt: skip
    h100s = [
        Machine(8_600_001, "H100 SXM", 1, "Virginia, US", 2.20),
        Machine(8_600_008, "H100 SXM", 8, "Virginia, US", 17.20),
    ]
    market = [*crowd, *h100s, *a100s]
    config = MockVastConfig(api_key="vast-eight-key", speed=0, drift=0.0, outbid_per_hour=0,
                            rate_scale=0, nodes=False, machines=market)  # fmt: skip
    mock = start_mock_cloud(config)

    async def scenario() -> tuple[list[Any], list[str]]:
        c = _client(mock)
        try:
            eights = await c.offers(gpu="H100", gpu_count=8, spot=False)
            launched = await c.launch(instance_type="vast_8x_H100", region="Virginia, US",
                                      name="procure-fleet-eight", ssh_key_names=[])  # fmt: skip
            return eights, launched
        finally:
            await c.aclose()

    try:
        eights, launched = asyncio.run(scenario())
    finally:
        mock.stop()
    assert [(o.offer_id, o.price_per_hour) for o in eights] == [("8600008", 17_200_000)]
    assert len(launched) == 1


def test_a_vast_bids_price_is_what_its_launch_is_billed_disk_included() -> None:
    """Before the fix: an interruptible offer was priced at its minimum bid alone, the GPU's,
    while Vast bills the instance's disk beside the bid: the bid shown, compared and booked was
    $0.18/h, the instance billed $0.23/h (20 GB at $1.80/GB a month)."""
    mock = _disk_market()

    shown, launched, listed, charged = _an_hour_of(mock, interruptible=True)
    assert charged == 230_000  # the bid ($0.18/h: 45 % of $0.40) and 20 GB of disk
    assert shown == launched == listed == charged, (shown, launched, listed, charged)


def test_a_vast_fleet_of_a_type_priced_past_the_catalogues_answers_launches_it(
    sqlite_url: str,
) -> None:
    """Before the fix: the fleet learns its type's price from Vast.ai's catalogue, read by price
    from the cheapest ask for at most six answers (3,000 asks): a type priced past them (eight
    H100s behind 3,100 cheaper asks, as on Vast's real market) was never in it, so its price was
    unknown, every launch was blocked, and the pool stayed empty."""
    crowd = [Machine(8_700_000 + n, "RTX 4090", 1, "Texas, US", 0.30 + n / 100_000)
             for n in range(3_100)]  # fmt: skip
    eight = Machine(8_800_008, "H100 SXM", 8, "Virginia, US", 17.20, nvml_name="NVIDIA H100")
    mock, cloud = vast_world(machines=[*crowd, eight], nodes=False)

    async def body() -> list[tuple[str, str | None, str]]:
        async with vast_fleet(sqlite_url, mock, cloud, default_instance_type="vast_8x_H100",
                              region="Virginia, US", min_instances=1, max_hourly_spend=100,
                              high_gpu_threshold=100) as ctx:  # fmt: skip
            for _ in range(3):
                await scan_once(ctx)
                mock.state.clock.advance(60)
            return [(a.status, a.block_reason, a.error_message or "") for a in all_actions(ctx)]

    try:
        acts = asyncio.run(body())
        with mock.state.lock:
            rented = [i.machine.ask_id for i in mock.state.instances.values()]
    finally:
        mock.stop()
    assert rented == [8_800_008], acts
