"""`python -m procure.cli`: the `procure` command without its installed script."""

from procure.cli.main import app

app()
