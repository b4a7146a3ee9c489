"""The `procure` command: thin Typer commands over the agent, the store and the local services."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

import typer

from procure.cli_cloud import mock_cloud
from procure.cli_common import (
    cloud_settings,
    console,
    fail,
    load_settings,
    print_json,
    settings_errors,
    store_for,
    table,
)
from procure.cli_fleet import fleet_app
from procure.cli_gpu import gpu_worker, tickets_app
from procure.cli_offers import add_cloud, gateway_app, offers
from procure.cli_runs import run_app
from procure.numbers import number, whole
from procure.safetext import guard_logging, safe
from procure.settings import Settings

PORT = whole(1, 65535, "--port")
CONCURRENCY = whole(1, 1000, "--concurrency")
POLL = number(0, 3600, "--poll-interval")

app = typer.Typer(
    help="procure: an autonomous agent that rents GPU compute for a goal within a hard budget, "
    "paying vendors over x402. Configuration comes from the environment or .env "
    "(see .env.example).",
    no_args_is_help=True,
    add_completion=False,
)
vendors_app = typer.Typer(help="The vendor registry.", no_args_is_help=True)
app.add_typer(vendors_app, name="vendors")


@app.command()
def demo(
    story: Annotated[
        str,
        typer.Argument(
            help="recovery (the seeds' story: an x402 vendor fails, another finishes) or clouds "
            "(three mock clouds: a spot instance preempted, the job resumed on another cloud)"
        ),
    ] = "recovery",
    as_json: Annotated[
        bool, typer.Option("--json", help="clouds: one JSON object at the end, not the trace")
    ] = False,
    job_seconds: Annotated[
        float,
        typer.Option(
            help="Real seconds a mock job takes", parser=number(0.01, 3600, "--job-seconds")
        ),
    ] = 2.0,
    budget: Annotated[
        float, typer.Option(help="Run budget in US dollars", parser=number(1e-6, 1e6, "--budget"))
    ] = 5.0,
    serve_: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Afterwards keep the demo's services up and serve the dashboard until Ctrl+C",
        ),
    ] = False,
    port: Annotated[
        int, typer.Option(help="The dashboard's port, with --serve", parser=PORT)
    ] = 3000,
) -> None:
    """Run a story end to end. `procure demo` (recovery): vendor 1 fails part-way, the agent pays
    vendor 2; with --serve, then open the dashboard on the printed URL to see it (and start more
    runs). `procure demo clouds`: the agent on mock Lambda, RunPod and Vast.ai clouds and one
    x402 vendor takes the cheapest interruptible offer, loses it part-way, and resumes from the
    checkpoint on another cloud; --json prints the summary as one object."""
    from procure.demo import run_demo
    from procure.models import RunStatus

    if story == "clouds":
        import io

        from rich.console import Console

        from procure.demos.clouds import run_cloud_demo

        quiet = Console(file=io.StringIO()) if as_json else console
        summary = run_cloud_demo(console=quiet, budget=budget)
        if as_json:
            print_json(summary)
        if summary["status"] != "completed" or summary["instances_left_running"]:
            raise typer.Exit(1)
        return
    if story != "recovery":
        fail(f"unknown story {safe(story)}: recovery or clouds", code=2)
    then = None
    if serve_:
        from procure.demo_serve import serve_until_interrupted
        from procure.local import port_is_free

        if not port_is_free(port):  # before the demo runs: say it in one line, not later
            fail(f"port {port} is busy; choose another with --port")
        then = functools.partial(serve_until_interrupted, port=port, console=console)
    state = run_demo(job_seconds=job_seconds, budget=budget, console=console, then=then)
    if state.run.status != RunStatus.completed:
        console.print(
            f"[bold red]run ended {safe(state.run.status)}: {safe(state.run.status_reason)}"
        )
        raise typer.Exit(1)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port to listen on", parser=PORT)] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    worker: Annotated[
        bool, typer.Option(help="Run a worker in the server, so runs advance by themselves")
    ] = True,
    concurrency: Annotated[
        int, typer.Option(help="The worker's ticks in flight", parser=CONCURRENCY)
    ] = 16,
    poll_interval: Annotated[
        float,
        typer.Option(help="Seconds before a run is due again after a tick", parser=POLL),
    ] = 1.0,
    fleet: Annotated[
        bool,
        typer.Option(
            help="Also run the fleet controller in the server (dry run unless "
            "LAMBDA_LABS_DRY_RUN=false; servers sharing a PostgreSQL share one fleet lease)"
        ),
    ] = False,
) -> None:
    """Serve the API (agent endpoints, vendors, /metrics, /healthz) and, unless --no-worker, a
    worker that ticks due runs; with --fleet, the fleet controller too."""
    import logging

    import uvicorn

    from procure.agent.worker import WorkerConfig
    from procure.api.app import create_app

    settings = load_settings()
    # one line per run event (procure.agent.runlog) beside uvicorn's own; migrations stay quiet
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    guard_logging()
    cfg = WorkerConfig(concurrency=concurrency, poll_interval_s=poll_interval) if worker else None
    fleet_run = _fleet_run() if fleet else None
    with settings_errors():  # the dashboard's and the fleet's settings are read here
        app_ = create_app(settings, store_for(settings), worker=cfg, fleet=fleet_run)
    uvicorn.run(app_, host=host, port=port)


def _fleet_run() -> Any:
    """The in-server fleet controller's configuration, from the environment."""
    from procure.cli_fleet import _fleet_settings
    from procure.fleet.inprocess import FleetRun
    from procure.store.ledger import load_caps

    with settings_errors():
        caps = load_caps()
    return FleetRun(cfg=_fleet_settings(), cloud=cloud_settings(), caps=caps)


