"""Reading a store back from S3: mirror it, verify it, count it, prove from it (SPEC section 4).

:func:`mirror_s3` lists every version under the prefix (``ListObjectVersions``, page by page)
and downloads, in a thread pool and streamed to disk, the newest live version of every key into
the *local* layout, where :func:`tokentrail._verify.verify_local` does the hash, chain, Merkle
and checkpoint work. What only S3 can show is reported by the mirror itself, each finding
naming its key:

* a key with more than one version (an overwrite; the first version is the original), and a
  delete marker (a deleted object: its last version is still verified);
* an object without Object Lock retention, with a mode weaker than configured, or retained for
  less than the configured days from its upload;
* a segment whose key range ``<first>-<last>`` disagrees with its content, an object whose
  content does not match the SHA-256 it was written with, and a per-record object whose key does
  not match its record;
* an object holding records an earlier run verified (or one of its checkpoints) that was
  written after them: the version that run read was deleted for good and another put in its
  place, under the same key or another (:func:`check_replaced`). Each run with a state folder
  remembers, per log, the size it verified and when the newest object under it was written.

Per-record objects are regrouped per log in ``seq`` order (an index of ``(seq, offset)`` per
record stays in memory; record bodies are staged on disk). Objects are read with
``GetObject`` — whose response carries ``x-amz-object-lock-mode`` and
``x-amz-object-lock-retain-until-date`` — instead of ``GetObjectRetention``, which moto 5.2 does
not implement and which would double the requests.

References: Amazon S3 API Reference, ListObjectVersions, GetObject, ListObjectsV2;
Amazon S3 User Guide, "Working with delete markers", "Locking objects with Object Lock".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from .._errors import ConfigError, StoreError
from .._layout import checkpoint_name, is_log_id, iter_lines, list_logs, write_atomic
from .._proof import build_bundle
from .._record import parse_rfc3339, rfc3339
from .._verify import (
    NO_LOG,
    Finding,
    LogReport,
    Report,
    VerifyOptions,
    previous_failure,
    save_last_run,
    verify_local,
)
from ._bucket import Retention
from ._client import ClientOptions, S3Client, S3Url, as_url, make_client, map_error
from ._keys import (
    CheckpointKey,
    Layout,
    RecordKey,
    SegmentKey,
    is_ours,
    parse_key,
)
from ._shipper import META_SHA256

_READ_CHUNK = 1 << 20
#: How much shorter than "upload time + days" a retain-until date may be (clock skew).
RETENTION_SLACK = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class _Version:
    key: str
    version_id: str | None
    last_modified: datetime | None
    #: version-level findings of a per-record key, reported once its body names the log
    pending: tuple[str, ...] = ()


@dataclass
class MirrorResult:
    """What a mirror wrote and found."""

    findings: list[Finding] = field(default_factory=list)
    #: mirrored local path -> ``s3://bucket/key``
    locations: dict[str, str] = field(default_factory=dict)
    #: ``(log_id, seq)`` -> ``s3://bucket/key`` of per-record objects
    record_keys: dict[tuple[str, int], str] = field(default_factory=dict)
    #: every object read, as ``(log_id, low, key, written, event_id)``: ``low`` is the first
    #: seq it holds (a checkpoint of size n: n - 1), ``written`` its version's LastModified,
    #: ``event_id`` its first record's (``None`` for a checkpoint)
    written: list[tuple[str, int, str, datetime, str | None]] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0


@dataclass(slots=True)
class _Staged:
    seq: int
    date: str
    offset: int
    length: int
    uri: str


class _Mirror:
    """One mirror run; see the module docstring."""

    def __init__(
        self,
        client: S3Client,
        url: S3Url,
        dest: Path,
        retention: Retention | None,
        workers: int,
        log_ids: set[str] | None,
    ) -> None:
        self.client = client
        self.url = url
        self.dest = dest
        self.retention = retention
        self.workers = workers
        self.log_ids = log_ids
        self.result = MirrorResult()
        self._lock = threading.Lock()
        self._staging: IO[bytes] = tempfile.TemporaryFile(prefix="tokentrail-records-")  # noqa: SIM115
        self._staged: dict[str, list[_Staged]] = {}
        self._claimed: dict[str, str] = {}
        self._ranges: dict[str, list[tuple[int, int, str]]] = {}  # first, last, key
        self._covered: dict[str, int] = {}  # log id -> the largest checkpoint size in the bucket

    # ------------------------------------------------------------------ findings

    def finding(self, message: str, key: str, **where: Any) -> None:
        with self._lock:
            self.result.findings.append(
                Finding("finding", message, location=self.url.uri(key), **where)
            )

    def warning(self, message: str, key: str, **where: Any) -> None:
        with self._lock:
            self.result.findings.append(
                Finding("warning", message, location=self.url.uri(key), **where)
            )

    # ------------------------------------------------------------------ listing

    def _pages(self) -> Iterator[dict[str, Any]]:
        prefix = self.url.key("") if self.url.prefix else ""
        paginator = self.client.get_paginator("list_object_versions")
        try:
            yield from paginator.paginate(Bucket=self.url.bucket, Prefix=prefix)
        except Exception as exc:
            raise map_error(exc, f"ListObjectVersions {self.url}") from exc

    def _keys(self) -> Iterator[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
        """``(key, versions, delete markers)`` per key, in key order, across pages."""
        current: str | None = None
        versions: list[dict[str, Any]] = []
        markers: list[dict[str, Any]] = []
        for page in self._pages():
            entries = [(v["Key"], False, v) for v in page.get("Versions", [])]
            entries += [(m["Key"], True, m) for m in page.get("DeleteMarkers", [])]
            entries.sort(key=lambda e: e[0])  # stable: keeps each list's newest-first order
            for key, is_marker, entry in entries:
                if key != current:
                    if current is not None:
                        yield current, versions, markers
                    current, versions, markers = key, [], []
                (markers if is_marker else versions).append(entry)
        if current is not None:
            yield current, versions, markers

    # ------------------------------------------------------------------ run

    def run(self) -> MirrorResult:
        in_flight: set[concurrent.futures.Future[None]] = set()
        limit = self.workers * 4
        with concurrent.futures.ThreadPoolExecutor(self.workers, "tokentrail-s3-get") as pool:
            try:
                for key, versions, markers in self._keys():
                    if not is_ours(self.url, key):
                        continue
                    version = self._triage(key, versions, markers)
                    if version is None:
                        continue
                    if len(in_flight) >= limit:
                        done, in_flight = concurrent.futures.wait(
                            in_flight, return_when=concurrent.futures.FIRST_COMPLETED
                        )
                        for fut in done:
                            fut.result()
                    in_flight.add(pool.submit(self._fetch, version))
                for fut in concurrent.futures.as_completed(in_flight):
                    fut.result()
            finally:
                for fut in in_flight:
                    fut.cancel()
        self._write_staged()
        self._staging.close()
        self._check_gaps()
        return self.result

    def _check_gaps(self) -> None:
        """Seqs a checkpoint covers that no object holds (a deleted object leaves no marker).

        Batched from the segment keys' ranges; per-record from the records read, since a
        per-record key does not name its seq. The shipper uploads a checkpoint only after every
        record it covers, so a gap below the largest checkpoint is never an upload in flight.
        """
        held: dict[str, list[tuple[int, int]]] = {
            log_id: [(first, last) for first, last, _ in ranges]
            for log_id, ranges in self._ranges.items()
        }
        for log_id, seq in self.result.record_keys:
            held.setdefault(log_id, []).append((seq, seq))
        self._check_overlaps()
        for log_id in sorted(held.keys() | self._covered.keys()):
            if self.log_ids is not None and log_id not in self.log_ids:
                continue
            if log_id in self._ranges:
                kind, where = "segment object", self.url.key("logs", log_id, "segments")
            elif log_id in held:
                kind, where = "record object", self.url.key("audit", "")
            else:  # checkpoints, and not one record left
                kind, where = "object", self.url.key("logs", log_id, "checkpoints")
            covered = self._covered.get(log_id, 0)
            expected = 0
            # The largest checkpoint's size ends the ranges: a missing tail is a gap too.
            for first, last in [*sorted(held.get(log_id, [])), (covered, covered)]:
                if first > expected:
                    self.finding(
                        f"no {kind} holds seqs {expected}-{first - 1} (deleted objects?)",
                        where,
                        log_id=log_id,
                        seq=expected,
                    )
                expected = max(expected, last + 1)

    def _check_overlaps(self) -> None:
        """Segment objects whose key ranges overlap: a seq held twice is an inserted or
        duplicated segment (the shipper's keys are a pure function of their content's position,
        so it never writes two). Seen from the listing alone, so an incremental run, which does
        not re-read the records below what it verified before, finds it too."""
        for log_id, ranges in sorted(self._ranges.items()):
            if self.log_ids is not None and log_id not in self.log_ids:
                continue
            expected, holder = 0, ""
            for first, last, key in sorted(ranges):
                if first < expected:
                    self.finding(
                        f"segment objects overlap: seqs {first}-{min(last, expected - 1)} are"
                        f" also in {self.url.uri(holder)} (an inserted or duplicated segment)",
                        key,
                        log_id=log_id,
                        seq=first,
                    )
                if last + 1 > expected:
                    expected, holder = last + 1, key

    def _triage(
        self, key: str, versions: list[dict[str, Any]], markers: list[dict[str, Any]]
    ) -> _Version | None:
        """Report version-level findings; return the version to mirror (newest live one)."""
        parsed = parse_key(self.url, key)
        where: dict[str, Any] = {}
        if isinstance(parsed, SegmentKey | CheckpointKey):
            if self.log_ids is not None and parsed.log_id not in self.log_ids:
                return None
            where["log_id"] = parsed.log_id
            where["seq"] = parsed.first if isinstance(parsed, SegmentKey) else None
        elif isinstance(parsed, RecordKey):
            where["event_id"] = parsed.event_id
        if parsed is None:
            self.finding("unexpected object in the tokentrail layout", key)
        messages: list[str] = []
        if len(versions) > 1:
            messages.append(
                f"object has {len(versions)} versions (overwritten; tokentrail writes each key"
                " once, so every version after the first is a change)"
            )
        for marker in markers:
            messages.append(
                f"object deleted (delete marker {marker.get('VersionId')}); its last version is"
                " verified below"
            )
        # A per-record key does not name its log; its body does, so wait for _record.
        defer = isinstance(parsed, RecordKey) and bool(versions)
        if not defer:
            for message in messages:
                self.finding(message, key, **where)
        if parsed is None or not versions:
            return None
        newest = next((v for v in versions if v.get("IsLatest")), versions[0])
        if isinstance(parsed, SegmentKey):
            self._ranges.setdefault(parsed.log_id, []).append((parsed.first, parsed.last, key))
        return _Version(
            key,
            newest.get("VersionId"),
            newest.get("LastModified"),
            tuple(messages) if defer else (),
        )

    # ------------------------------------------------------------------ one object

    def _fetch(self, version: _Version) -> None:
        try:
            self._fetch_checked(version)
        except _ChecksumMismatch as exc:
            parsed = parse_key(self.url, version.key)
            where: dict[str, Any] = {}
            if isinstance(parsed, SegmentKey):
                where = {"log_id": parsed.log_id, "seq": parsed.first}
            elif isinstance(parsed, CheckpointKey):
                where = {"log_id": parsed.log_id}
            elif isinstance(parsed, RecordKey):
                where = {"event_id": parsed.event_id}
            self.finding(
                f"object's bytes do not match the checksum S3 holds for them (edited in the"
                f" bucket, or corrupted on the way in); its records are not verified: {exc}",
                version.key,
                **where,
            )

    def _fetch_checked(self, version: _Version) -> None:
        parsed = parse_key(self.url, version.key)
        params: dict[str, Any] = {"Bucket": self.url.bucket, "Key": version.key}
        if version.version_id and version.version_id != "null":
            params["VersionId"] = version.version_id
        try:
            response = self.client.get_object(**params)
        except Exception as exc:
            raise map_error(exc, f"GetObject {self.url.uri(version.key)}") from exc
        body = response["Body"]
        try:
            if isinstance(parsed, SegmentKey):
                self._segment(parsed, body, response, version)
            elif isinstance(parsed, CheckpointKey):
                self._checkpoint(parsed, body, response, version)
            elif isinstance(parsed, RecordKey):
                self._record(parsed, body, response, version)
        finally:
            body.close()

    def _note_written(
        self, log_id: str, low: int, key: str, version: _Version, event_id: str | None = None
    ) -> None:
        if isinstance(version.last_modified, datetime):
            with self._lock:
                self.result.written.append((log_id, low, key, version.last_modified, event_id))

    def _check_retention(
        self, key: str, response: dict[str, Any], version: _Version, where: dict[str, Any]
    ) -> None:
        if self.retention is None:
            return
        mode = response.get("ObjectLockMode")
        until = response.get("ObjectLockRetainUntilDate")
        if mode is None or until is None:
            self.finding("object has no Object Lock retention", key, **where)
            return
        if self.retention.mode == "COMPLIANCE" and mode != "COMPLIANCE":
            self.finding(f"object is locked in {mode} mode, not COMPLIANCE", key, **where)
        written = version.last_modified or response.get("LastModified")
        if isinstance(written, datetime) and isinstance(until, datetime):
            wanted = written + timedelta(days=self.retention.days)
            if until < wanted - RETENTION_SLACK:
                self.finding(
                    f"object retention ends {until.astimezone(UTC):%Y-%m-%d}, earlier than the"
                    f" {self.retention.days} days configured ({wanted.astimezone(UTC):%Y-%m-%d})",
                    key,
                    **where,
                )

    def _check_sha(
        self, key: str, response: dict[str, Any], digest: str, where: dict[str, Any]
    ) -> None:
        claimed = response.get("Metadata", {}).get(META_SHA256)
        if claimed is None:
            self.warning(
                "object was not written by a tokentrail shipper (no sha256 metadata)", key, **where
            )
        elif claimed != digest:
            self.finding(
                "object content does not match the SHA-256 it was written with", key, **where
            )

    def _claim(self, path: Path, uri: str) -> bool:
        """Two objects that map to one local file: keep the first, report the second."""
        with self._lock:
            other = self._claimed.get(str(path))
            if other is None:
                self._claimed[str(path)] = uri
                self.result.locations[str(path)] = uri
                return True
        return False

    def _download(self, body: Any, path: Path, version: _Version) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        tmp = path.with_name(path.name + ".part")
        try:
            with tmp.open("wb") as fh:
                for chunk in body.iter_chunks(_READ_CHUNK):
                    fh.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise StoreError(f"cannot write {tmp}: {exc.strerror}") from exc
        except Exception as exc:
            if _checksum_error(exc):
                tmp.unlink(missing_ok=True)
                raise _ChecksumMismatch(str(exc)) from exc
            raise map_error(exc, f"GetObject {self.url.uri(version.key)}") from exc
        os.replace(tmp, path)
        if version.last_modified is not None:
            stamp = version.last_modified.timestamp()
            with contextlib.suppress(OSError):
                os.utime(path, (stamp, stamp))
        with self._lock:
            self.result.objects += 1
            self.result.bytes += size
        return size

    def _segment(
        self, sk: SegmentKey, body: Any, response: dict[str, Any], version: _Version
    ) -> None:
        where: dict[str, Any] = {"log_id": sk.log_id, "seq": sk.first}
        path = self.dest / "logs" / sk.log_id / "segments" / sk.date / f"{sk.first:020d}.jsonl.zst"
        uri = self.url.uri(sk.key)
        if not self._claim(path, uri):
            self.finding(
                f"a second segment object starts at seq {sk.first} on {sk.date}"
                f" ({self._claimed[str(path)]}); this one is not verified",
                sk.key,
                **where,
            )
            return
        self._download(body, path, version)
        self._check_retention(sk.key, response, version, where)
        digest = hashlib.sha256()
        count = 0
        first = last = None
        first_event: str | None = None
        try:
            for _, line, complete in iter_lines(path):
                digest.update(line + (b"\n" if complete else b""))
                seq, event_id = _seq_and_event_id(line)
                if count == 0:
                    first, first_event = seq, event_id
                last = seq
                count += 1
        except StoreError as exc:
            self.finding(f"segment object is unreadable: {exc}", sk.key, **where)
            return
        finally:
            self._note_written(sk.log_id, sk.first, sk.key, version, first_event)
        self._check_sha(sk.key, response, digest.hexdigest(), where)
        if (first, last, count) != (sk.first, sk.last, sk.last - sk.first + 1):
            self.finding(
                f"segment key names seqs {sk.first}-{sk.last} ({sk.last - sk.first + 1} records)"
                f" but the object holds {count} records, seqs {first}-{last}",
                sk.key,
                **where,
            )

    def _checkpoint(
        self, ck: CheckpointKey, body: Any, response: dict[str, Any], version: _Version
    ) -> None:
        where: dict[str, Any] = {"log_id": ck.log_id}
        with self._lock:
            self._covered[ck.log_id] = max(self._covered.get(ck.log_id, 0), ck.size)
        path = self.dest / "logs" / ck.log_id / "checkpoints" / checkpoint_name(ck.size)
        if not self._claim(path, self.url.uri(ck.key)):
            return
        self._download(body, path, version)
        self._note_written(ck.log_id, ck.size - 1, ck.key, version)
        self._check_retention(ck.key, response, version, where)
        self._check_sha(ck.key, response, hashlib.sha256(path.read_bytes()).hexdigest(), where)
        (path.parent.parent / "segments").mkdir(parents=True, exist_ok=True)

    def _record(
        self, rk: RecordKey, body: Any, response: dict[str, Any], version: _Version
    ) -> None:
        where: dict[str, Any] = {"event_id": rk.event_id}
        try:
            leaf = body.read()
        except Exception as exc:
            if _checksum_error(exc):
                raise _ChecksumMismatch(str(exc)) from exc
            raise map_error(exc, f"GetObject {self.url.uri(rk.key)}") from exc
        with self._lock:
            self.result.objects += 1
            self.result.bytes += len(leaf)
        try:
            obj = orjson.loads(leaf)
            log_id, seq = obj["log_id"], obj["seq"]
            if not isinstance(log_id, str) or type(seq) is not int or seq < 0:
                raise TypeError("log_id or seq of the wrong type")
            if not is_log_id(log_id):
                # It becomes a folder of the mirror: never a path out of it.
                raise TypeError(f"log_id {log_id!r} is not a log id")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            for message in version.pending:
                self.finding(message, rk.key, **where)
            self.finding(f"per-record object is not a tokentrail record ({exc})", rk.key, **where)
            return
        if self.log_ids is not None and log_id not in self.log_ids:
            return
        where.update(log_id=log_id, seq=seq)
        for message in version.pending:
            self.finding(message, rk.key, **where)
        self._note_written(log_id, seq, rk.key, version, rk.event_id)
        self._check_retention(rk.key, response, version, where)
        self._check_sha(rk.key, response, hashlib.sha256(leaf).hexdigest(), where)
        timestamp = obj.get("timestamp")
        date = str(timestamp)[:10] if isinstance(timestamp, str) else rk.date
        if not _DAY_RE.fullmatch(date):  # a folder of the mirror too: the key's day, checked
            date = rk.date
        if obj.get("event_id") != rk.event_id or date != rk.date:
            self.finding(
                f"object key does not match its record (event_id {obj.get('event_id')!r},"
                f" timestamp {timestamp!r})",
                rk.key,
                **where,
            )
        uri = self.url.uri(rk.key)
        with self._lock:
            offset = self._staging.seek(0, os.SEEK_END)
            self._staging.write(leaf + b"\n")
            self._staged.setdefault(log_id, []).append(
                _Staged(seq, date, offset, len(leaf) + 1, uri)
            )
            other = self.result.record_keys.setdefault((log_id, seq), uri)
        if other != uri:  # read from the listing, so an incremental run finds it too
            self.finding(
                f"two record objects hold seq {seq}: this one and {other} (an inserted or"
                " duplicated record)",
                rk.key,
                **where,
            )

    def _write_staged(self) -> None:
        """Write per-record objects as local segments, in seq order, one per UTC date."""
        for log_id, entries in self._staged.items():
            entries.sort(key=lambda e: (e.seq, e.uri))
            seg_root = self.dest / "logs" / log_id / "segments"
            (self.dest / "logs" / log_id / "checkpoints").mkdir(parents=True, exist_ok=True)
            out: IO[bytes] | None = None
            date = ""
            try:
                for entry in entries:
                    if out is None or entry.date > date:
                        if out is not None:
                            out.close()
                        date = max(date, entry.date)
                        folder = seg_root / date
                        folder.mkdir(parents=True, exist_ok=True)
                        path = folder / f"{entry.seq:020d}.jsonl"
                        out = path.open("ab")
                    self._staging.seek(entry.offset)
                    out.write(self._staging.read(entry.length))
            finally:
                if out is not None:
                    out.close()
        self._staged.clear()


_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class _ChecksumMismatch(Exception):
    """An object's body does not match the checksum S3 returned with it (botocore checks)."""


