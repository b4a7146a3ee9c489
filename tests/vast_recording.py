"""Test helper: an httpx transport that records every request and answer of the Vast.ai
client, and their validation against Vast's spec (with the spec's known bugs, as the notes
list them, applied on purpose and nowhere else)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx

from procure.clouds.specs import answer_schema, validate_answer, validate_request

# Concrete path → (the spec's template). Vast's paths keep their trailing slash on the wire.
TEMPLATES = [
    (re.compile(r"^/api/v0/bundles/$"), "/api/v0/bundles"),
    (re.compile(r"^/api/v0/asks/\d+/$"), "/api/v0/asks/{id}"),
    (re.compile(r"^/api/v0/instances/\d+/$"), "/api/v0/instances/{id}"),
    (re.compile(r"^/api/v1/instances/$"), "/api/v1/instances"),
    (re.compile(r"^/api/v0/charges/$"), "/api/v0/charges"),
]


@dataclass
class Exchange:
    method: str
    path: str
    query: dict[str, str]
    request: Any
    status: int
    content_type: str
    body: bytes


class Recorder(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content) if request.content else None
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        await response.aclose()
        self.exchanges.append(
            Exchange(
                request.method,
                request.url.path,
                dict(request.url.params),
                sent,
                response.status_code,
                response.headers.get("content-type", ""),
                body,
            )
        )
        headers = [(k, v) for k, v in response.headers.items() if k != "content-encoding"]
        return httpx.Response(response.status_code, headers=headers, stream=httpx.ByteStream(body))

    async def aclose(self) -> None:
        await self.inner.aclose()


def template(path: str) -> str:
    for pattern, name in TEMPLATES:
        if pattern.match(path):
            return name
    raise AssertionError(f"the client called {path}, which is not one of Vast's paths")


def docker_env(env: dict[str, str]) -> str:
    """The spec's string form of the env dict Vast takes (spec bug: it types env a string)."""
    return " ".join(k if k.startswith("-p ") else f"-e {k}={v}" for k, v in env.items())


def validate(exchanges: list[Exchange]) -> int:
    """Validate every recorded request and every JSON answer the spec documents; the number of
    answers validated."""
    checked = 0
    for x in exchanges:
        name = template(x.path)
        method = x.method.lower()
        assert "Authorization" not in x.query and "api_key" not in x.query
        if x.request is not None:
            body = dict(x.request)
            if isinstance(body.get("env"), dict):
                body["env"] = docker_env(body["env"])
            validate_request("vast", method, name, body)
        if name == "/api/v1/instances":
            assert 0 < int(x.query.get("limit", "25")) <= 25
            assert isinstance(json.loads(x.query.get("select_filters", "{}")), dict)
        if name == "/api/v0/charges":
            assert "day" in json.loads(x.query["select_filters"])
        if "json" not in x.content_type:
            continue  # plain-text 429s and injected garbage: the spec has no schema for them
        try:
            parsed = json.loads(x.body)
        except ValueError:
            continue  # the injected huge body is cut off before it parses
        try:
            answer_schema("vast", method, name, x.status)
        except Exception:
            continue  # a status the spec does not document (injected 5xx)
        if name == "/api/v0/instances/{id}" and method == "get" and x.status == 200:
            if parsed.get("instances") is None:
                continue  # spec bug: Vast answers {"instances": null} for a gone instance
            parsed = {"instances": {k: v for k, v in parsed["instances"].items() if k != "ports"}}
            # spec bug: showInstance types ports as int[]; Vast sends the object form, which
            # showInstances' schema (validated on the list) does type.
        validate_answer("vast", method, name, x.status, parsed)
        checked += 1
    return checked
