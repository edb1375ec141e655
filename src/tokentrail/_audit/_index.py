"""The sidecar search index: a rebuildable SQLite file beside the ledger, never its source of truth.

::

    <root>/index/audit.sqlite3      (plus SQLite's -wal and -shm files)

It holds, per record, only what the filters need — log, seq, event id, timestamp, user,
session, model, stop reason — and where the record is (segment, byte offset in the segment's
decompressed stream) with its leaf hash, so every hit can be re-read and re-checked against the
leaf it came from (:mod:`._leaves`). Prompt and output text go into a contentless FTS5 trigram
index (``detail=none``): it stores trigrams, not the text, and yields candidates that the
re-check confirms by a real substring test on the re-read record.

Updates are incremental: per log the index remembers the next ``seq``, the segment and offset
after the last complete line, and that line's leaf hash; an update reads only what came after,
and checks that the first new line continues the chain (``seq`` and ``prev_hash``). Anything
unexpected — a log rewritten under the index, a truncated segment — is reported as a warning and
that log is re-indexed from seq 0. Deleting the folder loses nothing (``index --rebuild``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from .._errors import StoreError, VerificationError
from .._layout import SegmentRef, iter_lines, list_log, list_logs, segment_size
from .._merkle import CompactRange, leaf_hash
from .._record import ZERO_HASH

INDEX_DIR = "index"
INDEX_FILE = "audit.sqlite3"
SCHEMA_VERSION = "1"
_BATCH = 20_000

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    log_id TEXT NOT NULL,
    date TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    UNIQUE (log_id, date, first_seq)
);
CREATE TABLE IF NOT EXISTS logs (
    log_id TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    last_leaf_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    log_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT,
    ts INTEGER,
    user_id TEXT,
    session_id TEXT,
    model TEXT,
    stop_reason TEXT,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    leaf_hash BLOB NOT NULL
);
"""
_FTS = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS texts USING fts5"
    "(body, content='', contentless_delete=1, tokenize='trigram', detail='none')"
)
_FTS_OLD = (  # before SQLite 3.43: stale rows of a re-indexed log stay, as harmless candidates
    "CREATE VIRTUAL TABLE IF NOT EXISTS texts USING fts5"
    "(body, content='', tokenize='trigram', detail='none')"
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS records_user ON records (user_id, ts)",
    "CREATE INDEX IF NOT EXISTS records_session ON records (session_id, ts)",
    "CREATE INDEX IF NOT EXISTS records_ts ON records (ts)",
    "CREATE INDEX IF NOT EXISTS records_event ON records (event_id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS records_place ON records (log_id, seq)",
)
_INDEX_NAMES = (
    "records_user",
    "records_session",
    "records_ts",
    "records_event",
    "records_place",
)


def index_path(root: Path) -> Path:
    """Where the index of the ledger at ``root`` lives."""
    return root / INDEX_DIR / INDEX_FILE


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (tried: permissions, a read-only mount and an
    immutable attribute all count, for root too)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".tokentrail-probe-")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def ts_micros(value: Any) -> int | None:
    """An RFC 3339 timestamp as integer microseconds since the epoch, or None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp() * 1_000_000) if moment.year > 1 else None


def moment_micros(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch."""
    return int(moment.timestamp() * 1_000_000)


@dataclass
class UpdateStats:
    """What one index update did."""

    logs: int = 0
    added: int = 0
    total: int = 0
    seconds: float = 0.0
    rebuilt_logs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Row:
    """One indexed record: its filter fields and where its leaf is."""

    id: int
    log_id: str
    seq: int
    event_id: str | None
    ts: int | None
    user_id: str | None
    session_id: str | None
    model: str | None
    stop_reason: str | None
    date: str
    first_seq: int
    offset: int
    leaf_hash: bytes


_ROW_SELECT = (
    "SELECT r.id, r.log_id, r.seq, r.event_id, r.ts, r.user_id, r.session_id, r.model,"
    " r.stop_reason, s.date, s.first_seq, r.offset, r.leaf_hash"
    " FROM records r JOIN segments s ON s.id = r.segment"
)


