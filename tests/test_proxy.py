"""The real proxy, as a subprocess, in front of the simulator, driven by the official clients.

Each test asserts that (a) the client receives what it receives from the simulator directly
(raw bytes compared with httpx, apart from connection headers and the values the simulator
makes up per response: ids, timestamps, durations, OpenAI's ``obfuscation`` padding), and
(b) exactly one record per exchange that reached the upstream lands in the ledger, with the
right tokens and sources, chained by ``prev_hash``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import ollama
import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from conftest import Seen
from tokentrail import ConfigError
from tokentrail._proxy import build_config, serve_command
from tokentrail._proxy._config import key_digest
from tokentrail._proxy._server import client_response_headers, upstream_request_headers
from tokentrail._sim import SimConfig, sim_in_thread
from tokentrail._sim._tokenizer import SimTokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "llama3.2:1b"
OLLAMA_MODES = ("ollama-0.4", "ollama")
OPENAI_MODES = ("openai", "llamacpp", "vllm")
CONNECTION_HEADERS = {
    "date",
    "server",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "content-length",
}
_VOLATILE = [
    (re.compile(rb'"(created_at|expires_at|id)":"[^"]*"'), rb'"\1":"*"'),
    (re.compile(rb'"(created|[a-z_]*duration)":\d+'), rb'"\1":0'),
    (re.compile(rb'"obfuscation":"[^"]*"'), rb'"obfuscation":"*"'),
    (re.compile(rb'"timings":\{[^}]*\}'), rb'"timings":{}'),
]


def normalize(data: bytes) -> bytes:
    """The bytes with the simulator's per-response values (ids, clocks) blanked."""
    for pattern, repl in _VOLATILE:
        data = pattern.sub(repl, data)
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ProxyProc:
    """A proxy subprocess and its ledger."""

    url: str
    ledger: Path
    log_id: str
    proc: subprocess.Popen[bytes]
    stderr: list[str] = field(default_factory=list)
    verifier: str = ""

    def records(self) -> list[dict[str, Any]]:
        """Every record in the log, in order, after checking seq and the prev_hash chain."""
        files = sorted((self.ledger / "logs" / self.log_id / "segments").glob("*/*.jsonl"))
        lines = [ln for f in files for ln in f.read_bytes().split(b"\n") if ln]
        out: list[dict[str, Any]] = []
        prev = "0" * 64
        for seq, line in enumerate(lines):
            rec = json.loads(line)
            assert (seq, prev) == (rec["seq"], rec["prev_hash"])
            assert (
                rec["input_hash"]
                == hashlib.sha256(json.dumps(rec["input_tokens"]).encode()).hexdigest()
            )
            assert (
                rec["output_hash"]
                == hashlib.sha256(json.dumps(rec["output_tokens"]).encode()).hexdigest()
            )
            prev = hashlib.sha256(b"\x00" + line).hexdigest()
            out.append(rec)
        return out

    def new_records(self, before: int) -> list[dict[str, Any]]:
        """Records appended after the first ``before``."""
        return self.records()[before:]

    def verify(self, state: Path) -> subprocess.CompletedProcess[str]:
        """``tokentrail verify`` over this proxy's ledger with its verifier key."""
        return subprocess.run(
            [sys.executable, "-m", "tokentrail", "verify", "--ledger", str(self.ledger),
             "--public-key", self.verifier, "--state", str(state), "--require-sealed"],
            env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }


def start_proxy(tmp: Path, upstream: str, *args: str, log_id: str = "test") -> ProxyProc:
    """Start ``tokentrail serve`` in a subprocess on a free port; wait until it listens."""
    ledger = tmp / "ledger"
    cmd = [
        sys.executable,
        "-m", "tokentrail", "serve",
        "--upstream", upstream,
        "--listen", "127.0.0.1:0",
        "--ledger", str(ledger),
        "--key", str(tmp / "signing.key"),
        "--log-id", log_id,
        *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    assert proc.stderr is not None
    lines: list[str] = []
    url = None
    for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].strip()
            break
    if url is None:
        proc.wait()
        raise AssertionError("proxy did not start:\n" + "\n".join(lines))
    verifier = next(ln.split("verifier key ", 1)[1] for ln in lines if "verifier key " in ln)
    stream = proc.stderr

    def drain() -> None:
        for raw in stream:
            lines.append(raw.decode(errors="replace").rstrip())

    threading.Thread(target=drain, daemon=True).start()
    return ProxyProc(url, ledger, log_id, proc, lines, verifier)


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, str]]:
    """One simulator per mode, in background threads (deterministic, no delays)."""
    with ExitStack() as stack:
        yield {
            m: stack.enter_context(sim_in_thread(SimConfig(mode=m)))
            for m in (*OLLAMA_MODES, *OPENAI_MODES)
        }


@pytest.fixture(scope="module")
def proxies(
    sims: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ProxyProc]]:
    """One proxy (strict durability) per simulator mode."""
    procs = {m: start_proxy(tmp_path_factory.mktemp(m), url) for m, url in sims.items()}
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop()
    for m, p in procs.items():  # every ledger the module wrote verifies after a clean stop
        result = p.verify(tmp_path_factory.mktemp(f"state-{m}"))
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Any]:
    """Start extra proxies with their own options; stopped after the test."""
    started: list[ProxyProc] = []

    def make(upstream: str, *args: str) -> ProxyProc:
        p = start_proxy(tmp_path / f"p{len(started)}", upstream, *args)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def same_response(direct: httpx.Response, proxied: httpx.Response) -> None:
    """Status, headers (apart from connection headers) and normalised bytes agree."""
    assert direct.status_code == proxied.status_code
    d = {k: v for k, v in direct.headers.items() if k.lower() not in CONNECTION_HEADERS}
    p = {k: v for k, v in proxied.headers.items() if k.lower() not in CONNECTION_HEADERS}
    assert d == p
    assert normalize(direct.content) == normalize(proxied.content)


def post_both(
    upstream: str, proxy: ProxyProc, path: str, raw: bytes
) -> tuple[httpx.Response, httpx.Response]:
    """The same JSON body, byte for byte, sent to ``upstream`` directly and through ``proxy``."""
    headers = {"Content-Type": "application/json"}
    with httpx.Client(timeout=30) as client:
        direct = client.post(upstream + path, content=raw, headers=headers)
        proxied = client.post(proxy.url + path, content=raw, headers=headers)
    return direct, proxied


OLLAMA_CASES = [
    ("/api/generate", {"model": MODEL, "prompt": "Why is the sky blue?"}),
    ("/api/generate", {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}]}),
    (
        "/api/chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "stream": False},
    ),
]
OPENAI_CASES = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True},
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time"}),
    ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "stream": True}),
]
ALL_CASES = [(m, path, body) for m in OLLAMA_MODES for path, body in OLLAMA_CASES] + [
    (m, path, body) for m in OPENAI_MODES for path, body in OPENAI_CASES
]


def client_error(url: str, body: bytes) -> Any:
    """The JSON error a bad request body gets."""
    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400
    return r.json()


