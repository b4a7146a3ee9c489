"""A job on a running cloud instance, watched one tick at a time: the instance polled (a
preemption is noticed within one poll), money reserved ahead, the job submitted to the node's
runner once, then its status, logs and checkpoints read and written in one transaction."""

from __future__ import annotations

import json

from procure.agent import joblogs
from procure.agent.cloud_end import (
    BUDGET,
    crash,
    keyring,
    lost,
    mark_ending,
    terminate,
    trouble,
)
from procure.agent.cloud_money import reserve
from procure.agent.cloud_node import NodeError, NodeJob, http_node
from procure.agent.context import PlanContext
from procure.agent.deps import EPS, OBS, AgentDeps, TickResult
from procure.clouds.base import CloudError, Instance, RentalCloud
from procure.clouds.job import on_a_store
from procure.models import Job, OfferTerms, utcnow
from procure.store import cloud_repo, hotpath, repo
from procure.store.cloud_repo import CloudInstance
from procure.store.hotpath import PollWrite
from procure.vendors.credentials import CredentialError


async def poll(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
    *,
    instance: Instance | None = None,
) -> TickResult:
    """Poll the instance (a preemption is noticed here, within one poll) and its job."""
    assert inst.instance_id is not None and inst.node_url is not None
    if instance is None:
        try:
            instance = await client.get(inst.instance_id)
        except CloudError as exc:
            return await unseen(deps, ctx, job, inst, client, terms, exc)
        gone = lost(deps, ctx, job, inst, instance, terms)
        if gone is not None:
            return await gone
    # Out of money or past the run's deadline, the job is stopped; but read first whether it
    # finished since the last poll (one bounded status read): a job done is not booked stopped.
    stop = None if reserve(deps, ctx, job, inst, terms) else BUDGET
    deadline = ctx.state.run.deadline
    if deadline is not None and utcnow() > deadline:
        stop = stop or "the run's deadline passed"
    if stop is not None and inst.node_job_id is None:
        return await stopped(deps, ctx, job, inst, client, terms, stop)
    try:
        token = keyring(deps).decrypt(inst.node_token)
    except CredentialError as exc:
        inst = mark_ending(deps, inst, "failed", str(exc), fault=False, terminate=True)
        return await terminate(deps, ctx, job, inst, client, terms)
    node = (deps.node_client or http_node)(inst.node_url, token)
    try:
        node_job_id = inst.node_job_id
        if node_job_id is None:
            submitted = await node.submit(
                command=list(deps.cloud.command),
                image=None,
                env={"PROCURE_JOB_SPEC": json.dumps(job.job_params, sort_keys=True)[:8000]},
                resume_from=job.job_params.get("resumeFrom"),
                # One folder per run: runs (and users) never read each other's checkpoints;
                # a run's jobs resume by the full URL of the last one.
                checkpoint_dir=(
                    f"{deps.cloud.checkpoint_dir.rstrip('/')}/{job.run_id}"
                    if deps.cloud.checkpoint_dir
                    else None
                ),
                idempotency_key=job.idempotency_key,
            )
            crash("signed")
            node_job_id = submitted.id
            with deps.store.session() as s:
                cloud_repo.update_instance(s, inst.name, node_job_id=node_job_id)
                resume = job.job_params.get("resumeFrom")
                repo.add_observation(
                    s,
                    job.run_id,
                    OBS.job_event,
                    f"Job {node_job_id} started on {inst.name}"
                    + (f", resuming from {resume}" if resume else ""),
                    vendor_id=job.vendor_id,
                )
        njob = await node.status(node_job_id)
        # Stopping, only whether it finished counts: no time spent reading its logs.
        reading = njob is not None and stop is None
        lines, cursor = (
            await node.logs(node_job_id, job.log_cursor) if reading else ([], job.log_cursor)
        )
    except NodeError as exc:
        if stop is not None:
            return await stopped(deps, ctx, job, inst, client, terms, stop)
        return trouble(deps, job, f"node of {inst.name}: {exc}")
    finally:
        await node.aclose()
    crash("polled")
    if njob is None and stop is not None:
        return await stopped(deps, ctx, job, inst, client, terms, stop)
    if njob is None:  # the node restarted and forgot it: what it saved stands
        inst = mark_ending(
            deps, inst, "failed", "the node lost the job", fault=True, terminate=True
        )
        return await terminate(deps, ctx, job, inst, client, terms)
    advanced = njob.progress > job.progress + EPS
    since = job.progressed_at or inst.active_at or job.created_at
    write_poll(deps, ctx, job, njob, lines, cursor)
    if njob.status == "completed" and njob.progress >= 1 - 1e-6:
        inst = mark_ending(
            deps, inst, "completed", "the job completed", fault=False, terminate=True
        )
        return await terminate(deps, ctx, job, inst, client, terms)
    if njob.status in ("completed", "failed", "cancelled"):
        why = njob.error or f"job {njob.status} on the node (exit code {njob.exit_code})"
        # Failed, or done short of 100%: the user's script did it, and would on any instance
        # (`book_end` ends the run after a few). Cancelled: the node stopped it, not the job.
        outcome = "failed" if njob.status == "cancelled" else "job_failed"
        inst = mark_ending(deps, inst, outcome, why, fault=False, terminate=True)
        return await terminate(deps, ctx, job, inst, client, terms)
    if stop is not None:
        return await stopped(deps, ctx, job, inst, client, terms, stop)
    stalled_s = (utcnow() - since).total_seconds()
    if not advanced and stalled_s > deps.stall_s:
        why = f"no progress for {stalled_s:,.0f}s (stuck at {njob.progress:.0%})"
        inst = mark_ending(deps, inst, "failed", why, fault=True, terminate=True)
        return await terminate(deps, ctx, job, inst, client, terms)
    return TickResult(f"Job running ({njob.progress:.0%})")


