"""One scan of the fleet and the loop around it: take the fleet's lease (refused while another fleet
runs on the store: a store keeps one fleet's state; a live controller takes it from a dry run,
which then stands by; renewed while the scan runs, and a scan whose lease lapsed acts on nothing;
one past FLEET_SCAN_TIMEOUT_S is abandoned and the lease let go), list the instances, finish
interrupted actions, expire and carry out decided ones, read every node (or Prometheus, when
set), renewing each node's dead-man lease (a dry run takes none), keep the samples, analyse,
decide, pass the rails, act; announce the fleet's launches the cloud stopped but keeps (`kept`).
A cloud error is recorded and backed off; nothing in a scan may crash the loop, but another fleet
running on the store ends it (FleetConflict)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from procure.bounds import clip
from procure.clouds.base import LABEL_PREFIX, CloudError, Instance
from procure.fleet import actions, cleanups, costs, kept, monitor, nodes, policy, prometheus, stuck
from procure.fleet import node_leases as dead_man
from procure.fleet import signal as procure_signal
from procure.fleet.context import FleetContext
from procure.models import utcnow
from procure.safetext import redact
from procure.store import fleet_repo
from procure.store.fleet_tables import FleetLeaseRow, FleetSampleRow

log = logging.getLogger(__name__)
NODE_CONCURRENCY = 16


@dataclass
class ScanResult:
    at: datetime
    leased: bool = True
    error: str | None = None
    instances: int = 0
    proposals: list[str] = field(default_factory=list)  # "<action id> <status>"
    carried_out: list[str] = field(default_factory=list)
    views: list[monitor.InstanceView] = field(default_factory=list)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    queue_error: str | None = None  # the procure policy's queue source failed: empty queue


# Instances procure's agent (`procure-job-…`) and gateway (`procure-gw-…`) rent on the same
# account: their owners count, watch and end them; the fleet leaves them alone.
OTHER_PARTS = (f"{LABEL_PREFIX}job-", f"{LABEL_PREFIX}gw-")


def fleets(listing: list[Instance]) -> list[Instance]:
    """The account's instances the fleet watches: all but those of procure's other parts."""
    return [i for i in listing if not (i.name or "").startswith(OTHER_PARTS)]


TYPES_TTL = timedelta(minutes=10)  # how long the types' prices and stock are trusted
MISSING_TTL = timedelta(minutes=2)  # while the type to launch is out of stock


def sync_instances(
    ctx: FleetContext, listing: list[Instance], now: datetime, *, grace: bool = False
) -> None:
    """The instance ledger follows the cloud: new ones start billing, vanished ones stop. An
    instance named after one of our launch actions is ours, whoever recorded it; one that
    procure's agent or gateway rented is theirs (counted once, as their payments or costs).
    `grace` (the controller's scans): a listing can leave out a live instance (a cloud that
    lags, a short page); one missing is ended only once the previous scan missed it too, as of
    that scan, and the caps count it meanwhile. Without it, it is ended at once. Public: the
    fleet benchmark's engine (`sim.fleet_engine`) keeps the ledger the same way."""
    listing = fleets(listing)
    seen = {i.id for i in listing}
    with ctx.store.session() as s:
        for i in listing:
            mine = None
            if i.name:
                action = fleet_repo.get_action(s, i.name)
                mine = i.name if action and action.action_type == policy.PROVISION else None
            fleet_repo.upsert_instance(
                s,
                now,
                instance_id=i.id,
                name=i.name,
                instance_type=i.instance_type,
                region=i.region,
                ip=i.ip,
                status=i.status,
                price_per_hour=_price(ctx, s, i),
                gpus=i.gpus,
                launched_by=mine,
                node_url=dead_man.address(ctx, i),
            )
        gone = [r for r in fleet_repo.live_instances(s) if r.instance_id not in seen]
        if not grace:
            fleet_repo.end_instances(s, [r.instance_id for r in gone], now)
            return
        # The previous scan is kept in the store, not in this process: `fleet run --once` from a
        # scheduler is a new process each scan, and must end what went all the same.
        lease = fleet_repo.lease_row(s, ctx.lease_name)
        before = lease.last_scan_at if lease is not None else None
        if before is None or before >= now:
            return
        missed = [r.instance_id for r in gone if r.last_seen_at < before]
        fleet_repo.end_instances(s, missed, before)


