"""The cloud clients read documented refusals as the provider means them (a launch's 404 names
what is missing, a stale page token is not a refused key, a looping cursor fails at once), a
fleet launch holds its checked price on Lambda too, RunPod's GPU ids map to their models, and the
mocks keep SSH keys as dstack registers them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    LaunchSpec,
    Offer,
    ProviderError,
)
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.runpod.catalogue import GPUS, GpuKind
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.pacing import Pacer as RunPodPacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.clouds.specs import validate_answer
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.settings import VastSettings
from procure.local import free_port
from test_cloud_wire_edges import Reply, scripted  # noqa: F401 (a fixture)

KEY = "review11-TEST-key-0123456789abcdef"


@pytest.fixture
def lambda_mock() -> Iterator[MockCloud]:
    mock = start_mock_cloud(
        MockCloudConfig(api_key=KEY, speed=0, node_port=free_port(), nodes=False)
    )
    yield mock
    mock.stop()


# --- a launch refused with 404 says why, and is a refusal ---------------------------------------


def test_a_lambda_launch_refused_with_404_says_what_lambda_could_not_find(
    lambda_mock: MockCloud,
) -> None:
    """Before the fix: Lambda's documented launch 404 (`global/object-does-not-exist`: an SSH key,
    region or type it does not have) was taken for "instance gone": the client raised its
    private not-found error whose whole message was "POST /instance-operations/launch", so the
    user was never told what Lambda could not find."""
    offer = Offer("lambda", "gpu_1x_a100", "A100", 1, "us-nowhere-9", 1_290_000, False, 1, 60)

    async def scenario() -> CloudError:
        settings = LambdaSettings(LAMBDA_API_KEY=KEY, LAMBDA_API_URL=lambda_mock.url)
        c = LambdaCloud(settings, pacer=unpaced())
        try:
            await c.launch_spec(LaunchSpec(name="procure-job-review-1", offer=offer))
        except CloudError as exc:
            return exc
        finally:
            await c.aclose()
        raise AssertionError("the launch in an unknown region succeeded")

    error = asyncio.run(scenario())
    assert "us-nowhere-9" in str(error) and "does not exist" in str(error), str(error)
    assert type(error).__module__ == "procure.clouds.base" and not error.retryable
    assert lambda_mock.state.launches == 0


def test_a_runpod_create_refused_with_404_says_what_runpod_could_not_find(scripted: Any) -> None:  # noqa: F811
    """Before the fix: createPod's documented 404 (problem+json) was taken for "pod gone": the
    client raised its private not-found error whose whole message was "POST /v2/pods", dropping
    RunPod's `detail`."""
    problem = {"title": "Not Found", "status": 404, "detail": "network volume vol-7 not found"}
    url, _ = scripted({("POST", "/v2/pods"): [Reply(404, problem)]})
    offer = Offer("runpod", "SECURE:NVIDIA A100 80GB PCIe", "A100", 1, "US-TX-3", 1, False, 1, 1)

    async def scenario() -> CloudError:
        settings = RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=url)
        c = RunPodCloud(settings, pacer=RunPodPacer())
        try:
            await c.launch_spec(LaunchSpec(name="procure-job-review-2", offer=offer))
        except CloudError as exc:
            return exc
        finally:
            await c.aclose()
        raise AssertionError("a 404 create succeeded")

    error = asyncio.run(scenario())
    assert "network volume vol-7 not found" in str(error), str(error)
    assert type(error).__module__ == "procure.clouds.base" and not error.retryable


# --- Vast.ai: a refused page token is not a refused key -----------------------------------------


def vast_row(instance_id: int, label: str) -> dict[str, Any]:
    return {
        "id": instance_id,
        "actual_status": "running",
        "intended_status": "running",
        "label": label,
        "is_bid": False,
        "gpu_name": "RTX 4090",
        "num_gpus": 1,
        "dph_total": 0.4,
        "geolocation": "Texas, US",
        "public_ipaddr": "203.0.113.9",
        "ports": None,
    }


