"""The mock Lambda Cloud's admin API (not Lambda's; Bearer or Basic with the mock's key): the
routes the three mocks share (`mockworld.server`: billing by Lambda's rule, the clock,
preemption) and its own: state, faults, capacity, plus the fleet's workload and queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from procure.clouds.lambda_cloud.mockfaults import Faults
from procure.clouds.lambda_cloud.mockstate import MockCloudState, MockInstance, Refusal
from procure.clouds.mockworld.nodes import Nodes
from procure.clouds.mockworld.server import admin_router as common_admin_router
from procure.clouds.mockworld.workload import JobSpec, WorkloadError, parse_csv, synthetic


class SyntheticBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    hours: float = Field(24.0, gt=0, le=720)
    jobs_per_hour: float = Field(12.0, ge=0, le=10_000)
    bursts: int = Field(2, ge=0, le=100)
    burst_jobs: int = Field(30, ge=0, le=10_000)
    mean_duration_s: float = Field(1800.0, gt=0, le=86_400)


class WorkloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csv: str | None = Field(None, max_length=900_000)
    synthetic: SyntheticBody | None = None


class CapacityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instance_type: str = Field(max_length=100)
    region: str = Field(max_length=100)
    count: int = Field(ge=0, le=10_000)


def admin_router(
    state: MockCloudState,
    nodes: Nodes[str],
    faults: Faults,
    instance_json: Callable[[MockInstance], dict[str, Any]],
) -> APIRouter:
    """The admin routes; the caller adds the auth dependency."""
    config = state.config
    router = APIRouter()

    @router.get("/admin/queue")
    async def queue() -> dict[str, Any]:
        return await asyncio.to_thread(state.figures)

    @router.get("/admin/state")
    async def admin_state() -> dict[str, Any]:
        with state.lock:
            now = state.step()
            return {
                "now_s": round(now, 3),
                "speed": state.clock.speed,
                "faults": faults.model_dump(),
                "node_port": config.node_port,
                "instances": [
                    {
                        "id": i.id,
                        "name": i.name,
                        "status": i.status,
                        "ip": i.ip,
                        "node_url": f"http://{i.ip}:{config.node_port}"
                        if i.ip and i.status in ("active", "unhealthy")
                        else None,
                        "busy_gpus": sum(state.cluster.busy(i.id)),
                        "launched_at_s": round(i.launched_at, 3),
                        "billedMicroUsd": state.billed(i, now),
                    }
                    for i in state.instances.values()
                ],
            }

    @router.post("/admin/faults")
    async def set_faults(body: Faults) -> dict[str, Any]:
        faults.replace(body)
        with state.lock:
            state.never_boot = body.never_boot
        return faults.model_dump()

    @router.post("/admin/workload")
    async def add_workload(body: WorkloadBody) -> dict[str, Any]:
        try:
            jobs = _jobs(body)
            with state.lock:
                now = state.step()
                added = state.cluster.submit(jobs, now)
        except (WorkloadError, ValueError) as exc:
            raise Refusal(
                400,
                "global/invalid-parameters",
                str(exc)[:500],
                "Send csv (submit_s,gpus,duration_s) or synthetic.",
            ) from None
        return {"jobs": added, "offset_s": round(now, 3)}

    @router.post("/admin/capacity")
    async def set_capacity(body: CapacityBody) -> dict[str, Any]:
        with state.lock:
            config.capacity.setdefault(body.instance_type, {})[body.region] = body.count
            return {"capacity": config.capacity}

    async def settle() -> float:
        return await asyncio.to_thread(state.step)

    async def preempt(instance_id: str) -> dict[str, Any]:
        """A host that dies: the instance ends as `preempted`, its node and billing stop."""
        inst = await asyncio.to_thread(state.preempt, instance_id)
        if config.nodes:
            await nodes.reconcile()
        with state.lock:
            return instance_json(inst)

    async def unhealthy(instance_id: str) -> dict[str, Any]:
        """A lost GPU."""
        inst = await asyncio.to_thread(state.make_unhealthy, instance_id)
        with state.lock:
            return instance_json(inst)

    router.include_router(
        common_admin_router(
            clock=state.clock,
            settle=settle,
            billing=state.billing,
            instance_faults={"preempt": preempt, "unhealthy": unhealthy},
            no_such_fault=lambda: Refusal(
                404, "global/not-found", "No such fault.", "preempt or unhealthy"
            ),
        )
    )
    return router


def _jobs(body: WorkloadBody) -> list[JobSpec]:
    if (body.csv is None) == (body.synthetic is None):
        raise WorkloadError("send exactly one of csv or synthetic")
    if body.csv is not None:
        return parse_csv(body.csv)
    assert body.synthetic is not None
    s = body.synthetic
    return synthetic(
        s.seed,
        hours=s.hours,
        jobs_per_hour=s.jobs_per_hour,
        bursts=s.bursts,
        burst_jobs=s.burst_jobs,
        mean_duration_s=s.mean_duration_s,
    )
