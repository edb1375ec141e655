"""Tests for the RFC 9162 Merkle core: published vectors, a brute-force reference, negatives.

The expected values come from two places only, never from the code under test:

- the published Certificate Transparency vectors of transparency-dev/merkle
  (``testonly/constants.go`` and ``proof/verify_test.go``; the same eight leaves and roots as
  google/certificate-transparency ``src/merkletree/MerkleTreeTest.cc``), copied as hex;
- a brute-force implementation written here straight from the recursive definitions of RFC 9162
  section 2.1 (MTH, PATH, PROOF/SUBPROOF), and verifiers that rebuild roots along those
  definitions, used as an oracle for every tree size 1..300 and for mutated proofs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokentrail._errors import VerificationError
from tokentrail._merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleLevels,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_hashes,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

# --------------------------------------------------------------------------------------------
# Published vectors.
# Source: https://github.com/transparency-dev/merkle, files testonly/constants.go
# (LeafInputs, NodeHashes, RootHashes, CompactTrees, EmptyRootHash), proof/verify_test.go
# (inclusionProofs, consistencyProofs, roots, sha256SomeHash, TestVerifyConsistency,
# TestVerifyInclusionSingleEntry) and rfc6962/rfc6962_test.go (TestRFC6962Hasher).
# --------------------------------------------------------------------------------------------


def h(hex_digest: str) -> bytes:
    """Decode one published 32-byte hash."""
    raw = bytes.fromhex(hex_digest)
    assert len(raw) == 32
    return raw


LEAF_INPUTS = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]

# NodeHashes(): level, then horizontal index within the level.
NODE_HASHES = [
    [
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7"),
        h("07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"),
    ],
    [
        h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
    ],
    [
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ],
    [
        h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
    ],
]

EMPTY_ROOT_HASH = h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")

# RootHashes() for tree sizes 1..8 (index 0 here is size 1).
ROOTS = [
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]

# CompactTrees(): the perfect-subtree roots of each tree size, largest first.
_NH = NODE_HASHES
COMPACT_TREES = [
    [],
    [_NH[0][0]],
    [_NH[1][0]],
    [_NH[1][0], _NH[0][2]],
    [_NH[2][0]],
    [_NH[2][0], _NH[0][4]],
    [_NH[2][0], _NH[1][2]],
    [_NH[2][0], _NH[1][2], _NH[0][6]],
    [_NH[3][0]],
]

# inclusionProofs in proof/verify_test.go number leaves from 1 ({leaf, size, proof}); the
# indexes below are those minus one. The {0, 0, nil} entry is an invalid path there too.
INCLUSION_VECTORS = [
    (0, 1, []),
    (
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        3,
        [
            h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
        ],
    ),
    (
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]

# consistencyProofs in proof/verify_test.go: {size1, size2, proof}.
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]

SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def _vector_id(vector: tuple[int, int, list[bytes]]) -> str:
    return f"{vector[0]}-{vector[1]}"


# --------------------------------------------------------------------------------------------
# Brute-force reference, straight from RFC 9162 section 2.1, sharing nothing with the module.
# --------------------------------------------------------------------------------------------


def ref_leaf(data: bytes) -> bytes:
    """MTH({d0}) = SHA-256(0x00 || d0)."""
    return hashlib.sha256(b"\x00" + data).digest()


def ref_node(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def ref_split(n: int) -> int:
    """k, the largest power of two smaller than n (n > 1), found by counting up."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class RefTree:
    """MTH, PATH and PROOF over one fixed list of leaves, memoised by leaf range."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.leaf_hashes = [ref_leaf(d) for d in leaves]

    @functools.cache  # noqa: B019 - a few module-level trees live forever
    def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi])."""
        n = hi - lo
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return self.leaf_hashes[lo]
        k = ref_split(n)
        return ref_node(self.mth(lo, lo + k), self.mth(lo + k, hi))

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """PATH(m, D[lo:hi]), m counted from lo."""
        n = hi - lo
        if n == 1:
            return []
        k = ref_split(n)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""
        return self.subproof(m, 0, n, True)

    def subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        """SUBPROOF(m, D[lo:hi], b)."""
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = ref_split(n)
        if m <= k:
            return [*self.subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self.subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]


