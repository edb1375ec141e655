"""Unit tests of the capture dialects, fed wire samples copied from the upstream API docs.

Sources of the samples:
- Ollama ``docs/api.md`` ("Generate a completion", "Generate a chat completion" examples);
- OpenAI API reference, "The chat completion object", "The chat completion chunk object",
  "The completion object" and the ``logprobs`` example of "Create chat completion";
- llama.cpp ``tools/server/README.md`` (``probs`` entries with ``id``, ``token``, ``bytes``);
- vLLM ``protocol.py`` (``return_token_ids``: ``prompt_token_ids`` in the first chunk,
  ``token_ids`` per chunk).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import pytest

from tokentrail._capture import (
    Begun,
    Meta,
    OllamaCapture,
    OpenAICapture,
    entry_token,
    loads,
    new_capture,
    render_messages,
    split_context,
)
from tokentrail._errors import ConfigError
from tokentrail._record import Exchange, clean_text, token_hash

META = Meta(
    timestamp="2024-01-01T00:00:00.000000Z",
    event_id="00000000-0000-4000-8000-0000000000e1",
    request_duration_ms=12.5,
)


def run(capture: Any, chunks: list[Any], **kw: Any) -> Exchange:
    for chunk in chunks:
        capture.feed(chunk)
    exchange: Exchange = capture.finish(META, **kw)
    exchange.fields()  # serialisable, no clash with record fields
    return exchange


class TestOllamaGenerate:
    """``/api/generate``, streamed and not."""

    STREAM: ClassVar[list[dict[str, Any]]] = [
        {
            "model": "llama3.2",
            "created_at": "2023-08-04T08:52:19.385406455-07:00",
            "response": "The",
            "done": False,
        },
        {
            "model": "llama3.2",
            "created_at": "2023-08-04T08:52:19.385406455-07:00",
            "response": " sky",
            "done": False,
        },
        {
            "model": "llama3.2",
            "created_at": "2023-08-04T19:22:45.499127Z",
            "response": "",
            "done": True,
            "done_reason": "stop",
            "context": [10, 11, 12, 13, 20, 21],
            "total_duration": 10706818083,
            "load_duration": 6338219291,
            "prompt_eval_count": 4,
            "prompt_eval_duration": 130079000,
            "eval_count": 2,
            "eval_duration": 4232710000,
        },
    ]

    def test_stream_text_context_and_counts(self) -> None:
        """The fragments join into the output; the context splits at prompt_eval_count."""
        ex = run(
            OllamaCapture({"model": "llama3.2", "prompt": "Why is the sky blue?"}, chat=False),
            self.STREAM,
        )
        assert (ex.output_text, ex.input_text) == ("The sky", "Why is the sky blue?")
        assert (ex.input_tokens, ex.output_tokens) == ([10, 11, 12, 13], [20, 21])
        assert (
            ex.input_token_source,
            ex.output_token_source,
        ) == ("upstream-context", "upstream-context")
        assert ex.stop_reason == "stop"
        assert ex.extra["gen_ai.usage.input_tokens"] == 4
        assert ex.extra["gen_ai.usage.output_tokens"] == 2
        assert ex.extra["gen_ai.response.finish_reasons"] == ["stop"]
        assert ex.extra["ollama.context_split"]["counts_agree"] is True

    def test_docs_placeholder_context(self) -> None:
        """The docs' ``[1, 2, 3]`` context cannot hold 26 + 290 tokens: all input, no output."""
        final = {
            "model": "llama3.2",
            "created_at": "2023-08-04T19:22:45.499127Z",
            "response": "The sky is blue because it is the color of the sky.",
            "done": True,
            "context": [1, 2, 3],
            "total_duration": 5043500667,
            "load_duration": 5025959,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 325953000,
            "eval_count": 290,
            "eval_duration": 4709213000,
        }
        ex = run(
            OllamaCapture({"model": "llama3.2", "prompt": "Why?", "stream": False}, chat=False),
            [final],
        )
        assert ex.input_tokens == [1, 2, 3]
        assert (ex.output_tokens, ex.output_token_source) == (None, "none")
        assert ex.stop_reason == "stop"  # done without done_reason (before 0.1.32)

    @pytest.mark.parametrize("context", [[1, True, 3], [1, 2.0, 3], [1, "2", 3], [[1], 2]])
    def test_context_of_other_than_ids_is_not_tokens(self, context: list[Any]) -> None:
        """A ``context`` holding anything but integers (a bool, a float, a string) is not taken
        as token ids: the record says ``none`` rather than store what the server did not send."""
        final = {"model": "m", "response": "ab", "done": True, "context": context,
                 "prompt_eval_count": 2, "eval_count": 1}  # fmt: skip
        ex = run(OllamaCapture({"model": "m", "prompt": "x", "stream": False}, chat=False), [final])
        assert (ex.input_tokens, ex.input_token_source) == (None, "none")
        assert (ex.output_tokens, ex.output_token_source) == (None, "none")
        assert "ollama.context_split" not in ex.extra

    def test_empty_context_is_an_empty_prompt(self) -> None:
        """An empty ``context`` is still a list of ids: none for the prompt, as before."""
        final = {"model": "m", "response": "", "done": True, "context": [],
                 "prompt_eval_count": 0, "eval_count": 0}  # fmt: skip
        ex = run(OllamaCapture({"model": "m", "prompt": "", "stream": False}, chat=False), [final])
        assert ex.input_token_source == "upstream-context"

    def test_logprobs_beat_context_for_output(self) -> None:
        """Ollama >= 0.12.11 logprobs give pieces; bytes that are not UTF-8 stay byte lists."""
        chunks = [
            {
                "model": "m",
                "response": "Hi",
                "done": False,
                "logprobs": [{"token": "Hi", "logprob": -0.1}],
            },
            {  # "é" over two tokens, sent once it is whole
                "model": "m",
                "response": "é",
                "done": False,
                "logprobs": [
                    {"token": "\ufffd", "logprob": -0.2, "bytes": [0xC3]},
                    {"token": "\ufffd", "logprob": -0.3, "bytes": [0xA9]},
                ],
            },
            {
                "model": "m",
                "response": "",
                "done": True,
                "done_reason": "length",
                "context": [1, 2, 3, 4, 5],
                "prompt_eval_count": 2,
                "eval_count": 3,
            },
        ]
        ex = run(OllamaCapture({"model": "m", "prompt": "p"}, chat=False), chunks)
        assert (
            ex.output_tokens,
            ex.output_token_source,
        ) == (["Hi", [0xC3], [0xA9]], "upstream-pieces")
        assert (ex.input_tokens, ex.input_token_source) == ([1, 2], "upstream-context")
        assert ex.extra["output_logprobs"] == [-0.1, -0.2, -0.3]
        assert ex.stop_reason == "length"

    def test_partial_logprobs_are_not_reported(self) -> None:
        """A chunk with output but no logprobs makes the piece sequence incomplete: none."""
        chunks = [
            {
                "model": "m",
                "response": "a",
                "done": False,
                "logprobs": [{"token": "a", "logprob": 0.0}],
            },
            {"model": "m", "response": "b", "done": False},
            {"model": "m", "response": "", "done": True, "done_reason": "stop"},
        ]
        ex = run(OllamaCapture({"model": "m", "prompt": "p"}, chat=False), chunks)
        assert (ex.output_tokens, ex.output_token_source) == (None, "none")
        assert token_hash(None) == ex.fields()["output_hash"]

    def test_cut_stream_is_upstream_error(self) -> None:
        """A stream that ends before ``done`` keeps its text and says upstream_error."""
        ex = run(OllamaCapture({"model": "m", "prompt": "p"}, chat=False), self.STREAM[:1])
        assert (ex.output_text, ex.stop_reason) == ("The", "upstream_error")

    def test_error_line(self) -> None:
        """An ``{"error": ...}`` line is recorded with its message."""
        ex = run(
            OllamaCapture({"model": "m", "prompt": "p"}, chat=False),
            [{"error": "model 'm' not found"}],
        )
        assert ex.stop_reason == "upstream_error"
        assert ex.extra["error_message"] == "model 'm' not found"

    def test_override_stop_reason(self) -> None:
        """The caller's stop reason (client_disconnect) wins over the upstream's."""
        ex = run(
            OllamaCapture({"model": "m", "prompt": "p"}, chat=False),
            self.STREAM[:2],
            stop_reason="client_disconnect",
        )
        assert (ex.output_text, ex.stop_reason) == ("The sky", "client_disconnect")


