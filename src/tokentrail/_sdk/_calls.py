"""One audited call of a wrapped client: the capture it feeds and the record it leaves.

Both wrappers (``_wrap_ollama``, ``_wrap_openai``) reduce a call to the same steps the proxy
takes: :meth:`Auditor.begin` with the request body as sent, :meth:`Call.feed` with each response
chunk as parsed wire JSON (or :meth:`Call.feed_sse` with each read of an SSE body, parsed as the
proxy parses it), and exactly one :meth:`Call.record` (or ``arecord`` / ``abandon``) with
the stop reason the capture reads from the stream, or one of tokentrail's own:
``upstream_error`` (the call raised after the request was sent), ``client_disconnect`` (the
caller closed or dropped a stream half-way).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from .._capture import Begun, Capture, Meta, loads, new_capture
from .._capture._sse import SSEReader
from .._record import Exchange, Record, new_event_id, rfc3339
from ._recorder import VIA_FIELD, VIA_SDK, Recorder

#: The SDK's own provenance fields: which client library made the call.
CLIENT_FIELD = "tokentrail.sdk.client"
NOT_JSON = "upstream sent a body that is not JSON"
#: orjson options that make it refuse what a client library's encoder may write its own way.
_PLAIN_ONLY = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# What may end an NDJSON exchange, found in a line's text without parsing it: a "done" key set to
# true, or an "error" key. In JSON text a quote inside a string is escaped, so neither can come
# from the text of an answer; a line with "done": false (every other ollama line) is not parsed.
_MAY_END = re.compile(r'"done"\s*:\s*true|"error"')


def wire_copy(body: Any, dumps: Callable[[Any], bytes] | None = None) -> dict[str, Any]:
    """The request body as the server will parse it: serialised and parsed back.

    This is also a deep copy, so a caller that mutates its ``messages`` list after the call (an
    agent appending the answer) cannot change what the record says was sent.
    """
    if dumps is not None:
        # orjson gives the same JSON for plain values at a fraction of the cost; the library's
        # own encoder for anything else (dates, models, subclasses) and for NaN and infinities,
        # which orjson writes as null (so any "null" in its output falls back).
        try:
            raw = orjson.dumps(body, option=_PLAIN_ONLY)
        except TypeError:
            raw = b"null"
        if b"null" in raw:
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
        """Start a call: the body must already be the wire copy (see :func:`wire_copy`).

        Under strict durability the call is noted in the log's in-flight journal first, as the
        proxy notes an exchange: should the process die before its record is on disk, the next
        writer of the log records it as ``interrupted`` (SPEC section 6). Under async
        durability, which keeps nothing from the caller's path, it is not.
        """
        self.recorder.check_ready()  # also opens a forked process's own log here, not at a GC
        call = Call(self, api, body)
        if not call.lazy:
            self.recorder.local_writer().begin(Begun(call.capture, call.meta(call.started)))
        self.recorder.track(call)
        return call


class _Text:
    """A whole body's JSON text (or a parsed chunk's, re-encoded), kept until a lazy call is
    built (an NDJSON line is kept as its ``str``)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class Call:
    """The state of one audited exchange, from the request to its one record.

    Under async durability a call is *lazy*: what it is fed is kept, with the time each chunk
    arrived, and fed to the capture, together with building, encoding and hashing the record,
    on the ledger's writer thread (:meth:`LedgerWriter.defer`), so the caller pays for two list
    appends per chunk (the chunk, its time). Its capture is made there too, when first needed.
    What is kept is wire text or the JSON the client library parsed from it,
    never the library's objects, so what the caller does with those later cannot change the
    record. Errors noted on the caller's side (:meth:`note_error`) are applied after the chunks,
    as they happened. Under strict durability everything happens on the caller's thread.

    An SSE stream is kept as the body's reads (:meth:`feed_sse`, ``bytes`` in ``pending``),
    under either durability, and its events are fed when the call is built, as the proxy
    reads them; a caller that drops the stream half-way has its record hold only the chunks it
    took (:meth:`abandon`).
    """

    __slots__ = (
        "__weakref__",
        "_capture",
        "_event_id",
        "_request",
        "api",
        "auditor",
        "ended_at",
        "expect_end",
        "fed",
        "first_token",
        "last_seen",
        "lazy",
        "model_version",
        "noted",
        "pending",
        "recorded",
        "sse",
        "started",
        "status",
        "stop",
        "taken",
        "times",
        "took",
        "wall",
    )

    def __init__(self, auditor: Auditor, api: str, request: Mapping[str, Any]) -> None:
        self.auditor = auditor
        self.api = api
        self._request = request
        self._capture: Capture | None = None
        self.wall = time.time()
        self.started = time.perf_counter()
        self.lazy = auditor.recorder.durability == "async"
        # A lazy call's is drawn when its record is built (:meth:`_exchange`), off the caller.
        self._event_id: str | None = None if self.lazy else new_event_id()
        self.first_token: float | None = None
        self.status: int | None = None
        self.recorded = False
        self.model_version: str | None = None
        # What a lazy call or an SSE body was fed, and when each arrived (side by side, not in
        # pairs: a tuple a chunk, kept until the record is built, would only feed the garbage
        # collector's young generation).
        self.pending: list[Any] = []
        self.times: list[float] = []
        self.last_seen = False  # the chunk that ends the exchange has arrived
        self.noted: str | None = None  # lazy: an error noted on the caller's side
        self.fed = 0  # chunks fed so far
        self.sse: SSEReader | None = None  # the SSE body's events, read as it is replayed
        self.took = 0  # an SSE stream: the chunks handed to the caller so far
        self.taken: int | None = None  # a dropped SSE stream: the chunks its record holds
        self.stop: str | None = None  # recorded: the stop reason given (or None) ...
        self.ended_at = 0.0  # ... when the exchange ended (perf_counter) ...
        self.expect_end = False  # ... and whether the response ended without error

    @property
    def capture(self) -> Capture:
        """The exchange's capture, made when first needed: for a lazy call that only a stream's
        chunks feed, on the writer thread as the record is built."""
        capture = self._capture
        if capture is None:
            capture = self._capture = new_capture(self.api, self._request)
        return capture

    @property
    def model(self) -> str | None:
        """The model the request names (a string), read without making the capture."""
        model = self._request.get("model")
        return model if isinstance(model, str) else None

    @property
    def event_id(self) -> str:
        """The record's event id, drawn when first asked for."""
        event_id = self._event_id
        if event_id is None:
            event_id = self._event_id = new_event_id()
        return event_id

    @property
    def ended(self) -> bool:
        """Whether the exchange's final chunk (or an error) has been fed."""
        if self.lazy:
            return self.last_seen
        return self.capture.finished or self.capture.error is not None

    def feed(self, chunk: Any) -> None:
        """Take one response chunk as parsed wire JSON (one NDJSON line, SSE payload or body)."""
        if self.recorded:
            return
        self.fed += 1
        if self.lazy:
            # (A chunk that is a JSON string is kept as its text: a str kept is a line.)
            self.pending.append(chunk if type(chunk) is not str else _Text(orjson.dumps(chunk)))
            self.times.append(time.perf_counter())
            if not self.last_seen:
                self.last_seen = self.capture.is_last(chunk)
        elif self.capture.feed(chunk) and self.first_token is None:
            self.first_token = time.perf_counter()

    def feed_raw(self, raw: bytes | str) -> None:
        """Take one chunk's JSON text: an NDJSON line (``str``) or a whole body (``bytes``).

        Text that is not JSON marks the call as failed. A lazy call keeps the text and parses
        it later, unless a line may end the exchange (``"done": true`` or an ``"error"`` key,
        which the text of an answer cannot hold, as JSON escapes the quotes in a string).
        """
        if self.recorded:
            return
        if not self.lazy:
            try:
                chunk = loads(raw)
            except ValueError:
                if self.capture.error is None:
                    self.capture.error = NOT_JSON
                return
            self.feed(chunk)
            return
        if isinstance(raw, str):
            self.feed_line(raw)
            return
        self.fed += 1
        self.pending.append(_Text(raw))  # a whole body: nothing follows it
        self.times.append(time.perf_counter())

    def feed_line(self, line: str) -> bool:
        """Take one NDJSON line (not blank) and say whether the exchange has ended: the
        streamed reader's one call a line (:meth:`feed_raw` and :attr:`ended` in one).

        A lazy call keeps the line itself (a ``str`` in ``pending`` is an NDJSON line) and its
        time; only a line holding ``true`` or ``"error"`` is searched for an end (see
        :data:`_MAY_END`), so an ordinary line costs two appends.
        """
        if not self.lazy or self.recorded:
            self.feed_raw(line)
            return self.ended
        self.fed += 1
        self.pending.append(line)
        self.times.append(time.perf_counter())
        if (
            not self.last_seen
            and ("true" in line or '"error"' in line)
            and _MAY_END.search(line) is not None
        ):
            try:
                self.last_seen = self.capture.is_last(loads(line))
            except ValueError:
                self.last_seen = True  # the replay notes it, and nothing after it counts
        return self.last_seen

    def feed_sse(self, data: bytes) -> None:
        """Take one read of an SSE body, as it arrived; its events are fed when the call is
        built (the events a read completes carry its time)."""
        if not self.recorded:
            self.pending.append(data)
            self.times.append(time.perf_counter())

    def note_error(self, message: str) -> None:
        """An error seen on the caller's side; the upstream's own error, if any, comes first."""
        if self.lazy:
            if self.noted is None:
                self.noted = message
            return
        if self.pending:  # an SSE body read so far: the upstream's error event comes first
            self._replay()
        if self.capture.error is None:
            self.capture.error = message

    def fail(self, exc: BaseException) -> None:
        """The call raised after the request was sent: keep the exception as the error text."""
        self.note_error(f"{type(exc).__name__}: {exc}")

    def _replay(self) -> None:
        """Feed the capture what the call kept (a lazy call's chunks, an SSE body's reads), in
        order, with the times they arrived."""
        capture = self.capture
        pending, times = self.pending, self.times
        i, n = 0, len(pending)
        while i < n:
            chunk, at = pending[i], times[i]
            i += 1
            if type(chunk) is bytes:
                if self.first_token is not None:
                    # The times of the rest no longer matter: read the reads that follow this
                    # one at once (18 µs against 28 for an 18-chunk stream's, timed in a loop).
                    j = i
                    while j < n and type(pending[j]) is bytes:
                        j += 1
                    if j > i:
                        chunk = b"".join(pending[i - 1 : j])
                        i = j
                if not self._replay_sse(chunk, at):
                    break
                continue
            kind = type(chunk)
            if kind is str or kind is _Text:  # an NDJSON line, or text kept as received
                try:
                    chunk = loads(chunk.raw if isinstance(chunk, _Text) else chunk)
                except ValueError:
                    if capture.error is None:
                        capture.error = NOT_JSON
                    break  # as when fed at once: the call ends on the first such line
            if capture.feed(chunk) and self.first_token is None:
                self.first_token = at
        self.pending, self.times = [], []
        if self.noted is not None and capture.error is None:
            capture.error = self.noted

    def _replay_sse(self, data: bytes, at: float) -> bool:
        """Feed the events one read of an SSE body completes, as the proxy reads them: the data
        of each, ``[DONE]`` ending the stream, an event that is empty or not JSON skipped (the
        client library raises on it, and the caller's error is noted). False once a dropped
        stream's chunks are all fed (:attr:`taken`)."""
        if self.sse is None:
            self.sse = SSEReader()
        capture = self.capture
        for event in self.sse.feed(data):
            body = event.strip()
            if self.taken is not None and self.taken <= 0:
                return False
            if body.startswith(b"[DONE]"):  # as the openai clients test it
                capture.finished = True
                continue
            if not body:
                continue
            try:
                chunk = loads(body)
            except ValueError:
                continue
            if self.taken is not None:
                self.taken -= 1
            if capture.feed(chunk) and self.first_token is None:
                self.first_token = at
        return True

    def _exchange(
        self, stop: str | None, ended: float, expect_end: bool, *, dropped: bool = False
    ) -> Exchange:
        """The :class:`~tokentrail._record.Exchange` as captured (after the replay, if lazy).

        ``dropped``: the caller closed or dropped the stream before its end: a
        ``client_disconnect``, unless the model had already finished its answer (a caller that
        stops reading at the chunk with ``finish_reason``), when its own reason stands.
        """
        self._replay()
        capture = self.capture
        if dropped and not capture.model_finished():
            stop = "client_disconnect"
        status = self.status or 0
        if status >= 400 and capture.error is None:
            capture.error = f"HTTP {status}"
        elif expect_end and not capture.finished and capture.error is None:
            capture.error = "upstream closed the stream before its end"
        return capture.finish(self.meta(ended), stop)

    def meta(self, ended: float) -> Meta:
        """What the call knows beyond the wire, as of ``ended`` (``perf_counter``)."""
        a = self.auditor
        capture = self.capture
        model_version = self.model_version
        if model_version is None and a.model_version is not None:
            model_version = a.model_version(capture.model)
        return Meta(
            timestamp=rfc3339(self.wall),
            event_id=self.event_id,
            request_duration_ms=(ended - self.started) * 1000.0,
            # A whole body has no first token apart from its end (the proxy records none).
            time_to_first_token_ms=None
            if self.first_token is None or not capture.stream
            else (self.first_token - self.started) * 1000.0,
            user_id=a.user_id,
            session_id=a.session_id,
            model_version=model_version,
            status=self.status,
            extra={"stream": capture.stream, VIA_FIELD: VIA_SDK, CLIENT_FIELD: a.client},
        )

    def unsent(self) -> None:
        """The request never left (connection refused): no record, and no in-flight note (nor
        one at the recorder's close, which records the calls still open)."""
        if self.recorded:
            return
        self.recorded = True
        if not self.lazy:
            self.auditor.recorder.local_writer().abandon(self.event_id)

    def record(self, stop: str | None = None, *, expect_end: bool = False) -> Record | None:
        """Record once: blocking for strict durability, handed to the writer thread for async.

        ``expect_end``: the response ended without error on the caller's side, so a capture
        that saw no final chunk says the upstream closed the stream early.
        """
        if self.recorded:
            return None
        self.recorded = True
        ended = time.perf_counter()
        recorder = self.auditor.recorder
        if self.lazy:
            # Kept on the call, not in a closure: fewer objects kept alive until it is built.
            self.stop, self.ended_at, self.expect_end = stop, ended, expect_end
            recorder.defer(self._deferred)
            return None
        return recorder.append(self._exchange(stop, ended, expect_end))

    def _deferred(self) -> Exchange:
        """A lazy call's exchange, built on the writer thread once it is recorded."""
        return self._exchange(self.stop, self.ended_at, self.expect_end)

    async def arecord(self, stop: str | None = None, *, expect_end: bool = False) -> Record | None:
        """Record once from asyncio code."""
        if self.recorded:
            return None
        if self.lazy:
            return self.record(stop, expect_end=expect_end)
        self.recorded = True
        exchange = self._exchange(stop, time.perf_counter(), expect_end)
        return await self.auditor.recorder.aappend(exchange)

    def abandon(self, taken: int | None = None) -> None:
        """The caller dropped the stream: record ``client_disconnect`` without waiting.

        ``taken``: of an SSE stream kept as its reads, the chunks the caller took; the record
        holds those (what was read beyond them, the caller never saw).

        This runs in finalizers too (a stream or generator the collector closes), perhaps on a
        thread inside the ledger's own lock, so it hands the record over without taking it.
        """
        if self.recorded:
            return
        self.recorded = True
        self.taken = taken
        ended = time.perf_counter()
        self.auditor.recorder.orphan(lambda: self._exchange(None, ended, False, dropped=True))