class TestTransparency:
    """The client's bytes are unchanged and each exchange leaves one record."""

    @pytest.mark.parametrize(("mode", "path", "body"), ALL_CASES)
    def test_raw_bytes(
        self,
        sims: dict[str, str],
        proxies: dict[str, ProxyProc],
        mode: str,
        path: str,
        body: dict[str, Any],
    ) -> None:
        """Raw response bytes through the proxy equal those from the simulator directly."""
        proxy = proxies[mode]
        before = len(proxy.records())
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims[mode] + path, json=body)
            proxied = client.post(proxy.url + path, json=body)
        same_response(direct, proxied)
        (rec,) = proxy.new_records(before)
        assert body == rec["request_body"]
        assert (rec["model"], rec["http.response.status_code"]) == (MODEL, 200)
        assert rec["stop_reason"] in ("stop", "length")
        assert rec["output_text"]
        if path == "/api/generate":  # both Ollama versions still return context
            assert (
                rec["input_token_source"],
                rec["output_token_source"],
            ) == ("upstream-context", "upstream-context")
            last = json.loads(proxied.content.strip().split(b"\n")[-1])
            assert last["context"] == rec["input_tokens"] + rec["output_tokens"]
            assert rec["ollama.context_split"]["counts_agree"]
        else:
            assert (rec["output_token_source"], rec["output_tokens"]) == ("none", None)

    @pytest.mark.parametrize("stream", [False, True])
    def test_llamacpp_chat_without_v1(
        self, sims: dict[str, str], proxies: dict[str, ProxyProc], stream: bool
    ) -> None:
        """llama.cpp's /chat/completions (no /v1), which an OpenAI client with the server's
        root as base URL calls, is audited as /v1/chat/completions is."""
        proxy = proxies["llamacpp"]
        before = len(proxy.records())
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims["llamacpp"] + "/chat/completions", json=body)
            proxied = client.post(proxy.url + "/chat/completions", json=body)
        same_response(direct, proxied)
        oai = openai.OpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        got = oai.chat.completions.create(model=MODEL, messages=body["messages"])
        recs = proxy.new_records(before)
        assert [r["api"] for r in recs] == ["openai.chat", "openai.chat"]
        assert recs[1]["output_text"] == got.choices[0].message.content
        missing = client_error(proxy.url + "/chat/completions", b"{")
        assert missing["error"]["type"] == "invalid_request_error"  # the OpenAI dialect

    @pytest.mark.parametrize("token_data", [False, True], ids=["plain", "request-token-data"])
    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_llamacpp_api_chat_answers_in_openai_format(
        self, sims: dict[str, str], proxy_factory: Any, stream: bool, token_data: bool
    ) -> None:
        """llama.cpp's server answers Ollama's /api/chat in OpenAI's format: the exchange is
        recorded as the OpenAI chat it is (its text, finish reason and token data), and token
        data asked for on the client's behalf is hidden in that format."""
        extra = ("--request-token-data", "logprobs") if token_data else ()
        proxy = proxy_factory(sims["llamacpp"], *extra)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims["llamacpp"] + "/api/chat", json=body)
            proxied = client.post(proxy.url + "/api/chat", json=body)
        assert b"chat.completion" in direct.content  # OpenAI's format, on Ollama's path
        same_response(direct, proxied)
        if stream:
            events = [e.removeprefix(b"data: ") for e in direct.content.split(b"\n\n") if e]
            chunks = [json.loads(e) for e in events if e != b"[DONE]"]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text = direct.json()["choices"][0]["message"]["content"]
            finish = direct.json()["choices"][0]["finish_reason"]
        (rec,) = proxy.records()
        assert ("openai.chat", text, finish, stream) == (
            rec["api"],
            rec["output_text"],
            rec["stop_reason"],
            rec["stream"],
        )
        assert text
        if token_data:
            assert rec["output_token_source"] in ("upstream-ids", "none")
            assert rec["output_tokens"] or rec["tokentrail.output_tokens_missing"] > 0

    def test_passthrough_paths(self, sims: dict[str, str], proxies: dict[str, ProxyProc]) -> None:
        """Unaudited paths (and an unknown one) pass through untouched, with no record."""
        cases = [
            ("ollama", "GET", "/api/tags"),
            ("ollama", "GET", "/api/version"),
            ("ollama", "POST", "/api/show"),
            ("ollama", "GET", "/api/nope"),
            ("openai", "GET", "/v1/models"),
            ("openai", "GET", "/no/such/path"),
        ]
        for mode, method, path in cases:
            proxy = proxies[mode]
            before = len(proxy.records())
            with httpx.Client(timeout=30) as client:
                body = {"model": MODEL} if method == "POST" else None
                direct = client.request(method, sims[mode] + path, json=body)
                proxied = client.request(method, proxy.url + path, json=body)
            same_response(direct, proxied)
            assert proxy.new_records(before) == []

    def test_refuse_unaudited(
        self, recording_upstream: tuple[str, Seen], proxy_factory: Any
    ) -> None:
        """--refuse-unaudited answers 403, in the client's dialect, to what would pass
        unrecorded, and still relays reads that reach no model and the audited paths."""
        upstream, seen = recording_upstream
        proxy = proxy_factory(upstream, "--refuse-unaudited")
        relayed = [
            ("GET", "/api/ps", {}),
            ("GET", "/v1/models", {}),
            ("POST", "/api/show", {}),
            ("POST", "/api/generate", {}),
        ]
        refused = [
            ("POST", "/v1/responses", {}),
            ("POST", "/v1/embeddings", {}),
            ("POST", "/api/embed", {}),
            ("POST", "/api/pull", {}),
            ("DELETE", "/api/delete", {}),
            ("POST", "/completion", {}),
            ("GET", "/v1/realtime", {"Upgrade": "websocket", "Connection": "Upgrade"}),
        ]
        with httpx.Client(timeout=30) as client:
            for method, path, headers in relayed + refused:
                body = None if method in ("GET", "HEAD") else {"model": MODEL, "prompt": "x"}
                answer = client.request(method, proxy.url + path, json=body, headers=headers)
                if (method, path, headers) in relayed:
                    assert 200 == answer.status_code, (method, path)
                    continue
                assert 403 == answer.status_code, (method, path)
                message = (
                    f"tokentrail: {method} {path} is not audited by this proxy, and it refuses"
                    " what it does not audit (--refuse-unaudited)"
                )
                if path.startswith("/v1/"):
                    assert message == answer.json()["error"]["message"]
                else:
                    assert {"error": message} == answer.json()
        own = "GET /api/tags HTTP/1.1"  # the proxy asking for the model's digest
        assert [f"{m} {p} HTTP/1.1" for m, p, _ in relayed] == [x for x in seen.lines if x != own]
        assert ["ollama.generate"] == [r["api"] for r in proxy.records()]
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="not audited by this proxy"):
            client.responses.create(model=MODEL, input="hello")


class TestUnauditedNamed:
    def test_unaudited_traffic_is_named_once(
        self, recording_upstream: tuple[str, Seen], proxy_factory: Any
    ) -> None:
        """Without --refuse-unaudited, what passes unrecorded and is not a read is named in the
        log once per method and path (an operator learns of /v1/responses traffic from the
        log, not from an audit); reads and audited paths are not."""
        upstream, _ = recording_upstream
        proxy = proxy_factory(upstream)
        calls = [("POST", "/v1/responses")] * 3 + [
            ("POST", "/api/embed"),
            ("GET", "/api/tags"),
            ("POST", "/api/show"),
            ("POST", "/api/generate"),
        ]
        with httpx.Client(timeout=30) as client:
            for method, path in calls:
                body = None if method == "GET" else {"model": MODEL, "prompt": "x"}
                assert 200 == client.request(method, proxy.url + path, json=body).status_code

        def named() -> list[str]:
            return [
                what
                for line in list(proxy.stderr)
                for what in ("POST /v1/responses", "POST /api/embed", "/api/tags", "/api/show",
                             "POST /api/generate")
                if f"{what} passes through unaudited" in line
            ]  # fmt: skip

        deadline = time.monotonic() + 10
        while len(named()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ["POST /v1/responses", "POST /api/embed"] == named()
        # A client's path is written escaped (a carriage return or a terminal escape in it
        # cannot overwrite or forge what the operator reads; aiohttp routes no newline).
        httpx.post(proxy.url + "/v1/x%0Dforged%1B[2Kline", json={}, timeout=30)
        while not any("/v1/x\\rforged\\x1b[2Kline passes" in ln for ln in proxy.stderr):
            assert time.monotonic() < deadline + 10, "\n".join(map(ascii, proxy.stderr))
            time.sleep(0.05)
        assert not any("\r" in ln or "\x1b" in ln for ln in proxy.stderr)


def raw_request(url: str, request: bytes) -> bytes:
    """Send one HTTP/1.1 request as these exact bytes; the response's bytes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


class TestUpstreamRequest:
    """What reaches the upstream is what the client sent, not the HTTP library's defaults."""

    def test_no_headers_the_client_did_not_send(
        self, recording_upstream: tuple[str, Seen], proxy_factory: Any
    ) -> None:
        """A bare client (curl without --compressed, a raw socket) gets no gzip it never asked
        for: the proxy adds no Accept-Encoding, Accept, Content-Type or User-Agent."""
        upstream, seen = recording_upstream
        proxy = proxy_factory(upstream)
        body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
        for request in (
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
            b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ):
            assert raw_request(proxy.url, request).startswith(b"HTTP/1.1 200")
        assert len(seen.headers) >= 2  # and the proxy's own /api/tags (model digests)
        for headers in seen.headers:
            added = {"accept-encoding", "accept", "content-type", "user-agent"} & set(headers)
            assert not added, headers
        assert len(proxy.records()) == 1

    def test_query_string_as_sent(
        self, recording_upstream: tuple[str, Seen], proxy_factory: Any
    ) -> None:
        """An audited path's query string reaches the upstream byte for byte, as a passed-
        through one's does."""
        upstream, seen = recording_upstream
        proxy = proxy_factory(upstream)
        query = "?sp=x%20y&r=%2F%3F%7E&plus=a+b"
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        with httpx.Client(timeout=30) as client:
            assert client.post(proxy.url + "/api/generate" + query, json=body).status_code == 200
            assert client.get(proxy.url + "/api/tags" + query).status_code == 200
        assert [line for line in seen.lines if "?" in line] == [
            f"POST /api/generate{query} HTTP/1.1",
            f"GET /api/tags{query} HTTP/1.1",
        ]


class TestHeaderFiltering:
    """Which headers go on, each way: none of the hop-by-hop ones, nor those ``Connection``
    names, in any spelling; the rest as sent, in order."""

    @staticmethod
    def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(pairs))

    def test_request(self) -> None:
        sent = self._headers(
            ("Host", "proxy:11435"), ("Content-Length", "12"), ("X-Keep", "1"),
            ("Keep-Alive", "timeout=5"), ("X-Tokentrail-User", "u"), ("te", "trailers"),
            ("X-Keep", "2"), ("Accept-Encoding", "br, gzip;q=0.5, zstd"),
        )  # fmt: skip
        out = upstream_request_headers(sent, audited=True)
        assert list(out.items()) == [
            ("X-Keep", "1"), ("X-Keep", "2"), ("Accept-Encoding", "gzip;q=0.5"),
        ]  # fmt: skip
        named = self._headers(("Connection", "close, X-Secret"), ("x-secret", "s"), ("A", "b"))
        assert list(upstream_request_headers(named, audited=False).items()) == [("A", "b")]

    @pytest.mark.parametrize("keep_length", [True, False])
    def test_response(self, keep_length: bool) -> None:
        sent = self._headers(
            ("Content-Type", "application/json"), ("Content-Length", "9"),
            ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "h"), ("Date", "d"),
        )  # fmt: skip
        out = client_response_headers(sent, keep_length=keep_length)
        expected = [("Content-Type", "application/json"), ("Date", "d")]
        if keep_length:
            expected.insert(1, ("Content-Length", "9"))
        assert list(out.items()) == expected
        bare = self._headers(("Content-Length", "9"), ("Proxy-Authenticate", "x"), ("B", "c"))
        assert list(client_response_headers(bare, keep_length=keep_length).items()) == (
            [("Content-Length", "9"), ("B", "c")] if keep_length else [("B", "c")]
        )


