"""The agent's view of Lambda (`RentalCloud`) against the mock over real HTTP: offers, launch by
name, find after a crash, a per-instance node token, billing by Lambda's per-minute rule,
preemption, idempotent terminate; the mock's auth schemes, its spec checks and its faults in
Lambda's error envelope. Every request sent and every answer received is checked against
Lambda's spec (`procure.clouds.specs`)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from procure.clouds.base import (
    CloudError,
    LaunchSpec,
    Offer,
    ProviderError,
    RateLimited,
)
from procure.clouds.lambda_cloud import wire
from procure.clouds.lambda_cloud.client import LambdaCloud, user_data
from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig, MockCloudState
from procure.clouds.lambda_cloud.nodes import env_from_user_data
from procure.clouds.lambda_cloud.pacing import Pacer, unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.specs import validate_answer, validate_request
from procure.local import free_port

KEY = "sk-lambda-rental-0123456789"
CONFIG_TOKEN = "config-node-token"
LAUNCH = "/api/v1/instance-operations/launch"
# Lambda's error envelope as its spec's introduction states it, for statuses its operations do
# not document (429, 5xx): {"error": {"code", "message", "suggestion"?}}.
ENVELOPE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z-]+(/[a-z-]+)+$"},
                "message": {"type": "string"},
                "suggestion": {"type": "string"},
            },
        }
    },
}
TEMPLATES = [(re.compile(r"^/api/v1/instances/[^/]+$"), "/api/v1/instances/{id}")]


def template(path: str) -> str:
    return next((t for rx, t in TEMPLATES if rx.match(path)), path)


def check_exchange(method: str, path: str, sent: Any, status: int, answer: Any) -> None:
    """One request and its answer against Lambda's spec (the envelope where it says nothing)."""
    path = template(path)
    if sent is not None:
        validate_request("lambda", method, path, sent)
    if answer is None:
        return  # not JSON: an injected garbage answer, which the test itself asserts on
    if status in (200, 400, 401, 403, 404):
        validate_answer("lambda", method, path, status, answer)
    else:
        Draft202012Validator(ENVELOPE).validate(answer)


class Recording(httpx.AsyncBaseTransport):
    """Real sockets, each exchange kept for `check_exchange`."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, Any, int, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        await response.aclose()
        sent = json.loads(request.content) if request.content else None
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        self.seen.append((request.method, request.url.path, sent, response.status_code, answer))
        return httpx.Response(
            response.status_code, headers=response.headers, stream=httpx.ByteStream(content)
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def cloud() -> Iterator[MockCloud]:
    mock = start_mock_cloud(
        MockCloudConfig(
            api_key=KEY,
            speed=0,
            boot_s=120,
            node_port=free_port(),
            node_token=CONFIG_TOKEN,
            quota=5,
            capacity={"gpu_1x_a100": {"us-west-1": 2, "us-east-1": 1}, "gpu_1x_a10": {}},
        )
    )
    yield mock
    mock.stop()


@pytest.fixture
def recorded() -> Iterator[list[Recording]]:
    """Every client's exchanges, all checked against the spec once the test is done."""
    transports: list[Recording] = []
    yield transports
    exchanges = [e for t in transports for e in t.seen]
    assert exchanges
    for exchange in exchanges:
        check_exchange(*exchange)


def client(
    cloud: MockCloud, recorded: list[Recording], key: str = KEY, pacer: Pacer | None = None
) -> LambdaCloud:
    transport = Recording()
    recorded.append(transport)
    settings = LambdaSettings(
        LAMBDA_API_KEY=key,
        LAMBDA_API_URL=cloud.url,
        LAMBDA_API_TIMEOUT_S=5,
        LAMBDA_NODE_PORT=cloud.state.config.node_port,
    )
    return LambdaCloud(settings, pacer=pacer or unpaced(), transport=transport)


