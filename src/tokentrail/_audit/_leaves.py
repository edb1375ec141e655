"""Re-reading an indexed record from its leaf, and the Merkle work for proving many records.

The index only says where to look. :class:`LeafReader` re-reads the stored line at the indexed
segment and offset and checks, in order: the line is there, its leaf hash equals the indexed one,
it parses, it is the record the index named (log, seq, event id), and its content hashes hold
(:func:`tokentrail._verify.check_record`). Any failure is a :class:`Checked` with a ``problem``,
which callers report rather than show.

Inclusion proofs use ``tokentrail._merkle.MerkleLevels``: one O(n) pass over a log's leaf
hashes, then O(log n) for each record's audit path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .._checkpoint import Checkpoint, Verifier, open_note
from .._errors import StoreError, TokentrailError
from .._layout import list_log, read_bytes, segments_dir
from .._merkle import leaf_hash
from .._verify import check_record
from ._index import Row, ts_micros


@dataclass(frozen=True, slots=True)
class Checked:
    """An indexed record after re-reading its leaf: the record, or what is wrong."""

    row: Row
    location: str
    leaf: bytes | None
    record: dict[str, Any] | None
    problem: str | None

    @property
    def ok(self) -> bool:
        """Whether the leaf is the one indexed and its content hashes hold."""
        return self.problem is None

    def problem_line(self) -> str:
        """One line naming the record and what is wrong, for a cron log or a terminal."""
        return (
            f"MISMATCH log={self.row.log_id} seq={self.row.seq} event_id={self.row.event_id}"
            f" file={self.location} offset={self.row.offset}: {self.problem}"
        )


class LeafReader:
    """Re-reads indexed records from a ledger, keeping decompressed segments for one query."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._unpacked: dict[Path, bytes] = {}
        self._open: dict[Path, BinaryIO] = {}
        self._path_cache: dict[tuple[str, str, int], tuple[Path, Path]] = {}

    def close(self) -> None:
        """Close the segment files kept open."""
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def __del__(self) -> None:
        self.close()

    def _paths(self, row: Row) -> tuple[Path, Path]:
        key = (row.log_id, row.date, row.first_seq)
        found = self._path_cache.get(key)
        if found is None:
            folder = segments_dir(self.root, row.log_id) / row.date
            name = f"{row.first_seq:020d}.jsonl"
            found = self._path_cache[key] = (folder / name, folder / (name + ".zst"))
        return found

    def read(self, row: Row) -> tuple[str, bytes | None]:
        """The location and the stored line at the row's offset (None if it is not there)."""
        plain, packed = self._paths(row)
        try:
            fh = self._open.get(plain)
            if fh is None:
                fh = self._open[plain] = plain.open("rb")
            fh.seek(row.offset)
            line = fh.readline()
            return str(plain), line[:-1] if line.endswith(b"\n") else None
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot read {plain}: {exc.strerror}") from exc
        if not packed.exists():
            return str(plain), None
        data = self._unpacked.get(packed)
        if data is None:
            data = self._unpacked[packed] = read_bytes(packed)
        end = data.find(b"\n", row.offset)
        return str(packed), data[row.offset : end] if end >= 0 else None

    def check(self, row: Row) -> Checked:
        """Re-read one indexed record and check it against the index and its own hashes."""
        try:
            location, line = self.read(row)
        except (TypeError, ValueError, OverflowError):  # a row edited to hold the wrong types
            return Checked(
                row, str(self.root / "index"), None, None,
                "the index row is damaged; rebuild it: tokentrail index --rebuild",
            )  # fmt: skip
        if line is None:
            return Checked(row, location, None, None, "the indexed line is not in the ledger")
        if leaf_hash(line) != row.leaf_hash:
            return Checked(
                row, location, line, None, "the stored line's leaf hash differs from the index"
            )
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return Checked(row, location, line, None, "the stored line is not JSON")
        if not isinstance(obj, dict):
            return Checked(row, location, line, None, "the stored line is not a JSON object")
        if (obj.get("log_id"), obj.get("seq"), obj.get("event_id")) != (
            row.log_id,
            row.seq,
            row.event_id,
        ):
            return Checked(row, location, line, obj, "the stored record is not the indexed one")
        indexed = (row.user_id, row.session_id, row.model, row.stop_reason, row.ts)
        stored = tuple(obj.get(name) for name in ("user_id", "session_id", "model", "stop_reason"))
        if indexed != (*stored, ts_micros(obj.get("timestamp"))):
            # What the search filtered on: a hit must hold it in the ledger, not only the index.
            return Checked(
                row, location, line, obj,
                "the index's user, session, model, stop reason or time differ from the stored"
                " record's; rebuild it: tokentrail index --rebuild",
            )  # fmt: skip
        problems = check_record(obj, row.log_id)
        if problems:
            return Checked(row, location, line, obj, "; ".join(problems))
        return Checked(row, location, line, obj, None)


@dataclass(frozen=True, slots=True)
class SignedHead:
    """A log's newest checkpoint: its note, parsed body and file."""

    log_id: str
    note: bytes
    checkpoint: Checkpoint
    path: Path


def latest_checkpoint(root: Path, log_id: str, verifiers: list[Verifier]) -> SignedHead | None:
    """The newest checkpoint of a log, its signature checked; None when the log has none.

    Raises :class:`TokentrailError` when the newest checkpoint does not verify or does not
    belong to the log: that is for ``tokentrail verify`` to explain, never to skip silently.
    """
    checkpoints = list_log(root, log_id).checkpoints
    if not checkpoints:
        return None
    size = max(checkpoints)
    path = checkpoints[size]
    note = read_bytes(path)
    text, _ = open_note(note, verifiers)
    checkpoint = Checkpoint.from_text(text)
    if checkpoint.size != size or not checkpoint.origin.endswith("/" + log_id):
        raise TokentrailError(f"checkpoint {path} does not match its file name or log")
    return SignedHead(log_id, note, checkpoint, path)
