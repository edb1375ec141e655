"""The in-process SDK, driven through the official ``ollama`` and ``openai`` packages.

Against the simulator in every mode, sync and async, streamed and not: the wrapped client returns
what the bare client returns (compared with ``model_dump()``, the simulator's per-response ids
and clocks blanked), each call leaves exactly one record whose content equals what the proxy's
capture makes of the same exchange on the wire, and the ledger verifies.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import inspect
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import httpx
import ollama
import openai
import pytest

from tokentrail._capture import Meta, loads, new_capture
from tokentrail._checkpoint import Signer
from tokentrail._errors import ConfigError, StoreError
from tokentrail._ledger import Durability
from tokentrail._sdk import (
    HFTokenizer,
    Recorder,
    TiktokenBPE,
    audit,
    load_tokenizer,
    session_turns,
)
from tokentrail._sdk._calls import Auditor, wire_copy
from tokentrail._sdk._tokenizers import bpe_encode
from tokentrail._sim import SimConfig, sim_in_thread
from tokentrail._verify import VerifyOptions, verify_local

MODEL = "llama3.2:1b"
OLLAMA_MODES = ("ollama-0.4", "ollama")
# What the installed clients can ask for (the package accepts ollama >= 0.4, openai >= 1.40;
# .ci/run runs this file with those too): ollama's logprobs came in 0.6.1, openai's
# chat.completions.parse outside ``beta`` in 2.
OLLAMA_LOGPROBS = "logprobs" in inspect.signature(ollama.Client.generate).parameters
OPENAI_PARSE = hasattr(openai.resources.chat.Completions, "parse")
OPENAI_MODES = ("openai", "llamacpp", "vllm")
MSGS: list[Any] = [{"role": "user", "content": "Tell me about audits"}]
SRC = Path(__file__).resolve().parents[1] / "src"

# Per-response values the simulator makes up (and fields only one side can know).
VOLATILE = {"id", "created", "created_at", "system_fingerprint", "obfuscation", "timings"}
VOLATILE_RECORD = {
    "event_id",
    "timestamp",
    "request_duration_ms",
    "time_to_first_token_ms",
    "ollama.durations_ns",
    "gen_ai.response.id",
    "openai.response.system_fingerprint",
    "model_version",
    "tokentrail.via",
    "tokentrail.sdk.client",
    "user_id",
    "session_id",
    "http.response.status_code",
}


def blank(value: Any) -> Any:
    """``value`` with the simulator's per-response values (ids, clocks) blanked."""
    if isinstance(value, dict):
        return {
            k: "*" if k in VOLATILE or k.endswith("duration") else blank(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [blank(v) for v in value]
    return value


def dump(obj: Any) -> Any:
    return blank(obj.model_dump())


def streaming_chat(cls: Any, sims: dict[str, str], recorder: Recorder) -> Any:
    """``chat.completions.with_streaming_response`` of an audited ``cls`` on the simulator."""
    wrapped = audit(cls(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder)
    return wrapped.chat.completions.with_streaming_response


def assert_disconnect_holds(recorder: Recorder, lines: list[str]) -> None:
    """The one record is a ``client_disconnect`` whose output is the text of the chat chunks
    in the SSE ``lines`` the caller read."""
    recorder.flush()
    (rec,) = read_records(recorder.writer.config.root)
    chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ")]
    shown = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert rec["stop_reason"] == "client_disconnect"
    assert shown and rec["output_text"] == shown


def _bytes(piece: str | bytes) -> bytes:
    return piece.encode() if isinstance(piece, str) else piece


def read_records(root: Path) -> list[dict[str, Any]]:
    """Every record of every log, in order, after checking seq, prev_hash and the seed hashes."""
    out: list[dict[str, Any]] = []
    for log in sorted((root / "logs").iterdir()):
        lines = [
            ln
            for f in sorted((log / "segments").glob("*/*.jsonl"))
            for ln in f.read_bytes().split(b"\n")
            if ln
        ]
        prev = "0" * 64
        for seq, line in enumerate(lines):
            rec = json.loads(line)
            assert (seq, prev) == (rec["seq"], rec["prev_hash"])
            for side in ("input", "output"):
                want = hashlib.sha256(json.dumps(rec[f"{side}_tokens"]).encode()).hexdigest()
                assert want == rec[f"{side}_hash"]
            prev = hashlib.sha256(b"\x00" + line).hexdigest()
            out.append(rec)
    return out


def verify(root: Path, signer: Signer, state: Path) -> None:
    report = verify_local(root, VerifyOptions(verifiers=[signer.verifier], state_dir=state))
    assert report.ok, report


def wire_record(base: str, path: str, body: dict[str, Any], api: str) -> dict[str, Any]:
    """What the proxy's capture records for ``body`` sent straight to the simulator."""
    capture = new_capture(api, body)
    with httpx.Client(timeout=30) as http:
        resp = http.post(base + path, json=body)
    for line in resp.content.splitlines():
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
            if line == b"[DONE]":
                capture.finished = True
                continue
        if line:
            capture.feed(loads(line))
    meta = Meta(status=resp.status_code, extra={"stream": capture.stream})
    return capture.finish(meta).fields()


def same_content(sdk: dict[str, Any], proxy: dict[str, Any]) -> None:
    """Records agree on everything but volatile values and provenance; a time to first token
    only for a streamed answer, as the proxy's (a whole body has none apart from its end)."""
    assert ("time_to_first_token_ms" in sdk) == bool(sdk["stream"]), sdk
    a = {k: v for k, v in sdk.items() if k not in VOLATILE_RECORD}
    b = {k: v for k, v in proxy.items() if k not in VOLATILE_RECORD}
    for k in ("schema", "log_id", "seq", "prev_hash"):
        a.pop(k, None)
    assert b == a


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, str]]:
    """One simulator per mode (deterministic, no delays)."""
    with ExitStack() as stack:
        yield {
            m: stack.enter_context(sim_in_thread(SimConfig(mode=m)))
            for m in (*OLLAMA_MODES, *OPENAI_MODES)
        }


@pytest.fixture
def signer() -> Signer:
    return Signer.generate("sdk-test")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture(params=["strict", "async"])
def recorder(root: Path, signer: Signer, request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """Both durabilities: strict builds records on the caller's thread, async on the writer's."""
    rec = Recorder.open(root, key=signer, log_id="sdk", durability=request.param)
    yield rec
    rec.close()


def ollama_calls(mode: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, kwargs) for generate and chat, streamed and not."""
    lp = {"logprobs": True} if mode == "ollama" and OLLAMA_LOGPROBS else {}
    return [
        ("generate", "/api/generate", {"model": MODEL, "prompt": "Write a haiku", **lp}),
        ("generate", "/api/generate", {"model": MODEL, "prompt": "Stream it", "stream": True}),
        ("chat", "/api/chat", {"model": MODEL, "messages": MSGS}),
        ("chat", "/api/chat", {"model": MODEL, "messages": MSGS, "stream": True, **lp}),
    ]


def openai_calls(mode: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(resource, path, kwargs) for chat and legacy completions, streamed and not."""
    ids = {"extra_body": {"return_token_ids": True}} if mode == "vllm" else {}
    return [
        ("chat", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, **ids}),
        (
            "chat",
            "/v1/chat/completions",
            {"model": MODEL, "messages": MSGS, "logprobs": True, "stream": True},
        ),
        (
            "chat",
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": MSGS,
                "stream": True,
                "stream_options": {"include_usage": True},
                **ids,
            },
        ),
        ("completions", "/v1/completions", {"model": MODEL, "prompt": "Once", "logprobs": 1}),
        ("completions", "/v1/completions", {"model": MODEL, "prompt": "Once", "stream": True}),
    ]


def openai_create(client: Any, resource: str) -> Callable[..., Any]:
    return client.chat.completions.create if resource == "chat" else client.completions.create


def expected_api(path: str) -> str:
    return {
        "/api/generate": "ollama.generate",
        "/api/chat": "ollama.chat",
        "/v1/chat/completions": "openai.chat",
        "/v1/completions": "openai.completions",
    }[path]


class TestOllama:
    """``ollama.Client`` and ``ollama.AsyncClient`` through the wrapper."""

    @pytest.mark.parametrize("mode", OLLAMA_MODES)
    def test_sync(
        self,
        sims: dict[str, str],
        recorder: Recorder,
        root: Path,
        signer: Signer,
        tmp_path: Path,
        mode: str,
    ) -> None:
        """Same results as the bare client, one record each, equal to the proxy's capture."""
        bare = ollama.Client(host=sims[mode])
        wrapped = audit(bare, ledger=recorder, user_id="alice", session_id="s1")
        assert isinstance(wrapped, ollama.Client)
        digest = next(m.digest for m in bare.list().models if m.model == MODEL)
        calls = ollama_calls(mode)
        for method, _, kwargs in calls:
            want = getattr(bare, method)(**kwargs)
            got = getattr(wrapped, method)(**kwargs)
            if kwargs.get("stream"):
                want, got = list(want), list(got)
                assert [type(x) for x in want] == [type(x) for x in got]
                assert [dump(x) for x in want] == [dump(x) for x in got]
            else:
                assert type(want) is type(got)
                assert dump(want) == dump(got)
        recorder.flush()
        recs = read_records(root)
        assert len(calls) == len(recs)
        for rec, (_, path, _) in zip(recs, calls, strict=True):
            assert (rec["api"], rec["user_id"], rec["session_id"]) == (
                expected_api(path),
                "alice",
                "s1",
            )
            assert (digest, "sdk") == (rec["model_version"], rec["tokentrail.via"])
            same_content(rec, wire_record(sims[mode], path, rec["request_body"], rec["api"]))
        sources = [(r["input_token_source"], r["output_token_source"]) for r in recs]
        if mode == "ollama" and OLLAMA_LOGPROBS:
            assert ("upstream-context", "upstream-pieces") == sources[0]
            assert ("none", "upstream-pieces") == sources[3]
        else:
            assert ("upstream-context", "upstream-context") == sources[0]
            assert ("none", "none") == sources[3]
        recorder.close()
        verify(root, signer, tmp_path / "state")

    @pytest.mark.parametrize("durability", ["strict", "async"])
    @pytest.mark.parametrize("mode", OLLAMA_MODES)
    async def test_async(
        self,
        sims: dict[str, str],
        root: Path,
        signer: Signer,
        tmp_path: Path,
        mode: str,
        durability: Durability,
    ) -> None:
        """The asyncio client: same results, same records, through the async path."""
        recorder = await Recorder.aopen(root, key=signer, log_id="sdk", durability=durability)
        bare = ollama.AsyncClient(host=sims[mode])
        wrapped = audit(bare, ledger=recorder)
        assert isinstance(wrapped, ollama.AsyncClient)
        calls = ollama_calls(mode)
        for method, _, kwargs in calls:
            want = await getattr(bare, method)(**kwargs)
            got = await getattr(wrapped, method)(**kwargs)
            if kwargs.get("stream"):
                want = [x async for x in want]
                got = [x async for x in got]
                assert [dump(x) for x in want] == [dump(x) for x in got]
            else:
                assert dump(want) == dump(got)
        await recorder.aclose()
        recs = read_records(root)
        assert len(calls) == len(recs)
        for rec, (_, path, _) in zip(recs, calls, strict=True):
            same_content(rec, wire_record(sims[mode], path, rec["request_body"], rec["api"]))
            assert rec["model_version"] is not None
        verify(root, signer, tmp_path / "state")


