"""A cloud client that does not say whether its cloud bills the boot (`Cloud.bills_boot`) is
planned for as if it did, and warned of once: taken not to, a boot already billed by the hour
would be called off when its job went elsewhere (its paid hour thrown away), and an instance's
paid hour would be counted from after its boot, so it would be kept into an hour it never meant
to buy. A client that says either way is taken at its word."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fleet_fakes import FakeCloud
from procure.fleet.signal import cloud_billing
from test_fleet_billing_as_the_cloud_says import _boot_whose_job_went_elsewhere
from test_fleet_signal import MultiGpuCloud, Queue


@pytest.fixture
def queue() -> Iterator[Queue]:
    q = Queue()
    try:
        yield q
    finally:
        q.stop()


@dataclass
class NebulaCloud(FakeCloud):
    """A provider procure has no folder for, billed by the hour, whose client does not say
    whether the boot is billed."""

    billing_increment_s: int = 3600


def test_a_cloud_silent_on_its_boot_keeps_a_boot_whose_job_went_elsewhere(
    sqlite_url: str, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix: the silent cloud was taken not to bill its boot, so its boot, which it
    may well have billed an hour for already, was called off once its job found a place
    elsewhere."""
    with caplog.at_level(logging.WARNING, logger="procure.fleet.signal"):
        _booting, acts = asyncio.run(
            _boot_whose_job_went_elsewhere(sqlite_url, queue, NebulaCloud())  # type: ignore[arg-type]
        )
    assert acts == []
    said = [r.getMessage() for r in caplog.records if "bills_boot" in r.getMessage()]
    # Once, though every scan read its billing.
    assert said == [
        f"cloud client {__name__}.NebulaCloud does not say whether its cloud bills the boot "
        "(bills_boot): the fleet plans as if it does"
    ]


class Silent:
    billing_increment_s = 60


class SaysNot:
    billing_increment_s = 60
    bills_boot = False


class SaysSo:
    billing_increment_s = 3600
    bills_boot = True


class Garbled:
    billing_increment_s = 3600
    bills_boot = "no"


def test_a_client_is_taken_at_its_word_and_a_silent_one_as_billing_the_boot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the fix: `Silent` and `Garbled` (a `bills_boot` that is no bool) read as not
    billing the boot."""
    with caplog.at_level(logging.WARNING, logger="procure.fleet.signal"):
        assert cloud_billing(Silent) == (60.0, True)
        assert cloud_billing(Silent()) == (60.0, True)  # the client, as the fleet holds it
        assert cloud_billing(Garbled) == (3600.0, True)
        assert cloud_billing(SaysNot) == (60.0, False)
        assert cloud_billing(SaysSo) == (3600.0, True)
        assert cloud_billing(MultiGpuCloud()) == (60.0, False)
    warned = [r.getMessage().split()[2] for r in caplog.records if "bills_boot" in r.getMessage()]
    assert warned == [f"{__name__}.Silent", f"{__name__}.Garbled"]
