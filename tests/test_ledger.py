"""Tests for the ledger writer of SPEC section 3: lines, chain, group commit, segments,
compression, checkpoints, restart and recovery, key files, and crash safety.

Expected values are computed here from the SPEC's definitions with ``hashlib`` and ``json``
(leaf hash, Merkle root, the seed's own validation loop), never with the code under test.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import errno
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tokentrail._capture import Begun, Meta, new_capture
from tokentrail._checkpoint import Signer
from tokentrail._errors import (
    ConfigError,
    DamagedLogError,
    KeyChangedError,
    KeyError_,
    StoreError,
)
from tokentrail._ledger import (
    ASYNC_FLUSH_S,
    ASYNC_SYNC_S,
    AsyncLedger,
    Durability,
    Ledger,
    LedgerConfig,
    compress_segment,
)
from tokentrail._record import Exchange, Record
from tokentrail._verify import Report, VerifyOptions, verify_local

LOG_ID = "test-log"
ZERO = "0" * 64
CRASH_WRITER = Path(__file__).with_name("_crash_writer.py")

#: The seed's fields and tokentrail's own, by their exact SPEC names.
REQUIRED = {
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
    "schema",
    "log_id",
    "seq",
    "prev_hash",
    "api",
    "input_token_source",
    "output_token_source",
    "input_text",
    "output_text",
    "input_text_hash",
    "output_text_hash",
}


# --------------------------------------------------------------------------------------------
# Independent readers and hashes.
# --------------------------------------------------------------------------------------------


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 9162 section 2.1.1 leaf hash."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def merkle_root(hashes: list[bytes]) -> bytes:
    """RFC 9162 MTH over leaf hashes, straight from the recursive definition."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + merkle_root(hashes[:k]) + merkle_root(hashes[k:])).digest()


def log_dir(root: Path) -> Path:
    return root / "logs" / LOG_ID


def segments(root: Path) -> list[Path]:
    """Segment files in (date folder, first seq) order, the order a verifier reads them."""
    return sorted((log_dir(root) / "segments").glob("*/*.jsonl*"))


def checkpoint_sizes(root: Path) -> list[int]:
    return sorted(int(p.name[:20]) for p in (log_dir(root) / "checkpoints").glob("*.checkpoint"))


