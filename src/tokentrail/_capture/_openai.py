"""Capture of the OpenAI-compatible API: ``POST /v1/chat/completions`` and ``/v1/completions``.

Wire format (OpenAI API reference, "Chat Completions" and the legacy "Completions"): a
non-streamed response is one ``chat.completion`` (or ``text_completion``) object with ``id``,
``model``, ``system_fingerprint``, ``choices[]`` (``message`` or ``text``, ``logprobs``,
``finish_reason``) and ``usage`` (``prompt_tokens``, ``completion_tokens``). With
``"stream": true`` it is Server-Sent Events: ``data: <chunk>`` events of
``chat.completion.chunk`` objects whose ``choices[].delta`` carries fragments (``content``,
``tool_calls[]`` by ``index`` with ``function.arguments`` in pieces), a last chunk with the
``finish_reason``, an extra ``choices: []`` chunk with ``usage`` when the request set
``stream_options.include_usage``, and ``data: [DONE]``. Errors are ``{"error": {"message",
"type", "param", "code"}}``, as the body or as an event of a stream.

Token data, best first:

- vLLM ``return_token_ids`` (vLLM 0.10.2+): ``prompt_token_ids`` (top level for chat, on the
  choice for completions; first chunk only when streamed) and ``choices[].token_ids`` per chunk
  → ``upstream-ids``;
- llama.cpp server: ``logprobs.content[].id`` → ``upstream-ids``;
- ``logprobs.content[].bytes`` / ``.token`` (chat), ``logprobs.tokens`` (legacy completions,
  with OpenAI's ``bytes:\\xNN`` and vLLM's ``token_id:N`` spellings decoded) → ``upstream-pieces``.

``model_version`` is the response ``model`` + ``"@"`` + ``system_fingerprint`` when the
fingerprint is present, else the response ``model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._record import Exchange, TokenList
from ._common import (
    MAPPING,
    SOURCE_IDS,
    SOURCE_NONE,
    Capture,
    Meta,
    TokenTrack,
    compact_json,
    render_messages,
)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class _Choice:
    """What one ``choices[index]`` has produced so far."""

    __slots__ = (
        "finish_reason",
        "logprobs",
        "reasoning",
        "refusal",
        "reported",
        "text",
        "tool_calls",
    )

    def __init__(self) -> None:
        self.text: list[str] = []  # the content, and a refusal given in its place
        self.refusal = False  # the text is (or has) OpenAI's ``refusal``
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.reported = TokenTrack()  # vLLM token_ids
        self.logprobs = TokenTrack()  # logprobs entries

    def tokens(self) -> tuple[TokenList | None, str]:
        if self.reported.seen and self.reported.ids_ok:
            return list(self.reported.ids), SOURCE_IDS
        return self.logprobs.best()


class OpenAICapture(Capture):
    """An accumulator for one ``/v1/chat/completions`` or ``/v1/completions`` exchange."""

    def __init__(self, request: Mapping[str, Any], *, chat: bool) -> None:
        super().__init__(request)
        self.chat = chat
        self.api = "openai.chat" if chat else "openai.completions"
        self.choices: dict[int, _Choice] = {}
        self.streamed = self.stream  # asked on every chunk
        self.prompt_ids = TokenTrack()
        self.prompt_reported = False  # vLLM's prompt_token_ids seen (an empty list included)
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.fingerprint: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.predicted: int | None = None  # tokens generated, by llama.cpp's timings

    def feed(self, chunk: Any) -> bool:
        """Take one SSE ``data:`` payload (or the whole non-streamed body) as parsed JSON."""
        self.chunks += 1
        if not isinstance(chunk, MAPPING):
            return False
        err = chunk.get("error")
        if err is not None and not chunk.get("choices"):
            msg = err.get("message") if isinstance(err, MAPPING) else err
            self.error = msg if isinstance(msg, str) else compact_json(err)
            return False
        if chunk.get("object") == "error":  # vLLM's error body: message, type, code at the top
            msg = chunk.get("message")
            self.error = msg if isinstance(msg, str) and msg else compact_json(chunk)
            return False
        if isinstance(chunk.get("id"), str):
            self.response_id = chunk["id"]
        if isinstance(chunk.get("model"), str):
            self.response_model = chunk["model"]
        if isinstance(chunk.get("system_fingerprint"), str):
            self.fingerprint = chunk["system_fingerprint"]
        # (Fields that most chunks lack are tested for None first: None is not a dict, and
        # isinstance then asks the Mapping ABC, several times slower, on every chunk.)
        usage = chunk.get("usage")
        if usage is not None and isinstance(usage, MAPPING):
            self.usage = usage
        timings = chunk.get("timings")  # llama.cpp's, on its last chunk, usage or not
        if (
            timings is not None
            and isinstance(timings, MAPPING)
            and _count(timings.get("predicted_n")) is not None
        ):
            self.predicted = timings["predicted_n"]
        prompt_ids = chunk.get("prompt_token_ids")
        if prompt_ids is not None:
            self._prompt(prompt_ids)
        produced = False
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for raw in choices:
                if isinstance(raw, MAPPING):
                    produced = self._feed_choice(raw) or produced
        if chunk.get("object") == "chat.completion" or not self.streamed:
            self.finished = True  # a whole answer (a streamed completions chunk is also called
            # "text_completion": it is finished by its finish_reason, as a chat chunk is)
        return produced

    def _feed_choice(self, raw: Mapping[str, Any]) -> bool:
        index = raw.get("index", 0)
        index = index if isinstance(index, int) else 0
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = _Choice()
        prompt_ids = raw.get("prompt_token_ids")  # vLLM completions: on the choice
        if prompt_ids is not None:
            self._prompt(prompt_ids)
        produced = False
        if self.chat:
            msg = raw.get("delta", raw.get("message"))
            msg = msg if isinstance(msg, MAPPING) else {}
            content = msg.get("content")
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if isinstance(reasoning, str) and reasoning:
                choice.reasoning.append(reasoning)
                produced = True
            refusal = msg.get("refusal")  # OpenAI's, in place of the content
            calls = msg.get("tool_calls")
            if isinstance(calls, list) and calls:
                produced = True
                for pos, call in enumerate(calls):
                    self._merge_call(choice, pos, call)
        else:
            content = raw.get("text")
            refusal = None
        if isinstance(content, str) and content:
            choice.text.append(content)
            produced = True
        if isinstance(refusal, str) and refusal:
            choice.text.append(refusal)
            choice.refusal = produced = True
        ids = raw.get("token_ids")
        had_ids = ids is not None and choice.reported.add_ids(ids)
        logprobs = raw.get("logprobs")
        had_lp = logprobs is not None and self._feed_logprobs(choice, logprobs)
        if produced and not had_ids:
            choice.reported.missing()
        if produced and not had_lp:
            choice.logprobs.missing()
        reason = raw.get("finish_reason")
        if isinstance(reason, str):
            choice.finish_reason = reason
            self.finished = True
        return produced

    def _prompt(self, ids: Any) -> None:
        """vLLM's ``prompt_token_ids``: the whole prompt each time it is given, so once per
        choice with ``n`` > 1 (on each completions choice, on each streamed chat choice's first
        chunk). The same list again adds nothing; a different one (a batch of prompts) leaves
        no single prompt sequence."""
        if not isinstance(ids, list):
            return  # not token data (see add_ids)
        track = self.prompt_ids
        if not self.prompt_reported:
            self.prompt_reported = True
            track.add_ids(ids)
        elif ids != track.ids:
            track.ids_ok = False

    def _feed_logprobs(self, choice: _Choice, logprobs: Any) -> bool:
        if not isinstance(logprobs, MAPPING):
            return False
        if self.chat or "content" in logprobs:
            # A refusal's tokens are under "refusal", where the content's would be.
            got = choice.logprobs.add_entries(logprobs.get("content"))
            refusal = logprobs.get("refusal")
            return (refusal is not None and choice.logprobs.add_entries(refusal)) or got
        tokens, lps = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if not isinstance(tokens, list):
            return False
        lps = lps if isinstance(lps, list) else []
        entries = [
            {"token": t, "logprob": lps[i] if i < len(lps) else None} for i, t in enumerate(tokens)
        ]
        return choice.logprobs.add_entries(entries) if entries else False

    def _logprobs_shortfall(self, choice: _Choice) -> int:
        """How many generated tokens have no logprobs entry (0: none known to be missing).

        llama.cpp's server gives no entry to a token that leaves the text inside a UTF-8
        character (the next entry carries the bytes of both), and a stream cut there flushes
        the held bytes in a chunk with none: so its entries can be fewer than the tokens
        generated, and ids with gaps are not the model's output. Streamed, it also gives none
        to the end-of-sequence token, so one fewer on a ``stop`` is complete, but only when
        no stop string was asked for: the token that completes a stop string has its entry.
        When every entry was left out it answers ``"logprobs": null``: all are missing.
        Without a count of the tokens generated (llama-cpp-python streams no usage), the
        entries are the count: those whose piece is unknown (its ``""`` for a token that is
        not UTF-8 on its own) are the ones missing.
        """
        track = choice.logprobs
        if choice.reported.seen or len(self.choices) != 1:
            return 0
        if not (track.seen or self.logprobs_asked):  # (asked, and all of them left out)
            return 0
        usage = self.usage or {}
        generated = _count(usage.get("completion_tokens"))
        if generated is None:
            generated = self.predicted
        if generated is None:
            generated = track.entries
        details = usage.get("completion_tokens_details")  # OpenAI counts reasoning tokens,
        if isinstance(details, MAPPING):  # which have no logprobs
            generated -= _count(details.get("reasoning_tokens")) or 0
        missing = generated - max(len(track.ids), len(track.pieces))
        on_eos = self.stream and choice.finish_reason == "stop" and not self.request.get("stop")
        return 0 if missing <= (1 if on_eos else 0) else missing

    @staticmethod
    def _merge_call(choice: _Choice, pos: int, call: Any) -> None:
        if not isinstance(call, MAPPING):
            return
        idx = call.get("index", pos)
        idx = idx if isinstance(idx, int) else pos
        slot = choice.tool_calls.setdefault(idx, {"id": None, "name": None, "arguments": ""})
        if isinstance(call.get("id"), str):
            slot["id"] = call["id"]
        fn = call.get("function")
        if isinstance(fn, MAPPING):
            if isinstance(fn.get("name"), str):
                slot["name"] = fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                slot["arguments"] += args
            elif args is not None:
                slot["arguments"] = args

    def model_finished(self) -> bool:
        """Every choice asked for (``n``) has its ``finish_reason``."""
        n = self.request.get("n")
        wanted = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        done = sum(c.finish_reason is not None for c in self.choices.values())
        return self.error is None and done >= wanted

    def default_model_version(self) -> str | None:
        """``model@system_fingerprint`` when the fingerprint is known, else the response model."""
        if self.response_model is not None and self.fingerprint:
            return f"{self.response_model}@{self.fingerprint}"
        return self.response_model

    def finish(self, meta: Meta, stop_reason: str | None = None) -> Exchange:
        """The exchange, from the first choice; every choice is in ``gen_ai.output.messages``."""
        first = self.choices[min(self.choices)] if self.choices else _Choice()
        output_tokens, output_source = first.tokens()
        shortfall = self._logprobs_shortfall(first)
        if shortfall:
            output_tokens, output_source = None, SOURCE_NONE
        input_tokens: TokenList | None = None
        input_source = SOURCE_NONE
        if self.prompt_ids.seen and self.prompt_ids.ids_ok:
            input_tokens, input_source = list(self.prompt_ids.ids), SOURCE_IDS
        output_logprobs = list(first.logprobs.logprobs)
        echo_unsplit = False
        if not self.chat and self.request.get("echo") is True and output_tokens is not None:
            # The prompt echoed: its tokens lead the answer's in the logprobs, split off at the
            # usage counts. As many tokens as the answer's: the server did not echo (Ollama,
            # llama.cpp), or they are vLLM's generated ids, which never hold the prompt's.
            usage = self.usage or {}
            p, c = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
            if p is not None and c is not None and len(output_tokens) == p + c and p:
                if input_tokens is None:
                    input_tokens, input_source = output_tokens[:p], output_source
                output_tokens = output_tokens[p:]
                output_logprobs = output_logprobs[-c:] if c else []  # (the first is null)
            elif c is None or len(output_tokens) != c:
                output_tokens, output_source, echo_unsplit = None, SOURCE_NONE, True

        extra = self.base_extra(meta)
        extra["gen_ai.operation.name"] = "chat" if self.chat else "text_completion"
        if self.response_id is not None:
            extra["gen_ai.response.id"] = self.response_id
        if self.response_model is not None:
            extra["gen_ai.response.model"] = self.response_model
        if self.fingerprint is not None:
            extra["openai.response.system_fingerprint"] = self.fingerprint
        if self.usage is not None:
            p = _count(self.usage.get("prompt_tokens"))
            c = _count(self.usage.get("completion_tokens"))
            if p is not None:
                extra["gen_ai.usage.input_tokens"] = p
            if c is not None:
                extra["gen_ai.usage.output_tokens"] = c
        reasons = [self.choices[i].finish_reason for i in sorted(self.choices)]
        if any(r is not None for r in reasons):
            extra["gen_ai.response.finish_reasons"] = reasons
        if first.logprobs.logprobs and output_source != SOURCE_NONE:
            extra["output_logprobs"] = output_logprobs
        if shortfall:
            extra["tokentrail.output_tokens_missing"] = shortfall
        if echo_unsplit:
            extra["tokentrail.echo_tokens_unsplit"] = (
                "echo: the token data holds the prompt's tokens too, in a number the usage"
                " counts do not add up to, so neither side is known"
            )
        extra["gen_ai.output.messages"] = [
            self._output_message(self.choices[i]) for i in sorted(self.choices)
        ]
        extra.update(meta.extra)

        if stop_reason is None:
            if self.error is not None:
                stop_reason = "upstream_error"
            elif first.finish_reason is not None:
                stop_reason = first.finish_reason
            else:
                stop_reason = "upstream_error"  # a stream that ended before any finish_reason

        if self.chat:
            input_text = render_messages(self.request.get("messages"))
        else:
            input_text = _prompt_text(self.request.get("prompt"))
        model_version = meta.model_version or self.default_model_version()
        return Exchange(
            model=self.requested_model,
            api=self.api,
            stop_reason=stop_reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            input_token_source=input_source,
            output_token_source=output_source,
            input_text=input_text,
            output_text="".join(first.text),
            user_id=meta.user_id,
            session_id=meta.session_id,
            model_version=model_version,
            request_duration_ms=meta.request_duration_ms,
            timestamp=meta.timestamp,
            event_id=meta.event_id,
            extra=extra,
        )

    @staticmethod
    def _output_message(choice: _Choice) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        if choice.reasoning:
            parts.append({"type": "reasoning", "content": "".join(choice.reasoning)})
        text = "".join(choice.text)
        if text or not (choice.reasoning or choice.tool_calls):
            parts.append({"type": "refusal" if choice.refusal else "text", "content": text})
        for idx in sorted(choice.tool_calls):
            call = choice.tool_calls[idx]
            part: dict[str, Any] = {"type": "tool_call", "name": call["name"]}
            if call["id"] is not None:
                part["id"] = call["id"]
            part["arguments"] = call["arguments"]
            parts.append(part)
        message: dict[str, Any] = {"role": "assistant", "parts": parts}
        if choice.finish_reason is not None:
            message["finish_reason"] = choice.finish_reason
        return message


def _prompt_text(prompt: Any) -> str | None:
    """``input_text`` of a legacy completion: the ``prompt`` string.

    A one-element list of strings counts as that string; a prompt given as token ids, or a batch
    of several prompts, has no single prompt text (``null``); the body is stored either way.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    return None