def _checksum_error(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's ``FlexibleChecksumError`` (botocore, an optional
    dependency, is imported only where S3 is used)."""
    return type(exc).__name__ == "FlexibleChecksumError"


def _seq_and_event_id(line: bytes) -> tuple[int | None, str | None]:
    """A record line's ``seq`` and ``event_id``, each ``None`` when absent or of another type."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    seq, event_id = obj.get("seq"), obj.get("event_id")
    return (
        seq if isinstance(seq, int) else None,
        event_id if isinstance(event_id, str) else None,
    )


def _client(client: S3Client | None, options: ClientOptions | None) -> S3Client:
    return client if client is not None else make_client(options)


def mirror_store(
    url: str | S3Url,
    dest_root: Path,
    *,
    client: S3Client | None = None,
    client_options: ClientOptions | None = None,
    retention: Retention | None = None,
    check_retention: bool = True,
    workers: int = 16,
    log_ids: set[str] | None = None,
) -> MirrorResult:
    """Download the store into the local layout under ``dest_root``; see the module docstring.

    ``retention`` is what every object must have (default GOVERNANCE, 2555 days).
    """
    url = as_url(url)
    mirror = _Mirror(
        _client(client, client_options),
        url,
        dest_root,
        (retention or Retention()) if check_retention else None,
        workers,
        log_ids,
    )
    return mirror.run()


