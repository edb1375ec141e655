"""Tests for ``verify`` (SPEC section 4): the tamper matrix, witness state, ranges, scale.

Every tamper case starts from a fresh ledger of 50 records in six segments (nine records each),
sealed every ten records, changes it the way an attacker or a failing disk would, and checks
that verification fails with a finding that names the right log, ``seq`` and file — both through
the library (:func:`verify_local`) and through ``tokentrail verify`` (exit status 1). Forged
lines and checkpoints are built here with ``hashlib`` and the signing key, never with the code
under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tokentrail._checkpoint import Signer
from tokentrail._cli import main
from tokentrail._layout import segment_bytes
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._record import Exchange, rfc3339
from tokentrail._verify import NO_LOG, Report, VerifyOptions, verify_local

LOG_ID = "test-log"
N = 50
PER_SEGMENT = 9  # 8 KiB segments hold nine of the test records
SEAL_EVERY = 10
SEGMENT_BYTES = 9000


# --------------------------------------------------------------------------------------------
# Helpers: where records are, and how to change them byte for byte.
# --------------------------------------------------------------------------------------------


def leaf_hash_hex(leaf: bytes) -> str:
    """RFC 9162 leaf hash, computed here independently of the code under test."""
    return hashlib.sha256(b"\x00" + leaf).hexdigest()


def log_path(root: Path, log_id: str = LOG_ID) -> Path:
    return root / "logs" / log_id


def segment_files(root: Path, log_id: str = LOG_ID) -> list[Path]:
    """Every segment file of a log, in seq order (names are the first seq)."""
    return sorted(
        (p for p in (log_path(root, log_id) / "segments").glob("*/*.jsonl*")),
        key=lambda p: (p.name.split(".")[0], p.parent.name),
    )


def checkpoint_file(root: Path, size: int, log_id: str = LOG_ID) -> Path:
    return log_path(root, log_id) / "checkpoints" / f"{size:020d}.checkpoint"


def segment_of(root: Path, seq: int) -> Path:
    """The segment file holding ``seq``."""
    return [p for p in segment_files(root) if int(p.name.split(".")[0]) <= seq][-1]


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def line_of(root: Path, seq: int) -> tuple[Path, int, bytes]:
    """The segment, index in it, and stored line (with newline) of record ``seq``."""
    path = segment_of(root, seq)
    for idx, line in enumerate(read_lines(path)):
        if json.loads(line)["seq"] == seq:
            return path, idx, line
    raise AssertionError(f"seq {seq} not found")


def edit_record(root: Path, seq: int, old: bytes, new: bytes) -> Path:
    """Replace the one occurrence of ``old`` in record ``seq`` by ``new``; return its file."""
    path, idx, line = line_of(root, seq)
    assert line.count(old) == 1, (old, line)
    lines = read_lines(path)
    lines[idx] = line.replace(old, new)
    path.write_bytes(b"".join(lines))
    return path


def run_verify(root: Path, signer: Signer, state_dir: Path | None = None, **opts: Any) -> Report:
    return verify_local(
        root, VerifyOptions(verifiers=[signer.verifier], state_dir=state_dir, **opts)
    )


def describe(report: Report) -> str:
    return "\n".join([report.summary()] + [f.to_line() for f in report.findings + report.warnings])


def cli_verify(root: Path, signer: Signer, state_dir: Path, *args: str) -> Any:
    """``tokentrail verify`` on ``root`` with the verifier key given inline."""
    argv = ["verify", "--ledger", str(root), "--public-key", signer.verifier.to_text()]
    return CliRunner().invoke(main, [*argv, "--state", str(state_dir), *args])


def forged_line(previous: bytes, *, timestamp: str, seq: int) -> bytes:
    """A record after ``previous`` with every hash recomputed: content, chain and all."""
    obj = json.loads(previous)
    tokens = [9, 8, 7]
    text = "forged prompt"
    obj.update(
        seq=seq,
        prev_hash=leaf_hash_hex(previous.rstrip(b"\n")),
        event_id=str(uuid.uuid4()),
        timestamp=timestamp,
        input_tokens=tokens,
        input_hash=hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
        input_text=text,
        input_text_hash=hashlib.sha256(text.encode()).hexdigest(),
    )
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def checkpoint_body(origin: str, size: int, root_hash: bytes) -> bytes:
    return f"{origin}\n{size}\n{base64.b64encode(root_hash).decode()}\n".encode()


# --------------------------------------------------------------------------------------------
# The tamper matrix.
# --------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """A sealed 50-record ledger and what the tamper case expects verification to name."""

    root: Path
    signer: Signer
    state_dir: Path
    write: Callable[..., Any]
    tmp: Path
    #: acceptable ``seq`` values of the naming finding (``None``: a checkpoint-level finding)
    seqs: set[int | None] = field(default_factory=set)
    #: acceptable ``location`` values of the naming finding
    files: set[Path] = field(default_factory=set)
    event_ids: set[str | None] | None = None
    #: folders (or files) whose findings count, any seq: for a log that is gone altogether
    anywhere_in: set[Path] | None = None

    def names(self, finding: Any) -> bool:
        """Whether ``finding`` names what this case changed."""
        if finding.log_id != LOG_ID:
            return False
        if self.anywhere_in is not None:
            loc = finding.location
            return loc is None or any(
                loc == str(p) or loc.startswith(str(p) + "/") for p in self.anywhere_in
            )
        return (
            finding.seq in self.seqs
            and finding.location in {str(p) for p in self.files}
            and (self.event_ids is None or finding.event_id in self.event_ids)
        )


def _edit_tokens(s: Scene) -> None:
    s.files = {edit_record(s.root, 25, b'"input_tokens":[1,22,', b'"input_tokens":[1,23,')}
    s.seqs = {25}


def _edit_text(s: Scene) -> None:
    s.files = {edit_record(s.root, 25, b"prompt number 25:", b"prompt number 26:")}
    s.seqs = {25}


def _edit_output_piece(s: Scene) -> None:
    s.files = {edit_record(s.root, 27, b"[226,130]", b"[226,131]")}
    s.seqs = {27}


def _edit_user_id(s: Scene) -> None:
    s.files = {edit_record(s.root, 25, b'"user_id":"user-0"', b'"user_id":"user-1"')}
    s.seqs = {25}


def _edit_user_id_segment_end(s: Scene) -> None:
    # seq 26 ends its segment: the broken link shows in the next file, the edit is in this one.
    s.files = {edit_record(s.root, 26, b'"user_id":"user-1"', b'"user_id":"user-2"')}
    s.seqs = {26}


def _edit_last_record(s: Scene) -> None:
    # The last record has no successor whose prev_hash could notice: only the root can, so
    # naming the checkpoint that no longer matches is as right as naming the segment.
    path = edit_record(s.root, 49, b'"user_id":"user-4"', b'"user_id":"user-5"')
    s.files, s.seqs = {path, checkpoint_file(s.root, 50)}, {49}


def _delete_last_record(s: Scene) -> None:
    path, idx, _ = line_of(s.root, 49)
    lines = read_lines(path)
    del lines[idx]
    path.write_bytes(b"".join(lines))
    s.files, s.seqs = {path}, {49}


def _delete_record(s: Scene) -> None:
    path, idx, _ = line_of(s.root, 25)
    lines = read_lines(path)
    del lines[idx]
    path.write_bytes(b"".join(lines))
    s.files, s.seqs = {path}, {25, 26}


def _insert_copy(s: Scene) -> None:
    _, _, copied = line_of(s.root, 10)
    path, idx, _ = line_of(s.root, 25)
    lines = read_lines(path)
    lines.insert(idx + 1, copied)
    path.write_bytes(b"".join(lines))
    s.files, s.seqs = {path}, {10, 25, 26}


def _swap(s: Scene) -> None:
    path, idx, _ = line_of(s.root, 25)
    lines = read_lines(path)
    lines[idx], lines[idx + 1] = lines[idx + 1], lines[idx]
    path.write_bytes(b"".join(lines))
    s.files, s.seqs = {path}, {25, 26}


def _duplicate(s: Scene) -> None:
    path, idx, line = line_of(s.root, 25)
    lines = read_lines(path)
    lines.insert(idx, line)
    path.write_bytes(b"".join(lines))
    s.files, s.seqs = {path}, {25, 26}


def _truncate(seq: int) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        path, idx, line = line_of(s.root, seq)
        kept = b"".join(read_lines(path)[:idx]) + line[: len(line) // 2]
        path.write_bytes(kept)
        s.files, s.seqs = {path}, {seq}

    return tamper


def _delete_segment(first: int) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        gone = segment_of(s.root, first)
        gone.unlink()
        following = [p for p in segment_files(s.root) if int(p.name[:20]) > first]
        before = [p for p in segment_files(s.root) if int(p.name[:20]) < first]
        # The gap is noticed where the next segment starts; naming either file is right. A
        # deleted last segment leaves no name behind: the file where the log now ends is named.
        s.files = {gone, *following[:1]} if following else {gone, before[-1]}
        s.seqs = {first} | ({int(following[0].name[:20])} if following else set())

    return tamper


def _append_forged(age: timedelta) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        path, _, last = line_of(s.root, N - 1)
        when = rfc3339(datetime.now(UTC) - age)
        line = forged_line(last, timestamp=when, seq=N)
        with path.open("ab") as fh:
            fh.write(line)
        s.files, s.seqs, s.event_ids = {path}, {N}, {json.loads(line)["event_id"]}

    return tamper


def _edit_checkpoint(what: str) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        cp = checkpoint_file(s.root, 30)
        text = cp.read_bytes()
        lines = text.split(b"\n")
        if what == "root":
            root_hash = bytearray(base64.b64decode(lines[2]))
            root_hash[0] ^= 1
            lines[2] = base64.b64encode(bytes(root_hash))
        elif what == "size":
            lines[1] = b"31"
        else:  # one byte of the signature
            sig = bytearray(base64.b64decode(lines[4].split(b" ")[2]))
            sig[10] ^= 1
            lines[4] = b" ".join([*lines[4].split(b" ")[:2], base64.b64encode(bytes(sig))])
        cp.write_bytes(b"\n".join(lines))
        s.files, s.seqs = {cp}, {None, 29}

    return tamper


def _resign_checkpoint(key_name: str) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        cp = checkpoint_file(s.root, 30)
        body = cp.read_bytes().split(b"\n\n")[0] + b"\n"
        cp.write_bytes(Signer.generate(key_name).sign_note(body))
        s.files, s.seqs = {cp}, {None, 29}

    return tamper


def _forge_checkpoint_root(s: Scene) -> None:
    cp = checkpoint_file(s.root, 30)
    origin = f"{s.signer.name}/{LOG_ID}"
    cp.write_bytes(s.signer.sign_note(checkpoint_body(origin, 30, hashlib.sha256(b"x").digest())))
    s.files, s.seqs = {cp}, {None, 29}


def _forge_checkpoint_beyond(s: Scene) -> None:
    cp = checkpoint_file(s.root, 60)
    origin = f"{s.signer.name}/{LOG_ID}"
    cp.write_bytes(s.signer.sign_note(checkpoint_body(origin, 60, hashlib.sha256(b"x").digest())))
    s.files, s.seqs = {cp}, {None, 50, 59}


def _rollback(s: Scene) -> None:
    # Verify (state saved at 50), then put back a copy taken when only 30 were sealed.
    shutil.rmtree(s.root)
    s.write(30, seal_every=SEAL_EVERY, max_segment_bytes=SEGMENT_BYTES)
    old = s.tmp / "old-copy"
    shutil.copytree(s.root, old)
    s.write(20, start=30, seal_every=SEAL_EVERY, max_segment_bytes=SEGMENT_BYTES)
    assert run_verify(s.root, s.signer, s.state_dir).ok
    shutil.rmtree(s.root)
    shutil.copytree(old, s.root)
    cps = log_path(s.root) / "checkpoints"
    s.files, s.seqs = {cps, checkpoint_file(s.root, 30)}, {None, 29, 30}


def _rewrite(size: int, seal_every: int | None) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        assert run_verify(s.root, s.signer, s.state_dir).ok
        shutil.rmtree(s.root)
        s.write(size, start=1000, seal_every=seal_every, max_segment_bytes=SEGMENT_BYTES)
        # The rewrite is noticed where the new history first meets the remembered one.
        cps = log_path(s.root) / "checkpoints"
        s.files = {cps, *cps.iterdir(), *segment_files(s.root)}
        s.seqs = {None, *range(size + 1)}

    return tamper


def _vanish(what: str) -> Callable[[Scene], None]:
    def tamper(s: Scene) -> None:
        # A second log keeps the store a store when this one goes altogether.
        s.write(5, log_id="other-log")
        assert run_verify(s.root, s.signer, s.state_dir).ok
        log = log_path(s.root)
        if what == "log":
            shutil.rmtree(log)
        else:
            for sub in ("checkpoints",) if what == "checkpoints" else ("checkpoints", "segments"):
                shutil.rmtree(log / sub)
                (log / sub).mkdir()
        s.anywhere_in = {log}

    return tamper


TAMPERS: dict[str, Callable[[Scene], None]] = {
    "token-list-byte": _edit_tokens,
    "byte-piece-byte": _edit_output_piece,
    "text-byte": _edit_text,
    "user-id-byte": _edit_user_id,
    "user-id-byte-segment-end": _edit_user_id_segment_end,
    "last-record-user-id-byte": _edit_last_record,
    "record-deleted": _delete_record,
    "last-record-deleted": _delete_last_record,
    "record-inserted": _insert_copy,
    "records-swapped": _swap,
    "record-duplicated": _duplicate,
    "middle-segment-truncated": _truncate(22),
    "last-segment-truncated": _truncate(47),
    "middle-segment-deleted": _delete_segment(18),
    "last-segment-deleted": _delete_segment(45),
    "forged-record-old": _append_forged(timedelta(hours=2)),
    "checkpoint-root-edited": _edit_checkpoint("root"),
    "checkpoint-size-edited": _edit_checkpoint("size"),
    "checkpoint-signature-edited": _edit_checkpoint("signature"),
    "checkpoint-other-key-same-name": _resign_checkpoint("test-key"),
    "checkpoint-other-key": _resign_checkpoint("attacker"),
    "checkpoint-forged-root": _forge_checkpoint_root,
    "checkpoint-forged-beyond": _forge_checkpoint_beyond,
    "rollback": _rollback,
    "rollback-to-empty": _vanish("everything"),
    "rollback-all-checkpoints-deleted": _vanish("checkpoints"),
    "rollback-log-deleted": _vanish("log"),
    "rewrite-shorter": _rewrite(30, SEAL_EVERY),
    "rewrite-same-size": _rewrite(50, SEAL_EVERY),
    "rewrite-longer-sealed-once": _rewrite(70, None),
    "rewrite-longer-sealed-often": _rewrite(70, SEAL_EVERY),
}

#: Cases where the verifier fails, as it must, but its findings name the wrong seq or file.
KNOWN_BUGS: dict[str, str] = {}


def _cases() -> list[Any]:
    return [
        pytest.param(
            name,
            fn,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])]
            if name in KNOWN_BUGS
            else [],
        )
        for name, fn in TAMPERS.items()
    ]


@pytest.fixture
def scene(
    write_records: Callable[..., Any],
    ledger_root: Path,
    signer: Signer,
    state_dir: Path,
    tmp_path: Path,
) -> Scene:
    records = write_records(N, seal_every=SEAL_EVERY, max_segment_bytes=SEGMENT_BYTES)
    assert [r.seq for r in records] == list(range(N))
    assert len(segment_files(ledger_root)) >= 3
    return Scene(ledger_root, signer, state_dir, write_records, tmp_path)


class TestFixture:
    def test_layout(self, scene: Scene) -> None:
        """The matrix ledger has six segments of nine records and five checkpoints."""
        assert [0, 9, 18, 27, 36, 45] == [int(p.name[:20]) for p in segment_files(scene.root)]
        assert [10, 20, 30, 40, 50] == sorted(
            int(p.name[:20]) for p in (log_path(scene.root) / "checkpoints").iterdir()
        )

    def test_untouched_is_ok(self, scene: Scene, tmp_path: Path) -> None:
        """An untouched ledger verifies with no finding or warning, and exits 0."""
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (True, [], []) == (report.ok, report.findings, report.warnings), describe(report)
        assert N == report.logs[0].verified_size
        result = cli_verify(scene.root, scene.signer, tmp_path / "cli-state")
        assert 0 == result.exit_code, result.output

    def test_progress_reaches_every_segment(self, scene: Scene, tmp_path: Path) -> None:
        """The progress callback is given each segment's size: a full run and a daily one
        (segments below the remembered state skipped) both add up to the segments' bytes."""
        total = segment_bytes(scene.root)
        assert total == sum(p.stat().st_size for p in segment_files(scene.root))
        for _ in range(2):  # the second run starts from the state the first one left
            steps: list[int] = []
            report = run_verify(scene.root, scene.signer, tmp_path / "state", progress=steps.append)
            assert report.ok, describe(report)
            assert (len(steps), sum(steps)) == (len(segment_files(scene.root)), total)


