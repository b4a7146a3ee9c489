"""The agent runs on its own event loop, in a thread of its own: while a tick is stuck in a slow
synchronous step (a store call, a blocking client), the server it runs in still answers its
health check, its API and its pages. Before, the tick ran on the API's loop and stalled them.

The slow step is a planner that blocks its thread until the test releases it: the assertions
are about order (the other requests are answered while the tick is still in flight), never
about how fast anything is."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from procure.agent.deps import AgentDeps, RunNotFound
from procure.agent.leased_tick import LeaseHeld
from procure.agent.planner import Planner
from procure.agent.worker import Worker, WorkerConfig
from procure.api.app import create_app
from procure.local import free_port, serve
from procure.loopthread import AgentLoop
from procure.models import Action
from procure.store import leases
from procure.store.tables import TickLogRow
from world import World

BLOCK_S = 60.0  # the blocked step's own limit: far beyond any request timeout below
REQUEST_S = 20.0


class Gate:
    """A planner wrapper that blocks its thread (as a synchronous store call would) until the
    test opens the gate; `entered` is set once a tick is inside it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def around(self, inner: Planner) -> Planner:
        async def blocking(ctx: Any) -> Action:
            self.entered.set()
            self.open.wait(BLOCK_S)  # deliberately synchronous: it holds its event loop
            return await inner(ctx)

        return blocking

    def deps(self, world: World) -> Callable[[], AgentDeps]:
        """The app's deps factory: the world's deps with the blocking planner (built on the
        agent's loop, where `create_app` calls it)."""

        def make() -> AgentDeps:
            deps = world.deps()
            deps.planner = self.around(deps.planner)
            return deps

        return make


def test_api_answers_while_an_api_tick_is_stuck(world: World) -> None:
    gate = Gate()
    app = create_app(world.settings, world.store, deps_factory=gate.deps(world))
    server = serve(app)
    try:
        run_id = world.new_run()
        with ThreadPoolExecutor(1) as pool:
            ticking = pool.submit(
                httpx.post, f"{server.url}/api/agent-tick", json={"runId": run_id}, timeout=90
            )
            assert gate.entered.wait(30), "the tick never reached its planner"
            health = httpx.get(f"{server.url}/healthz", timeout=REQUEST_S)
            listed = httpx.get(f"{server.url}/api/runs", timeout=REQUEST_S)
            page = httpx.get(f"{server.url}/runs/{run_id}", timeout=REQUEST_S)
            assert not ticking.done(), "the tick should still be inside its slow step"
            gate.open.set()
            answer = ticking.result(timeout=90)
        assert health.status_code == 200 and health.json()["runs"] == {"running": 1}
        assert [r["_id"] for r in listed.json()] == [run_id]
        assert page.status_code == 200 and run_id in page.text
        assert answer.status_code == 200, answer.text
        assert answer.json()["message"]
    finally:
        gate.open.set()
        server.stop()


def test_api_answers_while_a_worker_tick_is_stuck(world: World) -> None:
    gate = Gate()
    app = create_app(
        world.settings,
        world.store,
        deps_factory=gate.deps(world),
        worker=WorkerConfig(concurrency=2, poll_interval_s=0.05),
    )
    server = serve(app)
    try:
        run_id = world.new_run()
        assert gate.entered.wait(30), "the worker never ticked the run"
        health = httpx.get(f"{server.url}/healthz", timeout=REQUEST_S)
        listed = httpx.get(f"{server.url}/api/runs", timeout=REQUEST_S)
        runs_page = httpx.get(f"{server.url}/", timeout=REQUEST_S)
        worker = app.state.worker
        assert isinstance(worker, Worker) and worker.in_flight == 1  # still stuck
        gate.open.set()
        assert health.status_code == 200 and health.json()["runs"] == {"running": 1}
        assert [r["_id"] for r in listed.json()] == [run_id]
        assert runs_page.status_code == 200 and f'data-run="{run_id}"' in runs_page.text
    finally:
        gate.open.set()
        server.stop()
    agent = app.state.agent
    assert isinstance(agent, AgentLoop) and agent.thread is not None
    agent.thread.join(timeout=60)  # the server's shutdown drains the worker and joins it
    assert not agent.thread.is_alive()
    with world.store.session() as s:
        assert leases.holder(s, run_id) is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_agent_loop_tick_raises_what_the_tick_raises(world: World) -> None:
    """`AgentLoop.tick` from another loop: the tick's own exceptions come back as they are."""

    async def go() -> None:
        async with AgentLoop(world.deps) as agent:
            assert agent.thread is not None and agent.thread is not threading.current_thread()
            with pytest.raises(RunNotFound):
                await agent.tick("no-such-run", "test", 30)
            run_id = world.new_run()
            with world.store.session() as s:
                assert leases.acquire(s, run_id, "someone-else", 60)
            with pytest.raises(LeaseHeld) as held:
                await agent.tick(run_id, "test", 30)
            assert held.value.holder == "someone-else"
        assert agent.thread is not None and not agent.thread.is_alive()

    asyncio.run(go())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_procure_serve_drains_its_agent_and_exits_on_a_signal(
    world: World, signum: signal.Signals
) -> None:
    """`procure serve` as run by hand: its worker (on the agent's thread) ticks a run started
    over the API; Ctrl+C or SIGTERM stops it, leases released, without a traceback."""
    port = free_port()
    log = world.tmp / "serve.log"
    s = world.settings
    env = {
        **os.environ,
        "PROCURE_DATABASE_URL": s.database_url,
        "PROCURE_HOME": str(s.home),
        "GPU_VENDOR_SECRET": s.gpu_vendor_secret.get_secret_value(),
        "X402_FACILITATOR_URL": s.facilitator_url,
    }
    command = ["serve", "--port", str(port), "--poll-interval", "0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "procure.cli", *command],
            env=env,
            cwd=world.tmp,  # no stray .env
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        started = httpx.post(
            f"{url}/api/agent-start",
            json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5},
            timeout=20,
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["_id"]
        while not _ticked(world, run_id):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert code in (0, -signum), output  # uvicorn re-raises a SIGTERM it handled gracefully
    assert "Traceback" not in output, output
    with world.store.session() as session:
        assert leases.holder(session, run_id) is None


def _ticked(world: World, run_id: str) -> bool:
    with world.store.session() as s:
        return (
            s.scalar(select(TickLogRow.id).where(TickLogRow.run_id == run_id).limit(1)) is not None
        )
