"""How a job on a cloud instance ends: why it ends recorded (`mark_ending`), the instance
terminated until the provider confirms, its bill read (or computed) and booked with the job's end;
and the small shared steps of `cloud_run`'s other parts (trouble noted, an offer kind cooled)."""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from procure.agent.cloud_money import JOB_TO_STATUS, bills_boot, book_end, computed_bill
from procure.agent.context import PlanContext
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.clouds.base import CloudError, Instance, RentalCloud
from procure.models import (
    Job,
    JobStatus,
    OfferTerms,
    PaymentStatus,
    RunStatus,
    format_usd,
    utcnow,
)
from procure.store import cloud_repo, repo
from procure.store.cloud_repo import CloudInstance
from procure.vendors.credentials import CredentialError, Keyring

GONE = ("preempted", "exited", "terminated")  # the instance (and the job on it) is lost
BUDGET = "the budget cannot take the next billing increment"


def crash(name: str) -> None:
    """Crash point `name`, reached through `cloud_run.crash_point`: the one name the crash tests
    replace, for every point of the cloud path whichever module holds it."""
    from procure.agent import cloud_run

    cloud_run.crash_point(name)


def keyring(deps: AgentDeps) -> Keyring:
    ring = deps.keyring or getattr(deps.vendors, "_keyring", None)
    if ring is None:
        raise CredentialError("no keyring to encrypt the node token with")
    return ring  # type: ignore[no-any-return]


def trouble(deps: AgentDeps, job: Job, message: str, *, same: str | None = None) -> TickResult:
    """Note `message` and count the tick as trouble. `same`: the start of every message of this
    trouble, whose rest may change each time (a provider's request id in its error)."""
    with deps.store.session() as s:
        # Said once while it repeats: trouble that lasts (a provider down, an ending instance
        # whose terminate is refused) must not grow the store by a row every tick.
        recent = repo.recent_contents(s, job.run_id)
        if message not in recent and not (same and any(c.startswith(same) for c in recent)):
            repo.add_observation(s, job.run_id, OBS.error, message, vendor_id=job.vendor_id)
    return TickResult("Vendor error")


def mark_ending(
    deps: AgentDeps, inst: CloudInstance, outcome: str, reason: str, *, fault: bool, terminate: bool
) -> CloudInstance:
    """Record why the instance ends; `terminate`: it exists, so terminate it next. Its bill runs
    on until the provider accepts the terminate: `terminate` sets `ended_at` then."""
    values: dict[str, object] = {
        "outcome": outcome,
        "end_reason": reason[:2000],
        "fault": int(fault),
    }
    if terminate:
        values |= {"status": "terminating"}
    with deps.store.session() as s:
        cloud_repo.update_instance(s, inst.name, **values)
        repo.add_observation(
            s,
            inst.run_id,
            OBS.error if fault else OBS.job_event,
            f"Ending instance {inst.name} ({inst.provider} {inst.instance_id or 'not launched'}): "
            f"{reason}",
            vendor_id=inst.vendor_id,
        )
        found = cloud_repo.get_instance(s, inst.name)
    assert found is not None
    return found


def cool(deps: AgentDeps, terms: OfferTerms, **learned: object) -> None:
    with deps.store.session() as s:
        cloud_repo.learn(
            s,
            terms.provider,
            terms.region,
            terms.gpu,
            cooldown_until=utcnow() + timedelta(seconds=deps.cooldown_s),
            **learned,  # type: ignore[arg-type]
        )


def lost(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    instance: Instance | None,
    terms: OfferTerms,
) -> Coroutine[Any, Any, TickResult] | None:
    """A terminate-and-book coroutine when the instance is gone (preempted, exited, terminated
    by someone else, unknown to the provider); None while it lives."""
    if instance is not None and instance.status not in GONE:
        return None
    status = instance.status if instance is not None else "gone (the provider no longer knows it)"
    with deps.store.session() as s:
        cloud_repo.learn(
            s,
            terms.provider,
            terms.region,
            terms.gpu,
            success=None if status == "preempted" else False,
            preempted=status == "preempted",
            cooldown_until=utcnow() + timedelta(seconds=deps.cooldown_s),
        )
    ending = mark_ending(
        deps, inst, "failed", f"instance {status} at {job.progress:.0%}", fault=True, terminate=True
    )
    client = deps.clouds[inst.provider]
    return terminate(deps, ctx, job, ending, client, terms)


def still_listed(deps: AgentDeps, job: Job, inst: CloudInstance, after: Instance) -> TickResult:
    """The provider accepted the terminate but still lists the instance as live. A shutdown may
    take a while (as long as a boot, at most); past that it is trouble, said once and counted,
    so that `give_up` ends the job (`abandon`) instead of the run waiting here for ever."""
    assert inst.ended_at is not None
    waited_s = (utcnow() - inst.ended_at).total_seconds()
    if waited_s <= deps.cloud.boot_timeout_s:
        return TickResult("Terminating")
    return trouble(
        deps,
        job,
        f"{inst.provider} accepted the terminate of {inst.instance_id} but still lists it as "
        f"{after.status} after {deps.cloud.boot_timeout_s:.0f}s; asking again",
    )


