"""Two fleets (two `LAMBDA_LABS_FLEET_NAME`s) on one store. The store keeps one instance ledger,
one action history, one set of cooldowns and caps: a second fleet running beside the first
would count the first's instances as its own, end its ledger rows, and be held by its
cooldowns. A fleet is refused while another one runs on its store, saying why and what to do.
Each test drives the real controller over a real store (SQLite and PostgreSQL) and the fleet
tests' fake cloud."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.fleet.context import FleetContext
from procure.fleet.controller import FleetConflict, run_controller, scan_once
from procure.models import utcnow
from procure.store import fleet_repo, open_store

DEADLINE_S = 60.0  # generous: a refusal comes at the first scan


def _live(ctx: FleetContext) -> list[str]:
    with ctx.store.session() as s:
        return [r.instance_id for r in fleet_repo.live_instances(s)]


def test_a_second_fleet_on_a_store_where_another_fleet_runs_is_refused_saying_why(
    db_url: str,
) -> None:
    """Before the fix: fleet "beta" started beside a running fleet "alpha" on one store read
    alpha's instance as its own: it never launched its minimum (alpha's instance counted, and
    alpha's launch held beta's cooldown), and said nothing of why; its scans would end alpha's
    ledger rows once they missed one listing."""

    async def body() -> None:
        cloud_a = FakeCloud()
        cloud_b = FakeCloud(_ids=itertools.count(101))  # ids and IPs apart from alpha's
        async with (
            fleet(db_url, cloud_a, fleet_name="alpha", min_instances=1) as alpha,
            fleet(db_url, cloud_b, fleet_name="beta", min_instances=1) as beta,
        ):
            await scan_for(alpha, 3)
            assert len(cloud_a.launches) == 1
            alphas = _live(alpha)
            refused: FleetConflict | None = None
            for _ in range(10):  # both running: alpha's scans and beta's, minute by minute
                await scan_once(alpha)
                try:
                    await scan_once(beta)
                except FleetConflict as exc:
                    refused = exc
                    break
                beta.clock.advance(minutes=1)  # type: ignore[attr-defined]
                alpha.clock.advance(minutes=1)  # type: ignore[attr-defined]
            acts = [(a.action_type, a.status, a.block_reason) for a in all_actions(beta)]
            assert refused is not None, (
                f"beta ran beside alpha on one store: launched {cloud_b.launches}, actions {acts}"
            )
            # The operator reads why, and what to do.
            said = str(refused)
            assert "alpha" in said and "beta" in said and "separate store" in said
            # Beta did nothing: no launch on its account, alpha's ledger and account untouched.
            assert cloud_b.launches == [] and cloud_b.terminations == []
            assert cloud_a.terminations == [] and _live(alpha) == alphas
            # Alpha goes on scanning as before (beta holds no lease that could refuse it).
            for _ in range(3):
                result = await scan_once(alpha)
                assert result.leased and result.error is None
                alpha.clock.advance(minutes=1)  # type: ignore[attr-defined]
            assert _live(alpha) == alphas and cloud_a.terminations == []

    asyncio.run(body())


def test_a_refused_fleet_controller_stops_instead_of_scanning_on(db_url: str) -> None:
    """Before the fix: `procure fleet run` (run_controller) of a second fleet name on a store
    where another fleet runs went on scanning and deciding beside it for ever; now it ends at
    its first scan with the refusal, holding no lease."""

    async def body() -> None:
        cloud_a = FakeCloud()
        cloud_b = FakeCloud(_ids=itertools.count(101))
        async with (
            fleet(db_url, cloud_a, fleet_name="alpha", min_instances=1) as alpha,
            fleet(db_url, cloud_b, fleet_name="beta", min_instances=1) as beta,
        ):
            await scan_for(alpha, 2)
            stop = asyncio.Event()
            task = asyncio.ensure_future(run_controller(beta, interval_s=0.01, stop=stop))
            try:
                with pytest.raises(FleetConflict, match="alpha"):
                    await asyncio.wait_for(asyncio.shield(task), DEADLINE_S)
            finally:
                stop.set()
                if not task.done():
                    await asyncio.wait_for(task, DEADLINE_S)
            assert cloud_b.launches == []
            with beta.store.session() as s:
                lease = fleet_repo.lease_row(s, beta.lease_name)
            assert lease is None or lease.owner is None

    asyncio.run(body())


def test_of_two_fleets_starting_at_once_the_later_is_refused_and_holds_nothing(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: two fleets starting at the same moment on one store both ran. Now a
    fleet that found no other running, but whose lease landed after another's, is refused
    once its own lease is taken, and gives it back: never do both go on."""

    async def body() -> None:
        cloud_a = FakeCloud()
        cloud_b = FakeCloud(_ids=itertools.count(101))
        async with (
            fleet(db_url, cloud_a, fleet_name="alpha", min_instances=1) as alpha,
            fleet(db_url, cloud_b, fleet_name="beta", min_instances=1) as beta,
        ):
            take = fleet_repo.take_lease
            raced: list[str] = []

            def alpha_first(
                s: Session, name: str, owner: str, ttl: float, now: datetime, **how: bool
            ) -> bool:
                # Alpha's lease lands between beta's look for other fleets and beta's own take.
                if name == beta.lease_name and not raced:
                    raced.append(name)
                    with alpha.store.session() as other:
                        assert take(other, alpha.lease_name, alpha.owner, ttl, now)
                return take(s, name, owner, ttl, now, **how)

            monkeypatch.setattr(fleet_repo, "take_lease", alpha_first)
            with pytest.raises(FleetConflict, match="alpha"):
                await scan_once(beta)
            monkeypatch.setattr(fleet_repo, "take_lease", take)
            assert raced and cloud_b.launches == []
            with beta.store.session() as s:
                lease = fleet_repo.lease_row(s, beta.lease_name)
            assert lease is not None and lease.owner is None  # beta holds nothing
            results = await scan_for(alpha, 3)  # alpha, which won, runs
            assert all(r.leased and r.error is None for r in results)
            assert len(cloud_a.launches) == 1

    asyncio.run(body())


@pytest.mark.parametrize("once", [[], ["--once"]], ids=["loop", "once"])
def test_procure_fleet_run_beside_another_fleet_says_why_in_one_line(
    tmp_path: Path, once: list[str]
) -> None:
    """Before the fix: `procure fleet run` for a second fleet on a store where another fleet's
    controller runs ended with a Python traceback (the refusal's reason on its last line); with
    `--once` the refusal came as a failed scan, cut at 500 characters before its advice's end."""
    url = f"sqlite:///{tmp_path / 'fleets.db'}"
    store = open_store(url)
    try:
        with store.session() as s:  # fleet "alpha"'s controller runs on this store
            assert fleet_repo.take_lease(s, "fleet:alpha", "alpha-controller", 3600, utcnow())
    finally:
        store.dispose()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "PROCURE_"))}
    env = {
        **clean,
        "COLUMNS": "200",
        "PROCURE_DATABASE_URL": url,
        "PROCURE_HOME": str(tmp_path / "home"),
        "LAMBDA_API_KEY": "any-key",  # the refusal comes before the cloud is asked anything
        "LAMBDA_LABS_FLEET_NAME": "beta",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "procure.cli",
            "fleet",
            "run",
            "--cloud-url",
            "http://127.0.0.1:9",
            *once,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "'alpha' runs on this store" in said[0], done.stderr
    assert said[0].endswith("holds its lease until it expires)"), done.stderr  # the advice whole
