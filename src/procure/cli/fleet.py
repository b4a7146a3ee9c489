"""`procure fleet ...`: the fleet controller (run, dry run unless --live), its status, its
actions, and approve / reject / rollback of one action."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from procure.cli.common import (
    cloud_settings,
    console,
    fail,
    load_settings,
    print_json,
    settings_errors,
    store_errors,
    store_for,
    table,
)
from procure.numbers import number, whole
from procure.safetext import guard_logging, redact, safe, show_url

fleet_app = typer.Typer(
    help="The fleet controller: watch GPU instances, scale them within safety rails.",
    no_args_is_help=True,
)


def _fleet_settings():  # type: ignore[no-untyped-def]
    from procure.fleet.settings import FleetSettings

    with settings_errors():
        return FleetSettings()


def _require_key(provider: str) -> None:
    """Every scan would fail without the account's key: say so once and exit, never start a
    controller that warns at each scan. A blank key (as `.env.example` leaves it) is unset."""
    from procure.clouds.registry import KEY_VARS, has_key

    with settings_errors():
        keyed = has_key(provider)  # type: ignore[arg-type]
    if keyed:
        return
    var = KEY_VARS[provider]  # type: ignore[index]
    fail(
        f"{var} is not set: the fleet controller reads and scales that {provider} account "
        f"(to try it locally: `procure mock-cloud --provider {provider}`, then "
        f"--cloud-url and {var} as it prints)"
    )


@fleet_app.command("run")
def run(
    live: Annotated[
        bool, typer.Option("--live", help="Act on the cloud (default: dry run)")
    ] = False,
    once: Annotated[bool, typer.Option("--once", help="One scan, then exit")] = False,
    interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between scans (default: LAMBDA_LABS_SCAN_INTERVAL_S, else 60)",
            parser=number(0.01, 86400, "--interval"),
        ),
    ] = None,
    cloud: Annotated[
        str,
        typer.Option(
            help="Which cloud account: lambda, runpod or vast (its key: LAMBDA_API_KEY, "
            "RUNPOD_API_KEY or VAST_API_KEY)",
            case_sensitive=False,
        ),
    ] = "lambda",
    cloud_url: Annotated[
        str | None,
        typer.Option(
            help="The cloud's API base URL (LAMBDA_API_URL, RUNPOD_API_URL, VAST_API_URL)"
        ),
    ] = None,
    audit_git: Annotated[
        Path | None, typer.Option(help="Also commit each audit entry to a git repository here")
    ] = None,
) -> None:
    """Scan the fleet every interval: read the nodes, decide, pass the rails, act (with --live),
    audit and notify. Several controllers on one PostgreSQL never act twice (a lease)."""
    import asyncio

    from procure.clouds.lambda_cloud.client import LambdaCloud
    from procure.fleet.context import FleetContext
    from procure.fleet.controller import run_controller
    from procure.fleet.outbox import run_outbox
    from procure.httpbounds import bounded_client
    from procure.store.ledger import load_caps

    # --once is a command a user reads: warnings only, then one line of what it decided
    level = logging.WARNING if once else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    guard_logging(level)
    settings, cfg = load_settings(), _fleet_settings()
    provider = cloud.lower()
    if provider not in ("lambda", "runpod", "vast"):
        fail(f"--cloud: choose lambda, runpod or vast, not {safe(provider)}")
    lambda_settings = cloud_settings(**({"api_url": cloud_url} if cloud_url else {}))
    _require_key(provider)
    webhook = cfg.slack_webhook_url.get_secret_value() if cfg.slack_webhook_url else None
    git_dir = audit_git or (Path(cfg.audit_git) if cfg.audit_git else None)

    async def main() -> str | None:
        with store_errors(settings):
            store = store_for(settings)
        if provider == "lambda":
            client = LambdaCloud(lambda_settings)
        else:
            from procure.clouds.registry import make_cloud

            with settings_errors():
                client = make_cloud(provider, api_url=cloud_url)  # type: ignore[arg-type]
        nodes = bounded_client(deadline_s=cfg.node_timeout_s)
        slack = bounded_client(deadline_s=cfg.slack_timeout_s) if webhook else None
        ctx = FleetContext(
            store=store,
            cloud=client,  # type: ignore[arg-type]
            nodes=nodes,
            cfg=cfg,
            caps=load_caps(),
            dry_run=not live,
            slack=webhook is not None,
            mapped_ports=provider != "lambda",
        )
        delivery = asyncio.create_task(
            run_outbox(store, slack, webhook, Path(cfg.audit_log), git_dir)
        )
        from procure.fleet.cap_warnings import run_warnings

        warnings_task = asyncio.create_task(run_warnings(store, fleet=cfg))
        mode = "LIVE" if live else "dry run"
        where = show_url(getattr(client, "base_url", None) or lambda_settings.api_url)
        console.print(f"fleet controller {ctx.owner} ({mode}) on {safe(where)}")
        try:
            if once:
                error = await _scan_and_say(ctx)
            else:
                error = await run_controller(ctx, interval_s=interval)
            if once:  # let the outbox deliver what this scan queued
                from procure.fleet.outbox import deliver_slack, write_audit

                await write_audit(store, Path(cfg.audit_log), git_dir)
                if slack is not None and webhook:
                    await deliver_slack(store, slack, webhook)
        finally:
            delivery.cancel()
            warnings_task.cancel()
            await client.aclose()
            await nodes.aclose()
            if slack is not None:
                await slack.aclose()
            store.dispose()
        return error

    from procure.fleet.controller import FleetConflict

    try:
        error = asyncio.run(main())
    except KeyboardInterrupt:
        console.print("stopped")
        return
    except FleetConflict as exc:  # another fleet runs on this store: said, not a traceback
        fail(str(exc))
    if once and error:  # the one scan asked for did not happen: say so, exit non-zero
        fail(f"the scan failed: {redact(error)}")


async def _scan_and_say(ctx: Any) -> str | None:
    """One scan, then one line of what it saw and decided; its error, if any."""
    from procure.bounds import clip
    from procure.fleet.controller import FleetConflict, scan_once
    from procure.store import fleet_repo

    try:
        result = await scan_once(ctx)
    except FleetConflict:  # said whole by the caller, as without --once
        raise
    except Exception as exc:  # one line, not a traceback
        return clip(f"{type(exc).__name__}: {exc}", 500)
    finally:
        with ctx.store.session() as s:
            fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)
    if not result.leased:
        console.print("another controller holds the fleet lease: this scan did nothing")
    elif result.error is None:
        decided = ", ".join(result.proposals) or "no action"
        done = f"; carried out: {', '.join(result.carried_out)}" if result.carried_out else ""
        console.print(
            f"scanned {result.instances} instance(s); decided: {safe(decided, 500)}{safe(done)}",
            highlight=False,
        )
    if result.queue_error:
        console.print(f"warning: {safe(result.queue_error)}", highlight=False)
    return result.error


@fleet_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: the summary")] = False,
) -> None:
    """The seed's action summary, the instances with their latest figures and anomalies."""
    from procure.fleet.summary import instances, summary
    from procure.models import utcnow

    settings, cfg = load_settings(), _fleet_settings()
    with store_errors(settings):
        store = store_for(settings)
        with store.session() as s:
            data = {"summary": summary(s, cfg, utcnow()), "instances": instances(s, cfg, utcnow())}
        store.dispose()
    if as_json:
        print_json(data)
        return
    print_json(data["summary"])
    out = table(
        "instance", "type", "status", "GPU %", "°C", "anomalies", fold=("type", "anomalies")
    )
    for i in data["instances"]:
        latest = i["latest"] or {}
        out.add_row(  # every text here came from the cloud: no markup, no escapes
            safe(i["instance_id"], 100),
            safe(i["instance_type"], 100),
            safe(i["status"], 50),
            "" if latest.get("gpu_util") is None else f"{latest['gpu_util']:.0f}",
            "" if latest.get("temperature_c") is None else f"{latest['temperature_c']:.0f}",
            safe(", ".join(a["kind"] for a in i["anomalies"]), 200),
        )
    console.print(out)


