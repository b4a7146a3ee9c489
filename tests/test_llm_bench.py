"""`benchmarks/llm_planner.py` (what `make llm-bench` runs) against a scripted OpenAI-compatible
endpoint on loopback: its plumbing is checked without building llama.cpp or loading a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmark_scripts import benchmark
from procure.local import LocalServer, serve
from test_llm_planner import FakeLLM, Reply, answer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_planner.py"


bench = benchmark("llm_planner")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[tuple[FakeLLM, LocalServer]]:
    fake = FakeLLM()
    server = serve(fake.app())
    yield fake, server
    server.stop()


def run_bench(
    endpoint: tuple[FakeLLM, LocalServer],
    script: list[Reply],
    capsys: pytest.CaptureFixture[str],
    *extra: str,
) -> dict[str, Any]:
    fake, server = endpoint
    fake.script[:] = script
    fake.requests.clear()
    url = f"{server.url}/v1"
    argv = ["--base-url", url, "--jobs", "2", "--seed", "3", "--timeout", "10", *extra]
    assert bench.main(argv) == 0
    return json.loads(capsys.readouterr().out) if "--json" in extra else {}


def test_a_model_that_is_always_overruled_costs_what_the_heuristic_does(
    endpoint: tuple[FakeLLM, LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    script = [
        answer(action="start_job", vendorId="vendor_1234567890", hours=2, reason="cheapest"),
        Reply(content="I would pick the bargain vendor"),
        answer(action="launch", reason="x"),
    ]  # then empty answers, as the script runs dry
    result = run_bench(endpoint, script, capsys, "--json")
    fake, _ = endpoint

    # Every decision fell back to the heuristic: the same jobs, the same money, all completed.
    assert result["all_within_budget"] is True
    assert result["completed_within_budget"] == 2
    assert result["llm"] == result["heuristic"]
    assert result["llm_x_heuristic"] == 1.0
    decisions = result["decisions"]
    assert decisions == len(fake.requests) >= 3
    assert result["overruled"] == decisions and result["overrule_rate"] == 1.0
    assert result["overrule_reasons"] == {
        "guard: unknown vendor": 1,
        "answer not JSON": 1,
        "answer off the Action schema": 1,
        "empty answer": decisions - 3,
    } or result["overrule_reasons"] == {  # exactly three decisions: no empty answer
        "guard: unknown vendor": 1,
        "answer not JSON": 1,
        "answer off the Action schema": 1,
    }
    assert "vendor_1234567890" in result["overrule_examples"]["guard: unknown vendor"]
    assert result["accepted"] == {}
    assert result["seconds_per_decision"]["mean"] > 0
    # The request is procure's: the model named on the command line, a JSON-schema format.
    body = fake.requests[0]["body"]
    assert body["model"] == bench.DEFAULT_MODEL
    assert body["response_format"]["type"] == "json_schema"
    assert "vendors" in body["messages"][1]["content"]
    # However many payments the runs made, what the model reads stays short.
    assert max(len(r["body"]["messages"][1]["content"]) for r in fake.requests) < 4000


def test_a_model_that_aborts_is_reported_as_missing_the_goal(
    endpoint: tuple[FakeLLM, LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    script = [answer(action="abort", reason="too risky")] * 2
    run_bench(endpoint, script, capsys)
    out = capsys.readouterr().out

    assert "[MISSED] every sampled job completed within budget: 0/2" in out
    assert "accepted model actions: {'abort': 2}" in out
    assert "overruled: 0 (0.0%)" in out


def test_a_model_that_keeps_waiting_is_capped_and_the_heuristic_finishes(
    endpoint: tuple[FakeLLM, LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    script = [answer(action="wait", reason="later")] * 3
    result = run_bench(endpoint, script, capsys, "--json", "--max-decisions", "3")

    assert result["decisions"] == 3 and result["accepted"] == {"wait": 3}
    assert result["decisions_past_cap"] > 0
    assert result["all_within_budget"] is True


def llama_cpp_like(fake: FakeLLM) -> Any:
    """`fake` behind what llama-cpp-python's server (0.3.36) does with a `json_schema` response
    format: its request model knows only "text" and "json_object" (with an optional schema), and
    it answers the validation error with HTTP 500."""
    inner = fake.app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if json.loads(body or b"{}").get("response_format", {}).get("type") == "json_schema":
            fake.requests.append({"body": json.loads(body), "authorization": ""})
            message = (
                "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
                "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}"
            )
            detail = json.dumps({"error": {"message": message}}).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            return await send({"type": "http.response.body", "body": detail})

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await inner(scope, replay, send)

    return app


def test_a_server_that_refuses_json_schema_gets_the_schema_in_json_object(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeLLM()
    server = serve(llama_cpp_like(fake))  # type: ignore[arg-type]
    try:
        result = run_bench((fake, server), [], capsys, "--json")
    finally:
        server.stop()

    formats = [r["body"]["response_format"] for r in fake.requests]
    assert formats[0]["type"] == "json_schema"
    assert [f["type"] for f in formats[1:]] == ["json_object"] * (len(formats) - 1)
    for request in fake.requests[1:]:  # refused once, then remembered; each decision's schema
        schema = request["body"]["response_format"]["schema"]
        offered = {
            v["vendorId"] for v in json.loads(request["body"]["messages"][1]["content"])["vendors"]
        }
        vendor = schema["properties"]["vendorId"]
        assert vendor == {"type": "null"} or set(vendor["enum"]) <= offered
        assert "vendorId" in schema["required"]
    assert result["decisions"] == len(formats) - 1
    assert result["overrule_reasons"] == {"empty answer": result["decisions"]}
    assert result["all_within_budget"] is True


def test_reasons_are_grouped() -> None:
    note = (
        "LLM planner (m): the guard rejected start_job: {}; the heuristic planner decides instead"
    )
    assert bench.reason_group(note.format("bargain is cooling down after a failure until x")) == (
        "guard: vendor cooling down"
    )
    assert bench.reason_group(note.format("premium would cost $9.60, over the $6.00 left")) == (
        "guard: over the budget left"
    )
    assert (
        bench.reason_group(
            "LLM planner (m): no answer within 60s; the heuristic planner decides instead"
        )
        == "no answer in time"
    )
