"""The agent renting instances on the clouds, where it went wrong: a cloud refusing every call
before any launch, a node that never answers, an instance abandoned to the sweeper, a RunPod
vendor of several GPUs a pod, Vast.ai regions as Vast names them, an IPv6 pod; against the mock
clouds over HTTP or the in-process fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
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
from procure.agent.cloud_money import computed_bill
from procure.agent.cloud_offers import all_offers
from procure.agent.cloud_sweeper import sweep
from procure.agent.cloud_vendors import CloudVendorRequest, save_cloud_vendor
from procure.agent.tick import tick
from procure.clouds.base import AuthError, CloudError, Instance, LaunchSpec, ProviderError
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.settings import RunPodSettings
from procure.local import free_port
from procure.models import OfferTerms, PaymentStatus
from procure.store import cloud_repo, repo

RUNPOD_KEY = "mock-runpod-key"


def _runpod(mock) -> RunPodCloud:  # type: ignore[no-untyped-def]
    return RunPodCloud(RunPodSettings(RUNPOD_API_KEY=RUNPOD_KEY, RUNPOD_API_URL=mock.url))


async def _tick_until(deps, run_id: str, done, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await tick(deps, run_id)
        if done():
            return
        await asyncio.sleep(0.02)
    with deps.store.session() as s:
        said = [o.content for o in repo.load_state(s, run_id).observations][-6:]  # type: ignore[union-attr]
    raise AssertionError(f"not reached in {timeout_s}s: {said}")


async def _launched(deps, run_id: str) -> str:  # type: ignore[no-untyped-def]
    """Tick `run_id` until its instance is launched; that instance's id."""
    store = deps.store

    def launched() -> bool:
        with store.session() as s:
            return any(i.instance_id for i in cloud_repo.instances_of_run(s, run_id))

    await _tick_until(deps, run_id, launched)
    with store.session() as s:
        (inst,) = cloud_repo.instances_of_run(s, run_id)
    assert inst.instance_id is not None
    return inst.instance_id


# --- 1. a RunPod account renting more than one GPU per pod -----------------------------------


def test_a_runpod_vendor_of_two_gpus_rents_a_two_gpu_pod(tmp_path: Path) -> None:
    """Before the fix: RunPod's catalogue was always asked for one-GPU pods, so a RunPod vendor
    of 2 GPUs never matched an offer: its runs waited for ever ("none now") and `procure offers
    --count 2` listed no RunPod offer, while RunPod had them."""
    mock = start_runpod(
        RunPodMockConfig(api_key=RUNPOD_KEY, provision_s=0.1, start_s=0.1, node_port=free_port())
    )
    try:
        asyncio.run(_two_gpus(mock, tmp_path))
    finally:
        mock.stop()


