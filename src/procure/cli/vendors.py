"""`procure vendors` (the registry: seed, clear-cooldown, list) and `procure mock-vendor`."""

from __future__ import annotations

from typing import Annotated

import typer

from procure.cli.common import (
    PORT,
    check_port,
    console,
    fail,
    key_errors,
    load_settings,
    print_json,
    store_errors,
    store_for,
    table,
)
from procure.numbers import number
from procure.safetext import redact, safe

vendors_app = typer.Typer(help="The vendor registry.", no_args_is_help=True)


def mock_vendor(
    vendor_id: Annotated[
        str, typer.Option(help="Which of the seeds' two vendors: gpu_vendor_1 or gpu_vendor_2")
    ],
    port: Annotated[int, typer.Option(help="Port to listen on", parser=PORT)] = 4001,
    job_seconds: Annotated[
        float | None,
        typer.Option(
            help="Real seconds per job (default: MOCK_JOB_SECONDS, else 6)",
            parser=number(0.01, 86400, "--job-seconds"),
        ),
    ] = None,
) -> None:
    """Run a mock GPU vendor. Honours GPU_VENDOR_SECRET, FAIL_VENDOR_ID, FAIL_RATE, FAIL_AT and
    MOCK_JOB_SECONDS."""
    from procure.vendors.registry import default_vendors

    settings = load_settings()
    known = {v.vendor_id: v for v in default_vendors()}
    if vendor_id not in known:  # the mock serves the seeds' terms: another id has none
        fail(f"--vendor-id: {safe(vendor_id, 100)} is not one of {', '.join(known)}", code=2)
    # After the checks: the server's imports (the x402 SDK, web3) cost seconds of a refusal
    import uvicorn

    from procure.local import facilitator_client, mock_fail_rate, mock_vendor_config
    from procure.vendors.mock import create_mock_vendor_app

    check_port("127.0.0.1", port)
    try:  # the facilitator says what the vendor is paid in
        cfg = mock_vendor_config(
            known[vendor_id],
            settings.facilitator_url,
            settings.gpu_vendor_secret.get_secret_value(),
            job_seconds=job_seconds or settings.mock_job_seconds,
            fail_rate=mock_fail_rate(settings, vendor_id),
            fail_at=settings.fail_at,
        )
    except RuntimeError as exc:
        fail(f"{exc}; start it with `procure facilitator` or set X402_FACILITATOR_URL")
    facilitator = facilitator_client(settings.facilitator_url)
    uvicorn.run(create_mock_vendor_app(cfg, facilitator), host="127.0.0.1", port=port)


@vendors_app.command("seed")
def vendors_seed(
    host: Annotated[
        str, typer.Option(help="Where the mock vendors listen: a host name or http(s)://host")
    ] = "http://localhost",
    port: Annotated[
        list[int] | None,
        typer.Option(
            help="The mock vendors' ports: give it twice (vendor 1, vendor 2); given once, "
            "vendor 2 gets the next port (default: 4001, 4002)",
            parser=PORT,
        ),
    ] = None,
) -> None:
    """Insert the seeds' two vendors (gpu_vendor_1 on :4001, gpu_vendor_2 on :4002), with
    GPU_VENDOR_SECRET as their credential (stored encrypted; see PROCURE_SECRET_KEY). The
    network and asset they are paid in come from the facilitator at X402_FACILITATOR_URL."""
    from procure.local import asset_info
    from procure.store import repo
    from procure.vendors.credentials import Keyring
    from procure.vendors.registry import default_vendors

    base, ports = seed_endpoints(host, port or [])
    settings = load_settings()
    try:
        info = asset_info(settings.facilitator_url, tries=10)
    except RuntimeError as exc:
        fail(f"{exc}; start it with `procure facilitator` or set X402_FACILITATOR_URL")
    with key_errors():  # the deployment's key
        keyring = Keyring.load(settings.home)
    credential = keyring.encrypt(settings.gpu_vendor_secret.get_secret_value())
    with store_errors(settings), store_for(settings).session() as s:
        for vendor in default_vendors(
            host=base,
            ports=ports,
            network=str(info["network"]),
            asset=str(info["asset"]),
            credential=credential,
        ):
            repo.save_vendor(s, vendor)
            console.print(
                f"seeded {safe(vendor.vendor_id)} ({safe(vendor.name)}) at {safe(vendor.endpoint)}"
            )