def _price(ctx: FleetContext, s: Session, i: Instance) -> int:
    """What the instance is billed per hour. A listing's price of 0 is not one: RunPod lists an
    EXITED pod at `cost` 0.0, and a price left out reads as 0. Its hours so far were billed at
    the price known (its row's, else its type's in the catalogue): a 0 copied onto its row
    would erase them from the spend and the caps, and count it free while it runs."""
    if i.price_per_hour > 0:
        return i.price_per_hour
    row = fleet_repo.get_instance(s, i.id)
    if row is not None and row.price_per_hour > 0:
        return row.price_per_hour
    known = ctx.types.get(i.instance_type)
    return known.price_per_hour if known is not None else 0


async def _list(ctx: FleetContext) -> list[Instance]:
    listing = await ctx.cloud.instances()
    now = ctx.clock()
    age = None if ctx.types_at is None else now - ctx.types_at
    missing = ctx.cfg.default_instance_type not in ctx.types
    # RunPod's and Vast.ai's prices move and their catalogues list what is in stock now: read
    # again now and then, and more often while the type to launch is missing.
    if age is None or age >= TYPES_TTL or (missing and age >= MISSING_TTL):
        try:
            ctx.types = {t.name: t for t in await ctx.cloud.instance_types()}
            await _type_to_launch(ctx)
        except CloudError as exc:
            if not ctx.types:
                raise  # nothing known to price a launch with: the scan fails, backing off
            # The listing answered: the scan goes on with the types known (no node unread, no
            # idle instance kept for a catalogue's hiccup), and asks again at the next TTL.
            log.warning("reading the instance types failed (%s); keeping the last ones", exc)
        ctx.types_at = now
    return listing


async def _type_to_launch(ctx: FleetContext) -> None:
    """The type the fleet launches, asked of the cloud by name when its catalogue lacks it and
    the cloud can (Vast.ai's catalogue is read from its cheapest asks: a type priced past them
    would have no price, and no launch would ever pass the caps)."""
    name = ctx.cfg.default_instance_type
    one = getattr(ctx.cloud, "instance_type", None)
    if name in ctx.types or one is None:
        return
    found = await one(name)
    if found is not None:
        ctx.types[found.name] = found


async def _read_nodes(
    ctx: FleetContext, listing: list[Instance], now: datetime, account: list[Instance]
) -> list[dict[str, Any]]:
    """Each readable instance's figures; `account`: every instance on the account (procure's
    other parts' and booting ones too), to know which IPs several instances share."""
    limit = asyncio.Semaphore(NODE_CONCURRENCY)
    port, token = dead_man.where(ctx)

    async def renew(i: Instance, sample: dict[str, Any]) -> dict[str, Any]:
        if sample.get("reachable"):
            async with limit:
                await dead_man.renew(ctx, i)
        return sample

    async def one(i: Instance) -> dict[str, Any]:
        async with limit:
            sample = await nodes.read_node(ctx.nodes, i, port, token, now)
        return await renew(i, sample)

    readable = [i for i in listing if i.status in ("active", "unhealthy")]
    if not ctx.cfg.prometheus_url:
        samples = list(await asyncio.gather(*(one(i) for i in readable)))
    else:
        found = await prometheus.read_instances(
            ctx.nodes, ctx.cfg.prometheus_url, readable, now, sharing=account
        )
        # The figures come from Prometheus, but the dead-man lease lives on the node: renew it.
        samples = list(
            await asyncio.gather(*(renew(i, s) for i, s in zip(readable, found, strict=True)))
        )
    ctx.leased = {i.id: i for i, s in zip(readable, samples, strict=True) if s.get("reachable")}
    return samples


