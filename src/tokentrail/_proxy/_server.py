"""The auditing reverse proxy: aiohttp's server in front; behind, the proxy's own HTTP/1.1
client for audited exchanges (:mod:`._upstream`) and an aiohttp client session for the rest.

Audited paths (``POST /api/generate``, ``/api/chat``, ``/v1/chat/completions``,
``/v1/completions``) are parsed and recorded; every other request is passed through untouched
(method, path, query, headers except hop-by-hop ones, body and response streamed both ways).

For an audited request the upstream's response bytes are relayed as they arrive; a copy of each
complete NDJSON line (Ollama), or the data of each SSE event as a client reads it (OpenAI,
:mod:`.._capture._sse`), is parsed and fed to the capture. An SSE event with data is relayed
whole at its end.
Under strict durability the final piece (Ollama's ``"done": true`` line, the SSE
``data: [DONE]`` event, an error event, or the whole body of a non-streamed response) is held
until the record is on disk, then released; every other chunk goes out at once.

Failures, each leaving exactly one record once the request was sent upstream:

- the upstream cannot be reached: 502 in the client's dialect, no record (nothing was sent);
- it fails or stalls past ``--upstream-timeout`` before answering: 502/504, ``upstream_error``;
- it answers with an error status: relayed as it is, ``upstream_error`` with the status;
- it cuts or stalls a stream: an error event in the dialect ends the stream, ``upstream_error``
  with the tokens so far (a stream framed by a length, or relayed compressed, cannot take the
  event: the client's connection is cut after the bytes that came, as the upstream's was);
- it sends bytes that do not decode under its ``Content-Encoding``: not relayed (the proxy
  cannot record them), a stream cut there, a body answered 502, ``upstream_error``;
- the client goes away mid-stream: the upstream request is closed, ``client_disconnect`` with the
  tokens so far;
- the proxy shuts down with the exchange in flight: ``interrupted``.

Bodies the proxy cannot parse (bad JSON, bad UTF-8, not an object) or larger than
``--max-body-bytes`` are refused (400 / 413 in the dialect) and never forwarded: forwarding what
cannot be audited would let a parser difference carry content past the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .._capture import PATHS, Begun, Capture, Meta, loads, new_capture
from .._capture._common import asks_logprobs
from .._capture._sse import SSEEvents, cut_at_line_end
from .._digests import Digests
from .._errors import ConfigError, StoreError, SubjectForgottenError
from .._ledger import AsyncLedger
from .._metrics import Metrics
from .._record import new_event_id, now_rfc3339
from ._config import ProxyConfig
from ._identity import IDEMPOTENCY_HEADER, SESSION_HEADER, USER_HEADER, IdentityResolver, RetryIndex
from ._tokendata import (
    ASKS,
    REFUSAL_STATUSES,
    Strip,
    added,
    plan,
    refused_by,
    strip_event,
    strip_json,
    strip_line,
)
from ._upstream import Pool, Response, UpstreamBroken, UpstreamUnreachable

log = logging.getLogger("tokentrail.proxy")
_T = TypeVar("_T")
#: How often a wait for the upstream looks whether its client has gone (see _ClientWatch).
WATCH_S = 0.25

_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
    )
)
_NOT_FORWARDED = frozenset(
    h.lower() for h in ("Host", "Content-Length", USER_HEADER, SESSION_HEADER)
)
_ENCODINGS_WE_READ = ("gzip", "deflate", "identity")
_LENGTH = frozenset({"content-length"})
#: ``_hop_by_hop`` without a ``Connection`` header, for each ``also`` the proxy uses.
_DROP_WITH = {also: _HOP_BY_HOP | also for also in (frozenset(), _NOT_FORWARDED, _LENGTH)}
#: Headers aiohttp's client adds by itself when a request lacks them; the proxy sends only the
#: client's own (a client that sent no Accept-Encoding must not get gzip it did not ask for).
UPSTREAM_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _hop_by_hop(headers: Mapping[str, str], also: frozenset[str] = frozenset()) -> frozenset[str]:
    """The names (lowercase) not to relay: the hop-by-hop ones, those ``Connection`` names, and
    ``also``."""
    connection = headers.get("Connection")
    if connection is None:  # most requests and answers (HTTP/1.1 keeps alive by default)
        return _DROP_WITH.get(also) or _HOP_BY_HOP | also
    extra = {t.strip().lower() for t in connection.split(",") if t.strip()}
    return _HOP_BY_HOP | also | extra


def upstream_request_headers(headers: CIMultiDictProxy[str], *, audited: bool) -> CIMultiDict[str]:
    """The client's headers as forwarded: no hop-by-hop, no Host, no identity headers."""
    drop = _hop_by_hop(headers, _NOT_FORWARDED)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    if audited and "Accept-Encoding" in out:
        # Keep only encodings whose bytes the proxy can read a copy of.
        accepted = [
            t.strip()
            for t in out.getone("Accept-Encoding").split(",")
            if t.strip().split(";")[0].strip().lower() in _ENCODINGS_WE_READ
        ]
        out.popall("Accept-Encoding")
        out["Accept-Encoding"] = ", ".join(accepted) if accepted else "identity"
    return out


def client_response_headers(
    headers: CIMultiDictProxy[str], *, keep_length: bool
) -> CIMultiDict[str]:
    """The upstream's response headers as relayed: no hop-by-hop (and no length if re-framed)."""
    drop = _hop_by_hop(headers, frozenset() if keep_length else _LENGTH)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