class TestOllamaChat:
    """``/api/chat``."""

    def test_tool_call_response(self) -> None:
        """The docs' tool-call example: empty text, the call in the output messages."""
        body = {
            "model": "llama3.2",
            "created_at": "2024-07-22T20:33:28.123648Z",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "function": {
                            "name": "get_current_weather",
                            "arguments": {"format": "celsius", "location": "Paris, FR"},
                        }
                    }
                ],
            },
            "done_reason": "stop",
            "done": True,
            "total_duration": 885095291,
            "load_duration": 3753500,
            "prompt_eval_count": 122,
            "prompt_eval_duration": 328493000,
            "eval_count": 33,
            "eval_duration": 552222000,
        }
        req = {
            "model": "llama3.2",
            "stream": False,
            "messages": [{"role": "user", "content": "What is the weather today in Paris?"}],
        }
        ex = run(OllamaCapture(req, chat=True), [body])
        assert ex.input_text == "user: What is the weather today in Paris?"
        assert (ex.output_text, ex.output_token_source, ex.api) == ("", "none", "ollama.chat")
        parts = ex.extra["gen_ai.output.messages"][0]["parts"]
        expected = {
            "type": "tool_call",
            "name": "get_current_weather",
            "arguments": {"format": "celsius", "location": "Paris, FR"},
        }
        assert [expected] == parts
        assert ex.extra["gen_ai.usage.input_tokens"] == 122

    def test_stream_chat(self) -> None:
        """Streamed chat fragments join; the request body is stored as sent."""
        req = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "why is the sky blue?"}],
        }
        chunks = [
            {
                "model": "llama3.2",
                "created_at": "2023-08-04T08:52:19.385406455-07:00",
                "message": {"role": "assistant", "content": "The", "images": None},
                "done": False,
            },
            {
                "model": "llama3.2",
                "created_at": "2023-08-04T19:22:45.499127Z",
                "done": True,
                "total_duration": 4883583458,
                "load_duration": 1334875,
                "prompt_eval_count": 26,
                "prompt_eval_duration": 342546000,
                "eval_count": 282,
                "eval_duration": 4535599000,
            },
        ]
        ex = run(OllamaCapture(req, chat=True), chunks)
        assert ("The", req) == (ex.output_text, ex.extra["request_body"])
        assert None is ex.input_tokens

    @pytest.mark.parametrize("chat", [True, False], ids=["chat", "generate"])
    def test_thinking_streamed(self, chat: bool) -> None:
        """``think: true`` (Ollama 0.9+): the reasoning comes first, in ``message.thinking``
        (chat) or ``thinking`` (generate), then the answer. ``output_text`` is the answer
        alone; the reasoning is the output message's first part, and the first thinking
        chunk is the first token."""

        def line(thinking: str, content: str, done: bool = False) -> dict[str, Any]:
            out: dict[str, Any] = {"model": "qwen3", "created_at": "2025-05-29T09:35:56Z"}
            if chat:
                out["message"] = {"role": "assistant", "content": content}
                if thinking:
                    out["message"]["thinking"] = thinking
            else:
                out["response"] = content
                if thinking:
                    out["thinking"] = thinking
            out["done"] = done
            if done:
                out.update(done_reason="stop", prompt_eval_count=9, eval_count=4)
            return out

        req: dict[str, Any] = {"model": "qwen3", "think": True}
        req.update(messages=[{"role": "user", "content": "2+2?"}] if chat else {"prompt": "2+2?"})
        capture = OllamaCapture(req, chat=chat)
        first = line("Adding", "")
        assert capture.feed(first) is True  # reasoning is output: it starts the first token
        ex = run(capture, [line(" two and two.", ""), line("", "4"), line("", "", done=True)])
        assert (ex.output_text, ex.stop_reason) == ("4", "stop")
        (message,) = ex.extra["gen_ai.output.messages"]
        assert message["parts"] == [
            {"type": "reasoning", "content": "Adding two and two."},
            {"type": "text", "content": "4"},
        ]


