"""The gateway's instances: one loop launches an instance for each paid job (named after the
job's key and attempt; the intent is in the book before the cloud is called, and the name is
looked for before any launch), runs the job on the node's job runner, relays its progress, logs
and checkpoints into the book, and terminates the instance when the job ends, is cancelled or its
paid time runs out. `loop.py` calls `advance` for every paid job, every poll."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
from typing import Any

from fsspec.core import split_protocol
from fsspec.registry import known_implementations

from procure.clouds.base import CloudError
from procure.gateway import book
from procure.gateway.launches import launch
from procure.gateway.pricing import instance_cost
from procure.gateway.runtime import (
    Runtime,
    instance_row,
    job_row,
    kept_for_renewal,
    mark_running,
    paid_end,
    update_instance,
    update_job,
)
from procure.gpu.jobclient import NodeJobError
from procure.models import utcnow
from procure.safetext import scrub
from procure.store.gateway_tables import GatewayInstanceRow, GatewayJobRow

log = logging.getLogger(__name__)
GONE = ("terminated", "preempted", "exited")
NODE_ENDED = ("completed", "failed", "cancelled")  # a node's job that runs no more


async def advance(rt: Runtime, job_id: str) -> None:
    """One step of a paid job: launch, boot, poll or end."""
    row = job_row(rt, job_id)
    if row is None or row.status not in book.STARTED:
        return
    if row.cancel_requested and row.status != "ending":
        update_job(rt, job_id, "cancelled by the buyer", status="ending", outcome="cancelled")
        row = job_row(rt, job_id)
        assert row is not None
    if row.status in ("paid", "launching"):
        await launch(rt, row)
    elif row.status == "booting":
        await _boot(rt, row)
    elif row.status == "running":
        await _poll(rt, row)
    if (row := job_row(rt, job_id)) is not None and row.status == "ending":
        await _end(rt, row)


# --- boot and run -----------------------------------------------------------------------------


async def _boot(rt: Runtime, row: GatewayJobRow) -> None:
    inst = instance_row(rt, row.job_id)
    if inst is None or inst.instance_id is None:
        update_job(rt, row.job_id, status="paid")
        return
    try:
        got = await rt.cloud.get(inst.instance_id)
    except CloudError as exc:
        update_job(rt, row.job_id, error=f"get {inst.instance_id}: {exc}"[:2000])
        return
    now = utcnow()
    booted_for = (now - (inst.launched_at or now)).total_seconds()
    # No paid time is checked here: a boot is the gateway's, bounded by the boot timeout below
    # (the paid time starts, or goes on, once the node runs the job: `mark_running`). Counted
    # from the sale, a boot longer than the time sold failed a job its buyer had paid for in
    # full; counted on, a replacement's boot took the lost instance's time from the buyer.
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
        said = f"job started on {inst.instance_id}" + (
            f", resuming from {resume}" if resume else ""
        )
        mark_running(rt, row.job_id, said, now, inst.name, got.node_url, submitted["id"])
        return
    if booted_for > rt.cfg.boot_timeout_s:
        await _lost(rt, row, inst, f"instance {inst.instance_id} did not boot in time")


async def _lost(rt: Runtime, row: GatewayJobRow, inst: GatewayInstanceRow, why: str) -> None:
    """The instance cannot serve the job: terminate it and launch another, from the last
    checkpoint, elsewhere (the next poll), within the paid time."""
    if not await _terminate(rt, inst):
        return
    update_job(
        rt,
        row.job_id,
        why,
        status="paid",
        error=why[:2000],
        tried_regions=[*row.tried_regions, inst.region],
    )


async def _poll(rt: Runtime, row: GatewayJobRow) -> None:
    inst = instance_row(rt, row.job_id)
    if inst is None or inst.node_url is None or inst.node_job_id is None:
        update_job(rt, row.job_id, status="booting")
        return
    over = utcnow() > paid_end(rt, row)
    if over and (kept := kept_for_renewal(rt, row)) is not None:
        row, over = kept, False  # relayed on from the book as it is now, the note kept
    host = inst.node_url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        async with rt.node(inst.node_url, rt.cfg.node_token(inst.name), host) as node:
            status = await node.status(inst.node_job_id)
            page = await node.logs(inst.node_job_id, after=row.log_cursor, limit=200)
    except (NodeJobError, ValueError) as exc:
        if over:
            _expire(rt, row)
            return
        try:
            got = await rt.cloud.get(inst.instance_id or "")
        except CloudError:
            return
        if got is None or got.status in GONE or getattr(exc, "status", None) == 404:
            await _lost(rt, row, inst, f"instance {inst.instance_id} lost: {exc}")
        return
    # Its node asked first: a job that finished in its paid time, heard of only once that time
    # was over (the loop reaches each job in turn), was ended `expired`, its work unshown.
    if over and status["status"] not in NODE_ENDED:
        _expire(rt, row)
        return
    _relay(rt, row, status, page)


def _expire(rt: Runtime, row: GatewayJobRow) -> None:
    """The job's paid time ran out while it ran: it is stopped."""
    update_job(
        rt,
        row.job_id,
        f"paid time ran out at {row.progress:.0%}; job stopped",
        status="ending",
        outcome="expired",
    )


