"""Serving a mock cloud: its app on loopback (in process, or in the foreground for the CLI), the
background step that moves its simulated world on, and the admin routes the three mocks share
(billing, the clock, an instance's faults). Each mock adds its own wire format and auth."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from procure.clouds.mockworld.clock import SimClock
from procure.clouds.mockworld.nodes import Nodes

log = logging.getLogger(__name__)
STEP_EVERY_S = 0.05  # wall seconds between background steps of the simulation
S = TypeVar("S")


@dataclass
class MockCloud(Generic[S]):
    """A mock cloud served on loopback (in process: tests, demos, the benchmark)."""

    url: str
    state: S
    server: Any  # procure.local.LocalServer

    @property
    def api_key(self) -> str:
        return str(self.state.config.api_key)  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.server.stop()


def start_app(app: FastAPI, port: int | None = None) -> Any:
    """Serve `app` on 127.0.0.1 (a free port unless given) in a background thread; the
    `procure.local.LocalServer`, once it accepts connections."""
    from procure.local import serve

    return serve(app, port)


def serve_foreground(app: FastAPI, port: int) -> None:
    """Serve `app` on 127.0.0.1:`port` until interrupted (`procure mock-cloud`)."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def stepping(
    label: str,
    nodes: Nodes[Any],
    *,
    with_nodes: bool,
    world_step: Callable[[], object] | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that, every STEP_EVERY_S while the app serves, steps the simulated world
    (`world_step`, in a thread) and, `with_nodes`, reconciles its nodes with its instances;
    then stops every node once the app ends. `label` names the mock in the log."""

    async def stepper() -> None:
        while True:
            try:
                if world_step is not None:
                    await asyncio.to_thread(world_step)
                if with_nodes:
                    await nodes.reconcile()
            except Exception:  # the simulation must keep running whatever one step did
                log.exception("%s step failed", label)
            await asyncio.sleep(STEP_EVERY_S)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(stepper(), name=f"{label} step")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await nodes.stop_all()

    return lifespan


class ClockBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    advance_s: float = Field(0.0, ge=0, le=365 * 86400)
    speed: float | None = Field(None, ge=0, le=1e6)


InstanceFault = Callable[[str], Awaitable[dict[str, Any]]]


def admin_router(
    *,
    clock: SimClock,
    settle: Callable[[], Awaitable[float]],
    billing: Callable[[], dict[str, Any]],
    instance_faults: dict[str, InstanceFault],
    no_such_fault: Callable[[], Exception],
) -> APIRouter:
    """`/admin/billing`, `/admin/clock` (speed, advance, then `settle()`: the world stepped to
    the new time, whose simulated seconds it returns) and `/admin/instances/{id}/{fault}` (one
    of `instance_faults`, else `no_such_fault()` raised). The caller adds its auth."""
    router = APIRouter(prefix="/admin")

    @router.get("/billing")
    async def admin_billing() -> dict[str, Any]:
        return await asyncio.to_thread(billing)

    @router.post("/clock")
    async def set_clock(body: ClockBody) -> dict[str, Any]:
        if body.speed is not None:
            clock.set_speed(body.speed)
        if body.advance_s:
            clock.advance(body.advance_s)
        now = await settle()
        return {"now_s": round(now, 3), "speed": clock.speed}

    @router.post("/instances/{instance_id}/{fault}")
    async def instance_fault(instance_id: str, fault: str) -> dict[str, Any]:
        """`preempt` (its host dies or, on Vast.ai, it is outbid: it ends, its node stops, its
        billing stops) or, where the mock has it, `unhealthy`."""
        act = instance_faults.get(fault)
        if act is None:
            raise no_such_fault()
        return await act(instance_id)

    return router
