"""`PLANNER_MODE=llm`: a planner that asks any OpenAI-compatible chat-completions endpoint.

The model receives the run's state as compact JSON (goal, job spec, budget total and available in
dollars, vendors with price, learned reliability, cooling-down flag and failures this run, the
last few jobs, and payments summarised per vendor with the last few listed; never secrets,
endpoints, payee addresses or the observation log), bounded however long the run has gone on,
and must answer with one JSON action that validates against `procure.models.Action`; what it is
shown and the schema it answers to are `llm_prompt`'s.

Endpoints (`LLM_PROVIDER`, `LLM_BASE_URL`, `LLM_TIMEOUT_S`; each provider's model and key are
its own, see `endpoint`):

- Fireworks (default): `https://api.fireworks.ai/inference/v1`, `FIREWORKS_MODEL`
  (`accounts/fireworks/models/llama-v3-8b-instruct`), key in `FIREWORKS_API_KEY`.
- Ollama (`LLM_PROVIDER=ollama`): `http://localhost:11434/v1`, `OLLAMA_MODEL` (`llama3.1:8b`),
  no key.
- vLLM (`LLM_PROVIDER=vllm`): `http://localhost:8000/v1`, `VLLM_MODEL` (the served model,
  required), `VLLM_API_KEY` if it was started with `--api-key`.
- OpenAI (`LLM_PROVIDER=openai`): `https://api.openai.com/v1`, `OPENAI_MODEL` (`gpt-4o-mini`),
  key in `OPENAI_API_KEY`.

The request asks for structured output (`response_format` of type `json_schema`) with a schema
built per request (`response_schema`): `vendorId` is required and limited to the vendors eligible
now, `hours` to the work left, payment slices are procure's; `abort` is offered only with no
vendor eligible, `start_job` only with one. It stays inside what OpenAI's strict
mode accepts (a root object, every property required, nullable as `anyOf` with null). An endpoint
that rejects that (HTTP 400 or 422, or any error naming `response_format`: llama-cpp-python's
server answers its validation error with HTTP 500) is asked again with `{"type": "json_object",
"schema": ...}` (the form llama-cpp-python constrains its output by; others ignore the schema),
and the planner instance remembers which format works.

The planner never raises into the tick. Invalid JSON, a schema-invalid answer, an action the guard
rejects (unknown vendor, over budget, ...), a timeout or an HTTP error: the heuristic planner
decides instead. Every raw answer (truncated) is left on the context as an `llm_response` note and
every rejection as an `error` note; the tick stores them as observations. The API key is
redacted from everything the planner stores or returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from openai import APIStatusError, AsyncOpenAI, BadRequestError, UnprocessableEntityError
from pydantic import ValidationError

from procure.agent.context import PlanContext
from procure.agent.guard import EPS, check_action
from procure.agent.llm_prompt import (
    DETAIL_LIMIT,
    SYSTEM_PROMPT,
    ResponseFormatKind,
    clipped,
    estimated_cost,
    response_format,
    response_schema,
    slices_for,
    state_for_llm,
)
from procure.agent.planner import Planner, heuristic_planner
from procure.bounds import UnsafeInput, loads
from procure.httpbounds import bounded_client
from procure.models import (
    Action,
    ObservationType,
)
from procure.settings import Settings

log = logging.getLogger(__name__)

RAW_ANSWER_LIMIT = 2000
"""Characters of the model's raw answer kept in the `llm_response` observation."""
REASON_LIMIT = 1000
"""Characters of the model's reason kept for the `agent_reasoning` observation."""
MAX_TOKENS = 512
# A run that waits (its vendors cooling down, a cap reached) shows the model the same state
# tick after tick: its last answer stands until that state changes, asked again at most this
# often, so a waiting run does not pay for a completion every tick. Not only a `wait`: a run held
# by the global spend cap gets a start_job from the model (the cap is not in its state) that the
# cap refuses tick after tick; such an answer stands once the model has given it twice for the
# same state. An answer refused (not JSON, not an Action, or the guard's no) stands too: the
# heuristic decides without asking again. Kept for this many runs at most.
REASK_WAIT_S = 300.0
WAITS_KEPT = 256
PLACEHOLDER_KEY = "not-needed"  # Ollama and vLLM ignore the key, but the SDK wants one
REDACTED = "[redacted]"


