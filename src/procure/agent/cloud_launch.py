"""A cloud instance launched and booted: found by name first (a launch before a crash is never
repeated), launched only if there is none, then watched until its node answers (checked before
the token goes there) or its boot deadline passes."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from procure.agent.cloud_end import (
    BUDGET,
    cool,
    crash,
    end,
    keyring,
    lost,
    mark_ending,
    terminate,
    trouble,
)
from procure.agent.cloud_money import reserve
from procure.agent.cloud_node import NodeError, checked_node_url
from procure.agent.cloud_offers import as_offer, describe_offer
from procure.agent.cloud_watch import poll, unseen
from procure.agent.context import PlanContext, start_read
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    LaunchSpec,
    QuotaError,
    RateLimited,
    RentalCloud,
)
from procure.models import Job, JobStatus, OfferTerms, Vendor, format_usd, utcnow
from procure.store import cloud_repo, repo
from procure.store.cloud_repo import CloudInstance
from procure.vendors.credentials import CredentialError

LAUNCH_LOOKUP_S = 120.0
"""How long a launch left without an answer is looked up by name before its job is given up:
a provider's listing may show a launch a little after it was made."""


async def launch(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    vendor: Vendor,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
) -> TickResult:
    """Find the instance by name (a launch before a crash); launch it only if there is none."""
    if inst.outcome is not None and inst.launched_at is None:
        # Ending before any launch was tried (`launched_at` is written before the call): none
        # can be listed under its name, so no provider need answer first. One refusing every
        # call (a key revoked, an account suspended) kept the job, and its run, here for ever.
        return end(deps, ctx, job, inst, 0, inst.outcome, inst.end_reason or "")
    try:
        found = await client.find(inst.name)
    except CloudError as exc:
        return trouble(deps, job, f"{inst.provider} find {inst.name}: {exc}")
    found = [i for i in found if i.status != "terminated"]
    if len(found) > 1:  # cannot happen through procure; if it does, keep one
        try:
            await client.terminate([i.id for i in found[1:]])
        except CloudError as exc:
            return trouble(deps, job, f"{inst.provider} terminate of a duplicate: {exc}")
    if found:
        # Launched after the intent was written, at some moment unknown: from then, erring high.
        instance, how, before = found[0], "found after an interrupted launch", inst.created_at
    elif inst.outcome is not None:  # ending before anything was launched: no money moved
        return end(deps, ctx, job, inst, 0, inst.outcome, inst.end_reason or "")
    elif inst.launched_at is not None:
        return lookup(deps, ctx, job, inst, terms)
    else:
        try:
            token = keyring(deps).decrypt(inst.node_token)
        except CredentialError as exc:
            return end(deps, ctx, job, inst, 0, "failed", str(exc))
        spec = LaunchSpec(
            name=inst.name,
            offer=as_offer(terms),
            image=(vendor.cloud.image if vendor.cloud else None) or deps.cloud.image,
            env={"GPU_WORKER_TOKEN": token},
            bid_per_hour=terms.min_bid_per_hour if terms.interruptible else None,
        )
        before = utcnow()  # its bill cannot start earlier (a computed bill starts here)
        with deps.store.session() as s:  # tried: a launch left without answer is not repeated
            cloud_repo.update_instance(s, inst.name, launched_at=before)
        try:
            instance = await client.launch_spec(spec)
        except (CapacityError, QuotaError, AuthError) as exc:
            # Nothing was launched: no money moved. Cool the offer kind (or the whole account,
            # for a key refused) and choose again.
            cool(deps, terms)
            if isinstance(exc, AuthError):
                with deps.store.session() as s:
                    repo.cool_down(
                        s, vendor.vendor_id, utcnow() + timedelta(seconds=deps.cooldown_s)
                    )
            why = f"{inst.provider} refused the launch: {type(exc).__name__}: {exc}"
            return end(deps, ctx, job, inst, 0, "failed", why, fault=False)
        except RateLimited as exc:  # refused before anything was launched: try again later
            with deps.store.session() as s:
                cloud_repo.update_instance(s, inst.name, launched_at=None)
            return trouble(deps, job, f"{inst.provider} launch {inst.name}: {exc}")
        except CloudError as exc:
            if not exc.retryable:  # refused, to fix and not to retry: nothing was launched
                cool(deps, terms)
                with deps.store.session() as s:
                    cloud_repo.update_instance(s, inst.name, launched_at=None)
                why = f"{inst.provider} refused the launch: {exc}"
                return end(deps, ctx, job, inst, 0, "failed", why, fault=False)
            # No answer: it may have launched; `find` or `lookup` tells from the next tick.
            return trouble(deps, job, f"{inst.provider} launch {inst.name}: {exc}; will look it up")
        how = "launched"
    crash("paid")
    now = utcnow()
    with deps.store.session() as s:
        cloud_repo.update_instance(
            s,
            inst.name,
            instance_id=instance.id[:100],
            status="booting" if inst.outcome is None else "terminating",
            launched_at=inst.launched_at or before,
            boot_deadline=now + timedelta(seconds=deps.cloud.boot_timeout_s),
        )
        repo.update_job(s, job.id, status=JobStatus.running, vendor_job_id=instance.id[:100])
        repo.add_observation(
            s,
            job.run_id,
            OBS.job_event,
            f"Instance {inst.name} {how} on {inst.provider} (id {instance.id}, {instance.status}, "
            f"{describe_offer(terms)})",
            vendor_id=job.vendor_id,
        )
        inst = cloud_repo.get_instance(s, inst.name)  # type: ignore[assignment]
    crash("recorded")
    checked = priced(deps, ctx, job, vendor, inst, instance, terms)
    if isinstance(checked, str):
        return await refuse(deps, ctx, job, inst, client, terms, checked)
    inst, terms = checked
    if inst.status == "terminating":
        return await terminate(deps, ctx, job, inst, client, terms)
    return TickResult("Instance launched")


