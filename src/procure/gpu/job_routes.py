"""The job runner's routes on the GPU node: `POST /jobs`, `GET /jobs/{id}`,
`GET /jobs/{id}/logs`, `POST /jobs/{id}/cancel` (bearer token required, as on its other routes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from procure.gpu.jobs import Job, JobRefused, JobRunner

MAX_ARGS = 256
MAX_ARG_CHARS = 4_096
MAX_COMMAND_CHARS = 64 << 10
MAX_ENV = 128
MAX_ENV_VALUE_CHARS = 8_192
MAX_ENV_CHARS = 64 << 10
MAX_PAGE_LINES = 1_000
MAX_PAGE_CHARS = 256 << 10  # even fully escaped (6 bytes a character) under a 2 MiB answer
JOB_ID = r"^job_[0-9a-f]{16}$"

Url = Annotated[str, StringConstraints(min_length=1, max_length=2_048)]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    command: list[Annotated[str, StringConstraints(max_length=MAX_ARG_CHARS)]] = Field(
        default_factory=list, max_length=MAX_ARGS
    )
    image: (
        Annotated[
            str,
            StringConstraints(max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$"),
        ]
        | None
    ) = None
    env: dict[
        Annotated[str, StringConstraints(max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
        Annotated[str, StringConstraints(max_length=MAX_ENV_VALUE_CHARS)],
    ] = Field(default_factory=dict, max_length=MAX_ENV)
    resume_from: Url | None = Field(None, alias="resumeFrom")
    checkpoint_dir: Url | None = Field(None, alias="checkpointDir")
    idempotency_key: (
        Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[ -~]+$")] | None
    ) = Field(None, alias="idempotencyKey")

    @field_validator("command")
    @classmethod
    def _command_size(cls, value: list[str]) -> list[str]:
        if sum(len(a) for a in value) > MAX_COMMAND_CHARS:
            raise ValueError(f"the command has more than {MAX_COMMAND_CHARS:,} characters")
        if any("\x00" in a for a in value):
            raise ValueError("the command has a NUL character")
        return value

    @field_validator("env")
    @classmethod
    def _env_size(cls, value: dict[str, str]) -> dict[str, str]:
        if sum(len(k) + len(v) for k, v in value.items()) > MAX_ENV_CHARS:
            raise ValueError(f"env has more than {MAX_ENV_CHARS:,} characters")
        if any("\x00" in v for v in value.values()):
            raise ValueError("an env value has a NUL character")
        return value


def job_router(
    runner: JobRunner, require_token: Callable[..., None], allowed: Callable[[], None]
) -> APIRouter:
    """The routes over `runner`; `require_token` checks the bearer, `allowed` refuses jobs on a
    node that has no token (anyone who reaches the port could otherwise run any command)."""
    router = APIRouter(dependencies=[Depends(require_token), Depends(allowed)])

    def find(job_id: str) -> Job:
        job = runner.get(job_id)
        if job is None:
            raise HTTPException(
                404, f"no job {job_id} on this node (a node forgets its jobs when it restarts)"
            )
        return job

    @router.post("/jobs", status_code=201)
    async def submit(body: JobRequest) -> JSONResponse:
        if not body.command and body.image is None:
            raise HTTPException(422, "invalid request: give a command, or an image")
        try:
            job, new = runner.submit(
                command=body.command,
                image=body.image,
                env=body.env,
                resume_from=body.resume_from,
                checkpoint_dir=body.checkpoint_dir,
                key=body.idempotency_key,
            )
        except JobRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return JSONResponse(job.to_json(), status_code=201 if new else 200)

    @router.get("/jobs")
    async def jobs() -> dict[str, Any]:
        return {"jobs": [j.to_json() for j in runner.jobs.values()]}

    @router.get("/jobs/{job_id}")
    async def status(job_id: str) -> dict[str, Any]:
        return find(job_id).to_json()

    @router.get("/jobs/{job_id}/logs")
    async def logs(
        job_id: str,
        after: Annotated[int, Query(ge=0, le=2**53)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_LINES)] = 200,
    ) -> dict[str, Any]:
        job = find(job_id)
        return {"id": job.id, "status": job.status} | job.page(after, limit, MAX_PAGE_CHARS)

    @router.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict[str, Any]:
        return runner.cancel(find(job_id)).to_json()

    return router
