"""The `procure` command: thin Typer commands over the agent, the store and the local services."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from procure.settings import Settings, get_settings

app = typer.Typer(
    help="procure: an autonomous agent that rents GPU compute for a goal within a hard budget, "
    "paying vendors over x402. Configuration comes from the environment or .env "
    "(see .env.example).",
    no_args_is_help=True,
    add_completion=False,
)
vendors_app = typer.Typer(help="The vendor registry.", no_args_is_help=True)
run_app = typer.Typer(
    help="Start, tick and inspect runs (directly on the store).", no_args_is_help=True
)
app.add_typer(vendors_app, name="vendors")
app.add_typer(run_app, name="run")
console = Console()


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from procure.store import open_store

    return open_store(settings.database_url)


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: the CLI never shows a traceback for bad input."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    """The settings, or one line naming the variable that is wrong."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        found = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        _fail("bad setting: " + "; ".join(found))


@contextlib.contextmanager
def _store_errors(settings: Settings) -> Iterator[None]:
    """A store that cannot be opened or answer becomes one line, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        scheme = settings.database_url.split(":", 1)[0]
        _fail(f"the store ({scheme}) failed: {detail[0] if detail else type(exc).__name__}")


@app.command()
def demo(
    job_seconds: Annotated[float, typer.Option(help="Real seconds a mock job takes")] = 2.0,
    budget: Annotated[float, typer.Option(help="Run budget in US dollars")] = 5.0,
) -> None:
    """Run the recovery story end to end: vendor 1 fails part-way, the agent pays vendor 2."""
    from procure.demo import run_demo
    from procure.models import RunStatus

    state = run_demo(job_seconds=job_seconds, budget=budget, console=console)
    if state.run.status != RunStatus.completed:
        console.print(f"[bold red]run ended {state.run.status}: {state.run.status_reason}")
        raise typer.Exit(1)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port to listen on")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    worker: Annotated[
        bool, typer.Option(help="Run a worker in the server, so runs advance by themselves")
    ] = True,
    concurrency: Annotated[int, typer.Option(help="The worker's ticks in flight", min=1)] = 16,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds before a run is due again after a tick", min=0)
    ] = 1.0,
) -> None:
    """Serve the API (agent endpoints, vendors, /metrics, /healthz) and, unless --no-worker, a
    worker that ticks due runs."""
    import uvicorn

    from procure.agent.worker import WorkerConfig
    from procure.api.app import create_app

    settings = get_settings()
    cfg = WorkerConfig(concurrency=concurrency, poll_interval_s=poll_interval) if worker else None
    uvicorn.run(create_app(settings, _store(settings), worker=cfg), host=host, port=port)


@app.command("worker")
def worker_command(
    concurrency: Annotated[int, typer.Option(help="Ticks in flight at most", min=1)] = 16,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds before a run is due again after a tick", min=0)
    ] = 1.0,
    lease: Annotated[float, typer.Option(help="Lease TTL in seconds (renewed)", min=1)] = 60.0,
    once: Annotated[bool, typer.Option(help="Tick one batch of due runs and exit")] = False,
    max_ticks: Annotated[int | None, typer.Option(help="Exit after this many ticks", min=1)] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds to let ticks in flight finish on SIGTERM/SIGINT")
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
    from procure.store import open_store

    settings = get_settings()
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
        console.print(f"[red]{exc}")
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
    port: Annotated[int, typer.Option(help="Port to listen on")] = 4020,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
) -> None:
    """Run the local x402 facilitator (verify + settle on a local chain kept under PROCURE_HOME).

    At its first start it funds the agent's wallet (X402_PRIVATE_KEY, or the key kept under
    PROCURE_HOME, made if there is none) with PROCURE_WALLET_FUNDING test dollars; the chain's
    journal remembers, so a restart does not fund it again."""
    import uvicorn

    from procure.models import format_usd, usd_to_micros
    from procure.payments.facilitator import create_facilitator_app, fund_wallet_once, open_chain

    settings = get_settings()
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
        typer.Option(help="Ask the local facilitator's faucet for this many test dollars", min=0),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The agent's wallet: its address and on-chain balance, from the facilitator (never its
    key). --fund AMOUNT mints test dollars to it first (local facilitator only)."""
    import httpx

    from procure.bounds import UnsafeInput, loads

    settings = get_settings()
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
        _print_json({"address": address, "balance": balance["balance"], "facilitator": url})
        return
    if fund:
        console.print(f"funded with ${fund:,.2f}")
    console.print(f"address  {address}\nbalance  ${balance['balance']:,.2f}\nfacilitator {url}")


