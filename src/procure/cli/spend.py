"""`procure spend`: the total spent across every run and the fleet."""

from __future__ import annotations

from typing import Annotated

import typer

from procure.cli.common import console, load_settings, print_json, store_errors, store_for


def spend(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The total spent across every run and the fleet: paid, pending, the fleet's
    instance-hours, and the last hour, day and 30 days (as the global caps count them)."""
    from procure.models import utcnow
    from procure.store.spend import spend_summary

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        summary = spend_summary(s, utcnow())
    if as_json:
        print_json(summary)
        return
    w = summary["windows"]
    console.print(
        f"total ${summary['total']:,.2f} over {summary['runs']} run(s): "
        f"paid ${summary['paid']:,.2f}, pending ${summary['pending']:,.2f}, "
        f"fleet ${summary['fleet']:,.2f}\n"
        f"last hour ${w['hour']:,.2f}, day ${w['day']:,.2f}, 30 days ${w['month']:,.2f}",
        highlight=False,
    )
