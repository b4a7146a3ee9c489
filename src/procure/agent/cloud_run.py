"""A job on a rented cloud instance, one tick at a time: the intent (job `submitted`, its payment
`pending` as the money reserved, the instance `launching`) before any call; launch by name, after
`find(name)` (a crash never leads to a second instance); boot within a deadline; the node checked,
then the job submitted to its runner and polled; money reserved one billing increment ahead (the
instance is terminated before the budget could be overspent); terminate, retried until confirmed,
then the provider's bill booked as the job's payment, in the transaction that ends the job.

The instance record's states: launching → booting → running → terminating → terminated. Why it
ends (`outcome`: completed | failed | cancelled | stopped) is set with `terminating`."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

from procure.agent import joblogs
from procure.agent.cloud_money import ahead_s, book_end, computed_bill, cost, reserve
from procure.agent.cloud_node import NodeError, NodeJob, checked_node_url, http_node
from procure.agent.cloud_offers import as_offer, describe_offer
from procure.agent.context import PlanContext
from procure.agent.deps import EPS, OBS, AgentDeps, TickResult
from procure.agent.ledger import spend_cap_blocks
from procure.clouds.base import (
    LABEL_PREFIX,
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    LaunchSpec,
    QuotaError,
    RentalCloud,
)
from procure.crashpoints import crash_point
from procure.models import (
    Action,
    Job,
    JobStatus,
    OfferTerms,
    Payment,
    PaymentStatus,
    Vendor,
    format_usd,
    utcnow,
)
from procure.store import cloud_repo, hotpath, repo
from procure.store.cloud_repo import CloudInstance
from procure.store.hotpath import PollWrite
from procure.vendors.credentials import CredentialError, Keyring
from procure.warnings import check_run

GONE = ("preempted", "exited", "terminated")  # the instance (and the job on it) is lost


def instance_name(job: Job) -> str:
    """The instance's name (its label on Vast.ai): procure's label and the job's key."""
    return (LABEL_PREFIX + job.idempotency_key)[:64]


def _keyring(deps: AgentDeps) -> Keyring:
    ring = deps.keyring or getattr(deps.vendors, "_keyring", None)
    if ring is None:
        raise CredentialError("no keyring to encrypt the node token with")
    return ring  # type: ignore[no-any-return]


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
    name = instance_name(job)
    # Booting may be billed: reserve through the boot deadline and one stretch beyond it.
    window_s = deps.cloud.boot_timeout_s + ahead_s(deps, terms)
    amount = cost(terms, window_s)
    payment_id = repo.new_id()
    payment = Payment(
        _id=payment_id,
        run_id=run.id,
        job_id=job.id,
        vendor_id=vendor.vendor_id,
        amount=amount,
        status=PaymentStatus.pending,
        nonce=f"cloud-{payment_id}",  # no x402 authorisation: the provider bills the account
        hours=window_s / 3600,
        created_at=now,
        updated_at=now,
    )
    token = _keyring(deps).encrypt(secrets.token_urlsafe(32))
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
            f"{format_usd(amount)} reserved for the boot and the first "
            f"{ahead_s(deps, terms):.0f}s of the {hours:.2f}h of work"
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


# --- one step of a job on an instance ------------------------------------------------------


