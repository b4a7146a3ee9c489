"""`procure run ...`: start, tick, cancel and inspect runs, directly on the store."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from procure.cli.common import (
    console,
    fail,
    key_errors,
    load_settings,
    print_json,
    store_errors,
    store_for,
    table,
)
from procure.numbers import shaped, whole
from procure.safetext import safe

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
"""The CLI option for each field of the API's start request, to name it in errors."""

run_app = typer.Typer(
    help="Start, tick, cancel and inspect runs (directly on the store).", no_args_is_help=True
)
RUN_ID = typer.Argument(help="The run's id, as `procure run start` prints and `run list` shows")


@run_app.command("start")
def run_start(
    goal: Annotated[str, typer.Option(help="What the compute is for")],
    budget: Annotated[
        float,
        typer.Option(
            help="Budget in US dollars (0.000001 to 1,000,000; rounded down)",
            parser=shaped("--budget"),
        ),
    ],
    user_id: Annotated[str, typer.Option(help="Who the run is for")] = "cli",
    gpu_type: Annotated[str, typer.Option(help="GPU type")] = "A100",
    hours: Annotated[
        float, typer.Option(help="GPU hours (1/60 to 720)", parser=shaped("--hours"))
    ] = 1.0,
    epochs: Annotated[
        int,
        typer.Option(help="Training epochs (1 to 1000)", parser=shaped("--epochs", integer=True)),
    ] = 3,
    checkpoint_every: Annotated[
        float,
        typer.Option(
            help="Progress between checkpoints (fraction, 0.01 to 1)",
            parser=shaped("--checkpoint-every"),
        ),
    ] = 0.25,
    deadline_hours: Annotated[
        float | None,
        typer.Option(
            help="Hours from now the job must be done in",
            parser=shaped("--deadline-hours"),
        ),
    ] = None,
) -> None:
    """Start a run, within the same limits as the API's agent-start; prints it as JSON."""
    from pydantic import ValidationError

    from procure.agent.start_request import first_payment
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
        fail("invalid run: " + "; ".join(found), code=2)
    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        run = repo.create_run(
            s,
            user_id=body.user_id,
            goal=body.goal,
            budget_total=body.budget_micros(),
            job_spec=body.job_spec(),
            deadline=body.deadline_at(utcnow()),
        )
        vendors = repo.list_vendors(s)
    first = first_payment(run.job_spec, run.budget_total, vendors, settings.first_slice_fraction)
    print_json({**run.to_json(), "firstPayment": first})  # as POST /api/agent-start answers
    typer.echo(f"note: {first['note']}", err=True)  # stderr: stdout stays JSON for scripts


@run_app.command("tick")
def run_tick(run_id: Annotated[str, RUN_ID]) -> None:
    """Advance a run by one step (holding its lease)."""
    import asyncio
    import uuid

    settings = load_settings()  # a bad setting is said before the agent's imports (seconds)
    from procure.agent.leased_tick import LeaseHeld, tick_under_lease
    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.tick import RunNotFound

    owner = f"cli-{uuid.uuid4().hex[:8]}"

    async def go() -> dict[str, Any]:
        with key_errors():  # the deployment's key, read here
            deps = make_deps(settings, store)
        try:
            return (await tick_under_lease(deps, run_id, owner, settings.api_lease_s)).to_json()
        finally:
            await close_deps(deps)

    with store_errors(settings):
        store = store_for(settings)
        try:
            print_json(asyncio.run(go()))
        except RunNotFound:
            fail(f"run {safe(run_id)} not found")
        except LeaseHeld as exc:
            fail(safe(exc))


@run_app.command("cancel")
def run_cancel(
    run_id: Annotated[str, RUN_ID],
    reason: Annotated[str | None, typer.Option(help="Why (kept in the run's history)")] = None,
) -> None:
    """Stop a run: cancel its job at the vendor, start no new payment, end it `cancelled`.
    Cancelling a cancelled run is fine; a run that already ended otherwise is an error."""
    import asyncio
    import uuid

    from procure.agent.cancel import CannotCancel, request_cancel
    from procure.agent.leased_tick import LeaseHeld, tick_under_lease
    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.tick import RunNotFound
    from procure.store import repo

    settings = load_settings()
    if reason is not None and not 1 <= len(reason) <= 500:
        fail("--reason must be 1 to 500 characters", 2)

    async def carry_out() -> None:
        with key_errors():  # the deployment's key, read here
            deps = make_deps(settings, store)
        try:
            await tick_under_lease(
                deps, run_id, f"cli-{uuid.uuid4().hex[:8]}", settings.api_lease_s
            )
        except LeaseHeld:
            pass  # a worker holds the run: it carries the cancel out on its next tick
        finally:
            await close_deps(deps)

    with store_errors(settings):
        store = store_for(settings)
        try:
            run = request_cancel(store, run_id, by=f"cli:{_who()}", reason=reason)
        except RunNotFound:
            fail(f"run {safe(run_id)} not found")
        except CannotCancel as exc:
            fail(safe(exc))
        if run.status == "running":
            asyncio.run(carry_out())
            with store.session() as s:
                run = repo.get_run(s, run_id) or run
    if run.status == "cancelled":
        console.print(f"run {safe(run_id)} cancelled: {safe(run.status_reason)}")
    else:
        console.print(f"cancel of run {safe(run_id)} requested; the worker holding it finishes it")


@run_app.command("status")
def run_status(run_id: Annotated[str, RUN_ID]) -> None:
    """The run with its jobs, payments and observations, as the seeds' JSON."""
    from procure.store import repo

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        state = repo.load_state(s, run_id)
    if state is None:
        fail(f"run {safe(run_id)} not found")
    print_json(state.to_json())


@run_app.command("list")
def run_list(
    limit: Annotated[
        int, typer.Option(help="How many runs (1 to 500)", parser=whole(1, 500, "--limit"))
    ] = 20,
) -> None:
    """The latest runs."""
    from procure.models import format_usd
    from procure.store import repo

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        runs = repo.list_runs(s, limit=limit)
    out = table("id", "status", "goal", "budget", "remaining", "progress", fold=("goal",))
    for r in runs:
        out.add_row(
            safe(r.id, 100),
            safe(r.status, 50),
            safe(r.goal, 40),
            format_usd(r.budget_total)[1:],  # rounded as the pages round
            format_usd(r.budget_remaining)[1:],
            f"{r.progress:.0%}",
        )
    console.print(out)


def _who() -> str:
    """Who asks, for the run's record: the login name, else the uid (a container's arbitrary
    uid has no passwd entry, and getuser raises then)."""
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"
