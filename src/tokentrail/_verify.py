"""Verification of a ledger (SPEC section 4), streamed one log at a time.

For each log, in numbered stages:

1. every checkpoint file is parsed and its signed note checked under the verifier keys;
2. the witness state (the last checkpoint verified before, with its compact range) is compared
   with the store, catching a rollback to an older checkpoint or a rewritten one;
3. the records are streamed in ``seq`` order from the start position — seq 0 on a first run or
   with ``--all``, else the remembered size, or earlier when the asked range reaches back —
   checking every content hash, ``seq`` contiguity, the ``prev_hash`` chain (including the link
   into the range) and, at every checkpoint size, the Merkle root;
4. checkpoints that cover records that are not there, and the unsealed tail, are reported;
5. the witness state moves forward to the newest checkpoint verified, when nothing was found.

Memory stays flat: one line, the compact range and the findings at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

import orjson

from ._checkpoint import Checkpoint, Verifier, open_note
from ._errors import StoreError, TokentrailError, VerificationError
from ._layout import (
    Listing,
    SegmentRef,
    is_log_id,
    iter_lines,
    list_log,
    log_folders,
    mtime,
    segment_size,
    write_atomic,
)
from ._merkle import CompactRange, leaf_hash
from ._record import (
    APIS,
    MAX_AHEAD_S,
    REQUIRED_FIELDS,
    SCHEMA,
    TIMESTAMP_RE,
    ZERO_HASH,
    encode_tokens,
    is_event_id,
    is_token_source,
    parse_rfc3339,
    rfc3339,
    text_hash,
    token_list_problem,
)

MAX_FINDINGS_PER_LOG = 100
Level = Literal["finding", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One integrity violation (``finding``) or notice (``warning``), with where it is."""

    level: Level
    message: str
    log_id: str | None = None
    seq: int | None = None
    event_id: str | None = None
    location: str | None = None

    def to_line(self) -> str:
        """One line for a cron log: ``FINDING log=… seq=… event_id=… file=…: message``."""
        parts = [self.level.upper()]
        for key, value in (
            ("log", self.log_id),
            ("seq", self.seq),
            ("event_id", self.event_id),
            ("file", self.location),
        ):
            if value is not None:
                parts.append(f"{key}={value}")
        return " ".join(parts) + f": {self.message}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (a file name that is not UTF-8 keeps its bytes as \\x escapes)."""
        return {
            "level": self.level,
            "message": _utf8(self.message),
            "log_id": None if self.log_id is None else _utf8(self.log_id),
            "seq": self.seq,
            "event_id": self.event_id,
            "location": None if self.location is None else _utf8(self.location),
        }


def _utf8(text: str) -> str:
    """``text`` as valid UTF-8: the undecodable bytes of a file name (surrogate escapes) are
    written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class VerifyOptions:
    """What to verify and how."""

    verifiers: Sequence[Verifier]
    since: datetime | None = None
    until: datetime | None = None
    full: bool = False
    require_sealed: bool = False
    seal_grace_s: float = 300.0
    state_dir: Path | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The store's name in the witness state (default: the ledger's path). ``verify --s3``
    #: reads a temporary mirror and gives its ``s3://`` URL here, so that the next run finds
    #: what this one verified (a log deleted since is a finding).
    store: str | None = None
    #: Called with each segment's size in bytes as the run reaches it, read or skipped (a
    #: progress bar's advance; the CLI's total is the segments' sizes).
    progress: Callable[[int], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class LogReport:
    """What verification found in one log."""

    log_id: str
    records_read: int = 0
    in_range: int = 0
    verified_size: int = 0
    checkpoints: int = 0
    unsealed: int = 0
    #: Records signed checkpoints cover that could not be verified past a finding before them
    #: (counted apart from ``unsealed``, the records after the last checkpoint).
    unverified: int = 0
    findings: list[Finding] = field(default_factory=list)
    suppressed: int = 0

    def add(self, finding: Finding) -> None:
        """Keep a finding, or count it once the per-log cap is reached."""
        if len(self.findings) < MAX_FINDINGS_PER_LOG:
            self.findings.append(finding)
        else:
            self.suppressed += 1


#: Where findings that belong to no log (an object outside the layout, a failure standing from
#: an earlier run) are filed; not a log.
NO_LOG = "(store)"


@dataclass
class Report:
    """The outcome of one verification run."""

    store: str
    logs: list[LogReport]
    #: When the run ended (UTC, to the second): the summary line says it, so a cron log that
    #: many runs append to shows which day each verdict is for.
    checked_at: str = field(
        default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )

    @property
    def findings(self) -> list[Finding]:
        """Every integrity violation, in log order."""
        return [f for lg in self.logs for f in lg.findings if f.level == "finding"]

    @property
    def warnings(self) -> list[Finding]:
        """Every warning, in log order."""
        return [f for lg in self.logs for f in lg.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """Whether nothing violates integrity."""
        return not self.findings and not any(lg.suppressed for lg in self.logs)

    def summary(self) -> str:
        """One summary line."""
        records = sum(lg.records_read for lg in self.logs)
        sealed = sum(lg.verified_size for lg in self.logs)
        unsealed = sum(lg.unsealed for lg in self.logs)
        unverified = sum(lg.unverified for lg in self.logs)
        checkpoints = sum(lg.checkpoints for lg in self.logs)
        suppressed = sum(lg.suppressed for lg in self.logs)
        verdict = "OK" if self.ok else "FAIL"
        logs = sum(lg.log_id != NO_LOG for lg in self.logs)
        not_verified = f", {unverified} under them not verified" if unverified else ""
        return (
            f"tokentrail verify {verdict}: {self.store}: {logs} logs, {records} records"
            f" read, {sealed} sealed under {checkpoints} checkpoints{not_verified},"
            f" {unsealed} unsealed,"
            f" {len(self.findings) + suppressed} findings, {len(self.warnings)} warnings,"
            f" checked {self.checked_at}"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form for ``--json``."""
        return {
            "ok": self.ok,
            "store": _utf8(self.store),
            "checked_at": self.checked_at,
            "summary": _utf8(self.summary()),
            "logs": [
                {
                    "log_id": _utf8(lg.log_id),
                    "records_read": lg.records_read,
                    "records_in_range": lg.in_range,
                    "verified_size": lg.verified_size,
                    "checkpoints": lg.checkpoints,
                    "unsealed": lg.unsealed,
                    "unverified": lg.unverified,
                    "findings_suppressed": lg.suppressed,
                }
                for lg in self.logs
            ],
            "findings": [f.to_json() for f in self.findings],
            "warnings": [f.to_json() for f in self.warnings],
        }


