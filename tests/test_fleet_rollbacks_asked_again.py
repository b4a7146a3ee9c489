"""People's decisions on fleet actions: rollback asked twice,
from far back in the history or by two callers at once, must add one termination only."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func, select

from procure.fleet import actions
from procure.store import Store, fleet_repo, open_store
from procure.store.fleet_tables import ActionRow

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEADLINE_S = 60.0


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.engine.dispose()


def _executed_provision(store: Store, action_id: str = "provision_1_abc") -> str:
    with store.session() as s:
        fleet_repo.add_action(
            s,
            action_id=action_id,
            action_type="provision",
            target_instance=None,
            reason="load",
            cost_impact=Decimal("1.10"),
            status="executed",
            created_at=T0,
            executed_at=T0,
            dry_run=False,
            instance_type="gpu_1x_a10",
            region="us-east-1",
            price_per_hour=1_100_000,
            rollback_data={"terminate_instance_ids": ["i-launched"]},
        )
    return action_id


def _rollbacks_of(store: Store, action_id: str) -> int:
    with store.session() as s:
        query = select(func.count()).where(ActionRow.rollback_of == action_id)
        return int(s.scalar(query) or 0)


def test_rollback_asked_again_after_a_thousand_newer_actions_adds_no_second_termination(
    store: Store,
) -> None:
    """Before the fix: the earlier rollback was looked for among the newest 1,000 actions only,
    so asking again once the fleet had recorded 1,000 more actions recorded a second approved
    termination of the same instance (and the controller sent it again)."""
    original = _executed_provision(store)
    first = actions.rollback(store, original, "alice", T0 + timedelta(minutes=1))
    with store.session() as s:
        for n in range(1001):
            fleet_repo.add_action(
                s,
                action_id=f"noop_{n}",
                action_type="provision",
                reason="newer",
                status="blocked",
                created_at=T0 + timedelta(minutes=2, seconds=n),
            )
    again = actions.rollback(store, original, "bob", T0 + timedelta(hours=2))
    assert again.action_id == first.action_id
    assert _rollbacks_of(store, original) == 1


def _is_write(statement: str) -> bool:
    text = statement.lstrip().upper()
    return (
        text.startswith(("UPDATE", "INSERT", "DELETE"))
        or "FOR UPDATE" in text
        or ("ADVISORY" in text)
    )


def test_two_rollbacks_at_once_add_one_termination(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: on SQLite the check for an earlier rollback and the insert of the new one
    were not one serialized transaction, so two operators rolling back at once (two browsers, a
    CLI and the API) both found none and both recorded an approved termination."""
    original = _executed_provision(store)
    # The second caller runs while the first sits between its check and its insert; the first
    # goes on once the second has finished or is waiting on a lock the first holds.
    second: dict[str, Any] = {}
    second_done = threading.Event()
    # Set once the second caller has finished, or has sent a statement that may wait on the
    # first's lock (a write, or a read for update): the first must not wait for it longer.
    second_went_on = threading.Event()
    b_ident: list[int] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if b_ident and threading.get_ident() == b_ident[0] and _is_write(statement):
            second_went_on.set()

    def run_second() -> None:
        b_ident.append(threading.get_ident())
        try:
            second["row"] = actions.rollback(store, original, "bob", T0 + timedelta(minutes=1))
        except Exception as exc:  # reported by the assertions below
            second["error"] = exc
        finally:
            second_done.set()
            second_went_on.set()

    real_get_instance = fleet_repo.get_instance
    entered = threading.Lock()

    def get_instance(s: Any, instance_id: str) -> Any:
        if entered.acquire(blocking=False):  # the first caller only
            worker = threading.Thread(target=run_second, daemon=True)
            worker.start()
            assert second_went_on.wait(DEADLINE_S)
        return real_get_instance(s, instance_id)

    monkeypatch.setattr(fleet_repo, "get_instance", get_instance)
    first = actions.rollback(store, original, "alice", T0 + timedelta(minutes=1))
    assert second_done.wait(DEADLINE_S)
    assert "error" not in second, second.get("error")
    assert second["row"].action_id == first.action_id
    assert _rollbacks_of(store, original) == 1
