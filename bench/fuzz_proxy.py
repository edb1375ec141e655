"""Fuzz the real proxy: malformed and hostile requests, and a hostile upstream behind it.

One run starts ``tokentrail serve`` as a subprocess in front of ``tests/fuzz_upstream.py`` (a
server that answers with malformed NDJSON/SSE, bad UTF-8, huge lines, wrong content types, odd
chunk boundaries, deep JSON, NaN and 64-bit-overflowing numbers, lying gzip...), then sends
``--cases`` requests over raw sockets, ``--concurrency`` at a time. Each case is one of
:data:`KINDS`: request bodies (random bytes, invalid UTF-8, truncated JSON, JSON of every wrong
type, huge strings, 100,000-level nesting, out-of-range numbers, duplicate keys, NUL bytes, lone
surrogates, over-limit bodies), headers (oversized, invalid, odd ``Content-Length`` /
``Transfer-Encoding`` combinations, bad chunking, bad request lines), pass-through paths and
methods, and well-formed requests that the upstream answers with one of its hostile behaviours.

It checks:

- the proxy never crashes: the process is alive and answers a good request at the end;
- each response is either the upstream's answer relayed (marked by the upstream) or the proxy's
  own clear error in the path's dialect (JSON with ``error``); framing-level garbage may get
  aiohttp's plain 4xx, never a 500;
- every audited request the upstream saw left exactly one record (matched by its
  ``Idempotency-Key``), and the ledger verifies after a clean stop;
- the proxy's RSS (``/proc/<pid>/status``) grows by less than :data:`RSS_BOUND_MIB`.

Kinds listed in :data:`KNOWN_BUGS` would be product bugs already reported, counted apart; the
ones this fuzz found are fixed, so the list is empty and every failure fails the run.

    .venv/bin/python bench/fuzz_proxy.py             # 100,000 cases (~2.5 minutes on 2 cores)
    .venv/bin/python bench/fuzz_proxy.py --cases 2000 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import orjson  # noqa: E402

from _common import stop_process, table  # noqa: E402
from fuzz_upstream import BEHAVIOURS, HEADER, RELAY_HEADER, Seen, upstream_in_thread  # noqa: E402
from tokentrail._checkpoint import Verifier  # noqa: E402
from tokentrail._verify import VerifyOptions, verify_local  # noqa: E402

#: The proxy's resident memory may grow by at most this much over a whole run.
RSS_BOUND_MIB = 96
#: The fuzz proxy's body limit (small, so that over-limit bodies stay cheap to send).
MAX_BODY = 4 << 20
CASE_TIMEOUT_S = 30.0
FRAMING_WAIT_S = 2.0
AUDITED = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions")
PASSTHROUGH = ("/api/tags", "/api/show", "/api/version", "/v1/models", "/no/such/path", "/")

#: Kinds whose failures are known product bugs (see the xfail tests in tests/test_fuzz.py).
#: Kinds of failure already reported and not yet fixed, counted apart (none: all fixed; each
#: is now a regression test in ``tests/test_fuzz.py``).
KNOWN_BUGS: dict[str, str] = {}
#: Kinds whose answers the proxy cuts on purpose after the upstream's head, mirroring the
#: upstream: pass-through (it relays the upstream's cut), and an upstream's bytes that do not
#: decode under its Content-Encoding (never relayed: the proxy cannot record them).
CUT_BY_DESIGN = frozenset({"passthrough", "up-lying-gzip"})


# -- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One request: its raw bytes and what is needed to judge the answer."""

    kind: str
    path: str
    raw: bytes
    framing: bool = False  # malformed at the HTTP level: aiohttp's own 4xx is fine


