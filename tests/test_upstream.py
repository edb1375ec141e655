"""The audited exchanges' upstream client (``_proxy._upstream``) against scripted raw servers.

Each server is a socket answering with bytes written here, so the framings and faults a model
server may send (chunks, a length, a body that runs to the close, ``100 Continue``, a cut, a
stall, a keep-alive close) are each exercised exactly; the proxy's own tests cover the client
through the proxy against the simulator.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tokentrail._proxy._server import UPSTREAM_SKIP_AUTO_HEADERS
from tokentrail._proxy._upstream import (
    HIGH_WATER,
    Pool,
    UpstreamBroken,
    UpstreamUnreachable,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A raw TCP server; ``heads`` holds each request's head and body as received."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and its Content-Length body) and note it."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        whole = head + await reader.readexactly(length)
        self.heads.append(whole)
        return whole

    async def reply(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *answer: bytes
    ) -> None:
        """Read one request, then send ``answer`` (its pieces as they are) at once."""
        await self.request(reader)
        writer.writelines(answer)
        await writer.drain()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        s = Server(handler)
        s.server = await asyncio.start_server(s._serve, "127.0.0.1", 0)
        s.port = s.server.sockets[0].getsockname()[1]
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()


def pool(url: str, read_timeout: float | None = 5.0) -> Pool:
    return Pool(url, connect_timeout=5.0, read_timeout=read_timeout)


HEADERS = CIMultiDict(
    [("Content-Type", "application/json"), ("X-A", "1"), ("X-A", "2"), ("Authorization", "k")]
)


async def answer(p: Pool) -> bytes:
    """One exchange on ``p``: its answer's whole body (the connection then goes back, or not)."""
    async with await p.post("/api/chat", b"{}", HEADERS) as r:
        return await r.read()


