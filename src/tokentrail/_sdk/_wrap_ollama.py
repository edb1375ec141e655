"""Audited ``ollama.Client`` / ``ollama.AsyncClient``: a copy whose HTTP client is tapped.

The audited client is a genuine ``ollama.Client`` (a shallow copy of the caller's, sharing its
connection pool), so every method, return type and streaming generator is the library's own. Its
``httpx`` client is replaced by a tap that passes everything through and, for ``POST
/api/generate`` and ``/api/chat``, hands the exact request body and every NDJSON line as it
arrives to the shared capture, like the proxy does.

Why the wire and not ``response.model_dump()``: ollama's pydantic models drop fields they do not
declare, among them ``logprobs[].bytes``, the only exact spelling of a token that is not valid
UTF-8 on its own; a record built from the models would differ from the proxy's.

Durability: the final NDJSON line (``"done": true``, or an error line) is handed to the library
only once the record is written (strict: on disk), as the proxy holds its final chunk. A stream
the caller abandons (closes the generator, or drops it to the garbage collector) is recorded with
``client_disconnect`` and the tokens so far. A connection that is refused leaves no record
(nothing was sent); a timeout or a cut after sending leaves ``upstream_error``.

``model_version`` is the model's digest from ``/api/tags`` (``client.list()``), cached for a
minute and refreshed beside the call, not before it. A strict call that ends before the first
lookup does waits for it, at most until the lookup is two seconds old, and not at all while
lookups fail or run longer than that (the proxy's rule: :mod:`tokentrail._digests`); an async
call never waits: its record, built on the ledger's thread, takes the digest known then.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import httpx

from .._capture import PATHS
from .._digests import Digests
from .._errors import ConfigError, StoreError
from ._calls import Auditor, Call, wire_copy
from ._recorder import Recorder, log

OLLAMA_APIS = {path: api for path, api in PATHS.items() if api.startswith("ollama.")}
DIGEST_TTL_S = 60.0


def _api_of(method: str, url: Any) -> str | None:
    if method.upper() != "POST":
        return None
    path = url if isinstance(url, str) else httpx.URL(url).path
    return OLLAMA_APIS.get(path.split("?", 1)[0])


class _Digests(Digests):
    """The digests of one audited client, looked up on a thread of their own
    (:meth:`_SyncTap._refresh`) or a task (the async client's)."""

    def __init__(self) -> None:
        super().__init__(DIGEST_TTL_S)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.done.set()
        self.task: asyncio.Task[None] | None = None

    def take(self, listing: Any) -> None:
        """Take a ``client.list()`` answer."""
        self.store(getattr(listing, "models", None) or [], _attribute)


def _attribute(model: Any, name: str) -> Any:
    return getattr(model, name, None)


class _Tapped:
    """The part of an audited ollama client both flavours share."""

    def __init__(self, client: Any, auditor: Auditor, http: Any) -> None:
        self.client = client  # the caller's own client: ``list()`` for the digests
        self.auditor = auditor
        self.http = http
        self.digests = _Digests()


class _SyncTap(_Tapped):
    """Stands in for the ``httpx.Client`` of an ``ollama.Client``."""

    def __getattr__(self, name: str) -> Any:
        if name == "http":  # not yet set (a copy in progress): no recursion
            raise AttributeError(name)
        return getattr(self.http, name)

    def _begin(self, api: str, kwargs: dict[str, Any]) -> Call:
        call = self.auditor.begin(api, wire_copy(kwargs.get("json") or {}))
        d = self.digests
        call.model_version = d.find(call.model)
        if d.due(call.model) and d.done.is_set():
            with d.lock:
                if d.done.is_set():
                    d.done.clear()
                    d.begin()
                    threading.Thread(target=self._refresh, daemon=True).start()
        return call

    def _refresh(self) -> None:
        d = self.digests
        ok = False
        try:
            d.take(self.client.list())
            ok = True
        except Exception as exc:  # an old server, a network hiccup: no digest this time
            log.debug("cannot list ollama models: %s", exc)
        finally:
            d.ended(ok)
            d.done.set()

    def _version(self, call: Call) -> None:
        """Under strict durability, the digest of the lookup under way, if it comes in time;
        under async, nothing here (the record's build looks it up: ``Auditor.model_version``)."""
        d = self.digests
        if call.model_version is not None or call.lazy:
            return
        if not d.done.is_set():
            d.done.wait(d.wait_left())
        call.model_version = d.find(call.model)

    def request(self, method: str, url: Any, **kwargs: Any) -> httpx.Response:
        """A non-streamed request: audited paths are recorded before the body is returned."""
        api = _api_of(method, url)
        if api is None:
            passed: httpx.Response = self.http.request(method, url, **kwargs)
            return passed
        call = self._begin(api, kwargs)
        try:
            resp: httpx.Response = self.http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            call.unsent()
            raise  # nothing was sent: no exchange to record
        except Exception as exc:
            call.fail(exc)
            self._version(call)
            _record_quietly(call)
            raise
        call.status = resp.status_code
        call.feed_raw(resp.content)
        self._version(call)
        call.record("upstream_error" if resp.status_code >= 400 else None)
        return resp

    def stream(self, method: str, url: Any, **kwargs: Any) -> Any:
        """A streamed request: a context manager like ``httpx.Client.stream``."""
        api = _api_of(method, url)
        if api is None:
            return self.http.stream(method, url, **kwargs)
        return _SyncStream(self, self._begin(api, kwargs), self.http.stream(method, url, **kwargs))


class _Stream:
    """What a wrapped ``stream(...)`` context holds: its call, the inner context, the response."""

    def __init__(self, call: Call, inner: Any) -> None:
        self.call = call
        self.inner = inner
        self.resp: httpx.Response | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resp, name)

    def _feed_error_body(self) -> None:
        """An error status whose body the library read itself (to raise ``ResponseError``):
        the capture takes the server's own error from it, as the proxy's does."""
        resp = self.resp
        if resp is None or resp.status_code < 400 or self.call.fed:
            return
        try:
            body = resp.content
        except httpx.ResponseNotRead:
            return
        if body:
            self.call.feed_raw(body)