def _nodes_answer(ctx: FleetContext, samples: list[dict[str, Any]]) -> bool:
    """Whether some node of this fleet has ever answered: in this scan's readings (its own
    listing's nodes), or (asked once per process) the store's samples of this fleet; once true,
    remembered. Without one, a silent node is no sign of a broken instance but of a fleet run
    without procure's node: ending each instance for it would replace them one boot timeout
    apart. Another fleet's nodes on the same store say nothing of this one's."""
    if not ctx.nodes_answered:
        ctx.nodes_answered = any(sample.get("reachable") for sample in samples)
    if not ctx.nodes_answered and not ctx.samples_read:
        ctx.samples_read = True
        with ctx.store.session() as s:
            found = s.scalar(
                select(FleetSampleRow.instance_id)
                .where(
                    FleetSampleRow.fleet == ctx.cfg.fleet_name,
                    FleetSampleRow.reachable.is_(True),
                )
                .limit(1)
            )
        ctx.nodes_answered = found is not None
    return ctx.nodes_answered


def _last_answered(ctx: FleetContext, ids: list[str]) -> dict[str, datetime]:
    """When each instance this process has not judged yet last answered, from the store's
    samples: what a new process knows of how long one has not worked."""
    fresh = [i for i in ids if i not in ctx.status_since]
    if not fresh:
        return {}
    last = func.max(FleetSampleRow.taken_at, type_=FleetSampleRow.taken_at.type)
    with ctx.store.session() as s:
        rows = s.execute(
            select(FleetSampleRow.instance_id, last)
            .where(FleetSampleRow.instance_id.in_(fresh), FleetSampleRow.reachable.is_(True))
            .group_by(FleetSampleRow.instance_id)
        )
        return {instance_id: at for instance_id, at in rows if at is not None}


def _note(ctx: FleetContext, now: datetime, error: str | None) -> None:
    # The wall clock at the scan's start, as `now` is on the controller's: a slow scan must
    # not pass for a clock behind (approvals would be judged that much late).
    wall = utcnow() - (ctx.clock() - now)
    with ctx.store.session() as s:
        fleet_repo.note_scan(s, ctx.lease_name, ctx.owner, now, error, ctx.backoff_until, wall=wall)


class FleetConflict(Exception):
    """Another fleet (another LAMBDA_LABS_FLEET_NAME) runs on this store: this one refuses to
    run beside it. The store keeps one fleet's state: one instance ledger, one action history,
    one set of cooldowns and caps; two fleets on it would count, end and be held by each
    other's instances (a fleet never launched its minimum, counting the other's as its own)."""


class NodeLeaseTooShort(FleetConflict):
    """The nodes' dead-man lease lapses between two scans (LAMBDA_LABS_NODE_LEASE_S not above the
    interval): every node would stop its instance under a running controller. Refused at start
    as a FleetConflict is (said whole, /healthz `refused`)."""


def _node_lease_checked(ctx: FleetContext, interval: float, health: dict[str, str] | None) -> None:
    """Refuse a node lease that lapses between scans; warn of one a late scan lapses."""
    short = ctx.cfg.node_lease_short(interval)
    if short is not None and ctx.cfg.node_lease_s > interval:
        log.warning("%s", short)
    elif short is not None:
        refused = NodeLeaseTooShort(f"fleet {ctx.cfg.fleet_name!r} refused: {short}")
        log.error("%s", refused)
        if health is not None:
            health["fleet-controller"] = f"refused: {clip(str(refused), 200)}"
        raise refused