class TestTargets:
    """Request targets that are not a path."""

    @pytest.mark.parametrize(
        "line", [b"OPTIONS * HTTP/1.1", b"CONNECT api.openai.com:443 HTTP/1.1"], ids=repr
    )
    def test_a_target_that_is_no_path(self, proxies: dict[str, ProxyProc], line: bytes) -> None:
        """``OPTIONS *`` (asterisk form) and ``CONNECT host:port`` (a client told to use the proxy
        as a forward proxy) name no resource here: 404 at once, as aiohttp's router answered
        before the proxy had its own dispatch (then ``*`` got a 500, the upstream URL built from
        it being no URL, and ``CONNECT`` went to the upstream)."""
        proxy = proxies["ollama"]
        before = len(proxy.records())
        out = raw_request(proxy.url, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 404"), out[:200]
        assert out.endswith(b"404: Not Found")
        assert len(proxy.records()) == before


class TestExpect:
    """``Expect: 100-continue`` (curl sends it for large bodies) is answered once the body is
    to be read, and a request refused before that gets its final answer instead."""

    def test_continue_then_the_exchange(self, proxies: dict[str, ProxyProc]) -> None:
        """The proxy says ``100 Continue`` before the body is sent, then relays the exchange
        and records it, on an audited path and a passed-through one."""
        proxy = proxies["ollama"]
        before = len(proxy.records())
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        for path, payload in (
            ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
            ("/api/show", {"model": MODEL}),
        ):
            body = json.dumps(payload).encode()
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                )
                interim = b""
                while not interim.endswith(b"\r\n\r\n"):
                    chunk = s.recv(1)  # the body is not sent until this comes (or 10 s pass)
                    assert chunk, interim
                    interim += chunk
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                s.sendall(body)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            assert out.startswith(b"HTTP/1.1 200"), out[:200]
        assert len(proxy.records()) == before + 1

    @pytest.mark.parametrize(
        ("args", "status"),
        [
            (("--max-body-bytes", "100"), b"413"),  # too long by its Content-Length
            (("--require-identity",), b"401"),  # no key: nobody to record it for
            (("--refuse-unaudited",), b"403"),  # a path this proxy does not audit
        ],
    )
    def test_refused_without_continue(
        self,
        sims: dict[str, str],
        proxy_factory: Any,
        args: tuple[str, ...],
        status: bytes,
    ) -> None:
        """A request the proxy refuses before reading its body gets the final answer instead of
        ``100 Continue`` (RFC 9110, 10.1.1), so the client never sends a body nobody reads."""
        proxy = proxy_factory(sims["ollama"], *args)
        path = "/api/delete" if "--refuse-unaudited" in args else "/api/generate"
        body = json.dumps({"model": MODEL, "prompt": "x" * 200, "stream": False}).encode()
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            out = b""
            while not out.endswith(b"\r\n\r\n"):  # the body is not sent meanwhile
                chunk = s.recv(1)
                assert chunk, out
                out += chunk
        assert out.startswith(b"HTTP/1.1 " + status), out[:200]
        assert proxy.records() == []

    def test_unknown_expectation_refused(self, proxies: dict[str, ProxyProc]) -> None:
        """Any other expectation gets 417 and no record."""
        proxy = proxies["ollama"]
        before = len(proxy.records())
        body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
        out = raw_request(
            proxy.url,
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Expect: the-unexpected\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body,
        )  # fmt: skip
        assert out.startswith(b"HTTP/1.1 417"), out[:200]
        assert len(proxy.records()) == before


class TestOfficialClients:
    """The ``ollama`` and ``openai`` packages see the same answers through the proxy."""

    @pytest.mark.parametrize("mode", OLLAMA_MODES)
    def test_ollama_client(
        self, sims: dict[str, str], proxies: dict[str, ProxyProc], mode: str
    ) -> None:
        """generate and chat, streamed and not; one record each, model digest as version."""
        proxy = proxies[mode]
        before = len(proxy.records())
        direct, through = ollama.Client(host=sims[mode]), ollama.Client(host=proxy.url)
        msgs = [{"role": "user", "content": "Tell me about audits"}]
        for client_out in (direct, through):
            client_out.generate(model=MODEL, prompt="Write a haiku")  # warm: same answers both ways
        results = []
        for c in (direct, through):
            results.append(
                (
                    c.generate(model=MODEL, prompt="Write a haiku").response,
                    "".join(
                        p.response or ""
                        for p in c.generate(model=MODEL, prompt="Stream it", stream=True)
                    ),
                    c.chat(model=MODEL, messages=msgs).message.content,
                    "".join(
                        p.message.content or ""
                        for p in c.chat(model=MODEL, messages=msgs, stream=True)
                    ),
                )
            )
        assert results[0] == results[1]
        recs = proxy.new_records(before)
        assert len(recs) == 5
        digest = next(m.digest for m in direct.list().models if m.model == MODEL)
        assert {digest} == {r["model_version"] for r in recs}
        assert list(results[1]) == [r["output_text"] for r in recs[1:]]
        assert recs[3]["input_text"] == "user: Tell me about audits"
        assert {r["user_id"] for r in recs} == {None}

    @pytest.mark.parametrize("mode", OPENAI_MODES)
    def test_openai_client(
        self, sims: dict[str, str], proxies: dict[str, ProxyProc], mode: str
    ) -> None:
        """chat and completions, streamed and not; one record each."""
        proxy = proxies[mode]
        before = len(proxy.records())
        msgs: Any = [{"role": "user", "content": "Tell me about audits"}]
        texts = []
        for base in (sims[mode], proxy.url):
            c = openai.OpenAI(base_url=base + "/v1", api_key="sk-test")
            chat = c.chat.completions.create(model=MODEL, messages=msgs)
            stream = c.chat.completions.create(
                model=MODEL, messages=msgs, stream=True, stream_options={"include_usage": True}
            )
            streamed = "".join((ch.choices[0].delta.content or "") for ch in stream if ch.choices)
            comp = c.completions.create(model=MODEL, prompt="Once")
            texts.append((chat.choices[0].message.content, streamed, comp.choices[0].text))
        assert texts[0] == texts[1]
        recs = proxy.new_records(before)
        assert len(recs) == 3
        assert [r["api"] for r in recs] == ["openai.chat", "openai.chat", "openai.completions"]
        assert list(texts[1]) == [r["output_text"] for r in recs]
        assert recs[1]["gen_ai.usage.output_tokens"] > 0
        assert all("sk-test" not in json.dumps(r) for r in recs)

    @pytest.mark.parametrize("mode", ["openai", "vllm"])
    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_n_choices(
        self, sims: dict[str, str], proxies: dict[str, ProxyProc], mode: str, stream: bool
    ) -> None:
        """n=3: the client gets the three choices it gets directly (streamed: interleaved);
        the record's text and tokens are the first choice's, and it keeps all three."""
        proxy = proxies[mode]
        before = len(proxy.records())
        kw: Any = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Three takes"}],
            "n": 3,
            "logprobs": True,
        }
        got = []
        for base in (sims[mode], proxy.url):
            c = openai.OpenAI(base_url=base + "/v1", api_key="sk-test")
            texts = ["", "", ""]
            if stream:
                for ch in c.chat.completions.create(**kw, stream=True):
                    for choice in ch.choices:
                        texts[choice.index] += choice.delta.content or ""
            else:
                for choice in c.chat.completions.create(**kw).choices:
                    texts[choice.index] = choice.message.content or ""
            got.append(texts)
        assert got[0] == got[1] and len(set(got[0])) == 3
        (rec,) = proxy.new_records(before)
        assert got[1][0] == rec["output_text"] == "".join(rec["output_tokens"])
        assert "upstream-pieces" == rec["output_token_source"]
        assert got[1] == [m["parts"][0]["content"] for m in rec["gen_ai.output.messages"]]
        assert ["stop"] * 3 == rec["gen_ai.response.finish_reasons"]

    @pytest.mark.parametrize("mode", OLLAMA_MODES)
    def test_openai_client_to_ollama(
        self, sims: dict[str, str], proxies: dict[str, ProxyProc], mode: str
    ) -> None:
        """The openai client against Ollama's own /v1 layer: the same answers, and the model
        version is Ollama's digest (the most specific one, SPEC), not ``model@fp_ollama``."""
        proxy = proxies[mode]
        before = len(proxy.records())
        msgs: Any = [{"role": "user", "content": "Tell me about audits"}]
        texts = []
        for base in (sims[mode], proxy.url):
            c = openai.OpenAI(base_url=base + "/v1", api_key="ollama")
            chat = c.chat.completions.create(model=MODEL, messages=msgs)
            stream = c.chat.completions.create(model=MODEL, messages=msgs, stream=True)
            streamed = "".join((ch.choices[0].delta.content or "") for ch in stream if ch.choices)
            texts.append((chat.choices[0].message.content, streamed))
        assert texts[0] == texts[1]
        recs = proxy.new_records(before)
        assert [r["api"] for r in recs] == ["openai.chat", "openai.chat"]
        assert list(texts[1]) == [r["output_text"] for r in recs]
        digest = next(m.digest for m in ollama.Client(host=sims[mode]).list().models
                      if m.model == MODEL)  # fmt: skip
        assert [digest, digest] == [r["model_version"] for r in recs]


