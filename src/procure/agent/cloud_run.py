"""A job on a rented cloud instance, one tick at a time: the intent (job `submitted`, its payment
`pending` as the money reserved, the instance `launching`) before any call, then each tick's step
to the part that moves it on: launch and boot (`cloud_launch`), the job watched on its node
(`cloud_watch`), terminate and book (`cloud_end`). Money is reserved one billing increment ahead
(the instance is terminated before the budget could be overspent); the provider's bill is booked
as the job's payment in the transaction that ends the job.

The instance record's states: launching → booting → running → terminating → terminated. Why it
ends (`outcome`: completed | failed | job_failed (the user's job failed on its node) | cancelled |
stopped) is set with `terminating`."""

from __future__ import annotations

import secrets
from datetime import timedelta

from procure.agent.cloud_end import (
    GONE,
    abandon,
    cool,
    end,
    keyring,
    mark_ending,
    terminate,
    trouble,
)
from procure.agent.cloud_launch import boot, launch
from procure.agent.cloud_money import ahead_s, bills_boot, cost
from procure.agent.cloud_offers import describe_offer
from procure.agent.cloud_watch import poll
from procure.agent.context import PlanContext
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.agent.ledger import spend_cap_blocks
from procure.clouds.base import LABEL_PREFIX
from procure.crashpoints import crash_point  # the name crash tests patch (see cloud_end.crash)
from procure.models import (
    CLOUD_NONCE_PREFIX,
    Action,
    Job,
    JobStatus,
    OfferTerms,
    Payment,
    PaymentStatus,
    RunStatus,
    Vendor,
    format_usd,
    utcnow,
)
from procure.store import cloud_repo, repo
from procure.store.cloud_repo import CloudInstance
from procure.warnings import check_run

__all__ = ["GONE", "crash_point", "give_up", "instance_name", "start_cloud_job", "step"]


def instance_name(job: Job, tag: str) -> str:
    """The instance's name (its label on Vast.ai): the agent's label, this store's install tag
    (another install's sweeper leaves it alone) and the job's id."""
    return f"{own_prefix(tag)}{job.id}"[:64]


def own_prefix(tag: str) -> str:
    """The start of every instance name this install's agent gives (`procure-job-<tag>-`)."""
    return f"{LABEL_PREFIX}job-{tag}-"


# --- the intent ----------------------------------------------------------------------------


