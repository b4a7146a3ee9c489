"""Starting a gateway: its configuration from the facilitator and the gateway's own wallet, in a
thread on loopback (tests, demos) or in the foreground (`procure gateway`), and the status
figures `procure gateway status` shows. `python -m procure.gateway.serve CONFIG.json` runs one
from a JSON file (the crash tests kill it)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from procure.clouds.base import Provider, RentalCloud
from procure.clouds.job import CloudJobSettings
from procure.gateway.app import create_gateway_app
from procure.gateway.runtime import Runtime
from procure.gateway.settings import GatewayConfig, cloud_from_env, load_node_key
from procure.gateway.storelease import GatewayConflict, claim
from procure.local import LocalServer, asset_info, facilitator_client, serve
from procure.payments.settlements import FacilitatorLedger
from procure.payments.wallet import load_or_create_account
from procure.scrape import ScrapeSettings
from procure.settings import Settings
from procure.store import Store, open_store

log = logging.getLogger(__name__)


def gateway_config(
    *,
    vendor_id: str,
    provider: Provider,
    facilitator_url: str,
    secret: str,
    home: Path,
    **options: Any,
) -> GatewayConfig:
    """A gateway's configuration: asset and network from the facilitator, payments to the
    gateway's own wallet (`<home>/gateway/wallet.key`, created once), node tokens from its own
    key. `options` are GatewayConfig's other fields (margin, max_instances, gpus, ...)."""
    info = asset_info(facilitator_url)
    account = load_or_create_account(None, home / "gateway")
    return GatewayConfig(
        vendor_id=vendor_id,
        secret=secret,
        provider=provider,
        pay_to=account.address,
        network=str(info["network"]),
        asset=str(info["asset"]),
        asset_extra={"name": info["name"], "version": info["version"]},
        node_key=load_node_key(home / "gateway"),
        **options,
    )


def gateway_app(
    cfg: GatewayConfig, store: Store, cloud: RentalCloud, facilitator_url: str, *, loop: bool = True
) -> FastAPI:
    runtime = Runtime(cfg=cfg, store=store, cloud=cloud, ledger=FacilitatorLedger(facilitator_url))
    return create_gateway_app(runtime, facilitator_client(facilitator_url), loop=loop)


def start_gateway(
    cfg: GatewayConfig,
    store: Store,
    cloud: RentalCloud,
    facilitator_url: str,
    port: int | None = None,
) -> LocalServer:
    """The gateway on 127.0.0.1 in a background thread (tests and demos); GatewayConflict if
    another gateway holds the store (said here, not lost in the server's startup)."""
    claim(cfg, store)
    return serve(gateway_app(cfg, store, cloud, facilitator_url), port)


def serve_gateway(
    cfg: GatewayConfig,
    *,
    database_url: str,
    facilitator_url: str,
    port: int,
    host: str = "127.0.0.1",
    cloud: RentalCloud | None = None,
) -> None:
    """`procure gateway`: serve in the foreground until interrupted."""
    store = open_store(database_url)
    try:
        claim(cfg, store)  # before the server: a refusal is its only line, not a traceback
    except GatewayConflict as exc:
        store.dispose()
        raise SystemExit(str(exc)) from None
    app = gateway_app(cfg, store, cloud or cloud_from_env(cfg.provider), facilitator_url)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def run_gateway(
    settings: Settings,
    *,
    cloud: Provider,
    port: int,
    vendor_id: str,
    margin: float = 0.1,
    max_instances: int = 2,
    gpus: tuple[str, ...] = (),
    host: str = "127.0.0.1",
    min_sale_s: float = 600.0,
    max_hourly_usd: float = 50.0,
    max_total_instances: int = 8,
    launch_retry_s: float = 60.0,
) -> None:
    """`procure gateway --cloud C --port P --vendor-id ID [--margin] [--max-instances] [--gpu]
    [--max-hourly-usd] [--max-total-instances] [--launch-retry-seconds]`: the buyers' bearer is
    GPU_VENDOR_SECRET, the facilitator X402_FACILITATOR_URL, the book the configured store, the
    cloud's key its provider's own variable."""
    job = CloudJobSettings()
    if not job.shared:
        log.warning(
            "PROCURE_CLOUD_CHECKPOINT_DIR is not a store every instance can reach (s3://, gs://, "
            "...): a buyer's job moved to another instance starts over"
        )
    if ScrapeSettings().metrics_token is None:
        log.warning(
            "PROCURE_METRICS_TOKEN is not set: /metrics, with the gateway's income and costs, "
            "opens to the buyers' shared bearer (set it: then only it opens them)"
        )
    cfg = gateway_config(
        vendor_id=vendor_id,
        provider=cloud,
        facilitator_url=settings.facilitator_url,
        secret=settings.gpu_vendor_secret.get_secret_value(),
        home=settings.home,
        margin=margin,
        max_instances=max_instances,
        gpus=tuple(g.upper() for g in gpus),
        min_sale_s=min_sale_s,
        max_hourly_usd=max_hourly_usd,
        max_total_instances=max_total_instances,
        launch_retry_s=launch_retry_s,
        command=job.argv,
        **({"checkpoint_dir": job.checkpoint_dir} if job.checkpoint_dir else {}),
    )
    log.info(
        "gateway %s selling %s, paid to %s, at most %d instances and $%.2f/h on the account",
        vendor_id,
        cloud,
        cfg.pay_to,
        cfg.max_total_instances,
        cfg.max_hourly_usd,
    )
    serve_gateway(
        cfg,
        database_url=settings.database_url,
        facilitator_url=settings.facilitator_url,
        port=port,
        host=host,
    )


def main(argv: list[str]) -> None:
    """Run a gateway from a JSON file: `config` (GatewayConfig's fields), `databaseUrl`,
    `facilitatorUrl`, `port`; the cloud from the environment."""
    spec = json.loads(Path(argv[0]).read_text())
    options = dict(spec["config"])
    for name in ("gpus", "command"):
        if name in options:
            options[name] = tuple(options[name])
    cfg = GatewayConfig(**options)
    serve_gateway(
        cfg,
        database_url=spec["databaseUrl"],
        facilitator_url=spec["facilitatorUrl"],
        port=int(spec["port"]),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
