"""The mock GPU vendor: the vendor protocol over FastAPI, paid via the x402 SDK's middleware.

It simulates multi-epoch training on a wall clock that can be sped up (`job_seconds` per job),
saves a checkpoint every `checkpointEvery` of progress (resumable with `checkpointUrl`), and runs
a job only for the hours paid: `POST /renew-job` buys more (paid over x402 like submit-job, one
idempotency key per slice); out of paid time a job pauses, and stops (`expired`) after a grace
period. It injects faults on demand: a vendor that fails part-way (FAIL_VENDOR_ID / FAIL_RATE /
FAIL_AT), 5xx, malformed JSON, hangs, capacity refusals and 402s that ask for more than quoted
or for another payee, asset or network, or that write payee and asset in lowercase. Faults
can be changed at run time with `POST /admin/faults`.

It speaks x402 v2 and v1 (`x402_versions`): a 402 carries the v2 `PAYMENT-REQUIRED` header
and the v1 JSON body, and a v1 client's `X-PAYMENT` is verified and settled like a v2 payment
(answered with `X-PAYMENT-RESPONSE`). A vendor set to v1 alone answers as v1-only vendors do.

Idempotency: submissions with one `Idempotency-Key` run one at a time (a second waits for the
first), and so do status lookups by that key; a paid key answers its job again, unpaid. So a
job is started, and paid for, at most once per key, and a key's status is never read while a
submission with it is half-way. A payment whose settle answer was lost (a timeout) is not
forgotten: it is looked up on the facilitator's ledger (`doubt.py`) until its job starts or its
authorisation can no longer settle; meanwhile the key is answered 503/409 with Retry-After.
`GET /admin/stats` counts submissions, paid starts and replays per key, for the tests to prove
it.

This module holds the routes; the jobs' clock is `mock_jobs`, the config and faults
`mock_config`, the ASGI plumbing `mock_asgi` (their public names are re-exported here).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from x402 import x402ResourceServer
from x402.http import PaymentOption, RouteConfig
from x402.http.middleware.fastapi import payment_middleware
from x402.http.utils import (
    decode_payment_required_header,
    encode_payment_required_header,
)
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import AssetAmount

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.bearer import bearer_matches
from procure.models import format_usd, micros_to_usd, usd_to_micros
from procure.payments.settlements import FacilitatorLedger
from procure.payments.x402v1 import PAYMENT_RESPONSE, X_PAYMENT_RESPONSE, x402_edge
from procure.vendors import mock_jobs
from procure.vendors.doubt import UNSURE_MESSAGE, Doubt, Doubts, doubt_of, retry_later
from procure.vendors.mock_asgi import Innermost, PaidChain
from procure.vendors.mock_config import (
    FOREIGN_ASSET,
    FOREIGN_NETWORK,
    FOREIGN_PAYEE,
    Faults,
    MockVendorConfig,
)
from procure.vendors.protocol import (
    IDEMPOTENCY_HEADER,
    QUOTE_HEADER,
    QuoteRequest,
    RenewRequest,
    SubmitRequest,
)

__all__ = [
    "FOREIGN_ASSET",
    "FOREIGN_NETWORK",
    "FOREIGN_PAYEE",
    "Faults",
    "MockVendorConfig",
    "PaidChain",
    "create_mock_vendor_app",
]


def create_mock_vendor_app(
    cfg: MockVendorConfig,
    facilitator: Any,
    *,
    clock: Callable[[], float] = time.monotonic,
    ledger: FacilitatorLedger | None = None,
) -> FastAPI:
    """The vendor service; `facilitator` is an x402 facilitator client (HTTP or in-process).
    `ledger` reads the facilitator's settlement records (by default that of an HTTP
    facilitator client's URL): a payment whose settle answer was lost is looked up there
    instead of being forgotten with its job."""
    if ledger is None and isinstance(getattr(facilitator, "url", None), str):
        ledger = FacilitatorLedger(facilitator.url)
    app = FastAPI(title=f"mock GPU vendor {cfg.vendor_id}")
    quotes: dict[str, dict[str, Any]] = {}
    jobs: dict[str, mock_jobs.MockJob] = {}
    by_key: dict[str, mock_jobs.MockJob] = {}
    key_locks: dict[str, asyncio.Lock] = {}
    stats: dict[str, dict[str, int]] = {}  # per key: submissions, paid starts, replays

    def count(key: str, what: str) -> None:
        per_key = stats.setdefault(key, {"submissions": 0, "started": 0, "replays": 0})
        per_key[what] += 1

    def lock_of(d: Doubt) -> asyncio.Lock:
        return key_locks.setdefault(d.key if d.kind == "submit" else d.name, asyncio.Lock())

    def settled(d: Doubt) -> None:
        """A payment in doubt moved the money after all: its job starts (its slice is added)."""
        if d.kind == "submit":
            job = by_key.get(d.key)
            if job is not None and not job.paid:
                mock_jobs.start_paid(job, clock())
                count(d.key, "started")
            return
        pending = renewals.get(d.key)
        if pending is not None and not pending[2]:
            renewals[d.key] = (pending[0], pending[1], True)
            count(d.key, "started")
            mock_jobs.renew(cfg, jobs[pending[0]], pending[1], clock())

    def forget(d: Doubt) -> None:
        """It can no longer settle: nothing was paid, nothing is left behind."""
        if d.kind == "renew":
            renewals.pop(d.key, None)
            return
        job = by_key.get(d.key)
        if job is not None and not job.paid:
            del by_key[d.key]
            jobs.pop(job.job_id, None)

    # Payments whose settle answer was lost: asked of the ledger, never forgotten paid.
    doubts = Doubts(ledger, lock_of, settled, forget)

    def faulty(endpoint: str) -> bool:
        return not cfg.faults.endpoints or endpoint in cfg.faults.endpoints

    async def authorize(authorization: str | None = Header(None)) -> None:
        # async: a sync dependency would run in a thread pool on every request
        if not bearer_matches(authorization, cfg.secret):
            raise HTTPException(401, "missing or wrong vendor secret")

    async def inject_faults(scope: Scope, receive: Receive, send: Send, inner: ASGIApp) -> None:
        # Pure ASGI (innermost, around the routes): no request/response wrapping on the way.
        endpoint = scope["path"].strip("/")
        if endpoint in {"admin/faults", "healthz"} or not faulty(endpoint):
            return await inner(scope, receive, send)
        if cfg.faults.hang_seconds:
            await asyncio.sleep(cfg.faults.hang_seconds)
        if cfg.faults.error500:
            response = JSONResponse({"error": "internal error (injected)"}, status_code=500)
            return await response(scope, receive, send)
        if cfg.faults.garbage:
            response = Response("{not json at all", media_type="application/json")
            return await response(scope, receive, send)
        if cfg.faults.deep_json:
            response = Response("[" * 100_000, media_type="application/json")
            return await response(scope, receive, send)
        if cfg.faults.wrong_types:
            wrong = {"jobId": 5, "status": ["running"], "progress": "lots", "quoteId": 7}
            return await JSONResponse(wrong)(scope, receive, send)
        if cfg.faults.drip_bytes_per_s:
            pause = 1 / cfg.faults.drip_bytes_per_s

            async def drip() -> AsyncIterator[bytes]:
                for byte in b" " * 600 + b"{}":
                    await asyncio.sleep(pause)
                    yield bytes([byte])

            response = StreamingResponse(drip(), media_type="application/json")
            return await response(scope, receive, send)
        return await inner(scope, receive, send)

    async def price(context: Any) -> AssetAmount:
        quote = quotes.get(context.adapter.get_header(QUOTE_HEADER) or "")
        amount = quote["amount"] if quote else cfg.price_per_hour
        amount = round(amount * cfg.faults.overcharge_factor)
        asset = FOREIGN_ASSET if cfg.faults.foreign_asset else cfg.asset
        if cfg.faults.lowercase_addresses:
            asset = asset.lower()
        return AssetAmount(amount=str(amount), asset=asset, extra=cfg.asset_extra)

    async def pay_to(_context: Any) -> str:
        payee = FOREIGN_PAYEE if cfg.faults.foreign_payee else cfg.pay_to
        return payee.lower() if cfg.faults.lowercase_addresses else payee

    server = x402ResourceServer(facilitator)
    server.register(cfg.network, ExactEvmServerScheme())
    routes = {
        f"POST /{path}": RouteConfig(
            accepts=PaymentOption(
                scheme="exact",
                pay_to=pay_to,
                price=price,
                network=cfg.network,
                max_timeout_seconds=300,
            ),
            description=f"{what} at {cfg.name}",
        )
        for path, what in (("submit-job", "GPU job"), ("renew-job", "More GPU time"))
    }
    paying = payment_middleware(routes, server)

    async def foreign_network(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # The SDK's middleware refuses to start on a network its facilitator lacks, so the
        # "another network" fault rewrites the 402 it sends instead.
        response = await call_next(request)
        header = response.headers.get("PAYMENT-REQUIRED")
        if response.status_code == 402 and header and cfg.faults.foreign_network:
            required = decode_payment_required_header(header)
            for option in required.accepts:
                option.network = FOREIGN_NETWORK
            response.headers["PAYMENT-REQUIRED"] = encode_payment_required_header(required)
        return response

    # x402 v1 clients are answered at the edge (the SDK's server speaks v2 only).
    x402_versions = x402_edge(lambda: cfg.x402_versions, QUOTE_HEADER)

    async def idempotent_submit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Outermost: a paid submission replayed with its key gets the same job, unpaid;
        # a submission whose settlement failed leaves no job behind.
        if request.url.path != "/submit-job" or request.method != "POST":
            return await call_next(request)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if not key:
            return JSONResponse({"error": f"{IDEMPOTENCY_HEADER} header required"}, 400)
        try:  # read it all now: the job does not depend on the client staying
            await request.body()
        except ClientDisconnect:
            return Response(status_code=499)  # gone before it finished asking

        async def process() -> Response:
            async with key_locks.setdefault(key, asyncio.Lock()):
                count(key, "submissions")
                waiting = await doubts.resolve("submit", key)
                if waiting is not None:
                    return waiting
                existing = by_key.get(key)
                if existing is not None and existing.paid:
                    count(key, "replays")
                    view = mock_jobs.view(cfg, existing, clock())
                    return JSONResponse(view.to_json(), headers={"X-Idempotent-Replay": "true"})
                response = await call_next(request)
                job = by_key.get(key)
                if job is not None and not job.paid:
                    if response.status_code == 200 and PAYMENT_RESPONSE in response.headers:
                        mock_jobs.start_paid(job, clock())
                        count(key, "started")
                        # The route answered before the payment settled: answer the job as
                        # it now is (paid, its hours running), as a replay would.
                        response = JSONResponse(
                            mock_jobs.view(cfg, job, clock()).to_json(),
                            headers={
                                name: response.headers[name]
                                for name in (PAYMENT_RESPONSE, X_PAYMENT_RESPONSE)
                                if name in response.headers
                            },
                        )
                    else:
                        doubt = doubt_of("submit", key, request.headers)
                        outcome = await doubts.after_failed_settle(doubt, response)
                        if outcome == "used":
                            mock_jobs.start_paid(job, clock())
                            count(key, "started")
                            response = JSONResponse(mock_jobs.view(cfg, job, clock()).to_json())
                        elif outcome == "open":
                            response = retry_later(UNSURE_MESSAGE)
                        else:
                            del by_key[key], jobs[job.job_id]
            if cfg.faults.answer_delay_s:  # settled and recorded; the answer comes late
                await asyncio.sleep(cfg.faults.answer_delay_s)
            return response

        # A submission runs to its end even if the client goes away (a crashed agent): money
        # taken must leave its job behind, whoever is still listening.
        return await asyncio.shield(asyncio.ensure_future(process()))

    renewals: dict[str, tuple[str, float, bool]] = {}  # key -> (job id, hours, paid)

    async def idempotent_renew(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # As for submissions: one slice per key, applied only once its payment settled.
        if request.url.path != "/renew-job" or request.method != "POST":
            return await call_next(request)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if not key:
            return JSONResponse({"error": f"{IDEMPOTENCY_HEADER} header required"}, 400)
        try:  # as for submissions: the slice does not depend on the client staying
            await request.body()
        except ClientDisconnect:
            return Response(status_code=499)

        async def process() -> Response:
            async with key_locks.setdefault(f"renew:{key}", asyncio.Lock()):
                count(key, "submissions")
                waiting = await doubts.resolve("renew", key)
                if waiting is not None:
                    return waiting
                done = renewals.get(key)
                if done is not None and done[2]:
                    count(key, "replays")
                    view = mock_jobs.view(cfg, jobs[done[0]], clock())
                    return JSONResponse(view.to_json(), headers={"X-Idempotent-Replay": "true"})
                response = await call_next(request)
                pending = renewals.get(key)
                if pending is None or pending[2]:
                    return response
                if response.status_code != 200 or PAYMENT_RESPONSE not in response.headers:
                    doubt = doubt_of("renew", key, request.headers)
                    outcome = await doubts.after_failed_settle(doubt, response)
                    if outcome == "open":
                        return retry_later(UNSURE_MESSAGE)
                    if outcome == "refused":
                        del renewals[key]
                        return response
                job_id, hours, _ = pending
                renewals[key] = (job_id, hours, True)
                count(key, "started")
                mock_jobs.renew(cfg, jobs[job_id], hours, clock())
                return JSONResponse(
                    mock_jobs.view(cfg, jobs[job_id], clock()).to_json(),
                    headers={
                        name: response.headers[name]
                        for name in (PAYMENT_RESPONSE, X_PAYMENT_RESPONSE)
                        if name in response.headers and response.status_code == 200
                    },
                )

        return await asyncio.shield(asyncio.ensure_future(process()))

    # Innermost first: faults, then (POST only) the x402 payment, the foreign-network fault,
    # the x402 v1 edge and the idempotent submit/renew wrappers. The latter act only on POSTs
    # to the paid routes (a 402 comes only from the payment middleware): GETs and quotes skip them.
    app.add_middleware(Innermost, handler=inject_faults)
    app.add_middleware(
        PaidChain,
        chain=[paying, foreign_network, x402_versions, idempotent_submit, idempotent_renew],
    )
    app.add_middleware(BoundedRequests)  # outermost: before any parser or the payment
    answer_invalid_requests(app)  # 422 naming the field, never quoting it (NaN: a 500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "vendorId": cfg.vendor_id}

    @app.post("/quote", dependencies=[Depends(authorize)])
    async def quote(body: QuoteRequest) -> JSONResponse:
        if body.gpu_type not in cfg.gpu_types:
            return JSONResponse({"error": f"GPU type {body.gpu_type} not offered"}, 400)
        if cfg.faults.refuse_capacity and faulty("quote"):
            return JSONResponse({"error": "no capacity available"}, 409)
        hours = max(body.hours, cfg.min_hours)  # a vendor with a minimum sells at least that
        per_hour = round(cfg.price_per_hour * cfg.faults.reprice_factor)  # a price that moved
        amount = usd_to_micros(micros_to_usd(per_hour) * hours)
        q = {
            "quoteId": f"q_{uuid.uuid4().hex[:12]}",
            "vendorId": cfg.vendor_id,
            "gpuType": body.gpu_type,
            "hours": hours,
            "pricePerHour": micros_to_usd(per_hour),
            "amount": amount,
            "currency": "USD",
        }
        quotes[q["quoteId"]] = q
        return JSONResponse({**q, "amount": micros_to_usd(amount)})

    @app.post("/submit-job", dependencies=[Depends(authorize)])
    async def submit_job(
        body: SubmitRequest, idempotency_key: str = Header(alias=IDEMPOTENCY_HEADER)
    ) -> JSONResponse:
        quote = quotes.get(body.quote_id)
        if quote is None:
            return JSONResponse({"error": f"unknown quote {body.quote_id}"}, 400)
        job = mock_jobs.MockJob(
            job_id=f"vgpu-{uuid.uuid4().hex[:8]}",
            key=idempotency_key,
            quote=quote,
            params=body.job_params,
            checkpoint_url=body.checkpoint_url,
            will_fail=mock_jobs.fails(idempotency_key, cfg.fail_rate),
        )
        jobs[job.job_id] = job
        by_key[idempotency_key] = job
        return JSONResponse(mock_jobs.view(cfg, job, clock()).to_json())

    @app.post("/renew-job", dependencies=[Depends(authorize)])
    async def renew_job(
        body: RenewRequest, idempotency_key: str = Header(alias=IDEMPOTENCY_HEADER)
    ) -> JSONResponse:
        job = jobs.get(body.job_id)
        quote = quotes.get(body.quote_id)
        if job is None or not job.paid:
            return JSONResponse({"error": f"no such job {body.job_id}"}, 404)
        if quote is None:
            return JSONResponse({"error": f"unknown quote {body.quote_id}"}, 400)
        view = mock_jobs.view(cfg, job, clock())
        if view.status != "running":
            return JSONResponse({"error": f"job {job.job_id} is {view.status}"}, 409)
        renewals[idempotency_key] = (job.job_id, float(quote["hours"]), False)
        return JSONResponse(view.to_json())

    @app.get("/job-status", dependencies=[Depends(authorize)])
    async def job_status(
        job_id: str | None = Query(None, alias="jobId"),
        idempotency_key: str | None = Query(None, alias="idempotencyKey"),
        quote_id: str | None = Query(None, alias="quoteId"),
    ) -> JSONResponse:
        if job_id:
            job = jobs.get(job_id)
        else:  # never mid-submission: wait for one in flight with this key to finish
            async with key_locks.setdefault(idempotency_key or "", asyncio.Lock()):
                await doubts.resolve("submit", idempotency_key or "")  # settled since? started
                job = by_key.get(idempotency_key or "")
            # By key only to the holder of its quote, as the gateway answers: keys are guessable.
            if job is not None and job.quote["quoteId"] != quote_id:
                job = None
        if job is None or not job.paid:
            return JSONResponse({"error": "no such job"}, 404)
        shown = mock_jobs.view(cfg, job, clock())
        job.shown = max(job.shown, shown.progress)
        answer = shown.to_json()
        if answer.get("error") and cfg.faults.huge_error_bytes:  # past the protocol's own clip
            answer["error"] += "; core dump: " + "E" * cfg.faults.huge_error_bytes
        return JSONResponse(answer)

    @app.post("/cancel-job", dependencies=[Depends(authorize)])
    async def cancel_job(body: dict[str, str]) -> JSONResponse:
        job = jobs.get(body.get("jobId", ""))
        if job is None:
            return JSONResponse({"error": "no such job"}, 404)
        job.cancelled = True
        return JSONResponse(mock_jobs.view(cfg, job, clock()).to_json())

    @app.get("/admin/stats", dependencies=[Depends(authorize)])
    async def admin_stats() -> dict[str, Any]:
        """Per idempotency key (a job's or a slice's): requests received, paid starts or
        renewals (never above 1), idempotent replays."""
        return {
            "keys": stats,
            "submissions": sum(k["submissions"] for k in stats.values()),
            "started": sum(k["started"] for k in stats.values()),
            "replays": sum(k["replays"] for k in stats.values()),
        }

    @app.post("/admin/faults", dependencies=[Depends(authorize)])
    async def set_faults(faults: Faults) -> dict[str, Any]:
        cfg.faults = faults
        return faults.model_dump()

    def adopt_job(
        job_id: str, key: str, params: dict[str, Any], *, hours: float, amount: int
    ) -> None:
        """Take a job as if it had just been submitted and paid, without the HTTP round and the
        payment (benchmarks seed thousands of running jobs this way)."""
        quote = {
            "quoteId": f"q_adopted_{job_id}",
            "vendorId": cfg.vendor_id,
            "gpuType": params.get("gpuType", "A100"),
            "hours": hours,
            "amount": amount,
            "currency": "USD",
        }
        job = mock_jobs.MockJob(
            job_id=job_id,
            key=key,
            quote=quote,
            params=params,
            checkpoint_url=None,
            will_fail=mock_jobs.fails(key, cfg.fail_rate),
        )
        mock_jobs.start_paid(job, clock())
        jobs[job_id] = job
        by_key[key] = job

    app.state.adopt_job = adopt_job
    app.state.config = cfg
    app.state.describe = lambda: (
        f"{cfg.name} ({cfg.vendor_id}) at {format_usd(cfg.price_per_hour)}/h"
    )
    return app