def ref_root_from_path(index: int, size: int, lhash: bytes, proof: list[bytes]) -> bytes | None:
    """The root a PATH implies, walking the tree shape of ``size``; None if the shape differs."""
    if not 0 <= index < size:
        return None
    if size == 1:
        return None if proof else lhash
    if not proof:
        return None
    k = ref_split(size)
    *rest, sibling = proof
    if index < k:
        sub = ref_root_from_path(index, k, lhash, rest)
        return None if sub is None else ref_node(sub, sibling)
    sub = ref_root_from_path(index - k, size - k, lhash, rest)
    return None if sub is None else ref_node(sibling, sub)


def sha256_sized(*hashes: bytes) -> bool:
    """Whether every hash has the size of a SHA-256 digest."""
    return all(len(h) == 32 for h in hashes)


def ref_includes(index: int, size: int, lhash: bytes, proof: list[bytes], root: bytes) -> bool:
    """Whether ``proof`` is a PATH putting ``lhash`` at ``index`` under ``root``."""
    return ref_root_from_path(index, size, lhash, proof) == root


def _ref_subproof_roots(
    m: int, n: int, old_root: bytes, proof: list[bytes], b: bool
) -> tuple[bytes, bytes] | None:
    """(old subtree hash, new subtree hash) implied by a SUBPROOF(m, D[n], b); None on misfit."""
    if m == n:
        if b:
            return None if proof else (old_root, old_root)
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = ref_split(n)
    *rest, sibling = proof
    if m <= k:
        sub = _ref_subproof_roots(m, k, old_root, rest, b)
        return None if sub is None else (sub[0], ref_node(sub[1], sibling))
    sub = _ref_subproof_roots(m - k, n - k, old_root, rest, False)
    return None if sub is None else (ref_node(sibling, sub[0]), ref_node(sibling, sub[1]))


def ref_consistent(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> bool:
    """Whether ``proof`` is a PROOF(old_size, D[new_size]) joining the two roots."""
    if old_size < 0 or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    roots = _ref_subproof_roots(old_size, new_size, old_root, proof, True)
    return roots == (old_root, new_root)


MAX_N = 300
SWEEP = RefTree([f"tokentrail leaf {i}".encode() for i in range(MAX_N)])
VECTORS = RefTree(LEAF_INPUTS)
#: Up to this size every index and old size is compared; above it a sample is.
FULL_N = 64


def sample_points(n: int, lo: int, hi: int) -> list[int]:
    """Every point of lo..hi-1 for small trees, else the edges, powers of two and a sample."""
    if n <= FULL_N:
        return list(range(lo, hi))
    picks = {lo, lo + 1, hi - 2, hi - 1}
    p = 1
    while p < hi:
        picks.update({p - 1, p, p + 1})
        p *= 2
    picks.update(random.Random(n).sample(range(lo, hi), 12))
    return sorted(x for x in picks if lo <= x < hi)


def raises_verification(fn: object, *args: object) -> bool:
    """True if the call raises VerificationError, False if it returns; anything else escapes."""
    assert callable(fn)
    try:
        fn(*args)
    except VerificationError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# The reference against the published vectors, so that the sweep below can be trusted.
# --------------------------------------------------------------------------------------------


class TestReference:
    @pytest.mark.parametrize("size", range(1, 9))
    def test_reference_root_matches_published(self, size: int) -> None:
        """The brute-force MTH reproduces the published root of every size 1..8."""
        assert ROOTS[size - 1] == VECTORS.mth(0, size)

    @pytest.mark.parametrize("vector", INCLUSION_VECTORS, ids=_vector_id)
    def test_reference_path_matches_published(self, vector: tuple[int, int, list[bytes]]) -> None:
        """The brute-force PATH reproduces each published inclusion proof."""
        index, size, proof = vector
        assert proof == VECTORS.path(index, 0, size)

    @pytest.mark.parametrize("vector", CONSISTENCY_VECTORS, ids=_vector_id)
    def test_reference_proof_matches_published(self, vector: tuple[int, int, list[bytes]]) -> None:
        """The brute-force PROOF reproduces each published consistency proof."""
        old, new, proof = vector
        assert proof == VECTORS.proof(old, new)


# --------------------------------------------------------------------------------------------
# The module against the published vectors.
# --------------------------------------------------------------------------------------------


class TestHashes:
    def test_empty_root(self) -> None:
        """The root of the empty tree is SHA-256 of nothing."""
        assert EMPTY_ROOT_HASH == EMPTY_ROOT == root_from_hashes([]) == CompactRange().root()

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (b"", "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            (b"L123456", "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"),
        ],
    )
    def test_leaf_hash(self, data: bytes, expected: str) -> None:
        """leaf_hash matches rfc6962_test.go's leaf vectors."""
        assert expected == leaf_hash(data).hex()

    def test_node_hash(self) -> None:
        """node_hash matches rfc6962_test.go's node vector."""
        expected = "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
        assert expected == node_hash(b"N123", b"N456").hex()

    @pytest.mark.parametrize("index", range(8))
    def test_leaf_hashes_of_published_inputs(self, index: int) -> None:
        """Each published leaf input hashes to the published level-0 node."""
        assert NODE_HASHES[0][index] == leaf_hash(LEAF_INPUTS[index])


