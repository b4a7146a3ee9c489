"""Second looks at the outbox and the fleet's figures: a hanging git mirror holds Slack up for
seconds only, a warning another process retries is not dropped for want of a URL, failures are
counted by kind, and Prometheus figures are told apart on an IP the account's instances share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import select, update

from fleet_fakes import FakeCloud
from fleet_world import fleet
from procure import warnings
from procure.fleet import outbox
from procure.fleet.controller import scan_once
from procure.httpbounds import bounded_client
from procure.local import free_port, serve
from procure.models import utcnow
from procure.store import fleet_repo, open_store
from procure.store.fleet_tables import OutboxRow
from test_fleet_prometheus import MockPrometheus, mock_prometheus


def _receiver() -> tuple[FastAPI, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> PlainTextResponse:
        got.append(await request.json())
        return PlainTextResponse("ok")

    return app, got


async def _until(condition: Any, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_a_hanging_git_mirror_holds_slack_up_for_seconds_only(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the audit's git mirror is "best effort", yet `_run` waits on git with no
    deadline inside the outbox loop: a git that hangs (a pre-commit hook, a gpg passphrase prompt)
    stops every Slack message (approval requests included) for as long as it hangs, i.e. for
    good."""
    # The hung git is killed after outbox.GIT_S; 2 s of it instead of 10 s shows the same.
    monkeypatch.setattr(outbox, "GIT_S", 2.0)
    git_dir, pids = tmp_path / "audit-git", tmp_path / "hook.pids"
    subprocess.run(["git", "init", "-q", str(git_dir)], check=True)
    hook = git_dir / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 120\n")
    hook.chmod(0o755)
    app, got = _receiver()
    server = serve(app)
    store = open_store(sqlite_url)
    now = utcnow()
    with store.session() as s:
        entry = {"action": {"id": "a-1", "type": "terminate_instance", "status": "executed"}}
        fleet_repo.enqueue(s, "audit", {"timestamp": "2026-01-01T00:00:00Z", **entry}, now)
        fleet_repo.enqueue(s, "slack", {"text": "Approve a-2?"}, now)

    async def body() -> bool:
        async with bounded_client(deadline_s=5) as client:
            task = asyncio.create_task(
                outbox.run_outbox(
                    store, client, f"{server.url}/hook", tmp_path / "audit.jsonl", git_dir, 0.05
                )
            )
            try:
                return await _until(lambda: bool(got), 25)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        delivered = asyncio.run(body())
        audit = (tmp_path / "audit.jsonl").read_text()
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        store.dispose()
        server.stop()
    assert '"a-1"' in audit  # the trail itself was written first
    assert delivered, "the Slack message never left while git hung on the audit mirror"