#: Requests that read the server's state and reach no model: relayed under --refuse-unaudited.
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_READ_POSTS = frozenset({"/api/show"})


#: How many unaudited methods and paths are named in the log (clients choose the paths).
UNAUDITED_WARNINGS = 64


def reaches_no_model(request: web.BaseRequest, canonical: str) -> bool:
    """Whether an unaudited request only reads (model lists, versions, model metadata): a
    GET that asks to upgrade the connection (a realtime API's websocket) is not one."""
    if request.method in _READS:
        return "Upgrade" not in request.headers
    return request.method == "POST" and canonical in _READ_POSTS


def dialect_of(path: str) -> str:
    """``openai`` for ``/v1/...`` paths and llama.cpp's ``/chat/completions``, else ``ollama``:
    the dialect of error bodies."""
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    return "openai" if PATHS.get(path, "").startswith("openai.") else "ollama"


def error_body(
    dialect: str, message: str, *, kind: str = "api_error", code: str | None = None
) -> bytes:
    """A JSON error in the client's dialect."""
    if dialect == "openai":
        return orjson.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )
    return orjson.dumps({"error": message})


def error_response(
    dialect: str, status: int, message: str, *, kind: str = "api_error", code: str | None = None
) -> web.Response:
    """A complete error response in the client's dialect."""
    return web.Response(
        status=status,
        body=error_body(dialect, message, kind=kind, code=code),
        content_type="application/json",
    )


