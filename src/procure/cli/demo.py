"""`procure demo`: the recovery story (and its dashboard with --serve) or the clouds story."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from procure.cli.common import PORT, console, fail, print_json, settings_errors
from procure.numbers import number
from procure.safetext import safe


def demo(
    ctx: typer.Context,
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
    _refuse_the_other_storys_options(ctx, story)  # before the stories' imports: seconds
    if story in ("clouds", "recovery"):
        _check_the_settings()
    if story == "clouds":
        import io

        from rich.console import Console

        from procure.demos.clouds import run_cloud_demo

        quiet = Console(file=io.StringIO()) if as_json else console
        with settings_errors():
            summary = run_cloud_demo(console=quiet, budget=budget)
        if as_json:
            print_json(summary)
        if summary["status"] != "completed" or summary["instances_left_running"]:
            raise typer.Exit(1)
        return
    if story != "recovery":
        fail(f"unknown story {safe(story)}: recovery or clouds", code=2)
    from procure.demos.recovery import run_demo
    from procure.models import RunStatus

    then = None
    if serve_:
        from procure.demos.serve import serve_until_interrupted
        from procure.local import port_is_free

        if not port_is_free(port):  # before the demo runs: say it in one line, not later
            fail(f"port {port} is busy; choose another with --port")
        then = functools.partial(serve_until_interrupted, port=port, console=console)
    with settings_errors():  # the story's settings read the environment and `.env` too
        state = run_demo(job_seconds=job_seconds, budget=budget, console=console, then=then)
    if state.run.status != RunStatus.completed:
        console.print(
            f"[bold red]run ended {safe(state.run.status)}: {safe(state.run.status_reason)}"
        )
        raise typer.Exit(1)


def _check_the_settings() -> None:
    """The environment's settings, refused in one line before a story imports its stack and
    starts its chain (2.5 s of CPU): as the story reads them, on a placeholder folder and
    facilitator (never created, never asked)."""
    import tempfile
    from pathlib import Path

    from procure.demos.settings import demo_settings

    with settings_errors():
        demo_settings(Path(tempfile.gettempdir()), "http://127.0.0.1:9")


# Each story's own options: given to the other story, they would be ignored without a word
_ONLY = {"clouds": ("as_json",), "recovery": ("serve_", "port", "job_seconds")}
_FLAG = {"as_json": "--json", "serve_": "--serve", "port": "--port", "job_seconds": "--job-seconds"}


def _refuse_the_other_storys_options(ctx: typer.Context, story: str) -> None:
    for owner, names in _ONLY.items():
        if owner == story or story not in _ONLY:
            continue
        for name in names:
            source = ctx.get_parameter_source(name)  # by name: typer bundles its own click
            if source is not None and source.name == "COMMANDLINE":
                fail(f"{_FLAG[name]} is the {owner} story's: `procure demo {story}` has none", 2)