def _parse_answer(content: str) -> dict[str, Any]:
    text = content.strip()
    if text.startswith("```"):  # models in json_object mode sometimes fence their answer
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = loads(text, max_bytes=64 << 10)
    except UnsafeInput as exc:
        raise _Rejected(f"answer is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise _Rejected(f"answer is JSON but not an object ({type(data).__name__})")
    return data


def _format_refused(exc: APIStatusError) -> bool:
    """Whether the endpoint turned the request down, most likely for its response format."""
    if isinstance(exc, BadRequestError | UnprocessableEntityError):
        return True
    return "response_format" in str(exc)  # llama-cpp-python: its 422 comes back as a 500


def _same_choice(before: Action, now: Action) -> bool:
    """Whether two answers choose the same (their reasons may be worded differently)."""
    keep = {"reason"}
    return before.model_dump(exclude=keep) == now.model_dump(exclude=keep)


def _too_short(ctx: PlanContext, action: Action) -> str | None:
    """Why a start_job's hours keep no progress, or None. A job that ends before its next
    checkpoint loses all it ran: paid, stopped at the progress it resumed from, and decided again
    (the schema's `hours` is remainingHours, but not every server enforces a schema)."""
    if action.action != "start_job" or action.hours is None:
        return None
    spec = ctx.state.run.job_spec
    least = min(ctx.remaining_hours, spec.hours * spec.checkpoint_every)
    if action.hours >= least - EPS:
        return None
    return (
        f"{action.hours:g}h ends before the job's next checkpoint ({least:g}h away): "
        "no progress would be kept"
    )


def _abort_too_soon(ctx: PlanContext, action: Action) -> str | None:
    """Why an abort must not end the run, or None. The schema offers abort whenever no vendor
    is eligible this instant, which includes every affordable vendor merely cooling down: the
    prompt's rule (and the heuristic) then say wait, and an abort would end a funded run for
    good."""
    if action.action != "abort":
        return None
    gpu = ctx.state.run.job_spec.gpu_type
    cooling = [
        v.vendor_id
        for v in ctx.vendors
        if gpu in v.supported_gpu_types
        and ctx.cooling_down(v)
        and estimated_cost(ctx, v) <= ctx.available
    ]
    if not cooling:
        return None
    return f"{', '.join(cooling[:3])} can take the job once cooled down: wait, not abort"


class _Rejected(Exception):
    """Why the model's answer cannot be used; its message is stored as an error observation."""


class LLMPlanner:
    """An async `Planner` backed by a chat-completions endpoint, with a heuristic fallback."""

    def __init__(
        self,
        client: AsyncOpenAI,
        model: str,
        *,
        timeout_s: float,
        secrets: tuple[str, ...] = (),
        fallback: Planner = heuristic_planner,
    ) -> None:
        self.client = client
        self.model = model
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.response_format: ResponseFormatKind = "json_schema"
        self._secrets = tuple(s for s in secrets if s)
        # Per run: the state the model last answered, when, that answer (None: refused), and
        # whether it stands (is given again without asking) while the state stays the same.
        self._waits: dict[str, tuple[str, datetime, Action | None, bool]] = {}

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    async def __call__(self, ctx: PlanContext) -> Action:
        run_id = ctx.state.run.id
        state = json.dumps(state_for_llm(ctx), separators=(",", ":"))
        kept = self._waits.pop(run_id, None)
        same = kept is not None and kept[0] == state
        if kept is not None and same and kept[3]:
            age = (ctx.now - kept[1]).total_seconds()
            if 0 <= age < REASK_WAIT_S:
                self._waits[run_id] = kept
                # None: the model's answer to this state was refused; the fallback decides.
                return kept[2].model_copy() if kept[2] else await self.fallback(ctx)
        noted = len(ctx.notes)
        action = await self._ask(ctx, state)
        said = [t for t, _ in ctx.notes[noted:]]
        if ObservationType.error in said:
            # The model answered and its answer was refused (not a failed request, asked again
            # next tick): asking again for the same state buys the same refusal.
            if ObservationType.llm_response in said:
                self._keep(run_id, (state, ctx.now, None, True))
        elif action.action != "abort":  # the model's own answer
            # A wait stands at once; any other answer once the model gave it twice for this
            # state (the first time it may simply not have been carried out yet).
            before = kept[2] if kept is not None and same else None
            stands = action.action == "wait" or (
                before is not None and _same_choice(before, action)
            )
            self._keep(run_id, (state, ctx.now, action.model_copy(), stands))
        return action

    def _keep(self, run_id: str, entry: tuple[str, datetime, Action | None, bool]) -> None:
        self._waits[run_id] = entry
        while len(self._waits) > WAITS_KEPT:
            del self._waits[next(iter(self._waits))]

    async def _ask(self, ctx: PlanContext, state: str) -> Action:
        try:
            content = await asyncio.wait_for(self._complete(state, ctx), self.timeout_s)
        except TimeoutError:
            return await self._fall_back(ctx, f"no answer within {self.timeout_s:g}s")
        except Exception as exc:  # the SDK's HTTP and connection errors, and anything else
            detail = clipped(self.redact(f"{type(exc).__name__}: {exc}"), DETAIL_LIMIT)
            return await self._fall_back(ctx, f"request failed: {detail}")
        if content is None or not content.strip():
            return await self._fall_back(ctx, "empty answer")
        ctx.notes.append(
            (ObservationType.llm_response, clipped(self.redact(content), RAW_ANSWER_LIMIT))
        )
        try:
            action = self._validate(ctx, _parse_answer(content))
        except _Rejected as exc:
            return await self._fall_back(ctx, str(exc))
        return action

    def _validate(self, ctx: PlanContext, data: dict[str, Any]) -> Action:
        try:
            action = Action.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}"
                for e in exc.errors()
            )
            raise _Rejected(
                self.redact(clipped(f"answer does not match the Action schema: {problems}", 500))
            ) from None
        spec = ctx.state.run.job_spec
        if action.action != "start_job":
            action.vendor_id = None  # the schema makes the model name one; it means nothing here
        else:
            action.hours = action.hours if action.hours is not None else ctx.remaining_hours
            action.gpu_type = action.gpu_type or spec.gpu_type
            if action.slice_hours is None:
                action.slice_hours = slices_for(ctx, action.vendor_id)
        rejection = (
            check_action(ctx, action) or _too_short(ctx, action) or _abort_too_soon(ctx, action)
        )
        if rejection is not None:
            raise _Rejected(
                "the guard rejected "
                + self.redact(clipped(f"{action.action}: {rejection}", DETAIL_LIMIT))
            )
        action.reason = clipped(self.redact(action.reason), REASON_LIMIT)
        return action

    async def _fall_back(self, ctx: PlanContext, why: str) -> Action:
        ctx.notes.append(
            (
                ObservationType.error,
                f"LLM planner ({self.model}): {why}; the heuristic planner decides instead",
            )
        )
        log.warning("LLM planner fell back to the heuristic: %s", why)
        return await self.fallback(ctx)

    async def _complete(self, state: str, ctx: PlanContext) -> str | None:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": state},
        ]
        kind = self.response_format
        schema = response_schema(ctx)
        try:
            return await self._request(messages, kind, schema)
        except APIStatusError as exc:
            if kind != "json_schema" or not _format_refused(exc):
                raise
        # The endpoint turned down the request: most likely it does not do json_schema.
        content = await self._request(messages, "json_object", schema)
        self.response_format = "json_object"  # remembered only once json_object has worked
        log.info("LLM endpoint rejected json_schema; using json_object from now on")
        return content

    async def _request(
        self, messages: list[dict[str, str]], kind: ResponseFormatKind, schema: dict[str, Any]
    ) -> str | None:
        completion = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            response_format=response_format(kind, schema),  # type: ignore[arg-type]
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        if not completion.choices:
            return None
        return completion.choices[0].message.content


