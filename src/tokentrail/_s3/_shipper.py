"""The shipper: copies a local ledger's closed segments and its checkpoints to S3 (SPEC 3, 6).

The writer appends to the local ledger first (strict durability); the shipper works from that
spool and never changes it, so an S3 outage or a crash loses nothing. Each pass, per log:

1. list the segments; a segment is *closed* unless a live writer (its ``writer.lock`` is held:
   tested with a non-blocking ``flock``) names it in ``open-segment``; empty segments wait;
2. every closed segment not yet shipped is uploaded — batched: one zstd object
   ``.../<first>-<last>.jsonl.zst`` whose decompressed bytes are the local lines byte for byte;
   per-record: one object per record, body = the leaf, at
   ``audit/<timestamp[:10]>/<event_id>.json``;
3. every checkpoint whose records are all uploaded is uploaded, in size order.

Every PUT carries ``ObjectLockMode`` and ``ObjectLockRetainUntilDate``, an ``x-amz-checksum-sha256``
the store verifies, and ``If-None-Match: *``, so a retried upload can never make a second version:
a 412 answer is followed by a HEAD (or GET) and counts as shipped when the content is the same,
and is an error — never an overwrite — when it differs. Stores without conditional writes
(``501 NotImplemented``) get a HEAD before each PUT instead. Failures are retried with capped
exponential backoff and full jitter. What has been shipped is remembered in
``<root>/logs/<log_id>/shipped.json``; S3 stays the truth, so a lost file only costs HEADs.

The disk budget: when the local data not yet in S3 passes 80 % of ``max_spool_bytes`` a warning
is logged each pass (an error once it passes 100 %); :attr:`Shipper.spool_full` lets a writer
refuse new work.

References: Amazon S3 API Reference, PutObject (``If-None-Match``, ``x-amz-object-lock-mode``,
``x-amz-object-lock-retain-until-date``, ``x-amz-checksum-sha256``, ``x-amz-meta-*``),
HeadObject; Amazon S3 User Guide, "How to prevent object overwrites with conditional writes";
AWS Architecture Blog, "Exponential Backoff And Jitter" (full jitter).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson
import zstandard

from .._errors import ConfigError, StoreError, TokentrailError
from .._layout import (
    SegmentRef,
    iter_lines,
    list_log,
    list_logs,
    log_dir,
    segment_size,
    write_atomic,
)
from .._ledger import OPEN_SEGMENT_FILE, writer_is_live
from ._bucket import Retention, check_bucket
from ._client import (
    ClientOptions,
    S3Client,
    S3Url,
    as_url,
    error_code,
    is_transient,
    make_client,
    map_error,
)
from ._keys import Layout, checkpoint_key, record_key, segment_key

log = logging.getLogger("tokentrail.s3")

PROGRESS_FILE = "shipped.json"
SPOOL_WARN_FRACTION = 0.8
DEFAULT_MAX_SPOOL_BYTES = 10 << 30
#: Object metadata: SHA-256 (hex) of the content as the ledger holds it (decompressed).
META_SHA256 = "tokentrail-sha256"
META_RECORDS = "tokentrail-records"
_SPOOL_IN_MEMORY = 8 << 20
_READ_CHUNK = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class ShipperConfig:
    """What to ship where, and how hard to try."""

    root: Path
    url: S3Url
    layout: Layout = "batched"
    retention: Retention = field(default_factory=Retention)
    client: ClientOptions = field(default_factory=lambda: ClientOptions(attempts=1))
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES
    workers: int = 8
    log_ids: tuple[str, ...] | None = None
    check_bucket: bool = True
    compression_level: int = 3

    def __post_init__(self) -> None:
        if self.layout not in ("batched", "per-record"):
            raise ConfigError(f"layout must be 'batched' or 'per-record', not {self.layout!r}")
        if self.max_attempts < 1 or self.workers < 1:
            raise ConfigError("max attempts and workers must be at least 1")
        if self.max_spool_bytes < 1:
            raise ConfigError("the spool budget must be positive")


@dataclass
class ShipReport:
    """What one pass did."""

    segments: int = 0
    records: int = 0
    checkpoints: int = 0
    already_present: int = 0
    bytes_sent: int = 0
    unshipped_bytes: int = 0
    waiting: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log."""
        return (
            f"shipped {self.segments} segments ({self.records} records) and"
            f" {self.checkpoints} checkpoints, {self.bytes_sent} bytes sent;"
            f" {self.already_present} of their objects were in S3 already (not sent again);"
            f" {self.unshipped_bytes} local bytes not yet in S3"
        )


