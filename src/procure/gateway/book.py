"""The gateway's durable book in the store: quotes, sold jobs, payments received and instances,
and the figures `procure gateway status`, the dashboard and `/metrics` show (income, instance
costs, margin). Plain functions over one session each; the caller owns the transaction."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from procure.models import micros_to_usd, utcnow
from procure.store import Store
from procure.store.gateway_tables import (
    GatewayInstanceRow,
    GatewayJobRow,
    GatewayPaymentRow,
    GatewayQuoteRow,
)

STARTED = ("paid", "launching", "booting", "running", "ending")  # paid, not yet ended
LIVE = ("unpaid", *STARTED)  # count against the caps
TERMINAL = ("completed", "failed", "cancelled", "expired")
HOLDING = ("launching", "booting", "running")  # instance rows that may hold a machine
# A launch given up without an answer (`launches`): it may still land and bill, so it counts
# against the caps until the sweeper terminates it or finds it never came (`loop.sweep`);
# no job holds it any more (the sweeper's to end).
ABANDONED = "abandoned"
COUNTED = (*HOLDING, ABANDONED)
# Sold and not yet holding a machine the cloud counts: each will take one of its free GPUs.
WAITING = ("unpaid", "paid", "launching")
# Jobs that hold an instance or will launch one (an `ending` job launches nothing more).
RESERVING = (*WAITING, "booting", "running")


# --- quotes ----------------------------------------------------------------------------------


def open_quotes(s: Session, now: datetime) -> int:
    return int(s.scalar(select(func.count()).where(GatewayQuoteRow.expires_at > now)) or 0)


def purge_quotes(s: Session, now: datetime) -> None:
    """Quotes expired a while ago go: the book of quotes cannot grow without bound."""
    s.execute(delete(GatewayQuoteRow).where(GatewayQuoteRow.expires_at < now - timedelta(hours=1)))


def drop_oldest_quotes(s: Session, now: datetime, count: int) -> None:
    """The `count` open quotes that expire first go (by the expiry index)."""
    oldest = select(GatewayQuoteRow.quote_id).where(GatewayQuoteRow.expires_at > now)
    ids = list(s.scalars(oldest.order_by(GatewayQuoteRow.expires_at).limit(count)))
    if ids:
        s.execute(delete(GatewayQuoteRow).where(GatewayQuoteRow.quote_id.in_(ids)))


def known(value: str) -> bool:
    """Whether `value` (an id or key from a request) can name a row: a NUL never does, and
    PostgreSQL cannot even compare one (where SQLite answers "unknown"), so a buyer sending
    one got a 500 and a database traceback in the log; nor does half a surrogate pair (JSON's
    `"\\ud800"`), which is not UTF-8: neither store can be sent it."""
    if not value or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def get_quote(s: Session, quote_id: str) -> GatewayQuoteRow | None:
    return s.get(GatewayQuoteRow, quote_id[:32]) if known(quote_id) else None


# --- jobs and payments -----------------------------------------------------------------------


def job(s: Session, job_id: str) -> GatewayJobRow | None:
    return s.get(GatewayJobRow, job_id[:32]) if known(job_id) else None


def job_by_key(s: Session, key: str) -> GatewayJobRow | None:
    if not known(key):
        return None
    return s.scalar(select(GatewayJobRow).where(GatewayJobRow.key == key[:200]))


def nonce_seen(s: Session, nonce: str) -> bool:
    return s.get(GatewayPaymentRow, nonce) is not None


def live_jobs_of(s: Session, payer: str) -> int:
    query = select(func.count()).where(
        GatewayJobRow.payer == payer.lower(), GatewayJobRow.status.in_(LIVE)
    )
    return int(s.scalar(query) or 0)


def waiting_jobs(s: Session, gpu: str) -> int:
    query = select(func.count()).where(GatewayJobRow.gpu == gpu, GatewayJobRow.status.in_(WAITING))
    return int(s.scalar(query) or 0)


def live_jobs(s: Session) -> int:
    return int(s.scalar(select(func.count()).where(GatewayJobRow.status.in_(LIVE))) or 0)


def started_job_ids(s: Session) -> list[str]:
    query = select(GatewayJobRow.job_id).where(GatewayJobRow.status.in_(STARTED))
    return list(s.scalars(query.order_by(GatewayJobRow.created_at)))


def add_payment(
    s: Session,
    *,
    nonce: str,
    job_id: str,
    kind: str,
    key: str,
    payer: str,
    amount: int,
    hours: float,
) -> None:
    """A verified payment about to be settled (`pending`): its nonce is taken from now on."""
    s.add(
        GatewayPaymentRow(
            nonce=nonce,
            job_id=job_id,
            kind=kind,
            key=key,
            payer=payer,  # as signed: the facilitator looks it up so
            amount=amount,
            hours=hours,
            transaction=None,
            status="pending",
            created_at=utcnow(),
        )
    )


def pending_payment(s: Session, kind: str, key: str) -> GatewayPaymentRow | None:
    if not known(key):
        return None
    query = select(GatewayPaymentRow).where(
        GatewayPaymentRow.kind == kind,
        GatewayPaymentRow.key == key,
        GatewayPaymentRow.status == "pending",
    )
    return s.scalar(query)


def renewal_in_doubt(
    s: Session, job_id: str, since: datetime, until: datetime
) -> GatewayPaymentRow | None:
    """A renewal of `job_id` written between `since` and `until` whose settlement is still
    unknown (pending), or None."""
    query = select(GatewayPaymentRow).where(
        GatewayPaymentRow.job_id == job_id,
        GatewayPaymentRow.kind == "renew",
        GatewayPaymentRow.status == "pending",
        GatewayPaymentRow.created_at > since,
        GatewayPaymentRow.created_at <= until,
    )
    return s.scalar(query.order_by(GatewayPaymentRow.created_at).limit(1))


def renewed_job(s: Session, key: str) -> GatewayJobRow | None:
    """The job that the completed renewal with idempotency key `key` paid for, or None."""
    if not known(key):
        return None
    paid = s.scalar(
        select(GatewayPaymentRow).where(
            GatewayPaymentRow.kind == "renew",
            GatewayPaymentRow.key == key,
            GatewayPaymentRow.status.in_(("completed", REFUND_OWED)),
        )
    )
    return job(s, paid.job_id) if paid is not None else None


def refund_owed(s: Session, job_id: str) -> int:
    """Micro-USD owed back on `job_id`: its renewals that settled once it had ended."""
    query = select(func.coalesce(func.sum(GatewayPaymentRow.amount), 0)).where(
        GatewayPaymentRow.job_id == job_id, GatewayPaymentRow.status == REFUND_OWED
    )
    return int(s.scalar(query) or 0) if known(job_id) else 0


def settled(
    s: Session, nonce: str, transaction: str | None, hour_s: float, amount: int | None = None
) -> GatewayJobRow | None:
    """The payment `nonce` settled: booked as income, and its job paid (a submit) or given
    more paid time (a renewal); a renewal of a job with no use for more time is a refund owed
    (`owe_refund`). Idempotent."""
    payment = s.get(GatewayPaymentRow, nonce, with_for_update=True)
    if payment is None or payment.status != "pending":
        return job(s, payment.job_id) if payment else None
    payment.status = "completed"
    payment.transaction = (transaction or "")[:200] or None
    if amount is not None:
        payment.amount = amount  # what moved
    row = s.get(GatewayJobRow, payment.job_id, with_for_update=True)
    if row is None:
        return None
    now = utcnow()
    if payment.kind == "renew" and no_use_for_time(row):
        owe_refund(payment, row)
        return row
    row.amount += payment.amount
    row.paid_hours += payment.hours
    if payment.kind == "submit":
        row.status = "paid"
    elif ran_out(row) and row.status != "ending":
        revive(row, now + timedelta(seconds=payment.hours * hour_s))
    elif ran_out(row):
        # Being ended for want of paid time, its instance not yet gone: the time is given from
        # now, and the job is relaunched once that instance is (`instances._ended`); added to
        # the paid time that ran out, the job ended all the same, the money taken.
        row.paid_until = max(row.paid_until or now, now) + timedelta(seconds=payment.hours * hour_s)
    elif row.paid_until is not None:
        # From where the paid time ran out, not from now: a job kept while this renewal was
        # being settled ran on it meanwhile.
        row.paid_until = row.paid_until + timedelta(seconds=payment.hours * hour_s)
    row.updated_at = now
    return row


# A renewal's payment that settled once its job had ended on its own or been cancelled: the
# money moved and buys nothing, so it is owed back to its payer (never income).
REFUND_OWED = "refund_owed"


def no_use_for_time(row: GatewayJobRow) -> bool:
    """Whether a renewal booked now gave the job nothing: it completed, failed on its own or
    was cancelled (or is being ended so, or its buyer asked to cancel it) within its paid time.
    A job that ran out of paid time is bought back by it (`ran_out`), unless its buyer asked to
    cancel it (revived, it would only be cancelled again); one kept running past its paid time
    while this renewal was being settled (`runtime.kept_for_renewal`) ran on it."""
    if ran_out(row):
        return bool(row.cancel_requested)
    if not row.cancel_requested and row.status not in (*TERMINAL, "ending"):
        return False
    # When it ended, or (still being ended) the last word on it: the end was said then.
    ended = row.ended_at if row.status in TERMINAL and row.ended_at else row.updated_at
    return row.paid_until is None or ended <= row.paid_until


def owe_refund(payment: GatewayPaymentRow, row: GatewayJobRow) -> None:
    """The renewal `payment` settled on a job with no use for its time: the route checks the
    job before the money moves, but the settle call takes a while and the job can end meanwhile
    (or its answer was lost and the ledger showed it settled only later). Booked on the job it
    was charged and given nothing, silently: kept apart as owed to its payer, which the job's
    log, the book's figures (`refundsOwedUsd`) and `/metrics` show the operator and the buyer."""
    payment.status = REFUND_OWED
    shown = row.outcome if row.status == "ending" and row.outcome else row.status
    shown = "cancelled" if row.cancel_requested else shown
    note(
        row,
        f"[gateway] a renewal of ${micros_to_usd(payment.amount):g} settled after the job was "
        f"{shown} (payment {payment.nonce[:10]}, tx {payment.transaction or '?'}): it buys "
        f"nothing; refund owed to {payment.payer}",
        200,
    )
    row.updated_at = utcnow()


