"""Tests for the ``tokentrail`` command: keygen, verify, count, prove and verify-proof.

Driven through ``click.testing.CliRunner`` with exact output shapes, and once as a real
``python -m tokentrail`` subprocess. Exit status: 0 valid, 1 violation, 2 could not run; every
error a user could cause is one ``tokentrail: error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner, Result

from tokentrail._checkpoint import Signer, Verifier
from tokentrail._cli import main
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._proxy._config import ProxyConfig
from tokentrail._record import Exchange, Record

LOG_ID = "test-log"
FINDING_RE = re.compile(
    r"^FINDING log=(?P<log>\S+) seq=(?P<seq>\d+) event_id=(?P<event>\S+) file=(?P<file>\S+): .+$"
)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keys and witness state under the test's folder, never the user's."""
    home = tmp_path / "home"
    monkeypatch.chdir(tmp_path)  # relative paths and the default ./tokentrail-ledger land here
    monkeypatch.setenv("TOKENTRAIL_HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    for name in ("TOKENTRAIL_LEDGER", "TOKENTRAIL_PUBLIC_KEY", "TOKENTRAIL_STATE"):
        monkeypatch.delenv(name, raising=False)
    return home


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result: Result) -> str:
    """Exit 2, nothing on stdout, one ``tokentrail: error:`` line on stderr, no traceback."""
    assert 2 == result.exit_code, (result.stdout, result.stderr, result.exc_info)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert 1 == len(lines), lines
    assert lines[0].startswith("tokentrail: error: "), lines
    return lines[0]


@pytest.fixture
def ledger(write_records: Callable[..., list[Record]], ledger_root: Path) -> list[Record]:
    """30 records in several segments, sealed every ten."""
    return write_records(30, seal_every=10, max_segment_bytes=8192)


def verify_args(root: Path, signer: Signer, tmp_path: Path) -> list[Any]:
    return [
        "verify",
        "--ledger",
        root,
        "--public-key",
        signer.verifier.to_text(),
        "--state",
        tmp_path / "state",
    ]


# --------------------------------------------------------------------------------------------


class TestKeygen:
    def test_writes_private_key_and_prints_verifier(self, isolated_home: Path) -> None:
        """keygen writes a 0600 key under TOKENTRAIL_HOME and prints its verifier key."""
        result = run("keygen", "--name", "acme-prod-audit")
        assert 0 == result.exit_code, result.output
        key_path = isolated_home / "signing.key"
        assert 0o600 == stat.S_IMODE(key_path.stat().st_mode)
        signer = Signer.load(key_path)
        printed = result.stdout.strip()
        assert [signer.verifier.to_text()] == result.stdout.splitlines()
        assert "acme-prod-audit" == Verifier.from_text(printed).name
        assert printed == (isolated_home / "verifier.pub").read_text().strip()
        assert str(key_path) in result.stderr

    def test_serve_signs_with_the_keygen_key(self, isolated_home: Path) -> None:
        """Without --key, serve uses the key keygen wrote: TOKENTRAIL_HOME is honoured by both."""
        assert isolated_home / "signing.key" == ProxyConfig().key_path

    def test_proposes_a_name(self, tmp_path: Path) -> None:
        """Without --name the key gets a proposed deployment-unique name."""
        first = run("keygen", "--out", tmp_path / "a" / "k.key")
        second = run("keygen", "--out", tmp_path / "b" / "k.key")
        names = [Verifier.from_text(r.stdout).name for r in (first, second)]
        assert all(n.startswith("tokentrail-") for n in names)
        assert names[0] != names[1]

    def test_out(self, tmp_path: Path) -> None:
        """--out puts the key (0600) and verifier.pub where asked."""
        out = tmp_path / "keys" / "deploy.key"
        result = run("keygen", "--name", "k", "--out", out)
        assert 0 == result.exit_code
        assert 0o600 == stat.S_IMODE(out.stat().st_mode)
        assert result.stdout.strip() == (out.parent / "verifier.pub").read_text().strip()

    def test_refuses_to_overwrite(self, isolated_home: Path) -> None:
        """A second keygen fails with one error line and keeps the first key."""
        run("keygen", "--name", "first")
        before = (isolated_home / "signing.key").read_bytes()
        line = assert_one_error_line(run("keygen", "--name", "second"))
        assert "already exists" in line
        assert before == (isolated_home / "signing.key").read_bytes()

    def test_file_in_the_way(self, tmp_path: Path) -> None:
        """--out under a path whose parent is a file: says a file is in the way, not that the
        key already exists."""
        (tmp_path / "plain").write_text("x")
        line = assert_one_error_line(run("keygen", "--out", tmp_path / "plain" / "k.key"))
        assert line.endswith(f"cannot write signing key {tmp_path / 'plain' / 'k.key'}: a file"
                             " is in the way")  # fmt: skip

    def test_verifier_key_given_as_signing_key(self, tmp_path: Path) -> None:
        """A verifier key passed where the signing key goes is named as such, whatever its
        mode (verifier.pub is rightly world-readable; "chmod 600" would be the wrong advice)."""
        out = tmp_path / "keys" / "signing.key"
        run("keygen", "--name", "k", "--out", out)
        pub = out.parent / "verifier.pub"
        pub.chmod(0o644)
        result = run("export", "--ledger", tmp_path, "--public-key", pub, "--user", "u",
                     "--key", pub, "--out", tmp_path / "pkg")  # fmt: skip
        line = assert_one_error_line(result)
        assert line.endswith(f"{pub} is not a tokentrail signing key (it holds a verifier key)")

    @pytest.mark.parametrize("name", ["has space", "a+b", "a/b"])
    def test_bad_name(self, name: str) -> None:
        """A key name signed notes cannot carry is one error line."""
        assert_one_error_line(run("keygen", "--name", name))