def admin(cloud: MockCloud, method: str, path: str, body: Any = None) -> Any:
    answer = httpx.request(
        method, cloud.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    answer.raise_for_status()
    return answer.json()


def billed(cloud: MockCloud) -> dict[str, int]:
    return {
        i["id"]: i["billedMicroUsd"] for i in admin(cloud, "GET", "/admin/billing")["instances"]
    }


async def until_up(c: LambdaCloud, instance_id: str) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        inst = await c.get(instance_id)
        if inst is not None and inst.node_url:
            return inst
        await asyncio.sleep(0.02)
    raise AssertionError("the instance never came up with a node address")


def a100(offers: list[Offer], region: str = "us-west-1") -> Offer:
    return next(o for o in offers if o.offer_id == "gpu_1x_a100" and o.region == region)


def test_launch_find_after_a_crash_bill_by_the_minute_and_terminate(
    cloud: MockCloud, recorded: list[Recording]
) -> None:
    async def scenario() -> None:
        first = client(cloud, recorded)
        assert (first.provider, first.billing_increment_s) == ("lambda", 60)
        offers = await first.offers()
        assert [o.price_per_hour for o in offers] == sorted(o.price_per_hour for o in offers)
        assert {(o.offer_id, o.region) for o in offers} == {
            ("gpu_1x_a100", "us-west-1"),
            ("gpu_1x_a100", "us-east-1"),
        }  # only where there is capacity
        offer = a100(await first.offers(gpu="a100"))
        assert (offer.gpu, offer.gpu_count, offer.price_per_hour) == ("A100", 1, 1_290_000)
        assert (offer.interruptible, offer.available, offer.billing_increment_s) == (False, 1, 60)
        assert await first.offers(gpu="H100") == []

        spec = LaunchSpec(
            name="procure-job-41",
            offer=offer,
            startup_script="procure gpu-worker",
            env={"GPU_WORKER_TOKEN": "per-instance token'41", "PROCURE_JOB": "job-41"},
        )
        launched = await first.launch_spec(spec)
        assert (launched.name, launched.status, launched.node_url) == (spec.name, "booting", None)
        await first.aclose()  # the agent dies here, before it records the id

        again = client(cloud, recorded)  # a new process
        [found] = await again.find("procure-job-41")
        assert (found.id, found.status) == (launched.id, "booting")
        assert [i.id for i in await again.labelled()] == [launched.id]
        assert await again.find("procure-job-42") == []

        admin(cloud, "POST", "/admin/clock", {"advance_s": 120})  # boot: not billed
        up = await until_up(again, launched.id)
        assert up.status == "active" and up.gpu == "A100"
        assert up.node_url == f"http://{up.ip}:{cloud.state.config.node_port}"
        assert billed(cloud) == {launched.id: 0}
        # The node takes the token the launch exported for it, and not the cloud's default.
        async with httpx.AsyncClient(base_url=up.node_url, timeout=10) as node:
            probe = {"agent_id": "agent"}
            own = {"Authorization": "Bearer per-instance token'41"}
            assert (await node.post("/gpu-check", json=probe, headers=own)).is_success
            other = {"Authorization": f"Bearer {CONFIG_TOKEN}"}
            assert (await node.post("/gpu-check", json=probe, headers=other)).status_code == 401

        admin(cloud, "POST", "/admin/clock", {"advance_s": 61})  # 61 s active: two minutes
        assert billed(cloud) == {launched.id: 43_000}  # 2 minutes of $1.29/h
        assert wire.cost_micros(up.price_per_hour, 61) == 43_000  # procure's own rule agrees
        assert await again.billed(launched.id) is None  # Lambda has no billing endpoint

        [ended] = await again.terminate([launched.id])
        assert ended.status == "terminating"
        await again.terminate([launched.id])  # idempotent: a retry is no error
        assert await again.find("procure-job-41") == []
        assert await again.labelled() == []
        admin(cloud, "POST", "/admin/clock", {"advance_s": 300})
        bill = admin(cloud, "GET", "/admin/billing")
        assert bill["totalMicroUsd"] == 43_000  # billing stopped at terminate
        assert bill["instances"][0]["status"] == "terminated"
        await again.aclose()

    asyncio.run(scenario())


def test_preemption_ends_billing_and_the_node(cloud: MockCloud, recorded: list[Recording]) -> None:
    async def scenario() -> None:
        c = client(cloud, recorded)
        offer = a100(await c.offers())
        first = await c.launch_spec(LaunchSpec(name="procure-a", offer=offer))
        never = await c.launch_spec(LaunchSpec(name="procure-b", offer=offer))
        await c.terminate([never.id])  # ended while booting: never billed
        admin(cloud, "POST", "/admin/clock", {"advance_s": 150})
        up = await until_up(c, first.id)
        # An address that is not the instance's: the client passes on only a bare IP, and the
        # agent's node check (the node names its instance) must catch the rest.
        admin(cloud, "POST", "/admin/faults", {"wrong_ip": True})
        lied = await c.get(first.id)
        port = cloud.state.config.node_port
        assert lied is not None and lied.node_url == f"http://192.0.2.77:{port}"
        admin(cloud, "POST", "/admin/faults", {})
        admin(cloud, "POST", f"/admin/instances/{first.id}/preempt")
        gone = await c.get(first.id)
        assert gone is not None and (gone.status, gone.node_url) == ("preempted", None)
        assert [i.status for i in await c.find("procure-a")] == ["preempted"]
        assert await c.labelled() == []
        await c.terminate([first.id])  # terminating a preempted instance is no error
        admin(cloud, "POST", "/admin/clock", {"advance_s": 300})
        assert billed(cloud) == {first.id: 21_500, never.id: 0}  # 30 s: one minute
        admin(cloud, "POST", "/admin/clock", {"advance_s": 3600})  # both forgotten since
        assert admin(cloud, "GET", "/admin/billing") == {"totalMicroUsd": 21_500, "instances": []}
        assert up.node_url
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    await http.get(up.node_url + "/healthz")
                except httpx.TransportError:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the preempted instance's node still answers")
        await c.aclose()

    asyncio.run(scenario())


def test_every_auth_scheme_lambda_allows(cloud: MockCloud) -> None:
    url = cloud.url + "/api/v1/instances"
    encoded = base64.b64encode(KEY.encode()).decode()
    for header in (
        f"Bearer {KEY}",
        f"Basic {base64.b64encode(f'{KEY}:'.encode()).decode()}",  # curl -u KEY:
        f"Basic {encoded}:",
        f"Basic {KEY}",
    ):
        answer = httpx.get(url, headers={"Authorization": header})
        assert answer.status_code == 200, header
        validate_answer("lambda", "GET", "/api/v1/instances", 200, answer.json())
    assert httpx.get(url, auth=httpx.BasicAuth(KEY, "")).status_code == 200
    for header in ("Bearer nope", f"Basic {base64.b64encode(b'nope:').decode()}", "", KEY):
        refused = httpx.get(url, headers={"Authorization": header})
        assert refused.status_code == 401
        validate_answer("lambda", "GET", "/api/v1/instances", 401, refused.json())


def test_spec_invalid_launches_are_refused_in_the_specs_400_shape(cloud: MockCloud) -> None:
    good = {"region_name": "us-west-1", "instance_type_name": "gpu_1x_a100", "ssh_key_names": ["k"]}
    headers = {"Authorization": f"Bearer {KEY}"}
    for bad in (
        good | {"tags": [{"key": "Bad Key", "value": "x"}]},
        good | {"tags": [{"key": "k" * 56, "value": "x"}]},
        good | {"name": "n" * 65},
        good | {"hostname": "-no"},
        {"region_name": "us-west-1"},
        good | {"ssh_key_names": "k"},
    ):
        refused = httpx.post(cloud.url + LAUNCH, json=bad, headers=headers)
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["code"] == "global/invalid-parameters"
        validate_answer("lambda", "POST", LAUNCH, 400, refused.json())
    deep: dict[str, Any] = dict(good)
    deep["x"] = json.loads("[" * 100 + "]" * 100)  # deeper than any service of ours parses
    refused = httpx.post(cloud.url + LAUNCH, json=deep, headers=headers)
    assert refused.status_code == 400
    validate_answer("lambda", "POST", LAUNCH, 400, refused.json())
    assert cloud.state.launches == 0
    # SkyPilot posts JSON with no Content-Type; Lambda takes it, and so does the mock.
    body = good | {"tags": [{"key": "managed-by", "value": "sky"}]}
    taken = httpx.post(cloud.url + LAUNCH, content=json.dumps(body).encode(), headers=headers)
    assert "content-type" not in {k.lower() for k in taken.request.headers}
    assert taken.status_code == 200
    validate_answer("lambda", "POST", LAUNCH, 200, taken.json())
    listed = httpx.get(cloud.url + "/api/v1/instances", headers=headers).json()
    validate_answer("lambda", "GET", "/api/v1/instances", 200, listed)
    assert listed["data"][0]["tags"] == [{"key": "managed-by", "value": "sky"}]


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [
        ({"error500": True}, 500, ProviderError),
        ({"provider_error": True}, 503, ProviderError),
        ({"status": 502}, 502, ProviderError),
        ({"rate_limited": True, "retry_after_s": 7}, 429, RateLimited),
        ({"rate_limited": True}, 429, RateLimited),
        ({"account_inactive": True}, 403, CloudError),
    ],
)
def test_injected_faults_answer_in_lambdas_envelope_and_map_to_base_errors(
    cloud: MockCloud,
    recorded: list[Recording],
    fault: dict[str, Any],
    status: int,
    error: type[CloudError],
) -> None:
    admin(cloud, "POST", "/admin/faults", fault | {"count": 1})
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the pause a Retry-After asks, without waiting it
        slept.append(seconds)

    async def scenario() -> None:
        c = client(cloud, recorded, pacer=Pacer(0.0, 0.0, clock=lambda: 0.0, sleep=sleep))
        with pytest.raises(error) as raised:
            await c.offers()
        assert raised.value.retryable is (status >= 429)
        if isinstance(raised.value, RateLimited):
            assert raised.value.retry_after_s == fault.get("retry_after_s")
        assert await c.offers()  # count 1: the next call is answered
        if fault.get("retry_after_s"):
            assert slept == [fault["retry_after_s"]]  # ... after the pause it asked for
        await c.aclose()

    asyncio.run(scenario())
    [(_, _, _, got, answer), *_] = recorded[0].seen
    assert got == status
    Draft202012Validator(ENVELOPE).validate(answer)