class TestSplitContext:
    """The documented context split rule."""

    @pytest.mark.parametrize(
        ("p", "e", "split"),
        [
            (4, 2, 4),  # counts agree
            (5, 2, 5),  # p counts a BOS the context lacks: trust p
            (4, 3, 4),  # e counts an EOS (or a trimmed stop sequence): trust p
            (2, 2, 4),  # p short (cached prefix uncounted): n - e
            (None, 2, 4),  # only e
            (4, None, 4),  # only p
            (None, None, 6),  # nothing known: all input
            (9, 9, 6),  # nonsense counts: all input
        ],
    )
    def test_split(self, p: int | None, e: int | None, split: int) -> None:
        """Input + output is always the context, split where the rule says."""
        ctx = [1, 2, 3, 4, 5, 6]
        inp, out, how = split_context(ctx, p, e)
        assert split == how["split_at"]
        assert ctx == inp + (out or [])
        assert ctx[:split] == inp


class TestOllamaPiecesChecked:
    """Ollama's logprobs pieces are the answer's tokens only when every token generated has its
    entry and they spell the answer's text; else the context (generate) or none."""

    @staticmethod
    def entry(token: str, raw: bytes | None = None) -> dict[str, Any]:
        return {"token": token, "logprob": -0.25, "bytes": list(raw or token.encode())}

    def lines(
        self, chat: bool, steps: list[tuple[str, list[dict[str, Any]]]], **final: Any
    ) -> list[dict[str, Any]]:
        def line(text: str) -> dict[str, Any]:
            if chat:
                return {"model": "m", "message": {"role": "assistant", "content": text}}
            return {"model": "m", "response": text}

        out = [{**line(text), "done": False, "logprobs": lp} for text, lp in steps]
        return [*out, {**line(""), "done": True, **final}]

    @pytest.mark.parametrize("chat", [False, True], ids=["generate", "chat"])
    def test_answer_cut_inside_a_character(self, chat: bool) -> None:
        """``num_predict`` 4 reached inside "€" (3 bytes over 2 tokens): the runner drops the
        incomplete bytes and their entries, ``eval_count`` still counts them. Two of four
        tokens are no sequence: the context's ids (generate) or none, and how many lack one."""
        steps = [("Hi", [self.entry("Hi")]), (" ", [self.entry(" ")])]
        final: dict[str, Any] = {"done_reason": "length", "prompt_eval_count": 2, "eval_count": 4}
        if not chat:
            final["context"] = [7, 8, 30, 31, 32, 33]
        request = {"model": "m", "logprobs": True}
        ex = run(OllamaCapture(request, chat=chat), self.lines(chat, steps, **final))
        assert ex.output_text == "Hi "
        assert ex.extra["tokentrail.output_tokens_missing"] == 2
        expected = (None, "none") if chat else ([30, 31, 32, 33], "upstream-context")
        assert expected == (ex.output_tokens, ex.output_token_source)

    def test_end_of_sequence_is_counted_not_sent(self) -> None:
        """A ``stop`` answer counts its end-of-sequence token in ``eval_count`` and has no
        entry for it: one fewer entry is every token (and as many, as the simulator sends)."""
        steps = [("Hi", [self.entry("Hi")]), (" there", [self.entry(" there")])]
        for count in (2, 3):
            chunks = self.lines(True, steps, done_reason="stop", eval_count=count)
            ex = run(OllamaCapture({"model": "m", "logprobs": True}, chat=True), chunks)
            assert (["Hi", " there"], "upstream-pieces") == (
                ex.output_tokens,
                ex.output_token_source,
            )
        chunks = self.lines(True, steps, done_reason="stop", eval_count=4)
        ex = run(OllamaCapture({"model": "m", "logprobs": True}, chat=True), chunks)
        assert (ex.output_token_source, ex.extra["tokentrail.output_tokens_missing"]) == (
            "none",
            1,
        )
        # A stop sequence's tokens are counted and trimmed with their entries: no telling.
        request = {"model": "m", "logprobs": True, "options": {"stop": ["\n"]}}
        ex = run(OllamaCapture(request, chat=True), chunks)
        assert ex.output_token_source == "upstream-pieces"

    @pytest.mark.parametrize("chat", [False, True], ids=["generate", "chat"])
    def test_replacement_characters_are_not_the_tokens(self, chat: bool) -> None:
        """ollama/ollama#13497: "é" split over two tokens, each given as U+FFFD with U+FFFD's
        bytes. Pieces that do not spell the text are not its tokens."""
        bad = self.entry("\ufffd", "\ufffd".encode())
        steps = [("Caf", [self.entry("Caf")]), ("é", [bad, bad]), (" ok", [self.entry(" ok")])]
        final: dict[str, Any] = {"done_reason": "stop", "prompt_eval_count": 1, "eval_count": 5}
        if not chat:
            final["context"] = [9, 40, 41, 42, 43]
        ex = run(OllamaCapture({"model": "m"}, chat=chat), self.lines(chat, steps, **final))
        assert ex.output_text == "Café ok"
        assert "tokentrail.output_pieces_unusable" in ex.extra
        expected = (None, "none") if chat else ([40, 41, 42, 43], "upstream-context")
        assert expected == (ex.output_tokens, ex.output_token_source)