def mirror_s3(
    url: str | S3Url,
    dest_root: Path,
    **options: Any,
) -> list[Finding]:
    """Mirror the store into ``dest_root`` and return the S3-level findings."""
    return mirror_store(url, dest_root, **options).findings


def _relocate(finding: Finding, result: MirrorResult, tmp: Path, url: S3Url) -> Finding:
    """Name the S3 object instead of the temporary file: the mirrored object itself, else
    (per-record) the record's object, else the key under the same relative path; in the
    message too (a finding about an edit names the record after it, and its file)."""
    if str(tmp) in finding.message:
        message = _message_uris(finding.message, result, tmp, url, finding.log_id)
        finding = dataclasses.replace(finding, message=message)
    location = finding.location
    if location is not None and location in result.locations:
        return dataclasses.replace(finding, location=result.locations[location])
    if finding.log_id is not None and finding.seq is not None:
        uri = result.record_keys.get((finding.log_id, finding.seq))
        if uri is not None:
            return dataclasses.replace(finding, location=uri)
    if location is None:
        return finding
    with contextlib.suppress(ValueError):
        rel = Path(location).relative_to(tmp)
        return dataclasses.replace(finding, location=url.uri(url.key(*rel.parts)))
    return finding


def _message_uris(
    message: str, result: MirrorResult, tmp: Path, url: S3Url, log_id: str | None
) -> str:
    """``message`` with each path into the temporary mirror replaced by its ``s3://`` URI: a
    mirrored object's own, else, after ``seq N, event_id E, `` (a record named in the message),
    that record's per-record object, else the key under the same relative path."""

    def uri(match: re.Match[str]) -> str:
        named, seq, path = match.group(1) or "", match.group(2), match.group(3)
        if path in result.locations:
            return named + result.locations[path]
        record = result.record_keys.get((log_id, int(seq))) if seq and log_id else None
        if record is not None:
            return named + record
        return named + url.uri(url.key(*Path(path).relative_to(tmp).parts))

    pattern = r"(seq (\d+), event_id [^\s,]+, )?(" + re.escape(str(tmp)) + r"/[^\s,;)]+)"
    return re.sub(pattern, uri, message)