@app.command("worker")
def worker_command(
    concurrency: Annotated[
        int, typer.Option(help="Ticks in flight at most", parser=CONCURRENCY)
    ] = 16,
    poll_interval: Annotated[
        float,
        typer.Option(help="Seconds before a run is due again after a tick", parser=POLL),
    ] = 1.0,
    lease: Annotated[
        float,
        typer.Option(help="Lease TTL in seconds (renewed)", parser=number(1, 86400, "--lease")),
    ] = 60.0,
    once: Annotated[bool, typer.Option(help="Tick one batch of due runs and exit")] = False,
    max_ticks: Annotated[
        int | None,
        typer.Option(help="Exit after this many ticks", parser=whole(1, 10**9, "--max-ticks")),
    ] = None,
    drain_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to let ticks in flight finish on SIGTERM/SIGINT",
            parser=number(0, 3600, "--drain-timeout"),
        ),
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="Logging level")] = "INFO",
) -> None:
    """Lease due runs and tick them until stopped (SIGTERM/SIGINT: finish the ticks in flight,
    release the leases, exit; a second signal cancels them). Several workers may share a
    PostgreSQL store; one per SQLite file."""
    import logging
    import signal

    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.worker import Worker, WorkerConfig, WorkerLockHeld, sqlite_worker_lock

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    guard_logging(log_level)
    from procure.store import open_store

    settings = load_settings()
    store = open_store(settings.database_url, pre_ping=False)
    cfg = WorkerConfig(
        concurrency=concurrency,
        poll_interval_s=poll_interval,
        lease_s=lease,
        heartbeat_s=lease / 4,
        once=once,
        max_ticks=max_ticks,
        drain_timeout_s=drain_timeout,
    )

    async def go() -> Any:
        deps = make_deps(settings, store)
        worker = Worker(deps, cfg)
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            (worker.stop if signals == 1 else worker.abort)()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await worker.run()
        finally:
            await close_deps(deps)

    try:
        with sqlite_worker_lock(store):
            stats = asyncio.run(go())
    except WorkerLockHeld as exc:
        console.print(f"[red]{safe(exc)}")
        raise typer.Exit(1) from None
    finally:
        store.dispose()
    console.print(
        f"worker {cfg.owner}: {stats.ticks} ticks, {stats.errors} errors, "
        f"{stats.lost_leases} leases lost",
        highlight=False,
    )


@app.command()
def facilitator(
    port: Annotated[int, typer.Option(help="Port to listen on", parser=PORT)] = 4020,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
) -> None:
    """Run the local x402 facilitator (verify + settle on a local chain kept under PROCURE_HOME).

    At its first start it funds the agent's wallet (X402_PRIVATE_KEY, or the key kept under
    PROCURE_HOME, made if there is none) with PROCURE_WALLET_FUNDING test dollars; the chain's
    journal remembers, so a restart does not fund it again."""
    import uvicorn

    from procure.models import format_usd, usd_to_micros
    from procure.payments.facilitator import create_facilitator_app, fund_wallet_once, open_chain

    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    chain = open_chain(settings.home)
    console.print(f"chain {chain.network}, token {chain.token_address}")
    address = _wallet(settings).address
    funding = usd_to_micros(settings.wallet_funding_usd)
    if fund_wallet_once(chain, address, funding):
        console.print(f"funded the agent's wallet {address} with {format_usd(funding)}")
    console.print(f"agent wallet {address}: {format_usd(chain.balance_of(address))}")
    uvicorn.run(create_facilitator_app(chain), host=host, port=port)


