"""The agent's view of a cloud instance's job runner (the GPU node's `/jobs` routes): submit a job
once per idempotency key, read its status, page its logs, cancel it. The node's token goes to the
instance's own address only, checked against what the provider says before anything is sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from procure.bounds import loads
from procure.httpbounds import bounded_client
from procure.safetext import outside, redact, remember_secret

NODE_TIMEOUT_S = 15.0
MAX_CURSOR = 2**31 - 1  # the job's log cursor column (an INTEGER: 32 bits on PostgreSQL)
TERMINAL = frozenset({"completed", "failed", "cancelled"})


class NodeError(Exception):
    """The node did not answer, or answered something that cannot be true."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))  # stored and shown: no token a node echoed


@dataclass(frozen=True)
class NodeJob:
    id: str
    status: str  # queued | running | completed | failed | cancelled
    progress: float
    checkpoint: str | None = None
    exit_code: int | None = None
    error: str | None = None


class NodeRunner(Protocol):
    async def submit(
        self,
        *,
        command: list[str],
        image: str | None,
        env: dict[str, str],
        resume_from: str | None,
        checkpoint_dir: str | None,
        idempotency_key: str,
    ) -> NodeJob: ...

    async def status(self, job_id: str) -> NodeJob | None:
        """The job, or None when the node does not know it (it restarted)."""
        ...

    async def logs(self, job_id: str, after: int) -> tuple[list[str], int]:
        """Lines after the cursor `after`, and the next cursor."""
        ...

    async def cancel(self, job_id: str) -> None: ...

    async def aclose(self) -> None: ...


NodeClientFactory = Callable[[str, str], NodeRunner]
"""(node_url, token) → the node's job runner."""


def checked_node_url(url: str, expected_host: str | None) -> str:
    """`url` as the node's own `scheme://host:port` when it is http(s) to exactly the instance's
    address as the provider gave it (`procure.gpu.jobclient.check_node_url`); `NodeError` with
    the reason otherwise. Only the returned URL is used, so the token goes where was checked."""
    from procure.gpu.jobclient import NodeUrlRefused, check_node_url

    if not expected_host:
        raise NodeError("the provider gave no address for the instance")
    try:
        return check_node_url(url, expected_host=expected_host)
    except NodeUrlRefused as exc:
        raise NodeError(str(exc)) from None


def _job(data: Any) -> NodeJob:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise NodeError("answer is not a job")
    status = data.get("status")
    progress = data.get("progress")
    if status not in ("queued", "running", *TERMINAL):
        raise NodeError(f"unknown job status {str(status)[:40]!r}")
    if not isinstance(progress, int | float) or not 0 <= progress <= 1:
        raise NodeError("job progress is not a number in [0, 1]")
    checkpoint = data.get("checkpoint")
    code = data.get("exitCode")
    error = data.get("error")
    return NodeJob(
        id=data["id"][:100],
        status=status,
        progress=float(progress),
        checkpoint=checkpoint[:500] if isinstance(checkpoint, str) else None,
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        error=outside(error, 1000) if isinstance(error, str) else None,
    )


class HttpNode:
    """The node's job runner over HTTP, with its per-instance bearer token."""

    def __init__(
        self, node_url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        remember_secret(token)  # a node that echoes it must not have it stored or shown
        self._http = bounded_client(
            deadline_s=NODE_TIMEOUT_S,
            transport=transport,
            base_url=node_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            follow_redirects=False,  # a redirect could carry the token elsewhere
        )

    def __repr__(self) -> str:
        return f"HttpNode({self._http.base_url!s})"

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise NodeError(f"{method} {path}: {type(exc).__name__}") from None
        if response.status_code == 404 and method == "GET":
            return None
        if response.status_code >= 300:
            raise NodeError(f"{method} {path} answered {response.status_code}")
        try:
            return loads(response.content)
        except ValueError as exc:
            raise NodeError(f"{method} {path}: malformed answer ({exc})") from None

    async def submit(
        self,
        *,
        command: list[str],
        image: str | None,
        env: dict[str, str],
        resume_from: str | None,
        checkpoint_dir: str | None,
        idempotency_key: str,
    ) -> NodeJob:
        body: dict[str, Any] = {"command": command, "env": env, "idempotencyKey": idempotency_key}
        if image:
            body["image"] = image
        if resume_from:
            body["resumeFrom"] = resume_from
        if checkpoint_dir:
            body["checkpointDir"] = checkpoint_dir
        return _job(await self._call("POST", "/jobs", json=body))

    async def status(self, job_id: str) -> NodeJob | None:
        data = await self._call("GET", f"/jobs/{job_id}")
        return None if data is None else _job(data)

    async def logs(self, job_id: str, after: int) -> tuple[list[str], int]:
        data = await self._call("GET", f"/jobs/{job_id}/logs", params={"after": after})
        if not isinstance(data, dict) or not isinstance(data.get("lines"), list):
            return [], after
        lines = [
            str(item.get("text", ""))[:2000] for item in data["lines"] if isinstance(item, dict)
        ]
        following = data.get("next")
        if isinstance(following, int) and following > MAX_CURSOR:
            # Stored as it came, it would fail the poll's write in every tick of the run.
            raise NodeError(f"log cursor past {MAX_CURSOR}")
        cursor = following if isinstance(following, int) and following >= after else after
        return lines, cursor

    async def cancel(self, job_id: str) -> None:
        await self._call("POST", f"/jobs/{job_id}/cancel")

    async def aclose(self) -> None:
        await self._http.aclose()


def http_node(node_url: str, token: str) -> NodeRunner:
    return HttpNode(node_url, token)