class Backoff:
    """Capped exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**n))``."""

    def __init__(self, base_s: float, cap_s: float, rng: Callable[[], float] = random.random):
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return float(self.rng() * min(self.cap_s, self.base_s * 2.0 ** min(attempt, 30)))


# ---------------------------------------------------------------------- the local side


def _open_marker(log_folder: Path) -> str | None:
    try:
        return (log_folder / OPEN_SEGMENT_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {log_folder / OPEN_SEGMENT_FILE}: {exc.strerror}") from exc


def _seg_id(seg: SegmentRef) -> str:
    return f"{seg.date}/{seg.first_seq:020d}"


def _segment_lines(seg: SegmentRef) -> Iterator[tuple[int, bytes, bool]]:
    """Lines of a segment; falls back to ``.zst`` when the writer compressed it meanwhile."""
    path = seg.plain or seg.packed
    assert path is not None
    try:
        yield from iter_lines(path)
    except StoreError:
        packed = path.with_name(path.name + ".zst")
        if path is seg.plain and not path.exists() and packed.exists():
            yield from iter_lines(packed)
        else:
            raise


@dataclass
class _Progress:
    """``shipped.json``: which segments and checkpoints of one log are in S3."""

    target: str
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: set[int] = field(default_factory=set)

    def shipped_through(self) -> int:
        """How many records, from seq 0 on, are all in S3."""
        through = 0
        for entry in sorted(self.segments.values(), key=lambda e: int(e["first"])):
            if int(entry["first"]) > through:
                break
            through = max(through, int(entry["last"]) + 1)
        return through

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "target": self.target,
                "segments": self.segments,
                "checkpoints": sorted(self.checkpoints),
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def load(cls, path: Path, target: str) -> _Progress:
        try:
            obj = orjson.loads(path.read_bytes())
            if obj["target"] != target:
                return cls(target)  # another bucket or layout: S3 (via HEAD) is the truth
            return cls(target, dict(obj["segments"]), {int(s) for s in obj["checkpoints"]})
        except FileNotFoundError:
            return cls(target)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); S3 will be checked instead", path, exc)
            return cls(target)


@dataclass
class _Packed:
    """A segment ready to upload."""

    first: int
    last: int
    count: int
    sha256: str  # of the lines as stored locally
    body: IO[bytes] | None  # the zstd object (batched layout)
    lines: list[bytes] | None  # the leaves (per-record layout)
    size: int


# ---------------------------------------------------------------------- the shipper


