"""Capture dialects: turn one exchange on the wire into an :class:`~tokentrail._record.Exchange`.

::

    request body ──► new_capture(api, body) ──► feed(chunk) … ──► finish(meta) ──► Exchange
                                                 (each NDJSON line / SSE data payload / body)

Pure and incremental (no I/O, no clock), shared by the proxy and the in-process SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._common import (
    SOURCE_CONTEXT,
    SOURCE_IDS,
    SOURCE_NONE,
    SOURCE_PIECES,
    Capture,
    Meta,
    entry_token,
    loads,
    render_messages,
)
from ._ollama import OllamaCapture, split_context
from ._openai import OpenAICapture

#: The audited request paths and the ``api`` each one records.
PATHS = {
    "/api/generate": "ollama.generate",
    "/api/chat": "ollama.chat",
    "/v1/chat/completions": "openai.chat",
    "/v1/completions": "openai.completions",
    # llama.cpp serves its OpenAI chat endpoint without /v1 too. (Its /completion and
    # /completions without /v1 are its own, non-OpenAI format: passed through, not audited.)
    "/chat/completions": "openai.chat",
}


def new_capture(api: str, request: Mapping[str, Any]) -> Capture:
    """A fresh accumulator for ``api`` (``ollama.generate`` … ``openai.completions``)."""
    if api == "ollama.generate":
        return OllamaCapture(request, chat=False)
    if api == "ollama.chat":
        return OllamaCapture(request, chat=True)
    if api == "openai.chat":
        return OpenAICapture(request, chat=True)
    if api == "openai.completions":
        return OpenAICapture(request, chat=False)
    raise ValueError(f"no capture dialect for api {api!r}")


__all__ = [
    "PATHS",
    "SOURCE_CONTEXT",
    "SOURCE_IDS",
    "SOURCE_NONE",
    "SOURCE_PIECES",
    "Capture",
    "Meta",
    "OllamaCapture",
    "OpenAICapture",
    "entry_token",
    "loads",
    "new_capture",
    "render_messages",
    "split_context",
]
