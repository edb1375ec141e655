"""The local ledger layout of SPEC section 3, and streaming reads of it.

::

    <root>/logs/<log_id>/segments/<YYYY-MM-DD>/<first_seq:020d>.jsonl[.zst]
    <root>/logs/<log_id>/checkpoints/<tree_size:020d>.checkpoint

Besides those, a writer keeps ``<root>/logs/<log_id>/writer.json`` (its compact range at the
last checkpoint, so that a restart need not re-read the log) and moves a torn final line left
by a crash to ``<root>/logs/<log_id>/torn/``. Verifiers need neither.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from ._errors import ConfigError, StoreError

LOG_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SEGMENT_RE = re.compile(r"^(\d{20})\.jsonl(\.zst)?$")
_CHECKPOINT_RE = re.compile(r"^(\d{20})\.checkpoint$")
_READ_CHUNK = 1 << 20
#: Compressed bytes per decompression call: a call returns all it makes, and at zstd's largest
#: ratio (a raw-run block, 128 KiB from 4 bytes) 1 KiB makes at most 32 MiB.
_ZSTD_FEED = 1 << 10
#: Longer than any record (a request body is capped at 16 MiB by default): a line past this is
#: damage or a decompression bomb, and is not read into memory whole.
MAX_LINE_BYTES = 256 << 20


def check_log_id(log_id: str) -> str:
    """Return ``log_id`` if it matches ``[a-z0-9][a-z0-9._-]{0,63}``, else raise ConfigError."""
    if not is_log_id(log_id):
        raise ConfigError(f"log id {log_id!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
    return log_id


def log_dir(root: Path, log_id: str) -> Path:
    """The folder of one log."""
    return root / "logs" / check_log_id(log_id)


def segments_dir(root: Path, log_id: str) -> Path:
    """The folder of one log's segments."""
    return log_dir(root, log_id) / "segments"


def checkpoints_dir(root: Path, log_id: str) -> Path:
    """The folder of one log's checkpoints."""
    return log_dir(root, log_id) / "checkpoints"


def segment_name(first_seq: int) -> str:
    """The file name of an uncompressed segment starting at ``first_seq``."""
    return f"{first_seq:020d}.jsonl"


def checkpoint_name(size: int) -> str:
    """The file name of the checkpoint for tree size ``size``."""
    return f"{size:020d}.checkpoint"


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One segment of a log: where it is and how it is stored.

    ``plain`` and ``packed`` are the ``.jsonl`` and ``.jsonl.zst`` files; either may be absent,
    and when both exist they must hold the same content.
    """

    date: str
    first_seq: int
    plain: Path | None
    packed: Path | None

    @property
    def path(self) -> Path:
        """The file a finding names: the plain file when present."""
        found = self.plain or self.packed
        assert found is not None
        return found


@dataclass(frozen=True, slots=True)
class Listing:
    """What a log's folders hold: segments in order, checkpoints by size, and stray files."""

    segments: list[SegmentRef]
    checkpoints: dict[int, Path]
    strays: list[Path]


def list_logs(root: Path) -> list[str]:
    """The log ids under ``root``, sorted; raises StoreError if ``root`` is not a ledger.

    A folder whose name is no log id was made by no writer: it is left out here, and
    ``verify`` names it (:func:`log_folders`).
    """
    return [name for name in log_folders(root) if is_log_id(name)]


def log_folders(root: Path) -> list[str]:
    """Every folder name under ``root/logs``, sorted, log id or not."""
    logs = root / "logs"
    if not root.is_dir():
        raise StoreError(f"ledger directory {root} does not exist")
    if not logs.is_dir():
        raise StoreError(f"{root} is not a tokentrail ledger (no logs/ folder)")
    return sorted(p.name for p in logs.iterdir() if p.is_dir())


def is_log_id(name: str) -> bool:
    """Whether ``name`` is a log id (``[a-z0-9][a-z0-9._-]{0,63}``)."""
    return LOG_ID_RE.fullmatch(name) is not None and name not in {".", ".."}


def list_log(root: Path, log_id: str) -> Listing:
    """Segments (sorted by date folder then first seq), checkpoints and stray files of a log."""
    seg_root = segments_dir(root, log_id)
    cp_root = checkpoints_dir(root, log_id)
    found: dict[tuple[str, int], dict[str, Path]] = {}
    strays: list[Path] = []
    for date_dir in _sorted_dir(seg_root):
        if not (date_dir.is_dir() and _DATE_RE.fullmatch(date_dir.name)):
            strays.append(date_dir)
            continue
        for path in _sorted_dir(date_dir):
            if path.name.endswith(".tmp"):
                continue
            m = _SEGMENT_RE.fullmatch(path.name)
            if not m or not path.is_file():
                strays.append(path)
                continue
            kind = "packed" if m.group(2) else "plain"
            found.setdefault((date_dir.name, int(m.group(1))), {})[kind] = path
    segments = [
        SegmentRef(date, first, kinds.get("plain"), kinds.get("packed"))
        for (date, first), kinds in sorted(found.items())
    ]
    checkpoints: dict[int, Path] = {}
    for path in _sorted_dir(cp_root):
        if path.name.endswith(".tmp"):
            continue
        m = _CHECKPOINT_RE.fullmatch(path.name)
        if m and path.is_file():
            checkpoints[int(m.group(1))] = path
        else:
            strays.append(path)
    return Listing(segments, checkpoints, strays)


