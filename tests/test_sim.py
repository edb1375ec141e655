"""Tests of ``tokentrail sim``, driven through the official ``ollama`` and ``openai`` clients."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrail._errors import ConfigError
from tokentrail._sim import (
    FAULT_HEADER,
    SimConfig,
    SimTokenizer,
    generate,
    render_chat,
    render_prompt,
    running_sim,
    sim_command,
    sim_in_thread,
)
from tokentrail._sim._wire import Fault, FaultSyntaxError

TOK = SimTokenizer()
MODEL = "llama3.2:1b"
PROMPT = "Why is the sky blue?"


def _exotic_seed(prompt_text: str) -> int:
    """A seed whose answer to *prompt_text* holds a token that is not valid UTF-8 alone."""
    for seed in range(500):
        gen = generate(TOK, model=MODEL, prompt_text=prompt_text, seed=seed)
        if any(isinstance(TOK.piece(i), list) for i in gen.output_ids):
            return seed
    raise AssertionError("no seed gives a byte-fallback token")


def _cut_inside_a_character(prompt_text: str) -> tuple[int, int]:
    """A seed and a token limit that cut the answer to *prompt_text* inside a character."""
    for seed in range(500):
        ids = generate(TOK, model=MODEL, prompt_text=prompt_text, seed=seed).output_ids
        for limit in range(2, len(ids)):
            if TOK.decode(list(ids[:limit])).endswith("\ufffd"):
                return seed, limit
    raise AssertionError("no seed cuts an answer inside a character")


GEN_SEED = _exotic_seed(render_prompt(PROMPT))
CHAT: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
CHAT_SEED = _exotic_seed(render_chat(CHAT))
TEXT_SEED = _exotic_seed(PROMPT)


@pytest.fixture
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A running sim in the mode given by the test's ``mode`` parameter."""
    async with running_sim(SimConfig(mode=request.param)) as url:
        yield url


def _sse(body: bytes) -> list[Any]:
    """The JSON payloads of an SSE body, ``[DONE]`` as the string ``"[DONE]"``."""
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else orjson.loads(e[6:]) for e in events]


class TestTokenizer:
    @given(st.text())
    @settings(max_examples=300, deadline=None)
    def test_round_trip(self, text: str) -> None:
        """Decoding an encoding gives the text back, for any text."""
        assert text == TOK.decode(TOK.encode(text))

    def test_greedy_longest_match(self) -> None:
        """Known words are single tokens, matched with their leading space."""
        ids = TOK.encode("Hello world, the sky")
        assert [TOK.piece(i) for i in ids] == ["Hello", " world", ",", " the", " sky"]

    def test_non_ascii_splits_into_bytes(self) -> None:
        """A character outside the vocabulary becomes byte tokens, not valid UTF-8 alone."""
        ids = TOK.encode(" café")
        assert [TOK.piece(i) for i in ids] == [" caf", [0xC3], [0xA9]]

    def test_special_tokens(self) -> None:
        """ChatML markers are single special tokens."""
        ids = TOK.encode("<|im_start|>user\n")
        assert [TOK.im_start_id, TOK.encode("user")[0], 10] == ids
        assert TOK.im_start_id in TOK.special_ids

    def test_split_utf8_holds_back_partial_characters(self) -> None:
        """Streaming steps carry whole characters; an emoji's four byte tokens go together."""
        steps = TOK.split_utf8(TOK.encode(" 🦙!"))
        assert [(t, len(ids)) for t, ids in steps] == [(" ", 1), ("🦙", 4), ("!", 1)]

    @pytest.mark.parametrize(
        ("style", "expected"),
        [
            ("ollama", "\ufffd"),
            ("openai", "\\xc3"),
            ("openai-legacy", "bytes:\\xc3"),
            ("vllm", "\ufffd"),
            ("llamacpp", ""),
        ],
    )
    def test_token_text_of_partial_byte(self, style: str, expected: str) -> None:
        """Each server shows a lone UTF-8 lead byte its own way."""
        assert expected == TOK.token_text(0xC3, style)


class TestEngine:
    def test_deterministic(self) -> None:
        """The same model, prompt and seed give the same answer; another seed another."""
        first = generate(TOK, model=MODEL, prompt_text="x", seed=1)
        assert first == generate(TOK, model=MODEL, prompt_text="x", seed=1)
        assert first.text != generate(TOK, model=MODEL, prompt_text="x", seed=2).text

    @pytest.mark.parametrize("seed", range(20))
    def test_natural_stop(self, seed: int) -> None:
        """Unlimited answers stop on their own after 8 to about 50 tokens, text matching ids."""
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, seed=seed)
        assert gen.finish_reason == "stop"
        assert 8 <= len(gen.output_ids) <= 60
        assert gen.text == TOK.decode(gen.output_ids)

    def test_max_tokens(self) -> None:
        """A token limit cuts the answer and reports ``length``."""
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, max_tokens=3)
        assert (gen.finish_reason, len(gen.output_ids)) == ("length", 3)

    def test_stop_sequence(self) -> None:
        """The answer ends before a stop sequence."""
        full = generate(TOK, model=MODEL, prompt_text=PROMPT).text
        stop = full.split()[2]
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, stop=[stop])
        assert stop not in gen.text
        assert full.startswith(gen.text)

    def test_top_logprobs(self) -> None:
        """Each token has N alternatives, itself first and most likely."""
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, top_logprobs=3)
        for step in gen.steps:
            for choice in step.tokens:
                assert len(choice.top) == 3
                assert (choice.token_id, choice.logprob) == choice.top[0]
                assert sorted((lp for _, lp in choice.top), reverse=True) == [
                    lp for _, lp in choice.top
                ]