def _written_path(state_dir: Path, store: str) -> Path:
    """Beside the witness states, named apart from their ``*.json``."""
    return state_dir / f"s3-written-{hashlib.sha256(store.encode()).hexdigest()[:32]}"


class Verified(NamedTuple):
    """What the last clean run verified of one log: its size, S3's ``LastModified`` of the
    newest object under that size, and when the run was."""

    size: int
    newest: datetime
    verified_at: str


def load_written(state_dir: Path, store: str) -> dict[str, Verified]:
    """Per log, what the last clean run verified (:class:`Verified`); ``{}`` before any."""
    path = _written_path(state_dir, store)
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    except orjson.JSONDecodeError:
        raise StoreError(f"{path} is not JSON; remove it to start over") from None
    logs = data.get("logs") if isinstance(data, dict) and data.get("store") == store else None
    bad = StoreError(f"{path} is not a state of {store}; remove it to start over")
    if not isinstance(logs, dict):
        raise bad
    known: dict[str, Verified] = {}
    for log_id, entry in logs.items():
        if not isinstance(entry, dict):
            raise bad
        size, newest = entry.get("size"), parse_rfc3339(entry.get("newest"))
        if type(size) is not int or newest is None:
            raise bad
        known[log_id] = Verified(size, newest, str(entry.get("verified_at")))
    return known