class TestOpenAIChat:
    """``/v1/chat/completions``."""

    BODY: ClassVar[dict[str, Any]] = {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1677652288,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "\n\nHello there, how may I assist you today?",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }
    REQ: ClassVar[dict[str, Any]] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hello!"},
        ],
    }

    def test_non_streamed(self) -> None:
        """The reference's chat.completion object: text, usage, id, model@fingerprint."""
        ex = run(OpenAICapture(self.REQ, chat=True), [self.BODY])
        assert ex.output_text == "\n\nHello there, how may I assist you today?"
        assert ex.input_text == "system: You are helpful.\nuser: Hello!"
        assert ex.model_version == "gpt-4o-mini@fp_44709d6fcb"
        assert (
            ex.extra["gen_ai.response.id"],
            ex.extra["gen_ai.usage.input_tokens"],
            ex.extra["gen_ai.usage.output_tokens"],
        ) == ("chatcmpl-123", 9, 12)
        assert (
            ex.stop_reason,
            ex.input_token_source,
            ex.output_token_source,
        ) == ("stop", "none", "none")

    def test_stream_with_logprobs_and_usage(self) -> None:
        """Chunks with logprobs ``bytes`` give pieces; the include_usage chunk gives counts."""
        base = {
            "id": "chatcmpl-123",
            "object": "chat.completion.chunk",
            "created": 1694268190,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_44709d6fcb",
        }
        chunks = [
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": {"content": []},
                        "finish_reason": None,
                    }
                ],
                "usage": None,
            },
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": "Hello"},
                        "logprobs": {
                            "content": [
                                {
                                    "token": "Hello",
                                    "logprob": -0.31725305,
                                    "bytes": [72, 101, 108, 108, 111],
                                    "top_logprobs": [],
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ],
                "usage": None,
            },
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": "!"},
                        "logprobs": {
                            "content": [
                                {
                                    "token": "!",
                                    "logprob": -0.02380986,
                                    "bytes": [33],
                                    "top_logprobs": [],
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ],
                "usage": None,
            },
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                "usage": None,
            },
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
            },
        ]
        cap = OpenAICapture({**self.REQ, "stream": True, "logprobs": True}, chat=True)
        ex = run(cap, chunks)
        assert (ex.output_tokens, ex.output_token_source) == (["Hello", "!"], "upstream-pieces")
        assert (
            ex.output_text,
            ex.stop_reason,
            ex.extra["gen_ai.usage.output_tokens"],
        ) == ("Hello!", "stop", 2)

    def test_stream_tool_call_pieces(self) -> None:
        """Tool-call arguments streamed in pieces are joined per call index."""
        chunks = [
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""},
                                }
                            ],
                        },
                        "finish_reason": None,
                    }
                ],
            },
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"loc'}}]},
                        "finish_reason": None,
                    }
                ],
            },
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [{"index": 0, "function": {"arguments": '":"Paris"}'}}]
                        },
                        "finish_reason": None,
                    }
                ],
            },
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            },
        ]
        ex = run(OpenAICapture({"model": "m", "messages": [], "stream": True}, chat=True), chunks)
        call = ex.extra["gen_ai.output.messages"][0]["parts"][0]
        assert call == {
            "type": "tool_call",
            "name": "get_weather",
            "id": "call_1",
            "arguments": '{"loc":"Paris"}',
        }
        assert (ex.stop_reason, ex.model_version) == ("tool_calls", "m")

    @pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
    def test_reasoning_streamed(self, field: str) -> None:
        """Reasoning deltas (vLLM's and DeepSeek's ``reasoning_content``; ``reasoning`` in
        newer vLLM and Ollama's ``/v1``): not in ``output_text``, the first part of the output
        message, and output for the first token."""

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {"id": "c", "object": "chat.completion.chunk", "model": "m",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip

        capture = OpenAICapture({"model": "m", "messages": [], "stream": True}, chat=True)
        assert capture.feed(chunk({"role": "assistant", "content": ""})) is False
        assert capture.feed(chunk({field: "Two and"})) is True
        ex = run(
            capture,
            [chunk({field: " two."}), chunk({"content": "4"}), chunk({}, reason="stop")],
        )
        assert (ex.output_text, ex.stop_reason) == ("4", "stop")
        assert ex.extra["gen_ai.output.messages"][0]["parts"] == [
            {"type": "reasoning", "content": "Two and two."},
            {"type": "text", "content": "4"},
        ]

    def test_llamacpp_ids(self) -> None:
        """llama.cpp logprobs entries carry ``id``: upstream-ids beat pieces."""
        body = {
            "id": "x",
            "object": "chat.completion",
            "model": "llama",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi there"},
                    "logprobs": {
                        "content": [
                            {
                                "id": 13347,
                                "token": "Hi",
                                "bytes": [72, 105],
                                "logprob": -0.5,
                                "top_logprobs": [],
                            },
                            {
                                "id": 1070,
                                "token": " there",
                                "bytes": [32, 116, 104, 101, 114, 101],
                                "logprob": -0.1,
                                "top_logprobs": [],
                            },
                        ]
                    },
                    "finish_reason": "stop",
                }
            ],
        }
        ex = run(OpenAICapture({"model": "llama", "messages": []}, chat=True), [body])
        assert (ex.output_tokens, ex.output_token_source) == ([13347, 1070], "upstream-ids")

    @staticmethod
    def _ids_body(ids: list[int], usage: dict[str, Any], reason: str) -> dict[str, Any]:
        entries = [{"id": i, "token": "a", "bytes": [97], "logprob": -0.1} for i in ids]
        message = {"role": "assistant", "content": "a" * len(ids)}
        choice = {"index": 0, "message": message, "logprobs": {"content": entries},
                  "finish_reason": reason}  # fmt: skip
        return {"id": "x", "object": "chat.completion", "model": "m", "usage": usage,
                "choices": [choice]}  # fmt: skip

    @pytest.mark.parametrize(
        ("usage", "stream", "reason", "expected"),
        [
            ({"completion_tokens": 3}, False, "length", ([1, 2, 3], "upstream-ids", None)),
            ({"completion_tokens": 5}, False, "length", (None, "none", 2)),
            ({"completion_tokens": 4}, False, "stop", (None, "none", 1)),
            ({"completion_tokens": 4}, True, "stop", ([1, 2, 3], "upstream-ids", None)),
            ({"completion_tokens": 5}, True, "stop", (None, "none", 2)),
            ({"completion_tokens": 4}, True, "length", (None, "none", 1)),
            ({"completion_tokens": 10, "completion_tokens_details": {"reasoning_tokens": 7}},
             False, "stop", ([1, 2, 3], "upstream-ids", None)),
            ({}, False, "stop", ([1, 2, 3], "upstream-ids", None)),
            ({"completion_tokens": 4, "stop": ["e"]}, True, "stop", (None, "none", 1)),
        ],
        ids=["complete", "gaps", "gap-on-stop", "streamed-stop-lacks-its-last",
             "streamed-stop-gap", "streamed-length-gap", "reasoning", "no-count",
             "streamed-stop-string-gap"],
    )  # fmt: skip
    def test_ids_fewer_than_generated(
        self, usage: dict[str, Any], stream: bool, reason: str, expected: tuple[Any, ...]
    ) -> None:
        """Ids fewer than the tokens generated (llama.cpp gives no entry to a token ending
        inside a UTF-8 character) are no sequence: none, with the count missing. A stream
        that ends on its end-of-sequence token lacks that entry alone; one that ends on a stop
        string asked for has it (the token completing the stop string gets its entry)."""
        stops = usage.pop("stop", None)
        body = self._ids_body([1, 2, 3], usage, reason)
        if stream:
            choice = body["choices"][0]
            chunk = {**body, "object": "chat.completion.chunk", "choices": [
                {**choice, "delta": choice["message"]}]}  # fmt: skip
            del chunk["choices"][0]["message"]
            chunks = [chunk]
        else:
            chunks = [body]
        req = {"model": "m", "messages": [], "stream": stream, **({"stop": stops} if stops else {})}
        ex = run(OpenAICapture(req, chat=True), chunks)
        assert expected == (
            ex.output_tokens,
            ex.output_token_source,
            ex.extra.get("tokentrail.output_tokens_missing"),
        )

    def test_stream_cut_inside_a_character(self) -> None:
        """A stream cut inside a character flushes the held bytes in a chunk with no logprobs:
        no sequence, and the count of tokens without an entry is said."""
        entries = [{"id": i, "token": "a", "bytes": [97], "logprob": -0.1} for i in (1, 2)]
        chunks = [
            {"id": "x", "object": "chat.completion.chunk", "model": "m", "choices": [
                {"index": 0, "delta": {"content": "aa"}, "logprobs": {"content": entries},
                 "finish_reason": None}]},
            {"id": "x", "object": "chat.completion.chunk", "model": "m", "choices": [
                {"index": 0, "delta": {"content": "\ufffd"}, "finish_reason": "length"}],
             "usage": {"completion_tokens": 5}},
        ]  # fmt: skip
        req = {"model": "m", "messages": [], "stream": True, "logprobs": True}
        ex = run(OpenAICapture(req, chat=True), chunks)
        assert (None, "none", 3) == (
            ex.output_tokens,
            ex.output_token_source,
            ex.extra.get("tokentrail.output_tokens_missing"),
        )

    @pytest.mark.parametrize("asked", [True, False])
    def test_every_entry_left_out(self, asked: bool) -> None:
        """llama.cpp answers ``"logprobs": null`` when it left out every entry: with logprobs
        asked for (by the client, or on its behalf), all the tokens are missing; not asked,
        nothing is said."""
        body = {"id": "x", "object": "text_completion", "model": "m",
                "usage": {"completion_tokens": 2},
                "choices": [{"index": 0, "text": "\ufffd", "logprobs": None,
                             "finish_reason": "stop"}]}  # fmt: skip
        cap = OpenAICapture({"model": "m", "prompt": "p"}, chat=False)
        cap.logprobs_asked = asked
        ex = run(cap, [body])
        assert ("none", 2 if asked else None) == (
            ex.output_token_source,
            ex.extra.get("tokentrail.output_tokens_missing"),
        )

    @pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
    def test_pieces_unknown_without_a_count(self, stream: bool) -> None:
        """llama-cpp-python's server decodes each token alone, dropping what is not UTF-8
        (``errors="ignore"``): a byte token's entry comes as ``""``, a piece unknown. Whole,
        the usage count says how many lack their piece; streamed it sends no usage, and the
        entries are the count (as taken from its server: text ``señor``, 6 tokens)."""
        tokens = ["q", "sw", "", "", "P", ""]
        if stream:
            chunks: list[Any] = [
                {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
                 "choices": [{"text": t, "index": 0, "finish_reason": None, "logprobs": {
                     "tokens": [t], "text_offset": [5], "token_logprobs": [-0.5],
                     "top_logprobs": [{t: -0.5}]}}]}
                for t in tokens
            ] + [{"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
                  "choices": [{"text": "", "index": 0, "logprobs": None,
                               "finish_reason": "length"}]}]  # fmt: skip
        else:
            chunks = [
                {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
                 "choices": [{"text": "qswP", "index": 0, "finish_reason": "length",
                              "logprobs": {"tokens": tokens, "text_offset": [5] * 6,
                                           "token_logprobs": [-0.5] * 6,
                                           "top_logprobs": [{t: -0.5} for t in tokens]}}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}
            ]  # fmt: skip
        req = {"model": "tiny", "prompt": "señor", "logprobs": 1, "stream": stream}
        ex = run(OpenAICapture(req, chat=False), chunks)
        assert ("qswP", None, "none", 3) == (
            ex.output_text,
            ex.output_tokens,
            ex.output_token_source,
            ex.extra.get("tokentrail.output_tokens_missing"),
        )

    def test_vllm_token_ids_stream(self) -> None:
        """vLLM return_token_ids: prompt ids in the first chunk, token_ids in each."""
        chunks = [
            {
                "id": "v",
                "object": "chat.completion.chunk",
                "model": "q",
                "prompt_token_ids": [1, 2, 3],
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                        "token_ids": [],
                    }
                ],
            },
            {
                "id": "v",
                "object": "chat.completion.chunk",
                "model": "q",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": "Yes"},
                        "logprobs": None,
                        "finish_reason": None,
                        "token_ids": [9454],
                    }
                ],
            },
            {
                "id": "v",
                "object": "chat.completion.chunk",
                "model": "q",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": "."},
                        "logprobs": None,
                        "finish_reason": "stop",
                        "token_ids": [13],
                    }
                ],
            },
        ]
        ex = run(OpenAICapture({"model": "q", "messages": [], "stream": True}, chat=True), chunks)
        assert (ex.input_tokens, ex.input_token_source) == ([1, 2, 3], "upstream-ids")
        assert (ex.output_tokens, ex.output_token_source) == ([9454, 13], "upstream-ids")

    def test_error_body(self) -> None:
        """An OpenAI error object is recorded as upstream_error with its message."""
        err = {
            "error": {
                "message": "The model `x` does not exist",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }
        ex = run(OpenAICapture({"model": "x", "messages": []}, chat=True), [err])
        assert (
            ex.stop_reason,
            ex.extra["error_message"],
        ) == ("upstream_error", "The model `x` does not exist")


class TestOpenAIRefusal:
    """OpenAI's ``refusal``, given in place of the content (``content: null``), with its tokens
    under ``logprobs.refusal``: the answer's text and tokens, and a ``refusal`` part."""

    def _entries(self, pieces: list[str]) -> list[dict[str, Any]]:
        return [
            {"token": p, "logprob": -0.1, "bytes": list(p.encode()), "top_logprobs": []}
            for p in pieces
        ]

    def test_whole(self) -> None:
        body = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "system_fingerprint": "fp_1",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": None,
                            "refusal": "I'm sorry, I can't help.", "annotations": []},
                "logprobs": {"content": None,
                             "refusal": self._entries(["I'm", " sorry", ",", " I can't help."])},
                "finish_reason": "stop",
            }],
        }  # fmt: skip
        ex = run(OpenAICapture({"model": "gpt-4o", "logprobs": True}, chat=True), [body])
        assert ex.output_text == "I'm sorry, I can't help."
        assert (ex.output_tokens, ex.output_token_source) == (
            ["I'm", " sorry", ",", " I can't help."],
            "upstream-pieces",
        )
        assert [{"type": "refusal", "content": "I'm sorry, I can't help."}] == ex.extra[
            "gen_ai.output.messages"
        ][0]["parts"]

    def test_streamed(self) -> None:
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o", "system_fingerprint": "fp_1"}  # fmt: skip

        def chunk(delta: dict[str, Any], lp: Any, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {**base, "choices": [choice]}

        chunks = [
            chunk({"role": "assistant", "refusal": ""}, {"content": None, "refusal": []}),
            chunk({"refusal": "I'm"}, {"content": None, "refusal": self._entries(["I'm"])}),
            chunk({"refusal": " sorry"}, {"content": None, "refusal": self._entries([" sorry"])}),
            chunk({}, None, "stop"),
        ]
        request = {"model": "gpt-4o", "stream": True, "logprobs": True}
        ex = run(OpenAICapture(request, chat=True), chunks)
        assert (ex.output_text, ex.stop_reason) == ("I'm sorry", "stop")
        assert (ex.output_tokens, ex.output_token_source) == (["I'm", " sorry"], "upstream-pieces")
        assert ex.extra["gen_ai.output.messages"][0]["parts"][0]["type"] == "refusal"


class TestOpenAIOddFields:
    """Fields of the wrong JSON type where token data or usage would be: ignored, never taken
    for data, and the output still captured."""

    @pytest.mark.parametrize(
        "odd",
        [
            {"usage": [1, 2]}, {"usage": "x"}, {"timings": "x"}, {"timings": {"predicted_n": "2"}},
            {"prompt_token_ids": "x"}, {"prompt_token_ids": {"a": 1}},
        ],
        ids=repr,
    )  # fmt: skip
    def test_chunk_level(self, odd: dict[str, Any]) -> None:
        chunks = [
            {"object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": None}], **odd},
            {"object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]  # fmt: skip
        ex = run(OpenAICapture({"model": "m", "stream": True}, chat=True), chunks)
        assert (ex.output_text, ex.stop_reason) == ("ab", "stop")
        assert (ex.input_tokens, ex.input_token_source) == (None, "none")
        assert "gen_ai.usage.input_tokens" not in ex.extra

    @pytest.mark.parametrize(
        "odd",
        [{"token_ids": "x"}, {"token_ids": {"a": 1}}, {"logprobs": "x"}, {"logprobs": [1]},
         {"prompt_token_ids": 5}],
        ids=repr,
    )  # fmt: skip
    def test_choice_level(self, odd: dict[str, Any]) -> None:
        chunks = [
            {"object": "text_completion", "model": "m",
             "choices": [{"index": 0, "text": "ab", "finish_reason": "length", **odd}]},
        ]  # fmt: skip
        ex = run(OpenAICapture({"model": "m", "stream": True}, chat=False), chunks)
        assert (ex.output_text, ex.stop_reason) == ("ab", "length")
        assert (ex.output_tokens, ex.output_token_source) == (None, "none")
        assert (ex.input_tokens, ex.input_token_source) == (None, "none")


class TestOpenAICompletions:
    """``/v1/completions``."""

    @pytest.mark.parametrize("case", ["whole", "server-dropped-one", "not-echoed"])
    def test_echo_splits_prompt_tokens_off(self, case: str) -> None:
        """With ``echo: true`` the text and the logprobs tokens lead with the prompt's: split
        at the usage counts (the prompt's become the input's); when the counts do not add up
        (llama-cpp-python's server drops one), recorded as no token data; a server that did
        not echo (as many tokens as the answer's) is recorded as it is."""
        tokens = ["The", " quick", " brown", " fox"]
        lps: list[float | None] = [None, -1.0, -2.0, -3.0]
        dropped = case == "server-dropped-one"
        if dropped:
            tokens, lps = tokens[:-1], lps[:-1]
        if case == "not-echoed":
            tokens, lps = tokens[2:], lps[2:]
        body = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "text": "The quick brown fox",
                    "index": 0,
                    "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None,
                                 "text_offset": list(range(len(tokens)))},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        }  # fmt: skip
        request = {"model": "m", "prompt": "The quick", "echo": True, "logprobs": 1}
        ex = run(OpenAICapture(request, chat=False), [body])
        assert "The quick brown fox" == ex.output_text
        if case == "not-echoed":
            assert (None, [" brown", " fox"]) == (ex.input_tokens, ex.output_tokens)
            assert "tokentrail.echo_tokens_unsplit" not in ex.extra
        elif dropped:
            assert (None, "none", None, "none") == (
                ex.input_tokens,
                ex.input_token_source,
                ex.output_tokens,
                ex.output_token_source,
            )
            assert "tokentrail.echo_tokens_unsplit" in ex.extra
        else:
            assert (["The", " quick"], [" brown", " fox"]) == (ex.input_tokens, ex.output_tokens)
            assert ("upstream-pieces",) * 2 == (ex.input_token_source, ex.output_token_source)
            assert [-2.0, -3.0] == ex.extra["output_logprobs"]

    def test_reference_object(self) -> None:
        """The reference's text_completion object."""
        body = {
            "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
            "object": "text_completion",
            "created": 1589478378,
            "model": "gpt-3.5-turbo-instruct",
            "system_fingerprint": "fp_44709d6fcb",
            "choices": [
                {
                    "text": "\n\nThis is indeed a test",
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
        ex = run(
            OpenAICapture(
                {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test"}, chat=False
            ),
            [body],
        )
        assert (
            ex.input_text,
            ex.output_text,
            ex.stop_reason,
        ) == ("Say this is a test", "\n\nThis is indeed a test", "length")
        assert ex.api == "openai.completions"

    def test_legacy_logprobs(self) -> None:
        """Legacy ``logprobs.tokens`` give pieces, decoding ``bytes:\\xNN``."""
        body = {
            "id": "c",
            "object": "text_completion",
            "model": "m",
            "choices": [
                {
                    "text": "a\u2019",
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": {
                        "tokens": ["a", "bytes:\\xe2\\x80", "bytes:\\x99"],
                        "token_logprobs": [-1.0, -2.0, -3.0],
                        "top_logprobs": None,
                        "text_offset": [0, 1, 1],
                    },
                }
            ],
        }
        ex = run(OpenAICapture({"model": "m", "prompt": ["p"]}, chat=False), [body])
        assert (
            ex.output_tokens,
            ex.output_token_source,
        ) == (["a", [0xE2, 0x80], [0x99]], "upstream-pieces")
        assert ex.input_text == "p"

    def test_vllm_prompt_ids_on_choice(self) -> None:
        """vLLM completions put prompt_token_ids on the choice."""
        body = {
            "id": "c",
            "object": "text_completion",
            "model": "m",
            "choices": [
                {
                    "text": "x",
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "prompt_token_ids": [5, 6],
                    "token_ids": [7],
                }
            ],
        }
        ex = run(OpenAICapture({"model": "m", "prompt": "p"}, chat=False), [body])
        assert (ex.input_tokens, ex.output_tokens) == ([5, 6], [7])

    def test_vllm_prompt_ids_once_per_choice_are_one_prompt(self) -> None:
        """With ``n`` = 2 vLLM gives the whole prompt's ids once per choice (on each
        completions choice, on each streamed chat choice's first chunk): one prompt, not two
        joined; a batch of two prompts (ids that differ) leaves no single prompt sequence."""

        def choice(i: int, prompt: list[int]) -> dict[str, Any]:
            return {"text": "x", "index": i, "finish_reason": "stop", "logprobs": None,
                    "prompt_token_ids": prompt, "token_ids": [7]}  # fmt: skip

        body = {"id": "c", "object": "text_completion", "model": "m",
                "choices": [choice(0, [5, 6]), choice(1, [5, 6])]}  # fmt: skip
        ex = run(OpenAICapture({"model": "m", "prompt": "p", "n": 2}, chat=False), [body])
        assert (ex.input_tokens, ex.input_token_source) == ([5, 6], "upstream-ids")
        batch = {**body, "choices": [choice(0, [5, 6]), choice(1, [8])]}
        ex = run(OpenAICapture({"model": "m", "prompt": ["p", "q"]}, chat=False), [batch])
        assert (ex.input_tokens, ex.input_token_source) == (None, "none")

        def first(i: int) -> dict[str, Any]:
            return {"object": "chat.completion.chunk", "model": "m", "prompt_token_ids": [1, 2],
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}]}  # fmt: skip

        def token(i: int, reason: str | None) -> dict[str, Any]:
            return {"object": "chat.completion.chunk", "model": "m",
                    "choices": [{"index": i, "delta": {"content": "a"}, "token_ids": [3],
                                 "finish_reason": reason}]}  # fmt: skip

        chunks = [first(0), first(1), token(0, None), token(1, None), token(0, "stop"),
                  token(1, "stop")]  # fmt: skip
        ex = run(OpenAICapture({"model": "m", "stream": True, "n": 2}, chat=True), chunks)
        assert (ex.input_tokens, ex.input_token_source) == ([1, 2], "upstream-ids")
        assert (ex.output_tokens, ex.output_text) == ([3, 3], "aa")


class TestHelpers:
    """Pieces, rendering and parsing."""

    @pytest.mark.parametrize("api", ["ollama.generate", "ollama.chat", "openai.chat"])
    @pytest.mark.parametrize(
        ("request_body", "model"),
        [({"model": "m:1"}, "m:1"), ({}, ""), ({"model": 5}, "5"), ({"model": ["a"]}, '["a"]')],
        ids=repr,
    )
    def test_model_as_requested(self, api: str, request_body: dict[str, Any], model: str) -> None:
        """``model`` is always a string: as requested, "" for none, JSON text for a non-string."""
        exchange = new_capture(api, request_body).finish(META, "upstream_error")
        assert model == exchange.model

    @pytest.mark.parametrize(
        ("entry", "expected"),
        [
            ({"token": "Hi", "bytes": [72, 105]}, (None, "Hi")),
            ({"token": "?", "bytes": [0xFF]}, (None, [0xFF])),
            ({"token": "token_id:42"}, (42, None)),
            ({"id": 7, "token": "x"}, (7, "x")),
            ({"token": "bytes:\\xe2"}, (None, [0xE2])),
            ({"token": "bytes: \\xe2\\x80"}, (None, [0xE2, 0x80])),  # (seen with a space too)
            ({"logprob": 0.0}, (None, None)),
            ({"token": "", "bytes": None, "logprob": -1.0}, (None, None)),
            ({"token": "", "logprob": -1.0}, (None, None)),
            ({"id": 9, "token": ""}, (9, None)),
            ({"token": "", "bytes": []}, (None, "")),
        ],
    )
    def test_entry_token(self, entry: dict[str, Any], expected: tuple[Any, Any]) -> None:
        """Bytes win over token text; ids are read from ``id`` and ``token_id:N``; a "" token
        without bytes is an unknown piece (llama-cpp-python sends a lone byte's token so)."""
        assert expected == entry_token(entry)

    def test_render_messages(self) -> None:
        """Parts, images and tool calls render as documented."""
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                ],
            },
            {"role": "user", "content": "this", "images": ["b64"]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    }
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "g", "arguments": {"b": "é"}}}],
            },
        ]
        expected = (
            "user: look[image_url]\nuser: this [image]\n"
            'assistant:  [tool_call f {"a":1}]\nassistant:  [tool_call g {"b":"é"}]'
        )
        assert expected == render_messages(msgs)
        assert None is render_messages("nope")

    def test_loads_lone_surrogate(self) -> None:
        """A lone surrogate escape parses (cleaned as the record cleans text) instead of failing."""
        assert {"a": clean_text("x\ud800")} == loads(b'{"a": "x\\ud800"}')
        with pytest.raises(ValueError):
            loads(b"\xff{")

    def test_new_capture(self) -> None:
        """Each api gets its dialect."""
        assert new_capture("ollama.chat", {}).api == "ollama.chat"
        with pytest.raises(ValueError):
            new_capture("nope", {})

    def test_record_roundtrip(self) -> None:
        """A captured exchange serialises to I-JSON with the seed hash over its tokens."""
        ex = run(
            OllamaCapture({"model": "m", "prompt": "p", "stream": False}, chat=False),
            [
                {
                    "model": "m",
                    "response": "r",
                    "done": True,
                    "done_reason": "stop",
                    "context": [1, 2],
                    "prompt_eval_count": 1,
                    "eval_count": 1,
                }
            ],
        )
        fields = ex.fields()
        assert hashlib.sha256(json.dumps([1]).encode()).hexdigest() == fields["input_hash"]