def _request(
    method: str,
    path: str,
    body: bytes | None,
    headers: list[tuple[str, str]] | None = None,
    *,
    length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", "Connection: close"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    return head + (body or b"")


def _valid_body(rng: random.Random, path: str, stream: bool | None = None) -> dict[str, object]:
    body: dict[str, object] = {"model": "fuzz-model"}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    body["stream"] = rng.random() < 0.5 if stream is None else stream
    return body


_WRONG = [
    b"null", b"true", b"0", b"-1", b'"text"', b"[]", b"[1,2]", b"{}", b"1.5e3", b'[{"model":"x"}]',
]  # fmt: skip
_WRONG_FIELDS: list[tuple[str, object]] = [
    ("model", 5), ("model", None), ("model", ["a"]), ("model", {"a": 1}), ("model", ""),
    ("prompt", 5), ("prompt", ["a", "b"]), ("prompt", {"a": 1}), ("prompt", None),
    ("messages", "hi"), ("messages", 7), ("messages", [1, 2]), ("messages", [None]),
    ("messages", [{"role": 5, "content": ["x"]}]), ("messages", [{"content": {"a": [1]}}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("stream", "yes"), ("stream", 1), ("stream", None), ("options", [1]), ("options", "x"),
    ("logprobs", "x"), ("top_logprobs", -1), ("stream_options", 3), ("max_tokens", "x"),
    ("n", 10**6), ("tools", "x"), ("images", [5]), ("format", {"a": None}),
    ("keep_alive", []), ("raw", "x"), ("context", ["a"]), ("context", [1e300]),
]  # fmt: skip


def _gen_body(rng: random.Random, kind: str, path: str) -> bytes:
    valid = _valid_body(rng, path)
    text = orjson.dumps(valid)
    if kind == "body-random":
        return rng.randbytes(rng.randint(0, 2048))
    if kind == "body-bad-utf8":
        junk = bytes(rng.choice([0xFF, 0xFE, 0xC0, 0xC1, 0x80, 0xED, 0xF5]) for _ in range(4))
        at = rng.randrange(len(text))
        return text[:at] + junk + text[at:]
    if kind == "body-truncated":
        return text[: rng.randrange(len(text))]
    if kind == "body-wrong-type":
        if rng.random() < 0.3:
            return rng.choice(_WRONG)
        name, value = rng.choice(_WRONG_FIELDS)
        return orjson.dumps({**valid, name: value})
    if kind == "body-huge-string":
        size = rng.choice([1 << 20, 3 << 20, MAX_BODY + 1, MAX_BODY * 2])
        key = "prompt" if "prompt" in valid else "model"
        return orjson.dumps({**valid, "stream": False, key: "x" * size})
    if kind == "body-deep-nesting":
        depth = rng.choice([1_100, 10_000, 100_000])
        return b'{"model":"m","prompt":' + b"[" * depth + b"]" * depth + b"}"
    if kind == "body-numbers":
        num = rng.choice(
            [b"1e400", b"-1e400", b"18446744073709551616", b"-0", b"1e-400", b"9" * 5000]
        )
        return text[:-1] + b',"options":{"seed":' + num + b',"temperature":' + num + b"}}"
    if kind == "body-number-fallback":  # a value orjson refuses forces the stdlib parser
        big = rng.choice([b"18446744073709551616", b"1" * 400])
        return text[:-1] + b',"options":{"x":NaN,"seed":' + big + b"}}"
    if kind == "body-nan":
        word = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
        return text[:-1] + b',"options":{"temperature":' + word + b"}}"
    if kind == "body-duplicate-keys":
        return text[:-1] + b',"model":"other","stream":true,"stream":false}'
    if kind == "body-nul":
        at = rng.randrange(1, len(text))
        return rng.choice(
            [text[:at] + b"\x00" + text[at:], text.replace(b"hello", b"he\\u0000llo")]
        )
    if kind == "body-surrogate":
        return text.replace(b"hello", rng.choice([b"\\ud800", b"\\udfff x", b"\\ud83d"]))
    raise AssertionError(kind)


def _gen_header_case(rng: random.Random, kind: str, path: str) -> Case:
    body = orjson.dumps(_valid_body(rng, path, stream=False))
    if kind == "hdr-oversized":
        size = rng.choice([8_000, 9_000, 64_000, 300_000])
        name = rng.choice(["X-Big", "Authorization", "Idempotency-Key", "Cookie"])
        raw = _request("POST", path, body, [(name, "a" * size)])
        return Case(kind, path, raw, framing=True)
    if kind == "hdr-many":
        headers = [(f"X-H{i}", "v") for i in range(rng.choice([50, 200, 2000]))]
        return Case(kind, path, _request("POST", path, body, headers), framing=True)
    if kind == "hdr-invalid":
        bad = rng.choice(
            [
                "X-Bad\x00: v", "X Bad: v", ": empty-name", "X-Ctl: a\x01b", "NoColon",
                "X-Fold: a\r\n  folded", "Content-Type: application/json; charset=latin-1",
                "Content-Type: text/plain", "Content-Encoding: identity",
                "Expect: 100-continue", "Upgrade: websocket", "Connection: Upgrade, X-A",
                "X-Tokentrail-User: ../../etc", "Idempotency-Key: \udcff\udcfe",
            ]
        )  # fmt: skip
        head = f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n{bad}\r\n"
        raw = (head + f"Content-Length: {len(body)}\r\n\r\n").encode("utf-8", "surrogateescape")
        return Case(kind, path, raw + body, framing=True)
    if kind == "hdr-content-encoding":
        enc = rng.choice(["gzip", "deflate", "br", "x-unknown"])
        payload = gzip.compress(body) if enc == "gzip" and rng.random() < 0.5 else body
        raw = _request("POST", path, payload, [("Content-Encoding", enc)])
        return Case(kind, path, raw)
    if kind == "frame-length":
        n = len(body)
        variant = rng.randrange(9)
        cl: list[str] = [
            [f"{n + 50}"], [f"{max(0, n - 5)}"], ["-1"], ["abc"], [f"{n}", f"{n + 1}"],
            [f" {n} "], ["+5"], ["99999999999999999999"], [f"{n}, {n}"],
        ][variant]  # fmt: skip
        headers = [("Content-Length", v) for v in cl]
        raw = _request("POST", path, body, headers, length=False)
        # a body shorter than its length: half-close so the proxy sees the end
        return Case(kind, path, raw, framing=True)
    if kind == "frame-chunked":
        variant = rng.randrange(8)
        te = ["chunked", "gzip, chunked", "chunked, identity", "identity", "Chunked", "xchunked"]
        headers = [("Transfer-Encoding", rng.choice(te))]
        if variant == 0:
            headers.append(("Content-Length", str(len(body))))
        chunks: bytes
        if variant in (0, 1):
            chunks = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif variant == 2:
            chunks = b"zz\r\n" + body + b"\r\n0\r\n\r\n"  # bad size
        elif variant == 3:
            chunks = f"{len(body):x};ext=1\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif variant == 4:
            chunks = f"{len(body) + 10:x}\r\n".encode() + body  # missing end
        elif variant == 5:
            chunks = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
            chunks += b"0\r\nX-Trailer: t\r\n\r\n"
        elif variant == 6:
            chunks = b"ffffffffffffffffffff\r\n" + body
        else:
            chunks = f"{len(body):x}\n".encode() + body + b"\n0\n\n"  # bare LF
        raw = _request("POST", path, chunks, headers, length=False)
        return Case(kind, path, raw, framing=True)
    if kind == "frame-request-line":
        line = rng.choice(
            [
                b"POST " + path.encode() + b" HTTP/1.0\r\n", b"POST " + path.encode() + b"\r\n",
                b"POST " + path.encode() + b" HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n",
                b"POST /" + b"a" * 20_000 + b" HTTP/1.1\r\n", b"\x16\x03\x01\x00\xa5\x01\x00",
                b"GET /api/\xff\xfe HTTP/1.1\r\n", b"POST http://evil/api/generate HTTP/1.1\r\n",
                b"post " + path.encode() + b" HTTP/1.1\r\n", b"\r\n\r\n", b"",
                b"POST " + path.encode() + b" HTTP/1.1\n",
            ]
        )  # fmt: skip
        rest = f"Host: fuzz\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        return Case(kind, path, line + rest + body, framing=True)
    raise AssertionError(kind)


def make_case(rng: random.Random, n: int, seed: int) -> tuple[Case, str]:
    """The ``n``-th case and its Idempotency-Key."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    key = f"fz-{seed}-{n}"
    path = rng.choice(AUDITED)
    if kind.startswith("body-"):
        body = _gen_body(rng, kind, path)
        headers = [("Content-Type", "application/json"), ("Idempotency-Key", key)]
        return Case(kind, path, _request("POST", path, body, headers)), key
    if kind.startswith(("hdr-", "frame-")):
        return _gen_header_case(rng, kind, path), key
    if kind.startswith("up-"):
        behaviour = kind[3:]
        body = orjson.dumps(_valid_body(rng, path))
        headers = [(HEADER, f"{behaviour}:{n}"), ("Idempotency-Key", key)]
        if rng.random() < 0.3:
            headers.append(("Accept-Encoding", "gzip"))
        return Case(kind, path, _request("POST", path, body, headers)), key
    if kind == "passthrough":
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        ppath = rng.choice([*PASSTHROUGH, "/api/generate", "/v1/chat/completions"])
        if method == "POST" and ppath in AUDITED:
            ppath = "/api/show"
        pbody: bytes | None = rng.choice([None, b"", rng.randbytes(64), b'{"name":"x"}'])
        behaviour = rng.choice(list(BEHAVIOURS))
        headers = [(HEADER, f"{behaviour}:{n}")]
        return Case(kind, ppath, _request(method, ppath, pbody, headers)), key
    if kind in ("path-odd", "path-dot-segments"):
        if kind == "path-odd":
            choices = [
                "//api/generate", "/api/generate/", "/api/generate?x=1", "/%61pi/generate",
                "/api/generate%00", "/api/generate#frag", "/v1/chat/completions;x",
                "/API/GENERATE", "/api/generate/..%2f..%2f", "/api//generate",
            ]  # fmt: skip
        else:
            choices = [
                "/api/../api/generate",
                "/api/./generate",
                "/api/x/../generate",
                "/api/%2e%2e/api/generate",
                "/v1/../../etc/passwd",
            ]
        p = rng.choice(choices)
        body = orjson.dumps(_valid_body(rng, "/api/generate", stream=False))
        headers = [("Idempotency-Key", key)]
        return Case(kind, p, _request("POST", p, body, headers), framing=True), key
    assert kind == "good"
    body = orjson.dumps(_valid_body(rng, path))
    return Case(kind, path, _request("POST", path, body, [("Idempotency-Key", key)])), key


#: Case kinds and their weights.
KINDS: dict[str, float] = {
    "good": 6,
    "body-random": 6,
    "body-bad-utf8": 5,
    "body-truncated": 5,
    "body-wrong-type": 10,
    "body-huge-string": 0.3,
    "body-deep-nesting": 1,
    "body-numbers": 3,
    "body-number-fallback": 0.5,
    "body-nan": 2,
    "body-duplicate-keys": 2,
    "body-nul": 3,
    "body-surrogate": 3,
    "hdr-oversized": 2,
    "hdr-many": 1,
    "hdr-invalid": 4,
    "frame-length": 4,
    "frame-chunked": 4,
    "frame-request-line": 3,
    "passthrough": 4,
    "path-odd": 2,
    "path-dot-segments": 0.5,
    "hdr-content-encoding": 0.5,
    **{f"up-{b}": (0.3 if b in ("huge-line", "huge-no-newline") else 2) for b in BEHAVIOURS},
}


# -- sending and judging ----------------------------------------------------------------------


@dataclass
class Answer:
    """What came back on the socket."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    complete: bool


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return Answer(None, {}, b"", False)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = bytearray()
    complete = True
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            body += await reader.readexactly(int(headers["content-length"]))
        else:
            body += await reader.read()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        complete = False
    return Answer(status, headers, bytes(body), complete)


async def send(host: str, port: int, raw: bytes, timeout: float = CASE_TIMEOUT_S) -> Answer | None:
    """Send ``raw`` on a fresh connection, half-close, read one answer; None on timeout."""

    async def go() -> Answer:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
        try:
            try:  # no half-close: aiohttp drops a connection whose client sent EOF
                writer.write(raw)
                await writer.drain()
            except ConnectionError:
                pass  # the proxy may answer (413) and close before reading everything
            return await _read_answer(reader)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        return None
    except ConnectionError:
        return Answer(None, {}, b"", False)


def _dialect_error(path: str, body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    if not isinstance(obj, dict) or "error" not in obj:
        return False
    err = obj["error"]
    if path.startswith("/v1/"):
        return isinstance(err, dict) and isinstance(err.get("message"), str)
    return isinstance(err, str)


def judge(case: Case, answer: Answer | None) -> str:
    """``ok``, ``unclear`` (not a relay, not a dialect error), ``cut`` or ``timeout``."""
    if answer is None:
        return "ok" if case.framing else "timeout"
    if answer.status is None:
        # Framing-level garbage may be dropped without an answer (aiohttp closes on some).
        return "ok" if case.framing else "cut"
    if not answer.complete and case.raw.startswith(b"HEAD "):
        return "ok"  # no body follows the head of an answer to HEAD
    if not answer.complete:
        relayed = RELAY_HEADER.lower() in answer.headers
        return "ok" if relayed and case.kind in CUT_BY_DESIGN else "cut"
    if answer.status == 500 and RELAY_HEADER.lower() not in answer.headers:
        return "unclear"  # an unhandled exception in the proxy
    if answer.status < 400 or RELAY_HEADER.lower() in answer.headers:
        return "ok"
    if _dialect_error(case.path.split("?")[0], answer.body):
        return "ok"
    if case.framing and any(_dialect_error(p, answer.body) for p in AUDITED[::2]):
        return "ok"  # the request line named another path than the case thought
    if case.framing and answer.status in (400, 404, 405, 413, 414, 417, 431, 501, 505):
        return "ok"  # aiohttp's own answer to a request it cannot parse
    return "unclear"


# -- the run ----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@dataclass
class Result:
    """The figures of one run."""

    cases: int = 0
    seconds: float = 0.0
    crashed: bool = False
    final_ok: bool = False
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    verdicts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    upstream_saw: int = 0
    records: int = 0
    missing: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicated: int = 0
    unexpected_records: int = 0
    verify_ok: bool = False
    verify_summary: str = ""
    examples: dict[tuple[str, str], str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> case kind

    def bad(self, *, known: bool) -> dict[str, int]:
        """Failures per kind (verdict ≠ ok, or missing records), known bugs or the others."""
        out: collections.Counter[str] = collections.Counter()
        for (kind, verdict), n in self.verdicts.items():
            if verdict != "ok" and (kind in KNOWN_BUGS) == known:
                out[f"{kind}/{verdict}"] += n
        for kind, n in self.missing.items():
            if (kind in KNOWN_BUGS) == known:
                out[f"{kind}/no-record"] += n
        return dict(out)

    def table(self) -> str:
        """The summary table, then the failures by kind."""

        def count(verdict: str) -> int:
            return sum(n for (_, v), n in self.verdicts.items() if v == verdict)

        rows: list[list[object]] = [
            ["cases run", self.cases],
            ["seconds", f"{self.seconds:.1f}"],
            ["cases/s", f"{self.cases / max(self.seconds, 1e-9):.0f}"],
            ["proxy crashed", int(self.crashed)],
            ["good request after the run", "ok" if self.final_ok else "FAILED"],
            ["2xx / 3xx", self.statuses["2xx"] + self.statuses["3xx"]],
            ["4xx", self.statuses["4xx"]],
            ["5xx", self.statuses["5xx"]],
            ["no answer (closed) / timeouts", f"{self.statuses['none']} / {count('timeout')}"],
            ["unclear answers (all / known bugs)",
             f"{count('unclear')} / {self._known('unclear')}"],
            ["cut answers (all / known bugs)", f"{count('cut')} / {self._known('cut')}"],
            ["audited requests the upstream saw", self.upstream_saw],
            ["records written", self.records],
            ["records missing (all / known bugs)",
             f"{sum(self.missing.values())} / {sum(n for k, n in self.missing.items() if k in KNOWN_BUGS)}"],  # noqa: E501
            ["records duplicated / unexpected", f"{self.duplicated} / {self.unexpected_records}"],
            ["proxy RSS before (MiB)", f"{self.rss_before_kib / 1024:.1f}"],
            ["proxy RSS after (MiB)", f"{self.rss_after_kib / 1024:.1f}"],
            ["RSS growth (MiB, bound)", f"{self.growth_mib:.1f} (< {RSS_BOUND_MIB})"],
            ["ledger verifies", "yes" if self.verify_ok else "NO: " + self.verify_summary],
        ]  # fmt: skip
        out = table(["fuzz_proxy", "value"], rows)
        for known in (False, True):
            bad = self.bad(known=known)
            if bad:
                title = "known bugs" if known else "NEW FAILURES"
                out += f"\n\n{title}:\n" + "\n".join(f"  {k}: {n}" for k, n in sorted(bad.items()))
        if self.examples:
            out += "\n\nfirst example of each failure:\n" + "\n".join(
                f"  {k[0]}/{k[1]}: {v}" for k, v in sorted(self.examples.items())
            )
        return out

    def _known(self, verdict: str) -> int:
        return sum(n for (k, v), n in self.verdicts.items() if v == verdict and k in KNOWN_BUGS)

    @property
    def growth_mib(self) -> float:
        """RSS growth over the run, MiB."""
        return (self.rss_after_kib - self.rss_before_kib) / 1024

    def check(self, rss_growth_mib: float = RSS_BOUND_MIB) -> None:
        """Assert the run's promises (known bugs aside)."""
        problems = []
        if self.crashed or not self.final_ok:
            problems.append("the proxy crashed or stopped answering")
        if self.bad(known=False):
            problems.append(f"failures: {self.bad(known=False)}")
        if self.duplicated or self.unexpected_records:
            problems.append("duplicated or unexpected records")
        if self.growth_mib >= rss_growth_mib:
            problems.append(f"RSS grew {self.growth_mib:.1f} MiB")
        if not self.verify_ok:
            problems.append(f"ledger does not verify: {self.verify_summary}")
        assert not problems, "\n".join(problems) + "\n" + self.table()


def _start_proxy(workdir: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    ledger = workdir / "ledger"
    errlog = workdir / "proxy.stderr"
    cmd = [
        sys.executable, "-m", "tokentrail", "serve", "--upstream", upstream,
        "--listen", "127.0.0.1:0", "--ledger", str(ledger), "--key", str(workdir / "signing.key"),
        "--log-id", "fuzz", "--max-body-bytes", str(MAX_BODY), "--upstream-timeout", "10",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    err = errlog.open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + 30
    url = verifier = ""
    while time.monotonic() < deadline and not url:
        text = errlog.read_text(errors="replace")
        for line in text.splitlines():
            if "verifier key " in line:
                verifier = line.split("verifier key ", 1)[1].strip()
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].strip()
        if proc.poll() is not None:
            raise RuntimeError("proxy did not start:\n" + text)
        time.sleep(0.05)
    if not url:
        raise RuntimeError("proxy did not start in 30 s")
    return proc, url, verifier, ledger


def _good_request(host: str, port: int) -> bool:
    raw = _request(
        "POST", "/api/generate", orjson.dumps({"model": "m", "prompt": "x", "stream": False})
    )
    answer = asyncio.run(send(host, port, raw))
    return bool(answer and answer.status == 200 and answer.complete)


def run(
    cases: int,
    seed: int,
    workdir: Path,
    concurrency: int = 16,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Run ``cases`` fuzz cases against a fresh proxy; returns the figures (see :meth:`check`)."""
    result = Result()
    seen = Seen()
    with upstream_in_thread(seen=seen) as upstream:
        proc, url, verifier, ledger = _start_proxy(workdir, upstream)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        try:
            for _ in range(50):  # warm up before the first RSS reading
                _good_request(host, int(port))
            result.rss_before_kib = rss_kib(proc.pid)
            start = time.perf_counter()
            asyncio.run(_drive(result, cases, seed, host, int(port), concurrency, progress))
            result.seconds = time.perf_counter() - start
            result.crashed = proc.poll() is not None
            if not result.crashed:
                result.rss_after_kib = rss_kib(proc.pid)
                result.final_ok = _good_request(host, int(port))
        finally:
            stop_process(proc, grace=30)
    _account(result, seen, ledger, verifier)
    return result


async def _drive(
    result: Result,
    cases: int,
    seed: int,
    host: str,
    port: int,
    concurrency: int,
    progress: Callable[[int], None] | None,
) -> None:
    rng = random.Random(seed)
    queue: asyncio.Queue[tuple[Case, str] | None] = asyncio.Queue(concurrency * 2)
    key_kinds: dict[str, str] = {}

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            case, _ = item
            # A framing case may promise bytes it never sends: the proxy rightly waits for them.
            answer = await send(
                host, port, case.raw, FRAMING_WAIT_S if case.framing else CASE_TIMEOUT_S
            )
            verdict = judge(case, answer)
            if answer is None or answer.status is None:
                result.statuses["none"] += 1
            else:
                result.statuses[f"{answer.status // 100}xx"] += 1
            result.verdicts[(case.kind, verdict)] += 1
            if verdict != "ok" and (case.kind, verdict) not in result.examples:
                shown = b"" if answer is None else answer.body[:120]
                status = None if answer is None else answer.status
                result.examples[(case.kind, verdict)] = f"{case.raw[:160]!r} -> {status} {shown!r}"
            result.cases += 1

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    for n in range(cases):
        case, key = make_case(rng, n, seed)
        key_kinds[key] = case.kind
        await queue.put((case, key))
        if progress is not None and n % 5000 == 0:
            progress(n)
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers)
    result.kinds = key_kinds


def _account(result: Result, seen: Seen, ledger: Path, verifier: str) -> None:
    """Match the keys the upstream saw with the records' keys; verify the ledger."""
    with seen.lock:
        saw = dict(seen.keys)
    result.upstream_saw = len(saw)
    recorded: collections.Counter[str] = collections.Counter()
    for seg in sorted((ledger / "logs" / "fuzz" / "segments").glob("*/*.jsonl")):
        for line in seg.read_bytes().splitlines():
            rec = orjson.loads(line)
            result.records += 1
            key = rec.get("idempotency_key")
            if isinstance(key, str):
                recorded[key] += 1
    saw = {k: v for k, v in saw.items() if k in result.kinds}  # headers the fuzz itself mangled
    result.upstream_saw = len(saw)
    for key in saw:
        if recorded[key] == 0:
            result.missing[result.kinds.get(key, "?")] += 1
    result.duplicated = sum(n - 1 for k, n in recorded.items() if n > 1 and k in result.kinds)
    result.unexpected_records = sum(1 for k in recorded if k.startswith("fz-") and k not in saw)
    with tempfile.TemporaryDirectory() as state:
        report = verify_local(
            ledger,
            VerifyOptions(
                [Verifier.from_text(verifier)], require_sealed=True, state_dir=Path(state)
            ),
        )
    result.verify_ok = report.ok
    result.verify_summary = report.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()

        def progress(n: int) -> None:
            print(
                f"  {n} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True
            )

        result = run(args.cases, args.seed, Path(tmp), args.concurrency, progress)
        print(result.table())
        try:
            result.check()
        except AssertionError:
            sys.exit(1)


if __name__ == "__main__":
    main()
