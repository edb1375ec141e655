"""What every capture dialect shares: the accumulator interface, token pieces, chat rendering.

A capture is an incremental accumulator and does no I/O and reads no clock: it is fed the request
body (a parsed JSON object), then every response chunk as parsed JSON (each NDJSON line or SSE
``data:`` payload of a stream, or the one body of a non-streamed response), and finally produces
an :class:`~tokentrail._record.Exchange` from what it saw plus the :class:`Meta` the caller knows
(timing, identity, HTTP status). The proxy and the in-process SDK share it.

Token sources follow SPEC section 5, best first: ``upstream-ids`` (ids the server reports),
``upstream-pieces`` (token strings or bytes from logprobs), ``upstream-context`` (Ollama's
``context``), ``none``. A sequence is reported only when every chunk that carried output also
carried its tokens; a partial sequence would be a dishonest one, so it degrades to the next source.

Extra record fields use the OpenTelemetry GenAI semantic-convention names where one exists
(``gen_ai.usage.input_tokens``, ``gen_ai.response.id``, ``gen_ai.response.finish_reasons``,
``gen_ai.output.messages`` …); tokentrail's own fields are plain snake case (``request_body``,
``time_to_first_token_ms``, ``output_logprobs``, ``retry_of`` …).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .._record import Exchange, Token, TokenList, clean_text, new_event_id, now_rfc3339, piece

#: For ``isinstance(x, MAPPING)``: parsed JSON objects are dicts, told apart at once; other
#: mappings go through the ABC's check, which takes several times as long (on every chunk).
MAPPING = (dict, Mapping)

SOURCE_IDS = "upstream-ids"
SOURCE_PIECES = "upstream-pieces"
SOURCE_CONTEXT = "upstream-context"
SOURCE_NONE = "none"

#: OpenAI's legacy completions spell a piece that is not valid UTF-8 as ``bytes:\xe2\x80``.
_LEGACY_BYTES = re.compile(r"^bytes: ?((?:\\x[0-9a-fA-F]{2})+)$")
#: vLLM's ``return_tokens_as_token_ids`` spells a logprobs token as ``token_id:1234``.
_VLLM_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


def loads(raw: bytes | str) -> Any:
    """Parse JSON as the upstream would, with lone-surrogate escapes made storable.

    orjson refuses ``\\ud800``-style lone surrogates that Go's and Python's decoders accept, so a
    value that fails there is parsed by the standard library and its strings cleaned (U+FFFD).
    Raises ``ValueError`` (``orjson.JSONDecodeError`` is one) on anything that is not JSON, or
    not I-JSON as orjson reads it (``NaN``, ``1e400``, nesting beyond 1024). An integer beyond
    64 bits is read by orjson as the nearest double (``2**64`` as ``1.8446744073709552e+19``), and
    so recorded; the proxy still relays the client's own bytes.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # bad UTF-8 raises UnicodeDecodeError, itself a ValueError
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        try:
            return _clean(json.loads(text, parse_constant=_no_constant, parse_int=_int64))
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259): what orjson refuses, the fallback refuses too.
    raise ValueError(f"{name} is not JSON")


