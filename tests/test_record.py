"""Tests for the audit record of SPEC section 2: content hashes, text, time and the stored line.

The expected values are Python's own ``json.dumps`` and ``hashlib`` (the seed's validation script
recomputes exactly those), so every assertion here is a cross-check against the standard library,
never against the code under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrail import _record
from tokentrail._errors import ConfigError
from tokentrail._record import (
    Exchange,
    clean_text,
    encode_line,
    now_rfc3339,
    piece,
    rfc3339,
    text_hash,
    token_hash,
    tokens_json,
)

ZERO = "0" * 64
HYP = settings(max_examples=300, deadline=None)

# --------------------------------------------------------------------------------------------
# Strategies for token lists (SPEC section 2: ids, UTF-8 pieces, byte-value pieces, or null).
# --------------------------------------------------------------------------------------------

#: Any code point: Hypothesis leaves out surrogates unless asked, so they are added back.
any_char = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.characters(min_codepoint=0x10000),
    st.characters(max_codepoint=0x1F),
    st.sampled_from(['"', "\\", "/", "\x7f", "\u2028", "\u2029", "\ufeff", "\ufffd"]),
    st.sampled_from(["\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001fffe", "\U0010ffff"]),
)
#: Text over ``any_char``: ``st.text(any_char)`` would almost never draw a surrogate.
any_text = st.lists(any_char).map("".join)
#: The 66 Unicode noncharacters, which I-JSON strings may not hold (RFC 7493 section 2.1).
NONCHARACTERS = frozenset(
    [chr(c) for c in range(0xFDD0, 0xFDF0)]
    + [chr(p << 16 | low) for p in range(17) for low in (0xFFFE, 0xFFFF)]
)
#: Text that is I-JSON as it is: no surrogates (Hypothesis leaves them out), no noncharacters.
i_json_text = st.text(
    st.characters(exclude_categories=["Cs"]).filter(lambda c: c not in NONCHARACTERS)
)
edge_ints = st.sampled_from(
    [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]
)
ids = st.lists(st.one_of(st.integers(), edge_ints, st.integers(-(2**70), 2**70)))
strings = st.lists(any_text)
byte_lists = st.lists(st.lists(st.integers(0, 255)))
mixed = st.lists(st.one_of(st.integers(), any_text, st.lists(st.integers(0, 255))))
token_lists = st.one_of(st.none(), st.just([]), ids, strings, byte_lists, mixed)

#: What capture can store in a line: ids that fit 64 bits, pieces made by ``piece``, or null.
storable_ids = st.lists(st.integers(-(2**63), 2**64 - 1))
pieces = st.lists(st.binary(max_size=8).map(piece))
storable_tokens = st.one_of(st.none(), st.just([]), storable_ids, pieces)


def dumps(tokens: object) -> bytes:
    """The seed's bytes: Python's default ``json.dumps``, UTF-8 encoded."""
    return json.dumps(tokens).encode()


class TestTokensJson:
    @pytest.mark.parametrize(
        "tokens",
        [
            None,
            [],
            [0],
            [-1, 0, 1],
            [2**63],
            [2**64],
            [-(2**63) - 1],
            [10**40, -(10**40)],
            [""],
            ["1,2"],
            ["-", ",", "0"],
            ['"', "\\", '\\"'],
            ["\x00\x1f\x7f\n\t"],
            ["\U0001f600", "\u00e9", "\u2028"],
            ["\ud800", "\udfff"],
            [[]],
            [[], []],
            [[0, 255], [128]],
            [1, "a", [2, 3]],
        ],
        ids=repr,
    )
    def test_edge_cases(self, tokens: Any) -> None:
        """Hand-picked lists give exactly json.dumps(tokens).encode()."""
        assert dumps(tokens) == tokens_json(tokens)

    @HYP
    @given(ids)
    def test_ints(self, tokens: list[int]) -> None:
        """Lists of ids of any size and sign match json.dumps byte for byte."""
        assert dumps(tokens) == tokens_json(tokens)

    @HYP
    @given(strings)
    def test_strings(self, tokens: list[str]) -> None:
        """Lists of arbitrary strings (astral, control, quotes, surrogates) match json.dumps."""
        assert dumps(tokens) == tokens_json(tokens)

    @HYP
    @given(byte_lists)
    def test_byte_lists(self, tokens: list[list[int]]) -> None:
        """Lists of byte-value pieces match json.dumps."""
        assert dumps(tokens) == tokens_json(tokens)

    @HYP
    @given(token_lists)
    def test_any_token_list(self, tokens: Any) -> None:
        """Any token list, mixed or null, matches json.dumps, and token_hash is its SHA-256."""
        assert dumps(tokens) == tokens_json(tokens)
        assert hashlib.sha256(dumps(tokens)).hexdigest() == token_hash(tokens)


class TestPiece:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (b"", ""),
            (b"abc", "abc"),
            ("\u00e9".encode(), "\u00e9"),
            ("\U0001f600".encode(), "\U0001f600"),
            (b"\xff", [255]),
            (b"\xe2\x82", [226, 130]),
            (b"\x80abc", [128, 97, 98, 99]),
            (b"\xed\xa0\x80", [237, 160, 128]),  # an encoded surrogate is not valid UTF-8
        ],
        ids=repr,
    )
    def test_piece(self, raw: bytes, expected: str | list[int]) -> None:
        """Valid UTF-8 becomes a string, anything else its byte values."""
        assert expected == piece(raw)

    @HYP
    @given(st.binary())
    def test_piece_round_trips(self, raw: bytes) -> None:
        """A piece always gives its bytes back and always serialises with orjson."""
        p = piece(raw)
        assert raw == (p.encode() if isinstance(p, str) else bytes(p))
        orjson.dumps(p)


# --------------------------------------------------------------------------------------------
# The seed's own validation loop (seed/000_7867c324688775dd.txt, step 6), copied unchanged.
# --------------------------------------------------------------------------------------------


def seed_validate(records: list[dict[str, Any]]) -> None:
    """Run the seed's step-6 validation over ``records``, for input and then for output."""
    start_date, end_date = "2024-01-01", "2024-12-31"

    def fetch_audit_records(start: str, end: str) -> Iterator[dict[str, Any]]:
        yield from records

    # The seed's lines verbatim (then the same for output), so they are kept from the formatter.
    # fmt: off
    for record in fetch_audit_records(start_date, end_date):
        expected_hash = hashlib.sha256(json.dumps(record["input_tokens"]).encode()).hexdigest()
        assert expected_hash == record["input_hash"], f"Integrity violation at {record['event_id']}"

    for record in fetch_audit_records(start_date, end_date):
        expected_hash = hashlib.sha256(json.dumps(record["output_tokens"]).encode()).hexdigest()
        assert expected_hash == record["output_hash"], f"Integrity violation at {record['event_id']}"  # noqa: E501
    # fmt: on