def check_replaced(url: S3Url, result: MirrorResult, known: dict[str, Verified]) -> list[Finding]:
    """Objects written after an earlier run had verified what they hold.

    Every object holding seqs below the size a run verified was there when it ran, and was
    written no later than the newest of them (S3's own clock, both sides). So one holding such
    seqs, or a checkpoint that size covered, with a later LastModified replaces a version that
    run read, deleted for good since (a governance bypass): the listing shows one version, and
    content and checksum may be forged to match. Found even by a run that reads no record
    below that size.
    """
    found: list[Finding] = []
    for log_id, low, key, written, event_id in sorted(result.written, key=lambda w: w[:3]):
        seen = known.get(log_id)
        if seen is None or low >= seen.size or written <= seen.newest:
            continue
        found.append(
            Finding(
                "finding",
                f"object written {rfc3339(written)}, after the run of {seen.verified_at}"
                f" verified the {seen.size} records it covers (the newest object then written"
                f" {rfc3339(seen.newest)}): the object that run read for them was deleted for"
                " good and this one put in its place (at its key or another)",
                log_id,
                seq=None if isinstance(parse_key(url, key), CheckpointKey) else low,
                event_id=event_id,
                location=url.uri(key),
            )
        )
    return found


def save_written(
    state_dir: Path, store: str, result: MirrorResult, report: Report, when: datetime
) -> None:
    """Remember, per log verified clean this run, its verified size and when the newest object
    under it was written; a log with findings keeps what the last clean run remembered."""
    known = load_written(state_dir, store)
    sizes = {
        lg.log_id: lg.verified_size
        for lg in report.logs
        if not lg.suppressed and not any(f.level == "finding" for f in lg.findings)
    }
    newest: dict[str, datetime] = {}
    for log_id, low, _, written, _ in result.written:
        if low < sizes.get(log_id, 0) and (log_id not in newest or written > newest[log_id]):
            newest[log_id] = written
    for log_id, latest in newest.items():
        known[log_id] = Verified(sizes[log_id], latest, rfc3339(when))
    logs = {
        log_id: {"size": v.size, "newest": rfc3339(v.newest), "verified_at": v.verified_at}
        for log_id, v in known.items()
    }
    path = _written_path(state_dir, store)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, orjson.dumps({"store": store, "logs": logs}, option=orjson.OPT_INDENT_2))
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from exc


