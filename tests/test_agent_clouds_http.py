"""The agent on the mock RunPod over HTTP: a real node on the pod runs examples/train.py through
its job runner; the run completes, the pod is terminated, and what procure booked is what the
mock billed (`GET /admin/billing`), to the cent."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import httpx
import pytest

from cloud_fakes import cloud_vendor, drive, make_deps, new_run, new_store, tmp_url
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.settings import RunPodSettings
from procure.local import free_port
from procure.models import PaymentStatus
from procure.store import cloud_repo, repo

KEY = "mock-runpod-key"
TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"


@pytest.mark.timeout(120)
def test_a_run_completes_on_the_mock_runpod_booked_as_billed(tmp_path: Path) -> None:
    mock = start_mock_cloud(
        RunPodMockConfig(api_key=KEY, speed=1, provision_s=0.2, start_s=0.2, node_port=free_port())
    )
    try:
        asyncio.run(_scenario(mock, tmp_path))
    finally:
        mock.stop()


async def _scenario(mock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = RunPodCloud(RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=mock.url))
    try:
        store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 5.0)])
        deps = dataclasses.replace(
            make_deps(store, {}, boot_timeout_s=30.0, reserve_ahead_s=10.0),
            clouds={"runpod": client},
            node_client=None,  # the real node over HTTP
        )
        deps = dataclasses.replace(
            deps,
            cloud=dataclasses.replace(
                deps.cloud,
                command=(sys.executable, str(TRAIN), "--steps", "20", "--step-time", "0.05"),
                checkpoint_dir=str(tmp_path / "ckpt"),
            ),
        )
        run_id = new_run(store, 100.0)
        status = await drive(deps, run_id, timeout_s=60)
        with store.session() as s:
            state = repo.load_state(s, run_id)
            instances = cloud_repo.instances_of_run(s, run_id)
        assert state is not None
        assert status == "completed", [o.content for o in state.observations][-10:]
        assert [i.status for i in instances] == ["terminated"]
        billing = await asyncio.to_thread(
            httpx.get,
            f"{mock.url}/admin/billing",
            headers={"Authorization": f"Bearer {KEY}"},
        )
        billing = billing.json()
        booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
        assert booked == billing["totalMicroUsd"] > 0
        assert any("PROCURE" in o.content or "training" in o.content for o in state.observations)
    finally:
        await client.aclose()


@pytest.mark.timeout(150)
def test_a_preempted_vast_bid_resumes_on_runpod_over_http(tmp_path: Path) -> None:
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.mock import start_mock_cloud as start_vast
    from procure.clouds.vast.mockstate import MockVastConfig
    from procure.clouds.vast.settings import VastSettings

    vast = start_vast(MockVastConfig(boot_s=0.3, rate_scale=0, outbid_per_hour=0))
    runpod = start_mock_cloud(
        RunPodMockConfig(api_key=KEY, speed=1, provision_s=0.2, start_s=0.2, node_port=free_port())
    )
    try:
        asyncio.run(_failover(vast, runpod, tmp_path, VastCloud, VastSettings))
    finally:
        vast.stop()
        runpod.stop()


async def _failover(vast, runpod, tmp_path: Path, VastCloud, VastSettings) -> None:  # type: ignore[no-untyped-def]
    vast_key = vast.state.config.api_key
    clients = {
        "vast": VastCloud(VastSettings(VAST_API_KEY=vast_key, VAST_API_URL=vast.url)),
        "runpod": RunPodCloud(RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=runpod.url)),
    }
    bid = cloud_vendor("va", "vast", 1.0, spot=True)
    assert bid.cloud is not None
    bid.cloud.regions = ["Hesse, DE"]
    store = new_store(tmp_url(tmp_path), [bid, cloud_vendor("rp", "runpod", 2.0)])
    deps = _http_deps(store, clients, tmp_path, steps=100)
    run_id = new_run(store, 100.0)
    try:

        def half_done() -> bool:
            with store.session() as s:
                state = repo.load_state(s, run_id, observations=False)
            assert state is not None
            return any(j.checkpoint_progress >= 0.5 for j in state.jobs)

        await drive(deps, run_id, timeout_s=60, until=half_done)
        with store.session() as s:
            (first,) = cloud_repo.instances_of_run(s, run_id)
        assert first.provider == "vast" and first.instance_id
        preempted = await asyncio.to_thread(
            httpx.post,
            f"{vast.url}/admin/instances/{first.instance_id}/preempt",
            headers={"Authorization": f"Bearer {vast_key}"},
        )
        assert preempted.status_code == 200, preempted.text
        status = await drive(deps, run_id, timeout_s=60)
        with store.session() as s:
            state = repo.load_state(s, run_id)
            instances = cloud_repo.instances_of_run(s, run_id)
        assert state is not None
        assert status == "completed", [o.content for o in state.observations][-10:]
        assert [i.provider for i in instances] == ["vast", "runpod"]
        assert all(i.status == "terminated" for i in instances)
        resumed = next(j for j in state.jobs if j.vendor_id == "rp")
        assert resumed.start_progress >= 0.5 and resumed.job_params.get("resumeFrom")
        billed = 0
        answers = []
        for mock, key in ((vast, vast_key), (runpod, KEY)):
            answer = await asyncio.to_thread(
                httpx.get, f"{mock.url}/admin/billing", headers={"Authorization": f"Bearer {key}"}
            )
            billed += answer.json()["totalMicroUsd"]
            answers.append(answer.json())
        booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
        # Vast's charges (what its API bills, and procure books) are rounded to $0.001 each;
        # the mock's admin total is unrounded: they agree to the cent.
        assert billed > 0 and abs(booked - billed) < 10_000, (booked, answers)
        assert instances[1].billed == answers[1]["totalMicroUsd"]  # RunPod's, to the micro
        for client in clients.values():
            assert [i for i in await client.labelled() if i.status != "terminated"] == []
    finally:
        for client in clients.values():
            await client.aclose()


def _http_deps(store, clients, tmp_path: Path, *, steps: int):  # type: ignore[no-untyped-def]
    deps = make_deps(store, {}, boot_timeout_s=30.0, reserve_ahead_s=10.0)
    command = (sys.executable, str(TRAIN), "--steps", str(steps), "--step-time", "0.05")
    tuning = dataclasses.replace(deps.cloud, command=command, checkpoint_dir=str(tmp_path / "ck"))
    return dataclasses.replace(deps, clouds=clients, node_client=None, cloud=tuning)


@pytest.mark.timeout(120)
def test_a_run_on_the_mock_lambda_is_booked_by_its_minute_rule(tmp_path: Path) -> None:
    from procure.clouds.lambda_cloud.client import LambdaCloud
    from procure.clouds.lambda_cloud.mock import start_mock_cloud as start_lambda
    from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
    from procure.clouds.lambda_cloud.settings import LambdaSettings

    mock = start_lambda(
        MockCloudConfig(speed=1, boot_s=0.3, terminate_s=0.1, node_port=free_port())
    )
    try:
        asyncio.run(_on_lambda(mock, tmp_path, LambdaCloud, LambdaSettings))
    finally:
        mock.stop()


async def _on_lambda(mock, tmp_path: Path, LambdaCloud, LambdaSettings) -> None:  # type: ignore[no-untyped-def]
    key = mock.state.config.api_key
    port = mock.state.config.node_port
    client = LambdaCloud(
        LambdaSettings(LAMBDA_API_KEY=key, LAMBDA_API_URL=mock.url, LAMBDA_NODE_PORT=port)
    )
    store = new_store(tmp_url(tmp_path), [cloud_vendor("la", "lambda", 5.0)])
    deps = _http_deps(store, {"lambda": client}, tmp_path, steps=20)
    run_id = new_run(store, 100.0)
    try:
        status = await drive(deps, run_id, timeout_s=60)
        with store.session() as s:
            state = repo.load_state(s, run_id)
        assert state is not None
        assert status == "completed", [o.content for o in state.observations][-10:]
        answer = await asyncio.to_thread(
            httpx.get, f"{mock.url}/admin/billing", headers={"Authorization": f"Bearer {key}"}
        )
        booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
        assert booked == answer.json()["totalMicroUsd"] > 0
        assert [i for i in await client.labelled() if i.status != "terminated"] == []
    finally:
        await client.aclose()