def exchange(**kwargs: Any) -> Exchange:
    """An Exchange with fixed defaults, so tests only say what they vary."""
    defaults: dict[str, Any] = {
        "model": "llama3.2:1b",
        "api": "ollama.generate",
        "stop_reason": "stop",
        "timestamp": "2024-05-06T07:08:09.123456Z",
        "event_id": "00000000-0000-4000-8000-000000000000",
    }
    return Exchange(**{**defaults, **kwargs})


SEED_TOKENS = [
    None,
    [],
    [1, 15043, 3186, 2],
    [0, 2**31 - 1, 2**63, 2**64 - 1, -(2**63)],
    ["Hello", " world", "!"],
    [piece(b"\xe4\xb8"), piece(b"\xad"), piece("\u00e9".encode()), piece(b"\xff\xfe")],
    ["\U0001f600", '"', "\\", "\n", "\x00"],
]


class TestSeedValidation:
    @pytest.mark.parametrize("output_tokens", SEED_TOKENS, ids=repr)
    @pytest.mark.parametrize("input_tokens", SEED_TOKENS, ids=repr)
    def test_fields_and_stored_lines_pass(self, input_tokens: Any, output_tokens: Any) -> None:
        """The seed's loop passes on fields() and on the parsed stored line."""
        fields = exchange(input_tokens=input_tokens, output_tokens=output_tokens).fields()
        stored = orjson.loads(encode_line("log-a", 0, ZERO, fields))
        seed_validate([fields, stored])

    @HYP
    @given(storable_tokens, storable_tokens, st.integers(0, 2**40))
    def test_generated_records_pass(self, input_tokens: Any, output_tokens: Any, seq: int) -> None:
        """The seed's loop passes on records from any storable token lists."""
        fields = exchange(input_tokens=input_tokens, output_tokens=output_tokens).fields()
        stored = orjson.loads(encode_line("log-a", seq, ZERO, fields))
        seed_validate([fields, stored])

    @HYP
    @given(token_lists, token_lists)
    def test_fields_pass_for_any_token_list(self, input_tokens: Any, output_tokens: Any) -> None:
        """fields() carries the seed's hash for any token list, even ones a line cannot hold."""
        seed_validate([exchange(input_tokens=input_tokens, output_tokens=output_tokens).fields()])

    def test_edited_record_fails(self) -> None:
        """The seed's loop notices a token edited after hashing (the check is not vacuous)."""
        fields = exchange(input_tokens=[1, 2, 3]).fields()
        fields["input_tokens"] = [1, 2, 4]
        with pytest.raises(AssertionError, match="Integrity violation at 00000000-"):
            seed_validate([fields])


