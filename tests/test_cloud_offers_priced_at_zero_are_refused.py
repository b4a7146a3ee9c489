"""A cloud offer priced at $0/h or less is never rented: nothing could be reserved against it, so
no budget would stop the instance. The run rents a priced offer instead (or none), and its log
says once why the others were refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloud_fakes import FakeCloud, cloud_vendor, make_deps, new_run, new_store, offer, tmp_url
from procure.agent.cloud_offers import all_offers
from procure.agent.tick import tick
from procure.clouds.base import Offer
from procure.store import cloud_repo, repo

REFUSED = "priced at zero or less"


def _offers(*prices: float) -> list[Offer]:
    return [offer("runpod", f"o{i}", p, region=f"r{i}") for i, p in enumerate(prices)]


def test_a_free_offer_is_refused_and_a_priced_one_rented(tmp_path: Path) -> None:
    """Before the fix: the $0/h offer matched the vendor's terms and, cheapest, was rented with
    $0 reserved: the instance ran with no budget able to stop it."""
    cloud = FakeCloud("runpod", _offers(0.0, -1.0, 3.0), job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 5.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0, hours=0.01)

    async def ticks() -> None:
        for _ in range(4):
            await tick(deps, run_id)

    asyncio.run(ticks())
    with store.session() as s:
        instances = cloud_repo.instances_of_run(s, run_id)
        state = repo.load_state(s, run_id)
    assert state is not None
    assert [i.offer["price_per_hour"] for i in instances] == [3_000_000]
    said = [o.content for o in state.observations if REFUSED in o.content]
    assert len(said) == 1, said
    assert "2 runpod offer(s)" in said[0] and "o0 in r0 at $0/h" in said[0]


def test_a_run_offered_only_free_instances_rents_none_and_says_why_once(tmp_path: Path) -> None:
    """Before the fix: a run offered only $0/h instances rented one, with $0 reserved."""
    cloud = FakeCloud("runpod", _offers(0.0), job_s=0.3)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 5.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0, hours=0.01)

    async def ticks() -> None:
        for _ in range(5):
            await tick(deps, run_id)

    asyncio.run(ticks())
    assert cloud.launches == 0
    with store.session() as s:
        assert cloud_repo.instances_of_run(s, run_id) == []
        state = repo.load_state(s, run_id)
    assert state is not None
    said = [o.content for o in state.observations if REFUSED in o.content]
    assert len(said) == 1, [o.content for o in state.observations]


def test_a_free_offer_is_listed_but_not_as_a_vendors() -> None:
    """`procure offers` lists what the cloud offers, but names no vendor that would rent it."""
    cloud = FakeCloud("runpod", _offers(0.0, 3.0))
    rows = asyncio.run(all_offers({"runpod": cloud}, [cloud_vendor("rp", "runpod", 5.0)]))  # type: ignore[dict-item]
    assert [(r.price_per_hour, r.vendor_id) for r in rows] == [(0, None), (3_000_000, "rp")]
