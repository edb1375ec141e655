"""The audit record of SPEC section 2: fields, content hashes and the stored line.

The seed's validation script recomputes ``sha256(json.dumps(tokens).encode()).hexdigest()`` for
``input_tokens`` and ``output_tokens``; :func:`tokens_json` produces exactly those bytes, taking
a faster path for the common case (a list of ints) where orjson's compact output differs from
``json.dumps`` only by the missing space after each comma.

An :class:`Exchange` is what capture produces; the ledger turns it into a :class:`Record` by
adding ``log_id``, ``seq`` and ``prev_hash`` and serialising it to one line (the leaf).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

import orjson

from ._errors import ConfigError

SCHEMA = "tokentrail.record/v1"
ZERO_HASH = "0" * 64

#: A token is an id, a UTF-8 piece, or the byte values of a piece that is not valid UTF-8.
Token: TypeAlias = int | str | list[int]
TokenList: TypeAlias = list[Token]

APIS = frozenset({"ollama.generate", "ollama.chat", "openai.chat", "openai.completions", "sdk"})
#: The token sources of SPEC section 5, besides ``local:<tokenizer>``.
TOKEN_SOURCES = frozenset({"upstream-ids", "upstream-pieces", "upstream-context", "none"})
#: SPEC section 2's timestamp: RFC 3339 UTC, microseconds, ``Z`` (match with ``fullmatch``).
TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
#: How far ahead of the writer's clock a record's timestamp may be: the SDK takes a caller's
#: timestamp (another host's clock) up to this far in the future, and no further.
MAX_AHEAD_S = 300.0
_EVENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOOL_STOP_REASONS = frozenset({"client_disconnect", "upstream_error", "interrupted"})

#: The seed's fields, in the seed's order, then tokentrail's own; ``Record`` lines keep it.
SEED_FIELDS = (
    "event_id",
    "timestamp",
    "session_id",
    "user_id",
    "model",
    "model_version",
    "input_tokens",
    "output_tokens",
    "input_hash",
    "output_hash",
    "request_duration_ms",
    "stop_reason",
)
REQUIRED_FIELDS = (
    "schema",
    "log_id",
    "seq",
    "prev_hash",
    *SEED_FIELDS,
    "api",
    "input_token_source",
    "output_token_source",
    "input_text",
    "output_text",
    "input_text_hash",
    "output_text_hash",
)

_REQUIRED = frozenset(REQUIRED_FIELDS)


def encode_tokens(tokens: TokenList | None) -> tuple[bytes, bytes | None]:
    """``json.dumps(tokens).encode()``, and orjson's compact bytes when those are cheap to keep."""
    if tokens is None:
        return b"null", None
    try:
        compact = orjson.dumps(tokens)
    except TypeError:  # e.g. an int beyond 64 bits: let the stdlib say what it says
        return json.dumps(tokens).encode(), None
    # A flat list of ints is the only case where orjson's compact form differs from json.dumps
    # by nothing but the space after each comma: digits, signs and commas, one pair of brackets.
    if compact.translate(None, b"0123456789-,") != b"[]":
        return json.dumps(tokens).encode(), None
    return compact.replace(b",", b", "), compact


def tokens_json(tokens: TokenList | None) -> bytes:
    """The bytes of ``json.dumps(tokens).encode()``, fast for lists of ints."""
    return encode_tokens(tokens)[0]


def token_hash(tokens: TokenList | None) -> str:
    """``sha256(json.dumps(tokens).encode()).hexdigest()``, the seed's hash."""
    return hashlib.sha256(tokens_json(tokens)).hexdigest()


def text_hash(text: str | None) -> str | None:
    """``sha256(text.encode("utf-8")).hexdigest()``, or ``None`` for ``None``."""
    if text is None:
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_token_source(value: Any) -> bool:
    """Whether ``value`` is a token source SPEC section 5 names."""
    return isinstance(value, str) and (
        value in TOKEN_SOURCES or (value.startswith("local:") and len(value) > len("local:"))
    )


#: Sources whose tokens are ids (the rest hold pieces, or, ``local:``, either).
ID_SOURCES = frozenset({"upstream-ids", "upstream-context"})


PIECES = "upstream-pieces"


def _all_ids(tokens: Any) -> bool:
    return not tokens or all(type(t) is int for t in tokens)


