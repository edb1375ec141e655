"""Signed checkpoints: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note`` envelopes.

- A checkpoint body is ``<origin>\\n<tree size>\\n<base64 root hash>\\n`` with no extension
  lines (https://c2sp.org/tlog-checkpoint); tokentrail's origin is ``<key name>/<log_id>``.
- A signed note is the body, a blank line, then one line per signature,
  ``— <name> <base64(key id || signature)>`` (https://c2sp.org/signed-note), where the key id is
  the first four bytes of ``SHA-256(name || 0x0A || 0x01 || public key)`` for Ed25519.
- Keys use the text forms of Go's ``golang.org/x/mod/sumdb/note``: the verifier key
  ``<name>+<hex key id>+<base64(0x01 || public key)>`` and the private key
  ``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>``.

Everything here is pure except :meth:`Signer.load`, :meth:`Signer.save` and
:func:`load_verifiers`, which read and write key files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._errors import KeyError_, VerificationError

ALG_ED25519 = 0x01
EM_DASH = "\u2014"
_NAME_RE = re.compile(r"[^\s+]+")
#: What a C2SP signed note must not contain: ASCII control characters other than newline.
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f]")
MAX_KEY_NAME = 128
_MAX_SIZE_DIGITS = 20
_SIZE_RE = re.compile(r"0|[1-9][0-9]*")  # ASCII decimal, no leading zero


def _b64decode(text: str, what: str) -> bytes:
    """Strict base64: the one canonical encoding of its bytes, or a VerificationError."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"{what} is not valid base64") from exc
    if base64.b64encode(data).decode() != text:  # e.g. unused low bits set: another spelling
        raise VerificationError(f"{what} is not canonical base64")
    return data


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key id of an Ed25519 key."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def check_key_name(name: str) -> str:
    """Return ``name`` if it can name a signed-note key, else raise :class:`KeyError_`.

    The name is written into every note it signs, and a C2SP signed note holds no control
    character but newline, so a name with one would make notes no conforming reader opens.
    """
    if not name or not _NAME_RE.fullmatch(name) or "/" in name or _CONTROL_RE.search(name):
        raise KeyError_(
            f"key name {name!r} must be non-empty without spaces, control characters, '+' or '/'"
        )
    return name


def propose_key_name() -> str:
    """A deployment-unique key name: host name plus random hex, as ``keygen`` proposes."""
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()) or "host"
    return f"tokentrail-{host}-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A commitment to a log's Merkle tree: origin, size and root hash."""

    origin: str
    size: int
    root: bytes

    def to_text(self) -> bytes:
        """The C2SP tlog-checkpoint body (three lines, each ending in a newline)."""
        root = base64.b64encode(self.root).decode()
        return f"{self.origin}\n{self.size}\n{root}\n".encode()

    @classmethod
    def from_text(cls, text: bytes) -> Checkpoint:
        """Parse a checkpoint body, raising :class:`VerificationError` if malformed."""
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise VerificationError("checkpoint is not UTF-8") from exc
        lines = decoded.split("\n")
        if len(lines) != 4 or lines[3] != "":
            raise VerificationError("checkpoint body must be exactly three lines")
        origin, size_text, root_text = lines[:3]
        if not origin:
            raise VerificationError("checkpoint origin is empty")
        if not _SIZE_RE.fullmatch(size_text) or len(size_text) > _MAX_SIZE_DIGITS:
            raise VerificationError(f"checkpoint tree size {size_text!r} is not a decimal number")
        root = _b64decode(root_text, "checkpoint root hash")
        if len(root) != 32:
            raise VerificationError("checkpoint root hash is not 32 bytes")
        return cls(origin, int(size_text), root)


