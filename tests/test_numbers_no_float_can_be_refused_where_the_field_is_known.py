"""A number no float can be (NaN, Infinity, or one past a float's range such as `1e999`, which
Python's JSON reads as infinity) is refused by each service's own validation, where the field is
known, in that service's envelope and naming the field, never quoting it: no request bound parses
every body a second time for it. The gateway refuses one anywhere in a paid submission's
`jobParams` before the payment is settled; validation answers stay short however many fields are
wrong. Real gateway, facilitator and chain on loopback."""

from __future__ import annotations

import json

import httpx

from procure.asgibounds import MAX_PROBLEMS, field_problems
from procure.gateway import book
from procure.vendors.protocol import SubmitRequest
from test_gateway import GatewayWorld, buyer, gw, nonce, quote, signed_payment, submit

__all__ = ["gw"]  # the gateway world fixture, shared with test_gateway


def test_a_quote_for_a_number_of_hours_no_float_can_be_is_a_422_naming_hours(
    gw: GatewayWorld,
) -> None:
    for number in (b"NaN", b"Infinity", b"1e999"):
        answer = httpx.post(
            f"{gw.url}/quote",
            content=b'{"gpuType": "RTX4090", "hours": ' + number + b"}",
            headers=gw.headers() | {"Content-Type": "application/json"},
        )
        assert answer.status_code == 422, answer.text
        assert answer.json() == {
            "error": "invalid request: hours: Input should be a finite number",
            "details": ["hours: Input should be a finite number"],
        }


def test_a_paid_submission_whose_job_params_hold_1e999_is_refused_before_settlement(
    gw: GatewayWorld,
) -> None:
    """With the bounds no longer parsing every body for such numbers, the submission's parser
    (`bounds.loads`, as it does NaN and Infinity) refuses them: were it taken, the buyer paid for
    a job whose parameters no JSON column of PostgreSQL keeps and no answer can echo."""
    account = buyer(gw, "inf")
    q = quote(gw)
    first = submit(gw, "inf", q)
    assert first.status_code == 402
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], account, nonce())
    headers = gw.headers("inf", q["quoteId"]) | {
        "PAYMENT-SIGNATURE": payment,
        "Content-Type": "application/json",
    }
    params = {"opt": {"lr": [0.1, "HUGE"]}}
    body = json.dumps({"quoteId": q["quoteId"], "jobParams": params}).replace('"HUGE"', "1e999")
    answer = httpx.post(f"{gw.url}/submit-job", content=body, headers=headers, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json() == {  # never quoted
        "error": "malformed JSON: not JSON: a number past a float's range"
    }
    assert gw.income() == 0
    assert gw.pods() == [] and book.figures(gw.store)["jobs"] == {}


def test_job_params_take_any_finite_json() -> None:
    params = {"epochs": 3, "lr": 1e-4, "big": 1e308, "name": "NaN Infinity", "on": True}
    taken = SubmitRequest.model_validate({"quoteId": "q", "jobParams": params | {"x": [None]}})
    assert taken.job_params["name"] == "NaN Infinity"


def test_validation_answers_name_a_few_fields_and_count_the_rest() -> None:
    """A body of 10,000 wrong items is named in a few clipped lines, never echoed."""
    errors = [
        {"loc": ("body", "items", n), "msg": "Input should be a finite number", "input": 1e999}
        for n in range(10_000)
    ]
    lines = field_problems(errors)
    assert len(lines) == MAX_PROBLEMS + 1
    assert lines[0] == "items.0: Input should be a finite number"
    assert lines[-1] == f"... and {10_000 - MAX_PROBLEMS:,} more"
    long = field_problems([{"loc": ("body", "k" * 5_000), "msg": "Field required"}])
    assert len(long[0]) <= 300