@pytest.mark.parametrize("fault", ["garbage", "huge", "wrong_shape"])
def test_bad_answers_are_provider_trouble_never_a_crash(
    cloud: MockCloud, recorded: list[Recording], fault: str
) -> None:
    async def scenario() -> None:
        c = client(cloud, recorded)
        launched = await c.launch_spec(LaunchSpec(name="procure-x", offer=a100(await c.offers())))
        admin(cloud, "POST", "/admin/faults", {fault: True, "endpoints": ["instance"]})
        with pytest.raises(ProviderError):
            await c.get(launched.id)
        recorded[0].seen.pop()  # the injected answer is not Lambda's: out of the spec check
        admin(cloud, "POST", "/admin/faults", {})
        assert (await c.get(launched.id)) is not None
        await c.aclose()

    asyncio.run(scenario())


def test_an_instance_in_a_status_lambda_added_is_listed_not_an_error(
    cloud: MockCloud, recorded: list[Recording]
) -> None:
    """Before the fix: one instance in a status the client did not know (one Lambda adds, on
    any instance of the account, procure's or not) made the whole listing a ProviderError, so
    every find, sweep and fleet scan of the account failed until it changed. It is listed now:
    with an address, `active` (its node tells whether it works), never guessed gone."""

    async def scenario() -> None:
        c = client(cloud, recorded)
        launched = await c.launch_spec(LaunchSpec(name="procure-x", offer=a100(await c.offers())))
        admin(cloud, "POST", "/admin/clock", {"advance_s": 600})  # booted: it has an address
        admin(cloud, "POST", "/admin/faults", {"unknown_status": True})
        listed = {i.id: i for i in await c.instances()}
        got = await c.get(launched.id)
        admin(cloud, "POST", "/admin/faults", {})
        del recorded[0].seen[-2:]  # the injected status is not Lambda's: out of the spec check
        assert got is not None and got.status == "active" and got.node_url is not None
        assert listed[launched.id].status == "active"
        await c.aclose()

    asyncio.run(scenario())


