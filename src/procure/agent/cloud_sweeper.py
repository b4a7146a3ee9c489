"""The sweeper: instances carrying the agent's label (`procure-job-...`) that no live run owns (a
crash between launch and record on a run that then ended, a terminate lost) are terminated, each
one recorded on its run (or logged when no run knows it) and its bill booked. Run by the worker
every `CloudTuning.sweep_every_s`; a terminate that fails is tried again at the next sweep."""

from __future__ import annotations

import logging

from procure.agent.cloud_money import computed_bill
from procure.agent.deps import OBS, AgentDeps
from procure.clouds.base import LABEL_PREFIX, CloudError
from procure.models import OfferTerms, PaymentStatus, format_usd
from procure.store import cloud_repo, repo

log = logging.getLogger(__name__)
AGENT_PREFIX = LABEL_PREFIX + "job-"  # the agent's instances; the fleet's and gateway's are theirs


async def sweep(deps: AgentDeps) -> list[str]:
    """Terminate the agent's orphaned instances on every configured cloud; their names."""
    swept: list[str] = []
    for provider, client in sorted(deps.clouds.items()):
        try:
            instances = await client.labelled()
        except CloudError as exc:
            log.warning("sweeper: cannot list %s instances: %s", provider, exc)
            continue
        for instance in instances:
            name = instance.name or ""
            if not name.startswith(AGENT_PREFIX) or instance.status == "terminated":
                continue
            with deps.store.session() as s:
                if cloud_repo.live_owner(s, name):
                    continue
                record = cloud_repo.get_instance(s, name)
            try:
                await client.terminate([instance.id])
                billed = await client.billed(instance.id)
            except CloudError as exc:
                log.warning("sweeper: terminate of %s on %s failed: %s", name, provider, exc)
                continue
            swept.append(name)
            if record is None:
                log.warning(
                    "sweeper: terminated %s (%s %s): no run knows it", name, provider, instance.id
                )
                continue
            _book(deps, record, instance.id, billed)
    return swept


def _book(
    deps: AgentDeps, record: cloud_repo.CloudInstance, instance_id: str, billed: int | None
) -> None:
    """Record the sweep on the run; book the bill if the run never did (its payment pending)."""
    with deps.store.session() as s:
        note = ""
        if record.status != "terminated":
            state = repo.load_state(s, record.run_id, observations=False)
            ours = [p for p in (state.payments if state else []) if p.job_id == record.job_id]
            # Pending, or marked failed by someone who took it for an x402 payment that expired.
            pending = [p for p in ours if p.status == PaymentStatus.pending][-1:] or [
                p for p in ours if p.status == PaymentStatus.failed
            ][-1:]
            if any(p.status == PaymentStatus.completed for p in ours):
                pending = []
            if billed is None:  # no billing endpoint (Lambda): its rule, as the tick books it
                billed = computed_bill(record, OfferTerms.model_validate(record.offer))
            for p in pending:
                status = PaymentStatus.completed if billed else PaymentStatus.failed
                repo.update_payment(s, p.id, amount=billed, status=status, error_message=None)
                note = f"; booked {format_usd(billed)} as billed"
            if pending:
                repo.refresh_budget(s, record.run_id)
            cloud_repo.update_instance(
                s, record.name, status="terminated", billed=billed, instance_id=instance_id
            )
        repo.add_observation(
            s,
            record.run_id,
            OBS.error,
            f"Sweeper terminated instance {record.name} ({record.provider} {instance_id}): "
            f"no live run owns it{note}",
            vendor_id=record.vendor_id,
        )
