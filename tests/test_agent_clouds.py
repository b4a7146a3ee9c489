"""The agent on rented cloud instances (fake clouds in process): a run completes on an instance,
is booked exactly what the cloud billed, fails over on a preemption or a boot that never ends,
stops before the budget is overspent, and the sweeper ends orphans."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

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
from procure.agent.cloud_offers import all_offers
from procure.agent.cloud_run import own_prefix
from procure.agent.cloud_sweeper import sweep
from procure.clouds.base import LaunchSpec
from procure.models import PaymentStatus, Vendor
from procure.store import Store, cloud_repo, repo


def _state(deps, run_id):  # type: ignore[no-untyped-def]
    with deps.store.session() as s:
        state = repo.load_state(s, run_id)
        instances = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    return state, instances


def _booked(state) -> int:  # type: ignore[no-untyped-def]
    return sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)


def test_a_run_completes_on_a_cloud_instance_booked_as_billed(tmp_path: Path) -> None:
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=1.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": runpod})
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    state, instances = _state(deps, run_id)
    assert [i.status for i in instances] == ["terminated"]
    assert runpod.running() == []
    assert runpod.launches == 1 and runpod.node_submits == 1
    assert _booked(state) == runpod.total_billed() > 0
    assert state.run.budget_remaining == state.run.budget_total - runpod.total_billed()
    assert [p.status for p in state.payments] == [PaymentStatus.completed]
    reasons = [o.content for o in state.observations if o.type == "agent_reasoning"]
    assert any("runpod/on-demand A100x1 in r1 $36.00/h" in r for r in reasons), reasons


def test_preempted_spot_instance_resumes_from_its_checkpoint_on_another_cloud(
    tmp_path: Path,
) -> None:
    vast = FakeCloud("vast", [offer("vast", "ask-1", 3.6, spot=True)], job_s=2.0)
    lam = FakeCloud(
        "lambda", [offer("lambda", "gpu_1x_a100", 36.0, increment=60)], job_s=2.0, bills=False
    )
    vendors = [cloud_vendor("va", "vast", 10.0, spot=True), cloud_vendor("la", "lambda", 50.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"vast": vast, "lambda": lam})
    run_id = new_run(store, 100.0)

    def half_done() -> bool:
        with store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        return state is not None and any(j.checkpoint_progress >= 0.5 for j in state.jobs)

    asyncio.run(drive(deps, run_id, until=half_done))
    (victim,) = vast.running()
    vast.preempt(victim.id)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    state, instances = _state(deps, run_id)
    assert [i.provider for i in instances] == ["vast", "lambda"]
    assert all(i.status == "terminated" for i in instances)
    assert vast.running() == [] and lam.running() == []
    assert lam.resumed_from and lam.resumed_from[0] >= 0.5  # resumed, not from scratch
    failed = [j for j in state.jobs if j.status == "failed"]
    assert len(failed) == 1 and "preempted" in (failed[0].error_message or "")
    # The lost instance is booked for what it was used, to the cent (Lambda by its minute rule).
    assert _booked(state) == vast.total_billed() + lam.total_billed()


def test_budget_exhausted_terminates_the_instance_before_overspending(tmp_path: Path) -> None:
    # $360/h = 10 cents a second; a job of 60s would cost $6, the budget is $1.
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 360.0)], job_s=60.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 500.0)])
    deps = make_deps(store, {"runpod": runpod}, boot_timeout_s=1.0, reserve_ahead_s=2.0)
    run_id = new_run(store, 1.0, hours=0.001)
    status = asyncio.run(drive(deps, run_id))
    state, instances = _state(deps, run_id)
    assert runpod.running() == []
    assert instances[0].outcome == "stopped"
    billed = runpod.total_billed()
    assert 0 < billed == _booked(state) <= state.run.budget_total
    assert status in ("aborted", "failed")


def test_a_boot_that_never_finishes_fails_over(tmp_path: Path) -> None:
    stuck = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=1.0)
    stuck.never_boot = True
    good = FakeCloud("vast", [offer("vast", "ask-9", 7.2)], job_s=1.0)
    vendors = [cloud_vendor("rp", "runpod", 10.0), cloud_vendor("va", "vast", 10.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"runpod": stuck, "vast": good}, boot_timeout_s=0.5)
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    state, instances = _state(deps, run_id)
    assert [i.provider for i in instances] == ["runpod", "vast"]
    assert "boot did not finish" in (instances[0].end_reason or "")
    assert stuck.running() == [] and good.running() == []
    assert _booked(state) == stuck.total_billed() + good.total_billed()


def test_capacity_refused_chooses_the_next_offer(tmp_path: Path) -> None:
    runpod = FakeCloud(
        "runpod",
        [offer("runpod", "cheap", 3.6, region="eu"), offer("runpod", "dear", 7.2, region="us")],
        job_s=1.0,
    )
    runpod.capacity.add("cheap")
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0)])
    deps = make_deps(store, {"runpod": runpod})
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    _, instances = _state(deps, run_id)
    assert [i.offer["region"] for i in instances] == ["eu", "us"]
    assert instances[0].instance_id is None and runpod.launches == 1


def _own_name(store: Store, suffix: str) -> str:
    """An instance name this install's agent would give (its install tag in it)."""
    with store.session() as s:
        return own_prefix(cloud_repo.install_tag(s)) + suffix