class Shipper:
    """Ships one local ledger to one S3 store; thread-safe to :meth:`start` and :meth:`stop`."""

    def __init__(self, config: ShipperConfig, client: S3Client | None = None) -> None:
        self.config = config
        self.client = client if client is not None else make_client(config.client)
        self.backoff = Backoff(config.backoff_base_s, config.backoff_cap_s)
        self.last_report: ShipReport | None = None
        self.last_error: TokentrailError | None = None
        self.unshipped_bytes = 0
        #: When a pass last shipped everything it found (Unix time), for monitoring.
        self.last_success: float | None = None
        self._conditional = True
        self._checked = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass_lock = threading.Lock()
        self._target = f"{config.url}|{config.layout}"

    # ------------------------------------------------------------------ public API

    @property
    def spool_full(self) -> bool:
        """Whether the unshipped local data has reached the disk budget."""
        return self.unshipped_bytes >= self.config.max_spool_bytes

    def check(self) -> None:
        """Refuse a bucket without versioning and Object Lock (ConfigError naming the fix), and
        a log the bucket holds more of than the local ledger (batched layout)."""
        check_bucket(self.client, self.config.url, probe=False)
        if self.config.layout == "batched":
            for log_id in self._log_ids():
                self._check_continues(log_id)
        self._checked = True

    def _check_continues(self, log_id: str) -> None:
        """Refuse to ship a log whose local records are fewer than a checkpoint in the bucket
        covers: a ledger lost and begun again under the same log id (a rebuilt host keeps its
        name), or another writer's log. Its records would go into the locked bucket as a second
        history of one log, which nobody can take out again (the local ledger is never
        pruned, so a genuine one always holds at least what it shipped)."""
        prefix = checkpoint_key(self.config.url, log_id, 0).rsplit("/", 1)[0] + "/"
        shipped = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.url.bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[1]
                    if name.endswith(".checkpoint") and name[:-11].isdigit():
                        shipped = max(shipped, int(name[:-11]))
        except Exception as exc:
            raise map_error(exc, f"ListObjectsV2 {self.config.url.uri(prefix)}") from exc
        local = max(list_log(self.config.root, log_id).checkpoints, default=0)
        if shipped > local:
            raise ConfigError(
                f"{self.config.url} holds a checkpoint of {shipped} records of log {log_id}, but"
                f" the local ledger {self.config.root} has {local} sealed: a ledger lost and"
                " begun again under the same log id, or another writer's log; its records would"
                " go into the locked bucket as a second history of the log. Use another log id"
                " (--log-id), or restore the ledger"
            )

    def ship_once(self) -> ShipReport:
        """One pass over every log; raises the first error after trying every log."""
        with self._pass_lock:
            report = ShipReport()
            errors: list[TokentrailError] = []
            try:
                if self.config.check_bucket and not self._checked:
                    try:
                        self._retry(self.check, f"checking {self.config.url}")
                    except TokentrailError as exc:
                        self.last_error = exc
                        raise
                for log_id in self._log_ids():
                    try:
                        self._ship_log(log_id, report)
                    except TokentrailError as exc:
                        errors.append(exc)
                        log.error("shipping log %s to %s failed: %s", log_id, self.config.url, exc)
            finally:
                # Measured even when S3 is unreachable: that is when the alarm matters.
                report.unshipped_bytes = self._measure_spool()
                self.last_report = report
            self.last_error = errors[0] if errors else None
            if errors:
                raise errors[0]
            self.last_success = time.time()
            return report

    async def aship_once(self) -> ShipReport:
        """:meth:`ship_once` off the event loop (boto3 in a worker thread)."""
        return await asyncio.to_thread(self.ship_once)

    def run(self, interval_s: float = 10.0) -> None:
        """Ship every ``interval_s`` until :meth:`stop`; back off while shipping fails.

        After a stop it makes one last pass (the drain), whose retries no longer wait.
        """
        failures = 0
        while True:
            stopping = self._stop.is_set()
            try:
                report = self.ship_once()
            except TokentrailError as exc:
                failures += 1
                wait = max(self.backoff.delay(failures), min(interval_s, 1.0))
                log.error("S3 shipping pass failed (%s); next try in %.1fs", exc, wait)
            else:
                failures = 0
                wait = interval_s
                if report.segments or report.checkpoints:
                    log.info("%s", report.summary())
            if stopping:
                return
            self._stop.wait(wait)

    def start(self, interval_s: float = 10.0) -> None:
        """Run :meth:`run` in a daemon thread."""
        if self._thread is not None:
            raise StoreError("shipper already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(interval_s,), name="tokentrail-s3-shipper", daemon=True
        )
        self._thread.start()

    def request_stop(self) -> None:
        """Ask :meth:`run` to make its last pass and return (safe from a signal handler)."""
        self._stop.set()

    @property
    def running(self) -> bool:
        """Whether the shipping thread is still at work (after a :meth:`stop` that timed out)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after one last pass (which gives up quickly if S3 is away); wait at
        most ``timeout`` seconds for it (a hung S3 answers nothing: the daemon thread is then
        left to the process's exit, the records stay in the local spool)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    # ------------------------------------------------------------------ one log

    def _log_ids(self) -> list[str]:
        if self.config.log_ids is not None:
            return list(self.config.log_ids)
        return list_logs(self.config.root)

    def _ship_log(self, log_id: str, report: ShipReport) -> None:
        folder = log_dir(self.config.root, log_id)
        progress_path = folder / PROGRESS_FILE
        progress = _Progress.load(progress_path, self._target)
        listing = list_log(self.config.root, log_id)
        pending = [seg for seg in listing.segments if _seg_id(seg) not in progress.segments]
        sizes = {_seg_id(seg): segment_size(seg) for seg in pending}
        # Read the marker after the listing and the sizes: a segment with data that the marker
        # does not name now was closed before we looked, and never changes again.
        live = writer_is_live(folder)
        marker = _open_marker(folder) if live else None
        for seg in pending:
            name = f"{seg.date}/{seg.first_seq:020d}.jsonl"
            if live and (marker == name or sizes[_seg_id(seg)] == 0):
                report.waiting.append(f"{log_id}/{name} (open)")
                break
            if sizes[_seg_id(seg)] == 0:
                continue  # a dead writer's empty segment: nothing to ship, ever
            packed = self._pack(seg, log_id)
            if packed is None:
                report.waiting.append(f"{log_id}/{name} (incomplete final line)")
                break
            try:
                present, sent = self._ship_segment(log_id, seg, packed)
            finally:
                if packed.body is not None:
                    packed.body.close()
            report.segments += 1
            report.records += packed.count
            report.already_present += present
            report.bytes_sent += sent
            progress.segments[_seg_id(seg)] = {
                "first": packed.first,
                "last": packed.last,
                "records": packed.count,
                "sha256": packed.sha256,
            }
            self._save(progress_path, progress)
        through = progress.shipped_through()
        for size, path in sorted(listing.checkpoints.items()):
            if size in progress.checkpoints:
                continue
            if size > through:
                break  # its records are not all in S3 yet
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StoreError(f"cannot read checkpoint {path}: {exc.strerror}") from exc
            key = checkpoint_key(self.config.url, log_id, size)
            digest = hashlib.sha256(data).hexdigest()
            uploaded = self._put(key, data, digest, "text/plain; charset=utf-8", {})
            report.checkpoints += 1
            report.already_present += 0 if uploaded else 1
            report.bytes_sent += len(data) if uploaded else 0
            progress.checkpoints.add(size)
            self._save(progress_path, progress)

    def _pack(self, seg: SegmentRef, log_id: str) -> _Packed | None:
        """Read a closed segment: compress it (batched) or collect its leaves (per-record).

        ``None`` when its final line is incomplete (a crashed writer's torn write, which a
        restarting writer moves aside): such a segment waits.
        """
        digest = hashlib.sha256()
        first = last = -1
        count = 0
        per_record = self.config.layout == "per-record"
        leaves: list[bytes] = []
        spool: IO[bytes] | None = None
        writer: Any = None
        if not per_record:
            spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
            cctx = zstandard.ZstdCompressor(level=self.config.compression_level)
            writer = cctx.stream_writer(spool, closefd=False)
        try:
            last_line = b""
            for _, line, complete in _segment_lines(seg):
                if not complete:
                    if spool is not None:
                        spool.close()
                    return None
                digest.update(line)
                digest.update(b"\n")
                if count == 0:
                    first = _seq_of(line, seg)
                count += 1
                last_line = line
                if per_record:
                    leaves.append(line)
                else:
                    writer.write(line)
                    writer.write(b"\n")
            if count:
                last = _seq_of(last_line, seg)
            if writer is not None:
                writer.flush(zstandard.FLUSH_FRAME)
                writer.close()
        except BaseException:
            if spool is not None:
                spool.close()
            raise
        if spool is not None:
            size = spool.tell()
            spool.seek(0)
        else:
            size = sum(len(leaf) for leaf in leaves)
        if count and seg.first_seq != first:
            log.warning("log %s: segment %s starts with seq %d", log_id, _seg_id(seg), first)
        return _Packed(first, last, count, digest.hexdigest(), spool, leaves or None, size)

    def _ship_segment(self, log_id: str, seg: SegmentRef, packed: _Packed) -> tuple[int, int]:
        """Upload one packed segment; return how many of its objects were already there, and
        the bytes sent (a per-record segment cut short by a crash is partly there)."""
        url = self.config.url
        if packed.body is not None:
            key = segment_key(url, log_id, seg.date, packed.first, packed.last)
            meta = {META_RECORDS: str(packed.count)}
            if self._put(key, packed.body, packed.sha256, "application/zstd", meta):
                return 0, packed.size
            return 1, 0
        assert packed.lines is not None

        def one(leaf: bytes) -> bool:
            try:
                obj = orjson.loads(leaf)
                key = record_key(url, str(obj["timestamp"])[:10], str(obj["event_id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise StoreError(
                    f"log {log_id} segment {_seg_id(seg)}: a record without a usable timestamp"
                    f" or event_id ({exc}); cannot name its per-record object"
                ) from exc
            return self._put(key, leaf, hashlib.sha256(leaf).hexdigest(), "application/json", {})

        workers = min(self.config.workers, len(packed.lines))
        with concurrent.futures.ThreadPoolExecutor(workers, "tokentrail-s3-put") as pool:
            results = list(pool.map(one, packed.lines))
        sent = sum(
            len(leaf) for leaf, uploaded in zip(packed.lines, results, strict=True) if uploaded
        )
        return sum(1 for uploaded in results if not uploaded), sent

    # ------------------------------------------------------------------ one object

    def _put(
        self,
        key: str,
        body: bytes | IO[bytes],
        content_sha256: str,
        content_type: str,
        metadata: dict[str, str],
    ) -> bool:
        """Write ``key`` once: True when uploaded now, False when the same content was there."""
        sent_b64 = base64.b64encode(_sha256_of(body)).decode()
        uri = self.config.url.uri(key)
        meta = {META_SHA256: content_sha256, **metadata}

        def attempt() -> bool:
            if not self._conditional and self._exists(key):
                self._same_or_fail(key, content_sha256)
                return False
            if not isinstance(body, bytes):
                body.seek(0)
            params: dict[str, Any] = {
                "Bucket": self.config.url.bucket,
                "Key": key,
                "Body": body,
                "ContentType": content_type,
                "ChecksumAlgorithm": "SHA256",
                "ChecksumSHA256": sent_b64,
                "ObjectLockMode": self.config.retention.mode,
                "ObjectLockRetainUntilDate": self.config.retention.until(datetime.now(UTC)),
                "Metadata": meta,
            }
            if self._conditional:
                params["IfNoneMatch"] = "*"
            try:
                self.client.put_object(**params)
            except Exception as exc:
                code = error_code(exc)
                if code in ("PreconditionFailed", "412"):
                    self._same_or_fail(key, content_sha256)
                    return False
                if code in ("NotImplemented", "501") and self._conditional:
                    log.warning(
                        "%s does not support conditional writes; checking with HEAD first",
                        self.config.url,
                    )
                    self._conditional = False
                    return attempt()
                raise
            return True

        return self._retry(attempt, f"PutObject {uri}")

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.config.url.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _same_or_fail(self, key: str, content_sha256: str) -> None:
        """The object already at ``key`` must hold our content; never overwrite it."""
        bucket = self.config.url.bucket
        head = self.client.head_object(Bucket=bucket, Key=key)
        found = head.get("Metadata", {}).get(META_SHA256)
        if found is None:  # written by something else: compare the content itself
            found = _content_sha256(self.client, bucket, key)
        if found != content_sha256:
            raise StoreError(
                f"{self.config.url.uri(key)} already holds different content; refusing to"
                " overwrite it (tampering in the bucket, or two writers sharing one log id?)"
            )

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Call ``fn``, retrying transient S3 errors with backoff; map the final error."""
        attempts = self.config.max_attempts
        for n in range(attempts):
            try:
                return fn()
            except TokentrailError as exc:
                # Already mapped (by a helper): retry only what a transient failure caused.
                cause = exc.__cause__
                if cause is None or not is_transient(cause) or n == attempts - 1:
                    raise
                failure: BaseException = cause
            except Exception as exc:
                if not is_transient(exc) or n == attempts - 1:
                    raise map_error(exc, what) from exc
                failure = exc
            delay = self.backoff.delay(n)
            log.warning(
                "%s failed (%s); retry %d/%d in %.2fs", what, failure, n + 1, attempts - 1, delay
            )
            self._stop.wait(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ bookkeeping

    def _save(self, path: Path, progress: _Progress) -> None:
        try:
            write_atomic(path, progress.to_bytes())
        except OSError as exc:
            log.warning("cannot record shipping progress in %s: %s", path, exc.strerror)

    def _measure_spool(self) -> int:
        """Bytes of local segments not yet in S3; warn past 80 % of the budget."""
        total = 0
        for log_id in self._log_ids():
            folder = log_dir(self.config.root, log_id)
            progress = _Progress.load(folder / PROGRESS_FILE, self._target)
            for seg in list_log(self.config.root, log_id).segments:
                if _seg_id(seg) not in progress.segments:
                    total += segment_size(seg)
        self.unshipped_bytes = total
        budget = self.config.max_spool_bytes
        if total >= budget:
            log.error(
                "tokentrail S3 spool FULL: %d bytes of the local ledger are not in %s yet, over"
                " the %d-byte budget; is S3 reachable?",
                total,
                self.config.url,
                budget,
            )
        elif total >= SPOOL_WARN_FRACTION * budget:
            log.warning(
                "tokentrail S3 spool at %.0f%%: %d bytes of the local ledger are not in %s yet"
                " (budget %d bytes); is S3 reachable?",
                100.0 * total / budget,
                total,
                self.config.url,
                budget,
            )
        return total


def _seq_of(line: bytes, seg: SegmentRef) -> int:
    try:
        seq = orjson.loads(line)["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise StoreError(f"{seg.path}: unreadable record line ({exc})") from exc
    if not isinstance(seq, int):
        raise StoreError(f"{seg.path}: record without an integer seq")
    return seq


def _sha256_of(body: bytes | IO[bytes]) -> bytes:
    if isinstance(body, bytes):
        return hashlib.sha256(body).digest()
    body.seek(0)
    h = hashlib.sha256()
    while chunk := body.read(_READ_CHUNK):
        h.update(chunk)
    body.seek(0)
    return h.digest()


def _content_sha256(client: S3Client, bucket: str, key: str) -> str:
    """SHA-256 (hex) of an object's content as the ledger holds it (decompressing ``.zst``)."""
    stream = client.get_object(Bucket=bucket, Key=key)["Body"]
    h = hashlib.sha256()
    try:
        if key.endswith(".zst"):
            reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
            while chunk := reader.read(_READ_CHUNK):
                h.update(chunk)
        else:
            for chunk in stream.iter_chunks(_READ_CHUNK):
                h.update(chunk)
    except zstandard.ZstdError:
        return "not-zstd"
    finally:
        stream.close()
    return h.hexdigest()


def ship_once(
    root: Path,
    url: str | S3Url,
    *,
    layout: Layout = "batched",
    retention: Retention | None = None,
    client_options: ClientOptions | None = None,
    client: S3Client | None = None,
    **options: Any,
) -> ShipReport:
    """Ship everything closed under ``root`` to ``url`` once (see :class:`Shipper`)."""
    config = ShipperConfig(
        root=root,
        url=as_url(url),
        layout=layout,
        retention=retention or Retention(),
        client=client_options or ClientOptions(attempts=1),
        **options,
    )
    return Shipper(config, client).ship_once()
