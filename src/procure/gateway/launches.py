"""Launching a paid job's instance: the intent in the book before the cloud is called, the name
looked up before any launch (and never launched twice under it), refusals tried elsewhere,
offers no dearer than the sale."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timedelta

from procure.clouds.base import CloudError, Instance, LaunchSpec, Offer, RateLimited
from procure.crashpoints import crash_point
from procure.gateway import book
from procure.gateway.pricing import amount_for, best_offer
from procure.gateway.runtime import (
    Runtime,
    instance_row,
    job_row,
    out_of_time,
    update_instance,
    update_job,
)
from procure.models import format_usd, usd_to_micros, utcnow
from procure.store.gateway_tables import GatewayInstanceRow, GatewayJobRow

LAUNCH_LOOKUP_S = 120.0
"""How long a launch left without an answer is looked up by name before it is given up: a
provider's listing may show a launch a little after it was made."""


async def launch(rt: Runtime, row: GatewayJobRow) -> None:
    inst = instance_row(rt, row.job_id)
    if row.status == "launching" and inst is not None and inst.status == "booting":
        # Its instance was recorded but not the job (an older gateway wrote them apart): on.
        update_job(rt, row.job_id, status="booting")
        return
    if row.status == "launching" and inst is not None and inst.status == "launching":
        try:
            found = await rt.cloud.find(inst.name)
        except CloudError as exc:
            update_job(rt, row.job_id, error=f"find {inst.name}: {exc}"[:2000])
            return
        if found:  # launched before a crash or a lost answer: adopt it, never launch again
            for extra in found[1:]:
                await rt.cloud.terminate([extra.id])
            _launched(rt, row, inst, found[0])
            return
        if out_of_time(rt, row):
            # A launch tried without answer may land later: its cost is the sweeper's to book,
            # and it counts against the caps until then.
            tried = inst.launched_at is not None
            update_instance(
                rt,
                inst.name,
                status=book.ABANDONED if tried else "failed",
                ended_at=utcnow(),
                cost=None if tried else 0,
            )
            why = f"{book.NO_LAUNCH}: {row.error or 'no answer'}"
            update_job(rt, row.job_id, why, status="ending", outcome="failed", error=why[:2000])
            return
        if inst.launched_at is not None:  # tried, no answer, not listed (yet)
            _lookup(rt, row, inst)
            return
        await _call_launch(rt, row, inst)  # the intent was written, the cloud never called
        return
    now = utcnow()
    if out_of_time(rt, row):
        why = row.error or "no capacity"
        update_job(
            rt,
            row.job_id,
            f"no instance within the paid time: {why}",
            status="ending",
            outcome="failed",
            error=f"{book.NO_LAUNCH}: {why}",
        )
        return
    if row.ended_at is not None and _waits_for_caps(rt, row):
        return
    if _refused_lately(rt, row, now):
        return
    try:
        offers = await rt.cloud.offers(gpu=row.gpu)
    except CloudError as exc:
        update_job(rt, row.job_id, error=f"offers: {exc}"[:2000])
        return
    tried = set(row.tried_regions)
    offer = best_offer(within_sale(offers, row), row.gpu, tried)
    if offer is None:
        # Every region tried (or none has capacity now): try them all again next poll.
        # The last refusal says most; with none, the catalogue had nothing to offer.
        why = row.error if row.tried_regions and row.error else None
        if best_offer(offers, row.gpu, tried) is not None:
            why = f"only {row.gpu} offers dearer than the job was sold for are free now"
        # Every region it could launch in refused: asked again after a while (`_refused_lately`).
        say = (
            f"every region refused a launch; asking them all again in {rt.cfg.launch_retry_s:g} s"
            if row.tried_regions
            else None
        )
        update_job(
            rt,
            row.job_id,
            say,
            tried_regions=[],
            error=why or f"no {row.gpu} capacity on {rt.cfg.provider}",
        )
        return
    name = rt.cfg.instance_name(row.key, row.attempt + 1)
    with rt.store.session() as s:  # the intent, durable before the cloud is called
        job = s.get(GatewayJobRow, row.job_id)
        assert job is not None
        job.attempt += 1
        job.status = "launching"
        job.updated_at = now
        inst = GatewayInstanceRow(
            name=name,
            job_id=row.job_id,
            provider=rt.cfg.provider,
            region=offer.region[:100],  # its column; an offer may name a long location
            offer=dataclasses.asdict(offer),
            price_per_hour=offer.price_per_hour,
            instance_id=None,
            status="launching",
            created_at=now,
        )
        s.add(inst)
    crash_point("intent")
    fresh = job_row(rt, row.job_id)
    assert fresh is not None
    await _call_launch(rt, fresh, inst)


def _refused_lately(rt: Runtime, row: GatewayJobRow, now: datetime) -> bool:
    """Whether the job waits before it asks every region again: a round of them all has just
    ended with a refusal (its last instance refused, nothing made, its regions cleared), less
    than `launch_retry_s` ago. Capacity refused in every region does not come back by the poll,
    and each try is a launch call on the account and an instance row in the book."""
    if row.tried_regions:
        return False
    last = instance_row(rt, row.job_id)
    return (
        last is not None
        and last.status == "failed"
        and last.launched_at is None
        and last.ended_at is not None
        and now < last.ended_at + timedelta(seconds=rt.cfg.launch_retry_s)
    )


WAITING_FOR_CAPS = "waiting for room under the gateway's caps"