def _int64(text: str) -> int:
    value = int(text)
    if not -(1 << 63) <= value < (1 << 64):
        raise ValueError("integer beyond 64 bits (not I-JSON)")
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): _clean(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, slots=True)
class Meta:
    """What the caller knows about an exchange beyond the wire: timing, identity, status."""

    timestamp: str = field(default_factory=now_rfc3339)
    event_id: str = field(default_factory=new_event_id)
    request_duration_ms: float = 0.0
    time_to_first_token_ms: float | None = None
    user_id: str | None = None
    session_id: str | None = None
    model_version: str | None = None
    status: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class TokenTrack:
    """One token sequence as it arrives: ids and pieces kept apart, each while it stays complete."""

    __slots__ = ("entries", "ids", "ids_ok", "logprobs", "pieces", "pieces_ok")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pieces: list[Token] = []
        self.ids_ok = True
        self.pieces_ok = True
        self.logprobs: list[float] = []
        self.entries = 0  # logprobs entries read, with an id or a piece or neither

    @property
    def seen(self) -> bool:
        """Whether any token data arrived at all."""
        return bool(self.ids or self.pieces)

    def add_entries(self, entries: Any) -> bool:
        """Add logprob entries (``[{token, bytes?, id?, logprob}]``); False if there were none."""
        if not isinstance(entries, list) or not entries:
            return False
        self.entries += len(entries)
        for entry in entries:
            if not isinstance(entry, MAPPING):
                self.ids_ok = self.pieces_ok = False
                continue
            tok_id, tok_piece = entry_token(entry)
            if tok_id is None:
                self.ids_ok = False
            else:
                self.ids.append(tok_id)
            if tok_piece is None:
                self.pieces_ok = False
            else:
                self.pieces.append(tok_piece)
            lp = entry.get("logprob")
            if isinstance(lp, int | float) and not isinstance(lp, bool):
                self.logprobs.append(float(lp))
        return True

    def add_ids(self, ids: Any) -> bool:
        """Add reported token ids (vLLM ``token_ids``, llama.cpp ``tokens``)."""
        if not isinstance(ids, list):
            return False
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            self.ids.extend(ids)
        else:
            self.ids_ok = False
        return True

    def missing(self) -> None:
        """Output arrived without token data: neither sequence is complete any more."""
        self.ids_ok = self.pieces_ok = False

    def best(self) -> tuple[TokenList | None, str]:
        """The best complete sequence and its source, or ``(None, "none")``."""
        if self.ids_ok and self.ids:
            return list(self.ids), SOURCE_IDS
        if self.pieces_ok and self.pieces:
            return list(self.pieces), SOURCE_PIECES
        return None, SOURCE_NONE


def entry_token(entry: Mapping[str, Any]) -> tuple[int | None, Token | None]:
    """The id and the piece one logprobs entry reports (either may be ``None``).

    ``bytes`` wins over ``token`` for the piece, so a piece that is not valid UTF-8 is stored as
    its byte values; ``id`` (llama.cpp) is the id; vLLM's ``token_id:N`` and OpenAI's legacy
    ``bytes:\\xNN`` spellings are decoded.
    """
    tok_id: int | None = None
    raw_id = entry.get("id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        tok_id = raw_id
    tok_piece: Token | None = None
    raw_bytes = entry.get("bytes")
    token = entry.get("token")
    if isinstance(token, str):
        m = _VLLM_TOKEN_ID.match(token)
        if m:
            return (tok_id if tok_id is not None else int(m.group(1))), None
    if isinstance(raw_bytes, list) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw_bytes
    ):
        tok_piece = piece(bytes(raw_bytes))
    elif isinstance(token, str) and token:
        tok_piece = legacy_piece(token)
    # A "" token without bytes is a piece unknown, not one known to be empty: a server that
    # decodes each token dropping what is not UTF-8 on its own (llama-cpp-python's
    # errors="ignore") sends a lone byte's token so, and an empty token has bytes [].
    return tok_id, tok_piece


def legacy_piece(token: str) -> Token:
    """A logprobs token string as a piece, decoding OpenAI's ``bytes:\\xNN…`` form."""
    m = _LEGACY_BYTES.match(token)
    if m:
        return piece(bytes.fromhex(m.group(1).replace("\\x", "")))
    return clean_text(token)


