"""``tokentrail verify-export``: check a DSAR package with nothing else at hand.

Stages, each naming what fails:

1. read the package (a directory, a ``.zip``, or a ``records.html`` alone) into its files;
2. the manifest parses, and its signature (``manifest.sig``) verifies under the verifier key —
   the pinned ``--public-key``, else the package's own ``verifier.pub`` (said in the output);
3. every file the manifest lists has the SHA-256 it lists, and nothing unlisted is there;
4. every checkpoint is signed by the key and belongs to its log;
5. every record: its inclusion proof leads to its log's signed root, its content hashes hold,
   it is the subject's, within the range, listed in the manifest, and not repeated;
6. every record the manifest lists is present;
7. the data file is byte for byte what its records render to, so an edited readable cell
   (CSV column, HTML text) is caught and named.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._checkpoint import Checkpoint, Verifier, load_verifiers, open_note
from .._erasure import keyed_hash_problems
from .._errors import ConfigError, TokentrailError, VerificationError
from .._proof import check_bundle
from ._index import ts_micros
from ._package import (
    CONTENT,
    DATA_FILES,
    EXPORT_FORMAT,
    KEYS,
    MANIFEST,
    SIGNATURE,
    Item,
    checkpoint_notes,
    item_from_json,
    parse_csv,
    parse_html,
    render,
    sealed_contents,
    sha256_hex,
    signature_text,
)


@dataclass
class ExportReport:
    """The outcome of checking one package."""

    path: str
    subject: str | None = None
    records: int = 0
    pinned: bool = False
    signed: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing failed."""
        return not self.problems

    def lines(self) -> list[str]:
        """A summary line, then one line per problem and note."""
        if self.ok:
            head = (
                f"verify-export OK: {self.path}: {self.records} records of user"
                f" {self.subject}, each proven included in a signed checkpoint;"
                f" manifest {'signed' if self.signed else 'NOT signed'}"
            )
        else:
            head = f"verify-export FAIL: {self.path}: {len(self.problems)} problems"
        return [head, *(f"FAIL: {p}" for p in self.problems), *(f"NOTE: {n}" for n in self.notes)]


class PackageDamaged(VerificationError):
    """A zip package whose directory reads but an entry does not (a CRC or data error)."""


def _read_entry(zf: zipfile.ZipFile, name: str) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PackageDamaged(f"{name}: {exc}") from exc


def read_package(path: Path) -> dict[str, bytes]:
    """The files of a package directory, zip, or self-contained HTML file.

    Raises :class:`PackageDamaged` for a zip entry that fails its CRC or cannot be inflated:
    the package as received does not verify (a finding), unlike one that cannot be read at
    all (``ConfigError``).
    """
    try:
        if path.is_dir():
            return {
                p.relative_to(path).as_posix(): p.read_bytes()
                for p in sorted(path.rglob("*"))
                if p.is_file()
            }
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                if len(set(names)) != len(names):
                    twice = sorted({n for n in names if names.count(n) > 1})
                    # Tools disagree on which copy they extract: the package is ambiguous.
                    raise ConfigError(f"{path} holds more than one entry named {twice[0]}")
                return {n: _read_entry(zf, n) for n in names}
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if path.suffix in (".html", ".htm"):
        _, embedded, problems = parse_html(data)
        if problems:
            raise ConfigError(f"{path}: {problems[0]}")
        return {**embedded, DATA_FILES["html"]: data}
    raise ConfigError(f"{path} is not a package directory, a .zip or a records.html file")


def _name(item: Item, rec: dict[str, Any]) -> str:
    return f"record {rec.get('event_id') or '?'} (log {item.log_id}, seq {item.index})"