class _SyncStream(_Stream):
    """``with tap.stream(...) as r``: feeds each line, records once, whatever way it ends."""

    def __init__(self, tap: _SyncTap, call: Call, inner: Any) -> None:
        super().__init__(call, inner)
        self.tap = tap

    def __enter__(self) -> _SyncStream:
        try:
            self.resp = self.inner.__enter__()
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self.call.unsent()
            raise
        except Exception as exc:
            self.call.fail(exc)
            self.tap._version(self.call)
            _record_quietly(self.call)
            raise
        self.call.status = self.resp.status_code
        return self

    def iter_lines(self) -> Iterator[str]:
        """The response's lines, each fed to the capture; the final one after its record."""
        assert self.resp is not None
        call = self.call
        for line in self.resp.iter_lines():
            if line and not line.isspace() and call.feed_line(line):
                self.tap._version(call)
                call.record()
            yield line

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return bool(self.inner.__exit__(et, exc, tb))
        finally:
            call = self.call
            if not call.recorded:
                if isinstance(exc, GeneratorExit):
                    call.abandon()
                else:
                    self.tap._version(call)
                    if exc is not None:
                        self._feed_error_body()
                        call.fail(exc)
                        _record_quietly(call)
                    else:
                        call.record(expect_end=True)


class _AsyncTap(_Tapped):
    """Stands in for the ``httpx.AsyncClient`` of an ``ollama.AsyncClient``."""

    def __getattr__(self, name: str) -> Any:
        if name == "http":  # not yet set (a copy in progress): no recursion
            raise AttributeError(name)
        return getattr(self.http, name)

    def _begin(self, api: str, kwargs: dict[str, Any]) -> Call:
        call = self.auditor.begin(api, wire_copy(kwargs.get("json") or {}))
        d = self.digests
        call.model_version = d.find(call.model)
        if d.due(call.model) and (d.task is None or d.task.done()):
            d.begin()
            d.task = asyncio.ensure_future(self._refresh())
        return call

    async def _refresh(self) -> None:
        d = self.digests
        ok = False
        try:
            d.take(await self.client.list())
            ok = True
        except Exception as exc:
            log.debug("cannot list ollama models: %s", exc)
        finally:
            d.ended(ok)

    async def _version(self, call: Call) -> None:
        """As the sync client's :meth:`_SyncTap._version`."""
        d = self.digests
        if call.model_version is not None or call.lazy:
            return
        task = d.task
        if task is not None and not task.done() and (left := d.wait_left()) > 0:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):  # as before
                await asyncio.wait_for(asyncio.shield(task), left)
        call.model_version = d.find(call.model)

    async def request(self, method: str, url: Any, **kwargs: Any) -> httpx.Response:
        """A non-streamed request: audited paths are recorded before the body is returned."""
        api = _api_of(method, url)
        if api is None:
            resp: httpx.Response = await self.http.request(method, url, **kwargs)
            return resp
        call = self._begin(api, kwargs)
        try:
            resp = await self.http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            call.unsent()
            raise
        except asyncio.CancelledError:
            call.abandon()  # the caller gave up on a call that was sent: client_disconnect
            raise
        except BaseException as exc:
            call.fail(exc)
            await self._version(call)
            await _arecord_quietly(call)
            raise
        call.status = resp.status_code
        call.feed_raw(resp.content)
        await self._version(call)
        await call.arecord("upstream_error" if resp.status_code >= 400 else None)
        return resp

    def stream(self, method: str, url: Any, **kwargs: Any) -> Any:
        """A streamed request: an async context manager like ``httpx.AsyncClient.stream``."""
        api = _api_of(method, url)
        if api is None:
            return self.http.stream(method, url, **kwargs)
        return _AsyncStream(self, self._begin(api, kwargs), self.http.stream(method, url, **kwargs))


