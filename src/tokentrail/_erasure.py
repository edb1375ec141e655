"""Erasure without breaking the chain: crypto-shredding (SPEC section 7).

With content sealing on, every record's content — token sequences, texts, the request body, the
output messages and logprobs — is encrypted with AES-256-GCM under a key derived from its data
subject's key (the subject is the ``user_id``; records without one share the subject
``_anonymous``), and the content hashes become HMAC-SHA-256 under another key derived from it,
because a plain hash of a short prompt can be reversed by guessing. The record says so with
``content_sealed: true`` and carries the ciphertext in ``sealed_content``.

``forget`` destroys the subject key. The leaves (ciphertext) and every hash stay, so the log
still verifies; the content can no longer be read by anyone.

Keys live in a :class:`KeyStore`. :class:`FileKeyStore` keeps one 0600 file per subject in a
directory outside the ledger; a KMS-backed store implements the same four methods.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import ConfigError, StoreError, SubjectForgottenError, VerificationError
from ._layout import fsync_dir, iter_lines, list_log, list_logs
from ._record import Exchange, clean_text, now_rfc3339, storable, tokens_json

ANONYMOUS = "_anonymous"
ALGORITHM = "AES-256-GCM"
#: Extra fields that carry content, sealed along with tokens and texts.
CONTENT_EXTRA = (
    "request_body",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "output_logprobs",
)
_CONTENT_FIELDS = ("input_tokens", "output_tokens", "input_text", "output_text")


def _derive(subject_key: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"tokentrail " + purpose).derive(subject_key)


def subject_of(user_id: str | None) -> str:
    """The data subject a record belongs to: its ``user_id``, with a lone surrogate (which no
    UTF-8 holds, nor the record) as U+FFFD, as the record stores it. (A noncharacter, which the
    record stores as U+FFFD too, stays: keys made before were named by it. The proxy and the
    SDK refuse such user ids.)"""
    if not user_id:
        return ANONYMOUS
    try:
        user_id.encode("utf-8")
    except UnicodeEncodeError:
        return clean_text(user_id)
    return user_id


def key_id(subject: str) -> str:
    """A stable, non-reversible name for a subject's key (never the user id itself)."""
    return hashlib.sha256(b"tokentrail subject\n" + subject.encode()).hexdigest()[:32]


class KeyStore(Protocol):
    """Where subject keys live; a KMS can implement these four methods."""

    def key_for(self, subject: str) -> bytes:
        """The subject's key, created on first use; raises StoreError if it was destroyed."""

    def lookup(self, subject_key_id: str) -> bytes | None:
        """The key with this id, or ``None`` when it never existed or was destroyed."""

    def destroy(self, subject: str) -> str:
        """Destroy the subject's key for good; return when (RFC 3339)."""

    def destroyed_at(self, subject_key_id: str) -> str | None:
        """When the key with this id was destroyed, or ``None``."""