def owe_back_unused(s: Session, row: GatewayJobRow) -> None:
    """The job `row` ends never having run (no launch within its paid time: no capacity, quota
    or credit): its settled payments bought nothing, so are owed back (as `owe_refund`)."""
    paid = select(GatewayPaymentRow).where(
        GatewayPaymentRow.job_id == row.job_id, GatewayPaymentRow.status == "completed"
    )
    for payment in list(s.scalars(paid.with_for_update())):
        payment.status = REFUND_OWED
        usd, tx = micros_to_usd(payment.amount), payment.transaction or "?"
        line = f"its payment of ${usd:g} (payment {payment.nonce[:10]}, tx {tx}) bought nothing"
        note(row, f"[gateway] the job never ran: {line}; refund owed to {payment.payer}", 200)
    row.updated_at = utcnow()


# How a job that no instance could be launched for within its paid time ends (`launches`).
NO_LAUNCH = "no instance could be launched within the paid time"


def ran_out(row: GatewayJobRow) -> bool:
    """Whether the job ended, or is being ended, for want of paid time: it ran out while the
    job ran (`expired`), or before any instance could be launched for it (`failed`, NO_LAUNCH).
    A renewal booked on such a job (its settlement in doubt through its hold) buys that time
    back (`settled`); one that completed, failed on its own or was cancelled has no use for it."""
    ended = row.outcome if row.status == "ending" else row.status
    return ended == "expired" or (ended == "failed" and (row.error or "").startswith(NO_LAUNCH))


