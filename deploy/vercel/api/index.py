"""Vercel's entry: procure's agent API as a serverless ASGI app (procure.api.serverless) over
PostgreSQL; the keys come from the environment, since a function has no home to keep them in."""

from __future__ import annotations

import os

from procure.api.serverless import create_serverless_app, serverless_store
from procure.settings import Settings

_missing = [
    name
    for name in ("PROCURE_DATABASE_URL", "X402_PRIVATE_KEY", "PROCURE_SECRET_KEY")
    if not os.environ.get(name)
]
if _missing:
    raise RuntimeError(f"set {', '.join(_missing)} in the project's environment variables")

settings = Settings()
# Migrations run once per deploy from a machine (see README.md), not on every cold start.
app = create_serverless_app(settings, serverless_store(settings.database_url))
