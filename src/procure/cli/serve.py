"""`procure serve` and `procure worker`: the long-running services over the store."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from procure.cli.common import (
    PORT,
    cloud_settings,
    console,
    fail,
    key_errors,
    level_named,
    listen_on,
    load_settings,
    settings_errors,
    store_errors,
    store_for,
)
from procure.numbers import number, whole
from procure.safetext import guard_logging

CONCURRENCY = whole(1, 1000, "--concurrency")
POLL = number(0, 3600, "--poll-interval")


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
    from procure.vendors.credentials import Keyring

    settings = load_settings()
    # one line per run event (procure.agent.runlog) beside uvicorn's own; migrations stay quiet
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    guard_logging()
    quiet_x402("INFO")
    cfg = WorkerConfig(concurrency=concurrency, poll_interval_s=poll_interval) if worker else None
    fleet_run = _fleet_run() if fleet else None
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_token is None:
        typer.echo(
            f"warning: serving on {host} without PROCURE_API_TOKEN: anyone who can reach it can "
            "start runs, cancel them and change vendors",
            err=True,
        )
    # The port first: the app's start runs the worker, which pays vendors; a server that cannot
    # listen must not have paid anyone before it says so.
    listening = listen_on(host, port)
    with settings_errors(), store_errors(settings):  # the dashboard's and fleet's settings too
        app_ = create_app(settings, store_for(settings), worker=cfg, fleet=fleet_run)
    with key_errors():  # read by the app's start (the worker, vendors' credentials): said here
        Keyring.load(settings.home)
    # uvicorn says where it runs only when it binds the socket itself, and here it does not
    shown = f"[{host}]" if ":" in host else host
    console.print(f"API and dashboard on http://{shown}:{port}/ (Ctrl+C to stop)", soft_wrap=True)
    console.file.flush()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C ends it cleanly, as uvicorn.run does
        uvicorn.Server(uvicorn.Config(app_, host=host, port=port)).run(sockets=[listening])


def quiet_x402(level: str) -> None:
    """The x402 SDK logs a line per payment signed at INFO: noise, the run's log says it."""
    import logging

    wanted = logging.getLevelNamesMapping()[level]
    logging.getLogger("x402").setLevel(max(logging.WARNING, wanted))


def _fleet_run() -> Any:
    """The in-server fleet controller's configuration, from the environment."""
    from procure.cli.fleet import _fleet_settings
    from procure.fleet.inprocess import FleetRun
    from procure.store.ledger import load_caps

    with settings_errors():
        caps = load_caps()
    return FleetRun(cfg=_fleet_settings(), cloud=cloud_settings(), caps=caps)


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
        typer.Option(
            help="Exit after this many ticks (default: run until stopped)",
            parser=whole(1, 10**9, "--max-ticks"),
        ),
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
    import asyncio
    import logging
    import signal

    level = level_named(log_level)  # a mistyped level is said before the imports (seconds)
    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.worker import Worker, WorkerConfig, WorkerLockHeld, sqlite_worker_lock

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    guard_logging(log_level)
    quiet_x402(level)
    from procure.store import open_store

    settings = load_settings()
    with store_errors(settings):
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
        with key_errors():  # the deployment's key, read here
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
        with store_errors(settings), sqlite_worker_lock(store):
            stats = asyncio.run(go())
    except WorkerLockHeld as exc:
        fail(str(exc))
    finally:
        store.dispose()
    console.print(
        f"worker {cfg.owner}: {stats.ticks} ticks, {stats.errors} errors, "
        f"{stats.lost_leases} leases lost",
        highlight=False,
    )
