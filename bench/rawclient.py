"""A lean HTTP/1.1 load generator for ``bench/proxy.py``: asyncio protocols and httptools' parser.

aiohttp's client, the bench's load generator before this one, spends about half as much CPU a
request as the proxy it measures; on a small machine, where the load generator, the simulator
and the proxy share the cores, that CPU competes with the proxy's, and at high concurrency the
added latency measured is then much of it the load generator's. This one keeps a keep-alive
connection per exchange in flight (reused, as aiohttp's pool reuses them), sends a
prebuilt request and parses only the answer's framing (Content-Length or chunked), timing the
first body bytes and counting what arrives as the aiohttp loop counts ``iter_any`` chunks (one
per ``data_received`` call that carries body bytes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.first: float | None = None
        self.chunks = 0
        self._body_seen = False
        self.keep_alive = True
        self.status = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._body_seen = False
        self.parser.feed_data(data)
        if self._body_seen:
            self.chunks += 1

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self._body_seen = True

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc or ConnectionError("the server closed the connection"))


class RawClient:
    """Posts one JSON body to one URL, over keep-alive connections opened as needed."""

    def __init__(self, url: str, body: dict[str, object]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        payload = orjson.dumps(body)
        self.request = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        self.idle: list[_Conn] = []

    async def _connection(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        return conn

    async def post(self) -> tuple[float, int]:
        """One exchange; returns (time of the first body bytes, body chunks received)."""
        conn = await self._connection()
        conn.done = asyncio.get_running_loop().create_future()
        conn.first, conn.chunks = None, 0
        assert conn.transport is not None
        conn.transport.write(self.request)
        await conn.done
        if conn.status != 200:
            raise RuntimeError(f"{self.host}:{self.port} answered {conn.status}")
        first, chunks = conn.first or time.perf_counter(), conn.chunks
        if conn.keep_alive:
            self.idle.append(conn)
        else:
            conn.transport.close()
        return first, chunks

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
