"""Local tokenizers for SPEC section 5's ``local:<name>`` token source.

When the upstream reports no token data, an operator-configured tokenizer applied to the exact
stored text (``input_text`` / ``output_text``) is the next best thing. Two on-disk formats are
read, and nothing is ever fetched from the network:

- a Hugging Face ``tokenizer.json`` (through the ``tokenizers`` package), encoded without added
  special tokens, so the ids are the text's own;
- a tiktoken BPE file (``cl100k_base.tiktoken`` …): one ``base64(token bytes) rank`` per line.
  The file does not carry the pre-tokenisation pattern, so it comes from the encoding's name
  (``r50k_base``, ``p50k_base``, ``cl100k_base``, ``o200k_base``) or the ``pattern`` argument.
  With the ``tiktoken`` package installed, it does the encoding; without it, the byte-pair merge
  below does (tiktoken's ``encode_ordinary``: leftmost lowest-rank pair first), with the pattern
  compiled by the ``regex`` package, which the ``\\p{L}`` classes need.
"""

from __future__ import annotations

import base64
import binascii
import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .._errors import ConfigError

_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CL100K = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_O200K = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
#: Pre-tokenisation patterns of the published tiktoken encodings, by name.
TIKTOKEN_PATTERNS = {
    "r50k_base": _R50K,
    "p50k_base": _R50K,
    "p50k_edit": _R50K,
    "cl100k_base": _CL100K,
    "o200k_base": _O200K,
}


@runtime_checkable
class LocalTokenizer(Protocol):
    """A tokenizer on disk: ``name`` goes into ``local:<name>``; ``encode`` gives token ids."""

    name: str

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, with no special tokens added."""
        ...


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``; ``name`` defaults to the file's folder name."""

    def __init__(self, path: str | Path, *, name: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ConfigError(
                "a tokenizer.json needs the tokenizers package (pip install tokentrail[tokenizers])"
            ) from exc
        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ConfigError(f"cannot load tokenizer {path}: {exc}") from exc
        self.name = name or (path.parent.name if path.name == "tokenizer.json" else path.stem)
        self.path = path

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without added special tokens (BOS/EOS)."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: ``base64(token bytes) rank`` per line, blank lines skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read tokenizer {path}: {exc.strerror}") from exc
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(f"{path}:{number}: not a tiktoken line ({exc})") from exc
    if not ranks:
        raise ConfigError(f"{path} holds no tokens")
    return ranks


def bpe_encode(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's byte-pair merge of one pre-token: merge the leftmost lowest-ranked pair."""
    rank = ranks.get(piece)
    if rank is not None:
        return [rank]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank = -1
        best = -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best < 0 or r < best_rank):
                best_rank, best = r, i
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    try:
        return [ranks[p] for p in parts]
    except KeyError as exc:
        raise ConfigError(f"the BPE vocabulary has no token for byte(s) {exc.args[0]!r}") from None


class TiktokenBPE:
    """A tiktoken-format BPE file; ``name`` defaults to the file's stem (``cl100k_base``)."""

    def __init__(
        self, path: str | Path, *, name: str | None = None, pattern: str | None = None
    ) -> None:
        path = Path(path)
        self.path = path
        self.name = name or path.name.split(".")[0]
        if pattern is None:
            pattern = TIKTOKEN_PATTERNS.get(self.name)
            if pattern is None:
                raise ConfigError(
                    f"no known pre-tokenisation pattern for {self.name!r}; pass pattern=..."
                    f" (known: {', '.join(sorted(TIKTOKEN_PATTERNS))})"
                )
        self.pattern = pattern
        self.ranks = read_tiktoken_ranks(path)
        self._encoding: Any = None
        self._regex: Any = None
        try:
            tiktoken: Any = importlib.import_module("tiktoken")
        except ImportError:
            tiktoken = None
        if tiktoken is not None:
            self._encoding = tiktoken.Encoding(
                self.name, pat_str=pattern, mergeable_ranks=self.ranks, special_tokens={}
            )
            return
        try:
            regex: Any = importlib.import_module("regex")
        except ImportError as exc:
            raise ConfigError(
                "a tiktoken-format tokenizer needs the tiktoken or the regex package"
            ) from exc
        try:
            self._regex = regex.compile(pattern)
        except regex.error as exc:
            raise ConfigError(f"bad pre-tokenisation pattern: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        """tiktoken's ``encode_ordinary``: special-token text is encoded as plain text."""
        if self._encoding is not None:
            ids: list[int] = self._encoding.encode_ordinary(text)
            return ids
        out: list[int] = []
        ranks = self.ranks
        for m in self._regex.finditer(text):
            out.extend(bpe_encode(m.group().encode("utf-8"), ranks))
        return out


def load_tokenizer(path: str | Path, *, name: str | None = None) -> LocalTokenizer:
    """A ``tokenizer.json`` (by its ``.json`` suffix) or a tiktoken BPE file."""
    path = Path(path)
    if path.suffix == ".json":
        return HFTokenizer(path, name=name)
    return TiktokenBPE(path, name=name)