def verify_s3(
    url: str | S3Url,
    options: VerifyOptions,
    *,
    client: S3Client | None = None,
    client_options: ClientOptions | None = None,
    retention: Retention | None = None,
    workers: int = 16,
) -> Report:
    """Verify a store in S3: mirror it to a temporary folder, verify that, merge S3 findings.

    Raises StoreError when the store cannot be read or holds nothing of tokentrail's.
    """
    url = as_url(url)
    with tempfile.TemporaryDirectory(prefix="tokentrail-s3-") as tmp_name:
        tmp = Path(tmp_name)
        result = mirror_store(
            url,
            tmp,
            client=client,
            client_options=client_options,
            retention=retention,
            workers=workers,
        )
        has_logs = (tmp / "logs").is_dir() and bool(list_logs(tmp))
        if has_logs:
            local = verify_local(tmp, dataclasses.replace(options, store=str(url)), note_run=False)
            logs = [
                dataclasses.replace(
                    lg, findings=[_relocate(f, result, tmp, url) for f in lg.findings]
                )
                for lg in local.logs
            ]
        elif result.findings:
            logs = []
        else:
            raise StoreError(f"{url} holds no tokentrail objects (nothing shipped there yet?)")
    if options.state_dir is not None:
        result.findings += check_replaced(url, result, load_written(options.state_dir, str(url)))
    by_log = {lg.log_id: lg for lg in logs}
    for item in result.findings:
        name = item.log_id or NO_LOG
        target = by_log.get(name)
        if target is None:
            target = by_log[name] = LogReport(name)
            logs.append(target)
        target.add(item)
    if stands := previous_failure(options, str(url)):
        logs.append(stands)
    outcome = Report(str(url), logs)
    if options.state_dir is not None:
        save_written(options.state_dir, str(url), result, outcome, options.now)
        save_last_run(options.state_dir, outcome, options.now, str(url), full=options.full)
    return outcome


