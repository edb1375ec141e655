"""Inclusion proofs of one record against a signed checkpoint (RFC 9162 section 2.1.3).

A proof bundle is a JSON object holding everything an auditor needs and nothing else: the
record's stored line, its log and index, the audit path and the signed checkpoint. Checking it
(:func:`check_bundle`) needs only the verifier key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ._checkpoint import Checkpoint, Verifier, open_note, split_note
from ._errors import StoreError, VerificationError
from ._layout import iter_lines, list_log, list_logs
from ._merkle import MerkleLevels, leaf_hash, verify_inclusion
from ._verify import check_record

BUNDLE_FORMAT = "tokentrail.inclusion-proof/v1"


@dataclass(frozen=True)
class Located:
    """Where a record is: its log, seq and stored line, and the line parsed."""

    log_id: str
    seq: int
    leaf: bytes
    location: str
    record: dict[str, Any]


def find_record(root: Path, event_id: str) -> Located:
    """Find the record with ``event_id`` in any log of the ledger at ``root``."""
    needle = b'"event_id":"' + event_id.encode() + b'"'
    for log_id in list_logs(root):
        for seg in list_log(root, log_id).segments:
            for _, line, complete in iter_lines(seg.path):
                if complete and needle in line:
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue  # not a record (verify names it)
                    if (
                        isinstance(obj, dict)
                        and obj.get("event_id") == event_id
                        and type(obj.get("seq")) is int
                    ):
                        return Located(log_id, obj["seq"], line, str(seg.path), obj)
    raise StoreError(f"no record with event_id {event_id} in {root}")


def build_bundle(root: Path, event_id: str, tree_size: int | None = None) -> dict[str, Any]:
    """An inclusion proof bundle for ``event_id`` against the newest (or given) checkpoint.

    The bundle is only built if it would check: the record passes its own hashes, it is stored
    at its seq, and the log's leaves up to the checkpoint give the checkpoint's root. Otherwise
    :class:`VerificationError` says what is wrong (the signature is left to the auditor, who
    holds the key).
    """
    found = find_record(root, event_id)
    listing = list_log(root, found.log_id)
    where = f"record {event_id} (log {found.log_id}, seq {found.seq})"
    if tree_size is not None and tree_size not in listing.checkpoints:
        newest = ", ".join(str(s) for s in sorted(listing.checkpoints)[-5:]) or "none"
        raise StoreError(
            f"log {found.log_id} has no checkpoint of size {tree_size} (newest sizes: {newest})"
        )
    sizes = sorted(s for s in listing.checkpoints if s > found.seq)
    if tree_size is not None:
        if tree_size not in sizes:
            raise StoreError(f"{where} is not covered by the checkpoint of size {tree_size}")
        sizes = [tree_size]
    if not sizes:
        raise StoreError(
            f"{where} is not covered by a checkpoint yet; wait for the writer to seal (at most"
            " a minute) and try again"
        )
    size = sizes[-1]
    note = listing.checkpoints[size].read_bytes()
    hashes: list[bytes] = []
    for seg in listing.segments:
        for _, line, complete in iter_lines(seg.path):
            if not complete or len(hashes) >= size:
                break
            hashes.append(leaf_hash(line))
    if len(hashes) < size:
        raise StoreError(f"log {found.log_id} has fewer records than its checkpoint of {size}")
    problems = check_record(found.record, found.log_id)
    if problems:
        raise VerificationError(f"{where} fails its own hashes: {'; '.join(problems)}")
    if hashes[found.seq] != leaf_hash(found.leaf):
        raise VerificationError(f"{where} is not stored at position {found.seq} of its log")
    levels = MerkleLevels(hashes)
    checkpoint = Checkpoint.from_text(split_note(note)[0])
    if levels.root() != checkpoint.root:
        raise VerificationError(
            f"log {found.log_id} does not give the root of its checkpoint of size {size}: a"
            f" record was changed after sealing (run tokentrail verify to find it)"
        )
    return {
        "format": BUNDLE_FORMAT,
        "log_id": found.log_id,
        "index": found.seq,
        "tree_size": size,
        "record": found.leaf.decode("utf-8"),
        "proof": [base64.b64encode(p).decode() for p in levels.proof(found.seq)],
        "checkpoint": note.decode("utf-8"),
    }


def check_bundle(bundle: Any, verifiers: list[Verifier]) -> dict[str, Any]:
    """Check a bundle with nothing but the verifier keys; return the proven record."""
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise VerificationError(f"not a {BUNDLE_FORMAT} bundle")
    try:
        leaf = bundle["record"].encode("utf-8")
        log_id = bundle["log_id"]
        if type(log_id) is not str:
            raise TypeError("log_id must be a string")
        index, size = bundle["index"], bundle["tree_size"]
        if not all(type(n) is int for n in (index, size)):  # not "5", 5.9 or true
            raise TypeError("index and tree_size must be integers")
        proof = [base64.b64decode(p, validate=True) for p in bundle["proof"]]
        note = bundle["checkpoint"].encode("utf-8")
    except KeyError as exc:
        raise VerificationError(f"malformed proof bundle: no {exc.args[0]!r} member") from exc
    except (AttributeError, TypeError, ValueError, binascii.Error) as exc:
        raise VerificationError(
            "malformed proof bundle: log_id, record and checkpoint must be strings, index"
            " and tree_size integers, proof a list of base64 hashes"
        ) from exc
    text, _ = open_note(note, verifiers)
    checkpoint = Checkpoint.from_text(text)
    if checkpoint.size != size:
        raise VerificationError(f"bundle says tree size {size}, checkpoint says {checkpoint.size}")
    try:
        record = orjson.loads(leaf)
    except orjson.JSONDecodeError as exc:
        raise VerificationError("the bundle's record is not JSON") from exc
    if not isinstance(record, dict):
        raise VerificationError("the bundle's record is not a JSON object")
    if (
        record.get("seq") != index
        or record.get("log_id") != log_id
        or not checkpoint.origin.endswith("/" + log_id)
    ):
        raise VerificationError("record's log and seq do not match the proof")
    verify_inclusion(index, size, leaf_hash(leaf), proof, checkpoint.root)
    problems = check_record(record, str(record.get("log_id")))
    if problems:
        raise VerificationError(f"record fails its own hashes: {'; '.join(problems)}")
    parsed: dict[str, Any] = record
    return parsed