async def start_cloud_job(
    deps: AgentDeps, ctx: PlanContext, action: Action, vendor: Vendor
) -> TickResult:
    """Write the intent of renting `vendor.offer` for the rest of the run, then launch."""
    from procure.agent.submit import _intent_conflict

    run, terms = ctx.state.run, vendor.offer
    if terms is None:
        return TickResult("Vendor error", action)
    resume = ctx.resume_from
    hours = ctx.remaining_hours
    now = utcnow()
    params = run.job_spec.model_copy(update={"hours": hours}).model_dump(by_alias=True)
    params["totalHours"] = run.job_spec.hours
    if resume is not None:
        params["resumeFrom"] = resume.checkpoint_url
    job = Job(
        _id=repo.new_id(),
        run_id=run.id,
        vendor_id=vendor.vendor_id,
        status=JobStatus.submitted,
        expected_cost=round(terms.price_per_hour * hours),
        job_params=params,
        idempotency_key="",
        quote_id=terms.offer_id[:100],
        start_progress=resume.checkpoint_progress if resume else 0.0,
        checkpoint_url=resume.checkpoint_url if resume else None,
        checkpoint_progress=resume.checkpoint_progress if resume else 0.0,
        created_at=now,
        updated_at=now,
    )
    job.idempotency_key = f"job-{job.id}"
    # Where the provider bills the boot, reserve through the boot deadline and one stretch
    # beyond it; where it does not (Lambda), only the first stretch of billed time: `reserve`
    # keeps the money that far ahead, counted from where the boot may have ended (a boot
    # reserved there would fail a budget that can pay for the work).
    boots_billed = bills_boot(deps.clouds.get(terms.provider), terms)
    window_s = (deps.cloud.boot_timeout_s if boots_billed else 0.0) + ahead_s(deps, terms)
    amount = cost(terms, window_s)
    if budget_short(ctx, amount):
        return too_small(deps, ctx, action, terms, amount, window_s, boots_billed)
    payment_id = repo.new_id()
    payment = Payment(
        _id=payment_id,
        run_id=run.id,
        job_id=job.id,
        vendor_id=vendor.vendor_id,
        amount=amount,
        status=PaymentStatus.pending,
        nonce=f"{CLOUD_NONCE_PREFIX}{payment_id}",  # no x402 authorisation: the provider bills
        hours=window_s / 3600,
        created_at=now,
        updated_at=now,
    )
    token = keyring(deps).encrypt(secrets.token_urlsafe(32))
    with deps.store.session() as s:  # the intent, before the cloud is called
        repo.update_run(s, run.id)  # write-lock the run, then check what is committed now
        conflict = _intent_conflict(repo.load_state(s, run.id, observations=False), amount)
        if conflict is None and spend_cap_blocks(deps, s, run.id, amount, "cloud time"):
            return TickResult("Waiting for the global spend cap", action)
        if conflict is not None:
            repo.add_observation(s, run.id, OBS.error, f"Not renting an instance: {conflict}")
            return TickResult("State changed", action)
        repo.insert_job(s, job)
        repo.insert_payment(s, payment)
        name = instance_name(job, cloud_repo.install_tag(s))
        cloud_repo.insert_instance(
            s,
            name=name,
            run_id=run.id,
            job_id=job.id,
            vendor_id=vendor.vendor_id,
            provider=terms.provider,
            offer=terms.model_dump(),
            status="launching",
            node_token=token,
            reserved_until=now + timedelta(seconds=window_s),
        )
        repo.add_observation(
            s,
            run.id,
            OBS.agent_reasoning,
            f"Renting {describe_offer(terms)} through {vendor.vendor_id} as instance {name}; "
            f"{format_usd(amount)} reserved for "
            + ("the boot and " if boots_billed else "")
            + f"the first {ahead_s(deps, terms):.0f}s of the {hours:.2f}h of work"
            + (
                f", resuming from the checkpoint at {resume.checkpoint_progress:.0%}"
                if resume
                else ""
            )
            + f"; budget left {format_usd(ctx.available)}",
            vendor_id=vendor.vendor_id,
        )
    crash_point("intent")
    return await step(deps, ctx, job, vendor)


def budget_short(ctx: PlanContext, amount: int) -> bool:
    """Whether the run's budget can never take `amount` for the boot reservation: more than is
    left once what is paid is counted, with nothing pending that could still come back. (The
    intent's own check says no only for now: it was asked again every tick, to the same end.)"""
    payments = ctx.state.payments
    if any(p.status == PaymentStatus.pending for p in payments):
        return False
    paid = sum(p.amount for p in payments if p.status == PaymentStatus.completed)
    return paid + amount > ctx.state.run.budget_total


def too_small(
    deps: AgentDeps,
    ctx: PlanContext,
    action: Action,
    terms: OfferTerms,
    amount: int,
    window_s: float,
    boots_billed: bool,
) -> TickResult:
    """The budget cannot take the boot reservation of the planner's best offer: the run ends
    now, saying so, rather than asking again each tick until it fails with no way forward."""
    run = ctx.state.run
    ahead = f"{ahead_s(deps, terms):.0f}s ahead"
    window = f"its boot and first stretch ({window_s:.0f}s: the boot timeout and {ahead})"
    why = (
        f"the budget left, {format_usd(ctx.available)}, cannot take the {format_usd(amount)} "
        f"that renting {describe_offer(terms)} reserves for "
        + (window if boots_billed else f"its first stretch ({ahead} of its billed time)")
        + "; raise the budget to rent it"
    )
    with deps.store.session() as s:
        repo.update_run(s, run.id, status=RunStatus.failed, status_reason=f"Failed: {why}")
        repo.add_observation(s, run.id, OBS.error, f"Run failed: {why}")
    return TickResult("Run failed", action)


