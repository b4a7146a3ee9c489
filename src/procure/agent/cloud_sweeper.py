"""The sweeper: instances carrying this install's label (`procure-job-<install tag>-...`, or an
older untagged name its store records) that no live run owns (a crash between launch and record
on a run that then ended, a terminate lost, a launch that landed after its job ended) are
terminated, each one recorded on its run (or logged when no run knows it) and its bill booked.
Another install's instances on the same account are left alone. An instance whose job ended
while it was still ending, and which the provider no longer lists live, is booked once the
provider says it is gone. Run by the worker every `CloudTuning.sweep_every_s`; a terminate
that fails is tried again at the next sweep."""

from __future__ import annotations

import dataclasses
import logging

from sqlalchemy.orm import Session

from procure.agent.cloud_end import GONE
from procure.agent.cloud_money import bills_boot, computed_bill
from procure.agent.cloud_run import own_prefix
from procure.agent.deps import OBS, AgentDeps
from procure.clouds.base import LABEL_PREFIX, CloudError, RentalCloud
from procure.models import (
    CLOUD_NONCE_PREFIX,
    OfferTerms,
    Payment,
    PaymentStatus,
    format_usd,
    utcnow,
)
from procure.store import cloud_repo, repo

log = logging.getLogger(__name__)
AGENT_PREFIX = LABEL_PREFIX + "job-"  # the agent's instances; the fleet's and gateway's are theirs


async def sweep(deps: AgentDeps) -> list[str]:
    """Terminate the agent's orphaned instances on every configured cloud (their names), and
    book those whose job ended before they were confirmed gone (`settle_ended`)."""
    swept: list[str] = []
    with deps.store.session() as s:
        mine = own_prefix(cloud_repo.install_tag(s))
    for provider, client in sorted(deps.clouds.items()):
        try:
            instances = await client.labelled()
        except CloudError as exc:
            log.warning("sweeper: cannot list %s instances: %s", provider, exc)
            continue
        for instance in instances:
            name = instance.name or ""
            if not name.startswith(AGENT_PREFIX) or instance.status == "terminated":
                continue
            with deps.store.session() as s:
                if cloud_repo.live_owner(s, name):
                    continue
                record = cloud_repo.get_instance(s, name)
            if record is None and not name.startswith(mine):
                continue  # another install's (or one from before install tags): not ours
            try:
                await client.terminate([instance.id])
            except CloudError as exc:
                log.warning("sweeper: terminate of %s on %s failed: %s", name, provider, exc)
                continue
            swept.append(name)
            try:
                billed, unread = await client.billed(instance.id), None
            except CloudError as exc:  # terminated: it will not be listed again, so book now
                billed, unread = None, str(exc)
            if record is None:
                log.warning(
                    "sweeper: terminated %s (%s %s): no run knows it", name, provider, instance.id
                )
                continue
            from_launch = bills_boot(client, OfferTerms.model_validate(record.offer))
            _book(deps, record, instance.id, billed, unread, from_launch=from_launch)
        await settle_ended(deps, client, {i.id for i in instances})
    return swept


async def settle_ended(deps: AgentDeps, client: RentalCloud, listed: set[str]) -> list[str]:
    """Book the instances whose job ended while they were still ending (`cloud_end.abandon`),
    once the provider says they are gone: one no longer listed live is never swept above
    (Lambda lists no `terminating` instance as live, and forgets a terminated one), so its
    reservation would stay pending for ever, counted against the run's budget and the spend
    caps. `listed`: the ids the sweep above has (it terminates and books those); their names."""
    with deps.store.session() as s:
        ending = cloud_repo.unowned_ending(s, client.provider)
    settled: list[str] = []
    for record in ending:
        instance_id = record.instance_id
        if instance_id is None or instance_id in listed:
            continue
        try:
            instance = await client.get(instance_id)
        except CloudError as exc:
            log.warning("sweeper: cannot read %s on %s: %s", record.name, record.provider, exc)
            continue
        if instance is not None and instance.status not in GONE:
            continue  # still ending (or live again): asked again at the next sweep
        try:
            billed, unread = await client.billed(instance_id), None
        except CloudError as exc:
            billed, unread = None, str(exc)
        from_launch = bills_boot(client, OfferTerms.model_validate(record.offer))
        seen = instance.status if instance is not None else "gone"
        head = f"Sweeper saw instance {record.name} ({record.provider} {instance_id}) {seen}"
        _book(deps, record, instance_id, billed, unread, from_launch=from_launch, head=head)
        settled.append(record.name)
    return settled