async def test_the_upstream_sees_the_request_aiohttp_sent(serve) -> None:
    """Byte for byte the head and body aiohttp's client sent with the proxy's settings, with a
    path prefix and credentials in the upstream URL."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.reply(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    server = await serve(handler)
    body = b'{"model": "m", "prompt": "\xc3\xa9"}'
    base = f"http://us%40%C3%A9r:p%3Ass@127.0.0.1:{server.port}/base"  # "us@ér", Latin-1
    for url in (base.replace("us%40%C3%A9r:p%3Ass@", ""), base):
        headers = HEADERS if "@" not in url else CIMultiDict([("Accept", "*/*")])
        async with (
            aiohttp.ClientSession(
                auto_decompress=False, skip_auto_headers=UPSTREAM_SKIP_AUTO_HEADERS
            ) as session,
            session.post(
                url + "/api/generate?x=%20y", data=body, headers=headers, allow_redirects=False
            ) as r,
        ):
            assert await r.read() == b"{}"
        async with await pool(url).post("/api/generate?x=%20y", body, headers) as r:
            assert await r.read() == b"{}"
        assert server.heads[-1] == server.heads[-2]
    pair = base64.b64encode("us@ér:p:ss".encode("latin-1")).decode()
    assert f"Authorization: Basic {pair}".encode() in server.heads[-1]
    # A host outside ASCII goes out as aiohttp (through yarl) names it: its IDNA form.
    idn = "http://bücher.example:8080"
    assert pool(idn).host_header == f"{URL(idn).raw_host}:8080" == "xn--bcher-kva.example:8080"
    # aiohttp refused a client's own Authorization beside credentials in the URL; the client's
    # is sent.
    async with await pool(base).post("/x", body, HEADERS) as r:
        await r.read()
    assert b"Authorization: k\r\n" in server.heads[-1] and b"Basic" not in server.heads[-1]


async def test_a_chunked_stream_is_read_as_it_comes(serve) -> None:
    sent_second = asyncio.Event()
    got_first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(
            reader, writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n"
        )
        await got_first.wait()
        sent_second.set()
        writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    server = await serve(handler)
    p = pool(server.url)
    pieces = []
    async with await p.post("/api/chat", b"{}", HEADERS) as r:
        assert (r.status, r.reason) == (200, "OK")
        assert r.headers["transfer-encoding"] == "chunked"
        async for piece in r.iter_any():
            if not pieces:
                assert not sent_second.is_set()  # relayed before the rest was even sent
                got_first.set()
            pieces.append(piece)
    assert b"".join(pieces) == b"first\nsecond\n"
    assert p.idle  # a complete answer leaves its connection for the next


async def test_a_body_that_runs_to_the_close(serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(
            reader, writer, b'HTTP/1.1 200 Fine\r\nContent-Type: application/json\r\n\r\n{"a": '
        )
        await asyncio.sleep(0.05)
        writer.write(b"1}")
        await writer.drain()
        writer.close()

    server = await serve(handler)
    p = pool(server.url)
    async with await p.post("/api/generate", b"{}", HEADERS) as r:
        assert r.reason == "Fine"
        assert await r.read() == b'{"a": 1}'
    assert not p.idle  # that connection is gone


async def test_interim_answers_are_skipped(serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(
            reader,
            writer,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
            b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc",
        )
        await reader.read()

    server = await serve(handler)
    async with await pool(server.url).post("/api/generate", b"{}", HEADERS) as r:
        assert (r.status, "Link" in r.headers) == (201, False)
        assert await r.read() == b"abc"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcde",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
    ],
    ids=["length", "chunks"],
)
async def test_an_answer_cut_short_is_an_error_not_a_body(serve, answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(reader, writer, answer)

    server = await serve(handler)
    for read_all in (True, False):
        async with await pool(server.url).post("/api/generate", b"{}", HEADERS) as r:
            with pytest.raises(UpstreamBroken, match="before the answer's end"):
                if read_all:
                    await r.read()
                else:
                    async for _ in r.iter_any():
                        pass


async def test_closed_before_answering_and_not_http(serve) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)

    server = await serve(silent)
    with pytest.raises(UpstreamBroken, match="before its answer"):
        await pool(server.url).post("/api/generate", b"{}", HEADERS)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await other.reply(reader, writer, b"SSH-2.0-OpenSSH_9.2\r\n")
        await reader.read()

    other = await serve(garbage)
    with pytest.raises(UpstreamBroken, match=r"not HTTP/1\.1"):
        await pool(other.url).post("/api/generate", b"{}", HEADERS)


async def test_a_stall_is_a_timeout_before_and_after_the_head(serve) -> None:
    async def stall_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        await reader.read()

    server = await serve(stall_head)
    p = pool(server.url, read_timeout=0.2)
    with pytest.raises(TimeoutError):
        await p.post("/api/generate", b"{}", HEADERS)
    assert not p.open and not p.idle  # that connection was dropped, not pooled

    async def stall_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await other.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await reader.read()

    other = await serve(stall_body)
    async with await pool(other.url, read_timeout=0.2).post("/x", b"{}", HEADERS) as r:
        got = []
        with pytest.raises(TimeoutError, match=r"nothing received for 0\.2s"):  # said in records
            async for piece in r.iter_any():
                got.append(piece)
        assert got == [b"a"]


async def test_unreachable_is_told_apart() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UpstreamUnreachable, match="cannot connect"):
            await pool(f"http://127.0.0.1:{port}").post("/api/chat", b"{}", HEADERS)


async def test_connections_are_kept_alive_unless_the_upstream_says_close(serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            close = len(server.heads) % 3 == 0
            extra = b"Connection: close\r\n" if close else b""
            writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()
            if close:
                return

    server = await serve(handler)
    p = pool(server.url)
    for _ in range(6):
        assert await answer(p) == b"ok"
        await asyncio.sleep(0.01)  # a close, if any, is seen before the next request
    assert server.connections == 2


async def test_an_idle_connection_the_upstream_closed_is_not_reused(serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # and closes without saying so, as a server's idle timeout does

    server = await serve(handler)
    p = pool(server.url)
    for _ in range(3):
        assert await answer(p) == b"ok"
        await asyncio.sleep(0.05)
    assert server.connections == 3


async def test_a_reader_that_falls_behind_pauses_the_socket(serve) -> None:
    size = 128 * HIGH_WATER  # 32 MiB: more than the kernel's socket buffers hold
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(size // 4096):
            writer.write(bytes([65 + i % 26]) * 4096)
            await writer.drain()
        done.set()
        await reader.read()

    server = await serve(handler)
    async with await pool(server.url).post("/x", b"{}", HEADERS) as r:
        await asyncio.sleep(0.3)
        assert not done.is_set()  # the server is held back: the proxy did not buffer it all
        assert r._conn is not None and r._conn.paused
        body = b"".join([piece async for piece in r.iter_any()])
    expected = b"".join(bytes([65 + i % 26]) * 4096 for i in range(size // 4096))
    assert body == expected
    done.clear()

    async with await pool(server.url).post("/x", b"{}", HEADERS) as r:  # read(): never paused
        assert await asyncio.wait_for(r.read(), 10) == expected


async def test_closing_an_unfinished_answer_closes_its_connection(serve) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(
            reader, writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n"
        )
        await reader.read()  # returns at the proxy's close: the model would stop here
        closed.set()

    server = await serve(handler)
    p = pool(server.url)
    async with await p.post("/api/chat", b"{}", HEADERS) as r:
        async for _ in r.iter_any():
            break
    await asyncio.wait_for(closed.wait(), 5)
    assert not p.idle and not p.open


async def test_an_answer_to_nothing_asked_drops_the_connection(serve) -> None:
    """A server that sends two answers to one request: the first is the answer, and the
    connection is not pooled (twice, or at all) for a later request to read the second."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.reply(
                reader,
                writer,
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo",
            )

    server = await serve(handler)
    p = pool(server.url)
    for _ in range(3):
        assert await answer(p) == b"one"
        await asyncio.sleep(0.05)
        assert not p.idle
    assert server.connections == 3


