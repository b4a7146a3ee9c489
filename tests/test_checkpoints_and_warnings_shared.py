"""What several processes and runs share stays theirs: a budget warning is posted once however many
processes deliver the outbox, each cloud run checkpoints into its own folder, and a run without a
shared checkpoint store starts over after a preemption instead of failing on a missing file."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from cloud_fakes import FakeCloud, FakeNodeClient, cloud_vendor, drive, new_run, new_store, offer
from cloud_fakes import make_deps as cloud_deps
from procure import warnings
from procure.agent.cloud_node import NodeJob
from procure.gpu.jobs import TERMINAL, JobRunner, Limits
from procure.httpbounds import bounded_client
from procure.local import serve
from procure.models import utcnow
from procure.store import fleet_repo, open_store, repo
from test_fleet_outbox import receiver


def test_two_processes_post_each_budget_warning_once(sqlite_url: str) -> None:
    """Before the fix: the outbox fix claims fleet messages before sending, but the budget warnings'
    deliverer (warnings.deliver, run by both `procure serve` and `procure fleet run` on one store,
    and by a standby controller) still posts what it read as due without a claim: each warning
    twice."""
    app, received = receiver([])  # a Slack-like webhook that answers 200 `ok`
    server = serve(app)

    async def body() -> None:
        store = open_store(sqlite_url)
        with store.session() as s:
            payload = {"event": "budget_warning", "text": "run r1 spent 80% of its budget"}
            fleet_repo.enqueue(s, warnings.WEBHOOK, payload, utcnow())
        first, second = bounded_client(deadline_s=5), bounded_client(deadline_s=5)
        url = f"{server.url}/hook"
        try:
            # The API's and the fleet controller's warning loops, each on its pass.
            await asyncio.gather(
                warnings.deliver(store, first, warnings.WEBHOOK, url),
                warnings.deliver(store, second, warnings.WEBHOOK, url),
            )
            got = [m["text"] for m in received]
            assert got == ["run r1 spent 80% of its budget"], f"the webhook received {got}"
        finally:
            await first.aclose()
            await second.aclose()
            store.dispose()

    try:
        asyncio.run(body())
    finally:
        server.stop()


def test_two_cloud_runs_never_share_one_checkpoint_folder(tmp_path: Path) -> None:
    """Before the fix: PROCURE_CLOUD_CHECKPOINT_DIR is handed to every node as the job's checkpoint
    folder as is (the gateway adds its job's id; the agent adds nothing), and a node given a folder
    has the job write there: every run's job writes `step-000020.json` into the same prefix, so one
    run's checkpoints overwrite another's and a resumed run may load another user's state."""
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=0.5)
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 50.0)])
    deps = cloud_deps(store, {"runpod": runpod}, checkpoint_dir="memory://lab-bucket/procure")
    sent: list[dict[str, Any]] = []  # what the agent asked each node to run

    class Recording(FakeNodeClient):
        async def submit(self, **kwargs: Any):  # type: ignore[no-untyped-def]
            sent.append(kwargs)
            return await super().submit(**kwargs)

    def node_client(url: str, token: str) -> FakeNodeClient:
        return Recording(runpod, url, token)

    deps.node_client = node_client  # type: ignore[assignment]
    try:
        for run_id in (new_run(store, 100.0), new_run(store, 100.0)):
            assert asyncio.run(drive(deps, run_id)) == "completed"
    finally:
        store.dispose()
    assert len(sent) == 2, sent

    async def folders_seen() -> list[str]:
        """Each submission on a real node runner: where its job is told to checkpoint."""
        runner = JobRunner(Limits(checkpoint_root=str(tmp_path / "node")))
        show = [sys.executable, "-c", "import os; print(os.environ['PROCURE_CHECKPOINT_DIR'])"]
        jobs = [
            runner.submit(
                command=show,
                image=None,
                env=dict(k["env"]),
                resume_from=k["resume_from"],
                checkpoint_dir=k["checkpoint_dir"],
                key=k["idempotency_key"],
            )[0]
            for k in sent
        ]
        deadline = time.monotonic() + 30
        while any(j.status not in TERMINAL for j in jobs):
            assert time.monotonic() < deadline, [j.status for j in jobs]
            await asyncio.sleep(0.05)
        await runner.close()
        return [j.lines[0][1] if j.lines else "" for j in jobs]

    seen = asyncio.run(folders_seen())
    assert seen[0] != seen[1], f"both runs' jobs checkpoint into {seen[0]}"