def count_s3(
    url: str | S3Url,
    day: str,
    *,
    layout: Layout | None = None,
    client: S3Client | None = None,
    client_options: ClientOptions | None = None,
) -> int:
    """Records appended on UTC ``day`` (YYYY-MM-DD): from keys alone, no object is read.

    Batched: the sum of ``last - first + 1`` over that day's segment keys of every log;
    per-record: the keys under ``audit/<day>/``. ``layout=None`` counts whichever is present.
    """
    url = as_url(url)
    try:
        datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"day {day!r} is not YYYY-MM-DD") from None
    s3 = _client(client, client_options)
    batched = per_record = 0
    if layout in (None, "batched"):
        for log_prefix in _common_prefixes(s3, url, url.key("logs", "")):
            for key in _list_keys(s3, url, f"{log_prefix}segments/{day}/"):
                parsed = parse_key(url, key)
                if isinstance(parsed, SegmentKey):
                    batched += parsed.last - parsed.first + 1
    if layout in (None, "per-record"):
        for key in _list_keys(s3, url, url.key("audit", day, "")):
            if isinstance(parse_key(url, key), RecordKey):
                per_record += 1
    if layout is None and batched and per_record:
        raise ConfigError(
            f"{url} holds both layouts for {day} ({batched} batched, {per_record} per-record"
            " records); say which to count"
        )
    return batched + per_record


def _list_keys(client: S3Client, url: S3Url, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=url.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]
    except Exception as exc:
        raise map_error(exc, f"ListObjectsV2 {url.uri(prefix)}") from exc


def _common_prefixes(client: S3Client, url: S3Url, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=url.bucket, Prefix=prefix, Delimiter="/"):
            for entry in page.get("CommonPrefixes", []):
                yield entry["Prefix"]
    except Exception as exc:
        raise map_error(exc, f"ListObjectsV2 {url.uri(prefix)}") from exc


def prove_s3(
    url: str | S3Url,
    event_id: str,
    tree_size: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """An inclusion proof bundle for ``event_id``, built from a mirror of the store."""
    with tempfile.TemporaryDirectory(prefix="tokentrail-s3-") as tmp_name:
        tmp = Path(tmp_name)
        mirror_store(url, tmp, check_retention=False, **options)
        if not (tmp / "logs").is_dir():
            raise StoreError(f"{as_url(url)} holds no tokentrail objects")
        return build_bundle(tmp, event_id, tree_size)
