"""Exactly once under kill -9: a controller killed after the action is durable but before the
cloud is called, or after the cloud launched but before anything was recorded, is restarted;
the restarted one launches nothing twice and leaves no instance unknown to it (invariant 9).
Killed after the cloud terminated an idle instance but before the record, the restarted one
records it and terminates nothing else."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_crash_child import OWNER
from fleet_fakes import FakeCloud, cloud_app
from fleet_world import all_actions, fleet, scan_for
from procure.fleet import actions
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


class Crash(BaseException):
    """A kill: not an Exception, so nothing on the way up catches it."""


def test_killed_after_a_termination_it_is_recorded_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits: list[str] = []

    def crash_point(name: str) -> None:
        hits.append(name)
        if name == "fleet_terminated" and hits.count(name) == 1:
            raise Crash(name)

    monkeypatch.setattr(actions, "crash_point", crash_point)

    async def body() -> None:
        cloud = FakeCloud()
        idle = {cloud.add(util=5), cloud.add(util=3)}
        async with fleet(db_url, cloud, min_instances=1, action_cooldown_mins=0) as ctx:
            with pytest.raises(Crash):  # idle long enough: one is terminated, then the death
                await scan_for(ctx, 60)
            (gone,) = cloud.terminations
            # The restarted controller knows only the store (and the cloud).
            again = dataclasses.replace(ctx, types={}, cloud_failures=0, backoff_until=None)
            await scan_for(again, 5)
            (action,) = all_actions(again)
            assert (action.action_type, action.status) == ("terminate_instance", "executed")
            assert action.target_instance == gone and gone in idle
            assert cloud.terminations == [gone]  # nothing else terminated: the minimum stays
            assert len(cloud.live()) == 1
            with again.store.session() as s:
                ended = fleet_repo.get_instance(s, gone)
                assert ended is not None and ended.ended_at is not None

    asyncio.run(body())