async def _two_gpus(mock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = _runpod(mock)
    vendor = cloud_vendor("rp2", "runpod", 5.0)
    assert vendor.cloud is not None
    vendor.cloud.count = 2
    store = new_store(tmp_url(tmp_path), [vendor])
    deps = dataclasses.replace(make_deps(store, {}), clouds={"runpod": client})
    try:
        listed = await all_offers({"runpod": client}, [vendor], gpu="A100", count=2)
        assert listed and all(r.gpu_count == 2 and r.vendor_id == "rp2" for r in listed)
        instance_id = await _launched(deps, new_run(store, 100.0))
        pod = await client.get(instance_id)
        assert pod is not None and pod.gpus == 2
        await client.terminate([instance_id])
    finally:
        await client.aclose()


# --- 2. an abandoned instance's computed bill, booked by the sweeper ---------------------------


class TerminateIgnored(FakeCloud):
    """Answers every terminate as accepted while `ignoring`, but the instance runs (and bills)
    on, listed active; once `ignoring` is off, a terminate ends it."""

    ignoring = True

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        if self.ignoring:
            return [v for i in instance_ids if (v := await self.get(i)) is not None]
        return await super().terminate(instance_ids)


def test_the_sweeper_books_an_abandoned_instance_until_its_own_terminate(tmp_path: Path) -> None:
    """Before the fix: an instance whose terminate was accepted but which ran on, listed active,
    was abandoned to the sweeper; where the provider has no billing endpoint (Lambda) the
    sweeper booked its computed bill only up to the first accepted terminate, not to its own
    terminate that really ended it: the time it billed in between was never counted."""
    cloud = TerminateIgnored(
        "lambda", [offer("lambda", "gpu_1x_a100", 3600.0)], job_s=0.3, bills=False
    )
    store = new_store(tmp_url(tmp_path), [cloud_vendor("la", "lambda", 5000.0)])
    deps = make_deps(store, {"lambda": cloud}, boot_timeout_s=0.3)
    deps.max_troubles = 3
    run_id = new_run(store, 1000.0, hours=0.01)
    asyncio.run(_until_abandoned(deps, run_id))
    with store.session() as s:
        (record,) = cloud_repo.instances_of_run(s, run_id)
    assert record.status == "terminating" and record.ended_at is not None
    (inst,) = cloud.running()
    cutoff = computed_bill(record, OfferTerms.model_validate(record.offer))

    async def billing_on() -> None:  # it bills on, at $1 a second, past the accepted terminate
        deadline = time.monotonic() + 30
        while cloud.bill(inst) < cutoff + 2_000_000:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    asyncio.run(billing_on())
    cloud.ignoring = False
    assert asyncio.run(sweep(deps)) == [record.name]
    assert cloud.running() == []
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    assert booked >= cloud.total_billed() > cutoff


async def _until_abandoned(deps, run_id: str) -> None:  # type: ignore[no-untyped-def]
    def abandoned() -> bool:
        with deps.store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        assert state is not None
        return bool(state.jobs) and state.jobs[0].status not in ("submitted", "running")

    await _tick_until(deps, run_id, abandoned)


# --- 3. a cloud whose listing is refused before anything was launched ------------------------


class Refusing(FakeCloud):
    """Every call is refused with `error` (a key revoked, an account suspended, an outage)."""

    error: CloudError = AuthError("GET /instances: Lambda refused the API key (401)")

    async def find(self, name: str) -> list[Instance]:
        raise self.error

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        AuthError("GET /instances: Lambda refused the API key (401)"),
        CloudError("GET /instances: Lambda answered 403 global/account-inactive"),
        ProviderError("GET /instances: Lambda answered 503"),
    ],
)
def test_a_run_whose_cloud_refuses_every_call_before_any_launch_goes_on_elsewhere(
    tmp_path: Path, error: CloudError
) -> None:
    """Before the fix: the job's first step, looking its instance up by name, was refused (a key
    revoked, an account suspended, an outage); given up after many ticks, the job was marked
    ending but the next tick looked it up again, refused again, for ever: nothing had been
    launched, yet the run never ended its job nor went on to the other cloud (and, ended, it
    went back to the same cheapest offer, not cooled)."""
    refusing = Refusing("lambda", [offer("lambda", "gpu_1x_a100", 10.0, increment=60)])
    refusing.error = error
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 20.0)], job_s=0.3)
    vendors = [cloud_vendor("la", "lambda", 50.0), cloud_vendor("rp", "runpod", 50.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"lambda": refusing, "runpod": runpod})
    deps.max_troubles = 3
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id, timeout_s=60)) == "completed"
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        instances = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    assert [i.provider for i in instances] == ["lambda", "runpod"]
    assert refusing.launches == 0
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    assert booked == runpod.total_billed() > 0
    assert not [p for p in state.payments if p.status == PaymentStatus.pending]


class DeadNodes(FakeCloud):
    """Its instances boot and are listed active, but their node never answers."""

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        launched = await super().launch_spec(spec)
        self.nodes[launched.id].alive = False
        return launched


def test_an_instance_whose_node_never_answers_is_not_rented_again_at_once(
    tmp_path: Path,
) -> None:
    """Before the fix: an instance active at its provider whose node never answered was given
    up after many ticks (terminated, booked), but its offer kind was not cooled: the planner
    rented the same cheapest offer again, and again, each a billed instance with a dead node,
    instead of going on to the other cloud."""
    dead = DeadNodes("vast", [offer("vast", "ask-1", 10.0)], job_s=0.3)
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 20.0)], job_s=0.3)
    vendors = [cloud_vendor("va", "vast", 50.0), cloud_vendor("rp", "runpod", 50.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"vast": dead, "runpod": runpod})
    deps.max_troubles = 3
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id, timeout_s=60)) == "completed"
    assert dead.launches == 1 and dead.running() == []
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    assert booked == dead.total_billed() + runpod.total_billed()


# --- 4. a Vast.ai account restricted to regions as Vast.ai names them ------------------------