@dataclass(frozen=True, slots=True)
class Verifier:
    """An Ed25519 signed-note verifier key."""

    name: str
    key_id: bytes
    public_key: bytes

    @classmethod
    def from_text(cls, text: str) -> Verifier:
        """Parse ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        parts = text.strip().split("+", 2)  # base64 may itself hold '+'
        if len(parts) != 3:
            raise KeyError_("verifier key must look like <name>+<hex key id>+<base64 key>")
        name, hex_id, b64 = parts
        check_key_name(name)
        try:
            raw = base64.b64decode(b64, validate=True)
            kid = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError) as exc:
            raise KeyError_("verifier key has a malformed key id or key") from exc
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise KeyError_("verifier key is not an Ed25519 key (0x01 || 32 bytes)")
        if len(kid) != 4 or kid != key_id(name, raw[1:]):
            raise KeyError_(f"verifier key id {hex_id} does not match the key")
        return cls(name, kid, raw[1:])

    def to_text(self) -> str:
        """The published form ``<name>+<hex key id>+<base64 key>``."""
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{b64}"

    def check(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature over ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Signer:
    """An Ed25519 signed-note signing key; one serves a whole deployment."""

    name: str
    seed: bytes

    @classmethod
    def generate(cls, name: str | None = None) -> Signer:
        """A fresh key under ``name`` (or a proposed deployment-unique name)."""
        name = check_key_name(propose_key_name() if name is None else name)
        if len(name) > MAX_KEY_NAME:  # it starts every signature line and every origin
            raise KeyError_(f"key name is {len(name)} characters long; at most {MAX_KEY_NAME}")
        return cls(name, secrets.token_bytes(32))

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._private().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def verifier(self) -> Verifier:
        """The matching verifier key."""
        pub = self.public_key
        return Verifier(self.name, key_id(self.name, pub), pub)

    def to_text(self) -> str:
        """``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>``."""
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{b64}"

    @classmethod
    def from_text(cls, text: str) -> Signer:
        """Parse :meth:`to_text` output."""
        parts = text.strip().split("+", 4)  # base64 may itself hold '+'
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise KeyError_("signing key must look like PRIVATE+KEY+<name>+<hex id>+<base64>")
        name, hex_id, b64 = parts[2:]
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyError_("signing key is not valid base64") from exc
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise KeyError_("signing key is not an Ed25519 key")
        signer = cls(check_key_name(name), raw[1:])
        if signer.verifier.key_id.hex() != hex_id.lower():
            raise KeyError_("signing key id does not match the key")
        return signer

    def sign_note(self, text: bytes) -> bytes:
        """The signed note: ``text``, a blank line and this key's signature line."""
        sig = self._private().sign(text)
        line = f"{EM_DASH} {self.name} {base64.b64encode(self.verifier.key_id + sig).decode()}\n"
        return text + b"\n" + line.encode()

    def save(self, path: Path) -> None:
        """Write the key to ``path`` with mode 0600, refusing to overwrite."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise KeyError_(f"cannot write signing key {path}: a file is in the way") from exc
        except OSError as exc:
            raise KeyError_(f"cannot write signing key {path}: {exc.strerror}") from exc
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise KeyError_(f"{path} already exists; refusing to overwrite a signing key") from exc
        except OSError as exc:
            raise KeyError_(f"cannot write signing key {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "w") as fh:
            fh.write(self.to_text() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @classmethod
    def load_or_create(cls, path: Path, name: str | None = None) -> tuple[Signer, bool]:
        """The key at ``path``; created there (0600, with ``verifier.pub`` beside it) if missing.

        Returns the key and whether it was created.
        """
        if path.exists():
            return cls.load(path), False
        pub = path.with_name("verifier.pub")
        if pub.exists():  # another key's, published perhaps: never left beside a new key
            raise KeyError_(
                f"{pub} exists beside {path}, which does not: it is another key's verifier key;"
                " move it away (or restore the signing key it belongs to)"
            )
        signer = cls.generate(name)
        signer.save(path)
        pub.write_text(signer.verifier.to_text() + "\n")
        return signer, True

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Read a key file, refusing one that group or others can read."""
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except FileNotFoundError as exc:
            raise KeyError_(
                f"signing key {path} does not exist (create one: tokentrail keygen)"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyError_(f"cannot read signing key {path}: {exc}") from exc
        if not text.strip().startswith("PRIVATE+KEY+"):
            hint = " (it holds a verifier key)" if _looks_like_verifier(text) else ""
            raise KeyError_(f"{path} is not a tokentrail signing key{hint}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyError_(
                f"signing key {path} is readable by group or others (mode {stat.S_IMODE(mode):o});"
                f" run: chmod 600 {path}"
            )
        return cls.from_text(text)


def _looks_like_verifier(text: str) -> bool:
    try:
        Verifier.from_text(text)
    except KeyError_:
        return False
    return True


def split_note(note: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Split a signed note into its text and its ``(name, key id || signature)`` lines."""
    cut = note.rfind(b"\n\n")
    if cut < 0 or not note.endswith(b"\n"):
        raise VerificationError("not a signed note (no blank line before signatures)")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationError("signed note is not valid UTF-8") from None
    if _CONTROL_RE.search(decoded):
        raise VerificationError("signed note holds a control character other than newline")
    text, sig_block = note[: cut + 1], note[cut + 2 :]
    sigs: list[tuple[str, bytes]] = []
    prefix = f"{EM_DASH} ".encode()
    for line in sig_block[:-1].split(b"\n"):
        if not line.startswith(prefix):
            raise VerificationError("malformed signature line in signed note")
        fields = line[len(prefix) :].decode("utf-8", "replace").split(" ")
        if len(fields) != 2 or not fields[0]:
            raise VerificationError("malformed signature line in signed note")
        blob = _b64decode(fields[1], "note signature")
        if len(blob) < 5:
            raise VerificationError("note signature is too short")
        sigs.append((fields[0], blob))
    if not sigs:
        raise VerificationError("signed note carries no signature")
    return text, sigs


def open_note(note: bytes, verifiers: Sequence[Verifier]) -> tuple[bytes, list[str]]:
    """The text of a signed note and the names of known keys that signed it.

    Signatures by unknown keys (cosigners, witnesses) are ignored; a signature that claims a
    known key's name and id but does not verify is an error, and so is a note no known key signed.
    """
    text, sigs = split_note(note)
    by_id = {(v.name, v.key_id): v for v in verifiers}
    signed_by: list[str] = []
    for name, blob in sigs:
        verifier = by_id.get((name, blob[:4]))
        if verifier is None:
            continue
        if not verifier.check(text, blob[4:]):
            raise VerificationError(f"signature by key {name!r} does not verify")
        signed_by.append(name)
    if not signed_by:
        names = ", ".join(sorted({n for n, _ in sigs}))
        raise VerificationError(f"no signature by a trusted key (signed by: {names})")
    return text, signed_by


def load_verifiers(specs: Iterable[str]) -> list[Verifier]:
    """Verifier keys from strings that are either a key itself or a file holding keys."""
    out: list[Verifier] = []
    for spec in specs:
        if not spec.strip():
            raise KeyError_("the verifier key given is empty: pass name+id+key, or a file")
        if "+" in spec and not Path(spec).exists():
            out.append(Verifier.from_text(spec))
            continue
        try:
            lines = Path(spec).read_text().splitlines()
        except FileNotFoundError as exc:
            raise KeyError_(f"verifier key file {spec} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyError_(f"cannot read verifier key file {spec}: {exc}") from exc
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        if not keys:
            raise KeyError_(f"verifier key file {spec} holds no key")
        for key in keys:
            if key.startswith("PRIVATE+KEY"):
                raise KeyError_(f"{spec} is a private signing key; pass the verifier (public) key")
            try:
                out.append(Verifier.from_text(key))
            except KeyError_ as exc:
                raise KeyError_(f"{spec}: {exc}") from exc
    return out