class ModelDigests:
    """Ollama model digests from ``GET /api/tags``, cached for ``ttl`` seconds, looked up by the
    shared rule (:class:`~tokentrail._digests.Digests`)."""

    def __init__(self, session: aiohttp.ClientSession, upstream: str, ttl: float) -> None:
        self.session = session
        self.url = upstream + "/api/tags"
        self.known = Digests(ttl)
        self._outliving: set[asyncio.Task[str | None]] = set()
        self._lock = asyncio.Lock()
        #: Whether the upstream answers /api/tags (an Ollama): None until it was asked.
        self.available: bool | None = None

    def worth_asking(self) -> bool:
        """Whether an OpenAI-dialect exchange should look its model up: the upstream is an
        Ollama (its /v1 layer), or it was not asked lately (an OpenAI server answers 404)."""
        return self.available is not False or not self.known.fresh()

    def cached(self, model: str | None) -> str | None:
        """The digest if it is known and fresh, without waiting (the common case)."""
        return self.known.find(model) if self.known.fresh() else None

    async def lookup(self, model: str | None) -> str | None:
        """The digest of ``model`` (``name`` or ``name:latest``), or None when unknown."""
        if self.known.due(model):
            await self._refresh(model)
        return self.known.find(model)

    def outlive(self, task: asyncio.Task[str | None]) -> None:
        """Keep a lookup its exchange no longer waits for until it ends: cancelled with the
        exchange, a lookup slower than the exchanges never filled the cache, and every
        record went without a digest."""
        self._outliving.add(task)
        task.add_done_callback(self._outliving.discard)

    def cancel(self) -> None:
        """At shutdown: stop the lookups still running."""
        for task in list(self._outliving):
            task.cancel()

    def wait_left(self) -> float:
        """How long a record may still wait for the lookup under way (0: not at all)."""
        return self.known.wait_left()

    async def _refresh(self, model: str | None) -> None:
        async with self._lock:
            if not self.known.due(model):
                return  # another request just looked (or failed to)
            self.known.begin()
            ok = False
            try:
                timeout = aiohttp.ClientTimeout(total=5)
                async with self.session.get(self.url, timeout=timeout) as resp:
                    self.available = resp.status == 200
                    ok = True  # it answered: a 404 says no Ollama, not a slow one
                    if resp.status != 200:
                        return
                    data = loads(await resp.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("cannot read %s: %s", self.url, exc)
                return
            finally:
                self.known.ended(ok)
            models = data.get("models") if isinstance(data, dict) else None
            self.known.store(models if isinstance(models, list) else [], _json_field)


def _json_field(model: Any, name: str) -> Any:
    return model.get(name) if isinstance(model, dict) else None


class _BodyTooLarge(Exception):
    pass


class _LineTooLong(Exception):
    """The upstream sent a stream line longer than :data:`MAX_LINE_BYTES`."""


class _ClientGone(Exception):
    pass


#: A run of 20 digits: an integer orjson may read as a double (beyond 64 bits), if not in a string.
_LONG_NUMBER = re.compile(rb"\d{20}")


#: How much of an error answer is read to see whether it refuses the token data asked for.
REFUSAL_PEEK_BYTES = 64 * 1024
#: Models whose refusals are remembered (past that, forgotten and learnt again).
REFUSALS_KEPT = 10_000


def reencodes_exactly(raw: bytes) -> bool:
    """Whether ``orjson.dumps(orjson.loads(raw))`` means what ``raw`` does, so that the proxy may
    send an edited copy (``--request-token-data``): not when a value is only readable with a
    repair (a lone surrogate escape), and not when a number may have been rounded (an integer
    beyond 64 bits). Duplicate keys collapse to the last, as Go's and Python's decoders read
    them."""
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return _LONG_NUMBER.search(raw) is None


class _ClientWatch:
    """Notices, while the proxy waits for the upstream, that the client has gone.

    A client that gives up (a timeout, a cancelled request) closes its connection; a model
    server talked to directly would stop generating then, but the proxy's own request to the
    upstream would run on to the end of the answer. So every :data:`WATCH_S` seconds while a
    wait is armed (:meth:`waiting`), a timer looks at the client's connection and, if it is
    closed, cancels the wait: the upstream connection is then dropped, which stops the
    generation, and the wait raises :class:`_ClientGone`. A timer, not a task: a request
    shorter than :data:`WATCH_S` costs one timer set and cancelled.
    """

    __slots__ = ("armed", "fired", "handle", "loop", "request", "task")

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.task = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.armed = False
        self.fired = False
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(WATCH_S, self._check)

    def _check(self) -> None:
        transport = self.request.transport
        if self.armed and self.task is not None and (transport is None or transport.is_closing()):
            self.fired = True
            self.handle = None
            self.task.cancel()
            return
        self.handle = self.loop.call_later(WATCH_S, self._check)

    async def waiting(self, awaitable: Awaitable[_T]) -> _T:
        """``await awaitable``, or :class:`_ClientGone` if the client leaves meanwhile."""
        self.armed = True
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not self.fired or self.task is None or self.task.uncancel() > 0:
                raise  # cancelled by someone else too (a shutdown): that wins
            raise _ClientGone from None
        finally:
            self.armed = False

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _unknown_expectation(request: web.BaseRequest) -> web.Response | None:
    """417 for an ``Expect`` header other than ``100-continue`` (HTTP/1.1), as aiohttp's
    application router answers it (the low-level server does not)."""
    if request.version != aiohttp.HttpVersion11:
        return None
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return web.Response(status=417, text=f"Unknown Expect: {expect}")
    return None


async def _continue(request: web.BaseRequest) -> None:
    """Say ``100 Continue`` to a client that waits for it before it sends the body: only once
    the body is to be read, so a request refused before (401, 403, 413 by its length, …) gets
    its final answer instead and never sends a body nobody reads (RFC 9110, section 10.1.1)."""
    if (
        request.version == aiohttp.HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own head and body are yet to come
        await request.writer.drain()


async def _prepare(out: web.StreamResponse, request: web.BaseRequest) -> None:
    """Send the response's headers, turning a closed connection into :class:`_ClientGone`."""
    try:
        await out.prepare(request)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
        raise _ClientGone from exc


async def _send(out: web.StreamResponse, data: bytes) -> None:
    """Write to the client, turning a closed connection into :class:`_ClientGone`."""
    try:
        await out.write(data)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
        raise _ClientGone from exc


@dataclass
class _Exchange:
    """The per-request state a handler carries to the record."""

    api: str
    dialect: str
    capture: Capture
    meta_base: dict[str, Any]
    started: float
    timestamp: str
    event_id: str
    user_id: str | None
    session_id: str | None
    digest_task: asyncio.Task[str | None] | None
    model_version: str | None = None  # the cached digest, when it was known at the start
    first_token: float | None = None
    status: int | None = None
    recorded: bool = False


#: A streamed line (NDJSON or SSE) longer than this is the upstream's error, not a memory sink.
MAX_LINE_BYTES = 16 << 20


def _target_as_sent(request: web.BaseRequest) -> str:
    """The request's path and query as the client sent them: not decoded, not normalised."""
    raw = request.raw_path
    return raw if raw.startswith("/") else request.rel_url.raw_path_qs  # absolute-form


def canonical_path(path: str) -> str:
    """The path with empty and dot segments resolved and no trailing slash (RFC 3986 5.2.4)."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


#: After a failed ledger write, new exchanges are refused this long before one is tried again.
LEDGER_RETRY_S = 1.0
#: How often the free space of the ledger's filesystem is looked at.
SPACE_CHECK_S = 0.5


class ProxyApp:
    """The request handlers, bound to one ledger and one upstream session."""

    def __init__(
        self,
        config: ProxyConfig,
        ledger: AsyncLedger,
        session: aiohttp.ClientSession,
        upstream: Pool,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.ledger = ledger
        self.session = session  # pass-through and /api/tags
        self.upstream = upstream  # audited exchanges
        self.identity = IdentityResolver(
            config.api_keys, trust_headers=config.trust_identity_headers
        )
        self.retries = RetryIndex()
        #: (api, model) -> the token data asks the upstream refused for it (``_refused``).
        self.token_data_refused: dict[tuple[str, str | None], frozenset[str]] = {}
        self.unaudited_seen: set[str] = set()  # "METHOD /path" already warned about
        self.digests = ModelDigests(session, config.upstream, config.tags_ttl_s)
        self.timeout = aiohttp.ClientTimeout(  # pass-through's (audited: the pool's own)
            total=None, connect=config.connect_timeout, sock_read=config.upstream_timeout
        )
        self.records = 0
        self._space_checked = -SPACE_CHECK_S
        self._space_low = False
        #: The tasks of requests under way (:meth:`handle`): at shutdown, those still running
        #: after the grace are cancelled (an audited one records itself as ``interrupted``;
        #: see ``Proxy.close``).
        self.in_flight: set[asyncio.Task[Any]] = set()

    def server(self, **kwargs: Any) -> web.Server:
        """aiohttp's low-level server, every request to :meth:`handle` (no application router:
        one handler takes every path, and the router's dispatch cost CPU on each request)."""
        return web.Server(self.handle, **kwargs)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request, kept in :attr:`in_flight` while it runs (see :meth:`_dispatch`)."""
        task = asyncio.current_task()
        if task is None:  # (aiohttp runs each request in a task of its own)
            return await self._dispatch(request)
        self.in_flight.add(task)
        try:
            return await self._dispatch(request)
        finally:
            self.in_flight.discard(task)

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Dispatch: audited paths to :meth:`audited`, everything else passed through."""
        if not request.path.startswith("/"):
            # A target that is no path ("OPTIONS *"): not Found, as aiohttp's router answered
            # (its one route was every path); there is nothing to relay it to.
            raise web.HTTPNotFound()
        if request.headers.get("Expect"):
            refused = _unknown_expectation(request)
            if refused is not None:
                return refused
        # Audit by the path the upstream may act on: "/api/./generate", "/api/x/../generate",
        # "//api/generate/" and their %-encoded spellings may all reach /api/generate. They are
        # forwarded as sent (a server that refuses them refuses them through the proxy too), and
        # recorded whatever the answer, so no spelling gets past the ledger.
        canonical = canonical_path(request.path)
        api = PATHS.get(canonical) if request.method == "POST" else None
        try:
            ident = self.identity.resolve(request.headers)
        except ConfigError as exc:  # an identity header too long to store (never cut short)
            if api is None and not self.config.require_identity:
                return await self.passthrough(request)  # nothing recorded, nobody to name
            return error_response(
                dialect_of(request.path), 400, f"tokentrail: {exc}", kind="invalid_request_error"
            )
        if self.config.require_identity and ident.user_id is None:
            return error_response(
                dialect_of(request.path),
                401,
                "tokentrail: a known API key (or trusted identity header) is required",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
        if api is None:
            if reaches_no_model(request, canonical):
                return await self.passthrough(request)
            if self.config.refuse_unaudited:
                self.metrics.refused_unaudited.inc()
                return error_response(
                    dialect_of(request.path),
                    403,
                    f"tokentrail: {request.method} {request.path} is not audited by this proxy,"
                    " and it refuses what it does not audit (--refuse-unaudited)",
                    kind="permission_error",
                )
            self._warn_unaudited(f"{request.method} {canonical}")
            return await self.passthrough(request)
        return await self.audited(request, api, ident.user_id, ident.session_id)

    def _warn_unaudited(self, what: str) -> None:
        """Say once per method and path (for the first 64) that traffic that may carry content
        to a model passes unaudited, so an operator learns of it from the log, not an audit."""
        if what in self.unaudited_seen or len(self.unaudited_seen) >= UNAUDITED_WARNINGS:
            return
        self.unaudited_seen.add(what)
        log.warning(
            "%s passes through unaudited: tokentrail records POST %s; --refuse-unaudited"
            " refuses anything else that is not a read",
            ascii(what)[1:-1],  # a client's path: one line, whatever it holds
            ", ".join(sorted(PATHS)),
        )

    # -- pass-through -------------------------------------------------------------------------

    async def passthrough(self, request: web.BaseRequest) -> web.StreamResponse:
        """Relay a request the proxy does not audit, streaming both bodies."""
        self.metrics.passthrough.inc()
        url = URL(self.config.upstream + _target_as_sent(request), encoded=True)
        headers = upstream_request_headers(request.headers, audited=False)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        data = request.content if request.body_exists else None
        if data is not None:
            await _continue(request)
        try:
            upstream = await self.session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self.timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = 504 if isinstance(exc, TimeoutError) else 502
            return error_response(dialect_of(request.path), status, f"tokentrail: upstream: {exc}")
        async with upstream:
            out = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers, keep_length=True),
            )
            try:
                await _prepare(out, request)
                async for chunk in upstream.content.iter_any():
                    await _send(out, chunk)
                await out.write_eof()
            except _ClientGone:
                pass
            except (aiohttp.ClientError, TimeoutError):
                if request.transport is not None:
                    request.transport.close()  # mirror the upstream's cut to the client
            return out

    # -- audited ------------------------------------------------------------------------------

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _BodyTooLarge
        await _continue(request)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)

    async def audited(
        self,
        request: web.BaseRequest,
        api: str,
        user_id: str | None,
        session_id: str | None,
    ) -> web.StreamResponse:
        """Relay one audited exchange and record it."""
        started = time.perf_counter()
        timestamp = now_rfc3339()
        dialect = "openai" if api.startswith("openai.") else "ollama"
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            return error_response(
                dialect,
                415,
                "tokentrail: compressed request bodies are not accepted on audited paths",
                kind="invalid_request_error",
            )
        try:
            raw = await self._read_body(request)
        except _BodyTooLarge:
            resp = error_response(
                dialect,
                413,
                f"tokentrail: request body exceeds {self.config.max_body_bytes} bytes",
                kind="invalid_request_error",
            )
            resp.force_close()
            return resp
        try:
            body = loads(raw)
        except ValueError as exc:
            return error_response(
                dialect,
                400,
                f"tokentrail: request body is not valid JSON: {exc}",
                kind="invalid_request_error",
            )
        if not isinstance(body, dict):
            return error_response(
                dialect,
                400,
                "tokentrail: request body must be a JSON object",
                kind="invalid_request_error",
            )

        refusal = None if self.config.fail_open else self._ledger_refusal()
        if refusal is not None:
            self.metrics.refused.inc()
            resp = error_response(dialect, 503, f"tokentrail: {refusal}", kind="api_error")
            resp.headers["Retry-After"] = "1"
            return resp
        capture = new_capture(api, body)
        event_id = new_event_id()
        meta_base: dict[str, Any] = {"stream": capture.stream}
        send, strip = self._ask(api, capture, raw, meta_base)
        peer = request.remote
        if peer:
            meta_base["client.address"] = peer
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem:
            idem = idem.strip()[:256]
            meta_base["idempotency_key"] = idem
            earlier = self.retries.claim(user_id, idem, event_id)
            if earlier is not None:
                meta_base["retry_of"] = earlier
        digest_task = None
        model_version = None
        if dialect == "ollama" or self.digests.worth_asking():  # Ollama's /v1 too
            known = self.digests.cached(capture.model)
            if known is not None:
                model_version = known
            else:  # resolve beside the exchange, not before it
                digest_task = asyncio.ensure_future(self.digests.lookup(capture.model))
        ex = _Exchange(
            api,
            dialect,
            capture,
            meta_base,
            started,
            timestamp,
            event_id,
            user_id,
            session_id,
            digest_task,
            model_version,
        )
        headers = upstream_request_headers(request.headers, audited=True)
        if strip:
            headers["Accept-Encoding"] = "identity"  # the proxy edits the bytes it relays
        # Should this process die mid-exchange, the next writer records it as interrupted.
        try:
            self.ledger.begin(Begun(capture, self._meta(ex, time.perf_counter(), None)))
        except SubjectForgottenError as exc:  # refused before it starts, fail-open or not
            self.metrics.refused.inc()
            self._release(ex)
            return error_response(
                ex.dialect, 403, f"tokentrail: {exc}", kind="invalid_request_error"
            )
        except StoreError as exc:
            if not self.config.fail_open:
                self.metrics.refused.inc()
                self._release(ex)
                return error_response(ex.dialect, 503, f"tokentrail: {exc}", kind="api_error")
        watch = _ClientWatch(request)
        try:
            # The target as sent: audited by the path the upstream may act on (see ``handle``),
            # but what the upstream makes of "/api/generate/" is its own answer to give.
            target = _target_as_sent(request)
            return await self._exchange(request, ex, raw, send, headers, strip, target, watch)
        except asyncio.CancelledError:
            if not ex.recorded:
                await asyncio.shield(self._record(ex, "interrupted"))
            raise
        finally:
            watch.stop()
            if digest_task is not None and not digest_task.done():
                self.digests.outlive(digest_task)  # its answer fills the cache for the next

    def _ask(
        self, api: str, capture: Capture, raw: bytes, meta: dict[str, Any]
    ) -> tuple[bytes, Strip]:
        """The body to send (``raw``, or a copy asking for token data) and what to strip from
        the answer; notes what was asked in ``meta`` and ``capture``."""
        body = capture.request
        refused = self.token_data_refused.get((api, capture.model), frozenset())
        new_body, strip = plan(api, body, self.config.request_token_data, refused)
        if new_body is not None and not reencodes_exactly(raw):
            new_body, strip = None, Strip()  # send the client's bytes, without the token data
        meta.pop("token_data_requested", None)
        capture.logprobs_asked = asks_logprobs(body if new_body is None else new_body)
        if new_body is None:
            return raw, strip
        meta["token_data_requested"] = added(body, new_body)
        return orjson.dumps(new_body), strip

    async def _refused(self, ex: _Exchange, upstream: Response) -> bool:
        """Whether ``upstream`` (an error answer to a request with token data added) refuses
        what was added: if so, it is not asked for this model again."""
        members = ex.meta_base.get("token_data_requested", [])
        error = await upstream.peek(REFUSAL_PEEK_BYTES)
        refused = refused_by(members, error or b"")
        if not refused:
            return False
        key = (ex.api, ex.capture.model)
        if len(self.token_data_refused) >= REFUSALS_KEPT:
            self.token_data_refused.clear()
        before = self.token_data_refused.get(key, frozenset())
        self.token_data_refused[key] = before | refused
        ex.meta_base.setdefault("token_data_refused", []).extend(
            m for m in members if ASKS.get(m) in refused
        )
        log.warning(
            "upstream refused %s for model %r (HTTP %d): asked again without it, and not"
            " asked for it again",
            ", ".join(m for m in members if ASKS.get(m) in refused),
            ex.capture.model,
            upstream.status,
        )
        return True

    async def _exchange(
        self,
        request: web.BaseRequest,
        ex: _Exchange,
        raw: bytes,
        send: bytes,
        headers: CIMultiDict[str],
        strip: Strip,
        target: str,
        watch: _ClientWatch,
    ) -> web.StreamResponse:
        try:
            # A redirect goes to the client as it is: following it would answer another request.
            upstream = await watch.waiting(self.upstream.post(target, send, headers))
            while (
                send is not raw
                and upstream.status in REFUSAL_STATUSES
                and await self._refused(ex, upstream)
            ):
                upstream.close()  # the same request again, without what was refused
                send, strip = self._ask(ex.api, ex.capture, raw, ex.meta_base)
                headers = upstream_request_headers(request.headers, audited=True)
                if strip:
                    headers["Accept-Encoding"] = "identity"
                upstream = await watch.waiting(self.upstream.post(target, send, headers))
        except _ClientGone:  # the upstream had not answered: it stops, and nothing is relayed
            await self._record(ex, "client_disconnect")
            return web.Response(status=499)  # for nobody: the client has gone
        except UpstreamUnreachable as exc:
            self.metrics.upstream_errors.labels("unreachable").inc()
            self._release(ex)
            return error_response(ex.dialect, 502, f"tokentrail: upstream unreachable: {exc}")
        except TimeoutError:
            ex.capture.error = f"upstream did not answer within {self.config.upstream_timeout:g}s"
            await self._record(ex, "upstream_error", status=504)
            return error_response(ex.dialect, 504, f"tokentrail: {ex.capture.error}")
        except UpstreamBroken as exc:
            ex.capture.error = f"upstream failed: {exc}"
            await self._record(ex, "upstream_error", status=502)
            return error_response(ex.dialect, 502, f"tokentrail: {ex.capture.error}")
        async with upstream:
            ex.status = upstream.status
            ctype = upstream.headers.get("Content-Type", "")
            if ex.capture.stream and upstream.status < 300 and _untyped(ctype):
                # A stream asked for and sent with no type that says what it is: the clients
                # read it as the stream of the path's format, and so does the record.
                ctype = "text/event-stream" if ex.dialect == "openai" else "application/x-ndjson"
            if ex.dialect == "ollama" and "event-stream" in ctype and upstream.status < 300:
                strip = self._speaks_openai(ex, strip)
            if "ndjson" in ctype or "event-stream" in ctype:
                watch.stop()  # from here on, a write to the client finds it gone
                return await self._relay_stream(
                    request, ex, upstream, strip, sse="event-stream" in ctype
                )
            return await self._relay_body(request, ex, upstream, strip, watch)

    def _speaks_openai(self, ex: _Exchange, strip: Strip) -> Strip:
        """An Ollama path answered in OpenAI's format (llama.cpp's server answers ``/api/chat``
        so): captured, and its token data hidden, as the OpenAI exchange it is."""
        api = "openai.chat" if ex.api == "ollama.chat" else "openai.completions"
        body = ex.capture.request
        asked = ex.capture.logprobs_asked
        ex.api, ex.dialect, ex.capture = api, "openai", new_capture(api, body)
        ex.capture.logprobs_asked = asked
        ex.meta_base["stream"] = ex.capture.stream
        # What was asked on the client's behalf was asked in the same words (logprobs: true).
        refused = self.token_data_refused.get((ex.api, ex.capture.model), frozenset())
        return plan(api, body, self.config.request_token_data, refused)[1] if strip else strip

    async def _relay_body(
        self,
        request: web.BaseRequest,
        ex: _Exchange,
        upstream: Response,
        strip: Strip,
        watch: _ClientWatch,
    ) -> web.StreamResponse:
        try:
            raw = await watch.waiting(upstream.read())
        except _ClientGone:
            upstream.close()  # the generation stops with the connection
            await self._record(ex, "client_disconnect")
            return web.Response(status=499)
        except (UpstreamBroken, TimeoutError) as exc:
            stalled = isinstance(exc, TimeoutError)
            ex.capture.error = f"upstream {'stalled' if stalled else 'failed'}: {exc}"
            status = 504 if stalled else 502  # what the client gets, and so what is recorded
            await self._record(ex, "upstream_error", status=status)
            return error_response(ex.dialect, status, f"tokentrail: {ex.capture.error}")
        try:
            text = _decoded(raw, upstream.headers.get("Content-Encoding"))
        except zlib.error as exc:
            # Not relayed: what the proxy cannot read would reach the client unrecorded.
            watch.stop()
            ex.capture.error = f"upstream sent a body the proxy cannot decode: {exc}"
            await self._record(ex, "upstream_error", status=502)
            return error_response(ex.dialect, 502, f"tokentrail: {ex.capture.error}")
        try:
            answer = loads(text)
            if ex.dialect == "ollama" and isinstance(answer, dict) and "choices" in answer:
                strip = self._speaks_openai(ex, strip)
            ex.capture.feed(answer)
        except ValueError:
            ex.capture.error = f"upstream sent a body that is not JSON (HTTP {upstream.status})"
        watch.stop()
        failed = upstream.status >= 300  # an error, or a redirect: no answer either way
        if 300 <= upstream.status < 400:
            where = upstream.headers.get("Location", "nowhere")
            ex.capture.error = f"HTTP {upstream.status}: the upstream redirects to {where}"
        elif failed and ex.capture.error is None:
            ex.capture.error = f"HTTP {upstream.status}"
        stop = "upstream_error" if failed else None
        if request.transport is None or request.transport.is_closing():
            stop = "client_disconnect"
        relayed_headers = client_response_headers(upstream.headers, keep_length=False)
        out_body = raw
        if strip:
            # Token data asked for with "identity"; an upstream that compressed all the same
            # has its body relayed decoded, so that the data can be taken out of it.
            out_body = strip_json(text, strip)
            if text is not raw:
                relayed_headers.popall("Content-Encoding", None)
        try:
            await self._record(ex, stop)
        except StoreError as exc:
            if not self.config.fail_open:
                return error_response(
                    ex.dialect, 503, f"tokentrail: response withheld, not audited: {exc}"
                )
        return web.Response(
            status=upstream.status,
            reason=upstream.reason,
            body=out_body,
            headers=relayed_headers,
        )

    async def _relay_stream(
        self,
        request: web.BaseRequest,
        ex: _Exchange,
        upstream: Response,
        strip: Strip,
        *,
        sse: bool,
    ) -> web.StreamResponse:
        encoding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
        inflate = _inflater(encoding)
        headers = client_response_headers(upstream.headers, keep_length=not strip)
        # Relayed as they came, unless token data is to be taken out of a compressed stream
        # (asked for with "identity", compressed all the same): then relayed decoded.
        whole = inflate is not None and not strip
        if inflate is not None and strip:
            headers.popall("Content-Encoding", None)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        # Where nothing can be added to the relayed bytes (a length to meet, a compressed
        # stream), an upstream failure reaches the client as the upstream's cut, not an event.
        can_add = not whole and "Content-Length" not in headers
        cut_client = False
        tail_held = False  # compressed: a final line without its line end is in a held chunk
        strict = self.config.durability == "strict"
        capture = ex.capture
        events = SSEEvents() if sse else None
        pending = b""  # decoded bytes of an incomplete line
        event: list[bytes] = []  # SSE: the lines of an event with data, kept until its end
        event_bytes = 0
        held: list[bytes] = []  # the final piece, released after the record (strict)
        holding = False
        stop: str | None = None

        def fail(message: str) -> None:
            """End the client's stream on a failure: the dialect's error event, or a cut."""
            nonlocal cut_client
            if can_add:
                held.append(self._error_event(ex, message, sse))
            else:
                cut_client = True

        try:
            await _prepare(out, request)  # a client gone before the first byte: a disconnect
            async for data in upstream.iter_any():
                # Bytes that do not inflate stop here, not relayed: what the proxy cannot read
                # would reach the client unrecorded (a client may read what zlib does not).
                pending += inflate(data) if inflate is not None else data
                if len(pending) > MAX_LINE_BYTES:
                    raise _LineTooLong
                cut = cut_at_line_end(pending) if sse else pending.rfind(b"\n") + 1
                lines: list[bytes] = []
                if cut:
                    lines = pending[:cut].splitlines(keepends=True)
                    pending = pending[cut:]
                if whole:
                    # Compressed bytes cannot be split at a line: relay or hold whole chunks.
                    for line in lines:
                        if not holding:
                            holding = self._feed_line(ex, line, events) and strict
                    if strict and not (holding or tail_held) and events is None and pending:
                        # The last line may come without its line end: one that reads as the
                        # final piece holds its chunk (and any after it) until the record.
                        tail_held = _may_be_last(ex.capture, pending)
                    if holding or tail_held:
                        held.append(data)
                    else:
                        await _send(out, data)
                    continue
                relay: list[bytes] = []
                for line in lines:
                    if holding:
                        held.append(strip_line(line, strip, sse=sse) if strip else line)
                        continue
                    holding = self._feed_line(ex, line, events) and strict
                    if events is None or not (event or events.open):
                        out_line = strip_line(line, strip, sse=sse) if strip else line
                        (held if holding else relay).append(out_line)
                        continue
                    # An event with data goes out whole at its end, when a client acts on it:
                    # so the final one is held whole, and a cut one never reaches the client.
                    event.append(line)
                    event_bytes += len(line)
                    if events.open:
                        if event_bytes > MAX_LINE_BYTES:
                            raise _LineTooLong
                        continue
                    (held if holding else relay).extend(
                        strip_event(event, strip) if strip else event
                    )
                    event, event_bytes = [], 0
                if relay:
                    await _send(out, b"".join(relay))
            if pending:  # a last line without its line end
                if not holding:
                    holding = self._feed_line(ex, pending, events) and strict
                if not whole:  # compressed bytes have gone out (or are held) whole
                    if events is not None and not holding:
                        event.append(pending)  # an SSE event never ended: what follows decides
                    else:
                        tail = strip_line(pending, strip, sse=sse) if strip else pending
                        if holding:
                            held.append(tail)
                        else:
                            await _send(out, tail)
        except _ClientGone:
            stop = "client_disconnect"
        except (UpstreamBroken, TimeoutError) as exc:
            stalled = isinstance(exc, TimeoutError)
            capture.error = f"upstream {'stalled' if stalled else 'closed the stream'}: {exc}"
            stop = "upstream_error"
            fail(capture.error)
        except (zlib.error, _LineTooLong) as exc:
            capture.error = (
                f"upstream sent a line longer than {MAX_LINE_BYTES} bytes"
                if isinstance(exc, _LineTooLong)
                else f"upstream sent a body its Content-Encoding does not match: {exc}"
            )
            stop = "upstream_error"
            upstream.close()
            fail(capture.error)
        if stop is None and not capture.finished and capture.error is None:
            capture.error = "upstream closed the stream before its end"
            stop = "upstream_error"
            if can_add:  # else the client has a whole body, as it would have directly
                held.append(self._error_event(ex, capture.error, sse))
        if stop is None or not can_add:
            # An SSE event cut short after the end: relayed (a client drops it). And with a
            # length to meet, an unfinished event's bytes go out too, before any cut.
            held[:0] = strip_event(event, strip)
        if stop == "client_disconnect":
            upstream.close()
        try:
            await self._record(ex, stop)
        except StoreError as exc:
            if not self.config.fail_open:
                held.clear()
                fail(f"final chunk withheld, not audited: {exc}")
        if stop == "client_disconnect":
            return out
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            if held:
                await out.write(b"".join(held))
            if not cut_client:
                await out.write_eof()
        if cut_client and request.transport is not None:
            request.transport.close()
        return out

    def _feed_line(self, ex: _Exchange, line: bytes, events: SSEEvents | None) -> bool:
        """Feed one NDJSON line's JSON, or at an SSE event's end its data, to the capture;
        True when it is the stream's final piece (done, ``[DONE]`` or an error)."""
        if events is None:
            body = line.strip()
        else:
            data = events.line(line)
            if data is None:
                return False
            body = data.strip()
            if body.startswith(b"[DONE]"):  # as the openai clients test it
                ex.capture.finished = True
                return True
        if not body:
            return False
        try:
            chunk = loads(body)
        except ValueError:
            return False
        if ex.capture.feed(chunk) and ex.first_token is None:
            ex.first_token = time.perf_counter()
        if ex.capture.error is not None:
            return True
        return events is None and ex.capture.finished

    def refusal(self) -> str | None:
        """Why new exchanges are refused now (``None``: they are not); ``/healthz`` asks."""
        return None if self.config.fail_open else self._ledger_refusal()

    def _ledger_refusal(self) -> str | None:
        """Why a new exchange cannot be audited now, or ``None`` (fail closed)."""
        now = time.monotonic()
        failed = self.ledger.writer.failed_at
        if failed is not None and now - failed < LEDGER_RETRY_S:
            return "the audit ledger cannot be written; refusing unaudited traffic"
        if now - self._space_checked >= SPACE_CHECK_S:
            self._space_checked = now
            try:
                st = os.statvfs(self.config.ledger)
                self._space_low = st.f_bavail * st.f_frsize < self.config.min_free_bytes
            except OSError:
                self._space_low = False
        if self._space_low:
            return "the audit ledger's disk is full; refusing unaudited traffic"
        return None

    def _error_event(self, ex: _Exchange, message: str, sse: bool) -> bytes:
        body = error_body(ex.dialect, f"tokentrail: {message}", kind="api_error")
        return b"data: " + body + b"\n\n" if sse else body + b"\n"

    def _release(self, ex: _Exchange) -> None:
        """Forget an exchange that will have no record (the upstream never saw it)."""
        self.ledger.abandon(ex.event_id)
        key = ex.meta_base.get("idempotency_key")
        if isinstance(key, str):
            self.retries.release(ex.user_id, key, ex.event_id)

    async def _record(self, ex: _Exchange, stop: str | None, *, status: int | None = None) -> None:
        """Build the exchange and append it (strict: returns once it is on disk)."""
        if ex.recorded:
            return
        ex.recorded = True
        now = time.perf_counter()
        model_version = ex.model_version
        if ex.digest_task is not None:
            model_version = None  # unless the lookup answers within what is left to wait (a
            # slow one holds no exchange up; with nothing left, only a done one is read)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                model_version = await asyncio.wait_for(
                    asyncio.shield(ex.digest_task), self.digests.wait_left()
                )
        exchange = ex.capture.finish(self._meta(ex, now, model_version, status), stop)
        metrics = self.metrics
        t0 = time.perf_counter()
        try:
            await self.ledger.append(exchange)
        except StoreError as exc:
            metrics.append_errors.inc()
            log.error("could not record exchange %s: %s", ex.event_id, exc)
            raise
        metrics.append_seconds.observe(time.perf_counter() - t0)
        metrics.records.inc()
        metrics.count_exchange(ex.api, exchange.stop_reason)
        if exchange.stop_reason == "upstream_error":
            metrics.upstream_errors.labels(str(exchange.extra.get("error.type", "upstream"))).inc()
        self.records += 1

    def _meta(
        self, ex: _Exchange, now: float, model_version: str | None, status: int | None = None
    ) -> Meta:
        """What the proxy knows of an exchange beyond the wire, as of ``now``."""
        return Meta(
            timestamp=ex.timestamp,
            event_id=ex.event_id,
            request_duration_ms=(now - ex.started) * 1000.0,
            time_to_first_token_ms=None
            if ex.first_token is None
            else (ex.first_token - ex.started) * 1000.0,
            user_id=ex.user_id,
            session_id=ex.session_id,
            model_version=model_version,
            status=status if status is not None else ex.status,
            extra=ex.meta_base,
        )