def lookup(
    deps: AgentDeps, ctx: PlanContext, job: Job, inst: CloudInstance, terms: OfferTerms
) -> TickResult:
    """A launch tried before got no answer and its instance is not listed (yet): a provider's
    listing may lag its launches, so it is never launched again under its name (that would be a
    second instance for one job). Looked up for a while (`LAUNCH_LOOKUP_S`, at most its boot
    timeout); then the job ends with nothing booked and the run chooses again (a new job, a new
    name); one that lands after all is the sweeper's (terminated, booked as a late launch)."""
    assert inst.launched_at is not None
    wait_s = min(LAUNCH_LOOKUP_S, deps.cloud.boot_timeout_s)
    if utcnow() <= inst.launched_at + timedelta(seconds=wait_s):
        return trouble(deps, job, f"{inst.provider} launch {inst.name}: not listed yet")
    cool(deps, terms, success=False)
    why = f"{inst.provider} launch {inst.name} got no answer and it never showed by its name"
    return end(deps, ctx, job, inst, 0, "failed", why, fault=True)


def priced(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    vendor: Vendor,
    inst: CloudInstance,
    instance: Instance,
    terms: OfferTerms,
) -> tuple[CloudInstance, OfferTerms] | str:
    """The instance at the price the provider says it bills, where that is above its offer's
    (a Vast.ai host's new ask, a RunPod pod placed on a dearer machine): recorded, so the
    reservation and a computed bill use it (a price of 0 is not said; a cheaper one is held at
    its offer's price, erring high). Why it is refused (str) instead, when its price is above
    the vendor's max price or the budget cannot reserve a billing increment at it."""
    price = instance.price_per_hour
    dearer = price > terms.price_per_hour
    if dearer:
        real = terms.model_copy(update={"price_per_hour": price})
        # What is reserved now holds the instance for fewer seconds at its real price.
        held_s = ((inst.reserved_until or inst.created_at) - inst.created_at).total_seconds()
        until = inst.created_at + timedelta(seconds=held_s * terms.price_per_hour / price)
        with deps.store.session() as s:
            cloud_repo.update_instance(s, inst.name, offer=real.model_dump(), reserved_until=until)
            repo.add_observation(
                s,
                job.run_id,
                OBS.error,
                f"Instance {inst.name} is billed at {format_usd(price)}/h, not its offer's "
                f"{format_usd(terms.price_per_hour)}/h",
                vendor_id=job.vendor_id,
            )
            inst = cloud_repo.get_instance(s, inst.name)  # type: ignore[assignment]
        assert inst is not None
        terms = real
    # Checked on the recorded price too: a crash after recording it must not let it run on.
    cap = vendor.cloud.max_price_per_hour if vendor.cloud is not None else None
    if cap is not None and terms.price_per_hour > cap:
        return (
            f"priced at {format_usd(terms.price_per_hour)}/h, above the {format_usd(cap)}/h "
            f"{vendor.vendor_id} allows"
        )
    if dearer and inst.status != "terminating" and not reserve(deps, ctx, job, inst, terms):
        return f"priced at {format_usd(price)}/h, {BUDGET}"
    return inst, terms


