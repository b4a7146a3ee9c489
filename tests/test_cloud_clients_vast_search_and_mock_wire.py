"""The cloud clients against the clouds' published wire formats: Vast.ai's search ordered by
price and read past one answer, its 403 on one ask, node tokens a refusal quotes never logged,
and the mocks answering as Lambda and Vast.ai do. Each test drives a real client against a mock
cloud over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from procure.clouds.base import CapacityError, CloudError, LaunchSpec, Offer
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.mock import MockCloud as LambdaMock
from procure.clouds.lambda_cloud.mock import start_mock_cloud as start_lambda_mock
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.settings import RunPodSettings
from procure.clouds.specs import validate_answer
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.mock import MockCloud, start_mock_cloud
from procure.clouds.vast.mockstate import Machine, MockVastConfig
from procure.clouds.vast.settings import VastSettings
from procure.local import serve
from vast_recording import Exchange, Recorder, validate

VAST_KEY = "vast-ck-key-0123456789abcdef"


def _vast_market() -> list[Machine]:
    """A market larger than one search answer (500 offers): 510 RTX 4090 asks at $0.90 listed
    first, then the one A100 and the cheapest 4090 of the whole market."""
    crowd = [Machine(8_000_000 + n, "RTX 4090", 1, "Texas, US", 0.90) for n in range(510)]
    return [
        *crowd,
        Machine(8_100_001, "A100 SXM4", 1, "Oregon, US", 1.10),
        Machine(8_100_002, "RTX 4090", 1, "Quebec, CA", 0.20),
    ]


@pytest.fixture
def big_vast() -> Iterator[MockCloud]:
    mock = start_mock_cloud(
        MockVastConfig(
            api_key=VAST_KEY,
            speed=0,
            machines=_vast_market(),
            drift=0.0,
            outbid_per_hour=0,
            rate_scale=0,
            nodes=False,
        )
    )
    yield mock
    mock.stop()


def _vast(cloud: MockCloud, rec: Recorder) -> VastCloud:
    settings = VastSettings(
        VAST_API_KEY=VAST_KEY,
        VAST_API_URL=cloud.url,
        VAST_API_TIMEOUT_S=20,
        VAST_PACE_SCALE=0,
        VAST_RATE_LIMIT_RETRIES=0,
    )
    return VastCloud(settings, transport=rec)


def test_vast_offers_are_the_cheapest_of_the_whole_market_and_find_a_gpu_past_one_answer(
    big_vast: MockCloud,
) -> None:
    """Before the fix: the search sent no `order`, so Vast cut its 500-offer answer in its own
    order (not by price): the market's cheapest 4090 ($0.20) was never offered, and the one A100
    was not found at all (`offers(gpu="A100")` was empty, the fleet's catalogue had no A100
    type, and a fleet launch of it had no offer)."""

    async def scenario() -> dict[str, Any]:
        rec = Recorder()
        c = _vast(big_vast, rec)
        try:
            every = await c.offers(spot=False)
            a100 = await c.offers(gpu="A100", spot=False)
            types = {t.name for t in await c.instance_types()}
            launched = await c.launch(
                instance_type="vast_1x_A100",
                region="Oregon, US",
                name="procure-ck-a",
                ssh_key_names=[],
            )
        finally:
            await c.aclose()
        validate(rec.exchanges)
        return {"every": every, "a100": a100, "types": types, "launched": launched}

    got = asyncio.run(scenario())
    assert got["every"][0].price_per_hour == 200_000  # the market's cheapest, $0.20/h
    assert [o.offer_id for o in got["a100"]] == ["8100001"]
    assert {"vast_1x_A100", "vast_1x_RTX4090"} <= got["types"]  # the fleet's catalogue
    assert len(got["launched"]) == 1


# --- a launch refused by a cloud (or a proxy) that quotes the request ------------------------

ECHO_KEY = "echo-ck-api-key-0123456789"


def _echo_app() -> FastAPI:
    """A cloud (or a proxy before it) that refuses every launch in that cloud's own error shape,
    quoting the part of the request around the job's env (as a validation error does)."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def refuse(request: Request, path: str) -> JSONResponse:
        raw = (await request.body()).decode()
        at = max(0, raw.find("GPU_WORKER_TOKEN"))
        quoted = f"invalid value near {raw[at : at + 100]}"
        if path.startswith("api/v1/"):  # Lambda
            body: dict[str, Any] = {
                "error": {"code": "global/invalid-parameters", "message": quoted}
            }
            return JSONResponse(body, status_code=400)
        if path.startswith("v2/"):  # RunPod
            body = {"title": "Bad Request", "status": 400, "detail": quoted}
            return JSONResponse(body, status_code=400, media_type="application/problem+json")
        body = {"success": False, "error": "invalid_args", "msg": quoted}  # Vast.ai
        return JSONResponse(body, status_code=400)

    return app


