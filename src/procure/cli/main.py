"""The root `procure` command: it only assembles the command groups' modules, in help order."""

from __future__ import annotations

import typer

from procure.cli.cloud import mock_cloud
from procure.cli.demo import demo
from procure.cli.fleet import fleet_app
from procure.cli.gpu import gpu_worker, tickets_app
from procure.cli.offers import add_cloud, gateway_app, offers
from procure.cli.runs import run_app
from procure.cli.serve import serve, worker_command
from procure.cli.spend import spend
from procure.cli.vendors import mock_vendor, vendors_app
from procure.cli.wallet import facilitator, wallet

app = typer.Typer(
    help="procure: an autonomous agent that rents GPU compute for a goal within a hard budget, "
    "paying vendors over x402. Configuration comes from the environment or .env "
    "(see .env.example).",
    no_args_is_help=True,
    add_completion=False,
)
# `--help` lists commands in the order they are added here, then the groups in theirs
app.add_typer(vendors_app, name="vendors")
app.command("demo")(demo)
app.command("serve")(serve)
app.command("worker")(worker_command)
app.command("facilitator")(facilitator)
app.command("wallet")(wallet)
app.command("mock-vendor")(mock_vendor)
app.command("spend")(spend)
app.add_typer(run_app, name="run")
app.add_typer(tickets_app, name="tickets")
app.command("gpu-worker")(gpu_worker)
app.command("mock-cloud")(mock_cloud)
app.command("offers")(offers)
app.add_typer(gateway_app, name="gateway")
vendors_app.command("add-cloud")(add_cloud)
app.add_typer(fleet_app, name="fleet")
