"""The client procure's agent and gateway use to run a job on a node's job runner: submit,
status, logs, cancel, each bounded. A node's token goes only to that node's own address."""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from types import TracebackType
from typing import Any

import httpx

from procure.bounds import MAX_TEXT_CHARS, UnsafeInput, clip, loads
from procure.httpbounds import bounded_client
from procure.safetext import outside

_HOST_CHARS = re.compile(r"^[A-Za-z0-9.\-]+$")
_JOB_ID = re.compile(r"^job_[0-9a-f]{16}$")
_STATUSES = frozenset({"queued", "running", "completed", "failed", "cancelled"})


class NodeUrlRefused(ValueError):
    """A node address that is not plainly http(s)://<the instance's host>:<port>."""


class NodeJobError(Exception):
    """A call to the node's job runner that did not give an answer we can use. `status` is the
    node's HTTP status (None when there was no answer); `retryable` says whether asking again
    may help (timeouts, refused connections, 5xx, 429)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def _host(text: str) -> str:
    """A host as compared: lower case, IPv6 without brackets and in its short form."""
    bare = text.strip().lower()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return bare


def check_node_url(url: str, *, expected_host: str) -> str:
    """`url` as `scheme://host:port` when it is http(s) to exactly `expected_host` (the instance's
    address from its cloud), with no user info, path, query or fragment; `NodeUrlRefused` else.
    Only the returned URL is ever used, so what httpx connects to is what was checked."""
    if not isinstance(url, str) or len(url) > 300:
        raise NodeUrlRefused("a node URL is a string of at most 300 characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        raise NodeUrlRefused("a node URL has no spaces, control characters or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise NodeUrlRefused(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise NodeUrlRefused("a node URL is http:// or https://")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise NodeUrlRefused("a node URL carries no user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in url or "#" in url:
        raise NodeUrlRefused("a node URL has no path, query or fragment")
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal; no zone (`%25eth0`), no other spelling
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    if not host or "%" in host or (":" not in host and not _HOST_CHARS.match(host)):
        raise NodeUrlRefused("a node URL names a plain host name or IP address")
    if not expected_host or _host(host) != _host(expected_host):
        raise NodeUrlRefused(
            f"the node URL's host {host!r} is not the instance's address {expected_host!r}"
        )
    if port is not None and not 1 <= port <= 65535:
        raise NodeUrlRefused("a node URL's port is 1 to 65535")
    shown = f"[{_host(host)}]" if ":" in _host(host) else _host(host)
    return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")


class NodeJobClient:
    """Talks to one node's job runner. The URL is checked (`check_node_url`, against
    `expected_host`, default the URL's own host) before the token is ever attached; redirects
    are not followed, so the token cannot be led anywhere else."""

    def __init__(
        self,
        node_url: str,
        token: str,
        *,
        expected_host: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        deadline_s: float = 10.0,
    ) -> None:
        own = urllib.parse.urlsplit(node_url).hostname if isinstance(node_url, str) else None
        self.base_url = check_node_url(node_url, expected_host=expected_host or own or "")
        self._http = bounded_client(
            deadline_s=deadline_s,
            transport=transport,
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "procure-jobclient"},
            follow_redirects=False,
        )

    def __repr__(self) -> str:  # never the token
        return f"NodeJobClient({self.base_url!r})"

    async def __aenter__(self) -> NodeJobClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(
        self,
        *,
        command: list[str] | None = None,
        image: str | None = None,
        env: dict[str, str] | None = None,
        resume_from: str | None = None,
        checkpoint_dir: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a job (or find the one already started under `idempotency_key`)."""
        body: dict[str, Any] = {"command": command or [], "env": env or {}}
        for name, value in (
            ("image", image),
            ("resumeFrom", resume_from),
            ("checkpointDir", checkpoint_dir),
            ("idempotencyKey", idempotency_key),
        ):
            if value is not None:
                body[name] = value
        return _job(await self._call("submit", "POST", "/jobs", json=body))

    async def status(self, job_id: str) -> dict[str, Any]:
        return _job(await self._call("status", "GET", f"/jobs/{_segment(job_id)}"))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return _job(await self._call("cancel", "POST", f"/jobs/{_segment(job_id)}/cancel"))

    async def logs(self, job_id: str, *, after: int = 0, limit: int = 200) -> dict[str, Any]:
        """One page: `{"lines": [{"seq", "text"}], "next", "dropped", "done"}`; ask again with
        `after=next`."""
        params = {"after": max(0, int(after)), "limit": min(1_000, max(1, int(limit)))}
        page = await self._call("logs", "GET", f"/jobs/{_segment(job_id)}/logs", params=params)
        lines, following = page.get("lines"), page.get("next")
        if not isinstance(lines, list) or not _cursor(following, params["after"]):
            raise NodeJobError("logs: the node's answer is not a log page")
        clean = [
            {"seq": line["seq"], "text": clip(line["text"])}
            for line in lines
            if isinstance(line, dict)
            and isinstance(line.get("seq"), int)
            and isinstance(line.get("text"), str)
        ]
        return {
            "lines": clean,
            "next": page["next"],
            "dropped": page.get("dropped") if isinstance(page.get("dropped"), int) else 0,
            "done": page.get("done") is True,
        }

    async def _call(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise NodeJobError(f"{what}: {_describe(exc)}") from exc
        status = response.status_code
        try:
            body = loads(response.content)
        except UnsafeInput as exc:
            raise NodeJobError(
                f"{what}: malformed answer (HTTP {status}): {outside(exc, 200)}",
                status=status,
                retryable=status >= 500 or status == 429 or status < 300,
            ) from None
        if status >= 300 or not isinstance(body, dict):
            detail = body.get("error") if isinstance(body, dict) else body
            raise NodeJobError(
                f"{what}: HTTP {status}: {outside(detail, 500)}",
                status=status,
                retryable=status >= 500 or status == 429,
            )
        return body


def _job(body: dict[str, Any]) -> dict[str, Any]:
    """The job as the node answered it, checked to be what a caller may act on."""
    job_id, status, progress = body.get("id"), body.get("status"), body.get("progress")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id) or status not in _STATUSES:
        raise NodeJobError("the node's answer is not a job")
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise NodeJobError("the node's answer has no progress")
    progress = _finite(progress, "progress")
    checkpoint = body.get("checkpoint")
    exit_code = body.get("exitCode")
    error = body.get("error")
    return {
        "id": job_id,
        "status": status,
        "progress": min(1.0, max(0.0, progress)),
        "checkpoint": clip(checkpoint, 2_048) if isinstance(checkpoint, str) else None,
        "exitCode": exit_code if isinstance(exit_code, int) else None,
        "error": outside(error, MAX_TEXT_CHARS) if isinstance(error, str) else None,
        "startedAt": _number(body.get("startedAt")),
        "endedAt": _number(body.get("endedAt")),
    }


# A node takes an `after` up to 2^53, but its caller keeps the cursor in a 32-bit INTEGER column
# (the gateway's log_cursor): one past it would fail that write in every poll. No honest node
# prints two billion lines.
MAX_CURSOR = 2**31 - 1


def _cursor(value: Any, after: int) -> bool:
    """Whether `value` is a log cursor that moves forward: an integer (not a JSON `true`), not
    before the one asked with (the caller would relay lines twice) and one its caller can store
    and ask again with."""
    return isinstance(value, int) and not isinstance(value, bool) and after <= value <= MAX_CURSOR


def _number(value: Any) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return _finite(value, "time")


def _finite(value: int | float, what: str) -> float:
    # JSON holds integers no float holds (float() raises OverflowError, which no caller
    # catches) and 1e400 parses as infinity: either is a node answering nonsense.
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise NodeJobError(f"the node's answer has a {what} that is not a finite number")
    return number


def _segment(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise NodeJobError(f"not a job id: {clip(str(job_id), 80)!r}", retryable=False)
    return job_id


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    return outside(f"{type(exc).__name__}: {exc}", 500)