class _AsyncStream(_Stream):
    """``async with tap.stream(...) as r``: the asyncio twin of :class:`_SyncStream`."""

    def __init__(self, tap: _AsyncTap, call: Call, inner: Any) -> None:
        super().__init__(call, inner)
        self.tap = tap

    async def __aenter__(self) -> _AsyncStream:
        try:
            self.resp = await self.inner.__aenter__()
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self.call.unsent()
            raise
        except asyncio.CancelledError:
            self.call.abandon()
            raise
        except BaseException as exc:
            self.call.fail(exc)
            await self.tap._version(self.call)
            await _arecord_quietly(self.call)
            raise
        assert self.resp is not None
        self.call.status = self.resp.status_code
        return self

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The response's lines, each fed to the capture; the final one after its record."""
        assert self.resp is not None
        call = self.call
        async for line in self.resp.aiter_lines():
            if line and not line.isspace() and call.feed_line(line):
                await self.tap._version(call)
                await call.arecord()
            yield line

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return bool(await self.inner.__aexit__(et, exc, tb))
        finally:
            call = self.call
            if not call.recorded:
                if isinstance(exc, GeneratorExit | asyncio.CancelledError):
                    call.abandon()
                else:
                    await self.tap._version(call)
                    if exc is not None:
                        self._feed_error_body()
                        call.fail(exc)
                        await _arecord_quietly(call)
                    else:
                        await call.arecord(expect_end=True)


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


def _client_label() -> str:
    try:
        from importlib.metadata import version

        return f"ollama-python/{version('ollama')}"
    except Exception:
        return "ollama-python"


def audit_ollama(
    client: Any, recorder: Recorder, *, user_id: str | None, session_id: str | None
) -> Any:
    """An audited copy of an ``ollama.Client`` or ``ollama.AsyncClient``."""
    http = getattr(client, "_client", None)
    if isinstance(http, _Tapped):  # re-auditing: tap the original HTTP client, not the tap
        http = http.http
    auditor = Auditor(recorder, user_id=user_id, session_id=session_id, client=_client_label())
    audited = copy.copy(client)
    tap: _Tapped
    if isinstance(http, httpx.Client):
        tap = _SyncTap(client, auditor, http)
    elif isinstance(http, httpx.AsyncClient):
        tap = _AsyncTap(client, auditor, http)
    else:
        raise ConfigError(
            f"cannot audit this {type(client).__name__}: its HTTP client is not an httpx client"
        )
    audited._client = tap
    auditor.model_version = tap.digests.find  # a record built later takes the digest known then
    return audited