class TestVerify:
    def test_clean_ledger(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """A clean ledger exits 0 with exactly one summary line, which ends with when the run
        was (a cron log that every run appends to shows which day each verdict is for)."""
        before = datetime.now(UTC).replace(microsecond=0)
        result = run(*verify_args(ledger_root, signer, tmp_path))
        assert 0 == result.exit_code, result.output
        (line,) = result.stdout.splitlines()
        assert line.startswith(f"tokentrail verify OK: {ledger_root}: 1 logs, 30 records read")
        stamp = re.fullmatch(r".*, checked (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", line)
        assert stamp is not None, line
        checked = datetime.strptime(stamp[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert before <= checked <= datetime.now(UTC)

    def test_default_keys_from_keygen(
        self,
        isolated_home: Path,
        write_records: Callable[..., list[Record]],
        ledger_root: Path,
        tmp_path: Path,
    ) -> None:
        """Without --public-key, verify uses the verifier.pub keygen wrote."""
        run("keygen", "--name", "deploy")
        signer = Signer.load(isolated_home / "signing.key")
        write_records(5, key=signer)
        result = run("verify", "--ledger", ledger_root, "--state", tmp_path / "s")
        assert 0 == result.exit_code, result.output

    def test_key_file(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """--public-key accepts a file of verifier keys, comments and other keys included."""
        keys = tmp_path / "keys.pub"
        other = Signer.generate("old-key").verifier.to_text()
        keys.write_text(f"# rotated keys\n{other}\n\n{signer.verifier.to_text()}\n")
        result = run("verify", "--ledger", ledger_root, "--public-key", keys, "--state", tmp_path)
        assert 0 == result.exit_code, result.output

    def test_findings_output(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """A violation exits 1: a line naming log/seq/event/file, then the summary line, last
        (SPEC section 4: what `tail -1` of a cron log reads)."""
        target = ledger[15]
        (path,) = [
            p
            for p in (ledger_root / "logs" / LOG_ID / "segments").glob("*/*.jsonl")
            if target.leaf in p.read_bytes()
        ]
        edited = target.leaf.replace(b"prompt number 15:", b"prompt number 16:")
        path.write_bytes(path.read_bytes().replace(target.leaf, edited))
        result = run(*verify_args(ledger_root, signer, tmp_path))
        assert 1 == result.exit_code, result.output
        *rest, summary = result.stdout.splitlines()
        assert summary.startswith("tokentrail verify FAIL: ")
        matches = [m.groupdict() for line in rest if (m := FINDING_RE.match(line))]
        assert {"log": LOG_ID, "seq": "15", "event": target.event_id, "file": str(path)} in matches
        assert all(line.startswith(("FINDING", "WARNING")) for line in rest), rest

    def test_json(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """--json prints one JSON object with the verdict, per-log counts and findings."""
        result = run(*verify_args(ledger_root, signer, tmp_path), "--json")
        assert 0 == result.exit_code
        obj = json.loads(result.stdout)
        assert (True, [], []) == (obj["ok"], obj["findings"], obj["warnings"])
        assert [(LOG_ID, 30)] == [(lg["log_id"], lg["records_read"]) for lg in obj["logs"]]

    def test_json_findings(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """--json on a violation exits 1 and lists findings with log, seq, event id and file."""
        cp = ledger_root / "logs" / LOG_ID / "checkpoints" / f"{20:020d}.checkpoint"
        cp.write_bytes(Signer.generate("attacker").sign_note(cp.read_bytes().split(b"\n\n")[0]))
        result = run(*verify_args(ledger_root, signer, tmp_path), "--json")
        assert 1 == result.exit_code
        obj = json.loads(result.stdout)
        assert obj["ok"] is False
        assert [(LOG_ID, str(cp))] == [(f["log_id"], f["location"]) for f in obj["findings"]]

    def test_wrong_but_valid_key(
        self, ledger: list[Record], ledger_root: Path, tmp_path: Path
    ) -> None:
        """A valid verifier key that signed nothing here fails every checkpoint (exit 1)."""
        other = Signer.generate("someone-else")
        result = run(*verify_args(ledger_root, other, tmp_path))
        assert 1 == result.exit_code, result.output
        assert 3 == sum(line.startswith("FINDING") for line in result.stdout.splitlines())

    @pytest.mark.parametrize("extra", [["--days", "1"], ["--since", "2000-01-01"], ["--all"]])
    def test_ranges(
        self,
        extra: list[str],
        ledger: list[Record],
        ledger_root: Path,
        signer: Signer,
        tmp_path: Path,
    ) -> None:
        """Range options run on a clean ledger and exit 0."""
        until = ["--until", datetime.now(UTC).strftime("%Y-%m-%dT23:59:59Z")]
        result = run(*verify_args(ledger_root, signer, tmp_path), *extra, *until)
        assert 0 == result.exit_code, result.output

    def test_rollback_across_runs(
        self,
        write_records: Callable[..., list[Record]],
        ledger_root: Path,
        signer: Signer,
        tmp_path: Path,
    ) -> None:
        """The second run with the same --state catches a ledger put back to an older copy."""
        import shutil

        write_records(10)
        shutil.copytree(ledger_root, tmp_path / "old")
        write_records(10, start=10)
        assert 0 == run(*verify_args(ledger_root, signer, tmp_path)).exit_code
        shutil.rmtree(ledger_root)
        shutil.copytree(tmp_path / "old", ledger_root)
        result = run(*verify_args(ledger_root, signer, tmp_path))
        assert 1 == result.exit_code, result.output
        assert "rollback" in result.stdout


class TestBadInput:
    @pytest.fixture
    def key(self, signer: Signer) -> str:
        return signer.verifier.to_text()

    @pytest.mark.parametrize(
        "layout",
        [
            {},
            {"notes.txt": b"hello", "data.bin": b"\x00\xff" * 100},
            {"logs": b"a file where a folder should be"},
            {"logs/readme.txt": b"hi", "segments/x.jsonl": b"{}\n"},
            {"logs/Not A Log/x": b"junk"},
        ],
        ids=["empty", "junk-files", "logs-is-a-file", "logs-holds-files", "bad-log-folder"],
    )
    def test_not_a_ledger(self, layout: dict[str, bytes], key: str, tmp_path: Path) -> None:
        """A directory that is not a ledger is one error line and exit 2."""
        root = tmp_path / "store"
        root.mkdir()
        for name, data in layout.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        assert_one_error_line(run("verify", "--ledger", root, "--public-key", key))

    def test_log_folder_of_junk(self, key: str, tmp_path: Path) -> None:
        """A log folder holding nothing but junk is not reported as a valid ledger."""
        junk = tmp_path / "store" / "logs" / "foo"
        junk.mkdir(parents=True)
        (junk / "x.txt").write_text("hello")
        (junk / "y.bin").write_bytes(os.urandom(64))
        result = run("verify", "--ledger", tmp_path / "store", "--public-key", key)
        assert_one_error_line(result)

    def test_missing_directory(self, key: str, tmp_path: Path) -> None:
        """A ledger directory that does not exist is one error line naming it."""
        line = assert_one_error_line(
            run("verify", "--ledger", tmp_path / "nope", "--public-key", key)
        )
        assert str(tmp_path / "nope") in line

    @pytest.mark.parametrize(
        "content",
        [b"garbage\n", b"", b"\xff\xfe\x00\x01", b"name+zzzz+AAAA\n", b"# only a comment\n"],
        ids=["text", "empty", "binary", "malformed-key", "comment-only"],
    )
    def test_garbage_key_file(
        self, content: bytes, ledger: list[Record], ledger_root: Path, tmp_path: Path
    ) -> None:
        """A key file that holds no verifier key is one error line and exit 2."""
        key_file = tmp_path / "verifier.pub"
        key_file.write_bytes(content)
        assert_one_error_line(run("verify", "--ledger", ledger_root, "--public-key", key_file))

    def test_garbage_key_file_is_named(
        self, ledger: list[Record], ledger_root: Path, tmp_path: Path
    ) -> None:
        """The error for a key file holding a malformed key names that file."""
        key_file = tmp_path / "verifier.pub"
        key_file.write_text("garbage\n")
        line = assert_one_error_line(
            run("verify", "--ledger", ledger_root, "--public-key", key_file)
        )
        assert str(key_file) in line

    def test_private_key_as_public(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """A private key passed as --public-key is refused, saying so, without echoing it."""
        key_file = tmp_path / "signing.key"
        signer.save(key_file)
        line = assert_one_error_line(
            run("verify", "--ledger", ledger_root, "--public-key", key_file)
        )
        assert "private" in line
        assert signer.to_text() not in line

    @pytest.mark.parametrize(
        "spec", ["no-such-file.pub", "test-key+00000000+AAAA", "a+b+c+d"], ids=str
    )
    def test_bad_key_spec(self, spec: str, ledger: list[Record], ledger_root: Path) -> None:
        """A missing key file or a malformed inline key is one error line."""
        assert_one_error_line(run("verify", "--ledger", ledger_root, "--public-key", spec))

    def test_no_key_at_all(self, ledger: list[Record], ledger_root: Path) -> None:
        """With no --public-key and no keygen verifier.pub, verify says how to give one."""
        line = assert_one_error_line(run("verify", "--ledger", ledger_root))
        assert "--public-key" in line

    @pytest.mark.parametrize(
        "args",
        [
            ["--days", "-1"],
            ["--days", "abc"],
            ["--days", "0"],
            ["--days", ""],
            ["--since", "yesterday"],
            ["--until", "2024-13-45"],
            ["--days", "1", "--since", "2024-01-01"],
            ["--seal-grace", "-5"],
            ["--no-such-option"],
        ],
        ids=str,
    )
    def test_bad_options(
        self, args: list[str], ledger: list[Record], ledger_root: Path, key: str
    ) -> None:
        """Bad option values are one error line and exit 2."""
        assert_one_error_line(run("verify", "--ledger", ledger_root, "--public-key", key, *args))

    @pytest.mark.parametrize(
        "args",
        [["count", "--date", "yesterday"], ["count", "--date", "2024-02-30"], ["nope"]],
        ids=str,
    )
    def test_other_commands(self, args: list[str], ledger: list[Record], ledger_root: Path) -> None:
        """Bad input to other commands is one error line and exit 2 as well."""
        assert_one_error_line(run(*args, "--ledger", ledger_root))


class TestCount:
    def test_today(self, ledger: list[Record], ledger_root: Path) -> None:
        """count prints the number of records appended today (the seed's check)."""
        result = run("count", "--ledger", ledger_root, "--date", "today", "--min", "1")
        assert (0, "30\n") == (result.exit_code, result.stdout)
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        assert "30\n" == run("count", "--ledger", ledger_root, "--date", day).stdout

    def test_compressed(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """Compressed segments count the same."""
        write_records(12, max_segment_bytes=4096, compress_sealed=True)
        assert "12\n" == run("count", "--ledger", ledger_root).stdout

    def test_other_day(self, ledger: list[Record], ledger_root: Path) -> None:
        """A day with no records counts 0, and --min 1 then exits 1, saying why on stderr."""
        result = run("count", "--ledger", ledger_root, "--date", "2001-01-01", "--min", "1")
        assert (1, "0\n") == (result.exit_code, result.stdout)
        assert "tokentrail: 0 records on 2001-01-01, fewer than --min 1\n" == result.stderr

    def test_several_logs(
        self, write_records: Callable[..., list[Record]], ledger_root: Path
    ) -> None:
        """count adds up every log of the store."""
        write_records(4)
        write_records(6, log_id="second-log")
        assert "10\n" == run("count", "--ledger", ledger_root).stdout

    def test_missing_ledger(self, tmp_path: Path) -> None:
        """count on a missing ledger is one error line."""
        assert_one_error_line(run("count", "--ledger", tmp_path / "nope"))


class TestProve:
    @pytest.fixture
    def bundle(self, ledger: list[Record], ledger_root: Path, tmp_path: Path) -> Path:
        out = tmp_path / "proof.json"
        result = run("prove", "--ledger", ledger_root, ledger[13].event_id, "--out", out)
        assert 0 == result.exit_code, result.output
        return out

    @pytest.mark.parametrize("junk", ['{"event_id":"%s", broken', '{"event_id":"%s"}'])
    def test_a_damaged_line_naming_the_event_first(
        self, junk: str, ledger: list[Record], ledger_root: Path, tmp_path: Path
    ) -> None:
        """A line that is no record but holds the event id, in a log read before the record's:
        prove passes over it and proves the record (it crashed, or named a wrong seq)."""
        event_id = ledger[13].event_id
        stray = ledger_root / "logs" / "a-first" / "segments" / "2020-01-01"
        stray.mkdir(parents=True)
        (stray / f"{0:020d}.jsonl").write_text(junk % event_id + "\n")
        out = tmp_path / "proof.json"
        result = run("prove", "--ledger", ledger_root, event_id, "--out", out)
        assert 0 == result.exit_code, result.output
        assert 13 == json.loads(out.read_text())["index"]

    def test_unwritable_out(self, ledger: list[Record], ledger_root: Path, tmp_path: Path) -> None:
        """--out in a folder that does not exist: one error line, not a traceback."""
        out = tmp_path / "no" / "such" / "proof.json"
        line = assert_one_error_line(
            run("prove", "--ledger", ledger_root, ledger[13].event_id, "--out", out)
        )
        assert f"cannot write {out}" in line

    def test_round_trip(
        self, bundle: Path, ledger: list[Record], signer: Signer, tmp_path: Path
    ) -> None:
        """prove then verify-proof with only the verifier key: exit 0 naming the record."""
        result = run("verify-proof", bundle, "--public-key", signer.verifier.to_text())
        assert 0 == result.exit_code, result.output
        assert result.stdout.startswith(f"OK: record {ledger[13].event_id} is seq 13 of log")
        obj = json.loads(bundle.read_text())
        assert (13, 30, ledger[13].leaf.decode()) == (obj["index"], obj["tree_size"], obj["record"])

    @pytest.mark.parametrize("seq", [0, 9, 10, 29])
    @pytest.mark.parametrize("size", [None, 10, 20, 30])
    def test_every_checkpoint(
        self,
        seq: int,
        size: int | None,
        ledger: list[Record],
        ledger_root: Path,
        signer: Signer,
    ) -> None:
        """A record proves against the newest or any given checkpoint that covers it."""
        extra = [] if size is None else ["--tree-size", size]
        result = run("prove", "--ledger", ledger_root, ledger[seq].event_id, *extra)
        if size is not None and seq >= size:
            assert_one_error_line(result)
            return
        assert 0 == result.exit_code, result.output
        obj = json.loads(result.stdout)
        assert (size or 30) == obj["tree_size"]
        path = ledger_root.parent / "p.json"
        path.write_text(result.stdout)
        checked = run("verify-proof", path, "--public-key", signer.verifier.to_text())
        assert 0 == checked.exit_code, checked.output

    def test_unknown_event(self, ledger: list[Record], ledger_root: Path) -> None:
        """Proving an event id the ledger lacks is one error line."""
        assert_one_error_line(run("prove", "--ledger", ledger_root, "no-such-event"))

    def test_unsealed_record(
        self, ledger_root: Path, signer: Signer, make_exchange: Callable[..., Exchange]
    ) -> None:
        """A record no checkpoint covers yet cannot be proven: one error line saying so."""
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as writer:
            record = writer.append(make_exchange(0))
            line = assert_one_error_line(run("prove", "--ledger", ledger_root, record.event_id))
        assert "not covered by a checkpoint" in line

    @pytest.mark.parametrize("which", ["proven", "other"])
    def test_tampered_ledger(
        self, which: str, ledger: list[Record], ledger_root: Path, tmp_path: Path
    ) -> None:
        """A ledger edited after sealing gives no bundle: exit 1 and one line saying why,
        whether the edit is to the record being proven or to another under the checkpoint."""
        target = ledger[13 if which == "proven" else 5]
        (path,) = [
            p
            for p in (ledger_root / "logs" / LOG_ID / "segments").glob("*/*.jsonl")
            if target.leaf in p.read_bytes()
        ]
        edited = target.leaf.replace(b"prompt number", b"prompt NUMBER")
        path.write_bytes(path.read_bytes().replace(target.leaf, edited))
        out = tmp_path / "proof.json"
        result = run("prove", "--ledger", ledger_root, ledger[13].event_id, "--out", out)
        assert (1, "") == (result.exit_code, result.stdout), result.output
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"tokentrail: error: cannot prove {ledger[13].event_id}: ")
        assert ("fails its own hashes" if which == "proven" else "changed after sealing") in line
        assert not out.exists()

    def test_tree_size_not_a_checkpoint(self, ledger: list[Record], ledger_root: Path) -> None:
        """--tree-size naming no checkpoint says so (and which sizes there are), not "yet"."""
        line = assert_one_error_line(
            run("prove", "--ledger", ledger_root, ledger[3].event_id, "--tree-size", 15)
        )
        assert "has no checkpoint of size 15 (newest sizes: 10, 20, 30)" in line
        line = assert_one_error_line(
            run("prove", "--ledger", ledger_root, ledger[13].event_id, "--tree-size", 10)
        )
        assert "is not covered by the checkpoint of size 10" in line

    @pytest.mark.parametrize(
        "edit",
        [
            "record-user-id",
            "record-model",
            "record-not-json",
            "record-not-object",
            "index",
            "index-as-text",
            "index-as-float",
            "tree-size",
            "tree-size-as-text",
            "proof-hash",
            "proof-dropped",
            "proof-not-base64",
            "checkpoint-root",
            "checkpoint-other-key",
            "format",
            "missing-field",
            "log-id",
            "log-id-not-text",
        ],
    )
    def test_edited_bundle(self, edit: str, bundle: Path, signer: Signer) -> None:
        """An edited bundle fails verify-proof with exit 1 and one INVALID line, no traceback."""
        obj = json.loads(bundle.read_text())
        if edit == "record-user-id":
            obj["record"] = obj["record"].replace('"user_id":"user-3"', '"user_id":"user-4"')
        elif edit == "record-model":
            obj["record"] = obj["record"].replace('"model":"llama3.2:1b"', '"model":"llama3.2:3b"')
        elif edit == "record-not-json":
            obj["record"] = obj["record"][:-1]
        elif edit == "record-not-object":
            obj["record"] = "[1, 2, 3]"
        elif edit == "index":
            obj["index"] = 12
        elif edit == "index-as-text":
            obj["index"] = str(obj["index"])
        elif edit == "index-as-float":
            obj["index"] = obj["index"] + 0.9
        elif edit == "tree-size":
            obj["tree_size"] = 20
        elif edit == "tree-size-as-text":
            obj["tree_size"] = f" {obj['tree_size']} "
        elif edit == "proof-hash":
            obj["proof"][0] = obj["proof"][1]
        elif edit == "proof-dropped":
            obj["proof"].pop()
        elif edit == "proof-not-base64":
            obj["proof"][0] = "not base64!"
        elif edit == "checkpoint-root":
            lines = obj["checkpoint"].split("\n")
            lines[2] = ("A" if lines[2][0] != "A" else "B") + lines[2][1:]
            obj["checkpoint"] = "\n".join(lines)
        elif edit == "checkpoint-other-key":
            body = obj["checkpoint"].split("\n\n")[0] + "\n"
            obj["checkpoint"] = Signer.generate("test-key").sign_note(body.encode()).decode()
        elif edit == "format":
            obj["format"] = "something-else/v1"
        elif edit == "log-id":  # the bundle names another log than its record and checkpoint
            obj["log_id"] = obj["log_id"] + "-other"
        elif edit == "log-id-not-text":
            obj["log_id"] = ["proxy"]
        else:
            del obj["proof"]
        assert json.loads(bundle.read_text()) != obj
        bundle.write_text(json.dumps(obj))
        result = run("verify-proof", bundle, "--public-key", signer.verifier.to_text())
        assert 1 == result.exit_code, (result.output, result.exc_info)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        (line,) = result.stdout.splitlines()
        assert line.startswith(f"INVALID: {bundle}: ")
        assert "Error(" not in line  # what is wrong, in words, not a Python exception's repr
        if edit == "missing-field":
            assert line.endswith("malformed proof bundle: no 'proof' member")

    def test_bundle_from_stdin(self, bundle: Path, signer: Signer) -> None:
        """``-`` reads the bundle from stdin, so prove can pipe into verify-proof."""
        result = CliRunner().invoke(
            main, ["verify-proof", "-", "--public-key", signer.verifier.to_text()],
            input=bundle.read_bytes(),
        )  # fmt: skip
        assert 0 == result.exit_code, result.output
        assert result.stdout.startswith("OK: record ")

    @pytest.mark.parametrize(
        "content",
        [b"not json", b"", b"[1, 2]", b'"a string"'],
        ids=["text", "empty", "list", "str"],
    )
    def test_bundle_not_a_bundle(self, content: bytes, signer: Signer, tmp_path: Path) -> None:
        """A file that is not a proof bundle fails without a traceback (exit 1 or 2)."""
        path = tmp_path / "proof.json"
        path.write_bytes(content)
        result = run("verify-proof", path, "--public-key", signer.verifier.to_text())
        assert result.exit_code in (1, 2), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info

    def test_missing_bundle(self, signer: Signer, tmp_path: Path) -> None:
        """A bundle file that does not exist is one error line."""
        result = run("verify-proof", tmp_path / "nope.json", "--public-key", "x")
        assert_one_error_line(result)


class TestSubprocess:
    def python_m(
        self, *args: Any, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokentrail", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    def test_verify_and_error(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """``python -m tokentrail verify``: 0 on a ledger, 2 and one error line on bad input."""
        key = signer.verifier.to_text()
        ok = self.python_m(
            "verify", "--ledger", ledger_root, "--public-key", key, "--state", tmp_path / "s"
        )
        assert (0, "") == (ok.returncode, ok.stderr), ok.stderr
        assert ok.stdout.startswith("tokentrail verify OK: ")
        bad = self.python_m("verify", "--ledger", tmp_path / "nope", "--public-key", key)
        assert (2, "") == (bad.returncode, bad.stdout)
        (line,) = bad.stderr.splitlines()
        assert line.startswith("tokentrail: error: ")
        days = self.python_m(
            "verify", "--ledger", ledger_root, "--public-key", key, "--days", "abc"
        )
        assert 2 == days.returncode
        assert 1 == len(days.stderr.splitlines()) and "Traceback" not in days.stderr

    @pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
    def test_output_that_cannot_be_written(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """A full disk under the cron log: exit 2 (could not run) and one error line, never a
        traceback and exit 1 (which says the ledger failed its check)."""
        key = signer.verifier.to_text()
        for args in (["verify", "--ledger", ledger_root, "--public-key", key, "--state",
                      tmp_path / "s"], ["count", "--ledger", ledger_root]):  # fmt: skip
            with open("/dev/full", "w") as full:
                done = subprocess.run(
                    [sys.executable, "-m", "tokentrail", *map(str, args)],
                    stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                )  # fmt: skip
            assert (2, ["tokentrail: error: cannot write the output: No space left on device"]) \
                == (done.returncode, done.stderr.splitlines())  # fmt: skip

    @pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
    def test_output_and_errors_that_cannot_be_written(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """The cron line's ``>> log 2>&1`` on a full disk: stdout and stderr both unwritable.
        The run could not tell its result, so exit 2, never 1 (a failed check): it was 1, the
        error line's own write raising out of the error handler."""
        key = signer.verifier.to_text()
        state = ["--state", tmp_path / "s"]
        cases = [
            ["verify", "--ledger", ledger_root, "--public-key", key, *state],
            ["verify", "--ledger", ledger_root, "--public-key", key, "--json", *state],
            ["verify", "--ledger", tmp_path / "nope", "--public-key", key, *state],
            ["verify", "--ledger", tmp_path / "nope", "--public-key", key, "--json", *state],
            ["count", "--ledger", ledger_root],
            ["count", "--ledger", tmp_path / "nope"],
        ]
        for args in cases:
            with open("/dev/full", "w") as full:
                done = subprocess.run(
                    [sys.executable, "-m", "tokentrail", *map(str, args)],
                    stdout=full, stderr=full, timeout=60,
                )  # fmt: skip
            assert 2 == done.returncode, args

    def test_demo(self, tmp_path: Path) -> None:
        """The README's main job: exits 0 with its summary on stdout (progress goes to stderr,
        so stdout redirected to a file holds no bar), and leaves a ledger that verifies."""
        demo = self.python_m("demo", "--dir", tmp_path / "d", "--exchanges", "10")
        assert 0 == demo.returncode, demo.stderr
        assert "verify: VALID tokentrail verify OK" in demo.stdout
        assert demo.stdout.startswith(  # whole lines into a file, not broken at 80 columns
            "10 exchanges through the proxy (official ollama and openai clients), 10 records in"
            " the ledger\n"
        )
        assert "sealed; verifying" not in demo.stdout and "10/10" not in demo.stdout  # the bar
        pub = tmp_path / "d" / "keys" / "verifier.pub"
        again = self.python_m("verify", "--ledger", tmp_path / "d" / "ledger", "--public-key",
                              pub, "--all", "--state", tmp_path / "s")  # fmt: skip
        assert 0 == again.returncode, again.stdout
        assert ", 10 records read" in again.stdout

    def test_sigterm_leaves_a_line(self, ledger: list[Record], ledger_root: Path) -> None:
        """SIGTERM (a cron timeout, a shutdown) mid-command leaves one line in the log and
        exit 143, as Ctrl-C leaves "interrupted", rather than ending it without a word."""
        code = (
            "import os, signal, sys\n"
            "import tokentrail._cli as cli\n"
            "real = cli.list_logs\n"
            "def listing(root):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(root)\n"
            "cli.list_logs = listing\n"
            "sys.argv = ['tokentrail', 'count', '--ledger', sys.argv[1]]\n"
            "cli.main()\n"
        )
        done = subprocess.run([sys.executable, "-c", code, str(ledger_root)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (143, "") == (done.returncode, done.stdout)
        assert ["tokentrail: error: terminated (SIGTERM): the run did not finish"] == (
            done.stderr.splitlines()
        )

    def test_sigterm_after_the_verdict(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path
    ) -> None:
        """A SIGTERM once verify has finished (its state saved) and prints its verdict: the
        verdict stands, exit 0 with the summary line last. It was exit 143 and a "terminated"
        line after an OK summary, the log's last line contradicting the exit status."""
        code = (
            "import os, signal, sys\n"
            "import click\n"
            "real = click.echo\n"
            "def echo(message=None, *args, **kwargs):\n"
            "    if str(message).startswith('tokentrail verify '):  # the verdict\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(message, *args, **kwargs)\n"
            "click.echo = echo\n"
            "from tokentrail._main import run\n"
            "sys.argv = ['tokentrail', *sys.argv[1:]]\n"
            "run()\n"
        )
        args = ["verify", "--ledger", ledger_root, "--public-key", signer.verifier.to_text(),
                "--state", tmp_path / "s"]  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (0, "") == (done.returncode, done.stderr), done.stderr
        assert done.stdout.splitlines()[-1].startswith("tokentrail verify OK: ")

    @pytest.mark.parametrize(
        ("interrupt", "status", "line"),
        [
            ("raise KeyboardInterrupt", 130, "interrupted"),
            ("os.kill(os.getpid(), signal.SIGTERM)", 143, "terminated (SIGTERM): the run did not"
             " finish"),
        ],
        ids=["ctrl-c", "sigterm"],
    )  # fmt: skip
    def test_interrupted_while_loading(self, interrupt: str, status: int, line: str) -> None:
        """A Ctrl-C or a SIGTERM while the command is still importing (aiohttp, boto3: most of
        a second) is one line and its exit status, as later, not a traceback (Ctrl-C) nor an
        end without a word (SIGTERM, before its handler was set up). Raised or sent by an
        import hook at the import of the command group, where a real one lands."""
        code = (
            "import os, runpy, signal, sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'tokentrail._cli':\n"
            f"            {interrupt}\n"
            "sys.meta_path.insert(0, Hook())\n"
            "sys.argv = ['tokentrail', '--version']\n"
            "runpy.run_module('tokentrail', run_name='__main__')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert (status, "", f"tokentrail: error: {line}\n") == (
            out.returncode,
            out.stdout,
            out.stderr,
        )


VERIFIER = Signer.generate("k").verifier.to_text()


@pytest.mark.parametrize("env", ["TOKENTRAIL_S3_ENDPOINT_URL", "TOKENTRAIL_S3_ENDPOINT"])
@pytest.mark.parametrize(
    "command",
    [
        ["verify", "--s3", "s3://bucket/p", "--public-key", VERIFIER],
        ["count", "--s3", "s3://bucket/p"],
        ["prove", "00000000-0000-4000-8000-000000000000", "--s3", "s3://bucket/p"],
        ["s3", "check", "--bucket", "bucket"],
    ],
    ids=lambda c: c[0] if isinstance(c, list) else c,
)
def test_every_s3_command_reads_one_endpoint_variable(
    command: list[str], env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TOKENTRAIL_S3_ENDPOINT_URL`` (or the older ``..._ENDPOINT``) reaches every S3 command."""
    monkeypatch.setenv(env, "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = CliRunner().invoke(main, command)
    assert "127.0.0.1:9" in result.output, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["cost", "--rps", "nan"],
        ["cost", "--rps", "inf"],
        ["verify", "--ledger", ".", "--public-key", "x", "--seal-grace", "nan"],
        ["sim", "--ttft-ms", "nan"],
        ["serve", "--upstream-timeout", "inf"],
    ],
    ids=" ".join,
)
def test_numbers_must_be_finite(args: list[str]) -> None:
    """``nan`` and ``inf`` pass click's range bounds; every numeric option refuses them."""
    line = assert_one_error_line(run(*args))
    assert "is not a finite number" in line


# --------------------------------------------------------------------------------------------
# The deployment files: every command line and variable they use exists.
# --------------------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _deploy_command_lines() -> list[tuple[str, list[str], dict[str, str]]]:
    """(file, tokentrail arguments, TOKENTRAIL_* environment) of each command in deploy/."""
    out = []
    for path in sorted(DEPLOY.iterdir()):
        env: dict[str, str] = {}
        for line in path.read_text().splitlines():
            if line.startswith("Environment=TOKENTRAIL_"):
                name, _, value = line.removeprefix("Environment=").partition("=")
                env[name] = value
            elif line.startswith("ExecStart="):
                out.append((path.name, shlex.split(line.partition("=")[2])[1:], env))
            elif re.match(r"^[0-9*]", line):  # a cron line: 5 time fields, a user, the command
                words = shlex.split(line.split(">>")[0])
                assert words[6].endswith("tokentrail"), line
                out.append((path.name, words[7:], env))
    return out


@pytest.mark.parametrize(
    ("name", "args", "env"),
    _deploy_command_lines(),
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_deploy_command_lines_exist(name: str, args: list[str], env: dict[str, str]) -> None:
    """A misspelt option or variable in a unit or cron file would fail only at 6 a.m.: every
    option parses (with --help, so nothing runs), and every TOKENTRAIL_* variable the file sets
    is one its command reads."""
    command = main.commands[args[0]]
    known = {
        name
        for p in command.params
        if isinstance(p, click.Option) and p.envvar
        for name in ([p.envvar] if isinstance(p.envvar, str) else p.envvar)
    }
    assert set(env) <= known, f"{name}: {sorted(set(env) - known)} not read by {args[0]}"
    result = CliRunner().invoke(main, [*args, "--help"])
    assert 0 == result.exit_code, f"{name}: {result.output}"


def test_every_serve_option_reads_its_own_variable() -> None:
    """The README: "every option of serve also reads a TOKENTRAIL_* environment variable".
    Each reads ``TOKENTRAIL_<OPTION>`` (``--verify-state`` read only TOKENTRAIL_STATE, so
    TOKENTRAIL_VERIFY_STATE was silently ignored), and ``--help`` names it."""
    command = main.commands["serve"]
    help_text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    for p in command.params:
        if not isinstance(p, click.Option) or p.name == "help":
            continue
        names = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or [])
        own = "TOKENTRAIL_" + p.opts[0].lstrip("-").replace("-", "_").upper()
        assert own in names, (p.opts, names)
        assert re.search(f"env var: {', '.join(names)}[];]", help_text), p.opts


def test_the_readme_cron_line_is_the_help_one_and_parses() -> None:
    """The README's cron line is ``tokentrail --help``'s, one line (crontab has no
    continuation lines: --help split it with a backslash), pins the verifier key, and its
    options parse."""
    from tokentrail._cli import DAILY_CHECK

    readme = (DEPLOY.parent / "README.md").read_text()
    block = re.search(r"```cron\n(.*?)\n```", readme, re.S)
    assert block is not None and [DAILY_CHECK] == block.group(1).splitlines()
    assert DAILY_CHECK in CliRunner().invoke(main, ["--help"]).output
    words = shlex.split(DAILY_CHECK.split(">>")[0])[5:]
    assert ["tokentrail", "verify"] == words[:2] and "--public-key" in words
    assert 0 == CliRunner().invoke(main, [*words[1:], "--help"]).exit_code


def test_deploy_examples_say_what_they_do() -> None:
    """The API keys example loads as its comments say (a key, and one by its digest), and
    logrotate recreates each cron log with the owner its cron line writes as (root's, by
    default, would leave the verifier unable to open its log)."""
    from tokentrail._proxy._config import key_digest, load_api_keys

    table = load_api_keys(DEPLOY / "api-keys.example.toml")
    assert {
        key_digest("sk-example-alice-0000000000000000"): "alice",
        key_digest("sk-example-bob-1111111111111111"): "bob",
    } == table
    cron = [
        line.split()
        for line in (DEPLOY / "tokentrail-verify.cron").read_text().splitlines()
        if re.match(r"^[0-9*]", line)
    ]
    writers = {words[-2]: words[5] for words in cron}  # log file -> cron user
    rotate = (DEPLOY / "tokentrail.logrotate").read_text()
    created = dict(re.findall(r"^(/\S+) \{[^}]*?create 0640 (\S+) adm", rotate, re.M | re.S))
    assert writers == created


def test_deploy_files_are_all_checked() -> None:
    """The proxy's unit, the verifier's unit and both cron lines are among those checked."""
    seen = [(name, args[0]) for name, args, _ in _deploy_command_lines()]
    assert [
        ("tokentrail-proxy.service", "serve"),
        ("tokentrail-verify.cron", "verify"),
        ("tokentrail-verify.cron", "index"),
        ("tokentrail-verify.service", "verify"),
    ] == seen


# --------------------------------------------------------------------------------------------
# What an outside audit of the CLI found (hostile but ordinary input): each one error line, or
# the right answer, never a traceback or a wrong one.
# --------------------------------------------------------------------------------------------


class TestHostileInput:
    @pytest.mark.parametrize(
        "extra",
        [
            ["--since", "0001-01-01"],
            ["--since", "0001-01-01T00:00:00+01:00"],
            ["--days", "1000000"],
            ["--days", "99999999999"],
            ["--until", "9999-12-31T23:59:59-01:00"],
        ],
        ids=" ".join,
    )
    def test_verify_bounds_beyond_the_era(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path,
        extra: list[str],
    ) -> None:  # fmt: skip
        """A bound before 1970 or after 9998 means "everything": the ledger verifies."""
        result = run(*verify_args(ledger_root, signer, tmp_path), *extra)
        assert 0 == result.exit_code, result.output
        assert "30 records read" in result.stdout

    @pytest.mark.parametrize(
        "extra",
        [
            ["--since", "2030-01-01", "--until", "2020-01-01"],
            ["--days", "1", "--until", "2020-01-01"],
        ],
        ids=" ".join,
    )
    def test_verify_refuses_an_empty_range(
        self, ledger: list[Record], ledger_root: Path, signer: Signer, tmp_path: Path,
        extra: list[str],
    ) -> None:  # fmt: skip
        """A range that holds no moment checks nothing: refused, as search and export do."""
        line = assert_one_error_line(run(*verify_args(ledger_root, signer, tmp_path), *extra))
        assert "the range is empty" in line

    def test_keystore_that_does_not_exist(
        self, ledger: list[Record], ledger_root: Path, tmp_path: Path
    ) -> None:
        """A mistyped --keystore is an error, never content reported as erased."""
        event_id = ledger[0].event_id
        for args in (["show", event_id], ["search"], ["session", "s"]):
            line = assert_one_error_line(
                run(*args, "--ledger", ledger_root, "--keystore", tmp_path / "no-such-keys")
            )
            assert "no-such-keys' does not exist" in line

    def test_keygen_never_leaves_another_keys_verifier_beside_it(self, tmp_path: Path) -> None:
        """A verifier.pub already beside a new key's path is another key's: keygen refuses
        rather than claim to have written it."""
        first = run("keygen", "--name", "first", "--out", tmp_path / "a.key")
        assert 0 == first.exit_code
        line = assert_one_error_line(run("keygen", "--name", "second", "--out", tmp_path / "b.key"))
        assert "verifier.pub exists beside" in line
        assert first.stdout == (tmp_path / "verifier.pub").read_text()
        assert not (tmp_path / "b.key").exists()

    def test_export_refuses_an_empty_user(self, ledger: list[Record], ledger_root: Path) -> None:
        """An empty --user names nobody: refused, as forget refuses it."""
        line = assert_one_error_line(
            run("export", "--ledger", ledger_root, "--user", " ", "--out", "pkg", "--no-sign")
        )
        assert "--user is empty" in line

    @pytest.mark.parametrize(
        "args",
        [
            ["search", "--limit", "9223372036854775808"],
            ["cost", "--rps", "1e300"],
            ["cost", "--rps", "1", "--tokens-per-exchange", "99999999999999999999"],
        ],
        ids=" ".join,
    )
    def test_numbers_beyond_reason(self, args: list[str]) -> None:
        """Numbers too large to mean anything are refused by their option's range."""
        line = assert_one_error_line(run(*args))
        assert "is not in the range" in line

    def test_config_file_that_is_not_utf8(self, tmp_path: Path) -> None:
        """A config or API-keys file of binary junk is one error line."""
        junk = tmp_path / "junk.toml"
        junk.write_bytes(b"\xff\xfe garbage")
        for option in ("--config", "--api-keys"):
            line = assert_one_error_line(run("serve", option, junk))
            assert "cannot read" in line and str(junk) in line

    def test_demo_dir_under_a_file(self, tmp_path: Path) -> None:
        """A --dir whose parent is a file is one error line."""
        (tmp_path / "afile").write_text("x")
        line = assert_one_error_line(run("demo", "--dir", tmp_path / "afile" / "sub"))
        assert "cannot make the demo directory" in line

    @pytest.mark.parametrize("args", [[], ["s3"]], ids=["tokentrail", "tokentrail s3"])
    def test_no_command_shows_the_help(self, args: list[str]) -> None:
        """A group run with no command prints its help page (with an example), not the page
        dressed as one error line; exit 2 as click does."""
        result = run(*args)
        assert (2, "") == (result.exit_code, result.stdout)
        assert result.stderr.startswith("Usage: ")
        assert "error" not in result.stderr.splitlines()[0]
        assert ("tokentrail s3 init --bucket" if args else "tokentrail demo") in result.stderr

    def test_key_names_and_keys_that_are_empty_or_too_long(self, tmp_path: Path) -> None:
        """keygen --name '' is refused (not swapped for a proposed name), so is a name too
        long for every signature line; an empty --public-key says it is empty."""
        assert "must be non-empty" in assert_one_error_line(run("keygen", "--name", ""))
        line = assert_one_error_line(run("keygen", "--name", "k" * 129, "--out", tmp_path / "x"))
        assert "at most 128" in line
        line = assert_one_error_line(run("verify", "--ledger", tmp_path, "--public-key", ""))
        assert "the verifier key given is empty" in line
        assert "not in the range" in assert_one_error_line(run("sim", "--token-ms", "1e300"))

    def test_json_readers_get_json_when_it_cannot_run(self, tmp_path: Path, signer: Signer) -> None:
        """With --json, a run that cannot start still prints one JSON object on stdout (and
        its line on stderr), so a machine reading stdout always has something to parse."""
        (tmp_path / "garbage.zip").write_bytes(b"not a zip")
        for args in (
            ["verify", "--ledger", tmp_path / "nope", "--public-key", signer.verifier.to_text()],
            ["verify-export", tmp_path / "garbage.zip"],
        ):
            result = run(*args, "--json")
            assert 2 == result.exit_code
            found = orjson.loads(result.stdout)
            assert (False, 2) == (found["ok"], found["exit_status"])
            assert result.stderr == f"tokentrail: error: {found['error']}\n"

    def test_an_unmapped_read_error_is_not_called_an_output_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An OSError no layer turned into a StoreError is one line naming it (and the file),
        never "cannot write the output", which is for a full disk or a closed pipe."""
        import tokentrail._cli as cli

        def refused(root: Path) -> list[str]:
            raise PermissionError(13, "Permission denied", "/srv/ledger/logs")

        monkeypatch.setattr(cli, "list_logs", refused)
        line = assert_one_error_line(run("count", "--ledger", "."))
        assert line == "tokentrail: error: Permission denied (/srv/ledger/logs)"
