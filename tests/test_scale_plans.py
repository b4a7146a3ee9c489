"""The store's hot and periodic queries, as procure issues them, use an index on both stores (the
query plans say so), so they cost the same on a year of runs as on the first day; and the
running totals stay equal to what counting the rows says, whatever writes them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from procure.models import JobSpec, PaymentStatus, RunStatus, utcnow
from procure.store import Store, fleet_repo, keyset, leases, open_store, repo, totals
from procure.store.tables import PaymentRow, RunRow
from procure.web import queries


@contextmanager
def captured(store: Store) -> Iterator[list[tuple[str, Any]]]:
    """Every statement sent to the database meanwhile, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(_conn, _cursor, statement, parameters, _context, executemany) -> None:  # type: ignore[no-untyped-def]
        if not executemany:
            seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def plans(
    store: Store, call: Callable[[Session], object], *, sorted_: bool
) -> list[tuple[str, str]]:
    """(statement, its query plan) for each SELECT/UPDATE/DELETE that `call` sends;
    `sorted_`: the query's order must come from an index."""
    with captured(store) as seen, store.session() as s:
        call(s)
    found = []
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if not store.is_sqlite:
            # A test store is tiny: a scan (and a sort) would win on cost. Priced out, the plan
            # shows whether an index *can* serve the query (and its order), which is what a
            # big store needs; where none can, the scan or sort is still there to see.
            for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                if setting != "enable_sort" or sorted_:
                    cursor.execute(f"SET {setting} = off")
        prefix = "EXPLAIN QUERY PLAN " if store.is_sqlite else "EXPLAIN "
        for statement, parameters in seen:
            if not re.match(r"\s*(SELECT|UPDATE|DELETE|WITH)", statement, re.I):
                continue
            cursor.execute(prefix + statement, parameters)
            plan = "\n".join(str(row[-1] if store.is_sqlite else row[0]) for row in cursor)
            found.append((statement, plan))
    finally:
        raw.rollback()
        raw.close()
    return found


def full_scans(plan: str, table: str, sqlite: bool) -> bool:
    if sqlite:
        return re.search(rf"\bSCAN {table}\b(?! USING)", plan) is not None
    return re.search(rf"Seq Scan on {table}\b", plan) is not None


def sorts(plan: str, sqlite: bool) -> bool:
    return (
        ("TEMP B-TREE FOR ORDER BY" in plan) if sqlite else re.search(r"\bSort\b", plan) is not None
    )


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


def _seed(store: Store) -> str:
    """A few runs with a job, a payment and observations: enough for plans to name indexes."""
    from procure.models import Job, Payment

    run_id = ""
    with store.session() as s:
        for n in range(5):
            run_id = repo.create_run(
                s, user_id="u", goal=f"g{n}", budget_total=5_000_000, job_spec=JobSpec()
            ).id
            job = Job(
                id=repo.new_id(),
                run_id=run_id,
                vendor_id="v1",
                status="running",
                expected_cost=1_000_000,
                job_params={},
                idempotency_key=repo.new_id(),
                created_at=utcnow(),
                updated_at=utcnow(),
            )
            repo.insert_job(s, job)
            s.flush()
            repo.insert_payment(
                s,
                Payment(
                    id=repo.new_id(),
                    run_id=run_id,
                    job_id=job.id,
                    vendor_id="v1",
                    amount=1_000_000,
                    currency="USDC",
                    status=PaymentStatus.pending,
                    nonce="0x" + repo.new_id(),
                    created_at=utcnow(),
                    updated_at=utcnow(),
                ),
            )
            for i in range(3):
                repo.add_observation(s, run_id, "agent_reasoning", f"note {i}")
    return run_id


