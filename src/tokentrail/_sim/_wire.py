"""Bytes on the wire: JSON encoding, streamed framing, pacing and injected faults.

Framing follows the servers: Ollama streams NDJSON (``application/x-ndjson``, one JSON object
and ``\\n`` per chunk, as gin's ``c.Stream`` writes them); the OpenAI family streams server-sent
events (``data: {json}\\n\\n`` per chunk, closed by ``data: [DONE]\\n\\n``; see the OpenAI API
reference, "Streaming").

Faults are asked for per request with the ``X-Sim-Fault`` header, a comma-separated list of:

``500``
    answer HTTP 500 with the dialect's error body, before any work;
``cut:N``
    close the connection abruptly after N streamed chunks (a non-streamed body: after its first
    N bytes). A stream that would end first is still cut instead of ending cleanly;
``stall:MS``
    wait MS milliseconds before the first byte (before the status line);
``stall-mid:MS``
    wait MS milliseconds after the first streamed chunk (a non-streamed body: after the
    headers).

Example: ``X-Sim-Fault: stall:200, cut:3``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "FAULT_HEADER",
    "BodyError",
    "ChunkWriter",
    "Fault",
    "Pacer",
    "dumps",
    "fault_of",
    "read_json",
    "send_body",
]

FAULT_HEADER = "X-Sim-Fault"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json; charset=utf-8"


class FaultSyntaxError(ValueError):
    """An ``X-Sim-Fault`` header that cannot be parsed."""


@dataclass(frozen=True)
class Fault:
    """The faults one request asked for."""

    error_500: bool = False
    cut: int | None = None
    stall_ms: float = 0.0
    stall_mid_ms: float = 0.0

    @classmethod
    def parse(cls, header: str | None) -> Fault:
        """Parse an ``X-Sim-Fault`` header value (``None`` or empty: no fault)."""
        if not header or not header.strip():
            return cls()
        error_500, cut, stall, stall_mid = False, None, 0.0, 0.0
        for raw in header.split(","):
            item = raw.strip().lower()
            name, _, arg = item.partition(":")
            try:
                if item == "500":
                    error_500 = True
                elif name == "cut" and arg:
                    cut = int(arg)
                    if cut < 0:
                        raise ValueError(arg)
                elif name == "stall" and arg:
                    stall = float(arg)
                elif name == "stall-mid" and arg:
                    stall_mid = float(arg)
                else:
                    raise ValueError(item)
            except ValueError:
                raise FaultSyntaxError(
                    f"bad {FAULT_HEADER} item {raw.strip()!r}; "
                    "expected 500, cut:N, stall:MS or stall-mid:MS"
                ) from None
        return cls(error_500, cut, max(0.0, stall), max(0.0, stall_mid))


def dumps(obj: Any, *, go: bool = False) -> bytes:
    """Compact JSON; with *go*, escaped as Go's ``encoding/json`` does (``<`` is ``\\u003c``)."""
    data = orjson.dumps(obj)
    if go:
        # Inside JSON these characters occur only in strings, so a byte replace is exact.
        data = (
            data.replace(b"&", b"\\u0026")
            .replace(b"<", b"\\u003c")
            .replace(b">", b"\\u003e")
            .replace("\u2028".encode(), b"\\u2028")
            .replace("\u2029".encode(), b"\\u2029")
        )
    return data


def fault_of(request: web.Request) -> Fault:
    """The faults *request* asked for (its header was already checked by the middleware)."""
    try:
        return Fault.parse(request.headers.get(FAULT_HEADER))
    except FaultSyntaxError:
        return Fault()


class BodyError(ValueError):
    """A request body that is missing or not JSON; the message reads like Go's decoder."""


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or :class:`BodyError`."""
    raw = await request.read()
    if not raw.strip():
        raise BodyError("missing request body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        at = exc.pos if 0 <= exc.pos < len(raw) else None
        if at is None:
            raise BodyError("unexpected EOF") from None
        char = raw[at : at + 1].decode("latin-1")
        raise BodyError(f"invalid character {char!r} looking for beginning of value") from None


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


class Pacer:
    """Sleeps as a model would: ``ttft_ms`` before the first token, ``token_ms`` per token."""

    def __init__(self, ttft_ms: float, token_ms: float) -> None:
        self.ttft_ms = ttft_ms
        self.token_ms = token_ms
        self.started_ns = time.perf_counter_ns()
        self.first_token_ns: int | None = None

    async def tokens(self, count: int) -> None:
        """Wait for the next *count* tokens to be "generated"."""
        if count <= 0:
            return
        if self.first_token_ns is None:
            await _sleep_ms(self.ttft_ms)
            self.first_token_ns = time.perf_counter_ns()
            count -= 1
        await _sleep_ms(self.token_ms * count)

    async def all(self, count: int) -> None:
        """Wait for a whole non-streamed answer of *count* tokens."""
        await self.tokens(count)

    def prefill_ns(self) -> int:
        """Nanoseconds from start to the first token (at least 1)."""
        end = self.first_token_ns or time.perf_counter_ns()
        return max(1, end - self.started_ns)

    def decode_ns(self) -> int:
        """Nanoseconds from the first token to now (at least 1)."""
        start = self.first_token_ns or self.started_ns
        return max(1, time.perf_counter_ns() - start)


class ChunkWriter:
    """Writes a streamed response chunk by chunk, applying the request's faults."""

    def __init__(self, request: web.Request, fault: Fault, content_type: str) -> None:
        self._request = request
        self._fault = fault
        self._response = web.StreamResponse(headers={"Content-Type": content_type})
        self._sent = 0
        self.cut = False

    async def start(self) -> None:
        """Send the status line and headers."""
        await self._response.prepare(self._request)

    async def send(self, data: bytes) -> bool:
        """Send one chunk; False when the connection is gone (cut or client left)."""
        if self.cut:
            return False
        if not self._response.prepared:
            await self.start()
        if self._fault.cut is not None and self._sent >= self._fault.cut:
            self._abort()
            return False
        try:
            await self._response.write(data)
        except (ConnectionError, RuntimeError):
            self.cut = True
            return False
        self._sent += 1
        if self._sent == 1:
            await _sleep_ms(self._fault.stall_mid_ms)
        return True

    async def finish(self) -> web.StreamResponse:
        """End the stream cleanly, or abruptly when a cut was asked for."""
        if not self._response.prepared:
            await self.start()
        if self._fault.cut is not None and not self.cut:
            self._abort()
        if not self.cut:
            try:
                await self._response.write_eof()
            except (ConnectionError, RuntimeError):
                self.cut = True
        return self._response

    def _abort(self) -> None:
        self.cut = True
        transport = self._request.transport
        if transport is not None:
            transport.abort()


async def send_body(
    request: web.Request,
    fault: Fault,
    body: bytes,
    *,
    status: int = 200,
    content_type: str = JSON,
) -> web.StreamResponse:
    """Send a whole (non-streamed) body, applying ``cut`` and ``stall-mid``."""
    response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    response.content_length = len(body)
    await response.prepare(request)
    await _sleep_ms(fault.stall_mid_ms)
    if fault.cut is not None:
        if fault.cut:
            await response.write(body[: fault.cut])
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write(body)
    await response.write_eof()
    return response
