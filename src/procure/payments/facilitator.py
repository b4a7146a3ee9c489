"""The local x402 facilitator: the facilitator HTTP API (`/supported`, `/verify`, `/settle`) over
the SDK's own exact-EVM facilitator scheme, settling on the in-process chain (see chain.py).

Besides the standard API it serves what a local set-up needs: `/asset` (what to price in),
`/faucet` (fund a wallet), `/balance/{address}`, and `/authorizations/{payer}/{nonce}` so the
agent can ask, after a crash, whether a payment's nonce was already settled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI
from fastapi import Path as InPath
from pydantic import BaseModel, Field
from x402.schemas import PaymentPayload, PaymentRequirements

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.models import format_usd, usd_to_micros
from procure.payments.chain import LocalChain, make_facilitator

log = logging.getLogger(__name__)
# What the chain can read: anything else was a 500 (the chain's own parse failing), not a 422.
ADDRESS = r"^0x[0-9a-fA-F]{40}$"
NONCE = r"^(0x)?[0-9a-fA-F]{64}$"  # EIP-3009's 32 bytes


class FaucetRequest(BaseModel):
    address: str = Field(pattern=ADDRESS)
    amount: float = Field(
        gt=0, le=1_000_000, allow_inf_nan=False, description="US dollars of test token to mint"
    )


def _parse(body: dict[str, Any]) -> tuple[PaymentPayload, PaymentRequirements]:
    return (
        PaymentPayload.model_validate(body["paymentPayload"]),
        PaymentRequirements.model_validate(body["paymentRequirements"]),
    )


def create_facilitator_app(chain: LocalChain) -> FastAPI:
    """The facilitator service over `chain`. Every answer is HTTP 200, as the SDK expects."""
    facilitator = make_facilitator(chain)
    app = FastAPI(title="procure local x402 facilitator")
    app.state.chain = chain
    app.state.facilitator = facilitator

    app.add_middleware(BoundedRequests)  # outermost: before any parser or authentication
    answer_invalid_requests(app)  # 422 naming the field, never quoting it (NaN: a 500)

    @app.get("/supported")
    async def supported() -> dict[str, Any]:
        return facilitator.get_supported().model_dump(by_alias=True, exclude_none=True)

    @app.post("/verify")
    async def verify(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        try:
            payload, requirements = _parse(body)
            result = await facilitator.verify(payload, requirements)
        except Exception as exc:  # a malformed request is an invalid payment, not a 500
            return {"isValid": False, "invalidReason": f"invalid_request: {exc}", "payer": ""}
        return result.model_dump(by_alias=True, exclude_none=True)

    @app.post("/settle")
    async def settle(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        try:
            payload, requirements = _parse(body)
            result = await facilitator.settle(payload, requirements)
        except Exception as exc:
            return {
                "success": False,
                "errorReason": f"invalid_request: {exc}",
                "transaction": "",
                "network": chain.network,
            }
        if result.success:
            log.info("settled %s on %s: %s", result.amount, result.network, result.transaction)
        return result.model_dump(by_alias=True, exclude_none=True)

    @app.get("/asset")
    async def asset() -> dict[str, Any]:
        return {
            "network": chain.network,
            "asset": chain.token_address,
            "name": chain.token_name,
            "version": chain.token_version,
            "decimals": 6,
        }

    @app.post("/faucet")
    async def faucet(body: FaucetRequest) -> dict[str, Any]:
        tx = chain.mint(body.address, usd_to_micros(body.amount))
        balance = chain.balance_of(body.address)
        return {
            "transaction": tx,
            "address": body.address,
            "balance": balance / 1e6,
            "message": f"minted {format_usd(usd_to_micros(body.amount))}",
        }

    @app.get("/balance/{address}")
    async def balance(address: str = InPath(pattern=ADDRESS)) -> dict[str, Any]:
        micros = chain.balance_of(address)
        return {"address": address, "balance": micros / 1e6, "atomic": str(micros)}

    @app.get("/authorizations/{payer}/{nonce}")
    async def authorization(
        payer: str = InPath(pattern=ADDRESS), nonce: str = InPath(pattern=NONCE)
    ) -> dict[str, Any]:
        used = chain.authorization_state(payer, nonce)
        paid = chain.settlement_for_nonce(payer, nonce) if used else None
        return {
            "used": used,
            "transaction": paid["transaction"] if paid else None,
            "payTo": paid["to"] if paid else None,
            "amount": str(paid["amount"]) if paid and paid["amount"] is not None else None,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "network": chain.network}

    return app


def fund_wallet_once(chain: LocalChain, address: str, amount: int) -> str | None:
    """Mint `amount` (micro-USD) to the agent's wallet unless the chain ever minted to it
    before (the journal keeps that across restarts); the mint's tx hash, or None."""
    if amount <= 0 or chain.minted_to(address) > 0:
        return None
    return chain.mint(address, amount)


def open_chain(home: Path) -> LocalChain:
    return LocalChain(home / "chain-journal.jsonl")
