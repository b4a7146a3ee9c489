"""The gateway's instances: one loop launches an instance for each paid job (named after the
job's key and attempt; the intent is in the book before the cloud is called, and the name is
looked for before any launch), runs the job on the node's job runner, relays its progress, logs
and checkpoints into the book, and terminates the instance when the job ends, is cancelled or its
paid time runs out. `loop.py` calls `advance` for every paid job, every poll."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from procure.clouds.base import (
    CloudError,
    Instance,
    LaunchSpec,
    Offer,
    RateLimited,
    RentalCloud,
)
from procure.crashpoints import crash_point
from procure.gateway import book
from procure.gateway.pricing import amount_for, best_offer, instance_cost
from procure.gateway.settings import GatewayConfig
from procure.gpu.jobclient import NodeJobClient, NodeJobError
from procure.models import utcnow
from procure.payments.settlements import FacilitatorLedger
from procure.store import Store
from procure.store.gateway_tables import GatewayInstanceRow, GatewayJobRow

log = logging.getLogger(__name__)
GONE = ("terminated", "preempted", "exited")
KEPT = "kept while a renewal's payment is being settled"
LAUNCH_LOOKUP_S = 120.0
"""How long a launch left without an answer is looked up by name before it is given up: a
provider's listing may show a launch a little after it was made."""


NodeFactory = Callable[[str, str, str], NodeJobClient]


def http_node(url: str, token: str, host: str) -> NodeJobClient:
    return NodeJobClient(url, token, expected_host=host, deadline_s=10.0)


@dataclass
class Runtime:
    cfg: GatewayConfig
    store: Store
    cloud: RentalCloud
    ledger: FacilitatorLedger | None = None  # reconciles payments a crash left pending
    node: NodeFactory = http_node
    wake: asyncio.Event = field(default_factory=asyncio.Event)


# --- the book, one short transaction at a time ------------------------------------------------


def _job(rt: Runtime, job_id: str) -> GatewayJobRow | None:
    with rt.store.session() as s:
        return book.job(s, job_id)


def _instance(rt: Runtime, job_id: str) -> GatewayInstanceRow | None:
    with rt.store.session() as s:
        rows = book.instances_of(s, job_id)
    return rows[-1] if rows else None


def _update(rt: Runtime, job_id: str, say: str | None = None, **fields: Any) -> None:
    with rt.store.session() as s:
        row = s.get(GatewayJobRow, job_id)
        if row is None:
            return
        for name, value in fields.items():
            setattr(row, name, value)
        if say:
            book.note(row, f"[gateway] {say}", rt.cfg.log_lines)
        row.updated_at = utcnow()


def _update_instance(rt: Runtime, name: str, **fields: Any) -> None:
    with rt.store.session() as s:
        row = s.get(GatewayInstanceRow, name)
        if row is not None:
            for key, value in fields.items():
                setattr(row, key, value)


def _running(rt: Runtime, job_id: str, say: str, now: datetime) -> None:
    """The job runs: its paid time, if it had not started yet, counts from `now`, from the
    row as it is now (locked: a renewal booked while the node was being asked is kept)."""
    with rt.store.session() as s:
        row = s.get(GatewayJobRow, job_id, with_for_update=True)
        if row is None:
            return
        if row.paid_until is None:
            row.paid_until = now + timedelta(seconds=row.paid_hours * rt.cfg.hour_s)
        row.status, row.log_cursor = "running", 0
        book.note(row, f"[gateway] {say}", rt.cfg.log_lines)
        row.updated_at = utcnow()


def paid_end(rt: Runtime, row: GatewayJobRow) -> datetime:
    """When the paid time ends: set once the job first runs; before that, the paid hours from
    payment bound the attempts to launch."""
    if row.paid_until is not None:
        return row.paid_until
    return row.created_at + timedelta(seconds=row.paid_hours * rt.cfg.hour_s)


def _kept(rt: Runtime, row: GatewayJobRow) -> GatewayJobRow | None:
    """The job past its paid time, kept (fresh from the book, its log saying so) while a
    renewal of it is still being settled (a lost settle answer): the buyer may have paid for
    more, so it is not ended until that payment is booked (the time is added) or dropped. At
    most the payment's window and two sweeps (the loop books or drops it by then); None: it
    ends as before."""
    from procure.gateway import loop  # loop.py imports this module

    # The loop books or drops a pending payment once the ledger says (at the latest its first
    # sweep past the window); the hold lasts that long, and no longer if the ledger is down.
    since = utcnow() - timedelta(seconds=loop.AUTH_WINDOW_S + 2 * rt.cfg.sweep_every_s)
    with rt.store.session() as s:
        job = s.get(GatewayJobRow, row.job_id)
        if job is not None and utcnow() <= paid_end(rt, job):
            return job  # a renewal was booked since `row` was read: its time is added
        if job is None:
            return None
        # Only a renewal made while the job was paid for holds it (one made during the hold
        # would let a buyer whose payments never settle chain holds for ever).
        doubt = book.renewal_in_doubt(s, row.job_id, since, paid_end(rt, job))
        if doubt is None:
            return None
        line = (
            f"[gateway] paid time ran out; {KEPT} (payment {doubt.nonce[:10]}: until it is "
            "booked or dropped)"
        )
        if line not in job.logs:  # once per payment, not every poll
            book.note(job, line, rt.cfg.log_lines)
            job.updated_at = utcnow()
        return job