def verify_export(path: Path, pinned: list[Verifier] | None) -> ExportReport:
    """Check the package at ``path``; see the module docstring for the stages."""
    report = ExportReport(str(path), pinned=pinned is not None)
    fail = report.problems.append
    try:
        files = read_package(path)
    except PackageDamaged as exc:
        fail(f"the zip is damaged ({exc}): altered or corrupted since it was made")
        return report
    # 2. manifest, keys and signature
    try:
        manifest = orjson.loads(files[MANIFEST])
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a {EXPORT_FORMAT} manifest")
        subject = manifest["subject"]["user_id"]
        data_name = manifest["data_file"]
        records, digests = manifest["records"], manifest["files"]
        rng = manifest.get("range") or {}
        if not isinstance(subject, str) or not isinstance(data_name, str):
            raise ValueError("subject.user_id and data_file must be strings")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("records must be a list of objects")
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise ValueError("files must map file names to SHA-256 hex strings")
        if not isinstance(rng, dict):
            raise ValueError("range must be an object")
        listed = {str(r["event_id"]): r for r in records}
    except KeyError as exc:
        fail(f"the package has no {exc} (manifest)" if str(exc) == repr(MANIFEST) else
             f"manifest.json lacks {exc}")  # fmt: skip
        return report
    except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        fail(f"manifest.json cannot be read: {exc}")
        return report
    report.subject = subject
    if pinned is not None:
        verifiers = pinned
        if files.get(KEYS) and not _same_keys(files[KEYS], pinned):
            report.notes.append("the package's verifier.pub differs from the pinned key")
    else:
        try:
            verifiers = load_verifiers([
                ln for ln in files.get(KEYS, b"").decode().splitlines() if ln.strip()
            ])  # fmt: skip
        except (TokentrailError, UnicodeDecodeError) as exc:
            fail(f"verifier.pub cannot be read: {exc}")
            return report
        report.notes.append(
            "verifier key taken from the package itself (not pinned): this shows the package is"
            " self-consistent; pass --public-key with the operator's published key to pin it"
        )
    if SIGNATURE in files:
        try:
            text, _ = open_note(files[SIGNATURE], verifiers)
            if text != signature_text(files[MANIFEST]):
                raise VerificationError("it signs a different manifest")
            report.signed = True
        except TokentrailError as exc:
            fail(f"manifest.sig does not vouch for manifest.json: {exc}")
    else:
        report.notes.append(
            "the manifest is not signed: each record is proven, but that the list is complete"
            " rests on the exporter's word"
        )
    # 3. listed files
    for name, digest in sorted(digests.items()):
        if name not in files:
            fail(f"file {name} listed in the manifest is missing")
        elif sha256_hex(files[name]) != digest:
            fail(f"file {name} differs from the SHA-256 the manifest lists")
    known = {MANIFEST, SIGNATURE, data_name, *digests}
    for name in sorted(set(files) - known):
        fail(f"file {name} is not part of the package (not in the manifest)")
    # 4. checkpoints
    notes = checkpoint_notes(files)
    good_notes: dict[str, str] = {}
    for log_id, note in sorted(notes.items()):
        try:
            cp_text, _ = open_note(note.encode(), verifiers)
            if not Checkpoint.from_text(cp_text).origin.endswith("/" + log_id):
                raise VerificationError("its origin names another log")
            good_notes[log_id] = note
        except TokentrailError as exc:
            fail(f"checkpoint of log {log_id}: {exc}")
    # 5. records
    fmt = next((f for f, n in DATA_FILES.items() if n == data_name), None)
    if fmt is None or data_name not in files:
        fail(f"data file {data_name} is missing")
        return report
    items, read_problems = _read_items(fmt, files[data_name])
    report.problems.extend(read_problems)
    seen: set[str] = set()
    unchecked: dict[str, list[str]] = {}  # log -> its records with no valid checkpoint
    lo, hi = _bound(rng.get("since")), _bound(rng.get("until"))
    for item in items:
        rec = item.parsed()
        name = _name(item, rec)
        event = str(rec.get("event_id"))
        cp_note = good_notes.get(item.log_id)
        if event in seen:
            fail(f"{name}: appears more than once")
        seen.add(event)
        if cp_note is None:  # named once per log below, not once per record
            unchecked.setdefault(item.log_id, []).append(name)
            continue
        try:
            check_bundle(item.bundle(cp_note), verifiers)
        except TokentrailError as exc:
            fail(f"{name}: {exc}")
            continue
        if rec.get("user_id") != subject:
            fail(f"{name}: belongs to user {rec.get('user_id')!r}, not the subject {subject!r}")
        ts = ts_micros(rec.get("timestamp"))
        if (lo is not None and (ts is None or ts < lo)) or (
            hi is not None and (ts is None or ts >= hi)
        ):
            fail(f"{name}: its timestamp {rec.get('timestamp')} is outside the export's range")
        entry = listed.get(event)
        if entry is None:
            fail(f"{name}: not listed in the manifest")
        elif (entry.get("log_id"), entry.get("seq"), entry.get("leaf_hash")) != (
            item.log_id,
            item.index,
            sha256_hex(b"\x00" + item.record.encode("utf-8")),
        ):
            fail(f"{name}: differs from its manifest entry")
    for log_id, names in sorted(unchecked.items()):
        fail(
            f"{len(names)} record{'s' if len(names) > 1 else ''} of log {log_id} (the first:"
            f" {names[0]}): no valid checkpoint of the log in the package to prove"
            f" {'them' if len(names) > 1 else 'it'} against"
        )
    # 6. completeness against the manifest
    for event, entry in listed.items():
        if event not in seen:
            fail(
                f"record {event} (log {entry.get('log_id')}, seq {entry.get('seq')}) is listed"
                f" in the manifest but missing from {data_name}"
            )
    if manifest.get("record_count") != len(listed):
        fail("the manifest's record_count does not match its list of records")
    report.records = len(seen)
    _check_contents(files, items, report)
    # 7. the data file is exactly what its records render to
    expected = render(fmt, items, files)
    _compare(files[data_name], expected, data_name, report)
    return report


