"""The runs resource: the seeds' agent endpoints (`/api/agent-start|tick|status`) and
`/api/runs` (list, detail, cancel). Store calls run in a thread and ticks on the agent's own
loop (`app.state.agent`, procure.loopthread): nothing here blocks the API's loop."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse

from procure.agent import metrics, runlog
from procure.agent.cancel import CannotCancel, request_cancel
from procure.agent.leased_tick import LeaseHeld
from procure.agent.start_request import first_payment
from procure.agent.tick import RunNotFound
from procure.api.schemas import NO_NUL, CancelRequest, StartRequest, TickRequest
from procure.models import Payment, Run, RunStatus, utcnow
from procure.settings import Settings
from procure.store import Store, keyset, repo
from procure.store.keyset import Key

OBSERVATIONS_PAGE = 1000
OBSERVATIONS_PAGE_MAX = 5000

OBSERVATIONS_AFTER = Query(
    0,
    alias="observationsAfter",
    ge=0,
    le=2**63 - 1,
    description="Return observations with an id above this cursor (observationsNext)",
)
OBSERVATIONS_LIMIT = Query(
    OBSERVATIONS_PAGE,
    alias="observationsLimit",
    ge=1,
    le=OBSERVATIONS_PAGE_MAX,
    description="Observations per page",
)


CURSOR = Query(
    None,
    max_length=600,
    description="The page after this cursor (from the previous page's Link header)",
)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def cursor_key(cursor: str | None) -> Key | None:
    if cursor is None:
        return None
    try:
        return keyset.decode(cursor)
    except keyset.BadCursor as exc:
        raise HTTPException(400, f"invalid cursor: {exc}") from exc


def paged(request: Request, found: list[Any], after: Key | None) -> JSONResponse:
    """A page as a JSON list, with the next page's URL in `Link: <...>; rel="next"` (RFC 8288)
    unless it is the last."""
    headers = {}
    if after is not None:
        url = request.url.include_query_params(cursor=after.encode())
        headers["Link"] = f'<{url}>; rel="next"'
    return JSONResponse(found, headers=headers)


def runs_router(
    settings: Settings,
    store: Store,
    require_token: Callable[..., None],
    require_read: Callable[..., None],
) -> APIRouter:
    router = APIRouter(tags=["runs"])
    writers = [Depends(require_token)]
    readers = [Depends(require_read)]

    def create(body: StartRequest) -> tuple[Run, dict[str, Any]]:
        with store.session() as s:
            run = repo.create_run(
                s,
                user_id=body.user_id,
                goal=body.goal,
                budget_total=body.budget_micros(),
                job_spec=body.job_spec(),
                deadline=body.deadline_at(utcnow()),
            )
            vendors = repo.list_vendors(s)
        fraction = settings.first_slice_fraction
        return run, first_payment(run.job_spec, run.budget_total, vendors, fraction)

    @router.post("/api/agent-start", status_code=201, dependencies=writers)
    async def agent_start(body: StartRequest) -> dict[str, Any]:
        """The run, and `firstPayment`: what its first payment may be (`atMost` dollars for
        `hours` GPU-hours, made as the job starts, before any work) and that a cancel does not
        refund it (`refundable`: false; `note` says it in words)."""
        run, first = await asyncio.to_thread(create, body)
        metrics.RUNS_STARTED.inc()
        runlog.run_started(run)
        return {**run.to_json(), "firstPayment": first}

    @router.post("/api/agent-tick", dependencies=writers)
    async def agent_tick(body: TickRequest, request: Request) -> JSONResponse:
        """One tick, holding the run's lease: 409 while a worker (or another call) holds it."""
        owner = f"api-{uuid.uuid4().hex[:8]}"
        try:
            with metrics.TICK_SECONDS.time():
                result = await request.app.state.agent.tick(
                    body.run_id, owner, settings.api_lease_s
                )
        except RunNotFound:
            return _error(404, f"run {body.run_id} not found")
        except LeaseHeld as exc:
            return _error(409, f"{exc}; try again", holder=exc.holder)
        metrics.TICKS.labels(result.message.split(" (")[0]).inc()
        return JSONResponse(result.to_json())

    def status_page(run_id: str, after: int, limit: int) -> dict[str, Any] | None:
        with store.session() as s:
            page = repo.load_state_page(s, run_id, observations_after=after, limit=limit)
        if page is None:
            return None
        state, after_next = page
        return {**state.to_json(), "observationsNext": after_next}

    async def status_of(request: Request, run_id: str, after: int, limit: int) -> JSONResponse:
        """The seeds' status shape, with one page of observations and the next page's cursor
        (`observationsNext`, null on the last page; its URL in the `Link` header too)."""
        found = await asyncio.to_thread(status_page, run_id, after, limit)
        if found is None:
            raise HTTPException(404, f"run {run_id} not found")
        headers = {}
        if found["observationsNext"] is not None:
            url = request.url.include_query_params(observationsAfter=found["observationsNext"])
            headers["Link"] = f'<{url}>; rel="next"'
        return JSONResponse(found, headers=headers)

    @router.get("/api/agent-status", dependencies=readers)
    async def agent_status(
        request: Request,
        run_id: str = Query(alias="runId", min_length=1, max_length=200, pattern=NO_NUL),
        after: int = OBSERVATIONS_AFTER,
        limit: int = OBSERVATIONS_LIMIT,
    ) -> JSONResponse:
        return await status_of(request, run_id, after, limit)

    def listed(limit: int, status: str | None, after: Key | None) -> tuple[list[Any], Key | None]:
        with store.session() as s:
            page = keyset.runs(s, limit=limit, after=after, status=status)
            return [repo.row_model(Run, r).to_json() for r in page.rows], page.next

    @router.get("/api/runs", dependencies=readers)
    async def runs(
        request: Request,
        limit: int = Query(50, ge=1, le=500),
        status: str | None = Query(None, max_length=20),
        cursor: str | None = CURSOR,
    ) -> JSONResponse:
        """Runs newest first, `limit` a page; the next page's URL is in the `Link` header
        (`rel="next"`), absent on the last page."""
        after = cursor_key(cursor)
        found, after_next = await asyncio.to_thread(listed, limit, status, after)
        return paged(request, found, after_next)

    def payments_listed(
        limit: int, status: str | None, run_id: str | None, after: Key | None
    ) -> tuple[list[Any], Key | None]:
        with store.session() as s:
            page = keyset.payments(s, limit=limit, after=after, status=status, run_id=run_id)
            return [repo.row_model(Payment, r).to_json() for r in page.rows], page.next

    @router.get("/api/payments", dependencies=readers)
    async def payments(
        request: Request,
        limit: int = Query(50, ge=1, le=500),
        status: str | None = Query(None, max_length=20),
        run_id: str | None = Query(None, alias="runId", max_length=200),
        cursor: str | None = CURSOR,
    ) -> JSONResponse:
        """Payments newest first (optionally of one status or run), paged like `/api/runs`."""
        after = cursor_key(cursor)
        found, after_next = await asyncio.to_thread(payments_listed, limit, status, run_id, after)
        return paged(request, found, after_next)

    @router.get("/api/runs/{run_id}", dependencies=readers)
    async def run_detail(
        request: Request,
        run_id: str = Path(min_length=1, max_length=200, pattern=NO_NUL),
        after: int = OBSERVATIONS_AFTER,
        limit: int = OBSERVATIONS_LIMIT,
    ) -> JSONResponse:
        return await status_of(request, run_id, after, limit)

    def reread(run_id: str) -> Run | None:
        with store.session() as s:
            return repo.get_run(s, run_id)

    @router.post("/api/runs/{run_id}/cancel", dependencies=writers)
    async def cancel_run(
        request: Request,
        run_id: str = Path(min_length=1, max_length=200),
        body: CancelRequest | None = None,
    ) -> JSONResponse:
        """Stop a run: its job is cancelled at the vendor and no new payment starts. 200 with
        the run once it is `cancelled`; 202 while a worker holding the run finishes it; 409 if
        it already ended otherwise. Cancelling twice is fine."""
        body = body or CancelRequest()
        try:
            run = await asyncio.to_thread(
                request_cancel, store, run_id, by=body.requested_by or "api", reason=body.reason
            )
        except RunNotFound:
            return _error(404, f"run {run_id} not found")
        except CannotCancel as exc:
            return _error(409, str(exc))
        if run.status == RunStatus.running:  # carry it out now if nobody else is ticking it
            owner = f"api-cancel-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(LeaseHeld):
                await request.app.state.agent.tick(run_id, owner, settings.api_lease_s)
            run = await asyncio.to_thread(reread, run_id) or run
        if run.status == RunStatus.cancelled:
            return JSONResponse({"message": "Run cancelled", "run": run.to_json()})
        return JSONResponse(
            {
                "message": "Cancel requested; the run ends as soon as its job is stopped",
                "run": run.to_json(),
            },
            status_code=202,
        )

    return router
