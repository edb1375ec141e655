"""The RFC 9162 Merkle tree: leaf and node hashes, roots, compact ranges and proofs.

Pure functions over bytes, after RFC 9162 section 2.1 (the same tree as RFC 6962):

- ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``;
- MTH(D[n]) splits at ``k``, the largest power of two smaller than ``n``;
- inclusion proofs (2.1.3) and consistency proofs (2.1.4), generated from the list of leaf
  hashes and verified with the algorithms of 2.1.3.2 and 2.1.4.2. :func:`inclusion_proof` follows
  the RFC's recursive definition; :class:`MerkleLevels` builds every level once, in O(n), so
  that proofs of many leaves of one tree cost O(log n) each (what ``prove`` and ``export`` use).

A :class:`CompactRange` holds the roots of the perfect subtrees that make up a tree of size
``n`` (one per set bit of ``n``), so a writer or a verifier extends a tree one leaf at a time in
amortised O(1) hashes and O(log n) memory, never re-reading what came before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._errors import VerificationError

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    """Hash one leaf: ``SHA-256(0x00 || leaf)``."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash an interior node: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaves given by their leaf hashes (RFC 9162 section 2.1.1)."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(root_from_hashes(hashes[:k]), root_from_hashes(hashes[k:]))


@dataclass
class CompactRange:
    """The perfect-subtree roots of a tree of ``size`` leaves, largest subtree first."""

    size: int = 0
    roots: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.roots) != bin(self.size).count("1"):
            raise VerificationError(
                f"compact range of size {self.size} needs {bin(self.size).count('1')} roots, "
                f"has {len(self.roots)}"
            )

    def append(self, lhash: bytes) -> None:
        """Add one leaf, given by its leaf hash, merging equal-sized subtrees."""
        node = lhash
        n = self.size
        while n & 1:
            node = node_hash(self.roots.pop(), node)
            n >>= 1
        self.roots.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The Merkle Tree Hash of the leaves appended so far."""
        if not self.roots:
            return EMPTY_ROOT
        node = self.roots[-1]
        for left in reversed(self.roots[:-1]):
            node = node_hash(left, node)
        return node

    def copy(self) -> CompactRange:
        """An independent copy, so one can be extended while the other is kept."""
        return CompactRange(self.size, list(self.roots))

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form: size and hex roots."""
        return {"size": self.size, "roots": [r.hex() for r in self.roots]}

    @classmethod
    def from_json(cls, obj: object) -> CompactRange:
        """Parse :meth:`to_json` output, raising :class:`VerificationError` on bad input."""
        if not isinstance(obj, dict):
            raise VerificationError("malformed compact range: not an object")
        size, hex_roots = obj.get("size"), obj.get("roots")
        if type(size) is not int or size < 0 or not isinstance(hex_roots, list):
            raise VerificationError("malformed compact range: bad size or roots")
        try:
            roots = [bytes.fromhex(r) for r in hex_roots]
        except (TypeError, ValueError) as exc:
            raise VerificationError(f"malformed compact range: {exc}") from exc
        if any(len(r) != 32 for r in roots):
            raise VerificationError("malformed compact range: a root is not 32 bytes")
        return cls(size, roots)


class MerkleLevels:
    """Every level of an RFC 9162 tree, as concatenated 32-byte hashes; proofs in O(log n)."""

    def __init__(self, hashes: list[bytes]) -> None:
        self.size = len(hashes)
        level = b"".join(hashes)
        self.levels = [level]
        sha = hashlib.sha256  # node_hash, inlined: this loop is the whole cost of a bulk proof
        while len(level) > 32:
            n = len(level) // 32
            nxt = [sha(b"\x01" + level[i * 32 : i * 32 + 64]).digest() for i in range(0, n - 1, 2)]
            if n % 2:
                nxt.append(level[-32:])
            level = b"".join(nxt)
            self.levels.append(level)

    def root(self) -> bytes:
        """The Merkle Tree Hash (empty tree: SHA-256 of nothing)."""
        return self.levels[-1] if self.size else EMPTY_ROOT

    def proof(self, index: int) -> list[bytes]:
        """The audit path of leaf ``index`` (RFC 9162 section 2.1.3.1)."""
        if not 0 <= index < self.size:
            raise ValueError(f"leaf index {index} outside tree of size {self.size}")
        path: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling * 32 < len(level):
                path.append(level[sibling * 32 : sibling * 32 + 32])
            index >>= 1
        return path


def _check_hashes(*hashes: bytes) -> None:
    if any(len(h) != 32 for h in hashes):
        raise VerificationError("a hash in the proof is not 32 bytes (SHA-256)")


def inclusion_proof(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf ``index`` in the tree over ``hashes``."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} outside tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, hashes[:k]), root_from_hashes(hashes[k:])]
    return [*inclusion_proof(index - k, hashes[k:]), root_from_hashes(hashes[:k])]


def root_from_inclusion_proof(index: int, size: int, lhash: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 section 2.1.3.2)."""
    _check_hashes(lhash, *proof)
    if not 0 <= index < size:
        raise VerificationError(f"leaf index {index} outside tree of size {size}")
    fn, sn = index, size - 1
    r = lhash
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is longer than the tree allows")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is shorter than the tree needs")
    return r


def verify_inclusion(
    index: int, size: int, lhash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise :class:`VerificationError` unless ``proof`` puts ``lhash`` at ``index``."""
    _check_hashes(root)
    found = root_from_inclusion_proof(index, size, lhash, proof)
    if found != root:
        raise VerificationError(
            f"inclusion proof for leaf {index} does not lead to the root of tree size {size}",
            expected=root.hex(),
            found=found.hex(),
        )


def consistency_proof(old_size: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1."""
    n = len(hashes)
    if not 0 < old_size <= n:
        raise ValueError(f"old size {old_size} outside 1..{n}")
    return _subproof(old_size, hashes, True)


def _subproof(m: int, hashes: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [root_from_hashes(hashes)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, hashes[:k], complete), root_from_hashes(hashes[k:])]
    return [*_subproof(m - k, hashes[k:], False), root_from_hashes(hashes[:k])]


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check a consistency proof (RFC 9162 section 2.1.4.2), raising on failure."""
    if old_size < 0 or new_size < 0:
        raise VerificationError("tree sizes cannot be negative")
    if old_size > new_size:
        raise VerificationError(f"old tree size {old_size} is larger than new size {new_size}")
    if old_size == new_size:
        if proof:
            raise VerificationError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise VerificationError("two different roots for one tree size")
        return
    if old_size == 0:
        if proof:
            raise VerificationError("consistency proof from the empty tree must be empty")
        return
    _check_hashes(old_root, new_root, *proof)
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    if not path:
        raise VerificationError("consistency proof is empty")
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is longer than the trees allow")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise VerificationError(
            f"consistency proof from size {old_size} to {new_size} does not hold"
        )