async def step(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, *, cancelling: bool = False
) -> TickResult:
    """The tick of a run whose active job runs (or is to run) on a cloud instance."""
    with deps.store.session() as s:
        inst = cloud_repo.instance_of_job(s, job.id)
    if inst is None:
        return _end(deps, ctx, job, None, 0, "failed", "the job has no instance record")
    client = deps.clouds.get(inst.provider)
    if client is None:
        return _trouble(
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
        why = None
        if cancelling:
            why = ("cancelled", run.cancel_reason or "cancelled")
        elif run.deadline is not None and utcnow() > run.deadline:
            why = ("stopped", "the run's deadline passed")
        if why is not None:
            inst = _mark_ending(
                deps, inst, *why, fault=False, terminate=inst.instance_id is not None
            )
    terms = OfferTerms.model_validate(inst.offer)
    if inst.status == "launching":
        return await _launch(deps, ctx, job, vendor, inst, client, terms)
    if inst.status == "booting":
        return await _boot(deps, ctx, job, inst, client, terms)
    if inst.status == "running":
        return await _run(deps, ctx, job, inst, client, terms)
    if inst.status == "terminating":
        return await _terminate(deps, ctx, job, inst, client, terms)
    return _end(deps, ctx, job, inst, inst.billed or 0, inst.outcome or "failed", "ended")


def give_up(deps: AgentDeps, job: Job, why: str) -> TickResult:
    """No way forward in many ticks: end the instance (terminate, then book) and the job."""
    with deps.store.session() as s:
        inst = cloud_repo.instance_of_job(s, job.id)
    if inst is not None and inst.outcome is None:
        _mark_ending(deps, inst, "failed", why, fault=True, terminate=inst.instance_id is not None)
    return TickResult("Vendor error")


def _trouble(deps: AgentDeps, job: Job, message: str) -> TickResult:
    with deps.store.session() as s:
        repo.add_observation(s, job.run_id, OBS.error, message, vendor_id=job.vendor_id)
    return TickResult("Vendor error")


def _mark_ending(
    deps: AgentDeps, inst: CloudInstance, outcome: str, reason: str, *, fault: bool, terminate: bool
) -> CloudInstance:
    """Record why the instance ends; `terminate`: it exists, so terminate it next."""
    values: dict[str, object] = {
        "outcome": outcome,
        "end_reason": reason[:2000],
        "fault": int(fault),
    }
    if terminate:
        values |= {"status": "terminating", "ended_at": utcnow()}
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


def _cool(deps: AgentDeps, terms: OfferTerms, **learned: object) -> None:
    with deps.store.session() as s:
        cloud_repo.learn(
            s,
            terms.provider,
            terms.region,
            terms.gpu,
            cooldown_until=utcnow() + timedelta(seconds=deps.cooldown_s),
            **learned,  # type: ignore[arg-type]
        )


async def _launch(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    vendor: Vendor,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
) -> TickResult:
    """Find the instance by name (a launch before a crash); launch it only if there is none."""
    try:
        found = await client.find(inst.name)
    except CloudError as exc:
        return _trouble(deps, job, f"{inst.provider} find {inst.name}: {exc}")
    found = [i for i in found if i.status != "terminated"]
    if len(found) > 1:  # cannot happen through procure; if it does, keep one
        try:
            await client.terminate([i.id for i in found[1:]])
        except CloudError as exc:
            return _trouble(deps, job, f"{inst.provider} terminate of a duplicate: {exc}")
    if found:
        instance, how = found[0], "found after an interrupted launch"
    elif inst.outcome is not None:  # ending before anything was launched: no money moved
        return _end(deps, ctx, job, inst, 0, inst.outcome, inst.end_reason or "")
    else:
        try:
            token = _keyring(deps).decrypt(inst.node_token)
        except CredentialError as exc:
            return _end(deps, ctx, job, inst, 0, "failed", str(exc))
        spec = LaunchSpec(
            name=inst.name,
            offer=as_offer(terms),
            image=(vendor.cloud.image if vendor.cloud else None) or deps.cloud.image,
            env={"GPU_WORKER_TOKEN": token},
            bid_per_hour=terms.min_bid_per_hour if terms.interruptible else None,
        )
        try:
            instance = await client.launch_spec(spec)
        except (CapacityError, QuotaError, AuthError) as exc:
            # Nothing was launched: no money moved. Cool the offer kind (or the whole account,
            # for a key refused) and choose again.
            _cool(deps, terms)
            if isinstance(exc, AuthError):
                with deps.store.session() as s:
                    repo.cool_down(
                        s, vendor.vendor_id, utcnow() + timedelta(seconds=deps.cooldown_s)
                    )
            why = f"{inst.provider} refused the launch: {type(exc).__name__}: {exc}"
            return _end(deps, ctx, job, inst, 0, "failed", why, fault=False)
        except CloudError as exc:  # no answer: it may have launched; `find` tells next tick
            return _trouble(
                deps, job, f"{inst.provider} launch {inst.name}: {exc}; will look it up"
            )
        how = "launched"
    crash_point("paid")
    now = utcnow()
    with deps.store.session() as s:
        cloud_repo.update_instance(
            s,
            inst.name,
            instance_id=instance.id[:100],
            status="booting" if inst.outcome is None else "terminating",
            launched_at=inst.launched_at or now,
            boot_deadline=now + timedelta(seconds=deps.cloud.boot_timeout_s),
            **({"ended_at": now} if inst.outcome is not None else {}),
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
    crash_point("recorded")
    if inst.status == "terminating":
        return await _terminate(deps, ctx, job, inst, client, terms)
    return TickResult("Instance launched")


async def _boot(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    client: RentalCloud,
    terms: OfferTerms,
) -> TickResult:
    assert inst.instance_id is not None
    try:
        instance = await client.get(inst.instance_id)
    except CloudError as exc:
        return _trouble(deps, job, f"{inst.provider} get {inst.instance_id}: {exc}")
    now = utcnow()
    lost = _lost(deps, ctx, job, inst, instance, terms)
    if lost is not None:
        return await lost
    assert instance is not None
    if instance.status == "active" and instance.node_url:
        try:
            node_url = checked_node_url(instance.node_url, instance.ip)
        except NodeError as exc:  # never send the token there: a vendor failure
            _cool(deps, terms, success=False)
            inst = _mark_ending(deps, inst, "failed", str(exc), fault=True, terminate=True)
            return await _terminate(deps, ctx, job, inst, client, terms)
        boot_s = (now - (inst.launched_at or now)).total_seconds()
        with deps.store.session() as s:
            cloud_repo.learn(s, terms.provider, terms.region, terms.gpu, boot_s=boot_s)
            cloud_repo.update_instance(
                s, inst.name, status="running", node_url=node_url, active_at=now
            )
            repo.add_observation(
                s,
                job.run_id,
                OBS.job_event,
                f"Instance {inst.name} booted in {boot_s:.0f}s; its node answers at {node_url}",
                vendor_id=job.vendor_id,
            )
            inst = cloud_repo.get_instance(s, inst.name)  # type: ignore[assignment]
        return await _run(deps, ctx, job, inst, client, terms, instance=instance)
    if inst.boot_deadline is not None and now > inst.boot_deadline:
        _cool(deps, terms, success=False)
        why = f"boot did not finish within {deps.cloud.boot_timeout_s:.0f}s ({instance.status})"
        inst = _mark_ending(deps, inst, "failed", why, fault=True, terminate=True)
        return await _terminate(deps, ctx, job, inst, client, terms)
    if not reserve(deps, ctx, job, inst, terms):
        inst = _mark_ending(deps, inst, "stopped", _BUDGET, fault=False, terminate=True)
        return await _terminate(deps, ctx, job, inst, client, terms)
    return TickResult("Instance booting")


_BUDGET = "the budget cannot take the next billing increment"


def _lost(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance,
    instance: Instance | None,
    terms: OfferTerms,
):  # type: ignore[no-untyped-def]
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
    ending = _mark_ending(
        deps, inst, "failed", f"instance {status} at {job.progress:.0%}", fault=True, terminate=True
    )
    client = deps.clouds[inst.provider]
    return _terminate(deps, ctx, job, ending, client, terms)


async def _run(
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
            return _trouble(deps, job, f"{inst.provider} get {inst.instance_id}: {exc}")
        lost = _lost(deps, ctx, job, inst, instance, terms)
        if lost is not None:
            return await lost
    if not reserve(deps, ctx, job, inst, terms):
        inst = _mark_ending(deps, inst, "stopped", _BUDGET, fault=False, terminate=True)
        return await _terminate(deps, ctx, job, inst, client, terms)
    try:
        token = _keyring(deps).decrypt(inst.node_token)
    except CredentialError as exc:
        inst = _mark_ending(deps, inst, "failed", str(exc), fault=False, terminate=True)
        return await _terminate(deps, ctx, job, inst, client, terms)
    node = (deps.node_client or http_node)(inst.node_url, token)
    try:
        node_job_id = inst.node_job_id
        if node_job_id is None:
            submitted = await node.submit(
                command=list(deps.cloud.command),
                image=None,
                env={"PROCURE_JOB_SPEC": json.dumps(job.job_params, sort_keys=True)[:8000]},
                resume_from=job.job_params.get("resumeFrom"),
                checkpoint_dir=deps.cloud.checkpoint_dir,
                idempotency_key=job.idempotency_key,
            )
            crash_point("signed")
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
        lines, cursor = await node.logs(node_job_id, job.log_cursor) if njob else ([], 0)
    except NodeError as exc:
        return _trouble(deps, job, f"node of {inst.name}: {exc}")
    finally:
        await node.aclose()
    crash_point("polled")
    if njob is None:  # the node restarted and forgot it: what it saved stands
        inst = _mark_ending(
            deps, inst, "failed", "the node lost the job", fault=True, terminate=True
        )
        return await _terminate(deps, ctx, job, inst, client, terms)
    advanced = njob.progress > job.progress + EPS
    since = job.progressed_at or inst.active_at or job.created_at
    _write_poll(deps, ctx, job, njob, lines, cursor)
    if njob.status == "completed" and njob.progress >= 1 - 1e-6:
        inst = _mark_ending(
            deps, inst, "completed", "the job completed", fault=False, terminate=True
        )
        return await _terminate(deps, ctx, job, inst, client, terms)
    if njob.status in ("completed", "failed", "cancelled"):
        why = njob.error or f"job {njob.status} on the node (exit code {njob.exit_code})"
        inst = _mark_ending(deps, inst, "failed", why, fault=False, terminate=True)
        return await _terminate(deps, ctx, job, inst, client, terms)
    stalled_s = (utcnow() - since).total_seconds()
    if not advanced and stalled_s > deps.stall_s:
        why = f"no progress for {stalled_s:,.0f}s (stuck at {njob.progress:.0%})"
        inst = _mark_ending(deps, inst, "failed", why, fault=True, terminate=True)
        return await _terminate(deps, ctx, job, inst, client, terms)
    return TickResult(f"Job running ({njob.progress:.0%})")


def _end(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    inst: CloudInstance | None,
    billed: int,
    outcome: str,
    reason: str,
    *,
    fault: bool | None = None,
) -> TickResult:
    result = book_end(deps, ctx, job, inst, billed, outcome, reason, fault=fault)
    crash_point("reconciled")
    return result


def _checkpoint_progress(lines: list[str], url: str) -> float | None:
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


def _write_poll(
    deps: AgentDeps, ctx: PlanContext, job: Job, njob: NodeJob, lines: list[str], cursor: int
) -> None:
    now = utcnow()
    kept = joblogs.keep(lines, ctx.state.run.log_lines)
    saved_url, saved = job.checkpoint_url, job.checkpoint_progress
    if njob.checkpoint and njob.checkpoint != job.checkpoint_url:
        at = _checkpoint_progress(lines, njob.checkpoint)
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


async def _terminate(
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
    try:
        await client.terminate([inst.instance_id])
        after = await client.get(inst.instance_id)
    except CloudError as exc:
        return _trouble(
            deps, job, f"{inst.provider} terminate {inst.instance_id}: {exc}; will retry"
        )
    crash_point("cancel_sent")
    if after is not None and after.status not in GONE:
        return TickResult("Terminating")
    try:
        billed = await client.billed(inst.instance_id)
    except CloudError as exc:
        return _trouble(deps, job, f"{inst.provider} billing of {inst.instance_id}: {exc}")
    if billed is None:  # no billing endpoint (Lambda): its rule, from when it became active
        billed = computed_bill(inst, terms)
    return _end(deps, ctx, job, inst, billed, inst.outcome or "failed", inst.end_reason or "ended")
