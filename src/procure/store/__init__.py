"""Persistence: SQLite by default, PostgreSQL for production; SQLAlchemy 2 + Alembic."""

from procure.store.db import Store, open_store

__all__ = ["Store", "open_store"]