# --------------------------------------------------------------------------------------------
# Text, hashes and time.
# --------------------------------------------------------------------------------------------


class TestTextHash:
    @HYP
    @given(st.text(any_char.filter(lambda c: not "\ud800" <= c <= "\udfff")))
    def test_text_hash(self, text: str) -> None:
        """text_hash is sha256(text.encode("utf-8")).hexdigest()."""
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == text_hash(text)

    def test_text_hash_none(self) -> None:
        """No text has no hash."""
        assert None is text_hash(None)

    @HYP
    @given(st.one_of(st.none(), any_text), st.one_of(st.none(), any_text))
    def test_fields_hash_the_stored_text(
        self, input_text: str | None, output_text: str | None
    ) -> None:
        """fields() hashes exactly the text it stores, null for null."""
        fields = exchange(input_text=input_text, output_text=output_text).fields()
        for side in ("input", "output"):
            text = fields[f"{side}_text"]
            expected = None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()
            assert expected == fields[f"{side}_text_hash"]

    @HYP
    @given(i_json_text)
    def test_valid_text_stored_unchanged(self, text: str) -> None:
        """Text without surrogates or noncharacters is stored as given."""
        assert text == exchange(input_text=text).fields()["input_text"]


def replace_surrogates(text: str) -> str:
    """One U+FFFD for each lone surrogate code point or noncharacter, everything else kept."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" or c in NONCHARACTERS else c for c in text)


class TestCleanText:
    @pytest.mark.parametrize("depth", [300, 600, 5000])
    def test_body_nested_too_deep_is_kept_with_a_note(self, depth: int) -> None:
        """A body nested deeper than the encoder goes is stored as a note in its field, the
        rest of the record whole, a lone surrogate elsewhere cleaned (past about 500 levels,
        cleaning it overflowed Python's stack: RecursionError, no record)."""
        deep: Any = "x\udc80"
        for _ in range(depth):
            deep = [deep]
        exchange = Exchange(
            model="m",
            api="sdk",
            stop_reason="stop",
            input_text="a\udc80",
            extra={"request_body": {"messages": deep}, "kept": "yes"},
        )
        record = json.loads(exchange.content_bytes())
        assert ("a\ufffd", "yes") == (record["input_text"], record["kept"])
        assert ["tokentrail.unrecordable"] == list(record["request_body"])

    @HYP
    @given(i_json_text)
    def test_valid_text_unchanged(self, text: str) -> None:
        """Text that is already I-JSON comes back unchanged."""
        assert text == clean_text(text)

    @HYP
    @given(any_text)
    def test_always_i_json(self, text: str) -> None:
        """Whatever comes in, the result encodes to UTF-8 and holds no noncharacter."""
        cleaned = clean_text(text)
        cleaned.encode("utf-8")
        assert not NONCHARACTERS.intersection(cleaned)

    @pytest.mark.parametrize("char", sorted(NONCHARACTERS), ids=lambda c: f"U+{ord(c):04X}")
    def test_noncharacter_becomes_one_replacement(self, char: str) -> None:
        """Each noncharacter becomes exactly one U+FFFD, beside a lone surrogate too."""
        assert "a\ufffdb" == clean_text(f"a{char}b")
        assert "\ufffd\ufffd" == clean_text(f"{char}\ud800")

    @HYP
    @given(any_text, strings, any_text)
    def test_record_bytes_are_i_json(self, text: str, pieces: list[str], key: str) -> None:
        """A record whose values and keys hold surrogates or noncharacters is stored with
        U+FFFD in their place, everywhere, and its hashes are over what is stored."""
        ex = exchange(
            model=text or "m",
            input_text=text,
            output_tokens=pieces,
            extra={"request_body": {key: [text]}},
        )
        data = ex.content_bytes()
        back = orjson.loads(data)
        assert not NONCHARACTERS.intersection(data.decode("utf-8"))
        assert hashlib.sha256(back["input_text"].encode()).hexdigest() == back["input_text_hash"]
        assert hashlib.sha256(dumps(back["output_tokens"])).hexdigest() == back["output_hash"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("\ud800", "\ufffd"),
            ("a\ud800b", "a\ufffdb"),
            ("x\udfffy", "x\ufffdy"),
            ("\udc80\udc81", "\ufffd\ufffd"),
        ],
        ids=repr,
    )
    def test_lone_surrogate_becomes_one_replacement(self, text: str, expected: str) -> None:
        """Each lone surrogate becomes exactly one U+FFFD."""
        assert expected == clean_text(text)

    @HYP
    @given(any_text)
    def test_surrogates_replaced_one_for_one(self, text: str) -> None:
        """Every surrogate code point or noncharacter becomes one U+FFFD and nothing else
        changes."""
        assert replace_surrogates(text) == clean_text(text)

    def test_surrogates_replaced_not_kept(self) -> None:
        """No surrogate survives and the text around it is kept."""
        cleaned = clean_text("a\ud800b")
        expected = ("a", {"\ufffd"}, "b")
        assert expected == (cleaned[0], set(cleaned[1:-1]), cleaned[-1])