def compact_json(value: Any) -> str:
    """Compact JSON with non-ASCII kept, for rendering tool-call arguments into text."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render_messages(messages: Any) -> str | None:
    """The documented ``input_text`` of a chat request: one ``role: text`` entry per message.

    The rule (the README quotes it):

    - entries are joined with ``"\\n"``, in request order; each is ``f"{role}: {text}"``;
    - ``text`` is the message ``content`` when it is a string; when it is a list of parts, the
      ``text`` of each text part, and ``[<type>]`` for any other part (``[image_url]``), joined
      with no separator; a missing or ``null`` content is the empty string;
    - each Ollama ``images`` entry appends `` [image]``;
    - each tool call appends `` [tool_call <name> <arguments>]``, the arguments as sent when a
      string (OpenAI) or as compact JSON when an object (Ollama);
    - a request whose ``messages`` is not a list of objects has ``input_text`` ``null`` (the body
      is stored beside it either way).

    Text inside a message keeps its own newlines, so an entry may span several lines; the
    rendering is for reading and hashing, the exact request is the stored ``request_body``.
    """
    if not isinstance(messages, list):
        return None
    lines: list[str] = []
    for msg in messages:
        if not isinstance(msg, MAPPING):
            return None
        role = msg.get("role")
        text = _content_text(msg.get("content"))
        images = msg.get("images")
        if isinstance(images, list):
            text += " [image]" * len(images)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                text += _render_tool_call(call)
        lines.append(f"{role if isinstance(role, str) else compact_json(role)}: {text}")
    return "\n".join(lines)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, MAPPING):
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    out.append(part["text"])
                else:
                    out.append(f"[{kind}]")
        return "".join(out)
    return compact_json(content)


def _render_tool_call(call: Any) -> str:
    if not isinstance(call, MAPPING):
        return f" [tool_call {compact_json(call)}]"
    fn = call.get("function")
    fn = fn if isinstance(fn, MAPPING) else {}
    name = fn.get("name")
    args = fn.get("arguments")
    args_text = args if isinstance(args, str) else compact_json(args)
    return f" [tool_call {name} {args_text}]"


def asks_logprobs(body: Mapping[str, Any]) -> bool:
    """Whether a request body asks for logprobs (``true``, or a count: legacy completions' 0
    asks OpenAI for the sampled token's)."""
    return body.get("logprobs") not in (None, False)


class Capture(ABC):
    """An incremental accumulator for one exchange in one dialect."""

    api: str

    def __init__(self, request: Mapping[str, Any]) -> None:
        self.request = request
        model = request.get("model")
        self.model: str | None = model if isinstance(model, str) else None
        #: The record's ``model``, "the model name as requested": the request's own string,
        #: ``""`` when it named none, the JSON text of a value that is not a string.
        self.requested_model: str = (
            model if isinstance(model, str) else "" if model is None else compact_json(model)
        )
        self.error: str | None = None
        self.finished = False
        self.chunks = 0
        #: The upstream was asked for logprobs: by the client, or on its behalf (the proxy's
        #: ``--request-token-data``, which the request body recorded here does not show).
        self.logprobs_asked = asks_logprobs(request)

    @abstractmethod
    def feed(self, chunk: Any) -> bool:
        """Take one parsed chunk; True when it carried output (for time to first token)."""

    @abstractmethod
    def finish(self, meta: Meta, stop_reason: str | None = None) -> Exchange:
        """The exchange as seen so far; ``stop_reason`` overrides the upstream's."""

    def is_last(self, chunk: Any) -> bool:
        """Whether ``chunk`` ends the exchange, judged without feeding it (cheap)."""
        return False

    def model_finished(self) -> bool:
        """Whether the model's answer is complete, though the stream may have had more to send
        (OpenAI's usage chunk, ``[DONE]``): a reader that stops here has the whole answer."""
        return self.finished and self.error is None

    def default_model_version(self) -> str | None:
        """The most specific version the wire revealed, unless the caller knows better."""
        return None

    @property
    def stream(self) -> bool:
        """Whether the request asked for a streamed response."""
        return bool(self.request.get("stream", False))

    def base_extra(self, meta: Meta) -> dict[str, Any]:
        """The extra fields every dialect records."""
        extra: dict[str, Any] = {"request_body": self.request}
        if meta.time_to_first_token_ms is not None:
            extra["time_to_first_token_ms"] = float(meta.time_to_first_token_ms)
        if meta.status is not None:
            extra["http.response.status_code"] = meta.status
        if self.error is not None:
            extra["error.type"] = "upstream_error"
            extra["error_message"] = self.error
        return extra