async def stopped(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
    why: str,
) -> TickResult:
    inst = mark_ending(deps, inst, "stopped", why, fault=False, terminate=True)
    return await terminate(deps, ctx, job, inst, client, terms)


async def unseen(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
    exc: CloudError,
) -> TickResult:
    """The instance's status cannot be read now: it runs on, billed, so its reservation still
    holds it: extended while the budget allows, else it is terminated (which may well work)."""
    if not reserve(deps, ctx, job, inst, terms):
        inst = mark_ending(deps, inst, "stopped", BUDGET, fault=False, terminate=True)
        return await terminate(deps, ctx, job, inst, client, terms)
    return trouble(deps, job, f"{inst.provider} get {inst.instance_id}: {exc}")


def reachable(deps: AgentDeps, url: str) -> bool:
    """Whether another instance could resume from checkpoint `url`: one on a store (s3://,
    gs://, ...), or anywhere once the operator named where checkpoints go. Unnamed, a path is on
    the node's own disk and goes with it: a job moved elsewhere starts over, as documented,
    rather than failing to open a file it does not have."""
    return deps.cloud.checkpoint_dir is not None or on_a_store(url)


def checkpoint_progress(lines: list[str], url: str) -> float | None:
    """The progress the job printed last before it printed checkpoint `url`, if in `lines`."""
    progress: float | None = None
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "PROCURE_PROGRESS":
            try:
                progress = float(rest.strip())
            except ValueError:
                continue
        elif word == "PROCURE_CHECKPOINT" and rest.strip() == url:
            return progress
    return None


def write_poll(
    deps: AgentDeps, ctx: PlanContext, job: Job, njob: NodeJob, lines: list[str], cursor: int
) -> None:
    now = utcnow()
    kept = joblogs.keep(lines, ctx.state.run.log_lines)
    saved_url, saved = job.checkpoint_url, job.checkpoint_progress
    if (
        njob.checkpoint
        and njob.checkpoint != job.checkpoint_url
        and reachable(deps, njob.checkpoint)
    ):
        at = checkpoint_progress(lines, njob.checkpoint)
        at = min(at if at is not None else job.progress, njob.progress)
        if at >= saved - EPS:
            saved_url, saved = njob.checkpoint, at
    advanced = njob.progress > job.progress + EPS
    write = PollWrite(
        run_id=job.run_id,
        job_id=job.id,
        log_cursor=cursor,
        progress=max(njob.progress, job.progress),
        checkpoint_url=saved_url,
        checkpoint_progress=saved,
        progressed_at=now if advanced else job.progressed_at,
        log_lines=kept.counted,
        observations=[(OBS.job_log, line, job.vendor_id) for line in kept.lines]
        + [(OBS.job_event, note, job.vendor_id) for note in kept.notes],
    )
    if saved_url != job.checkpoint_url:
        write.observations.append(
            (OBS.job_event, f"Checkpoint at {saved:.0%} saved: {saved_url}", job.vendor_id)
        )
    with deps.store.session() as s:
        hotpath.apply_polls(s, [write])
    job.progress, job.checkpoint_url, job.checkpoint_progress = write.progress, saved_url, saved
