"""Fuzzing (issue 7, item 3): property tests of the integrity core and a CI-sized proxy fuzz.

- the record codec: an :class:`Exchange` survives ``content_bytes`` → ``encode_line`` →
  ``orjson.loads`` with its values, and ``tokens_json`` is ``json.dumps`` for any token list;
- the Merkle core: random trees' proofs verify, and any single mutation of a proof, root or
  index fails with :class:`VerificationError` and nothing else;
- the checkpoint and signed-note parsers raise only tokentrail errors, whatever they are fed;
- any byte flipped, inserted or deleted in a sealed ledger's segments or checkpoints fails
  ``verify_local``;
- the real proxy survives ~2,000 malformed requests and hostile upstream answers
  (``bench/fuzz_proxy.py`` is the 100,000-case run).

Example counts are modest so the module runs in well under a minute; seeds are fixed
(``derandomize``) so a failure reproduces.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tokentrail._checkpoint import Checkpoint, Signer, Verifier, open_note, split_note
from tokentrail._errors import KeyError_, TokentrailError, VerificationError
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_hashes,
    verify_consistency,
    verify_inclusion,
)
from tokentrail._record import APIS, Exchange, encode_line, tokens_json
from tokentrail._verify import VerifyOptions, verify_local

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from conftest import exchange_for

HYP = settings(max_examples=150, deadline=None, derandomize=True)
SLOW = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

# -- the record codec ---------------------------------------------------------------------------

pieces = st.one_of(
    st.text(),  # any string, lone surrogates included
    st.lists(st.integers(0, 255), max_size=8),  # the bytes of a piece that is not UTF-8
)
token_lists = st.one_of(
    st.none(),
    st.lists(st.integers(), max_size=30),  # ids, past 64 bits included
    st.lists(st.one_of(st.integers(0, 200_000), pieces), max_size=30),
)
clean_text = st.text(st.characters(exclude_categories=["Cs"]))
json_values = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False)
    | clean_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(clean_text, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
storable_tokens = st.one_of(
    st.none(),
    st.lists(st.one_of(INT64, clean_text, st.lists(st.integers(0, 255), max_size=6)), max_size=20),
)


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    """Exchanges whose every value orjson stores as it is (no surrogates, ints within 64 bits)."""
    reserved = {"schema", "log_id", "seq", "prev_hash", *Exchange.__dataclass_fields__}
    extra = draw(
        st.dictionaries(clean_text.filter(lambda k: k not in reserved), json_values, max_size=4)
    )
    return Exchange(
        model=draw(clean_text),
        api=draw(st.sampled_from(sorted(APIS))),
        stop_reason=draw(clean_text),
        input_tokens=draw(storable_tokens),
        output_tokens=draw(storable_tokens),
        input_token_source=draw(st.sampled_from(["none", "upstream-ids", "local:bpe"])),
        output_token_source=draw(st.sampled_from(["none", "upstream-pieces"])),
        input_text=draw(st.none() | clean_text),
        output_text=draw(st.none() | clean_text),
        user_id=draw(st.none() | clean_text),
        session_id=draw(st.none() | clean_text),
        model_version=draw(st.none() | clean_text),
        request_duration_ms=draw(st.floats(0, 1e9)),
        extra={k: v for k, v in extra.items() if k not in reserved},
    )


def seed_hash(value: Any) -> str:
    """The seed's hash: ``sha256(json.dumps(value).encode()).hexdigest()``."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def text_sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class TestRecordCodec:
    """Exchange → leaf line → JSON gives the same values, and the seed's hashes hold."""

    @HYP
    @given(token_lists)
    def test_tokens_json_is_json_dumps(self, tokens: Any) -> None:
        """For any token list (big ints, lone surrogates, byte lists), the seed's exact bytes."""
        assert json.dumps(tokens).encode() == tokens_json(tokens)

    @HYP
    @given(exchanges(), st.integers(0, 2**40), st.binary(min_size=32, max_size=32))
    def test_round_trip(self, exchange: Exchange, seq: int, prev: bytes) -> None:
        """Every field comes back from the stored line unchanged, with matching hashes."""
        content = orjson.loads(exchange.content_bytes())
        line = encode_line("fuzz-log", seq, prev.hex(), content)
        assert b"\n" not in line
        back = orjson.loads(line)
        assert ("fuzz-log", seq, prev.hex()) == (back["log_id"], back["seq"], back["prev_hash"])
        for name in (
            "model", "api", "stop_reason", "input_tokens", "output_tokens", "input_text",
            "output_text", "user_id", "session_id", "model_version", "event_id", "timestamp",
        ):  # fmt: skip
            assert getattr(exchange, name) == back[name], name
        assert math.isclose(exchange.request_duration_ms, back["request_duration_ms"])
        for key, value in exchange.extra.items():
            assert value == back[key]
        assert seed_hash(back["input_tokens"]) == back["input_hash"]
        assert seed_hash(back["output_tokens"]) == back["output_hash"]
        assert text_sha(back["input_text"]) == back["input_text_hash"]
        assert text_sha(back["output_text"]) == back["output_text_hash"]
        assert exchange.content_bytes() == Exchange.from_fields(content).content_bytes()

    @HYP
    @given(st.text(), st.lists(st.text(), max_size=5))
    def test_surrogates_stay_self_consistent(self, text: str, tokens: list[str]) -> None:
        """Lone surrogates are stored as U+FFFD, and the stored values still match their hashes."""
        ex = Exchange(
            model=text, api="sdk", stop_reason="stop", input_text=text, output_tokens=list(tokens)
        )
        back = orjson.loads(ex.content_bytes())
        assert text_sha(back["input_text"]) == back["input_text_hash"]
        assert seed_hash(back["output_tokens"]) == back["output_hash"]


