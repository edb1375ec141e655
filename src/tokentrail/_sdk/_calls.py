"""One audited call of a wrapped client: the capture it feeds and the record it leaves.

Both wrappers (``_wrap_ollama``, ``_wrap_openai``) reduce a call to the same steps the proxy
takes: :meth:`Auditor.begin` with the request body as sent, :meth:`Call.feed` with each response
chunk as parsed wire JSON, and exactly one :meth:`Call.record` (or ``arecord`` / ``abandon``) with
the stop reason the capture reads from the stream, or one of tokentrail's own:
``upstream_error`` (the call raised after the request was sent), ``client_disconnect`` (the
caller closed or dropped a stream half-way).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from .._capture import Capture, Meta, loads, new_capture
from .._record import Record, new_event_id, now_rfc3339
from ._recorder import VIA_FIELD, VIA_SDK, Recorder

#: The SDK's own provenance fields: which client library made the call.
CLIENT_FIELD = "tokentrail.sdk.client"


def wire_copy(body: Any, dumps: Callable[[Any], bytes] | None = None) -> dict[str, Any]:
    """The request body as the server will parse it: serialised and parsed back.

    This is also a deep copy, so a caller that mutates its ``messages`` list after the call (an
    agent appending the answer) cannot change what the record says was sent.
    """
    if dumps is not None:
        raw = dumps(body)
    else:
        try:
            raw = orjson.dumps(body)
        except TypeError:
            raw = json.dumps(body, ensure_ascii=False, default=str).encode()
    parsed = loads(raw)
    return parsed if isinstance(parsed, dict) else {"body": parsed}


class Auditor:
    """What every call through one wrapped client shares: the recorder and who is calling."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        user_id: str | None,
        session_id: str | None,
        client: str,
        model_version: Callable[[str | None], str | None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.user_id = user_id
        self.session_id = session_id
        self.client = client
        self.model_version = model_version

    def begin(self, api: str, body: Mapping[str, Any]) -> Call:
        """Start a call: the body must already be the wire copy (see :func:`wire_copy`)."""
        return Call(self, new_capture(api, body))


class Call:
    """The state of one audited exchange, from the request to its one record."""

    __slots__ = (
        "auditor",
        "capture",
        "event_id",
        "first_token",
        "model_version",
        "recorded",
        "started",
        "status",
        "timestamp",
    )

    def __init__(self, auditor: Auditor, capture: Capture) -> None:
        self.auditor = auditor
        self.capture = capture
        self.timestamp = now_rfc3339()
        self.started = time.perf_counter()
        self.event_id = new_event_id()
        self.first_token: float | None = None
        self.status: int | None = None
        self.recorded = False
        self.model_version: str | None = None

    def feed(self, chunk: Any) -> None:
        """Take one response chunk as parsed wire JSON (one NDJSON line, SSE payload or body)."""
        if self.capture.feed(chunk) and self.first_token is None:
            self.first_token = time.perf_counter()

    def feed_raw(self, raw: bytes | str) -> None:
        """Take one chunk's JSON text; what is not JSON marks the call as failed."""
        try:
            chunk = loads(raw)
        except ValueError:
            if self.capture.error is None:
                self.capture.error = "upstream sent a body that is not JSON"
            return
        self.feed(chunk)

    def fail(self, exc: BaseException) -> None:
        """The call raised after the request was sent: keep the exception as the error text."""
        if self.capture.error is None:
            self.capture.error = f"{type(exc).__name__}: {exc}"

    def exchange(self, stop: str | None) -> Any:
        """The :class:`~tokentrail._record.Exchange` as captured so far."""
        self.recorded = True
        now = time.perf_counter()
        a = self.auditor
        model_version = self.model_version
        if model_version is None and a.model_version is not None:
            model_version = a.model_version(self.capture.model)
        meta = Meta(
            timestamp=self.timestamp,
            event_id=self.event_id,
            request_duration_ms=(now - self.started) * 1000.0,
            time_to_first_token_ms=None
            if self.first_token is None
            else (self.first_token - self.started) * 1000.0,
            user_id=a.user_id,
            session_id=a.session_id,
            model_version=model_version,
            status=self.status,
            extra={"stream": self.capture.stream, VIA_FIELD: VIA_SDK, CLIENT_FIELD: a.client},
        )
        return self.capture.finish(meta, stop)

    def record(self, stop: str | None = None) -> Record | None:
        """Record once, blocking for the durability the recorder asks for."""
        if self.recorded:
            return None
        return self.auditor.recorder.append(self.exchange(stop))

    async def arecord(self, stop: str | None = None) -> Record | None:
        """Record once from asyncio code."""
        if self.recorded:
            return None
        return await self.auditor.recorder.aappend(self.exchange(stop))

    def abandon(self) -> None:
        """The caller dropped the stream: record ``client_disconnect`` without waiting."""
        if not self.recorded:
            self.auditor.recorder.submit(self.exchange("client_disconnect"))
