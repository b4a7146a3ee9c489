"""The agent's API as serverless functions (Vercel, as the seeds deploy it): an ASGI app that
keeps nothing in process memory between requests — no worker, no agent loop, no connection
pool; each tick builds its deps and closes them — over PostgreSQL, plus `GET /api/cron/tick`,
the scheduled call that ticks due runs for a bounded time and does the worker's upkeep."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from procure.agent.deps import TickResult
from procure.agent.leased_tick import LeaseHeld, tick_under_lease
from procure.agent.reconcile import settle_ended_runs
from procure.agent.runtime import close_deps, make_deps
from procure.agent.upkeep import prune
from procure.agent.worker import WorkerConfig
from procure.api import errors
from procure.api.docs import mount_docs
from procure.api.ops import ops_router
from procure.api.runs import runs_router
from procure.api.vendors import vendors_router
from procure.bearer import bearer_matches
from procure.models import RunStatus
from procure.numbers import NumberError, parse_number
from procure.settings import Settings
from procure.store import Store, leases
from procure.store.db import make_engine, migrate, postgres_connect_args
from procure.store.tables import RunRow

log = logging.getLogger(__name__)

CRON_BUDGET_S = 45.0
"""How long one scheduled call ticks (under Vercel's `maxDuration` of 60 s in vercel.json);
`PROCURE_CRON_BUDGET_S` sets it."""
CRON_BATCH = 16
"""Runs ticked at once by a scheduled call."""
CRON_PAUSE_S = 1.0
"""Between rounds of a scheduled call: how soon a run is ticked again (the worker's poll)."""
CRON_UPKEEP_S = 10.0
"""Kept at the end of a scheduled call's budget (at most a quarter of it) for its upkeep:
settling payments in doubt on ended runs (the first half), then pruning."""


class ColdAgent:
    """What the routes call `request.app.state.agent` for, built for one call and gone after:
    the deps (vendor and facilitator clients, wallet) live only as long as the tick."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    async def tick(self, run_id: str, owner: str, lease_s: float) -> TickResult:
        deps = make_deps(self.settings, self.store)
        try:
            return await tick_under_lease(deps, run_id, owner, lease_s)
        finally:
            await close_deps(deps)


def serverless_store(url: str, *, upgrade: bool = False) -> Store:
    """A store without a connection pool: a frozen or recycled function instance holds no
    connection; each transaction opens its own (front it with PgBouncer or Neon's pooler)."""
    if url.startswith("sqlite"):
        engine = make_engine(url)
    else:
        engine = create_engine(url, poolclass=NullPool, connect_args=postgres_connect_args(url))
    if upgrade:
        migrate(engine)
    return Store(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))


def _due(store: Store, limit: int) -> list[str]:
    with store.session() as s:
        now = leases.store_now(s)  # as the leases are stamped
        return list(
            s.scalars(
                select(RunRow.id)
                .where(RunRow.status == RunStatus.running, RunRow.next_tick_at <= now)
                .where((RunRow.lease_owner.is_(None)) | (RunRow.lease_expires_at < now))
                .order_by(RunRow.next_tick_at)
                .limit(limit)
            )
        )


async def tick_due(
    settings: Settings,
    store: Store,
    *,
    budget_s: float = CRON_BUDGET_S,
    batch: int = CRON_BATCH,
    pause_s: float = CRON_PAUSE_S,
) -> dict[str, Any]:
    """The scheduled call: tick the due runs (each under its lease, as the worker does) in
    rounds until none is due or `budget_s`, less the upkeep's share (`CRON_UPKEEP_S`), is
    spent; then, within the rest, settle payments left in doubt on ended runs and prune the
    operational logs (bounded, like the worker's pass)."""
    owner = f"cron-{uuid.uuid4().hex[:8]}"
    end = time.monotonic() + budget_s
    upkeep_s = min(CRON_UPKEEP_S, budget_s / 4)
    # Ticking stops short of the budget: what ticks left over went to the upkeep before, and a
    # round cut at the budget's end (a vendor that never answers) left it none, call after call.
    deadline = end - upkeep_s
    ticked, busy, failed, cut = 0, 0, 0, 0
    deps = make_deps(settings, store)
    try:
        while time.monotonic() < deadline:
            due = await asyncio.to_thread(_due, store, batch)
            if not due:
                break
            # Each ticked run is due again after the pause, behind those not yet ticked
            # (oldest due first): the rounds go through every due run, not the same batch.
            ticks = [
                asyncio.ensure_future(
                    tick_under_lease(deps, run_id, owner, settings.api_lease_s, pause_s)
                )
                for run_id in due
            ]
            # No further than the budget: the platform would kill the call mid-tick, its leases
            # left to lapse. A tick cut here survives it as a crash; its lease is released.
            _, late = await asyncio.wait(ticks, timeout=max(0.0, deadline - time.monotonic()))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            cut += len(late)
            outcomes = [t.exception() or t.result() for t in ticks if t not in late]
            for outcome in outcomes:
                if isinstance(outcome, LeaseHeld):
                    busy += 1
                elif isinstance(outcome, BaseException):
                    failed += 1
                    log.error("a scheduled tick failed: %s", type(outcome).__name__)
                else:
                    ticked += 1
            if time.monotonic() + pause_s >= deadline:
                break
            await asyncio.sleep(pause_s)
        # Each settlement is a facilitator lookup of up to its timeout: unbounded, a few of them
        # (the facilitator not answering) held the call past the platform's limit, which killed
        # it before it pruned. Cut, a lookup is only a read: the next call asks again.
        try:
            settled = await asyncio.wait_for(
                settle_ended_runs(deps), timeout=max(0.0, end - upkeep_s / 2 - time.monotonic())
            )
        except TimeoutError:
            log.warning("settling payments in doubt on ended runs: out of time, left for later")
            settled = 0
    finally:
        await close_deps(deps)
    cfg = WorkerConfig(prune_budget_s=max(0.0, min(CRON_UPKEEP_S / 2, end - time.monotonic())))
    # No mark survives between calls: each call trims the runs of the newest rows.
    pruned, _mark = await asyncio.to_thread(prune, store, cfg)
    return {
        "ticked": ticked,
        "busy": busy,
        "failed": failed,
        "cut": cut,
        "settled": settled,
        "pruned": pruned,
    }


def create_serverless_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API's agent routes (start, tick, status, runs, payments, vendors, healthz, metrics)
    and the cron route, with no lifespan: a platform may skip it, and nothing outlives a
    request. The wallet and vendor-credential keys must come from the environment
    (`X402_PRIVATE_KEY`, `PROCURE_SECRET_KEY`): a function has no home to keep them in."""
    settings = settings or Settings()
    store = store or serverless_store(settings.database_url)
    cron_secret = os.environ.get("CRON_SECRET") or None
    raw_budget = os.environ.get("PROCURE_CRON_BUDGET_S", "").strip()
    # A finite number of seconds a platform could give a function: nan or a negative budget
    # would end every cron call at once, or never.
    try:
        budget_s = parse_number(raw_budget, lo=1, hi=3600) if raw_budget else CRON_BUDGET_S
    except NumberError as exc:
        raise NumberError(f"PROCURE_CRON_BUDGET_S: {exc}") from None
    # Swagger UI from the package (mount_docs), no ReDoc: no script from a CDN on this origin.
    app = FastAPI(title="procure (serverless)", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.agent = ColdAgent(settings, store)
    errors.install(app)  # bounds outermost: before any parser or authentication

    def require_token(authorization: str | None = Header(None)) -> None:
        if settings.api_token is None:
            return
        if not bearer_matches(authorization, settings.api_token.get_secret_value()):
            raise HTTPException(401, "missing or wrong bearer token")

    public_read = os.environ.get("PROCURE_PUBLIC_READ", "").lower() in ("1", "true", "yes")

    def require_read(authorization: str | None = Header(None)) -> None:
        if not public_read:
            require_token(authorization)

    @app.get("/api/cron/tick", tags=["ops"])
    async def cron_tick(authorization: str | None = Header(None)) -> dict[str, Any]:
        """Vercel Cron's call (`Authorization: Bearer $CRON_SECRET`; without CRON_SECRET, the
        API token, if any, guards it)."""
        secret = cron_secret or (
            settings.api_token.get_secret_value() if settings.api_token else None
        )
        if secret is not None and not bearer_matches(authorization, secret):
            raise HTTPException(401, "missing or wrong bearer token")
        return await tick_due(settings, store, budget_s=budget_s)

    app.include_router(runs_router(settings, store, require_token, require_read))
    app.include_router(vendors_router(settings, store, require_token, require_read))
    app.include_router(ops_router(store, settings=settings))
    mount_docs(app)
    return app
