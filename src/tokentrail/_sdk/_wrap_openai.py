"""Audited ``openai.OpenAI`` / ``openai.AsyncOpenAI``: a transparent proxy of the caller's client.

``client.chat.completions.create`` and ``client.completions.create`` run the library's own
``create`` with one difference: the resource's ``_post`` (the single call every ``create`` makes)
is intercepted, so the request body is the one the library built (``extra_body`` merged in as the
library merges it) and the result is the library's own object. A non-streamed result is returned
as it is; a stream is handed back inside a thin wrapper that yields the very same chunk objects.

What the capture (the proxy's) is fed is the wire: every field the server sent, extension
fields included (vLLM's ``token_ids``, llama.cpp's ``id``). A whole body the library parses with
``json`` and hands to its client's ``_process_response_data`` to build its model; the audited
resource runs on a shallow copy of the caller's client (same connection pool) whose
``_process_response_data`` first hands that parsed JSON to the call in progress (a context
variable says which), at no extra parsing. Should a future library not call that hook, the body
is read back with ``model_dump(exclude_unset=True)`` instead. (openai's models copy what they
declare; fields they do not declare are shared with the parsed JSON, so a caller that mutates
``model_extra`` before an async-durability record is built would change it.) A stream is kept as
the bytes the library reads (its response's ``iter_bytes``), a read and its time appended, and its
events are parsed as the proxy parses them when the record is built: under async durability, on
the ledger's writer thread, so a streamed chunk costs the caller a count.

``client.beta``, ``with_raw_response`` and ``with_streaming_response`` (the client's or a
resource's) are built on the audited client, so ``beta.chat.completions.parse`` and ``stream``
and those calls are recorded too: a raw body at once, parsed or not; a raw stream as its
``parse()`` is read; a streaming response once the caller has read its body to the end, however
it reads it, or as ``client_disconnect`` if it closes it unread. Everything else (``models``,
``embeddings``, …) is the caller's client, untouched. ``with_options`` / ``copy`` return an
audited client again. ``isinstance`` sees the wrapped class.

One record per ``create`` call: the library's own retries (``max_retries``) happen inside it. A
refused connection leaves no record (nothing was sent), a timeout or an error status leaves
``upstream_error``, a stream closed or dropped half-way ``client_disconnect``. Under strict
durability a stream ends (``StopIteration``) only once its record is on disk.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import openai

from .._errors import StoreError
from ._calls import Auditor, Call, wire_copy
from ._recorder import Recorder, log

try:  # the library's own JSON encoding of a request body (pydantic models, dates …)
    from openai._utils._json import openapi_dumps as _dumps

    _DUMPS: Callable[[Any], bytes] | None = _dumps
except ImportError:  # pragma: no cover - older openai
    _DUMPS = None

try:  # how ``with_raw_response`` asks the library for its raw response
    from openai._constants import RAW_RESPONSE_HEADER as _RAW_HEADER
except ImportError:  # pragma: no cover - older openai
    _RAW_HEADER = "X-Stainless-Raw-Response"

_OMIT: tuple[type, ...] = tuple(
    t for t in (getattr(openai, "Omit", None), getattr(openai, "NotGiven", None)) if t
)
_CONNECT_CAUSES = ("ConnectError", "ConnectTimeout")

#: The call whose response the library is parsing on this thread / in this task.
_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "tokentrail_openai_call", default=None
)


def _tapped_client(client: Any) -> Any:
    """A shallow copy of ``client`` that shows the current call each parsed response body.

    The copy takes the client's attributes again before each call (:func:`_resync`), so an
    ``api_key`` or ``base_url`` the caller sets later is the one used, as with the client.
    """
    tapped = copy.copy(client)
    process = client._process_response_data

    def tap(*, data: object, cast_to: Any, response: Any) -> Any:
        call = _CURRENT.get()
        if call is not None:
            call.feed(data)
        return process(data=data, cast_to=cast_to, response=response)

    tapped._process_response_data = tap
    tapped._tt_hook = tap
    tapped._tt_origin = client
    return tapped


def _resync(tapped: Any, client: Any) -> None:
    """Give the tapped copy the client's current attributes (keeping the tap)."""
    hook = tapped._tt_hook
    tapped.__dict__.update(client.__dict__)
    tapped._process_response_data = hook
    tapped._tt_hook = hook