def _sorted_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StoreError(f"cannot list {path}: {exc.strerror}") from exc


def read_bytes(path: Path) -> bytes:
    """A whole file's bytes, decompressed if it is a ``.zst`` file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    if path.name.endswith(".zst"):
        return b"".join(_unzstd(io.BytesIO(data), path))
    return data


def _unzstd(fh: Any, path: Path) -> Iterator[bytes]:
    """The decompressed bytes of every zstd frame in ``fh``, in pieces; :class:`StoreError` when
    the data is not zstd or ends inside a frame (a file cut short, which zstandard's stream
    reader takes silently, giving nothing of that frame)."""
    dctx = zstandard.ZstdDecompressor()
    frame = dctx.decompressobj()
    inside = False  # the current frame has had input and has not ended
    empty = True
    try:
        while data := fh.read(_READ_CHUNK):
            empty = False
            view = memoryview(data)
            for start in range(0, len(view), _ZSTD_FEED):
                piece: bytes | memoryview = view[start : start + _ZSTD_FEED]
                while piece:
                    inside = True
                    out = frame.decompress(piece)
                    if out:
                        yield out
                    if not frame.eof:
                        break
                    piece, frame, inside = frame.unused_data, dctx.decompressobj(), False
    except zstandard.ZstdError as exc:
        raise StoreError(f"{path} is not valid zstd data: {exc}") from exc
    if inside:
        raise StoreError(f"{path} ends inside a zstd frame: the file was cut short")
    if empty:  # a packed file is written whole, with its frame, then renamed into place
        raise StoreError(f"{path} is empty: a zstd file holds at least one frame")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """Stream ``(offset, line, complete)`` from a segment file, decompressing ``.zst``.

    ``line`` excludes the newline; ``complete`` is false only for a final line with no newline.
    Memory stays within one read chunk (a plain file's 1 MiB, a packed file's unpacked piece of
    at most 32 MiB) plus the longest line.
    """
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    with fh:
        chunks: Iterator[bytes]
        if path.name.endswith(".zst"):
            chunks = _unzstd(fh, path)
        else:
            chunks = iter(lambda: fh.read(_READ_CHUNK), b"")
        offset = 0  # where the line being read starts
        pending: list[bytes] = []  # its pieces so far, joined once (never copied per chunk)
        pending_len = 0
        for chunk in chunks:
            start = 0
            nl = chunk.find(b"\n")
            if nl >= 0 and pending:
                line = b"".join(pending) + chunk[:nl]
                yield offset, line, True
                offset += len(line) + 1
                pending, pending_len = [], 0
                start = nl + 1
                nl = chunk.find(b"\n", start)
            while nl >= 0:
                yield offset, chunk[start:nl], True
                offset += nl - start + 1
                start = nl + 1
                nl = chunk.find(b"\n", start)
            if start < len(chunk):
                pending.append(chunk[start:])
                pending_len += len(chunk) - start
                if pending_len > MAX_LINE_BYTES:
                    raise StoreError(
                        f"{path}: the line at byte {offset} runs past"
                        f" {MAX_LINE_BYTES >> 20} MiB without an end: not a record"
                    )
        if pending:
            yield offset, b"".join(pending), False


def mtime(path: Path) -> float:
    """A file's modification time, or 0 when it cannot be read."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (a new or renamed file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` via a fsynced ``.tmp`` file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    if exclusive and path.exists():
        raise StoreError(f"{path} already exists; refusing to replace it")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def segment_size(seg: SegmentRef) -> int:
    """A segment's size in bytes, as stored (the plain file when present), or 0 when neither
    file can be read (reading it names that)."""
    for path in (seg.plain, seg.packed):
        if path is not None:
            with contextlib.suppress(OSError):
                return path.stat().st_size
    return 0


def segment_bytes(root: Path) -> int:
    """The bytes of every segment of every log of the ledger at ``root`` (0 when it is none):
    a progress bar's total, whose steps are :func:`segment_size`."""
    try:
        logs = list_logs(root)
    except StoreError:
        return 0
    return sum(segment_size(seg) for log_id in logs for seg in list_log(root, log_id).segments)