class TestOpenAI:
    """``openai.OpenAI`` and ``openai.AsyncOpenAI`` through the wrapper."""

    @pytest.mark.parametrize("mode", OPENAI_MODES)
    def test_sync(
        self,
        sims: dict[str, str],
        recorder: Recorder,
        root: Path,
        signer: Signer,
        tmp_path: Path,
        mode: str,
    ) -> None:
        """Same results and chunk objects, one record each, equal to the proxy's capture."""
        bare = openai.OpenAI(base_url=sims[mode] + "/v1", api_key="sk-secret")
        wrapped = audit(bare, ledger=recorder, user_id="bob")
        assert isinstance(wrapped, openai.OpenAI)
        assert [m.id for m in bare.models.list()] == [m.id for m in wrapped.models.list()]
        calls = openai_calls(mode)
        for res, _, kwargs in calls:
            want = openai_create(bare, res)(**kwargs)
            got = openai_create(wrapped, res)(**kwargs)
            if kwargs.get("stream"):
                assert isinstance(got, openai.Stream)
                want, got = list(want), list(got)
                assert [type(x) for x in want] == [type(x) for x in got]
                assert [dump(x) for x in want] == [dump(x) for x in got]
            else:
                assert type(want) is type(got)
                assert dump(want) == dump(got)
        recorder.flush()
        recs = read_records(root)
        assert len(calls) == len(recs)
        for rec, (_, path, _) in zip(recs, calls, strict=True):
            assert (rec["api"], rec["user_id"]) == (expected_api(path), "bob")
            same_content(rec, wire_record(sims[mode], path, rec["request_body"], rec["api"]))
        sources = [r["output_token_source"] for r in recs]
        best = {"openai": "upstream-pieces", "llamacpp": "upstream-ids", "vllm": "upstream-pieces"}
        if mode == "llamacpp" and sources[1] == "none":  # ids with gaps (see test_proxy)
            assert recs[1]["tokentrail.output_tokens_missing"] > 0
        else:
            assert best[mode] == sources[1]
        if mode == "vllm":
            assert ("upstream-ids", "upstream-ids") == (
                recs[0]["input_token_source"],
                recs[0]["output_token_source"],
            )
        assert recs[2]["gen_ai.usage.output_tokens"] > 0
        assert all("sk-secret" not in json.dumps(r) for r in recs)
        recorder.close()
        verify(root, signer, tmp_path / "state")

    @pytest.mark.parametrize("durability", ["strict", "async"])
    @pytest.mark.parametrize("mode", OPENAI_MODES)
    async def test_async(
        self,
        sims: dict[str, str],
        root: Path,
        signer: Signer,
        tmp_path: Path,
        mode: str,
        durability: Durability,
    ) -> None:
        """The asyncio client: same results and chunks, same records."""
        recorder = await Recorder.aopen(root, key=signer, log_id="sdk", durability=durability)
        bare = openai.AsyncOpenAI(base_url=sims[mode] + "/v1", api_key="k")
        wrapped = audit(bare, ledger=recorder)
        assert isinstance(wrapped, openai.AsyncOpenAI)
        calls = openai_calls(mode)
        for res, _, kwargs in calls:
            want = await openai_create(bare, res)(**kwargs)
            got = await openai_create(wrapped, res)(**kwargs)
            if kwargs.get("stream"):
                assert isinstance(got, openai.AsyncStream)
                want = [x async for x in want]
                got = [x async for x in got]
                assert [dump(x) for x in want] == [dump(x) for x in got]
            else:
                assert dump(want) == dump(got)
        await recorder.aclose()
        recs = read_records(root)
        assert len(calls) == len(recs)
        for rec, (_, path, _) in zip(recs, calls, strict=True):
            same_content(rec, wire_record(sims[mode], path, rec["request_body"], rec["api"]))
        verify(root, signer, tmp_path / "state")

    def test_with_options_stays_audited(self, sims: dict[str, str], recorder: Recorder) -> None:
        """``with_options`` returns an audited client; the request body includes extra_body."""
        wrapped = audit(openai.OpenAI(base_url=sims["vllm"] + "/v1", api_key="k"), ledger=recorder)
        wrapped.with_options(timeout=10).chat.completions.create(
            model=MODEL, messages=MSGS, extra_body={"return_token_ids": True}
        )
        recorder.flush()
        (rec,) = read_records(recorder.writer.config.root)
        assert rec["request_body"] == {
            "model": MODEL,
            "messages": MSGS,
            "return_token_ids": True,
        }
        assert rec["input_token_source"] == "upstream-ids"

    @pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
    def test_a_body_the_library_cannot_encode_leaves_no_record(
        self, sims: dict[str, str], recorder: Recorder, asynchronous: bool
    ) -> None:
        """A UUID in the body: the library's own TypeError, and no record (nothing was sent).
        A datetime, which the library encodes its own way (since openai 1.x's openapi_dumps;
        1.40 refuses it too), is recorded as it was sent."""
        url = sims["openai"] + "/v1"
        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        bare = cls(base_url=url, api_key="k", max_retries=0)
        wrapped = audit(cls(base_url=url, api_key="k", max_retries=0), ledger=recorder)
        at = datetime(2026, 1, 31, 12, 0, 1, 5)

        def create(client: Any, metadata: dict[str, Any]) -> Any:
            extra = {"metadata": metadata}  # (through extra_body: openai 1.40 has no metadata)
            made = client.chat.completions.create(model=MODEL, messages=MSGS, extra_body=extra)
            return asyncio.run(made) if asynchronous else made

        with pytest.raises(TypeError) as unwrapped:
            create(bare, {"id": uuid.uuid4()})
        with pytest.raises(TypeError) as kept:
            create(wrapped, {"id": uuid.uuid4()})
        assert str(kept.value) == str(unwrapped.value)
        try:
            create(bare, {"at": at})
        except TypeError as refused:
            with pytest.raises(TypeError, match=re.escape(str(refused))):
                create(wrapped, {"at": at})
            recorder.flush()
            assert read_records(recorder.writer.config.root) == []
            return
        create(wrapped, {"at": at})
        recorder.flush()
        (rec,) = read_records(recorder.writer.config.root)
        assert rec["request_body"]["metadata"] == {"at": at.isoformat()}

    @pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
    def test_a_stream_leaves_no_cycle(
        self, sims: dict[str, str], recorder: Recorder, asynchronous: bool
    ) -> None:
        """A stream's HTTP response is freed with the stream, by reference counting as the bare
        client's is: the wrapper's tap on its reads makes no reference cycle (with one, every
        streamed call would leave its response, request and headers to the garbage collector)."""
        kwargs: dict[str, Any] = {"model": "llama3.2:1b", "messages": MSGS, "stream": True}
        url = sims["openai"] + "/v1"

        def read(cls: Any, wrap: bool) -> Any:
            client = cls(base_url=url, api_key="k")
            client = audit(client, ledger=recorder) if wrap else client
            if not asynchronous:
                stream = client.chat.completions.create(**kwargs)
                ref = weakref.ref(stream.response)
                assert list(stream)
                return ref

            async def go() -> Any:
                stream = await client.chat.completions.create(**kwargs)
                ref = weakref.ref(stream.response)
                assert [chunk async for chunk in stream]
                return ref

            return asyncio.run(go())

        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        read(cls, True)  # imports, connections
        gc.collect()
        gc.disable()
        try:
            if read(cls, False)() is not None:  # the bare client's: what the wrapper must match
                pytest.skip(f"openai {openai.__version__} keeps a stream's response in a cycle")
            assert read(cls, True)() is None
        finally:
            gc.enable()
        recorder.flush()
        assert len(read_records(recorder.writer.config.root)) == 2


