"""The Ollama catalogue: models pulled (`GET /api/tags`) and loaded (`GET /api/ps`, with
`size_vram`), read under one short deadline. Ollama down or answering nonsense is a degraded
catalogue with the reason, never an exception."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx

from procure.bounds import UnsafeInput, clip, loads
from procure.httpbounds import bounded_client

MIB = 1 << 20
MAX_MODELS = 500  # a catalogue longer than this is cut: no server of ours holds that many


@dataclass(frozen=True)
class Catalogue:
    """`ok` False means the figures are missing, and `error` says why."""

    ok: bool
    url: str
    pulled: list[dict[str, Any]] = field(default_factory=list)
    loaded: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def vram_mb(self) -> int:
        """VRAM the loaded models hold, in MiB."""
        return sum(m["size_vram"] for m in self.loaded) // MIB

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "degraded",
            "ollama_url": self.url,
            "error": self.error,
            "total_models": len(self.pulled),
            "models": self.pulled,
            "loaded": [{**m, "size_vram_mb": m["size_vram"] // MIB} for m in self.loaded],
            "vram_usage_mb": self.vram_mb,
        }


def ollama_client(
    deadline_s: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """A client whose every call to Ollama ends within `deadline_s` with a bounded answer."""
    return bounded_client(deadline_s=deadline_s, transport=transport)


async def read_catalogue(client: httpx.AsyncClient, url: str) -> Catalogue:
    """Both lists, asked at once; the first failure makes the whole answer degraded."""
    base = url.rstrip("/")
    # Both run to the end (each under the client's deadline), so no failure is left unawaited.
    tags, ps = await asyncio.gather(
        _models(client, f"{base}/api/tags"),
        _models(client, f"{base}/api/ps"),
        return_exceptions=True,
    )
    for result in (tags, ps):
        if isinstance(result, BaseException):
            if isinstance(result, _OllamaFailed):
                return Catalogue(False, base, error=str(result))
            raise result
    assert isinstance(tags, list) and isinstance(ps, list)
    return Catalogue(True, base, [_pulled(m) for m in tags], [_loaded(m) for m in ps])


class _OllamaFailed(Exception):
    pass


async def _models(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise _OllamaFailed(
            f"Ollama did not answer {url}: {clip(str(exc) or type(exc).__name__, 300)}"
        ) from None
    try:
        body = loads(response.content)
    except UnsafeInput as exc:
        raise _OllamaFailed(
            f"Ollama answered {url} with HTTP {response.status_code} and no usable JSON: "
            f"{clip(str(exc), 200)}"
        ) from None
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        raise _OllamaFailed(
            f"Ollama answered {url} with HTTP {response.status_code}: "
            f"{clip(str(error or body), 300)}"
        )
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list):
        raise _OllamaFailed(f"Ollama's answer to {url} has no `models` list")
    return [m for m in models[:MAX_MODELS] if isinstance(m, dict)]


def _pulled(model: dict[str, Any]) -> dict[str, Any]:
    details = model.get("details") if isinstance(model.get("details"), dict) else {}
    return {
        "name": _str(model.get("name") or model.get("model")),
        "model": _str(model.get("model") or model.get("name")),
        "size": _int(model.get("size")),
        "digest": _str(model.get("digest")),
        "modified_at": _str(model.get("modified_at")),
        "family": _str(details.get("family")),
        "parameter_size": _str(details.get("parameter_size")),
        "quantization_level": _str(details.get("quantization_level")),
    }


def _loaded(model: dict[str, Any]) -> dict[str, Any]:
    return {
        **_pulled(model),
        "size_vram": _int(model.get("size_vram")),
        "expires_at": _str(model.get("expires_at")),
    }


def _str(value: Any) -> str | None:
    return None if value is None else clip(str(value), 200)


def _int(value: Any) -> int:
    # Sizes are byte counts; anything else (negative, fractional, text) counts as 0.
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(min(value, 1 << 60))