def test_a_warning_another_process_is_retrying_is_not_dropped_for_want_of_a_url(
    sqlite_url: str,
) -> None:
    """Before the fix: `procure serve` without the webhook's URL drops every due warning older than
    a day as "no destination configured", even one that `procure fleet run` (which has the URL) is
    retrying through a day-long outage of the receiver: when the receiver is back, the warning is
    gone, for a reason that is false."""
    store = open_store(sqlite_url)
    app, got = _receiver()
    now = utcnow()
    with store.session() as s:
        warning = {"event": "budget_warning", "text": "80 %"}
        fleet_repo.enqueue(s, warnings.WEBHOOK, warning, now - timedelta(days=2))

    async def body() -> int:
        async with bounded_client(deadline_s=5) as client:
            # The configured process tried while the receiver was down: it backs off.
            dead = f"http://127.0.0.1:{free_port()}/hook"
            assert await warnings.deliver(store, client, warnings.WEBHOOK, dead) == 0
            with store.session() as s:  # ... and the backoff has passed
                s.execute(update(OutboxRow).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
            # The unconfigured process's pass comes first this time.
            await warnings.deliver(store, client, warnings.WEBHOOK, None)
            server = serve(app)  # the receiver is back
            try:
                return await warnings.deliver(store, client, warnings.WEBHOOK, f"{server.url}/hook")
            finally:
                server.stop()

    try:
        delivered = asyncio.run(body())
        with store.session() as s:
            (row,) = s.scalars(select(OutboxRow)).all()
            error = row.last_error
    finally:
        store.dispose()
    assert delivered == 1 and got, f"the warning never reached the receiver ({error})"


def test_prometheus_never_merges_the_gpus_of_another_instance_on_the_same_ip(
    sqlite_url: str,
) -> None:
    """Before the fix: series are taken by IP when it is "unique", but uniqueness is judged only
    among the fleet's readable instances: an agent's job instance (`procure-job-…`, filtered out of
    the fleet) on the same host IP has its GPUs averaged into the fleet instance's figures, so a
    busy neighbour makes an idle instance look busy (or the reverse) to the policy."""
    state = MockPrometheus()
    prom = serve(mock_prometheus(state))

    async def body() -> Any:
        cloud = FakeCloud()
        ours = cloud.add(util=5)
        theirs = cloud.add(util=5, name="procure-job-r1-j1")
        ip = cloud.instances_[ours].ip
        cloud.instances_[theirs] = replace(cloud.instances_[theirs], ip=ip)
        state.gpu("DCGM_FI_DEV_GPU_UTIL", f"{ip}:40001", "0", 10)  # our exporter
        state.gpu("DCGM_FI_DEV_GPU_UTIL", f"{ip}:40002", "0", 90)  # the job's exporter
        async with fleet(sqlite_url, cloud, prometheus_url=prom.url) as ctx:
            result = await scan_once(ctx)
            (view,) = [v for v in result.views if v.id == ours]
            return view.latest

    try:
        latest = asyncio.run(body())
    finally:
        prom.stop()
    assert latest is not None
    # Either its own figure, or "cannot tell" (unreachable, saying why): never a blend.
    assert not latest.reachable or latest.gpu_util == 10, (
        f"the fleet instance reads {latest.gpu_util} % GPU: its 10 % averaged with the "
        "neighbouring job's 90 %"
    )


def test_a_warning_survives_the_first_5xx_after_an_outage_of_its_receiver(
    sqlite_url: str,
) -> None:
    """Before the fix: `outbox.deliver` drops a message on a 5xx once its *attempts* reach
    MAX_SERVER_ERROR_TRIES, but attempts count every try (no answer, 429): after about 7 hours of a
    receiver that is down, the one 502 its proxy answers while it starts drops the warning for good,
    though the receiver never failed on it before and takes it a second later."""
    store = open_store(sqlite_url)
    got: list[dict[str, Any]] = []
    answers = [502]  # the receiver's proxy, while the receiver starts
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> PlainTextResponse:
        if answers:
            return PlainTextResponse("Bad Gateway", status_code=answers.pop(0))
        got.append(await request.json())
        return PlainTextResponse("ok")

    with store.session() as s:
        warning = {"event": "budget_warning", "text": "80 %"}
        fleet_repo.enqueue(s, warnings.WEBHOOK, warning, utcnow())

    def backoff_passes() -> None:
        with store.session() as s:
            s.execute(update(OutboxRow).values(next_attempt_at=utcnow() - timedelta(seconds=1)))

    async def body() -> None:
        async with bounded_client(deadline_s=5) as client:
            dead = f"http://127.0.0.1:{free_port()}/hook"
            for _ in range(outbox.MAX_SERVER_ERROR_TRIES - 1):  # the receiver is down for hours
                assert await warnings.deliver(store, client, warnings.WEBHOOK, dead) == 0
                backoff_passes()
            server = serve(app)
            try:
                for _ in range(3):  # its proxy answers 502 once, then the receiver takes it
                    await warnings.deliver(store, client, warnings.WEBHOOK, f"{server.url}/hook")
                    backoff_passes()
            finally:
                server.stop()

    try:
        asyncio.run(body())
        with store.session() as s:
            (row,) = s.scalars(select(OutboxRow)).all()
            error = row.last_error
    finally:
        store.dispose()
    assert got, f"the warning never reached its receiver ({error})"
