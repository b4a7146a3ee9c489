"""Warnings before caps: every budget (a run's, the global ledger's hour/day/month windows, the
fleet's caps) warns once when it crosses its threshold (PROCURE_WARNING_THRESHOLD, default 0.8),
with an event in the store, Slack and generic-webhook messages in the outbox, and a metric."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings
from sqlalchemy import BigInteger, Float, Index, Integer, String, UniqueConstraint, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from procure.models import ObservationType, RunStatus, format_usd, utcnow
from procure.numbers import finite_before
from procure.settings import CHECKED, blank_is_unset, http_url
from procure.store import Store, fleet_repo, ledger, repo
from procure.store.tables import Base, RunRow, VendorRow

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.8
SLACK, WEBHOOK = "warn_slack", "warn_webhook"  # outbox channels (fleet_outbox.channel)
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")
# Rolling windows warn at most once per calendar period of their own length.
_PERIOD = {"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}


def valid_threshold(value: Any) -> float:
    """A warning threshold: a finite fraction in (0, 1]; ValueError otherwise."""
    number = float(finite_before(value))
    if not (math.isfinite(number) and 0 < number <= 1):
        raise ValueError("a warning threshold is a fraction greater than 0 and at most 1")
    return number


class BudgetWarningRow(Base):
    """One warning: a budget crossed its threshold (append-only; unique per budget and period,
    so a crossing is recorded once whoever notices it, whatever crashes)."""

    __tablename__ = "budget_warnings"

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(8))  # run | ledger | fleet
    budget: Mapped[str] = mapped_column(String(64))  # a run id, hour|day|month, instances|...
    period: Mapped[str] = mapped_column(String(16))  # "" for a run: once for good
    spent: Mapped[int] = mapped_column(BigInteger)  # micro-USD (instances: a count)
    cap: Mapped[int] = mapped_column(BigInteger)
    threshold: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("scope", "budget", "period", name="uq_budget_warnings_once"),
        Index("ix_budget_warnings_created", "created_at"),
    )


@dataclass(frozen=True)
class Crossing:
    scope: str
    budget: str
    period: str
    spent: int
    cap: int
    threshold: float
    unit: str = "usd"  # usd (micro-USD amounts) | count

    def amount(self, value: int) -> str:
        return format_usd(value) if self.unit == "usd" else str(value)

    def text(self) -> str:
        where = {"run": f"Run {self.budget}'s budget", "ledger": f"Global spend per {self.budget}"}
        name = where.get(self.scope, f"Fleet cap {self.budget}")
        share = self.spent / self.cap if self.cap else 1.0
        return (
            f"Budget warning: {name} is at {share:.0%} ({self.amount(self.spent)} of "
            f"{self.amount(self.cap)}), past its warning threshold of {self.threshold:.0%}"
        )


def record(s: Session, c: Crossing, now: datetime) -> bool:
    """Record the crossing once (in the caller's transaction): the event, the run's observation,
    the fleet's audit entry and the notifications. True when this call recorded it."""
    insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = (
        insert(BudgetWarningRow)
        .values(
            scope=c.scope,
            budget=c.budget,
            period=c.period,
            spent=c.spent,
            cap=c.cap,
            threshold=c.threshold,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["scope", "budget", "period"])
        .returning(BudgetWarningRow.id)
    )
    if s.execute(stmt).scalar() is None:  # someone recorded it first
        return False
    text = c.text()
    if c.scope == "run":
        repo.add_observation(s, c.budget, ObservationType.agent_reasoning, text)
    else:  # the fleet's audit trail holds what is not a run's
        fleet_repo.enqueue(s, "audit", {"timestamp": _stamp(now), "warning": _event(c)}, now)
    fleet_repo.enqueue(s, SLACK, {"text": _slack_escape(f"⚠️ {text}")}, now)
    fleet_repo.enqueue(s, WEBHOOK, {"event": "budget_warning", **_event(c), "text": text}, now)
    return True


def _stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _event(c: Crossing) -> dict[str, Any]:
    def value(v: int) -> float | int:
        return v / 1_000_000 if c.unit == "usd" else v

    return {
        "scope": c.scope,
        "budget": c.budget,
        "period": c.period,
        "spent": value(c.spent),
        "cap": value(c.cap),
        "unit": c.unit,
        "threshold": c.threshold,
    }


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- a run's budget -----------------------------------------------------------------------------

_WARNED: set[str] = set()  # runs known to be recorded: a poll then costs nothing more


def check_run(store: Store, run_id: str, total: int, remaining: int, threshold: float) -> bool:
    """Warn once when a run's spend (its total less what remains) reaches `threshold` of its
    budget. Cheap enough for every poll: the store is asked only at the crossing."""
    if total <= 0 or run_id in _WARNED or total - remaining < threshold * total:
        return False
    try:
        with store.session() as s:
            recorded = record(
                s, Crossing("run", run_id, "", total - remaining, total, threshold), utcnow()
            )
    except SQLAlchemyError:  # a warning never stops a tick: the next poll tries again
        log.exception("recording run %s's budget warning failed; retrying at its next poll", run_id)
        return False
    if len(_WARNED) > 100_000:  # a long-lived worker: bounded memory; the store still says once
        _WARNED.clear()
    _WARNED.add(run_id)
    return recorded


# --- the global ledger and the levels the metrics show ------------------------------------------


@dataclass
class Levels:
    """The last sweep's share of each ledger window and fleet cap: what /metrics exports."""

    threshold: float = DEFAULT_THRESHOLD
    used: dict[tuple[str, str], float] = field(default_factory=dict)


LEVELS = Levels()


def check_ledger(
    s: Session, caps: ledger.SpendCaps, threshold: float, now: datetime
) -> list[Crossing]:
    """The ledger windows past `threshold` of their cap, each recorded once per period."""
    crossed = []
    for window, cap in caps.items():
        used = ledger.spent(s, window, now=now)
        LEVELS.used[("ledger", window)] = used / cap if cap else 1.0
        if cap > 0 and used >= threshold * cap:
            c = Crossing("ledger", window, now.strftime(_PERIOD[window]), used, cap, threshold)
            if record(s, c, now):
                crossed.append(c)
    return crossed


def counts(s: Session) -> tuple[dict[str, int], int]:
    """Warnings recorded by scope, and running runs past their warning threshold."""
    by_scope = dict(
        s.execute(
            select(BudgetWarningRow.scope, func.count()).group_by(BudgetWarningRow.scope)
        ).all()
    )
    running = s.scalar(
        select(func.count())
        .select_from(BudgetWarningRow)
        .join(RunRow, RunRow.id == BudgetWarningRow.budget)
        .where(BudgetWarningRow.scope == "run", RunRow.status == RunStatus.running)
    )
    return {k: int(v) for k, v in by_scope.items()}, int(running or 0)


def ops_figures(s: Session, limit: int = 500) -> tuple[float, list[tuple[str, int, int]]]:
    """The oldest running run's idle seconds (a run stuck), and each vendor's successes and
    failures (a vendor failing repeatedly); the vendor registry is small and bounded."""
    oldest = s.scalar(select(func.min(RunRow.updated_at)).where(RunRow.status == RunStatus.running))
    idle = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
    vendors = s.execute(
        select(VendorRow.vendor_id, VendorRow.successes, VendorRow.failures)
        .order_by(VendorRow.vendor_id)
        .limit(limit)
    ).all()
    return idle, [(v, int(ok or 0), int(bad or 0)) for v, ok, bad in vendors]


def recent(s: Session, limit: int = 20, scope: str | None = None) -> list[dict[str, Any]]:
    """The latest warnings, newest first, each with its sentence (`text`): what the dashboard
    and the CLI show (`scope`: run, ledger or fleet only)."""
    query = select(BudgetWarningRow).order_by(BudgetWarningRow.id.desc())
    if scope is not None:
        query = query.where(BudgetWarningRow.scope == scope)
    found = []
    for r in s.scalars(query.limit(max(1, min(limit, 200)))):
        unit = "count" if r.budget == "instances" else "usd"
        c = Crossing(r.scope, r.budget, r.period, r.spent, r.cap, r.threshold, unit)
        found.append({"at": _stamp(r.created_at), **_event(c), "text": c.text()})
    return found


# --- delivery -----------------------------------------------------------------------------------


class WarningSettings(BaseSettings):
    model_config = CHECKED

    threshold: float = Field(
        DEFAULT_THRESHOLD,
        validation_alias="PROCURE_WARNING_THRESHOLD",
        description="Share of every budget (run, global ledger, fleet caps) that warns",
    )
    slack_webhook_url: SecretStr | None = Field(None, validation_alias="SLACK_WEBHOOK_URL")
    webhook_url: SecretStr | None = Field(
        None,
        validation_alias="PROCURE_WARNING_WEBHOOK_URL",
        description="Generic webhook: each warning is POSTed there as JSON",
    )
    timeout_s: float = Field(10.0, gt=0, le=120, validation_alias="PROCURE_WARNING_TIMEOUT_S")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> float:
        return valid_threshold(value)

    @field_validator("slack_webhook_url", "webhook_url", mode="before")
    @classmethod
    def _blank(cls, value: Any) -> Any:
        return blank_is_unset(value)

    @field_validator("slack_webhook_url", "webhook_url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            http_url(value.get_secret_value())
        return value


# A warning no process could send (none has its webhook's URL) is dropped after this long.
UNSENT_S = 86_400.0


async def deliver(
    store: Store, client: httpx.AsyncClient | None, channel: str, url: str | None
) -> int:
    """POST the due messages of `channel` to `url`, in order, by the fleet outbox's rules
    (`outbox.deliver`). Without a `url` they are kept for a process that has one (`procure
    serve` and `procure fleet run` share the store; one may be configured, the other not) and
    dropped, with the reason, only after UNSENT_S, so nothing waits for good."""
    from procure.fleet import outbox  # the fleet's delivery rules, shared

    if client is None or not url:
        now = utcnow()
        with store.session() as s:
            stale = [
                m.id
                for m in fleet_repo.due_messages(s, channel, now)
                # Nobody tried it for a day (one being retried by a process with the URL is
                # due later than that: it is that process's to send or drop)
                if m.next_attempt_at < now - timedelta(seconds=UNSENT_S)
            ]
        for message_id in stale:
            outbox.drop(store, message_id, "no destination configured")
        return 0
    return await outbox.deliver(store, client, url, channel)
