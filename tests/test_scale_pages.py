"""Keyset pages over HTTP: `/api/runs`, `/api/payments`, `/api/fleet/actions` and a run's
observations give their next page in a `Link: <...>; rel="next"` header until the last, and
walking them visits every row once, ties in creation time included; the dashboard pages by
cursor (newest, older, newer, oldest); a forged cursor is a 400, never a 500."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.models import JobSpec, ObservationType, utcnow
from procure.settings import Settings
from procure.store import fleet_repo, open_store, repo
from procure.store.tables import JobRow, PaymentRow, RunRow

RUNS = 61


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[tuple[LocalServer, str]]:
    store = open_store(db_url)
    now = utcnow()
    with store.session() as s:
        # Runs three to a timestamp: the cursor's id breaks the ties.
        for n in range(RUNS):
            at = now - timedelta(seconds=n // 3)
            s.add(
                RunRow(
                    id=f"run{n:04d}",
                    user_id="u",
                    goal=f"goal {n}",
                    status="completed" if n % 2 else "running",
                    budget_total=1_000_000,
                    budget_remaining=1_000_000,
                    job_spec=JobSpec().model_dump(),
                    created_at=at,
                    updated_at=at,
                )
            )
            s.flush()
            s.add(
                JobRow(
                    id=f"job{n:04d}",
                    run_id=f"run{n:04d}",
                    vendor_id="v1",
                    status="completed",
                    expected_cost=1,
                    job_params={},
                    idempotency_key=f"key{n}",
                    created_at=at,
                    updated_at=at,
                )
            )
            s.flush()
            s.add(
                PaymentRow(
                    id=f"pay{n:04d}",
                    run_id=f"run{n:04d}",
                    job_id=f"job{n:04d}",
                    vendor_id="v1",
                    amount=10,
                    currency="USDC",
                    status="completed",
                    nonce=f"0x{n:064x}",
                    created_at=at,
                    updated_at=at,
                )
            )
        for n in range(7):
            repo.add_observation(s, "run0000", ObservationType.agent_reasoning, f"thought {n}")
        for n in range(9):
            fleet_repo.add_action(
                s,
                action_id=f"act{n}",
                action_type="provision",
                reason="busy",
                status="completed",
                created_at=now - timedelta(minutes=n // 2),
            )
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path / "home")
    running = serve(create_app(settings, store))
    yield running, running.url
    running.stop()
    store.dispose()


def _next(answer: httpx.Response) -> str | None:
    link = answer.headers.get("link")
    if link is None:
        return None
    found = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert found, link
    return found.group(1)


def _walk(url: str) -> list[list[Any]]:
    pages = []
    next_url: str | None = url
    while next_url:
        answer = httpx.get(next_url, timeout=30)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        next_url = _next(answer)
    return pages


def test_api_lists_page_by_link_header(server: tuple[LocalServer, str]) -> None:
    _, base = server
    pages = _walk(f"{base}/api/runs?limit=10")
    ids = [r["_id"] for page in pages for r in page]
    assert len(pages) == 7 and [len(p) for p in pages[:-1]] == [10] * 6
    assert sorted(ids) == [f"run{n:04d}" for n in range(RUNS)]  # every run once
    created = [r["createdAt"] for page in pages for r in page]
    assert created == sorted(created, reverse=True)  # newest first

    completed = _walk(f"{base}/api/runs?limit=7&status=completed")
    assert {r["status"] for p in completed for r in p} == {"completed"}
    assert sum(len(p) for p in completed) == RUNS // 2

    payments = _walk(f"{base}/api/payments?limit=25")
    assert sorted(p["_id"] if "_id" in p else p["id"] for page in payments for p in page) == [
        f"pay{n:04d}" for n in range(RUNS)
    ]
    assert [len(p) for p in payments] == [25, 25, 11]

    actions = _walk(f"{base}/api/fleet/actions?limit=4")
    assert sorted(a["action_id"] for page in actions for a in page) == [f"act{n}" for n in range(9)]

    one = httpx.get(f"{base}/api/runs/run0000?observationsLimit=3", timeout=30)
    assert one.status_code == 200 and len(one.json()["observations"]) == 3
    shown = [o["content"] for o in one.json()["observations"]]
    next_url = _next(one)
    while next_url:
        answer = httpx.get(next_url, timeout=30)
        shown += [o["content"] for o in answer.json()["observations"]]
        next_url = _next(answer)
    assert shown == [f"thought {n}" for n in range(7)]

    last = httpx.get(f"{base}/api/runs?limit=500", timeout=30)
    assert len(last.json()) == RUNS and "link" not in last.headers


FORGED = ["garbage", "W10", "WyIyMDI2IiwxXQ", "x" * 600, "\x00", "WyJ0b2RheSIsImEiXQ", "e30"]


def test_a_forged_cursor_is_refused(server: tuple[LocalServer, str]) -> None:
    _, base = server
    for cursor in FORGED:
        for path in ("/api/runs", "/api/payments", "/api/fleet/actions"):
            answer = httpx.get(f"{base}{path}", params={"cursor": cursor}, timeout=30)
            assert answer.status_code in (400, 422), (cursor, answer.text)
            assert "error" in answer.json()
        page = httpx.get(f"{base}/", params={"before": cursor}, timeout=30)
        assert page.status_code in (400, 422), cursor


def _rows(html: str) -> list[str]:
    return re.findall(r'data-run="([^"]+)"', html)


def _link(html: str, rel: str) -> str | None:
    found = re.search(rf'<a href="([^"]+)" rel="{rel}">', html)
    return found.group(1).replace("&amp;", "&") if found else None


def test_dashboard_pages_by_cursor(server: tuple[LocalServer, str]) -> None:
    _, base = server
    first = httpx.get(f"{base}/", timeout=30).text
    assert _rows(first)[:3] == ["run0002", "run0001", "run0000"]  # newest first, ties by id
    assert _link(first, "prev") is None and f"of {RUNS} runs" in first
    seen, html = list(_rows(first)), first
    while (older := _link(html, "next")) is not None:
        html = httpx.get(base + older, timeout=30).text
        seen += _rows(html)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == RUNS  # each run once
    newer = _link(html, "prev")
    assert newer is not None
    back = httpx.get(base + newer, timeout=30).text
    assert _rows(back) == seen[-len(_rows(html)) - 25 : -len(_rows(html))]
    oldest = httpx.get(base + str(_link(first, "last")), timeout=30).text
    assert _rows(oldest) == seen[-25:] and _link(oldest, "next") is None
    running = httpx.get(f"{base}/?status=running", timeout=30).text
    assert f"of {RUNS - RUNS // 2} runs" in running