def _may_be_last(capture: Capture, text: bytes) -> bool:
    """Whether ``text``, a line without its line end so far, reads as the stream's final piece."""
    try:
        return capture.is_last(loads(text))
    except ValueError:
        return False


def _untyped(ctype: str) -> bool:
    """A Content-Type that says nothing of the body's format (none, text, bytes)."""
    main = ctype.split(";", 1)[0].strip().lower()
    return main in ("", "text/plain", "application/octet-stream")


def _wbits(encoding: str, first: bytes) -> int:
    """zlib's window bits for a body in ``encoding`` that starts with ``first``: gzip, or
    deflate with its zlib header or without (raw deflate, which clients read too, as aiohttp
    does); ``zlib.error`` for an encoding the proxy cannot read."""
    if encoding in ("gzip", "x-gzip"):
        return 16 + zlib.MAX_WBITS
    if encoding == "deflate":
        return zlib.MAX_WBITS if first and first[0] & 0x0F == 8 else -zlib.MAX_WBITS
    raise zlib.error(f"Content-Encoding {encoding!r} is not one the proxy reads")


def _inflater(encoding: str) -> Callable[[bytes], bytes] | None:
    """What decodes a stream in ``encoding`` piece by piece (``None``: it is not encoded).

    A piece that does not decode raises ``zlib.error``, and so does every piece of an encoding
    the proxy cannot read: such bytes are never relayed (see ``_relay_stream``).
    """
    if encoding in ("", "identity"):
        return None
    state: list[Any] = []

    def inflate(data: bytes) -> bytes:
        if not state:
            if not data:
                return b""
            state.append(zlib.decompressobj(_wbits(encoding, data)))
        return bytes(state[0].decompress(data))

    return inflate


def _decoded(raw: bytes, encoding: str | None) -> bytes:
    """A whole body decoded; ``zlib.error`` when it does not decode (or cannot be)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity" or not raw:
        return raw
    return zlib.decompress(raw, _wbits(encoding, raw))