class TestPublishedVectors:
    @pytest.mark.parametrize("size", range(1, 9))
    def test_root_from_hashes(self, size: int) -> None:
        """root_from_hashes gives the published root of every size 1..8."""
        hashes = [leaf_hash(d) for d in LEAF_INPUTS[:size]]
        assert ROOTS[size - 1] == root_from_hashes(hashes)

    def test_compact_range_roots_and_subtrees(self) -> None:
        """Appending the leaves one by one gives the published roots and compact trees."""
        cr = CompactRange()
        assert COMPACT_TREES[0] == cr.roots
        for size, data in enumerate(LEAF_INPUTS, start=1):
            cr.append(leaf_hash(data))
            assert (size, COMPACT_TREES[size], ROOTS[size - 1]) == (cr.size, cr.roots, cr.root())

    @pytest.mark.parametrize("vector", INCLUSION_VECTORS, ids=_vector_id)
    def test_inclusion_proof(self, vector: tuple[int, int, list[bytes]]) -> None:
        """inclusion_proof produces the published proof."""
        index, size, proof = vector
        hashes = [leaf_hash(d) for d in LEAF_INPUTS[:size]]
        assert proof == inclusion_proof(index, hashes)

    @pytest.mark.parametrize("vector", INCLUSION_VECTORS, ids=_vector_id)
    def test_verify_inclusion(self, vector: tuple[int, int, list[bytes]]) -> None:
        """The published proof leads to the published root and verifies."""
        index, size, proof = vector
        lhash = leaf_hash(LEAF_INPUTS[index])
        assert ROOTS[size - 1] == root_from_inclusion_proof(index, size, lhash, proof)
        assert verify_inclusion(index, size, lhash, proof, ROOTS[size - 1]) is None

    @pytest.mark.parametrize("vector", CONSISTENCY_VECTORS, ids=_vector_id)
    def test_consistency_proof(self, vector: tuple[int, int, list[bytes]]) -> None:
        """consistency_proof produces the published proof."""
        old, new, proof = vector
        hashes = [leaf_hash(d) for d in LEAF_INPUTS[:new]]
        assert proof == consistency_proof(old, hashes)

    @pytest.mark.parametrize("vector", CONSISTENCY_VECTORS, ids=_vector_id)
    def test_verify_consistency(self, vector: tuple[int, int, list[bytes]]) -> None:
        """The published proof joins the two published roots."""
        old, new, proof = vector
        assert verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof) is None


