"""The audited exchanges' upstream client: HTTP/1.1 on asyncio protocols, parsed by httptools.

The proxy sends each audited exchange (one ``POST`` with a body it already holds) over a pool of
keep-alive connections and reads the answer as it arrives. aiohttp's client did this before; it
spent about a quarter of the proxy's CPU time a request on things an audited ``POST`` does not
need (cookies, redirects, tracing, payload objects), so the one request the proxy makes on
every exchange is made here. Pass-through paths and the ``/api/tags`` lookups keep aiohttp's.

What it does as aiohttp's client did: the client's headers, then ``Content-Length``, under a
``Host`` of the upstream's; no retry of a ``POST`` on a reused connection that fails (RFC 9112
§9.3.1: the model may have started); an idle connection is closed after :data:`KEEPALIVE_S`;
a read timeout (the head must come within it of the request's sending, and then each piece of
the body within it of the last); 1xx answers skipped; lines ended by LF alone read; bodies
framed by length, by chunks or by the connection's close; a reader that falls behind pauses
the socket. Unlike aiohttp's, a connect timeout is told as unreachable (nothing was sent).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

#: An idle pooled connection older than this is closed rather than reused (aiohttp's default).
KEEPALIVE_S = 15.0
#: Unread bytes of an answer past which the socket stops being read until the reader catches up.
HIGH_WATER = 256 * 1024


class UpstreamUnreachable(Exception):
    """No connection could be made: the request was not sent."""


class UpstreamBroken(Exception):
    """The connection failed, or the upstream broke HTTP, after the request was sent."""


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Response:
    """One answer, read as it arrives: ``status``, ``reason``, ``headers``, then the body."""

    __slots__ = (
        "_conn",
        "_limit",
        "_size",
        "_timeout",
        "_waiter",
        "chunks",
        "complete",
        "error",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Conn, timeout: float | None) -> None:
        self._conn: _Conn | None = conn
        self._timeout = timeout
        self._waiter: asyncio.Future[None] | None = None
        self._limit: int | None = HIGH_WATER
        self._size = 0
        self.chunks: collections.deque[bytes] = collections.deque()
        self.complete = False
        self.error: BaseException | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS  # until the head comes

    # The connection's side.
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _data(self, data: bytes) -> None:
        self.chunks.append(data)
        self._size += len(data)
        if self._limit is not None and self._size > self._limit and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _end(self, error: BaseException | None) -> None:
        if error is None:
            self.complete = True
        elif not self.complete:
            self.error = error
        self._conn = None
        self._wake()

    # The reader's side.
    async def wait(self) -> None:
        """Until something new (data, the end, an error); ``TimeoutError`` after a silence."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None
        if self._timeout is not None:
            timer = loop.call_later(self._timeout, _expire, waiter, self._timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it comes: whatever has arrived, each time (like aiohttp's)."""
        while True:
            if self.chunks:
                yield self._take()
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self.wait()

    async def read(self) -> bytes:
        """The whole body."""
        self._limit = None  # nothing is taken before the end: the socket must not pause
        if self._conn is not None:
            self._conn.resume()
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self.wait()
        return self._take() if self.chunks else b""

    async def peek(self, limit: int) -> bytes | None:
        """The whole body, left to be read again; ``None`` when it is longer than ``limit``
        bytes, fails or stalls (whoever reads it next meets that)."""
        while not self.complete:
            if self.error is not None or self._size > limit:
                return None
            try:
                await self.wait()
            except TimeoutError:
                return None
        data = b"".join(self.chunks)
        return data if len(data) <= limit else None

    def close(self) -> None:
        """Drop the connection if the answer is still coming (the upstream sees it close)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _expire(waiter: asyncio.Future[None], seconds: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"nothing received for {seconds:g}s"))


class _Conn(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        # Lines ended by LF alone, as aiohttp's client (and browsers) read them from a server.
        self.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.head: asyncio.Future[None] | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._framed = False  # a length or chunks; else the body runs to the close
        self._skip = False  # a 1xx answer: no body, and the real one follows

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing asked: bytes out of turn
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"upstream sent a response that is not HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is None:
            return
        if self.head is None and not self._framed and exc is None and not self._skip:
            self.response = None
            response._end(None)  # a body read to the connection's close
            return
        self._fail(
            UpstreamBroken(
                "upstream closed the connection before its answer"
                if self.head is not None
                else "upstream closed the connection before the answer's end"
            )
        )

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: BaseException) -> None:
        head, self.head = self.head, None
        response, self.response = self.response, None
        if head is not None and not head.done():
            head.set_exception(error)
        if response is not None:
            response._end(error)
        self.close()

    # httptools' callbacks.
    def on_message_begin(self) -> None:
        if self.response is None:  # an answer to nothing asked: this connection cannot be trusted
            self.close()
        self._reason = b""
        self._headers = []
        self._framed = False
        self._skip = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (
            lower == b"transfer-encoding"
            and value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        ):
            self._framed = True  # else the body runs to the close (RFC 9112 §6.3)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._skip = True  # 100 Continue and the like: the answer is still to come
            return
        response = self.response
        if response is None:
            return
        response.status = status
        response.reason = _text(self._reason)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._headers:
            headers.add(_text(name), _text(value))
        response.headers = CIMultiDictProxy(headers)
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None and not self._skip:
            self.response._data(body)

    def on_message_complete(self) -> None:
        if self._skip:
            self._skip = False
            return
        response, self.response = self.response, None
        if response is None:  # an answer to nothing asked: this connection cannot be trusted
            self.close()
            return
        response._end(None)
        unsent = self.transport is not None and self.transport.get_write_buffer_size() > 0
        if self.parser.should_keep_alive() and not self.closed and not unsent:
            self.resume()  # paused for a reader behind on this answer: the next is another's
            self.pool.keep(self)
        else:
            self.close()


class Pool:
    """Keep-alive connections to one upstream base URL."""

    def __init__(
        self, base_url: str, *, connect_timeout: float | None, read_timeout: float | None
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        self.prefix = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        if not host.isascii():
            host = host.encode("idna").decode("ascii")  # as aiohttp sent it
        default = 443 if secure else 80
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.auth: str | None = None
        if parts.username is not None:  # credentials in the URL: Basic, as aiohttp sent them
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            try:
                raw = pair.encode("latin-1")  # as aiohttp's BasicAuth encodes it
            except UnicodeEncodeError:
                raw = pair.encode()
            self.auth = "Basic " + base64.b64encode(raw).decode("ascii")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle: list[_Conn] = []
        self.open: set[_Conn] = set()
        self._prune_timer: asyncio.TimerHandle | None = None
        self.closed = False  # closed: a connection that opens after it is closed at once

    def keep(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self._prune_timer is None:
            loop = asyncio.get_running_loop()
            self._prune_timer = loop.call_later(KEEPALIVE_S, self._prune)

    def _prune(self) -> None:
        """Close the connections idle for :data:`KEEPALIVE_S` (a server may never close them)."""
        self._prune_timer = None
        now = time.monotonic()
        for conn in [c for c in self.idle if now - c.idle_since >= KEEPALIVE_S]:
            conn.close()
        if self.idle:
            loop = asyncio.get_running_loop()
            self._prune_timer = loop.call_later(KEEPALIVE_S, self._prune)

    def forget(self, conn: _Conn) -> None:
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    async def _connection(self) -> _Conn:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            usable = conn.transport is not None and not conn.transport.is_closing()
            if usable and not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        connect = loop.create_connection(
            lambda: _Conn(self),
            self.host,
            self.port,
            ssl=self.ssl,
            server_hostname=self.host if self.ssl is not None else None,
        )
        try:
            _, conn = await asyncio.wait_for(connect, self.connect_timeout)
        except TimeoutError as exc:  # (an OSError too: told apart first)
            raise UpstreamUnreachable(
                f"cannot connect to {self.host_header}: no answer within {self.connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise UpstreamUnreachable(
                f"cannot connect to {self.host_header}: {exc.strerror or exc}"
            ) from exc
        if self.closed:  # closed while it was opening (a shutdown): nothing is sent on it
            conn.close()
            raise UpstreamUnreachable(f"not connecting to {self.host_header}: shutting down")
        self.open.add(conn)
        return conn

    async def post(self, target: str, body: bytes, headers: CIMultiDict[str]) -> Response:
        """Send ``POST target`` with ``body``; returns once the answer's head has come."""
        conn = await self._connection()
        response = Response(conn, self.read_timeout)
        loop = asyncio.get_running_loop()
        head = conn.head = loop.create_future()
        conn.response = response
        lines = [f"POST {self.prefix}{target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
        if self.auth is not None and "Authorization" not in headers:
            lines.append(f"Authorization: {self.auth}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        assert conn.transport is not None
        conn.transport.writelines(("".join(lines).encode("utf-8", "surrogateescape"), body))
        timer = None
        if self.read_timeout is not None:
            timer = loop.call_later(self.read_timeout, _expire, head, self.read_timeout)
        try:
            await head
        except BaseException:
            # A timeout, a failure, a cancellation: this answer is not read, and its connection
            # is closed, unless the answer came whole and the connection went to the pool, where
            # another exchange may have it already.
            response.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return response

    def close(self) -> None:
        self.closed = True
        if self._prune_timer is not None:
            self._prune_timer.cancel()
            self._prune_timer = None
        for conn in list(self.open):
            conn.close()
        self.idle.clear()
