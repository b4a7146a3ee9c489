"""x402 v1 on the vendor side: the SDK's resource server speaks v2 only, so a vendor answers v1
clients by translating at its edge (a 402's requirements as a v1 JSON body, `X-PAYMENT` into
the v2 payload the SDK verifies, its settlement back as `X-PAYMENT-RESPONSE`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_signature_header,
    encode_payment_signature_header,
)
from x402.schemas import PaymentPayload, PaymentRequired
from x402.schemas.v1 import PaymentPayloadV1

from procure.payments.payer import caip2_network, legacy_network, same_address

X_PAYMENT = "X-PAYMENT"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"


def v1_network(network: str) -> str:
    """How a v1 402 names a network: its legacy name where it has one (`base-sepolia`), else
    its CAIP-2 id, as faremeter's middleware does for chains without one."""
    return legacy_network(network) or network


def v1_payment_required(required: PaymentRequired) -> dict[str, Any]:
    """The v1 JSON body of a 402 carrying the same requirements as a v2 `PAYMENT-REQUIRED`."""
    resource = required.resource
    accepts = []
    for req in required.accepts:
        item: dict[str, Any] = {
            "scheme": req.scheme,
            "network": v1_network(str(req.network)),
            "maxAmountRequired": req.amount,
            "resource": resource.url if resource else "",
            "description": (resource.description if resource else None) or "",
            "mimeType": (resource.mime_type if resource else None) or "application/json",
            "payTo": req.pay_to,
            "maxTimeoutSeconds": req.max_timeout_seconds,
            "asset": req.asset,
        }
        if req.extra:
            item["extra"] = req.extra
        accepts.append(item)
    return {"x402Version": 1, "error": required.error or "Payment required", "accepts": accepts}


def v2_payload_from_v1(header: str, offered: PaymentRequired | None) -> PaymentPayload | None:
    """The v2 payload for a v1 `X-PAYMENT` header, bound to the offered requirement it pays
    (same scheme and chain, the payee by its hex, the exact amount); None if none matches."""
    if offered is None:
        return None
    try:
        v1 = decode_payment_signature_header(header)
        authorization = v1.payload["authorization"]
        to, value = str(authorization["to"]), str(authorization["value"])
    except Exception:
        return None
    if not isinstance(v1, PaymentPayloadV1):
        return None
    for req in offered.accepts:
        if (
            req.scheme == v1.scheme
            and caip2_network(v1.network) == caip2_network(str(req.network))
            and same_address(to, req.pay_to)
            and value == req.amount
        ):
            return PaymentPayload(
                x402_version=2, accepted=req, payload=v1.payload, resource=offered.resource
            )
    return None


Dispatch = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


def _replace_header(request: Request, name: str, value: str | None, drop: str) -> None:
    gone = {name, drop}
    headers = [(k, v) for k, v in request.scope["headers"] if k.decode().lower() not in gone]
    if value is not None:
        headers.append((name.encode(), value.encode()))
    request.scope["headers"] = headers


def x402_edge(versions: Callable[[], tuple[int, ...]], quote_header: str) -> Dispatch:
    """An `@app.middleware("http")`-style function, just outside the SDK's payment middleware,
    that makes a v2 vendor answer the x402 versions `versions()` names: 402s carry the v2 header
    and/or the v1 body, a v1 `X-PAYMENT` reaches the SDK as the v2 payload of the requirement it
    pays (the last one offered for that path and quote), and its settlement goes back as
    `X-PAYMENT-RESPONSE` too. A payment in a version the vendor does not speak is a 400."""
    offers: dict[tuple[str, str], PaymentRequired] = {}

    async def edge(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        speaks = versions()
        offered_key = (request.url.path, request.headers.get(quote_header) or "")
        v1_header = request.headers.get(X_PAYMENT)
        v2_header = request.headers.get(PAYMENT_SIGNATURE)
        paid_v1 = bool(v1_header) and not v2_header
        if v2_header and 2 not in speaks:
            return JSONResponse({"error": "this vendor speaks x402 version 1 only"}, 400)
        if paid_v1:
            if 1 not in speaks:
                return JSONResponse({"error": "this vendor speaks x402 version 2 only"}, 400)
            payload = v2_payload_from_v1(v1_header or "", offers.get(offered_key))
            encoded = encode_payment_signature_header(payload) if payload else None
            # Unmatched, it is no payment at all: the client gets the 402 again.
            _replace_header(request, PAYMENT_SIGNATURE.lower(), encoded, X_PAYMENT.lower())
        response = await call_next(request)
        header = response.headers.get(PAYMENT_REQUIRED)
        if response.status_code == 402 and header:
            required = decode_payment_required_header(header)
            if len(offers) >= 4096:  # bounded: the oldest offers go first
                del offers[next(iter(offers))]
            offers[offered_key] = required
            body: dict[str, Any] = {"error": "Payment required"}
            if 1 in speaks:
                body = v1_payment_required(required)
            headers = {PAYMENT_REQUIRED: header} if 2 in speaks else {}
            return JSONResponse(body, 402, headers=headers)
        if paid_v1 and PAYMENT_RESPONSE in response.headers:
            response.headers[X_PAYMENT_RESPONSE] = response.headers[PAYMENT_RESPONSE]
        return response

    return edge