def _corrupt_inclusion(
    index: int, size: int, proof: list[bytes], root: bytes, lhash: bytes
) -> list[tuple[str, tuple[int, int, bytes, list[bytes], bytes]]]:
    """The probes of corruptInclusionProof in proof/verify_test.go, all of which must fail."""
    probes = [
        ("index - 1", (index - 1, size, lhash, proof, root)),
        ("index + 1", (index + 1, size, lhash, proof, root)),
        ("index ^ 2", (index ^ 2, size, lhash, proof, root)),
        ("size * 2", (index, size * 2, lhash, proof, root)),
        ("size / 2", (index, size // 2, lhash, proof, root)),
        ("wrong leaf", (index, size, b"WrongLeaf", proof, root)),
        ("empty root", (index, size, lhash, proof, EMPTY_ROOT_HASH)),
        ("random root", (index, size, lhash, proof, SOME_HASH)),
        ("trailing garbage", (index, size, lhash, [*proof, b""], root)),
        ("trailing root", (index, size, lhash, [*proof, root], root)),
        ("preceding garbage", (index, size, lhash, [b"", *proof], root)),
        ("preceding root", (index, size, lhash, [root, *proof], root)),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 8]) + wrong[i][1:]
        probes.append((f"modified proof[{i}] bit 3", (index, size, lhash, wrong, root)))
    if proof:
        probes.append(("removed component", (index, size, lhash, proof[:-1], root)))
    if len(proof) > 1:
        wrong = [proof[0], SOME_HASH, *proof[1:]]
        probes.append(("inserted component", (index, size, lhash, wrong, root)))
    return probes


INCLUSION_PROBES = [
    pytest.param(*args, id=f"{index}-{size}: {desc}")
    for index, size, proof in INCLUSION_VECTORS
    for desc, args in _corrupt_inclusion(
        index, size, proof, ROOTS[size - 1], leaf_hash(LEAF_INPUTS[index])
    )
]


def _corrupt_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]
) -> list[tuple[str, tuple[int, int, bytes, bytes, list[bytes]]]]:
    """The probes of corruptConsistencyProof in proof/verify_test.go, all of which must fail."""
    probes = [
        ("size1 - 1", (size1 - 1, size2, root1, root2, proof)),
        ("size1 + 1", (size1 + 1, size2, root1, root2, proof)),
        ("size1 ^ 2", (size1 ^ 2, size2, root1, root2, proof)),
        ("size2 * 2", (size1, size2 * 2, root1, root2, proof)),
        ("size2 / 2", (size1, size2 // 2, root1, root2, proof)),
        ("wrong root1", (size1, size2, b"WrongRoot", root2, proof)),
        ("wrong root2", (size1, size2, root1, b"WrongRoot", proof)),
        ("swapped roots", (size1, size2, root2, root1, proof)),
        ("empty proof", (size1, size2, root1, root2, [])),
        ("trailing garbage", (size1, size2, root1, root2, [*proof, b""])),
        ("trailing root1", (size1, size2, root1, root2, [*proof, root1])),
        ("trailing root2", (size1, size2, root1, root2, [*proof, root2])),
        ("preceding garbage", (size1, size2, root1, root2, [b"", *proof])),
        ("preceding root1", (size1, size2, root1, root2, [root1, *proof])),
        ("preceding root2", (size1, size2, root1, root2, [root2, *proof])),
        ("preceding proof[0]", (size1, size2, root1, root2, [proof[0], *proof])),
        ("truncated proof", (size1, size2, root1, root2, proof[:-1])),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 16]) + wrong[i][1:]
        probes.append((f"modified proof[{i}] bit 4", (size1, size2, root1, root2, wrong)))
    return probes


CONSISTENCY_PROBES = [
    pytest.param(*args, id=f"{old}-{new}: {desc}")
    for old, new, proof in CONSISTENCY_VECTORS
    if proof  # verify_test.go corrupts only the non-trivial proofs
    for desc, args in _corrupt_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)
]

DONT_CARE_1 = b"don't care 1"
DONT_CARE_2 = b"don't care 2"