def test_vast_refusing_its_own_page_token_is_not_reported_as_a_refused_key(
    scripted: Any,  # noqa: F811
) -> None:
    """Before the fix: Vast answers an `after_token` it no longer accepts with 400 `invalid_token`
    (its spec: "Invalid pagination token"); the client read the code as a refused API key, so
    the sweeper logged "Vast.ai refused the API key" and sent the operator to rotate a key that
    works."""
    first = {"success": True, "instances": [vast_row(1, "procure-job-a")], "next_token": "tok-1"}
    bad = {"success": False, "error": "invalid_token", "msg": "Invalid pagination token"}
    url, script = scripted({("GET", "/api/v1/instances/"): [Reply(200, first), Reply(400, bad)]})

    async def scenario() -> CloudError:
        settings = VastSettings(VAST_API_KEY=KEY, VAST_API_URL=url, VAST_PACE_SCALE=0)
        c = VastCloud(settings)
        try:
            await c.labelled()
        except CloudError as exc:
            return exc
        finally:
            await c.aclose()
        raise AssertionError("a refused page was read as the end of the list")

    error = asyncio.run(scenario())
    assert not isinstance(error, AuthError), str(error)
    assert "Invalid pagination token" in str(error)
    assert len(script.seen) == 2


# --- RunPod: every documented GPU type id is the model it names ---------------------------------

# Ids from RunPod's createPod `gpuTypeIds` enum that procure read as another model.
MORE_GPUS = [
    GpuKind("NVIDIA A100-SXM4-80GB", "A100 SXM", 80, 1.49, 1.39, 8, 400, "AMPERE_80"),
    GpuKind("Tesla V100-SXM2-16GB", "V100 SXM2", 16, 0.29, 0.19, 8, 300, "VOLTA_16"),
    GpuKind("AMD Instinct MI300X OAM", "MI300X", 192, 2.49, 2.49, 8, 750, "CDNA_192"),
]


def test_runpod_offers_of_every_documented_gpu_id_carry_the_model_they_name() -> None:
    """Before the fix: RunPod's GPU type ids were cut at the first space, so "NVIDIA A100-SXM4-80GB"
    was model "A100-SXM4-80GB", "Tesla V100-SXM2-16GB" was "TESLA" and "AMD Instinct MI300X
    OAM" was "INSTINCT": a job asking for an A100 never saw RunPod's cheaper A100 SXM, and its
    V100s and MI300Xs could not be asked for at all."""
    gpus = dict(GPUS) | {g.id: g for g in MORE_GPUS}
    capacity = {g.id: {"US-TX-3": 4} for g in gpus.values()}
    mock = start_runpod(
        RunPodMockConfig(api_key=KEY, speed=0, nodes=False, gpus=gpus, capacity=capacity)
    )

    async def scenario() -> dict[str, set[str]]:
        settings = RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=mock.url)
        c = RunPodCloud(settings, pacer=RunPodPacer())
        try:
            return {
                model: {o.offer_id.split(":", 1)[1] for o in await c.offers(gpu=model)}
                for model in ("A100", "V100", "MI300X", "RTX4090", "A40")
            }
        finally:
            await c.aclose()

    try:
        found = asyncio.run(scenario())
    finally:
        mock.stop()
    assert found == {
        "A100": {"NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"},
        "V100": {"Tesla V100-SXM2-16GB"},
        "MI300X": {"AMD Instinct MI300X OAM"},
        "RTX4090": {"NVIDIA GeForce RTX 4090"},
        "A40": {"NVIDIA A40"},
    }


# --- Lambda: a fleet launch holds the price its caps were checked against -----------------------


