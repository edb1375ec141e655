"""A hostile upstream for fuzzing the proxy: malformed NDJSON and SSE, bad UTF-8, huge lines.

Every audited path (and any other path, for pass-through) answers according to the
``X-Fuzz-Upstream`` request header, ``<behaviour>[:<seed>]``, which the proxy forwards as it
forwards any client header. Behaviours (:data:`BEHAVIOURS`) cover what a broken or malicious
model server may send: wrong content types, invalid UTF-8, lines of several megabytes, chunk
boundaries inside a UTF-8 sequence or a ``data:`` prefix, deeply nested JSON, ``NaN`` and
64-bit-overflowing numbers, a stream that never sends its final piece, a lying gzip
``Content-Encoding``, a ``Content-Length`` longer than the body, and random bytes.

    with upstream_in_thread() as url:
        httpx.post(proxy_url + "/api/generate", json=..., headers={"X-Fuzz-Upstream": "nan"})
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import posixpath
import random
import re
import threading
from collections.abc import Awaitable, Callable, Iterator

import orjson
from aiohttp import web

HEADER = "X-Fuzz-Upstream"
MODEL = "fuzz-model"

Response = web.StreamResponse
_Handler = Callable[[web.Request, random.Random, bool, bool], Awaitable[web.StreamResponse]]


def _ollama_line(rng: random.Random, chat: bool, *, done: bool = False) -> bytes:
    piece = rng.choice(["hel", "lo", " wor", "ld", "é", "😀", "\u0000", "\\", '"'])
    body: dict[str, object] = {"model": MODEL, "done": done}
    if chat:
        body["message"] = {"role": "assistant", "content": piece}
    else:
        body["response"] = piece
    if done:
        body.update(done_reason="stop", prompt_eval_count=3, eval_count=4)
        if not chat:
            body["context"] = [1, 2, 3, 4, 5]
    return orjson.dumps(body) + b"\n"


def _openai_event(rng: random.Random, chat: bool, *, done: bool = False) -> bytes:
    piece = rng.choice(["hel", "lo", " wor", "ld", "é", "😀", "\u0000"])
    if chat:
        choice: dict[str, object] = {"index": 0, "delta": {"content": piece}}
    else:
        choice = {"index": 0, "text": piece}
    choice["finish_reason"] = "stop" if done else None
    obj = {"id": "x", "object": "chunk", "model": MODEL, "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _good_stream(rng: random.Random, openai: bool, chat: bool) -> bytes:
    if openai:
        parts = [_openai_event(rng, chat) for _ in range(3)] + [_openai_event(rng, chat, done=True)]
        return b"".join(parts) + b"data: [DONE]\n\n"
    return b"".join(_ollama_line(rng, chat) for _ in range(3)) + _ollama_line(rng, chat, done=True)


def _good_body(rng: random.Random, openai: bool, chat: bool) -> bytes:
    if openai:
        if chat:
            choice: dict[str, object] = {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": "hi", "finish_reason": "stop"}
        return orjson.dumps({"id": "x", "model": MODEL, "choices": [choice]})
    return _ollama_line(rng, chat, done=True)


def _stream_type(openai: bool) -> str:
    return "text/event-stream" if openai else "application/x-ndjson"


async def _stream(
    request: web.Request,
    parts: list[bytes],
    ctype: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Content-Type": ctype, **(headers or {})})
    await resp.prepare(request)
    for part in parts:
        await resp.write(part)
    await resp.write_eof()
    return resp


def _split_everywhere(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random points, many of them inside UTF-8 sequences and prefixes."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# -- behaviours ------------------------------------------------------------------------------


async def good(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """A well-formed streamed answer (the control case)."""
    return await _stream(request, [_good_stream(rng, openai, chat)], _stream_type(openai))


async def odd_chunks(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """A well-formed stream cut into chunks at random bytes (inside UTF-8, inside ``data:``)."""
    data = _good_stream(rng, openai, chat)
    return await _stream(request, _split_everywhere(data, rng), _stream_type(openai))


async def bad_utf8(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """Lines holding invalid UTF-8 between good lines, then a proper end."""
    junk = bytes(rng.choice([0xFF, 0xFE, 0xC0, 0x80, 0xED]) for _ in range(rng.randint(1, 20)))
    if openai:
        bad = b'data: {"choices":[{"index":0,"delta":{"content":"' + junk + b'"}}]}\n\n'
    else:
        bad = b'{"model":"m","response":"' + junk + b'","done":false}\n'
    data = _good_stream(rng, openai, chat)
    cut = data.index(b"\n") + 1
    return await _stream(request, [data[:cut], bad, data[cut:]], _stream_type(openai))


async def not_json(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """Lines that are not JSON at all (``{``, ``nul``, ``data: {``, an HTML tag)."""
    noise = [b"{\n", b"nul\n", b"data: {\n\n", b"<html>\n", b"data:\n\n", b"\n\n\n", b"[1,2\n"]
    parts = [rng.choice(noise) for _ in range(rng.randint(1, 6))]
    return await _stream(request, [*parts, _good_stream(rng, openai, chat)], _stream_type(openai))


async def huge_line(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """One line of several megabytes with no newline for a long while, then a proper end."""
    size = rng.choice([1 << 20, 4 << 20, 8 << 20])
    text = b"a" * size
    if openai:
        line = b'data: {"choices":[{"index":0,"delta":{"content":"' + text + b'"}}]}\n\n'
    else:
        line = b'{"model":"m","response":"' + text + b'","done":false}\n'
    chunks = [line[i : i + (1 << 16)] for i in range(0, len(line), 1 << 16)]
    return await _stream(request, [*chunks, _good_stream(rng, openai, chat)], _stream_type(openai))


async def huge_no_newline(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """Megabytes of bytes without a single newline, then the connection ends."""
    chunk = bytes(rng.randrange(32, 127) for _ in range(1024)) * 64
    return await _stream(request, [chunk] * rng.randint(1, 64), _stream_type(openai))


async def deep_nesting(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """A JSON value nested 100,000 levels deep, as one stream line and as a whole body."""
    depth = rng.choice([2_000, 100_000])
    deep = b"[" * depth + b"]" * depth
    if rng.random() < 0.5:
        if openai:
            return await _stream(request, [b"data: " + deep + b"\n\n"], _stream_type(openai))
        return await _stream(request, [deep + b"\n"], _stream_type(openai))
    body = b'{"model":"m","response":' + deep + b',"done":true}'
    return web.Response(body=body, content_type="application/json")


async def nan(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """``NaN``, ``Infinity`` and ``-Infinity`` where token data goes (not JSON, but Python's)."""
    word = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
    if openai:
        body = (
            b'{"id":"x","model":"m","choices":[{"index":0,"text":"hi","finish_reason":"stop",'
            b'"message":{"role":"assistant","content":"hi"},'
            b'"logprobs":{"content":[{"token":"hi","logprob":' + word + b',"bytes":[104,105]}]}}],'
            b'"usage":{"prompt_tokens":' + word + b',"completion_tokens":1}}'
        )
    else:
        body = (
            b'{"model":"m","response":"hi","message":{"role":"assistant","content":"hi"},'
            b'"done":true,"context":[1,' + word + b',3],"eval_count":' + word + b"}"
        )
    return web.Response(body=body, content_type="application/json")


async def big_numbers(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """Integers far past 64 bits in token ids and counts, and floats past double range."""
    big = str(rng.choice([2**64, 10**30, -(2**70)])).encode()
    if openai:
        body = (
            b'{"id":"x","model":"m","prompt_token_ids":[1,' + big + b"],"
            b'"choices":[{"index":0,"text":"hi","token_ids":[' + big + b'],"finish_reason":"stop",'
            b'"message":{"role":"assistant","content":"hi"}}],'
            b'"usage":{"prompt_tokens":' + big + b',"completion_tokens":1e999}}'
        )
    else:
        body = (
            b'{"model":"m","response":"hi","message":{"role":"assistant","content":"hi"},'
            b'"done":true,"context":[1,' + big + b",3],"
            b'"prompt_eval_count":' + big + b',"eval_count":1e999}'
        )
    return web.Response(body=body, content_type="application/json")


async def wrong_type(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """A stream labelled as JSON or HTML, a JSON body labelled as a stream, JSON of every type."""
    choice = rng.randrange(4)
    if choice == 0:
        return await _stream(request, [_good_stream(rng, openai, chat)], "application/json")
    if choice == 1:
        return web.Response(body=_good_body(rng, openai, chat), content_type=_stream_type(openai))
    if choice == 2:
        return web.Response(
            body=b"<html><body>502 bad gateway</body></html>", content_type="text/html"
        )
    value = rng.choice([b"null", b"1", b'"s"', b"[]", b"true", b'{"choices":"x","message":7}'])
    return web.Response(body=value, content_type="application/json")


async def no_end(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """Good lines, then the stream ends without its final piece."""
    data = _good_stream(rng, openai, chat)
    end = data.rfind(b"data: " if openai else b'{"model"')
    return await _stream(request, [data[:end]], _stream_type(openai))


async def error_status(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """An error status with a body that is not the dialect's error (or is empty)."""
    status = rng.choice([400, 401, 404, 429, 500, 502, 503])
    body = rng.choice([b"", b"oops", b'{"error":{"nested":[1,2]}}', b"\xff\xfe", b'{"error":null}'])
    ctype = rng.choice(["application/json", "text/plain", _stream_type(openai)])
    return web.Response(status=status, body=body, content_type=ctype)


async def lying_gzip(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """``Content-Encoding: gzip`` over bytes that are not gzip (or are cut short)."""
    data = _good_stream(rng, openai, chat)
    if rng.random() < 0.5:
        payload = data  # plain bytes, labelled gzip
    else:
        packed = gzip.compress(data)
        payload = packed[: rng.randint(1, len(packed) - 1)]  # truncated gzip
    ctype = _stream_type(openai) if rng.random() < 0.7 else "application/json"
    return await _stream(request, [payload], ctype, headers={"Content-Encoding": "gzip"})


async def short_body(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """A ``Content-Length`` larger than the body that follows, then the connection closes."""
    body = _good_body(rng, openai, chat)
    resp = web.StreamResponse(
        headers={"Content-Type": "application/json", "Content-Length": str(len(body) + 100)}
    )
    await resp.prepare(request)
    await resp.write(body)
    if request.transport is not None:
        request.transport.close()
    return resp


async def random_bytes(
    request: web.Request, rng: random.Random, openai: bool, chat: bool
) -> Response:
    """Random bytes under a random one of the content types the proxy looks at."""
    data = rng.randbytes(rng.randint(0, 4096))
    ctype = rng.choice([_stream_type(openai), "application/json", "application/octet-stream"])
    return await _stream(request, _split_everywhere(data + b"\n", rng), ctype)


async def crlf(request: web.Request, rng: random.Random, openai: bool, chat: bool) -> Response:
    """The good stream with ``\\r\\n`` or bare ``\\r`` line ends."""
    data = _good_stream(rng, openai, chat)
    data = data.replace(b"\n", rng.choice([b"\r\n", b"\r"]))
    return await _stream(request, [data], _stream_type(openai))


BEHAVIOURS: dict[str, _Handler] = {
    "good": good,
    "odd-chunks": odd_chunks,
    "bad-utf8": bad_utf8,
    "not-json": not_json,
    "huge-line": huge_line,
    "huge-no-newline": huge_no_newline,
    "deep-nesting": deep_nesting,
    "nan": nan,
    "big-numbers": big_numbers,
    "wrong-type": wrong_type,
    "no-end": no_end,
    "error-status": error_status,
    "lying-gzip": lying_gzip,
    "short-body": short_body,
    "random-bytes": random_bytes,
    "crlf": crlf,
}


#: Set on every answer, so a fuzzer can tell a relayed upstream answer from the proxy's own.
RELAY_HEADER = "X-Fuzz-Relay"


def resolved(path: str) -> str:
    """``path`` as a server that resolves dot segments and repeated or trailing slashes acts
    on it (the proxy forwards odd spellings as sent; such a server would serve them)."""
    return posixpath.normpath(re.sub("/+", "/", path)).rstrip("/") or "/"


class Seen:
    """The ``Idempotency-Key`` of every request this upstream could act on as an audited one."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.lock = threading.Lock()


SEEN_KEY = web.AppKey("seen", Seen)


async def _mark(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers[RELAY_HEADER] = "1"


async def _handle(request: web.Request) -> web.StreamResponse:
    await request.read()
    key = request.headers.get("Idempotency-Key")
    if key and request.method == "POST" and resolved(request.path) in AUDITED:
        seen = request.app[SEEN_KEY]
        with seen.lock:
            seen.keys[key] = request.headers.get(HEADER, "good")
    name, _, seed = request.headers.get(HEADER, "good").partition(":")
    rng = random.Random(seed or name)
    behaviour = BEHAVIOURS.get(name, good)
    path = request.path
    openai = path.startswith("/v1/")
    chat = path.endswith("/chat") or path.endswith("/chat/completions")
    if path == "/api/tags":
        return web.json_response({"models": [{"name": MODEL, "model": MODEL, "digest": "d" * 64}]})
    return await behaviour(request, rng, openai, chat)


AUDITED = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions")


def make_app(seen: Seen | None = None) -> web.Application:
    """The hostile upstream's aiohttp application (one catch-all route)."""
    app = web.Application(client_max_size=64 << 20)
    app[SEEN_KEY] = seen or Seen()
    app.on_response_prepare.append(_mark)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


@contextlib.contextmanager
def upstream_in_thread(host: str = "127.0.0.1", seen: Seen | None = None) -> Iterator[str]:
    """Run the hostile upstream in a background thread; yields its base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        runner = web.AppRunner(make_app(seen), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        addr = runner.addresses[0]
        holder["url"] = f"http://{addr[0]}:{addr[1]}"
        holder["runner"] = runner
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True, name="fuzz-upstream")
    thread.start()
    asyncio.run_coroutine_threadsafe(main(), loop).result(10)
    started.wait(10)
    try:
        yield str(holder["url"])
    finally:
        runner = holder["runner"]
        assert isinstance(runner, web.AppRunner)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


if __name__ == "__main__":  # pragma: no cover - for trying behaviours by hand
    web.run_app(make_app(), host="127.0.0.1", port=11499)
