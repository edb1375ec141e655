"""Capture dialects: turn one exchange on the wire into an :class:`~tokentrail._record.Exchange`.

::

    request body ──► new_capture(api, body) ──► feed(chunk) … ──► finish(meta) ──► Exchange
                                                 (each NDJSON line / SSE data payload / body)

Pure and incremental (no I/O, no clock), shared by the proxy and the in-process SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .._record import Exchange
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


class Begun:
    """An exchange just begun, as a crash-safety note keeps it (``LedgerWriter.begin``).

    The record the note stands for is ``capture.finish(meta, "interrupted")``, taken now.
    Building and encoding that record costs about a tenth of what the proxy spends on a short
    exchange; the note holds instead what rebuilds it (:meth:`rebuild`, should a crash leave
    the note behind): the api, the request and ``meta``, a single encoding of the request. (The
    capture's other state, such as ``logprobs_asked``, speaks of output, which a note has none
    of.)
    """

    __slots__ = ("capture", "meta")

    def __init__(self, capture: Capture, meta: Meta) -> None:
        self.capture = capture
        self.meta = meta

    @property
    def event_id(self) -> str:
        return self.meta.event_id

    def note(self) -> bytes | None:
        """The note's JSON (an object), or ``None`` where only the record itself is storable
        (a request nested deeper than the encoder goes)."""
        capture = self.capture
        try:
            return orjson.dumps({"api": capture.api, "request": capture.request, "meta": self.meta})
        except TypeError:
            return None

    def provisional(self) -> Exchange:
        """The record the note stands for, built now."""
        return self.capture.finish(self.meta, "interrupted")

    @staticmethod
    def rebuild(note: Mapping[str, Any]) -> Exchange:
        """The record a note from :meth:`note` stands for.

        Raises ``ValueError``, ``TypeError``, ``KeyError``, ``AttributeError`` or ``ConfigError``
        on a note that is not one.
        """
        return new_capture(note["api"], note["request"]).finish(Meta(**note["meta"]), "interrupted")


__all__ = [
    "PATHS",
    "SOURCE_CONTEXT",
    "SOURCE_IDS",
    "SOURCE_NONE",
    "SOURCE_PIECES",
    "Begun",
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