async def test_a_connection_paused_for_a_slow_reader_is_pooled_reading(serve) -> None:
    """An answer whose last bytes came in while its reader was behind (the socket paused):
    the connection goes back to the pool reading again, so the next request's answer is
    seen (it waited out the read timeout before, and was recorded as an upstream error)."""
    big = b"x" * 900_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            body = big if len(server.heads) == 1 else b"small"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    server = await serve(handler)
    p = pool(server.url, read_timeout=2.0)
    async with await p.post("/api/generate", b"{}", HEADERS) as r:
        got = 0
        async for piece in r.iter_any():
            got += len(piece)
            await asyncio.sleep(0.05)  # a slow client downstream
    assert got == len(big)
    assert [c.paused for c in p.idle] == [False]
    async with await p.post("/api/generate", b"{}", HEADERS) as r:
        assert await r.read() == b"small"
    assert server.connections == 1


async def test_lines_ended_by_lf_alone_are_read(serve) -> None:
    """As aiohttp's client read them (the proxy used it before): no 502 for such a server."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(
            reader,
            writer,
            b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\n{}",
        )
        await reader.read()

    server = await serve(handler)
    async with await pool(server.url).post("/api/chat", b"{}", HEADERS) as r:
        assert (r.status, r.headers["Content-Type"]) == (200, "application/json")
        assert await r.read() == b"{}"


async def test_cancelled_after_a_whole_answer_leaves_the_pooled_connection(serve) -> None:
    """The head and the whole body came in one read (the connection back in the pool) and the
    wait for the head is then cancelled: the connection stays for the next exchange (closing
    it cut another exchange's request, already sent on it)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.reply(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    server = await serve(handler)
    p = pool(server.url)
    task = asyncio.ensure_future(p.post("/a", b"{}", HEADERS))
    deadline = asyncio.get_running_loop().time() + 5
    while not p.idle:  # until the answer is in and the connection pooled, task not resumed
        assert asyncio.get_running_loop().time() < deadline, "the answer did not come"
        await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(p.idle) == 1 and not p.idle[0].closed
    async with await p.post("/b", b"{}", HEADERS) as r:
        assert await r.read() == b"{}"
    assert server.connections == 1


async def test_a_stray_answer_begun_after_the_answer_is_not_pooled(serve) -> None:
    """Bytes after a whole answer that begin another (cut) message: the connection is closed,
    not pooled with its parser inside that message for the next exchange to read."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.reply(
                reader,
                writer,
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nX",
            )

    server = await serve(handler)
    p = pool(server.url)
    for _ in range(2):
        assert await answer(p) == b"hello"
        assert not p.idle
    assert server.connections == 2


async def test_a_transfer_coding_that_is_not_chunked_runs_to_the_close(serve) -> None:
    """``Transfer-Encoding: gzip`` alone: the body ends with the connection (RFC 9112 §6.3), as
    aiohttp read it, not "closed before the answer's end"."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(reader, writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc")
        writer.close()

    server = await serve(handler)
    async with await pool(server.url).post("/api/chat", b"{}", HEADERS) as r:
        assert await r.read() == b"abc"