def _wallet(settings: Settings):  # type: ignore[no-untyped-def]
    from procure.payments.wallet import load_or_create_account

    key = settings.x402_private_key.get_secret_value() if settings.x402_private_key else None
    return load_or_create_account(key, settings.home)


@app.command()
def wallet(
    fund: Annotated[
        float | None,
        typer.Option(
            help="Ask the local facilitator's faucet for this many test dollars",
            parser=number(0, 1e6, "--fund"),
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The agent's wallet: its address and on-chain balance, from the facilitator (never its
    key). --fund AMOUNT mints test dollars to it first (local facilitator only)."""
    import httpx

    from procure.bounds import UnsafeInput, loads

    settings = load_settings()
    address = _wallet(settings).address
    url = settings.facilitator_url
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            if fund:
                minted = http.post("/faucet", json={"address": address, "amount": fund})
                minted.raise_for_status()
            answer = http.get(f"/balance/{address}")
            answer.raise_for_status()
            balance = loads(answer.content)
            float(balance["balance"])
    except (httpx.HTTPError, UnsafeInput, KeyError, TypeError, ValueError) as exc:
        console.print(
            f"[red]the facilitator at {url} did not answer ({type(exc).__name__}: {exc}); "
            "start it with `procure facilitator` or set X402_FACILITATOR_URL"
        )
        raise typer.Exit(1) from None
    if as_json:
        print_json({"address": address, "balance": balance["balance"], "facilitator": url})
        return
    if fund:
        console.print(f"funded with ${fund:,.2f}")
    console.print(f"address  {address}\nbalance  ${balance['balance']:,.2f}\nfacilitator {url}")


@app.command("mock-vendor")
def mock_vendor(
    vendor_id: Annotated[str, typer.Option(help="gpu_vendor_1 or gpu_vendor_2 (or any seeded id)")],
    port: Annotated[int, typer.Option(help="Port to listen on", parser=PORT)] = 4001,
    job_seconds: Annotated[
        float | None,
        typer.Option(help="Real seconds per job", parser=number(0.01, 86400, "--job-seconds")),
    ] = None,
) -> None:
    """Run a mock GPU vendor. Honours GPU_VENDOR_SECRET, FAIL_VENDOR_ID, FAIL_RATE, FAIL_AT."""
    import uvicorn

    from procure.local import facilitator_client, mock_fail_rate, mock_vendor_config
    from procure.vendors.mock import create_mock_vendor_app
    from procure.vendors.registry import default_vendors

    settings = load_settings()
    known = {v.vendor_id: v for v in default_vendors()}
    if vendor_id not in known:
        raise typer.BadParameter(f"unknown vendor {vendor_id}; known: {', '.join(known)}")
    cfg = mock_vendor_config(
        known[vendor_id],
        settings.facilitator_url,
        settings.gpu_vendor_secret.get_secret_value(),
        job_seconds=job_seconds or settings.mock_job_seconds,
        fail_rate=mock_fail_rate(settings, vendor_id),
        fail_at=settings.fail_at,
    )
    facilitator = facilitator_client(settings.facilitator_url)
    uvicorn.run(create_mock_vendor_app(cfg, facilitator), host="127.0.0.1", port=port)


@vendors_app.command("seed")
def vendors_seed(
    host: Annotated[
        str, typer.Option(help="Where the mock vendors listen: a host name or http(s)://host")
    ] = "http://localhost",
    port: Annotated[
        list[int] | None,
        typer.Option(
            help="The mock vendors' ports: give it twice (vendor 1, vendor 2); given once, "
            "vendor 2 gets the next port [default: 4001, 4002]",
            parser=PORT,
        ),
    ] = None,
) -> None:
    """Insert the seeds' two vendors (gpu_vendor_1 on :4001, gpu_vendor_2 on :4002), with
    GPU_VENDOR_SECRET as their credential (stored encrypted; see PROCURE_SECRET_KEY). The
    network and asset they are paid in come from the facilitator at X402_FACILITATOR_URL."""
    from procure.local import asset_info
    from procure.store import repo
    from procure.vendors.credentials import Keyring
    from procure.vendors.registry import default_vendors

    base, ports = seed_endpoints(host, port or [])
    settings = load_settings()
    try:
        info = asset_info(settings.facilitator_url, tries=10)
    except RuntimeError as exc:
        fail(f"{exc}; start it with `procure facilitator` or set X402_FACILITATOR_URL")
    credential = Keyring.load(settings.home).encrypt(settings.gpu_vendor_secret.get_secret_value())
    with store_for(settings).session() as s:
        for vendor in default_vendors(
            host=base,
            ports=ports,
            network=str(info["network"]),
            asset=str(info["asset"]),
            credential=credential,
        ):
            repo.save_vendor(s, vendor)
            console.print(
                f"seeded {safe(vendor.vendor_id)} ({safe(vendor.name)}) at {safe(vendor.endpoint)}"
            )


@vendors_app.command("clear-cooldown")
def vendors_clear_cooldown(
    vendor_id: Annotated[str, typer.Argument(help="The vendor to pick again now")],
) -> None:
    """End a vendor's cooldown now (after a failure, planners keep off it for
    VENDOR_COOLDOWN_S): for when you know it is fixed."""
    from procure.cli_common import store_errors
    from procure.store import repo

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        vendor = repo.clear_cooldown(s, vendor_id)
    if vendor is None:
        fail(f"vendor {vendor_id} not found")
    console.print(f"{safe(vendor_id)}: cooldown cleared; planners may pick it again")


def seed_endpoints(host: str, ports: list[int]) -> tuple[str, tuple[int, int]]:
    """`--host` and `--port` as the base URL and the two vendors' ports, or one line saying
    what is wrong (a port inside --host would make `http://host:4001:4001`)."""
    from urllib.parse import urlsplit

    base = host if "://" in host else f"http://{host}"
    try:
        parts = urlsplit(base)
        given_port = parts.port
    except ValueError:
        fail(f"--host {host!r} is not a host name or an http(s) URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"--host {host!r} is not a host name or an http(s) URL")
    if given_port is not None:
        fail(f"--host {host!r} has a port: give the host alone and the ports with --port")
    if parts.path.strip("/") or parts.query or parts.fragment:
        fail(f"--host {host!r} has a path: give the scheme and host alone")
    if len(ports) > 2:
        fail("--port is given at most twice (vendor 1, vendor 2)")
    first = ports[0] if ports else 4001
    second = ports[1] if len(ports) == 2 else first + 1
    if second > 65535 or second == first:
        fail("--port: the two vendors need two different ports")
    return f"{parts.scheme}://{parts.netloc}", (first, second)


@vendors_app.command("list")
def vendors_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the registry with what procure learned of each vendor: its reliability and its
    failure hazard (failures per GPU-hour)."""
    from procure.agent.context import hazard, reliability
    from procure.store import repo

    with store_for(load_settings()).session() as s:
        vendors = repo.list_vendors(s)
    if as_json:
        print_json(
            [
                {**v.to_json(), "learnedReliability": reliability(v), "hazardPerHour": hazard(v)}
                for v in vendors
            ]
        )
        return
    out = table(  # 80 columns: the prior, ok and failed counts are in --json
        "vendor",
        "name",
        "endpoint",
        "$/h",
        "learned",
        "fail/h",
        "ok/fail",
        "GPUs",
        "cred",
        fold=("name", "endpoint", "GPUs"),
    )
    for v in vendors:
        out.add_row(  # names and endpoints came from outside: no markup, no escapes
            safe(v.vendor_id, 100),
            safe(v.name, 100),
            safe(v.endpoint, 200),
            f"{v.base_price_per_hour / 1e6:.2f}",
            f"{reliability(v):.3f}",
            f"{hazard(v):.3f}",
            f"{v.successes}/{v.failures}",
            safe(",".join(v.supported_gpu_types), 200),
            "yes" if v.has_credential else "none",
        )
    console.print(out)


@app.command()
def spend(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The total spent across every run and the fleet: paid, pending, the fleet's
    instance-hours, and the last hour, day and 30 days (as the global caps count them)."""
    from procure.cli_common import store_errors
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


app.add_typer(run_app, name="run")
app.add_typer(tickets_app, name="tickets")
app.command("gpu-worker")(gpu_worker)
app.command("mock-cloud")(mock_cloud)
app.command("offers")(offers)
app.add_typer(gateway_app, name="gateway")
vendors_app.command("add-cloud")(add_cloud)
app.add_typer(fleet_app, name="fleet")

if __name__ == "__main__":
    app()