def test_a_never_booting_instance_stays_booting(
    cloud: MockCloud, recorded: list[Recording]
) -> None:
    async def scenario() -> None:
        c = client(cloud, recorded)
        admin(cloud, "POST", "/admin/faults", {"never_boot": True})
        stuck = await c.launch_spec(LaunchSpec(name="procure-stuck", offer=a100(await c.offers())))
        admin(cloud, "POST", "/admin/clock", {"advance_s": 3600})
        inst = await c.get(stuck.id)
        assert inst is not None and (inst.status, inst.node_url) == ("booting", None)
        assert billed(cloud) == {stuck.id: 0}
        await c.aclose()

    asyncio.run(scenario())


def test_user_data_exports_the_env_the_mock_reads_back() -> None:
    offer = Offer("lambda", "gpu_1x_a100", "A100", 1, "us-west-1", 1, False, 1, 60)
    env = {"GPU_WORKER_TOKEN": "a b'c\"$(x)", "PROCURE_JOB": "j"}
    script = user_data(LaunchSpec(name="procure-u", offer=offer, env=env, startup_script="run"))
    assert script is not None and script.startswith("#!/bin/bash\n") and "\nrun\n" in script
    assert env_from_user_data(script) == env
    assert user_data(LaunchSpec(name="procure-u", offer=offer)) is None
    with pytest.raises(CloudError):
        user_data(LaunchSpec(name="procure-u", offer=offer, env={"BAD-NAME": "x"}))
    assert [wire.gpu_of(n) for n in ("gpu_8x_h100_sxm5", "gpu_1x_gh200", "cpu_4x")] == [
        "H100",
        "GH200",
        "",
    ]
    assert (
        wire.node_url("127.0.0.1:80/x", 9) is None and wire.node_url("::1", 9) == "http://[::1]:9"
    )