async def test_a_connect_timeout_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing was sent: told as unreachable (502, no record), not as an answer that did not
    come (504 and a record of an exchange the upstream never saw)."""
    loop = asyncio.get_running_loop()

    async def never(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(loop, "create_connection", never)  # the network's side: a lost SYN
    p = Pool("http://192.0.2.1:80", connect_timeout=0.1, read_timeout=5)
    with pytest.raises(UpstreamUnreachable, match=r"no answer within 0\.1s"):
        await p.post("/api/chat", b"{}", HEADERS)


async def test_idle_connections_are_closed_while_idle(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle connection is closed after the keep-alive time even if no request comes (a
    server with no idle timeout of its own, as Ollama's, would keep it for ever)."""
    import tokentrail._proxy._upstream as upstream_module

    monkeypatch.setattr(upstream_module, "KEEPALIVE_S", 0.2)
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()
        closed.set()

    server = await serve(handler)
    p = pool(server.url)
    assert await answer(p) == b"ok"
    assert len(p.idle) == 1
    await asyncio.wait_for(closed.wait(), 5)
    assert not p.idle and not p.open


async def test_an_answer_before_the_body_was_sent_is_not_pooled(serve) -> None:
    """A server that answers (413, say) before reading a large body: the connection is not
    pooled with the rest of that body still to send, into the next request's place."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        server.heads.append(b"")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    server = await serve(handler)
    p = pool(server.url)
    async with await p.post("/api/chat", b"x" * (32 << 20), HEADERS) as r:
        assert r.status == 413
        assert await r.read() == b""
    assert not p.idle


async def test_a_connection_opened_after_the_pool_closed_is_not_used(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown the pool closes every connection it has; one still opening then is closed as
    it opens, and nothing is sent on it (it was left open, and used, before)."""
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    opening, go = asyncio.Event(), asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> Any:
        opening.set()
        await go.wait()
        return await real(*args, **kwargs)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.reply(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await serve(handler)
    monkeypatch.setattr(loop, "create_connection", slow)
    p = pool(server.url)
    task = asyncio.ensure_future(p.post("/api/chat", b"{}", HEADERS))
    await asyncio.wait_for(opening.wait(), 5)
    p.close()
    go.set()
    with pytest.raises(UpstreamUnreachable, match="shutting down"):
        await asyncio.wait_for(task, 5)
    await asyncio.sleep(0.1)
    assert server.heads == [] and not p.open and not p.idle
