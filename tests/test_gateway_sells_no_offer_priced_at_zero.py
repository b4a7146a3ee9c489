"""The gateway never prices a sale, or launches a sold job, on a cloud offer that says it costs
nothing: a catalogue's price of $0 (or one under a micro-dollar) is not a free GPU but a price
the gateway does not know, and the cloud bills the instance at its real one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx

from procure.gateway import book
from test_gateway import buy, job_status, quote, start_gateway_world, wait_for


class _PricedAtZero:
    """The mock RunPod, its offers of the GPU `zero` shown at $0 per hour (to every read, or with
    `launches_only` to the launches' reads alone); it launches and bills as ever."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.zero, self.launches_only = inner, "", False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        found = await self.inner.offers(**kwargs)
        if self.launches_only and "gpu" not in kwargs:  # a quote's or a submit's catalogue
            return list(found)
        return [
            dataclasses.replace(o, price_per_hour=0) if o.gpu == self.zero else o for o in found
        ]


def test_an_offer_at_zero_dollars_is_neither_quoted_nor_launched_on(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: an offer the cloud listed at $0 an hour was the cheapest: quoted at its
    price plus the margin, $0, so the quote asked a micro-dollar for a day of GPU; and a job
    sold at the real price was launched on it (the cheapest offer within the sale), booked as
    costing nothing while the cloud billed it."""
    g = start_gateway_world(tmp_path, sqlite_url)
    try:
        rt = g.server.app.state.runtime
        rt.cloud = cloud = _PricedAtZero(rt.cloud)
        cloud.zero = "RTX4090"
        answer = httpx.post(
            f"{g.url}/quote", json={"gpuType": "RTX4090", "hours": 24}, headers=g.headers()
        )
        assert answer.status_code == 409, f"quoted on a $0 offer: {answer.text}"
        assert quote(g, gpu="A100")["amount"] > 0.1  # a GPU with a price is quoted as ever
        # A job sold at the real price is not launched on the $0 offer either.
        cloud.launches_only = True
        wait_for(lambda: _quoted(g), 30)  # once the gateway's cached catalogue is read again
        job_id = buy(g, "real-price")
        wait_for(lambda: "no RTX4090 capacity" in _error(g, job_id), 30)
        with g.store.session() as s:
            assert book.instances_of(s, job_id) == [], "launched on an offer priced at $0"
        cloud.zero = ""  # the price is shown again: the job is launched at it
        wait_for(lambda: job_status(g, job_id)["status"] == "completed", 60)
        wait_for(lambda: g.live_pods() == [] and _booked(g, job_id), 60)  # terminated, billed
        with g.store.session() as s:
            [instance] = book.instances_of(s, job_id)
            assert instance.price_per_hour > 0 and (instance.cost or 0) > 0
    finally:
        g.stop()


def _quoted(g: Any) -> bool:
    """Whether an RTX4090 is quoted at a price now."""
    answer = httpx.post(
        f"{g.url}/quote", json={"gpuType": "RTX4090", "hours": 1}, headers=g.headers()
    )
    return answer.status_code == 200 and answer.json()["pricePerHour"] > 0


def _error(g: Any, job_id: str) -> str:
    """The job's error as the book holds it (a buyer is shown it once the job failed)."""
    with g.store.session() as s:
        row = book.job(s, job_id)
        return (row.error or "") if row is not None else ""


def _booked(g: Any, job_id: str) -> bool:
    """Whether every instance of the job has its cost booked."""
    with g.store.session() as s:
        return all(i.cost is not None for i in book.instances_of(s, job_id))