def _waits_for_caps(rt: Runtime, row: GatewayJobRow) -> bool:
    """Whether a job revived by a renewal booked after it had ended (`book.revive`) must wait
    before it is launched: its relaunch was never checked against the caps over all buyers, as
    a sale is, and another buyer may have been sold its place meanwhile. The money has moved
    and cannot be refunded, so it waits, within the paid time the renewal bought, for room
    (first in line: it counts against the caps, so no new sale takes the room it waits for);
    its log and error say why, and if none comes the job fails with that reason."""
    cfg = rt.cfg
    with rt.store.session() as s:
        spend, count = book.committed(s, without=row.job_id)
    per_hour = math.ceil(row.amount / row.paid_hours) if row.paid_hours else 0
    cap = usd_to_micros(cfg.max_hourly_usd)
    if count + 1 > cfg.max_total_instances:
        why = f"{count} instances held over all buyers (the cap is {cfg.max_total_instances})"
    elif spend + per_hour > cap:
        why = (
            f"{format_usd(spend)}/h committed of {format_usd(cap)}/h, and this job adds "
            f"{format_usd(per_hour)}/h"
        )
    else:
        return False
    with rt.store.session() as s:
        job = s.get(GatewayJobRow, row.job_id)
        if job is None:
            return True
        job.error = f"{WAITING_FOR_CAPS}: {why}"[:2000]
        if not any(WAITING_FOR_CAPS in line for line in job.logs):  # once, not every poll
            book.note(job, f"[gateway] {WAITING_FOR_CAPS} to relaunch", cfg.log_lines)
        job.updated_at = utcnow()
    return True


def _lookup(rt: Runtime, row: GatewayJobRow, inst: GatewayInstanceRow) -> None:
    """A launch tried before got no answer and its name is not listed: a provider's listing
    may lag its launches, so it is never launched again under that name (a second instance for
    one job, the first never terminated while the job lives: the sweeper spares its name). It
    is looked up for a while; then given up, and the job launched again under its next
    attempt's name: one that lands after all is the sweeper's (terminated, its cost booked)."""
    assert inst.launched_at is not None
    wait_s = min(LAUNCH_LOOKUP_S, rt.cfg.boot_timeout_s)
    if utcnow() <= inst.launched_at + timedelta(seconds=wait_s):
        update_job(rt, row.job_id, error=f"launch {inst.name}: no answer, not listed yet")
        return
    # Not `failed`: it may still land and bill until the sweeper ends it, so it still counts.
    update_instance(rt, inst.name, status=book.ABANDONED, ended_at=utcnow())
    why = f"launch {inst.name} got no answer and never showed by its name; launching another"
    update_job(rt, row.job_id, why, status="paid", error=why[:2000])


def within_sale(offers: list[Offer], row: GatewayJobRow) -> list[Offer]:
    """The offers on which the job's paid hours cost no more than it was sold for: the submit
    checks the quote's price, but a launch after it (a capacity refusal, a lost instance, the
    cheap tier sold out meanwhile) would otherwise take the cheapest offer left, at any price."""
    return [o for o in offers if amount_for(o.price_per_hour, row.paid_hours) <= row.amount]


async def _call_launch(rt: Runtime, row: GatewayJobRow, inst: GatewayInstanceRow) -> None:
    offer = Offer(**inst.offer)
    spec = LaunchSpec(
        name=inst.name,
        offer=offer,
        image=rt.cfg.image,
        env={"GPU_WORKER_TOKEN": rt.cfg.node_token(inst.name)},
        node_port=rt.cfg.node_port,
    )
    # Tried from now on: a launch left without answer is looked up, never made again by name.
    update_instance(rt, inst.name, launched_at=utcnow())
    try:
        launched = await rt.cloud.launch_spec(spec)
    except RateLimited as exc:  # refused before anything was launched: the same name later
        update_instance(rt, inst.name, launched_at=None)
        update_job(rt, row.job_id, error=f"launch {inst.name}: {exc}"[:2000])
        return
    except CloudError as exc:
        if exc.retryable:  # unknown outcome: next poll looks for the name first
            update_job(rt, row.job_id, error=f"launch {inst.name}: {exc}"[:2000])
            return
        # Refused (capacity, quota, the key, a request to fix): nothing launched, so another
        # region next poll (within the paid time).
        update_instance(rt, inst.name, status="failed", ended_at=utcnow(), cost=0, launched_at=None)
        why = f"{type(exc).__name__} in {inst.region}: {exc}"[:2000]
        update_job(
            rt,
            row.job_id,
            f"launch refused: {why}",
            status="paid",
            error=why,
            tried_regions=[*row.tried_regions, inst.region],
        )
        return
    crash_point("fleet_launched")
    _launched(rt, row, inst, launched)


def _launched(rt: Runtime, row: GatewayJobRow, inst: GatewayInstanceRow, got: Instance) -> None:
    """The instance and its job `booting`, in one transaction: written apart, a failure between
    them left the job `launching` beside a booting instance, and another was launched."""
    now = utcnow()
    with rt.store.session() as s:
        instance = s.get(GatewayInstanceRow, inst.name)
        job = s.get(GatewayJobRow, row.job_id)
        if instance is None or job is None:
            return
        instance.instance_id, instance.status = got.id, "booting"
        instance.launched_at = instance.launched_at or now
        job.status, job.updated_at = "booting", now
        job.ended_at = None  # a revived job is launched: it waits for the caps no more
        book.note(job, f"[gateway] instance {got.id} launched in {inst.region}", rt.cfg.log_lines)
