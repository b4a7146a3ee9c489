"""Retention with a bound: the worker's pass keeps at most `tick_log_per_run` tick log rows per
run and none past `tick_log_days`, in batches, whatever the run's age, and never touches runs,
payments or observations; migration 0008 upgrades a store that already holds data (its running
totals start from the rows there)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import MetaData, func, insert, inspect, select

from procure.agent.upkeep import prune
from procure.agent.worker import WorkerConfig
from procure.models import JobSpec, ObservationType, utcnow
from procure.store import open_store, repo, totals
from procure.store.db import alembic_config, make_engine, migrate
from procure.store.tables import ObservationRow, RunRow, TickLogRow


def _ticks(run_id: str, n: int, *, days_ago: float = 0.0) -> list[dict[str, Any]]:
    start = utcnow() - timedelta(days=days_ago, seconds=n)
    return [
        {
            "run_id": run_id,
            "owner": "w",
            "started_at": start + timedelta(seconds=i),
            "finished_at": start + timedelta(seconds=i, milliseconds=5),
            "outcome": "Job running",
        }
        for i in range(n)
    ]


def test_the_tick_log_is_bounded_per_run_and_by_age(db_url: str) -> None:
    store = open_store(db_url)
    try:
        with store.session() as s:
            runs = [
                repo.create_run(
                    s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
                ).id
                for _ in range(3)
            ]
            repo.add_observation(s, runs[0], ObservationType.agent_reasoning, "kept")
            s.execute(insert(TickLogRow), _ticks(runs[0], 700))  # a busy run
            s.execute(insert(TickLogRow), _ticks(runs[1], 30))  # a quiet one
            s.execute(insert(TickLogRow), _ticks(runs[2], 400, days_ago=9))  # ended long ago
        cfg = WorkerConfig(tick_log_days=7, tick_log_per_run=100, prune_batch=64)
        deleted, mark = prune(store, cfg, mark=0)
        with store.session() as s:
            kept = dict(
                s.execute(select(TickLogRow.run_id, func.count()).group_by(TickLogRow.run_id)).all()
            )
            newest = s.scalar(
                select(func.max(TickLogRow.started_at)).where(TickLogRow.run_id == runs[0])
            )
            oldest_kept = s.scalar(
                select(func.min(TickLogRow.started_at)).where(TickLogRow.run_id == runs[0])
            )
            assert kept == {runs[0]: 100, runs[1]: 30}
            assert deleted == 600 + 400
            assert newest is not None and oldest_kept is not None
            assert newest - oldest_kept == timedelta(seconds=99)  # the newest 100 stay
            # History is never pruned.
            assert s.scalar(select(func.count()).select_from(RunRow)) == 3
            assert s.scalar(select(func.count()).select_from(ObservationRow)) == 1

        # The run goes on ticking: the next pass trims only what came since its mark.
        with store.session() as s:
            s.execute(insert(TickLogRow), _ticks(runs[0], 50))
        deleted, _ = prune(store, cfg, mark=mark)
        with store.session() as s:
            assert deleted == 50
            assert (
                s.scalar(
                    select(func.count()).select_from(TickLogRow).where(TickLogRow.run_id == runs[0])
                )
                == 100
            )
    finally:
        store.dispose()


def test_migration_0008_upgrades_a_store_holding_data(empty_db_url: str, tmp_path: Path) -> None:
    engine = make_engine(empty_db_url)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0007")
    now = utcnow()
    meta = MetaData()
    meta.reflect(engine, only=["runs", "jobs", "payments"])
    runs, jobs, payments = (meta.tables[n] for n in ("runs", "jobs", "payments"))
    with engine.begin() as c:
        for n, status in enumerate(["running", "completed", "completed", "failed"]):
            c.execute(
                insert(runs).values(
                    id=f"r{n}",
                    user_id="u",
                    goal="g",
                    status=status,
                    budget_total=9,
                    budget_remaining=9,
                    job_spec={},
                    progress=0.0,
                    troubles=0,
                    log_lines=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            c.execute(
                insert(jobs).values(
                    id=f"j{n}",
                    run_id=f"r{n}",
                    vendor_id="v",
                    status="completed",
                    expected_cost=3,
                    job_params={},
                    idempotency_key=f"k{n}",
                    progress=0.0,
                    log_cursor=0,
                    start_progress=0.0,
                    checkpoint_progress=0.0,
                    created_at=now,
                    updated_at=now,
                )
            )
            c.execute(
                insert(payments).values(
                    id=f"p{n}",
                    run_id=f"r{n}",
                    job_id=f"j{n}",
                    vendor_id="v",
                    amount=1_000 * (n + 1),
                    currency="USDC",
                    status="completed" if n else "pending",
                    nonce=f"n{n}",
                    created_at=now,
                    updated_at=now,
                )
            )
    migrate(engine)
    indexes = {
        ix["name"]
        for t in ("runs", "observations", "payments", "tick_log")
        for ix in inspect(engine).get_indexes(t)
    }
    assert {"ix_runs_created", "ix_observations_run_id_id", "ix_tick_log_finished"} <= indexes
    store = open_store(empty_db_url)
    try:
        with store.session() as s:
            assert totals.runs_by_status(s) == {"running": 1, "completed": 2, "failed": 1}
            assert totals.paid_micros(s) == 2_000 + 3_000 + 4_000
            repo.update_run(s, "r0", status="aborted")
        with store.session() as s:
            assert repo.count_runs_by_status(s) == {"aborted": 1, "completed": 2, "failed": 1}
    finally:
        store.dispose()
        engine.dispose()