class TestOllama:
    @pytest.mark.parametrize("sim", ["ollama-0.4", "ollama"], indirect=True)
    async def test_generate_whole(self, sim: str) -> None:
        """A non-streamed generate has the text, metrics and a context that decodes back."""
        client = ollama.AsyncClient(host=sim)
        r = await client.generate(MODEL, PROMPT, stream=False, options={"seed": GEN_SEED})
        gen = generate(TOK, model=MODEL, prompt_text=render_prompt(PROMPT), seed=GEN_SEED)
        assert (True, "stop", gen.text) == (r.done, r.done_reason, r.response)
        assert render_prompt(PROMPT) + (r.response or "") == TOK.decode(r.context or [])
        assert (len(gen.prompt_ids), len(gen.output_ids)) == (r.prompt_eval_count, r.eval_count)
        assert all(v and v > 0 for v in (r.total_duration, r.load_duration, r.eval_duration))
        assert r.logprobs is None

    @pytest.mark.parametrize("sim", ["ollama-0.4", "ollama"], indirect=True)
    @pytest.mark.parametrize("stream", [False, True])
    async def test_cut_inside_a_character(self, sim: str, stream: bool) -> None:
        """An answer cut by num_predict inside a multi-byte character ends before it, as
        Ollama's Go runner sends it (ollama/ollama#7303): no U+FFFD, the held-back
        tokens still counted in eval_count, and a context of prompt + the text sent."""
        seed, limit = _cut_inside_a_character(render_prompt(PROMPT))
        client = ollama.AsyncClient(host=sim)
        opts = {"seed": seed, "num_predict": limit}
        if stream:
            chunks = [
                c async for c in await client.generate(MODEL, PROMPT, stream=True, options=opts)
            ]
            text, r = "".join(c.response or "" for c in chunks), chunks[-1]
        else:
            r = await client.generate(MODEL, PROMPT, options=opts)
            text = r.response or ""
        full = generate(TOK, model=MODEL, prompt_text=render_prompt(PROMPT), seed=seed)
        whole = TOK.decode(list(full.output_ids[:limit]))
        assert whole.endswith("\ufffd") and "\ufffd" not in text
        assert whole.rstrip("\ufffd") == text
        assert (limit, "length") == (r.eval_count, r.done_reason)
        assert render_prompt(PROMPT) + text == TOK.decode(r.context or [])

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_large_body(self, sim: str) -> None:
        """A chat with a 3 MB image is answered (Ollama sets no 1 MiB cap, as aiohttp would)."""
        client = ollama.AsyncClient(host=sim)
        image = bytes(range(256)) * 12_000
        r = await client.chat(
            MODEL, messages=[{"role": "user", "content": "What is this?", "images": [image]}]
        )
        assert r.done and r.message.content

    @pytest.mark.parametrize("sim", ["ollama-0.4", "ollama"], indirect=True)
    async def test_generate_stream(self, sim: str) -> None:
        """Streamed chunks add up to the whole answer; only the last is done, with context."""
        client = ollama.AsyncClient(host=sim)
        opts = {"seed": GEN_SEED}
        chunks = [c async for c in await client.generate(MODEL, PROMPT, stream=True, options=opts)]
        whole = await client.generate(MODEL, PROMPT, options=opts)
        assert whole.response == "".join(c.response or "" for c in chunks)
        assert [False] * (len(chunks) - 1) + [True] == [c.done for c in chunks]
        assert (chunks[-1].response, chunks[-1].done_reason) == ("", "stop")
        assert whole.context == chunks[-1].context
        assert all(c.context is None and c.eval_count is None for c in chunks[:-1])

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_generate_logprobs(self, sim: str) -> None:
        """Logprobs parse in the client; their bytes add up to the answer's, streamed or not."""
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": PROMPT,
            "options": {"seed": GEN_SEED},
            "logprobs": True,
            "top_logprobs": 2,
        }
        whole = await ollama.AsyncClient(host=sim).generate(**{**body, "stream": False})
        assert whole.logprobs and all(len(e.top_logprobs or []) == 2 for e in whole.logprobs)
        async with httpx.AsyncClient() as http:
            raw = (await http.post(sim + "/api/generate", json={**body, "stream": False})).json()
            lines = (await http.post(sim + "/api/generate", json=body)).content.splitlines()
        entries = raw["logprobs"]
        assert whole.response.encode() == b"".join(bytes(e["bytes"]) for e in entries)
        assert any(e["token"] == "\ufffd" for e in entries)
        chunks = [orjson.loads(line) for line in lines]
        assert entries == [e for c in chunks for e in c.get("logprobs", [])]
        assert "logprobs" not in chunks[-1]

    async def test_partial_utf8_bug(self) -> None:
        """With the Ollama #13497 quirk, a partial token's bytes are those of U+FFFD."""
        async with running_sim(SimConfig(mode="ollama", ollama_partial_utf8_bug=True)) as url:
            body = {"model": MODEL, "prompt": PROMPT, "options": {"seed": GEN_SEED}}
            async with httpx.AsyncClient() as http:
                r = await http.post(
                    url + "/api/generate", json={**body, "logprobs": True, "stream": False}
                )
        assert any(e["bytes"] == [0xEF, 0xBF, 0xBD] for e in r.json()["logprobs"])

    @pytest.mark.parametrize("sim", ["ollama-0.4"], indirect=True)
    async def test_old_ollama_ignores_logprobs(self, sim: str) -> None:
        """Ollama 0.4 knows no logprobs and sends none."""
        r = await ollama.AsyncClient(host=sim).generate(MODEL, PROMPT, logprobs=True)
        assert r.logprobs is None

    @pytest.mark.parametrize("sim", ["ollama-0.4", "ollama"], indirect=True)
    async def test_chat(self, sim: str) -> None:
        """Chat streams message deltas that add up to the whole message, with no context."""
        client = ollama.AsyncClient(host=sim)
        opts = {"seed": CHAT_SEED}
        whole = await client.chat(MODEL, messages=CHAT, options=opts)
        chunks = [
            c async for c in await client.chat(MODEL, messages=CHAT, stream=True, options=opts)
        ]
        gen = generate(TOK, model=MODEL, prompt_text=render_chat(CHAT), seed=CHAT_SEED)
        assert gen.text == whole.message.content
        assert whole.message.content == "".join(c.message.content or "" for c in chunks)
        assert ("assistant", "stop", len(gen.output_ids)) == (
            whole.message.role,
            chunks[-1].done_reason,
            chunks[-1].eval_count,
        )
        assert "context" not in whole.model_fields_set

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_chat_logprobs(self, sim: str) -> None:
        """Chat logprobs tokens and bytes cover the message exactly."""
        body = {"model": MODEL, "messages": CHAT, "options": {"seed": CHAT_SEED}}
        r = await ollama.AsyncClient(host=sim).chat(**body, logprobs=True)
        async with httpx.AsyncClient() as http:
            raw = await http.post(
                sim + "/api/chat", json={**body, "logprobs": True, "stream": False}
            )
        entries = raw.json()["logprobs"]
        assert [e.token for e in r.logprobs or []] == [e["token"] for e in entries]
        assert (r.message.content or "").encode() == b"".join(bytes(e["bytes"]) for e in entries)

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_num_predict(self, sim: str) -> None:
        """``num_predict`` limits the answer and gives ``done_reason: length``."""
        r = await ollama.AsyncClient(host=sim).generate(MODEL, PROMPT, options={"num_predict": 4})
        assert (r.done_reason, r.eval_count) == ("length", 4)

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_raw_has_no_context(self, sim: str) -> None:
        """Raw mode skips the template and returns no context."""
        r = await ollama.AsyncClient(host=sim).generate(MODEL, PROMPT, raw=True)
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT)
        assert (gen.text, None) == (r.response, r.context)

    @pytest.mark.parametrize("sim", ["ollama-0.4", "ollama"], indirect=True)
    async def test_model_endpoints(self, sim: str) -> None:
        """Tags, show, ps, version and embed parse in the official client."""
        client = ollama.AsyncClient(host=sim)
        tags = await client.list()
        assert [m.model for m in tags.models] == ["llama3.2:1b", "qwen2.5:0.5b"]
        assert all(len(m.digest or "") == 64 for m in tags.models)
        show = await client.show(MODEL)
        assert "<|im_start|>" in (show.template or "")
        assert (show.details.family if show.details else None) == "llama"
        assert [m.model for m in (await client.ps()).models] == [MODEL, "qwen2.5:0.5b"]
        async with httpx.AsyncClient() as http:
            version = (await http.get(sim + "/api/version")).json()["version"]
        assert version in ("0.4.7", "0.12.11")
        emb = await client.embed(MODEL, ["a", "b"])
        assert (len(emb.embeddings), len(emb.embeddings[0])) == (2, 16)

    @pytest.mark.parametrize(
        ("sim", "message"),
        [
            ("ollama-0.4", 'model "nope:latest" not found, try pulling it first'),
            ("ollama", "model 'nope:latest' not found"),
        ],
        indirect=["sim"],
    )
    async def test_unknown_model(self, sim: str, message: str) -> None:
        """An unknown model is a 404 with Ollama's message."""
        with pytest.raises(ollama.ResponseError) as info:
            await ollama.AsyncClient(host=sim).generate("nope:latest", PROMPT)
        assert (404, message) == (info.value.status_code, info.value.error)

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_bad_json(self, sim: str) -> None:
        """A body that is not JSON is a 400 with an ``error`` string."""
        async with httpx.AsyncClient() as http:
            r = await http.post(sim + "/api/chat", content=b"{nope")
        assert r.status_code == 400
        assert isinstance(r.json()["error"], str)

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_wire_format(self, sim: str) -> None:
        """NDJSON framing, Go's HTML escaping, and load answers as Ollama sends them."""
        async with httpx.AsyncClient() as http:
            r = await http.post(sim + "/api/generate", json={"model": MODEL, "prompt": PROMPT})
            show = await http.post(sim + "/api/show", json={"model": MODEL})
            load = await http.post(sim + "/api/generate", json={"model": MODEL})
            missing = await http.get(sim + "/api/nothing")
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = r.content.split(b"\n")
        assert lines[-1] == b"" and all(orjson.loads(line) for line in lines[:-1])
        assert b"\\u003c|im_start|\\u003e" in show.content
        assert {"response": "", "done": True, "done_reason": "load"}.items() <= load.json().items()
        assert (missing.status_code, missing.text) == (404, "404 page not found")

    @pytest.mark.parametrize("mode", ["ollama-0.4", "ollama"])
    def test_sync_client(self, mode: str) -> None:
        """The synchronous client works against a sim in a thread."""
        with sim_in_thread(SimConfig(mode=mode)) as url:
            r = ollama.Client(host=url).chat(MODEL, messages=CHAT)
        assert r.done and r.message.content