@fleet_app.command("actions")
def list_actions(
    status_filter: Annotated[
        str | None,
        typer.Option(
            "--status",
            help="Only actions in this status: pending, approved, executing, executed, "
            "blocked, rejected, failed or rolled_back",
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(help="The newest this many actions", parser=whole(1, 1000, "--limit")),
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list of the actions")] = False,
) -> None:
    """The action history, newest first."""
    from procure.fleet.summary import action_json
    from procure.store import fleet_repo

    settings = load_settings()
    with store_errors(settings):
        store = store_for(settings)
        with store.session() as s:
            rows = [
                action_json(r)
                for r in fleet_repo.list_actions(s, status=status_filter, limit=limit)
            ]
        store.dispose()
    if as_json:
        print_json(rows)
        return
    out = table(
        "action", "type", "target", "$/h", "status", "reason", fold=("target", "status", "reason")
    )
    for r in rows:
        status_text = r["status"] + (f" ({r['blocked_by']})" if r["blocked_by"] else "")
        out.add_row(
            safe(r["action_id"], 100),
            safe(r["action_type"], 50),
            safe(r["target_instance"] or "", 100),
            f"{r['cost_impact']:+.2f}",
            safe(status_text, 100),
            safe(r["reason"], 300),
        )
    console.print(out)


ACTION_ID = typer.Argument(help="The action's id, as `procure fleet actions` lists it")


def _decide(action_id: str, what: str) -> None:
    from procure.fleet import actions
    from procure.models import utcnow

    settings, cfg = load_settings(), _fleet_settings()
    with store_errors(settings):
        store = store_for(settings)
        try:
            if what == "rollback":
                row = actions.rollback(store, action_id, "cli", utcnow())
                console.print(
                    f"rollback {safe(row.action_id)} queued: terminates {safe(row.target_instance)}"
                )
            else:
                row = actions.decide(
                    store,
                    action_id,
                    what == "approve",
                    "cli",
                    utcnow(),
                    slack=cfg.slack_webhook_url is not None,
                    fleet_name=cfg.fleet_name,
                )
                console.print(f"{safe(action_id)}: {safe(row.status)}")
        except KeyError:
            fail(f"no action {action_id}; `procure fleet actions` lists their ids")
        except actions.ActionRefused as exc:
            fail(str(exc))
        finally:
            store.dispose()


@fleet_app.command("approve")
def approve(action_id: Annotated[str, ACTION_ID]) -> None:
    """Approve a pending action: the controller carries it out on its next scan."""
    _decide(action_id, "approve")


@fleet_app.command("reject")
def reject(action_id: Annotated[str, ACTION_ID]) -> None:
    """Reject a pending action."""
    _decide(action_id, "reject")


@fleet_app.command("rollback")
def rollback(action_id: Annotated[str, ACTION_ID]) -> None:
    """Roll back an executed provision (terminate what it launched). Terminations cannot be."""
    _decide(action_id, "rollback")


@fleet_app.command("demo")
def demo() -> None:
    """The controller's story in one process: a burst saturates a mock cloud's pool, the
    controller provisions (an operator approves), idle instances are terminated, the Slack
    messages arrive at a local receiver, and the summary JSON ends it."""
    from procure.fleet.demo import run_fleet_demo

    result = run_fleet_demo(console=console)
    if not result.ok:
        fail("the demo's story did not happen: expected a provision, an approval and a termination")