class TestTamperMatrix:
    @pytest.mark.parametrize(("name", "tamper"), _cases())
    def test_detected_and_named(
        self, name: str, tamper: Callable[[Scene], None], scene: Scene, tmp_path: Path
    ) -> None:
        """Verification fails, exits 1, and a finding names the log, seq and file."""
        tamper(scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok, describe(report)
        result = cli_verify(scene.root, scene.signer, scene.state_dir)
        assert 1 == result.exit_code, result.output
        assert result.output.splitlines()[-1].startswith("tokentrail verify FAIL")
        assert [f for f in report.findings if scene.names(f)], describe(report)
        # Records a signed checkpoint covers are never called young and merely unsealed.
        assert not [w for w in report.warnings if "seal grace" in w.message], describe(report)

    @pytest.mark.parametrize("name", ["token-list-byte", "rollback", "last-segment-deleted"])
    def test_stays_failing(self, name: str, scene: Scene) -> None:
        """A failed run saves no witness state, so the next run fails again."""
        TAMPERS[name](scene)
        first = run_verify(scene.root, scene.signer, scene.state_dir)
        second = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (False, False) == (first.ok, second.ok), describe(second)


class TestFindingsNameRecords:
    """SPEC section 4: a finding names the log, seq, event_id and file. A checkpoint's finding
    names the last record the checkpoint covers; a record that does not parse is named by its
    place and the event_id it still reads, and a break after it is blamed on it."""

    @pytest.mark.parametrize(
        "name",
        [
            "checkpoint-root-edited",
            "checkpoint-size-edited",
            "checkpoint-signature-edited",
            "checkpoint-other-key",
            "checkpoint-forged-root",
        ],
    )
    def test_checkpoint_findings_name_its_last_record(self, name: str, scene: Scene) -> None:
        TAMPERS[name](scene)
        last = json.loads(line_of(scene.root, 29)[2])
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        cp = str(checkpoint_file(scene.root, 30))
        at_cp = [f for f in report.findings if f.location == cp]
        assert at_cp, describe(report)
        assert all((f.seq, f.event_id) == (29, last["event_id"]) for f in at_cp), describe(report)

    def test_event_id_used_twice(self, scene: Scene) -> None:
        """A record (hashes and chain recomputed, as a writer holding the key could write it)
        reusing an earlier record's ``event_id``: named, with the record it shares it with."""
        path, _, last = line_of(scene.root, N - 1)
        earlier = json.loads(line_of(scene.root, 7)[2])["event_id"]
        obj = json.loads(forged_line(last, timestamp=rfc3339(datetime.now(UTC)), seq=N))
        obj["event_id"] = earlier
        with path.open("ab") as fh:
            fh.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        report = run_verify(scene.root, scene.signer, scene.state_dir, full=True)
        assert [(N, earlier, str(path))] == [
            (f.seq, f.event_id, f.location) for f in report.findings if "also used by" in f.message
        ], describe(report)
        assert "record 7" in describe(report)

    def test_unreadable_record_is_named_and_blamed(self, scene: Scene) -> None:
        path, _, line = line_of(scene.root, 12)
        event_id = json.loads(line)["event_id"]
        edit_record(scene.root, 12, b'"seq":12,', b'"seq":12,,')
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok
        assert {(12, event_id, str(path))} == {
            (f.seq, f.event_id, f.location) for f in report.findings if f.seq in (11, 12)
        }, describe(report)


class TestDateFolders:
    """A segment's date folder is the day its first record was appended (SPEC section 3)."""

    @pytest.mark.parametrize(
        ("which", "shift"),
        [(-1, timedelta(days=30)), (0, -timedelta(days=30))],
        ids=["later", "earlier"],
    )
    def test_moved_segment(self, which: int, shift: timedelta, scene: Scene) -> None:
        """The first segment moved to a folder before its records arrived: a finding naming
        its first record; the last moved to a folder after today: a warning (a writer whose
        clock ran ahead leaves the same honestly)."""
        seg = segment_files(scene.root)[which]
        first = json.loads(read_lines(seg)[0])
        day = (datetime.fromisoformat(seg.parent.name) + shift).strftime("%Y-%m-%d")
        moved = seg.parent.parent / day / seg.name
        moved.parent.mkdir()
        seg.rename(moved)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        named = [(LOG_ID, first["seq"], first["event_id"], str(moved))]
        about = tuple(
            [(f.log_id, f.seq, f.event_id, f.location) for f in items if "date folder" in f.message]
            for items in (report.findings, report.warnings)
        )
        assert about == (([], named) if shift > timedelta(0) else (named, [])), describe(report)
        assert report.ok == (shift > timedelta(0))

    @pytest.mark.parametrize(("ahead_s", "ok"), [(180, True), (301, False), (43_200, False)])
    def test_request_after_the_folder_day(
        self, ahead_s: int, ok: bool, ledger_root: Path, signer: Signer, state_dir: Path
    ) -> None:
        """A segment in a folder dated before its first record's request arrived is a finding,
        with no slack but the 5 minutes a timestamp the SDK took from a caller may run ahead of
        the writer's clock: a day before (a segment moved back one folder) is a finding."""
        appended = datetime(2026, 3, 9, 23, 59, 0, tzinfo=UTC)
        stamp = rfc3339(appended + timedelta(seconds=60 + ahead_s))
        config = LedgerConfig(ledger_root, LOG_ID, signer, clock=appended.timestamp)
        with Ledger.open(config) as ledger:
            ledger.append(Exchange(model="m", api="sdk", stop_reason="stop", timestamp=stamp))
        assert ["2026-03-09"] == [p.parent.name for p in segment_files(ledger_root)]
        report = run_verify(ledger_root, signer, state_dir)
        dated = [f for f in report.findings if "date folder 2026-03-09" in f.message]
        assert (ok, not ok) == (report.ok, bool(dated)), describe(report)

    def test_requests_from_earlier_days_are_fine(
        self, ledger_root: Path, signer: Signer, state_dir: Path
    ) -> None:
        """Records whose requests arrived days before the folder's day (an import through the
        SDK's plain API, a request across midnight) are not findings."""
        old = rfc3339(datetime.now(UTC) - timedelta(days=10))
        with Ledger.open(LedgerConfig(ledger_root, LOG_ID, signer)) as ledger:
            ledger.append(Exchange(model="m", api="sdk", stop_reason="stop", timestamp=old))
        report = run_verify(ledger_root, signer, state_dir)
        assert (True, []) == (report.ok, report.findings), describe(report)


class TestUnsealed:
    def test_young_forged_record_is_a_warning(self, scene: Scene) -> None:
        """A forged record younger than the seal grace is a warning naming it, not a finding."""
        _append_forged(timedelta(seconds=5))(scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (True, []) == (report.ok, report.findings), describe(report)
        assert [(LOG_ID, N)] == [(w.log_id, w.seq) for w in report.warnings]
        assert scene.event_ids == {report.warnings[0].event_id}
        assert 1 == report.logs[0].unsealed

    @pytest.mark.parametrize(("ahead", "ok"), [(30, True), (10 * 365 * 86400, False)])
    def test_torn_tail_with_a_file_time_ahead(self, ahead: int, ok: bool, scene: Scene) -> None:
        """An incomplete last line is a write in progress only while its file is young: a
        modification time set far ahead does not keep it young forever."""
        last = segment_files(scene.root)[-1]
        with last.open("ab") as fh:
            fh.write(b'{"seq": 50, "junk')
        when = time.time() + ahead
        os.utime(last, (when, when))
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        torn = [f for f in (*report.findings, *report.warnings) if "incomplete" in f.message]
        assert (ok, 1) == (report.ok, len(torn)), describe(report)

    def test_sealed_records_past_a_break_are_not_called_unsealed(self, scene: Scene) -> None:
        """An edit under a checkpoint stops verification there; the records after it are
        under signed checkpoints, and the report says that, not "a dead writer or a forgery"
        (which would send an auditor after the wrong cause)."""
        edit_record(scene.root, 12, b"prompt number 12:", b"prompt number 99:")
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        text = describe(report)
        assert not report.ok
        assert "dead writer" not in text and "not sealed" not in text, text
        assert (
            f"{N - SEAL_EVERY} records from seq {SEAL_EVERY} on are under signed checkpoints"
            f" (up to size {N}) that could not be verified past the findings above"
        ) in text
        # The summary counts them apart too; it called them "unsealed".
        assert (SEAL_EVERY, N - SEAL_EVERY, 0) == (
            report.logs[0].verified_size,
            report.logs[0].unverified,
            report.logs[0].unsealed,
        )
        assert (
            f"{SEAL_EVERY} sealed under {report.logs[0].checkpoints} checkpoints,"
            f" {N - SEAL_EVERY} under them not verified, 0 unsealed,"
        ) in report.summary()

    def test_young_forged_record_fails_when_sealing_is_required(self, scene: Scene) -> None:
        """Under ``require_sealed`` the same forged record is a finding naming it."""
        _append_forged(timedelta(seconds=5))(scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir, require_sealed=True)
        assert not report.ok
        assert [(LOG_ID, N, str(segment_of(scene.root, N)))] == [
            (f.log_id, f.seq, f.location) for f in report.findings
        ]
        result = cli_verify(scene.root, scene.signer, scene.state_dir, "--require-sealed")
        assert 1 == result.exit_code

    @pytest.mark.parametrize("ahead", [timedelta(days=1000), timedelta(minutes=10)])
    def test_forged_record_from_the_future_is_a_finding(
        self, ahead: timedelta, scene: Scene
    ) -> None:
        """A forged tail dated after now (beyond the grace) cannot pass as young: a finding
        naming the record, exit 1."""
        _append_forged(-ahead)(scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok, describe(report)
        assert [(LOG_ID, N, str(segment_of(scene.root, N)))] == [
            (f.log_id, f.seq, f.location) for f in report.findings
        ]
        assert "in the future" in report.findings[0].message
        assert scene.event_ids == {report.findings[0].event_id}
        assert 1 == cli_verify(scene.root, scene.signer, scene.state_dir).exit_code

    def test_clock_skew_within_the_grace_is_a_warning(self, scene: Scene) -> None:
        """A record a minute ahead (a writer's clock a little fast) is still only young."""
        _append_forged(-timedelta(minutes=1))(scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (True, 1) == (report.ok, len(report.warnings)), describe(report)

    @pytest.mark.parametrize(
        ("grace", "ok"), [(3600.0, True), (1.0, False), (0.0, False)], ids=["in", "out", "zero"]
    )
    def test_seal_grace(self, grace: float, ok: bool, scene: Scene) -> None:
        """A forged record a minute old passes only while the grace is longer than that."""
        _append_forged(timedelta(minutes=1))(scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir, seal_grace_s=grace)
        assert ok == report.ok, describe(report)


class TestRecordRules:
    """SPEC section 2's value rules, on a record chained and hashed as a writer would."""

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (
                lambda line, now: line.replace(now.encode(), now[:-8].encode()),
                "is not an RFC 3339 UTC time with microseconds and a Z suffix",
            ),
            (
                lambda line, now: line.replace(now.encode(), now[:-1].encode() + b"+00:00"),
                "is not an RFC 3339 UTC time with microseconds and a Z suffix",
            ),
            (
                lambda line, now: b'{"user_id":"someone-else",' + line[1:],
                "record line is not I-JSON: duplicate keys ['user_id']",
            ),
            (
                lambda line, now: re.sub(rb'"event_id":"[^"]+"', b'"event_id":{"a":1}', line),
                "event_id is not a UUID (lowercase, as SPEC section 2 stores it)",
            ),
        ],
        ids=["no-zone", "offset-not-Z", "duplicate-key", "event-id-object"],
    )
    def test_rule_broken_is_a_finding(
        self, change: Callable[[bytes, str], bytes], message: str, scene: Scene
    ) -> None:
        """A record that breaks a value rule is a finding naming it (never a crash), even
        young and unsealed."""
        path, _, last = line_of(scene.root, N - 1)
        now = rfc3339(datetime.now(UTC))
        line = change(forged_line(last, timestamp=now, seq=N), now)
        with path.open("ab") as fh:
            fh.write(line)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok, describe(report)
        assert [N] == [f.seq for f in report.findings if message in f.message], describe(report)

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"api": "bogus.api"}, "api 'bogus.api' is not one of"),
            ({"output_token_source": "magic"}, "output_token_source 'magic' is unknown"),
            ({"stop_reason": None}, "stop_reason is not a string"),
            ({"model": None}, "model is not a string"),
            ({"user_id": 42}, "user_id is neither a string nor null"),
            ({"model_version": 7}, "model_version is neither a string nor null"),
            ({"request_duration_ms": -5.0}, "request_duration_ms -5.0 is not a wall time"),
            ({"request_duration_ms": "12.5"}, "request_duration_ms '12.5' is not a wall time"),
            (
                {"output_tokens": [[104, 105], "x"], "output_token_source": "upstream-pieces"},
                "output_tokens: a byte piece that is valid UTF-8",
            ),
            (
                {"output_tokens": [[300], "x"], "output_token_source": "upstream-pieces"},
                "output_tokens: a byte piece with a value that is not a byte",
            ),
            (
                {"output_tokens": [1, "a"], "output_token_source": "upstream-pieces"},
                "output_tokens: neither ids nor pieces (or both)",
            ),
            (
                {"output_tokens": [1, 2], "output_token_source": "none"},
                "output_tokens: tokens, but the source is 'none'",
            ),
            (
                {"output_tokens": None, "output_token_source": "upstream-ids"},
                "output_tokens: no tokens, but the source is 'upstream-ids'",
            ),
            (
                {"output_tokens": [1, 2], "output_token_source": "upstream-pieces"},
                "output_tokens: ids, but the source is 'upstream-pieces'",
            ),
            (
                {"output_tokens": ["a"], "output_token_source": "upstream-context"},
                "output_tokens: pieces, but the source 'upstream-context' gives ids",
            ),
        ],
        ids=repr,
    )
    def test_value_broken_is_a_finding(
        self, fields: dict[str, Any], message: str, scene: Scene
    ) -> None:
        """A record a writer holding the key could have signed with values SPEC section 2
        forbids, its hashes recomputed: a finding, sealed or not."""
        path, _, last = line_of(scene.root, N - 1)
        obj = json.loads(forged_line(last, timestamp=rfc3339(datetime.now(UTC)), seq=N))
        obj.update(fields)
        tokens = obj["output_tokens"]
        obj["output_hash"] = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()
        with path.open("ab") as fh:
            fh.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert [N] == [f.seq for f in report.findings if message in f.message], describe(report)