def revive(row: GatewayJobRow, paid_until: datetime) -> None:
    """A renewal booked once its job had ended for want of paid time (its hold past the paid
    time ran out with the facilitator's ledger unreachable, and it had settled after all): the
    money moved, so the time it bought is given, from now: the loop launches the job again from
    its last checkpoint (booked on the ended job, it bought nothing, and nothing is refunded).
    Its `ended_at` stays until an instance is launched for it: it marks a job relaunched
    without a sale's check of the caps, so its launch waits for room under them
    (`launches.launch`); it counts against them from now (no new sale takes its place)."""
    row.status, row.outcome = "paid", None
    row.paid_until, row.tried_regions, row.error = paid_until, [], None
    note(row, "[gateway] a renewal was booked after the paid time ran out: relaunching", 200)


def unsettled(s: Session, nonce: str) -> None:
    """The payment `nonce` did not settle: it and (a submit's) unpaid job leave no trace."""
    # Locked as `settled` locks it: a settlement booked meanwhile is never deleted.
    payment = s.get(GatewayPaymentRow, nonce, with_for_update=True)
    if payment is None or payment.status != "pending":
        return
    if payment.kind == "submit":
        row = s.get(GatewayJobRow, payment.job_id)
        if row is not None and row.status == "unpaid":
            s.delete(row)
    s.delete(payment)
    s.flush()