def test_prices_move_by_seed_and_an_instance_keeps_its_launch_price() -> None:
    def state() -> MockCloudState:
        return MockCloudState(MockCloudConfig(speed=0, price_drift=0.2, seed=3, nodes=False))

    cloud, same = state(), state()
    prices = [cloud.price_cents("gpu_1x_a100", hour * 3600.0) for hour in range(24)]
    assert prices == [same.price_cents("gpu_1x_a100", hour * 3600.0) for hour in range(24)]
    assert len(set(prices)) > 1 and all(103 <= p <= 155 for p in prices)  # $1.29 ± 20 %
    instance_id = cloud.launch("gpu_1x_a100", "us-west-1", "procure-p", ["k"])
    cloud.clock.advance(180 + 7201)  # boots for 180 s, then two hours and a second
    assert cloud.price_cents("gpu_1x_a100", cloud.now()) != prices[0]
    inst = cloud.instances[instance_id]
    assert cloud.billed(inst, cloud.step()) == round(121 * prices[0] * 10_000 / 60)


def test_lambdas_rate_limits_when_turned_on(recorded: list[Recording]) -> None:
    # Intervals far longer than the test: what is refused does not depend on timing.
    config = MockCloudConfig(
        api_key=KEY,
        speed=0,
        nodes=False,
        rate_limit=True,
        request_interval_s=600,
        request_burst=3,
        launch_interval_s=600,
        launch_burst=1,
    )
    mock = start_mock_cloud(config)

    async def scenario() -> None:
        c = client(mock, recorded)
        offer = a100(await c.offers())  # request 1
        await c.launch_spec(LaunchSpec(name="procure-r1", offer=offer))  # 2, launch 1
        with pytest.raises(RateLimited) as raised:  # 3: the launch limit
            await c.launch_spec(LaunchSpec(name="procure-r2", offer=offer))
        assert raised.value.retry_after_s is None and raised.value.retryable
        with pytest.raises(RateLimited):  # 4: the request limit
            await c.offers()
        await c.aclose()

    try:
        asyncio.run(scenario())
    finally:
        mock.stop()
    statuses = [e[3] for e in recorded[0].seen]
    assert statuses == [200, 200, 429, 429]