def raw_lines(root: Path) -> list[bytes]:
    """Every stored line (newline included), decompressing ``.zst`` segments."""
    out: list[bytes] = []
    for path in segments(root):
        data = path.read_bytes()
        if path.name.endswith(".zst"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        out.extend(data.splitlines(keepends=True))
    return out


def stored(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw_lines(root)]


def assert_chain(root: Path, n: int | None = None) -> None:
    """Contiguous seq from 0 and a prev_hash chain over the stored bytes."""
    prev = ZERO
    lines = raw_lines(root)
    for seq, line in enumerate(lines):
        obj = json.loads(line)
        assert (seq, prev) == (obj["seq"], obj["prev_hash"])
        prev = leaf_hash(line.rstrip(b"\n")).hex()
    if n is not None:
        assert n == len(lines)


def verify(root: Path, signer: Signer, **opts: Any) -> Report:
    return verify_local(root, VerifyOptions(verifiers=[signer.verifier], **opts))


def verified(root: Path, signer: Signer) -> bool:
    report = verify(root, signer)
    assert report.ok, [f.to_line() for f in report.findings]
    return True


def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
    return dict(pairs)


def reject_constant(name: str) -> None:
    raise AssertionError(f"{name} is not I-JSON")


def fetch_audit_records(start_date: date, end_date: date, root: Path) -> Iterator[dict[str, Any]]:
    """The seed's record source, over the local ledger's date folders."""
    for path in segments(root):
        if start_date.isoformat() <= path.parent.name <= end_date.isoformat():
            for line in path.read_bytes().splitlines():
                yield json.loads(line)


class Clock:
    """A settable clock for the writer (epoch seconds)."""

    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def set(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------
# Records and lines.
# --------------------------------------------------------------------------------------------


class _AnyNote(str):
    """Equal to any non-empty note text."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    __hash__ = str.__hash__


ANY_NOTE = _AnyNote("any note")


class TestLines:
    def test_contiguous_seq_and_chain(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """Appends get seq 0, 1, 2, … and each prev_hash is the leaf hash of the one before."""
        records = write_records(25)
        assert list(range(25)) == [r.seq for r in records]
        assert ZERO == stored(ledger_root)[0]["prev_hash"]
        assert_chain(ledger_root, 25)

    def test_one_line_per_record(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """Each record is one line ending in a newline, and the leaf is that line without it."""
        records = write_records(12)
        data = b"".join(p.read_bytes() for p in segments(ledger_root))
        assert data.endswith(b"\n")
        assert [r.leaf + b"\n" for r in records] == data.splitlines(keepends=True)
        assert [leaf_hash(r.leaf) for r in records] == [r.leaf_hash for r in records]

    def test_leaf_is_i_json(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """Every leaf is strict UTF-8 JSON with no duplicate key, NaN or Infinity."""
        write_records(10)
        for line in raw_lines(ledger_root):
            obj = json.loads(
                line.decode("utf-8", "strict"),
                object_pairs_hook=reject_duplicates,
                parse_constant=reject_constant,
            )
            assert REQUIRED <= set(obj), REQUIRED - set(obj)
            assert ("tokentrail.record/v1", LOG_ID) == (obj["schema"], obj["log_id"])

    def test_record_to_json(self, write_records: Callable[..., list[Record]]) -> None:
        """``Record.to_json`` is the stored line parsed back."""
        (record,) = write_records(1)
        assert json.loads(record.leaf) == record.to_json()

    @pytest.mark.parametrize(
        "tokens",
        [
            [1, 2, 3],
            [0, -1, 2**31, 2**53 + 1, 2**63 - 1],
            ["Hello", " wörld", "😀", "\u2028", '"', "\\"],
            ["a", [0xE2, 0x82], [0xAC], [0xFF]],
            [[0x00], [0x80, 0x81]],
            ["\ud800 lone surrogate"],
            [],
            None,
        ],
        ids=[
            "ids",
            "edge-ids",
            "pieces",
            "byte-pieces",
            "only-bytes",
            "surrogate",
            "empty",
            "null",
        ],
    )
    def test_seed_validation_loop(
        self,
        tokens: Any,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """The seed's validation loop, unchanged, finds no violation on any kind of token list."""
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as ledger:
            for i in range(3):
                ledger.append(make_exchange(i, input_tokens=tokens, output_tokens=tokens))
        today = datetime.now(UTC).date()
        start_date, end_date = today - timedelta(days=1), today + timedelta(days=1)
        checked = 0
        # --- the seed, step 6, verbatim ---
        for record in fetch_audit_records(start_date, end_date, ledger_root):
            expected_hash = hashlib.sha256(json.dumps(record["input_tokens"]).encode()).hexdigest()
            assert expected_hash == record["input_hash"], (
                f"Integrity violation at {record['event_id']}"
            )
            # --- the same for the output side ---
            expected_hash = hashlib.sha256(json.dumps(record["output_tokens"]).encode()).hexdigest()
            assert expected_hash == record["output_hash"], (
                f"Integrity violation at {record['event_id']}"
            )
            checked += 1
        assert 3 == checked

    def test_seed_validation_loop_over_varied_records(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """The seed's loop passes on every record of a varied ledger, text hashes too."""
        write_records(40)
        today = datetime.now(UTC).date()
        records = list(fetch_audit_records(today, today, ledger_root))
        assert 40 == len(records)
        for record in records:
            expected_hash = hashlib.sha256(json.dumps(record["input_tokens"]).encode()).hexdigest()
            assert expected_hash == record["input_hash"], (
                f"Integrity violation at {record['event_id']}"
            )
            for text in ("input_text", "output_text"):
                value = record[text]
                expected = None if value is None else hashlib.sha256(value.encode()).hexdigest()
                assert expected == record[f"{text}_hash"]

    @pytest.mark.parametrize(
        ("bad", "field", "stored"),
        [
            ({"extra": {"x": {1, 2}}}, "x", {"tokentrail.unrecordable": ANY_NOTE}),
            ({"input_tokens": [2**64]}, "input_tokens", [str(2**64)]),
            ({"extra": {"x": object()}}, "x", {"tokentrail.unrecordable": ANY_NOTE}),
        ],
        ids=["set", "int-beyond-64-bits", "object"],
    )
    def test_unencodable_exchange(
        self,
        bad: dict[str, Any],
        field: str,
        stored: Any,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """A value I-JSON cannot hold is stored as a note (or an integer as text), hashes
        matching what is stored: the exchange is still recorded, the chain intact."""
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as ledger:
            record = ledger.append(make_exchange(0, **bad))
            assert 0 == record.seq
            assert 1 == ledger.append(make_exchange(1)).seq
        obj = json.loads(record.leaf)
        assert stored == obj[field]
        expected = hashlib.sha256(json.dumps(obj["input_tokens"]).encode()).hexdigest()
        assert expected == obj["input_hash"]
        assert_chain(ledger_root, 2)


# --------------------------------------------------------------------------------------------
# Group commit.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``os.fsync`` calls (one entry per call)."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


class TestGroupCommit:
    async def test_concurrent_async_appends(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        fsyncs: list[int],
    ) -> None:
        """200 concurrent async appends all land, contiguous and chained, sharing fsyncs."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer)
        async with await AsyncLedger.open(cfg) as ledger:
            before = len(fsyncs)
            records = await asyncio.gather(*(ledger.append(make_exchange(i)) for i in range(200)))
            used = len(fsyncs) - before
        assert list(range(200)) == sorted(r.seq for r in records)
        assert 200 == len({r.event_id for r in records})
        assert_chain(ledger_root, 200)
        assert verified(ledger_root, signer)
        assert used < 50, f"{used} fsyncs for 200 concurrent appends"

    def test_concurrent_thread_appends(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        fsyncs: list[int],
    ) -> None:
        """16 threads × 200 strict appends all land, each thread's seqs rising, one chain."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, max_segment_bytes=256 * 1024)
        results: dict[int, list[int]] = {}
        with Ledger.open(cfg) as ledger:

            def work(t: int) -> None:
                results[t] = [ledger.append(make_exchange(t * 1000 + i)).seq for i in range(200)]

            threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        assert list(range(3200)) == sorted(s for seqs in results.values() for s in seqs)
        assert all(seqs == sorted(seqs) for seqs in results.values())
        assert_chain(ledger_root, 3200)
        assert verified(ledger_root, signer)
        assert len(fsyncs) < 3200, f"{len(fsyncs)} fsyncs for 3200 appends: no group commit"

    async def test_async_durability(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """Under async durability appends return at once and are all on disk after close."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability="async")
        async with await AsyncLedger.open(cfg) as ledger:
            records = [await ledger.append(make_exchange(i)) for i in range(50)]
        assert list(range(50)) == [r.seq for r in records]
        assert_chain(ledger_root, 50)
        assert [50] == checkpoint_sizes(ledger_root)

    def test_async_writes_share_fsyncs(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        fsyncs: list[int],
    ) -> None:
        """Async durability fsyncs at most every ASYNC_SYNC_S; ``flush`` and seals fsync first."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability="async")
        with Ledger.open(cfg) as ledger:
            before = len(fsyncs)
            started = time.monotonic()
            for i in range(300):
                ledger.append(make_exchange(i))
                time.sleep(0.001)  # a trickle: one write per flusher poll
            ledger.writer.flush()
            elapsed = time.monotonic() - started
            used = len(fsyncs) - before
            assert 300 == ledger.writer._synced_size  # flush returns once it is all fsynced
            assert used <= elapsed / ASYNC_SYNC_S + 5, f"{used} fsyncs in {elapsed:.2f}s"
            sealed = ledger.writer.seal()
        assert sealed is not None and 300 == sealed.size
        assert_chain(ledger_root, 300)
        assert verified(ledger_root, signer)

    @pytest.mark.parametrize("how", ["defer", "append"])
    def test_async_records_flowing_are_taken_once_an_interval(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        how: str,
    ) -> None:
        """While records flow under async durability the flusher takes them once every
        ASYNC_FLUSH_S, not whenever it comes round (for an fsync, say) and finds one queued:
        each turn it takes is a turn of the GIL taken from the appenders."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability="async")
        writes = 0
        with Ledger.open(cfg) as ledger:
            writer = ledger.writer
            write = writer._write

            def counted(batch: list[Any]) -> None:
                nonlocal writes
                writes += 1
                write(batch)

            writer._write = counted  # type: ignore[method-assign]
            started = time.monotonic()
            i = 0
            while time.monotonic() - started < 0.5:  # a record every 4 ms
                if how == "defer":
                    writer.defer(lambda i=i: make_exchange(i))
                else:
                    writer.submit(make_exchange(i))
                i += 1
                time.sleep(0.004)
            elapsed = time.monotonic() - started
            turns = writes
            writer.flush()
        assert turns <= elapsed / ASYNC_FLUSH_S + 3, f"{turns} batches in {elapsed:.2f}s"
        assert_chain(ledger_root, i)
        assert verified(ledger_root, signer)

    def test_flush_returns_when_the_batch_it_waits_for_fails(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Strict: a flush that began while a batch was being written returns when that batch
        fails (its appender gets the error), rather than waiting for records that will not come;
        the log goes on afterwards."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer)
        real = os.fsync
        entered, go = threading.Event(), threading.Event()
        fail = [True]

        def fsync(fd: int) -> None:
            if fail[0] and os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
                fail[0] = False
                entered.set()
                go.wait(10)
                raise OSError(errno.EIO, "simulated I/O error")
            real(fd)

        with Ledger.open(cfg) as ledger:
            ledger.append(make_exchange(0))
            monkeypatch.setattr(os, "fsync", fsync)
            waiter: concurrent.futures.Future[Record] = concurrent.futures.Future()
            ledger.writer.submit(make_exchange(1), waiter)
            assert entered.wait(10)
            flushed = threading.Event()
            flusher = threading.Thread(target=lambda: (ledger.writer.flush(), flushed.set()))
            flusher.start()
            time.sleep(0.05)  # the flush has noted what it waits for
            go.set()
            with pytest.raises(StoreError, match="simulated I/O error"):
                waiter.result(10)
            assert flushed.wait(5), "flush kept waiting for a batch that failed"
            flusher.join()
            ledger.append(make_exchange(2))
            ledger.writer.flush()
            assert ledger.writer.size == 2
        assert_chain(ledger_root, 2)
        assert verified(ledger_root, signer)

    @pytest.mark.parametrize("durability", ["strict", "async"])
    def test_a_writer_that_dies_leaves_nobody_waiting(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        monkeypatch: pytest.MonkeyPatch,
        durability: Durability,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A bug that kills the flusher thread mid-batch: the batch's appenders, ``flush``,
        ``seal``, later appends and ``close`` all raise a StoreError that says so; none hangs;
        what was written before stays valid."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability=durability)
        ledger = Ledger.open(cfg)
        writer = ledger.writer
        ledger.append(make_exchange(0))
        writer.flush()

        def write(batch: list[Any]) -> None:
            raise RuntimeError("a bug in the writer")

        monkeypatch.setattr(writer, "_write", write)
        waiter: concurrent.futures.Future[Record] = concurrent.futures.Future()
        writer.submit(make_exchange(1), waiter)
        with pytest.raises(StoreError, match="stopped on an unexpected error"):
            waiter.result(10)
        for call in (
            lambda: ledger.append(make_exchange(2)),
            writer.flush,
            writer.seal,
            lambda: writer.defer(lambda: make_exchange(3)),
            ledger.close,
        ):
            with pytest.raises(StoreError, match="RuntimeError: a bug in the writer"):
                call()
        with pytest.raises(StoreError, match="a bug in the writer"):
            writer.flush()  # nothing is pending now: it still says the writer stopped
        writer.orphan(lambda: make_exchange(4))  # from a finalizer: never raises, says so
        assert "the writer of ledger" in caplog.text
        assert f"ledger {LOG_ID} is stopped; a record is lost" in caplog.text
        assert_chain(ledger_root, 1)

    def test_seal_after_close(self, ledger_root: Path, signer: Signer) -> None:
        """Sealing a closed writer says it is closed (it used to wait forever)."""
        ledger = Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer))
        ledger.close()
        outcome: queue.Queue[BaseException | None] = queue.Queue()

        def seal() -> None:
            try:
                ledger.writer.seal()
                outcome.put(None)
            except BaseException as exc:
                outcome.put(exc)

        threading.Thread(target=seal, daemon=True).start()  # a hang fails the test, not the run
        error = outcome.get(timeout=10)
        assert isinstance(error, StoreError) and "is closed" in str(error), error

    @pytest.mark.parametrize("failures", [0, 1, 2])
    def test_async_fsyncs_every_segment_it_wrote(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        monkeypatch: pytest.MonkeyPatch,
        failures: int,
    ) -> None:
        """Async durability: once ``flush`` returns, every byte of every segment was fsynced,
        segments rotated within one batch included, and a segment whose fsync failed when it
        was closed is fsynced by name before anything is called synced."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability="async", max_segment_bytes=4096)
        synced: dict[str, int] = {}  # segment file -> its size at its last good fsync
        real = os.fsync
        left = [0]

        def fsync(fd: int) -> None:
            name = os.readlink(f"/proc/self/fd/{fd}")
            if name.endswith(".jsonl") and left[0]:
                left[0] -= 1
                raise OSError(errno.EIO, "simulated I/O error")
            real(fd)
            synced[name] = os.fstat(fd).st_size

        with Ledger.open(cfg) as ledger:
            monkeypatch.setattr(os, "fsync", fsync)
            ledger.append(make_exchange(0))
            ledger.writer.flush()  # an fsync just now: the next batch is written without one
            left[0] = failures
            for i in range(1, 60):
                ledger.writer.defer(lambda i=i: make_exchange(i))  # one batch, many segments
            ledger.writer.flush()
            assert 60 == ledger.writer._synced_size
            files = segments(ledger_root)
            assert len(files) > 3
            assert {str(f): f.stat().st_size for f in files} == {
                str(f): synced.get(str(f)) for f in files
            }
        assert_chain(ledger_root, 60)
        assert verified(ledger_root, signer)

    def test_deferred_appends_keep_order(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """``defer`` builds on the flusher; mixed with ``submit`` the order is submission order."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability="async")
        threads: set[str] = set()

        def build(i: int) -> Callable[[], Exchange]:
            def make() -> Exchange:
                threads.add(threading.current_thread().name)
                if i == 7:
                    raise RuntimeError("a bug in a builder")
                return make_exchange(i)

            return make

        with Ledger.open(cfg) as ledger:
            writer = ledger.writer
            for i in range(20):
                if i % 5 == 4:
                    writer.submit(make_exchange(i))  # links what was deferred before it first
                else:
                    writer.defer(build(i))
            for i in range(20, 40):
                writer.defer(build(i))
            deadline = time.monotonic() + 10
            while writer.size < 39 and time.monotonic() < deadline:
                time.sleep(0.005)  # the flusher's own poll, not flush(), takes these
            writer.flush()
            assert 39 == writer._synced_size
        numbers = [int(r["input_text"].split()[2].rstrip(":")) for r in stored(ledger_root)]
        assert [i for i in range(40) if i != 7] == numbers  # the failed build alone is lost
        assert any(t.startswith("tokentrail-flush") for t in threads)
        assert_chain(ledger_root, 39)
        assert verified(ledger_root, signer)

    @pytest.mark.parametrize("durability", ["strict", "async"])
    def test_orphans_never_wait_for_the_lock(
        self,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
        durability: Durability,
    ) -> None:
        """A finalizer's append (``orphan``) on a thread that holds the writer's lock (the
        collector runs inside any allocation) neither deadlocks nor is lost; one made while
        the writer idles is written without any further append."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, durability=durability)
        with Ledger.open(cfg) as ledger:
            writer = ledger.writer

            def finalizer_inside_the_lock() -> None:
                with writer._wake:
                    writer.orphan(lambda: make_exchange(0))

            t = threading.Thread(target=finalizer_inside_the_lock)
            t.start()
            t.join(5)
            assert not t.is_alive(), "orphan() waited for a lock its own thread held"
            writer.flush()
            assert 1 == writer.size
            writer.orphan(lambda: make_exchange(1))  # the writer idles: it must wake
            deadline = time.monotonic() + 5
            while writer.size < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert 2 == writer.size
        assert_chain(ledger_root, 2)
        assert verified(ledger_root, signer)

    def test_deferred_under_strict_is_durable(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """Under strict durability ``defer`` builds at once and returns once it is on disk."""
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as ledger:
            ledger.writer.defer(lambda: make_exchange(0))
            assert 1 == ledger.writer.size

    def test_closed_ledger_refuses_appends(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """Appending after close raises StoreError."""
        ledger = Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer))
        ledger.close()
        with pytest.raises(StoreError):
            ledger.append(make_exchange(0))


# --------------------------------------------------------------------------------------------
# Segments: rotation by size and at UTC midnight, compression.
# --------------------------------------------------------------------------------------------


class TestRotation:
    @pytest.mark.parametrize("max_bytes", [1024, 4096, 16384])
    def test_by_size(
        self,
        max_bytes: int,
        write_records: Callable[..., list[Record]],
        ledger_root: Path,
        signer: Signer,
    ) -> None:
        """Segments rotate once they reach the size limit and are named by their first seq."""
        write_records(40, max_segment_bytes=max_bytes)
        files = segments(ledger_root)
        assert len(files) > 1
        first = 0
        for path in files[:-1]:
            lines = path.read_bytes().splitlines(keepends=True)
            assert f"{first:020d}.jsonl" == path.name
            assert first == json.loads(lines[0])["seq"]
            assert sum(map(len, lines[:-1])) < max_bytes  # rotation at the limit, not before
            first += len(lines)
        assert f"{first:020d}.jsonl" == files[-1].name
        first += len(files[-1].read_bytes().splitlines())
        assert 40 == first
        assert_chain(ledger_root, 40)
        assert verified(ledger_root, signer)

    @pytest.mark.parametrize("max_bytes", [1024, 4096])
    def test_size_limit_holds(
        self, max_bytes: int, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """No segment grows past ``max_segment_bytes`` unless it holds a single record."""
        write_records(20, max_segment_bytes=max_bytes)
        sizes = [
            (p.stat().st_size, len(p.read_bytes().splitlines())) for p in segments(ledger_root)
        ]
        assert [] == [(size, n) for size, n in sizes if size > max_bytes and n > 1]

    def test_at_utc_midnight(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """Crossing UTC midnight starts a segment in the new date folder, named by its seq."""
        clock = Clock(datetime(2031, 3, 4, 23, 59, 58, tzinfo=UTC))
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer, clock=clock)) as ledger:
            for i in range(3):
                ledger.append(make_exchange(i))
            clock.set(datetime(2031, 3, 5, 0, 0, 1, tzinfo=UTC))
            for i in range(3, 5):
                ledger.append(make_exchange(i))
        assert [
            "2031-03-04/00000000000000000000.jsonl",
            "2031-03-05/00000000000000000003.jsonl",
        ] == [f"{p.parent.name}/{p.name}" for p in segments(ledger_root)]
        assert_chain(ledger_root, 5)
        assert verified(ledger_root, signer)

    def test_date_folders_never_go_backwards(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """A clock that steps back, before or across a restart, never writes an older folder."""
        clock = Clock(datetime(2031, 3, 5, 0, 0, 1, tzinfo=UTC))
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, clock=clock)
        with Ledger.open(cfg) as ledger:
            ledger.append(make_exchange(0))
            clock.set(datetime(2031, 3, 4, 23, 0, tzinfo=UTC))
            ledger.append(make_exchange(1))
        with Ledger.open(cfg) as ledger:
            ledger.append(make_exchange(2))
        assert {"2031-03-05"} == {p.parent.name for p in segments(ledger_root)}
        assert_chain(ledger_root, 3)
        assert verified(ledger_root, signer)

    def test_days_in_order(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """Three days of appends across restarts give three folders with contiguous seqs."""
        clock = Clock(datetime(2031, 12, 30, 12, tzinfo=UTC))
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, clock=clock)
        seq = 0
        for day in (30, 31):
            clock.set(datetime(2031, 12, day, 12, tzinfo=UTC))
            with Ledger.open(cfg) as ledger:
                for _ in range(4):
                    ledger.append(make_exchange(seq))
                    seq += 1
        clock.set(datetime(2032, 1, 1, 0, 0, tzinfo=UTC))
        with Ledger.open(cfg) as ledger:
            ledger.append(make_exchange(seq))
        assert [("2031-12-30", 0), ("2031-12-31", 4), ("2032-01-01", 8)] == [
            (p.parent.name, int(p.name[:20])) for p in segments(ledger_root)
        ]
        assert_chain(ledger_root, 9)


class TestCompression:
    def test_sealed_segments_compressed(
        self,
        write_records: Callable[..., list[Record]],
        ledger_root: Path,
        signer: Signer,
    ) -> None:
        """With ``compress_sealed``, closed segments become ``.jsonl.zst`` with the same lines."""
        records = write_records(40, max_segment_bytes=4096, compress_sealed=True)
        names = [p.name for p in segments(ledger_root)]
        assert len(names) > 1
        assert all(n.endswith(".jsonl.zst") for n in names), names
        assert [] == list((log_dir(ledger_root) / "segments").glob("*/*.tmp"))
        assert [r.leaf + b"\n" for r in records] == raw_lines(ledger_root)
        assert verified(ledger_root, signer)

    def test_restart_on_compressed_log(
        self,
        write_records: Callable[..., list[Record]],
        ledger_root: Path,
        signer: Signer,
    ) -> None:
        """A writer restarted on a compressed log continues its seq and chain."""
        write_records(20, max_segment_bytes=4096, compress_sealed=True)
        more = write_records(5, start=20, max_segment_bytes=4096, compress_sealed=True)
        assert [20, 21, 22, 23, 24] == [r.seq for r in more]
        assert_chain(ledger_root, 25)
        assert verified(ledger_root, signer)

    def test_compress_segment(self, tmp_path: Path) -> None:
        """``compress_segment`` replaces the file by its zstd form and leaves no tmp file."""
        plain = tmp_path / "00000000000000000000.jsonl"
        plain.write_bytes(b'{"a":1}\n' * 1000)
        packed = compress_segment(plain)
        assert (tmp_path / "00000000000000000000.jsonl.zst", False) == (packed, plain.exists())
        assert [packed] == list(tmp_path.iterdir())
        data = zstandard.ZstdDecompressor().decompressobj().decompress(packed.read_bytes())
        assert b'{"a":1}\n' * 1000 == data


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------


class TestCheckpoints:
    def test_sealed_on_close(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """Closing the ledger seals one checkpoint over everything."""
        write_records(7)
        assert [7] == checkpoint_sizes(ledger_root)

    def test_checkpoint_text(
        self, write_records: Callable[..., list[Record]], ledger_root: Path, signer: Signer
    ) -> None:
        """The checkpoint is a C2SP signed note over origin, size and the RFC 9162 root."""
        records = write_records(13)
        note = (log_dir(ledger_root) / "checkpoints" / f"{13:020d}.checkpoint").read_bytes()
        root = merkle_root([leaf_hash(r.leaf) for r in records])
        body = f"test-key/{LOG_ID}\n13\n{base64.b64encode(root).decode()}\n".encode()
        assert note.startswith(body + "\n\u2014 test-key ".encode())
        sig_line = note[len(body) + 1 :]
        assert sig_line.endswith(b"\n") and sig_line.count(b"\n") == 1
        blob = base64.b64decode(sig_line.split(b" ")[2])
        key_id = hashlib.sha256(b"test-key\n\x01" + signer.public_key).digest()[:4]
        assert key_id == blob[:4]
        assert signer.verifier.check(body, blob[4:])

    def test_seal(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """``seal()`` signs the current size once; with nothing new it signs nothing."""
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as ledger:
            assert ledger.seal() is None  # never a size 0
            records = [ledger.append(make_exchange(i)) for i in range(3)]
            cp = ledger.seal()
            assert cp is not None
            assert (3, merkle_root([r.leaf_hash for r in records])) == (cp.size, cp.root)
            assert ledger.seal() is None
            ledger.append(make_exchange(3))
        assert [3, 4] == checkpoint_sizes(ledger_root)

    def test_empty_log_has_no_checkpoint(self, ledger_root: Path, signer: Signer) -> None:
        """Opening and closing a log with no record signs nothing."""
        for _ in range(2):
            Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)).close()
        assert [] == checkpoint_sizes(ledger_root)

    def test_no_size_signed_twice(
        self, write_records: Callable[..., list[Record]], ledger_root: Path, signer: Signer
    ) -> None:
        """Reopening and closing with nothing new leaves the checkpoints as they were."""
        write_records(5)
        before = {p.name: p.read_bytes() for p in (log_dir(ledger_root) / "checkpoints").iterdir()}
        for _ in range(3):
            Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)).close()
        after = {p.name: p.read_bytes() for p in (log_dir(ledger_root) / "checkpoints").iterdir()}
        assert before == after

    def test_sealed_while_appending(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """With a 0.2 s seal interval, checkpoints appear while appends go on."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, seal_interval_s=0.2)
        with Ledger.open(cfg) as ledger:
            for i in range(24):
                ledger.append(make_exchange(i))
                time.sleep(0.05)
            during = checkpoint_sizes(ledger_root)
        assert len(during) >= 3, during
        assert during == sorted(set(during)) and 0 not in during
        assert verified(ledger_root, signer)

    def test_sealed_when_idle(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """New records are sealed within the interval even when no append follows."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, seal_interval_s=0.2)
        with Ledger.open(cfg) as ledger:
            ledger.append(make_exchange(0))
            deadline = time.monotonic() + 3
            while checkpoint_sizes(ledger_root) != [1] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [1] == checkpoint_sizes(ledger_root)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"seal_interval_s": 0},
            {"seal_interval_s": -1},
            {"max_segment_bytes": 10},
            {"durability": "sometimes"},
        ],
    )
    def test_bad_config(self, kwargs: dict[str, Any], ledger_root: Path, signer: Signer) -> None:
        """Impossible settings raise ConfigError."""
        with pytest.raises(ConfigError):
            LedgerConfig(ledger_root, LOG_ID, signer, **kwargs)

    @pytest.mark.parametrize("log_id", ["", "UPPER", "-lead", "a/b", "..", "x" * 65, "sp ace"])
    def test_bad_log_id(self, log_id: str, ledger_root: Path, signer: Signer) -> None:
        """A log id outside ``[a-z0-9][a-z0-9._-]{0,63}`` is refused."""
        with pytest.raises(ConfigError):
            Ledger.open(LedgerConfig(ledger_root, log_id, signer))


# --------------------------------------------------------------------------------------------
# Restart and recovery.
# --------------------------------------------------------------------------------------------


def snapshot_open(
    root: Path, signer: Signer, make_exchange: Callable[..., Exchange], sealed: int, unsealed: int
) -> Path:
    """A copy of a log taken while its writer was live: ``unsealed`` records after the seal.

    Strict appends are on disk when they return, so the copy is exactly what a crash at that
    moment would leave behind.
    """
    copy = root.with_name(root.name + "-crashed")
    cfg = LedgerConfig(root, LOG_ID, signer, max_segment_bytes=4096)
    with Ledger.open(cfg) as ledger:
        for i in range(sealed):
            ledger.append(make_exchange(i))
        ledger.seal()
        for i in range(sealed, sealed + unsealed):
            ledger.append(make_exchange(i))
        shutil.copytree(root, copy)
    return copy


class TestRestartSealsOnlyRecords:
    """A restart seals the tail a dead writer left: never a line no writer could have
    written, and a crash note is recorded once, whatever its hint says."""

    @pytest.mark.parametrize(
        ("damage", "rule"),
        [
            (lambda line: b'{"user_id":"someone-else",' + line[1:], "duplicate keys"),
            (lambda line: re.sub(rb'(\.\d{6})Z"', rb'Z"', line, count=1), "timestamp"),
        ],
        ids=["duplicate-key", "timestamp"],
    )
    def test_tail_that_breaks_the_rules_is_refused(
        self,
        damage: Callable[[bytes], bytes],
        rule: str,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """A chained unsealed record that breaks SPEC section 2 stops the restart unsealed."""
        crashed = snapshot_open(ledger_root, signer, make_exchange, sealed=10, unsealed=2)
        last = segments(crashed)[-1]
        lines = last.read_bytes().splitlines(keepends=True)
        lines[-1] = damage(lines[-1])
        last.write_bytes(b"".join(lines))
        with pytest.raises(DamagedLogError, match=f"breaks the record rules.*{rule}"):
            Ledger.open(LedgerConfig(crashed, LOG_ID, signer))
        assert [10] == checkpoint_sizes(crashed)

    def test_crash_notes_recorded_once_and_only_when_whole(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """A note reusing a recorded event id (its hint set past the log) is not recorded
        again; a note that is no exchange is skipped; a whole one is recorded."""
        crashed = snapshot_open(ledger_root, signer, make_exchange, sealed=10, unsealed=2)
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as live:
            live.begin(make_exchange(50, stop_reason="interrupted"))
            note = (log_dir(ledger_root) / "inflight.jsonl").read_bytes()
        first = json.loads(raw_lines(crashed)[0])
        reused = json.loads(note)
        reused["seq_hint"], reused["exchange"]["event_id"] = 10**9, first["event_id"]
        broken = {"seq_hint": 0, "exchange": {"event_id": str(uuid.uuid4()), "model": 5}}
        (log_dir(crashed) / "inflight.jsonl").write_bytes(
            b"".join(json.dumps(n).encode() + b"\n" for n in (reused, broken)) + note
        )
        with Ledger.open(LedgerConfig(crashed, LOG_ID, signer)):
            pass
        records = [json.loads(line) for line in raw_lines(crashed)]
        assert 13 == len(records)
        assert ("interrupted", json.loads(note)["exchange"]["event_id"]) == (
            records[-1]["stop_reason"],
            records[-1]["event_id"],
        )
        assert 1 == sum(r["event_id"] == first["event_id"] for r in records)

    def test_a_begun_note_is_recorded_as_its_record_would_be(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """A note taken from a :class:`Begun` holds the request, not the record, and a restart
        records the same exchange from it as from a note of the record itself."""
        request = {"model": "m", "messages": [{"role": "user", "content": "noted words"}]}
        begun = Begun(
            new_capture("openai.chat", request),
            Meta(user_id="alice", extra={"stream": False, "client.address": "::1"}),
        )
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as live:
            live.append(make_exchange(0))
            live.begin(begun)
            note = json.loads((log_dir(ledger_root) / "inflight.jsonl").read_bytes())
            live.writer.abandon(begun.event_id)
        assert ["begun", "seq_hint"] == sorted(note)
        assert request == note["begun"]["request"]
        replayed = []
        for form in (note, {"seq_hint": 1, "exchange": begun.provisional().fields()}):
            crashed = ledger_root.with_name(f"crashed-{len(replayed)}")
            with Ledger.open(LedgerConfig(crashed, LOG_ID, signer)) as other:
                other.append(make_exchange(0))
            (log_dir(crashed) / "inflight.jsonl").write_bytes(json.dumps(form).encode() + b"\n")
            with Ledger.open(LedgerConfig(crashed, LOG_ID, signer)):
                pass
            record = json.loads(raw_lines(crashed)[-1])
            del record["request_duration_ms"], record["prev_hash"]  # (the first records differ)
            replayed.append(record)
        assert replayed[0] == replayed[1]
        assert ("interrupted", begun.event_id, "alice") == (
            replayed[0]["stop_reason"],
            replayed[0]["event_id"],
            replayed[0]["user_id"],
        )


class TestRestart:
    def test_a_new_key_on_an_old_log_is_named(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """A writer opening, under a new key, a log that another key signed is told so (a
        key change), not only that the checkpoint cannot be read."""
        write_records(5)
        with pytest.raises(KeyChangedError, match="not signed by this writer's key 'rotated'") as e:
            Ledger.open(LedgerConfig(ledger_root, LOG_ID, Signer.generate("rotated")))
        assert "damage" not in str(e.value)  # no damage to look for: a key change

    def test_continues_seq_and_chain(
        self, write_records: Callable[..., list[Record]], ledger_root: Path, signer: Signer
    ) -> None:
        """A writer restarted on its log continues seq and chain, and seals the new records."""
        write_records(10)
        more = write_records(10, start=10)
        assert list(range(10, 20)) == [r.seq for r in more]
        assert_chain(ledger_root, 20)
        assert [10, 20] == checkpoint_sizes(ledger_root)
        assert verified(ledger_root, signer)

    @pytest.mark.parametrize("lose_state", [False, True], ids=["writer-state", "no-writer-state"])
    def test_seals_inherited_tail(
        self,
        lose_state: bool,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """A writer that inherits unsealed records seals them as soon as it opens."""
        crashed = snapshot_open(ledger_root, signer, make_exchange, sealed=10, unsealed=7)
        assert [10] == checkpoint_sizes(crashed)
        if lose_state:
            (log_dir(crashed) / "writer.json").unlink()
        ledger = Ledger.open(LedgerConfig(crashed, LOG_ID, signer))
        try:
            assert [10, 17] == checkpoint_sizes(crashed)
            assert 17 == ledger.append(make_exchange(17)).seq
        finally:
            ledger.close()
        assert_chain(crashed, 18)
        assert verified(crashed, signer)

    @pytest.mark.parametrize("unsealed", [0, 5], ids=["sealed", "unsealed"])
    @pytest.mark.parametrize("fragment", [b'{"schema":"tokentrail.rec', b"\x00\x00", b"{}"])
    def test_torn_final_line(
        self,
        unsealed: int,
        fragment: bytes,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """A final line with no newline is moved aside, and the writer continues the log."""
        crashed = snapshot_open(ledger_root, signer, make_exchange, sealed=10, unsealed=unsealed)
        last = segments(crashed)[-1]
        intact = last.read_bytes()
        last.write_bytes(intact + fragment)
        with Ledger.open(LedgerConfig(crashed, LOG_ID, signer)) as ledger:
            assert 10 + unsealed == ledger.append(make_exchange(99)).seq
        assert intact == last.read_bytes()
        torn = list((log_dir(crashed) / "torn").iterdir())
        assert [fragment] == [p.read_bytes() for p in torn]
        assert_chain(crashed, 11 + unsealed)
        assert verified(crashed, signer)

    @pytest.mark.parametrize(
        "damage",
        [
            "edit-user-id",
            "delete-line",
            pytest.param(
                "duplicate-line",
            ),
            "junk-line",
            "swap-lines",
        ],
    )
    def test_damaged_tail_refused(
        self,
        damage: str,
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """A tail that does not continue the chain makes open raise DamagedLogError naming it."""
        crashed = snapshot_open(ledger_root, signer, make_exchange, sealed=10, unsealed=6)
        # The first unsealed record (seq >= 11) that has a successor in its own segment.
        path, lines, idx = next(
            (p, lines, i)
            for p in segments(crashed)
            for lines in [p.read_bytes().splitlines(keepends=True)]
            for i in range(len(lines) - 1)
            if json.loads(lines[i])["seq"] >= 11
        )
        if damage == "edit-user-id":
            lines[idx] = re.sub(rb'"user_id":"user-(\d)"', b'"user_id":"someone-else"', lines[idx])
        elif damage == "delete-line":
            del lines[idx]
        elif damage == "duplicate-line":
            lines.insert(idx, lines[idx])
        elif damage == "junk-line":
            lines.insert(idx, b"this is not a record\n")
        else:
            lines[idx], lines[idx + 1] = lines[idx + 1], lines[idx]
        path.write_bytes(b"".join(lines))
        before = sorted(p.name for p in log_dir(crashed).rglob("*"))
        with pytest.raises(DamagedLogError, match=str(path)) as refused:
            Ledger.open(LedgerConfig(crashed, LOG_ID, signer))
        assert str(refused.value).endswith(
            f"(nothing was changed: see the damage with tokentrail verify --ledger {crashed},"
            " and record to another log id meanwhile)"
        )
        assert before == sorted(p.name for p in log_dir(crashed).rglob("*"))

    def test_damaged_sealed_records_without_writer_state(
        self, write_records: Callable[..., list[Record]], ledger_root: Path, signer: Signer
    ) -> None:
        """Without ``writer.json`` the writer re-reads from seq 0 and refuses an edited log."""
        write_records(20, max_segment_bytes=4096)
        (log_dir(ledger_root) / "writer.json").unlink()
        path = segments(ledger_root)[0]
        path.write_bytes(path.read_bytes().replace(b"prompt number 1:", b"prompt number 2:", 1))
        with pytest.raises(DamagedLogError):
            Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer))

    def test_deleted_last_segment_refused(
        self, write_records: Callable[..., list[Record]], ledger_root: Path, signer: Signer
    ) -> None:
        """A log whose last (sealed) segment is gone is refused rather than continued."""
        write_records(50, max_segment_bytes=8192)
        segments(ledger_root)[-1].unlink()
        with pytest.raises(DamagedLogError):
            Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)).close()

    def test_truncated_sealed_tail_refused(
        self, write_records: Callable[..., list[Record]], ledger_root: Path, signer: Signer
    ) -> None:
        """A log whose sealed tail lost complete lines is refused rather than continued."""
        write_records(50, max_segment_bytes=8192)
        last = segments(ledger_root)[-1]
        last.write_bytes(b"".join(last.read_bytes().splitlines(keepends=True)[:-1]))
        with pytest.raises(DamagedLogError):
            Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)).close()

    def test_empty_segment_left_by_crash(
        self,
        write_records: Callable[..., list[Record]],
        ledger_root: Path,
        signer: Signer,
        make_exchange: Callable[..., Exchange],
    ) -> None:
        """An empty next segment (created, never written) does not stop the restarted writer."""
        write_records(10)
        folder = segments(ledger_root)[-1].parent
        (folder / f"{10:020d}.jsonl").write_bytes(b"")
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as ledger:
            assert 10 == ledger.append(make_exchange(10)).seq
        assert_chain(ledger_root, 11)

    def test_second_live_writer_refused(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """While one writer holds a log, a second one cannot open it; after close it can."""
        cfg = LedgerConfig(ledger_root, LOG_ID, signer)
        with Ledger.open(cfg) as ledger:
            ledger.append(make_exchange(0))
            with pytest.raises(StoreError):
                Ledger.open(cfg)
        with Ledger.open(cfg) as ledger:
            assert 1 == ledger.append(make_exchange(1)).seq


# --------------------------------------------------------------------------------------------
# Key files.
# --------------------------------------------------------------------------------------------


class TestKeyFile:
    def test_save_mode_0600(self, signer: Signer, tmp_path: Path) -> None:
        """``Signer.save`` writes the key with mode 0600 and it loads back equal."""
        path = tmp_path / "keys" / "signing.key"
        signer.save(path)
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)
        assert signer == Signer.load(path)

    def test_save_refuses_overwrite(self, signer: Signer, tmp_path: Path) -> None:
        """An existing key file is never overwritten."""
        path = tmp_path / "signing.key"
        signer.save(path)
        with pytest.raises(KeyError_):
            Signer.generate("other").save(path)
        assert signer == Signer.load(path)

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o020])
    def test_load_refuses_readable_key(self, mode: int, signer: Signer, tmp_path: Path) -> None:
        """A key file group or others can access is refused with a chmod hint."""
        path = tmp_path / "signing.key"
        signer.save(path)
        path.chmod(mode)
        with pytest.raises(KeyError_, match="chmod 600"):
            Signer.load(path)

    @pytest.mark.parametrize("mode", [0o600, 0o400])
    def test_load_private_modes(self, mode: int, signer: Signer, tmp_path: Path) -> None:
        """Owner-only modes load."""
        path = tmp_path / "signing.key"
        signer.save(path)
        path.chmod(mode)
        assert signer == Signer.load(path)

    @pytest.mark.parametrize(
        "content", [b"", b"garbage\n", b"PRIVATE+KEY+x+00+AAAA\n", b"\xff\xfe\x00"]
    )
    def test_load_garbage(self, content: bytes, tmp_path: Path) -> None:
        """A file that is not a signing key raises KeyError_."""
        path = tmp_path / "signing.key"
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(KeyError_):
            Signer.load(path)

    def test_load_missing(self, tmp_path: Path) -> None:
        """A missing key file raises KeyError_ that says how to make one."""
        with pytest.raises(KeyError_, match="keygen"):
            Signer.load(tmp_path / "nope.key")


# --------------------------------------------------------------------------------------------
# Crash safety: SIGKILL a real writer process in the middle of a burst of appends.
# --------------------------------------------------------------------------------------------


def _reader(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


class TestCrash:
    def test_sigkill_loses_no_acknowledged_append(
        self, ledger_root: Path, signer: Signer, state_dir: Path, tmp_path: Path
    ) -> None:
        """Three times: kill a writer mid-burst, restart, find every acknowledged append."""
        key = tmp_path / "signing.key"
        signer.save(key)
        acked: dict[str, int] = {}
        rng = random.Random(7)
        for _round in range(3):
            proc = subprocess.Popen(
                [sys.executable, str(CRASH_WRITER), str(ledger_root), LOG_ID, str(key)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
            target, got = rng.randint(200, 400), 0
            try:
                while got < target:
                    line = lines.get(timeout=30)
                    assert line is not None, proc.stderr.read() if proc.stderr else ""
                    seq, event_id = line.split()
                    acked[event_id] = int(seq)
                    got += 1
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            # Lines already in the pipe were acknowledged before the kill, too.
            while (line := lines.get(timeout=30)) is not None:
                seq, event_id = line.split()
                acked[event_id] = int(seq)
            assert -signal.SIGKILL == proc.returncode

            cfg = LedgerConfig(ledger_root, LOG_ID, signer)
            with Ledger.open(cfg) as ledger:
                on_disk = len(raw_lines(ledger_root))
                assert on_disk == max(checkpoint_sizes(ledger_root))  # inherited tail sealed
                record = ledger.append(
                    Exchange(model="m", api="sdk", stop_reason="stop", input_text="after")
                )
                assert on_disk == record.seq
                acked[record.event_id] = record.seq

            found = {obj["event_id"]: obj["seq"] for obj in stored(ledger_root)}
            missing = {e: s for e, s in acked.items() if found.get(e) != s}
            assert {} == missing
            assert_chain(ledger_root)
            report = verify(ledger_root, signer, state_dir=state_dir)
            assert report.ok, [f.to_line() for f in report.findings]
