"""The providers' own OpenAPI documents (copied from their publishers; Vast.ai's YAML as JSON), and
JSON Schema 2020-12 validation of a request or answer against them, the spec as root. Clients'
tests and the mock clouds use these, so neither can drift from the real API."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SpecName = Literal["lambda", "runpod", "vast"]
__all__ = [
    "SpecError",
    "answer_schema",
    "request_schema",
    "spec",
    "validate_answer",
    "validate_request",
]


class SpecError(ValueError):
    """A body does not match the provider's spec (or the spec has no such operation)."""


@cache
def spec(name: SpecName) -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())


@cache
def _registry(name: SpecName) -> Registry:
    return Registry().with_resource(f"urn:{name}", DRAFT202012.create_resource(spec(name)))


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _operation(name: SpecName, method: str, path: str) -> dict[str, Any]:
    try:
        return spec(name)["paths"][path][method.lower()]
    except KeyError:
        raise SpecError(f"{name}: the spec has no {method.upper()} {path}") from None


def answer_schema(
    name: SpecName, method: str, path: str, status: int, content_type: str = "application/json"
) -> dict[str, Any] | None:
    """The `$ref` schema the spec gives for this answer, or None when it gives no body schema.
    Falls back to the operation's `default` answer, as OpenAPI says."""
    responses = _operation(name, method, path).get("responses", {})
    key = str(status) if str(status) in responses else "default" if "default" in responses else None
    if key is None:
        raise SpecError(f"{name}: {method.upper()} {path} documents no {status} answer")
    content = responses[key].get("content") or {}
    if content_type not in content or "schema" not in content[content_type]:
        return None
    ref = _pointer("paths", path, method.lower(), "responses", key, "content", content_type)
    return {"$ref": f"urn:{name}#/{ref}/schema"}


def request_schema(
    name: SpecName, method: str, path: str, content_type: str = "application/json"
) -> dict[str, Any] | None:
    body = _operation(name, method, path).get("requestBody") or {}
    if content_type not in (body.get("content") or {}):
        return None
    ref = _pointer("paths", path, method.lower(), "requestBody", "content", content_type)
    return {"$ref": f"urn:{name}#/{ref}/schema"}


def _validate(name: SpecName, schema: dict[str, Any] | None, body: Any, what: str) -> None:
    if schema is None:
        return
    try:
        Draft202012Validator(schema, registry=_registry(name)).validate(body)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise SpecError(f"{name}: {what} at {where}: {exc.message[:300]}") from None


def validate_answer(
    name: SpecName,
    method: str,
    path: str,
    status: int,
    body: Any,
    content_type: str = "application/json",
) -> None:
    """Raise SpecError unless `body` is what the spec allows for this operation's `status`.
    `path` is the spec's template (`/api/v1/instances/{id}`), not the concrete URL."""
    schema = answer_schema(name, method, path, status, content_type)
    _validate(name, schema, body, f"{method.upper()} {path} {status}")


def validate_request(
    name: SpecName, method: str, path: str, body: Any, content_type: str = "application/json"
) -> None:
    """Raise SpecError unless `body` is a request body the spec allows for this operation."""
    _validate(
        name, request_schema(name, method, path, content_type), body, f"{method.upper()} {path}"
    )
