"""HTTP client for the vendor protocol: quote, submit and renew (paying the 402 over x402), status,
cancel.

Every failure to get a well-formed answer is raised as `VendorError`, so the tick can record it
and retry later instead of crashing; a seller still settling a payment says so (`PaymentInDoubt`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError
from x402 import x402Client
from x402.http.clients.httpx import PaymentError, x402AsyncTransport
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    decode_payment_signature_header,
)
from x402.schemas import PaymentRequirements
from x402.schemas.v1 import PaymentRequiredV1, PaymentRequirementsV1

from procure.bounds import UnsafeInput, loads
from procure.httpbounds import BoundedTransport
from procure.models import JobSpec, Quote, Vendor
from procure.safetext import outside, redact, remember_secret
from procure.vendors.credentials import CredentialError, Keyring
from procure.vendors.protocol import (
    IDEMPOTENCY_HEADER,
    QUOTE_HEADER,
    QuoteRequest,
    RenewRequest,
    SubmitRequest,
    VendorJob,
)

log = logging.getLogger(__name__)


class VendorError(Exception):
    """The vendor did not give a usable answer (down, timeout, 5xx, malformed, refused).

    `payment_sent` is true when a signed payment left the agent in this call: the vendor holds
    an authorisation it might still settle, so the payment's outcome is not known from here.
    """

    def __init__(self, message: str, *, retryable: bool = True, payment_sent: bool = False) -> None:
        # Its message is stored, logged and shown: no credential a vendor echoed may be in it.
        super().__init__(redact(message))
        self.retryable = retryable
        self.payment_sent = payment_sent


class PaymentRefused(VendorError):
    """The payment was not made: our guardrails refused the 402 (nothing was signed or sent),
    or the vendor did not accept the signed payment (`payment_sent`: settlement failed, or the
    vendor refused the job after seeing the payment).

    `offered` holds the requirements of the vendor's 402, so the refusal can be explained.
    """

    def __init__(
        self,
        message: str,
        *,
        offered: list[PaymentRequirements | PaymentRequirementsV1] | None = None,
        payment_sent: bool = False,
    ) -> None:
        super().__init__(message, retryable=False, payment_sent=payment_sent)
        self.offered = offered or []


class PaymentInDoubt(VendorError):
    """A paid call (submit, renew) answered 503 or 409 with `Retry-After`: the seller holds a
    payment for this idempotency key whose settlement it cannot confirm yet, and asks to be
    asked again with the same key after `retry_after_s` (then it replays the job, or has
    released the key). Not the vendor failing: paying again would risk paying twice.

    `payment_sent`: a signed payment left in this very call (a 409 on a retry answers before
    any is asked for, so only an earlier attempt may have sent one)."""

    def __init__(
        self, message: str, *, status: int, retry_after_s: float, payment_sent: bool
    ) -> None:
        # 503: the plain "try again later"; 409 without a payment of ours: a plain conflict.
        super().__init__(message, retryable=status >= 500, payment_sent=payment_sent)
        self.status = status
        self.retry_after_s = retry_after_s


_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
DEFAULT_RETRY_AFTER_S = 30.0
MAX_RETRY_AFTER_S = 600.0
IN_DOUBT_STATUSES = frozenset({409, 503})


def parse_retry_after(value: str | None) -> float:
    """A `Retry-After` header's wait in seconds, bounded to 1..600: integer seconds (clamped);
    anything else (an HTTP-date, garbage, nothing) is `DEFAULT_RETRY_AFTER_S`."""
    text = (value or "").strip()
    if re.fullmatch(r"[+-]?[0-9]{1,20}", text) is None:
        return DEFAULT_RETRY_AFTER_S
    return float(min(MAX_RETRY_AFTER_S, max(1, int(text))))


def _detail(response: httpx.Response) -> str:
    """A short, readable account of an error answer: its `error` (or `detail`), else nothing."""
    try:
        body = loads(response.content)
    except UnsafeInput:
        return ""
    detail = body.get("error") or body.get("detail") if isinstance(body, dict) else None
    return outside(detail, 300) if detail else ""


class _Recording402(httpx.AsyncBaseTransport):
    """Passes requests through, keeping what the last 402 asked (v2: its PAYMENT-REQUIRED
    header; v1: its JSON body) and noting whether a signed payment was sent."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self._header: str | None = None
        self._body: bytes | None = None
        self.payment_sent = False
        self.signed_amount: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        signature = request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT")
        if signature:
            self.payment_sent = True  # before sending: it may arrive even if we never hear back
            self.signed_amount = _signed_amount(signature)
        response = await self._inner.handle_async_request(request)
        if response.status_code == 402:
            self._header = response.headers.get("PAYMENT-REQUIRED")
            # The body is bounded by our transport; the SDK reads it for v1 anyway.
            self._body = None if self._header else await response.aread()
        return response

    def offered(self) -> list[PaymentRequirements | PaymentRequirementsV1]:
        required = self._required()
        return list(required.accepts) if required is not None else []

    def error(self) -> str | None:
        required = self._required()
        return getattr(required, "error", None) if required is not None else None

    def _required(self) -> Any:
        try:
            if self._header:
                return decode_payment_required_header(self._header)
            if self._body:
                data = loads(self._body)
                if isinstance(data, dict) and data.get("x402Version") == 1:
                    return PaymentRequiredV1.model_validate(data)
        except Exception:
            return None
        return None