def _check_contents(files: dict[str, bytes], items: list[Item], report: ExportReport) -> None:
    """Opened content of sealed records must match their keyed hashes (SPEC section 7)."""
    sealed = [item.parsed() for item in items if item.parsed().get("content_sealed")]
    if not sealed:
        return
    if CONTENT not in files:
        report.notes.append(
            f"{len(sealed)} records are sealed and their content is not in this package"
            " (exported without the key store)"
        )
        return
    try:
        keys = orjson.loads(files[CONTENT]).get("content_hash_keys") or {}
    except (orjson.JSONDecodeError, AttributeError):
        report.problems.append(f"{CONTENT} cannot be read")
        return
    contents = sealed_contents(files)
    erased = 0
    for rec in sealed:
        name = f"record {rec.get('event_id')} (log {rec.get('log_id')}, seq {rec.get('seq')})"
        entry = contents.get(str(rec.get("event_id")))
        if not isinstance(entry, dict):
            report.problems.append(f"{name}: sealed, and missing from {CONTENT}")
            continue
        if not isinstance(entry.get("content"), dict):
            erased += 1
            continue
        kid = str((rec.get("sealed_content") or {}).get("subject_key_id"))
        hex_key = keys.get(kid)
        if not isinstance(hex_key, str):
            report.problems.append(f"{name}: no content-hash key to check its opened content")
            continue
        for problem in keyed_hash_problems(rec, entry["content"], bytes.fromhex(hex_key)):
            report.problems.append(f"{name}: opened content does not match: {problem}")
    if erased:
        report.notes.append(f"{erased} records' content was erased (their key was destroyed)")


def _read_items(fmt: str, data: bytes) -> tuple[list[Item], list[str]]:
    if fmt == "csv":
        return parse_csv(data)
    if fmt == "html":
        html_items, _, html_problems = parse_html(data)
        return html_items, html_problems
    items: list[Item] = []
    problems: list[str] = []
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline ending the last line, or an export of no records
        lines.pop()
    for n, line in enumerate(lines, 1):
        try:
            items.append(item_from_json(orjson.loads(line)))
        except (orjson.JSONDecodeError, ValueError) as exc:
            problems.append(f"records.jsonl line {n} is not a proof bundle ({exc})")
    return items, problems


def _bound(value: Any) -> int | None:
    return ts_micros(value) if value else None


def _same_keys(data: bytes, pinned: list[Verifier]) -> bool:
    try:
        theirs = {ln.strip() for ln in data.decode().splitlines() if ln.strip()}
    except UnicodeDecodeError:
        return False
    return theirs <= {v.to_text() for v in pinned}


def _compare(
    actual: bytes, expected: list[tuple[str | None, bytes]], name: str, report: ExportReport
) -> None:
    """Name the record whose rendering differs first, if the data file is not as rendered."""
    whole = b"".join(chunk for _, chunk in expected)
    if actual == whole:
        return
    pos = 0
    for label, chunk in expected:
        if actual[pos : pos + len(chunk)] != chunk:
            what = f"record {label}" if label else "its header or embedded data"
            report.problems.append(
                f"{name} differs from what its proven records render to, at {what}"
                f" (byte {pos + _first_diff(actual[pos:], chunk)})"
            )
            return
        pos += len(chunk)
    report.problems.append(f"{name} has {len(actual) - pos} unexpected bytes at its end")


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