def _refusal(ctx: FleetContext, others: list[FleetLeaseRow]) -> FleetConflict:
    names = ", ".join(repr(r.name.removeprefix("fleet:")) for r in others)
    until = max(r.expires_at for r in others if r.expires_at is not None)
    return FleetConflict(
        f"fleet {ctx.cfg.fleet_name!r} refused: fleet {names} runs on this store (its "
        f"controller holds the store's fleet lease until {until:%Y-%m-%d %H:%M:%S} UTC). One "
        "store keeps one fleet's instances, actions, cooldowns and caps: two fleets on it would "
        "count and end each other's instances. Give each fleet a separate store (its own "
        "PROCURE_DATABASE_URL; the global caps PROCURE_MAX_SPEND_PER_* then count each "
        "store's spend alone: split them between the stores), or stop the other fleet first "
        "(a controller killed without stopping holds its lease until it expires)"
    )


def _take_alone(ctx: FleetContext) -> bool:
    """Take or renew this fleet's lease, refusing (FleetConflict) while another fleet's is held
    on the store. Asked again once this one's lease is committed: of two fleets starting at
    once, each sees the other then, or the later sees the earlier; never do both go on."""
    with ctx.store.session() as s:
        others = fleet_repo.other_leases_held(s, ctx.lease_name, utcnow())
        if others:
            raise _refusal(ctx, others)
        held = fleet_repo.take_lease(
            s, ctx.lease_name, ctx.owner, ctx.cfg.lease_s, utcnow(), dry_run=ctx.dry_run
        )
    if not held:
        return False
    with ctx.store.session() as s:
        others = fleet_repo.other_leases_held(s, ctx.lease_name, utcnow())
        if others:
            fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)
    if others:
        raise _refusal(ctx, others)
    return True


def _still_held(ctx: FleetContext) -> bool:
    """Renew the fleet's lease while this controller holds it (during a scan, and before it
    acts). False once it has lapsed: another controller (of this fleet, or another fleet's beside
    it) may have had the store meanwhile, even if none holds it now (a `--once` scan took it,
    acted and let it go), and what this scan read and decided is stale. The next scan takes the
    lease and starts over."""
    with ctx.store.session() as s:
        held = fleet_repo.keep_lease(s, ctx.lease_name, ctx.owner, ctx.cfg.lease_s, utcnow())
    if not held:
        log.warning(
            "the fleet lease (%gs) lapsed under this scan: it acts on nothing more", ctx.cfg.lease_s
        )
    return held


async def _renew(ctx: FleetContext) -> None:
    """Renew the fleet's lease every third of it while a scan runs: one waiting on a slow cloud
    (or on many nodes) keeps the fleet, and a controller beside it stands by. Ends once the lease
    is no longer held (the process stalled past it: its event loop blocked, or paused)."""
    while True:
        await asyncio.sleep(ctx.cfg.lease_s / 3)
        try:
            if not _still_held(ctx):
                return
        except Exception as exc:  # the store's trouble: tried again, and the scan meets it too
            log.warning("renewing the fleet lease failed: %s", redact(clip(str(exc), 300)))


async def scan_once(ctx: FleetContext) -> ScanResult:
    now = ctx.clock()
    held = _take_alone(ctx)  # FleetConflict: another fleet runs on this store
    if not held:  # another controller runs this fleet: it acts, we do not
        return ScanResult(at=now, leased=False)
    renewing = asyncio.ensure_future(_renew(ctx))
    limit = ctx.cfg.scan_limit_s
    try:
        async with asyncio.timeout(limit) as deadline:
            return await _scan(ctx, now)
    except TimeoutError:
        if not deadline.expired():
            raise  # not ours: some call's own timeout, left to the scan's callers as before
        return _abandoned(ctx, now, limit)
    finally:
        renewing.cancel()


