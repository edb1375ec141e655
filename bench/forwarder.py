"""A bare forwarding proxy that audits nothing: the floor ``bench/proxy.py`` compares against.

It forwards every request to the upstream and relays the answer chunk by chunk, as
``tokentrail serve`` does, but parses, records and writes nothing. What it adds over reaching the
upstream directly is the cost of the second HTTP hop alone, on the same machine and in the same
run as the auditing proxy. Three engines:

- ``aiohttp``: the stack ``tokentrail serve`` runs on (aiohttp server and client, uvloop);
- ``raw``: asyncio protocols and httptools' parser (llhttp), about the least a Python proxy can
  do per request; needs ``pip install httptools``;
- ``plumbing``: what ``tokentrail serve`` relays an audited exchange with, without the audit:
  aiohttp's low-level server and the proxy's own upstream client (``_proxy/_upstream.py``),
  so the proxy's CPU minus this engine's is what auditing costs.

    .venv/bin/python bench/forwarder.py --engine raw \
        --upstream 127.0.0.1:11434 --listen 127.0.0.1:11436
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

_HOP = (b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host")


async def run_aiohttp(upstream: str, host: str, port: int) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower().encode() not in _HOP}
        body = await request.read()
        async with session.request(
            request.method, upstream + request.raw_path, data=body, headers=headers
        ) as up:
            out = web.StreamResponse(
                status=up.status,
                reason=up.reason,
                headers={k: v for k, v in up.headers.items() if k.lower().encode() not in _HOP},
            )
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await asyncio.Event().wait()


class _Upstream(asyncio.Protocol):
    """One pooled keep-alive connection to the upstream; relays its answer to ``client``."""

    def __init__(self, pool: list[_Upstream]) -> None:
        import httptools

        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.reason = b""
        self.head: list[bytes] = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.head.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        assert self.client is not None
        self.client.write(
            b"HTTP/1.1 %d %s\r\n%bTransfer-Encoding: chunked\r\n\r\n"
            % (status, self.reason, b"".join(self.head))
        )

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        self.client.write(b"%x\r\n%b\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        assert self.client is not None and self.done is not None
        self.client.write(b"0\r\n\r\n")
        self.pool.append(self)
        self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed"))


class _Client(asyncio.Protocol):
    """One client connection: each complete request is forwarded, one at a time."""

    def __init__(self, up_host: str, up_port: int, pool: list[_Upstream]) -> None:
        import httptools

        self.up = (up_host, up_port)
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.parts: list[bytes] = []
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.parts.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        method = self.parser.get_method()
        url, headers = self.parts[0], b"".join(self.parts[1:])
        self.queue.put_nowait(
            b"%s %s HTTP/1.1\r\nHost: upstream\r\n%bContent-Length: %d\r\n\r\n%b"
            % (method, url, headers, len(body), body)
        )

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = await self.queue.get()
            if self.pool:
                up = self.pool.pop()
            else:
                _, up = await loop.create_connection(lambda: _Upstream(self.pool), *self.up)
            up.client, up.done = self.transport, loop.create_future()
            assert up.transport is not None
            up.transport.write(request)
            await up.done


async def run_plumbing(upstream: str, host: str, port: int) -> None:
    from multidict import CIMultiDict

    from tokentrail._proxy._upstream import Pool

    pool = Pool(upstream, connect_timeout=10, read_timeout=None)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower().encode() not in _HOP
        )
        up = await pool.post(request.raw_path, await request.read(), headers)
        async with up:
            out = web.StreamResponse(
                status=up.status,
                reason=up.reason,
                headers={k: v for k, v in up.headers.items() if k.lower().encode() not in _HOP},
            )
            await out.prepare(request)
            async for chunk in up.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    runner = web.ServerRunner(
        web.Server(handle, access_log=None, handler_cancellation=False, auto_decompress=False)
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await asyncio.Event().wait()


async def run_raw(upstream: str, host: str, port: int) -> None:
    up_host, _, up_port = upstream.removeprefix("http://").partition(":")
    pool: list[_Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(up_host, int(up_port), pool), host, port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["aiohttp", "raw", "plumbing"], default="aiohttp")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args()
    if args.engine != "aiohttp" and importlib.util.find_spec("httptools") is None:
        parser.error(f"--engine {args.engine} needs httptools: pip install httptools")
    host, _, port = args.listen.rpartition(":")
    run = {"raw": run_raw, "plumbing": run_plumbing}.get(args.engine, run_aiohttp)
    uvloop.run(run("http://" + args.upstream, host, int(port)))


if __name__ == "__main__":
    main()
