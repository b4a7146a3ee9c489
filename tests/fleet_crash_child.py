"""A fleet controller in its own process for the crash tests: one scan against the fake cloud
served over HTTP (argv: cloud url, store url, node port), dying at PROCURE_CRASH_AT."""

from __future__ import annotations

import asyncio
import sys

from fleet_fakes import NODE_TOKEN, HttpCloud
from procure.fleet.context import FleetContext
from procure.fleet.controller import scan_once
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.store import open_store

OWNER = "crash-test-controller"  # the restarted controller is the same one


async def main(cloud_url: str, db_url: str, node_port: int) -> None:
    cfg = FleetSettings(node_port=node_port, node_token=NODE_TOKEN, min_instances=1)
    ctx = FleetContext(
        store=open_store(db_url),
        cloud=HttpCloud(cloud_url),
        nodes=bounded_client(deadline_s=5),
        cfg=cfg,
        dry_run=False,
        owner=OWNER,
    )
    await scan_once(ctx)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