class TestCompressedPairs:
    @pytest.fixture
    def packed(self, write_records: Callable[..., Any], ledger_root: Path) -> Path:
        write_records(
            N, seal_every=SEAL_EVERY, max_segment_bytes=SEGMENT_BYTES, compress_sealed=True
        )
        return ledger_root

    def test_all_segments_packed(self, packed: Path, signer: Signer) -> None:
        """Every sealed segment is ``.jsonl.zst`` and the ledger verifies."""
        names = [p.name for p in segment_files(packed)]
        assert names and all(n.endswith(".jsonl.zst") for n in names), names
        report = run_verify(packed, signer)
        assert (True, N) == (report.ok, report.logs[0].records_read), describe(report)

    @pytest.mark.parametrize(("edit", "ok"), [(False, True), (True, False)], ids=["same", "diff"])
    def test_pair(self, edit: bool, ok: bool, packed: Path, signer: Signer) -> None:
        """A ``.jsonl`` beside its ``.jsonl.zst`` passes with the same content, else fails."""
        import zstandard

        zst = segment_files(packed)[2]
        data = zstandard.ZstdDecompressor().decompressobj().decompress(zst.read_bytes())
        (edited,) = [json.loads(ln) for ln in data.splitlines() if b"prompt number 20:" in ln]
        if edit:
            data = data.replace(b"prompt number 20:", b"prompt number 21:")
        plain = zst.with_name(zst.name.removesuffix(".zst"))
        plain.write_bytes(data)
        report = run_verify(packed, signer)
        assert ok == report.ok, describe(report)
        if not ok:  # the finding names the first record that differs
            assert [(LOG_ID, edited["seq"], edited["event_id"], str(zst))] == [
                (f.log_id, f.seq, f.event_id, f.location)
                for f in report.findings
                if "different content" in f.message
            ], describe(report)

    def test_torn_line_in_a_packed_segment(self, packed: Path, signer: Signer) -> None:
        """A packed segment ending in an incomplete line is a finding even while young: a
        .jsonl.zst is written whole and renamed into place, never appended to."""
        import zstandard

        from tokentrail._layout import iter_lines

        last = segment_files(packed)[-1]
        lines = [line + b"\n" for _, line, _ in iter_lines(last)]
        last.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines) + b'{"seq": 9'))
        report = run_verify(packed, signer)
        assert not report.ok, describe(report)
        assert any("incomplete record" in f.message for f in report.findings), describe(report)

    @pytest.mark.parametrize("cut", [1, 5, 200, "all"])
    def test_truncated_packed_segment_is_named(
        self, cut: int | str, packed: Path, signer: Signer
    ) -> None:
        """A .jsonl.zst cut short, or to nothing, is a finding naming that file (zstandard's
        stream reader took the cut frame silently, gave nothing of it, and the finding named
        the next segment, as records missing there)."""
        zst = segment_files(packed)[1]
        zst.write_bytes(b"" if cut == "all" else zst.read_bytes()[: -int(cut)])
        report = run_verify(packed, signer)
        assert not report.ok
        assert [str(zst)] == [f.location for f in report.findings if "to its end" in f.message], (
            describe(report)
        )

    def test_a_line_without_end_is_not_read_whole(
        self, packed: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A packed segment that unpacks to one endless line (a decompression bomb) stops at
        the line limit with a finding; it is never held in memory whole (it took minutes,
        then memory, for 3 GiB)."""
        import zstandard

        import tokentrail._layout as layout

        monkeypatch.setattr(layout, "MAX_LINE_BYTES", 64 << 10)
        monkeypatch.setattr(layout, "_READ_CHUNK", 4096)
        bomb = segment_files(packed)[-1]
        bomb.write_bytes(zstandard.ZstdCompressor().compress(b"x" * (1 << 20)))
        report = run_verify(packed, signer)
        assert not report.ok
        assert any("without an end: not a record" in f.message for f in report.findings), describe(
            report
        )

    def test_unpacking_is_in_bounded_pieces(self, tmp_path: Path) -> None:
        """A packed file is unpacked a piece at a time, each at most 32 MiB whatever the ratio
        (a 256 MiB run of one byte packs into a few KiB; unpacked whole in one call, a 3 GiB
        one took 3 GB of memory)."""
        import zstandard

        from tokentrail._layout import _unzstd

        bomb = tmp_path / "bomb.jsonl.zst"
        with bomb.open("wb") as fh:
            writer = zstandard.ZstdCompressor().stream_writer(fh)
            for _ in range(256):
                writer.write(b"x" * (1 << 20))
            writer.flush(zstandard.FLUSH_FRAME)
        with bomb.open("rb") as fh:
            sizes = [len(piece) for piece in _unzstd(fh, bomb)]
        assert (256 << 20, True) == (sum(sizes), max(sizes) <= 32 << 20), max(sizes)

    def test_one_frame_a_line(self, packed: Path, signer: Signer) -> None:
        """A packed segment stored as many zstd frames (valid zstd, as another compressor may
        write it) reads the same for every command: count and show see every record that
        verify does."""
        import zstandard

        from tokentrail._layout import iter_lines

        compressor = zstandard.ZstdCompressor()
        last = b""
        for zst in segment_files(packed):
            lines = [line + b"\n" for _, line, _ in iter_lines(zst)]
            zst.write_bytes(b"".join(compressor.compress(line) for line in lines))
            last = lines[-1]
        assert (True, N) == (lambda r: (r.ok, r.logs[0].records_read))(run_verify(packed, signer))
        runner = CliRunner()
        counted = runner.invoke(main, ["count", "--ledger", str(packed), "--date", "today"])
        assert (0, f"{N}\n") == (counted.exit_code, counted.stdout), counted.output
        event_id = json.loads(last)["event_id"]
        shown = runner.invoke(main, ["show", event_id, "--ledger", str(packed)])
        assert 0 == shown.exit_code, shown.output

    def test_tmp_files_ignored(self, packed: Path, signer: Signer) -> None:
        """A leftover ``.jsonl.zst.tmp`` from an interrupted compression is ignored."""
        zst = segment_files(packed)[1]
        zst.with_name(zst.name + ".tmp").write_bytes(b"partial")
        assert run_verify(packed, signer).ok


class TestStrays:
    @pytest.mark.parametrize(
        "relative",
        ["segments/notes.txt", "segments/2020-01-01/readme.md", "checkpoints/extra.checkpoint"],
    )
    def test_stray_file_is_a_finding(self, relative: str, scene: Scene) -> None:
        """Nothing else lives in ``segments/`` and ``checkpoints/``: a stray file is named."""
        stray = log_path(scene.root) / relative
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_text("hello")
        report = run_verify(scene.root, scene.signer)
        assert [str(stray)] == [f.location for f in report.findings], describe(report)

    def test_a_file_name_that_is_not_utf8(self, scene: Scene) -> None:
        """A stray whose name is not UTF-8: named in --json too (it crashed the encoder), its
        undecodable byte written as an escape."""
        stray = log_path(scene.root) / "segments" / os.fsdecode(b"notes-\xff.txt")
        stray.write_text("hello")
        result = cli_verify(scene.root, scene.signer, scene.tmp / "state", "--json")
        assert 1 == result.exit_code, result.output
        report = json.loads(result.stdout)
        assert [str(stray.parent / "notes-\\xff.txt")] == [
            f["location"] for f in report["findings"]
        ]

    @pytest.mark.parametrize("name", ["Evil", "-x", "a b"])
    def test_stray_folder_among_the_logs(self, name: str, scene: Scene) -> None:
        """A folder in logs/ that no writer could have made is a finding naming it; every log
        is still verified (it stopped the whole run with a usage error)."""
        shutil.copytree(log_path(scene.root), scene.root / "logs" / name)
        report = run_verify(scene.root, scene.signer)
        assert [(name, str(scene.root / "logs" / name))] == [
            (f.log_id, f.location) for f in report.findings
        ], describe(report)
        assert N == next(lg for lg in report.logs if lg.log_id == LOG_ID).records_read
        # The other commands read the logs and leave the stray to verify (they stopped on it).
        for args in (["count", "--date", "today"], ["index"], ["search", "--user", "user-1"]):
            result = CliRunner().invoke(main, [*args, "--ledger", str(scene.root)])
            assert 0 == result.exit_code, (args, result.output)

    @pytest.mark.parametrize("day", ["2026-99-99", "9999-12-31", "0001-01-01"])
    def test_segment_in_an_odd_date_folder(self, day: str, scene: Scene) -> None:
        """A segment moved to a folder that is no date, or to the calendar's edges, is named
        (a finding, or a warning for a day ahead), never a crash."""
        seg = segment_files(scene.root)[-1]
        moved = seg.parent.parent / day / seg.name
        moved.parent.mkdir()
        seg.rename(moved)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        about = [f for f in (*report.findings, *report.warnings) if f.location == str(moved)]
        assert about, describe(report)
        assert report.ok == (day == "9999-12-31"), describe(report)


class TestIncremental:
    def test_second_run_reads_only_new_records(
        self, scene: Scene, write_records: Callable[..., Any]
    ) -> None:
        """With a witness state, a run reads only the records appended since the last one."""
        first = run_verify(scene.root, scene.signer, scene.state_dir)
        write_records(20, start=N, max_segment_bytes=SEGMENT_BYTES)
        second = run_verify(scene.root, scene.signer, scene.state_dir)
        third = run_verify(scene.root, scene.signer, scene.state_dir)
        assert [N, 20, 0] == [r.logs[0].records_read for r in (first, second, third)]
        assert [True] * 3 == [r.ok for r in (first, second, third)], describe(second)
        assert [N, N + 20, N + 20] == [r.logs[0].verified_size for r in (first, second, third)]

    @pytest.mark.parametrize(
        "name", ["last-record-deleted", "last-segment-truncated", "last-segment-deleted"]
    )
    def test_shortened_tail_is_caught_without_full(self, name: str, scene: Scene) -> None:
        """Records the last run verified, cut from the end since: the daily run names them."""
        assert run_verify(scene.root, scene.signer, scene.state_dir).ok
        TAMPERS[name](scene)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok, describe(report)
        assert 0 == report.logs[0].records_read
        assert [f for f in report.findings if scene.names(f)], describe(report)

    @pytest.mark.parametrize("since", [False, True])
    def test_every_segment_deleted_is_caught(self, scene: Scene, since: bool) -> None:
        """A log whose segments are all gone, its checkpoints kept: the daily run (and its
        --days form) names the missing records, not "0 records read, OK"."""
        assert run_verify(scene.root, scene.signer, scene.state_dir).ok
        shutil.rmtree(scene.root / "logs" / LOG_ID / "segments")
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        report = run_verify(
            scene.root, scene.signer, scene.state_dir, since=today if since else None
        )
        assert not report.ok, describe(report)
        assert any("log ends before seq 0" in f.message for f in report.findings), describe(report)

    @pytest.mark.parametrize("gone", ["every log", "logs/"])
    def test_every_log_deleted_is_a_finding(self, scene: Scene, gone: str) -> None:
        """A store the verifier has seen logs in, emptied: each remembered log is named as
        deleted (a finding, exit 1), not "nothing has been recorded there yet" (exit 2, which
        left the last run noted as OK)."""
        assert run_verify(scene.root, scene.signer, scene.state_dir).ok
        if gone == "logs/":
            shutil.rmtree(scene.root / "logs")
        else:
            for log in (scene.root / "logs").iterdir():
                shutil.rmtree(log)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok
        assert [(LOG_ID, True)] == [
            (f.log_id, f.message.startswith("log deleted:")) for f in report.findings
        ], describe(report)

    def test_full_rereads_everything(self, scene: Scene) -> None:
        """``full`` re-reads every record even with a witness state."""
        run_verify(scene.root, scene.signer, scene.state_dir)
        report = run_verify(scene.root, scene.signer, scene.state_dir, full=True)
        assert (True, N) == (report.ok, report.logs[0].records_read)

    def test_full_catches_old_edit(self, scene: Scene) -> None:
        """An edit below the witness state is caught by a full run."""
        run_verify(scene.root, scene.signer, scene.state_dir)
        edit_record(scene.root, 5, b"prompt number 5:", b"prompt number 6:")
        report = run_verify(scene.root, scene.signer, scene.state_dir, full=True)
        assert 5 in {f.seq for f in report.findings}, describe(report)

    @pytest.mark.parametrize("full", [False, True], ids=["daily", "all"])
    def test_a_longer_fork_signed_with_the_key_is_caught(self, scene: Scene, full: bool) -> None:
        """A history rewritten by someone holding the signing key, longer than the one verified
        and with no checkpoint of the remembered size: the remembered root is the only proof
        left, and a full run (``--all``) compares it too (it took the fork, and its state)."""
        _rewrite(N + 7, None)(scene)
        assert N not in {int(p.name[:20]) for p in (log_path(scene.root) / "checkpoints").iterdir()}
        report = run_verify(scene.root, scene.signer, scene.state_dir, full=full)
        assert not report.ok, describe(report)
        assert any("rewritten history" in f.message for f in report.findings), describe(report)
        again = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not again.ok, describe(again)  # the fork did not become the remembered history

    def test_a_failure_stands_until_a_full_run_passes(self, scene: Scene) -> None:
        """An edit below the witness state, found by a full run: the next daily run does not
        re-read it, and still fails, saying why, until a full run passes again."""
        assert run_verify(scene.root, scene.signer, scene.state_dir).ok
        path = edit_record(scene.root, 5, b"prompt number 5:", b"prompt number 6:")
        assert not run_verify(scene.root, scene.signer, scene.state_dir, full=True).ok
        daily = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (False, 0) == (daily.ok, daily.logs[0].records_read), describe(daily)
        (stands,) = daily.findings
        assert stands.message.endswith(
            "), and this run does not re-read what it found; it stands until tokentrail verify"
            " --all passes"
        )
        # The finding names the run that found the edit, not the last run it stood in (each
        # standing run rewrote the date, so after a few days it named yesterday's run).
        (noted,) = scene.state_dir.glob("failed-*")
        first = json.loads(noted.read_text())
        noted.write_text(json.dumps({**first, "at": 1767225600.0}))  # 2026-01-01T00:00:00Z
        for _ in range(2):
            again = run_verify(scene.root, scene.signer, scene.state_dir)
            (stands,) = again.findings
            assert "failed (2026-01-01T00:00:00.000000Z)" in stands.message, stands.message
            # filed under no log, in --json too: "(bucket)" read oddly for a local store
            assert ["(store)"] == [lg.log_id for lg in again.logs if lg.findings] == [NO_LOG]
        # A clean run on another store, sharing the state directory, clears nothing.
        other = scene.tmp / "other-ledger"
        with Ledger.open(LedgerConfig(other, LOG_ID, scene.signer)) as ledger:
            ledger.append(Exchange(model="m", api="sdk", stop_reason="stop"))
        assert run_verify(other, scene.signer, scene.state_dir, full=True).ok
        assert not run_verify(scene.root, scene.signer, scene.state_dir).ok
        edit_record(scene.root, 5, b"prompt number 6:", b"prompt number 5:")
        assert path.exists()
        assert run_verify(scene.root, scene.signer, scene.state_dir, full=True).ok
        assert run_verify(scene.root, scene.signer, scene.state_dir).ok

    def test_state_written_only_when_ok(self, scene: Scene) -> None:
        """The witness state is a JSON file per origin, written after a clean run."""
        run_verify(scene.root, scene.signer, scene.state_dir)
        (state,) = scene.state_dir.glob("*.json")
        obj = json.loads(state.read_text())
        assert (f"test-key/{LOG_ID}", N) == (obj["origin"], obj["size"])

    def test_two_stores_of_one_origin(
        self, scene: Scene, write_records: Callable[..., Any]
    ) -> None:
        """The spool and a copy that lags it (the S3 mirror, shipped behind) share an origin
        and one --state: each store is remembered apart, so the copy is no "rollback", while a
        store of its own still is caught when it goes back."""
        mirror = scene.tmp / "mirror"
        shutil.copytree(scene.root, mirror)
        write_records(20, start=N, max_segment_bytes=SEGMENT_BYTES)
        spool = run_verify(scene.root, scene.signer, scene.state_dir)
        behind = run_verify(mirror, scene.signer, scene.state_dir)
        assert (True, True) == (spool.ok, behind.ok), describe(behind)
        assert [N + 20, N] == [r.logs[0].verified_size for r in (spool, behind)]
        assert 2 == len(list(scene.state_dir.glob("*.json")))
        shutil.rmtree(scene.root)
        shutil.copytree(mirror, scene.root)  # the spool put back to the mirror's older state
        rolled = run_verify(scene.root, scene.signer, scene.state_dir)
        assert any("rollback" in f.message for f in rolled.findings), describe(rolled)

    def test_state_of_an_older_version_is_taken_over(
        self, scene: Scene, write_records: Callable[..., Any]
    ) -> None:
        """A witness state written under the per-origin name (before states were kept per
        store) is used for its own store, and moved to the per-store name when next saved."""
        run_verify(scene.root, scene.signer, scene.state_dir)
        (state,) = scene.state_dir.glob("*.json")
        origin = f"test-key/{LOG_ID}"
        legacy = scene.state_dir / (hashlib.sha256(origin.encode()).hexdigest()[:32] + ".json")
        state.rename(legacy)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (True, 0) == (report.ok, report.logs[0].records_read), describe(report)
        write_records(20, start=N, max_segment_bytes=SEGMENT_BYTES)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert (True, 20) == (report.ok, report.logs[0].records_read), describe(report)
        assert [state] == list(scene.state_dir.glob("*.json"))

    def test_older_state_of_a_ledger_named_through_a_symlink(self, scene: Scene) -> None:
        """Earlier versions kept the ledger's path as the cron line named it; a path through a
        symlink (/var/lib/tokentrail -> /data/...) must still find that state, not start over
        (a first run would not notice a rollback in between)."""
        link = scene.tmp / "ledger-link"
        link.symlink_to(scene.root, target_is_directory=True)
        run_verify(link, scene.signer, scene.state_dir)
        (state,) = scene.state_dir.glob("*.json")
        obj = json.loads(state.read_text())
        obj["store"] = str(link)  # as an earlier version wrote it, under the per-origin name
        origin = f"test-key/{LOG_ID}"
        legacy = scene.state_dir / (hashlib.sha256(origin.encode()).hexdigest()[:32] + ".json")
        state.unlink()
        legacy.write_text(json.dumps(obj))
        report = run_verify(link, scene.signer, scene.state_dir)
        assert (True, 0) == (report.ok, report.logs[0].records_read), describe(report)

    @pytest.mark.parametrize("junk", [b"", b"{", b"[]", b'{"origin": 1}'])
    def test_corrupt_state_fails(self, junk: bytes, scene: Scene) -> None:
        """A witness state that cannot be read fails the run (never a silent first run)."""
        run_verify(scene.root, scene.signer, scene.state_dir)
        (state,) = scene.state_dir.glob("*.json")
        state.write_bytes(junk)
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok
        assert any(str(state) in f.message for f in report.findings), describe(report)

    @pytest.mark.parametrize("field", ["origin", "last_leaf_hash", "verified_at", "store"])
    def test_state_field_of_the_wrong_type_fails(self, field: str, scene: Scene) -> None:
        """A state whose fields are well formed but one of the wrong type is a finding
        naming the file, not a crash."""
        run_verify(scene.root, scene.signer, scene.state_dir)
        (state,) = scene.state_dir.glob("*.json")
        obj = json.loads(state.read_text())
        obj[field] = 123
        state.write_text(json.dumps(obj))
        report = run_verify(scene.root, scene.signer, scene.state_dir)
        assert not report.ok
        assert any(str(state) in f.message for f in report.findings), describe(report)


@pytest.fixture
def three_days(ledger_root: Path, signer: Signer) -> datetime:
    """Ten records a day on the last three UTC days (today included); returns today 00:00."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for back in (2, 1, 0):
        day_start = today - timedelta(days=back)
        at = day_start.timestamp() + 60
        cfg = LedgerConfig(ledger_root, LOG_ID, signer, clock=lambda at=at: at)
        with Ledger.open(cfg) as ledger:
            for i in range(10):
                stamp = rfc3339(day_start + timedelta(minutes=1, seconds=i))
                ledger.append(
                    Exchange(
                        model="m",
                        api="sdk",
                        stop_reason="stop",
                        timestamp=stamp,
                        input_text=f"day -{back} #{i}",
                    )
                )
    return today


class TestRanges:
    def test_layout_by_day(self, three_days: datetime, ledger_root: Path) -> None:
        """Each day's records sit in that day's folder."""
        days = [(three_days - timedelta(days=b)).strftime("%Y-%m-%d") for b in (2, 1, 0)]
        assert days == sorted({p.parent.name for p in segment_files(ledger_root)})

    @pytest.mark.parametrize(
        ("since_days", "until_days", "in_range"),
        [(None, None, 30), (1, None, 20), (0, None, 10), (2, 1, 10), (None, 2, 0)],
    )
    def test_since_until(
        self,
        since_days: int | None,
        until_days: int | None,
        in_range: int,
        three_days: datetime,
        ledger_root: Path,
        signer: Signer,
    ) -> None:
        """``since``/``until`` select records by timestamp; the whole log still verifies."""
        since = None if since_days is None else three_days - timedelta(days=since_days)
        until = None if until_days is None else three_days - timedelta(days=until_days)
        report = run_verify(ledger_root, signer, since=since, until=until)
        assert (True, in_range) == (report.ok, report.logs[0].in_range), describe(report)

    def test_range_after_state_reads_back(
        self, three_days: datetime, ledger_root: Path, signer: Signer, state_dir: Path
    ) -> None:
        """With a witness state, a ``since`` run still reads the range asked, not everything."""
        assert run_verify(ledger_root, signer, state_dir).ok
        report = run_verify(ledger_root, signer, state_dir, since=three_days)
        lg = report.logs[0]
        assert (True, 10) == (report.ok, lg.in_range), describe(report)
        assert 10 <= lg.records_read < 30

    def test_link_into_range(
        self, three_days: datetime, ledger_root: Path, signer: Signer, state_dir: Path
    ) -> None:
        """An edit to the record just before the range breaks the link into it."""
        assert run_verify(ledger_root, signer, state_dir).ok
        edit_record(ledger_root, 19, b"day -1 #9", b"day -1 #8")
        report = run_verify(ledger_root, signer, state_dir, since=three_days)
        assert not report.ok
        assert {19, 20} & {f.seq for f in report.findings}, describe(report)

    @pytest.mark.parametrize("gone", [(1,), (2, 1)])
    def test_segments_before_the_range_deleted(
        self,
        gone: tuple[int, ...],
        three_days: datetime,
        ledger_root: Path,
        signer: Signer,
        state_dir: Path,
    ) -> None:
        """The daily range run links into its range through the record before it: with the
        segments before the range deleted, that link is missing, and so are the records."""
        assert run_verify(ledger_root, signer, state_dir).ok
        for back in gone:
            day = (three_days - timedelta(days=back)).strftime("%Y-%m-%d")
            shutil.rmtree(ledger_root / "logs" / LOG_ID / "segments" / day)
        report = run_verify(ledger_root, signer, state_dir, since=three_days)
        assert not report.ok, describe(report)
        assert [
            "records missing before seq 20: the record it chains to (seq 19) is not in the"
            " ledger (deleted records or segments)"
        ] == [f.message for f in report.findings if f.seq == 20], describe(report)

    @pytest.mark.parametrize("days", ["1", "2", "3"])
    def test_cli_days(
        self, days: str, three_days: datetime, ledger_root: Path, signer: Signer, state_dir: Path
    ) -> None:
        """``--days N`` runs and exits 0 on the clean ledger."""
        result = cli_verify(ledger_root, signer, state_dir, "--days", days, "--json")
        assert 0 == result.exit_code, result.output
        assert json.loads(result.stdout)["ok"] is True


class TestScale:
    def test_no_false_positive_on_100k(self, ledger_root: Path, signer: Signer) -> None:
        """A clean ledger of 100,000 small records verifies with no finding and no warning."""
        n = 100_000
        cfg = LedgerConfig(
            ledger_root, LOG_ID, signer, durability="async", max_segment_bytes=4 << 20
        )
        started = time.monotonic()
        with Ledger.open(cfg) as ledger:
            for i in range(n):
                ledger.append(
                    Exchange(
                        model="m",
                        api="sdk",
                        stop_reason="stop",
                        input_tokens=[i],
                        output_tokens=[i, i + 1],
                        input_text=str(i),
                        output_text=None,
                    )
                )
                if i % 30_000 == 0:
                    ledger.seal()
        written = time.monotonic() - started
        report = run_verify(ledger_root, signer)
        assert (True, [], []) == (report.ok, report.findings, report.warnings), describe(report)
        assert (n, n) == (report.logs[0].records_read, report.logs[0].verified_size)
        assert written < 60


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_iter_lines_reads_what_split_does(
    chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines, offsets and the final unterminated piece, whatever the read size, plain or
    packed (against bytes.split, on random data)."""
    import random

    import zstandard

    import tokentrail._layout as layout

    monkeypatch.setattr(layout, "_READ_CHUNK", chunk)
    rng = random.Random(chunk)
    for trial in range(60):
        data = bytes(rng.choice(b"ab\n") for _ in range(rng.randint(0, 80)))
        path = tmp_path / ("s.jsonl.zst" if trial % 2 else "s.jsonl")
        path.write_bytes(zstandard.ZstdCompressor().compress(data) if trial % 2 else data)
        expected, offset = [], 0
        *whole, last = data.split(b"\n")
        for piece in whole:
            expected.append((offset, piece, True))
            offset += len(piece) + 1
        if last:
            expected.append((offset, last, False))
        assert expected == list(layout.iter_lines(path)), data
