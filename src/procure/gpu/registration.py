"""Registration with a go-livepeer orchestrator (BYOC): `POST /capability/register` with the raw
secret in `Authorization` and the node's own token in the body's `token` (go-livepeer sends it as
`Bearer` when it forwards jobs), retried with backoff until accepted, repeated periodically so an
orchestrator that restarted (and forgot us) learns us again, and `unregister` on a clean stop.
A refusal (400 `invalid authorization`, any other 4xx but 408, 425 and 429, which ask to try
again later) is reported and not retried, unless the orchestrator had accepted the node before."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from procure.bounds import clip
from procure.gpu.settings import GpuWorkerSettings, capability_token
from procure.httpbounds import bounded_client, tls_context
from procure.safetext import outside, redact, show_url

log = logging.getLogger(__name__)


class Refused(Exception):
    """The orchestrator refused the registration: retrying the same request cannot help."""


class NotAccepted(Exception):
    """The orchestrator could not be reached or failed: worth another try later."""


@dataclass
class Registration:
    """What the node knows of its registration (shown on /healthz; never the secret)."""

    orchestrator: str
    name: str
    state: str = "starting"  # registering | registered | retrying | refused | unregistered
    attempts: int = 0
    accepted: int = 0
    last_error: str | None = None
    registered_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        # Shown on the node's open /healthz: no password in the URL, no secret in an error.
        shown = asdict(self)
        shown["orchestrator"] = show_url(self.orchestrator)
        shown["last_error"] = redact(self.last_error) if self.last_error else None
        return shown


# go-livepeer's answers (byoc/job_orchestrator.go) that the worker branches on.
INVALID_AUTHORIZATION = "invalid authorization"  # 400: the -orchSecret does not match
REGISTER_ERROR = "Error registering capability"  # 400: the body was not a capability


def capability(settings: GpuWorkerSettings, url: str) -> dict[str, Any]:
    """The body go-livepeer's `/capability/register` expects (core.ExternalCapability). `token`
    is what the orchestrator puts in `Authorization: Bearer` when it forwards a job to `url`:
    one derived from the node's own, which opens the capability's routes only (a pool the
    owner registers with must not run commands on the instance), left out when the node has
    no token (go-livepeer then sends none)."""
    body: dict[str, Any] = {
        "name": settings.capability_name,
        "description": settings.capability_description,
        "url": url,
        "capacity": settings.capability_capacity,
        "price_per_unit": settings.capability_price_per_unit,
        "price_scaling": settings.capability_price_scaling,
        "currency": settings.capability_currency,
        "requirements": {"video_ingress": False, "video_egress": False, "data_output": True},
    }
    if settings.token is not None:
        body["token"] = capability_token(settings.token.get_secret_value())
    return body


def orchestrator_client(
    settings: GpuWorkerSettings, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """Bounded client for the orchestrator; self-signed TLS only when explicitly allowed."""
    verify = False if settings.orchestrator_insecure_tls else tls_context()
    inner = transport or httpx.AsyncHTTPTransport(verify=verify)
    return bounded_client(deadline_s=settings.orchestrator_timeout_s, transport=inner)


def _authorization(secret: str) -> dict[str, bytes]:
    """The raw secret as its UTF-8 bytes, which go-livepeer compares with its -orchSecret: as a
    str, httpx encodes header values as ASCII and raises UnicodeEncodeError (not an HTTPError)
    on any other character, which ended the registration task without a word."""
    return {"Authorization": secret.encode("utf-8")}


async def register_once(
    client: httpx.AsyncClient, orchestrator: str, secret: str, body: dict[str, Any]
) -> None:
    url = f"{orchestrator.rstrip('/')}/capability/register"
    try:
        response = await client.post(url, json=body, headers=_authorization(secret))
    except httpx.HTTPError as exc:
        reason = clip(str(exc) or type(exc).__name__, 200)
        raise NotAccepted(f"no answer from {url}: {reason}") from None
    # Decoded here, not by `response.text`: a charset it names but its bytes do not follow
    # (utf-16 without a BOM, rot13) raises there, and would end the registration task.
    text = response.content.decode("utf-8", "replace").strip()
    if response.status_code == 200:
        return
    # What it said becomes the error shown on the open /healthz and logged: an answer that
    # echoes the request (a proxy's error page) must not show the credentials we sent.
    said = outside(text, 200, (secret, body.get("token")))
    text = clip(text, 200)  # what the answer is judged by, as said before the credentials go
    # Older mocks and proxies spell it with an underscore; go-livepeer with a space.
    if response.status_code == 400 and INVALID_AUTHORIZATION in text.replace("_", " "):
        raise Refused(
            f"the orchestrator refused our secret (HTTP 400 {said}): check "
            "ORCHESTRATOR_SECRET against the orchestrator's -orchSecret"
        )
    if response.status_code == 400 and text.startswith(REGISTER_ERROR):
        raise Refused(f"the orchestrator could not read our capability: {said}")
    if response.status_code in (408, 425, 429):  # too early, too often, too slow: not a no
        raise NotAccepted(f"HTTP {response.status_code} from {url}: {said}")
    if 400 <= response.status_code < 500:
        raise Refused(
            f"the orchestrator refused the registration: HTTP {response.status_code} {said}"
        )
    raise NotAccepted(f"HTTP {response.status_code} from {url}: {said}")


async def keep_registered(
    client: httpx.AsyncClient,
    settings: GpuWorkerSettings,
    body: dict[str, Any],
    state: Registration,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Register until accepted (exponential backoff with jitter), then again every
    `register_every_s` (re-registering replaces the entry, so it is harmless when remembered and
    restores it when forgotten). Returns only when refused; cancel it to stop."""
    secret = settings.orchestrator_secret.get_secret_value() if settings.orchestrator_secret else ""
    delay = settings.retry_min_s
    while True:
        state.attempts += 1
        state.state = "registering" if state.accepted == 0 else state.state
        try:
            await register_once(client, state.orchestrator, secret, body)
        except (Refused, NotAccepted) as exc:
            if isinstance(exc, Refused) and state.accepted == 0:
                state.state, state.last_error = "refused", str(exc)
                log.error("capability %s not registered: %s; not retrying", state.name, exc)
                return
            # A refusal after it accepted this very request before is a change on its side (a
            # proxy's 404 while it restarts, a secret being rotated), not ours: tried again too.
            state.state, state.last_error = "retrying", str(exc)
            log.warning("capability %s not registered (%s); again in %.1fs", state.name, exc, delay)
            await sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, settings.retry_max_s)
            continue
        if state.state != "registered":
            log.info("capability %s registered with %s", state.name, state.orchestrator)
        state.state, state.last_error = "registered", None
        state.accepted += 1
        state.registered_at = time.time()
        delay = settings.retry_min_s
        await sleep(settings.register_every_s)


async def unregister(client: httpx.AsyncClient, orchestrator: str, secret: str, name: str) -> bool:
    """`POST /capability/unregister` with the name as the body; False when it did not work."""
    url = f"{orchestrator.rstrip('/')}/capability/unregister"
    try:
        response = await client.post(url, content=name.encode(), headers=_authorization(secret))
    except httpx.HTTPError as exc:
        log.warning("could not unregister %s: %s", name, clip(str(exc), 200))
        return False
    if response.status_code != 200:
        log.warning("could not unregister %s: HTTP %s", name, response.status_code)
        return False
    log.info("capability %s unregistered from %s", name, orchestrator)
    return True