def test_a_vast_account_restricted_to_a_region_as_vast_names_it_rents_only_there(
    tmp_path: Path,
) -> None:
    """Before the fix: a cloud vendor's regions had to match `[A-Za-z0-9_.-]`, but Vast.ai's
    regions are its hosts' geolocations ("Oregon, US"): `POST /api/vendors/cloud` and `procure
    vendors add-cloud --region` refused every one of them (422), so a Vast.ai account could not
    be kept to a region at all (and any name they took matched no Vast.ai offer)."""
    from procure.clouds.vast.mock import start_mock_cloud as start_vast
    from procure.clouds.vast.mockstate import MockVastConfig

    body = CloudVendorRequest.model_validate(
        {"provider": "vast", "gpu": "A100", "maxPricePerHour": 5.0, "regions": ["Oregon, US"]}
    )
    mock = start_vast(MockVastConfig(boot_s=0.3, rate_scale=0, outbid_per_hour=0, drift=0))
    try:
        assert asyncio.run(_rented_region(mock, body, tmp_path)) == "Oregon, US"
    finally:
        mock.stop()


async def _rented_region(mock, body: CloudVendorRequest, tmp_path: Path) -> str | None:  # type: ignore[no-untyped-def]
    """Where the run on `body`'s Vast.ai account rents its instance (terminated at once)."""
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.settings import VastSettings

    client = VastCloud(VastSettings(VAST_API_KEY=mock.state.config.api_key, VAST_API_URL=mock.url))
    try:
        store = new_store(tmp_url(tmp_path), [])
        vendor, _ = save_cloud_vendor(store, body)
        deps = dataclasses.replace(make_deps(store, {}), clouds={"vast": client})
        run_id = new_run(store, 100.0)
        # Hesse's A100 is cheaper; the account may rent only in Oregon.
        listed = await all_offers({"vast": client}, [vendor], gpu="A100")
        assert {r.region for r in listed if r.vendor_id == vendor.vendor_id} == {"Oregon, US"}
        instance_id = await _launched(deps, run_id)
        found = await client.get(instance_id)
        await client.terminate([instance_id])
        return found.region if found else None
    finally:
        await client.aclose()


# --- 5. a RunPod pod reached over IPv6 ----------------------------------------------------------


def test_a_runpod_pod_with_an_ipv6_address_is_reached_at_its_node() -> None:
    """Before the fix: a RunPod pod whose public port is on an IPv6 address got the node URL
    `http://2001:db8::7:40123` (unbracketed, not a URL): the agent refused to send its token
    there and terminated every such pod at its boot as the cloud's failure."""
    from procure.agent.cloud_node import checked_node_url
    from procure.clouds.runpod import wire

    pod = {
        "id": "pod6abc",
        "name": "procure-job-x",
        "status": "RUNNING",
        "cost": 1.19,
        "ports": ["9876/tcp"],
        "runtime": {
            "ports": [{"private": 9876, "public": 40123, "type": "tcp", "ip": "2001:db8::7"}]
        },
    }
    inst = wire.instance(pod, 9876)
    assert inst.node_url is not None
    assert checked_node_url(inst.node_url, inst.ip) == "http://[2001:db8::7]:40123"


# --- 7. a failed job's instance abandoned to the sweeper (fix outside this area) -------------


class DeadNodesListedOn(DeadNodes):
    """Nodes that never answer, and a terminate accepted while the instance stays listed active
    (its end can never be confirmed: the job is abandoned to the sweeper)."""

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        return [v for i in instance_ids if (v := await self.get(i)) is not None]


def test_a_failed_job_abandoned_to_the_sweeper_lets_its_run_go_on_elsewhere(
    tmp_path: Path,
) -> None:
    """Before the fix: a failed job whose instance could not be confirmed ended is abandoned to
    the sweeper, its reservation kept pending (the instance may still bill); the run then took
    that reservation for an x402 slice payment in doubt, asked the facilitator about its
    `cloud-` nonce every tick and did nothing else ("Payment in doubt") until that made-up
    authorisation expired (then marked the reservation failed, uncounting it while the instance
    may still bill): it never went on to the other cloud meanwhile."""
    listed_on = DeadNodesListedOn("vast", [offer("vast", "ask-1", 10.0)], job_s=0.3)
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 20.0)], job_s=0.3)
    vendors = [cloud_vendor("va", "vast", 50.0), cloud_vendor("rp", "runpod", 50.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"vast": listed_on, "runpod": runpod}, boot_timeout_s=0.3)
    deps.max_troubles = 3
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id, timeout_s=20)) == "completed"
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        first, _second = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    held = [p for p in state.payments if p.job_id == first.job_id]
    assert [p.status for p in held] == [PaymentStatus.pending]  # the sweeper's to book