class FileKeyStore:
    """One 32-byte key per subject in a 0600 file, named by :func:`key_id`, never by user id.

    Destroying overwrites the file with zeros, fsyncs and removes it, and leaves a tombstone
    holding only the time. (On flash storage an overwrite is not a guaranteed physical erase;
    a KMS-backed store gives that guarantee.)
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, kid: str, suffix: str) -> Path:
        return self.root / f"{kid}.{suffix}"

    def key_for(self, subject: str) -> bytes:
        kid = key_id(subject)
        found = self.lookup(kid)
        if found is not None:
            return found
        if (when := self.destroyed_at(kid)) is not None:
            raise SubjectForgottenError(
                f"the data of user {subject!r} was erased on {when} (tokentrail forget):"
                " their exchanges are no longer forwarded or recorded"
            )
        key = secrets.token_bytes(32)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._path(kid, "key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            found = self.lookup(kid)  # another writer created it first
            if found is None:
                raise StoreError(f"key file for {kid} exists but cannot be read") from None
            return found
        except OSError as exc:
            raise StoreError(f"cannot write key store {self.root}: {exc.strerror}") from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        return key

    def lookup(self, subject_key_id: str) -> bytes | None:
        try:
            key = self._path(subject_key_id, "key").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read key store {self.root}: {exc.strerror}") from exc
        return key if len(key) == 32 and key != bytes(32) else None  # zeroed: being destroyed

    def destroy(self, subject: str) -> str:
        kid = key_id(subject)
        path = self._path(kid, "key")
        when = now_rfc3339()
        if not path.exists():
            if (already := self.destroyed_at(kid)) is not None:
                return already
            if not self.root.is_dir():
                raise StoreError(f"key store {self.root} does not exist (or is not a folder)")
            raise StoreError(f"no key for subject {subject!r} in {self.root}")
        # The tombstone first: from then on no writer can make the subject a new key (key_for
        # makes one only when there is neither a key nor a tombstone), and the zeroed key is
        # never handed out (lookup refuses it) before the file goes. Mode 0600, as the keys.
        tombstone = self._path(kid, "destroyed")
        fd = os.open(tombstone, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(when + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.root)
        with path.open("r+b") as fh:
            fh.write(b"\0" * 32)
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
        return when

    def destroyed_at(self, subject_key_id: str) -> str | None:
        try:
            return self._path(subject_key_id, "destroyed").read_text().strip() or None
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class Sealer:
    """Seals exchanges' content under their subject's key before they reach the ledger."""

    keys: KeyStore

    def __call__(self, exchange: Exchange) -> Exchange:
        """The exchange with its content encrypted and its hashes keyed."""
        if exchange.extra.get("content_sealed"):
            return exchange
        try:
            return self._seal(exchange)
        except (TypeError, UnicodeEncodeError):  # a lone surrogate, say: sealed as stored
            exchange = exchange.scrubbed()
        try:
            return self._seal(exchange)
        except TypeError:  # nested deeper than the encoder goes: kept, with a note instead
            return self._seal(exchange, lenient=True)

    def _seal(self, exchange: Exchange, *, lenient: bool = False) -> Exchange:
        subject = subject_of(exchange.user_id)
        key = self.keys.key_for(subject)
        mac_key = _derive(key, b"content hash v1")
        content: dict[str, Any] = {name: getattr(exchange, name) for name in _CONTENT_FIELDS}
        extra = dict(exchange.extra)
        for name in CONTENT_EXTRA:
            if name in extra:
                content[name] = extra.pop(name)
        if lenient:  # as Exchange.content_bytes keeps a record whose extra fields it cannot
            content = {name: storable(value) for name, value in content.items()}
        nonce = secrets.token_bytes(12)
        ciphertext = AESGCM(_derive(key, b"content encryption v1")).encrypt(
            nonce, orjson.dumps(content), exchange.event_id.encode()
        )
        extra["content_sealed"] = True
        extra["sealed_content"] = {
            "alg": ALGORITHM,
            "subject_key_id": key_id(subject),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ciphertext).decode(),
        }
        keyed = {
            "input_hash": _mac(mac_key, tokens_json(exchange.input_tokens)),
            "output_hash": _mac(mac_key, tokens_json(exchange.output_tokens)),
            "input_text_hash": _text_mac(mac_key, exchange.input_text),
            "output_text_hash": _text_mac(mac_key, exchange.output_text),
        }
        return replace(
            exchange, input_tokens=None, output_tokens=None, input_text=None, output_text=None,
            extra=extra, hashes=keyed,
        )  # fmt: skip


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _text_mac(key: bytes, text: str | None) -> str | None:
    return None if text is None else _mac(key, text.encode("utf-8"))


@dataclass(frozen=True)
class Opened:
    """A record's content after opening: the plaintext fields, or when they were erased."""

    content: dict[str, Any] | None
    erased_at: str | None = None