OPENAI_MODES = ["openai", "llamacpp", "vllm"]


class TestOllamaOpenAICompat:
    """Ollama's own OpenAI-compatible layer (/v1 in an ollama mode), as middleware/openai.go
    writes it: the official openai client works, and the shapes are Ollama's, not OpenAI's."""

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_chat_logprobs(self, sim: str) -> None:
        """0.12.11+: ``logprobs`` (as ``ChoiceLogprobs``: the native entries) whole, and on each
        streamed chunk with tokens; none when not asked for (``omitempty``)."""
        client = openai.AsyncOpenAI(base_url=sim + "/v1", api_key="ollama")
        kw: dict[str, Any] = {"model": MODEL, "messages": CHAT, "seed": CHAT_SEED}
        native = await ollama.AsyncClient(host=sim).chat(
            MODEL, messages=CHAT, options={"seed": CHAT_SEED}, logprobs=True, top_logprobs=2
        )
        whole = await client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
        lp = whole.choices[0].logprobs
        assert lp is not None and lp.content is not None and native.logprobs is not None
        assert [
            (e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in lp.content
        ] == [
            (e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs or []])
            for e in native.logprobs
        ]
        assert all(e.bytes for e in lp.content)
        stream = await client.chat.completions.create(**kw, logprobs=True, stream=True)
        chunks = [c.choices[0].logprobs async for c in stream if c.choices]
        streamed = [e.token for c in chunks if c is not None for e in c.content or []]
        assert [e.token for e in lp.content] == streamed
        assert None is chunks[-1]  # the last chunk (finish_reason) has no tokens
        plain = await client.chat.completions.create(**kw)
        assert None is plain.choices[0].logprobs

    @pytest.mark.parametrize("sim", ["ollama-0.4"], indirect=True)
    async def test_old_ollama_has_no_chat_logprobs(self, sim: str) -> None:
        """Before 0.12.11 the ask is ignored."""
        client = openai.AsyncOpenAI(base_url=sim + "/v1", api_key="ollama")
        whole = await client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True)
        assert None is whole.choices[0].logprobs

    @pytest.mark.parametrize("sim", ["ollama-0.4", "ollama"], indirect=True)
    async def test_chat_as_native(self, sim: str) -> None:
        """The same answer as /api/chat for the same messages and seed, whole and streamed."""
        client = openai.AsyncOpenAI(base_url=sim + "/v1", api_key="ollama")
        native = await ollama.AsyncClient(host=sim).chat(
            MODEL, messages=CHAT, options={"seed": CHAT_SEED}
        )
        whole = await client.chat.completions.create(model=MODEL, messages=CHAT, seed=CHAT_SEED)
        assert native.message.content == whole.choices[0].message.content
        assert ("fp_ollama", "stop") == (whole.system_fingerprint, whole.choices[0].finish_reason)
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (  # type: ignore[union-attr]
            native.prompt_eval_count,
            native.eval_count,
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, seed=CHAT_SEED, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        assert native.message.content == "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices
        )
        assert all(c.choices[0].delta.role == "assistant" for c in chunks if c.choices)
        assert ([], whole.usage) == (chunks[-1].choices, chunks[-1].usage)
        assert ("", "stop") == (
            chunks[-2].choices[0].delta.content,
            chunks[-2].choices[0].finish_reason,
        )

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_wire_shapes(self, sim: str) -> None:
        """Ids, field order, types and Go's encoder newline, as Ollama writes them."""
        body = {"model": MODEL, "messages": CHAT}
        async with httpx.AsyncClient() as http:
            whole = await http.post(sim + "/v1/chat/completions", json=body)
            streamed = await http.post(sim + "/v1/chat/completions", json={**body, "stream": True})
            comp = await http.post(
                sim + "/v1/completions",
                json={"model": MODEL, "prompt": PROMPT, "stream": True,
                      "stream_options": {"include_usage": True}},
            )  # fmt: skip
            missing = await http.post(sim + "/v1/chat/completions", json={**body, "model": "x"})
            empty = await http.post(sim + "/v1/chat/completions", json={**body, "messages": []})
            crashed = await http.post(
                sim + "/v1/chat/completions", json=body, headers={FAULT_HEADER: "500"}
            )
        assert ("application/json", True) == (
            whole.headers["Content-Type"],
            whole.content.endswith(b"}\n"),
        )
        obj = orjson.loads(whole.content)
        assert list(obj) == ["id", "object", "created", "model", "system_fingerprint", "choices",
                             "usage"]  # fmt: skip
        assert re.fullmatch(r"chatcmpl-\d{1,3}", obj["id"])
        assert list(obj["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"]
        assert streamed.headers["Content-Type"] == "text/event-stream"
        events = _sse(streamed.content)
        assert "[DONE]" == events[-1]
        assert list(events[0]) == ["id", "object", "created", "model", "system_fingerprint",
                                   "choices"]  # fmt: skip
        legacy = _sse(comp.content)
        assert re.fullmatch(r"cmpl-\d{1,3}", legacy[0]["id"])
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        assert all(e["usage"] == zero for e in legacy[:-2])  # Ollama's all-zero usage
        assert ([], legacy[-2]["usage"]["completion_tokens"] > 0) == (legacy[-2]["choices"], True)
        assert (404, "not_found_error") == (missing.status_code, missing.json()["error"]["type"])
        error = {"message": "[] is too short - 'messages'", "type": "invalid_request_error",
                 "param": None, "code": None}  # fmt: skip
        assert (400, error) == (empty.status_code, empty.json()["error"])
        assert (500, "api_error", "llama runner process has terminated: exit status 2") == (
            crashed.status_code,
            crashed.json()["error"]["type"],
            crashed.json()["error"]["message"],
        )

    @pytest.mark.parametrize("sim", ["ollama-0.4"], indirect=True)
    async def test_models_and_embeddings(self, sim: str) -> None:
        client = openai.AsyncOpenAI(base_url=sim + "/v1", api_key="ollama")
        assert [MODEL, "qwen2.5:0.5b"] == [m.id async for m in client.models.list()]
        assert "library" == (await client.models.retrieve(MODEL)).owned_by
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope:1b")
        emb = await client.embeddings.create(
            model=MODEL, input=["a b", "c"], encoding_format="float"
        )
        assert [0, 1] == [d.index for d in emb.data]
        native = await ollama.AsyncClient(host=sim).embed(MODEL, ["a b", "c"])
        assert [list(v) for v in native.embeddings] == [d.embedding for d in emb.data]
        packed = await client.embeddings.create(model=MODEL, input=["a b", "c"])  # base64
        assert [pytest.approx(v, rel=1e-6) for v in native.embeddings] == [
            d.embedding for d in packed.data
        ]


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


class TestChoices:
    """``n``: OpenAI and vLLM answer with n choices, streamed interleaved; llama.cpp refuses."""

    @pytest.mark.parametrize("sim", ["openai", "vllm"], indirect=True)
    @pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
    async def test_n_choices(self, sim: str, chat: bool) -> None:
        client = _client(sim)
        create: Any = client.chat.completions.create if chat else client.completions.create
        kw: dict[str, Any] = {"model": MODEL, "seed": CHAT_SEED, "n": 3, "max_tokens": 40}
        kw.update({"messages": CHAT} if chat else {"prompt": PROMPT})
        whole = await create(**kw)
        texts = [c.message.content if chat else c.text for c in whole.choices]
        assert [0, 1, 2] == [c.index for c in whole.choices]
        assert len(set(texts)) == 3, "each choice is a generation of its own"
        one = await create(**{**kw, "n": 1})
        assert texts[0] == (one.choices[0].message.content if chat else one.choices[0].text)
        assert whole.usage.prompt_tokens == one.usage.prompt_tokens
        assert whole.usage.completion_tokens > one.usage.completion_tokens

        stream = await create(**kw, stream=True, stream_options={"include_usage": True})
        got = ["", "", ""]
        finish: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                got[c.index] += (c.delta.content or "") if chat else c.text
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
        assert texts == got
        assert {0, 1, 2} == set(finish)
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens

    @pytest.mark.parametrize("sim", ["llamacpp"], indirect=True)
    async def test_llamacpp_refuses_n(self, sim: str) -> None:
        with pytest.raises(openai.BadRequestError, match="Only one completion choice"):
            await _client(sim).chat.completions.create(model=MODEL, messages=CHAT, n=2)

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_n_below_one_refused(self, sim: str) -> None:
        with pytest.raises(openai.BadRequestError):
            await _client(sim).chat.completions.create(model=MODEL, messages=CHAT, n=0)


class TestOpenAIChat:
    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_whole(self, sim: str) -> None:
        """A non-streamed chat completion parses, with usage and finish reason."""
        r = await _client(sim).chat.completions.create(model=MODEL, messages=CHAT, seed=CHAT_SEED)
        gen = generate(TOK, model=MODEL, prompt_text=render_chat(CHAT), seed=CHAT_SEED)
        choice = r.choices[0]
        assert (gen.text, "stop", "assistant") == (
            choice.message.content,
            choice.finish_reason,
            choice.message.role,
        )
        assert r.usage is not None
        assert (len(gen.prompt_ids), len(gen.output_ids)) == (
            r.usage.prompt_tokens,
            r.usage.completion_tokens,
        )
        assert (r.object, r.model) == ("chat.completion", MODEL)

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_stream_with_usage(self, sim: str) -> None:
        """Deltas add up to the message; the usage chunk comes last with no choices."""
        client = _client(sim)
        kw: dict[str, Any] = {"model": MODEL, "messages": CHAT, "seed": CHAT_SEED}
        whole = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.choices[0].message.content == text
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert [f for f in finishes if f] == ["stop"]
        assert ([], whole.usage) == (chunks[-1].choices, chunks[-1].usage)
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_logprobs(self, sim: str) -> None:
        """Logprobs bytes add up to the content's bytes, with N top alternatives each."""
        client = _client(sim)
        kw: dict[str, Any] = {
            "model": MODEL,
            "messages": CHAT,
            "seed": CHAT_SEED,
            "logprobs": True,
            "top_logprobs": 3,
        }
        r = await client.chat.completions.create(**kw)
        content = r.choices[0].logprobs.content or [] if r.choices[0].logprobs else []
        assert (r.choices[0].message.content or "").encode() == b"".join(
            bytes(e.bytes or []) for e in content
        )
        assert all(len(e.top_logprobs) == 3 for e in content)
        chunks = [c async for c in await client.chat.completions.create(**kw, stream=True)]
        streamed = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content or []
        ]
        assert [e.model_dump() for e in content] == [e.model_dump() for e in streamed]

    @pytest.mark.parametrize("sim", ["llamacpp"], indirect=True)
    async def test_llamacpp_logprob_ids(self, sim: str) -> None:
        """llama.cpp logprobs carry each token's id."""
        r = await _client(sim).chat.completions.create(
            model=MODEL,
            messages=CHAT,
            seed=CHAT_SEED,
            logprobs=True,
            top_logprobs=1,
        )
        entries = r.choices[0].logprobs.content or [] if r.choices[0].logprobs else []
        ids = [e.model_extra["id"] for e in entries if e.model_extra]
        gen = generate(TOK, model=MODEL, prompt_text=render_chat(CHAT), seed=CHAT_SEED)
        # (none for a token that leaves the text inside a UTF-8 character: see process_token)
        assert [step.tokens[-1].token_id for step in gen.steps] == ids
        assert r.usage is not None and len(gen.output_ids) == r.usage.completion_tokens

    @pytest.mark.parametrize("sim", ["vllm"], indirect=True)
    async def test_vllm_token_ids(self, sim: str) -> None:
        """``return_token_ids`` gives the prompt ids and the output ids, streamed or not."""
        client = _client(sim)
        kw: dict[str, Any] = {
            "model": MODEL,
            "messages": CHAT,
            "seed": CHAT_SEED,
            "extra_body": {"return_token_ids": True},
        }
        r = await client.chat.completions.create(**kw)
        extra = r.model_extra or {}
        assert render_chat(CHAT) == TOK.decode(extra["prompt_token_ids"])
        token_ids = (r.choices[0].model_extra or {})["token_ids"]
        assert r.choices[0].message.content == TOK.decode(token_ids)
        chunks = [c async for c in await client.chat.completions.create(**kw, stream=True)]
        assert extra["prompt_token_ids"] == (chunks[0].model_extra or {})["prompt_token_ids"]
        streamed = [i for c in chunks[1:] for i in (c.choices[0].model_extra or {})["token_ids"]]
        assert token_ids == streamed

    @pytest.mark.parametrize("sim", ["openai"], indirect=True)
    async def test_max_completion_tokens(self, sim: str) -> None:
        """``max_completion_tokens`` limits the answer with ``finish_reason: length``."""
        r = await _client(sim).chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_completion_tokens=5,
        )
        assert (
            r.choices[0].finish_reason,
            r.usage.completion_tokens if r.usage else None,
        ) == ("length", 5)
        assert r.system_fingerprint

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_models(self, sim: str) -> None:
        """The model list parses and names the configured models."""
        page = await _client(sim).models.list()
        assert [m.id for m in page.data] == [MODEL, "qwen2.5:0.5b"]

    @pytest.mark.parametrize(
        ("sim", "status"), [("openai", 404), ("vllm", 404), ("llamacpp", 200)], indirect=["sim"]
    )
    async def test_unknown_model(self, sim: str, status: int) -> None:
        """Unknown models are 404 (``model_not_found`` on OpenAI); llama.cpp serves any name."""
        async with httpx.AsyncClient() as http:
            r = await http.post(
                sim + "/v1/chat/completions",
                json={"model": "nope", "messages": CHAT},
            )
        assert status == r.status_code
        if sim.endswith("openai") or status == 404:
            error = r.json()["error"]
            assert {"message", "type", "param", "code"} <= error.keys()
        with pytest.raises(openai.NotFoundError) if status == 404 else contextlib.nullcontext():
            await _client(sim).chat.completions.create(model="nope", messages=CHAT)

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_bad_json(self, sim: str) -> None:
        """A body that is not JSON is a 400 with an ``error`` object."""
        async with httpx.AsyncClient() as http:
            r = await http.post(sim + "/v1/chat/completions", content=b"{nope")
        assert r.status_code == 400
        assert "message" in r.json()["error"]

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_sse_framing(self, sim: str) -> None:
        """Every event is ``data: {json}`` and the stream ends with ``data: [DONE]``."""
        async with httpx.AsyncClient() as http:
            r = await http.post(
                sim + "/v1/chat/completions",
                json={"model": MODEL, "messages": CHAT, "stream": True},
            )
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.content)
        assert events[-1] == "[DONE]"
        assert all(isinstance(e, dict) for e in events[:-1])


