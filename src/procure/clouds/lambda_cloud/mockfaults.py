"""The mock Lambda Cloud's faults and the edges of its API: the faults an admin injects (answered,
like every error, in Lambda's envelope `{"error": {"code", "message", "suggestion"}}`), the auth
schemes Lambda's spec allows, and request bodies checked against the spec itself."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from procure.bounds import UnsafeInput, loads
from procure.clouds.lambda_cloud.mockstate import Refusal
from procure.clouds.mockworld import faults as mockfaults
from procure.clouds.mockworld.faults import AnswerFaults
from procure.clouds.specs import SpecError, validate_request

HUGE_BYTES = 12 * 1024 * 1024  # past every client's answer cap
WRONG_IP = "192.0.2.77"  # TEST-NET-1: an address that is not the instance's

# The error each injected status answers with, in Lambda's vocabulary. Lambda documents no 429
# (the spec has none, clouds-wire.md): its code here is a guess in the same envelope.
_STATUS_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("global/invalid-parameters", "Invalid request data.", "Check the request."),
    401: (
        "global/invalid-api-key",
        "API key was invalid, expired, or deleted.",
        "Check your API key or create a new one, then try again.",
    ),
    403: ("global/account-inactive", "Your account is inactive.", "Contact Support."),
    404: ("global/not-found", "The requested resource was not found.", "Check the URL."),
    409: ("global/conflict", "The request conflicts with the resource's state.", "Try later."),
    429: ("global/too-many-requests", "Too many requests.", "Slow down, then try again."),
    500: (
        "global/internal-error",
        "An internal server error occurred.",
        "Try again later. Contact Support if the problem persists.",
    ),
}
T = TypeVar("T", bound=BaseModel)
_PROVIDER = ("provider/internal-unavailable", "Provider unavailable", "Try again shortly")


class Faults(AnswerFaults):
    """What `POST /admin/faults` sets (the whole set at once; `{}` clears it). `endpoints` limits
    the answer faults to some of `instance-types`, `instances`, `instance`, `launch`,
    `terminate`, `ssh-keys`, `firewall-rules`, `images` (empty: all). `count`: the answer
    faults are served that many times, then cleared (None: until changed). `status` is
    answered in Lambda's envelope; 429 is `rate_limited`; `huge` is HUGE_BYTES; a wrong ip is
    WRONG_IP."""

    ANSWERS: ClassVar[tuple[str, ...]] = (
        "hang_s",
        "account_inactive",
        "error500",
        "provider_error",
        "status",
        "rate_limited",
        "garbage",
        "wrong_shape",
        "huge",
    )
    CLEARED_TOO: ClassVar[tuple[str, ...]] = ("retry_after_s",)

    refuse_capacity: bool = False
    refuse_quota: bool = False
    account_inactive: bool = False
    error500: bool = False
    provider_error: bool = False
    rate_limited: bool = False  # 429 in the envelope
    retry_after_s: int | None = Field(None, ge=0, le=3600)  # with Retry-After, when set
    wrong_shape: bool = False


class Bucket:
    """A token bucket on the wall clock: `burst` requests at once, one more per `interval_s`."""

    def __init__(self, interval_s: float, burst: int) -> None:
        self.interval_s, self.burst = max(interval_s, 0.0), max(burst, 1)
        self.tokens = float(self.burst)
        self.at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if self.interval_s > 0:
                self.tokens = min(self.burst, self.tokens + (now - self.at) / self.interval_s)
            else:
                self.tokens = float(self.burst)
            self.at = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


def refusal_for(status: int) -> Refusal:
    code, message, suggestion = _STATUS_ERRORS.get(
        status, _PROVIDER if status >= 500 else _STATUS_ERRORS[400]
    )
    return Refusal(status, code, message, suggestion)


async def faulted(faults: Faults, endpoint: str, answer: Callable[[], Awaitable[Any]]) -> Response:
    """The endpoint's answer `{"data": ...}`, or the fault injected for it."""
    if faults.applies(endpoint) and faults.answering():
        f = faults.serve()
        if f.hang_s:
            await asyncio.sleep(f.hang_s)
        if f.account_inactive:
            raise refusal_for(403)
        if f.error500:
            raise refusal_for(500)
        if f.provider_error:
            raise Refusal(503, *_PROVIDER)
        if f.rate_limited or f.status:
            status = 429 if f.rate_limited else int(f.status or 500)
            refusal = refusal_for(status)
            headers = {} if f.retry_after_s is None else {"Retry-After": str(f.retry_after_s)}
            return JSONResponse(refusal.to_json(), status_code=status, headers=headers)
        if f.garbage:
            return mockfaults.garbage()
        if f.wrong_shape:
            return JSONResponse({"data": "not what you asked for"})
        if f.huge:
            return mockfaults.huge("data", HUGE_BYTES)
    return JSONResponse({"data": await answer()})


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether the header carries `api_key` in a scheme Lambda's spec allows: `Bearer <key>`,
    `Basic base64(<key>:)` (curl -u), `Basic base64(<key>):` and `Basic <key>`."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    value = value.strip()
    candidates: list[str] = []
    if scheme.lower() == "bearer":
        candidates.append(value)
    elif scheme.lower() == "basic":
        candidates += [value, value.removesuffix(":")]
        try:
            decoded = base64.b64decode(value.removesuffix(":"), validate=True)
            candidates.append(decoded.decode("utf-8").split(":", 1)[0])
        except (binascii.Error, UnicodeDecodeError):
            pass
    expected = api_key.encode("utf-8", "surrogateescape")
    found = False
    for candidate in candidates:  # compare all of them: no early exit to time
        given = candidate.encode("utf-8", "surrogateescape")
        found |= bool(candidate) and secrets.compare_digest(given, expected)
    return found


