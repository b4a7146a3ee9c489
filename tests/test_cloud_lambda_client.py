"""The Lambda Cloud client against the mock cloud over real HTTP: the instance life it sees,
terminations that are idempotent, every failure mapped to the exception the fleet controller
branches on (never a crash), the key kept out of logs and messages, and the pacing Lambda's
rate limits ask for (measured on an injected clock, not on the wall)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    ProviderError,
    QuotaError,
)
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.lambda_cloud.pacing import Pacer, unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.local import free_port

KEY = "sk-lambda-TEST-0123456789abcdef"


@pytest.fixture
def cloud() -> Iterator[MockCloud]:
    mock = start_mock_cloud(
        MockCloudConfig(api_key=KEY, speed=0, boot_s=120, node_port=free_port(), quota=5)
    )
    yield mock
    mock.stop()


def client(
    cloud: MockCloud, key: str = KEY, timeout_s: float = 5, pacer: Pacer | None = None
) -> LambdaCloud:
    settings = LambdaSettings(
        LAMBDA_API_KEY=key, LAMBDA_API_URL=cloud.url, LAMBDA_API_TIMEOUT_S=timeout_s
    )
    return LambdaCloud(settings, pacer=pacer or unpaced())


def faults(cloud: MockCloud, **set_: Any) -> None:
    httpx.post(
        f"{cloud.url}/admin/faults", json=set_, headers={"Authorization": f"Bearer {KEY}"}
    ).raise_for_status()


async def launch(c: LambdaCloud, name: str = "act-1") -> list[str]:
    return await c.launch(
        instance_type="gpu_1x_a100", region="us-west-1", name=name, ssh_key_names=["me"]
    )


def test_launch_boots_then_runs_with_its_price_and_node_address(cloud: MockCloud) -> None:
    async def scenario() -> None:
        c = client(cloud)
        types = {t.name: t for t in await c.instance_types()}
        assert types["gpu_1x_a100"].price_per_hour == 1_290_000  # 129 cents = $1.29/h
        assert types["gpu_8x_h100_sxm5"].gpus == 8
        assert "us-west-1" in types["gpu_1x_a100"].regions_with_capacity
        [instance_id] = await launch(c, "action-42")
        [booting] = await c.instances()
        assert (booting.id, booting.name, booting.status, booting.ip) == (
            instance_id,
            "action-42",
            "booting",
            None,
        )
        cloud.state.clock.advance(121)
        for _ in range(500):  # the node comes up in the background
            active = await c.instance(instance_id)
            if active and active.ip:
                break
            await asyncio.sleep(0.02)
        assert active is not None and active.status == "active" and active.ip
        assert active.ip.startswith("127.0.0.") and active.price_per_hour == 1_290_000
        # A controller restarted after a crash finds the launch by its name.
        assert [i.id for i in await c.find_by_name("action-42")] == [instance_id]
        assert await c.instance("0" * 32) is None
        await c.aclose()

    asyncio.run(scenario())


def test_terminate_is_idempotent(cloud: MockCloud) -> None:
    async def scenario() -> None:
        c = client(cloud)
        ids = await launch(c)
        [first] = await c.terminate(ids)
        assert first.status == "terminating"
        again = await c.terminate(ids)  # a retry after a crash: no error
        assert [i.status for i in again] in ([], ["terminating"])
        assert await c.terminate(["f" * 32]) == []  # never known, or long gone
        [other] = await launch(c, "act-2")
        mixed = await c.terminate(["f" * 32, other])  # the live one still ends
        assert [i.id for i in mixed] == [other]
        assert await c.terminate([]) == []
        await c.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fault", "error", "retryable"),
    [
        ({"refuse_capacity": True}, CapacityError, False),
        ({"refuse_quota": True}, QuotaError, False),
        ({"error500": True}, ProviderError, True),
        ({"provider_error": True}, ProviderError, True),
        ({"garbage": True}, ProviderError, True),
        ({"wrong_shape": True}, ProviderError, True),
        ({"account_inactive": True}, CloudError, False),
    ],
)
def test_failures_map_to_the_exceptions_the_controller_branches_on(
    cloud: MockCloud, fault: dict[str, Any], error: type[CloudError], retryable: bool
) -> None:
    faults(cloud, **fault)

    async def scenario() -> None:
        c = client(cloud)
        with pytest.raises(error) as raised:
            await launch(c)
        assert raised.value.retryable is retryable
        assert type(raised.value) is error or error is CloudError
        await c.aclose()

    asyncio.run(scenario())


def test_a_wrong_or_missing_key_is_an_auth_error(cloud: MockCloud) -> None:
    async def scenario() -> None:
        wrong = client(cloud, key="sk-wrong")
        with pytest.raises(AuthError) as raised:
            await wrong.instances()
        assert not raised.value.retryable
        await wrong.aclose()
        missing = LambdaCloud(
            LambdaSettings(LAMBDA_API_KEY="", LAMBDA_API_URL=cloud.url), pacer=unpaced()
        )
        with pytest.raises(AuthError, match="LAMBDA_API_KEY"):
            await missing.instance_types()
        await missing.aclose()

    asyncio.run(scenario())


def test_a_hanging_cloud_is_provider_trouble_within_the_deadline(cloud: MockCloud) -> None:
    faults(cloud, hang_s=1.0)  # well past the 0.3 s deadline

    async def scenario() -> None:
        c = client(cloud, timeout_s=0.3)
        with pytest.raises(ProviderError, match="in time") as raised:
            await c.instances()
        assert raised.value.retryable
        await c.aclose()

    asyncio.run(scenario())


def test_an_unreachable_cloud_is_provider_trouble() -> None:
    async def scenario() -> None:
        settings = LambdaSettings(
            LAMBDA_API_KEY=KEY, LAMBDA_API_URL=f"http://127.0.0.1:{free_port()}"
        )
        c = LambdaCloud(settings, pacer=unpaced())
        with pytest.raises(ProviderError):
            await c.instances()
        await c.aclose()

    asyncio.run(scenario())


def test_the_key_is_never_in_logs_or_messages(
    cloud: MockCloud, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    async def scenario() -> None:
        c = client(cloud)
        seen.append(repr(c))
        await launch(c)
        for fault in ({"refuse_capacity": True}, {"error500": True}, {"garbage": True}):
            faults(cloud, **fault)
            with pytest.raises(CloudError) as raised:
                await launch(c)
            seen.append(str(raised.value))
        await c.aclose()
        wrong = client(cloud, key="sk-wrong-key-999")
        with pytest.raises(AuthError) as raised:
            await wrong.instances()
        seen.append(str(raised.value))
        await wrong.aclose()

    asyncio.run(scenario())
    assert len(seen) == 5
    for text in [*seen, caplog.text]:
        assert KEY not in text and "sk-wrong-key-999" not in text


class FakeClock:
    """Monotonic seconds that move only when the pacer sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class Stamping(httpx.AsyncBaseTransport):
    """Records the fake clock's time at which each request leaves."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[float, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((self.clock(), request.url.path))
        return await self.inner.handle_async_request(request)


def test_pacing_spaces_requests_1s_and_launches_12s(cloud: MockCloud) -> None:
    clock = FakeClock()
    transport = Stamping(clock)

    async def scenario() -> None:
        settings = LambdaSettings(LAMBDA_API_KEY=KEY, LAMBDA_API_URL=cloud.url)
        c = LambdaCloud(settings, pacer=Pacer(clock=clock, sleep=clock.sleep), transport=transport)
        await c.instance_types()
        await launch(c, "a")
        await c.instances()
        await launch(c, "b")
        await asyncio.gather(c.instances(), c.instances(), launch(c, "c"))
        await c.aclose()

    asyncio.run(scenario())
    times = [t for t, _ in transport.sent]
    assert len(times) == 7
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    launches = [t for t, path in transport.sent if path.endswith("/launch")]
    assert len(launches) == 3
    assert all(b - a >= 12.0 for a, b in itertools.pairwise(launches))
    # And no more than needed: the second launch went out exactly 12 s after the first.
    assert launches[1] - launches[0] == pytest.approx(12.0)