def note(row: GatewayJobRow, line: str, keep: int) -> None:
    """Append a log line the buyer will see (the gateway's own, beside the job's)."""
    row.logs = [*row.logs, line[:2_000]][-keep:]
    row.logs_total = (row.logs_total or 0) + 1


# --- instances -------------------------------------------------------------------------------


def instances_of(s: Session, job_id: str) -> list[GatewayInstanceRow]:
    if not known(job_id):
        return []
    query = select(GatewayInstanceRow).where(GatewayInstanceRow.job_id == job_id)
    return list(s.scalars(query.order_by(GatewayInstanceRow.created_at)))


def held_offers(s: Session) -> list[dict[str, Any]]:
    """The offers the instances the gateway holds were launched on."""
    query = select(GatewayInstanceRow.offer).where(GatewayInstanceRow.status.in_(HOLDING))
    return [o for o in s.scalars(query) if o]


def holding_names(s: Session) -> set[str]:
    """Names of instances whose job is still live (what the sweeper must leave alone)."""
    query = (
        select(GatewayInstanceRow.name)
        .join(GatewayJobRow, GatewayJobRow.job_id == GatewayInstanceRow.job_id)
        .where(GatewayInstanceRow.status.in_(HOLDING), GatewayJobRow.status.in_(STARTED))
    )
    return set(s.scalars(query))


# --- what the gateway has committed on the cloud account --------------------------------------


def committed(s: Session, without: str | None = None) -> tuple[int, int]:
    """(micro-USD per hour, instances): the most the instances the gateway holds or has sold
    on the cloud account may cost per hour together, and how many they are, for its caps.
    A sold job that may still launch (being paid, paid, launching, booting, running: a lost
    instance is replaced) counts at its sale price per hour, the most any launch of it may cost
    (`launches.within_sale`), or at its instances' prices if they cost more; an instance whose
    job launches nothing more (ending, or no live job: still billed until terminated) at its
    price. Instance rows count while they may hold a machine: `launching` (a launch in flight),
    `booting`, `running`, `abandoned` (given up without an answer, not yet swept). `without`:
    the job left out (to ask whether it fits beside the others)."""
    held: dict[str, tuple[int, int]] = {}  # job id: (price per hour, instances)
    rows = s.execute(
        select(GatewayInstanceRow.job_id, GatewayInstanceRow.price_per_hour).where(
            GatewayInstanceRow.status.in_(COUNTED)
        )
    ).all()
    for job_id, price in rows:
        if job_id == without:
            continue
        price_sum, n = held.get(job_id, (0, 0))
        held[job_id] = (price_sum + int(price), n + 1)
    # An unpaid job's figures are still on its payment (the job's are booked at settlement).
    sold = s.execute(
        select(
            GatewayJobRow.job_id,
            GatewayJobRow.amount,
            GatewayJobRow.paid_hours,
            GatewayPaymentRow.amount,
            GatewayPaymentRow.hours,
        )
        .outerjoin(GatewayPaymentRow, GatewayPaymentRow.nonce == GatewayJobRow.nonce)
        .where(GatewayJobRow.status.in_(RESERVING))
    ).all()
    per_hour = count = 0
    for job_id, amount, hours, paying, paying_hours in sold:
        if job_id == without:
            continue
        if not hours:
            amount, hours = paying or 0, paying_hours or 0.0
        bound = math.ceil(amount / hours) if hours else 0
        price_sum, n = held.pop(job_id, (0, 0))
        per_hour += max(bound, price_sum)
        count += max(1, n)
    for price_sum, n in held.values():
        per_hour += price_sum
        count += n
    return per_hour, count


# --- figures ---------------------------------------------------------------------------------