def test_the_sweeper_terminates_an_orphan_and_spares_the_owned(tmp_path: Path) -> None:
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=30.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0)])
    deps = make_deps(store, {"runpod": runpod})
    run_id = new_run(store, 100.0)
    asyncio.run(drive(deps, run_id, until=lambda: bool(runpod.instances)))

    orphaned = _own_name(store, "deadbeef")  # this install's label, no record: an orphan
    orphan = asyncio.run(
        runpod.launch_spec(LaunchSpec(orphaned, runpod._offers[0], env={"GPU_WORKER_TOKEN": "x"}))
    )
    assert asyncio.run(sweep(deps)) == [orphaned]
    assert [i.id for i in runpod.running()] != [] and orphan.id not in [
        i.id for i in runpod.running()
    ]
    with store.session() as s:
        repo.update_run(s, run_id, status="failed")  # the run ended without ending its instance
    assert len(asyncio.run(sweep(deps))) == 1
    assert runpod.running() == []
    state, instances = _state(deps, run_id)
    assert instances[0].status == "terminated"
    assert _booked(state) == runpod.total_billed()
    assert any("Sweeper terminated" in o.content for o in state.observations)


def test_all_offers_cheapest_first_over_clouds_and_x402(tmp_path: Path) -> None:
    vast = FakeCloud("vast", [offer("vast", "a", 0.31, spot=True, gpu="RTX4090")])
    runpod = FakeCloud(
        "runpod", [offer("runpod", "b", 1.19), offer("runpod", "c", 2.0, gpu="H100")]
    )
    x402 = Vendor(
        vendor_id="gpu_vendor_1",
        name="mock",
        endpoint="http://127.0.0.1:1",
        base_price_per_hour=900_000,
        reliability_score=0.9,
        supported_gpu_types=["A100"],
    )
    rows = asyncio.run(
        all_offers({"vast": vast, "runpod": runpod}, [x402, cloud_vendor("rp", "runpod", 5.0)])
    )  # type: ignore[dict-item]
    assert [(r.source, r.price_per_hour) for r in rows] == [
        ("vast", 310_000),
        ("x402", 900_000),
        ("runpod", 1_190_000),
        ("runpod", 2_000_000),
    ]
    assert rows[2].vendor_id == "rp" and rows[0].interruptible
    a100 = asyncio.run(all_offers({"runpod": runpod}, [x402], gpu="A100", max_price=1_000_000))  # type: ignore[dict-item]
    assert [r.source for r in a100] == ["x402"]
    assert [r.source for r in asyncio.run(all_offers({"vast": vast}, [x402], spot=True))] == [
        "vast"
    ]  # type: ignore[dict-item]


def test_a_worker_runs_a_cloud_job_to_completion_and_sweeps(tmp_path: Path) -> None:
    from procure.agent.worker import Worker, WorkerConfig

    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=1.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": runpod}, sweep_every_s=0.05)
    run_id = new_run(store, 100.0)
    orphan = asyncio.run(
        runpod.launch_spec(
            LaunchSpec(_own_name(store, "0rphan"), runpod._offers[0], env={"GPU_WORKER_TOKEN": "x"})
        )
    )

    async def work() -> None:
        worker = Worker(deps, WorkerConfig(poll_interval_s=0.02, idle_max_s=0.05))
        task = asyncio.create_task(worker.run())
        for _ in range(1500):
            with store.session() as s:
                run = repo.get_run(s, run_id)
            assert run is not None
            if run.status != "running" and not runpod.running():
                break
            await asyncio.sleep(0.02)
        worker.stop()
        await task

    asyncio.run(work())
    state, instances = _state(deps, run_id)
    assert state.run.status == "completed"
    assert runpod.instances[orphan.id].status == "terminated"  # the sweeper's
    assert runpod.running() == [] and [i.status for i in instances] == ["terminated"]
    assert _booked(state) == runpod.bill(runpod.instances[instances[0].instance_id or ""])


