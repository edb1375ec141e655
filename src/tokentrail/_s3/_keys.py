"""The S3 key layout of SPEC section 3: every key a pure function of its content's position.

::

    <prefix>/logs/<log_id>/segments/<YYYY-MM-DD>/<first_seq:020d>-<last_seq:020d>.jsonl.zst
    <prefix>/logs/<log_id>/checkpoints/<tree_size:020d>.checkpoint
    <prefix>/audit/<YYYY-MM-DD>/<event_id>.json        (per-record layout, body = the leaf)

Because a key names exactly the records (or the tree size) it holds, a retried upload can only
ever write the same content to the same key, which the conditional write turns into a no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .._layout import check_log_id
from ._client import S3Url

Layout = Literal["batched", "per-record"]
LAYOUTS: tuple[Layout, ...] = ("batched", "per-record")

_SEGMENT_RE = re.compile(
    r"^logs/([a-z0-9][a-z0-9._-]{0,63})/segments/(\d{4}-\d{2}-\d{2})/(\d{20})-(\d{20})\.jsonl\.zst$"
)
_CHECKPOINT_RE = re.compile(r"^logs/([a-z0-9][a-z0-9._-]{0,63})/checkpoints/(\d{20})\.checkpoint$")
_RECORD_RE = re.compile(r"^audit/(\d{4}-\d{2}-\d{2})/([^/]+)\.json$")
_EVENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def segment_key(url: S3Url, log_id: str, date: str, first: int, last: int) -> str:
    """The key of a batched segment holding seqs ``first`` to ``last``."""
    name = f"{first:020d}-{last:020d}.jsonl.zst"
    return url.key("logs", check_log_id(log_id), "segments", date, name)


def checkpoint_key(url: S3Url, log_id: str, size: int) -> str:
    """The key of the checkpoint for tree size ``size``."""
    return url.key("logs", check_log_id(log_id), "checkpoints", f"{size:020d}.checkpoint")


def record_key(url: S3Url, date: str, event_id: str) -> str:
    """The per-record key ``audit/<date>/<event_id>.json``."""
    if not _EVENT_ID_RE.fullmatch(event_id):
        raise ValueError(f"event id {event_id!r} cannot be used in an S3 key")
    return url.key("audit", date, f"{event_id}.json")


@dataclass(frozen=True, slots=True)
class SegmentKey:
    """A parsed batched segment key."""

    key: str
    log_id: str
    date: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class CheckpointKey:
    """A parsed checkpoint key."""

    key: str
    log_id: str
    size: int


@dataclass(frozen=True, slots=True)
class RecordKey:
    """A parsed per-record key."""

    key: str
    date: str
    event_id: str


ParsedKey = SegmentKey | CheckpointKey | RecordKey


def relative(url: S3Url, key: str) -> str | None:
    """``key`` without the store prefix, or ``None`` when it is outside the store."""
    if not url.prefix:
        return key
    head = url.prefix + "/"
    return key[len(head) :] if key.startswith(head) else None


def parse_key(url: S3Url, key: str) -> ParsedKey | None:
    """What a key under the store is, or ``None`` for keys tokentrail never writes."""
    rel = relative(url, key)
    if rel is None:
        return None
    if m := _SEGMENT_RE.fullmatch(rel):
        return SegmentKey(key, m.group(1), m.group(2), int(m.group(3)), int(m.group(4)))
    if m := _CHECKPOINT_RE.fullmatch(rel):
        return CheckpointKey(key, m.group(1), int(m.group(2)))
    if m := _RECORD_RE.fullmatch(rel):
        return RecordKey(key, m.group(1), m.group(2))
    return None


def is_ours(url: S3Url, key: str) -> bool:
    """Whether ``key`` lies in a folder tokentrail owns (``logs/`` or ``audit/``)."""
    rel = relative(url, key)
    return rel is not None and (rel.startswith("logs/") or rel.startswith("audit/"))
