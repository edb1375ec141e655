"""The proxy against upstreams that use the wire formats' legal variations.

The project's simulator writes SSE and NDJSON one way; real servers use the rest of what the
formats allow. Here a scripted upstream sends exact bytes (line ends, field spellings, event
layouts, redirects, content types), and each case checks what a conforming client receives
through the proxy against what it receives directly, and what the record says. The SSE parser
itself is checked against the WHATWG "Parsing an event stream" rules.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import random
import socket
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from test_proxy import ProxyProc, start_proxy
from test_sdk import read_records
from tokentrail import Signer
from tokentrail._capture._sse import SSEEvents, SSEReader, cut_at_line_end
from tokentrail._sdk import Recorder, audit

# ---------------------------------------------------------------------- the SSE parser


def events_of(stream: bytes, cuts: tuple[int, ...] = ()) -> list[bytes]:
    """The event data a conforming client dispatches from ``stream``, read in pieces cut at
    ``cuts``, the way the proxy reads it (complete lines at each read, the rest kept)."""
    parser = SSEEvents()
    out: list[bytes] = []
    pending = b""
    bounds = [0, *cuts, len(stream)]
    for a, b in itertools.pairwise(bounds):
        pending += stream[a:b]
        cut = cut_at_line_end(pending)
        for line in pending[:cut].splitlines(keepends=True):
            data = parser.line(line)
            if data:
                out.append(data)
        pending = pending[cut:]
    if pending:
        assert parser.line(pending) is None  # an unterminated line never ends an event
    return out


class TestSSEParser:
    @pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
    def test_line_ends(self, end: bytes) -> None:
        """LF, CRLF and CR all end a line (WHATWG: end-of-line = CRLF / LF / CR)."""
        stream = b"data: a" + end + end + b"data: b" + end + end
        assert [b"a", b"b"] == events_of(stream)

    def test_crlf_cut_between_reads(self) -> None:
        """A CRLF cut between two reads is one line end, not a line end and a blank line."""
        stream = b"data: a\r\ndata: b\r\n\r\n"
        for cut in range(1, len(stream)):
            assert [b"a\nb"] == events_of(stream, (cut,)), cut

    def test_multi_line_data(self) -> None:
        """The data lines of one event are joined with LF; the event ends at the blank line."""
        assert [b'{"a":\n1}'] == events_of(b'data: {"a":\ndata: 1}\n\n')

    @pytest.mark.parametrize(
        ("stream", "expected"),
        [
            (b"data:x\n\n", [b"x"]),  # no space after the colon
            (b"data:  x\n\n", [b" x"]),  # only one space is dropped
            (b" data: x\n\n", []),  # a field named " data": ignored
            (b"DATA: x\n\n", []),  # names are case-sensitive
            (b": comment\ndata: x\n: more\n\n", [b"x"]),
            (b"event: e\nid: 1\nretry: 5\ndata: x\n\n", [b"x"]),
            (b"\xef\xbb\xbfdata: x\n\n", [b"x"]),  # a leading BOM is not part of the name
            (b"data: x\n", []),  # no blank line before the end: never dispatched
            (b"data: x", []),
            (b"data\n\n", []),  # a data field with no value: an empty event
        ],
    )
    def test_fields(self, stream: bytes, expected: list[bytes]) -> None:
        """Field names match exactly, comments and other fields are skipped."""
        assert expected == events_of(stream)

    def test_reader_in_pieces_reads_as_line_by_line(self) -> None:
        """The SDK's reader (:class:`SSEReader`) finds the events the line-by-line reading
        finds, however the body is cut."""
        parts = [b"data: ", b"data:", b"x", b" ", b"\n", b"\r", b"\n\n", b": c\n", b"[DONE]",
                 b"\xef\xbb\xbf", b'{"a":1}', b"event: e\n", b'data: {"b":2}\n\n']  # fmt: skip
        rng = random.Random(9162)
        for _ in range(20_000):
            body = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 12))) + b"\n"
            cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(0, 4))))
            reader = SSEReader()
            bounds = itertools.pairwise([0, *cuts, len(body)])
            found = [e for a, b in bounds for e in reader.feed(body[a:b])]
            assert [e for e in found if e] == events_of(body), (body, cuts)


# ---------------------------------------------------------------------- a scripted upstream


@dataclass
class Script:
    """What the upstream answers: status, headers and the body in pieces (sent with a pause)."""

    body: list[bytes]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    pause_s: float = 0.0
    #: The body instead, when the request asks for logprobs (as the proxy does for a client).
    with_logprobs: list[bytes] | None = None
    #: The server dies after the body's pieces: the connection closes, the answer unfinished.
    cut: bool = False
    #: A request member the server refuses -> its error answer (status, body).
    refuses: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    #: The request bodies received, in order.
    seen: list[dict[str, Any]] = field(default_factory=list)


SCRIPTS: dict[str, Script] = {}


async def _answer(request: web.Request) -> web.StreamResponse:
    sent = await request.read()
    script = SCRIPTS.get(request.headers.get("X-Script", ""))
    if script is None:  # the proxy's own look-ups (/api/tags for the model digest)
        return web.json_response({"models": []})
    asked = orjson.loads(sent) if sent else {}
    script.seen.append(asked)
    for member, (status, error) in script.refuses.items():
        if member in asked:
            return web.Response(status=status, body=error, content_type="application/json")
    body = script.body
    if script.with_logprobs is not None and asked.get("logprobs"):
        body = script.with_logprobs
    out = web.StreamResponse(status=script.status, headers=script.headers)
    await out.prepare(request)
    for piece in body:
        await out.write(piece)
        if script.pause_s:
            await asyncio.sleep(script.pause_s)
    if script.cut:
        assert request.transport is not None
        request.transport.close()
        return out
    await out.write_eof()
    return out


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The scripted upstream, in a thread: every path answers with ``SCRIPTS[X-Script]``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.fixture(scope="module")
def proxy(upstream: str) -> Iterator[ProxyProc]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_proxy(Path(tmp), upstream)
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def logprobs_proxy(upstream: str) -> Iterator[ProxyProc]:
    """A proxy that asks for logprobs on the client's behalf and hides them again."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_proxy(Path(tmp), upstream, "--request-token-data", "logprobs")
        try:
            yield proc
        finally:
            proc.stop()


def chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "system_fingerprint": "fp1",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def sse_body(end: bytes = b"\n") -> bytes:
    """A three-chunk chat stream saying "Hello", with ``[DONE]``, lines ended by ``end``."""
    out = b""
    for obj in (chunk("Hel"), chunk("lo"), chunk(None, "stop")):
        out += b"data: " + orjson.dumps(obj) + end + end
    return out + b"data: [DONE]" + end + end


def multi_line_first_event() -> bytes:
    """:func:`sse_body` with its first event's JSON written over two ``data:`` lines."""
    first = orjson.dumps(chunk("Hel"))
    cut = first.index(b',"model"') + 1
    rest = sse_body().split(b"\n\n", 1)[1]
    return b"data: " + first[:cut] + b"\ndata: " + first[cut:] + b"\n\n" + rest


SSE = {"Content-Type": "text/event-stream"}


def _data_events(stream: bytes) -> list[Any]:
    """The JSON data of each event in ``stream``, as a conforming client dispatches them."""
    return [orjson.loads(data) for data in events_of(stream)]


def exchange(
    base: str, proxy: ProxyProc | None, name: str, path: str, body: dict[str, Any]
) -> tuple[int, bytes, dict[str, Any] | None]:
    """Status and body a client gets from ``base``, and the record it left (through a proxy)."""
    before = len(proxy.records()) if proxy is not None else 0
    r = httpx.post(base + path, json=body, headers={"X-Script": name}, timeout=30)
    record = None
    if proxy is not None:
        records = proxy.records()
        assert before + 1 == len(records), "exactly one record per exchange"
        record = records[-1]
    return r.status_code, r.content, record


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class TestOddButLegalStreams:
    """Client bytes as direct, and the record holding what the client was shown."""

    @pytest.mark.parametrize(
        ("name", "body", "text", "stop"),
        [
            ("cr", sse_body(b"\r"), "Hello", "stop"),
            ("crlf", sse_body(b"\r\n"), "Hello", "stop"),
            ("multi-line-data", multi_line_first_event(), "Hello", "stop"),
            (
                "leading-space-field",
                b" data: " + orjson.dumps(chunk("INJECTED")) + b"\n\n" + sse_body(),
                "Hello",
                "stop",
            ),
        ],
    )
    def test_sse_variants(
        self,
        upstream: str,
        proxy: ProxyProc,
        name: str,
        body: bytes,
        text: str,
        stop: str,
    ) -> None:
        SCRIPTS[name] = Script([body[i : i + 7] for i in range(0, len(body), 7)], headers=SSE)
        direct = exchange(upstream, None, name, "/v1/chat/completions", CHAT)
        status, got, record = exchange(proxy.url, proxy, name, "/v1/chat/completions", CHAT)
        assert (direct[0], direct[1]) == (status, got)
        assert record is not None
        assert (text, stop) == (record["output_text"], record["stop_reason"])
        assert "m@fp1" == record["model_version"]

    def test_cr_stream_is_relayed_as_it_comes(self, upstream: str, proxy: ProxyProc) -> None:
        """CR-ended events reach the client one by one, not all at the end."""
        pieces = sse_body(b"\r").split(b"\r\r")
        SCRIPTS["cr-slow"] = Script([p + b"\r\r" for p in pieces if p], headers=SSE, pause_s=0.4)
        with httpx.stream(
            "POST",
            proxy.url + "/v1/chat/completions",
            json=CHAT,
            headers={"X-Script": "cr-slow"},
            timeout=30,
        ) as r:
            pieces = r.iter_raw()
            first = next(pieces)
            rest = b"".join(pieces)
        assert first.startswith(b"data: {") and first.count(b"\r\r") == 1
        assert (first + rest) == sse_body(b"\r")

    def test_event_cut_short_is_not_relayed_before_the_error(
        self, upstream: str, proxy: ProxyProc
    ) -> None:
        """An upstream that stops inside an event: the proxy's error event follows the last
        whole event, so the half event cannot run into it (a client would join the two data
        lines into one event that is not JSON)."""
        whole = b"data: " + orjson.dumps(chunk("Hel")) + b"\n\n"
        half = b"data: " + orjson.dumps(chunk("lo"))[:25]
        SCRIPTS["cut-event"] = Script([whole, half], headers=SSE)
        _, got, record = exchange(proxy.url, proxy, "cut-event", "/v1/chat/completions", CHAT)
        assert got.startswith(whole)
        assert got[len(whole) :].startswith(b'data: {"error":')  # the half event is not relayed
        (error,) = _data_events(got[len(whole) :])
        assert error["error"]["message"] == "tokentrail: upstream closed the stream before its end"
        assert record is not None
        assert ("Hel", "upstream_error") == (record["output_text"], record["stop_reason"])

    def test_legacy_completions_cut_short(self, upstream: str, proxy: ProxyProc) -> None:
        """A /v1/completions stream that ends before any finish_reason is an upstream error
        with its reason, as a chat stream is (its chunks are all "text_completion")."""
        obj = {"id": "c", "object": "text_completion", "model": "m",
               "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]}  # fmt: skip
        SCRIPTS["comp-cut"] = Script([b"data: " + orjson.dumps(obj) + b"\n\n"], headers=SSE)
        body = {"model": "m", "prompt": "hi", "stream": True}
        _, got, record = exchange(proxy.url, proxy, "comp-cut", "/v1/completions", body)
        assert record is not None
        assert ("upstream_error", "upstream closed the stream before its end") == (
            record["stop_reason"],
            record["error_message"],
        )
        assert b"upstream closed the stream before its end" in got

    @pytest.mark.parametrize("streamed", [False, True])
    def test_vllm_error_body(self, upstream: str, proxy: ProxyProc, streamed: bool) -> None:
        """vLLM's error shape (message at the top, "object": "error") is the record's error."""
        err = {"object": "error", "message": "max_tokens too large", "type": "BadRequest",
               "code": 400}  # fmt: skip
        if streamed:
            script = Script([b"data: " + orjson.dumps(err) + b"\n\n"], headers=SSE)
        else:
            script = Script([orjson.dumps(err)], status=400,
                            headers={"Content-Type": "application/json"})  # fmt: skip
        SCRIPTS[f"vllm-error-{streamed}"] = script
        body = {**CHAT, "stream": streamed}
        _, _, record = exchange(
            proxy.url, proxy, f"vllm-error-{streamed}", "/v1/chat/completions", body
        )
        assert record is not None
        assert ("upstream_error", "max_tokens too large") == (
            record["stop_reason"],
            record["error_message"],
        )

    @pytest.mark.parametrize("ctype", ["application/octet-stream", "text/plain"])
    def test_stream_without_a_stream_type(
        self, upstream: str, proxy: ProxyProc, ctype: str
    ) -> None:
        """A stream asked for and sent under a type that is neither a stream's nor JSON is
        read as the clients read it (the stream of the path's format), not as one JSON body."""
        lines = [
            {"model": "m", "response": "Hel", "done": False},
            {"model": "m", "response": "lo", "done": True, "done_reason": "stop"},
        ]
        name = f"ndjson-{ctype}"
        SCRIPTS[name] = Script(
            [orjson.dumps(x) + b"\n" for x in lines],
            headers={"Content-Type": ctype},
        )
        body = {"model": "m", "prompt": "hi"}
        direct = exchange(upstream, None, name, "/api/generate", body)
        status, got, record = exchange(proxy.url, proxy, name, "/api/generate", body)
        assert (direct[0], direct[1]) == (status, got)
        assert record is not None
        assert ("Hello", "stop") == (record["output_text"], record["stop_reason"])

    def test_gzip_stream_ending_without_a_newline(self, upstream: str, proxy: ProxyProc) -> None:
        """A compressed NDJSON stream whose last (done) line has no newline: relayed as sent,
        and that line still ends the record (it is read, though the bytes go out whole)."""
        lines = [
            {"model": "m", "response": "Hel", "done": False},
            {"model": "m", "response": "lo", "done": True, "done_reason": "stop"},
        ]
        data = gzip.compress(orjson.dumps(lines[0]) + b"\n" + orjson.dumps(lines[1]))
        SCRIPTS["gzip-tail"] = Script(
            [data[:20], data[20:]],
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
        )
        body = {"model": "m", "prompt": "hi"}
        direct = exchange(upstream, None, "gzip-tail", "/api/generate", body)
        status, got, record = exchange(proxy.url, proxy, "gzip-tail", "/api/generate", body)
        assert (direct[0], direct[1]) == (status, got)
        assert record is not None
        assert ("Hello", "stop", None) == (
            record["output_text"],
            record["stop_reason"],
            record.get("error_message"),
        )

    def test_gzip_final_line_without_a_newline_waits_for_its_record(
        self, upstream: str, proxy: ProxyProc
    ) -> None:
        """Strict durability: the compressed chunk that holds a final line with no line end is
        held until the record is on disk, as any final piece is (it went out at once, and the
        client had the whole answer while the upstream had yet to end the stream)."""
        lines = [
            {"model": "m", "response": "Hel", "done": False},
            {"model": "m", "response": "lo", "done": True, "done_reason": "stop"},
        ]
        data = gzip.compress(orjson.dumps(lines[0]) + b"\n" + orjson.dumps(lines[1]), mtime=0)
        SCRIPTS["gzip-tail-slow-end"] = Script(
            [data],
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
            pause_s=1.5,  # the upstream ends the stream that long after its last bytes
        )
        before = len(proxy.records())
        got = b""
        with httpx.stream(
            "POST", proxy.url + "/api/generate", json={"model": "m", "prompt": "hi"},
            headers={"X-Script": "gzip-tail-slow-end"}, timeout=10,
        ) as r:  # fmt: skip
            for piece in r.iter_raw():
                got += piece
                if got == data:  # the whole answer is here: its record must be too
                    assert before + 1 == len(proxy.records())
        assert got == data

    def test_html_answer_to_a_stream_stays_a_body(self, upstream: str, proxy: ProxyProc) -> None:
        """An HTML page (a misconfigured gateway's, say) answering a stream request is relayed
        as it is and recorded as not JSON: only untyped bodies are read as the stream."""
        page = b"<html><body>Bad gateway config</body></html>\n"
        SCRIPTS["html"] = Script([page], headers={"Content-Type": "text/html"})
        body = {"model": "m", "prompt": "hi"}
        status, got, record = exchange(proxy.url, proxy, "html", "/api/generate", body)
        assert (200, page) == (status, got)
        assert record is not None
        assert record["error_message"].startswith("upstream sent a body that is not JSON")


def logprobs_of(text: str) -> dict[str, Any]:
    return {
        "content": [
            {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": []}
        ]
    }


def lp_chunk(content: str | None, finish: str | None, logprobs: bool) -> bytes:
    """A chat chunk written over three ``data:`` lines, its ``logprobs`` on the middle one
    (an object when asked for, else ``null``, as OpenAI sends it)."""
    obj = chunk(content, finish)
    lp = orjson.dumps(logprobs_of(content or "") if logprobs and content else None)
    head = orjson.dumps(obj).split(b',"finish_reason"')[0]
    tail = orjson.dumps(obj["choices"][0]["finish_reason"])
    return b'data: %s,\ndata: "logprobs":%s,\ndata: "finish_reason":%s}]}\n\n' % (head, lp, tail)


def hi_answer(streamed: bool) -> tuple[list[bytes], list[bytes], dict[str, str]]:
    """A chat answer "Hi" (streamed or whole): its body as sent without logprobs and with them
    (as asked on the client's behalf), and its headers."""
    if streamed:
        plain = [b"".join(lp_chunk(t, f, False) for t, f in (("Hi", None), (None, "stop")))]
        asked = [b"".join(lp_chunk(t, f, True) for t, f in (("Hi", None), (None, "stop")))]
        return plain, asked, dict(SSE)
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    plain = [orjson.dumps(answer)]
    answer["choices"][0]["logprobs"] = logprobs_of("Hi")  # type: ignore[index]
    return plain, [orjson.dumps(answer)], {"Content-Type": "application/json"}


class TestSDKReadsTheSameStreams:
    """The SDK's audited openai client reads a stream from the bytes the library read, with the
    proxy's SSE reader: on the legal variations the record holds what the client was shown."""

    @pytest.mark.parametrize("durability", ["strict", "async"])
    @pytest.mark.parametrize(
        ("name", "body", "headers"),
        [
            ("sdk-cr", sse_body(b"\r"), SSE),
            ("sdk-crlf", sse_body(b"\r\n"), SSE),
            ("sdk-multi-line-data", multi_line_first_event(), SSE),
            ("sdk-comments", b": keep-alive\n\n" + sse_body().replace(b"\n\n", b"\n: c\n\n"), SSE),
            (
                "sdk-leading-space-field",
                b" data: " + orjson.dumps(chunk("INJECTED")) + b"\n\n" + sse_body(),
                SSE,
            ),
            ("sdk-gzip", gzip.compress(sse_body()), {**SSE, "Content-Encoding": "gzip"}),
        ],
    )
    def test_sse_variants(
        self,
        upstream: str,
        tmp_path: Path,
        name: str,
        body: bytes,
        headers: dict[str, str],
        durability: str,
    ) -> None:
        SCRIPTS[name] = Script([body[i : i + 7] for i in range(0, len(body), 7)], headers=headers)
        recorder = Recorder.open(
            tmp_path / "l", key=Signer.generate("w"), log_id="w", durability=durability
        )
        client = openai.OpenAI(
            base_url=upstream + "/v1", api_key="k", default_headers={"X-Script": name}
        )
        with recorder:
            stream = audit(client, ledger=recorder).chat.completions.create(
                model="m", messages=CHAT["messages"], stream=True
            )
            shown = "".join(c.choices[0].delta.content or "" for c in stream)
        (record,) = read_records(tmp_path / "l")
        assert shown == "Hello"
        assert (shown, "stop") == (record["output_text"], record["stop_reason"])
        assert "m@fp1" == record["model_version"]

    @pytest.mark.parametrize("durability", ["strict", "async"])
    async def test_dropped_stream_records_what_the_caller_took(
        self, upstream: str, tmp_path: Path, durability: str
    ) -> None:
        """The whole stream arrives in one read; a caller that takes one chunk and closes the
        stream has a record of that chunk (``client_disconnect``), not of what it never saw."""
        SCRIPTS["sdk-one-read"] = Script([sse_body()], headers=SSE)
        recorder = Recorder.open(
            tmp_path / "l", key=Signer.generate("w"), log_id="w", durability=durability
        )
        headers = {"X-Script": "sdk-one-read"}
        sync = audit(
            openai.OpenAI(base_url=upstream + "/v1", api_key="k", default_headers=headers),
            ledger=recorder,
        )
        aio = audit(
            openai.AsyncOpenAI(base_url=upstream + "/v1", api_key="k", default_headers=headers),
            ledger=recorder,
        )
        with recorder:
            stream = sync.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
            first = next(stream).choices[0].delta.content
            stream.close()
            astream = await aio.chat.completions.create(
                model="m", messages=CHAT["messages"], stream=True
            )
            afirst = (await astream.__anext__()).choices[0].delta.content
            await astream.close()
        records = read_records(tmp_path / "l")
        assert (first, afirst) == ("Hel", "Hel")
        assert [("Hel", "client_disconnect")] * 2 == [
            (r["output_text"], r["stop_reason"]) for r in records
        ]


class TestTokenDataHidden:
    """``--request-token-data``: what the proxy asked for is taken out of what it relays."""

    def test_event_over_several_data_lines(self, upstream: str, logprobs_proxy: ProxyProc) -> None:
        """An event whose JSON spans several ``data:`` lines is edited as the client reads it
        (the lines joined), so the client gets the bytes it gets directly."""

        def stream(logprobs: bool) -> list[bytes]:
            events = [lp_chunk("Hel", None, logprobs), lp_chunk("lo", None, logprobs)]
            events.append(lp_chunk(None, "stop", logprobs))
            return [b"".join(events) + b"data: [DONE]\n\n"]

        SCRIPTS["lp-multi"] = Script(stream(False), headers=SSE, with_logprobs=stream(True))
        direct = exchange(upstream, None, "lp-multi", "/v1/chat/completions", CHAT)
        got = exchange(logprobs_proxy.url, logprobs_proxy, "lp-multi", "/v1/chat/completions", CHAT)
        assert b'"logprobs":{' in stream(True)[0] and b'"logprobs":{' not in direct[1]
        assert direct[:2] == got[:2]
        assert got[2] is not None
        assert (["Hel", "lo"], "upstream-pieces") == (
            got[2]["output_tokens"],
            got[2]["output_token_source"],
        )

    @pytest.mark.parametrize("streamed", [False, True])
    def test_compressed_all_the_same(
        self, upstream: str, logprobs_proxy: ProxyProc, streamed: bool
    ) -> None:
        """The proxy asks for ``identity`` when it will edit the bytes; an upstream that
        compresses all the same has its answer relayed decoded, with the token data taken out."""
        name = f"lp-gzip-{streamed}"
        body = dict(CHAT, stream=streamed)
        plain, asked, headers = hi_answer(streamed)
        headers = {**headers, "Content-Encoding": "gzip"}
        SCRIPTS[name] = Script(
            [gzip.compress(b"".join(plain))],
            headers=headers,
            with_logprobs=[gzip.compress(b"".join(asked))],
        )
        direct = exchange(upstream, None, name, "/v1/chat/completions", body)
        got = exchange(logprobs_proxy.url, logprobs_proxy, name, "/v1/chat/completions", body)
        assert direct[:2] == got[:2]
        assert got[2] is not None
        assert (["Hi"], "upstream-pieces") == (
            got[2]["output_tokens"],
            got[2]["output_token_source"],
        )


#: OpenAI's answer to a member it does not know, and its reasoning models' to logprobs.
UNKNOWN_MEMBER = (
    400,
    b'{\n  "error": {\n    "message": "Unrecognized request argument supplied: return_token_ids",'
    b'\n    "type": "invalid_request_error",\n    "param": null,\n    "code": null\n  }\n}\n',
)
NO_LOGPROBS = (
    400,
    b'{\n  "error": {\n    "message": "Unsupported parameter: \'logprobs\' is not supported with'
    b' this model.",\n    "type": "invalid_request_error",\n    "param": "logprobs",\n'
    b'    "code": "unsupported_parameter"\n  }\n}',
)


class TestTokenDataRefused:
    """An upstream that refuses what ``--request-token-data`` adds (OpenAI knows no
    ``return_token_ids``; its reasoning models refuse ``logprobs``): the request goes again
    without it, so the client gets the answer it gets directly, and that model is not asked
    for it again."""

    @pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
    @pytest.mark.parametrize(
        ("mode", "member", "refusal"),
        [("all", "return_token_ids", UNKNOWN_MEMBER), ("logprobs", "logprobs", NO_LOGPROBS)],
        ids=["ids", "logprobs"],
    )
    def test_asked_again_without_it(
        self,
        upstream: str,
        tmp_path: Path,
        mode: str,
        member: str,
        refusal: tuple[int, bytes],
        streamed: bool,
    ) -> None:
        name = f"refuses-{member}-{streamed}"
        body = dict(CHAT, stream=streamed)
        plain, asked, headers = hi_answer(streamed)
        script = Script(plain, headers=headers, with_logprobs=asked, refuses={member: refusal})
        SCRIPTS[name] = script
        direct = exchange(upstream, None, name, "/v1/chat/completions", body)
        assert direct[0] == 200
        proxy = start_proxy(tmp_path, upstream, "--request-token-data", mode)
        try:
            script.seen.clear()
            first = exchange(proxy.url, proxy, name, "/v1/chat/completions", body)
            second = exchange(proxy.url, proxy, name, "/v1/chat/completions", body)
        finally:
            proxy.stop()
        assert direct[:2] == first[:2] == second[:2]
        # Refused once; asked again without it; the next exchange never asks for it.
        assert [member in seen for seen in script.seen] == [True, False, False]
        records = [first[2], second[2]]
        assert all(r is not None and r["stop_reason"] == "stop" for r in records)
        assert first[2] is not None and second[2] is not None
        refused = ["return_token_ids"] if mode == "all" else ["logprobs", "top_logprobs"]
        assert refused == first[2]["token_data_refused"]
        assert "token_data_refused" not in second[2]
        # What was not refused is still asked for: logprobs, when the ids were refused.
        still = mode == "all"
        assert [bool(s.get("logprobs")) for s in script.seen[1:]] == [still, still]
        expected = (["Hi"], "upstream-pieces") if still else (None, "none")
        assert expected == (second[2]["output_tokens"], second[2]["output_token_source"])


class TestRedirects:
    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    @pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
    def test_relayed_not_followed(
        self, upstream: str, proxy: ProxyProc, status: int, path: str
    ) -> None:
        """A redirect reaches the client as it is (following it would pair this request with
        another one's answer, and a 301/302 would turn the POST into a GET)."""
        name = f"redirect-{status}"
        SCRIPTS[name] = Script([b""], status=status, headers={"Location": "/elsewhere"})
        body = {"model": "m", "prompt": "p", "stream": False}
        direct = exchange(upstream, None, name, path, body)
        got, content, record = exchange(proxy.url, proxy, name, path, body)
        assert (status, b"") == direct[:2] == (got, content)
        assert record is not None
        assert (record["stop_reason"], record["error_message"]) == (
            "upstream_error",
            f"HTTP {status}: the upstream redirects to /elsewhere",
        )


class TestUpstreamCutsWhereNothingCanBeAdded:
    """An upstream that dies mid-stream, in a stream the proxy cannot add its error event to:
    one framed by Content-Length (the client would wait for bytes that never come) or a
    compressed one (plain text inside gzip is not gzip). The client sees the cut it sees
    directly, and the record says what happened."""

    LINES = (
        orjson.dumps({"model": "m", "response": "Hel", "done": False}) + b"\n",
        orjson.dumps({"model": "m", "response": "lo", "done": True, "done_reason": "stop"}) + b"\n",
    )

    @staticmethod
    def read(base: str, name: str) -> tuple[bytes, type[Exception] | None]:
        """The decoded bytes a client gets before the answer ends, and what ended it."""
        got = b""
        body = {"model": "m", "prompt": "hi"}
        try:
            with httpx.stream(
                "POST", base + "/api/generate", json=body, headers={"X-Script": name}, timeout=10
            ) as r:
                for piece in r.iter_bytes():
                    got += piece
        except httpx.HTTPError as exc:
            return got, type(exc)
        return got, None

    def check(
        self, upstream: str, proxy: ProxyProc, name: str, ended: type[Exception] | None = None
    ) -> dict[str, Any]:
        direct = self.read(upstream, name)
        before = len(proxy.records())
        through = self.read(proxy.url, name)
        assert direct == through
        assert direct[1] is (ended or httpx.RemoteProtocolError)  # not a timeout or garbage
        records = proxy.records()
        assert before + 1 == len(records)
        shown = "".join(orjson.loads(line)["response"] for line in direct[0].splitlines(True)
                        if line.endswith(b"\n"))  # fmt: skip
        assert shown.startswith("Hel") or ended is not None
        assert (shown, "upstream_error") == (records[-1]["output_text"], records[-1]["stop_reason"])
        return records[-1]

    def test_length_framed(self, upstream: str, proxy: ProxyProc) -> None:
        size = len(b"".join(self.LINES))
        SCRIPTS["cl-cut"] = Script(
            [self.LINES[0]],
            headers={"Content-Type": "application/x-ndjson", "Content-Length": str(size)},
            cut=True,
        )
        self.check(upstream, proxy, "cl-cut")

    def test_compressed(self, upstream: str, proxy: ProxyProc) -> None:
        words = b"".join(
            orjson.dumps({"model": "m", "response": f" w{i * 7919 % 1000}", "done": False}) + b"\n"
            for i in range(300)
        )
        packed = gzip.compress(self.LINES[0] + words + self.LINES[1], mtime=0)
        SCRIPTS["gzip-cut"] = Script(
            [packed[: len(packed) // 2]],
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
            cut=True,
        )
        self.check(upstream, proxy, "gzip-cut")

    @pytest.mark.parametrize("encoding", ["gzip", "br"])
    def test_bytes_the_proxy_cannot_decode_are_not_relayed(
        self, upstream: str, proxy: ProxyProc, encoding: str
    ) -> None:
        """Bytes that do not inflate (plain text labelled gzip), or in an encoding the proxy
        does not read: none of them reaches the client (some client may read what the proxy
        cannot, and it would have content the ledger does not), the stream is cut, and the
        record says why. A body gets a 502 in the dialect instead."""
        name = f"undecodable-{encoding}"
        headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": encoding}
        SCRIPTS[name] = Script([self.LINES[0], self.LINES[1]], headers=headers)
        before = len(proxy.records())
        with httpx.stream(
            "POST", proxy.url + "/api/generate", json={"model": "m", "prompt": "hi"},
            headers={"X-Script": name}, timeout=10,
        ) as r:  # fmt: skip
            got = b""
            with pytest.raises(httpx.RemoteProtocolError):
                for piece in r.iter_raw():
                    got += piece
        assert got == b""
        records = proxy.records()
        assert before + 1 == len(records)
        assert records[-1]["stop_reason"] == "upstream_error"
        assert "Content-Encoding does not match" in records[-1]["error_message"]

        SCRIPTS[name + "-body"] = Script(
            [b'{"model":"m","response":"Hello","done":true}'],
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        status, got, record = exchange(
            proxy.url, proxy, name + "-body", "/api/generate", {"model": "m", "stream": False}
        )
        assert status == 502 and orjson.loads(got)["error"].startswith("tokentrail: upstream")
        assert record is not None and record["stop_reason"] == "upstream_error"
        assert record["output_text"] == ""

    @pytest.mark.parametrize("stream", [True, False])
    def test_raw_deflate_is_read(self, upstream: str, proxy: ProxyProc, stream: bool) -> None:
        """``deflate`` without its zlib header, as some servers send it and clients (httpx,
        aiohttp, browsers) read it: read by the proxy too, relayed and recorded."""
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        lines = self.LINES if stream else (orjson.dumps({"model": "m", "response": "Hello",
                                                         "done": True}),)  # fmt: skip
        data = packer.compress(b"".join(lines)) + packer.flush()
        name = f"raw-deflate-{stream}"
        SCRIPTS[name] = Script(
            [data[:10], data[10:]],
            headers={
                "Content-Type": "application/x-ndjson" if stream else "application/json",
                "Content-Encoding": "deflate",
            },
        )
        body = {"model": "m", "prompt": "hi", "stream": stream}
        direct = exchange(upstream, None, name, "/api/generate", body)
        status, got, record = exchange(proxy.url, proxy, name, "/api/generate", body)
        assert (direct[0], direct[1]) == (status, got) == (200, b"".join(lines))
        assert record is not None
        assert (record["output_text"], record.get("error_message")) == ("Hello", None)

    @pytest.mark.parametrize("ctype", ["text/event-stream", "application/x-ndjson"])
    def test_unfinished_stream_with_a_length(
        self, upstream: str, proxy: ProxyProc, ctype: str
    ) -> None:
        """An error body sent under a stream's type with its length: every byte is relayed (the
        client waited for the rest before), and nothing is added past the length."""
        body = b'{"error":{"nested":[1,2]}}'
        name = f"typed-error-{ctype}"
        SCRIPTS[name] = Script(
            [body], status=500, headers={"Content-Type": ctype, "Content-Length": str(len(body))}
        )
        path, req = (
            ("/v1/chat/completions", CHAT) if "event" in ctype
            else ("/api/generate", {"model": "m", "prompt": "hi"})
        )  # fmt: skip
        direct = exchange(upstream, None, name, path, req)
        status, got, record = exchange(proxy.url, proxy, name, path, req)
        assert (direct[0], direct[1]) == (status, got) == (500, body)
        assert record is not None and record["stop_reason"] == "upstream_error"