class TestPublishedNegatives:
    @pytest.mark.parametrize(("index", "size", "lhash", "proof", "root"), INCLUSION_PROBES)
    def test_corrupted_inclusion_rejected(
        self, index: int, size: int, lhash: bytes, proof: list[bytes], root: bytes
    ) -> None:
        """Every corruption of a published inclusion proof raises VerificationError."""
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, lhash, proof, root)

    @pytest.mark.parametrize(("old", "new", "old_root", "new_root", "proof"), CONSISTENCY_PROBES)
    def test_corrupted_consistency_rejected(
        self, old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]
    ) -> None:
        """Every corruption of a published consistency proof raises VerificationError."""
        with pytest.raises(VerificationError):
            verify_consistency(old, new, old_root, new_root, proof)

    @pytest.mark.parametrize(("index", "size"), [(0, 0), (0, 1), (1, 0), (2, 1)])
    @pytest.mark.parametrize(
        ("lhash", "root"),
        [(SOME_HASH, b""), (b"", EMPTY_ROOT_HASH), (SOME_HASH, EMPTY_ROOT_HASH)],
    )
    def test_verify_inclusion_probes(
        self, index: int, size: int, lhash: bytes, root: bytes
    ) -> None:
        """The TestVerifyInclusion probes with an empty proof all fail."""
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, lhash, [], root)

    @pytest.mark.parametrize(
        ("want_error", "old", "new", "old_root", "new_root", "proof"),
        [
            (True, 0, 0, DONT_CARE_1, DONT_CARE_2, []),
            (True, 1, 1, DONT_CARE_1, DONT_CARE_2, []),
            (False, 0, 0, DONT_CARE_1, DONT_CARE_1, []),
            (False, 0, 1, DONT_CARE_1, DONT_CARE_2, []),
            (False, 1, 1, DONT_CARE_2, DONT_CARE_2, []),
            (True, 1, 0, DONT_CARE_1, DONT_CARE_2, []),
            (True, 2, 1, DONT_CARE_1, DONT_CARE_2, []),
            (True, 1, 2, DONT_CARE_1, DONT_CARE_2, []),
            (True, 0, 0, EMPTY_ROOT_HASH, DONT_CARE_2, []),
            (True, 1, 1, EMPTY_ROOT_HASH, DONT_CARE_2, []),
            (True, 0, 0, EMPTY_ROOT_HASH, EMPTY_ROOT_HASH, [EMPTY_ROOT_HASH]),
            (True, 0, 1, EMPTY_ROOT_HASH, EMPTY_ROOT_HASH, [EMPTY_ROOT_HASH]),
            (True, 1, 1, EMPTY_ROOT_HASH, EMPTY_ROOT_HASH, [EMPTY_ROOT_HASH]),
        ],
    )
    def test_verify_consistency_table(
        self,
        want_error: bool,
        old: int,
        new: int,
        old_root: bytes,
        new_root: bytes,
        proof: list[bytes],
    ) -> None:
        """The TestVerifyConsistency table: trivial sizes pass, time travel and junk fail."""
        assert want_error == raises_verification(
            verify_consistency, old, new, old_root, new_root, proof
        )

    @pytest.mark.parametrize(
        ("want_error", "lhash", "root"),
        [
            (False, leaf_hash(b"data"), leaf_hash(b"data")),
            (True, b"", leaf_hash(b"data")),
            (True, leaf_hash(b"data"), b""),
            pytest.param(
                True,
                b"",
                b"",
            ),
        ],
    )
    def test_single_entry(self, want_error: bool, lhash: bytes, root: bytes) -> None:
        """TestVerifyInclusionSingleEntry: a one-leaf tree's root is its leaf hash."""
        assert want_error == raises_verification(verify_inclusion, 0, 1, lhash, [], root)


# --------------------------------------------------------------------------------------------
# The module against the brute-force reference, every tree size 1..300.
# --------------------------------------------------------------------------------------------

SIZES = range(1, MAX_N + 1)


class TestAgainstReference:
    def test_compact_range_every_size(self) -> None:
        """One CompactRange grown leaf by leaf has the reference root at every size 1..300."""
        cr = CompactRange()
        expected, found = [], []
        for n in SIZES:
            cr.append(SWEEP.leaf_hashes[n - 1])
            expected.append(SWEEP.mth(0, n))
            found.append(cr.root())
        assert expected == found

    @pytest.mark.parametrize("n", SIZES)
    def test_roots(self, n: int) -> None:
        """A fresh CompactRange, root_from_hashes and the reference MTH agree."""
        cr = CompactRange()
        for lhash in SWEEP.leaf_hashes[:n]:
            cr.append(lhash)
        assert SWEEP.mth(0, n) == cr.root() == root_from_hashes(SWEEP.leaf_hashes[:n])

    @pytest.mark.parametrize("n", SIZES)
    def test_inclusion(self, n: int) -> None:
        """inclusion_proof equals PATH (sampled above 64 leaves); every PATH verifies."""
        hashes = SWEEP.leaf_hashes[:n]
        root = SWEEP.mth(0, n)
        for index in sample_points(n, 0, n):
            assert (index, SWEEP.path(index, 0, n)) == (index, inclusion_proof(index, hashes))
        for index in range(n):
            verify_inclusion(index, n, hashes[index], SWEEP.path(index, 0, n), root)

    @pytest.mark.parametrize("n", SIZES)
    def test_consistency(self, n: int) -> None:
        """consistency_proof equals PROOF (sampled above 64 leaves); every PROOF verifies."""
        hashes = SWEEP.leaf_hashes[:n]
        root = SWEEP.mth(0, n)
        for m in sample_points(n, 1, n + 1):
            assert (m, SWEEP.proof(m, n)) == (m, consistency_proof(m, hashes))
        for m in range(1, n + 1):
            verify_consistency(m, n, SWEEP.mth(0, m), root, SWEEP.proof(m, n))


# --------------------------------------------------------------------------------------------
# Mutated proofs: VerificationError and nothing else, in agreement with the reference.
# --------------------------------------------------------------------------------------------

HYP = settings(max_examples=300, deadline=None)
SMALL_N = 70