class TestOpenAICompletions:
    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_whole_and_stream(self, sim: str) -> None:
        """Legacy completions agree streamed and not, and report usage."""
        client = _client(sim)
        kw: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "seed": TEXT_SEED, "max_tokens": 64}
        whole = await client.completions.create(**kw)
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, seed=TEXT_SEED)
        assert (gen.text, "stop") == (whole.choices[0].text, whole.choices[0].finish_reason)
        assert whole.usage and len(gen.output_ids) == whole.usage.completion_tokens
        chunks = [
            c
            async for c in await client.completions.create(
                **kw, stream=True, stream_options={"include_usage": True}
            )
        ]
        assert gen.text == "".join(c.choices[0].text for c in chunks if c.choices)
        assert any(c.usage and c.usage.completion_tokens == len(gen.output_ids) for c in chunks)

    @pytest.mark.parametrize("sim", ["openai", "vllm"], indirect=True)
    async def test_legacy_logprobs(self, sim: str) -> None:
        """``logprobs: N`` gives tokens, token_logprobs, top_logprobs and text_offset."""
        r = await _client(sim).completions.create(
            model=MODEL, prompt=PROMPT, seed=TEXT_SEED, max_tokens=64, logprobs=2
        )
        lp = r.choices[0].logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, seed=TEXT_SEED)
        assert len(gen.output_ids) == len(lp.tokens) == len(lp.token_logprobs)
        assert lp.text_offset and lp.text_offset[0] == 0
        assert any(t.startswith(("bytes:\\x", "\ufffd")) for t in lp.tokens)

    @pytest.mark.parametrize("sim", ["vllm"], indirect=True)
    async def test_vllm_token_ids(self, sim: str) -> None:
        """Completions put ``prompt_token_ids`` and ``token_ids`` in the choice."""
        r = await _client(sim).completions.create(
            model=MODEL, prompt=PROMPT, extra_body={"return_token_ids": True}
        )
        extra = r.choices[0].model_extra or {}
        assert TOK.decode(extra["prompt_token_ids"]) == PROMPT
        assert r.choices[0].text == TOK.decode(extra["token_ids"])

    @pytest.mark.parametrize("sim", ["llamacpp"], indirect=True)
    async def test_llamacpp_tokenize(self, sim: str) -> None:
        """``/tokenize`` and ``/detokenize`` agree with the tokenizer; ``/health`` is ok."""
        async with httpx.AsyncClient(base_url=sim) as http:
            ids = (await http.post("/tokenize", json={"content": PROMPT})).json()["tokens"]
            special = await http.post(
                "/tokenize", json={"content": "é", "add_special": True, "with_pieces": True}
            )
            text = (await http.post("/detokenize", json={"tokens": ids})).json()["content"]
            health = (await http.get("/health")).json()
        assert (TOK.encode(PROMPT), PROMPT, {"status": "ok"}) == (ids, text, health)
        assert [TOK.bos_id, 0xC3, 0xA9] == [t["id"] for t in special.json()["tokens"]]
        assert special.json()["tokens"][1]["piece"] == [0xC3]