class TestOpenAIUsage:
    """How applications use the openai client, beyond ``create``."""

    @pytest.mark.parametrize("beta", [False, True], ids=["chat", "beta.chat"])
    def test_parse_and_stream_helpers(
        self, sims: dict[str, str], recorder: Recorder, beta: bool
    ) -> None:
        """``chat.completions.parse`` (structured outputs) and the ``chat.completions.stream``
        helper post as ``create`` does, and are recorded; under ``beta.chat.completions`` too
        (where they lived before openai 2, and still answer), which left no record."""
        if not beta and not OPENAI_PARSE:
            pytest.skip("this openai has parse only under beta")
        wrapped = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder
        )
        completions = (wrapped.beta if beta else wrapped).chat.completions
        parsed = completions.parse(model=MODEL, messages=MSGS)
        with completions.stream(model=MODEL, messages=MSGS) as stream:
            text = "".join(e.delta for e in stream if getattr(e, "type", None) == "content.delta")
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert [(r["api"], r["stop_reason"]) for r in recs] == [("openai.chat", "stop")] * 2
        assert recs[0]["output_text"] == parsed.choices[0].message.content
        assert recs[1]["output_text"] == text and recs[1]["stream"] is True
        assert recs[0]["request_body"]["messages"] == MSGS

    async def test_beta_helpers_async(self, sims: dict[str, str], recorder: Recorder) -> None:
        """The same through ``openai.AsyncOpenAI``."""
        wrapped = audit(
            openai.AsyncOpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder
        )
        parsed = await wrapped.beta.chat.completions.parse(model=MODEL, messages=MSGS)
        async with wrapped.beta.chat.completions.stream(model=MODEL, messages=MSGS) as stream:
            text = "".join(
                [e.delta async for e in stream if getattr(e, "type", None) == "content.delta"]
            )
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert [(r["api"], r["stop_reason"]) for r in recs] == [("openai.chat", "stop")] * 2
        assert recs[0]["output_text"] == parsed.choices[0].message.content
        assert recs[1]["output_text"] == text

    def test_with_raw_response(self, sims: dict[str, str], recorder: Recorder) -> None:
        """``with_raw_response`` (on a resource or on the client) returns the library's raw
        response and the exchange is recorded as ``create``'s is: a whole body at once, parsed or
        not; a stream as its ``parse()`` is read; a raw stream dropped unparsed as
        ``client_disconnect``. They left no record."""
        wrapped = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder
        )
        plain = wrapped.chat.completions.create(model=MODEL, messages=MSGS)
        raw = wrapped.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
        assert isinstance(raw, openai._legacy_response.LegacyAPIResponse)
        assert raw.parse().choices[0].message.content == plain.choices[0].message.content
        unparsed = wrapped.completions.with_raw_response.create(model=MODEL, prompt="Once")
        streamed = wrapped.with_raw_response.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True
        )
        assert isinstance(streamed, openai._legacy_response.LegacyAPIResponse)
        text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
        dropped = wrapped.with_raw_response.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True
        )
        del dropped
        gc.collect()
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        got = [(r["api"], r["stop_reason"], r["stream"]) for r in recs]
        assert got == [
            ("openai.chat", "stop", False),
            ("openai.chat", "stop", False),
            ("openai.completions", "stop", False),
            ("openai.chat", "stop", True),
            ("openai.chat", "client_disconnect", True),
        ]
        assert recs[1]["output_text"] == recs[0]["output_text"]
        assert recs[1]["output_tokens"] == recs[0]["output_tokens"]
        assert recs[2]["output_text"] == json.loads(unparsed.text)["choices"][0]["text"]
        assert recs[3]["output_text"] == text

    async def test_with_raw_response_async(self, sims: dict[str, str], recorder: Recorder) -> None:
        """The same through ``openai.AsyncOpenAI``."""
        wrapped = audit(
            openai.AsyncOpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder
        )
        raw = await wrapped.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)
        streamed = await wrapped.with_raw_response.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in streamed.parse()])
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert [(r["stop_reason"], r["stream"]) for r in recs] == [("stop", False), ("stop", True)]
        assert recs[0]["output_text"] == raw.parse().choices[0].message.content
        assert recs[1]["output_text"] == text

    def test_with_streaming_response(self, sims: dict[str, str], recorder: Recorder) -> None:
        """``with_streaming_response`` (on a resource or on the client) gives the library's
        unread response; the exchange is recorded once the caller has read the body to its end,
        however it reads it (``parse``, ``json``, ``iter_lines``; a stream's ``parse()`` as it is
        iterated), and as ``client_disconnect`` if it leaves it unread. They left no record."""
        wrapped = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder
        )
        answer = wrapped.chat.completions.create(model=MODEL, messages=MSGS)
        want = answer.choices[0].message.content
        chat = wrapped.chat.completions.with_streaming_response
        with chat.create(model=MODEL, messages=MSGS) as response:
            assert response.parse().choices[0].message.content == want
        with wrapped.with_streaming_response.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True
        ) as response:
            chunks = list(response.parse())
        with chat.create(model=MODEL, messages=MSGS) as response:
            assert response.json()["choices"][0]["message"]["content"] == want
        with chat.create(model=MODEL, messages=MSGS, stream=True) as response:
            lines = list(response.iter_lines())
        with chat.create(model=MODEL, messages=MSGS, stream=True):
            pass  # left unread
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert [(r["stop_reason"], r["stream"]) for r in recs] == [
            ("stop", False),
            ("stop", False),
            ("stop", True),
            ("stop", False),
            ("stop", True),
            ("client_disconnect", True),
        ]
        assert [r["output_text"] for r in recs[:5]] == [want] * 5
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert any(line.startswith("data: ") for line in lines)
        assert recs[1]["output_tokens"] == recs[0]["output_tokens"]
        if hasattr(wrapped.beta.chat.completions, "with_streaming_response"):  # openai >= 2
            beta = wrapped.beta.chat.completions.with_streaming_response
            with beta.parse(model=MODEL, messages=MSGS) as response:
                assert response.parse().choices[0].message.content == want
            recorder.flush()
            assert want == read_records(recorder.writer.config.root)[-1]["output_text"]

    @pytest.mark.parametrize("how", ["iter_lines", "iter_bytes", "iter_text"])
    def test_streaming_response_left_half_way(
        self, sims: dict[str, str], recorder: Recorder, how: str
    ) -> None:
        """A caller that leaves its loop over a streaming response's body half-way has a
        ``client_disconnect`` record holding the events it read, not an empty one."""
        chat = streaming_chat(openai.OpenAI, sims, recorder)
        read = b""
        with chat.create(model=MODEL, messages=MSGS, stream=True, max_tokens=8) as response:
            for piece in getattr(response, how)():
                read += piece.encode() + b"\n" if how == "iter_lines" else _bytes(piece)
                if read.count(b"data: ") >= 3 and read.endswith(b"\n\n"):
                    break
        assert_disconnect_holds(recorder, read.decode().split("\n"))

    async def test_async_streaming_response_left_half_way(
        self, sims: dict[str, str], recorder: Recorder
    ) -> None:
        """The same through ``openai.AsyncOpenAI``: the loop left, the response closed."""
        chat = streaming_chat(openai.AsyncOpenAI, sims, recorder)
        lines: list[str] = []
        async with chat.create(model=MODEL, messages=MSGS, stream=True, max_tokens=8) as resp:
            async for line in resp.iter_lines():
                lines.append(line)
                if not line and len([ln for ln in lines if ln.startswith("data: ")]) == 3:
                    break  # at the blank line that ends the third event
        assert_disconnect_holds(recorder, lines)

    async def test_with_streaming_response_async(
        self, sims: dict[str, str], recorder: Recorder
    ) -> None:
        """The same through ``openai.AsyncOpenAI``."""
        chat = streaming_chat(openai.AsyncOpenAI, sims, recorder)
        async with chat.create(model=MODEL, messages=MSGS) as response:
            want = (await response.parse()).choices[0].message.content
        async with chat.create(model=MODEL, messages=MSGS, stream=True) as response:
            text = "".join([c.choices[0].delta.content or "" async for c in await response.parse()])
        async with chat.create(model=MODEL, messages=MSGS, stream=True) as response:
            assert [line async for line in response.iter_lines()]
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert [(r["stop_reason"], r["stream"]) for r in recs] == [
            ("stop", False),
            ("stop", True),
            ("stop", True),
        ]
        assert [r["output_text"] for r in recs] == [want, text, text]

    def test_other_posts_pass_through(self, sims: dict[str, str], recorder: Recorder) -> None:
        """The audited client's ``post`` (what ``beta``'s resources call) sends any other path
        to the caller's client unrecorded, and records chat and legacy completions."""
        wrapped = audit(  # Ollama's OpenAI-compatible API, which serves embeddings too
            openai.OpenAI(base_url=sims["ollama"] + "/v1", api_key="k"), ledger=recorder
        )
        embedded = wrapped.post(
            "/embeddings",
            body={"model": MODEL, "input": "hi"},
            cast_to=openai.types.CreateEmbeddingResponse,
        )
        done = wrapped.post(
            "/completions",
            body={"model": MODEL, "prompt": "Once"},
            cast_to=openai.types.Completion,
        )
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert embedded.data and [("openai.completions", done.choices[0].text)] == [
            (r["api"], r["output_text"]) for r in recs
        ]

    async def test_context_managers_and_aclose(
        self, sims: dict[str, str], recorder: Recorder
    ) -> None:
        """``with`` / ``async with`` an audited client works as with the client itself, and
        ``aclose()`` of an async stream records it."""
        url = sims["openai"] + "/v1"
        with audit(openai.OpenAI(base_url=url, api_key="k"), ledger=recorder) as client:
            client.chat.completions.create(model=MODEL, messages=MSGS)
        async with audit(openai.AsyncOpenAI(base_url=url, api_key="k"), ledger=recorder) as ac:
            stream = await ac.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
            await stream.__anext__()
            await stream.aclose()
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert [r["stop_reason"] for r in recs] == ["stop", "client_disconnect"]

    def test_settings_changed_after_wrapping(
        self, sims: dict[str, str], recorder: Recorder
    ) -> None:
        """An api_key or base_url set later, on the audited client or on the caller's own, is
        the one the next call uses, as it would be unwrapped."""
        seen: list[str] = []

        def note(r: httpx.Request) -> None:
            seen.append(f"{r.url.host} {r.headers['authorization']}")

        http = httpx.Client(event_hooks={"request": [note]})
        bare = openai.OpenAI(base_url="http://192.0.2.1:9/v1", api_key="old", http_client=http)
        wrapped = audit(bare, ledger=recorder)
        wrapped.base_url = sims["openai"] + "/v1"
        wrapped.api_key = "new"
        wrapped.chat.completions.create(model=MODEL, messages=MSGS)
        bare.api_key = "newer"
        wrapped.chat.completions.create(model=MODEL, messages=MSGS)
        assert seen == ["127.0.0.1 Bearer new", "127.0.0.1 Bearer newer"]
        recorder.flush()
        assert 2 == len(read_records(recorder.writer.config.root))

    def test_stopping_at_the_finish_reason(self, sims: dict[str, str], recorder: Recorder) -> None:
        """A caller that stops reading at the chunk with ``finish_reason`` had the whole answer:
        the model's own reason is recorded, not client_disconnect."""
        wrapped = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=recorder
        )
        stream = wrapped.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
        text = ""
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                break
        stream.close()
        recorder.flush()
        (rec,) = read_records(recorder.writer.config.root)
        assert (rec["stop_reason"], rec["output_text"]) == ("stop", text)