# -- the Merkle core ----------------------------------------------------------------------------

leaf_sets = st.lists(st.binary(max_size=12), min_size=1, max_size=70)


def _flip(data: bytes, bit: int) -> bytes:
    i = bit % (len(data) * 8)
    out = bytearray(data)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


class TestMerkle:
    """Random trees: proofs verify; a single mutation fails with VerificationError only."""

    @HYP
    @given(leaf_sets, st.data())
    def test_inclusion(self, leaves: list[bytes], data: st.DataObject) -> None:
        """A proof verifies; a flipped bit, a moved index, a dropped or added hash does not."""
        hashes = [leaf_hash(x) for x in leaves]
        n = len(hashes)
        index = data.draw(st.integers(0, n - 1))
        root = root_from_hashes(hashes)
        proof = inclusion_proof(index, hashes)
        verify_inclusion(index, n, hashes[index], proof, root)
        kind = data.draw(st.sampled_from(["proof", "root", "leaf", "index", "drop", "add", "cut"]))
        bit = data.draw(st.integers(0, 255))
        args: list[Any] = [index, n, hashes[index], list(proof), root]
        if kind == "proof":
            assume(proof)
            k = data.draw(st.integers(0, len(proof) - 1))
            args[3][k] = _flip(proof[k], bit)
        elif kind == "root":
            args[4] = _flip(root, bit)
        elif kind == "leaf":
            args[2] = _flip(hashes[index], bit)
        elif kind == "index":
            other = data.draw(st.integers(-2, n + 2).filter(lambda i: i != index))
            assume(not (0 <= other < n and hashes[other] == hashes[index]))
            args[0] = other
        elif kind == "drop":
            assume(proof)
            del args[3][data.draw(st.integers(0, len(proof) - 1))]
        elif kind == "add":
            args[3].insert(data.draw(st.integers(0, len(proof))), _flip(root, bit))
        else:  # a hash cut short
            assume(proof)
            args[3][0] = proof[0][: bit % 32]
        with pytest.raises(VerificationError):
            verify_inclusion(*args)

    @HYP
    @given(leaf_sets, st.data())
    def test_consistency(self, leaves: list[bytes], data: st.DataObject) -> None:
        """A consistency proof verifies; a flipped bit in a proof hash or a root does not."""
        hashes = [leaf_hash(x) for x in leaves]
        n = len(hashes)
        m = data.draw(st.integers(1, n))
        old, new = root_from_hashes(hashes[:m]), root_from_hashes(hashes)
        proof = consistency_proof(m, hashes)
        verify_consistency(m, n, old, new, proof)
        kind = data.draw(st.sampled_from(["proof", "old", "new", "drop", "add", "size"]))
        bit = data.draw(st.integers(0, 255))
        args: list[Any] = [m, n, old, new, list(proof)]
        if kind == "proof":
            assume(proof)
            k = data.draw(st.integers(0, len(proof) - 1))
            args[4][k] = _flip(proof[k], bit)
        elif kind == "old":
            args[2] = _flip(old, bit)
        elif kind == "new":
            args[3] = _flip(new, bit)
        elif kind == "drop":
            assume(proof)
            del args[4][data.draw(st.integers(0, len(proof) - 1))]
        elif kind == "add":
            args[4].append(_flip(new, bit))
        else:
            other = data.draw(st.integers(1, n).filter(lambda s: s != m))
            assume(root_from_hashes(hashes[:other]) != old)
            args[0] = other
        with pytest.raises(VerificationError):
            verify_consistency(*args)