IGNORED = "checkpoint not taken (not one the node can resume from, or another job's)"
MAX_CHECKPOINT_URL = 500  # the book's column: a longer one is not cut (a path that is not there)
_NOT_IN_URL = re.compile(r"[\x00-\x1f\x7f\s]")  # what the node refuses in one (`checkpoints`)


def its_checkpoint(rt: Runtime, row: GatewayJobRow, url: str) -> bool:
    """Whether `url`, named by the job's output or its node, may be kept as the job's
    checkpoint: what a replacement resumes from and what its buyer is shown (its artifact once
    done). A job's lines are its buyer's to write: one naming another job's folder of the
    checkpoint store resumed from another buyer's work, and one the node refuses (a space, an
    unknown protocol; or one cut to the book's column) left every replacement refused, or
    failing, until the paid time ran out. Only a URL the node can take, and in the store's
    folder only the job's own (`<checkpoint dir>/<job id>/`) or the one it started from."""
    if len(url) > MAX_CHECKPOINT_URL or _NOT_IN_URL.search(url) or ".." in url:
        return False
    if (split_protocol(url)[0] or "file") not in known_implementations:
        return False
    if url == row.resume_from:
        return True
    store, path = _where(url)
    root_store, root = _where(rt.cfg.checkpoint_dir)
    root = root.rstrip("/")
    if store == root_store and path.startswith(f"{root}/"):
        return path.startswith(f"{root}/{row.job_id}/")
    return True  # outside the shared store (the instance's own disk): the job's own business


def _where(url: str) -> tuple[str, str]:
    """(the store's implementation, the path in it): one spelling of a URL, so that `file://`,
    `~`, a doubled slash or (on a disk) a `.` segment does not make another job's folder look
    like none of the store's. (`..` never reaches here: `its_checkpoint` refuses it.)"""
    protocol, path = split_protocol(url)
    store = known_implementations.get(protocol or "file", {}).get("class", protocol or "")
    if store == known_implementations["file"]["class"]:
        # A disk reads `/a/./b` as `/a/b`: left as spelled, a `.` above the store's folder hid
        # another job's checkpoint in it. (An object store's keys are as written: left so.)
        folder = path.endswith("/")
        path = posixpath.normpath(os.path.expanduser(path)) + ("/" if folder else "")
    return store, re.sub("/+", "/", path)


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
            if its_checkpoint(rt, row, rest.strip()):
                url, at = rest.strip(), last if last is not None else row.progress
            else:  # kept as a line, so its buyer sees what was not taken, and why
                lines.append(f"[gateway] {IGNORED}: {scrub(rest.strip())[:200]}")
        else:
            lines.append(scrub(line["text"])[:2_000])  # a buyer reads them: no secret of ours
    if (
        status.get("checkpoint")
        and status["checkpoint"] != url
        and its_checkpoint(rt, row, status["checkpoint"])
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
    if node_status in NODE_ENDED:
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
    update_job(rt, row.job_id, **fields)


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
    if not ids and inst.launched_at is not None:
        # A launch tried without an answer, not listed by its name (yet): it may still land and
        # bill, so it counts against the caps until the sweeper ends it or finds it never came
        # (`loop.sweep`); marked terminated, a buyer was sold its place while it billed.
        update_instance(rt, inst.name, status=book.ABANDONED, ended_at=now)
        return True
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
    update_instance(
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
    _ended(rt, row.job_id, row.outcome or "failed")


def _ended(rt: Runtime, job_id: str, outcome: str) -> None:
    """The job's instances are gone: it ends as `outcome`; unless, ended for want of paid time,
    a renewal booked meanwhile (its settlement in doubt until now) gave it time again
    (`book.settled`): then it is launched again from its last checkpoint, as a job revived
    once `expired` is, and waits for room under the caps as that one does."""
    now = utcnow()
    with rt.store.session() as s:
        row = s.get(GatewayJobRow, job_id, with_for_update=True)
        if row is None or row.status != "ending":
            return
        if book.ran_out(row) and row.paid_until is not None and now < row.paid_until:
            book.revive(row, row.paid_until)
            row.ended_at = row.updated_at = now  # relaunched without a sale's check of the caps
            return
        # Ended for want of paid time before it ever ran: the buyer got no compute at all.
        never_ran = book.ran_out(row) and row.paid_until is None
        row.status, row.ended_at, row.updated_at = outcome, now, now
        book.note(row, f"[gateway] job {outcome}; instance terminated", rt.cfg.log_lines)
        if never_ran:
            book.owe_back_unused(s, row)