@st.composite
def inclusion_cases(draw: st.DrawFn) -> tuple[int, int, bytes, list[bytes], bytes]:
    """A valid (index, size, leaf hash, proof, root) over the sweep leaves."""
    size = draw(st.integers(1, SMALL_N))
    index = draw(st.integers(0, size - 1))
    return index, size, SWEEP.leaf_hashes[index], SWEEP.path(index, 0, size), SWEEP.mth(0, size)


@st.composite
def consistency_cases(draw: st.DrawFn) -> tuple[int, int, bytes, bytes, list[bytes]]:
    """A valid (old size, new size, old root, new root, proof) over the sweep leaves."""
    new = draw(st.integers(1, SMALL_N))
    old = draw(st.integers(1, new))
    return old, new, SWEEP.mth(0, old), SWEEP.mth(0, new), SWEEP.proof(old, new)


def flip_bit(value: bytes, bit: int) -> bytes:
    """``value`` with one bit flipped (bit counted over the whole byte string)."""
    out = bytearray(value)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


garbage = st.binary(min_size=0, max_size=40)
hash32 = st.binary(min_size=32, max_size=32)


class TestMutatedInclusion:
    @HYP
    @given(inclusion_cases(), st.data())
    def test_flipped_bit(self, case: tuple, data: st.DataObject) -> None:
        """A proof with any one bit flipped is rejected."""
        index, size, lhash, proof, root = case
        assume(proof)
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        proof = [*proof[:i], flip_bit(proof[i], bit), *proof[i + 1 :]]
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, lhash, proof, root)

    @HYP
    @given(inclusion_cases(), st.data())
    def test_truncated(self, case: tuple, data: st.DataObject) -> None:
        """A proof missing any one element, or cut short, is rejected."""
        index, size, lhash, proof, root = case
        assume(proof)
        i = data.draw(st.integers(0, len(proof) - 1))
        cut = data.draw(st.booleans())
        proof = proof[:i] if cut else [*proof[:i], *proof[i + 1 :]]
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, lhash, proof, root)

    @HYP
    @given(inclusion_cases(), st.data(), st.one_of(garbage, hash32))
    def test_extended(self, case: tuple, data: st.DataObject, extra: bytes) -> None:
        """A proof with any element inserted anywhere is rejected."""
        index, size, lhash, proof, root = case
        i = data.draw(st.integers(0, len(proof)))
        proof = [*proof[:i], extra, *proof[i:]]
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, lhash, proof, root)

    @HYP
    @given(inclusion_cases(), st.integers(-3, 2 * SMALL_N + 3))
    def test_wrong_index(self, case: tuple, wrong: int) -> None:
        """The proof of one leaf does not prove any other index, in or out of range."""
        index, size, lhash, proof, root = case
        assume(wrong != index)
        assert not ref_includes(wrong, size, lhash, proof, root)
        with pytest.raises(VerificationError):
            verify_inclusion(wrong, size, lhash, proof, root)

    @HYP
    @given(inclusion_cases(), st.integers(-3, 4 * SMALL_N))
    def test_wrong_size(self, case: tuple, wrong: int) -> None:
        """Another size fails exactly when the proof does not fit that tree's shape.

        RFC 9162 does not bind the size into an inclusion proof (the signed checkpoint does):
        leaf 0's path is the same in trees of 5..8 leaves, so the reference decides.
        """
        index, size, lhash, proof, root = case
        assume(wrong != size)
        expected = not ref_includes(index, wrong, lhash, proof, root)
        assert expected == raises_verification(verify_inclusion, index, wrong, lhash, proof, root)

    @HYP
    @given(inclusion_cases(), hash32, st.integers(0, 255))
    def test_wrong_root_or_leaf(self, case: tuple, other: bytes, bit: int) -> None:
        """Another root, or another leaf hash, is rejected."""
        index, size, lhash, proof, root = case
        assume(other != root)
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, lhash, proof, other)
        with pytest.raises(VerificationError):
            verify_inclusion(index, size, flip_bit(lhash, bit), proof, root)

    @HYP
    @given(
        st.integers(-2, 40),
        st.integers(-2, 40),
        st.one_of(hash32, garbage),
        st.lists(st.one_of(hash32, garbage), max_size=8),
        st.one_of(hash32, garbage),
    )
    def test_arbitrary_input(
        self, index: int, size: int, lhash: bytes, proof: list[bytes], root: bytes
    ) -> None:
        """Arbitrary input verifies exactly when the reference says, else VerificationError;
        a leaf hash or root that is not 32 bytes (SHA-256) never verifies, as in the Go
        reference's RootFromInclusionProof (the reference here, which only compares bytes,
        would take an empty leaf hash for an empty root of a one-leaf tree)."""
        formed = sha256_sized(lhash, root, *proof)
        expected = not (formed and ref_includes(index, size, lhash, proof, root))
        assert expected == raises_verification(verify_inclusion, index, size, lhash, proof, root)