async def refuse(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
    why: str,
) -> TickResult:
    """An instance not as offered: terminated at once and its offer kind cooled, as a launch
    refused (not the run's fault): the run chooses again elsewhere."""
    cool(deps, terms)
    with deps.store.session() as s:
        inst = cloud_repo.get_instance(s, inst.name)  # type: ignore[assignment]
    assert inst is not None
    terms = OfferTerms.model_validate(inst.offer)  # its real price, for a computed bill
    if inst.outcome is None:  # one already ending (cancelled) keeps why it ends
        inst = mark_ending(deps, inst, "failed", why, fault=False, terminate=True)
    return await terminate(deps, ctx, job, inst, client, terms)


async def boot(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    vendor: Vendor,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
) -> TickResult:
    assert inst.instance_id is not None
    asked = utcnow()
    try:
        instance = await client.get(inst.instance_id)
    except CloudError as exc:
        return await unseen(deps, ctx, job, inst, client, terms, exc)
    now = utcnow()
    gone = lost(deps, ctx, job, inst, instance, terms)
    if gone is not None:
        return await gone
    assert instance is not None
    checked = priced(deps, ctx, job, vendor, inst, instance, terms)
    if isinstance(checked, str):
        return await refuse(deps, ctx, job, inst, client, terms, checked)
    inst, terms = checked
    if instance.status == "active" and instance.node_url:
        try:
            node_url = checked_node_url(instance.node_url, instance.ip)
        except NodeError as exc:  # never send the token there: a vendor failure
            cool(deps, terms, success=False)
            inst = mark_ending(deps, inst, "failed", str(exc), fault=True, terminate=True)
            return await terminate(deps, ctx, job, inst, client, terms)
        launched = inst.launched_at or now
        seen_s = (now - launched).total_seconds()
        # Its boot ended after the last poll that saw it booting (or its launch) and by this
        # one: learned only where that window tells (a poll that came late, the worker down,
        # would have the planner price every boot there at the outage), at its middle.
        ended = start_read(launched, inst.active_at or launched, now)
        boot_s = None if ended is None else (ended - launched).total_seconds()
        with deps.store.session() as s:
            cloud_repo.learn(s, terms.provider, terms.region, terms.gpu, boot_s=boot_s)
            # Billed from when it became active, after the last poll that saw it booting (or
            # its launch): counted from there, a computed bill errs high by at most one poll.
            cloud_repo.update_instance(
                s,
                inst.name,
                status="running",
                node_url=node_url,
                active_at=inst.active_at or inst.launched_at or asked,
            )
            repo.add_observation(
                s,
                job.run_id,
                OBS.job_event,
                f"Instance {inst.name} "
                + (
                    f"booted in {boot_s:.0f}s"
                    if boot_s is not None
                    else f"seen booted {seen_s:.0f}s after its launch (too late to learn its boot)"
                )
                + f"; its node answers at {node_url}",
                vendor_id=job.vendor_id,
            )
            inst = cloud_repo.get_instance(s, inst.name)  # type: ignore[assignment]
        return await poll(deps, ctx, job, inst, client, terms, instance=instance)
    if inst.boot_deadline is not None and now > inst.boot_deadline:
        cool(deps, terms, success=False)
        why = f"boot did not finish within {deps.cloud.boot_timeout_s:.0f}s ({instance.status})"
        inst = mark_ending(deps, inst, "failed", why, fault=True, terminate=True)
        return await terminate(deps, ctx, job, inst, client, terms)
    if instance.status == "booting":  # still booting then: its bill starts later (see above)
        with deps.store.session() as s:
            cloud_repo.update_instance(s, inst.name, active_at=asked)
        # Before the reservation: where the boot is not billed, it counts from here.
        inst = dataclasses.replace(inst, active_at=asked)
    if not reserve(deps, ctx, job, inst, terms):
        inst = mark_ending(deps, inst, "stopped", BUDGET, fault=False, terminate=True)
        return await terminate(deps, ctx, job, inst, client, terms)
    return TickResult("Instance booting")