class TestRequestTokenData:
    """``--request-token-data``: token data captured, and hidden from the client."""

    @pytest.mark.parametrize(("mode", "path", "body"), ALL_CASES)
    def test_hidden_and_captured(
        self, sims: dict[str, str], proxy_factory: Any, mode: str, path: str, body: dict[str, Any]
    ) -> None:
        """Bytes equal the direct answer without token data; the record has the best source."""
        opt = "all" if mode == "vllm" else "logprobs"
        proxy = proxy_factory(sims[mode], "--request-token-data", opt)
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims[mode] + path, json=body)
            proxied = client.post(proxy.url + path, json=body)
        same_response(direct, proxied)
        (rec,) = proxy.records()
        expected = {
            "ollama-0.4": "upstream-context" if path == "/api/generate" else "none",
            "ollama": "upstream-pieces",
            "openai": "upstream-pieces",
            "llamacpp": "upstream-ids",
            "vllm": "upstream-ids",
        }[mode]
        source = rec["output_token_source"]
        if mode == "llamacpp" and source == "none":  # ids with gaps are no sequence: see below
            assert rec["tokentrail.output_tokens_missing"] > 0
            assert rec["output_tokens"] is None
        else:
            assert expected == source
        if source != "none":
            assert rec["output_tokens"]
        if source == "upstream-ids":  # every token there, none left out
            assert rec["output_text"] == SimTokenizer().decode(rec["output_tokens"])
        if mode == "vllm":
            assert (rec["input_token_source"], bool(rec["input_tokens"])) == ("upstream-ids", True)

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    @pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
    def test_vllm_prompt_ids_with_two_choices(
        self, sims: dict[str, str], proxy_factory: Any, path: str, stream: bool
    ) -> None:
        """``n`` = 2 from vLLM: the prompt's ids come once per choice, and the record holds the
        prompt once (as many ids as the usage counts), not the two joined."""
        proxy = proxy_factory(sims["vllm"], "--request-token-data", "all")
        body: dict[str, Any] = {"model": MODEL, "n": 2, "max_tokens": 4, "stream": stream}
        if path == "/v1/completions":
            body["prompt"] = "Once upon a time"
        else:
            body["messages"] = [{"role": "user", "content": "Once upon a time"}]
        if stream:
            body["stream_options"] = {"include_usage": True}
        with httpx.Client(timeout=30) as client:
            same_response(
                client.post(sims["vllm"] + path, json=body),
                client.post(proxy.url + path, json=body),
            )
        (rec,) = proxy.records()
        assert rec["input_token_source"] == "upstream-ids"
        assert len(rec["input_tokens"]) == rec["gen_ai.usage.input_tokens"] > 0

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_ollama_openai_layer(
        self, sims: dict[str, str], proxy_factory: Any, stream: bool
    ) -> None:
        """Ollama's /v1 layer omits logprobs it was not asked for (it never sends ``null``):
        the proxy takes its member out whole, so the bytes are the direct ones."""
        proxy = proxy_factory(sims["ollama"], "--request-token-data", "logprobs")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims["ollama"] + "/v1/chat/completions", json=body)
            proxied = client.post(proxy.url + "/v1/chat/completions", json=body)
            asked = client.post(
                sims["ollama"] + "/v1/chat/completions", json={**body, "logprobs": True}
            )
        assert b'"logprobs":{"content":[' in asked.content and b"logprobs" not in direct.content
        same_response(direct, proxied)
        (rec,) = proxy.records()
        pieces = b"".join(
            t.encode() if isinstance(t, str) else bytes(t) for t in rec["output_tokens"]
        )
        assert ("upstream-pieces", rec["output_text"]) == (
            rec["output_token_source"],
            pieces.decode(),
        )

    @pytest.mark.parametrize(
        ("raw", "stored"),
        [
            (
                b'{"model":"llama3.2:1b","prompt":"lone \\ud800 surrogate","stream":false}',
                {"prompt": "lone \ufffd surrogate"},
            ),
            (
                b'{"model":"llama3.2:1b","prompt":"x","stream":false,'
                b'"options":{"seed":18446744073709551616}}',
                {"options": {"seed": float(2**64)}},
            ),
            (
                b'{"model":"llama3.2:1b","prompt":"x","stream":false,"options":{"seed":1e400}}',
                {"options": {"seed": None}},
            ),
        ],
        ids=["surrogate", "int-beyond-64-bits", "beyond-a-double"],
    )
    def test_body_it_cannot_reencode_is_sent_as_is(
        self, sims: dict[str, str], proxy_factory: Any, raw: bytes, stored: dict[str, Any]
    ) -> None:
        """A body orjson cannot re-encode to the same meaning is forwarded unedited (no token
        data asked for), so the client gets what it gets directly, refusal included; the
        record's ``request_body`` holds it as the README says (U+FFFD for a lone surrogate,
        the nearest double for an integer beyond 64 bits, ``null`` beyond a double's range)."""
        proxy = proxy_factory(sims["ollama"], "--request-token-data", "logprobs")
        same_response(*post_both(sims["ollama"], proxy, "/api/generate", raw))
        (rec,) = proxy.records()
        assert "token_data_requested" not in rec
        assert stored == {key: rec["request_body"][key] for key in stored}

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_llamacpp_ids_with_gaps_are_not_a_sequence(
        self, sims: dict[str, str], proxy_factory: Any, stream: bool
    ) -> None:
        """llama.cpp gives no logprobs entry to a token that leaves the text inside a UTF-8
        character: fewer ids than tokens generated are recorded as no token data, with the
        count of the missing, never as the model's output."""
        proxy = proxy_factory(sims["llamacpp"])
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                "logprobs": True, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}  # fmt: skip
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims["llamacpp"] + "/v1/chat/completions", json=body)
            proxied = client.post(proxy.url + "/v1/chat/completions", json=body)
        same_response(direct, proxied)
        events = [e.removeprefix(b"data: ") for e in direct.content.split(b"\n\n") if e]
        chunks = [json.loads(e) for e in events if e != b"[DONE]"] if stream else [direct.json()]
        entries = sum(len((c["choices"][0].get("logprobs") or {}).get("content") or [])
                      for c in chunks if c["choices"])  # fmt: skip
        generated = next(c["usage"]["completion_tokens"] for c in chunks if c.get("usage"))
        assert 0 < entries < generated  # the case is exercised
        (rec,) = proxy.records()
        assert ("none", None, generated - entries) == (
            rec["output_token_source"],
            rec["output_tokens"],
            rec["tokentrail.output_tokens_missing"],
        )
        assert "output_logprobs" not in rec

    @pytest.mark.parametrize("mode", ["logprobs", "all"])
    def test_chat_asks_for_one_top_logprob(self, mode: str) -> None:
        """Chat asks for logprobs with top_logprobs 1: llama-cpp-python's server answers
        logprobs alone with null (it takes top_logprobs as the count), and llama.cpp's sends no
        token data for 0; a client's own logprobs or top_logprobs are left as they are."""
        from tokentrail._proxy._tokendata import plan

        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        new, strip = plan("openai.chat", chat, mode)
        assert new is not None and (True, 1) == (new["logprobs"], new["top_logprobs"])
        assert b"logprobs" in strip.choice_null
        for own in ({"logprobs": True}, {"logprobs": True, "top_logprobs": 0}):
            new, _ = plan("openai.chat", {**chat, **own}, mode)
            assert new is None or own.items() <= new.items()

    def test_top_logprobs_alone_is_the_clients_question(
        self, sims: dict[str, str], proxy_factory: Any
    ) -> None:
        """top_logprobs without logprobs, which llama.cpp refuses, is forwarded as sent: asking
        for logprobs on the client's behalf would turn the refusal into an answer."""
        proxy = proxy_factory(sims["llamacpp"], "--request-token-data", "logprobs")
        raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                          "top_logprobs": 2}).encode()  # fmt: skip
        direct, proxied = post_both(sims["llamacpp"], proxy, "/v1/chat/completions", raw)
        assert 400 == direct.status_code
        same_response(direct, proxied)

    def test_noncharacter_is_stored_as_replacement(
        self, sims: dict[str, str], proxy_factory: Any
    ) -> None:
        """A prompt holding a noncharacter reaches the upstream as the client sent it, and the
        record, a line of I-JSON (SPEC section 2; RFC 7493 bars noncharacters), holds U+FFFD."""
        proxy = proxy_factory(sims["ollama"])
        raw = '{"model":"llama3.2:1b","prompt":"odd \uffff\ufdd0 one","stream":false}'.encode()
        same_response(*post_both(sims["ollama"], proxy, "/api/generate", raw))
        (rec,) = proxy.records()
        assert ("odd \ufffd\ufffd one",) * 2 == (rec["input_text"], rec["request_body"]["prompt"])
        stored = b"".join(f.read_bytes() for f in proxy.ledger.rglob("*.jsonl"))
        assert b"\xef\xbf\xbf" not in stored and b"\xef\xb7\x90" not in stored


