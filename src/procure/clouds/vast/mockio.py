"""The mock Vast.ai's request side: Vast's filter operators, page tokens, ids, bodies and env
forms as the mock reads them, and its 429 answers (per endpoint, never with a Retry-After)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
from typing import Any

from fastapi import Request

from procure.bounds import UnsafeInput, loads
from procure.clouds.vast.mockstate import Refusal, refusal


def too_frequent(endpoint: str, threshold: float) -> Refusal:
    """Vast's 429s as its docs and spec show them, per endpoint; never a Retry-After."""
    text = f"API requests too frequent endpoint threshold={threshold:g}"
    if endpoint == "search":
        return Refusal(429, f"API requests too frequent: endpoint threshold={threshold:g}")
    if endpoint == "destroy":
        return refusal(429, "rate_limit_exceeded", text)
    return Refusal(429, {"detail": text})


def match(value: Any, cond: Any) -> bool:
    """One of Vast's filter conditions `{op: operand}` (numbers may come as strings)."""
    if not isinstance(cond, dict):
        return value == cond
    for op, want in cond.items():
        if op in ("in", "notin"):
            hit = value in want if isinstance(want, list) else False
            if hit != (op == "in"):
                return False
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            with contextlib.suppress(TypeError, ValueError):
                want = float(want)
        try:
            ok = compare(op, value, want)
        except TypeError:
            return False
        if not ok:
            return False
    return True


def spaced(cond: dict[str, Any]) -> dict[str, Any]:
    """A gpu_name condition with underscores read as spaces ("RTX_4090" is "RTX 4090")."""

    def one(v: Any) -> Any:
        return v.replace("_", " ") if isinstance(v, str) else v

    return {op: [one(x) for x in v] if isinstance(v, list) else one(v) for op, v in cond.items()}


def compare(op: str, value: Any, want: Any) -> bool:
    if op == "eq":
        return bool(value == want)
    if op == "neq":
        return bool(value != want)
    if op == "gt":
        return bool(value > want)
    if op == "lt":
        return bool(value < want)
    if op == "gte":
        return bool(value >= want)
    if op == "lte":
        return bool(value <= want)
    return False


def token(last_id: int) -> str:
    """An opaque page token (`next_token`, `after_token`)."""
    return base64.urlsafe_b64encode(json.dumps({"id": last_id}).encode()).decode()


def after(raw: str | None) -> int:
    """The last id of the previous page, from its `next_token` (0: the first page)."""
    if not raw:
        return 0
    try:
        value = json.loads(base64.urlsafe_b64decode(raw.encode()))["id"]
    except (ValueError, KeyError, TypeError):
        raise refusal(400, "invalid_request", "invalid after_token") from None
    if not isinstance(value, int):
        raise refusal(400, "invalid_request", "invalid after_token")
    return value


def filters(raw: str | None, name: str, required: bool = False) -> dict[str, Any]:
    if raw is None:
        if required:
            raise refusal(400, "invalid_args", f"{name} is required")
        return {}
    try:
        value = loads(raw, max_bytes=10_000)
    except UnsafeInput:
        raise refusal(400, "invalid_request", f"{name} is not JSON") from None
    if not isinstance(value, dict):
        raise refusal(400, "invalid_request", f"{name} must be a JSON object")
    return value


def int_id(raw: str) -> int:
    if not raw.isascii() or not raw.isdecimal() or len(raw) > 18:
        raise refusal(400, "invalid_args", "invalid id")
    return int(raw)


async def body_json(request: Request) -> dict[str, Any]:
    try:
        body = loads(await request.body(), max_bytes=1 << 20)
    except UnsafeInput:
        raise refusal(400, "invalid_args", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise refusal(400, "invalid_args", "the body must be a JSON object")
    return body


def overlaps(row: dict[str, Any], lo: Any, hi: Any) -> bool:
    try:
        return row["start"] <= float(hi) and row["end"] >= float(lo)
    except (TypeError, ValueError):
        raise refusal(400, "invalid_args", "day bounds must be numbers") from None


def parse_env(raw: Any) -> dict[str, str]:
    """The spec's Docker-flag string form: `-e K=V -p 8000:8000`."""
    if not isinstance(raw, str):
        return {}
    words, env = raw.split(), {}
    for flag, value in itertools.pairwise(words):
        if flag == "-e" and "=" in value:
            key, _, val = value.partition("=")
            env[key] = val
        elif flag == "-p":
            env[f"-p {value}"] = "1"
    return env