def test_hot_queries_use_an_index(store: Store) -> None:
    run_id = _seed(store)
    key = keyset.Key(utcnow(), "zzz")
    now = utcnow()
    page = [f"r{n}" for n in range(24)] + [run_id]  # a dashboard page's worth of runs
    # (what, the call as procure makes it, the table, the index its statements on it must
    # use, may they sort)
    hot: list[tuple[str, Callable[[Session], object], str, str, bool]] = [
        ("runs: first page", lambda s: keyset.runs(s, limit=50), "runs", "ix_runs_created", False),
        (
            "runs: a later page",
            lambda s: keyset.runs(s, limit=50, after=key),
            "runs",
            "ix_runs_created",
            False,
        ),
        (
            "runs of a status: a later page",
            lambda s: keyset.runs(s, limit=50, after=key, status="completed"),
            "runs",
            "ix_runs_status_created",
            False,
        ),
        (
            "dashboard: the oldest page",
            lambda s: keyset.runs(s, limit=25, newest_first=False),
            "runs",
            "ix_runs_created",
            False,
        ),
        (
            "dashboard: spent by run of a page",
            lambda s: queries.spent_by_run(s, page),
            "payments",
            "ix_payments_run_id",
            True,
        ),
        (
            "dashboard: vendor now of a page",
            lambda s: queries.vendors_now(s, page),
            "jobs",
            "ix_jobs_run_id",
            True,
        ),
        ("due runs", lambda s: leases.acquire_due(s, "w", 60, 16), "runs", "ix_runs_due", True),
        (
            "a run's observations page",
            lambda s: repo.list_observations(s, run_id, after_id=1, limit=1000),
            "observations",
            "ix_observations_run_id_id",
            False,
        ),
        (
            "a run's newest observations",
            lambda s: queries.latest_observations(s, run_id, 300),
            "observations",
            "ix_observations_run_id_id",
            False,
        ),
        (
            "a run's state",
            lambda s: repo.load_tick_state(s, run_id),
            "payments",
            "ix_payments_run_id",
            True,
        ),
        (
            "a run's budget",
            lambda s: repo.refresh_budget(s, run_id),
            "payments",
            "ix_payments_run_id",
            True,
        ),
        (
            "pending payments of ended runs",
            lambda s: repo.pending_payments_of_ended_runs(s),
            "payments",
            "ix_payments_status_created",
            False,
        ),
        (
            "payments: a page",
            lambda s: keyset.payments(s, limit=50, after=key),
            "payments",
            "ix_payments_created",
            False,
        ),
        (
            "tick log: by age",
            lambda s: leases.prune_tick_log(s, older_than_s=86400),
            "tick_log",
            "ix_tick_log_finished",
            True,
        ),
        (
            "tick log: per run",
            lambda s: leases.trim_tick_log_runs(s, keep=1, since_id=0),
            "tick_log",
            "ix_tick_log_run",
            True,
        ),
        (
            "fleet actions: a page",
            lambda s: keyset.actions(s, limit=100, after=key),
            "autonomous_actions",
            "ix_actions_created_id",
            False,
        ),
        (
            "fleet samples: by age",
            lambda s: fleet_repo.prune_samples(s, now - timedelta(hours=1)),
            "fleet_samples",
            "ix_fleet_samples_taken",
            True,
        ),
        (
            "fleet outbox: by age",
            lambda s: fleet_repo.prune_outbox(s, now - timedelta(days=7)),
            "fleet_outbox",
            "ix_fleet_outbox_delivered",
            True,
        ),
    ]
    with store.session() as s:  # rows for the per-run trim to look at
        leases.finish(s, [leases.TickRecord(run_id, "w", now, now, "Job running")])
    for what, call, table, index, may_sort in hot:
        found = plans(store, call, sorted_=not may_sort)
        assert found, what
        touching = [(sql, plan) for sql, plan in found if re.search(rf"\bFROM {table}\b", sql)]
        assert touching, f"{what}: no statement on {table}"
        # Its main statement reads the table by the index meant for it (a plan that reads it
        # by another index, e.g. every completed payment for one page's, is a scan too).
        assert any(index in plan for _sql, plan in touching), f"{what}: {touching}"
        for sql, plan in touching:
            assert not full_scans(plan, table, store.is_sqlite), f"{what}: {sql}\n{plan}"
            if not may_sort:
                assert not sorts(plan, store.is_sqlite), f"{what} sorts: {sql}\n{plan}"


def _counted(s: Session) -> tuple[dict[str, int], int]:
    by_status = dict(s.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all())
    paid = s.scalar(
        select(func.coalesce(func.sum(PaymentRow.amount), 0)).where(
            PaymentRow.status == PaymentStatus.completed
        )
    )
    return {k: int(v) for k, v in by_status.items()}, int(paid or 0)


def test_running_totals_follow_every_writer(store: Store) -> None:
    run_id = _seed(store)
    with store.session() as s:
        # The ORM, Core bulk updates and raw deletes alike: the triggers see them all.
        repo.update_run(s, run_id, status=RunStatus.completed)
        s.execute(update(PaymentRow).where(PaymentRow.run_id == run_id).values(status="completed"))
        s.execute(update(RunRow).where(RunRow.id != run_id).values(status=RunStatus.failed))
    with store.session() as s:
        assert totals.runs_by_status(s) == _counted(s)[0] == {"completed": 1, "failed": 4}
        assert totals.paid_micros(s) == _counted(s)[1] == 1_000_000
        assert totals.fold(s) > 1
    with store.session() as s:
        assert totals.span(s) == 6  # one row per name once folded (runs: 2, payments: 4)
        assert totals.runs_by_status(s) == {"completed": 1, "failed": 4}
        assert totals.paid_micros(s) == 1_000_000
        assert repo.count_runs_by_status(s) == {"completed": 1, "failed": 4}


def test_a_runs_observations_are_read_by_its_index_whatever_the_statistics(store: Store) -> None:
    """A year of runs' observations, the asked run's last, with the planner's statistics up to
    date (as autovacuum keeps them): PostgreSQL, asked for `run_id = X ORDER BY id`, prefers to
    walk the primary key and filter (0.3 s a page at 100,000 runs). Each of the run's
    observation queries must range over the (run_id, id) index instead."""
    from sqlalchemy import insert, text

    from procure.store.tables import ObservationRow

    with store.session() as s:
        runs = [
            repo.create_run(s, user_id="u", goal="g", budget_total=1, job_spec=JobSpec()).id
            for _ in range(61)
        ]
        asked = runs[-1]
        for run_id in runs:  # each run's observations together, in the order the runs came
            rows = [
                {"run_id": run_id, "type": "job_log", "content": f"line {n}", "timestamp": utcnow()}
                for n in range(3_000 if run_id == asked else 1_000)
            ]
            s.execute(insert(ObservationRow), rows)
    with store.engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    calls = {
        "a page": lambda s: repo.list_observations(s, asked, after_id=0, limit=1001),
        "the newest": lambda s: queries.latest_observations(s, asked, 300),
        "the last few": lambda s: repo.recent_contents(s, asked),
        "the last of a type": lambda s: repo.last_observation(s, asked, "job_log"),
    }
    for name, call in calls.items():
        with captured(store) as seen, store.session() as s:
            call(s)
        [(statement, parameters)] = [x for x in seen if "FROM observations" in x[0]]
        prefix = "EXPLAIN QUERY PLAN " if store.is_sqlite else "EXPLAIN "
        with store.engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(prefix + statement, parameters)
            plan = "\n".join(str(row[-1] if store.is_sqlite else row[0]) for row in cursor)
        assert "ix_observations_run_id_id" in plan, (name, plan)
        assert "observations_pkey" not in plan, (name, plan)