# -- the checkpoint and signed-note parsers -----------------------------------------------------

SIGNER = Signer.generate("fuzz-key")
VERIFIER = SIGNER.verifier
GOOD_BODY = Checkpoint(f"{SIGNER.name}/fuzz-log", 7, bytes(range(32))).to_text()
GOOD_NOTE = SIGNER.sign_note(GOOD_BODY)
ASCII_SIZES = st.text("0123456789 +-x\t", max_size=24)


def only_tokentrail_errors(fn: Any, *args: Any) -> None:
    """Call ``fn``; a failure must be a :class:`TokentrailError`, nothing else."""
    with contextlib.suppress(TokentrailError):
        fn(*args)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, inserted or deleted."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "replace"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "insert" or not data:
            data.insert(pos, draw(st.integers(0, 255)))
        elif op == "delete":
            del data[pos]
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


class TestParsers:
    """Whatever bytes or text arrive, parsers raise tokentrail errors only."""

    @HYP
    @given(st.binary(max_size=300) | mutated(GOOD_BODY) | mutated(GOOD_NOTE))
    def test_checkpoint_and_note_bytes(self, data: bytes) -> None:
        """Checkpoint.from_text, split_note and open_note on arbitrary or near-valid bytes."""
        only_tokentrail_errors(Checkpoint.from_text, data)
        only_tokentrail_errors(split_note, data)
        only_tokentrail_errors(open_note, data, [VERIFIER])

    @HYP
    @given(st.text(max_size=40), ASCII_SIZES, st.text(max_size=60))
    def test_checkpoint_fields(self, origin: str, size: str, root: str) -> None:
        """Three-line bodies with arbitrary origin, size and root text."""
        for r in (root, base64.b64encode(bytes(32)).decode()):
            body = f"{origin}\n{size}\n{r}\n".encode("utf-8", "surrogatepass")
            only_tokentrail_errors(Checkpoint.from_text, body)

    @HYP
    @given(
        st.text(max_size=120)
        | mutated(VERIFIER.to_text().encode()).map(lambda b: b.decode("latin-1"))
        | mutated(SIGNER.to_text().encode()).map(lambda b: b.decode("latin-1"))
    )
    def test_key_texts(self, text: str) -> None:
        """Verifier.from_text and Signer.from_text on arbitrary or near-valid text."""
        only_tokentrail_errors(Verifier.from_text, text)
        only_tokentrail_errors(Signer.from_text, text)

    def test_mutated_note_never_opens_with_other_content(self) -> None:
        """Control: the untouched note opens, and its text is the checkpoint body."""
        text, names = open_note(GOOD_NOTE, [VERIFIER])
        assert (GOOD_BODY, [SIGNER.name]) == (text, names)

    @pytest.mark.parametrize("size", ["²", "١٢", "𝟙"])
    def test_checkpoint_size_non_ascii_digits(self, size: str) -> None:
        """A tree size in non-ASCII digits is malformed: VerificationError."""
        root = base64.b64encode(bytes(32)).decode()
        with pytest.raises(VerificationError):
            Checkpoint.from_text(f"origin\n{size}\n{root}\n".encode())

    @pytest.mark.parametrize("name", ["ctl\x01name", "tab\tname", "nul\x00", "esc\x1b[0m"])
    def test_key_name_control_characters(self, name: str) -> None:
        """A key name with a control character is refused, to sign and to verify with: a C2SP
        signed note holds none but newline, and the name is written into every note."""
        with pytest.raises(KeyError_, match="control characters"):
            Signer.generate(name)
        text = VERIFIER.to_text().replace(SIGNER.name, name, 1)
        with pytest.raises(KeyError_, match="control characters"):
            Verifier.from_text(text)

    @pytest.mark.parametrize("bad", [b"\x01", b"\r", b"\x7f\x1f", b"\xff"])
    def test_note_with_control_character_or_invalid_utf8(self, bad: bytes) -> None:
        """A note holding a control character other than newline, or bytes that are not UTF-8,
        is not a signed note (C2SP signed-note), wherever in the note it is."""
        for note in (bad + GOOD_NOTE, GOOD_NOTE.replace(b"\n\n", b"\n" + bad + b"\n\n", 1)):
            with pytest.raises(VerificationError, match=r"control character|UTF-8"):
                split_note(note)

    def test_note_signature_base64_is_canonical(self) -> None:
        """A signature line whose base64 has non-zero padding bits is malformed."""
        head, _, sig = GOOD_NOTE.rstrip(b"\n").rpartition(b" ")
        assert sig.endswith(b"=") and not sig.endswith(b"==")
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(sig[-2:-1])
        tweaked = sig[:-2] + alphabet[last ^ 0b01 : (last ^ 0b01) + 1] + b"="
        assert base64.b64decode(tweaked) == base64.b64decode(sig)  # same bytes, other text
        note = head + b" " + tweaked + b"\n"
        assert note != GOOD_NOTE
        with pytest.raises(VerificationError):
            split_note(note)


