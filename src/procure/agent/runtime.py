"""Assembling a tick's dependencies from settings: store, vendor client, wallet, ledger, planner."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from procure.agent.deps import CloudTuning
from procure.agent.planner import DETERMINISTIC, Planner
from procure.agent.tick import AgentDeps
from procure.clouds.job import CloudJobSettings
from procure.models import usd_to_micros
from procure.payments.settlements import FacilitatorLedger
from procure.payments.wallet import load_or_create_account
from procure.settings import Settings
from procure.store import Store
from procure.store.ledger import load_caps

log = logging.getLogger(__name__)


def choose_planner(settings: Settings) -> Planner:
    if settings.planner_mode == "llm":
        from procure.agent.llm_planner import make_llm_planner

        return make_llm_planner(settings)
    return DETERMINISTIC[settings.planner_mode]


def make_deps(
    settings: Settings,
    store: Store,
    *,
    vendor_transport: httpx.AsyncBaseTransport | None = None,
    facilitator_transport: httpx.AsyncBaseTransport | None = None,
    clouds: dict[str, Any] | None = None,
) -> AgentDeps:
    """The agent's dependencies from the settings; `clouds` (by provider) instead of a client
    for every cloud whose key is in the environment (the demos use their mock clouds)."""
    from procure.agent.cloud_clients import clouds_from_env
    from procure.vendors.client import VendorClient
    from procure.vendors.credentials import Keyring

    job = CloudJobSettings()
    rental = clouds_from_env() if clouds is None else clouds
    if clouds is None and rental and not job.shared:
        log.warning(
            "PROCURE_CLOUD_CHECKPOINT_DIR is not a store every instance can reach (s3://, gs://, "
            "...): a cloud job moved to another instance starts over"
        )
    return AgentDeps(
        store=store,
        vendors=VendorClient(
            Keyring.load(settings.home),  # each vendor's own stored credential, to it alone
            timeout_s=settings.vendor_timeout_s,
            transport=vendor_transport,
        ),
        account=load_or_create_account(
            settings.x402_private_key.get_secret_value() if settings.x402_private_key else None,
            settings.home,
        ),
        ledger=FacilitatorLedger(settings.facilitator_url, transport=facilitator_transport),
        planner=choose_planner(settings),
        cooldown_s=settings.vendor_cooldown_s,
        payment_overhead=usd_to_micros(settings.payment_overhead_usd),
        auth_window_s=settings.payment_window_s,
        auth_margin_s=settings.payment_margin_s,
        max_troubles=settings.max_troubles,
        stall_s=settings.stall_s,
        first_slice_fraction=settings.first_slice_fraction,
        spend_caps=load_caps(),
        clouds=rental,
        cloud=CloudTuning(command=job.argv, checkpoint_dir=job.checkpoint_dir),
        keyring=Keyring.load(settings.home),  # also seals each instance's node token
    )


async def close_deps(deps: AgentDeps) -> None:
    from procure.agent.cloud_clients import close_clouds

    await deps.vendors.aclose()
    await deps.ledger.aclose()
    await close_clouds(deps.clouds)