def _rental(provider: str, url: str) -> Any:
    if provider == "lambda":
        return LambdaCloud(
            LambdaSettings(LAMBDA_API_KEY=ECHO_KEY, LAMBDA_API_URL=url), pacer=unpaced()
        )
    if provider == "runpod":
        return RunPodCloud(RunPodSettings(RUNPOD_API_KEY=ECHO_KEY, RUNPOD_API_URL=url))
    return VastCloud(
        VastSettings(
            VAST_API_KEY=ECHO_KEY,
            VAST_API_URL=url,
            VAST_PACE_SCALE=0,
            VAST_RATE_LIMIT_RETRIES=0,
        )
    )


OFFERS = {
    "lambda": ("gpu_1x_a100", "A100", "us-west-1"),
    "runpod": ("SECURE:NVIDIA A100 80GB PCIe", "A100", "US-TX-3"),
    "vast": ("7100004", "A100", "Oregon, US"),
}


@pytest.mark.parametrize("provider", ["lambda", "runpod", "vast"])
def test_a_launch_refusal_that_quotes_the_node_token_never_logs_it(
    provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix: the client logged the refusal (a warning) before it took the launch's
    env values out of the error, so a cloud or proxy quoting the request put the instance's node
    token (its GPU_WORKER_TOKEN) in procure's log; only the raised error was clean."""
    server = serve(_echo_app())
    token = f"ck-{provider}-node-token-{secrets.token_hex(8)}"
    offer_id, gpu, region = OFFERS[provider]
    offer = Offer(provider, offer_id, gpu, 1, region, 1_000_000, False, 1, 1)  # type: ignore[arg-type]
    spec = LaunchSpec(
        name="procure-ck-echo",
        offer=offer,
        image="procure/node:1",
        env={"GPU_WORKER_TOKEN": token},
    )

    async def scenario() -> str:
        cloud = _rental(provider, f"http://127.0.0.1:{server.port}")
        try:
            await cloud.launch_spec(spec)
        except CloudError as exc:
            return str(exc)
        finally:
            await cloud.aclose()
        raise AssertionError("the launch was not refused")

    caplog.set_level(logging.DEBUG, logger="procure")
    try:
        refused = asyncio.run(scenario())
    finally:
        server.stop()
    assert "invalid value near" in refused  # the refusal was read and quoted
    assert token not in refused
    assert any("invalid value near" in r.getMessage() for r in caplog.records)  # it was logged
    assert token not in caplog.text


# --- Vast.ai: a 403 on an ask is that ask, not the key ---------------------------------------


@pytest.fixture
def small_vast() -> Iterator[MockCloud]:
    mock = start_mock_cloud(
        MockVastConfig(
            api_key=VAST_KEY,
            speed=0,
            drift=0.0,
            outbid_per_hour=0,
            rate_scale=0,
            nodes=False,
        )
    )
    yield mock
    mock.stop()


def _vast_fault(cloud: MockCloud, body: dict[str, Any]) -> None:
    answer = httpx.post(
        f"{cloud.url}/admin/faults", json=body, headers={"Authorization": f"Bearer {VAST_KEY}"}
    )
    answer.raise_for_status()


def test_a_vast_ask_refused_with_403_is_skipped_for_the_next_and_never_a_refused_key(
    small_vast: MockCloud,
) -> None:
    """Before the fix: Vast's createInstance documents 403 `invalid_args` "Offer ... is not your
    own. Hosts can only rent their own machines." (that ask cannot be rented), but any 403 read
    as a refused API key: AuthError "refused the API key" (the agent cools the whole account),
    and a fleet launch gave up instead of renting the next ask of the type."""

    async def scenario() -> tuple[CloudError, list[str], list[Exchange]]:
        rec = Recorder()
        c = _vast(small_vast, rec)
        try:
            offer = next(o for o in await c.offers(gpu="RTX4090", spot=False))
            _vast_fault(small_vast, {"endpoint": "create", "status": 403, "count": 1})
            try:
                await c.launch_spec(LaunchSpec(name="procure-ck-403", offer=offer))
            except CloudError as exc:
                refused = exc
            else:
                raise AssertionError("the 403 was not seen")
            _vast_fault(small_vast, {"endpoint": "create", "status": 403, "count": 1})
            ids = await c.launch(
                instance_type="vast_1x_RTX4090",
                region="Quebec, CA",
                name="procure-ck-fleet",
                ssh_key_names=[],
            )
        finally:
            await c.aclose()
        return refused, ids, rec.exchanges

    refused, ids, exchanges = asyncio.run(scenario())
    assert isinstance(refused, CapacityError), repr(refused)
    assert "API key" not in str(refused)
    assert len(ids) == 1  # the next ask of the type was rented
    creates = [x for x in exchanges if x.method == "PUT"]
    assert [x.status for x in creates] == [403, 403, 200]
    validate(exchanges)


# --- the mock Vast.ai as Vast's spec documents it ------------------------------------------


def _get(cloud: MockCloud, path: str, key: str | None = VAST_KEY, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{cloud.url}{path}", params=params, headers=headers)


def test_the_mock_vast_refuses_a_charges_range_with_one_end_as_vast_does(
    small_vast: MockCloud,
) -> None:
    """Before the fix: Vast documents that showCharges needs both `day.gte` and `day.lte` (400
    "Must provide both 'day' gte and lte filters"), but the mock answered a range with only one
    end: a client tested on the mock failed on Vast."""
    for day in ({"gte": 0}, {"lte": 2_000_000_000}):
        answer = _get(small_vast, "/api/v0/charges/", select_filters=json.dumps({"day": day}))
        assert answer.status_code == 400, answer.text
        validate_answer("vast", "get", "/api/v0/charges", 400, answer.json())
    both = json.dumps({"day": {"gte": 0, "lte": 2_000_000_000}})
    assert _get(small_vast, "/api/v0/charges/", select_filters=both).status_code == 200


def test_the_mock_vast_reads_a_list_limit_of_zero_as_five_as_vast_does(
    small_vast: MockCloud,
) -> None:
    """Before the fix: Vast's showInstances documents "Values ≤ 0 are treated as 5", but the mock
    refused `limit=0` with a 400."""
    answer = _get(small_vast, "/api/v1/instances/", limit="0")
    assert answer.status_code == 200, answer.text
    validate_answer("vast", "get", "/api/v1/instances", 200, answer.json())


def test_the_mock_vast_refuses_a_wrong_key_with_vasts_auth_error(small_vast: MockCloud) -> None:
    """Before the fix: the mock refused a wrong key with `"error": "invalid_token"`, which Vast's
    spec gives to a stale page cursor (showInstances' 400); Vast names a refused key
    `auth_error` ("Invalid user key"), so a client branching on the code misread the mock."""
    for path in ("/api/v0/instances/123/", "/api/v1/instances/"):
        answer = _get(small_vast, path, key="not-the-key-0123456789")
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "auth_error"


# --- the mock Lambda as SkyPilot and gpuhunt drive it ------------------------------------------

LAMBDA_KEY = "lambda-ck-key-0123456789abcdef"


@pytest.fixture
def lambda_mock() -> Iterator[LambdaMock]:
    mock = start_lambda_mock(MockCloudConfig(api_key=LAMBDA_KEY, speed=0, nodes=False))
    yield mock
    mock.stop()


def test_the_mock_lambda_opens_ports_and_lists_images_as_lambda_does(
    lambda_mock: LambdaMock,
) -> None:
    """Before the fix: SkyPilot opens a port on Lambda by reading and replacing the account's
    firewall rules (`GET`/`PUT /api/v1/firewall-rules`) and gpuhunt reads `GET /api/v1/images`,
    but the mock answered both with 404: neither tool could drive it."""
    headers = {"Authorization": f"Bearer {LAMBDA_KEY}"}
    with httpx.Client(base_url=lambda_mock.url, headers=headers) as api:
        rules = api.get("/api/v1/firewall-rules")
        assert rules.status_code == 200, rules.text
        validate_answer("lambda", "GET", "/api/v1/firewall-rules", 200, rules.json())
        node = {
            "protocol": "tcp",
            "port_range": [8000, 8000],
            "source_network": "0.0.0.0/0",
            "description": "procure node",
        }
        wanted = [*rules.json()["data"], node]
        put = api.put("/api/v1/firewall-rules", json={"data": wanted})
        assert put.status_code == 200, put.text
        validate_answer("lambda", "PUT", "/api/v1/firewall-rules", 200, put.json())
        assert api.get("/api/v1/firewall-rules").json()["data"] == wanted  # the whole list replaced
        for bad in (
            {**node, "protocol": "icmp"},  # icmp takes no port range
            {**node, "source_network": "10.0.0.0/33"},
            {k: v for k, v in node.items() if k != "port_range"},  # tcp needs one
        ):
            refused = api.put("/api/v1/firewall-rules", json={"data": [bad]})
            assert refused.status_code == 400, refused.text
            validate_answer("lambda", "PUT", "/api/v1/firewall-rules", 400, refused.json())
        assert (
            api.get("/api/v1/firewall-rules").json()["data"] == wanted
        )  # refusals changed nothing
        images = api.get("/api/v1/images")
        assert images.status_code == 200, images.text
        validate_answer("lambda", "GET", "/api/v1/images", 200, images.json())
        assert images.json()["data"]
        assert httpx.get(f"{lambda_mock.url}/api/v1/images").status_code == 401
