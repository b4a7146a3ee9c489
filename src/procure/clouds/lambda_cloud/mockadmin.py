"""The mock Lambda Cloud's admin API (not Lambda's; Bearer or Basic with the mock's key), the
same on the three mock clouds: state, billing by Lambda's rule, the clock, faults, capacity,
preemption, plus the fleet's workload and queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from procure.clouds.lambda_cloud.mockfaults import Faults
from procure.clouds.lambda_cloud.mockstate import MockCloudState, MockInstance, Refusal
from procure.clouds.lambda_cloud.nodes import Nodes
from procure.clouds.mockworld.workload import JobSpec, WorkloadError, parse_csv, synthetic


class ClockBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    advance_s: float = Field(0.0, ge=0, le=365 * 86400)
    speed: float | None = Field(None, ge=0, le=1e6)


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
    nodes: Nodes,
    faults: Faults,
    instance_json: Callable[[MockInstance], dict[str, Any]],
) -> APIRouter:
    """The admin routes; the caller adds the auth dependency."""
    config = state.config
    router = APIRouter(prefix="/admin")

    @router.get("/queue")
    async def queue() -> dict[str, Any]:
        return await asyncio.to_thread(state.figures)

    @router.get("/billing")
    async def billing() -> dict[str, Any]:
        return await asyncio.to_thread(state.billing)

    @router.get("/state")
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

    @router.post("/faults")
    async def set_faults(body: Faults) -> dict[str, Any]:
        for key, value in body.model_dump().items():
            setattr(faults, key, value)
        with state.lock:
            state.never_boot = body.never_boot
        return faults.model_dump()

    @router.post("/clock")
    async def set_clock(body: ClockBody) -> dict[str, Any]:
        if body.speed is not None:
            state.clock.set_speed(body.speed)
        if body.advance_s:
            state.clock.advance(body.advance_s)
        now = await asyncio.to_thread(state.step)
        return {"now_s": round(now, 3), "speed": state.clock.speed}

    @router.post("/workload")
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

    @router.post("/capacity")
    async def set_capacity(body: CapacityBody) -> dict[str, Any]:
        with state.lock:
            config.capacity.setdefault(body.instance_type, {})[body.region] = body.count
            return {"capacity": config.capacity}

    @router.post("/instances/{instance_id}/{fault}")
    async def instance_fault(instance_id: str, fault: str) -> dict[str, Any]:
        """`preempt` (a host that dies: the instance ends as `preempted`, its node stops, its
        billing stops) or `unhealthy` (a lost GPU)."""
        if fault not in ("preempt", "unhealthy"):
            raise Refusal(404, "global/not-found", "No such fault.", "preempt or unhealthy")
        act = state.preempt if fault == "preempt" else state.make_unhealthy
        inst = await asyncio.to_thread(act, instance_id)
        if config.nodes and fault == "preempt":
            await nodes.reconcile()
        with state.lock:
            return instance_json(inst)

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