def _not_sent(exc: BaseException) -> bool:
    """Whether a connection error happened before the request left (refused, no route)."""
    if isinstance(exc, openai.APITimeoutError):
        cause = exc.__cause__
        return cause is not None and type(cause).__name__ == "ConnectTimeout"
    cause = exc.__cause__
    return cause is None or type(cause).__name__ in _CONNECT_CAUSES


def _body(body: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body as the library sends it: ``body`` with ``extra_body`` merged over it."""
    merged: dict[str, Any] = dict(body) if isinstance(body, Mapping) else {}
    extra = options.get("extra_json")
    if isinstance(extra, Mapping):
        merged.update(extra)
    if _OMIT:
        merged = {k: v for k, v in merged.items() if not isinstance(v, _OMIT)}
    return wire_copy(merged, _DUMPS)


def _dump(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    return dump(exclude_unset=True, warnings=False) if dump is not None else obj


def _request_failed(call: Call, exc: BaseException) -> bool:
    """Note why ``create`` raised; whether the exchange reached the server (and gets a record)."""
    if isinstance(exc, openai.APIStatusError):
        call.status = exc.status_code
        if exc.body is not None:
            call.feed({"error": exc.body})
        call.note_error(exc.message)
        return True
    if (isinstance(exc, openai.APIConnectionError) and _not_sent(exc)) or _raised_building(exc):
        call.unsent()
        return False  # refused, no route, a body the library cannot encode: nothing was sent
    call.fail(exc)
    return True


def _raised_building(exc: BaseException) -> bool:
    """Whether ``exc`` came from the library building the request (``_build_request``): a
    body it cannot encode, say a UUID, which the request body's copy (:func:`_body`) lets by."""
    if isinstance(exc, openai.OpenAIError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_build_request":
            return True
        tb = tb.tb_next
    return False


class _Transparent:
    """A proxy that passes every attribute through and answers ``isinstance`` as its target."""

    _tt_target: Any

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_tt_"):
            raise AttributeError(name)
        return getattr(self._tt_target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_tt_"):
            object.__setattr__(self, name, value)
        else:  # client.api_key = ...: the caller's client changes, as it would unwrapped
            setattr(self._tt_target, name, value)

    @property  # type: ignore[misc]
    def __class__(self) -> type[Any]:  # isinstance() consults this, as for unittest.mock
        return type(self._tt_target)

    def __repr__(self) -> str:
        return f"<audited {self._tt_target!r}>"


class AuditedOpenAI(_Transparent):
    """An ``openai.OpenAI`` or ``openai.AsyncOpenAI`` whose completions are recorded."""

    def __init__(self, client: Any, auditor: Auditor) -> None:
        self._tt_target = client
        self._tt_auditor = auditor
        self._tt_chat: _AuditedChat | None = None
        self._tt_completions: _AuditedCreate | None = None
        self._tt_beta: Any = None

    @property
    def chat(self) -> Any:
        """``client.chat``, with ``chat.completions.create`` recorded."""
        if self._tt_chat is None:
            self._tt_chat = _AuditedChat(self._tt_target.chat, self._tt_auditor)
        return self._tt_chat

    @property
    def completions(self) -> Any:
        """``client.completions``, with ``create`` recorded."""
        if self._tt_completions is None:
            self._tt_completions = _AuditedCreate(
                self._tt_target.completions, self._tt_auditor, "openai.completions"
            )
        return self._tt_completions

    @property
    def beta(self) -> Any:
        """``client.beta``, built on this audited client, so that its structured-output helpers
        (``beta.chat.completions.parse`` and ``stream``) are recorded as ``create`` is.

        The library builds each resource on a client whose ``post`` it calls (and, in versions
        before ``parse`` left ``beta``, whose ``chat.completions.create``): built on this one,
        both are the audited ones (see :meth:`post`). Its other resources (assistants, threads,
        …) reach the caller's client through :meth:`post` unchanged.
        """
        if self._tt_beta is None:
            self._tt_beta = type(self._tt_target.beta)(self)
        return self._tt_beta

    @property
    def with_raw_response(self) -> Any:
        """``client.with_raw_response``, built on this audited client: its chat and legacy
        completions are recorded (see :meth:`_AuditedCreate.with_raw_response`)."""
        return type(self._tt_target.with_raw_response)(self)

    @property
    def with_streaming_response(self) -> Any:
        """``client.with_streaming_response``, built on this audited client: its chat and legacy
        completions are recorded (see :class:`AuditedStreamingResponse`)."""
        return type(self._tt_target.with_streaming_response)(self)

    def post(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """The client's ``post``, as the resources built on this client call it: chat and legacy
        completions are audited as ``create`` is, any other path goes to the caller's client."""
        if path == "/chat/completions":
            return self.chat.completions._tt_tap._post(path, *args, **kwargs)
        if path == "/completions":
            return self.completions._tt_tap._post(path, *args, **kwargs)
        return self._tt_target.post(path, *args, **kwargs)

    def with_options(self, **options: Any) -> AuditedOpenAI:
        """The client's ``with_options``, audited the same way."""
        return AuditedOpenAI(self._tt_target.with_options(**options), self._tt_auditor)

    def copy(self, **options: Any) -> AuditedOpenAI:
        """The client's ``copy``, audited the same way."""
        return AuditedOpenAI(self._tt_target.copy(**options), self._tt_auditor)

    # ``with openai.OpenAI() as client``: special methods are not found by __getattr__.
    def __enter__(self) -> AuditedOpenAI:
        self._tt_target.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tt_target.__exit__(*exc)

    async def __aenter__(self) -> AuditedOpenAI:
        await self._tt_target.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._tt_target.__aexit__(*exc)


class _AuditedChat(_Transparent):
    def __init__(self, chat: Any, auditor: Auditor) -> None:
        self._tt_target = chat
        self._tt_completions = _AuditedCreate(chat.completions, auditor, "openai.chat")

    @property
    def completions(self) -> Any:
        """``chat.completions``, with ``create`` recorded."""
        return self._tt_completions


class _AuditedCreate(_Transparent):
    """A completions resource whose ``create`` runs the library's code with ``_post`` tapped."""

    def __init__(self, resource: Any, auditor: Auditor, api: str) -> None:
        self._tt_target = resource
        self._tt_auditor = auditor
        self._tt_api = api
        tap = copy.copy(resource)
        client = getattr(resource, "_client", None)
        self._tt_client = client
        self._tt_tapped: Any = None
        if client is not None and hasattr(client, "_process_response_data"):
            tap._client = self._tt_tapped = _tapped_client(client)
            self._tt_post = tap._client.post
        else:  # pragma: no cover - a library without the hook: model_dump fallback
            self._tt_post = resource._post
        tap._post = self._apost if inspect.iscoroutinefunction(self._tt_post) else self._post
        self._tt_tap = tap

    def create(self, *args: Any, **kwargs: Any) -> Any:
        """The library's ``create``; its result (or stream) comes back as the library made it."""
        return self._tt_tap.create(*args, **kwargs)

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        """The library's ``parse`` (structured outputs), which posts as ``create`` does."""
        return self._tt_tap.parse(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        """The library's ``stream`` helper, whose requests are ``create(stream=True)``."""
        return self._tt_tap.stream(*args, **kwargs)

    @property
    def with_raw_response(self) -> Any:
        """``with_raw_response`` of the resource, built on the tapped one: ``create`` returns
        the library's raw response, and the exchange is recorded as ``create``'s is (a whole
        body at once; a stream as the raw response's ``parse()`` is read)."""
        return type(self._tt_target.with_raw_response)(self._tt_tap)

    @property
    def with_streaming_response(self) -> Any:
        """``with_streaming_response`` of the resource, built on the tapped one: the response
        comes back unread, and the exchange is recorded as the caller reads it
        (:class:`AuditedStreamingResponse`)."""
        return type(self._tt_target.with_streaming_response)(self._tt_tap)

    def _post(
        self, path: str, *, body: Any = None, options: Any = None, stream: bool = False, **kw: Any
    ) -> Any:
        options = options or {}
        call = self._tt_auditor.begin(self._tt_api, _body(body, options))
        if self._tt_tapped is not None:
            _resync(self._tt_tapped, self._tt_client)
        token = _CURRENT.set(call)
        try:
            result = self._tt_post(path, body=body, options=options, stream=stream, **kw)
        except Exception as exc:
            if _request_failed(call, exc):
                _record_quietly(call)
            raise
        finally:
            _CURRENT.reset(token)
        call.status = 200  # the library raises for anything but 2xx
        answer, whole = _answer(result, call, options, stream, asynchronous=False)
        if whole:
            call.record()
        return answer

    async def _apost(
        self, path: str, *, body: Any = None, options: Any = None, stream: bool = False, **kw: Any
    ) -> Any:
        options = options or {}
        call = self._tt_auditor.begin(self._tt_api, _body(body, options))
        if self._tt_tapped is not None:
            _resync(self._tt_tapped, self._tt_client)
        token = _CURRENT.set(call)
        try:
            result = await self._tt_post(path, body=body, options=options, stream=stream, **kw)
        except asyncio.CancelledError:
            call.abandon()  # the caller gave up on a call that was sent: client_disconnect
            raise
        except BaseException as exc:
            if _request_failed(call, exc):
                await _arecord_quietly(call)
            raise
        finally:
            _CURRENT.reset(token)
        call.status = 200
        answer, whole = _answer(result, call, options, stream, asynchronous=True)
        if whole:
            await call.arecord()
        return answer


class AuditedStream(_Transparent):
    """An ``openai.Stream`` that yields the library's own chunks and records the exchange.

    What is recorded is the body as the library read it (:func:`_audited_stream` taps the
    response's ``iter_bytes``), so a chunk costs the caller a count here and a read a list
    append; the events are parsed when the record is built (under async durability, on the
    writer thread).
    """

    def __init__(self, stream: Any, call: Call) -> None:
        self._tt_target = stream
        self._tt_call = call

    def __iter__(self) -> Iterator[Any]:
        """The library's iteration (a generator, as the library's ``__iter__`` is), counted.

        A loop that breaks out leaves the stream where it was, as the library's does: the
        stream is recorded at its end, at ``close()``, or when it is dropped.
        """
        call = self._tt_call
        try:
            for chunk in self._tt_target:
                call.took += 1
                yield chunk
        except Exception as exc:
            call.fail(exc)
            _record_quietly(call)
            raise
        call.record()

    def __next__(self) -> Any:
        call = self._tt_call
        try:
            chunk = self._tt_target.__next__()
        except StopIteration:
            call.record()
            raise
        except Exception as exc:
            call.fail(exc)
            _record_quietly(call)
            raise
        call.took += 1
        return chunk

    def close(self) -> None:
        """Close the stream; one closed before its end is recorded as ``client_disconnect``."""
        self._tt_call.abandon(self._tt_call.took)
        self._tt_target.close()

    def __enter__(self) -> AuditedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        call = getattr(self, "_tt_call", None)
        if call is not None and not call.recorded:
            call.abandon(call.took)


class AuditedAsyncStream(_Transparent):
    """An ``openai.AsyncStream`` that yields the library's own chunks and records the exchange
    (the body as read, as :class:`AuditedStream`)."""

    def __init__(self, stream: Any, call: Call) -> None:
        self._tt_target = stream
        self._tt_call = call

    def __aiter__(self) -> AuditedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        call = self._tt_call
        try:
            chunk = await self._tt_target.__anext__()
        except StopAsyncIteration:
            await call.arecord()
            raise
        except Exception as exc:
            call.fail(exc)
            await _arecord_quietly(call)
            raise
        call.took += 1
        return chunk

    async def close(self) -> None:
        """Close the stream; one closed before its end is recorded as ``client_disconnect``."""
        self._tt_call.abandon(self._tt_call.took)
        await self._tt_target.close()

    async def aclose(self) -> None:
        """:meth:`close`, by the name async generators use."""
        await self.close()

    async def __aenter__(self) -> AuditedAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        call = getattr(self, "_tt_call", None)
        if call is not None and not call.recorded:
            call.abandon(call.took)


def _audited_stream(stream: Any, call: Call) -> Any:
    """The library's stream, not yet read, in its audited wrapper, with its response's body
    reads kept for the record (:meth:`Call.feed_sse`) as the library makes them.

    The stream parses its chunks with the caller's own client, not the tapped copy it was made
    by: the record is read from the bytes, so the tap would only cost a call a chunk.
    """
    origin = getattr(stream._client, "_tt_origin", None)
    if origin is not None:
        stream._client = origin
    response = stream.response
    # The tap takes itself out of the response when the library calls it: left in the
    # response's __dict__, it and the bound method it holds would make a reference cycle, and
    # every streamed response would wait for the garbage collector to be freed.
    if hasattr(stream, "__anext__"):
        aread = response.aiter_bytes

        def aiter_bytes(chunk_size: int | None = None) -> Any:
            del response.aiter_bytes
            return _afed(aread(chunk_size), call)

        response.aiter_bytes = aiter_bytes
        return AuditedAsyncStream(stream, call)
    read = response.iter_bytes

    def iter_bytes(chunk_size: int | None = None) -> Any:
        del response.iter_bytes
        return _fed(read(chunk_size), call)

    response.iter_bytes = iter_bytes
    return AuditedStream(stream, call)


def _fed(reads: Iterator[bytes], call: Call) -> Iterator[bytes]:
    """The body's reads, each kept for the record (:meth:`Call.feed_sse`) as it passes."""
    for data in reads:
        call.feed_sse(data)
        yield data


async def _afed(reads: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
    """:func:`_fed` for an async body."""
    async for data in reads:
        call.feed_sse(data)
        yield data


def _raw_kind(options: Mapping[str, Any]) -> Any:
    """How the library is to answer: "true" through ``with_raw_response`` (its raw response),
    "stream" through ``with_streaming_response`` (a response whose body the caller reads), else
    ``None`` (the parsed result)."""
    headers = options.get("headers")
    return headers.get(_RAW_HEADER) if isinstance(headers, Mapping) else None


def _answer(
    result: Any, call: Call, options: Mapping[str, Any], stream: bool, *, asynchronous: bool
) -> tuple[Any, bool]:
    """What a sent call gives the caller, and whether its whole answer is in (to record now).

    A stream, raw or not, and a streaming response come back in a wrapper that records the
    exchange as the caller reads it. A whole body has been fed: the library's parsed result, or
    for ``with_raw_response`` the bytes the library read (it parses them only if asked).
    """
    kind = _raw_kind(options)
    if kind == "stream":
        cls = AsyncAuditedStreamingResponse if asynchronous else AuditedStreamingResponse
        return cls(result, call, stream), False
    if stream:
        if kind == "true":
            return AuditedRawResponse(result, call), False
        return _audited_stream(result, call), False
    if kind == "true":
        content = getattr(getattr(result, "http_response", None), "content", None)
        if isinstance(content, bytes):
            call.feed_raw(content)
        else:  # pragma: no cover - a library whose raw response holds no body
            call.note_error("tokentrail: the raw response held no body to record")
    elif not call.fed:
        call.feed(_dump(result))
    return result, True


class AuditedRawResponse(_Transparent):
    """The library's raw response to a streamed ``with_raw_response`` call: the same object
    (headers, status, ``http_response``), whose ``parse()`` returns the audited stream. A raw
    response dropped without being parsed is recorded as ``client_disconnect``."""

    def __init__(self, raw: Any, call: Call) -> None:
        self._tt_target = raw
        self._tt_call = call
        self._tt_parsed = False

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        """The library's ``parse()``: a stream, here the audited one."""
        stream = self._tt_target.parse(*args, **kwargs)
        self._tt_parsed = True  # the stream records the exchange from here on
        return _audited_stream(stream, self._tt_call)

    def __del__(self) -> None:
        call = getattr(self, "_tt_call", None)
        if call is not None and not call.recorded and not getattr(self, "_tt_parsed", True):
            call.abandon()


def _feed_body(call: Call, body: bytes, stream: bool) -> None:
    """Feed a body the caller read: a JSON body, or an SSE stream's (its events read as a
    stream's are, :meth:`Call.feed_sse`)."""
    if stream:
        call.feed_sse(body)
    else:
        call.feed_raw(body)


class _StreamingBase(_Transparent):
    """What the sync and async streaming responses share: the call, and the body as read."""

    def __init__(self, response: Any, call: Call, stream: bool) -> None:
        self._tt_target = response
        self._tt_call = call
        self._tt_stream = stream
        self._tt_taken = False  # parse() handed the stream on: it records the exchange
        self._tt_got: list[bytes] = []  # what an iter_* loop has read of the body so far

    def _tt_read(self, body: bytes) -> bool:
        """Feed a body read to its end; whether the call is to be recorded now."""
        if self._tt_call.recorded or self._tt_taken:
            return False
        _feed_body(self._tt_call, body, self._tt_stream)
        return True

    def _tt_content(self) -> bytes:
        return bytes(self._tt_target.http_response.content)

    def _tt_stopped(self) -> None:
        """Closed or dropped before the body's end: a ``client_disconnect``, holding the events
        of a stream that an ``iter_*`` loop read before the caller left it (a part of a JSON
        body is nothing to record)."""
        call = self._tt_call
        if call.recorded or self._tt_taken:
            return
        if self._tt_stream and self._tt_got:
            _feed_body(call, b"".join(self._tt_got), True)
        call.abandon()

    def __del__(self) -> None:
        if getattr(self, "_tt_call", None) is not None and not getattr(self, "_tt_taken", True):
            self._tt_stopped()


class AuditedStreamingResponse(_StreamingBase):
    """The library's response to a ``with_streaming_response`` call, unread: the same object,
    whose reads record the exchange once the body is read to its end (``parse()`` of a stream
    gives the audited stream). One closed before that is a ``client_disconnect``."""

    def _tt_done(self, body: bytes) -> None:
        if self._tt_read(body):
            self._tt_call.record()

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        """The library's ``parse()``."""
        result = self._tt_target.parse(*args, **kwargs)
        if self._tt_stream:
            if not self._tt_taken:
                self._tt_taken = True
                return _audited_stream(result, self._tt_call)
            return result
        self._tt_done(self._tt_content())
        return result

    def read(self) -> bytes:
        """The library's ``read()``."""
        body: bytes = self._tt_target.read()
        self._tt_done(body)
        return body

    def text(self) -> str:
        """The library's ``text()``."""
        text: str = self._tt_target.text()
        self._tt_done(self._tt_content())
        return text

    def json(self) -> object:
        """The library's ``json()``."""
        value = self._tt_target.json()
        self._tt_done(self._tt_content())
        return value

    def iter_bytes(self, chunk_size: int | None = None) -> Any:
        """The library's ``iter_bytes()``; the exchange is recorded at the body's
        end, or at ``close()`` with what it read if the caller left the loop."""
        got = self._tt_got
        for chunk in self._tt_target.iter_bytes(chunk_size):
            got.append(chunk)
            yield chunk
        self._tt_done(b"".join(got))

    def iter_text(self, chunk_size: int | None = None) -> Any:
        """The library's ``iter_text()``; the exchange is recorded at the body's
        end, or at ``close()`` with what it read if the caller left the loop."""
        got = self._tt_got
        for chunk in self._tt_target.iter_text(chunk_size):
            got.append(chunk.encode())
            yield chunk
        self._tt_done(b"".join(got))

    def iter_lines(self) -> Any:
        """The library's ``iter_lines()``; the exchange is recorded at the body's
        end, or at ``close()`` with what it read if the caller left the loop."""
        got = self._tt_got
        for line in self._tt_target.iter_lines():
            got.append(line.encode() + b"\n")
            yield line
        self._tt_done(b"".join(got))

    def close(self) -> None:
        """Close; a response closed before its body was read is a ``client_disconnect``."""
        self._tt_stopped()
        self._tt_target.close()


class AsyncAuditedStreamingResponse(_StreamingBase):
    """:class:`AuditedStreamingResponse` for ``openai.AsyncOpenAI``."""

    async def _tt_done(self, body: bytes) -> None:
        if self._tt_read(body):
            await self._tt_call.arecord()

    async def parse(self, *args: Any, **kwargs: Any) -> Any:
        """The library's ``parse()``."""
        result = await self._tt_target.parse(*args, **kwargs)
        if self._tt_stream:
            if not self._tt_taken:
                self._tt_taken = True
                return _audited_stream(result, self._tt_call)
            return result
        await self._tt_done(self._tt_content())
        return result

    async def read(self) -> bytes:
        """The library's ``read()``."""
        body: bytes = await self._tt_target.read()
        await self._tt_done(body)
        return body

    async def text(self) -> str:
        """The library's ``text()``."""
        text: str = await self._tt_target.text()
        await self._tt_done(self._tt_content())
        return text

    async def json(self) -> object:
        """The library's ``json()``."""
        value = await self._tt_target.json()
        await self._tt_done(self._tt_content())
        return value

    async def iter_bytes(self, chunk_size: int | None = None) -> Any:
        """The library's ``iter_bytes()``; the exchange is recorded at the body's
        end, or at ``close()`` with what it read if the caller left the loop."""
        got = self._tt_got
        async for chunk in self._tt_target.iter_bytes(chunk_size):
            got.append(chunk)
            yield chunk
        await self._tt_done(b"".join(got))

    async def iter_text(self, chunk_size: int | None = None) -> Any:
        """The library's ``iter_text()``; the exchange is recorded at the body's
        end, or at ``close()`` with what it read if the caller left the loop."""
        got = self._tt_got
        async for chunk in self._tt_target.iter_text(chunk_size):
            got.append(chunk.encode())
            yield chunk
        await self._tt_done(b"".join(got))

    async def iter_lines(self) -> Any:
        """The library's ``iter_lines()``; the exchange is recorded at the body's
        end, or at ``close()`` with what it read if the caller left the loop."""
        got = self._tt_got
        async for line in self._tt_target.iter_lines():
            got.append(line.encode() + b"\n")
            yield line
        await self._tt_done(b"".join(got))

    async def close(self) -> None:
        """Close; a response closed before its body was read is a ``client_disconnect``."""
        self._tt_stopped()
        await self._tt_target.close()


def _record_quietly(call: Call) -> None:
    """Record a failed call; the caller's own exception is the one it should see."""
    try:
        call.record("upstream_error")
    except StoreError as exc:
        log.error("tokentrail: could not record failed exchange %s: %s", call.event_id, exc)


async def _arecord_quietly(call: Call) -> None:
    try:
        await call.arecord("upstream_error")
    except StoreError as exc:
        log.error("tokentrail: could not record failed exchange %s: %s", call.event_id, exc)


def audit_openai(
    client: Any, recorder: Recorder, *, user_id: str | None, session_id: str | None
) -> AuditedOpenAI:
    """An audited proxy of an ``openai.OpenAI`` or ``openai.AsyncOpenAI``."""
    if type(client) is AuditedOpenAI:  # re-auditing: wrap the caller's client, not the proxy
        client = client._tt_target
    auditor = Auditor(
        recorder,
        user_id=user_id,
        session_id=session_id,
        client=f"openai-python/{openai.__version__}",
    )
    return AuditedOpenAI(client, auditor)
