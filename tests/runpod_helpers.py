"""Helpers for the RunPod tests: a recording transport, and validation of every recorded request
and answer against RunPod's REST v2 spec (answers' problem+json bodies included)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from procure.clouds.specs import spec, validate_answer, validate_request

TEMPLATES = [
    ("/v2/pods/{id}", re.compile(r"^/v2/pods/[^/]+$")),
    ("/v2/pods", re.compile(r"^/v2/pods$")),
    ("/v2/catalog/gpus", re.compile(r"^/v2/catalog/gpus$")),
    ("/v2/billing/pods", re.compile(r"^/v2/billing/pods$")),
]
RATE_LIMIT = re.compile(r'^"minute";r=\d+;t=\d+, "hour";r=\d+;t=\d+, "day";r=\d+;t=\d+$')


@dataclass
class Exchange:
    method: str
    path: str
    request_body: bytes
    status: int
    headers: httpx.Headers
    body: bytes
    query: tuple[str, ...] = ()


@dataclass
class Recorder(httpx.AsyncBaseTransport):
    """Real sockets underneath; keeps each request and answer."""

    seen: list[Exchange] = field(default_factory=list)
    inner: httpx.AsyncBaseTransport = field(default_factory=httpx.AsyncHTTPTransport)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        await response.aclose()
        self.seen.append(
            Exchange(
                request.method,
                request.url.path,
                request.content,
                response.status_code,
                response.headers,
                body,
                tuple(request.url.params.keys()),
            )
        )
        return httpx.Response(
            response.status_code, headers=response.headers, stream=httpx.ByteStream(body)
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


@cache
def _problem_validator() -> Draft202012Validator:
    registry = Registry().with_resource("urn:runpod", DRAFT202012.create_resource(spec("runpod")))
    return Draft202012Validator(
        {"$ref": "urn:runpod#/components/schemas/ErrorResponse"}, registry=registry
    )


def template(path: str) -> str:
    for name, pattern in TEMPLATES:
        if pattern.match(path):
            return name
    raise AssertionError(f"the client called a path outside the spec's: {path}")


def query_names(method: str, path: str) -> set[str]:
    """The query parameters the spec documents for this operation."""
    document = spec("runpod")
    names = set()
    for param in document["paths"][path][method.lower()].get("parameters", []):
        if "$ref" in param:
            param = document["components"]["parameters"][param["$ref"].rsplit("/", 1)[-1]]
        if param.get("in") == "query":
            names.add(param["name"])
    return names


def validate(exchange: Exchange) -> None:
    """Raise unless the request and the answer are what RunPod's spec allows."""
    path = template(exchange.path)
    unknown = set(exchange.query) - query_names(exchange.method, path)
    assert not unknown, f"{exchange.method} {path}: query parameters not in the spec: {unknown}"
    if exchange.request_body:
        validate_request("runpod", exchange.method, path, json.loads(exchange.request_body))
    kind = exchange.headers.get("content-type", "")
    if exchange.status == 204:
        assert not exchange.body
    elif kind.startswith("application/problem+json"):
        _problem_validator().validate(json.loads(exchange.body))
        assert json.loads(exchange.body)["status"] == exchange.status
    else:
        body = json.loads(exchange.body)
        validate_answer("runpod", exchange.method, path, exchange.status, body)
    if exchange.status != 401:  # every authenticated answer carries the RateLimit headers
        assert RATE_LIMIT.match(exchange.headers["ratelimit"]), exchange.headers
        assert exchange.headers["ratelimit-policy"].startswith('"minute";q=')
    if exchange.status == 429 and "retry-after" in exchange.headers:
        assert exchange.headers["retry-after"].isdigit()


def validate_all(recorder: Recorder, *, skip: set[int] | None = None) -> int:
    """Validate every recorded exchange but those at the indexes in `skip` (injected garbage);
    the number validated."""
    count = 0
    for index, exchange in enumerate(recorder.seen):
        if skip and index in skip:
            continue
        validate(exchange)
        count += 1
    return count


def admin(url: str, key: str, method: str, path: str, body: Any = None) -> Any:
    answer = httpx.request(
        method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    answer.raise_for_status()
    return answer.json()
