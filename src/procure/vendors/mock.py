"""The mock GPU vendor: the vendor protocol over FastAPI, paid via the x402 SDK's middleware.

It simulates multi-epoch training on a wall clock that can be sped up (`job_seconds` per job),
and injects faults on demand: a vendor that fails part-way (FAIL_VENDOR_ID / FAIL_RATE /
FAIL_AT), 5xx, malformed JSON, hangs, capacity refusals and 402s that ask for more than quoted
or for another payee, asset or network. Faults can be changed at run time with
`POST /admin/faults`.

Idempotency: submissions with one `Idempotency-Key` run one at a time (a second waits for the
first), and so do status lookups by that key; a paid key answers its job again, unpaid. So a
job is started, and paid for, at most once per key, and a key's status is never read while a
submission with it is half-way. `GET /admin/stats` counts submissions, paid starts and replays
per key, for the tests to prove it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from x402 import x402ResourceServer
from x402.http import PaymentOption, RouteConfig
from x402.http.middleware.fastapi import payment_middleware
from x402.http.utils import decode_payment_required_header, encode_payment_required_header
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import AssetAmount

from procure.models import format_usd, micros_to_usd, usd_to_micros
from procure.vendors.protocol import (
    IDEMPOTENCY_HEADER,
    QUOTE_HEADER,
    QuoteRequest,
    SubmitRequest,
    VendorJob,
)

FOREIGN_PAYEE = "0x000000000000000000000000000000000000dEaD"
FOREIGN_ASSET = "0x00000000000000000000000000000000DeaDBeef"
FOREIGN_NETWORK = "eip155:8453"  # Base mainnet: real money, never ours to pay on


class Faults(BaseModel):
    """Faults to inject; each applies to the endpoints named in `endpoints` (all if empty)."""

    error500: bool = False
    garbage: bool = False
    hang_seconds: float = 0.0
    refuse_capacity: bool = False
    overcharge_factor: float = Field(1.0, ge=0)
    foreign_payee: bool = False
    foreign_asset: bool = False
    foreign_network: bool = False
    answer_delay_s: float = Field(0.0, ge=0)  # submit-job: settle, then answer this late
    endpoints: list[str] = Field(default_factory=list)


@dataclass
class MockVendorConfig:
    vendor_id: str
    name: str
    price_per_hour: int  # micro-USD
    secret: str
    pay_to: str
    network: str
    asset: str
    asset_extra: dict[str, Any]
    gpu_types: list[str] = field(default_factory=lambda: ["A10", "A100", "H100"])
    job_seconds: float = 6.0
    fail_rate: float = 0.0
    fail_at: float = 0.47
    checkpoint_every: float = 0.25
    faults: Faults = field(default_factory=Faults)


@dataclass
class _Job:
    job_id: str
    key: str
    quote: dict[str, Any]
    params: dict[str, Any]
    checkpoint_url: str | None
    will_fail: bool
    paid: bool = False
    started_at: float | None = None
    cancelled: bool = False


def _fails(job_key: str, rate: float) -> bool:
    # Deterministic per job: the same submission always fails or always succeeds.
    digest = hashlib.sha256(job_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _progress_start(checkpoint_url: str | None) -> float:
    if not checkpoint_url or "step=" not in checkpoint_url:
        return 0.0
    try:
        return min(0.99, float(checkpoint_url.rsplit("step=", 1)[1]))
    except ValueError:
        return 0.0


def _view(cfg: MockVendorConfig, job: _Job, now: float) -> VendorJob:
    """The job as the vendor reports it, computed from the clock: no background tasks."""
    epochs = int(job.params.get("epochs", 3))
    start = _progress_start(job.checkpoint_url)
    elapsed = 0.0 if job.started_at is None else now - job.started_at
    progress = min(1.0, start + elapsed / cfg.job_seconds)
    logs = [f"Job {job.job_id} started on {job.quote['gpuType']} at {cfg.name}"]
    if start:
        logs.append(f"Resumed from checkpoint {job.checkpoint_url}")
    failed = job.will_fail and progress >= cfg.fail_at
    if failed:
        progress = cfg.fail_at
    for epoch in range(1, epochs + 1):
        if progress + 1e-9 >= epoch / epochs and epoch / epochs > start:
            logs.append(f"Epoch {epoch}/{epochs} loss={1.5 * 0.6 ** (epoch - 1):.2f}")
    checkpoint = None
    step = cfg.checkpoint_every
    while step <= progress + 1e-9 and step < 1:
        checkpoint = f"https://mock-storage/{cfg.vendor_id}/{job.job_id}/ckpt?step={step:.2f}"
        step += cfg.checkpoint_every
    base = {
        "job_id": job.job_id,
        "logs": logs,
        "checkpoint_url": checkpoint,
        "amount": job.quote["amount"],
    }
    if job.cancelled:
        return VendorJob(status="cancelled", progress=progress, **base)
    if failed:
        error = f"Vendor crashed at {round(progress * 100)}% progress"
        return VendorJob(status="failed", progress=progress, error=error, **base)
    if progress >= 1.0:
        logs.append("Training complete; artifact uploaded")
        return VendorJob(
            status="completed",
            progress=1.0,
            metrics={"finalLoss": round(1.5 * 0.6 ** (epochs - 1), 4), "epochs": epochs},
            artifact_url=f"https://mock-storage/{cfg.vendor_id}/model-final.bin",
            **base,
        )
    return VendorJob(status="running", progress=progress, **base)


def create_mock_vendor_app(
    cfg: MockVendorConfig,
    facilitator: Any,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The vendor service; `facilitator` is an x402 facilitator client (HTTP or in-process)."""
    app = FastAPI(title=f"mock GPU vendor {cfg.vendor_id}")
    quotes: dict[str, dict[str, Any]] = {}
    jobs: dict[str, _Job] = {}
    by_key: dict[str, _Job] = {}
    key_locks: dict[str, asyncio.Lock] = {}
    stats: dict[str, dict[str, int]] = {}  # per key: submissions, paid starts, replays

    def count(key: str, what: str) -> None:
        per_key = stats.setdefault(key, {"submissions": 0, "started": 0, "replays": 0})
        per_key[what] += 1

    def faulty(endpoint: str) -> bool:
        return not cfg.faults.endpoints or endpoint in cfg.faults.endpoints

    def authorize(authorization: str | None = Header(None)) -> None:
        if not secrets.compare_digest(authorization or "", f"Bearer {cfg.secret}"):
            raise HTTPException(401, "missing or wrong vendor secret")

    @app.middleware("http")
    async def inject_faults(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        endpoint = request.url.path.strip("/")
        if endpoint in {"admin/faults", "healthz"} or not faulty(endpoint):
            return await call_next(request)
        if cfg.faults.hang_seconds:
            await asyncio.sleep(cfg.faults.hang_seconds)
        if cfg.faults.error500:
            return JSONResponse({"error": "internal error (injected)"}, status_code=500)
        if cfg.faults.garbage:
            return Response("{not json at all", media_type="application/json")
        return await call_next(request)

    async def price(context: Any) -> AssetAmount:
        quote = quotes.get(context.adapter.get_header(QUOTE_HEADER) or "")
        amount = quote["amount"] if quote else cfg.price_per_hour
        amount = round(amount * cfg.faults.overcharge_factor)
        asset = FOREIGN_ASSET if cfg.faults.foreign_asset else cfg.asset
        return AssetAmount(amount=str(amount), asset=asset, extra=cfg.asset_extra)

    async def pay_to(_context: Any) -> str:
        return FOREIGN_PAYEE if cfg.faults.foreign_payee else cfg.pay_to

    server = x402ResourceServer(facilitator)
    server.register(cfg.network, ExactEvmServerScheme())
    routes = {
        "POST /submit-job": RouteConfig(
            accepts=PaymentOption(
                scheme="exact",
                pay_to=pay_to,
                price=price,
                network=cfg.network,
                max_timeout_seconds=300,
            ),
            description=f"GPU job at {cfg.name}",
        )
    }
    app.middleware("http")(payment_middleware(routes, server))

    @app.middleware("http")
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

    @app.middleware("http")
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
        await request.body()  # read it all now: the job does not depend on the client staying

        async def process() -> Response:
            async with key_locks.setdefault(key, asyncio.Lock()):
                count(key, "submissions")
                existing = by_key.get(key)
                if existing is not None and existing.paid:
                    count(key, "replays")
                    view = _view(cfg, existing, clock())
                    return JSONResponse(view.to_json(), headers={"X-Idempotent-Replay": "true"})
                response = await call_next(request)
                job = by_key.get(key)
                if job is not None and not job.paid:
                    if response.status_code == 200 and "PAYMENT-RESPONSE" in response.headers:
                        job.paid, job.started_at = True, clock()
                        count(key, "started")
                    else:
                        del by_key[key], jobs[job.job_id]
            if cfg.faults.answer_delay_s:  # settled and recorded; the answer comes late
                await asyncio.sleep(cfg.faults.answer_delay_s)
            return response

        # A submission runs to its end even if the client goes away (a crashed agent): money
        # taken must leave its job behind, whoever is still listening.
        return await asyncio.shield(asyncio.ensure_future(process()))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "vendorId": cfg.vendor_id}

    @app.post("/quote", dependencies=[Depends(authorize)])
    async def quote(body: QuoteRequest) -> JSONResponse:
        if body.gpu_type not in cfg.gpu_types:
            return JSONResponse({"error": f"GPU type {body.gpu_type} not offered"}, 400)
        if cfg.faults.refuse_capacity and faulty("quote"):
            return JSONResponse({"error": "no capacity available"}, 409)
        amount = usd_to_micros(micros_to_usd(cfg.price_per_hour) * body.hours)
        q = {
            "quoteId": f"q_{uuid.uuid4().hex[:12]}",
            "vendorId": cfg.vendor_id,
            "gpuType": body.gpu_type,
            "hours": body.hours,
            "pricePerHour": micros_to_usd(cfg.price_per_hour),
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
        job = _Job(
            job_id=f"vgpu-{uuid.uuid4().hex[:8]}",
            key=idempotency_key,
            quote=quote,
            params=body.job_params,
            checkpoint_url=body.checkpoint_url,
            will_fail=_fails(idempotency_key, cfg.fail_rate),
        )
        jobs[job.job_id] = job
        by_key[idempotency_key] = job
        return JSONResponse(_view(cfg, job, clock()).to_json())

    @app.get("/job-status", dependencies=[Depends(authorize)])
    async def job_status(
        job_id: str | None = Query(None, alias="jobId"),
        idempotency_key: str | None = Query(None, alias="idempotencyKey"),
    ) -> JSONResponse:
        if job_id:
            job = jobs.get(job_id)
        else:  # never mid-submission: wait for one in flight with this key to finish
            async with key_locks.setdefault(idempotency_key or "", asyncio.Lock()):
                job = by_key.get(idempotency_key or "")
        if job is None or not job.paid:
            return JSONResponse({"error": "no such job"}, 404)
        return JSONResponse(_view(cfg, job, clock()).to_json())

    @app.post("/cancel-job", dependencies=[Depends(authorize)])
    async def cancel_job(body: dict[str, str]) -> JSONResponse:
        job = jobs.get(body.get("jobId", ""))
        if job is None:
            return JSONResponse({"error": "no such job"}, 404)
        job.cancelled = True
        return JSONResponse(_view(cfg, job, clock()).to_json())

    @app.get("/admin/stats", dependencies=[Depends(authorize)])
    async def admin_stats() -> dict[str, Any]:
        """Per idempotency key: submissions received, paid starts (never above 1), replays."""
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

    app.state.config = cfg
    app.state.describe = lambda: (
        f"{cfg.name} ({cfg.vendor_id}) at {format_usd(cfg.price_per_hour)}/h"
    )
    return app