RFC3339 = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")
offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23))
aware = st.datetimes(
    min_value=datetime(1000, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=offsets.map(timezone),
)


class TestRfc3339:
    @pytest.mark.parametrize(
        ("moment", "expected"),
        [
            (0, "1970-01-01T00:00:00.000000Z"),
            (0.0, "1970-01-01T00:00:00.000000Z"),
            (1700000000.5, "2023-11-14T22:13:20.500000Z"),
            (datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC), "2024-02-29T23:59:59.123456Z"),
            (
                datetime(2024, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=2))),
                "2023-12-31T23:00:00.000000Z",
            ),
            (
                datetime(2023, 12, 31, 20, 30, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
                "2024-01-01T01:30:00.000001Z",
            ),
            pytest.param(
                datetime(999, 12, 31, tzinfo=UTC),
                "0999-12-31T00:00:00.000000Z",
            ),
        ],
        ids=repr,
    )
    def test_known_values(self, moment: datetime | float, expected: str) -> None:
        """Known instants give the expected UTC text, microseconds and Z."""
        assert expected == rfc3339(moment)

    @HYP
    @given(aware)
    def test_format_and_round_trip(self, moment: datetime) -> None:
        """Any aware datetime gives YYYY-MM-DDTHH:MM:SS.ffffffZ naming the same instant."""
        text = rfc3339(moment)
        assert RFC3339.match(text), text
        back = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert moment == back

    @HYP
    @given(st.floats(min_value=0, max_value=4e9))
    def test_epoch_seconds(self, seconds: float) -> None:
        """Epoch seconds give the format and the instant to the microsecond."""
        text = rfc3339(seconds)
        assert RFC3339.match(text), text
        back = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs(back.timestamp() - seconds) <= 1e-6 * max(1.0, seconds / 1e9)

    def test_now_follows_the_clock_across_seconds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The current time's text changes with each second, a year's end included (the part
        up to the seconds is formatted once a second), and is truncated, not rounded."""
        ticks = iter([
            1_767_225_599_999_999_999,  # 2025-12-31T23:59:59.999999999
            1_767_225_600_000_000_000,
            1_767_225_600_000_001_000,
            1_767_225_601_500_000_000,
            1_767_225_599_000_000_000,  # a clock set back
        ])  # fmt: skip
        monkeypatch.setattr(_record, "_clock_ns", lambda: next(ticks))
        seen = [now_rfc3339() for _ in range(5)]
        assert seen == [
            "2025-12-31T23:59:59.999999Z",
            "2026-01-01T00:00:00.000000Z",
            "2026-01-01T00:00:00.000001Z",
            "2026-01-01T00:00:01.500000Z",
            "2025-12-31T23:59:59.000000Z",
        ]

    def test_now_is_the_system_time(self) -> None:
        """The current time's text names an instant between two readings of ``datetime.now``."""
        before = datetime.now(UTC)
        text = now_rfc3339()
        after = datetime.now(UTC)
        assert RFC3339.match(text), text
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before <= moment <= after