def _book(
    deps: AgentDeps,
    record: cloud_repo.CloudInstance,
    instance_id: str,
    billed: int | None,
    unread: str | None = None,
    *,
    from_launch: bool = False,
    head: str | None = None,
) -> None:
    """Record the sweep on the run; book the bill if the run never did (its payment pending),
    or as a payment of its own for a launch that landed after its job had ended. `unread`: why
    the provider's bill could not be read (the computed one is booked, erring high); `from_launch`:
    the provider bills the boot, so a computed bill starts at the launch."""
    terms = OfferTerms.model_validate(record.offer)
    with deps.store.session() as s:
        note = f" (its bill could not be read: {unread}; computed)" if unread else ""
        if record.status == "terminated" and record.instance_id != instance_id:
            # A launch whose answer was lost, landed after its job ended with nothing booked.
            # Claimed by one conditional UPDATE: of two workers sweeping it, one books it.
            if not cloud_repo.claim_late(s, record.name, instance_id):
                return
            now = utcnow()
            # Without the provider's bill: from the intent (before any launch) to now, erring high.
            whole = dataclasses.replace(record, launched_at=record.created_at, ended_at=now)
            late = billed if billed is not None else computed_bill(whole, terms)
            cloud_repo.update_instance(s, record.name, billed=late)
            if late:
                nonce = f"{CLOUD_NONCE_PREFIX}late-{record.provider}-{instance_id}"[:66]
                _book_payment(s, record, late, nonce)
                note += f"; booked {format_usd(late)} as billed for a launch that landed late"
        elif record.status == "terminated":
            # Its job ended with it (said gone by the provider, or ended, and booked at what
            # could be read then), yet it ran on, billed, until this sweep: the rest is booked.
            if billed is None:
                billed = computed_bill(
                    dataclasses.replace(record, ended_at=None), terms, from_launch=from_launch
                )
            more = billed - (record.billed or 0)
            if more > 0 and cloud_repo.claim_more(s, record.name, record.billed, billed):
                _book_payment(s, record, more, f"{CLOUD_NONCE_PREFIX}{repo.new_id()}")
                note += f"; booked {format_usd(more)} more, billed after its job ended"
        if record.status != "terminated":
            state = repo.load_state(s, record.run_id, observations=False)
            ours = [p for p in (state.payments if state else []) if p.job_id == record.job_id]
            # Pending, or marked failed by someone who took it for an x402 payment that expired.
            pending = [p for p in ours if p.status == PaymentStatus.pending][-1:] or [
                p for p in ours if p.status == PaymentStatus.failed
            ][-1:]
            if any(p.status == PaymentStatus.completed for p in ours):
                pending = []
            if billed is None:  # no billing endpoint (Lambda): its rule, as the tick books it,
                # to this sweep's terminate: an instance still listed live after an accepted
                # terminate (abandoned to the sweeper) billed on until now, and booked up to
                # that first acceptance it was booked short. (No end: `computed_bill` ends now.)
                billed = computed_bill(
                    dataclasses.replace(record, ended_at=None), terms, from_launch=from_launch
                )
            for p in pending:
                status = PaymentStatus.completed if billed else PaymentStatus.failed
                repo.update_payment(s, p.id, amount=billed, status=status, error_message=None)
                note = f"; booked {format_usd(billed)} as billed"
            if pending:
                repo.refresh_budget(s, record.run_id)
            cloud_repo.update_instance(
                s, record.name, status="terminated", billed=billed, instance_id=instance_id
            )
        said_of = f"instance {record.name} ({record.provider} {instance_id})"
        head = head or f"Sweeper terminated {said_of}"
        # Said once while it repeats: a provider that accepts the terminate but lists the
        # instance on has it terminated again at every sweep, and must not add a row each time.
        if not any(c.startswith(head) for c in repo.recent_contents(s, record.run_id)):
            said = f"{head}: no live run owns it{note}"
            repo.add_observation(s, record.run_id, OBS.error, said, vendor_id=record.vendor_id)


def _book_payment(s: Session, record: cloud_repo.CloudInstance, amount: int, nonce: str) -> None:
    """A completed payment of the record's job for what the instance billed beyond its booking
    (covering no hours of its own: counted where it is booked)."""
    now = utcnow()
    repo.insert_payment(
        s,
        Payment(
            _id=repo.new_id(),
            run_id=record.run_id,
            job_id=record.job_id,
            vendor_id=record.vendor_id,
            amount=amount,
            status=PaymentStatus.completed,
            nonce=nonce,
            hours=0.0,
            created_at=now,
            updated_at=now,
        ),
    )
    repo.refresh_budget(s, record.run_id)