#: The ``meta`` key of a log's proven compact range (:meth:`Index.proven`).
_PROVEN = "proven:"


class _LogGone(Exception):
    """The log no longer matches what the index remembers of it."""


class Index:
    """The sidecar index of one ledger; see the module docstring."""

    def __init__(
        self,
        root: Path,
        conn: sqlite3.Connection,
        *,
        read_only: bool = False,
        in_memory: bool = False,
    ) -> None:
        self.root = root
        self.conn = conn
        #: Opened from a folder it cannot write (a read-only ledger): searched as last built.
        self.read_only = read_only
        #: Built in memory for one command: a ledger it cannot write, with no index beside it.
        self.in_memory = in_memory
        self._seg_ids: dict[tuple[str, str, int], int] = {}

    @classmethod
    def open(cls, root: Path, *, rebuild: bool = False, in_memory_ok: bool = False) -> Index:
        """Open (creating, or with ``rebuild`` recreating) the index of the ledger at ``root``.

        A ledger this process cannot write is searched with the index its operator keeps;
        with none there, ``in_memory_ok`` builds one in memory for this command (kept nowhere,
        so nothing of it outlives the command, or a forget).
        """
        list_logs(root)  # raises StoreError unless root is a ledger
        folder = root / INDEX_DIR
        if not _writable(folder if folder.is_dir() else root):
            if in_memory_ok and not (folder / INDEX_FILE).is_file():
                index = cls(root, sqlite3.connect(":memory:", isolation_level=None), in_memory=True)
                index._prepare()
                return index
            return cls._open_read_only(root, folder)
        if rebuild and folder.exists():
            shutil.rmtree(folder)
        try:
            folder.mkdir(exist_ok=True)
            conn = sqlite3.connect(folder / INDEX_FILE, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the search index in {folder}: {exc}") from exc
        index = cls(root, conn)
        try:
            index._prepare()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"search index {folder / INDEX_FILE} is unreadable ({exc});"
                " rebuild it: tokentrail index --rebuild"
            ) from exc
        return index

    @classmethod
    def _open_read_only(cls, root: Path, folder: Path) -> Index:
        """The index of a ledger this process cannot write, as its operator last built it."""
        path = folder / INDEX_FILE
        if not path.is_file():
            raise StoreError(
                f"{root} cannot be written here and has no search index: search keeps its index"
                " beside the ledger, so search a writable copy, or have the ledger's operator"
                " keep one (tokentrail index, from cron)"
            )
        try:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?immutable=1", uri=True, isolation_level=None
            )
            index = cls(root, conn, read_only=True)
            index._check_schema()
            index._load_segments()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"search index {path} is unreadable ({exc})") from exc
        return index

    def close(self) -> None:
        """Close the database."""
        self.conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self) -> None:
        c = self.conn
        # The index is rebuildable from the ledger: durability buys nothing here.
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=OFF")
        c.execute("PRAGMA temp_store=MEMORY")
        c.execute("PRAGMA cache_size=-65536")
        c.executescript(_TABLES)
        try:
            c.execute(_FTS)
        except sqlite3.OperationalError:  # SQLite < 3.43 lacks contentless_delete
            c.execute(_FTS_OLD)
        if c.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() is None:
            c.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self._check_schema()
        self._load_segments()

    def _check_schema(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            raise StoreError(
                f"search index has schema {row[0] if row else 'none'}, this tokentrail needs"
                f" {SCHEMA_VERSION}; rebuild it: tokentrail index --rebuild"
            )

    def _load_segments(self) -> None:
        for row in self.conn.execute("SELECT id, log_id, date, first_seq FROM segments"):
            self._seg_ids[(row[1], row[2], row[3])] = row[0]

    # ------------------------------------------------------------------ update

    def update(self, progress: Callable[[int], None] | None = None) -> UpdateStats:
        """Index every complete line appended since the last update, in one transaction.

        ``progress`` is given each segment's size in bytes as the update reaches it (those
        indexed before at once): its total is :func:`segment_bytes` of the ledger.
        """
        import time

        if self.read_only:
            raise StoreError(
                f"the search index in {self.root / INDEX_DIR} cannot be written by this user:"
                " a read-only ledger (index a writable copy), or an index another user made"
                " (root's, say: remove the folder, or give it to the ledger's user)"
            )
        started = time.perf_counter()
        stats = UpdateStats()
        c = self.conn
        bulk = c.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None
        c.execute("BEGIN")
        try:
            if bulk:  # building from empty: sorting once at the end beats updating B-trees
                for name in _INDEX_NAMES:
                    c.execute(f"DROP INDEX IF EXISTS {name}")
                # and merging the text index's segments once beats merging as it grows
                c.execute("INSERT INTO texts (texts, rank) VALUES ('automerge', 0)")
            for log_id in list_logs(self.root):
                stats.logs += 1
                try:
                    stats.added += self._update_log(log_id, stats, progress)
                except _LogGone as exc:
                    stats.warnings.append(
                        f"log {log_id}: {exc}; the ledger changed under the index, re-indexing"
                        " this log from seq 0 (run tokentrail verify)"
                    )
                    stats.rebuilt_logs.append(log_id)
                    self._forget_log(log_id)
                    with contextlib.suppress(_LogGone):
                        stats.added += self._update_log(log_id, stats)
            for statement in _INDEXES:
                c.execute(statement)
            if bulk:
                c.execute("INSERT INTO texts (texts) VALUES ('optimize')")
                c.execute("INSERT INTO texts (texts, rank) VALUES ('automerge', 4)")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        stats.total = c.execute("SELECT count(*) FROM records").fetchone()[0]
        stats.seconds = time.perf_counter() - started
        return stats

    def _forget_log(self, log_id: str) -> None:
        c = self.conn
        ids = [r[0] for r in c.execute("SELECT id FROM records WHERE log_id = ?", (log_id,))]
        if _has_contentless_delete(c):
            c.executemany("DELETE FROM texts WHERE rowid = ?", ((i,) for i in ids))
        c.execute("DELETE FROM records WHERE log_id = ?", (log_id,))
        c.execute("DELETE FROM logs WHERE log_id = ?", (log_id,))
        c.execute("DELETE FROM meta WHERE key = ?", (_PROVEN + log_id,))

    def _segment_id(self, log_id: str, seg: SegmentRef) -> int:
        key = (log_id, seg.date, seg.first_seq)
        found = self._seg_ids.get(key)
        if found is None:
            cur = self.conn.execute(
                "INSERT INTO segments (log_id, date, first_seq) VALUES (?, ?, ?)", key
            )
            found = int(cur.lastrowid or 0)
            self._seg_ids[key] = found
        return found

    def _update_log(
        self, log_id: str, stats: UpdateStats, progress: Callable[[int], None] | None = None
    ) -> int:
        c = self.conn
        state = c.execute(
            "SELECT l.next_seq, s.date, s.first_seq, l.offset, l.last_leaf_hash"
            " FROM logs l JOIN segments s ON s.id = l.segment WHERE l.log_id = ?",
            (log_id,),
        ).fetchone()
        segments = list_log(self.root, log_id).segments
        next_seq, prev = 0, bytes.fromhex(ZERO_HASH)
        start, offset = 0, 0
        if state is not None:
            next_seq, date, first_seq, offset, prev = state
            for i, seg in enumerate(segments):
                if (seg.date, seg.first_seq) == (date, first_seq):
                    start = i
                    break
            else:
                raise _LogGone(f"segment {date}/{first_seq:020d} is gone")
        added = 0
        seg_id, end = -1, offset
        if progress is not None:
            progress(sum(segment_size(seg) for seg in segments[:start]))
        for seg in segments[start:]:
            if progress is not None:
                progress(segment_size(seg))
            seg_id = self._segment_id(log_id, seg)
            begin = offset if (state is not None and seg is segments[start]) else 0
            rows: list[tuple[Any, ...]] = []
            texts: list[tuple[int, str]] = []
            end = begin
            first = True
            for pos, line, complete in _lines_from(seg, begin):
                if not complete:
                    break
                if first and begin and pos != begin:
                    raise _LogGone(f"segment {seg.path} was truncated")
                first = False
                try:
                    obj = orjson.loads(line)
                    seq, prev_hex = obj["seq"], obj["prev_hash"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    stats.warnings.append(
                        f"log {log_id}: the line at {seg.path} offset {pos} is not a record;"
                        " indexing of this log stops there (run tokentrail verify)"
                    )
                    return added + self._flush(rows, texts, log_id, next_seq, seg_id, end, prev)
                if seq != next_seq or prev_hex != prev.hex():
                    if added == 0 and not rows and state is not None and next_seq > 0:
                        raise _LogGone(f"seq {seq} at {seg.path} does not continue the chain")
                    stats.warnings.append(
                        f"log {log_id}: seq {seq} at {seg.path} offset {pos} does not follow"
                        f" seq {next_seq - 1}; indexing of this log stops there"
                        " (run tokentrail verify)"
                    )
                    return added + self._flush(rows, texts, log_id, next_seq, seg_id, end, prev)
                prev = leaf_hash(line)
                rows.append(
                    (
                        log_id,
                        seq,
                        obj.get("event_id"),
                        ts_micros(obj.get("timestamp")),
                        obj.get("user_id"),
                        obj.get("session_id"),
                        obj.get("model"),
                        obj.get("stop_reason"),
                        seg_id,
                        pos,
                        prev,
                    )
                )
                text = _text_of(obj)
                if text:
                    texts.append((len(rows) - 1, text))
                next_seq += 1
                end = pos + len(line) + 1
                if len(rows) >= _BATCH:
                    added += self._flush(rows, texts, log_id, next_seq, seg_id, end, prev)
                    rows, texts = [], []
            added += self._flush(rows, texts, log_id, next_seq, seg_id, end, prev)
        if state is None and seg_id < 0:
            return 0
        return added

    def _flush(
        self,
        rows: list[tuple[Any, ...]],
        texts: list[tuple[int, str]],
        log_id: str,
        next_seq: int,
        seg_id: int,
        end: int,
        prev: bytes,
    ) -> int:
        c = self.conn
        if rows:
            base = c.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0] + 1
            c.executemany(
                "INSERT INTO records (id, log_id, seq, event_id, ts, user_id, session_id, model,"
                " stop_reason, segment, offset, leaf_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                ((base + i, *row) for i, row in enumerate(rows)),
            )
            c.executemany(
                "INSERT INTO texts (rowid, body) VALUES (?, ?)",
                ((base + i, text) for i, text in texts),
            )
        if seg_id >= 0:
            c.execute(
                "INSERT INTO logs (log_id, next_seq, segment, offset, last_leaf_hash)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (log_id) DO UPDATE SET"
                " next_seq = excluded.next_seq, segment = excluded.segment,"
                " offset = excluded.offset, last_leaf_hash = excluded.last_leaf_hash",
                (log_id, next_seq, seg_id, end, prev),
            )
        return len(rows)

    # ------------------------------------------------------------------ queries

    def rows(self, where: str = "", params: tuple[Any, ...] = (), tail: str = "") -> list[Row]:
        """Indexed rows matching a SQL condition over ``records r``."""
        sql = _ROW_SELECT + (f" WHERE {where}" if where else "") + (f" {tail}" if tail else "")
        return [Row(*r) for r in self.conn.execute(sql, params)]

    def count(self, where: str = "", params: tuple[Any, ...] = ()) -> int:
        """How many indexed rows match a SQL condition over ``records r``."""
        sql = "SELECT count(*) FROM records r" + (f" WHERE {where}" if where else "")
        return int(self.conn.execute(sql, params).fetchone()[0])

    def counts(
        self, key_sql: str, where: str = "", params: tuple[Any, ...] = ()
    ) -> list[tuple[Any, int]]:
        """(value of ``key_sql`` over ``records r``, how many rows) for the rows matching a
        condition, the most rows first."""
        sql = (
            f"SELECT {key_sql} AS k, count(*) AS n FROM records r"
            + (f" WHERE {where}" if where else "")
            + " GROUP BY k ORDER BY n DESC, k"
        )
        return [(k, int(n)) for k, n in self.conn.execute(sql, params)]

    def by_event(self, event_id: str) -> list[Row]:
        """The rows with this event id (one, unless the ledger holds duplicates)."""
        return self.rows("r.event_id = ?", (event_id,), "ORDER BY r.log_id, r.seq")

    def leaf_hashes(self, log_id: str, size: int, start: int = 0) -> list[bytes]:
        """The indexed leaf hashes of seq start .. size-1 of a log (fewer if not indexed)."""
        cur = self.conn.execute(
            "SELECT leaf_hash FROM records WHERE log_id = ? AND seq >= ? AND seq < ? ORDER BY seq",
            (log_id, start, size),
        )
        return [r[0] for r in cur]

    def proven(self, log_id: str) -> CompactRange | None:
        """The compact range of the indexed leaves a signed root was last found to cover (kept
        by :meth:`note_proven`; dropped when the log is indexed again from scratch)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (_PROVEN + log_id,))
        found = row.fetchone()
        if found is None:
            return None
        try:
            return CompactRange.from_json(orjson.loads(found[0]))
        except (orjson.JSONDecodeError, VerificationError):
            return None

    def note_proven(self, log_id: str, proven: CompactRange) -> None:
        """Keep ``proven`` for :meth:`proven` (not in an index this process cannot write)."""
        if self.read_only:
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            (_PROVEN + log_id, orjson.dumps(proven.to_json()).decode()),
        )


def text_candidates_sql(needle: str) -> tuple[str, tuple[Any, ...]] | None:
    """A condition over ``r.id`` for records whose text may contain ``needle``, or None.

    The trigram index answers needles of three characters or more; the caller confirms every
    candidate with a real substring test. Shorter needles have no trigram: no condition.
    """
    grams = sorted({needle.lower()[i : i + 3] for i in range(len(needle) - 2)})
    if not grams:
        return None
    query = " AND ".join('"' + g.replace('"', '""') + '"' for g in grams)
    return "r.id IN (SELECT rowid FROM texts WHERE texts MATCH ?)", (query,)


def _text_of(obj: dict[str, Any]) -> str:
    parts = [obj.get("input_text"), obj.get("output_text")]
    return "\n".join(p for p in parts if isinstance(p, str) and p)


def _has_contentless_delete(conn: sqlite3.Connection) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'texts'").fetchone()
    return bool(sql and "contentless_delete" in sql[0])


def _lines_from(seg: SegmentRef, begin: int) -> Iterator[tuple[int, bytes, bool]]:
    """``iter_lines`` from byte ``begin`` of the decompressed stream (a seek for plain files)."""
    if seg.plain is not None and begin:
        try:
            fh = seg.plain.open("rb")
        except FileNotFoundError:
            pass  # compressed since the last update: fall through to the packed file
        except OSError as exc:
            raise StoreError(f"cannot read {seg.plain}: {exc.strerror}") from exc
        else:
            with fh:
                size = fh.seek(0, 2)
                if size < begin:
                    raise _LogGone(f"segment {seg.plain} is shorter than already indexed")
                fh.seek(begin)
                data = fh.read()
            pos = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                if nl < 0:
                    yield begin + pos, data[pos:], False
                    return
                yield begin + pos, data[pos:nl], True
                pos = nl + 1
            return
    path = seg.plain if seg.plain is not None and seg.plain.exists() else seg.packed
    if path is None:
        path = seg.path
    for pos, line, complete in iter_lines(path):
        if pos >= begin:
            yield pos, line, complete