@app.command("mock-vendor")
def mock_vendor(
    vendor_id: Annotated[str, typer.Option(help="gpu_vendor_1 or gpu_vendor_2 (or any seeded id)")],
    port: Annotated[int, typer.Option(help="Port to listen on")] = 4001,
    job_seconds: Annotated[float | None, typer.Option(help="Real seconds per job")] = None,
) -> None:
    """Run a mock GPU vendor. Honours GPU_VENDOR_SECRET, FAIL_VENDOR_ID, FAIL_RATE, FAIL_AT."""
    import uvicorn

    from procure.local import facilitator_client, mock_vendor_config
    from procure.vendors.mock import create_mock_vendor_app
    from procure.vendors.registry import default_vendors

    settings = get_settings()
    known = {v.vendor_id: v for v in default_vendors()}
    if vendor_id not in known:
        raise typer.BadParameter(f"unknown vendor {vendor_id}; known: {', '.join(known)}")
    fails = settings.fail_vendor_id == vendor_id
    cfg = mock_vendor_config(
        known[vendor_id],
        settings.facilitator_url,
        settings.gpu_vendor_secret.get_secret_value(),
        job_seconds=job_seconds or settings.mock_job_seconds,
        fail_rate=(1.0 if settings.fail_rate is None else settings.fail_rate) if fails else 0.0,
        fail_at=settings.fail_at,
    )
    facilitator = facilitator_client(settings.facilitator_url)
    uvicorn.run(create_mock_vendor_app(cfg, facilitator), host="127.0.0.1", port=port)


@vendors_app.command("seed")
def vendors_seed(
    host: Annotated[str, typer.Option(help="Where the mock vendors listen")] = "http://localhost",
) -> None:
    """Insert the seeds' two vendors (gpu_vendor_1 on :4001, gpu_vendor_2 on :4002), with
    GPU_VENDOR_SECRET as their credential (stored encrypted; see PROCURE_SECRET_KEY)."""
    from procure.local import asset_info
    from procure.store import repo
    from procure.vendors.credentials import Keyring
    from procure.vendors.registry import default_vendors

    settings = get_settings()
    info = asset_info(settings.facilitator_url)
    credential = Keyring.load(settings.home).encrypt(settings.gpu_vendor_secret.get_secret_value())
    with _store(settings).session() as s:
        for vendor in default_vendors(
            host=host,
            network=str(info["network"]),
            asset=str(info["asset"]),
            credential=credential,
        ):
            repo.save_vendor(s, vendor)
            console.print(f"seeded {vendor.vendor_id} ({vendor.name}) at {vendor.endpoint}")