_BASE_URLS = {
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "ollama": "http://localhost:11434/v1",
    "vllm": "http://localhost:8000/v1",
    "openai": "https://api.openai.com/v1",
}


@dataclass(frozen=True)
class Endpoint:
    provider: str
    base_url: str
    model: str
    key: str = field(repr=False)


def endpoint(settings: Settings) -> Endpoint:
    """Which provider, URL, model and key the planner uses. LLM_PROVIDER names the provider;
    unset, Ollama's port or OpenAI's host in LLM_BASE_URL say it, else Fireworks (the seeds').
    A provider's model setting is used for that provider alone."""
    provider = settings.llm_provider
    url = settings.llm_base_url
    if provider is None:
        parts = urlsplit(url or "")
        if parts.port == 11434:
            provider = "ollama"
        elif (parts.hostname or "").endswith("openai.com"):
            provider = "openai"
        else:
            provider = "fireworks"
    model, secret = {
        "fireworks": (settings.fireworks_model, settings.fireworks_api_key),
        "ollama": (settings.ollama_model, None),
        "vllm": (settings.vllm_model or "", settings.vllm_api_key),
        "openai": (settings.openai_model, settings.openai_api_key),
    }[provider]
    key = secret.get_secret_value() if secret else ""
    return Endpoint(provider, url or _BASE_URLS[provider], model, key)


_KEY_VARS = {"fireworks": "FIREWORKS_API_KEY", "openai": "OPENAI_API_KEY"}
"""The providers that refuse a request without a key, and the setting that holds it."""


def make_llm_planner(settings: Settings, *, client: AsyncOpenAI | None = None) -> Planner:
    """The LLM planner for `settings`; `client` replaces the one built from them (tests)."""
    chosen = endpoint(settings)
    key = chosen.key
    needed = _KEY_VARS.get(chosen.provider)
    if client is None and needed and not key:
        # Said once, at the start: otherwise each tick's fallback says only "Connection error".
        log.warning(
            "PLANNER_MODE=llm: %s is not set, so %s refuses the planner's requests and every "
            "tick falls back to the heuristic planner",
            needed,
            chosen.provider,
        )
    if client is None:
        client = AsyncOpenAI(
            api_key=key or PLACEHOLDER_KEY,
            base_url=chosen.base_url,
            timeout=settings.llm_timeout_s,
            max_retries=0,  # the next tick is the retry; a tick must stay short
            # One deadline for the whole exchange and a bounded answer, whatever the server does.
            http_client=bounded_client(deadline_s=settings.llm_timeout_s),
        )
    return LLMPlanner(client, chosen.model, timeout_s=settings.llm_timeout_s, secrets=(key,))