class TestLlamaCppHeadersAndIds:
    @pytest.mark.parametrize("sim", ["llamacpp"], indirect=True)
    async def test_as_a_real_llama_server_sends_them(self, sim: str) -> None:
        """What a real llama-server (4227c9b) sent: ``Server: llama.cpp`` (cpp-httplib's
        default headers), ``text/event-stream`` with no charset, and ``chatcmpl-`` plus 32
        alphanumerics for chat and legacy completions alike (``gen_chatcmplid``)."""
        msgs = [{"role": "user", "content": "Hi"}]
        async with httpx.AsyncClient(base_url=sim) as http:
            chat = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
            cmpl = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
            streamed = await http.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "stream": True}
            )
            health = await http.get("/health")
        assert {"llama.cpp"} == {r.headers["Server"] for r in (chat, cmpl, streamed, health)}
        assert "text/event-stream" == streamed.headers["Content-Type"]
        for body in (chat.json(), cmpl.json()):
            assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{32}", body["id"]), body["id"]


class TestLlamaCppNative:
    @pytest.mark.parametrize("sim", ["llamacpp"], indirect=True)
    async def test_return_tokens(self, sim: str) -> None:
        """``/completion`` with ``return_tokens`` gives the output ids, streamed or not."""
        body = {"prompt": PROMPT, "seed": TEXT_SEED, "return_tokens": True, "n_probs": 2}
        gen = generate(TOK, model=MODEL, prompt_text=PROMPT, seed=TEXT_SEED)
        async with httpx.AsyncClient(base_url=sim) as http:
            whole = (await http.post("/completion", json=body)).json()
            streamed = await http.post("/completion", json={**body, "stream": True})
        assert (whole["content"], whole["tokens"]) == (gen.text, list(gen.output_ids))
        assert (whole["stop_type"], whole["tokens_evaluated"]) == ("eos", len(gen.prompt_ids))
        # A token that leaves the text inside a UTF-8 character gets no entry and no event:
        # the one that completes the character carries its id and the bytes of both.
        completing = [step.tokens[-1].token_id for step in gen.steps]
        assert len(completing) < len(gen.output_ids)  # the case is exercised
        probs = whole["completion_probabilities"]
        assert completing == [p["id"] for p in probs]
        assert [list(step.text.encode()) for step in gen.steps] == [p["bytes"] for p in probs]
        assert all(len(p["top_logprobs"]) == 2 for p in probs)
        events = _sse(streamed.content)
        assert "[DONE]" not in events
        assert completing == [i for e in events[:-1] for i in e["tokens"]]
        assert "".join(e["content"] for e in events) == gen.text
        assert (events[-1]["stop"], events[-1]["tokens"]) == (True, [])