class TestPathSpelling:
    @pytest.mark.parametrize(
        ("mode", "path"),
        [
            ("ollama", "/api/generate/"),
            ("ollama", "//api/generate"),
            ("openai", "/v1/chat/completions/"),
            ("openai", "//v1/chat/completions"),
        ],
    )
    def test_forwarded_as_sent_and_recorded(
        self, sims: dict[str, str], proxies: dict[str, ProxyProc], mode: str, path: str
    ) -> None:
        """Another spelling of an audited path reaches the upstream as sent, so the client gets
        the upstream's own answer to it (the simulator's router, like Ollama's and vLLM's,
        does not serve it), and the exchange is recorded all the same."""
        proxy = proxies[mode]
        body = (
            {"model": MODEL, "prompt": "hi", "stream": False}
            if mode == "ollama"
            else {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        before = len(proxy.records())
        with httpx.Client(timeout=30) as client:
            direct = client.post(sims[mode] + path, json=body)
            proxied = client.post(proxy.url + path, json=body)
        assert 404 == direct.status_code
        same_response(direct, proxied)
        records = proxy.records()
        assert before + 1 == len(records)
        assert ("upstream_error", 404) == (
            records[-1]["stop_reason"],
            records[-1]["http.response.status_code"],
        )


class TestBadInput:
    """Input the proxy refuses never reaches the upstream and leaves no record."""

    @pytest.mark.parametrize(
        ("mode", "path"), [("ollama", "/api/generate"), ("openai", "/v1/chat/completions")]
    )
    @pytest.mark.parametrize(
        ("content", "status"),
        [
            (b'{"model": "x", "prompt": ', 400),  # malformed JSON
            (b'["not", "an", "object"]', 400),
            (b'{"model": "x", "prompt": "\xff\xfe"}', 400),  # invalid UTF-8
        ],
    )
    def test_refused(
        self, proxies: dict[str, ProxyProc], mode: str, path: str, content: bytes, status: int
    ) -> None:
        """400 in the client's dialect, no record, and the proxy keeps serving."""
        proxy = proxies[mode]
        before = len(proxy.records())
        r = httpx.post(
            proxy.url + path, content=content, headers={"Content-Type": "application/json"}
        )
        assert status == r.status_code
        err = r.json()["error"]
        assert isinstance(err, dict) if mode == "openai" else isinstance(err, str)
        assert proxy.new_records(before) == []
        ok = httpx.post(
            proxy.url + path,
            json={
                "model": MODEL,
                "prompt": "x",
                "stream": False,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert ok.status_code == 200

    def test_body_too_large(self, proxies: dict[str, ProxyProc]) -> None:
        """A 50 MB body is refused with 413 (default limit 16 MiB), no record."""
        proxy = proxies["ollama"]
        before = len(proxy.records())
        big = b'{"model": "x", "prompt": "' + b"a" * (50 << 20) + b'"}'
        try:
            r = httpx.post(proxy.url + "/api/generate", content=big, timeout=30)
            assert r.status_code == 413
            assert "exceeds" in r.json()["error"]
        except httpx.WriteError:
            pass  # the proxy may close before the client has finished sending
        assert proxy.new_records(before) == []


class TestFaults:
    """Upstream and client failures: a clear error, one record when the upstream was reached."""

    def test_upstream_down(self, proxy_factory: Any) -> None:
        """502 in each dialect, no record (nothing was sent)."""
        proxy = proxy_factory(f"http://127.0.0.1:{free_port()}")
        r = httpx.post(proxy.url + "/api/generate", json={"model": MODEL, "prompt": "x"})
        assert (502, str) == (r.status_code, type(r.json()["error"]))
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 502 and "message" in r.json()["error"]
        assert proxy.records() == []

    @pytest.mark.parametrize(
        ("mode", "path", "body"),
        [
            ("ollama", "/api/generate", {"model": MODEL, "prompt": "x"}),
            (
                "openai",
                "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
            ),
        ],
    )
    def test_upstream_500(
        self,
        sims: dict[str, str],
        proxies: dict[str, ProxyProc],
        mode: str,
        path: str,
        body: dict[str, Any],
    ) -> None:
        """The upstream's 500 is relayed as it is and recorded as upstream_error."""
        proxy = proxies[mode]
        before = len(proxy.records())
        h = {"X-Sim-Fault": "500"}
        direct = httpx.post(sims[mode] + path, json=body, headers=h)
        proxied = httpx.post(proxy.url + path, json=body, headers=h)
        same_response(direct, proxied)
        (rec,) = proxy.new_records(before)
        assert (rec["stop_reason"], rec["http.response.status_code"]) == ("upstream_error", 500)

    @pytest.mark.parametrize(
        ("mode", "path", "body"),
        [
            ("ollama-0.4", "/api/generate", {"model": MODEL, "prompt": "a long answer please"}),
            (
                "vllm",
                "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
            ),
        ],
    )
    def test_upstream_cut_mid_stream(
        self, proxies: dict[str, ProxyProc], mode: str, path: str, body: dict[str, Any]
    ) -> None:
        """A cut stream ends with an error event in the dialect; the record keeps the text."""
        proxy = proxies[mode]
        before = len(proxy.records())
        r = httpx.post(proxy.url + path, json=body, headers={"X-Sim-Fault": "cut:3"}, timeout=30)
        last = r.content.strip().split(b"\n")[-1]
        if mode.startswith("ollama"):
            assert "tokentrail" in json.loads(last)["error"]
        else:
            assert "tokentrail" in json.loads(last.removeprefix(b"data: "))["error"]["message"]
        (rec,) = proxy.new_records(before)
        assert rec["stop_reason"] == "upstream_error"
        assert rec["output_text"]
        with pytest.raises((ollama.ResponseError, openai.APIError)):
            if mode.startswith("ollama"):
                client = ollama.Client(host=proxy.url, headers={"X-Sim-Fault": "cut:3"})
                list(client.generate(model=MODEL, prompt="x", stream=True))
            else:
                oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
                list(
                    oai.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "x"}],
                        stream=True,
                        extra_headers={"X-Sim-Fault": "cut:3"},
                    )
                )

    def test_upstream_cut_non_streamed(self, proxies: dict[str, ProxyProc]) -> None:
        """A body cut short: the client gets 502, and the record says so, not the 200 the
        upstream's headers promised."""
        proxy = proxies["ollama"]
        before = len(proxy.records())
        r = httpx.post(
            proxy.url + "/api/generate",
            json={"model": MODEL, "prompt": "a long answer please", "stream": False},
            headers={"X-Sim-Fault": "cut:3"},
            timeout=30,
        )
        assert r.status_code == 502
        (rec,) = proxy.new_records(before)
        assert (rec["stop_reason"], rec["http.response.status_code"]) == ("upstream_error", 502)

    def test_upstream_stall(self, sims: dict[str, str], proxy_factory: Any) -> None:
        """Stalls past --upstream-timeout: 504 before the answer, an error event mid-stream."""
        proxy = proxy_factory(sims["ollama"], "--upstream-timeout", "0.5")
        body = {"model": MODEL, "prompt": "x"}
        r = httpx.post(
            proxy.url + "/api/generate",
            json=body,
            headers={"X-Sim-Fault": "stall:2000"},
            timeout=30,
        )
        assert (504, str) == (r.status_code, type(r.json()["error"]))
        r = httpx.post(
            proxy.url + "/api/generate",
            json=body,
            headers={"X-Sim-Fault": "stall-mid:2000"},
            timeout=30,
        )
        assert r.status_code == 200
        assert "stalled" in json.loads(r.content.strip().split(b"\n")[-1])["error"]
        recs = proxy.records()
        assert [x["stop_reason"] for x in recs] == ["upstream_error", "upstream_error"]
        assert recs[0]["http.response.status_code"] == 504
        ok = httpx.post(proxy.url + "/api/generate", json={**body, "stream": False}, timeout=30)
        assert ok.status_code == 200

    @pytest.mark.parametrize("stream", [True, False])
    def test_client_leaves_before_the_first_byte(
        self, sims: dict[str, str], proxy_factory: Any, stream: bool
    ) -> None:
        """A client that gives up while the upstream has not answered yet is a
        client_disconnect, not an upstream error, and the proxy stops waiting for (and drops
        its request to) the upstream then, not when the answer comes, as a model server talked
        to directly stops generating when its client leaves."""
        proxy = proxy_factory(sims["ollama"])
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                proxy.url + "/api/generate",
                json={"model": MODEL, "prompt": "x", "stream": stream},
                headers={"X-Sim-Fault": "stall:3000"},
                timeout=0.3,
            )
        deadline = time.time() + 10
        while not proxy.records() and time.time() < deadline:
            time.sleep(0.05)
        (rec,) = proxy.records()
        assert rec["stop_reason"] == "client_disconnect"
        assert "error_message" not in rec
        assert rec["request_duration_ms"] < 2000  # the upstream would have answered at 3000
        ok = httpx.post(
            proxy.url + "/api/generate", json={"model": MODEL, "prompt": "x"}, timeout=30
        )
        assert ok.status_code == 200 and len(proxy.records()) == 2

    @pytest.mark.parametrize("mode", ["ollama", "openai"])
    def test_client_disconnect(self, tmp_path: Path, mode: str, proxy_factory: Any) -> None:
        """A client that leaves mid-stream still leaves a record with the tokens so far."""
        with sim_in_thread(SimConfig(mode=mode, token_ms=20)) as slow:
            proxy = proxy_factory(slow, "--request-token-data", "logprobs")
            if mode == "ollama":
                path, body = (
                    "/api/generate",
                    {"model": MODEL, "prompt": "a long answer", "options": {"num_predict": 200}},
                )
            else:
                path, body = (
                    "/v1/chat/completions",
                    {
                        "model": MODEL,
                        "stream": True,
                        "max_tokens": 200,
                        "messages": [{"role": "user", "content": "a long answer"}],
                    },
                )
            with (
                httpx.Client(timeout=30) as client,
                client.stream("POST", proxy.url + path, json=body) as r,
            ):
                for got, _ in enumerate(r.iter_raw(), 1):
                    if got >= 3:
                        break
            deadline = time.time() + 10
            while not proxy.records() and time.time() < deadline:
                time.sleep(0.05)
            (rec,) = proxy.records()
            assert rec["stop_reason"] == "client_disconnect"
            assert rec["output_tokens"] and rec["output_token_source"] == "upstream-pieces"


