"""Fresh stores for tests, already migrated: each test's database is a copy of one migrated once
per process (a SQLite file copied, a PostgreSQL database created from a template), instead of
running every migration again for each test."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from procure.store import open_store
from procure.store.db import MIGRATIONS

POSTGRES_ENV = "PROCURE_TEST_POSTGRES_URL"
_LOCK_KEY = 4_242_020  # the advisory lock under which one process builds the template
_made: dict[str, str] = {}


def migrations_key() -> str:
    """Changes whenever a migration does, so a template built by older code is never used."""
    digest = hashlib.sha256()
    for path in sorted(MIGRATIONS.rglob("*.py")):
        digest.update(path.relative_to(MIGRATIONS).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def sqlite_template() -> Path:
    """A migrated, empty SQLite file for this process (removed at exit)."""
    if "sqlite" not in _made:
        folder = Path(tempfile.mkdtemp(prefix="procure-template-"))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / "template.db"
        open_store(f"sqlite:///{path}").dispose()  # disposing checkpoints the WAL into the file
        _made["sqlite"] = str(path)
    return Path(_made["sqlite"])


def migrated_sqlite(path: Path) -> str:
    """`path` as a migrated, empty store; its URL."""
    shutil.copyfile(sqlite_template(), path)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(*_new_install_id())
    return f"sqlite:///{path}"


def _new_install_id() -> tuple[str, dict[str, str]]:
    """The statement giving a copy of the template an install id of its own, as migration 0011
    makes one per store: copies sharing one would take each other's cloud instances for their
    own."""
    return (
        "UPDATE procure_meta SET value = :v WHERE key = 'install_id'",
        {"v": secrets.token_hex(4)},
    )


def migrated_if_new(url: str) -> str:
    """`url`, where it names a SQLite file not made yet, made a copy of the migrated template
    (what opening it would migrate to, without running every migration again); any other
    store's URL unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url and "?" not in url:
        path = Path(url.removeprefix(prefix))
        if not path.exists():
            return migrated_sqlite(path)
    return url


def _postgres_template(admin: Engine) -> str:
    """The migrated template database for the current migrations, built once by whichever test
    process gets there first (under an advisory lock; built under another name and renamed,
    so a process killed half-way leaves no half-migrated template)."""
    name = f"procure_template_{migrations_key()}"
    if _made.get("postgres") == name:
        return name
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
        try:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if found is None:
                building = f"{name}_building"
                conn.execute(text(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{building}"'))
                url = admin.url.set(database=building).render_as_string(hide_password=False)
                open_store(url).dispose()
                conn.execute(text(f'ALTER DATABASE "{building}" RENAME TO "{name}"'))
        finally:
            # A connection that died has released its lock already (and raised what matters).
            with contextlib.suppress(DBAPIError):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
    _made["postgres"] = name
    return name


@contextmanager
def postgres_database(*, migrated: bool = True) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (migrated unless `migrated=False`: empty);
    dropped afterwards."""
    admin_url = os.environ[POSTGRES_ENV]
    name = f"procure_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        template = f' TEMPLATE "{_postgres_template(admin)}"' if migrated else ""
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{template}'))
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        try:
            if migrated:
                own = create_engine(url)
                try:
                    with own.begin() as conn:
                        statement, values = _new_install_id()
                        conn.execute(text(statement), values)
                finally:
                    own.dispose()
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