def _signed_amount(header: str) -> int | None:
    """The value of the EIP-3009 authorisation in a PAYMENT-SIGNATURE (or v1 X-PAYMENT)
    header, if it has one."""
    try:
        payload = decode_payment_signature_header(header)
        return int(payload.payload["authorization"]["value"])
    except Exception:
        return None


@dataclass(frozen=True)
class Submitted:
    job: VendorJob
    tx_hash: str | None
    settled_amount: int | None
    replayed: bool


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    return outside(f"{type(exc).__name__}: {exc}", 500)


def _json(response: httpx.Response, what: str) -> Any:
    if response.status_code >= 500:
        raise VendorError(f"{what}: HTTP {response.status_code}")
    try:
        body = loads(response.content)
    except UnsafeInput as exc:
        raise VendorError(
            f"{what}: malformed JSON (HTTP {response.status_code}): {outside(exc, 200)}"
        ) from exc
    if response.status_code >= 400:
        detail = body.get("error") or body.get("detail") if isinstance(body, dict) else body
        raise VendorError(
            f"{what}: HTTP {response.status_code}: {outside(detail, 500)}", retryable=False
        )
    return body


class VendorClient:
    """Talks to any vendor speaking procure's vendor protocol.

    Each vendor gets its own credential only: `credentials` is the `Keyring` that opens the
    encrypted credential stored with each vendor (`Vendor.credential`), sent to that vendor as
    `Authorization: Bearer ...`; a vendor without one, or whose credential this key cannot
    open (a warning is logged), gets no Authorization header at all. There is no way to send
    one credential to every vendor: that is how a credential leaks to a host it is not for.

    `transport` is the underlying httpx transport: real sockets by default, or an
    `httpx.ASGITransport` to reach in-process vendors without sockets. Every exchange is
    bounded: `timeout_s` in all (connect to last byte) and `max_bytes` of answer.
    """

    def __init__(
        self,
        credentials: Keyring | None = None,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._transport = BoundedTransport(
            transport, deadline_s=timeout_s, **({"max_bytes": max_bytes} if max_bytes else {})
        )
        self._keyring = credentials
        self._opened: dict[str, str | None] = {}  # ciphertext -> credential (None: unopenable)
        self._timeout = httpx.Timeout(timeout_s)
        self._http = httpx.AsyncClient(transport=self._transport, timeout=self._timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _auth(self, vendor: Vendor) -> dict[str, str]:
        """The Authorization header for `vendor` alone: its own credential, or none."""
        credential = self._credential(vendor)
        # What a vendor is sent, no vendor's answer may show back in our messages and logs.
        remember_secret(credential)
        return {"Authorization": f"Bearer {credential}"} if credential else {}

    def _credential(self, vendor: Vendor) -> str | None:
        token = vendor.credential
        if not token:
            return None
        if token in self._opened:
            return self._opened[token]
        opened: str | None = None
        if self._keyring is None:
            log.warning("vendor %s: no key to open its credential; sending none", vendor.vendor_id)
        else:
            try:
                opened = self._keyring.decrypt(token)
            except CredentialError as exc:
                log.warning("vendor %s: %s; sending no credential", vendor.vendor_id, exc)
        if len(self._opened) >= 1024:
            self._opened.clear()
        self._opened[token] = opened
        return opened

    async def _call(
        self, what: str, vendor: Vendor, method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        try:
            return await self._http.request(method, url, headers=self._auth(vendor), **kwargs)
        except httpx.HTTPError as exc:
            raise VendorError(f"{what}: {_describe(exc)}") from exc

    async def quote(self, vendor: Vendor, spec: JobSpec, *, job_id: str | None = None) -> Quote:
        """A quote for `spec`; `job_id`: to renew that job (a gateway prices it at no less than
        the job's instance costs; other vendors ignore the field)."""
        body = QuoteRequest(gpu_type=spec.gpu_type, hours=spec.hours).to_json()
        if job_id is not None:
            body["jobId"] = job_id
        response = await self._call("quote", vendor, "POST", f"{vendor.endpoint}/quote", json=body)
        data = _json(response, "quote")
        try:
            quote = Quote.from_wire(data)
        except ValidationError as exc:
            raise VendorError(f"quote: malformed answer: {exc.error_count()} errors") from exc
        if quote.vendor_id != vendor.vendor_id:
            raise VendorError(f"quote: answered for vendor {quote.vendor_id!r}", retryable=False)
        return quote

    async def submit(
        self,
        vendor: Vendor,
        quote_id: str,
        *,
        idempotency_key: str,
        job_params: dict[str, Any],
        payer: x402Client,
        checkpoint_url: str | None = None,
    ) -> Submitted:
        """Submit a job, paying the vendor's 402 with `payer` (whose hooks hold the guardrails)."""
        body = SubmitRequest(
            quote_id=quote_id, job_params=job_params, checkpoint_url=checkpoint_url
        ).to_json()
        return await self._paid_post(
            "submit-job", vendor, quote_id, body, idempotency_key=idempotency_key, payer=payer
        )

    async def renew(
        self,
        vendor: Vendor,
        vendor_job_id: str,
        quote_id: str,
        *,
        idempotency_key: str,
        payer: x402Client,
    ) -> Submitted:
        """Buy the next slice of a running job (its own x402 payment, its own idempotency key)."""
        body = RenewRequest(job_id=vendor_job_id, quote_id=quote_id).to_json()
        return await self._paid_post(
            "renew-job", vendor, quote_id, body, idempotency_key=idempotency_key, payer=payer
        )

    async def _paid_post(
        self,
        what: str,
        vendor: Vendor,
        quote_id: str,
        body: dict[str, Any],
        *,
        idempotency_key: str,
        payer: x402Client,
    ) -> Submitted:
        headers = {IDEMPOTENCY_HEADER: idempotency_key, QUOTE_HEADER: quote_id}
        headers.update(self._auth(vendor))
        recorder = _Recording402(self._transport)
        # The payer transport wraps ours; it is not closed here, as closing would close ours.
        paying = httpx.AsyncClient(
            transport=x402AsyncTransport(payer, recorder),
            timeout=self._timeout,
        )
        try:
            response = await paying.post(f"{vendor.endpoint}/{what}", json=body, headers=headers)
        except PaymentError as exc:
            cause = exc.__cause__ or exc
            if recorder.payment_sent:  # e.g. the paid request timed out: it may have settled
                raise VendorError(
                    f"{what}: payment sent, no answer: {_describe(cause)}", payment_sent=True
                ) from exc
            # The SDK's words may quote the vendor's 402: bounded, as any vendor text is.
            raise PaymentRefused(outside(cause, 500), offered=recorder.offered()) from exc
        except httpx.HTTPError as exc:
            raise VendorError(
                f"{what}: {_describe(exc)}", payment_sent=recorder.payment_sent
            ) from exc
        settlement = response.headers.get("PAYMENT-RESPONSE") or response.headers.get(
            "X-PAYMENT-RESPONSE"
        )
        try:
            settled = decode_payment_response_header(settlement) if settlement else None
        except Exception:
            settled = None
        retry_after = response.headers.get("Retry-After")
        if response.status_code in IN_DOUBT_STATUSES and retry_after is not None:
            detail = _detail(response)
            raise PaymentInDoubt(
                f"{what}: HTTP {response.status_code}" + (f": {detail}" if detail else ""),
                status=response.status_code,
                retry_after_s=parse_retry_after(retry_after),
                payment_sent=recorder.payment_sent,
            )
        if response.status_code == 402:
            reason = (settled.error_reason if settled else None) or recorder.error()
            # The vendor's own words: bounded and NUL-free before they reach the store.
            said = outside(reason, 300) if reason else "HTTP 402"
            raise PaymentRefused(
                f"payment not accepted by vendor: {said}",
                offered=recorder.offered(),
                payment_sent=recorder.payment_sent,
            )
        if 400 <= response.status_code < 500 and recorder.payment_sent:
            # The vendor saw the payment and turned the request down: it should not have
            # settled, but only the ledger can say.
            try:
                _json(response, what)
            except VendorError as exc:
                raise PaymentRefused(str(exc), payment_sent=True) from exc
        try:
            job = VendorJob.from_wire(_json(response, what))
        except VendorError as exc:
            raise VendorError(
                str(exc), retryable=exc.retryable, payment_sent=recorder.payment_sent
            ) from exc
        except ValidationError as exc:
            raise VendorError(
                f"{what}: malformed answer: {exc.error_count()} errors",
                payment_sent=recorder.payment_sent,
            ) from exc
        # The 'exact' scheme moves exactly what was signed: that is what is booked, whatever
        # the vendor's answer says it settled (a vendor could claim less, and the budget would
        # count less than left the wallet). An answer to a call that signed nothing (a replay
        # of a key paid in an earlier attempt) settled nothing here: its claims are not taken,
        # and the ledger says what moved.
        trusted = settled is not None and settled.success and recorder.signed_amount is not None
        return Submitted(
            job=job,
            # Only what has the shape of a transaction hash: else the ledger names it (a
            # vendor's text booked as one could overflow the column once the money moved).
            tx_hash=(
                settled.transaction
                if trusted and settled and _TX_HASH.fullmatch(settled.transaction or "")
                else None
            ),
            settled_amount=recorder.signed_amount if trusted else None,
            replayed=response.headers.get("X-Idempotent-Replay") == "true",
        )

    async def status(
        self,
        vendor: Vendor,
        *,
        vendor_job_id: str | None = None,
        idempotency_key: str | None = None,
        quote_id: str | None = None,
    ) -> VendorJob | None:
        """The vendor's view of a job, by its id or by our idempotency key; None if unknown.
        `quote_id`: the job's quote, sent with a key: keys are guessable and a gateway answers
        a job by key only to whoever holds its quote (quote ids go only to the buyer that asked);
        a vendor that does not check it ignores the unknown parameter."""
        params: dict[str, str | None]
        if vendor_job_id:
            params = {"jobId": vendor_job_id}
        else:
            params = {"idempotencyKey": idempotency_key}
            if quote_id:
                params["quoteId"] = quote_id
        response = await self._call(
            "job-status", vendor, "GET", f"{vendor.endpoint}/job-status", params=params
        )
        if response.status_code == 404:
            return None
        try:
            return VendorJob.from_wire(_json(response, "job-status"))
        except ValidationError as exc:
            raise VendorError(f"job-status: malformed answer: {exc.error_count()} errors") from exc

    async def cancel(self, vendor: Vendor, vendor_job_id: str) -> None:
        response = await self._call(
            "cancel-job",
            vendor,
            "POST",
            f"{vendor.endpoint}/cancel-job",
            json={"jobId": vendor_job_id},
        )
        _json(response, "cancel-job")