class TestCancelled:
    @pytest.mark.parametrize("client", ["openai", "ollama"])
    async def test_cancelled_call_is_a_client_disconnect(
        self, recorder: Recorder, client: str
    ) -> None:
        """An async call the caller cancels (a timeout around it) after it was sent: the
        caller gave up, so client_disconnect, not an upstream error."""
        with sim_in_thread(SimConfig(mode=client, ttft_ms=3000)) as url:
            if client == "openai":
                oai = audit(openai.AsyncOpenAI(base_url=url + "/v1", api_key="k"), ledger=recorder)
                call = oai.chat.completions.create(model=MODEL, messages=MSGS)
            else:
                oc = audit(ollama.AsyncClient(host=url), ledger=recorder)
                call = oc.generate(model=MODEL, prompt="x")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call, 0.3)
        recorder.flush()
        (rec,) = read_records(recorder.writer.config.root)
        assert rec["stop_reason"] == "client_disconnect"
        assert "error_message" not in rec


class TestRecorderClose:
    """What a recorder's close does to calls still in flight, and to calls after it."""

    @pytest.mark.parametrize("durability", ["strict", "async"])
    def test_stream_held_at_exit(
        self, sims: dict[str, str], tmp_path: Path, signer: Signer, durability: str
    ) -> None:
        """A stream still referenced when the program exits (a global, read half-way or to its
        finish_reason) is recorded at exit, before the writer stops, not lost."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        script = f"""
import ollama, openai
from tokentrail._sdk import Recorder, audit
rec = Recorder.open({str(root)!r}, key={str(key)!r}, log_id="sdk", durability={durability!r})
oai = audit(openai.OpenAI(base_url={sims["openai"]!r} + "/v1", api_key="k"), ledger=rec)
msgs = [{{"role": "user", "content": "hi"}}]
held = oai.chat.completions.create(model={MODEL!r}, messages=msgs, stream=True)
next(held)
oc = audit(ollama.Client(host={sims["ollama"]!r}), ledger=rec)
gen = oc.generate(model={MODEL!r}, prompt="a long answer", stream=True)
next(gen)
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, timeout=60, capture_output=True, text=True
        )
        assert out.returncode == 0 and "lost" not in out.stderr, out.stderr
        recs = read_records(root)
        assert [r["stop_reason"] for r in recs] == ["client_disconnect"] * 2
        verify(root, signer, tmp_path / "state")

    def test_calls_after_close_are_refused(self, sims: dict[str, str], recorder: Recorder) -> None:
        """After close, a wrapped call is refused before it is sent (no unaudited answer)."""
        sent: list[str] = []
        http = httpx.Client(event_hooks={"request": [lambda r: sent.append(r.url.path)]})
        oai = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k", http_client=http),
            ledger=recorder,
        )
        oc = audit(ollama.Client(host=sims["ollama"]), ledger=recorder)
        recorder.close()
        with pytest.raises(StoreError, match="closed"):
            oai.chat.completions.create(model=MODEL, messages=MSGS)
        with pytest.raises(StoreError, match="closed"):
            oc.generate(model=MODEL, prompt="x")
        assert sent == []