def token_list_problem(tokens: Any, source: Any, compact: bytes | None = None) -> str | None:
    """What breaks SPEC section 2's rules for a stored token list and its source (sections 2
    and 5): ``null`` exactly when the source is ``none``; ids (ints ≥ 0) or pieces, never
    both; a piece a string, or the byte values (0-255) of bytes that are not valid UTF-8; ids
    from an id source, pieces from ``upstream-pieces``. ``None``: none broken.

    ``compact``: the list's compact JSON when :func:`encode_tokens` found it a flat list of
    ints (so it is not scanned again)."""
    if tokens is None:
        return None if source == "none" else f"no tokens, but the source is {source!r}"
    if not isinstance(tokens, list):
        return "not a list or null"
    if source == "none":
        return "tokens, but the source is 'none'"
    if not tokens:
        return None
    if compact is not None or (kinds := set(map(type, tokens))) == {int}:
        if source == "upstream-pieces":
            return "ids, but the source is 'upstream-pieces'"
        negative = b"-" in compact if compact is not None else min(tokens) < 0
        return "a negative token id" if negative else None
    if not kinds <= {str, list}:
        return "neither ids nor pieces (or both)"
    if source in ID_SOURCES:
        return f"pieces, but the source {source!r} gives ids"
    if list not in kinds:
        return None
    for item in tokens:
        if type(item) is list:
            if not all(type(b) is int and 0 <= b <= 255 for b in item):
                return "a byte piece with a value that is not a byte"
            try:
                bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                continue
            return "a byte piece that is valid UTF-8 (stored as a string)"
    return None


def is_event_id(value: Any) -> bool:
    """Whether ``value`` is an event id as SPEC section 2 stores it: a lowercase UUID."""
    return isinstance(value, str) and _EVENT_ID.fullmatch(value) is not None


def piece(raw: bytes) -> str | list[int]:
    """A token piece as SPEC stores it: a string if valid UTF-8, else its byte values."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


_SURROGATE = re.compile("[\ud800-\udfff]")
#: The 66 Unicode noncharacters: U+FDD0..U+FDEF and the last two code points of each plane.
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17))
    + "]"
)


def may_hold_noncharacter(data: bytes) -> bool:
    """False when UTF-8 ``data`` holds no Unicode noncharacter (True: it may).

    A noncharacter's UTF-8 starts with EF (U+FDD0..U+FDEF: EF B7 90..AF; U+FFFE/F: EF BF BE/BF)
    or F0..F4 (the other planes' last two, ending BF BE/BF): bytes with none of these lead bytes
    (ASCII, Latin, Cyrillic, most CJK) are cleared by one-byte searches, which are fast (memchr).
    """
    if data.isascii() or not (
        b"\xef" in data
        or b"\xf0" in data
        or b"\xf1" in data
        or b"\xf2" in data
        or b"\xf3" in data
        or b"\xf4" in data
    ):
        return False
    return b"\xef\xb7" in data or b"\xbf\xbe" in data or b"\xbf\xbf" in data


def clean_text(text: str) -> str:
    """Text a record can store as I-JSON (RFC 7493 section 2.1): a lone surrogate (a
    ``\\ud800`` escape, which no UTF-8 can hold) or a noncharacter becomes U+FFFD."""
    if text.isascii():  # holds neither (and the test costs no pass over the text)
        return text
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return _NONCHARACTER.sub("\ufffd", _SURROGATE.sub("\ufffd", text))
    if may_hold_noncharacter(data):
        return _NONCHARACTER.sub("\ufffd", text)
    return text


#: Deeper than orjson encodes (255 levels): left as it is, for the caller's note that it
#: cannot be stored (recursing further overflowed Python's stack at about 500 levels).
_SCRUB_DEPTH = 256


def _scrub(value: Any, depth: int = 0) -> Any:
    """``value`` made I-JSON: strings cleaned (:func:`clean_text`), keys included, and integers
    beyond 64 bits written as strings."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    if depth > _SCRUB_DEPTH:
        return value
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {clean_text(str(k)): _scrub(v, depth + 1) for k, v in value.items()}
    return value


def storable(value: Any) -> Any:
    """``value`` if it encodes as JSON, else a note of why not (nested deeper than the encoder
    goes, say), which a record keeps in its place."""
    try:
        orjson.dumps(value)
    except TypeError as exc:
        return {"tokentrail.unrecordable": f"{type(exc).__name__}: {exc}"}
    return value


def rfc3339(moment: datetime | float) -> str:
    """RFC 3339 UTC with microseconds and a ``Z`` suffix, from a datetime or epoch seconds."""
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, UTC)
    m = moment.astimezone(UTC)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond:06d}Z"
    )


