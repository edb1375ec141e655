"""Configuration of the simulated model server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokentrail._errors import ConfigError

__all__ = ["DEFAULT_MODELS", "MODES", "SimConfig"]

MODES = ("ollama-0.4", "ollama", "openai", "llamacpp", "vllm")
DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b")

# What each mode reports as its version (Ollama ``/api/version``, vLLM ``/version``,
# OpenAI-style ``system_fingerprint``).
DEFAULT_VERSIONS = {
    "ollama-0.4": "0.4.7",
    "ollama": "0.12.11",
    "openai": "fp_5f1a2e7c3b",
    "llamacpp": "b6400-2a8e1c3d",
    "vllm": "0.11.0",
}


@dataclass(frozen=True)
class SimConfig:
    """How a simulated server behaves.

    ``mode`` picks the wire dialect: ``ollama-0.4`` (Ollama 0.4.x: ``context`` in
    ``/api/generate``, no logprobs), ``ollama`` (Ollama ≥ 0.12.11: also ``logprobs``),
    ``openai`` (the OpenAI API), ``llamacpp`` (llama.cpp ``llama-server``) or ``vllm``
    (vLLM's OpenAI-compatible server). ``ttft_ms`` is the delay before the first token,
    ``token_ms`` the delay between tokens. ``ollama_partial_utf8_bug`` reproduces Ollama issue
    #13497 (logprobs of a partial UTF-8 token show the bytes of U+FFFD, not the token's own).
    """

    mode: str = "ollama"
    ttft_ms: float = 0.0
    token_ms: float = 0.0
    models: Sequence[str] = DEFAULT_MODELS
    version: str | None = None
    ollama_partial_utf8_bug: bool = False
    created: int = field(default=1_735_689_600)  # 2025-01-01T00:00:00Z, "model created" time

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown sim mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.ttft_ms < 0 or self.token_ms < 0:
            raise ConfigError("ttft_ms and token_ms must not be negative")
        models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError("models must be a non-empty list of model names")
        object.__setattr__(self, "models", models)

    @property
    def server_version(self) -> str:
        """The version string this server reports."""
        return self.version or DEFAULT_VERSIONS[self.mode]

    @property
    def is_ollama(self) -> bool:
        """True for the two Ollama dialects."""
        return self.mode.startswith("ollama")
