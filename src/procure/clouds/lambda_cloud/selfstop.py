"""`python -m procure.clouds.lambda_cloud.selfstop INSTANCE_ID`: terminate an instance through
Lambda's API (LAMBDA_API_KEY, LAMBDA_API_URL): the GPU node's dead-man stop action
(GPU_WORKER_ON_ORPHAN) on a Lambda instance. Exit 0 when it is terminated or already gone."""

from __future__ import annotations

import asyncio
import sys

from procure.clouds.base import CloudError
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.pacing import unpaced


async def terminate(instance_id: str) -> int:
    cloud = LambdaCloud(pacer=unpaced())
    try:
        await cloud.terminate([instance_id])
    except CloudError as exc:  # its message never holds the key
        print(f"could not terminate {instance_id}: {exc}", file=sys.stderr)
        return 1
    finally:
        await cloud.aclose()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m procure.clouds.lambda_cloud.selfstop INSTANCE_ID", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(terminate(sys.argv[1])))