@vendors_app.command("list")
def vendors_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the registry with what procure learned of each vendor: its reliability and its
    failure hazard (failures per GPU-hour)."""
    from procure.agent.context import hazard, reliability
    from procure.store import repo

    with _store(get_settings()).session() as s:
        vendors = repo.list_vendors(s)
    if as_json:
        _print_json(
            [
                {**v.to_json(), "learnedReliability": reliability(v), "hazardPerHour": hazard(v)}
                for v in vendors
            ]
        )
        return
    table = Table(
        "vendor",
        "name",
        "endpoint",
        "$/h",
        "prior",
        "learned",
        "fail/h",
        "ok",
        "failed",
        "GPUs",
        "credential",
    )
    for v in vendors:
        table.add_row(
            v.vendor_id,
            v.name,
            v.endpoint,
            f"{v.base_price_per_hour / 1e6:.2f}",
            f"{v.reliability_score:.2f}",
            f"{reliability(v):.3f}",
            f"{hazard(v):.3f}",
            str(v.successes),
            str(v.failures),
            ",".join(v.supported_gpu_types),
            "yes" if v.has_credential else "none",
        )
    console.print(table)


# The API's field names as `run start` spells them, for its error messages.
_START_OPTIONS = {
    "userId": "--user-id",
    "goal": "--goal",
    "budgetTotal": "--budget",
    "gpuType": "--gpu-type",
    "hours": "--hours",
    "epochs": "--epochs",
    "checkpointEvery": "--checkpoint-every",
    "deadlineHours": "--deadline-hours",
}


@run_app.command("start")
def run_start(
    goal: Annotated[str, typer.Option(help="What the compute is for")],
    budget: Annotated[
        float, typer.Option(help="Budget in US dollars (0.000001 to 1,000,000; rounded down)")
    ],
    user_id: Annotated[str, typer.Option(help="Who the run is for")] = "cli",
    gpu_type: Annotated[str, typer.Option(help="GPU type")] = "A100",
    hours: Annotated[float, typer.Option(help="GPU hours (1/60 to 720)")] = 1.0,
    epochs: Annotated[int, typer.Option(help="Training epochs (1 to 1000)")] = 3,
    checkpoint_every: Annotated[
        float, typer.Option(help="Progress between checkpoints (fraction, 0.01 to 1)")
    ] = 0.25,
    deadline_hours: Annotated[
        float | None, typer.Option(help="Hours from now the job must be done in")
    ] = None,
) -> None:
    """Start a run, within the same limits as the API's agent-start; prints it as JSON."""
    from pydantic import ValidationError

    from procure.api.schemas import StartRequest
    from procure.models import utcnow
    from procure.store import repo

    try:
        body = StartRequest.model_validate(
            {
                "userId": user_id,
                "goal": goal,
                "budgetTotal": budget,
                "gpuType": gpu_type,
                "hours": hours,
                "epochs": epochs,
                "checkpointEvery": checkpoint_every,
                "deadlineHours": deadline_hours,
            }
        )
    except ValidationError as exc:
        found = [
            f"{_START_OPTIONS.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'run'}: "
            f"{e['msg']}"
            for e in exc.errors()
        ]
        _fail("invalid run: " + "; ".join(found), code=2)
    settings = _settings()
    with _store_errors(settings), _store(settings).session() as s:
        run = repo.create_run(
            s,
            user_id=body.user_id,
            goal=body.goal,
            budget_total=body.budget_micros(),
            job_spec=body.job_spec(),
            deadline=body.deadline_at(utcnow()),
        )
    _print_json(run.to_json())


@run_app.command("tick")
def run_tick(run_id: str) -> None:
    """Advance a run by one step (holding its lease)."""
    import uuid

    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.tick import RunNotFound
    from procure.agent.worker import LeaseHeld, tick_under_lease

    settings = _settings()
    owner = f"cli-{uuid.uuid4().hex[:8]}"

    async def go() -> dict[str, Any]:
        deps = make_deps(settings, store)
        try:
            return (await tick_under_lease(deps, run_id, owner, settings.api_lease_s)).to_json()
        finally:
            await close_deps(deps)

    with _store_errors(settings):
        store = _store(settings)
        try:
            _print_json(asyncio.run(go()))
        except RunNotFound:
            console.print(f"[red]run {run_id} not found")
            raise typer.Exit(1) from None
        except LeaseHeld as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(1) from None


@run_app.command("cancel")
def run_cancel(
    run_id: str,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the run's history)")] = None,
) -> None:
    """Stop a run: cancel its job at the vendor, start no new payment, end it `cancelled`.
    Cancelling a cancelled run is fine; a run that already ended otherwise is an error."""
    import getpass
    import uuid

    from procure.agent.cancel import CannotCancel, request_cancel
    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.tick import RunNotFound
    from procure.agent.worker import LeaseHeld, tick_under_lease
    from procure.store import repo

    settings = _settings()
    if reason is not None and not 1 <= len(reason) <= 500:
        console.print("[red]--reason must be 1 to 500 characters")
        raise typer.Exit(2)

    async def carry_out() -> None:
        deps = make_deps(settings, store)
        try:
            await tick_under_lease(
                deps, run_id, f"cli-{uuid.uuid4().hex[:8]}", settings.api_lease_s
            )
        except LeaseHeld:
            pass  # a worker holds the run: it carries the cancel out on its next tick
        finally:
            await close_deps(deps)

    with _store_errors(settings):
        store = _store(settings)
        try:
            run = request_cancel(store, run_id, by=f"cli:{getpass.getuser()}", reason=reason)
        except RunNotFound:
            console.print(f"[red]run {run_id} not found")
            raise typer.Exit(1) from None
        except CannotCancel as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(1) from None
        if run.status == "running":
            asyncio.run(carry_out())
            with store.session() as s:
                run = repo.get_run(s, run_id) or run
    if run.status == "cancelled":
        console.print(f"run {run_id} cancelled: {run.status_reason}")
    else:
        console.print(f"cancel of run {run_id} requested; the worker holding it finishes it")


