"""Each LLM provider's model setting is its own (issue 21): FIREWORKS_MODEL is for Fireworks
alone; Ollama, vLLM and OpenAI read OLLAMA_MODEL, VLLM_MODEL and OPENAI_MODEL."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from procure.agent.llm_planner import LLMPlanner, endpoint, make_llm_planner
from procure.settings import Settings

NAMES = (
    "LLM_PROVIDER",
    "LLM_BASE_URL",
    "FIREWORKS_MODEL",
    "FIREWORKS_API_KEY",
    "OLLAMA_MODEL",
    "VLLM_MODEL",
    "VLLM_API_KEY",
    "OPENAI_MODEL",
    "OPENAI_API_KEY",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def settings(**env: str) -> Settings:
    return Settings(FIREWORKS_MODEL="fw/model", FIREWORKS_API_KEY="fw_key", **env)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("env", "provider", "url", "model", "key"),
    [
        ({}, "fireworks", "https://api.fireworks.ai/inference/v1", "fw/model", "fw_key"),
        (
            {"LLM_PROVIDER": "ollama", "OLLAMA_MODEL": "qwen2.5:7b"},
            "ollama",
            "http://localhost:11434/v1",
            "qwen2.5:7b",
            "",
        ),
        (  # the old way to reach Ollama: its port says which provider it is
            {"LLM_BASE_URL": "http://127.0.0.1:11434/v1"},
            "ollama",
            "http://127.0.0.1:11434/v1",
            "llama3.1:8b",
            "",
        ),
        (
            {"LLM_PROVIDER": "vllm", "VLLM_MODEL": "meta/llama-3", "VLLM_API_KEY": "vk"},
            "vllm",
            "http://localhost:8000/v1",
            "meta/llama-3",
            "vk",
        ),
        (
            {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-x", "OPENAI_MODEL": "gpt-x"},
            "openai",
            "https://api.openai.com/v1",
            "gpt-x",
            "sk-x",
        ),
    ],
)
def test_each_provider_reads_its_own_model(
    env: dict[str, str], provider: str, url: str, model: str, key: str
) -> None:
    chosen = endpoint(settings(**env))
    assert (chosen.provider, chosen.base_url, chosen.model, chosen.key) == (
        provider,
        url,
        model,
        key,
    )
    planner = make_llm_planner(settings(**env))
    assert isinstance(planner, LLMPlanner)
    assert planner.model == model and str(planner.client.base_url).rstrip("/") == url
    assert "fw_key" not in repr(chosen)  # the key is never in a repr


def test_vllm_without_its_model_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError, match="VLLM_MODEL"):
        settings(LLM_PROVIDER="vllm")
    with pytest.raises(ValidationError):
        settings(LLM_PROVIDER="anthropic")
    assert settings(LLM_PROVIDER="", LLM_BASE_URL="").llm_provider is None  # blank is unset
