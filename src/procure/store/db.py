"""Opening the store: the engine, its sessions, and migrating the schema to the latest revision."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest revision in migrations/versions (tests/test_store_migrations.py checks it is
# Alembic's head): a store already there opens without loading Alembic (0.2 s a CLI command).
HEAD = "0021"


@dataclass(frozen=True)
class Store:
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the API) run beside the single writer; busy_timeout waits out locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, *, pre_ping: bool = True) -> Engine:
    """`pre_ping` tests each pooled connection before use (one round trip per transaction):
    the API keeps it; a worker turns it off, since a tick that meets a dropped connection
    fails, the pool is invalidated and the run is ticked again after a back-off."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=pre_ping,
        connect_args=postgres_connect_args(url),
    )


CONNECT_TIMEOUT_S = 10
"""How long a PostgreSQL connection may take: libpq waits for ever by default on a server that
accepts and never answers (a frozen host, a half-open proxy), and the process hung silently."""


def postgres_connect_args(url: str) -> dict[str, int]:
    """libpq's connect timeout and TCP keepalives (a connection whose peer vanished is found
    dead in about a minute, not the kernel's two hours), where the URL does not set them."""
    from sqlalchemy.engine import make_url

    given = make_url(url).query
    wanted = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    return {k: v for k, v in wanted.items() if k not in given}


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def revision(engine: Engine) -> str | None:
    """The store's schema revision (None: never migrated, or several branches' heads)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        versions = list(rows)
        return versions[0] if len(versions) == 1 else None


MIGRATION_LOCK = 0x70726F63  # PostgreSQL advisory lock key of procure's migrations ("proc")


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision (idempotent). Processes that start
    together on a new store (`serve` and two workers) migrate one after the other: they raced,
    and all but one died on a table another had just made."""
    if revision(engine) == HEAD:
        return
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with _sqlite_migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held to the commit; the next one then finds the schema done and does nothing.
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock on a file beside a SQLite store while it migrates (SQLite's DDL is not
    transactional under Python's sqlite3, so its own lock cannot order two migrations)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrating", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(url: str, *, upgrade: bool = True, pre_ping: bool = True) -> Store:
    engine = make_engine(url, pre_ping=pre_ping)
    if upgrade:
        migrate(engine)
    return Store(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