def _out_of_time(rt: Runtime, row: GatewayJobRow) -> bool:
    """The paid time ran out and no renewal of it may still be paid: the job ends."""
    return utcnow() > paid_end(rt, row) and _kept(rt, row) is None


async def advance(rt: Runtime, job_id: str) -> None:
    """One step of a paid job: launch, boot, poll or end."""
    row = _job(rt, job_id)
    if row is None or row.status not in book.STARTED:
        return
    if row.cancel_requested and row.status != "ending":
        _update(rt, job_id, "cancelled by the buyer", status="ending", outcome="cancelled")
        row = _job(rt, job_id)
        assert row is not None
    if row.status in ("paid", "launching"):
        await _launch(rt, row)
    elif row.status == "booting":
        await _boot(rt, row)
    elif row.status == "running":
        await _poll(rt, row)
    if (row := _job(rt, job_id)) is not None and row.status == "ending":
        await _end(rt, row)


# --- launch -----------------------------------------------------------------------------------


async def _launch(rt: Runtime, row: GatewayJobRow) -> None:
    inst = _instance(rt, row.job_id)
    if row.status == "launching" and inst is not None and inst.status == "booting":
        # Its instance was recorded but not the job (an older gateway wrote them apart): on.
        _update(rt, row.job_id, status="booting")
        return
    if row.status == "launching" and inst is not None and inst.status == "launching":
        try:
            found = await rt.cloud.find(inst.name)
        except CloudError as exc:
            _update(rt, row.job_id, error=f"find {inst.name}: {exc}"[:2000])
            return
        if found:  # launched before a crash or a lost answer: adopt it, never launch again
            for extra in found[1:]:
                await rt.cloud.terminate([extra.id])
            _launched(rt, row, inst, found[0])
            return
        if _out_of_time(rt, row):
            # A launch tried without answer may land later: its cost is the sweeper's to book.
            tried = inst.launched_at is not None
            _update_instance(
                rt, inst.name, status="failed", ended_at=utcnow(), cost=None if tried else 0
            )
            why = f"no instance could be launched within the paid time: {row.error or 'no answer'}"
            _update(rt, row.job_id, why, status="ending", outcome="failed", error=why[:2000])
            return
        if inst.launched_at is not None:  # tried, no answer, not listed (yet)
            _lookup(rt, row, inst)
            return
        await _call_launch(rt, row, inst)  # the intent was written, the cloud never called
        return
    now = utcnow()
    if _out_of_time(rt, row):
        why = row.error or "no capacity"
        _update(
            rt,
            row.job_id,
            f"no instance within the paid time: {why}",
            status="ending",
            outcome="failed",
            error=f"no instance could be launched within the paid time: {why}",
        )
        return
    try:
        offers = await rt.cloud.offers(gpu=row.gpu)
    except CloudError as exc:
        _update(rt, row.job_id, error=f"offers: {exc}"[:2000])
        return
    tried = set(row.tried_regions)
    offer = best_offer(within_sale(offers, row), row.gpu, tried)
    if offer is None:
        # Every region tried (or none has capacity now): try them all again next poll.
        # The last refusal says most; with none, the catalogue had nothing to offer.
        why = row.error if row.tried_regions and row.error else None
        if best_offer(offers, row.gpu, tried) is not None:
            why = f"only {row.gpu} offers dearer than the job was sold for are free now"
        _update(
            rt,
            row.job_id,
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
    fresh = _job(rt, row.job_id)
    assert fresh is not None
    await _call_launch(rt, fresh, inst)


def _lookup(rt: Runtime, row: GatewayJobRow, inst: GatewayInstanceRow) -> None:
    """A launch tried before got no answer and its name is not listed: a provider's listing
    may lag its launches, so it is never launched again under that name (a second instance for
    one job, the first never terminated while the job lives: the sweeper spares its name). It
    is looked up for a while; then given up, and the job launched again under its next
    attempt's name: one that lands after all is the sweeper's (terminated, its cost booked)."""
    assert inst.launched_at is not None
    wait_s = min(LAUNCH_LOOKUP_S, rt.cfg.boot_timeout_s)
    if utcnow() <= inst.launched_at + timedelta(seconds=wait_s):
        _update(rt, row.job_id, error=f"launch {inst.name}: no answer, not listed yet")
        return
    _update_instance(rt, inst.name, status="failed", ended_at=utcnow())
    why = f"launch {inst.name} got no answer and never showed by its name; launching another"
    _update(rt, row.job_id, why, status="paid", error=why[:2000])


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
    _update_instance(rt, inst.name, launched_at=utcnow())
    try:
        launched = await rt.cloud.launch_spec(spec)
    except RateLimited as exc:  # refused before anything was launched: the same name later
        _update_instance(rt, inst.name, launched_at=None)
        _update(rt, row.job_id, error=f"launch {inst.name}: {exc}"[:2000])
        return
    except CloudError as exc:
        if exc.retryable:  # unknown outcome: next poll looks for the name first
            _update(rt, row.job_id, error=f"launch {inst.name}: {exc}"[:2000])
            return
        # Refused (capacity, quota, the key, a request to fix): nothing launched, so another
        # region next poll (within the paid time).
        _update_instance(
            rt, inst.name, status="failed", ended_at=utcnow(), cost=0, launched_at=None
        )
        why = f"{type(exc).__name__} in {inst.region}: {exc}"[:2000]
        _update(
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
        book.note(job, f"[gateway] instance {got.id} launched in {inst.region}", rt.cfg.log_lines)


# --- boot and run -----------------------------------------------------------------------------


async def _boot(rt: Runtime, row: GatewayJobRow) -> None:
    inst = _instance(rt, row.job_id)
    if inst is None or inst.instance_id is None:
        _update(rt, row.job_id, status="paid")
        return
    try:
        got = await rt.cloud.get(inst.instance_id)
    except CloudError as exc:
        _update(rt, row.job_id, error=f"get {inst.instance_id}: {exc}"[:2000])
        return
    now = utcnow()
    booted_for = (now - (inst.launched_at or now)).total_seconds()
    if _out_of_time(rt, row):  # never hold an instance past the paid time (or its doubt)
        why = "the paid time ran out before an instance was ready"
        _update(rt, row.job_id, why, status="ending", outcome="failed", error=why)
        return
    if got is None or got.status in GONE:
        await _lost(rt, row, inst, f"instance {inst.instance_id} was lost while booting")
        return
    if got.status == "active" and got.node_url and got.ip:
        resume = row.checkpoint_url or row.resume_from
        try:
            async with rt.node(got.node_url, rt.cfg.node_token(inst.name), got.ip) as node:
                submitted = await node.submit(
                    command=list(rt.cfg.command),
                    image=None,
                    env={"PROCURE_JOB_SPEC": json.dumps(row.params, sort_keys=True)[:8000]},
                    resume_from=resume,
                    checkpoint_dir=f"{rt.cfg.checkpoint_dir.rstrip('/')}/{row.job_id}",
                    idempotency_key=f"{row.job_id}-{row.attempt}",
                )
        except (NodeJobError, ValueError) as exc:
            if booted_for > rt.cfg.boot_timeout_s:
                await _lost(rt, row, inst, f"the node never took the job: {exc}")
            return
        _update_instance(
            rt, inst.name, status="running", node_url=got.node_url, node_job_id=submitted["id"]
        )
        said = f"job started on {inst.instance_id}" + (
            f", resuming from {resume}" if resume else ""
        )
        _running(rt, row.job_id, said, now)
        return
    if booted_for > rt.cfg.boot_timeout_s:
        await _lost(rt, row, inst, f"instance {inst.instance_id} did not boot in time")


async def _lost(rt: Runtime, row: GatewayJobRow, inst: GatewayInstanceRow, why: str) -> None:
    """The instance cannot serve the job: terminate it and launch another, from the last
    checkpoint, elsewhere (the next poll), within the paid time."""
    if not await _terminate(rt, inst):
        return
    _update(
        rt,
        row.job_id,
        why,
        status="paid",
        error=why[:2000],
        tried_regions=[*row.tried_regions, inst.region],
    )


async def _poll(rt: Runtime, row: GatewayJobRow) -> None:
    inst = _instance(rt, row.job_id)
    if inst is None or inst.node_url is None or inst.node_job_id is None:
        _update(rt, row.job_id, status="booting")
        return
    if utcnow() > paid_end(rt, row):
        kept = _kept(rt, row)
        if kept is None:
            _update(
                rt,
                row.job_id,
                f"paid time ran out at {row.progress:.0%}; job stopped",
                status="ending",
                outcome="expired",
            )
            return
        row = kept  # relayed on from the book as it is now, the note kept
    host = inst.node_url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        async with rt.node(inst.node_url, rt.cfg.node_token(inst.name), host) as node:
            status = await node.status(inst.node_job_id)
            page = await node.logs(inst.node_job_id, after=row.log_cursor, limit=200)
    except (NodeJobError, ValueError) as exc:
        try:
            got = await rt.cloud.get(inst.instance_id or "")
        except CloudError:
            return
        if got is None or got.status in GONE or getattr(exc, "status", None) == 404:
            await _lost(rt, row, inst, f"instance {inst.instance_id} lost: {exc}")
        return
    _relay(rt, row, status, page)


def _relay(rt: Runtime, row: GatewayJobRow, status: dict[str, Any], page: dict[str, Any]) -> None:
    """Progress, checkpoints and log lines from the node into the book (what buyers read)."""
    fields: dict[str, Any] = {"log_cursor": page["next"]}
    last = row.last_progress
    url, at = row.checkpoint_url, row.checkpoint_progress
    lines = list(row.logs)
    before = len(lines)
    for line in page["lines"]:
        word, _, rest = line["text"].strip().partition(" ")
        if word == "PROCURE_PROGRESS":
            try:
                said = float(rest)
            except ValueError:
                continue
            if not math.isfinite(said):  # inf (or 1e999) would read as done
                continue
            last = min(1.0, max(0.0, said))
        elif word == "PROCURE_CHECKPOINT" and rest.strip():
            url, at = rest.strip()[:500], last if last is not None else row.progress
        else:
            lines.append(line["text"][:2_000])
    if (
        status.get("checkpoint")
        and status["checkpoint"] != url
        and len(status["checkpoint"]) <= 500
    ):
        url, at = status["checkpoint"], min(status["progress"], last or status["progress"])
    fields.update(
        last_progress=last,
        checkpoint_url=url,
        checkpoint_progress=at,
        progress=max(row.progress, status["progress"]),
        logs=lines[-rt.cfg.log_lines :],
        logs_total=(row.logs_total or 0) + len(lines) - before,
    )
    node_status = status["status"]
    if node_status in ("completed", "failed", "cancelled"):
        ok = node_status == "completed" and status.get("exitCode") in (0, None)
        fields["outcome"] = "completed" if ok else "failed"
        fields["status"] = "ending"
        if ok:
            fields["progress"] = 1.0
        else:
            code = status.get("exitCode")
            fields["error"] = (status.get("error") or f"the job {node_status} (exit code {code})")[
                :2000
            ]
    _update(rt, row.job_id, **fields)


# --- end --------------------------------------------------------------------------------------


async def _terminate(rt: Runtime, inst: GatewayInstanceRow) -> bool:
    """Terminate the instance (found by name when its id was never recorded); book its cost.
    False when the cloud could not be reached: try again next poll."""
    try:
        ids = (
            [inst.instance_id]
            if inst.instance_id
            else [i.id for i in await rt.cloud.find(inst.name)]
        )
        if ids:
            await rt.cloud.terminate(ids)
    except CloudError as exc:
        log.warning("terminate %s: %s", inst.name, exc)
        return False
    now = utcnow()
    cost: int | None = None
    if inst.instance_id:
        try:
            cost = await rt.cloud.billed(inst.instance_id)
        except CloudError:
            cost = None
    if cost is None:
        cost = instance_cost(
            inst.price_per_hour, rt.cloud.billing_increment_s, inst.launched_at, now
        )
    _update_instance(
        rt,
        inst.name,
        status="terminated",
        ended_at=now,
        cost=cost,
        instance_id=inst.instance_id or (ids[0] if ids else None),
    )
    return True


async def _end(rt: Runtime, row: GatewayJobRow) -> None:
    with rt.store.session() as s:
        rows = book.instances_of(s, row.job_id)
    for older in rows[:-1]:  # a replaced instance still held goes too: the job owns them all
        if older.status in book.HOLDING and not await _terminate(rt, older):
            return
    inst = rows[-1] if rows else None
    if inst is not None and inst.status in book.HOLDING:
        if inst.node_job_id and inst.node_url and row.outcome in ("cancelled", "expired"):
            host = inst.node_url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            try:  # the job checkpoints on SIGTERM; the instance goes regardless
                async with rt.node(inst.node_url, rt.cfg.node_token(inst.name), host) as node:
                    await node.cancel(inst.node_job_id)
            except (NodeJobError, ValueError):
                pass
        if not await _terminate(rt, inst):
            return
    outcome = row.outcome or "failed"
    _update(
        rt, row.job_id, f"job {outcome}; instance terminated", status=outcome, ended_at=utcnow()
    )
