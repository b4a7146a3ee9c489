"""The dashboard in a real browser (Debian's Chromium via Playwright) over a real server and the
test world (facilitator + two mock vendors; vendor 1 fails at 47%): the runs list and its
filter, a run's timeline, payments and charts, live updates, cancel, and the start form."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procure.models import JobSpec, ObservationType, PaymentStatus, format_usd
from procure.store import repo
from web_browser import chromium, console_errors, dashboard, drive_run, screenshot_dir
from world import World, state_of


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: the browser adds nothing backend-specific, and keeps these tests short."""
    return sqlite_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context per test; no script errors or unexpected console errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(15_000)
    errors = console_errors(p)
    yield p
    context.close()
    assert errors == []


def _run(world: World, goal: str, **spec: Any) -> str:
    with world.store.session() as s:
        return repo.create_run(
            s, user_id="ops", goal=goal, budget_total=5_000_000, job_spec=JobSpec(**spec)
        ).id


def test_runs_page_lists_newest_first_and_filters_by_status(
    world: World, page: Any, tmp_path: Path
) -> None:
    older = _run(world, "Older run")
    newer = _run(world, "Newer run")
    with world.store.session() as s:
        repo.update_run(s, older, status="failed", status_reason="test")
    with dashboard(world) as server:
        page.goto(server.url + "/")
        rows = page.locator("table.runs tbody tr")
        assert rows.count() == 2
        assert rows.nth(0).get_attribute("data-run") == newer  # newest first
        assert "Newer run" in rows.nth(0).inner_text()
        page.screenshot(path=str(screenshot_dir(tmp_path) / "runs-page.png"), full_page=True)
        page.get_by_role("link", name=re.compile(r"^failed \(1\)")).click()
        page.wait_for_url(re.compile(r"/\?status=failed$"))
        assert page.locator("table.runs tbody tr").count() == 1
        assert page.locator(f'tr[data-run="{older}"] .pill').inner_text() == "failed"
        page.goto(server.url + "/?status=cancelled")
        assert "No runs cancelled yet" in page.locator("main").inner_text()


def test_run_page_tells_the_recovery_story(world: World, page: Any, tmp_path: Path) -> None:
    run_id = world.new_run()
    drive_run(world, run_id)  # vendor 1 fails at 47%, the agent resumes on vendor 2
    state = state_of(world, run_id)
    settled = [p for p in state.payments if p.status == PaymentStatus.completed]
    assert len(settled) == 2
    with dashboard(world) as server:
        page.goto(f"{server.url}/runs/{run_id}")
        # Payments, each with its transaction hash; spent to date is their sum.
        hashes = page.locator("#payments code.tx").all_inner_texts()
        assert hashes == [p.x402_tx_id for p in settled]
        assert all(h.startswith("0x") for h in hashes)
        spent = sum(p.amount for p in settled)
        assert page.locator("#run-spent").inner_text() == format_usd(spent)
        # The timeline tells errors, payments and reasoning apart.
        timeline = page.locator("#timeline")
        assert timeline.locator("li.obs.error").count() >= 1
        assert timeline.locator("li.obs.payment").count() >= 2
        assert timeline.locator("li.obs.reasoning").count() >= 1
        # Both jobs, the failed one with its error; both charts drawn by the server as SVG.
        assert page.locator("#jobs tbody tr").count() == 2
        assert page.locator("#jobs .pill.status-failed").count() == 1
        assert page.locator("#burn svg.chart circle.pay").count() == 2
        assert page.locator("#burn svg .budget").count() == 1
        assert page.locator("#progress-chart svg.chart g.job").count() == 2
        assert page.locator("#run-status").inner_text() == "completed"
        assert page.locator("#cancel").count() == 0  # nothing to cancel once it ended
        where = screenshot_dir(tmp_path)
        page.screenshot(path=str(where / "run-page.png"), full_page=True)
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=str(where / "run-page-dark.png"))
        page.emulate_media(color_scheme="light")
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.screenshot(path=str(where / "run-page-phone.png"), full_page=True)
        page.goto(server.url + "/vendors")
        page.screenshot(path=str(where / "vendors-page.png"), full_page=True)
        # The wallet's on-chain balance, from the facilitator: the funding less what was paid.
        assert page.locator("#wallet-balance").inner_text() == format_usd(100_000_000 - spent)
        assert page.locator("#wallet-address").inner_text().startswith("0x")
        failed = page.locator('tr[data-vendor="gpu_vendor_1"]').inner_text()
        assert "FastGPU" in failed and "A100" in failed


def test_run_page_updates_live(world: World, page: Any) -> None:
    run_id = _run(world, "Live run")
    with dashboard(world) as server:
        page.goto(f"{server.url}/runs/{run_id}")
        page.wait_for_selector("#live-state:text('live')")
        with world.store.session() as s:  # what a tick elsewhere would write
            repo.add_observation(s, run_id, ObservationType.error, "vendor down: live test")
            repo.update_run(s, run_id, progress=0.5)
        page.wait_for_selector("#timeline li.obs.error:has-text('vendor down: live test')")
        page.wait_for_selector("#summary:has-text('50%')")
        assert page.locator("#timeline li.obs").count() == 1  # not repeated, no reload
        page.goto("about:blank")  # closes the stream, so the server stops at once