# -- any mutation of a valid log fails verify ---------------------------------------------------


@pytest.fixture(scope="module")
def sealed_ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small sealed ledger: 9 records in several segments under 4 checkpoints."""
    root = tmp_path_factory.mktemp("sealed") / "ledger"
    with Ledger.open(LedgerConfig(root, "fuzz-log", SIGNER, max_segment_bytes=2048)) as ledger:
        for i in range(9):
            ledger.append(exchange_for(i))
            if i % 3 == 2:
                ledger.seal()
    report = verify_local(root, VerifyOptions([VERIFIER], require_sealed=True))
    assert report.ok, [f.to_line() for f in report.findings]
    yield root


def _ledger_files(root: Path) -> list[Path]:
    log = root / "logs" / "fuzz-log"
    segments = sorted((log / "segments").glob("*/*.jsonl"))
    checkpoints = sorted((log / "checkpoints").glob("*.checkpoint"))
    assert len(segments) >= 2 and len(checkpoints) >= 3
    return segments + checkpoints


class TestLedgerMutation:
    """A byte flipped, inserted or deleted anywhere in a segment or checkpoint fails verify."""

    @SLOW
    @given(data=st.data())
    def test_any_mutation_fails_verify(self, sealed_ledger: Path, data: st.DataObject) -> None:
        """verify_local(...).ok is False unless the file came out byte-identical."""
        files = _ledger_files(sealed_ledger)
        target = data.draw(st.sampled_from(files), label="file")
        original = target.read_bytes()
        changed = data.draw(mutated(original), label="mutation")
        assume(changed != original)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "ledger"
            shutil.copytree(sealed_ledger, copy)
            (copy / target.relative_to(sealed_ledger)).write_bytes(changed)
            report = verify_local(copy, VerifyOptions([VERIFIER], require_sealed=True))
        assert not report.ok, f"mutation of {target.name} passed verify"

    @pytest.mark.parametrize("which", ["first", "middle", "last"])
    def test_every_single_byte_flip_of_a_segment(self, sealed_ledger: Path, which: str) -> None:
        """Exhaustively, bit 0 of every byte of one record line, each alone, fails verify."""
        seg = _ledger_files(sealed_ledger)[0]
        lines = seg.read_bytes().split(b"\n")
        line_no = {"first": 0, "middle": len(lines) // 2 - 1, "last": len(lines) - 2}[which]
        start = sum(len(x) + 1 for x in lines[:line_no])
        end = start + len(lines[line_no]) + 1
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "ledger"
            shutil.copytree(sealed_ledger, copy)
            target = copy / seg.relative_to(sealed_ledger)
            original = target.read_bytes()
            passed = []
            for pos in range(start, end, 7):  # every 7th byte keeps this under a few seconds
                mutated_bytes = bytearray(original)
                mutated_bytes[pos] ^= 1
                target.write_bytes(bytes(mutated_bytes))
                if verify_local(copy, VerifyOptions([VERIFIER], require_sealed=True)).ok:
                    passed.append(pos)
            target.write_bytes(original)
        assert [] == passed


# -- the proxy, CI-sized -----------------------------------------------------------------------


def test_proxy_fuzz_ci(tmp_path: Path) -> None:
    """~2,000 hostile requests and upstream answers: no crash, clear errors, ledger verifies."""
    import fuzz_proxy

    result = fuzz_proxy.run(cases=2_000, seed=7, workdir=tmp_path, concurrency=8)
    print(result.table())
    result.check(rss_growth_mib=fuzz_proxy.RSS_BOUND_MIB)


# -- proxy bugs the fuzz found, fixed: kept as regression tests ----------------------------------


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[Any, Any]]:
    """A proxy in front of the hostile upstream: ``(proxy, seen)``."""
    from fuzz_upstream import Seen, upstream_in_thread
    from test_proxy import start_proxy

    seen = Seen()
    with (
        tempfile.TemporaryDirectory() as tmp,
        upstream_in_thread(seen=seen) as url,
    ):
        proxy = start_proxy(Path(tmp), url, "--upstream-timeout", "10")
        try:
            yield proxy, seen
        finally:
            proxy.stop()


def _clear_error(path: str, response: Any) -> bool:
    """A 4xx/5xx whose body is JSON with ``error`` in the path's dialect."""
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) if path.startswith("/v1/") else isinstance(err, str)


