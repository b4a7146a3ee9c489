"""The gateway's HTTP service: the seeds' vendor protocol (`POST /quote`, `POST /submit-job` and
`POST /renew-job` paid over x402 through the SDK's middleware, `GET /job-status`,
`POST /cancel-job`) with the mock vendor's bearer, idempotency-key and checkpoint semantics,
selling jobs run on instances of one cloud account (`procure.gateway.instances`).

Money: a quote is the cloud's live offer plus the margin, valid `quote_valid_s`; the 402 asks for
exactly the quote. The route runs only after the SDK verified the payment: it checks the quote,
the buyer's cap, capacity and that the payment's nonce was never seen, and writes the job
`unpaid` with its payment `pending`; the payment is settled after it and booked at once (the job
becomes `paid`, and only then can an instance be launched). A crash between settlement and the
booking, or a settle answer lost (a timeout), is reconciled with the facilitator's ledger: the
payment stays `pending` (its key answered 503/409 with Retry-After) until the ledger shows it
settled (booked) or its authorisation window has passed unused (dropped). A submission with a
paid key answers its job again.
This module is the app and its thin routes; what they sell and book is `sales.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, SecretStr
from starlette.requests import ClientDisconnect
from x402 import x402ResourceServer
from x402.http import PaymentOption, RouteConfig
from x402.http.middleware.fastapi import payment_middleware
from x402.http.utils import decode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import AssetAmount

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.bearer import bearer_matches
from procure.bounds import UnsafeInput, loads
from procure.clouds.base import CloudError, Offer
from procure.gateway import book, refusals, sales, storelease
from procure.gateway.loop import run_loop
from procure.gateway.pricing import best_offer
from procure.gateway.runtime import Runtime
from procure.gateway.sales import view
from procure.models import format_usd, micros_to_usd, utcnow
from procure.scrape import ScrapeSettings, scrape_allowed
from procure.store.gateway_tables import GatewayQuoteRow
from procure.vendors.mock_asgi import PaidChain as _PaidChain
from procure.vendors.protocol import (
    IDEMPOTENCY_HEADER,
    QUOTE_HEADER,
    QuoteRequest,
    RenewRequest,
    SubmitRequest,
)

log = logging.getLogger(__name__)
MAX_KEY = 200
NEXT = Callable[[Request], Awaitable[Response]]


class GatewayQuoteRequest(QuoteRequest):
    gpu_type: str = Field(min_length=1, max_length=32)
    # A quote to renew this job: never below what its instance costs (`refusals.below_cost`).
    job_id: str | None = Field(None, min_length=1, max_length=100)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _retry_later(rt: Runtime, status: int, message: str) -> JSONResponse:
    retry = sales.retry_after_s(rt)
    return JSONResponse(
        {"error": message, "retryAfterSeconds": retry},
        status_code=status,
        headers={"Retry-After": str(retry)},
    )


def _authorization(request: Request) -> dict[str, Any] | None:
    """The EIP-3009 authorisation in the request's payment header (already verified by the
    SDK when a route sees it), or None."""
    header = request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT")
    if not header:
        return None
    try:
        auth = decode_payment_signature_header(header).payload["authorization"]
        return {
            "from": str(auth["from"]),
            "nonce": _nonce(str(auth["nonce"])),
            "value": int(auth["value"]),
            "validBefore": int(auth["validBefore"]),
        }
    except Exception:
        return None


def _nonce(signed: str) -> str:
    """The nonce's 32 bytes in one spelling (0x, lower case): the SDK verifies any spelling of
    them (upper case, no 0x), the chain and its ledger know only the bytes, so a nonce kept as
    signed let one payment, spelled twice, pass "never seen" twice and be booked for two jobs."""
    raw = bytes.fromhex(signed[:200].removeprefix("0x"))  # as the SDK reads it
    if len(raw) != 32:
        raise ValueError("an EIP-3009 nonce is 32 bytes")
    return "0x" + raw.hex()


def _field(body: dict[str, Any], alias: str, name: str) -> Any:
    """A body's field as the routes' models read it: by its alias, else by its name (they
    populate by name too, so a check reading only the alias could be passed by the name)."""
    return body[alias] if alias in body else body.get(name)


# The book's figures that are the operator's money: `GET /gateway/status` shows them only to
# the operator's token (PROCURE_METRICS_TOKEN), never to the buyers' shared bearer.
OPERATORS_FIGURES = frozenset(
    {
        "incomeUsd",
        "instanceCostUsd",
        "marginUsd",
        "paymentsReceived",
        "refundsOwedUsd",
        "refundsOwed",
    }
)


def create_gateway_app(rt: Runtime, facilitator: Any, *, loop: bool = True) -> FastAPI:
    """The gateway service over `rt` (config, store, cloud); `facilitator` is an x402
    facilitator client. `loop`: run the instance loop in the app's lifespan."""
    cfg = rt.cfg
    locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        storelease.claim(cfg, rt.store)  # GatewayConflict: another gateway's store
        tasks = [asyncio.create_task(storelease.heartbeat(rt, stop))]
        if loop:
            tasks.append(asyncio.create_task(run_loop(rt, stop)))
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):  # unreleased, it lapses
                storelease.release(cfg, rt.store)

    app = FastAPI(title=f"procure gateway {cfg.vendor_id}", lifespan=lifespan)

    def lock(name: str) -> asyncio.Lock:
        if len(locks) > 10_000:  # idle locks of finished keys go; held ones stay
            for k in [k for k, v in locks.items() if not v.locked()]:
                del locks[k]
        return locks.setdefault(name, asyncio.Lock())

    offers = sales.offer_cache(rt)
    seen: dict[str, Offer] = {}  # the last offer quoted per GPU

    async def authorize(authorization: str | None = Header(None)) -> None:
        if not bearer_matches(authorization, cfg.secret):
            raise HTTPException(401, "missing or wrong vendor secret")

    async def price(context: Any) -> AssetAmount:
        # Exactly the quote (checked valid before the 402 is sent): never more.
        with rt.store.session() as s:
            quote = book.get_quote(s, context.adapter.get_header(QUOTE_HEADER) or "")
            amount = quote.amount if quote else 1
        return AssetAmount(amount=str(amount), asset=cfg.asset, extra=cfg.asset_extra)

    server = x402ResourceServer(facilitator)
    server.register(cfg.network, ExactEvmServerScheme())
    routes = {
        f"POST /{path}": RouteConfig(
            accepts=PaymentOption(
                scheme="exact",
                pay_to=cfg.pay_to,
                price=price,
                network=cfg.network,
                max_timeout_seconds=300,
            ),
            description=f"{what} at {cfg.name}",
        )
        for path, what in (("submit-job", "GPU job"), ("renew-job", "More GPU time"))
    }
    paying = payment_middleware(routes, server)

    async def paid_route(request: Request, call_next: NEXT) -> Response:
        # Outermost of the paid chain: idempotency, the quote checked before any 402, and the
        # settlement booked the moment the SDK reports it.
        path = request.url.path
        if path not in ("/submit-job", "/renew-job") or request.method != "POST":
            return await call_next(request)
        if not bearer_matches(request.headers.get("authorization"), cfg.secret):
            return _error(401, "missing or wrong vendor secret")
        key = request.headers.get(IDEMPOTENCY_HEADER) or ""
        if not key or len(key) > MAX_KEY:
            return _error(400, f"{IDEMPOTENCY_HEADER} header required (at most {MAX_KEY} chars)")
        try:
            raw = await request.body()
            body = loads(raw)
        except ClientDisconnect:
            return Response(status_code=499)
        except UnsafeInput as exc:
            return _error(400, f"malformed JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the body is a JSON object")
        kind = "submit" if path == "/submit-job" else "renew"

        async def process() -> Response:
            async with lock(f"{kind}:{key}"):
                job_id = _field(body, "jobId", "job_id")
                replay = await sales.replayed(rt, kind, key)
                if replay is not None and kind == "renew" and replay["jobId"] != job_id:
                    # One key, one request: replaying another job's renewal would tell the buyer
                    # this job was renewed when nothing was paid for it.
                    return _error(409, f"{IDEMPOTENCY_HEADER} already renewed another job")
                if replay is not None and kind == "submit":
                    # Keys are the buyers' own choice: one another buyer used is not its job.
                    quotes = {
                        request.headers.get(QUOTE_HEADER),
                        _field(body, "quoteId", "quote_id"),
                    }
                    refusal = sales.not_its_job(rt, key, _authorization(request), quotes)
                    if refusal is not None:
                        return _error(*refusal)
                if replay is not None:
                    return JSONResponse(replay, headers={"X-Idempotent-Replay": "true"})
                unsure = await sales.pending_retry(rt, kind, key)
                if unsure is not None:  # never a second payment while the first may settle
                    return _retry_later(rt, *unsure)
                gpu = None
                if kind == "renew":
                    with rt.store.session() as s:
                        row = book.job(s, str(job_id or ""))
                        gpu = row.gpu if row is not None else None
                named = request.headers.get(QUOTE_HEADER)
                quote_id = _field(body, "quoteId", "quote_id")
                refusal = refusals.quote_refusal(rt, quote_id, named, gpu)
                if refusal:
                    return _error(400, refusal)
                if kind == "submit":  # at a cap: said before the 402, nothing to sign in vain
                    full = refusals.sale_refusal(rt, quote_id)
                    if full is not None:
                        return _error(*full)
                else:  # below the job's instance cost: said before the 402 too
                    cheap = refusals.renewal_refusal(rt, job_id, quote_id)
                    if cheap is not None:
                        return _error(*cheap)
                response = await call_next(request)
                auth = _authorization(request)
                if auth is None:
                    return response
                header = response.headers.get("PAYMENT-RESPONSE")
                outcome, row = await sales.book_settlement(
                    rt, kind, key, auth["nonce"], header, response.status_code
                )
                if outcome == "unknown":  # the money may have moved: kept pending, asked later
                    return _retry_later(
                        rt,
                        503,
                        "the payment's settlement could not be confirmed; it is being checked "
                        f"with the facilitator: retry with the same {IDEMPOTENCY_HEADER} and "
                        f"payment in {sales.retry_after_s(rt)} s (it is never charged twice)",
                    )
                if outcome != "settled" or row is None:
                    return response
                with rt.store.session() as s:
                    answer = sales.shown(s, row)  # with a refund owed, if it bought nothing
                if response.status_code != 200:  # settled, its answer lost: the paid job
                    return JSONResponse(answer)
                if kind == "renew":
                    return JSONResponse(answer, headers={"PAYMENT-RESPONSE": header or ""})
                return response

        # Runs to its end even if the buyer goes away: money taken is always booked.
        return await asyncio.shield(asyncio.ensure_future(process()))

    app.add_middleware(_PaidChain, chain=[paying, paid_route])
    app.add_middleware(BoundedRequests)

    # 422 in the vendor protocol's `{"error": ...}` envelope, naming the field, never quoting
    # it: FastAPI's own answer quotes the input (half a surrogate pair could not be encoded,
    # NaN is not JSON).
    answer_invalid_requests(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "vendorId": cfg.vendor_id, "cloud": cfg.provider}

    @app.post("/quote", dependencies=[Depends(authorize)])
    async def quote(body: GatewayQuoteRequest) -> JSONResponse:
        gpu = body.gpu_type.upper()
        if cfg.gpus and gpu not in {g.upper() for g in cfg.gpus}:
            return _error(400, f"GPU type {body.gpu_type} not offered")
        if body.hours > cfg.max_hours:
            return _error(400, f"at most {cfg.max_hours:g} hours per quote")
        now = utcnow()
        try:
            offer = best_offer(await offers(gpu), gpu)
        except CloudError as exc:
            return _error(503, f"the cloud is not answering: {exc}"[:500])
        if offer is not None:
            seen[gpu] = offer
        else:  # none free now: a renewal needs none (its job holds one); a submit checks again
            # After a restart nothing quoted is remembered: the offers of the instances held.
            offer = seen.get(gpu) or refusals.held_offer(rt, gpu)
        if body.job_id is not None:  # to renew it: at least what its instance costs
            offer = refusals.job_offer(rt, body.job_id, gpu, offer)
        if offer is None:
            return _error(409, "no capacity available")
        # Never refused for the caps: a quote also prices a renewal, which adds no instance; a
        # submit at a cap is refused before its 402 (`paid_route`) and again where it is sold.
        sales.make_room_for_a_quote(rt, now)
        return JSONResponse(sales.new_quote(rt, gpu, body.gpu_type, body.hours, offer, now))

    def payment_refusal(auth: dict[str, Any] | None, quote: GatewayQuoteRow) -> JSONResponse | None:
        refusal = refusals.payment_refusal(rt, auth, quote)
        return _error(*refusal) if refusal is not None else None

    @app.post("/submit-job", dependencies=[Depends(authorize)])
    async def submit_job(
        request: Request,
        body: SubmitRequest,
        idempotency_key: str = Header(alias=IDEMPOTENCY_HEADER),
    ) -> JSONResponse:
        # Reached only with a payment the SDK verified; it is settled after this answers 200.
        if len(json.dumps(body.job_params, default=str)) > cfg.max_params_bytes:
            return _error(400, f"jobParams larger than {cfg.max_params_bytes:,} bytes")
        auth = _authorization(request)
        with rt.store.session() as s:
            quote = book.get_quote(s, body.quote_id)
        if quote is None:
            return _error(400, f"unknown quote {body.quote_id[:40]}")
        refused = payment_refusal(auth, quote)
        if refused is not None:
            return refused
        assert auth is not None
        try:  # capacity now, at the quote's cost, before the money moves: a clean refusal
            fresh = await offers(quote.gpu, fresh=True)
            offer = best_offer(fresh, quote.gpu)
        except CloudError as exc:
            return _error(503, f"the cloud is not answering: {exc}"[:500])
        if offer is None:
            return _error(409, "no capacity available")
        if offer.price_per_hour > quote.cost_per_hour:  # it would run at a loss: quote again
            return _error(
                409,
                f"the cloud's price rose since the quote ({format_usd(offer.price_per_hour)}/h "
                "now): ask for a new quote",
            )
        answer = sales.new_job(
            rt,
            quote,
            auth,
            idempotency_key,
            body.job_params,
            body.checkpoint_url,
            free=refusals.free_gpus(fresh, quote),
        )
        if isinstance(answer, tuple):
            return _error(*answer)
        # The SDK settles after this answer (and turns it into a 402 if settling fails), so the
        # answer already says what this payment buys, as a replay of it will.
        paid = {"paidHours": quote.hours, "amount": micros_to_usd(auth["value"])}
        return JSONResponse({**answer, **paid, "status": "queued"})

    @app.post("/renew-job", dependencies=[Depends(authorize)])
    async def renew_job(
        request: Request,
        body: RenewRequest,
        idempotency_key: str = Header(alias=IDEMPOTENCY_HEADER),
    ) -> JSONResponse:
        auth = _authorization(request)
        with rt.store.session() as s:
            row = book.job(s, body.job_id)
            quote = book.get_quote(s, body.quote_id)
        if row is None or row.status == "unpaid":
            return _error(404, f"no such job {body.job_id[:40]}")
        if quote is None:
            return _error(400, f"unknown quote {body.quote_id[:40]}")
        if row.status not in book.STARTED or row.status == "ending" or row.cancel_requested:
            return _error(409, f"job {row.job_id} is {view(row)['status']}")
        if quote.gpu != row.gpu:  # the body as parsed here (`jobId` or `job_id`), not as read
            return _error(
                400, f"quote {quote.quote_id} is for {quote.gpu}, the job runs on {row.gpu}"
            )
        refused = payment_refusal(auth, quote)
        if refused is not None:
            return refused
        assert auth is not None
        refused_now = sales.new_renewal(rt, row.job_id, quote, auth, idempotency_key)
        if refused_now is not None:
            return _error(*refused_now)
        return JSONResponse(view(row))

    @app.get("/job-status", dependencies=[Depends(authorize)])
    async def job_status(
        job_id: str | None = Query(None, alias="jobId", max_length=100),
        idempotency_key: str | None = Query(None, alias="idempotencyKey", max_length=MAX_KEY),
        quote_id: str | None = Query(None, alias="quoteId", max_length=100),
    ) -> JSONResponse:
        if job_id:
            with rt.store.session() as s:
                row = book.job(s, job_id)
                if row is None or row.status == "unpaid":
                    return _error(404, "no such job")
                return JSONResponse(sales.shown(s, row))
        # Never mid-submission: wait for one in flight with this key to finish.
        async with lock(f"submit:{idempotency_key or ''}"):
            # By key, only to the holder of the job's quote: an unknown key's 404 otherwise.
            if not sales.key_shows_job(rt, idempotency_key or "", quote_id):
                return _error(404, "no such job")
            # A payment of it still pending (a lost settle answer) is asked about first.
            answer = await sales.replayed(rt, "submit", idempotency_key or "")
        return JSONResponse(answer) if answer else _error(404, "no such job")

    @app.post("/cancel-job", dependencies=[Depends(authorize)])
    async def cancel_job(body: dict[str, Any]) -> JSONResponse:
        answer = sales.request_cancel(rt, body.get("jobId"))
        if answer is None:
            return _error(404, "no such job")
        rt.wake.set()
        return JSONResponse(answer)

    # The operator's own token (PROCURE_METRICS_TOKEN, read as the app is made). The buyers'
    # bearer is every buyer's: it must not open the operator's money.
    operator = ScrapeSettings().metrics_token

    @app.get("/gateway/status")
    async def status(authorization: str | None = Header(None)) -> JSONResponse:
        owner = operator is not None and bearer_matches(authorization, operator.get_secret_value())
        if not owner and not bearer_matches(authorization, cfg.secret):
            return _error(401, "missing or wrong vendor secret")
        figures = await asyncio.to_thread(book.figures, rt.store)
        if not owner:  # a buyer: whether the gateway has room, not what it earns
            figures = {k: v for k, v in figures.items() if k not in OPERATORS_FIGURES}
        return JSONResponse(
            {
                **figures,
                "maxHourlyUsd": cfg.max_hourly_usd,
                "maxTotalInstances": cfg.max_total_instances,
                "launchRetryS": cfg.launch_retry_s,
            }
        )

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # procure's one rule for /metrics: the scrape token, or this process's own; open only
        # when neither is set. This process's own is the buyers' bearer, so once the operator
        # has set a scrape token only that opens it (the figures are the operator's money).
        own = SecretStr(cfg.secret) if cfg.secret and operator is None else None
        if not scrape_allowed(request.headers.get("authorization"), operator, own):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        lines = await asyncio.to_thread(book.prometheus_lines, rt.store, cfg.vendor_id)
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    app.state.runtime = rt
    return app
