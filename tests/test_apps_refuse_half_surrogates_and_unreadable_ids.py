"""Every service we run (the facilitator, the mock vendor, the mock clouds) answers a JSON body
holding half a UTF-16 surrogate pair (`"\\ud800"`, or its UTF-8 bytes) with a 400 from the shared
request bounds, and a number no float can be (NaN, Infinity, 1e999) with its own validation
answer naming the field, never a 500; the facilitator answers an address or nonce it cannot read
with a 422. A whole pair (an emoji), and such words inside strings, still pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.vast.mock import start_mock_cloud as start_vast
from procure.local import LocalServer, asset_info, facilitator_client, serve, start_facilitator
from procure.vendors.mock import create_mock_vendor_app
from procure.vendors.mock_config import MockVendorConfig

LONE = b"\\ud800"  # as JSON escapes it
RAW = "\ud800".encode("utf-8", "surrogatepass")  # the same, as bytes no UTF-8 text holds
SECRET = "vendor-secret"


@dataclass
class Services:
    facilitator: LocalServer
    vendor: LocalServer
    runpod: str
    runpod_key: str
    vast: str
    vast_key: str


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp: Path = tmp_path_factory.mktemp("apps")
    facilitator = start_facilitator(tmp / "journal")
    info = asset_info(facilitator.url)
    cfg = MockVendorConfig(
        vendor_id="v1",
        name="mock",
        price_per_hour=400_000,
        secret=SECRET,
        pay_to="0x" + "1" * 40,
        network=str(info["network"]),
        asset=str(info["asset"]),
        asset_extra={"name": info["name"], "version": info["version"]},
    )
    vendor = serve(create_mock_vendor_app(cfg, facilitator_client(facilitator.url)))
    runpod, vast = start_runpod(), start_vast()
    yield Services(facilitator, vendor, runpod.url, runpod.api_key, vast.url, vast.api_key)
    for server in (vendor, facilitator):
        server.stop()
    runpod.stop()
    vast.stop()


def send(url: str, body: bytes, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(url, content=body, headers=headers, timeout=15)


post = send


def refused(answer: httpx.Response, why: str = "surrogate|UTF-8") -> None:
    assert answer.status_code == 400, (answer.status_code, answer.text)
    assert any(word in answer.json()["error"] for word in why.split("|")), answer.text


def _utf16(body: bytes) -> bytes:
    return body.decode("utf-8", "surrogatepass").encode("utf-16-le", "surrogatepass")


@pytest.mark.parametrize(
    ("half", "encoded"),
    [(LONE, bytes), (RAW, bytes), (RAW, _utf16)],
    ids=["escaped", "utf8-bytes", "utf16-body"],
)
def test_half_a_surrogate_pair_is_a_400_at_every_service(
    services: Services, half: bytes, encoded: Callable[[bytes], bytes]
) -> None:
    """Before the fix: FastAPI's own 422 quotes the input, which half a pair cannot be encoded
    in: the facilitator (`/verify`, `/settle`, `/faucet`), the mock vendor (`/quote`,
    `/cancel-job`, `/admin/faults`) and the mock clouds' admin routes answered 500, their logs a
    UnicodeEncodeError traceback. And (utf16-body) the bounds looked for it in UTF-8 bytes only,
    while JSON's parser also reads a body in UTF-16: such a body passed them."""
    fac, vendor = services.facilitator.url, services.vendor.url

    def post(url: str, body: bytes, token: str | None = None) -> httpx.Response:
        return send(url, encoded(body), token)

    refused(post(f"{fac}/verify", b'"' + half + b'"'))
    refused(post(f"{fac}/settle", b'"' + half + b'"'))
    refused(post(f"{fac}/faucet", b'{"address": "' + half + b'", "amount": 1}'))
    refused(post(f"{vendor}/quote", b'{"gpuType": "' + half + b'", "hours": 1}', SECRET))
    refused(post(f"{vendor}/cancel-job", b'"' + half + b'"', SECRET))
    refused(post(f"{vendor}/admin/faults", b'"' + half + b'"', SECRET))
    for url, key in ((services.runpod, services.runpod_key), (services.vast, services.vast_key)):
        refused(post(f"{url}/admin/faults", b'{"x": "' + half + b'"}', key))
        refused(post(f"{url}/admin/capacity", b'{"x": "' + half + b'"}', key))