def open_record(record: Mapping[str, Any], keys: KeyStore | None) -> Opened:
    """The content of a stored record: as stored, decrypted, or marked as erased."""
    if not record.get("content_sealed"):
        return Opened({name: record.get(name) for name in (*_CONTENT_FIELDS, *CONTENT_EXTRA)})
    envelope = record.get("sealed_content")
    if not isinstance(envelope, dict) or envelope.get("alg") != ALGORITHM:
        raise VerificationError(f"record {record.get('event_id')} has a malformed sealed_content")
    kid = str(envelope.get("subject_key_id"))
    if keys is None:
        raise ConfigError("this record's content is sealed: pass --keystore to read it")
    key = keys.lookup(kid)
    if key is None:
        return Opened(None, keys.destroyed_at(kid) or "unknown (no key in this key store)")
    try:
        plain = AESGCM(_derive(key, b"content encryption v1")).decrypt(
            base64.b64decode(envelope["nonce"]),
            base64.b64decode(envelope["ciphertext"]),
            str(record.get("event_id")).encode(),
        )
    except (InvalidTag, KeyError, ValueError) as exc:
        raise VerificationError(
            f"record {record.get('event_id')}: sealed content does not open"
        ) from exc
    content: dict[str, Any] = orjson.loads(plain)
    problems = keyed_hash_problems(record, content, _derive(key, b"content hash v1"))
    if problems:
        raise VerificationError(f"record {record.get('event_id')}: {problems[0]}")
    return Opened(content)


def content_hash_key(keys: KeyStore, subject_key_id: str) -> bytes | None:
    """The key a subject's content hashes are keyed with (not the key that decrypts), if any.

    A DSAR export carries it, so the data subject can check that the content handed over is the
    content the ledger committed to, without being able to decrypt anyone else's records.
    """
    key = keys.lookup(subject_key_id)
    return None if key is None else _derive(key, b"content hash v1")


def keyed_hash_problems(
    record: Mapping[str, Any], content: Mapping[str, Any], mac_key: bytes
) -> list[str]:
    """Which of a sealed record's keyed hashes ``content`` does not match."""
    checks = {
        "input_hash": _mac(mac_key, tokens_json(content.get("input_tokens"))),
        "output_hash": _mac(mac_key, tokens_json(content.get("output_tokens"))),
        "input_text_hash": _text_mac(mac_key, content.get("input_text")),
        "output_text_hash": _text_mac(mac_key, content.get("output_text")),
    }
    return [
        f"keyed {name} does not match"
        for name, value in checks.items()
        if record.get(name) != value
    ]


def forget(keys: KeyStore, user_id: str, ledger: Path | None = None) -> str:
    """Destroy ``user_id``'s key, drop the rebuildable index, and return when.

    The key is gone whatever happens to the index; an index that could not be dropped (a
    read-only ledger) is a :class:`StoreError` after the fact, naming it.
    """
    when = keys.destroy(subject_of(user_id))
    if ledger is not None:
        index = ledger / "index"
        if index.is_dir():
            for path in sorted(index.rglob("*"), reverse=True):
                with contextlib.suppress(OSError):
                    path.unlink() if path.is_file() else path.rmdir()
            with contextlib.suppress(OSError):
                index.rmdir()
        if index.exists():
            raise StoreError(
                f"the content key of {user_id} was destroyed at {when}, but the search index"
                f" {index} could not be removed: delete it where the ledger is writable (it is"
                " rebuilt from the ledger)"
            )
    return when


def unsealed_records(ledger: Path, user_id: str) -> int:
    """How many of ``user_id``'s records in ``ledger`` were written without sealing: their
    content stays readable whatever happens to the key store (the log is append-only)."""
    needle = orjson.dumps(user_id)
    count = 0
    for log_id in list_logs(ledger):
        for seg in list_log(ledger, log_id).segments:
            for _, line, complete in iter_lines(seg.path):
                if complete and needle in line:
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue  # not a record (verify reports it): it blocks no erasure
                    if isinstance(obj, dict) and obj.get("user_id") == user_id:
                        count += "event_id" in obj and not obj.get("content_sealed")
    return count