# --- one step of a job on an instance ------------------------------------------------------


async def step(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, *, cancelling: bool = False
) -> TickResult:
    """The tick of a run whose active job runs (or is to run) on a cloud instance."""
    with deps.store.session() as s:
        inst = cloud_repo.instance_of_job(s, job.id)
    if inst is None:
        return end(deps, ctx, job, None, 0, "failed", "the job has no instance record")
    client = deps.clouds.get(inst.provider)
    if client is None:
        return trouble(
            deps, job, f"no {inst.provider} account configured: cannot reach {inst.name}"
        )
    run = ctx.state.run
    # Warnings before the cap: what is reserved (one increment ahead of the cost to date) counts.
    reserved = sum(p.amount for p in ctx.state.payments if p.status == PaymentStatus.pending)
    check_run(
        deps.store,
        run.id,
        run.budget_total,
        run.budget_remaining - reserved,
        deps.spend_caps.warn_at,
    )
    if inst.status not in ("terminating", "terminated") and inst.outcome is None:
        # A job running on its node: `poll` stops it at the deadline, once it has read whether
        # the job finished (in time) since the last poll.
        watched = inst.status == "running" and inst.node_job_id is not None
        why = None
        if cancelling:
            why = ("cancelled", run.cancel_reason or "cancelled")
        elif run.deadline is not None and utcnow() > run.deadline and not watched:
            why = ("stopped", "the run's deadline passed")
        if why is not None:
            inst = mark_ending(
                deps, inst, *why, fault=False, terminate=inst.instance_id is not None
            )
    terms = OfferTerms.model_validate(inst.offer)
    if inst.status == "launching":
        return await launch(deps, ctx, job, vendor, inst, client, terms)
    if inst.status == "booting":
        return await boot(deps, ctx, job, vendor, inst, client, terms)
    if inst.status == "running":
        return await poll(deps, ctx, job, inst, client, terms)
    if inst.status == "terminating":
        return await terminate(deps, ctx, job, inst, client, terms)
    return end(deps, ctx, job, inst, inst.billed or 0, inst.outcome or "failed", "ended")


def give_up(deps: AgentDeps, job: Job, why: str) -> TickResult:
    """No way forward in many ticks: end the instance (terminate, then book) and the job."""
    with deps.store.session() as s:
        inst = cloud_repo.instance_of_job(s, job.id)
    if inst is not None and inst.outcome is None:
        # Its offer kind cooled, as for any failure of the cloud's: the run chooses again
        # elsewhere, not the same cheapest offer that found no way forward all these ticks.
        cool(deps, OfferTerms.model_validate(inst.offer))
        mark_ending(deps, inst, "failed", why, fault=True, terminate=inst.instance_id is not None)
    elif inst is not None and inst.status == "terminating" and stuck_ending(deps, inst):
        # Already ending, and its end not confirmed in all these ticks nor in a boot's time:
        # marking it again would change nothing, and the run would wait here for ever.
        return abandon(deps, job, inst, why)
    elif inst is not None and inst.status == "launching" and stuck_ending(deps, inst):
        # Ending, its launch tried without an answer, and the provider refusing every lookup by
        # its name as long (a key revoked): ended with nothing booked, as a launch never listed
        # is (`cloud_launch.lookup`), or neither this nor a cancel would ever end the run. One
        # that landed after all is the sweeper's: terminated, and booked as a late launch.
        return end(deps, None, job, inst, 0, inst.outcome or "failed", why)
    return TickResult("Vendor error")


def stuck_ending(deps: AgentDeps, inst: CloudInstance) -> bool:
    """Whether an ending instance's record has not moved (terminate refused, or accepted with
    the instance listed on) for longer than a boot may take: a provider refusing for a while (a
    rate limit, a short outage) is waited for, since the run books its bill itself then."""
    return (utcnow() - inst.updated_at).total_seconds() > deps.cloud.boot_timeout_s
