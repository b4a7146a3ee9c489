"""`procure demo`: the seeds' recovery story end to end, in one process, on loopback.

A local facilitator and two mock vendors start on free ports, a fresh SQLite store is seeded,
and a run is ticked until it ends: vendor 1 fails part-way, the agent pays vendor 2 and finishes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from procure.agent.runtime import close_deps, make_deps
from procure.agent.tick import tick
from procure.demos.settings import demo_settings
from procure.local import mock_vendor_config, start_facilitator, start_mock_vendor
from procure.models import TERMINAL_RUN_STATUSES, JobSpec, Observation, RunState, usd_to_micros
from procure.payments.wallet import load_or_create_account
from procure.safetext import safe
from procure.settings import Settings
from procure.store import Store, open_store, repo
from procure.vendors.credentials import Keyring
from procure.vendors.registry import default_vendors

STYLE = {
    "agent_reasoning": "cyan",
    "payment_event": "green",
    "job_log": "white",
    "job_event": "blue",
    "error": "bold red",
    "llm_response": "magenta",
}


def print_observation(console: Console, obs: Observation) -> None:
    console.print(
        f"[{STYLE.get(obs.type, 'white')}]{obs.type:>15}[/] {safe(obs.content, one_line=False)}"
    )


async def _drive(
    settings: Settings,
    run_id: str,
    console: Console,
    store: Store,
    poll_s: float,
    timeout_s: float,
) -> RunState:
    deps = make_deps(settings, store)
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            result = await tick(deps, run_id)
            with deps.store.session() as s:
                new = repo.list_observations(s, run_id, after_id=seen)
                state = repo.load_state(s, run_id)
            for obs in new:
                print_observation(console, obs)
                seen = obs.id
            console.print(f"[dim]{'tick':>15} → {result.message}[/]")
            assert state is not None
            if state.run.status in TERMINAL_RUN_STATUSES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)
    finally:
        await close_deps(deps)


def run_demo(
    *,
    workdir: Path | None = None,
    job_seconds: float = 2.0,
    fail_at: float = 0.47,
    budget: float = 5.0,
    console: Console | None = None,
    then: Callable[[Settings, Store], None] | None = None,
) -> RunState:
    """The story; then `then(settings, store)`, if given, while the services still run (e.g.
    the dashboard until Ctrl+C), before they stop."""
    console = console or Console()
    own = workdir is None  # a folder of our own (it holds a wallet key): removed at the end
    workdir = workdir or Path(tempfile.mkdtemp(prefix="procure-demo-"))
    secret = "demo-secret"
    facilitator = start_facilitator(workdir / "chain-journal.jsonl")
    chain = facilitator.app.state.chain
    settings = demo_settings(workdir, facilitator.url, secret)
    servers = [facilitator]
    try:
        vendors = default_vendors(
            network=chain.network,
            asset=chain.token_address,
            credential=Keyring.load(settings.home).encrypt(secret),
        )
        for vendor, fail_rate in zip(vendors, (1.0, 0.0), strict=True):
            cfg = mock_vendor_config(
                vendor,
                facilitator.url,
                secret,
                job_seconds=job_seconds,
                fail_rate=fail_rate,
                fail_at=fail_at,
            )
            server = start_mock_vendor(cfg, facilitator.url)
            servers.append(server)
            vendor.endpoint = server.url
        store = open_store(settings.database_url)
        with store.session() as s:
            for vendor in vendors:
                repo.save_vendor(s, vendor)
        wallet = load_or_create_account(None, workdir).address
        chain.mint(wallet, usd_to_micros(settings.wallet_funding_usd))
        console.rule("[bold]procure demo")
        console.print(
            f"facilitator {facilitator.url} · chain {chain.network} · token {chain.token_address}"
        )
        for vendor in vendors:
            console.print(
                f"vendor {vendor.vendor_id} ({vendor.name}) {vendor.endpoint} "
                f"${vendor.base_price_per_hour / 1e6:.2f}/h, reliability {vendor.reliability_score}"
            )
        console.print(f"wallet {wallet} funded with ${settings.wallet_funding_usd:.2f} test pUSD")
        with store.session() as s:
            run = repo.create_run(
                s,
                user_id="demo-user",
                goal="Fine-tune tiny-llm on dataset A",
                budget_total=usd_to_micros(budget),
                job_spec=JobSpec(),
            )
        console.print(f"run {run.id}: {run.goal!r}, budget ${budget:.2f}")
        console.rule("trace")
        state = asyncio.run(
            _drive(
                settings, run.id, console, store, poll_s=max(0.2, job_seconds / 8), timeout_s=120
            )
        )
        console.rule("final status")
        console.print_json(json.dumps(state.to_json()))
        console.print(
            f"wallet balance ${chain.balance_of(wallet) / 1e6:.2f}; "
            + ", ".join(
                f"{v.vendor_id} received ${chain.balance_of(v.pay_to) / 1e6:.2f}" for v in vendors
            )
        )
        if then is not None:
            then(settings, store)
        return state
    finally:
        for server in reversed(servers):
            server.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