# ---------------------------------------------------------------------- witness state


@dataclass(frozen=True)
class WitnessState:
    """The last checkpoint verified for one origin, with the tree's compact range."""

    origin: str
    tree: CompactRange
    root: bytes
    last_leaf_hash: str
    verified_at: str
    store: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "origin": self.origin,
            "store": self.store,
            "size": self.tree.size,
            "root": self.root.hex(),
            "tree": self.tree.to_json(),
            "last_leaf_hash": self.last_leaf_hash,
            "verified_at": self.verified_at,
        }

    @classmethod
    def from_json(cls, obj: Any) -> WitnessState:
        """Parse :meth:`to_json` output; the compact range must give the root."""
        try:
            tree = CompactRange.from_json(obj["tree"])
            state = cls(
                obj["origin"],
                tree,
                bytes.fromhex(obj["root"]),
                obj["last_leaf_hash"],
                obj["verified_at"],
                obj.get("store", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationError(f"malformed witness state: {exc!r}") from exc
        texts = (state.origin, state.last_leaf_hash, state.verified_at, state.store)
        if not all(isinstance(value, str) for value in texts):
            raise VerificationError(
                "malformed witness state: origin, last_leaf_hash, verified_at and store must be"
                " strings"
            )
        if tree.root() != state.root:
            raise VerificationError("witness state's compact range does not give its root")
        return state


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tokentrail/witness``, else ``~/.local/state/tokentrail/witness``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tokentrail" / "witness"


def store_key(root: Path, options: VerifyOptions) -> str:
    """The store a witness state belongs to: ``options.store`` (an ``s3://`` URL), else the
    ledger's absolute path (as named: symlinks are not followed, so that the states of earlier
    versions, which kept the path as given, still match the cron line that gave it)."""
    return options.store or os.path.abspath(root)


def _state_path(state_dir: Path, origin: str, store: str | None) -> Path:
    """Per store and origin: the local spool and its S3 copy (one origin, shipped behind) are
    remembered apart. ``store=None``: the per-origin name of states written before that."""
    name = origin if store is None else store + "\n" + origin
    return state_dir / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".json")


def load_state(state_dir: Path, origin: str, store: str) -> WitnessState | None:
    """The witness state for ``origin`` in ``store``, or ``None`` on a first run."""
    path = _state_path(state_dir, origin, store)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        legacy = _state_path(state_dir, origin, None)
        try:
            data = legacy.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read witness state {legacy}: {exc.strerror}") from exc
        path = legacy
    except OSError as exc:
        raise StoreError(f"cannot read witness state {path}: {exc.strerror}") from exc
    try:
        state = WitnessState.from_json(orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"witness state {path} is not JSON; remove it to start over") from exc
    except VerificationError as exc:
        raise StoreError(f"witness state {path}: {exc}; remove it to start over") from exc
    if state.origin != origin:
        raise StoreError(f"witness state {path} is for origin {state.origin!r}, not {origin!r}")
    return state if state.store == store else None  # a legacy state of another store


def remembered_states(state_dir: Path, store: str) -> list[WitnessState]:
    """Every witness state recorded for ``store`` (to notice a log that disappeared)."""
    out = []
    try:
        paths = sorted(state_dir.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            state = WitnessState.from_json(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError, VerificationError):
            continue
        if state.store == store:
            out.append(state)
    return out


LAST_RUN_FILE = "last-verify"  # JSON, named apart from the per-origin *.json states


def _failure_path(state_dir: Path, store: str) -> Path:
    """Where a failed run on ``store`` is noted until a full run on it passes."""
    return state_dir / f"failed-{hashlib.sha256(store.encode()).hexdigest()[:32]}"


def _failed_at(path: Path) -> float | None:
    """When the failure noted at ``path`` was found (``None``: none noted, or unreadable)."""
    try:
        failed = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    at = failed.get("at") if isinstance(failed, dict) else None
    if not isinstance(at, int | float) or isinstance(at, bool):
        return None
    try:
        datetime.fromtimestamp(at, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return float(at)


def previous_failure(options: VerifyOptions, store: str) -> LogReport | None:
    """A finding when a run on ``store`` failed and no full run on it has passed since, and
    this one will not re-read everything: what that run found (below the witness state, or in
    a range) is not read again, so the failure stands until ``--all`` passes. Noted per store:
    a run on another store (the S3 copy, say) clears nothing."""
    if options.state_dir is None or options.full:
        return None
    path = _failure_path(options.state_dir, store)
    if not path.exists():
        return None
    at = _failed_at(path)
    when = "?" if at is None else rfc3339(datetime.fromtimestamp(at, UTC))
    report = LogReport(NO_LOG)
    report.add(
        Finding(
            "finding",
            f"a run on this store failed ({when}), and this run does not re-read what it"
            " found; it stands until tokentrail verify --all passes",
            location=str(path),
        )
    )
    return report


def save_last_run(
    state_dir: Path, report: Report, when: datetime, store: str, *, full: bool
) -> None:
    """Note the outcome of a run beside the witness state (read by the proxy's /metrics);
    ``store`` is the witness states' name for the store (:func:`store_key`). A failure is
    also noted for the store until a ``full`` run on it passes."""
    data = {
        "ok": report.ok,
        "at": when.timestamp(),
        "store": store,
        "summary": report.summary(),
    }
    failed = _failure_path(state_dir, store)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not report.ok and _failed_at(failed) is None:  # the first failure's date stands
            write_atomic(failed, orjson.dumps(data))
        elif full:
            failed.unlink(missing_ok=True)
        write_atomic(state_dir / LAST_RUN_FILE, orjson.dumps(data))
    except OSError as exc:
        raise StoreError(f"cannot write the run's outcome in {state_dir}: {exc.strerror}") from exc


def save_state(state_dir: Path, state: WitnessState) -> None:
    """Write the witness state atomically."""
    path = _state_path(state_dir, state.origin, state.store)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(state.to_json(), option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write witness state {path}: {exc.strerror}") from exc
    legacy = _state_path(state_dir, state.origin, None)
    with contextlib.suppress(OSError, orjson.JSONDecodeError, VerificationError):
        if WitnessState.from_json(orjson.loads(legacy.read_bytes())).store == state.store:
            legacy.unlink()  # moved to the per-store name


# ---------------------------------------------------------------------- record checks


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {twice}")
    return dict(pairs)


def line_problems(line: bytes, obj: Any) -> list[str]:
    """What makes a parsed record line other than I-JSON (SPEC section 2): a duplicate key
    (which a parser resolves silently, each its own way). A line as the writer encodes it is
    re-encoded to the same bytes, so only other lines pay for the slow check."""
    try:
        if orjson.dumps(obj) == line:
            return []
    except TypeError:
        pass
    try:
        json.loads(line, object_pairs_hook=_reject_duplicates)
    except ValueError as exc:
        return [f"record line is not I-JSON: {exc}"]
    return []


def record_line_problems(line: bytes, log_id: str) -> list[str]:
    """Every rule of SPEC section 2 a stored record line breaks (parsing it first)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    return [*line_problems(line, obj), *check_record(obj, log_id)]


def _value_problems(obj: dict[str, Any]) -> list[str]:
    """The fields of SPEC section 2 whose values break its rules (types, names, ranges)."""
    problems = []
    if obj["api"] not in APIS:
        problems.append(f"api {obj['api']!r} is not one of {sorted(APIS)}")
    if not isinstance(obj["model"], str):
        problems.append("model is not a string")
    if not isinstance(obj["stop_reason"], str):
        problems.append("stop_reason is not a string")
    for name in ("user_id", "session_id", "model_version"):
        if obj[name] is not None and not isinstance(obj[name], str):
            problems.append(f"{name} is neither a string nor null")
    duration = obj["request_duration_ms"]
    if isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0:
        problems.append(f"request_duration_ms {duration!r} is not a wall time in ms")
    for side in ("input", "output"):
        if not is_token_source(obj[f"{side}_token_source"]):
            problems.append(f"{side}_token_source {obj[f'{side}_token_source']!r} is unknown")
    return problems


def check_record(obj: Any, log_id: str) -> list[str]:
    """The content problems of one parsed record: missing fields, wrong hashes."""
    if not isinstance(obj, dict):
        return ["record is not a JSON object"]
    missing = [name for name in REQUIRED_FIELDS if name not in obj]
    if missing:
        return [f"record lacks required fields {missing}"]
    problems = []
    if obj["schema"] != SCHEMA:
        problems.append(f"unknown schema {obj['schema']!r}")
    if not is_event_id(obj["event_id"]):
        problems.append("event_id is not a UUID (lowercase, as SPEC section 2 stores it)")
    stamp = obj["timestamp"]
    if not isinstance(stamp, str) or not TIMESTAMP_RE.fullmatch(stamp) or not parse_rfc3339(stamp):
        problems.append(
            f"timestamp {stamp!r} is not an RFC 3339 UTC time with microseconds and a Z suffix"
        )
    if obj["log_id"] != log_id:
        problems.append(f"record names log {obj['log_id']!r}, stored in log {log_id!r}")
    problems.extend(_value_problems(obj))
    if obj.get("content_sealed") is True:
        return problems  # keyed hashes (SPEC section 7): not recomputable without the key
    for side in ("input", "output"):
        tokens = obj[f"{side}_tokens"]
        try:
            seed, compact = encode_tokens(tokens)
        except (TypeError, ValueError):
            problems.append(f"{side}_tokens cannot be encoded")
            continue
        if obj[f"{side}_hash"] != hashlib.sha256(seed).hexdigest():
            problems.append(f"{side}_hash does not match {side}_tokens")
        problem = token_list_problem(tokens, obj[f"{side}_token_source"], compact)
        if problem is not None:
            problems.append(f"{side}_tokens: {problem}")
    for text, hashed in (("input_text", "input_text_hash"), ("output_text", "output_text_hash")):
        value = obj[text]
        if value is not None and not isinstance(value, str):
            problems.append(f"{text} is not a string")
        elif obj[hashed] != text_hash(value):
            problems.append(f"{hashed} does not match {text}")
    return problems


# ---------------------------------------------------------------------- one log


def _read_lines(path: Path, failed: list[StoreError]) -> Iterator[tuple[int, bytes, bool]]:
    """:func:`iter_lines`, ending at an error reading the file (a zstd file cut short, say),
    which goes in ``failed`` for the caller to name the file."""
    try:
        yield from iter_lines(path)
    except StoreError as exc:
        failed.append(exc)


def _event_id_of(line: bytes) -> str | None:
    """The ``event_id`` of a record line, if it parses and has one."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    event_id = obj.get("event_id") if isinstance(obj, dict) else None
    return event_id if isinstance(event_id, str) else None


_EVENT_ID = re.compile(rb'"event_id"\s*:\s*"([^"\\]{1,100})"')


def _event_id_in(line: bytes, *, parse: bool = True) -> str | None:
    """The ``event_id`` of a record line, or as it reads in what is left of a damaged one
    (``parse=False``: as it reads, without parsing the line)."""
    found = _event_id_of(line) if parse else None
    if found is None and (m := _EVENT_ID.search(line)) is not None:
        found = m.group(1).decode("utf-8", "replace")
    return found


_Where = tuple[str | None, str | None, datetime | None]  # file, event id, timestamp
_Future = tuple[int, str, str | None, datetime]  # seq, file, event id, timestamp


class _LogVerifier:
    """Verifies one log of a local store; see the module docstring for the stages."""

    def __init__(self, root: Path, log_id: str, options: VerifyOptions) -> None:
        self.root = root
        self.log_id = log_id
        self.options = options
        self.report = LogReport(log_id)
        self.listing: Listing = list_log(root, log_id)
        self.checkpoints: dict[int, Checkpoint] = {}
        self.cp_files: dict[int, str] = {}
        self.origin: str | None = None
        self.state: WitnessState | None = None
        self.new_state: WitnessState | None = None
        #: The event ids of the records read, by hash (a hit is checked again: _duplicates).
        self._seen_ids: set[int] = set()
        self._twice: set[str] = set()

    def finding(self, message: str, **where: Any) -> None:
        self.report.add(Finding("finding", message, self.log_id, **where))

    def warning(self, message: str, **where: Any) -> None:
        self.report.add(Finding("warning", message, self.log_id, **where))

    def run(self) -> LogReport:
        for stray in self.listing.strays:
            self.finding("unexpected file in the ledger layout", location=str(stray))
        self._load_checkpoints()
        self._load_state()
        self._coverage(self._stream(self._start_position()))
        if self._twice:
            self._duplicates()
        self._name_records()
        if (
            self.options.state_dir is not None
            and self.new_state is not None
            and not any(f.level == "finding" for f in self.report.findings)
            and not self.report.suppressed
        ):
            save_state(self.options.state_dir, self.new_state)
        return self.report

    # stage 1
    def _load_checkpoints(self) -> None:
        suffix = "/" + self.log_id
        for size, path in sorted(self.listing.checkpoints.items()):
            where = str(path)
            try:
                text, _ = open_note(path.read_bytes(), self.options.verifiers)
                checkpoint = Checkpoint.from_text(text)
            except OSError as exc:
                self.finding(f"cannot read checkpoint: {exc.strerror}", location=where)
                continue
            except VerificationError as exc:
                self.finding(f"checkpoint rejected: {exc}", location=where)
                continue
            if checkpoint.size != size:
                self.finding(
                    f"checkpoint file name says size {size}, body says {checkpoint.size}",
                    location=where,
                )
                continue
            if not checkpoint.origin.endswith(suffix):
                self.finding(
                    f"checkpoint origin {checkpoint.origin!r} is not for this log", location=where
                )
                continue
            if size == 0:
                self.finding("checkpoint of size 0", location=where)
                continue
            self.checkpoints[size] = checkpoint
            self.cp_files[size] = where
            self.origin = checkpoint.origin

    # stage 2
    def _load_state(self) -> None:
        if self.options.state_dir is None:
            return
        # By every origin this log could have, not only by the checkpoints still present: a
        # rollback may have deleted them all.
        origins = {cp.origin for cp in self.checkpoints.values()}
        origins |= {f"{v.name}/{self.log_id}" for v in self.options.verifiers}
        store = store_key(self.root, self.options)
        states = [
            s for o in origins if (s := load_state(self.options.state_dir, o, store)) is not None
        ]
        if not states:
            return
        state = max(states, key=lambda s: s.tree.size)
        self.state = state
        size = state.tree.size
        newest = max(self.checkpoints, default=0)
        if newest < size:
            self.finding(
                f"rollback: the newest valid checkpoint covers {newest} records, but a checkpoint"
                f" of {size} records was verified on {state.verified_at}",
                seq=newest,
                location=str(self.root / "logs" / self.log_id / "checkpoints"),
            )
        same = self.checkpoints.get(size)
        if same is not None and same.root != state.root:
            self.finding(
                f"checkpoint for size {size} differs from the one verified on"
                f" {state.verified_at} (rewritten history)",
                location=self.cp_files[size],
            )

    def _start_position(self) -> int:
        if self.options.full or self.state is None:
            return 0
        start = self.state.tree.size
        since = self.options.since
        if since is not None:
            first_day = (since - timedelta(days=1)).strftime("%Y-%m-%d")
            for seg in self.listing.segments:
                if seg.date >= first_day:
                    start = min(start, seg.first_seq)
                    break
        return start

    # stage 3
    def _stream(self, start: int) -> int:
        """Read records from ``start`` in seq order; return the seq after the last one."""
        state = None if self.options.full else self.state
        tree: CompactRange | None = None  # None: below the remembered state, chain checks only
        prev_hex: str | None = None  # None: taken from record start-1 (the link into the range)
        if start == 0:
            tree, prev_hex = CompactRange(), ZERO_HASH
        elif state is not None and start == state.tree.size:
            tree, prev_hex = state.tree.copy(), state.last_leaf_hash
        expected = start
        below = 0  # the seq after the last record read below ``start``: where a short log ends
        broken = False
        last_at: dict[str, Any] | None = None
        since, until = self.options.since, self.options.until
        segments = self.listing.segments
        newest = max(self.checkpoints, default=0)
        progress = self.options.progress
        for idx, seg in enumerate(segments):
            if progress is not None:
                progress(segment_size(seg))
            next_first = segments[idx + 1].first_seq if idx + 1 < len(segments) else None
            if start > 0 and next_first is not None and next_first <= start - 1:
                continue
            where = str(seg.path)
            self._check_pair(seg)
            first_line = True
            failed: list[StoreError] = []
            for offset, line, complete in _read_lines(seg.path, failed):
                if not complete:
                    self._torn(seg, offset, expected, is_last=next_first is None)
                    break
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("seq"), int):
                    last_at = {"seq": expected, "event_id": _event_id_in(line), "location": where}
                    self.finding(f"unreadable record at byte {offset}", **last_at)
                    broken, first_line = True, False
                    expected += 1
                    prev_hex = leaf_hash(line).hex()
                    continue
                seq: int = obj["seq"]
                event_id = obj.get("event_id")
                if type(event_id) is str:
                    key = hash(event_id)
                    if key in self._seen_ids:
                        self._twice.add(event_id)
                    else:
                        self._seen_ids.add(key)
                at = {"seq": seq, "event_id": event_id, "location": where}
                if first_line:
                    if seq != seg.first_seq:
                        self.finding(
                            f"segment named for seq {seg.first_seq} starts with seq {seq}", **at
                        )
                    self._check_day(seg, obj, at)
                first_line = False
                if seq < start:
                    below = max(below, seq + 1)
                    if seq == start - 1 and prev_hex is None:
                        prev_hex = leaf_hash(line).hex()
                    continue
                lhash = leaf_hash(line)
                if seq != expected:
                    if seq < expected:
                        msg = f"record duplicated or out of order: expected seq {expected}"
                    else:
                        msg = f"records missing: expected seq {expected}, found {seq}"
                    self.finding(msg, **at)
                    broken = True
                elif prev_hex is None:
                    # A range that starts inside the log links to the record before it: when
                    # that record is gone, so is everything between it and the range's reach.
                    self.finding(
                        f"records missing before seq {seq}: the record it chains to (seq"
                        f" {seq - 1}) is not in the ledger (deleted records or segments)",
                        **at,
                    )
                    broken = True
                elif obj.get("prev_hash") != prev_hex:
                    if last_at is None and state is not None and start == state.tree.size:
                        # The record before is the last one verified, known by its hash only.
                        self.finding(
                            f"record does not chain to record {start - 1} as verified on"
                            f" {state.verified_at} (rewritten history)",
                            **at,
                        )
                    else:
                        # The record before no longer hashes to what this one chained to: it
                        # was edited (or this record's prev_hash was). Name both.
                        self.finding(
                            f"record edited: its leaf hash does not match the prev_hash of the"
                            f" next record (seq {seq}, event_id {event_id}, {where})",
                            **(last_at or at),
                        )
                    broken = True
                # A line under a signed checkpoint was vouched for by the key that signed it
                # (a writer refuses to seal one that is not I-JSON); re-encoding every line to
                # prove it again would cost a tenth of verify's time, so the check is for the
                # unsealed tail, which no key vouches for.
                rules = line_problems(line, obj) if seq >= newest else []
                for problem in (*rules, *check_record(obj, self.log_id)):
                    self.finding(problem, **at)
                self.report.records_read += 1
                ts = parse_rfc3339(obj.get("timestamp"))
                if (
                    ts is not None
                    and (since is None or ts >= since)
                    and (until is None or ts < until)
                ):
                    self.report.in_range += 1
                expected = max(expected, seq + 1)
                prev_hex = lhash.hex()
                last_at = at
                if tree is None:
                    if state is not None and expected == state.tree.size:
                        if prev_hex != state.last_leaf_hash:
                            self.finding(
                                "record differs from the one verified before (rewritten history)",
                                **at,
                            )
                            broken = True
                        tree = state.tree.copy()
                    continue
                if broken:
                    continue
                tree.append(lhash)
                known = self.state
                # A full run passes the size verified before: the same history, or a fork (one
                # holding the key can sign a longer one with no checkpoint of that size).
                if (
                    state is None
                    and known is not None
                    and tree.size == known.tree.size
                    and tree.root() != known.root
                ):
                    self.finding(
                        f"the first {tree.size} records differ from those verified on"
                        f" {known.verified_at} (rewritten history)",
                        **at,
                    )
                    broken = True
                    continue
                cp = self.checkpoints.get(tree.size)
                if cp is None:
                    continue
                if cp.root != tree.root():
                    self.finding(
                        f"checkpoint of size {tree.size} does not match the records (edited or"
                        " forged records, or a forged checkpoint)",
                        seq=seq,
                        event_id=event_id,
                        location=self.cp_files[tree.size],
                    )
                    broken = True
                    continue
                stamp = self.options.now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                self.new_state = WitnessState(
                    cp.origin,
                    tree.copy(),
                    cp.root,
                    prev_hex,
                    stamp,
                    store_key(self.root, self.options),
                )
            for exc in failed:  # what follows in this segment is lost: the next reads break
                self.finding(
                    f"segment cannot be read to its end: {exc}", seq=expected, location=where
                )
                broken = True
        if expected == start and below < start:
            # Nothing at or after the remembered size, and the records below it stop short: the
            # log was truncated (or its last segments, or all of them, deleted) since the last
            # run.
            return below
        return expected

    def _check_day(self, seg: SegmentRef, first: dict[str, Any], at: dict[str, Any]) -> None:
        """A segment's date folder is the UTC day its first record was appended (SPEC section
        3): not before the day that record's request arrived (a record is appended after its
        request; a finding, with the slack of a timestamp the SDK took from a caller's clock
        ahead of the writer's), and not after today (a warning, with a day's slack)."""
        try:
            day = date.fromisoformat(seg.date)
        except ValueError:
            self.finding(f"segment is in folder {seg.date}, which is not a date", **at)
            return
        if day > self.options.now.date() + timedelta(days=1):
            # A warning: a writer whose clock ran ahead leaves such folders honestly (and keeps
            # writing there, as folders never go backwards), as does a segment moved.
            self.warning(
                f"segment is in date folder {seg.date}, after today"
                f" ({self.options.now.date().isoformat()}): a writer's clock ahead, or a"
                " segment moved",
                **at,
            )
        arrived = parse_rfc3339(first.get("timestamp"))
        if arrived is not None and arrived.astimezone(UTC).date() > day:
            day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
            if (arrived - day_end).total_seconds() > MAX_AHEAD_S:
                self.finding(
                    f"segment is in date folder {seg.date}, before its first record's request"
                    f" arrived ({rfc3339(arrived)})",
                    **at,
                )

    def _check_pair(self, seg: SegmentRef) -> None:
        if seg.plain is None or seg.packed is None:
            return
        # Line by line, in step: the first line that differs names the record.
        seq = seg.first_seq
        bad_plain: list[StoreError] = []
        bad_packed: list[StoreError] = []
        pairs = zip_longest(_read_lines(seg.plain, bad_plain), _read_lines(seg.packed, bad_packed))
        for plain, packed in pairs:
            if bad_plain or bad_packed:  # named below, or by the read of the segment itself
                break
            if plain is not None and packed is not None and plain[1:] == packed[1:]:
                seq += 1
                continue
            ids = [_event_id_of(side[1]) for side in (plain, packed) if side is not None]
            self.finding(
                f"{seg.plain.name} and {seg.packed.name} hold different content, from this"
                " record on",
                seq=seq,
                event_id=next((i for i in ids if i is not None), None),
                location=str(seg.packed),
            )
            return
        for path, bad in ((seg.plain, bad_plain), (seg.packed, bad_packed)):
            if bad and path != seg.path:
                self.finding(
                    f"segment cannot be read to its end: {bad[0]}", seq=seq, location=str(path)
                )

    def _torn(self, seg: SegmentRef, offset: int, seq: int, is_last: bool) -> None:
        where = str(seg.path)
        age = self.options.now.timestamp() - mtime(seg.path)
        sealed = seq < max(self.checkpoints, default=0)
        # (an mtime far ahead is no younger than one far behind: anyone can set it)
        young = abs(age) < self.options.seal_grace_s and not self.options.require_sealed
        # A packed segment is written whole, then renamed into place: a torn line in one is
        # never a write in progress.
        packed = seg.path.name.endswith(".zst")
        if is_last and young and not sealed and not packed:
            self.warning(
                f"incomplete final line at byte {offset} (a write in progress?)",
                seq=seq,
                location=where,
            )
        else:
            self.finding(
                f"segment truncated: incomplete record at byte {offset}", seq=seq, location=where
            )

    # stage 5
    def _name_records(self) -> None:
        """Give the findings that name a seq but no ``event_id`` (a torn line, a record before
        a gap) the ``event_id`` of that record, and those that name a checkpoint the seq and
        ``event_id`` of the last record it covers: read again, on failure only."""
        sizes = {str(path): size for size, path in self.listing.checkpoints.items()}
        wanted: dict[int, list[int]] = {}
        for i, f in enumerate(self.report.findings):
            if f.event_id is not None:
                continue
            seq = f.seq
            if seq is None and f.location in sizes:
                seq = sizes[f.location] - 1
            if seq is not None and seq >= 0:
                wanted.setdefault(seq, []).append(i)
        if not wanted:
            return
        found = self._event_ids(set(wanted))
        for seq, event_id in found.items():
            for i in wanted[seq]:
                self.report.findings[i] = replace(
                    self.report.findings[i], seq=seq, event_id=event_id
                )

    def _duplicates(self) -> None:
        """Name each record whose ``event_id`` an earlier record of the log has (SPEC section
        2: unique within a store), reading the log again for the ids the stream saw twice."""
        first: dict[str, int] = {}
        for seg in self.listing.segments:
            where = str(seg.path)
            for _, line, complete in _read_lines(seg.path, []):
                if not complete or _event_id_in(line, parse=False) not in self._twice:
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                event_id, seq = obj.get("event_id"), obj.get("seq")
                if event_id not in self._twice or not isinstance(seq, int):
                    continue
                if event_id in first and first[event_id] != seq:
                    self.finding(
                        f"event_id also used by record {first[event_id]} (event ids are unique"
                        " within a store)",
                        seq=seq,
                        event_id=event_id,
                        location=where,
                    )
                else:
                    first.setdefault(event_id, seq)

    def _event_ids(self, seqs: set[int]) -> dict[int, str]:
        """The ``event_id`` of each record of ``seqs`` found in the segments (a line that does
        not parse is taken for the seq of its place, and its ``event_id`` read as it is)."""
        found: dict[int, str] = {}
        segments = self.listing.segments
        for idx, seg in enumerate(segments):
            end = segments[idx + 1].first_seq if idx + 1 < len(segments) else None
            if not any(seg.first_seq <= s and (end is None or s < end) for s in seqs):
                continue
            for place, (_, line, _) in enumerate(_read_lines(seg.path, [])):
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = None
                seq = obj.get("seq") if isinstance(obj, dict) else None
                if not isinstance(seq, int):
                    seq = seg.first_seq + place
                if seq in seqs and seq not in found:
                    event_id = _event_id_in(line)
                    if event_id is not None:
                        found[seq] = event_id
        return found

    # stage 4
    def _coverage(self, size: int) -> None:
        beyond = [cp_size for cp_size in sorted(self.checkpoints) if cp_size > size]
        if beyond:
            # Records deleted from the end, or a checkpoint forged past it: both facts are named.
            for cp_size in beyond:
                self.finding(
                    f"checkpoint covers {cp_size} records, but the log ends before seq {size}",
                    location=self.cp_files[cp_size],
                )
            last = self.listing.segments[-1].path if self.listing.segments else None
            self.finding(
                f"records missing from seq {size} on: signed checkpoints cover {beyond[-1]}"
                " records (deleted or truncated records or segments)",
                seq=size,
                location=str(last) if last is not None else self.cp_files[beyond[0]],
            )
        if self.state is not None and size < self.state.tree.size and not self.checkpoints:
            self.finding(
                f"rollback: {self.state.tree.size} records were verified on"
                f" {self.state.verified_at}, but no checkpoint is left and the log ends before"
                f" seq {size}",
                seq=size,
                location=str(self.root / "logs" / self.log_id),
            )
        self.report.checkpoints = len(self.checkpoints)
        sealed = 0
        if self.new_state is not None:
            sealed = self.new_state.tree.size
        elif self.state is not None and not self.options.full:
            sealed = min(self.state.tree.size, size)  # a shortened log is its own finding
        self.report.verified_size = sealed
        unsealed = max(0, size - sealed)
        self.report.unsealed = unsealed
        if unsealed == 0:
            return
        grace = self.options.seal_grace_s
        (location, event_id, ts), future = self._unsealed(sealed, grace)
        age = None if ts is None else (self.options.now - ts).total_seconds()
        msg = f"{unsealed} records after the last verified checkpoint are not sealed"
        at = {"seq": sealed, "event_id": event_id, "location": location}
        # (a checkpoint larger than the log counts: records it covers were cut off the end)
        covered = max(self.checkpoints, default=0)
        if covered > sealed and any(f.level == "finding" for f in self.report.findings):
            # Signed checkpoints do cover them: what stopped verification is named above.
            self.report.unverified = min(covered, size) - sealed
            self.report.unsealed = max(0, size - covered)
            after = f", and {size - covered} after them are not sealed" if size > covered else ""
            self.finding(
                f"{min(covered, size) - sealed} records from seq {sealed} on are under signed"
                f" checkpoints (up to size {covered}) that could not be verified past the"
                f" findings above{after}",
                **at,
            )
            return
        if future:
            # A writer stamps a record when its request arrives, so an unsealed record dated
            # later than now (beyond the grace, for clock skew) was not written by one: it
            # cannot hide behind the grace a young tail gets.
            seq, where, eid, moment = future[0]
            ahead = (moment - self.options.now).total_seconds()
            self.finding(
                f"unsealed record dated {ahead:.0f}s in the future ({rfc3339(moment)}): a"
                f" forgery, or a writer with a wrong clock ({len(future)} such records)",
                seq=seq,
                event_id=eid,
                location=where,
            )
        if self.options.require_sealed or age is None or age >= grace:
            age_text = "of unknown age" if age is None else f"the oldest {age:.0f}s old"
            self.finding(f"{msg} ({age_text}: a dead writer or a forgery)", **at)
        else:
            grace = self.options.seal_grace_s
            self.warning(f"{msg} (younger than the {grace:.0f}s seal grace)", **at)

    def _unsealed(self, seq: int, grace: float) -> tuple[_Where, list[_Future]]:
        """File, event id and time of record ``seq``, and every record from it on that is
        dated more than ``grace`` seconds after now."""
        first: _Where = (None, None, None)
        future: list[_Future] = []
        at = seq
        for idx, seg in enumerate(self.listing.segments):
            nxt = (
                self.listing.segments[idx + 1].first_seq
                if idx + 1 < len(self.listing.segments)
                else None
            )
            if nxt is not None and nxt <= seq:
                continue
            for _, line, complete in _read_lines(seg.path, []):  # the stream names errors
                if not complete:
                    break
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict) or obj.get("seq") != at:
                    continue
                moment = parse_rfc3339(obj.get("timestamp"))
                if at == seq:
                    first = (str(seg.path), obj.get("event_id"), moment)
                if moment is not None and (moment - self.options.now).total_seconds() > grace:
                    future.append((at, str(seg.path), obj.get("event_id"), moment))
                at += 1
        return first, future


def verify_local(root: Path, options: VerifyOptions, *, note_run: bool = True) -> Report:
    """Verify every log of the local ledger at ``root``; raises StoreError if it is unreadable.

    With a state directory the outcome is noted there (``note_run``; a caller that adds
    findings of its own, as the S3 reader does, notes the whole outcome itself).
    """
    remembered = (
        []
        if options.state_dir is None
        else remembered_states(options.state_dir, store_key(root, options))
    )
    try:
        folders = log_folders(root)
    except StoreError:
        if not remembered or not root.is_dir():
            raise
        folders = []  # logs/ itself deleted: every remembered log is named below
    log_ids = [name for name in folders if is_log_id(name)]
    # A store this verifier has seen logs in is never "nothing recorded yet": the logs gone
    # from it are findings (a store with no log found nor remembered is refused below).
    if (
        folders
        and not remembered
        and not any(
            (root / "logs" / i / d).is_dir() for i in log_ids for d in ("segments", "checkpoints")
        )
    ):
        raise StoreError(f"{root} holds no tokentrail logs (no logs/*/segments/ folder)")
    reports = []
    if options.state_dir is not None:
        key_names = {v.name for v in options.verifiers}
        for state in remembered:
            name, _, log_id = state.origin.partition("/")
            if name in key_names and log_id not in log_ids:
                report = LogReport(log_id)
                report.add(
                    Finding(
                        "finding",
                        f"log deleted: {state.tree.size} records of it were verified on"
                        f" {state.verified_at}, and it is no longer in the store",
                        log_id,
                        location=str(root / "logs" / log_id),
                    )
                )
                reports.append(report)
    if not folders and not reports:
        raise StoreError(f"{root} holds no logs (nothing has been recorded there yet)")
    for log_id in folders:
        log_root = root / "logs" / log_id
        if not is_log_id(log_id):
            report = LogReport(log_id)
            report.add(
                Finding(
                    "finding",
                    "unexpected folder in the ledger layout: not a log id"
                    " ([a-z0-9][a-z0-9._-]{0,63}), so no writer made it",
                    log_id,
                    location=str(log_root),
                )
            )
            reports.append(report)
            continue
        if not (log_root / "segments").is_dir() and not (log_root / "checkpoints").is_dir():
            report = LogReport(log_id)
            report.add(
                Finding(
                    "finding",
                    "not a tokentrail log (no segments/ or checkpoints/)",
                    log_id,
                    location=str(log_root),
                )
            )
            reports.append(report)
            continue
        try:
            reports.append(_LogVerifier(root, log_id, options).run())
        except StoreError as exc:
            report = LogReport(log_id)
            report.add(Finding("finding", f"cannot read log: {exc}", log_id))
            reports.append(report)
        except TokentrailError:
            raise
    if note_run and (stands := previous_failure(options, store_key(root, options))):
        reports.append(stands)
    outcome = Report(options.store or str(root), reports)
    if note_run and options.state_dir is not None:
        save_last_run(
            options.state_dir, outcome, options.now, store_key(root, options), full=options.full
        )
    return outcome
