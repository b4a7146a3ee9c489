"""A vendor that crashed a job is chosen again later in the same run, after a long wait on a
payment in doubt at another vendor: the planner's reason says why it returns, and the run page
shows the wait (since when, what it waits for, the next check) from the store alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from procure.agent.context import PlanContext
from procure.agent.decide import decide
from procure.agent.planner import stub_planner
from procure.models import (
    Action,
    Job,
    JobSpec,
    JobStatus,
    ObservationType,
    Payment,
    Run,
    RunState,
    RunStatus,
    utcnow,
)
from procure.vendors.client import PaymentRefused, VendorClient
from procure.vendors.registry import default_vendors
from procure.web import views
from procure.web.events import _version
from procure.web.templating import templates
from web_browser import chromium, console_errors, dashboard, screenshot_dir
from world import World, drive, running_world, state_of


def _run(created_at: datetime) -> Run:
    """A running run with $5 of budget, created at `created_at`."""
    return Run(
        _id="r1",
        user_id="u",
        goal="g",
        status=RunStatus.running,
        budget_total=5_000_000,
        budget_remaining=5_000_000,
        job_spec=JobSpec(),
        created_at=created_at,
        updated_at=created_at,
    )


def test_the_planner_says_why_it_returns_to_a_vendor_that_crashed() -> None:
    now = utcnow()
    crashed_at = now - timedelta(minutes=10)
    run = _run(crashed_at)
    job = Job(
        _id="j1",
        run_id="r1",
        vendor_id="gpu_vendor_1",
        vendor_job_id="job-abc",
        status=JobStatus.failed,
        expected_cost=1_400_000,
        idempotency_key="job-j1",
        progress=0.47,
        error_message="Vendor crashed at 47% progress",
        created_at=crashed_at,
        updated_at=crashed_at,
        completed_at=crashed_at,
    )
    v1, v2 = default_vendors()
    v1 = v1.model_copy(update={"cooldown_until": crashed_at + timedelta(minutes=5)})
    state = RunState(run=run, jobs=[job], payments=[], observations=[])
    ctx = PlanContext(state=state, vendors=[v1, v2], now=now)

    decision = asyncio.run(decide(stub_planner, ctx))
    reason = decision.action.reason
    assert decision.action.vendor_id == "gpu_vendor_1"
    assert reason.startswith(
        "Returns to gpu_vendor_1: it failed job job-abc at 47% (Vendor crashed at 47% progress) "
        f"at {crashed_at:%H:%M:%S} UTC, 10 min ago; "
        f"its cool-down ended at {crashed_at + timedelta(minutes=5):%H:%M:%S} UTC; "
        "it is still the cheapest by $0.70/h ($0.70 on the 1h left; next: gpu_vendor_2 at $2.10/h)"
    )
    # A vendor that never failed in this run needs no such word.
    fresh = PlanContext(state=state.model_copy(update={"jobs": []}), vendors=[v1, v2], now=now)
    assert "Returns to" not in asyncio.run(decide(stub_planner, fresh)).action.reason

    # Dearer than the other: a deterministic planner's reason has the figures it compared ...
    dear = v1.model_copy(update={"base_price_per_hour": 2_500_000})
    ctx = PlanContext(state=state, vendors=[dear, v2], now=now)

    async def choose_v1(_: PlanContext) -> Action:  # an LLM's choice: no figures
        return Action(action="start_job", vendor_id="gpu_vendor_1", reason="I like it")

    said = asyncio.run(decide(choose_v1, ctx)).action.reason
    assert "it is not the cheapest (gpu_vendor_2 is $0.40/h less)" in said
    assert "figures below" not in said  # ... an LLM planner's has none to point at


def test_the_live_summary_changes_once_the_next_check_is_due() -> None:
    now = utcnow()
    run = _run(now)
    pay = Payment.model_validate(
        {
            "_id": "p1",
            "runId": "r1",
            "jobId": "j1",
            "vendorId": "v1",
            "amount": 5,
            "status": "pending",
            "nonce": "0xab",
            "errorMessage": "refused: settlement failed",
            "createdAt": now,
            "updatedAt": now,
        }
    )
    state = RunState(run=run, jobs=[], payments=[pay], observations=[])
    check = now + timedelta(seconds=30)
    # Nothing written meanwhile: still the page must re-render once the check is overdue.
    assert _version(state, check, now=now) != _version(state, check, now=check)
    d = views.doubts(state, next_check=now - timedelta(seconds=5), auth_window_s=300)
    module = templates.get_template("_run_live.html").module  # type: ignore[attr-defined]
    html = str(module.summary_block({"run": run, "doubts": d, "spent": 0}))
    assert "&lt; $0.01 to v1" in html and "$0.00" not in html.split("<dl")[0]


class _RefusesAfterSigning:
    """The first submission to `vendor_id` is refused after its payment was signed and sent:
    the payment stays in doubt until its authorisation expires unused."""

    def __init__(self, inner: VendorClient, vendor_id: str) -> None:
        self.inner = inner
        self.vendor_id = vendor_id
        self.refused = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def submit(self, vendor: Any, *args: Any, **kwargs: Any) -> Any:
        if vendor.vendor_id == self.vendor_id and not self.refused:
            self.refused = True
            raise PaymentRefused("settlement failed at the vendor (test)", payment_sent=True)
        return await self.inner.submit(vendor, *args, **kwargs)


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """Vendor 1 crashes its first job at 47% and cools down 2 s; an authorisation is valid
    15 s (the least allowed); no short first slices, to keep the story short."""
    with running_world(
        tmp_path,
        sqlite_url,
        job_seconds=1.0,  # the story's time is the doubt's 15 s; the jobs need only run
        vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0, "fail_at": 0.47}},
        settings_overrides={
            "VENDOR_COOLDOWN_S": 2,
            "PROCURE_PAYMENT_WINDOW_S": 15,
            "PROCURE_PAYMENT_MARGIN_S": 0,
            "PROCURE_FIRST_SLICE_FRACTION": 1.0,
        },
    ) as w:
        yield w


def test_the_wait_is_visible_and_the_return_explained(world: World, tmp_path: Path) -> None:
    run_id = world.new_run(budget=10.0)
    deps = world.deps()
    deps.vendors = _RefusesAfterSigning(deps.vendors, "gpu_vendor_2")  # type: ignore[assignment]
    mock_v1 = world.vendor_servers["gpu_vendor_1"].app.state.config
    outcome: dict[str, Any] = {}

    async def run_story() -> None:
        from procure.agent.tick import tick

        outcome["first"] = (await tick(deps, run_id)).message  # vendor 1, doomed at 47%
        mock_v1.fail_rate = 0.0  # its later jobs run to the end
        outcome["messages"] = await drive(deps, run_id, limit_s=120)

    def in_thread() -> None:
        try:
            asyncio.run(run_story())
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    with chromium() as browser, dashboard(world) as server:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.set_default_timeout(30_000)
        errors = console_errors(page)
        page.goto(f"{server.url}/runs/{run_id}")
        page.wait_for_selector("#live-state:text('live')")
        story = threading.Thread(target=in_thread, daemon=True)
        story.start()
        # The wait arrives live, with what it waits for and when it is next looked at.
        banner = page.wait_for_selector(".banner.doubt:has-text('in doubt')")
        assert banner is not None
        text = " ".join(banner.inner_text().split())
        assert "Payment in doubt since" in text and "waiting for reconciliation" in text
        assert "next check" in text and "to gpu_vendor_2" in text
        assert "settlement failed at the vendor (test)" in text
        assert "authorisation expires unused at" in text
        page.screenshot(path=str(screenshot_dir(tmp_path) / "run-payment-in-doubt.png"))
        # ... and goes once the authorisation expired unused and the run moved on.
        page.wait_for_selector(".banner.doubt", state="detached", timeout=90_000)
        story.join(timeout=120)
        page.wait_for_selector("#run-status:text('completed')", timeout=60_000)
        page.screenshot(path=str(screenshot_dir(tmp_path) / "run-returned.png"), full_page=True)
        page.goto("about:blank")  # closes the stream
        assert errors == []
    assert "error" not in outcome, outcome.get("error")

    state = state_of(world, run_id)
    assert state.run.status == "completed"
    assert [(j.vendor_id, j.status) for j in state.jobs] == [
        ("gpu_vendor_1", "failed"),
        ("gpu_vendor_2", "failed"),
        ("gpu_vendor_1", "completed"),
    ]
    crashed = state.jobs[0]
    said = [o.content for o in state.observations if o.type == ObservationType.agent_reasoning]
    returns = [c for c in said if c.startswith("Returns to gpu_vendor_1")]
    assert len(returns) == 1
    assert (
        f"failed job {crashed.vendor_job_id} at 47% (Vendor crashed at 47% progress)"
        in (returns[0])
    )
    assert "its cool-down ended at" in returns[0] and "still the cheapest by $0.70/h" in returns[0]
    # No money went to vendor 2: its authorisation expired unused.
    assert [p.status for p in state.payments if p.vendor_id == "gpu_vendor_2"] == ["failed"]
