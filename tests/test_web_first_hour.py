"""The run page as a newcomer reads it (issue 21), in a real browser: multi-line reasoning on
several lines, a completed job's event in words (not a Python dict), the timeline's scroll box
showing the completion, a job's Cost beside what was Paid, explained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procure.models import ObservationType, PaymentStatus, format_usd
from web_browser import chromium, console_errors, dashboard, drive_run, screenshot_dir
from world import World, state_of


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url  # the browser adds nothing backend-specific


@pytest.fixture
def page() -> Iterator[Any]:
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        p = context.new_page()
        p.set_default_timeout(15_000)
        errors = console_errors(p)
        yield p
        context.close()
    assert errors == []


def test_run_page_reads_well(world: World, page: Any, tmp_path: Path) -> None:
    run_id = world.new_run()
    drive_run(world, run_id)  # vendor 1 fails at 47%, vendor 2 completes
    state = state_of(world, run_id)
    reasoning = [o for o in state.observations if o.type == ObservationType.agent_reasoning]
    assert any("\n" in o.content for o in reasoning)
    with dashboard(world) as server:
        page.goto(f"{server.url}/runs/{run_id}")
        timeline = page.locator("#timeline")
        # Multi-line reasoning keeps its lines
        multi = timeline.locator("li.obs.reasoning .text").filter(has_text="Budget remaining")
        box = multi.first.bounding_box()
        line = float(multi.first.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)"))
        assert box is not None and box["height"] > 1.5 * line
        # A completed job's event says its metrics in words
        done = timeline.locator("li.obs.job .text").filter(has_text="completed at").first
        text = done.inner_text()
        assert "{" not in text and "'" not in text and "loss" in text.lower()
        # The scroll box shows its newest events, the completion among them
        end = timeline.evaluate("t => t.scrollHeight - t.scrollTop - t.clientHeight")
        assert end < 2
        assert done.is_visible()
        # Cost and Paid side by side, and what they mean
        paid = [
            sum(
                p.amount
                for p in state.payments
                if p.job_id == j.id and p.status == PaymentStatus.completed
            )
            for j in state.jobs
        ]
        cells = page.locator("#jobs tbody tr td:nth-child(6)").all_inner_texts()
        assert cells == [format_usd(p) for p in paid]
        assert "Spent to date is the sum of Paid" in page.locator("#cost-note").inner_text()
        # Both charts' value axes have intermediate ticks: $5.00 budget, so $1.25, $2.50, ...
        burn_ticks = page.locator("#burn svg text.y-tick").all_text_contents()
        assert burn_ticks == ["$1.25", "$2.50", "$3.75"]
        progress_ticks = page.locator("#progress-chart svg text.y-tick").all_text_contents()
        assert progress_ticks == ["25%", "50%", "75%"]
        page.locator("#burn").screenshot(path=str(screenshot_dir(tmp_path) / "burn-ticks.png"))
        # A checkpoint URL cut to fit shows whole on focus (keyboard) or hover
        url = page.locator("#jobs code.hash.url").first
        whole = url.get_attribute("title") or ""
        assert url.evaluate("e => e.scrollWidth > e.clientWidth")  # cut at rest
        url.focus()
        assert url.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
        assert url.inner_text() == whole and whole.startswith("https://")
        where = screenshot_dir(tmp_path)
        page.locator("#jobs").screenshot(path=str(where / "checkpoint-url-focused.png"))
        done.scroll_into_view_if_needed()
        page.screenshot(path=str(where / "run-page-first-hour.png"), full_page=True)


def test_a_long_run_has_time_ticks_between_start_and_end() -> None:
    from datetime import UTC, datetime, timedelta

    from procure.web import charts

    start = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    svg = str(charts.progress([], start, start + timedelta(hours=2)))
    assert [t in svg for t in ("10:30:00", "11:00:00", "11:30:00")] == [True] * 3


def test_a_jobs_label_near_the_axis_stays_inside_its_chart(page: Any) -> None:
    """A job that got nowhere early in the run has its point at the left axis: its label is
    drawn to the point's right, never cut off at the chart's edge (in a real browser)."""
    from datetime import UTC, datetime, timedelta

    from procure.models import Job
    from procure.web import charts

    start = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    early = Job.model_validate(
        {
            "_id": "j1",
            "runId": "r1",
            "vendorId": "gpu_vendor_with_a_long_name",
            "status": "failed",
            "progress": 0.02,
            "expectedCost": 1,
            "idempotencyKey": "job-j1",
            "createdAt": start,
            "updatedAt": start + timedelta(seconds=5),
            "completedAt": start + timedelta(seconds=5),
        }
    )
    chart = charts.progress([early], start, start + timedelta(hours=1))
    page.set_content(f"<body style='margin:0'>{chart}</body>")
    svg = page.locator("svg").bounding_box()
    label = page.locator("svg g.job text").bounding_box()
    assert label["x"] >= svg["x"] and label["x"] + label["width"] <= svg["x"] + svg["width"]
