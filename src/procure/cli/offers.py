"""`procure offers` (every offer across the configured clouds and x402 vendors, cheapest first)
and `procure vendors add-cloud` (a cloud account as a vendor of the agent)."""

from __future__ import annotations

from typing import Annotated

import typer

from procure.cli.common import (
    check_port,
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
from procure.safetext import guard_logging, safe

PROVIDERS = ("lambda", "runpod", "vast")


def offers(
    gpu: Annotated[str | None, typer.Option(help="One GPU model, e.g. A100, H100, RTX4090")] = None,
    count: Annotated[
        int | None, typer.Option(help="GPUs per instance", parser=whole(1, 16, "--count"))
    ] = None,
    max_price: Annotated[
        float | None,
        typer.Option(
            help="At most this $/h for the instance", parser=number(0, 1e4, "--max-price")
        ),
    ] = None,
    spot: Annotated[
        bool | None,
        typer.Option("--spot/--on-demand", help="Only interruptible (or only on-demand) offers"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """Every offer across the clouds whose key is set (LAMBDA_API_KEY, RUNPOD_API_KEY,
    VAST_API_KEY) and the registered x402 vendors, cheapest first: what `sky show-gpus` and
    `dstack offer` show, over all your sources. A cloud that cannot be asked is named, not fatal."""
    import asyncio

    from procure.agent.cloud_clients import close_clouds
    from procure.agent.cloud_offers import all_offers
    from procure.clouds.registry import configured_clouds
    from procure.models import usd_to_micros
    from procure.store import repo

    settings = load_settings()
    with settings_errors():
        clients = configured_clouds()
    with store_errors(settings), store_for(settings).session() as s:
        vendors = repo.list_vendors(s)
    errors: list[str] = []

    async def ask() -> list:  # type: ignore[type-arg]
        try:
            return await all_offers(
                clients,  # type: ignore[arg-type]
                vendors,
                gpu=gpu,
                count=count,
                max_price=usd_to_micros(max_price) if max_price is not None else None,
                spot=spot,
                errors=errors,
            )
        finally:
            await close_clouds(clients)  # type: ignore[arg-type]

    rows = asyncio.run(ask())
    if as_json:
        print_json({"offers": [r.to_json() for r in rows], "errors": errors})
        return
    if not clients:
        console.print(
            "no cloud key set (LAMBDA_API_KEY, RUNPOD_API_KEY, VAST_API_KEY): x402 vendors only"
        )
    out = table(
        "source", "GPU", "n", "region", "$/h", "spot", "avail", "via", fold=("region", "via")
    )
    for r in rows:
        out.add_row(  # everything here came from a cloud or a vendor: no markup, no escapes
            safe(r.source, 20),
            safe(r.gpu, 20),
            str(r.gpu_count),
            safe(r.region, 40),
            f"{r.price_per_hour / 1e6:.3f}",
            "yes" if r.interruptible else "",
            str(r.available),
            safe(r.vendor_id or "", 60),
        )
    console.print(out)
    for e in errors:
        console.print(f"[yellow]{safe(e, 300)}")


def add_cloud(
    provider: Annotated[str, typer.Argument(help="lambda, runpod or vast")],
    gpu: Annotated[str, typer.Option(help="GPU model to rent, e.g. A100")],
    max_price: Annotated[
        float,
        typer.Option(
            help="At most this $/h for the instance", parser=number(0.001, 1e4, "--max-price")
        ),
    ],
    count: Annotated[
        int, typer.Option(help="GPUs per instance", parser=whole(1, 16, "--count"))
    ] = 1,
    spot: Annotated[
        bool, typer.Option("--spot", help="Interruptible offers (Vast.ai bids) allowed")
    ] = False,
    region: Annotated[
        list[str] | None, typer.Option(help="Only these regions (repeat; default any)")
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(help="Container image the job runs in (default: RUNPOD_IMAGE or VAST_IMAGE)"),
    ] = None,
    vendor_id: Annotated[
        str | None, typer.Option("--id", help="Vendor id (default PROVIDER-GPU)")
    ] = None,
    reliability: Annotated[
        float,
        typer.Option(help="Prior reliability, 0..1", parser=number(0, 1, "--reliability")),
    ] = 0.9,
) -> None:
    """Register a cloud account as a vendor of the agent: it launches an instance of the cheapest
    matching offer (under --max-price), runs the job there through the node's job runner, books
    what the provider bills, and terminates it when the job ends. The key is the provider's
    (LAMBDA_API_KEY, RUNPOD_API_KEY or VAST_API_KEY) and goes to that provider alone."""
    from pydantic import ValidationError

    from procure.agent.cloud_vendors import CloudVendorRequest, NotACloudVendor, save_cloud_vendor
    from procure.clouds.registry import KEY_VARS, has_key

    provider = provider.lower()
    if provider not in PROVIDERS:
        fail(f"unknown cloud {safe(provider)}: choose lambda, runpod or vast", code=2)
    try:
        body = CloudVendorRequest(
            provider=provider,  # type: ignore[arg-type]
            gpu=gpu,
            count=count,
            max_price_per_hour=float(max_price),
            spot=spot,
            regions=list(region or []),
            image=image,
            vendor_id=vendor_id,
            reliability=float(reliability),
        )
    except ValidationError as exc:
        fail(f"not a valid cloud vendor: {safe(exc.errors()[0].get('msg', exc), 200)}", code=2)
    settings = load_settings()
    try:
        with store_errors(settings):
            vendor, _new = save_cloud_vendor(store_for(settings), body)
    except NotACloudVendor as exc:
        fail(f"vendor {safe(str(exc))} is an x402 vendor: choose another --id", code=2)
    gpu_model = vendor.cloud.gpu if vendor.cloud else gpu
    console.print(
        f"vendor {safe(vendor.vendor_id)}: {safe(provider)} {gpu_model} ×{count} "
        f"at most ${max_price:,.2f}/h{' (spot allowed)' if spot else ''}"
    )
    if not has_key(provider):  # type: ignore[arg-type]
        console.print(
            f"[yellow]{KEY_VARS[provider]} is not set: the agent cannot rent from it until it is"  # type: ignore[index]
        )


gateway_app = typer.Typer(
    help="Sell a cloud account's GPUs over the seeds' x402 vendor protocol.",
    invoke_without_command=True,
)


@gateway_app.callback()
def gateway(
    ctx: typer.Context,
    cloud: Annotated[
        str | None, typer.Option(help="The account to sell: lambda, runpod or vast")
    ] = None,
    port: Annotated[
        int, typer.Option(help="Port to listen on", parser=whole(1, 65535, "--port"))
    ] = 4010,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface, for buyers)")
    ] = "127.0.0.1",
    vendor_id: Annotated[str, typer.Option(help="The vendor id buyers know it by")] = "gateway",
    margin: Annotated[
        float,
        typer.Option(
            help="Added to the cloud's price (0.1: 10 %)", parser=number(0, 10, "--margin")
        ),
    ] = 0.1,
    max_instances: Annotated[
        int,
        typer.Option(
            help="At most this many live jobs (each one instance) per buyer",
            parser=whole(1, 1000, "--max-instances"),
        ),
    ] = 2,
    gpu: Annotated[
        list[str] | None, typer.Option(help="GPU models offered (repeat; default: all)")
    ] = None,
    min_sale_minutes: Annotated[
        float,
        typer.Option(
            help="The shortest sale: a cloud that bills the boot is paid for it from the margin",
            parser=number(0, 1440, "--min-sale-minutes"),
        ),
    ] = 10.0,
    max_hourly_usd: Annotated[
        float,
        typer.Option(
            help=(
                "At most this many dollars per hour of the cloud account's instances over all "
                "buyers (live, launching and being ended); a sale past it is refused before "
                "payment, renewals are not. 0: no new sales"
            ),
            parser=number(0, 1_000_000, "--max-hourly-usd"),
        ),
    ] = 50.0,
    max_total_instances: Annotated[
        int,
        typer.Option(
            help=(
                "At most this many instances over all buyers (live, launching and being ended); "
                "a sale past it is refused before payment. 0: no new sales"
            ),
            parser=whole(0, 1000, "--max-total-instances"),
        ),
    ] = 8,
    launch_retry_seconds: Annotated[
        float,
        typer.Option(
            help=(
                "Once every region refused a job's launch (no capacity), wait this long before "
                "asking them all again"
            ),
            parser=number(1, 3600, "--launch-retry-seconds"),
        ),
    ] = 60.0,
) -> None:
    """Serve /quote, /submit-job (402 until paid over x402), /renew-job, /job-status and
    /cancel-job in front of a cloud account (its key: LAMBDA_API_KEY, RUNPOD_API_KEY or
    VAST_API_KEY). Buyers' bearer: GPU_VENDOR_SECRET; facilitator: X402_FACILITATOR_URL. A paid
    job runs on an instance launched for it and terminated when it ends. Over all buyers it
    holds at most --max-total-instances instances costing at most --max-hourly-usd an hour
    together. `procure gateway status` shows its book."""
    if ctx.invoked_subcommand is not None:
        return
    if cloud is None or cloud.lower() not in PROVIDERS:
        fail("--cloud: choose lambda, runpod or vast", code=2)
    _check_gateway_start(cloud.lower(), host, port)
    from procure.gateway.serve import run_gateway

    run_gateway(
        load_settings(),
        cloud=cloud.lower(),  # type: ignore[arg-type]
        port=port,
        host=host,
        vendor_id=vendor_id,
        margin=margin,
        max_instances=max_instances,
        gpus=tuple(g.upper() for g in gpu or ()),
        min_sale_s=min_sale_minutes * 60,
        max_hourly_usd=max_hourly_usd,
        max_total_instances=max_total_instances,
        launch_retry_s=launch_retry_seconds,
    )


def _check_gateway_start(provider: str, host: str, port: int) -> None:
    """Before the gateway serves: its cloud's key is set (else it would quote buyers an account
    it cannot rent from), its logging shows its start line (the wallet sales are paid to), and
    it says where buyers reach it (uvicorn itself is kept at warning level)."""
    import logging

    from procure.clouds.registry import KEY_VARS, has_key

    with settings_errors():
        keyed = has_key(provider)  # type: ignore[arg-type]
    if not keyed:
        var = KEY_VARS[provider]  # type: ignore[index]
        fail(f"{var} is not set: the gateway sells that {provider} account's GPUs")
    check_port(host, port)  # before the banner saying where it serves
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    guard_logging()
    shown = f"[{host}]" if ":" in host else host
    console.print(f"gateway on http://{shown}:{port} (Ctrl+C to stop)", soft_wrap=True)


@gateway_app.command("status")
def gateway_status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """The gateway's book: income, instance costs and margin, payments, jobs and instances."""
    # The book alone: `procure.gateway.serve` would bring the gateway's whole server stack
    # (FastAPI, x402, web3: seconds) into a store read
    from procure.gateway import book
    from procure.store import open_store

    settings = load_settings()
    with store_errors(settings):
        store = open_store(settings.database_url)
        try:
            data = book.figures(store)
        finally:
            store.dispose()
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        console.print(f"{key:<20} {safe(value, 200)}")