def test_a_lambda_fleet_launch_above_the_price_the_caps_checked_launches_nothing() -> None:
    """Before the fix: `Cloud.launch` must launch nothing when the type now costs more than the
    `max_price_per_hour` the fleet's spend caps were checked against; Lambda's client ignored it
    ("list prices hold"), so after a price rise (the mock's drift) the fleet launched an
    instance billing above what its hourly cap allowed for."""
    mock = start_mock_cloud(
        MockCloudConfig(
            api_key=KEY, speed=0, node_port=free_port(), nodes=False, price_drift=0.3, seed=7
        )
    )
    state, kind = mock.state, "gpu_1x_a100"
    checked = state.price_cents(kind, 0.0)  # what the fleet's rails saw
    period = state.config.price_period_s
    later = next(k * period for k in range(1, 200) if state.price_cents(kind, k * period) > checked)
    httpx.post(
        f"{mock.url}/admin/clock",
        json={"advance_s": later},
        headers={"Authorization": f"Bearer {KEY}"},
    ).raise_for_status()

    async def scenario() -> list[str] | CloudError:
        settings = LambdaSettings(LAMBDA_API_KEY=KEY, LAMBDA_API_URL=mock.url)
        c = LambdaCloud(settings, pacer=unpaced())
        try:
            return await c.launch(
                instance_type=kind,
                region="us-west-1",
                name="act-review-1",
                ssh_key_names=["me"],
                max_price_per_hour=checked * 10_000,
            )
        except CloudError as exc:
            return exc
        finally:
            await c.aclose()

    try:
        outcome = asyncio.run(scenario())
        assert isinstance(outcome, CapacityError), outcome
        assert state.launches == 0
    finally:
        mock.stop()


# --- Vast.ai: a page token that comes back again ends the listing -------------------------------


def test_vast_listing_that_hands_back_the_same_page_token_fails_at_once(
    scripted: Any,  # noqa: F811
) -> None:
    """Before the fix: a Vast answer whose `next_token` named the page just read (a looping
    cursor) was followed 200 times, one paced call a second: the agent's lookup of a launch,
    or the sweeper, stalled for minutes and spent Vast's rate limit before giving up."""
    page = {"success": True, "instances": [vast_row(1, "procure-job-a")], "next_token": "same"}
    url, script = scripted({("GET", "/api/v1/instances/"): [Reply(200, page)]})

    async def scenario() -> CloudError:
        settings = VastSettings(VAST_API_KEY=KEY, VAST_API_URL=url, VAST_PACE_SCALE=0)
        c = VastCloud(settings)
        try:
            await c.find("procure-job-a")
        except CloudError as exc:
            return exc
        finally:
            await c.aclose()
        raise AssertionError("a looping listing ended as if complete")

    error = asyncio.run(scenario())
    assert isinstance(error, ProviderError), error
    assert len(script.seen) <= 3, len(script.seen)


# --- the mocks take SSH keys as other tools' clients register them --------------------------------

PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILXGDN/SclOozk1xsDztpmhGiKkkrfQB9SKoO8dSIQQZ dstack"