def test_a_whole_surrogate_pair_still_passes_the_bounds(services: Services) -> None:
    """An emoji escaped as its pair is text: the route answers it (here: no such GPU)."""
    answer = post(
        f"{services.vendor.url}/quote", b'{"gpuType": "\\ud83d\\ude00", "hours": 1}', SECRET
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "GPU type \U0001f600 not offered"


def refused_naming(answer: httpx.Response, status: int, field: str) -> None:
    """Refused where the field is known: the status the app gives a wrong field, naming it."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert f"{field}: Input should be a finite number" in answer.text, answer.text


@pytest.mark.parametrize("number", [b"NaN", b"-Infinity", b"1e999", b"9" * 400 + b".5"])
def test_a_number_no_float_can_be_is_refused_naming_its_field_at_every_service(
    services: Services, number: bytes
) -> None:
    """Before the fix: Python's JSON reads NaN and Infinity, and 1e999 as infinity; FastAPI's
    own 422 quotes the input and cannot render it ("Out of range float values are not JSON
    compliant"): the facilitator's `/faucet`, the mock vendor's `/quote` and the mock clouds'
    admin routes answered 500. Now each app's own validation answer names the field (the
    facilitator and mock vendor a 422 `{"error": ...}`, RunPod's mock its problem+json 422,
    Vast's mock its 400 `invalid_args`), never quoting the number."""
    fac, vendor = services.facilitator.url, services.vendor.url
    address = b'"0x' + b"1" * 40 + b'"'
    faucet = post(f"{fac}/faucet", b'{"address": ' + address + b', "amount": ' + number + b"}")
    refused_naming(faucet, 422, "amount")
    assert faucet.json()["error"].startswith("invalid request: amount")
    quote = post(f"{vendor}/quote", b'{"gpuType": "A100", "hours": ' + number + b"}", SECRET)
    refused_naming(quote, 422, "hours")
    assert quote.json()["details"] == ["hours: Input should be a finite number"]
    for url, key, status in (
        (services.runpod, services.runpod_key, 422),
        (services.vast, services.vast_key, 400),
    ):
        refused_naming(
            post(f"{url}/admin/faults", b'{"hang_s": ' + number + b"}", key), status, "hang_s"
        )
        capacity = b'{"gpu": "A100", "region": "x", "count": ' + number + b"}"
        refused_naming(post(f"{url}/admin/capacity", capacity, key), status, "count")


def test_such_words_inside_strings_still_pass_the_bounds(services: Services) -> None:
    """NaN, Infinity, 1e999 and an escaped backslash before `ud800` are text in a string."""
    body = b'{"gpuType": "NaN Infinity 1e999 \\\\ud800", "hours": 1}'
    answer = post(f"{services.vendor.url}/quote", body, SECRET)
    assert answer.status_code == 400, answer.text
    assert "not offered" in answer.json()["error"], answer.text


@pytest.mark.parametrize(
    "path",
    ["/balance/x", "/balance/%ED%A0%80", "/authorizations/x/x", "/authorizations/0x12/%ED%A0%80"],
)
def test_the_facilitator_answers_an_unreadable_address_or_nonce_with_a_422(
    services: Services, path: str
) -> None:
    """Before the fix: the chain's own parse of the address or nonce failed: a 500."""
    answer = httpx.get(f"{services.facilitator.url}{path}", timeout=15)
    assert answer.status_code == 422, answer.text
    nonce = "0x" + "2" * 64
    known = httpx.get(f"{services.facilitator.url}/authorizations/0x{'1' * 40}/{nonce}")
    assert known.status_code == 200 and known.json()["used"] is False
