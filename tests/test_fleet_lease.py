"""One fleet, one controller acting: two controllers scanning the same fleet at the same moments
(threads, each with its own engine on the one database) never both act: one holds the fleet
lease and provisions once, the other stands by, and takes over when the lease is released.
And the controller runs inside `procure serve --fleet`: started with the app, stopped cleanly
(its lease released) with it; off by default."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from fleet_mock_world import KEY, controller, fleet_settings, launch, start_mock
from fleet_world import all_actions
from procure.api.app import create_app
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.controller import scan_once
from procure.fleet.inprocess import FleetRun
from procure.local import serve
from procure.settings import Settings
from procure.store import fleet_repo, open_store

SCANS = 8


def test_two_controllers_scanning_together_act_once(db_url: str) -> None:
    open_store(db_url).dispose()  # migrated once, before the controllers open it together
    mock = start_mock([JobSpec(0.0, 1, 36_000.0), JobSpec(0.0, 1, 36_000.0)])
    asyncio.run(launch(mock, "by-hand"))
    mock.state.clock.advance(61)
    # Both scan, then the simulated minute passes for both (the barrier's action).
    minute = threading.Barrier(2, action=lambda: mock.state.clock.advance(60), timeout=60)
    leased: dict[str, list[bool]] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        async def body() -> None:
            async with controller(
                db_url, mock, high_usage_duration_mins=3, action_cooldown_mins=60
            ) as ctx:
                ctx.owner = name
                leased[name] = []
                for _ in range(SCANS):
                    minute.wait()  # start each scan together
                    leased[name].append((await scan_once(ctx)).leased)
                    minute.wait()
                if leased[name][-1]:  # the one that acted steps down (as run_controller does)
                    with ctx.store.session() as s:
                        fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)

        try:
            asyncio.run(body())
        except BaseException as exc:
            errors.append(exc)
            minute.abort()

    try:
        threads = [threading.Thread(target=one, args=(n,)) for n in ("ctl-a", "ctl-b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        a, b = leased["ctl-a"], leased["ctl-b"]
        assert [x != y for x, y in zip(a, b, strict=True)] == [True] * SCANS  # one each scan
        assert all(a) or all(b)  # and always the same one

        async def takeover() -> list[str]:
            async with controller(db_url, mock, action_cooldown_mins=60) as ctx:
                ctx.owner = "ctl-c"
                assert (await scan_once(ctx)).leased  # the lease was released: it is free
                return [f"{x.action_type} {x.status}" for x in all_actions(ctx)]

        acts = asyncio.run(takeover())
        assert acts.count("provision_instance executed") == 1
        assert mock.state.launches == 2  # the hand-launched one and one provision: no double
    finally:
        mock.stop()


def test_serve_runs_the_fleet_controller_and_stops_it_cleanly(
    sqlite_url: str, tmp_path: Path
) -> None:
    mock = start_mock()
    instance_id = asyncio.run(launch(mock, "by-hand"))
    mock.state.clock.advance(61)
    settings = Settings(PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path)
    store = open_store(sqlite_url)
    cfg = fleet_settings(
        mock, audit_log=str(tmp_path / "audit.jsonl"), fleet_name="served", dry_run=True
    )
    run = FleetRun(
        cfg=cfg,
        cloud=LambdaSettings(api_key=KEY, api_url=mock.url),
        pacer=unpaced(),
        interval_s=0.1,
    )
    try:
        plain = serve(create_app(settings, store))  # off by default
        assert plain.app.state.fleet is None
        plain.stop()

        server = serve(create_app(settings, store, fleet=run))
        ctx = server.app.state.fleet
        assert ctx is not None and ctx.dry_run  # dry run unless LAMBDA_LABS_DRY_RUN=false
        deadline = time.monotonic() + 20
        while True:
            listed = httpx.get(f"{server.url}/api/fleet/instances", timeout=10).json()
            if [i["instance_id"] for i in listed] == [instance_id]:
                break  # the controller scanned the fleet from inside the server
            assert time.monotonic() < deadline, listed
            time.sleep(0.05)
        with store.session() as s:
            lease = fleet_repo.lease_row(s, "fleet:served")
            assert lease is not None and lease.owner == ctx.owner
        server.stop()
        assert not server.thread.is_alive()
        with store.session() as s:
            lease = fleet_repo.lease_row(s, "fleet:served")
            assert lease is not None and lease.owner is None  # released on shutdown
    finally:
        store.dispose()
        mock.stop()
