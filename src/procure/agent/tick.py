"""The tick: one stateless step of a run's state machine. It loads the run's whole state from
the store, decides, acts, and writes back; it holds nothing between calls.

The states, and the module that handles each:
- a user asked to cancel → `cancel`: cancel the job at its vendor, end the run `cancelled`;
- a job `submitted` (an intent left by a crash or a lost answer) → `reconcile` (a payment its
  vendor said it is still settling: nobody is asked before the vendor's Retry-After);
- a job `running` → `poll` (and `renewals`, which buys the next slice of a job paid as it runs);
- no active job, a slice payment still in doubt → `renewals.settle_stray_slices`;
- no active job → the planner decides, and `submit` starts the job it chose.

Side effects are two-phase: the intent (job `submitted`, payment `pending`, with idempotency key
and nonce) is written before calling out, the outcome after (`outcomes`). Exactly once, whatever
the crash: every attempt at a payment signs the same authorisation (nonce from the payment's id,
`validBefore` from its creation time), so the chain settles it at most once; every attempt at a
job sends the same idempotency key, so the vendor starts it at most once. A payment is marked
`failed` only when no money can move for it any more. Crash points (`procure.crashpoints`) mark
the gaps between an outcome and its record, for the crash tests.

Every run ends: ticks that find no way forward (a vendor that does not answer, a quote that
cannot be taken) are counted on the run, and past `AgentDeps.max_troubles` in a row the job is
given up (its vendor is at fault) or, with no job, the run ends `failed` with the last reason.
"""

from __future__ import annotations

from procure.agent import cancel
from procure.agent.context import PlanContext, StartupsSeen
from procure.agent.decide import decide
from procure.agent.deps import OBS, TROUBLE, WAITING, AgentDeps, RunNotFound, TickResult
from procure.agent.outcomes import fail_job
from procure.agent.poll import late, learned_startups, poll
from procure.agent.reconcile import reconcile
from procure.agent.renewals import settle_stray_slices
from procure.agent.submit import start_job
from procure.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_RUN_STATUSES,
    Action,
    Job,
    JobStatus,
    PaymentStatus,
    RunState,
    RunStatus,
    Vendor,
)
from procure.store import repo
from procure.store.hotpath import PollWrite


def polling(state: RunState) -> Job | None:
    """The running job of a run whose tick is a poll (the hot path), or None."""
    if state.run.status in TERMINAL_RUN_STATUSES or state.run.cancel_requested_at is not None:
        return None
    active = next((j for j in state.jobs if j.status in ACTIVE_JOB_STATUSES), None)
    return active if active is not None and active.status == JobStatus.running else None


async def tick(
    deps: AgentDeps,
    run_id: str,
    *,
    loaded: tuple[RunState, Vendor] | None = None,
    sink: list[PollWrite] | None = None,
) -> TickResult:
    """One tick of `run_id`. The worker may pass what it has `loaded` for a batch (a run whose
    tick is a poll, read at the lease, and its job's vendor) and a `sink` for a plain poll's
    write (see `poll`); anything else is read here."""
    active = polling(loaded[0]) if loaded is not None else None
    if loaded is not None and active is not None:
        state, job_vendor = loaded
        vendors: list[Vendor] = [job_vendor]
        errors: dict[str, int] | None = None
        startups: dict[str, StartupsSeen] = {}
    else:
        with deps.store.session() as s:
            found = repo.load_tick_state(s, run_id)
            if found is None:
                raise RunNotFound(run_id)
            state = found
            active = next((j for j in state.jobs if j.status in ACTIVE_JOB_STATUSES), None)
            if polling(state) is not None:  # the hot path: only the job's vendor
                assert active is not None
                found_vendor = repo.get_vendor_row(s, active.vendor_id)
                vendors = [found_vendor] if found_vendor is not None else []
                errors = None
                startups = {}
            else:
                vendors = repo.list_vendors(s)
                errors = repo.vendor_error_counts(s, run_id)
                # Off the hot path, where the planner may run: one bounded query.
                startups = learned_startups(s)
    if state.run.status in TERMINAL_RUN_STATUSES:
        return TickResult(f"Run already {state.run.status}")
    ctx = PlanContext(
        state=state,
        vendors=vendors,
        errors_by_vendor=errors or {},
        payment_overhead=deps.payment_overhead,
        startups=startups,
    )
    cloud_job = active is not None and _on_cloud(ctx, active)
    if state.run.cancel_requested_at is not None and cloud_job:
        assert active is not None
        vendor = ctx.vendor(active.vendor_id)
        assert vendor is not None
        from procure.agent import cloud_run

        result = await cloud_run.step(deps, ctx, active, vendor, cancelling=True)
    elif state.run.cancel_requested_at is not None:
        result = await cancel.carry_out(deps, ctx, active)
    else:
        result = await _step(deps, ctx, active, partial=errors is None, sink=sink)
    return await _count_troubles(deps, ctx, active, result)


def _on_cloud(ctx: PlanContext, job: Job) -> bool:
    vendor = ctx.vendor(job.vendor_id)
    return vendor is not None and vendor.kind == "cloud"


