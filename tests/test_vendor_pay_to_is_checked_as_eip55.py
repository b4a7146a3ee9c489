"""A vendor's payee address is checked as EIP-55 says, without eth_utils on the serve path."""

from __future__ import annotations

import eth_utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from procure.api.schemas import VendorRegistration

BASE = {
    "vendorId": "v1",
    "name": "Vendor one",
    "endpoint": "http://127.0.0.1:9",
    "basePricePerHour": 1.5,
    "reliabilityScore": 0.9,
    "supportedGpuTypes": ["A100"],
}


def _pay_to(value: str) -> str | None:
    return VendorRegistration.model_validate({**BASE, "payTo": value}).pay_to


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=20, max_size=20))
def test_any_case_of_a_good_address_is_kept_in_its_checksum_form(raw: bytes) -> None:
    expected = eth_utils.to_checksum_address(raw)
    assert _pay_to("0x" + raw.hex()) == expected
    assert _pay_to("0x" + raw.hex().upper()) == expected
    assert _pay_to(expected) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=20, max_size=20), st.integers(min_value=0, max_value=39))
def test_a_mixed_case_typo_is_refused_as_a_checksum_error(raw: bytes, at: int) -> None:
    good = eth_utils.to_checksum_address(raw)
    hex_part = list(good[2:])
    letters = [i for i, c in enumerate(hex_part) if c.isalpha()]
    if len(letters) < 2 or len({hex_part[i].isupper() for i in letters}) < 2:
        return  # all one case: no checksum to get wrong
    i = letters[at % len(letters)]
    hex_part[i] = hex_part[i].swapcase()
    with pytest.raises(ValidationError, match="wrong EIP-55 checksum"):
        _pay_to("0x" + "".join(hex_part))


@pytest.mark.parametrize(
    "bad",
    [
        "0x" + "g" * 40,
        "0x" + "a" * 39,
        "52908400098527886E0F7030069857D2E4169EE7aa",
        "0x" + " " * 40,
    ],
)
def test_what_is_not_an_address_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="must be an EVM address"):
        _pay_to(bad)