def test_the_mock_lambda_keeps_ssh_keys_as_dstack_registers_them_and_launches_check_them(
    lambda_mock: MockCloud,
) -> None:
    """Before the fix: the mock Lambda had no `/api/v1/ssh-keys` (404), which dstack and SkyPilot
    call before every launch, so neither could drive it; and it took any SSH key name at launch,
    so what a user meets on Lambda without the key procure names (`procure`) never showed."""
    auth = {"Authorization": f"Bearer {KEY}"}
    keys = f"{lambda_mock.url}/api/v1/ssh-keys"
    with httpx.Client(headers=auth, timeout=10) as http:
        listed = http.get(keys)
        assert listed.status_code == 200, listed.text
        validate_answer("lambda", "GET", "/api/v1/ssh-keys", 200, listed.json())
        added = http.post(keys, json={"name": "dstack-key", "public_key": PUBLIC})
        assert added.status_code == 200, added.text
        validate_answer("lambda", "POST", "/api/v1/ssh-keys", 200, added.json())
        made = http.post(keys, json={"name": "generated"})
        validate_answer("lambda", "POST", "/api/v1/ssh-keys", 200, made.json())
        assert "PRIVATE KEY" in made.json()["data"]["private_key"]
        assert http.post(keys, json={"name": "dstack-key", "public_key": PUBLIC}).status_code == 400
        names = {k["name"] for k in http.get(keys).json()["data"]}
        assert names == {"dstack-key", "generated"}
        gone = http.delete(f"{keys}/{made.json()['data']['id']}")
        validate_answer("lambda", "DELETE", "/api/v1/ssh-keys/{id}", 200, gone.json())
        assert http.delete(f"{keys}/{made.json()['data']['id']}").status_code == 404

    offer = Offer("lambda", "gpu_1x_a100", "A100", 1, "us-west-1", 1_290_000, False, 1, 60)

    async def launch(key_name: str) -> str | CloudError:
        settings = LambdaSettings(
            LAMBDA_API_KEY=KEY, LAMBDA_API_URL=lambda_mock.url, LAMBDA_SSH_KEY_NAME=key_name
        )
        c = LambdaCloud(settings, pacer=unpaced())
        try:
            spec = LaunchSpec(name=f"procure-job-{key_name}", offer=offer)
            return (await c.launch_spec(spec)).id
        except CloudError as exc:
            return exc
        finally:
            await c.aclose()

    refused = asyncio.run(launch("procure"))
    assert isinstance(refused, CloudError) and "'procure' does not exist" in str(refused)
    assert isinstance(asyncio.run(launch("dstack-key")), str)
    assert lambda_mock.state.launches == 1


def test_the_mock_runpod_keeps_the_account_ssh_keys_as_dstack_registers_them() -> None:
    """Before the fix: the mock RunPod had no `/v2/account/ssh-keys` (404), which dstack's RunPod
    backend reads and replaces before it creates a pod, so dstack could not drive it."""
    mock = start_runpod(RunPodMockConfig(api_key=KEY, speed=0, nodes=False))
    path = "/v2/account/ssh-keys"
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as http:
            before = http.get(mock.url + path)
            assert before.status_code == 200, before.text
            validate_answer("runpod", "GET", path, 200, before.json())
            put = http.put(mock.url + path, json={"keys": [*before.json()["keys"], PUBLIC]})
            assert put.status_code == 200, put.text
            validate_answer("runpod", "PUT", path, 200, put.json())
            assert http.get(mock.url + path).json() == {"keys": [PUBLIC]}
            bad = http.put(mock.url + path, json={"keys": ["not a key"]})
            assert bad.status_code == 422
            assert bad.headers["content-type"].startswith("application/problem+json")
            assert http.get(mock.url + path).json() == {"keys": [PUBLIC]}
    finally:
        mock.stop()


def test_a_lambda_instance_id_longer_than_the_store_holds_is_refused() -> None:
    """Before the fix: Lambda's wire took instance ids up to 200 characters while the agent
    stores the first 100: the stored id would name no instance (looked gone, $0 booked, billed
    on). A launch answer with such an id is ambiguous (looked up by name); a listing refuses it."""
    from procure.clouds.base import ProviderError
    from procure.clouds.lambda_cloud import wire

    long_id = "i" * 150
    region = {"name": "us-east-1", "description": "Virginia"}
    kind = {
        "name": "gpu_1x_a100",
        "description": "1x A100",
        "price_cents_per_hour": 129,
        "specs": {"vcpus": 30, "memory_gib": 200, "storage_gib": 512, "gpus": 1},
    }
    raw = {"id": long_id, "status": "active", "region": region, "instance_type": kind}
    with pytest.raises(ProviderError):
        wire.launched_ids({"data": {"instance_ids": [long_id]}})
    with pytest.raises(ProviderError):
        wire.one_instance({"data": raw})
    assert wire.one_instance({"data": raw | {"id": "i" * 32}}).id == "i" * 32