@run_app.command("status")
def run_status(run_id: str) -> None:
    """The run with its jobs, payments and observations, as the seeds' JSON."""
    from procure.store import repo

    settings = _settings()
    with _store_errors(settings), _store(settings).session() as s:
        state = repo.load_state(s, run_id)
    if state is None:
        console.print(f"[red]run {run_id} not found")
        raise typer.Exit(1)
    _print_json(state.to_json())


@run_app.command("list")
def run_list(
    limit: Annotated[int, typer.Option(help="How many runs (1 to 500)", min=1, max=500)] = 20,
) -> None:
    """The latest runs."""
    from procure.store import repo

    settings = _settings()
    with _store_errors(settings), _store(settings).session() as s:
        runs = repo.list_runs(s, limit=limit)
    table = Table("id", "status", "goal", "budget", "remaining", "progress")
    for r in runs:
        table.add_row(
            r.id,
            r.status,
            r.goal[:40],
            f"{r.budget_total / 1e6:.2f}",
            f"{r.budget_remaining / 1e6:.2f}",
            f"{r.progress:.0%}",
        )
    console.print(table)


# --- The GPU node (seed 003): `procure gpu-worker` and `procure tickets` -------------------

tickets_app = typer.Typer(
    help="Livepeer probabilistic tickets: winProb, payout spread, the winning check, and the "
    "orchestrator/gateway flag check. Amounts in wei, or with a unit: 18gwei, 0.001eth.",
    no_args_is_help=True,
)
app.add_typer(tickets_app, name="tickets")


@app.command("gpu-worker")
def gpu_worker(
    port: Annotated[int, typer.Option(help="Port to listen on")] = 9876,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 in a container)")] = (
        "127.0.0.1"
    ),
    log_level: Annotated[str, typer.Option(help="Logging level")] = "INFO",
) -> None:
    """Run the GPU node: /gpu-check (and /agent-net), /models, /metrics (dcgm-exporter names),
    /healthz, the dead-man lease, and registration with an orchestrator when ORCHESTRATOR_URL
    is set. Works without a GPU (it says so). See docs/gpu-node.md for its settings."""
    import logging

    import uvicorn

    from procure.gpu.service import create_gpu_worker_app
    from procure.gpu.settings import GpuWorkerSettings

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app_ = create_gpu_worker_app(GpuWorkerSettings(), port=port)
    uvicorn.run(app_, host=host, port=port, log_level=log_level.lower())