class TestMutatedConsistency:
    @HYP
    @given(consistency_cases(), st.data())
    def test_flipped_bit(self, case: tuple, data: st.DataObject) -> None:
        """A proof with any one bit flipped is rejected."""
        old, new, old_root, new_root, proof = case
        assume(proof)
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        proof = [*proof[:i], flip_bit(proof[i], bit), *proof[i + 1 :]]
        with pytest.raises(VerificationError):
            verify_consistency(old, new, old_root, new_root, proof)

    @HYP
    @given(consistency_cases(), st.data())
    def test_truncated(self, case: tuple, data: st.DataObject) -> None:
        """A proof missing any one element, or cut short, is rejected."""
        old, new, old_root, new_root, proof = case
        assume(proof)
        i = data.draw(st.integers(0, len(proof) - 1))
        cut = data.draw(st.booleans())
        proof = proof[:i] if cut else [*proof[:i], *proof[i + 1 :]]
        with pytest.raises(VerificationError):
            verify_consistency(old, new, old_root, new_root, proof)

    @HYP
    @given(consistency_cases(), st.data(), st.one_of(garbage, hash32))
    def test_extended(self, case: tuple, data: st.DataObject, extra: bytes) -> None:
        """A proof with any element inserted anywhere is rejected."""
        old, new, old_root, new_root, proof = case
        i = data.draw(st.integers(0, len(proof)))
        proof = [*proof[:i], extra, *proof[i:]]
        with pytest.raises(VerificationError):
            verify_consistency(old, new, old_root, new_root, proof)

    @HYP
    @given(consistency_cases(), st.integers(-3, 2 * SMALL_N), st.integers(-3, 4 * SMALL_N))
    def test_wrong_sizes(self, case: tuple, wrong_old: int, wrong_new: int) -> None:
        """Other sizes fail exactly when the proof does not fit those trees' shapes."""
        old, new, old_root, new_root, proof = case
        for sizes in [(wrong_old, new), (old, wrong_new), (wrong_old, wrong_new)]:
            if sizes == (old, new) or min(sizes) < 0:
                continue  # negative sizes: see test_negative_sizes_rejected
            expected = not ref_consistent(*sizes, old_root, new_root, proof)
            found = raises_verification(verify_consistency, *sizes, old_root, new_root, proof)
            assert (sizes, expected) == (sizes, found)

    @HYP
    @given(consistency_cases(), hash32, st.integers(0, 255))
    def test_wrong_roots(self, case: tuple, other: bytes, bit: int) -> None:
        """Another old root, another new root, or the two swapped, is rejected."""
        old, new, old_root, new_root, proof = case
        with pytest.raises(VerificationError):
            verify_consistency(old, new, flip_bit(old_root, bit), new_root, proof)
        with pytest.raises(VerificationError):
            verify_consistency(old, new, old_root, flip_bit(new_root, bit), proof)
        assume(other not in (old_root, new_root))
        with pytest.raises(VerificationError):
            verify_consistency(old, new, other, new_root, proof)
        with pytest.raises(VerificationError):
            verify_consistency(old, new, old_root, other, proof)
        if old != new:
            with pytest.raises(VerificationError):
                verify_consistency(old, new, new_root, old_root, proof)

    @HYP
    @given(
        st.integers(0, 40),
        st.integers(0, 40),
        st.one_of(hash32, garbage),
        st.one_of(hash32, garbage),
        st.lists(st.one_of(hash32, garbage), max_size=8),
    )
    def test_arbitrary_input(
        self, old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]
    ) -> None:
        """Arbitrary input verifies exactly when the reference says, else VerificationError."""
        expected = not ref_consistent(old, new, old_root, new_root, proof)
        found = raises_verification(verify_consistency, old, new, old_root, new_root, proof)
        assert expected == found

    @pytest.mark.parametrize(
        ("old", "new", "proof"),
        [
            (-1, 5, [SOME_HASH]),
            (-4, -2, [SOME_HASH]),
            (3, -1, []),
            pytest.param(
                -1,
                -1,
                [],
            ),
        ],
    )
    def test_negative_sizes_rejected(self, old: int, new: int, proof: list[bytes]) -> None:
        """A negative tree size is never consistent with anything."""
        with pytest.raises(VerificationError):
            verify_consistency(old, new, SOME_HASH, SOME_HASH, proof)


