"""Search: filters over the sidecar index, every hit re-checked against its leaf.

The index narrows the ledger down to candidate rows; each candidate is then re-read from the
segment it came from (:class:`._leaves.LeafReader`) and shown only when its leaf hash is the
indexed one and its content hashes hold. A candidate that fails is returned as a problem — the
ledger changed under the index, or was tampered with — never silently shown or dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ._index import Index, moment_micros, text_candidates_sql
from ._leaves import Checked, LeafReader


@dataclass(frozen=True)
class Filters:
    """What to search for; ``None`` means any. ``text`` is a case-insensitive substring."""

    user: str | None = None
    #: only records with no ``user_id`` (null or empty): the erasure subject ``_anonymous``
    anonymous: bool = False
    session: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    stop_reason: str | None = None
    text: str | None = None

    def sql(self) -> tuple[str, tuple[Any, ...]]:
        """A condition over ``records r`` and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("user_id", self.user),
            ("session_id", self.session),
            ("model", self.model),
            ("stop_reason", self.stop_reason),
        ):
            if value is not None:
                clauses.append(f"r.{column} = ?")
                params.append(value)
        if self.anonymous:
            clauses.append("(r.user_id IS NULL OR r.user_id = '')")
        if self.since is not None:
            clauses.append("r.ts >= ?")
            params.append(moment_micros(self.since))
        if self.until is not None:
            clauses.append("r.ts < ?")
            params.append(moment_micros(self.until))
        if self.text:
            found = text_candidates_sql(self.text)
            if found is not None:
                clauses.append(found[0])
                params.extend(found[1])
        return " AND ".join(clauses), tuple(params)

    def text_matches(self, record: dict[str, Any]) -> bool:
        """Whether the record's prompt or output text holds the ``text`` substring."""
        if not self.text:
            return True
        needle = self.text.lower()
        return any(
            isinstance(record.get(name), str) and needle in record[name].lower()
            for name in ("input_text", "output_text")
        )


@dataclass
class SearchResult:
    """Re-checked hits in timestamp order, the problems found, and how many rows matched."""

    hits: list[Checked] = field(default_factory=list)
    problems: list[Checked] = field(default_factory=list)
    candidates: int = 0
    truncated: bool = False


def search(root: Path, index: Index, filters: Filters, limit: int | None = 100) -> SearchResult:
    """Rows matching ``filters`` (at most ``limit`` hits), each re-checked against its leaf."""
    where, params = filters.sql()
    reader = LeafReader(root)
    result = SearchResult()
    order = "ORDER BY r.ts, r.log_id, r.seq"
    # Without a trigram (a needle under 3 characters) the text test runs on every candidate,
    # so candidates are read in pages until ``limit`` confirmed hits are found.
    page = max(limit or 0, 1000) if filters.text else (limit or -1)
    offset = 0
    while True:
        rows = index.rows(where, params, f"{order} LIMIT {page} OFFSET {offset}")
        offset += len(rows)
        result.candidates += len(rows)
        for row in rows:
            checked = reader.check(row)
            if not checked.ok:
                result.problems.append(checked)
            elif checked.record is not None and filters.text_matches(checked.record):
                if limit is not None and len(result.hits) >= limit:
                    result.truncated = True
                    return result
                result.hits.append(checked)
        if page < 0 or len(rows) < page:
            return result
        if limit is not None and len(result.hits) >= limit:
            result.truncated = index.count(where, params) > offset
            return result