def test_cancel_asks_then_cancels_the_run(world: World, page: Any) -> None:
    run_id = _run(world, "Run to cancel")
    with dashboard(world) as server:
        page.goto(f"{server.url}/runs/{run_id}")
        page.once("dialog", lambda d: d.dismiss())
        page.locator("#cancel").click()
        assert page.locator("#run-status").inner_text() == "running"  # said no: nothing sent
        asked: list[str] = []

        def accept(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        page.locator("#cancel").click()
        page.wait_for_url(re.compile(r"notice=cancelled$"))
        assert "Cancel this run?" in asked[0]
        assert page.locator("#run-status").inner_text() == "cancelled"
        assert "Run cancelled." in page.locator("main").inner_text()
    run = state_of(world, run_id).run
    assert run.status == "cancelled"
    assert run.cancel_reason and "dashboard" in run.cancel_reason


def test_start_form_validates_and_starts_a_run(world: World, page: Any, tmp_path: Path) -> None:
    with dashboard(world) as server:
        page.goto(server.url + "/runs/new")
        page.screenshot(path=str(screenshot_dir(tmp_path) / "start-form.png"), full_page=True)
        first = page.locator("#first-payment").inner_text()
        assert "cancelled a moment later has already spent it" in first and "$2.10" in first
        page.fill("textarea[name=goal]", "Train from the dashboard")
        page.fill("input[name=budgetTotal]", "lots")
        page.fill("input[name=hours]", "0")
        page.click("#start")
        errors = page.locator("#form-errors").inner_text()
        assert "Budget (US dollars)" in errors and "GPU hours" in errors  # the form's labels
        assert "budgetTotal" not in errors
        assert "at least 1 minute (0.0167 hours)" in errors and "0.01666" not in errors
        page.screenshot(path=str(screenshot_dir(tmp_path) / "start-form-errors.png"))
        # What was typed is kept; fix it and start.
        assert page.input_value("textarea[name=goal]") == "Train from the dashboard"
        page.fill("input[name=budgetTotal]", "7.5")
        page.fill("input[name=hours]", "2")
        page.fill("input[name=deadlineHours]", "24")
        page.fill("input[name=gpuType]", "H100")
        page.click("#start")
        page.wait_for_url(re.compile(r"/runs/[0-9a-f]{24}$"))
        run_id = page.url.rsplit("/", 1)[1]
        page.goto("about:blank")  # closes the run page's stream
    run = state_of(world, run_id).run
    assert (run.goal, run.budget_total, run.job_spec.gpu_type, run.job_spec.hours) == (
        "Train from the dashboard",
        7_500_000,
        "H100",
        2.0,
    )
    assert run.deadline is not None and run.user_id == "dashboard"


def test_recovery_story_appears_live(world: World, page: Any, tmp_path: Path) -> None:
    """The page is open before the run's first tick; the run is ticked elsewhere (as a worker
    would); the failure, the switch, both payments with their hashes and spent to date arrive
    over the event stream, with no reload."""
    run_id = world.new_run()
    with dashboard(world) as server:
        page.goto(f"{server.url}/runs/{run_id}")
        page.wait_for_selector("#live-state:text('live')")
        assert page.locator("#payments").inner_text() == "No payment yet."
        page.evaluate("window.__sameDocument = true")  # lost on any reload or navigation
        drive_run(world, run_id)  # vendor 1 fails at 47%, the agent resumes on vendor 2
        page.wait_for_selector("#run-status:text('completed')")
        page.wait_for_selector("#live-state:text('ended')")
        assert page.evaluate("window.__sameDocument") is True
        settled = [p for p in state_of(world, run_id).payments if p.status == "completed"]
        assert len(settled) == 2
        hashes = page.locator("#payments code.tx").all_inner_texts()
        assert hashes == [p.x402_tx_id for p in settled]
        assert page.locator("#run-spent").inner_text() == format_usd(sum(p.amount for p in settled))
        jobs = page.locator("#jobs tbody tr").all_inner_texts()
        assert "gpu_vendor_1" in jobs[0] and "failed" in jobs[0]  # the failure ...
        assert "gpu_vendor_2" in jobs[1] and "completed" in jobs[1]  # ... and the switch
        timeline = page.locator("#timeline")
        assert timeline.locator("li.obs.error").count() >= 1
        assert timeline.locator("li.obs.payment").count() >= 2
        ids = timeline.locator("li.obs").evaluate_all("els => els.map(e => e.dataset.id)")
        assert len(ids) == len(set(ids))  # each observation once
        assert page.locator("#cancel").count() == 0  # removed once the run ended
        page.screenshot(path=str(screenshot_dir(tmp_path) / "run-live.png"), full_page=True)