def train_tokenizer(path: Path) -> Any:
    """A real byte-level BPE trained on a few sentences, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sentences = [
        "Why is the sky blue? Rayleigh scattering of sunlight.",
        "Tell me about audits and the people who run them.",
        "An audit trail records every token, in order, for good.",
        "Once upon a time the model answered with light and more light.",
    ]
    tok.train_from_iterator(sentences * 20, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


class TestTokenizers:
    """``local:<name>`` token capture from a tokenizer on disk."""

    def test_hf_tokenizer_json(
        self, sims: dict[str, str], root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """With no upstream token data, the record holds the tokenizer's own encoding."""
        path = tmp_path / "tiny-bpe" / "tokenizer.json"
        tok = train_tokenizer(path)
        local = HFTokenizer(path)
        assert local.name == "tiny-bpe"
        with Recorder.open(root, key=signer, log_id="sdk", tokenizer={MODEL: local}) as rec:
            wrapped = audit(openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k"), ledger=rec)
            wrapped.chat.completions.create(model=MODEL, messages=MSGS)
            rec.record(model="other", input_text="no tokenizer for me", output_text="none")
            rec.record(model=MODEL, input_text="Why is the sky blue?", output_text="Rayleigh")
        chat, other, plain = read_records(root)
        for r in (chat, plain):
            assert (r["input_token_source"], r["output_token_source"]) == (
                "local:tiny-bpe",
                "local:tiny-bpe",
            )
            assert tok.encode(r["input_text"], add_special_tokens=False).ids == r["input_tokens"]
            assert tok.encode(r["output_text"], add_special_tokens=False).ids == r["output_tokens"]
        assert tok.decode(chat["output_tokens"]) == chat["output_text"]
        assert (other["input_token_source"], other["input_tokens"]) == ("none", None)
        verify(root, signer, tmp_path / "state")

    def test_tokenizer_given_as_a_path(self, root: Path, signer: Signer, tmp_path: Path) -> None:
        """``tokenizer=`` takes a file's path (str or Path, alone or in a mapping) as well as a
        loaded tokenizer; anything else is a ConfigError at ``open``, with the log left free.
        A path used to be accepted and to fail the first record with an AttributeError, after
        its wrapped call had gone out."""
        path = tmp_path / "tiny-bpe" / "tokenizer.json"
        tok = train_tokenizer(path)
        for given in (str(path), path, {"*": str(path)}, {"m": path}):
            with Recorder.open(root, key=signer, log_id="sdk", tokenizer=given) as rec:
                rec.record(model="m", input_text="Why is the sky blue?", output_text="Rayleigh")
        for r in read_records(root):
            assert ("local:tiny-bpe", tok.encode(r["input_text"]).ids) == (
                r["input_token_source"],
                r["input_tokens"],
            )
        for bad, complaint in (
            (42, "not int"),
            ({"m": 42}, r"tokenizer\['m'\] must be"),
            ({1: str(path)}, "model name must be a string"),
        ):
            with pytest.raises(ConfigError, match=complaint):
                Recorder.open(root, key=signer, log_id="sdk", tokenizer=bad)
        Recorder.open(root, key=signer, log_id="sdk").close()  # not left held by the refusal

    def test_tiktoken_format(self, tmp_path: Path) -> None:
        """A tiktoken BPE file: leftmost lowest-rank merges, and the bytes round-trip."""
        merges = [b"ab", b"abc", b"bc", b" a", b"cd"]
        tokens = [bytes([i]) for i in range(256)] + merges
        path = tmp_path / "r50k_base.tiktoken"
        path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
        bpe = load_tokenizer(path)
        assert isinstance(bpe, TiktokenBPE) and bpe.name == "r50k_base"
        ranks = bpe.ranks
        assert [ranks[b"abc"], ranks[b"d"]] == bpe_encode(b"abcd", ranks)
        assert [ranks[b"ab"], ranks[b"cd"]] == bpe_encode(b"abcd", {**ranks, b"abc": 999})
        text = "abcd abc, ok ☀ 123"
        ids = bpe.encode(text)
        inverse = {v: k for k, v in ranks.items()}
        assert text.encode() == b"".join(inverse[i] for i in ids)
        assert [ord("x"), ord(" "), ranks[b"abc"]] == bpe.encode("x abc")  # ab, then abc
        with pytest.raises(ConfigError, match="pattern"):
            TiktokenBPE(path, name="mystery")


class TestPlainAPI:
    """``record``, ``arecord`` and the ``exchange`` scope."""

    async def test_record_and_exchange(self, root: Path, signer: Signer, tmp_path: Path) -> None:
        """The seed's fields land as given; the scope times the body and records its failure."""
        with Recorder.open(root, key=signer, log_id="plain") as rec:
            r0 = rec.record(
                model="acme-1",
                input_text="hi",
                output_text="hello",
                input_tokens=[1, 2],
                output_tokens=["hel", "lo"],
                user_id="u",
                session_id="s",
                model_version="acme-1@2025",
                stop_reason="length",
                request_duration_ms=12.5,
            )
            with rec.exchange(model="acme-1", input_text="q", session_id="s") as ex:
                ex.output_text = "a"
            with pytest.raises(ZeroDivisionError), rec.exchange(model="acme-1", input_text="x"):
                _ = 1 / 0
            await rec.arecord(model="acme-1", input_text="async", output_text="ok")
            async with rec.exchange(model="acme-1", input_text="async scope") as aex:
                aex.stop_reason = "tool_calls"
        assert r0.seq == 0
        recs = read_records(root)
        assert ["length", "stop", "upstream_error", "stop", "tool_calls"] == [
            r["stop_reason"] for r in recs
        ]
        first = recs[0]
        assert (first["input_token_source"], first["output_token_source"]) == (
            "upstream-ids",
            "upstream-pieces",
        )
        assert (first["api"], first["model_version"], first["request_duration_ms"]) == (
            "sdk",
            "acme-1@2025",
            12.5,
        )
        assert recs[1]["request_duration_ms"] > 0 and recs[1]["output_text"] == "a"
        assert recs[2]["error.type"] == "builtins.ZeroDivisionError"
        assert "division by zero" in recs[2]["error_message"]
        assert (recs[3]["input_tokens"], recs[3]["input_token_source"]) == (None, "none")
        verify(root, signer, tmp_path / "state")

    def test_a_recorder_is_not_pickled(self, recorder: Recorder) -> None:
        """Sent to another process (a spawn pool's argument), a recorder says to open one
        there, not "cannot pickle '_thread.lock' object"."""
        import pickle

        with pytest.raises(TypeError, match="open one in each process"):
            pickle.dumps(recorder)

    def test_bad_arguments(self, recorder: Recorder) -> None:
        """Bad tokens and unknown clients are a ConfigError, not a broken record."""
        with pytest.raises(ConfigError):
            recorder.record(model="m", input_tokens=[1, object()])
        with pytest.raises(ConfigError, match="cannot audit"):
            audit(object(), ledger=recorder)
        for module, client in ((ollama, "ollama.Client()"), (openai, "openai.OpenAI()")):
            with pytest.raises(ConfigError, match=re.escape(f"tokentrail.audit({client}")):
                audit(module, ledger=recorder)  # its functions (ollama.chat) call its own client
        with pytest.raises(ConfigError, match=re.escape("cannot audit a builtins.module")):
            audit(json, ledger=recorder)  # another module: no client of it to suggest
        for name, value in (("user_id", "bob\uffff"), ("session_id", "s\ud800")):
            with pytest.raises(ConfigError, match=f"{name} .* holds a lone surrogate or a"):
                audit(ollama.Client(), ledger=recorder, **{name: value})
            with pytest.raises(ConfigError, match=f"{name} .* holds a lone surrogate or a"):
                recorder.exchange(model="m", **{name: value})

    def test_an_event_id_used_already_is_refused(self, recorder: Recorder, root: Path) -> None:
        """A caller's ``event_id`` this recorder stored a record under already: a ConfigError,
        not a second record under it (a caller's retry, or a mistake)."""
        chosen = "0b6e2c9e-6a5e-4f7e-9d0e-3f1a2b4c5d6e"
        recorder.record(model="m", event_id=chosen)
        with pytest.raises(ConfigError, match="recorded already"):
            recorder.record(model="m", event_id=chosen)
        recorder.flush()
        assert [chosen] == [r["event_id"] for r in read_records(root)]

    @pytest.mark.parametrize(
        ("fields", "complaint"),
        [
            ({"input_tokens": [1, "a"]}, "mixes token ids and pieces"),
            ({"input_tokens": [-1]}, "not between 0 and 2"),
            ({"input_tokens": [1 << 64]}, "not between 0 and 2"),
            ({"input_tokens": [1], "input_token_source": "upstream-pieces"}, "ids are given"),
            ({"input_tokens": ["a"], "input_token_source": "upstream-ids"}, "pieces are given"),
            ({"output_tokens": ["a"], "output_token_source": "upstream-context"}, "pieces are"),
            ({"output_token_source": "upstream-ids"}, "none given"),
            ({"extra": {"content_sealed": True}}, "tokentrail's own"),
            ({"extra": {"Authorization": "Bearer sk-1"}}, "looks like a secret"),
            ({"stop_reason": ""}, "stop_reason must say"),
            ({"timestamp": "2030-01-01T00:00:00Z"}, "in the future"),
            pytest.param(  # an id of its own: the value differs between collections
                {"timestamp": time.time() + 3600}, "in the future", id="timestamp-an-hour-ahead"
            ),
            ({"output_tokens": [[300]]}, "byte values"),
            ({"output_tokens": [True]}, "not a token id"),
            ({"model": None}, "model must be"),
            ({"model": 5}, "model must be"),
            ({"model": ""}, "model must name the model"),
            ({"user_id": 123}, "user_id must be a string"),
            ({"session_id": ["s"]}, "session_id must be a string"),
            ({"user_id": "bob\uffff"}, "noncharacter"),
            ({"user_id": "al\udcffice"}, "lone surrogate"),
            ({"session_id": "s\ufdd0"}, "noncharacter"),
            ({"request_duration_ms": float("nan")}, "must be a wall time in ms"),
            ({"request_duration_ms": -1.0}, "must be a wall time in ms"),
            ({"request_duration_ms": "12"}, "must be a number"),
            ({"timestamp": "2025-01-01 00:00:00"}, "UTC offset"),
            ({"timestamp": "yesterday"}, "not an RFC 3339"),
            ({"timestamp": datetime(2026, 1, 31, 12)}, "no time zone; give an aware datetime"),
            ({"event_id": "hello"}, "lowercase UUID"),
            ({"input_token_source": "bogus", "input_tokens": [1]}, "is not one of"),
            ({"output_token_source": "local:"}, "is not one of"),
            ({"output_token_source": "none", "output_tokens": [1]}, "'none'"),
        ],
        ids=repr,
    )
    def test_values_outside_the_spec_are_refused(
        self, recorder: Recorder, fields: dict[str, Any], complaint: str
    ) -> None:
        """Every value SPEC section 2 rules out is a ConfigError at the call, nothing stored."""
        with pytest.raises(ConfigError, match=complaint):
            recorder.record(**{"model": "m", **fields})
        recorder.flush()
        assert 0 == recorder.writer.size

    def test_scope_refuses_a_bad_model_before_its_block(self, recorder: Recorder) -> None:
        """``exchange(model=None)`` fails at the ``with``, before the caller's work runs."""
        ran: list[bool] = []
        with (
            pytest.raises(ConfigError, match="model must be"),
            recorder.exchange(model=None),  # type: ignore[arg-type]
        ):
            ran.append(True)
        assert [] == ran

    def test_values_are_stored_as_spec_spells_them(self, recorder: Recorder) -> None:
        """Byte values that are UTF-8 become their string; an aware time becomes UTC, µs, Z."""
        r = recorder.record(
            model="m",
            input_tokens=[[65], [], [0xE4, 0xB8, 0xAD], [0xFF]],
            timestamp="2026-01-31T13:00:00+01:00",
            event_id="0b9f4b5e-0d6a-4f57-9c53-3f6f1d4c2e11",
        )
        stored = r.to_json()
        assert (["A", "", "\u4e2d", [0xFF]], "upstream-pieces") == (
            stored["input_tokens"],
            stored["input_token_source"],
        )
        assert "2026-01-31T12:00:00.000000Z" == stored["timestamp"]
        assert "0b9f4b5e-0d6a-4f57-9c53-3f6f1d4c2e11" == stored["event_id"]
        # an aware datetime too (it was refused as "not an RFC 3339 time"), in any zone
        plus_one = timezone(timedelta(hours=1))
        for moment in (datetime(2026, 1, 31, 13, 0, 0, 5, plus_one), datetime(2026, 1, 31, 12,
                       0, 0, 5, UTC)):  # fmt: skip
            again = recorder.record(model="m", timestamp=moment).to_json()
            assert "2026-01-31T12:00:00.000005Z" == again["timestamp"]


class _SlowTags(httpx.HTTPTransport):
    """An Ollama whose ``/api/tags`` takes ``delay`` seconds; every other path is at once."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/tags":
            time.sleep(self.delay)
        return super().handle_request(request)


class _ASlowTags(httpx.AsyncHTTPTransport):
    """:class:`_SlowTags` for an ``ollama.AsyncClient``."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/tags":
            await asyncio.sleep(self.delay)
        return await super().handle_async_request(request)


class TestDigestLookup:
    """``model_version`` of the ollama wrapper: the digest from ``/api/tags``, looked up beside
    the call, never holding it up for long."""

    def test_a_slow_lookup_holds_no_call_up(
        self,
        sims: dict[str, str],
        root: Path,
        recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """/api/tags taking 2.5 s, records allowed to wait 0.5 s for it: a strict call waits
        for the lookup at most until it is 0.5 s old, and the calls after it not at all; an
        async call never waits (its record takes the digest known when it is built). Each
        call waited its own 0.5 s before, until the lookup answered (five calls: 2.5 s; with
        a lookup that kept failing, every call). Once the lookup answers, records carry the
        digest."""
        import tokentrail._digests as digests

        monkeypatch.setattr(digests, "DIGEST_WAIT_S", 0.5)
        bare = ollama.Client(host=sims["ollama"])
        digest = next(m.digest for m in bare.list().models if m.model == MODEL)
        slow = ollama.Client(host=sims["ollama"], transport=_SlowTags(2.5))
        wrapped = audit(slow, ledger=recorder)
        started = time.monotonic()
        for _ in range(5):
            wrapped.generate(model=MODEL, prompt="hi", stream=False)
        took = time.monotonic() - started
        assert took < (1.5 if recorder.durability == "strict" else 0.45), took
        time.sleep(max(0.0, 3.0 - took))  # the lookup has answered
        wrapped.generate(model=MODEL, prompt="hi", stream=False)
        recorder.flush()
        versions = [r["model_version"] for r in read_records(root)]
        assert [digest] == versions[-1:]
        assert all(v in (None, digest) for v in versions), versions

    async def test_a_slow_lookup_holds_no_async_call_up(
        self,
        sims: dict[str, str],
        root: Path,
        recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The same with ``ollama.AsyncClient``."""
        import tokentrail._digests as digests

        monkeypatch.setattr(digests, "DIGEST_WAIT_S", 0.5)
        digest = next(
            m.digest for m in ollama.Client(host=sims["ollama"]).list().models if m.model == MODEL
        )
        slow = ollama.AsyncClient(host=sims["ollama"], transport=_ASlowTags(2.5))
        wrapped = audit(slow, ledger=recorder)
        started = time.monotonic()
        for _ in range(5):
            await wrapped.generate(model=MODEL, prompt="hi", stream=False)
        took = time.monotonic() - started
        assert took < (1.5 if recorder.durability == "strict" else 0.45), took
        await asyncio.sleep(max(0.0, 3.0 - took))
        await wrapped.generate(model=MODEL, prompt="hi", stream=False)
        recorder.flush()
        versions = [r["model_version"] for r in read_records(root)]
        assert [digest] == versions[-1:]
        assert all(v in (None, digest) for v in versions), versions


class TestFaults:
    """Failures: the caller sees the library's own exception; records stay intact."""

    def test_connection_refused(self, recorder: Recorder) -> None:
        """The bare client's exception, and no record (nothing was sent)."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
        bare = ollama.Client(host=url)
        wrapped = audit(bare, ledger=recorder)
        attempts: list[Callable[[Any], object]] = [
            lambda c: c.generate(model=MODEL, prompt="x"),
            lambda c: list(c.chat(model=MODEL, messages=MSGS, stream=True)),
        ]
        for attempt in attempts:
            # ollama maps a refused connection to ConnectionError (since 0.4.x), not in streams
            with pytest.raises((ConnectionError, httpx.ConnectError)) as unwrapped:
                attempt(bare)
            with pytest.raises(type(unwrapped.value)):
                attempt(wrapped)
        oai = audit(
            openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0), ledger=recorder
        )
        with pytest.raises(openai.APIConnectionError) as kept:
            oai.chat.completions.create(model=MODEL, messages=MSGS)
        recorder.flush()
        assert [] == read_records(recorder.writer.config.root)
        # Closing the recorder records the calls still open: a refused one, still referenced
        # (here by the traceback kept), is not one of them (async durability recorded it as a
        # client_disconnect).
        recorder.close()
        assert kept.value is not None
        assert [] == read_records(recorder.writer.config.root)

    def test_timeouts_and_errors(self, sims: dict[str, str], recorder: Recorder) -> None:
        """A timeout or an error status: the library's exception, one upstream_error record."""
        stall = {"X-Sim-Fault": "stall:2000"}
        slow = audit(
            ollama.Client(host=sims["ollama"], headers=stall, timeout=0.3), ledger=recorder
        )
        with pytest.raises(httpx.ReadTimeout):
            slow.generate(model=MODEL, prompt="x")
        oai = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k", max_retries=0, timeout=0.3),
            ledger=recorder,
        )
        with pytest.raises(openai.APITimeoutError):
            oai.chat.completions.create(model=MODEL, messages=MSGS, extra_headers=stall)
        # (the short timeout is the stall's: an error status answered on a busy machine may
        # take longer than 0.3 s)
        oai_err = audit(
            openai.OpenAI(base_url=sims["openai"] + "/v1", api_key="k", max_retries=0),
            ledger=recorder,
        )
        with pytest.raises(openai.InternalServerError):
            oai_err.chat.completions.create(
                model=MODEL, messages=MSGS, extra_headers={"X-Sim-Fault": "500"}
            )
        cut = audit(
            ollama.Client(host=sims["ollama"], headers={"X-Sim-Fault": "cut:3"}), ledger=recorder
        )
        with pytest.raises(Exception):  # noqa: B017 - whatever the library raises for a cut
            list(cut.generate(model=MODEL, prompt="a long answer please", stream=True))
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert ["upstream_error"] * 4 == [r["stop_reason"] for r in recs]
        assert "Timeout" in recs[0]["error_message"]
        assert recs[2]["http.response.status_code"] == 500
        assert recs[3]["output_text"]

    @pytest.mark.parametrize("stream", [False, True])
    def test_error_status_keeps_the_servers_message(
        self, sims: dict[str, str], recorder: Recorder, stream: bool
    ) -> None:
        """An unknown model (404): the record keeps the server's own error body, streamed or
        not, as the proxy's does; the caller gets the library's ResponseError."""
        wrapped = audit(ollama.Client(host=sims["ollama"]), ledger=recorder)
        with pytest.raises(ollama.ResponseError) as raised:
            result = wrapped.generate(model="no-such-model", prompt="x", stream=stream)
            if stream:
                list(result)
        recorder.flush()
        (rec,) = read_records(recorder.writer.config.root)
        assert (rec["stop_reason"], rec["http.response.status_code"]) == ("upstream_error", 404)
        assert rec["error_message"] == raised.value.error

    def test_abandoned_streams(self, sims: dict[str, str], recorder: Recorder) -> None:
        """A stream dropped or closed half-way: client_disconnect with the tokens so far."""
        wrapped = audit(ollama.Client(host=sims["ollama"]), ledger=recorder)
        lp = {"logprobs": True} if OLLAMA_LOGPROBS else {}
        it = wrapped.generate(model=MODEL, prompt="a long answer", stream=True, **lp)
        got = [next(it).response for _ in range(3)]
        del it
        gc.collect()
        oai = audit(openai.OpenAI(base_url=sims["vllm"] + "/v1", api_key="k"), ledger=recorder)
        stream = oai.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True, extra_body={"return_token_ids": True}
        )
        chunks = [next(stream) for _ in range(4)]
        stream.close()
        with oai.completions.create(model=MODEL, prompt="x", stream=True) as s2:
            next(s2)
        recorder.flush()
        recs = read_records(recorder.writer.config.root)
        assert ["client_disconnect"] * 3 == [r["stop_reason"] for r in recs]
        assert "".join(got) == recs[0]["output_text"]
        if OLLAMA_LOGPROBS:
            assert len(recs[0]["output_tokens"]) == 3
            assert recs[0]["output_token_source"] == "upstream-pieces"
        else:  # no token data in the chunks it read: context comes with the last
            assert (None, "none") == (recs[0]["output_tokens"], recs[0]["output_token_source"])
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == recs[1]["output_text"]
        assert recs[1]["output_token_source"] == "upstream-ids"

    async def test_abandoned_async_stream(self, sims: dict[str, str], recorder: Recorder) -> None:
        """An async generator closed half-way is recorded too."""
        wrapped = audit(ollama.AsyncClient(host=sims["ollama"]), ledger=recorder)
        agen = await wrapped.generate(model=MODEL, prompt="a long answer", stream=True)
        await agen.__anext__()
        await agen.aclose()
        recorder.flush()
        (rec,) = read_records(recorder.writer.config.root)
        assert rec["stop_reason"] == "client_disconnect"

    def test_unwritable_ledger(
        self, sims: dict[str, str], root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """The disk refuses writes (RLIMIT_FSIZE, which binds root too): StoreError, history kept.

        A ledger path that is a file is refused at open with a StoreError.
        """
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        with pytest.raises(StoreError):
            Recorder.open(blocker, key=signer, log_id="sdk")
        rec = Recorder.open(root, key=signer, log_id="sdk")
        wrapped = audit(ollama.Client(host=sims["ollama"]), ledger=rec)
        wrapped.generate(model=MODEL, prompt="before")
        before = read_records(root)
        (segment,) = root.glob("logs/sdk/segments/*/*.jsonl")
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size, old_limit[1]))
        try:
            with pytest.raises(StoreError, match="cannot write ledger"):
                wrapped.generate(model=MODEL, prompt="refused")
            with pytest.raises(StoreError):
                list(wrapped.generate(model=MODEL, prompt="refused", stream=True))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        wrapped.generate(model=MODEL, prompt="after")
        rec.close()
        after = read_records(root)
        assert before == after[:1]
        assert ["before", "after"] == [r["input_text"] for r in after]
        verify(root, signer, tmp_path / "state")

    def test_unwritable_ledger_async(
        self, sims: dict[str, str], root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """Async durability: a call accepted before the disk failed is kept and written once it
        recovers; while it fails, new calls are refused before they are sent (StoreError)."""
        rec = Recorder.open(root, key=signer, log_id="sdk", durability="async")
        wrapped = audit(ollama.Client(host=sims["ollama"]), ledger=rec)
        wrapped.generate(model=MODEL, prompt="before")
        rec.flush()
        (segment,) = root.glob("logs/sdk/segments/*/*.jsonl")
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size, old_limit[1]))
        try:
            wrapped.generate(model=MODEL, prompt="accepted")  # queued: the writer finds out
            deadline = time.monotonic() + 10
            while rec.writer.failed_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rec.writer.failed_at is not None
            with pytest.raises(StoreError, match="refusing to send an unaudited call"):
                wrapped.generate(model=MODEL, prompt="refused")
            with pytest.raises(StoreError, match="refusing to send an unaudited call"):
                list(wrapped.generate(model=MODEL, prompt="refused", stream=True))
            with pytest.raises(StoreError, match="refusing to take this record"):
                rec.record(model=MODEL, input_text="refused too")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        rec.flush()  # the writer's own retry writes what it had accepted
        assert rec.writer.failed_at is None
        wrapped.generate(model=MODEL, prompt="after")
        rec.close()
        assert ["before", "accepted", "after"] == [r["input_text"] for r in read_records(root)]
        verify(root, signer, tmp_path / "state")


