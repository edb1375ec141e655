"""``tokentrail export``: a data-subject access request package, proven record by record.

One pass per log reads every stored line once: it hashes each leaf (for the Merkle tree) and
keeps the lines whose ``user_id`` is the subject. The subject's records are selected from the
ledger itself, not the index, so the package is complete even if the index is stale. The log's
tree is then built once (``MerkleLevels``) and each record's audit path read off
it in O(log n), checked against the newest signed checkpoint before it is written.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .. import __version__
from .._checkpoint import Signer, Verifier
from .._erasure import KeyStore, content_hash_key, open_record
from .._errors import ConfigError, StoreError, VerificationError
from .._layout import iter_lines, list_log, list_logs
from .._merkle import MerkleLevels, leaf_hash, verify_inclusion
from .._record import now_rfc3339
from ._index import moment_micros, ts_micros
from ._leaves import latest_checkpoint
from ._package import (
    CONTENT,
    DATA_FILES,
    EXPORT_FORMAT,
    KEYS,
    MANIFEST,
    README,
    SIGNATURE,
    Item,
    checkpoint_file,
    render,
    sha256_hex,
    signature_text,
)


@dataclass(frozen=True)
class Package:
    """A built package: its files by relative path (the data file included)."""

    files: dict[str, bytes]
    records: int
    logs: int
    signed: bool
    sealed: int = 0  # records whose content is sealed


def _subject_items(
    root: Path,
    log_id: str,
    user: str,
    since: int | None,
    until: int | None,
    verifiers: list[Verifier],
    proved: tuple[int, str] = (0, ""),
) -> tuple[list[tuple[int, Item]], bytes | None, int]:
    """The subject's items in one log (with their timestamps), the checkpoint note and size;
    ``proved`` is the checkpoint size verify proved for the log, and when."""
    needle = orjson.dumps(user)
    hashes: list[bytes] = []
    chosen: list[tuple[int, int, bytes]] = []  # (ts, seq, line)
    for seg in list_log(root, log_id).segments:
        for _, line, complete in iter_lines(seg.path):
            if not complete:
                break
            hashes.append(leaf_hash(line))
            if needle not in line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not a record: under a checkpoint, the root check below names it
            if not isinstance(obj, dict) or obj.get("user_id") != user:
                continue
            ts = ts_micros(obj.get("timestamp"))
            if since is not None and (ts is None or ts < since):
                continue
            if until is not None and (ts is None or ts >= until):
                continue
            if obj.get("seq") != len(hashes) - 1:
                raise StoreError(
                    f"log {log_id}: record {obj.get('event_id')} says seq {obj.get('seq')} at"
                    f" position {len(hashes) - 1} (run tokentrail verify)"
                )
            chosen.append((ts or 0, len(hashes) - 1, line))
    # Every log is checked against its signed checkpoint, the subject's or not: an export
    # says "all of this subject's records", and records deleted from a log would be missing
    # from it without a trace otherwise.
    try:
        head = latest_checkpoint(root, log_id, verifiers)
    except VerificationError as exc:
        raise VerificationError(
            f"log {log_id}: {exc} (an export checks every log against its newest signed"
            " checkpoint: pass the --public-key of each writer)"
        ) from exc
    size = 0 if head is None else head.checkpoint.size
    if size < proved[0]:
        raise StoreError(
            f"log {log_id}: its newest signed checkpoint covers {size} records, but tokentrail"
            f" verify proved one of {proved[0]} on {proved[1]}: rolled back, so an export"
            " would miss records (run tokentrail verify)"
        )
    if len(hashes) < size:
        raise StoreError(
            f"log {log_id} has {len(hashes)} records, fewer than its signed checkpoint of size"
            f" {size}: records were deleted, so an export could miss some (run tokentrail"
            " verify)"
        )
    tree = MerkleLevels(hashes[:size]) if size else None
    if head is not None and tree is not None and tree.root() != head.checkpoint.root:
        raise StoreError(
            f"log {log_id}: the stored records do not give the root of its signed checkpoint"
            f" of size {size} (run tokentrail verify)"
        )
    if not chosen:
        return [], None, size
    unsealed = [seq for _, seq, _ in chosen if seq >= size]
    if head is None or tree is None or unsealed:
        raise StoreError(
            f"{len(unsealed)} of the subject's records in log {log_id} (from seq {unsealed[0]})"
            f" are not covered by a signed checkpoint yet (newest: size {size}); a live writer"
            " seals within a minute: export again then, or pass --until to stop earlier"
        )
    import base64

    items: list[tuple[int, Item]] = []
    for ts, seq, line in chosen:
        proof = tree.proof(seq)
        verify_inclusion(seq, size, hashes[seq], proof, head.checkpoint.root)
        items.append(
            (
                ts,
                Item(
                    log_id,
                    seq,
                    size,
                    line.decode("utf-8"),
                    tuple(base64.b64encode(p).decode() for p in proof),
                ),
            )
        )
    return items, head.note, size


def build_export(
    root: Path,
    user: str,
    *,
    fmt: str,
    verifiers: list[Verifier],
    signer: Signer | None,
    since: datetime | None = None,
    until: datetime | None = None,
    keystore: KeyStore | None = None,
    witnessed: Mapping[str, tuple[int, str]] | None = None,
) -> Package:
    """Every record of ``user`` in the ledger, with proofs, as a package's files.

    With ``keystore``, the content of sealed records is opened into ``content.json`` (or stated
    erased), with the subject's content-hash key so the package can check it against the ledger.
    ``witnessed`` (log id → the checkpoint size ``verify`` last proved, and when) refuses a
    ledger rolled back or missing a log since: the package would silently hold less.
    """
    if fmt not in DATA_FILES:
        raise ConfigError(f"unknown export format {fmt!r}; choose jsonl, csv or html")
    if signer is not None and signer.verifier.to_text() not in {v.to_text() for v in verifiers}:
        raise ConfigError(
            f"signing key {signer.name} is not among the verifier keys given; the package could"
            " not be checked with them"
        )
    lo = moment_micros(since) if since else None
    hi = moment_micros(until) if until else None
    found: list[tuple[int, Item]] = []
    files: dict[str, bytes] = {}
    log_ids = list_logs(root)
    for log_id, (size, when) in sorted((witnessed or {}).items()):
        if log_id not in log_ids:
            raise StoreError(
                f"log {log_id}, {size} records of which tokentrail verify proved on {when}, is"
                " gone from the ledger: an export would miss its records (run tokentrail"
                " verify)"
            )
    for log_id in log_ids:
        proved = (witnessed or {}).get(log_id, (0, ""))
        items, note, size = _subject_items(root, log_id, user, lo, hi, verifiers, proved)
        if note is not None:
            files[checkpoint_file(log_id, size)] = note
            found.extend(items)
    found.sort(key=lambda pair: (pair[0], pair[1].log_id, pair[1].index))
    records = [item for _, item in found]
    keys = verifiers if signer is None else [signer.verifier]
    files[KEYS] = "".join(v.to_text() + "\n" for v in keys).encode()
    sealed = [item.parsed() for item in records if item.parsed().get("content_sealed")]
    if sealed and keystore is not None:
        files[CONTENT] = _opened_content(sealed, keystore)
    range_ = {
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    files[README] = readme(
        user, range_, len(records), fmt, signed=signer is not None,
        sealed=len(sealed), opened=CONTENT in files, witnessed=len(witnessed or {}),
    ).encode()  # fmt: skip
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "subject": {"user_id": user},
        "range": range_,
        "created_at": now_rfc3339(),
        "tool": f"tokentrail {__version__}",
        "data_file": DATA_FILES[fmt],
        "record_count": len(records),
        "records": [
            {
                "event_id": item.parsed().get("event_id"),
                "log_id": item.log_id,
                "seq": item.index,
                "leaf_hash": sha256_hex(b"\x00" + item.record.encode("utf-8")),
            }
            for item in records
        ],
        "files": {name: sha256_hex(data) for name, data in sorted(files.items())},
    }
    files[MANIFEST] = orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"
    if signer is not None:
        files[SIGNATURE] = signer.sign_note(signature_text(files[MANIFEST]))
    files[DATA_FILES[fmt]] = b"".join(chunk for _, chunk in render(fmt, records, files))
    logs = len({item.log_id for item in records})
    return Package(files, len(records), logs, signer is not None, len(sealed))


def _opened_content(sealed: list[dict[str, Any]], keystore: KeyStore) -> bytes:
    opened: dict[str, Any] = {}
    hash_keys: dict[str, str | None] = {}
    for rec in sealed:
        result = open_record(rec, keystore)
        opened[str(rec.get("event_id"))] = {
            "content": result.content,
            "erased_at": result.erased_at,
        }
        kid = str((rec.get("sealed_content") or {}).get("subject_key_id"))
        if kid not in hash_keys:
            key = content_hash_key(keystore, kid)
            hash_keys[kid] = None if key is None else key.hex()
    data = {"content_hash_keys": hash_keys, "records": opened}
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


def write_package(package: Package, out: Path) -> None:
    """Write a package as a directory, or as a zip when ``out`` ends in ``.zip``.

    Only the owner can read what is written (files 0600, folders 0700): a package holds a
    person's prompts and answers.
    """
    try:
        if out.suffix == ".zip":
            if out.exists():
                raise ConfigError(f"{out} already exists; refusing to overwrite it")
            tmp = out.with_name(out.name + ".tmp")
            with _private_file(tmp) as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
                for name in sorted(package.files):
                    zf.writestr(name, package.files[name])
            os.replace(tmp, out)
            return
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"{out} exists and is not an empty directory")
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data in package.files.items():
            path = out / name
            for folder in reversed(path.relative_to(out).parents[:-1]):  # mkdir(parents=True)
                (out / folder).mkdir(mode=0o700, exist_ok=True)  # would not pass the mode on
            with _private_file(path) as fh:
                fh.write(data)
    except OSError as exc:
        raise StoreError(f"cannot write the export to {out}: {exc.strerror}") from exc


def _private_file(path: Path) -> BinaryIO:
    """``path`` opened for writing, created 0600 whatever the umask (replaced if present)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover .tmp of an interrupted export: its mode is not ours
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def readme(
    user: str, range_: dict[str, Any], count: int, fmt: str, *, signed: bool, sealed: int = 0,
    opened: bool = False, witnessed: int | None = None,
) -> str:  # fmt: skip
    """The package's README: what is inside and how to check it."""
    since = range_["since"] or "the beginning of the ledger"
    until = range_["until"] or "the time of export"
    data = DATA_FILES[fmt]
    signed_line = (
        "manifest.sig     the manifest's SHA-256, signed by the same key: the operator's\n"
        "                 statement that this list of records is complete\n"
        if signed
        else "(no manifest.sig: this export was made without the signing key, so the\n"
        " completeness of the list rests on the operator's word alone)\n"
    )
    if not sealed:
        content_line = ""
    elif opened:
        content_line = (
            f"content.json     the content of the {sealed} sealed records, opened (or when it was\n"
            "                 erased), and each subject's content-hash key, which checks the\n"
            "                 content and cannot decrypt anything (also listed in the manifest)\n"
        )
    else:
        content_line = (
            f'({sealed} records are sealed ("content_sealed": true): their content is encrypted,\n'
            " and this export was made without the key store, so it holds none of it)\n"
        )
    sealed_step = (
        "     For a sealed record the content is in content.json (records.<event_id>), and those\n"
        "     hashes are HMAC-SHA-256 instead, keyed with content_hash_keys[<the record's\n"
        "     sealed_content.subject_key_id>] (hex); erased content is gone for good, and only\n"
        "     the record's other fields and its proof can be checked.\n"
        if sealed
        else ""
    )
    if witnessed:
        witness_line = (
            f"The ledger was checked\nagainst the {witnessed} logs tokentrail verify had proved"
            " (its witness state): none was\ngone or shorter than verify had seen it."
        )
    else:
        witness_line = (
            "No witness state of\ntokentrail verify was found for this ledger when it was"
            " exported, so a log deleted\nor cut short before the export would not have been"
            " noticed."
        )
    return f"""\
tokentrail data-subject access export
=====================================

Subject (user_id): {user}
Records:           {count}, from {since} until {until}
Data file:         {data}

Every exchange recorded with this subject is in {data}, exactly as it was stored in the
audit log, each with an RFC 9162 inclusion proof: the hashes that tie it to a checkpoint the
operator signed. Changing one character of a record, its proof or a checkpoint breaks the check.

What is in this package
-----------------------
{data:<16} the records; each carries its exact stored line ("record"), its log and position
                 ("log_id", "index"/"seq"), the signed tree size and the proof hashes
checkpoints/     the signed checkpoint (C2SP signed note, Ed25519) of each log
verifier.pub     the operator's public verifier key
manifest.json    the list of records (event id, log, seq, leaf hash) and the SHA-256 of
                 README.txt, verifier.pub and the checkpoints
{content_line}{signed_line}
How to check it
---------------
With tokentrail (pip install tokentrail):

    tokentrail verify-export <this folder or zip> --public-key '<the operator's key>'

Pin the key: take it from the operator's published documentation, not from this package. The
package's own verifier.pub only shows that the package agrees with itself.

By hand, for each record (RFC 9162 sections 2.1.1 and 2.1.3.2):
  1. leaf = the record's text as UTF-8 bytes; leaf hash = SHA-256(0x00 || leaf).
  2. Fold the proof hashes into the leaf hash from the bottom up, following the record's
     index and the tree size: a node is SHA-256(0x01 || left || right).
  3. The result must equal the base64 root hash on the third line of the log's checkpoint,
     and the checkpoint's signature line must verify under the verifier key (C2SP
     signed-note: Ed25519 over the checkpoint text).
  4. The record's own hashes: input_hash = SHA-256 of Python's json.dumps(input_tokens),
     output_hash likewise, input_text_hash = SHA-256 of the UTF-8 input_text.
{sealed_step}
What this proves, and what it does not
--------------------------------------
Each record is proven genuine and part of the append-only log the operator signed. That the
package holds every record of the subject cannot be proven without showing other people's
records; it is stated by the operator's signature over the manifest. {witness_line}
"""
