"""Shared fixtures: a store on SQLite and (when available) PostgreSQL, and the local world."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from patient_http import make_one_off_requests_patient
from shared_tls import share_default_tls_context
from stores import POSTGRES_ENV, migrated_sqlite, postgres_database
from world import World, start_world

share_default_tls_context()
make_one_off_requests_patient()

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

# The fleet's audit log (and, under `procure serve` alone, the budget warnings' entries) goes to
# the working directory by default: in tests, to a folder of their own, never into the checkout.
os.environ.setdefault(
    "LAMBDA_LABS_AUDIT_LOG",
    str(Path(tempfile.mkdtemp(prefix="procure-test-audit-")) / "fleet-audit.jsonl"),
)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated store's URL per test, on each backend. PostgreSQL must run under
    CI=true."""
    yield from _store_url(request.param, tmp_path, migrated=True)


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no schema at all, on each backend (for the migrations' tests)."""
    yield from _store_url(request.param, tmp_path, migrated=False)


def _store_url(backend: str, tmp_path: Path, *, migrated: bool) -> Iterator[str]:
    if backend == "sqlite":
        path = tmp_path / "procure.db"
        yield migrated_sqlite(path) if migrated else f"sqlite:///{path}"
        return
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    with postgres_database(migrated=migrated) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite store's URL."""
    return migrated_sqlite(tmp_path / "procure.db")


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """Facilitator, the seeds' two mock vendors (vendor 1 fails at 47%), and a seeded store."""
    w = start_world(
        tmp_path, db_url, vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0, "fail_at": 0.47}}
    )
    yield w
    w.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests allowed minutes (a `timeout` mark of 120 s or more) run first, so that none of them
    starts last and runs alone while the other processes have nothing left to do."""

    def allowed_s(item: pytest.Item) -> float:
        mark = item.get_closest_marker("timeout")
        if mark is None:
            return 0.0
        allowed = mark.kwargs.get("timeout", mark.args[0] if mark.args else None)
        return float(allowed or 0.0)

    items.sort(key=lambda item: allowed_s(item) < 120)