class TestLazyCalls:
    """A lazy call (async durability: fed now, built on the writer thread) records exactly what
    an eager one (strict: built on the caller's thread) records from the same events."""

    LINES: ClassVar[list[str]] = [
        '{"model":"m","created_at":"t","message":{"role":"assistant","content":"Hel"},'
        '"done":false}',
        # A tool call whose arguments name "done" and "error": not the end of the exchange.
        '{"model":"m","created_at":"t","message":{"role":"assistant","content":"",'
        '"tool_calls":[{"function":{"name":"f","arguments":{"done":true,"error":"x"}}}]},'
        '"done":false}',
        '{"model":"m","created_at":"t","message":{"role":"assistant","content":"lo"},"done":false}',
    ]
    FINAL = (
        '{"model":"m","created_at":"t","message":{"role":"assistant","content":""},'
        '"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":2}'
    )

    @pytest.mark.parametrize("via", ["feed_raw", "feed_line"])
    @pytest.mark.parametrize(
        "case",
        [
            "complete",
            "error line",
            "not json",
            "cut",
            "raised",
            "http 500",
            "whole body",
            "string chunk",
        ],
    )
    def test_same_record(self, tmp_path: Path, signer: Signer, case: str, via: str) -> None:
        """``via``: how each line is fed, as the tests here do or as the wrappers' streamed
        readers do (one call a line). A parsed chunk that is a JSON string is not a line."""
        body = {"model": "m", "messages": MSGS, "stream": case != "whole body"}
        records = []
        for durability in ("strict", "async"):
            rec = Recorder.open(
                tmp_path / durability, key=signer, log_id="lazy", durability=durability
            )
            call = Auditor(rec, user_id="u", session_id="s", client="c").begin(
                "ollama.chat", wire_copy(body)
            )
            assert call.lazy is (durability == "async")
            ends: list[bool] = []
            if case == "whole body":
                call.status = 200
                call.feed_raw((self.LINES[0].replace('"done":false', '"done":true')).encode())
                call.record()
            else:
                lines = list(self.LINES)
                if case == "complete":
                    lines.append(self.FINAL)
                elif case == "error line":
                    lines.append('{"error":"model crashed"}')
                elif case == "not json":
                    lines += ["<html>oops</html>", self.FINAL]
                call.status = 500 if case == "http 500" else 200
                if case == "string chunk":
                    call.feed("a JSON string")
                for line in lines:
                    if via == "feed_line":
                        ends.append(call.feed_line(line))
                    else:
                        call.feed_raw(line)
                        ends.append(call.ended)
                    if ends[-1]:
                        call.record()
                if case == "raised":
                    call.fail(RuntimeError("connection reset"))
                    call.record("upstream_error")
                else:
                    call.record(expect_end=True)
            rec.close()
            (got,) = read_records(tmp_path / durability)
            records.append((ends, {k: v for k, v in got.items() if k not in VOLATILE_RECORD}))
        (strict_ends, strict), (async_ends, lazy) = records
        for k in ("log_id", "seq", "prev_hash"):
            strict.pop(k), lazy.pop(k)
        if case != "not json":  # eager mode sees a bad line at once, lazy at the end
            assert strict_ends == async_ends
        assert strict == lazy
        assert strict["output_text"] or case == "whole body"


