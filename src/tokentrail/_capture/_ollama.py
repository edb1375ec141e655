"""Capture of Ollama's native API: ``POST /api/generate`` and ``POST /api/chat``.

Wire format (Ollama ``docs/api.md``): a streamed response (the default; ``"stream": false``
turns it off) is NDJSON, one object per line; every line but the last carries a fragment in
``response`` (generate) or ``message.content`` (chat), and optionally ``thinking`` /
``message.thinking`` and ``message.tool_calls``. The last line has ``"done": true`` with
``done_reason`` (``stop``, ``length``, ``load``, ``unload``), ``prompt_eval_count``,
``eval_count`` and the ``*_duration`` fields in nanoseconds, and for ``/api/generate`` in 0.4.x
the ``context`` array. A non-streamed response is that final object with the whole text. An error
is ``{"error": "..."}``, as the whole body or as a line of a stream. Ollama 0.12.11 and later
return ``logprobs: [{"token", "logprob", "bytes"?, "top_logprobs"?}]`` on each chunk when the
request sets ``"logprobs": true``.

Token sources: output pieces from ``logprobs`` (``upstream-pieces``) when every output chunk had
them, every token generated has its entry, and the pieces spell the answer's text; otherwise,
and for the input always, the ``context`` split by :func:`split_context` (``upstream-context``);
otherwise ``none``.

The runner sends no entry for the tokens of a character an answer ends inside (``flushPending``
drops the incomplete bytes, and with nothing left, their entries), while ``eval_count`` counts
every token sampled, the end-of-sequence token included: so a ``length`` answer with fewer
entries than ``eval_count``, or a ``stop`` one (no stop sequences asked) with fewer than
``eval_count`` − 1, lacks tokens. Some versions give a token that is not UTF-8 on its own as
U+FFFD with U+FFFD's bytes (ollama/ollama#13497): pieces that do not spell the text are no
token sequence of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._record import Exchange, TokenList
from ._common import (
    MAPPING,
    SOURCE_CONTEXT,
    SOURCE_NONE,
    SOURCE_PIECES,
    Capture,
    Meta,
    TokenTrack,
    compact_json,
    render_messages,
)

_DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
_INT_ONLY = frozenset({int})  # a context of token ids: ints, not bools or floats


def split_context(
    context: list[int], prompt_eval_count: int | None, eval_count: int | None
) -> tuple[list[int], list[int] | None, dict[str, Any]]:
    """Split Ollama's ``context`` into (input tokens, output tokens, how it was split).

    ``context`` is a re-tokenisation of the templated prompt (after any earlier ``context`` the
    request sent) followed by the generated text, without BOS or EOS. With ``n = len(context)``,
    ``p = prompt_eval_count`` and ``e = eval_count``, the split point ``s`` is:

    1. ``p`` when both counts are known and ``p + e >= n`` and ``p <= n``. When the counts agree
       (``p + e == n``) this is exact. ``p + e`` exceeds ``n`` when ``e`` counts tokens the
       context no longer holds (an end-of-sequence token, or a stop sequence trimmed from the
       text) or ``p`` counts a BOS token; trusting ``p`` keeps the first error at most one token.
    2. ``n - e`` otherwise when ``e`` is known and ``e <= n`` (``p`` missing, or smaller than the
       context allows, as when a cached prompt prefix goes uncounted).
    3. ``p`` when only ``p`` is known and ``p <= n``.
    4. otherwise ``n``: everything is input and the output tokens are unknown (``None``).

    Input is ``context[:s]``, output ``context[s:]``, so input + output is always the context.
    The third value records ``n``, ``p``, ``e``, ``s`` and whether the counts agreed, so an
    auditor can see how much to trust the boundary.
    """
    n = len(context)
    p, e = prompt_eval_count, eval_count
    split: int | None
    if p is not None and e is not None and p + e >= n and p <= n:
        split = p
    elif e is not None and e <= n:
        split = n - e
    elif p is not None and p <= n:
        split = p
    else:
        split = None
    how = {
        "context_tokens": n,
        "prompt_eval_count": p,
        "eval_count": e,
        "split_at": n if split is None else split,
        "counts_agree": p is not None and e is not None and p + e == n,
    }
    if split is None:
        return list(context), None, how
    return list(context[:split]), list(context[split:]), how


def spells(pieces: TokenList | None, text: str) -> bool:
    """Whether ``pieces`` (strings, or byte values) joined are the UTF-8 of ``text``."""
    if pieces is None:
        return False
    joined = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in pieces)
    return joined == text.encode()


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class OllamaCapture(Capture):
    """An accumulator for one ``/api/generate`` or ``/api/chat`` exchange."""

    def __init__(self, request: Mapping[str, Any], *, chat: bool) -> None:
        super().__init__(request)
        self.chat = chat
        self.api = "ollama.chat" if chat else "ollama.generate"
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[Any] = []
        self.tokens = TokenTrack()
        self.final: Mapping[str, Any] = {}
        self.response_model: str | None = None

    @property
    def stream(self) -> bool:
        """Ollama streams unless the request says ``"stream": false``."""
        return self.request.get("stream", True) is not False

    def feed(self, chunk: Any) -> bool:
        """Take one NDJSON line (or the whole non-streamed body) as parsed JSON."""
        self.chunks += 1
        if not isinstance(chunk, MAPPING):
            return False
        if "error" in chunk:
            err = chunk["error"]
            self.error = err if isinstance(err, str) else compact_json(err)
            return False
        if isinstance(chunk.get("model"), str):
            self.response_model = chunk["model"]
        if self.chat:
            msg = chunk.get("message")
            msg = msg if isinstance(msg, MAPPING) else {}
            content, thinking = msg.get("content"), msg.get("thinking")
            calls = msg.get("tool_calls")
        else:
            content, thinking, calls = chunk.get("response"), chunk.get("thinking"), None
        produced = False
        if isinstance(content, str) and content:
            self.text.append(content)
            produced = True
        if isinstance(thinking, str) and thinking:
            self.thinking.append(thinking)
            produced = True
        if isinstance(calls, list) and calls:
            self.tool_calls.extend(calls)
            produced = True
        had_tokens = self.tokens.add_entries(chunk.get("logprobs"))
        if produced and not had_tokens:
            self.tokens.missing()
        if chunk.get("done") is True:
            self.finished = True
            self.final = chunk
        return produced or had_tokens

    def is_last(self, chunk: Any) -> bool:
        """The line with ``"done": true``, or an error line: what :meth:`feed` ends on."""
        return isinstance(chunk, MAPPING) and (chunk.get("done") is True or "error" in chunk)

    def finish(self, meta: Meta, stop_reason: str | None = None) -> Exchange:
        """The exchange; ``stop_reason`` overrides ``done_reason`` (e.g. ``client_disconnect``)."""
        final = self.final
        p, e = _count(final.get("prompt_eval_count")), _count(final.get("eval_count"))
        extra = self.base_extra(meta)
        extra["gen_ai.operation.name"] = "chat" if self.chat else "text_completion"

        input_tokens: TokenList | None = None
        input_source = SOURCE_NONE
        output_text = "".join(self.text)
        output_tokens, output_source = self.tokens.best()
        if output_source == SOURCE_PIECES:
            missing = self._entries_missing(e, final.get("done_reason"))
            if missing:
                extra["tokentrail.output_tokens_missing"] = missing
                output_tokens, output_source = None, SOURCE_NONE
            elif not (self.thinking or self.tool_calls) and not spells(output_tokens, output_text):
                extra["tokentrail.output_pieces_unusable"] = (
                    "the logprobs' pieces do not spell the answer's text"
                )
                output_tokens, output_source = None, SOURCE_NONE
        context = final.get("context")
        if isinstance(context, list) and set(map(type, context)) <= _INT_ONLY:
            ctx_in, ctx_out, how = split_context(context, p, e)
            input_tokens, input_source = list(ctx_in), SOURCE_CONTEXT
            if output_tokens is None and ctx_out is not None:
                output_tokens, output_source = list(ctx_out), SOURCE_CONTEXT
            extra["ollama.context_split"] = how

        if p is not None:
            extra["gen_ai.usage.input_tokens"] = p
        if e is not None:
            extra["gen_ai.usage.output_tokens"] = e
        if self.response_model is not None:
            extra["gen_ai.response.model"] = self.response_model
        done_reason = final.get("done_reason")
        if isinstance(done_reason, str):
            extra["gen_ai.response.finish_reasons"] = [done_reason]
        durations = {k: final[k] for k in _DURATIONS if _count(final.get(k)) is not None}
        if durations:
            extra["ollama.durations_ns"] = durations
        if self.tokens.logprobs and output_source != SOURCE_NONE:
            extra["output_logprobs"] = list(self.tokens.logprobs)
        extra["gen_ai.output.messages"] = [self._output_message(output_text, done_reason)]
        extra.update(meta.extra)

        if stop_reason is None:
            if self.error is not None:
                stop_reason = "upstream_error"
            elif isinstance(done_reason, str):
                stop_reason = done_reason
            elif self.finished:
                stop_reason = "stop"  # Ollama before 0.1.32 sent no done_reason
            else:
                stop_reason = "upstream_error"

        if self.chat:
            input_text = render_messages(self.request.get("messages"))
        else:
            prompt = self.request.get("prompt")
            input_text = prompt if isinstance(prompt, str) else None
        return Exchange(
            model=self.requested_model,
            api=self.api,
            stop_reason=stop_reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            input_token_source=input_source,
            output_token_source=output_source,
            input_text=input_text,
            output_text=output_text,
            user_id=meta.user_id,
            session_id=meta.session_id,
            model_version=meta.model_version,
            request_duration_ms=meta.request_duration_ms,
            timestamp=meta.timestamp,
            event_id=meta.event_id,
            extra=extra,
        )

    def _entries_missing(self, eval_count: int | None, done_reason: Any) -> int:
        """How many generated tokens have no logprobs entry (0: none known to be missing)."""
        if eval_count is None or self.error is not None:
            return 0
        if done_reason == "length":
            expected = eval_count
        elif done_reason == "stop" and not self._stop_sequences():
            expected = eval_count - 1  # the end-of-sequence token, counted and never sent
        else:
            return 0  # a stop sequence's tokens are counted and trimmed with their entries
        return max(0, expected - self.tokens.entries)

    def _stop_sequences(self) -> bool:
        options = self.request.get("options")
        stop = options.get("stop") if isinstance(options, MAPPING) else None
        return bool(stop)

    def _output_message(self, text: str, done_reason: Any) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        if self.thinking:
            parts.append({"type": "reasoning", "content": "".join(self.thinking)})
        if text or not (self.thinking or self.tool_calls):
            parts.append({"type": "text", "content": text})
        for call in self.tool_calls:
            fn = call.get("function") if isinstance(call, MAPPING) else None
            fn = fn if isinstance(fn, MAPPING) else {}
            part: dict[str, Any] = {"type": "tool_call", "name": fn.get("name")}
            if isinstance(call, MAPPING) and call.get("id") is not None:
                part["id"] = call["id"]
            part["arguments"] = fn.get("arguments")
            parts.append(part)
        message: dict[str, Any] = {"role": "assistant", "parts": parts}
        if isinstance(done_reason, str):
            message["finish_reason"] = done_reason
        return message
