"""`procure facilitator` and `procure wallet`: the local x402 chain and the agent's wallet on it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from procure.cli.common import PORT, check_port, console, fail, load_settings, print_json
from procure.numbers import number
from procure.safetext import redact, show_url

if TYPE_CHECKING:
    from procure.settings import Settings


def facilitator(
    port: Annotated[int, typer.Option(help="Port to listen on", parser=PORT)] = 4020,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
) -> None:
    """Run the local x402 facilitator (verify + settle on a local chain kept under PROCURE_HOME).

    At its first start it funds the agent's wallet (X402_PRIVATE_KEY, or the key kept under
    PROCURE_HOME, made if there is none) with PROCURE_WALLET_FUNDING test dollars; the chain's
    journal remembers, so a restart does not fund it again."""
    import uvicorn

    from procure.models import format_usd, usd_to_micros
    from procure.payments.facilitator import create_facilitator_app, fund_wallet_once, open_chain

    settings = load_settings()
    check_port(host, port)  # before the wallet is funded and the journal written
    settings.home.mkdir(parents=True, exist_ok=True)
    chain = open_chain(settings.home)
    console.print(f"chain {chain.network}, token {chain.token_address}")
    address = _wallet(settings).address
    funding = usd_to_micros(settings.wallet_funding_usd)
    if fund_wallet_once(chain, address, funding):
        console.print(f"funded the agent's wallet {address} with {format_usd(funding)}")
    console.print(f"agent wallet {address}: {format_usd(chain.balance_of(address))}")
    uvicorn.run(create_facilitator_app(chain), host=host, port=port)


def _wallet(settings: Settings):  # type: ignore[no-untyped-def]
    from procure.payments.wallet import load_or_create_account

    key = settings.x402_private_key.get_secret_value() if settings.x402_private_key else None
    try:
        return load_or_create_account(key, settings.home)
    except OSError as exc:  # PROCURE_HOME a file, read-only, ...
        fail(f"bad setting: PROCURE_HOME {settings.home}: {exc.strerror or exc}")


def wallet(
    fund: Annotated[
        float | None,
        typer.Option(
            help="Ask the local facilitator's faucet for this many test dollars",
            parser=number(0, 1e6, "--fund"),
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: address, balance, facilitator")
    ] = False,
) -> None:
    """The agent's wallet: its address and on-chain balance, from the facilitator (never its
    key). --fund AMOUNT mints test dollars to it first (local facilitator only)."""
    import httpx

    from procure.bounds import UnsafeInput, loads

    settings = load_settings()
    address = _wallet(settings).address
    url = settings.facilitator_url
    shown_url = show_url(url)  # the URL may carry a password (a facilitator behind basic auth)
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            if fund:
                minted = http.post("/faucet", json={"address": address, "amount": fund})
                minted.raise_for_status()
            answer = http.get(f"/balance/{address}")
            answer.raise_for_status()
            balance = loads(answer.content)
            float(balance["balance"])
    except (httpx.HTTPError, UnsafeInput, KeyError, TypeError, ValueError) as exc:
        detail = redact(str(exc).replace(url, shown_url))  # httpx names the URL it was asked
        fail(
            f"the facilitator at {shown_url} did not answer ({type(exc).__name__}: {detail}); "
            "start it with `procure facilitator` or set X402_FACILITATOR_URL"
        )
    if as_json:
        print_json({"address": address, "balance": balance["balance"], "facilitator": shown_url})
        return
    if fund:
        console.print(f"funded with ${fund:,.2f}")
    shown = float(balance["balance"])  # a number, or its text (checked above)
    console.print(f"address  {address}\nbalance  ${shown:,.2f}\nfacilitator {shown_url}")
