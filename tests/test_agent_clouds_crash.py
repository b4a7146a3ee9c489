"""Crashes on the cloud path: the tick dies (in process, at each named crash point of
`procure.agent.cloud_run`, as a kill would: nothing after it runs, no cleanup) between the offer's
choice and the first poll and during terminate; the next ticks carry on from the store alone.
Never two instances for one job, never an instance left running, booked == billed."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from cloud_fakes import (
    FakeCloud,
    cloud_vendor,
    drive,
    make_deps,
    new_run,
    new_store,
    offer,
    tmp_url,
)
from procure.agent import cloud_run
from procure.models import PaymentStatus
from procure.store import cloud_repo, repo

POINTS = ["intent", "paid", "recorded", "signed", "polled", "cancel_sent", "reconciled"]


class Crash(BaseException):
    """A kill: not an Exception, so nothing catches it on the way up."""


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_point_leaves_one_instance_per_job_and_none_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    vast = FakeCloud("vast", [offer("vast", "ask-1", 3.6, spot=True)], job_s=0.6, boot_s=0.05)
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.6, boot_s=0.05)
    vendors = [cloud_vendor("va", "vast", 10.0, spot=True), cloud_vendor("rp", "runpod", 50.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"vast": vast, "runpod": runpod})
    run_id = new_run(store, 100.0)
    seen: Counter[str] = Counter()
    launched_names: Counter[str] = Counter()
    for cloud in (vast, runpod):
        original = cloud.launch_spec

        async def counting(spec, original=original):  # type: ignore[no-untyped-def]
            launched_names[spec.name] += 1
            return await original(spec)

        cloud.launch_spec = counting  # type: ignore[method-assign]

    def crash_point(name: str) -> None:
        seen[name] += 1
        if name == point and seen[name] in (1, 2, 5):  # at once, again, and on the way
            raise Crash(name)

    monkeypatch.setattr(cloud_run, "crash_point", crash_point)
    crashes = 0

    async def campaign() -> str:
        nonlocal crashes
        preempted = False
        for _ in range(400):
            try:
                status = await drive(deps, run_id, timeout_s=30, until=lambda: True)
            except Crash:
                crashes += 1
                continue
            if status != "running":
                return status
            live = vast.running()
            if not preempted and live and any(i.status == "active" for i in live):
                vast.preempt(live[0].id)  # and a failover, crashes and all
                preempted = True
            await asyncio.sleep(0.02)
        raise AssertionError("the run did not end")

    assert asyncio.run(campaign()) == "completed"
    # Every point is reached at least twice on the way of this run, whatever the machine's
    # speed (only how often `polled` is passed depends on it): it died there at the first
    # hit and at the second.
    assert crashes >= 2, seen
    assert max(launched_names.values()) == 1, launched_names  # never two for one job
    assert vast.running() == [] and runpod.running() == []
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        instances = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    assert all(i.status == "terminated" for i in instances)
    assert not [p for p in state.payments if p.status == PaymentStatus.pending]
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    assert booked == vast.total_billed() + runpod.total_billed()


@pytest.mark.timeout(240)
def test_kill_9_at_each_cloud_crash_point_over_http(tmp_path: Path) -> None:
    """A real kill (os._exit at the crash point, as SIGKILL) of the agent process at each point
    in turn, the mock RunPod and its nodes running on; the last process finishes the run."""
    import os
    import subprocess
    import sys

    import httpx
    from cryptography.fernet import Fernet

    from procure.clouds.runpod.mock import start_mock_cloud
    from procure.clouds.runpod.mockstate import RunPodMockConfig
    from procure.local import free_port

    key = "mock-runpod-key"
    mock = start_mock_cloud(
        RunPodMockConfig(api_key=key, speed=1, provision_s=0.2, start_s=0.2, node_port=free_port())
    )
    try:
        url = tmp_url(tmp_path)
        store = new_store(url, [cloud_vendor("rp", "runpod", 5.0)])
        run_id = new_run(store, 100.0)
        env = os.environ | {
            "PROCURE_SECRET_KEY": Fernet.generate_key().decode(),
            "RUNPOD_API_KEY": key,
            "PYTHONPATH": str(Path(__file__).parent),
        }
        child = [sys.executable, str(Path(__file__).parent / "cloud_crash_child.py")]
        args = [url, mock.url, run_id, str(tmp_path / "ck")]
        deaths = []
        # The widest gaps (every point is covered in process above): launched, not recorded;
        # the node runs the job, not recorded; terminated, not booked.
        for point in ["paid", "signed", "cancel_sent", None]:
            crash = {"PROCURE_CRASH_AT": f"{point}:1"} if point else {"PROCURE_CRASH_AT": ""}
            done = subprocess.run([*child, *args], env=env | crash, timeout=90, check=False)
            deaths.append((point, done.returncode))
            assert done.returncode in (0, 137), deaths
        assert [code for _, code in deaths] == [137, 137, 137, 0], deaths
        billing = httpx.get(
            f"{mock.url}/admin/billing", headers={"Authorization": f"Bearer {key}"}
        ).json()
        names = Counter(i["name"] for i in billing["instances"])
        assert names and max(names.values()) == 1, names  # never two for one job
        assert all(i["status"] == "TERMINATED" for i in billing["instances"]), billing
        with store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        assert state is not None and state.run.status == "completed"
        booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
        assert booked == billing["totalMicroUsd"] > 0
    finally:
        mock.stop()