class OwnDiskNode(FakeNodeClient):
    """A node without a shared checkpoint store (PROCURE_CLOUD_CHECKPOINT_DIR unset, the default):
    the job checkpoints on this node's own disk, and a job told to resume from a file that is not
    on this disk exits at once, as `examples/train.py` does (fsspec: FileNotFoundError)."""

    def _here(self) -> str:
        assert self.node is not None
        return f"/root/.cache/procure/checkpoints/{self.node.ip}/"

    def _view(self, job: Any) -> NodeJob:
        seen = super()._view(job)
        url = seen.checkpoint
        if url is not None:
            seen = dataclasses.replace(seen, checkpoint=self._here() + url.split("://", 1)[1])
        return seen

    async def logs(self, job_id: str, after: int) -> tuple[list[str], int]:
        lines, cursor = await super().logs(job_id, after)
        return [line.replace("memory://", self._here()) for line in lines], cursor

    async def submit(self, **kwargs: Any) -> NodeJob:  # type: ignore[override]
        resume = kwargs["resume_from"]
        await super().submit(**kwargs)
        job = next(j for j in self._live().jobs.values() if j.key == kwargs["idempotency_key"])
        if resume and not resume.startswith(self._here()) and job.status == "running":
            job.status, job.ended_progress = "failed", job.start_progress  # no such file here
        return self._view(job)


def test_a_preempted_run_without_a_shared_store_starts_over_instead_of_failing(
    tmp_path: Path,
) -> None:
    """Before the fix: unset, PROCURE_CLOUD_CHECKPOINT_DIR means 'each node's own disk, so a job
    moved to another instance starts over' (clouds/job.py, and the warning at start). But the agent
    still sends the lost instance's local checkpoint path as resumeFrom; the job on the new instance
    cannot open it and exits, which today's rule books as the user's job failing (`job_failed`):
    after one spot preemption the run ends failed after two more rentals, telling the user to fix
    their job."""
    vast = FakeCloud("vast", [offer("vast", "ask-1", 3.6, spot=True)], job_s=2.0)
    lam = FakeCloud(
        "lambda", [offer("lambda", "gpu_1x_a100", 36.0, increment=60)], job_s=2.0, bills=False
    )
    vendors = [cloud_vendor("va", "vast", 10.0, spot=True), cloud_vendor("la", "lambda", 50.0)]
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", vendors)
    deps = cloud_deps(store, {"vast": vast, "lambda": lam})
    clouds = {"vast": vast, "lambda": lam}

    def node_client(url: str, token: str) -> FakeNodeClient:
        cloud = next(c for c in clouds.values() if any(n.url == url for n in c.nodes.values()))
        return OwnDiskNode(cloud, url, token)

    deps.node_client = node_client  # type: ignore[assignment]
    run_id = new_run(store, 100.0)

    def half_done() -> bool:
        with store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        return state is not None and any(j.progress >= 0.5 for j in state.jobs)

    try:
        asyncio.run(drive(deps, run_id, until=half_done))
        (victim,) = vast.running()
        vast.preempt(victim.id)  # a spot instance taken back: an everyday event
        status = asyncio.run(drive(deps, run_id))
        with store.session() as s:
            run = repo.get_run(s, run_id)
        assert run is not None
        assert status == "completed", f"the run ended {status}: {run.status_reason}"
    finally:
        store.dispose()
    assert vast.running() == [] and lam.running() == []