# --------------------------------------------------------------------------------------------
# CompactRange persistence.
# --------------------------------------------------------------------------------------------


def compact_range(n: int) -> CompactRange:
    """A CompactRange over the first ``n`` sweep leaves."""
    cr = CompactRange()
    for lhash in SWEEP.leaf_hashes[:n]:
        cr.append(lhash)
    return cr


class TestCompactRangeJson:
    @pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 63, 64, 65, 255, 256, 299, 300])
    def test_round_trip(self, n: int) -> None:
        """to_json, through JSON text, and back gives the same range and root."""
        cr = compact_range(n)
        back = CompactRange.from_json(json.loads(json.dumps(cr.to_json())))
        assert (cr.size, cr.roots, cr.root()) == (back.size, back.roots, back.root())

    @given(st.integers(0, 150), st.integers(0, 150))
    @settings(deadline=None, max_examples=60)
    def test_restored_range_extends_like_original(self, n: int, more: int) -> None:
        """A range restored from JSON and extended has the reference root of the larger tree."""
        restored = CompactRange.from_json(compact_range(n).to_json())
        for lhash in SWEEP.leaf_hashes[n : n + more]:
            restored.append(lhash)
        assert SWEEP.mth(0, n + more) == restored.root()

    def test_to_json_shape(self) -> None:
        """to_json gives the size and the lowercase hex roots, largest subtree first."""
        cr = compact_range(3)
        expected = {"size": 3, "roots": [SWEEP.mth(0, 2).hex(), SWEEP.leaf_hashes[2].hex()]}
        assert expected == cr.to_json()

    def test_copy_is_independent(self) -> None:
        """Extending a copy leaves the original untouched."""
        cr = compact_range(5)
        copy = cr.copy()
        copy.append(SWEEP.leaf_hashes[5])
        assert (5, SWEEP.mth(0, 5), 6, SWEEP.mth(0, 6)) == (
            cr.size,
            cr.root(),
            copy.size,
            copy.root(),
        )

    def test_constructor_checks_root_count(self) -> None:
        """A range whose root count does not match its size is refused."""
        with pytest.raises(VerificationError):
            CompactRange(3, [SOME_HASH])

    @pytest.mark.parametrize(
        "obj",
        [
            None,
            "size",
            5,
            [],
            [3, ["00" * 32]],
            {},
            {"size": 1},
            {"roots": ["00" * 32]},
            {"size": -1, "roots": ["00" * 32]},
            {"size": 1.0, "roots": ["00" * 32]},
            {"size": "1", "roots": ["00" * 32]},
            {"size": None, "roots": []},
            {"size": 1, "roots": None},
            {"size": 1, "roots": "00" * 32},
            {"size": 1, "roots": [None]},
            {"size": 1, "roots": [32]},
            {"size": 1, "roots": ["zz" * 32]},
            {"size": 1, "roots": ["00" * 31]},
            {"size": 1, "roots": ["00" * 33]},
            {"size": 1, "roots": [""]},
            {"size": 1, "roots": []},
            {"size": 3, "roots": ["00" * 32]},
            {"size": 2, "roots": ["00" * 32, "11" * 32]},
            {"size": 2**70, "roots": []},
            pytest.param(
                {"size": True, "roots": ["00" * 32]},
            ),
            pytest.param(
                {"size": 1, "roots": {"00" * 32: 1}},
            ),
        ],
        ids=repr,
    )
    def test_malformed_rejected(self, obj: object) -> None:
        """Malformed JSON raises VerificationError, never another exception type."""
        with pytest.raises(VerificationError):
            CompactRange.from_json(obj)


class TestMerkleLevels:
    """The level-by-level builder that ``prove`` and ``export`` use, against the RFC's own."""

    @pytest.mark.parametrize("n", range(1, 130))
    def test_same_root_and_proofs_as_the_recursive_definition(self, n: int) -> None:
        """Root and every audit path equal ``root_from_hashes`` and ``inclusion_proof``."""
        hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
        tree = MerkleLevels(hashes)
        assert root_from_hashes(hashes) == tree.root()
        assert [inclusion_proof(i, hashes) for i in range(n)] == [tree.proof(i) for i in range(n)]