def abandon(deps: AgentDeps, job: Job, inst: CloudInstance, why: str) -> TickResult:
    """The instance is ending but its end cannot be confirmed (a terminate refused, or accepted
    while the instance stays listed) in many ticks: the job ends with the outcome it was ending
    with, and the instance goes to the sweeper (no live run owns it now), which keeps
    terminating it and books its bill. Its reservation stays pending, counted against the
    budget, until then: the instance may still bill, so nothing is booked as final here."""
    outcome = inst.outcome or "failed"
    status = JOB_TO_STATUS.get(outcome, JobStatus.failed)
    with deps.store.session() as s:
        repo.update_run(s, job.run_id)  # the run's write lock, as `book_end` takes
        state = repo.load_state(s, job.run_id, observations=False)
        assert state is not None
        reserved = sum(
            p.amount
            for p in state.payments
            if p.job_id == job.id and p.status == PaymentStatus.pending
        )
        repo.update_job(
            s,
            job.id,
            status=status,
            completed_at=utcnow(),
            **({} if status == JobStatus.completed else {"error_message": why[:2000]}),
        )
        if status == JobStatus.completed:
            repo.update_run(s, job.run_id, status=RunStatus.completed, progress=1.0)
        elif outcome == "cancelled":
            reason = state.run.cancel_reason or "cancelled"
            repo.update_run(
                s,
                job.run_id,
                status=RunStatus.cancelled,
                status_reason=reason[:1].upper() + reason[1:],
            )
        repo.add_observation(
            s,
            job.run_id,
            OBS.error,
            f"Instance {inst.name} ({inst.provider} {inst.instance_id}) is not confirmed "
            f"terminated ({why}): it may still be billing. Terminate it in the {inst.provider} "
            f"console if it is still there; procure's sweeper keeps terminating it and books its "
            f"bill then. {format_usd(reserved)} stays reserved for it until then",
            vendor_id=job.vendor_id,
        )
    return TickResult({JobStatus.completed: "Job completed"}.get(status, "Job failed"))


def end(
    deps: AgentDeps,
    ctx: PlanContext | None,
    job: Job,
    inst: CloudInstance | None,
    billed: int,
    outcome: str,
    reason: str,
    *,
    fault: bool | None = None,
) -> TickResult:
    result = book_end(deps, ctx, job, inst, billed, outcome, reason, fault=fault)
    crash("reconciled")
    return result


async def terminate(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
) -> TickResult:
    """Terminate (idempotent), confirm, read the bill, book it: retried tick after tick until
    the provider confirms."""
    assert inst.instance_id is not None
    said = f"{inst.provider} terminate {inst.instance_id}: "
    try:
        await client.terminate([inst.instance_id])
    except CloudError as exc:
        return trouble(deps, job, f"{said}{exc}; will retry", same=said)
    if inst.ended_at is None:
        # Billed until the provider accepts the terminate (not from when procure decided to
        # end: a terminate refused for a while is billed all that while); read after its answer,
        # so a computed bill errs high, never low.
        now = utcnow()
        with deps.store.session() as s:
            cloud_repo.update_instance(s, inst.name, ended_at=now)
        inst = dataclasses.replace(inst, ended_at=now)
    try:
        after = await client.get(inst.instance_id)
    except CloudError as exc:
        return trouble(deps, job, f"{said}{exc}; will retry", same=said)
    crash("cancel_sent")
    if after is not None and after.status not in GONE:
        return still_listed(deps, job, inst, after)
    try:
        billed = await client.billed(inst.instance_id)
    except CloudError as exc:
        # A bill refused for good (a key without billing access) or for `max_troubles` ticks
        # would keep a finished run open forever: book the computed bill (it errs high).
        last = ctx.state.run.troubles + 1 >= deps.max_troubles
        if exc.retryable and not last:
            return trouble(deps, job, f"{inst.provider} billing of {inst.instance_id}: {exc}")
        billed = computed_bill(inst, terms, from_launch=bills_boot(client, terms))
        with deps.store.session() as s:
            repo.add_observation(
                s,
                job.run_id,
                OBS.error,
                f"{inst.provider} billing of {inst.instance_id} cannot be read ({exc}): booking "
                f"{format_usd(billed)}, computed from its price and time (rounded up, as the "
                "provider's bill may be a little less)",
                vendor_id=job.vendor_id,
            )
    else:
        if billed is None:  # no billing endpoint (Lambda), no charge yet (Vast.ai): its rule
            billed = computed_bill(inst, terms, from_launch=bills_boot(client, terms))
    return end(deps, ctx, job, inst, billed, inst.outcome or "failed", inst.end_reason or "ended")