async def _step(
    deps: AgentDeps,
    ctx: PlanContext,
    active: Job | None,
    *,
    partial: bool,
    sink: list[PollWrite] | None = None,
) -> TickResult:
    """One step of a run that is running: the state it is in decides which."""
    if active is not None:
        vendor = ctx.vendor(active.vendor_id)
        if vendor is None:
            return fail_job(deps, active, None, f"vendor {active.vendor_id} left the registry")
        if vendor.kind == "cloud":  # an instance rented for the job: its own state machine
            from procure.agent import cloud_run

            return await cloud_run.step(deps, ctx, active, vendor)
        if active.status == JobStatus.submitted:
            return await reconcile(deps, ctx, active, vendor)
        return await poll(deps, ctx, active, vendor, partial=partial, sink=sink)
    if await settle_stray_slices(deps, ctx):
        # Nothing new while money is in doubt: the run must not end with it unsettled.
        return TickResult("Payment in doubt")
    finished = next((j for j in ctx.state.jobs if j.status == JobStatus.completed), None)
    if finished is not None:  # its job completed while a slice payment was in doubt
        with deps.store.session() as s:
            repo.update_run(s, ctx.state.run.id, status=RunStatus.completed, progress=1.0)
        return TickResult("Job completed")
    return await _plan_and_act(deps, ctx)


async def _count_troubles(
    deps: AgentDeps, ctx: PlanContext, active: Job | None, result: TickResult
) -> TickResult:
    """Keep the run's count of ticks in a row without a way forward, and act on it: past
    `max_troubles` the active job is given up (its vendor is at fault), or with no job the run
    ends `failed`. A job whose first payment is in doubt is left to its authorisation's expiry."""
    run = ctx.state.run
    if result.message.startswith(WAITING):
        return result
    if result.message not in TROUBLE:
        if run.troubles:
            with deps.store.session() as s:
                repo.update_run(s, run.id, troubles=0)
        return result
    troubles = run.troubles + 1
    if troubles < deps.max_troubles:
        with deps.store.session() as s:
            repo.update_run(s, run.id, troubles=troubles)
        return result
    with deps.store.session() as s:
        last = repo.last_observation(s, run.id, OBS.error) or result.message
    why = f"no way forward in {troubles} tries in a row (last: {last})"
    if active is not None and _on_cloud(ctx, active):  # terminate and book before it ends
        from procure.agent import cloud_run

        given_up = cloud_run.give_up(deps, active, why)
        with deps.store.session() as s:
            repo.update_run(s, run.id, troubles=0)
        return given_up
    if run.cancel_requested_at is not None:
        return await cancel.carry_out(deps, ctx, active, give_up=True)
    if active is not None:
        paid = any(
            p.job_id == active.id and p.status == PaymentStatus.completed
            for p in ctx.state.payments
        )
        if active.status == JobStatus.running or paid:
            given_up = fail_job(deps, active, ctx.vendor(active.vendor_id), why, ctx=ctx)
            with deps.store.session() as s:
                repo.update_run(s, run.id, troubles=0)
            return given_up
        with deps.store.session() as s:  # money in doubt: its expiry ends the job
            repo.update_run(s, run.id, troubles=troubles)
        return result
    with deps.store.session() as s:
        repo.update_run(
            s, run.id, status=RunStatus.failed, troubles=troubles, status_reason=f"Failed: {why}"
        )
        repo.add_observation(s, run.id, OBS.error, f"Run failed: {why}")
    return TickResult("Run failed", result.action)


# How far back a run's observations are read to say a repeated thing once.
RECENT = 20


async def _plan_and_act(deps: AgentDeps, ctx: PlanContext) -> TickResult:
    run_id = ctx.state.run.id
    if any(v.kind == "cloud" for v in ctx.vendors):  # (imported only where clouds are used)
        from procure.agent.cloud_offers import price_clouds

        ctx = await price_clouds(deps, ctx)  # each cloud vendor at its best offer now
    decision = await decide(deps.planner, ctx)  # the planner, the guard, the fallback
    action = decision.action
    # What the planner asked to keep (the LLM's raw answer, its rejections), the guard's verdict
    # and the reason: a run that waits tick after tick for the same reasons says each once.
    said = list(ctx.notes)
    if decision.rejected is not None:
        said.append(
            (
                OBS.error,
                f"Guard rejected {decision.rejected.action} on {decision.rejected.vendor_id}: "
                f"{decision.rejection}; the deterministic planner decides instead",
            )
        )
    said.append((OBS.agent_reasoning, action.reason))
    with deps.store.session() as s:
        recent = set(repo.recent_contents(s, run_id, RECENT))
        for note_type, content in said:
            if content not in recent:
                repo.add_observation(s, run_id, note_type, content)
                recent.add(content)
        if action.action == "abort":
            repo.update_run(s, run_id, status=RunStatus.aborted, status_reason=action.reason)
            return TickResult("Run aborted", action)
    if late(ctx):  # past its deadline a run buys nothing more, on a cloud or an x402 vendor
        return _past_deadline(deps, ctx, action)
    if action.action == "wait":
        return TickResult("Waiting", action)
    vendor = ctx.vendor(action.vendor_id)
    assert vendor is not None  # the guard checked it
    if vendor.kind == "cloud":
        from procure.agent import cloud_run

        result = await cloud_run.start_cloud_job(deps, ctx, action, vendor)
        return TickResult(result.message, action)
    result = await start_job(deps, ctx, action, vendor)
    return TickResult(result.message, action)


def _past_deadline(deps: AgentDeps, ctx: PlanContext, action: Action) -> TickResult:
    """The run's deadline has passed: no new job is paid for and no instance rented (one would be
    stopped at once, and the next too, tick after tick); the run ends `aborted` at its progress,
    its last checkpoint kept."""
    run = ctx.state.run
    why = f"The run's deadline passed at {run.deadline:%Y-%m-%d %H:%M:%S} UTC"
    with deps.store.session() as s:
        repo.update_run(s, run.id, status=RunStatus.aborted, status_reason=why)
        repo.add_observation(
            s,
            run.id,
            OBS.agent_reasoning,
            f"Not starting a job: {why}; the run ends at {run.progress:.0%}",
        )
    return TickResult("Run aborted", action)