@vendors_app.command("clear-cooldown")
def vendors_clear_cooldown(
    vendor_id: Annotated[str, typer.Argument(help="The vendor to pick again now")],
) -> None:
    """End a vendor's cooldown now (after a failure, planners keep off it for
    VENDOR_COOLDOWN_S): for when you know it is fixed."""
    from procure.store import repo

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        vendor = repo.clear_cooldown(s, vendor_id)
    if vendor is None:
        fail(f"vendor {vendor_id} not found; `procure vendors list` shows the registered ids")
    console.print(f"{safe(vendor_id)}: cooldown cleared; planners may pick it again")


def seed_endpoints(host: str, ports: list[int]) -> tuple[str, tuple[int, int]]:
    """`--host` and `--port` as the base URL and the two vendors' ports, or one line saying
    what is wrong (a port inside --host would make `http://host:4001:4001`)."""
    from urllib.parse import urlsplit

    base = host if "://" in host else f"http://{host}"
    try:
        parts = urlsplit(base)
        given_port = parts.port
    except ValueError:
        fail(f"--host {host!r} is not a host name or an http(s) URL")
    # The API's own check of a vendor endpoint (no user or password in it, among others): what
    # `vendors seed` stores, `PUT /api/vendors` would have refused, and a password kept in an
    # endpoint is shown wherever the endpoint is (lists, pages, logs). First, so that no
    # message below repeats the password.
    problem = endpoint_problem(base)
    if problem:
        fail(f"--host {redact(base)!r}: {problem}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"--host {host!r} is not a host name or an http(s) URL")
    if given_port is not None:
        fail(f"--host {host!r} has a port: give the host alone and the ports with --port")
    if parts.path.strip("/") or parts.query or parts.fragment:
        fail(f"--host {host!r} has a path: give the scheme and host alone")
    if len(ports) > 2:
        fail("--port is given at most twice (vendor 1, vendor 2)")
    first = ports[0] if ports else 4001
    second = ports[1] if len(ports) == 2 else first + 1
    if second > 65535 or second == first:
        fail("--port: the two vendors need two different ports")
    return f"{parts.scheme}://{parts.netloc}", (first, second)


def endpoint_problem(url: str) -> str | None:
    """Why the API would refuse `url` as a vendor's endpoint, or None when it takes it."""
    from procure.api.schemas import VendorRegistration

    try:
        VendorRegistration._http_url(url)
    except ValueError as exc:
        return str(exc)
    return None


@vendors_app.command("list")
def vendors_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON list, with every field the table leaves out")
    ] = False,
) -> None:
    """Show the registry with what procure learned of each vendor: its reliability and its
    failure hazard (failures per GPU-hour)."""
    from procure.agent.context import hazard, reliability
    from procure.store import repo

    settings = load_settings()
    with store_errors(settings), store_for(settings).session() as s:
        vendors = repo.list_vendors(s)
    if as_json:
        print_json(
            [
                {**v.to_json(), "learnedReliability": reliability(v), "hazardPerHour": hazard(v)}
                for v in vendors
            ]
        )
        return
    out = table(  # 80 columns: the prior, ok and failed counts are in --json
        "vendor",
        "name",
        "endpoint",
        "$/h",
        "learned",
        "fail/h",
        "ok/fail",
        "GPUs",
        "cred",
        fold=("name", "endpoint", "GPUs"),
    )
    for v in vendors:
        out.add_row(  # names and endpoints came from outside: no markup, no escapes
            safe(v.vendor_id, 100),
            safe(v.name, 100),
            safe(v.endpoint, 200),
            f"{v.base_price_per_hour / 1e6:.2f}",
            f"{reliability(v):.3f}",
            f"{hazard(v):.3f}",
            f"{v.successes}/{v.failures}",
            safe(",".join(v.supported_gpu_types), 200),
            "yes" if v.has_credential else "none",
        )
    console.print(out)