def invalid(message: str) -> Refusal:
    return Refusal(
        400,
        "global/invalid-parameters",
        f"Invalid request data: {message}"[:500],
        "Check the request body against the API reference.",
    )


async def spec_body(request: Request, path: str, model: type[T]) -> T:
    """The request's JSON body (with or without a Content-Type: SkyPilot sends none, and Lambda
    takes it), refused in Lambda's 400 shape unless Lambda's spec allows it."""
    try:
        body = loads(await request.body())
    except (UnsafeInput, ValueError):
        raise invalid("the body is not JSON") from None
    try:
        validate_request("lambda", "POST", path, body)
    except SpecError as exc:
        raise invalid(str(exc).removeprefix("lambda: ")) from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise invalid(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}") from None


class LambdaEnvelope:
    """ASGI middleware around the shared inbound bounds (`asgibounds`), whose refusals are
    `{"error": "<text>"}`: rewrites those into Lambda's `{"error": {"code", "message",
    "suggestion"}}`, so even a body too large or too deep is answered as Lambda answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: Message | None = None

        async def rewriting(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and _small_json_error(message):
                start = message  # sent once its body is seen
                return
            if start is not None and message["type"] == "http.response.body":
                held, start = start, None
                if message.get("more_body"):  # streamed: not one of the bounds' refusals
                    await send(held)
                    await send(message)
                    return
                body = _envelope(int(held["status"]), message.get("body", b""))
                headers = [(k, v) for k, v in held.get("headers", []) if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewriting)


def _small_json_error(start: Message) -> bool:
    headers = dict(start.get("headers") or [])
    length = headers.get(b"content-length", b"")
    return (
        int(start["status"]) >= 400
        and headers.get(b"content-type", b"").startswith(b"application/json")
        and length.isdigit()
        and int(length) < 16_384
    )


def _envelope(status: int, raw: bytes) -> bytes:
    """`{"error": "<text>"}` as Lambda's envelope; any other body unchanged."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(parsed, dict) or list(parsed) != ["error"]:
        return raw
    if not isinstance(parsed["error"], str):
        return raw
    refusal = refusal_for(status)
    return json.dumps(
        Refusal(status, refusal.code, parsed["error"][:500], refusal.suggestion).to_json()
    ).encode()