# --------------------------------------------------------------------------------------------
# The stored line.
# --------------------------------------------------------------------------------------------

RECORD_ORDER = [
    "schema",
    "log_id",
    "seq",
    "prev_hash",
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
    "api",
    "input_token_source",
    "output_token_source",
    "input_text",
    "output_text",
    "input_text_hash",
    "output_text_hash",
]

optional_text = st.one_of(st.none(), any_text)
exchanges = st.builds(
    exchange,
    input_tokens=storable_tokens,
    output_tokens=storable_tokens,
    input_text=optional_text,
    output_text=optional_text,
    user_id=st.one_of(st.none(), st.text()),
    session_id=st.one_of(st.none(), st.text()),
    model_version=st.one_of(st.none(), st.text()),
    model=st.text(),
    request_duration_ms=st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    stop_reason=st.sampled_from(["stop", "length", "tool_calls", "client_disconnect"]),
    api=st.sampled_from(
        ["ollama.generate", "ollama.chat", "openai.chat", "openai.completions", "sdk"]
    ),
    extra=st.dictionaries(
        st.text(min_size=1).filter(lambda k: k not in RECORD_ORDER),
        st.one_of(st.none(), st.integers(-(2**63), 2**63), st.text(), st.booleans()),
        max_size=4,
    ),
)
log_ids = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,63}\Z")


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A json.loads hook that refuses duplicate keys (I-JSON)."""
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


class TestEncodeLine:
    @HYP
    @given(exchanges, log_ids, st.integers(0, 2**63), st.binary(min_size=32, max_size=32))
    def test_line(self, ex: Exchange, log_id: str, seq: int, prev: bytes) -> None:
        """One I-JSON line, no newline, parsing back to the same values in record order."""
        fields = ex.fields()
        line = encode_line(log_id, seq, prev.hex(), fields)
        assert b"\n" not in line
        text = line.decode("utf-8")  # strict: the leaf is valid UTF-8
        parsed = json.loads(text, object_pairs_hook=no_duplicate_keys)
        expected = {
            "schema": "tokentrail.record/v1",
            "log_id": log_id,
            "seq": seq,
            "prev_hash": prev.hex(),
            **fields,
        }
        assert expected == parsed
        assert [*RECORD_ORDER, *ex.extra] == list(parsed)

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=repr)
    def test_no_nan_or_infinity(self, value: float) -> None:
        """A non-finite duration is refused: SPEC wants a float, and I-JSON has no NaN."""
        with pytest.raises(ConfigError, match="request_duration_ms must be a wall time in ms"):
            exchange(request_duration_ms=value)

    def test_newlines_in_text_are_escaped(self) -> None:
        """Line breaks inside values are escaped, so the record stays one line."""
        fields = exchange(input_text="a\nb\r\nc", output_text="\u2028\u2029").fields()
        line = encode_line("log-a", 0, ZERO, fields)
        expected = (False, False, "a\nb\r\nc")
        assert expected == (b"\n" in line, b"\r" in line, orjson.loads(line)["input_text"])

    @pytest.mark.parametrize(
        "content",
        [
            {"event_id": "e", "x": {1, 2}},
            {"event_id": "e", "x": "\ud800"},
            {"event_id": "e", "input_tokens": [2**64]},
        ],
        ids=repr,
    )
    def test_unencodable_content_is_config_error(self, content: dict[str, Any]) -> None:
        """A value JSON cannot carry raises ConfigError, not an orjson error."""
        with pytest.raises(ConfigError, match="record for event e is not I-JSON"):
            encode_line("log-a", 0, ZERO, content)


class TestExchange:
    @pytest.mark.parametrize(
        "api", ["ollama.generate", "ollama.chat", "openai.chat", "openai.completions", "sdk"]
    )
    def test_known_api(self, api: str) -> None:
        """Each API the SPEC names is accepted and recorded."""
        assert api == exchange(api=api).fields()["api"]

    @pytest.mark.parametrize(
        "api", ["", "openai", "ollama", "OLLAMA.CHAT", "ollama.embed", "openai.responses", " sdk"]
    )
    def test_unknown_api(self, api: str) -> None:
        """Any other api is a ConfigError."""
        with pytest.raises(ConfigError, match="unknown api"):
            exchange(api=api)

    @pytest.mark.parametrize("stop_reason", [None, 1, b"stop"], ids=repr)
    def test_stop_reason_must_be_text(self, stop_reason: object) -> None:
        """A stop reason that is not a string is a ConfigError."""
        with pytest.raises(ConfigError, match="stop_reason"):
            exchange(stop_reason=stop_reason)

    @pytest.mark.parametrize("name", RECORD_ORDER)
    def test_extra_may_not_clash(self, name: str) -> None:
        """An extra field named like a record field is a ConfigError."""
        with pytest.raises(ConfigError, match=name):
            exchange(extra={name: "x", "gen_ai.usage.input_tokens": 3})

    def test_extra_follows_record_fields(self) -> None:
        """Further fields come after the record fields, in the order given."""
        extra = {"gen_ai.usage.output_tokens": 7, "gen_ai.usage.input_tokens": 3, "http": 200}
        fields = exchange(extra=extra).fields()
        assert [*RECORD_ORDER[4:], *extra] == list(fields)
        assert extra == {k: fields[k] for k in extra}

    def test_frozen(self) -> None:
        """An Exchange cannot be changed after capture."""
        ex = exchange(input_tokens=[1])
        with pytest.raises(dataclasses.FrozenInstanceError):
            ex.input_tokens = [2]  # type: ignore[misc]

    def test_fields_defaults(self) -> None:
        """A bare exchange records nulls, 'none' sources and the hashes of null."""
        fields = exchange().fields()
        null_hash = hashlib.sha256(b"null").hexdigest()
        expected = {
            "input_tokens": None,
            "output_tokens": None,
            "input_hash": null_hash,
            "output_hash": null_hash,
            "input_token_source": "none",
            "output_token_source": "none",
            "input_text": None,
            "output_text": None,
            "input_text_hash": None,
            "output_text_hash": None,
            "user_id": None,
            "session_id": None,
            "model_version": None,
            "request_duration_ms": 0.0,
        }
        assert expected == {k: fields[k] for k in expected}

    def test_default_ids_and_time(self) -> None:
        """Without them, an exchange gets a UUID event id and an RFC 3339 arrival time."""
        ex = Exchange(model="m", api="sdk", stop_reason="stop")
        other = Exchange(model="m", api="sdk", stop_reason="stop")
        uuid_form = r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z"
        assert re.match(uuid_form, ex.event_id), ex.event_id
        assert ex.event_id != other.event_id
        assert RFC3339.match(ex.timestamp), ex.timestamp