class TestProxyKnownBugs:
    """Inputs the fuzz found that the proxy mishandles (see bench/fuzz_proxy.py KNOWN_BUGS)."""

    @pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
    def test_deeply_nested_request(self, hostile: tuple[Any, Any], path: str) -> None:
        """100,000 nested arrays in the body: 400 with a JSON error in the dialect."""
        import httpx

        proxy, _ = hostile
        body = b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(proxy.url + path, content=body, timeout=30)
        assert (400, True) == (r.status_code, _clear_error(path, r))

    def test_big_integer_after_fallback(self, hostile: tuple[Any, Any]) -> None:
        """{"x": NaN, "seed": 2**64}: refused (400) or recorded, never a bare 500."""
        import httpx

        proxy, _ = hostile
        body = (
            b'{"model":"m","prompt":"p","stream":false,'
            b'"options":{"x":NaN,"seed":18446744073709551616}}'
        )
        r = httpx.post(proxy.url + "/api/generate", content=body, timeout=30)
        assert r.status_code == 200 or (r.status_code == 400 and _clear_error("/api", r))

    @pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
    def test_request_content_encoding(self, hostile: tuple[Any, Any], encoding: str) -> None:
        """A compressed (or mislabelled) request body: relayed and recorded, or a clear 4xx."""
        import gzip

        import httpx

        proxy, _ = hostile
        body = b'{"model":"m","prompt":"p","stream":false}'
        payload = gzip.compress(body) if encoding == "gzip" else body
        r = httpx.post(
            proxy.url + "/api/generate",
            content=payload,
            headers={"Content-Encoding": encoding},
            timeout=30,
        )
        assert r.status_code == 200 or (400 <= r.status_code < 500 and _clear_error("/api", r))

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_upstream_deep_nesting(self, hostile: tuple[Any, Any], seed: int) -> None:
        """One record, and a complete answer (relay or dialect error)."""
        self._one_record(hostile, "deep-nesting", seed)

    def test_upstream_big_numbers(self, hostile: tuple[Any, Any]) -> None:
        """One record, and a complete answer."""
        self._one_record(hostile, "big-numbers", 0)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_upstream_lying_gzip(self, hostile: tuple[Any, Any], seed: int) -> None:
        """One record. The client cannot decode the answer, as it could not talking directly:
        the upstream's Content-Encoding header has gone out before its bytes turn out wrong."""
        self._one_record(hostile, "lying-gzip", seed, must_complete=False)

    @staticmethod
    def _one_record(
        hostile: tuple[Any, Any], behaviour: str, seed: int, must_complete: bool = True
    ) -> None:
        import httpx

        proxy, seen = hostile
        key = f"known-{behaviour}-{seed}"
        headers = {"X-Fuzz-Upstream": f"{behaviour}:{seed}", "Idempotency-Key": key}
        try:
            r = httpx.post(
                proxy.url + "/api/generate",
                json={"model": "m", "prompt": "p", "stream": True},
                headers=headers,
                timeout=30,
            )
            complete = r.status_code < 500 or _clear_error("/api", r)
        except httpx.HTTPError:
            complete = False
        time.sleep(0.2)
        assert key in seen.keys
        recorded = [x for x in proxy.records() if x.get("idempotency_key") == key]
        assert (True, 1) == (complete or not must_complete, len(recorded))