@contextmanager
def sim_process(mode: str) -> Iterator[str]:
    """``tokentrail sim`` in a process of its own (its CPU off this process's GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = ["-m", "tokentrail", "sim", "--mode", mode, "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/api/version", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "the simulator exited"
                assert time.monotonic() < deadline, "the simulator did not start"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class TestConcurrency:
    """Many threads through one wrapped client."""

    def test_threads(self, root: Path, signer: Signer, tmp_path: Path) -> None:
        """16 threads x N calls leave exactly 16 x N records and a valid chain."""
        per_thread = int(os.environ.get("TOKENTRAIL_SDK_THREAD_CALLS", "1000"))
        with (
            sim_process("ollama") as url,
            Recorder.open(root, key=signer, log_id="sdk", durability="strict") as rec,
        ):
            wrapped = audit(ollama.Client(host=url), ledger=rec, session_id="load")
            errors: list[BaseException] = []

            def work(n: int) -> None:
                try:
                    for i in range(per_thread):
                        wrapped.generate(
                            model=MODEL, prompt=f"t{n} c{i}", options={"num_predict": 4}
                        )
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []
        recs = read_records(root)
        assert 16 * per_thread == len(recs)
        assert 16 * per_thread == len({r["input_text"] for r in recs})
        verify(root, signer, tmp_path / "state")


class TestDurability:
    """What survives a process that exits without closing its recorder."""

    @pytest.mark.parametrize("how", ["os._exit", "atexit"])
    def test_exit_without_close(self, tmp_path: Path, signer: Signer, how: str) -> None:
        """Strict records survive os._exit; a normal exit seals them at atexit."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        script = f"""
import os
from tokentrail._sdk import Recorder
rec = Recorder.open({str(root)!r}, key={str(key)!r}, log_id="sdk", seal_interval_s=3600)
for i in range(50):
    rec.record(model="m", input_text=f"p{{i}}", output_text="o")
{"os._exit(0)" if how == "os._exit" else "pass"}
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
        assert 50 == len(read_records(root))
        checkpoints = sorted(root.glob("logs/sdk/checkpoints/*.checkpoint"))
        if how == "atexit":
            assert checkpoints[-1].name == f"{50:020d}.checkpoint"
        else:
            assert checkpoints == []
            Recorder.open(root, key=signer, log_id="sdk").close()  # the next writer seals
            verify(root, signer, tmp_path / "state")


class TestFork:
    """A process that forks after opening a recorder (gunicorn's preloaded app, multiprocessing
    workers): the child neither hangs on the parent's writer nor loses its records."""

    @pytest.mark.parametrize("durability", ["strict", "async"])
    @pytest.mark.parametrize("exit_how", ["close", "atexit"])
    def test_child_records_to_a_log_of_its_own(
        self, tmp_path: Path, signer: Signer, durability: str, exit_how: str
    ) -> None:
        """Each forked child writes ``<log id>-<pid>``; parent and children all verify."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        script = f"""
import os, signal, sys
from tokentrail._sdk import Recorder
rec = Recorder.open({str(root)!r}, key={str(key)!r}, log_id="app", durability={durability!r})
rec.record(model="m", input_text="parent, before", output_text="o")
children = []
for n in range(2):
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a hang fails the test instead of stalling it
        for i in range(5):
            rec.record(model="m", input_text=f"child {{n}} #{{i}}", output_text="o")
        {"rec.close()" if exit_how == "close" else "pass"}
        sys.exit(0)  # atexit closes (flushes, seals) what the child opened
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    print(pid)
rec.record(model="m", input_text="parent, after", output_text="o")
rec.close()
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, timeout=120, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        pids = done.stdout.split()
        logs = sorted(p.name for p in (root / "logs").iterdir())
        assert logs == sorted(["app", *(f"app-{pid}" for pid in pids)])
        texts = sorted(r["input_text"] for r in read_records(root))
        assert texts == sorted(
            ["parent, before", "parent, after"]
            + [f"child {n} #{i}" for n in range(2) for i in range(5)]
        )
        for pid in pids:  # each child sealed its log on the way out
            assert (root / "logs" / f"app-{pid}" / "checkpoints" / f"{5:020d}.checkpoint").exists()
        verify(root, signer, tmp_path / "state")

    def test_multiprocessing_children_leave_no_log_unsealed(
        self, tmp_path: Path, signer: Signer
    ) -> None:
        """``multiprocessing`` children end by ``os._exit``, which skips ``atexit``: a
        Process whose target returns closes its recorder at multiprocessing's finalizers; a
        pool's workers, terminated (``with Pool()``), or a child killed, leave their logs
        unsealed, and the parent seals them: once a minute while it runs, and when it closes.
        Before, those logs stayed unsealed for good, and every daily check failed on them."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        script = f"""
import multiprocessing, os, signal, sys, time
from pathlib import Path
import tokentrail._sdk._recorder as R
from tokentrail._sdk import Recorder
R.REAP_INTERVAL_S = 0.2
rec = Recorder.open({str(root)!r}, key={str(key)!r}, log_id="app")
rec.record(model="m", input_text="parent", output_text="o")
logs = Path({str(root)!r}) / "logs"
def sealed(pid):
    return (logs / f"app-{{pid}}" / "checkpoints" / f"{{1:020d}}.checkpoint").exists()
def one(text):
    signal.alarm(30)
    rec.record(model="m", input_text=text, output_text="o")
    return os.getpid()
mp = multiprocessing.get_context("fork")
child = mp.Process(target=one, args=("process",))
child.start()
child.join()
assert child.exitcode == 0, child.exitcode
assert sealed(child.pid), "a Process whose target returned left its log unsealed"
with mp.Pool(2) as pool:
    workers = set(pool.map(one, [f"pool {{n}}" for n in range(4)]))
pid = os.fork()
if pid == 0:
    one("killed")
    os.kill(os.getpid(), signal.SIGKILL)