def _abandoned(ctx: FleetContext, now: datetime, limit: float) -> ScanResult:
    """A scan past its limit (a cloud or node call that hangs, a store that does not answer):
    cancelled where it waited, so it acts on nothing more. An action it had begun stays
    `executing` in the store and is finished by a later scan (found by name, as after a crash).
    The lease is let go, so a controller standing by may take the fleet, and the next scan
    starts afresh; the scan's error says why (`fleet status`, /healthz, the log)."""
    error = (
        f"scan abandoned after {limit:g}s (FLEET_SCAN_TIMEOUT_S): a call to the cloud, a node "
        "or the store did not answer; the next scan starts afresh"
    )
    log.warning("fleet scan: %s", error)
    try:
        _note(ctx, now, error)  # while the lease is still this controller's
        with ctx.store.session() as s:
            fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)
    except Exception as exc:  # the store's own trouble: the lease lapses by itself
        log.warning("after an abandoned scan: %s", redact(clip(str(exc), 300)))
    return ScanResult(at=now, error=error)


async def _scan(ctx: FleetContext, now: datetime) -> ScanResult:
    result = ScanResult(at=now)
    if ctx.backoff_until is not None and now < ctx.backoff_until:
        result.error = f"backing off after cloud errors until {ctx.backoff_until.isoformat()}"
        await dead_man.keep_up(ctx)  # the controller runs: its nodes must not stop
        return result
    try:
        account = await _list(ctx)  # every instance: some share an IP with the fleet's
        listing = fleets(account)
    except CloudError as exc:
        ctx.cloud_failures += 1
        wait = min(3600.0, ctx.cfg.scan_interval_s * 2 ** min(ctx.cloud_failures - 1, 6))
        ctx.backoff_until = now + timedelta(seconds=wait)
        ctx.types = {}
        result.error = clip(f"{type(exc).__name__}: {exc}", 500)
        log.warning("listing the fleet failed (%s); backing off %.0fs", result.error, wait)
        await dead_man.keep_up(ctx)
        _note(ctx, now, result.error)
        return result
    ctx.cloud_failures, ctx.backoff_until = 0, None
    if not _still_held(ctx):  # the cloud answered after the lease lapsed: a stale listing
        result.leased = False
        return result
    result.instances = len(listing)
    sync_instances(ctx, listing, now, grace=True)
    try:
        duplicates = await cleanups.terminate_duplicates(ctx, listing)
    except CloudError as exc:
        duplicates, result.error = [], clip(f"{type(exc).__name__}: {exc}", 500)
    result.carried_out += [f"{i} terminated (a duplicate launch)" for i in duplicates]
    try:
        lost = await cleanups.terminate_lost(ctx, listing, now)
    except CloudError as exc:
        lost, result.error = [], clip(f"{type(exc).__name__}: {exc}", 500)
    result.carried_out += [f"{i} terminated (lost by the cloud)" for i in lost]
    # Stopped but kept (resumable: never destroyed with its disk): said once, as it bills.
    kept.announce_kept(ctx, listing, now)

    # Decided and interrupted actions first: they were promised before this scan's ideas.
    actions.expire(ctx)
    with ctx.store.session() as s:
        todo = [r.action_id for r in fleet_repo.list_actions(s, status=("approved", "executing"))]
    for action_id in reversed(todo):  # oldest first
        status = await actions.carry_out(ctx, action_id, listing, held=True)
        result.carried_out.append(f"{action_id} {status}")
    if todo:  # what they launched or terminated is in the next listing; keep this one
        try:
            account = await ctx.cloud.instances()
            listing = fleets(account)
            sync_instances(ctx, listing, now, grace=True)
        except CloudError as exc:
            result.error = clip(f"{type(exc).__name__}: {exc}", 500)

    # Each sample names its fleet: what this fleet's nodes said is asked of its own samples.
    samples = [
        x | {"fleet": ctx.cfg.fleet_name} for x in await _read_nodes(ctx, listing, now, account)
    ]
    with ctx.store.session() as s:
        fleet_repo.add_samples(s, samples)
        fleet_repo.prune_samples(s, now - timedelta(hours=ctx.cfg.sample_retention_h))
        live = fleet_repo.live_instances(s)
        recent = fleet_repo.samples_since(
            s, [r.instance_id for r in live], now - monitor.lookback(ctx.cfg)
        )
        result.views = monitor.views(live, recent, ctx.cfg, now)
    result.recommendations = costs.recommendations(result.views, ctx.cfg)

    default = ctx.types.get(ctx.cfg.default_instance_type)
    price = default.price_per_hour if default else None
    if ctx.cfg.policy == "procure":
        proposed, result.queue_error = await procure_signal.decide(ctx, result.views, now, price)
    else:
        proposed = policy.decide(result.views, ctx.cfg, price)
    ending = {p.target for p in proposed if p.action_type == policy.TERMINATE}
    proposed += [
        p
        for p in stuck.proposals(
            result.views,
            ctx.cfg,
            now,
            ctx.status_since,
            # No series in Prometheus says nothing of the node (a scrape set up wrong would end
            # the whole fleet); a node read directly that does not answer is silent, once some
            # node has ever answered (else the operator runs none: its own image).
            judge_silence=not ctx.cfg.prometheus_url and _nodes_answer(ctx, samples),
            answered=_last_answered(ctx, [v.id for v in result.views]),
        )
        if p.target not in ending
    ]
    if not _still_held(ctx):
        result.leased = False
        return result
    dedupe = timedelta(minutes=max(ctx.cfg.action_cooldown_mins, ctx.cfg.confirmation_timeout_mins))
    for p in proposed:
        with ctx.store.session() as s:
            last = fleet_repo.recent_same(s, p.action_type, p.target, now - dedupe)
        rehearsed = last is not None and last.block_reason == "dry_run" and not ctx.dry_run
        if last is not None and last.status not in ("executed", "rolled_back") and not rehearsed:
            continue  # decided already (blocked, waiting, refused or failed): not again so soon
        action_id, status = actions.record(ctx, p)
        result.proposals.append(f"{action_id} {status}")
        if status == "approved":
            status = await actions.carry_out(ctx, action_id, None, held=True)
            result.carried_out.append(f"{action_id} {status}")
    _note(ctx, now, result.error or result.queue_error)
    return result