def test_a_cancelled_run_terminates_its_instance_and_books_what_it_used(tmp_path: Path) -> None:
    from procure.agent.cancel import request_cancel

    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=60.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": runpod})
    run_id = new_run(store, 100.0)
    asyncio.run(drive(deps, run_id, until=lambda: runpod.node_submits > 0))
    request_cancel(store, run_id, by="a test", reason="changed my mind")
    assert asyncio.run(drive(deps, run_id)) == "cancelled"
    state, instances = _state(deps, run_id)
    assert runpod.running() == [] and instances[0].outcome == "cancelled"
    assert _booked(state) == runpod.total_billed() > 0
    assert [j.status for j in state.jobs] == ["cancelled"]


def test_a_node_address_that_is_not_the_instances_gets_no_token(tmp_path: Path) -> None:
    liar = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=1.0)
    real_view = liar._view

    def lying(inst):  # type: ignore[no-untyped-def]
        seen = real_view(inst)
        if seen.node_url:  # the API points the node somewhere else than the instance's ip
            return dataclasses.replace(seen, node_url="http://203.0.113.9:9876")
        return seen

    liar._view = lying  # type: ignore[method-assign]
    good = FakeCloud("vast", [offer("vast", "ask-9", 7.2)], job_s=1.0)
    store = new_store(
        tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0), cloud_vendor("va", "vast", 10.0)]
    )
    deps = make_deps(store, {"runpod": liar, "vast": good})
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    _, instances = _state(deps, run_id)
    assert [i.provider for i in instances] == ["runpod", "vast"]
    assert "is not the instance's address" in (instances[0].end_reason or "")
    assert liar.node_submits == 0 and liar.running() == []


def test_a_launch_without_an_answer_is_found_by_name_not_launched_twice(tmp_path: Path) -> None:
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.5)
    runpod.launch_errors = 1  # the instance is created, the answer lost
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": runpod})
    run_id = new_run(store, 100.0)
    assert asyncio.run(drive(deps, run_id)) == "completed"
    state, _ = _state(deps, run_id)
    assert runpod.launches == 1 and runpod.running() == []
    assert any("found after an interrupted launch" in o.content for o in state.observations)


def test_the_planner_weighs_cloud_offers_beside_x402_quotes_and_says_why(tmp_path: Path) -> None:
    from procure.agent.cloud_offers import price_clouds
    from procure.agent.context import PlanContext
    from procure.agent.planner import plan_cost_aware

    vast = FakeCloud("vast", [offer("vast", "ask-1", 0.31, spot=True)])
    runpod = FakeCloud("runpod", [offer("runpod", "pod-1", 1.19)])
    x402 = Vendor(
        vendor_id="gpu_vendor_1",
        name="mock",
        endpoint="http://127.0.0.1:1",
        base_price_per_hour=2_000_000,
        reliability_score=0.9,
        supported_gpu_types=["A100"],
    )
    vendors = [x402, cloud_vendor("va", "vast", 1.0, spot=True), cloud_vendor("rp", "runpod", 2.0)]
    store = new_store(tmp_url(tmp_path), vendors)
    deps = make_deps(store, {"vast": vast, "runpod": runpod})
    run_id = new_run(store, 100.0, hours=2.0)
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        listed = repo.list_vendors(s)
    assert state is not None
    ctx = asyncio.run(price_clouds(deps, PlanContext(state=state, vendors=listed)))
    action = plan_cost_aware(ctx)
    assert action.action == "start_job" and action.vendor_id == "va"
    assert "va (vast/bid A100x1 in r1): $0.31/h" in action.reason
    assert "expected failures or preemptions" in action.reason
    assert "rp (runpod/on-demand A100x1 in r1): $1.19/h" in action.reason
    assert "gpu_vendor_1: $2.00/h" in action.reason


def test_a_passed_deadline_stops_the_instance(tmp_path: Path) -> None:
    from datetime import timedelta

    from procure.models import utcnow

    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=60.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 10.0)])
    deps = make_deps(store, {"runpod": runpod})
    run_id = new_run(store, 100.0, hours=0.01)
    with store.session() as s:
        repo.update_run(s, run_id, deadline=utcnow() + timedelta(hours=1))
    asyncio.run(drive(deps, run_id, until=lambda: runpod.node_submits > 0))
    with store.session() as s:
        repo.update_run(s, run_id, deadline=utcnow() - timedelta(seconds=1))
    asyncio.run(drive(deps, run_id, until=lambda: not runpod.running()))
    state, instances = _state(deps, run_id)
    assert instances[0].outcome == "stopped" and "deadline" in (instances[0].end_reason or "")
    assert _booked(state) == runpod.total_billed()