class TestIdentity:
    """API keys, trusted headers, required identity and retries."""

    def test_api_keys_and_retries(
        self, sims: dict[str, str], proxy_factory: Any, tmp_path: Path
    ) -> None:
        """A key maps to its user (never stored); an Idempotency-Key links retries."""
        keys = tmp_path / "keys.toml"
        keys.write_text(f'"sk-alice" = "alice"\n"sha256:{key_digest("sk-bob")}" = "bob"\n')
        proxy = proxy_factory(sims["openai"], "--api-keys", str(keys))
        for key, idem in (
            ("sk-alice", "req-1"),
            ("sk-bob", None),
            ("sk-alice", "req-1"),
            ("sk-eve", None),
        ):
            c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
            extra = {"Idempotency-Key": idem} if idem else None
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], extra_headers=extra
            )
        recs = proxy.records()
        assert [r["user_id"] for r in recs] == ["alice", "bob", "alice", None]
        assert recs[0]["event_id"] == recs[2]["retry_of"]
        assert (recs[2]["idempotency_key"], recs[0].get("retry_of")) == ("req-1", None)
        text = b"".join(f.read_bytes() for f in proxy.ledger.rglob("*.jsonl"))
        assert b"sk-alice" not in text and b"sk-bob" not in text

    def test_retry_after_a_crash_is_linked(self, sims: dict[str, str], tmp_path: Path) -> None:
        """A client retrying after the proxy died (kill -9) and came back: the retry links to
        the first attempt recorded before the crash, as it does without one."""
        body = {"model": MODEL, "prompt": "wire 100 EUR", "stream": False}
        first = start_proxy(tmp_path, sims["ollama"], log_id="crashy")
        try:
            with httpx.Client(timeout=30) as client:
                sent = client.post(first.url + "/api/generate", json=body,
                                   headers={"Idempotency-Key": "pay-7"})  # fmt: skip
                assert 200 == sent.status_code
        finally:
            first.proc.kill()
            first.proc.wait()
        again = start_proxy(tmp_path, sims["ollama"], log_id="crashy")
        try:
            with httpx.Client(timeout=30) as client:
                for key in ("pay-7", "pay-8"):
                    retried = client.post(again.url + "/api/generate", json=body,
                                          headers={"Idempotency-Key": key})  # fmt: skip
                    assert 200 == retried.status_code
        finally:
            again.stop()
        recs = again.records()
        assert [("pay-7", None), ("pay-7", recs[0]["event_id"]), ("pay-8", None)] == [
            (r["idempotency_key"], r.get("retry_of")) for r in recs
        ]

    def test_retry_index_reads_only_the_newest_segments(self, tmp_path: Path) -> None:
        """A restart rebuilds the retry index from the newest segments within its byte budget,
        oldest first: never the whole of a busy log."""
        from tokentrail._checkpoint import Signer
        from tokentrail._ledger import Ledger, LedgerConfig
        from tokentrail._proxy import keyed_records
        from tokentrail._record import Exchange

        config = LedgerConfig(tmp_path, "log", Signer.generate("t"), max_segment_bytes=1024)
        with Ledger.open(config) as ledger:
            for i in range(20):
                ledger.append(
                    Exchange(
                        model="m",
                        api="ollama.generate",
                        stop_reason="stop",
                        input_text="x" * 400,
                        extra={"idempotency_key": f"k{i}"},
                    )
                )
        keys = [r["idempotency_key"] for r in keyed_records(tmp_path, "log", 2)]
        assert [f"k{i}" for i in range(20)] == keys
        newest = [r["idempotency_key"] for r in keyed_records(tmp_path, "log", 2, budget=1)]
        assert newest == keys[-len(newest) :] and 0 < len(newest) < 20
        # A damaged segment (here a packed one cut to nothing) is skipped: verify names it,
        # and the proxy starts and serves all the same.
        first = sorted((tmp_path / "logs" / "log" / "segments").glob("*/*.jsonl"))[0]
        first.with_name(first.name + ".zst").write_bytes(b"")
        first.unlink()
        kept = [r["idempotency_key"] for r in keyed_records(tmp_path, "log", 2)]
        assert 0 < len(kept) < 20 and kept == keys[-len(kept) :]

    def test_trusted_headers_only_when_configured(
        self, sims: dict[str, str], proxy_factory: Any
    ) -> None:
        """X-Tokentrail-User is ignored unless --trust-identity-headers, and never forwarded."""
        h = {"X-Tokentrail-User": "mallory", "X-Tokentrail-Session": "s1"}
        body = {"model": MODEL, "prompt": "x", "stream": False}
        plain = proxy_factory(sims["ollama"])
        trusting = proxy_factory(sims["ollama"], "--trust-identity-headers")
        httpx.post(plain.url + "/api/generate", json=body, headers=h)
        httpx.post(trusting.url + "/api/generate", json=body, headers=h)
        assert (plain.records()[0]["user_id"], plain.records()[0]["session_id"]) == (None, None)
        assert (
            trusting.records()[0]["user_id"],
            trusting.records()[0]["session_id"],
        ) == ("mallory", "s1")

    def test_require_identity(self, sims: dict[str, str], proxy_factory: Any) -> None:
        """Anonymous requests get 401 in the dialect and leave no record."""
        proxy = proxy_factory(sims["openai"], "--require-identity")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=proxy.url + "/v1", api_key="nobody", max_retries=0
            ).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        r = httpx.post(proxy.url + "/api/generate", json={"model": MODEL, "prompt": "x"})
        assert (401, str) == (r.status_code, type(r.json()["error"]))
        assert proxy.records() == []