async def run_controller(
    ctx: FleetContext,
    *,
    interval_s: float | None = None,
    stop: asyncio.Event | None = None,
    once: bool = False,
    sleep: Any = asyncio.sleep,
    health: dict[str, str] | None = None,
) -> str | None:
    """Scan every `interval_s` (the settings' by default) until `stop` is set. `sleep` lets
    the demo run time faster. Returns the last scan's error (None when it went well), and keeps
    `health["fleet-controller"]` up to date for /healthz."""
    stop = stop or asyncio.Event()
    interval = interval_s if interval_s is not None else ctx.cfg.scan_interval_s
    if not once:  # a lone scan (`--once`) knows not when the next one comes
        _node_lease_checked(ctx, interval, health)
    error: str | None = None
    try:
        while not stop.is_set():
            try:
                result = await scan_once(ctx)
                error = result.error
                if result.error:
                    log.warning("fleet scan: %s", result.error)
            except FleetConflict as exc:  # not a scan's trouble: this fleet must not run here
                log.error("%s", exc)
                if health is not None:
                    health["fleet-controller"] = f"refused: {clip(str(exc), 200)}"
                raise
            except Exception as exc:  # a bug in one scan must not end the controller
                error = clip(f"{type(exc).__name__}: {exc}", 500)
                log.exception("fleet scan failed")
            if health is not None:
                # /healthz answers anyone: the error without URLs' secrets, and short
                health["fleet-controller"] = (
                    f"scan failed: {redact(clip(error, 200))}" if error else "running"
                )
            if once:
                break
            waiter = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait(
                    [waiter, asyncio.ensure_future(sleep(interval))],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waiter.cancel()
    finally:
        with ctx.store.session() as s:
            fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)
    return error