class TestStopSequences:
    @pytest.mark.parametrize("sim", ["vllm"], indirect=True)
    async def test_vllm_stop_reason(self, sim: str) -> None:
        """vLLM names the stop string that ended the answer in ``stop_reason``."""
        full = generate(TOK, model=MODEL, prompt_text=render_chat(CHAT)).text
        stop = full.split()[3]
        r = await _client(sim).chat.completions.create(model=MODEL, messages=CHAT, stop=[stop])
        choice = r.choices[0]
        assert (choice.finish_reason, (choice.model_extra or {})["stop_reason"]) == ("stop", stop)
        assert stop not in (choice.message.content or "")

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_ollama_stop_option(self, sim: str) -> None:
        """Ollama's ``options.stop`` ends the answer before the stop string."""
        full = generate(TOK, model=MODEL, prompt_text=render_prompt(PROMPT)).text
        stop = full.split()[2]
        r = await ollama.AsyncClient(host=sim).generate(MODEL, PROMPT, options={"stop": [stop]})
        assert (r.done_reason, full.startswith(r.response or "")) == ("stop", True)
        assert stop not in (r.response or "")


class TestFaults:
    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            ("", Fault()),
            ("500", Fault(error_500=True)),
            ("stall:20, cut:3", Fault(cut=3, stall_ms=20.0)),
            ("stall-mid:5", Fault(stall_mid_ms=5.0)),
        ],
    )
    def test_parse(self, header: str, expected: Fault) -> None:
        """The fault header parses into its parts."""
        assert expected == Fault.parse(header)

    @pytest.mark.parametrize("header", ["cut", "cut:x", "boom", "cut:-1"])
    def test_parse_rejects(self, header: str) -> None:
        """A malformed fault header is refused."""
        with pytest.raises(FaultSyntaxError):
            Fault.parse(header)

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_500_ollama(self, sim: str) -> None:
        """``500`` is an Ollama error the client raises."""
        client = ollama.AsyncClient(host=sim, headers={FAULT_HEADER: "500"})
        with pytest.raises(ollama.ResponseError) as info:
            await client.generate(MODEL, PROMPT)
        assert info.value.status_code == 500

    @pytest.mark.parametrize("sim", OPENAI_MODES, indirect=True)
    async def test_500_openai(self, sim: str) -> None:
        """``500`` is an OpenAI-style error the client raises."""
        client = openai.AsyncOpenAI(
            base_url=sim + "/v1", api_key="x", max_retries=0, default_headers={FAULT_HEADER: "500"}
        )
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=CHAT)

    @pytest.mark.parametrize(
        ("sim", "path", "body"),
        [
            ("ollama", "/api/generate", {"model": MODEL, "prompt": PROMPT}),
            ("vllm", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": True}),
        ],
        indirect=["sim"],
    )
    async def test_cut(self, sim: str, path: str, body: dict[str, Any]) -> None:
        """``cut:N`` delivers N chunks, then the connection drops."""
        received = b""
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                async with http.stream(
                    "POST", sim + path, json=body, headers={FAULT_HEADER: "cut:2"}
                ) as r:
                    async for part in r.aiter_bytes():
                        received += part
        separator = b"\n" if path.startswith("/api") else b"\n\n"
        assert received.count(separator) == 2

    @pytest.mark.parametrize("sim", ["openai"], indirect=True)
    async def test_cut_whole_body(self, sim: str) -> None:
        """``cut:N`` on a non-streamed answer sends N bytes of it, then drops."""
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(
                    sim + "/v1/chat/completions",
                    json={"model": MODEL, "messages": CHAT},
                    headers={FAULT_HEADER: "cut:10"},
                )

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_cut_beyond_end(self, sim: str) -> None:
        """A stream shorter than N is still cut, not ended cleanly."""
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(
                    sim + "/api/chat",
                    json={"model": MODEL, "messages": CHAT},
                    headers={FAULT_HEADER: "cut:1000"},
                )

    @pytest.mark.parametrize("sim", ["ollama"], indirect=True)
    async def test_stalls(self, sim: str) -> None:
        """``stall`` delays the headers; ``stall-mid`` delays what follows the first chunk."""
        async with httpx.AsyncClient() as http:
            started = time.perf_counter()
            async with http.stream(
                "POST",
                sim + "/api/generate",
                json={"model": MODEL, "prompt": PROMPT},
                headers={FAULT_HEADER: "stall:150,stall-mid:150"},
            ) as r:
                headers_at = time.perf_counter() - started
                lines = [line async for line in r.aiter_lines()]
            total = time.perf_counter() - started
        assert headers_at >= 0.14
        assert total >= 0.29
        assert orjson.loads(lines[-1])["done"] is True

    @pytest.mark.parametrize("sim", ["vllm"], indirect=True)
    async def test_bad_header(self, sim: str) -> None:
        """A malformed fault header is a 400 naming the problem."""
        async with httpx.AsyncClient() as http:
            r = await http.get(sim + "/v1/models", headers={FAULT_HEADER: "explode"})
        assert r.status_code == 400
        assert FAULT_HEADER in r.text


class TestTiming:
    async def test_ttft_and_token_delay(self) -> None:
        """The first token waits ``ttft_ms``; later tokens ``token_ms`` each."""
        config = SimConfig(mode="openai", ttft_ms=120, token_ms=5)
        async with running_sim(config) as url:
            started = time.perf_counter()
            stream = await _client(url).chat.completions.create(
                model=MODEL,
                messages=CHAT,
                stream=True,
                max_tokens=12,
            )
            arrivals = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.perf_counter() - started)
        assert arrivals[0] >= 0.115
        assert arrivals[-1] - arrivals[0] >= 0.05

    async def test_client_disconnect(self) -> None:
        """A client that leaves mid-stream does not upset the server."""
        async with running_sim(SimConfig(mode="ollama", token_ms=20)) as url:
            async with (
                httpx.AsyncClient() as http,
                http.stream(
                    "POST", url + "/api/generate", json={"model": MODEL, "prompt": PROMPT}
                ) as r,
            ):
                async for _ in r.aiter_lines():
                    break
            await asyncio.sleep(0.1)
            r2 = await ollama.AsyncClient(host=url).generate(MODEL, PROMPT)
        assert r2.done


