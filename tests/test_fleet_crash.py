"""Exactly once under kill -9: a controller killed after the action is durable but before the
cloud is called, or after the cloud launched but before anything was recorded, is restarted;
the restarted one launches nothing twice and leaves no instance unknown to it (invariant 9)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_crash_child import OWNER
from fleet_fakes import FakeCloud, cloud_app
from fleet_world import all_actions, fleet
from procure.fleet.controller import scan_once
from procure.local import serve
from procure.store import fleet_repo, open_store

TESTS = Path(__file__).parent


@pytest.mark.parametrize("point", ["fleet_intent", "fleet_launched"])
def test_killed_controller_launches_exactly_once(db_url: str, point: str) -> None:
    cloud = FakeCloud()
    server = serve(cloud_app(cloud))
    open_store(db_url).dispose()  # migrated before the child starts
    try:
        env = {
            **os.environ,
            "PROCURE_CRASH_AT": f"{point}:1",
            "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        child = subprocess.run(
            [
                sys.executable,
                str(TESTS / "fleet_crash_child.py"),
                server.url,
                db_url,
                str(cloud.node_port),
            ],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 137, child.stderr.decode()[-2000:]
        assert len(cloud.launches) == (1 if point == "fleet_launched" else 0)

        async def restart() -> None:
            async with fleet(db_url, cloud, min_instances=1) as ctx:
                ctx.owner = OWNER
                ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
                await scan_once(ctx)
                ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
                await scan_once(ctx)
                (action,) = all_actions(ctx)
                assert action.status == "executed"
                assert cloud.launches == [action.action_id]  # one launch, named after it
                (instance,) = cloud.live()
                assert action.target_instance == instance.id
                with ctx.store.session() as s:
                    known = fleet_repo.get_instance(s, instance.id)
                    assert known is not None and known.launched_by == action.action_id

        asyncio.run(restart())
    finally:
        server.stop()
        cloud.close()