def parse_rfc3339(value: Any) -> datetime | None:
    """A record's ``timestamp`` as an aware datetime, or ``None`` if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None  # no zone: not RFC 3339


#: The system clock in ns since the epoch (a test may replace it).
_clock_ns = time.time_ns
#: The last whole second :func:`now_rfc3339` formatted, and its text up to the seconds.
_second: tuple[int, str] = (-1, "")


def now_rfc3339() -> str:
    """The current time as :func:`rfc3339` (truncated to the microsecond, as ``datetime.now``).

    Every exchange takes a timestamp or two: the text up to the seconds is formatted once a
    second, not each time.
    """
    global _second
    seconds, micros = divmod(_clock_ns() // 1000, 1_000_000)
    cached = _second  # one read: another thread may replace it meanwhile, never half of it
    if cached[0] != seconds:
        t = time.gmtime(seconds)
        cached = _second = (
            seconds,
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}",
        )
    return f"{cached[1]}.{micros:06d}Z"


_random_pool = bytearray()
_random_lock = threading.Lock()
# A forked child must never hand out the ids its parent will also hand out.
os.register_at_fork(after_in_child=_random_pool.clear)


def new_event_id() -> str:
    """A fresh event id (a random version 4 UUID), fixed before the first write attempt."""
    with _random_lock:  # one getrandom() call per 256 ids instead of one per id
        if not _random_pool:
            _random_pool.extend(os.urandom(16 * 256))
        raw = bytes(_random_pool[-16:])
        del _random_pool[-16:]
    h = raw.hex()
    # RFC 9562 version 4: version nibble 4, variant bits 10 (what uuid.UUID(version=4) sets).
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


@dataclass(frozen=True, slots=True)
class Exchange:
    """One captured exchange with an LLM, before the ledger gives it a place in a log.

    ``extra`` carries every further field (request body, usage, timing, …) under its
    OpenTelemetry GenAI name where one exists; it must not repeat a required field.
    """

    model: str
    api: str
    stop_reason: str
    input_tokens: TokenList | None = None
    output_tokens: TokenList | None = None
    input_token_source: str = "none"
    output_token_source: str = "none"
    input_text: str | None = None
    output_text: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    model_version: str | None = None
    request_duration_ms: float = 0.0
    timestamp: str = field(default_factory=now_rfc3339)
    event_id: str = field(default_factory=new_event_id)
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Keyed content hashes (SPEC section 7), used instead of the plain ones when set.
    hashes: Mapping[str, str | None] | None = None

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ConfigError(f"unknown api {self.api!r}; expected one of {sorted(APIS)}")
        if not isinstance(self.stop_reason, str):
            raise ConfigError("stop_reason must be a string")
        if not isinstance(self.model, str):
            raise ConfigError(f"model must be the model name as requested, not {self.model!r}")
        for name in ("user_id", "session_id", "model_version"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string or None, not {value!r}")
        duration = self.request_duration_ms
        if isinstance(duration, bool) or not isinstance(duration, (int, float)):
            raise ConfigError(f"request_duration_ms must be a number, not {duration!r}")
        if not math.isfinite(duration) or duration < 0:
            raise ConfigError(f"request_duration_ms must be a wall time in ms, not {duration!r}")
        if not isinstance(self.timestamp, str) or not TIMESTAMP_RE.fullmatch(self.timestamp):
            raise ConfigError(
                f"timestamp must be RFC 3339 UTC with microseconds and Z "
                f"(2026-01-31T12:00:00.000000Z), not {self.timestamp!r}"
            )
        if not is_event_id(self.event_id):
            raise ConfigError(f"event_id must be a lowercase UUID, not {self.event_id!r}")
        for side in ("input", "output"):
            source = getattr(self, f"{side}_token_source")
            if source == "none" and getattr(self, f"{side}_tokens") is not None:
                # Tokens come from somewhere (SPEC section 5: "none" is no token data): left at
                # the default, the source is what the tokens show, as the SDK's record() has it.
                source = "upstream-ids" if _all_ids(getattr(self, f"{side}_tokens")) else PIECES
                object.__setattr__(self, f"{side}_token_source", source)
            if not is_token_source(source):
                raise ConfigError(
                    f"{side}_token_source {source!r} is not one of {sorted(TOKEN_SOURCES)} "
                    "or local:<tokenizer>"
                )
        if not _REQUIRED.isdisjoint(self.extra):
            clash = sorted(_REQUIRED.intersection(self.extra))
            raise ConfigError(f"extra fields may not replace record fields: {clash}")

    def fields(self) -> dict[str, Any]:
        """The record's content fields with their hashes, in stored order (no chain fields)."""
        return self._fields(fragments=False)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Exchange:
        """The exchange back from :meth:`fields` output (hashes are recomputed, not kept)."""
        known = {
            "model",
            "api",
            "stop_reason",
            "input_tokens",
            "output_tokens",
            "input_token_source",
            "output_token_source",
            "input_text",
            "output_text",
            "user_id",
            "session_id",
            "model_version",
            "request_duration_ms",
            "timestamp",
            "event_id",
        }
        derived = ("input_hash", "output_hash", "input_text_hash", "output_text_hash")
        extra = {k: v for k, v in fields.items() if k not in known and k not in derived}
        keyed = {k: fields.get(k) for k in derived} if fields.get("content_sealed") else None
        return cls(**{k: v for k, v in fields.items() if k in known}, extra=extra, hashes=keyed)

    def scrubbed(self) -> Exchange:
        """This exchange as a record stores it: every string I-JSON (see :func:`clean_text`),
        integers beyond 64 bits as strings."""
        return replace(
            self,
            **{
                name: _scrub(getattr(self, name))
                for name in (
                    "model",
                    "stop_reason",
                    "input_tokens",
                    "output_tokens",
                    "input_text",
                    "output_text",
                    "user_id",
                    "session_id",
                    "model_version",
                    "extra",
                )
            },
        )

    def content_bytes(self) -> bytes:
        """The content fields as compact JSON (an object), encoding each token list once."""
        try:
            data = orjson.dumps(self._fields(fragments=True))
            if not may_hold_noncharacter(data):
                return data
        except TypeError:
            pass
        # A lone surrogate (a client's "\\ud800" escape) cannot be UTF-8, and I-JSON holds no
        # noncharacter (U+FFFF, ...): store U+FFFD instead, and hash what is stored, so the
        # record stays self-consistent.
        scrubbed = self.scrubbed()
        try:
            return orjson.dumps(scrubbed._fields(fragments=True))
        except TypeError:
            pass
        # Still not storable (nested deeper than the encoder goes, or not JSON at all): keep the
        # record, with each such extra field replaced by a note that says so.
        extra = {name: storable(value) for name, value in scrubbed.extra.items()}
        try:
            return orjson.dumps(replace(scrubbed, extra=extra)._fields(fragments=True))
        except TypeError as exc:
            raise ConfigError(f"record for event {self.event_id} is not I-JSON: {exc}") from exc

    def _fields(self, *, fragments: bool) -> dict[str, Any]:
        in_seed, in_compact = encode_tokens(self.input_tokens)
        out_seed, out_compact = encode_tokens(self.output_tokens)
        in_value: Any = self.input_tokens
        out_value: Any = self.output_tokens
        if fragments:
            in_value = orjson.Fragment(in_compact) if in_compact is not None else in_value
            out_value = orjson.Fragment(out_compact) if out_compact is not None else out_value
        input_text = None if self.input_text is None else clean_text(self.input_text)
        output_text = None if self.output_text is None else clean_text(self.output_text)
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "timestamp": self.timestamp,
            "session_id": self.session_id,
            "user_id": self.user_id,
            "model": self.model,
            "model_version": self.model_version,
            "input_tokens": in_value,
            "output_tokens": out_value,
            "input_hash": hashlib.sha256(in_seed).hexdigest(),
            "output_hash": hashlib.sha256(out_seed).hexdigest(),
            "request_duration_ms": float(self.request_duration_ms),
            "stop_reason": self.stop_reason,
            "api": self.api,
            "input_token_source": self.input_token_source,
            "output_token_source": self.output_token_source,
            "input_text": input_text,
            "output_text": output_text,
            "input_text_hash": text_hash(input_text),
            "output_text_hash": text_hash(output_text),
        }
        if self.hashes is not None:
            out.update(self.hashes)
        out.update(self.extra)
        return out


def encode_line(log_id: str, seq: int, prev_hash: str, content: Mapping[str, Any]) -> bytes:
    """Serialise one record to its leaf bytes (one line of I-JSON, no trailing newline)."""
    obj = {"schema": SCHEMA, "log_id": log_id, "seq": seq, "prev_hash": prev_hash, **content}
    try:
        return orjson.dumps(obj)
    except TypeError as exc:  # a value orjson cannot encode (e.g. a lone surrogate, a set)
        raise ConfigError(
            f"record for event {content.get('event_id')} is not I-JSON: {exc}"
        ) from exc


@dataclass(frozen=True, slots=True)
class Record:
    """A record as stored: its place in a log and its exact leaf bytes."""

    log_id: str
    seq: int
    event_id: str
    leaf: bytes
    leaf_hash: bytes

    def to_json(self) -> dict[str, Any]:
        """The stored record parsed back into a dict."""
        parsed: dict[str, Any] = orjson.loads(self.leaf)
        return parsed