class TestDurability:
    """Strict mode: the record is on disk before the client has its answer."""

    def test_record_before_response(self, proxies: dict[str, ProxyProc]) -> None:
        """Right after each response completes, its record is already in the segment file."""
        proxy = proxies["ollama"]
        for stream in (False, True):
            before = len(proxy.records())
            r = httpx.post(
                proxy.url + "/api/generate", json={"model": MODEL, "prompt": "x", "stream": stream}
            )
            assert r.status_code == 200
            assert len(proxy.new_records(before)) == 1

    def test_async_durability_and_seal_on_shutdown(
        self, sims: dict[str, str], proxy_factory: Any
    ) -> None:
        """--durability async still records; SIGTERM seals a checkpoint over everything."""
        proxy = proxy_factory(sims["ollama"], "--durability", "async")
        for _ in range(3):
            httpx.post(
                proxy.url + "/api/chat",
                json={
                    "model": MODEL,
                    "stream": False,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
        proxy.stop()
        assert len(proxy.records()) == 3
        cps = sorted((proxy.ledger / "logs" / proxy.log_id / "checkpoints").glob("*.checkpoint"))
        assert cps and cps[-1].name == f"{3:020d}.checkpoint"
        # The operator is told the stop was seen, and what the log holds at the end.
        deadline = time.monotonic() + 5
        while not any("stopped;" in ln for ln in proxy.stderr) and time.monotonic() < deadline:
            time.sleep(0.05)
        said = "\n".join(proxy.stderr)
        assert "tokentrail: SIGTERM received: stopping; 0 requests in flight" in said, said
        assert f"tokentrail: stopped; log {proxy.log_id} holds 3 records, 3 sealed" in said, said


async def test_a_slow_digest_lookup_holds_no_exchange_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Ollama whose /api/tags takes 2.5 s, records allowed to wait 0.5 s for a digest: the
    first exchange waits for the lookup until it is 0.5 s old, the others not at all (each
    waited its own 0.5 s before, and with a lookup that kept failing, every exchange did);
    once the lookup answers, records carry the digest."""
    import asyncio

    from aiohttp import ClientSession, web

    import tokentrail._digests as digests
    from tokentrail._proxy import Proxy, ProxyConfig

    monkeypatch.setattr(digests, "DIGEST_WAIT_S", 0.5)
    with sim_in_thread(SimConfig(mode="ollama")) as sim:
        async with ClientSession() as session:

            async def relay(request: web.Request) -> web.Response:
                if request.path == "/api/tags":
                    await asyncio.sleep(2.5)
                async with session.request(
                    request.method, sim + request.path, data=await request.read()
                ) as resp:
                    return web.Response(body=await resp.read(), status=resp.status,
                                        content_type=resp.content_type)  # fmt: skip

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", relay)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with session.get(sim + "/api/tags") as resp:
                tags = await resp.json()
            digest = next(m["digest"] for m in tags["models"] if m["name"] == MODEL)
            config = ProxyConfig(upstream=upstream, port=0, ledger=tmp_path / "ledger",
                                 key=tmp_path / "k", log_id="tags")  # fmt: skip
            proxy = Proxy(config)
            await proxy.start()
            try:
                body = {"model": MODEL, "prompt": "hi", "stream": False}
                async with httpx.AsyncClient(timeout=30) as client:
                    started = time.monotonic()
                    for _ in range(5):
                        r = await client.post(proxy.url + "/api/generate", json=body)
                        assert 200 == r.status_code
                    took = time.monotonic() - started
                    await asyncio.sleep(max(0.0, 3.0 - took))
                    await client.post(proxy.url + "/api/generate", json=body)
            finally:
                await proxy.close()
                await runner.cleanup()
    assert took < 1.5, took
    segments = sorted((tmp_path / "ledger").glob("logs/tags/segments/*/*.jsonl"))
    versions = [json.loads(line)["model_version"] for f in segments
                for line in f.read_bytes().splitlines()]  # fmt: skip
    assert [digest] == versions[-1:] and all(v in (None, digest) for v in versions), versions


async def test_shutdown_stops_within_its_grace(tmp_path: Path, signer: Any) -> None:
    """Stopping (SIGTERM) lets exchanges in flight finish for the grace, then cuts them, each
    recorded as ``interrupted``, and the proxy is done: it took twice the grace, aiohttp
    waiting as long again for the handlers it had cancelled, which went on relaying."""
    import asyncio

    from tokentrail._proxy import Proxy, ProxyConfig
    from tokentrail._verify import VerifyOptions, verify_local

    grace = 3.0
    with sim_in_thread(SimConfig(mode="ollama", token_ms=500)) as slow:
        key = tmp_path / "signing.key"
        signer.save(key)
        config = ProxyConfig(upstream=slow, port=0, ledger=tmp_path / "ledger", key=key,
                             log_id="stop", shutdown_grace_s=grace)  # fmt: skip
        proxy = Proxy(config)
        await proxy.start()
        body = {"model": MODEL, "prompt": "a long answer", "options": {"num_predict": 200}}
        async with httpx.AsyncClient(timeout=60) as client:

            async def streamed() -> int:
                got = 0
                try:
                    async with client.stream("POST", proxy.url + "/api/generate", json=body) as r:
                        async for line in r.aiter_lines():
                            got += bool(line)
                except httpx.HTTPError:
                    pass  # cut at the end of the grace
                return got

            async def whole() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    await client.post(proxy.url + "/api/generate", json={**body, "stream": False})

            tasks = [asyncio.ensure_future(streamed()), asyncio.ensure_future(whole())]
            await asyncio.sleep(1.5)  # both under way, the stream's first lines read
            started = time.monotonic()
            await proxy.close()
            took = time.monotonic() - started
            lines = (await asyncio.gather(*tasks))[0]
    assert grace - 0.5 < took < grace + 1.5, took
    assert 0 < lines < 200
    segments = sorted((tmp_path / "ledger").glob("logs/stop/segments/*/*.jsonl"))
    records = [json.loads(line) for f in segments for line in f.read_bytes().splitlines()]
    assert ["interrupted", "interrupted"] == [r["stop_reason"] for r in records]
    report = verify_local(tmp_path / "ledger", VerifyOptions(verifiers=[signer.verifier],
                                                             require_sealed=True))  # fmt: skip
    assert report.ok, [f.to_line() for f in report.findings]


async def test_shutdown_cuts_a_long_passthrough_after_its_grace(
    tmp_path: Path, signer: Any
) -> None:
    """A request the proxy relays unaudited (llama.cpp's native /completion, streamed) and
    still running when it stops is cut after the grace too, as an exchange is (it was waited
    for as long again)."""
    import asyncio

    from tokentrail._proxy import Proxy, ProxyConfig

    grace = 3.0
    with sim_in_thread(SimConfig(mode="llamacpp", token_ms=500)) as slow:
        config = ProxyConfig(upstream=slow, port=0, ledger=tmp_path / "ledger",
                             key=tmp_path / "k", log_id="stop", shutdown_grace_s=grace)  # fmt: skip
        proxy = Proxy(config)
        await proxy.start()
        body = {"prompt": "a long answer", "n_predict": 200, "stream": True}
        async with httpx.AsyncClient(timeout=60) as client:

            async def native() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    async with client.stream("POST", proxy.url + "/completion", json=body) as r:
                        async for _ in r.aiter_bytes():
                            pass

            task = asyncio.ensure_future(native())
            await asyncio.sleep(1.5)
            started = time.monotonic()
            await proxy.close()
            took = time.monotonic() - started
            await task
    assert grace - 0.5 < took < grace + 1.5, took


class TestConfig:
    """Options, environment and the TOML file."""

    def test_default_log_id_on_port_zero_is_the_process_own(self) -> None:
        """On a fixed port the default log id is stable across restarts; on port 0 (any free
        port) each process gets a log of its own, so two such proxies on one bucket never
        write one log between them."""
        from tokentrail._layout import check_log_id
        from tokentrail._proxy._config import default_log_id

        code = "from tokentrail._proxy._config import default_log_id as d; print(d(0), d(11435))"
        runs = [
            subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                           text=True, check=True).stdout.split()
            for _ in range(2)
        ]  # fmt: skip
        assert runs[0][1] == runs[1][1] == default_log_id(11435)
        assert runs[0][0] != runs[1][0]
        assert default_log_id(0) == default_log_id(0)
        for log_id in (*runs[0], *runs[1]):
            check_log_id(log_id)

    def test_unknown_setting_in_the_config_file(self, tmp_path: Path) -> None:
        """A typo in the TOML file is refused, not ignored (the proxy would run on defaults)."""
        cfg = tmp_path / "tt.toml"
        cfg.write_text('upstrem = "http://10.0.0.1:1"\n')
        with pytest.raises(click.BadParameter, match=r"unknown setting.*upstrem"):
            serve_command.make_context("serve", ["--config", str(cfg)])

    def test_config_file_takes_every_option_by_its_own_name(self, tmp_path: Path) -> None:
        """The TOML file takes each option under the option's name: ``s3``,
        ``s3-rotate-seconds`` and ``s3-interval`` were refused as unknown (only ``s3_url``,
        the parameter's name, was taken). Two spellings of one setting are refused."""
        cfg = tmp_path / "tt.toml"
        cfg.write_text(
            'upstream = "http://file:1"\ns3 = "s3://bucket/prefix"\ns3-rotate-seconds = 30\n'
            "s3_interval = 2.5\n"
        )
        ctx = serve_command.make_context("serve", ["--config", str(cfg)])
        config = build_config(ctx.params, ctx.meta.get("tokentrail.api_key_table"))
        assert ("s3://bucket/prefix", 30.0, 2.5) == (
            config.s3_url,
            config.s3_rotate_s,
            config.s3_interval_s,
        )
        cfg.write_text('log-id = "a"\nlog_id = "b"\n')
        with pytest.raises(click.BadParameter, match="log_id is given twice"):
            serve_command.make_context("serve", ["--config", str(cfg)])

    def test_a_switch_set_elsewhere_can_be_turned_off(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A switch on in the config file or the environment is turned off by ``--no-…`` on
        the command line (there was no way: the flag could only turn it on)."""
        cfg = tmp_path / "tt.toml"
        cfg.write_text("require-identity = true\nfail-open = true\n")
        monkeypatch.setenv("TOKENTRAIL_REFUSE_UNAUDITED", "1")
        monkeypatch.setenv("TOKENTRAIL_TRUST_IDENTITY_HEADERS", "1")
        ctx = serve_command.make_context("serve", ["--config", str(cfg)])
        on = build_config(ctx.params, None)
        names = ("require_identity", "fail_open", "refuse_unaudited", "trust_identity_headers")
        assert [True] * 4 == [getattr(on, name) for name in names]
        ctx = serve_command.make_context(
            "serve", ["--config", str(cfg), "--no-require-identity", "--no-fail-open",
                      "--no-refuse-unaudited", "--no-trust-identity-headers"],
        )  # fmt: skip
        off = build_config(ctx.params, None)
        assert [False] * 4 == [getattr(off, name) for name in names]

    def test_api_keys_file_and_table_in_one_config(self, tmp_path: Path) -> None:
        """``api-keys = "FILE"`` and an ``[api_keys]`` table in one config file: both keys
        map to their users. The table silently replaced the file (both spell "api_keys"), so
        the file's users were recorded as anonymous."""
        keys = tmp_path / "keys.toml"
        keys.write_text('"sk-alice" = "alice"\n')
        cfg = tmp_path / "tt.toml"
        cfg.write_text(f'api-keys = "{keys}"\n[api_keys]\n"k2" = "bob"\n')
        ctx = serve_command.make_context("serve", ["--config", str(cfg)])
        config = build_config(ctx.params, ctx.meta.get("tokentrail.api_key_table"))
        assert {key_digest("sk-alice"): "alice", key_digest("k2"): "bob"} == dict(config.api_keys)
        keys.write_text('"sha256:zz" = "carol"\n')  # a digest mistyped: not taken as a key
        with pytest.raises(ConfigError, match="is not sha256: and 64 hex digits"):
            build_config(ctx.params, None)

    @pytest.mark.parametrize(
        "upstream", ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1", "http://:80"]
    )
    def test_malformed_upstream_is_one_line(self, tmp_path: Path, upstream: str) -> None:
        """A port out of range or not a number, a broken IPv6 address, no host: one error line,
        exit 2, nothing made in the ledger (it was a 55-line traceback and exit 1, after the
        ledger's folders were made)."""
        out = subprocess.run(
            [sys.executable, "-m", "tokentrail", "serve", "--ledger", str(tmp_path / "ledger"),
             "--key", str(tmp_path / "k"), "--listen", "127.0.0.1:0", "--upstream", upstream],
            env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (2, [f"tokentrail: error: --upstream must be an http(s) URL, not {upstream!r}"]) == (
            out.returncode,
            [line.split(" (")[0] for line in out.stderr.splitlines()],
        )
        assert not (tmp_path / "ledger" / "logs").exists()

    def test_api_keys_file_named_in_errors(self, tmp_path: Path) -> None:
        """A broken or missing --api-keys file is named as the API keys file, not as the
        config file (which the user may not have)."""
        bad = tmp_path / "keys.toml"
        bad.write_text('"k1" = \n')
        for path, says in ((bad, f"cannot read API keys file {bad}: "),
                           (tmp_path / "none.toml", f"API keys file {tmp_path / 'none.toml'} does"
                            " not exist")):  # fmt: skip
            ctx = serve_command.make_context("serve", ["--api-keys", str(path)])
            with pytest.raises(ConfigError) as caught:
                build_config(ctx.params, None)
            assert str(caught.value).startswith(says)

    @pytest.mark.parametrize("which", ["--listen", "--metrics-listen"])
    def test_address_in_use_or_malformed(self, tmp_path: Path, which: str) -> None:
        """A port another process holds, or a malformed address: one error line naming the
        option, exit 2, no traceback, no unclosed session, and no log left in the ledger."""
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = f"127.0.0.1:{held.getsockname()[1]}"
            for value in (taken, "nonsense"):
                extra = ["--listen", value] if which == "--listen" else [
                    "--listen", "127.0.0.1:0", "--metrics-listen", value
                ]  # fmt: skip
                out = subprocess.run(
                    [sys.executable, "-m", "tokentrail", "serve", "--ledger",
                     str(tmp_path / "ledger"), "--key", str(tmp_path / "k"), *extra],
                    env=_env(), capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert out.returncode == 2, out.stderr
                assert out.stderr.startswith(f"tokentrail: error: {which}"), out.stderr
                assert "Traceback" not in out.stderr and "Unclosed" not in out.stderr
                assert not (tmp_path / "ledger" / "logs").exists()

    @pytest.mark.parametrize("upstream", ["http://h:8000/v1", "http://h:8000/v1/", "http://h/api"])
    def test_upstream_is_the_root(self, upstream: str) -> None:
        """An OpenAI base URL given as --upstream is refused: every call would go to /v1/v1."""
        ctx = serve_command.make_context("serve", ["--upstream", upstream])
        with pytest.raises(ConfigError, match="root URL"):
            build_config(ctx.params, None)

    @pytest.mark.parametrize("upstream", ["http://h:8000/?x=1", "http://h:8000#f", "http://h?"])
    def test_upstream_has_no_query(self, upstream: str) -> None:
        """A query or fragment in --upstream is refused, not dropped (or glued to each path)."""
        ctx = serve_command.make_context("serve", ["--upstream", upstream])
        with pytest.raises(ConfigError, match="without a query or fragment"):
            build_config(ctx.params, None)

    def test_precedence(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Command line beats TOKENTRAIL_* beats the config file beats the default."""
        cfg = tmp_path / "tt.toml"
        cfg.write_text(
            'upstream = "http://file:1"\nlisten = "127.0.0.1:9"\nmax-body-bytes = 123\n'
            'durability = "async"\n[api_keys]\n"k1" = "u1"\n'
        )
        monkeypatch.setenv("TOKENTRAIL_LISTEN", "127.0.0.1:8")
        ctx = serve_command.make_context("serve", ["--config", str(cfg), "--durability", "strict"])
        config = build_config(ctx.params, ctx.meta.get("tokentrail.api_key_table"))
        assert (
            config.upstream,
            config.port,
            config.max_body_bytes,
            config.durability,
        ) == ("http://file:1", 8, 123, "strict")
        assert {key_digest("k1"): "u1"} == dict(config.api_keys)
