"""The planners' numbers cannot break a tick or a budget: a vendor with a history of quick failures
is steered around instead of overflowing the cost model, and an LLM's infinite hours or a slice
of a split second are refused by the guard (the heuristic decides instead)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from procure.agent.context import PlanContext
from procure.agent.decide import decide
from procure.agent.llm_planner import make_llm_planner
from procure.agent.planner import heuristic_planner
from procure.agent.slices import MIN_SLICE_HOURS
from procure.local import LocalServer, serve
from procure.models import (
    Action,
    JobSpec,
    Run,
    RunState,
    RunStatus,
    Vendor,
    usd_to_micros,
    utcnow,
)
from procure.settings import Settings
from procure.vendors.registry import default_vendors

MODEL = "accounts/fireworks/models/llama-v3-8b-instruct"


def _ctx(vendors: list[Vendor], *, budget: float, hours: float) -> PlanContext:
    now = utcnow()
    run = Run(
        _id="run-review9e",
        user_id="u1",
        goal="train",
        status=RunStatus.running,
        budget_total=usd_to_micros(budget),
        budget_remaining=usd_to_micros(budget),
        job_spec=JobSpec(hours=hours),
        created_at=now,
        updated_at=now,
    )
    return PlanContext(
        state=RunState(run=run, jobs=[], payments=[], observations=[]), vendors=vendors, now=now
    )


def test_a_vendor_that_keeps_failing_fast_is_steered_around() -> None:
    """Before the fix: a vendor whose learned history is many quick failures (hazard ~40/h: its jobs
    die within minutes) makes the cost model overflow/underflow (`long_run_rate` divides by a `kept`
    that underflows to 0, `math.exp` overflows): the heuristic planner raises instead of steering
    around it, so every run that could use that vendor's GPU type stops planning at all."""
    broken, steady = default_vendors()
    broken = broken.model_copy(update={"failures": 500, "gpu_hours": 2.0})
    ctx = _ctx([broken, steady], budget=1000.0, hours=100.0)

    decision = asyncio.run(decide(heuristic_planner, ctx))

    assert decision.action.action == "start_job"
    assert decision.action.vendor_id == steady.vendor_id


# --- the LLM planner against a loopback chat-completions endpoint ----------------------------


class _Scripted:
    """Replays one raw answer body for every chat completion."""

    def __init__(self) -> None:
        self.content = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            return JSONResponse(
                {
                    "id": "chatcmpl-review9e",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", MODEL),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )

        return app


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[_Scripted, LocalServer]]:
    fake = _Scripted()
    server = serve(fake.app())
    yield fake, server
    server.stop()


def _llm_plan(server: LocalServer, tmp_path: Any, ctx: PlanContext) -> Action:
    settings = Settings(
        PROCURE_DATABASE_URL=f"sqlite:///{tmp_path / 'procure.db'}",
        PROCURE_HOME=tmp_path,
        PLANNER_MODE="llm",
        FIREWORKS_API_KEY="fw-review9e-key",
        FIREWORKS_MODEL=MODEL,
        LLM_BASE_URL=f"{server.url}/v1",
        LLM_TIMEOUT_S=10.0,
    )  # type: ignore[call-arg]

    async def go() -> Action:
        return (await decide(make_llm_planner(settings), ctx)).action

    return asyncio.run(go())


@pytest.mark.parametrize("hours", ["1e999", "1e308"])
def test_llm_answer_with_absurd_hours_is_refused(
    scripted: tuple[_Scripted, LocalServer], tmp_path: Any, hours: str
) -> None:
    """Before the fix: the LLM server is outside: an answer whose `hours` is 1e999 (parsed as inf)
    or 1e308 passes the `hours <= 0` check, then the guard's `round(price * hours)` raises
    OverflowError. The planner promises never to raise into the tick (it must fall back to the
    heuristic); instead the tick crashes, and does again every tick the model answers so."""
    fake, server = scripted
    fake.content = (
        '{"action": "start_job", "vendorId": "gpu_vendor_1", "hours": '
        + hours
        + ', "gpuType": "A100", "sliceHours": null, "reason": "cheapest"}'
    )
    ctx = _ctx(default_vendors(), budget=5.0, hours=1.0)

    action = _llm_plan(server, tmp_path, ctx)

    assert action.action == "start_job"
    assert action.hours == pytest.approx(1.0)  # the heuristic's choice: the work left
    assert any("heuristic" in content for _, content in ctx.notes), json.dumps(ctx.notes)


def test_llm_slice_of_a_split_second_is_refused(
    scripted: tuple[_Scripted, LocalServer], tmp_path: Any
) -> None:
    """Before the fix: the schema asks for `sliceHours: null`, but the server is outside: an answer
    with `sliceHours: 1e-6` passes the guard (it only checks > 0), and `submit` asks the vendor for
    a 3.6 ms first payment and renews every few ms: thousands of x402 payments per GPU-hour (or a
    quote of $0, refused, the run failing on troubles). `slices.MIN_SLICE_HOURS` says no payment
    buys less than a minute; the guard must refuse it and the heuristic decide."""
    fake, server = scripted
    fake.content = (
        '{"action": "start_job", "vendorId": "gpu_vendor_2", "hours": 1.0, '
        '"gpuType": "A100", "sliceHours": 1e-6, "reason": "small slices are safe"}'
    )
    ctx = _ctx(default_vendors(), budget=5.0, hours=1.0)

    action = _llm_plan(server, tmp_path, ctx)

    assert action.action == "start_job"
    assert action.slice_hours is None or action.slice_hours >= MIN_SLICE_HOURS