os.waitpid(pid, 0)
deadline = time.monotonic() + 20
while not sealed(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
assert sealed(pid), "the parent did not seal a killed child's log while it ran"
rec.close()
print(child.pid, pid, *workers)
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, timeout=120, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        pids = done.stdout.split()
        texts = sorted(r["input_text"] for r in read_records(root))
        assert texts == sorted(["parent", "process", "killed"] + [f"pool {n}" for n in range(4)])
        logs = sorted(p.name for p in (root / "logs").iterdir())
        assert logs == sorted(["app", *(f"app-{pid}" for pid in pids)])
        report = verify_local(
            root,
            VerifyOptions(
                verifiers=[signer.verifier], state_dir=tmp_path / "s", require_sealed=True
            ),
        )
        assert report.ok, [f.message for f in report.findings]

    @pytest.mark.parametrize("client", ["ollama", "openai"])
    def test_a_call_in_flight_at_a_kill_is_recorded_interrupted(
        self, tmp_path: Path, signer: Signer, client: str
    ) -> None:
        """SPEC section 6: a crash loses nothing; a request in flight is recorded as
        ``interrupted`` on restart. A strict call is noted before it is sent, as the proxy
        notes an exchange, so the next writer of the log records one the process died in the
        middle of (it left nothing: the model had been asked, and no record said so). A call
        refused before it was sent leaves no note, and no record."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        with sim_in_thread(SimConfig(mode="ollama", token_ms=300)) as slow:
            if client == "ollama":
                make = f"ollama.Client(host={slow!r})"
                refused = "ollama.Client(host='http://127.0.0.1:9')"
                call = "c.generate(model={MODEL!r}, prompt='hi', stream=True)"
                fails = "ollama.ResponseError, httpx.ConnectError, ConnectionError"
            else:
                make = f"openai.OpenAI(base_url={slow + '/v1'!r}, api_key='k', max_retries=0)"
                refused = (
                    "openai.OpenAI(base_url='http://127.0.0.1:9/v1', api_key='k', max_retries=0)"
                )
                call = ("c.chat.completions.create(model={MODEL!r}, stream=True,"
                        " messages=[{{'role': 'user', 'content': 'hi'}}])")  # fmt: skip
                fails = "openai.APIConnectionError"
            script = f"""
import os, signal, sys, httpx, ollama, openai, tokentrail
from tokentrail._sdk import Recorder
rec = Recorder.open({str(root)!r}, key={str(key)!r}, log_id="app")
c = tokentrail.audit({refused}, ledger=rec)
try:
    {call.format(MODEL=MODEL).replace("stream=True", "stream=False")}
    sys.exit("a refused call went through")
except ({fails}):
    pass
c = tokentrail.audit({make}, ledger=rec)
for n, chunk in enumerate({call.format(MODEL=MODEL)}):
    if n == 2:
        os.kill(os.getpid(), signal.SIGKILL)
"""
            done = subprocess.run(
                [sys.executable, "-c", script],
                env={**os.environ, "PYTHONPATH": str(SRC)},
                timeout=120,
                capture_output=True,
                text=True,
            )
        assert -signal.SIGKILL == done.returncode, done.stderr
        Recorder.open(root, key=signer, log_id="app").close()  # the next writer of the log
        records = read_records(root)
        assert 1 == len(records), [(r["stop_reason"], r.get("error_message")) for r in records]
        (rec,) = records
        assert ("interrupted", "sdk", MODEL) == (
            rec["stop_reason"],
            rec["tokentrail.via"],
            rec["model"],
        )
        assert "hi" in json.dumps(rec["request_body"])
        verify(root, signer, tmp_path / "state")

    def test_the_next_writer_of_a_log_id_seals_what_dead_processes_left(
        self, tmp_path: Path, signer: Signer
    ) -> None:
        """Two programs on the default log (the second records to ``<default>-<pid>``), both
        killed: the next process that opens the default log seals both logs as it opens it,
        its own by taking it over, the other's as a parent seals a dead fork's. The second's
        stayed unsealed until a process closed a recorder of that log id (gunicorn workers
        without --preload, one killed: days, for a server that runs for days)."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        script = f"""
import os, signal, sys, time
from tokentrail._sdk import Recorder
rec = Recorder.open({str(root)!r}, key={str(key)!r})
rec.record(model="m", input_text=sys.argv[1], output_text="o")
print(rec.writer.config.log_id, flush=True)
if sys.argv[1] == "first":
    time.sleep(60)  # holds the default log until killed
os.kill(os.getpid(), signal.SIGKILL)
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        first = subprocess.Popen([sys.executable, "-c", script, "first"], env=env,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert first.stdout is not None
            held = first.stdout.readline().strip()
            second = subprocess.run([sys.executable, "-c", script, "second"], env=env,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
            assert -signal.SIGKILL == second.returncode, second.stderr
            assert second.stdout.strip().startswith(f"{held}-"), second.stdout
        finally:
            first.kill()
            first.wait()
        with Recorder.open(root, key=signer):  # sealed at the open, not only at a close
            report = verify_local(
                root,
                VerifyOptions(
                    verifiers=[signer.verifier], state_dir=tmp_path / "s", require_sealed=True
                ),
            )
        assert report.ok, [f.message for f in report.findings]
        assert ["first", "second"] == sorted(r["input_text"] for r in read_records(root))

    def test_two_programs_on_the_default_log(self, tmp_path: Path, signer: Signer) -> None:
        """A second live process that opens the default log gets ``<default>-<pid>`` instead
        of an error; one that names a busy log is refused with LogBusyError."""
        key = tmp_path / "signing.key"
        signer.save(key)
        root = tmp_path / "ledger"
        script = f"""
import os, sys
from tokentrail import LogBusyError
from tokentrail._sdk import Recorder
from tokentrail._sdk._recorder import default_log_id
rec = Recorder.open({str(root)!r}, key={str(key)!r})
assert rec.writer.config.log_id == default_log_id(), rec.writer.config.log_id
rec.record(model="m", input_text="first", output_text="o")
again = Recorder.open({str(root)!r}, key={str(key)!r})  # as another program on this host would
assert again.writer.config.log_id == f"{{default_log_id()}}-{{os.getpid()}}"
again.record(model="m", input_text="second", output_text="o")
try:
    Recorder.open({str(root)!r}, key={str(key)!r}, log_id=default_log_id())
    sys.exit("a named busy log was opened twice")
except LogBusyError as exc:
    assert "give each writer its own log id" in str(exc), exc
again.close()
rec.close()
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, timeout=60, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert ["first", "second"] == sorted(r["input_text"] for r in read_records(root))
        verify(root, signer, tmp_path / "state")

    def test_a_plain_ledger_refuses_a_fork(self, tmp_path: Path, signer: Signer) -> None:
        """A ``Ledger`` used from a forked child raises a StoreError that says why (it used to
        wait forever, under strict durability, for a flusher thread the child does not have)."""
        key = tmp_path / "signing.key"
        signer.save(key)
        script = f"""
import os, signal
from pathlib import Path
from tokentrail._checkpoint import Signer
from tokentrail._errors import StoreError
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._record import Exchange
root, key = Path({str(tmp_path / "ledger")!r}), Path({str(key)!r})
ledger = Ledger.open(LedgerConfig(root, "plain", Signer.load(key)))
ledger.append(Exchange(model="m", api="sdk", stop_reason="stop"))
pid = os.fork()
if pid == 0:
    signal.alarm(20)
    try:
        ledger.append(Exchange(model="m", api="sdk", stop_reason="stop"))
        os._exit(3)
    except StoreError as exc:
        print(exc, flush=True)
    ledger.close()  # the parent's to close: nothing happens here
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
ledger.append(Exchange(model="m", api="sdk", stop_reason="stop"))
ledger.close()
"""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, timeout=60, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "is a fork of it and must open a writer of its own" in done.stdout
        assert 2 == len(read_records(tmp_path / "ledger"))
        verify(tmp_path / "ledger", signer, tmp_path / "state")


class TestSessions:
    """Reconstructing what the model saw at each turn of a session."""

    def test_session_turns(self, sims: dict[str, str], recorder: Recorder) -> None:
        """Turns come back in order with the full request messages of each."""
        agent = audit(ollama.Client(host=sims["ollama"]), ledger=recorder, session_id="agent-1")
        other = audit(ollama.Client(host=sims["ollama"]), ledger=recorder, session_id="agent-2")
        messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
        answers = []
        for q in ("first question", "second question", "third question"):
            messages.append({"role": "user", "content": q})
            reply = agent.chat(model=MODEL, messages=messages)
            messages.append({"role": "assistant", "content": reply.message.content})
            answers.append(reply.message.content)
            other.generate(model=MODEL, prompt="noise")
        recorder.record(model="m", input_text="plain turn", session_id="agent-1")
        recorder.flush()
        turns = session_turns(recorder.writer.config.root, "agent-1")
        assert [0, 1, 2, 3] == [t.index for t in turns]
        assert [2, 4, 6] == [len(t.messages) for t in turns[:3]]
        assert messages[:6] == turns[2].messages
        assert answers == [t.output_text for t in turns[:3]]
        assert [{"role": "user", "content": "plain turn"}] == turns[3].messages
        assert 3 == len(session_turns(recorder.writer.config.root, "agent-2"))


class TestRealLlamaServer:
    """The wrapped ``openai`` client against a real llama.cpp ``llama-server`` (skipped
    without one): the server and the client library are neither of them written here."""

    def test_openai_client_real_llama_server(
        self, llama_server: str, recorder: Recorder, root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """chat and completions, streamed and not (temperature 0, a fixed seed, so the server
        answers the same each time): the wrapped client returns what the bare one does, each
        call leaves one record holding that text, and the ledger verifies. With logprobs
        asked, a record holds llama.cpp's token ids when every token has its entry, and none
        (counting the gap) when the server left out the entries of tokens that end inside a
        character (bench/real_llamacpp/check.py)."""
        fixed: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 12}
        whole: Any = [{"role": "user", "content": "The server answers in JSON"}]
        split: Any = [{"role": "user", "content": "Un café crème à Zürich? 東京 👋"}]

        def calls(c: Any) -> list[tuple[str, str]]:
            chat = c.chat.completions.create(model="tiny", messages=whole, logprobs=True, **fixed)
            gaps = c.chat.completions.create(model="tiny", messages=split, logprobs=True, **fixed)
            stream = c.chat.completions.create(model="tiny", messages=split, stream=True, **fixed)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            comp = c.completions.create(model="tiny", prompt="The weather is", **fixed)
            parts = c.completions.create(model="tiny", prompt="señor", stream=True, **fixed)
            comp_streamed = "".join(ch.choices[0].text for ch in parts if ch.choices)
            return [
                ("openai.chat", chat.choices[0].message.content or ""),
                ("openai.chat", gaps.choices[0].message.content or ""),
                ("openai.chat", streamed),
                ("openai.completions", comp.choices[0].text),
                ("openai.completions", comp_streamed),
            ]

        # A fresh connection a call: llama-server may close one after a streamed answer while
        # the client takes it up again ("Server disconnected without sending a response", seen
        # once with openai 1.40.0, which would retry it by default; the retries are off here).
        fresh = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
        bare = openai.OpenAI(
            base_url=llama_server + "/v1", api_key="none", max_retries=0, http_client=fresh
        )
        expected = calls(bare)
        assert expected == calls(audit(bare, ledger=recorder))
        recorder.flush()
        recs = read_records(root)
        assert expected == [(r["api"], r["output_text"]) for r in recs]
        # Which of the two a prompt reaches is the tiny model's arithmetic (on this machine:
        # all 12 ids for the first, 9 entries for 12 tokens for the second); either way a
        # record holds every id the usage counts, or none and how many are missing.
        for rec in recs[:2]:
            if rec["output_token_source"] == "upstream-ids":
                assert len(rec["output_tokens"]) == rec["gen_ai.usage.output_tokens"]
                assert "tokentrail.output_tokens_missing" not in rec
            else:
                assert (rec["output_token_source"], rec["output_tokens"]) == ("none", None)
                assert rec["tokentrail.output_tokens_missing"] > 0
        verify(root, signer, tmp_path / "state")