class TestBegun:
    """A crash-safety note rebuilds, byte for byte, the record it stands for."""

    REQUESTS: ClassVar[dict[str, dict[str, Any]]] = {
        "ollama.generate": {"model": "m", "prompt": "p \u00e9\ud83d\ude00", "options": {"seed": 7}},
        "ollama.chat": {
            "model": "m",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "stream": False,
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        "openai.chat": {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "t"}]}],
            "logprobs": True,
            "max_tokens": 3,
            "big": 2**70,
        },
        "openai.completions": {"model": 5, "prompt": ["a", "b"], "echo": True, "stream": True},
    }

    @pytest.mark.parametrize("api", sorted(REQUESTS))
    def test_rebuild_is_the_provisional_record(self, api: str) -> None:
        capture = new_capture(api, loads(json.dumps(self.REQUESTS[api])))
        capture.logprobs_asked = True  # (asked on the client's behalf: no output, no difference)
        meta = Meta(
            timestamp="2024-01-01T00:00:00.000001Z",
            event_id="00000000-0000-4000-8000-0000000000e2",
            request_duration_ms=0.123456789,
            user_id="alice",
            session_id="s-1",
            extra={"stream": capture.stream, "client.address": "::1", "retry_of": "x"},
        )
        begun = Begun(capture, meta)
        note = begun.note()
        assert note is not None
        rebuilt = Begun.rebuild(loads(note))
        assert begun.provisional().content_bytes() == rebuilt.content_bytes()
        assert ("interrupted", meta.event_id) == (rebuilt.stop_reason, begun.event_id)

    def test_too_deep_for_a_note(self) -> None:
        """A request nested beyond the encoder has no note; its record is noted instead."""
        deep = loads(b'{"model": "m", "prompt": "p", "options": ' + b"[" * 300 + b"]" * 300 + b"}")
        begun = Begun(new_capture("ollama.generate", deep), META)
        assert begun.note() is None
        assert begun.provisional().content_bytes()

    @pytest.mark.parametrize(
        "note",
        [
            {"api": "nope", "request": {}, "meta": {}},
            {"api": "openai.chat", "request": [], "meta": {}},
            {"api": "openai.chat", "request": {}, "meta": {"x": 1}},
            {"api": "openai.chat", "request": {}},
            {"api": "openai.chat", "request": {}, "meta": {"timestamp": 1}},
        ],
    )
    def test_not_a_note(self, note: dict[str, Any]) -> None:
        """What is not a note raises one of the errors the replay skips a note for."""
        with pytest.raises((ValueError, TypeError, KeyError, AttributeError, ConfigError)):
            Begun.rebuild(note)
