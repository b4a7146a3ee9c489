"""The LLM planner against a model that repeats, refuses or overreaches: a scripted
OpenAI-compatible endpoint on loopback drives real ticks against the seeds' mock vendors, a real
facilitator and a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
from openai import AsyncOpenAI

from procure.agent.llm_planner import LLMPlanner
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.local import serve
from procure.models import utcnow
from procure.store import repo
from procure.store.ledger import SpendCaps
from test_llm_planner import MODEL, FakeLLM, answer
from world import World, state_of


@pytest.fixture
def llm() -> Iterator[tuple[FakeLLM, str]]:
    fake = FakeLLM()
    server = serve(fake.app())
    yield fake, f"{server.url}/v1"
    server.stop()


def llm_planner(base_url: str) -> LLMPlanner:
    client = AsyncOpenAI(api_key="sk-test", base_url=base_url, max_retries=0, timeout=5.0)
    return LLMPlanner(client, MODEL, timeout_s=5.0)


def ticks(world: World, planner: LLMPlanner, run_id: str, n: int, **deps_kw: object) -> list[str]:
    async def go() -> list[str]:
        deps = world.deps()
        deps.planner = planner
        for name, value in deps_kw.items():
            setattr(deps, name, value)
        try:
            return [(await tick(deps, run_id)).message for _ in range(n)]
        finally:
            await close_deps(deps)

    return asyncio.run(go())


def test_a_run_waiting_for_the_global_cap_does_not_ask_the_model_every_tick(
    world: World, llm: tuple[FakeLLM, str]
) -> None:
    """Before the fix: a run held by the global spend cap showed the model the same state at
    every tick (once a second under the worker), the model answered the same start_job each
    time and the cap refused it again: a paid completion per tick for as long as the cap held,
    since only the model's own `wait` was kept."""
    fake, url = llm
    start = answer(action="start_job", vendorId="gpu_vendor_2", hours=None, reason="reliable")
    fake.script += [start] * 10
    run_id = world.new_run(budget=5.0)
    planner = llm_planner(url)

    messages = ticks(world, planner, run_id, 5, spend_caps=SpendCaps(per_hour=1_000_000))

    assert messages == ["Waiting for the global spend cap"] * 5
    state = state_of(world, run_id)
    assert state.payments == [] and state.jobs == []
    # Asked again once (the first answer may simply not have been carried out yet), then the
    # same answer to the same state stands.
    assert len(fake.requests) == 2


def test_a_model_s_job_too_short_to_reach_a_checkpoint_is_not_paid_for(
    world: World, llm: tuple[FakeLLM, str]
) -> None:
    """Before the fix: a model (outside; the schema's `hours` is not enforced by every server)
    answering `hours: 0.0001` passed the guard (it checks only > 0): the run paid for a 0.36 s
    job that ran out of paid time at 0% before its first checkpoint, and at the next decision the
    model did the same again: a payment and a job per cycle, forever, the run stuck at 0%."""
    fake, url = llm
    tiny = answer(action="start_job", vendorId="gpu_vendor_2", hours=0.0001, reason="a quick one")
    fake.script.append(tiny)
    run_id = world.new_run(budget=5.0)  # 1 h of work, a checkpoint every quarter

    [message] = ticks(world, llm_planner(url), run_id, 1)

    assert message == "Job started"
    state = state_of(world, run_id)
    [job] = state.jobs
    assert job.job_params["hours"] == 1.0  # the heuristic's job: all the work left
    assert all(p.hours is None or p.hours >= 1 / 60 for p in state.payments)  # none for 0.36 s
    errors = [o.content for o in state.observations if o.type == "error"]
    assert any("checkpoint" in e and "heuristic planner decides instead" in e for e in errors)


def test_a_model_naming_another_gpu_type_cannot_hire_a_vendor_lacking_the_job_s(
    world: World, llm: tuple[FakeLLM, str]
) -> None:
    """Before the fix: the guard checked the GPU type the model named, not the job's: with
    gpu_vendor_2 registered for H100 only, an answer `gpuType: "H100"` passed, and the run paid
    gpu_vendor_2 for the job's A100 hours (submit asks for the job spec's GPU type)."""
    fake, url = llm
    with world.store.session() as s:
        only_h100 = world.vendors["gpu_vendor_2"].model_copy(
            update={"supported_gpu_types": ["H100"]}
        )
        repo.save_vendor(s, only_h100)
    fake.script.append(
        answer(action="start_job", vendorId="gpu_vendor_2", gpuType="H100", reason="faster")
    )
    run_id = world.new_run(budget=5.0)  # an A100 job

    [message] = ticks(world, llm_planner(url), run_id, 1)

    assert message == "Job started"
    state = state_of(world, run_id)
    assert [j.vendor_id for j in state.jobs] == ["gpu_vendor_1"]  # the heuristic's choice
    assert {p.vendor_id for p in state.payments} <= {"gpu_vendor_1"}
    errors = [o.content for o in state.observations if o.type == "error"]
    assert any("A100" in e and "heuristic planner decides instead" in e for e in errors)


def test_a_refused_answer_to_an_unchanged_state_is_not_asked_for_every_tick(
    world: World, llm: tuple[FakeLLM, str]
) -> None:
    """Before the fix: only the model's usable answers were kept. A model that answered a run
    held by the global spend cap with a vendor that does not exist (a small local model invents
    ids) was asked again at every tick, and each differently worded refusal was stored: a paid
    completion and two observations a second for as long as the cap held."""
    fake, url = llm
    fake.script += [
        answer(action="start_job", vendorId=f"vendor_{n:050d}", reason=f"the bargain, take {n}")
        for n in range(10)
    ]
    run_id = world.new_run(budget=5.0)
    planner = llm_planner(url)

    messages = ticks(world, planner, run_id, 5, spend_caps=SpendCaps(per_hour=1_000_000))

    assert messages == ["Waiting for the global spend cap"] * 5
    assert len(fake.requests) == 1
    state = state_of(world, run_id)
    assert len([o for o in state.observations if o.type == "llm_response"]) == 1


def test_a_model_s_abort_while_vendors_only_cool_down_is_refused(
    world: World, llm: tuple[FakeLLM, str]
) -> None:
    """Before the fix: with every vendor cooling down for a few minutes the schema offers the
    model `abort` (no vendor is eligible this instant), and its abort was taken as it came: a
    funded run was ended for good, where the prompt's rule (and the heuristic) say wait."""
    fake, url = llm
    fake.script.append(answer(action="abort", vendorId=None, reason="every vendor is failing"))
    with world.store.session() as s:
        for vendor_id in world.vendors:
            repo.cool_down(s, vendor_id, utcnow() + timedelta(minutes=3))
    run_id = world.new_run(budget=5.0)

    [message] = ticks(world, llm_planner(url), run_id, 1)

    assert message == "Waiting"
    state = state_of(world, run_id)
    assert state.run.status == "running"
    errors = [o.content for o in state.observations if o.type == "error"]
    assert any("heuristic planner decides instead" in e for e in errors)
