"""A local world for tests: facilitator on a real chain, mock vendors and a store, on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from procure.agent.runtime import make_deps
from procure.agent.tick import AgentDeps
from procure.local import (
    LocalServer,
    mock_vendor_config,
    start_facilitator,
    start_mock_vendor,
    stop_all,
)
from procure.models import (
    Action,
    Job,
    JobSpec,
    JobStatus,
    RunState,
    Vendor,
    usd_to_micros,
    utcnow,
)
from procure.payments.chain import LocalChain
from procure.payments.wallet import load_or_create_account
from procure.settings import Settings
from procure.store import Store, open_store, repo
from procure.vendors.credentials import Keyring
from procure.vendors.registry import default_vendors
from stores import POSTGRES_ENV, postgres_database  # noqa: F401 (tests import them from here)

SECRET = "test-vendor-secret"


@dataclass
class World:
    tmp: Path
    settings: Settings
    store: Store
    chain: LocalChain
    facilitator: LocalServer
    vendor_servers: dict[str, LocalServer]
    vendors: dict[str, Vendor]
    servers: list[LocalServer] = field(default_factory=list)

    def deps(self, **kwargs: Any) -> AgentDeps:
        return make_deps(self.settings, self.store, **kwargs)

    def faults(self, vendor_id: str, **faults: Any) -> None:
        """Change a mock vendor's injected faults at run time, over its admin endpoint."""
        response = httpx.post(
            f"{self.vendor_servers[vendor_id].url}/admin/faults",
            json=faults,
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        response.raise_for_status()

    def stats(self, vendor_id: str) -> dict[str, Any]:
        """A mock vendor's idempotency figures: submissions, paid starts, replays (and per key)."""
        response = httpx.get(
            f"{self.vendor_servers[vendor_id].url}/admin/stats",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        response.raise_for_status()
        return dict(response.json())

    def new_run(self, budget: float = 5.0, **spec: Any) -> str:
        from procure.models import JobSpec

        with self.store.session() as s:
            return repo.create_run(
                s,
                user_id="u1",
                goal="Fine-tune",
                budget_total=usd_to_micros(budget),
                job_spec=JobSpec(**spec),
            ).id

    def stop(self) -> None:
        stop_all(list(reversed(self.servers)))
        self.store.dispose()


def start_world(
    tmp: Path,
    db_url: str,
    *,
    vendor_overrides: dict[str, dict[str, Any]] | None = None,
    fund_usd: float = 100.0,
    job_seconds: float = 0.6,
    settings_overrides: dict[str, Any] | None = None,
) -> World:
    """Facilitator + the seeds' two vendors (+ overrides per vendor id) + seeded store."""
    facilitator = start_facilitator(tmp / "chain-journal.jsonl")
    chain: LocalChain = facilitator.app.state.chain
    servers = [facilitator]
    try:
        env: dict[str, Any] = {
            "PROCURE_DATABASE_URL": db_url,
            "PROCURE_HOME": tmp / "home",
            "GPU_VENDOR_SECRET": SECRET,
            "X402_FACILITATOR_URL": facilitator.url,
            # Long enough for a loopback vendor on a loaded 2-core machine (2 s was not).
            "VENDOR_TIMEOUT_S": 6.0,
            # The seeds' stories with their exact payments; tests/test_first_slice.py has the probe.
            "PROCURE_FIRST_SLICE_FRACTION": 1.0,
            **(settings_overrides or {}),
        }
        settings = Settings(**env)
        store = open_store(db_url)
        vendors, vendor_servers = {}, {}
        # The seeds' vendors share the mock vendors' secret, stored encrypted with the key
        # every process of this world uses (PROCURE_HOME's secret.key).
        credential = Keyring.load(settings.home).encrypt(SECRET)
        for vendor in default_vendors(
            network=chain.network, asset=chain.token_address, credential=credential
        ):
            overrides = {
                "job_seconds": job_seconds,
                **(vendor_overrides or {}).get(vendor.vendor_id, {}),
            }
            cfg = mock_vendor_config(vendor, facilitator.url, SECRET, **overrides)
            server = start_mock_vendor(cfg, facilitator.url)
            servers.append(server)
            vendor.endpoint = server.url
            vendors[vendor.vendor_id] = vendor
            vendor_servers[vendor.vendor_id] = server
        with store.session() as s:
            for vendor in vendors.values():
                repo.save_vendor(s, vendor)
        account = load_or_create_account(None, settings.home)
        if fund_usd:
            chain.mint(account.address, usd_to_micros(fund_usd))
        return World(tmp, settings, store, chain, facilitator, vendor_servers, vendors, servers)
    except BaseException:
        stop_all(list(reversed(servers)))
        raise


@contextmanager
def running_world(tmp: Path, db_url: str, **kwargs: Any) -> Iterator[World]:
    """`start_world(tmp, db_url, **kwargs)` for the length of a `with` block (a test module's own
    `world` fixture), stopped after it whatever happened in it."""
    world = start_world(tmp, db_url, **kwargs)
    try:
        yield world
    finally:
        world.stop()


TERMINAL = {"completed", "failed", "aborted", "cancelled"}


async def drive(deps: AgentDeps, run_id: str, limit_s: float = 60) -> list[str]:
    """Tick a run until it ends; return the tick messages. Closes `deps`.

    The time limit is a safety net against a hung test, not an assertion about speed.
    """
    import asyncio
    import time

    from procure.agent.runtime import close_deps
    from procure.agent.tick import tick

    messages: list[str] = []
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            messages.append((await tick(deps, run_id)).message)
            with deps.store.session() as s:
                run = repo.get_run(s, run_id)
            assert run is not None
            if run.status in TERMINAL:
                return messages
            await asyncio.sleep(0.05)
    finally:
        await close_deps(deps)
    raise AssertionError(f"run did not finish: {messages[-5:]}")


def in_slices(ctx: Any, vendor_id: str, slice_hours: float = 0.25) -> Action:
    """What a test's planner does to buy the run's remaining hours at `vendor_id` in slices."""
    return Action(
        action="start_job",
        vendor_id=vendor_id,
        hours=ctx.remaining_hours,
        slice_hours=slice_hours,
        reason=f"{vendor_id} in slices of {slice_hours:g}h",
    )


def state_of(world: World, run_id: str) -> RunState:
    """The run's whole state, as the status endpoint shows it."""
    with world.store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    return state


def seen_starting(
    world: World, vendor_id: str, startup: timedelta, times: int, ran: timedelta
) -> None:
    """`times` earlier jobs at `vendor_id`, completed in an ended run, each seen starting
    `startup` after it was paid for and running `ran`, as the poll leaves their rows."""
    with world.store.session() as s:
        earlier = repo.create_run(
            s, user_id="u0", goal="earlier", budget_total=usd_to_micros(10), job_spec=JobSpec()
        )
        for i in range(times):
            paid = utcnow() - timedelta(hours=3 + i)
            repo.insert_job(
                s,
                Job(
                    _id=f"earlier-{vendor_id}-{i}",
                    run_id=earlier.id,
                    vendor_id=vendor_id,
                    status=JobStatus.completed,
                    expected_cost=usd_to_micros(2),
                    job_params={"hours": 1.0, "totalHours": 1.0},
                    idempotency_key=f"earlier-{vendor_id}-{i}",
                    progress=1.0,
                    started_at=paid + startup,
                    created_at=paid,
                    updated_at=paid,
                    completed_at=paid + startup + ran,
                ),
            )
        repo.update_run(s, earlier.id, status="completed", progress=1.0)


def procure_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the `procure` command as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "procure.cli", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


def rewriting(inner: ASGIApp, rewrite: Rewrite, path: str = "/job-status") -> ASGIApp:
    """`inner` with every successful answer on `path` passed through `rewrite`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != path:
            return await inner(scope, receive, send)
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            out = bytes(body)
            if start["status"] == 200:
                out = json.dumps(rewrite(json.loads(out))).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(out)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": out})

        await inner(scope, receive, capture)

    return app
