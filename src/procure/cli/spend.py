"""`procure spend`: the total spent across every run and the fleet."""

from __future__ import annotations

from typing import Annotated

import typer

from procure.cli.common import console, load_settings, print_json, store_errors, store_for


def spend(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, in dollars")] = False,
) -> None:
    """The total spent across every run and the fleet: paid, pending, the fleet's
    instance-hours, and the last hour, day and 30 days (as the global caps count them)."""
    from procure.models import format_dollars, utcnow
    from procure.store.spend import spend_summary

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        summary = spend_summary(s, utcnow())
    if as_json:
        print_json(summary)
        return
    w, usd = summary["windows"], format_dollars  # rounded as every page rounds micro-USD
    console.print(
        f"total {usd(summary['total'])} over {summary['runs']} run(s): "
        f"paid {usd(summary['paid'])}, pending {usd(summary['pending'])}, "
        f"fleet {usd(summary['fleet'])}\n"
        f"last hour {usd(w['hour'])}, day {usd(w['day'])}, 30 days {usd(w['month'])}",
        highlight=False,
    )