def _wei(text: str) -> int:
    from procure.gpu.tickets import parse_wei

    try:
        return parse_wei(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@tickets_app.command("winprob")
def tickets_winprob(
    ticket_ev: Annotated[str, typer.Option(help="Expected value per ticket (-ticketEV)")],
    face_value: Annotated[str, typer.Option(help="Ticket face value")],
    jobs: Annotated[
        int, typer.Option(help="Jobs (tickets) to show the payout spread over", min=1)
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """winProb = ticketEV / faceValue as go-livepeer's 256-bit fixed point, and what a worker
    sees over N jobs: mean, standard deviation, chance of no win at all."""
    from procure.gpu import tickets

    ev, face = _wei(ticket_ev), _wei(face_value)
    try:
        fixed = tickets.win_prob(ev, face)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    spread = tickets.payout(face, fixed, jobs)
    result = {
        "ticketEV": str(ev),
        "faceValue": str(face),
        "winProb": float(tickets.probability(fixed)),
        "winProbFixed": str(fixed),
        "winProbHex": hex(fixed),
        "expectedValueWei": str(round(tickets.expected_value(face, fixed), 6)),
        "payout": spread.to_json(),
    }
    if as_json:
        _print_json(result)
        return
    typer.echo(
        f"winProb   {result['winProb']:.6g}  ({fixed} / 2^256-1)\n"
        f"EV        {result['expectedValueWei']} wei per ticket\n"
        f"{jobs} jobs: mean {spread.mean_wei:,.0f} wei, std {spread.std_wei:,.0f} wei, "
        f"no win at all with probability {spread.p_no_win:.3g}"
    )


@tickets_app.command("wins")
def tickets_wins(
    signature: Annotated[str, typer.Option(help="The ticket's signature, hex")],
    recipient_rand: Annotated[str, typer.Option(help="recipientRand, decimal or 0x hex")],
    win_prob: Annotated[float | None, typer.Option(help="winProb as a probability")] = None,
    win_prob_fixed: Annotated[str | None, typer.Option(help="winProb, 256-bit integer")] = None,
) -> None:
    """Does the ticket win? uint256(keccak256(signature ‖ recipientRand)) < winProb.
    Exit status 0 when it wins, 1 when it does not."""
    from procure.gpu import tickets

    try:
        sig = bytes.fromhex(signature.removeprefix("0x"))
        rand = int(recipient_rand, 0)
        if (win_prob is None) == (win_prob_fixed is None):
            raise ValueError("give exactly one of --win-prob and --win-prob-fixed")
        fixed = tickets.to_fixed(win_prob) if win_prob is not None else int(str(win_prob_fixed), 0)
        won = tickets.wins(sig, rand, fixed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo("winning ticket" if won else "not a winning ticket")
    raise typer.Exit(0 if won else 1)


@tickets_app.command("check")
def tickets_check(
    price_per_unit: Annotated[str, typer.Option(help="Orchestrator -pricePerUnit")] = (
        "100000000000000"
    ),
    ticket_ev: Annotated[str, typer.Option(help="Orchestrator -ticketEV")] = "29000000000000",
    face_value: Annotated[str, typer.Option(help="Orchestrator -maxFaceValue")] = (
        "1000000000000000"
    ),
    max_price_per_unit: Annotated[str, typer.Option(help="Gateway -maxPricePerUnit")] = (
        "130000000000000"
    ),
    max_ticket_ev: Annotated[str, typer.Option(help="Gateway -maxTicketEV")] = "300000000000000",
    max_face_value: Annotated[str, typer.Option(help="Gateway -maxFaceValue")] = (
        "1000000000000000"
    ),
    max_total_ev: Annotated[str, typer.Option(help="Gateway -maxTotalEV")] = "300000000000000",
    capability_price_per_unit: Annotated[
        str | None, typer.Option(help="CAPABILITY_PRICE_PER_UNIT (optional row)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Orchestrator flags against gateway flags, as seed 003's table (defaults: the seed's
    numbers). Exit status 1 on any mismatch."""
    from procure.gpu import tickets

    checks = tickets.consistency(
        price_per_unit=_wei(price_per_unit),
        ticket_ev=_wei(ticket_ev),
        face_value=_wei(face_value),
        max_price_per_unit=_wei(max_price_per_unit),
        max_ticket_ev=_wei(max_ticket_ev),
        max_face_value=_wei(max_face_value),
        max_total_ev=_wei(max_total_ev),
        capability_price_per_unit=(
            None if capability_price_per_unit is None else _wei(capability_price_per_unit)
        ),
    )
    ok = all(c.ok for c in checks)
    try:
        p = float(tickets.probability(tickets.win_prob(_wei(ticket_ev), _wei(face_value))))
        note = f"winProb = ticketEV / faceValue = {p:.6g}"
    except ValueError:
        ok, note = False, "❌ ticketEV exceeds faceValue: winProb would be above 1"
    if as_json:
        _print_json({"ok": ok, "checks": [c.to_json() for c in checks], "note": note})
    else:
        typer.echo(tickets.table(checks))
        typer.echo(note)
        typer.echo(
            "All orchestrator settings are within the gateway's ceilings."
            if ok
            else "Mismatch: the gateway will refuse this orchestrator's tickets or price."
        )
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
