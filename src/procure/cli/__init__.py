"""The `procure` command (the pyproject script `procure.cli:app`): one module per command group,
assembled in `procure.cli.main`."""

from procure.cli.main import app

__all__ = ["app"]