class TestConfigAndCli:
    def test_exports(self) -> None:
        """Every name in the package's ``__all__`` exists, once."""
        import tokentrail._sim as sim_package

        assert len(set(sim_package.__all__)) == len(sim_package.__all__)
        assert all(hasattr(sim_package, name) for name in sim_package.__all__)

    def test_bad_mode(self) -> None:
        """An unknown mode is a ConfigError."""
        with pytest.raises(ConfigError):
            SimConfig(mode="gpt")

    def test_help_has_example(self) -> None:
        """``--help`` lists the options and an example."""
        result = CliRunner().invoke(sim_command, ["--help"])
        assert result.exit_code == 0
        for text in (
            "--mode",
            "--listen",
            "--ttft-ms",
            "--token-ms",
            "--model",
            "X-Sim-Fault",
            "Examples:",
        ):
            assert text in result.output

    @pytest.mark.parametrize("sigint", ["default", "ignored"])
    def test_serves_from_command_line(self, sigint: str) -> None:
        """``sim`` started as a process serves on the port it reports, until interrupted; also
        when started with SIGINT ignored, as a shell script's background jobs are."""
        code = "from tokentrail._sim import sim_command; sim_command()"
        args = ["--mode", "llamacpp", "--listen", "127.0.0.1:0", "--model", "m1"]
        disposition = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, disposition),
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = line.rsplit(" on ", 1)[1].strip()
            assert "tokentrail sim (llamacpp) serving m1 on http://127.0.0.1:" in line
            assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "m1"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                assert proc.wait(timeout=10) == 0
            finally:
                proc.kill()  # not left running if it did not stop

    def test_bad_listen(self) -> None:
        """A malformed ``--listen`` is a one-line error."""
        result = CliRunner().invoke(sim_command, ["--listen", "nowhere"])
        assert result.exit_code == 1
        assert "Error: --listen wants HOST:PORT" in result.output