def figures(store: Store) -> dict[str, Any]:
    """Income, instance costs and margin (USD), jobs by status, live instances: for
    `procure gateway status`, the dashboard and `/metrics`. Costs of running instances are
    accrued to now at their price."""
    now = utcnow()
    with store.session() as s:
        income = s.scalar(
            select(func.coalesce(func.sum(GatewayPaymentRow.amount), 0)).where(
                GatewayPaymentRow.status == "completed"
            )
        )
        payments = s.scalar(select(func.count()).where(GatewayPaymentRow.status == "completed"))
        owed, owed_n = s.execute(
            select(func.coalesce(func.sum(GatewayPaymentRow.amount), 0), func.count()).where(
                GatewayPaymentRow.status == REFUND_OWED
            )
        ).one()
        by_status = dict(
            s.execute(
                select(GatewayJobRow.status, func.count()).group_by(GatewayJobRow.status)
            ).all()
        )
        # Ended instances are summed in SQL; only live ones (few, by the status index) are read,
        # to accrue their cost to now: the book costs the same whatever the history holds.
        ended_cost = s.scalar(
            select(func.coalesce(func.sum(GatewayInstanceRow.cost), 0)).where(
                GatewayInstanceRow.cost.is_not(None)
            )
        )
        launched = s.scalar(select(func.count()).where(GatewayInstanceRow.launched_at.is_not(None)))
        holding = list(
            s.execute(
                select(GatewayInstanceRow.price_per_hour, GatewayInstanceRow.launched_at).where(
                    GatewayInstanceRow.status.in_(HOLDING),
                    GatewayInstanceRow.cost.is_(None),
                    GatewayInstanceRow.launched_at.is_not(None),
                )
            ).all()
        )
        quotes = open_quotes(s, now)
        per_hour, instances = committed(s)
    cost, live = int(ended_cost or 0), len(holding)
    for price_per_hour, launched_at in holding:
        hours = max(0.0, (now - launched_at).total_seconds()) / 3600
        cost += round(price_per_hour * hours)
    income = int(income or 0)
    return {
        "incomeUsd": micros_to_usd(income),
        "instanceCostUsd": micros_to_usd(cost),
        "marginUsd": micros_to_usd(income - cost),
        "paymentsReceived": int(payments or 0),
        # Renewals settled once their job had ended: moved, not income, to be paid back.
        "refundsOwedUsd": micros_to_usd(int(owed or 0)),
        "refundsOwed": int(owed_n or 0),
        "jobs": {str(k): int(v) for k, v in by_status.items()},
        "liveInstances": live,
        "instancesLaunched": int(launched or 0),
        "openQuotes": quotes,
        # What the caps (`max_hourly_usd`, `max_total_instances`) are checked against.
        "committedUsdPerHour": micros_to_usd(per_hour),
        "committedInstances": instances,
    }


def prometheus_lines(store: Store, vendor_id: str) -> list[str]:
    """The gateway's figures in Prometheus' text format, for the API's `/metrics`."""
    f = figures(store)
    label = f'{{vendor_id="{vendor_id}"}}'
    lines = [
        "# HELP procure_gateway_income_usd_total Payments received by the gateway, USD.",
        "# TYPE procure_gateway_income_usd_total counter",
        f"procure_gateway_income_usd_total{label} {f['incomeUsd']}",
        "# HELP procure_gateway_instance_cost_usd_total What the gateway's instances cost, USD.",
        "# TYPE procure_gateway_instance_cost_usd_total counter",
        f"procure_gateway_instance_cost_usd_total{label} {f['instanceCostUsd']}",
        "# HELP procure_gateway_margin_usd Income less instance costs, USD.",
        "# TYPE procure_gateway_margin_usd gauge",
        f"procure_gateway_margin_usd{label} {f['marginUsd']}",
        "# HELP procure_gateway_refunds_owed_usd Renewals settled after their job ended, owed"
        " back to their payers, USD.",
        "# TYPE procure_gateway_refunds_owed_usd gauge",
        f"procure_gateway_refunds_owed_usd{label} {f['refundsOwedUsd']}",
        "# HELP procure_gateway_live_instances Instances the gateway holds now.",
        "# TYPE procure_gateway_live_instances gauge",
        f"procure_gateway_live_instances{label} {f['liveInstances']}",
        "# HELP procure_gateway_committed_usd_per_hour What the gateway's instances, live and"
        " sold, cost per hour together (checked against its max_hourly_usd), USD.",
        "# TYPE procure_gateway_committed_usd_per_hour gauge",
        f"procure_gateway_committed_usd_per_hour{label} {f['committedUsdPerHour']}",
        "# HELP procure_gateway_jobs Jobs sold, by status.",
        "# TYPE procure_gateway_jobs gauge",
    ]
    for status, count in sorted(f["jobs"].items()):
        lines.append(f'procure_gateway_jobs{{vendor_id="{vendor_id}",status="{status}"}} {count}')
    return lines
