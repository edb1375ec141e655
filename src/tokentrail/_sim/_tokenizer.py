"""The simulator's tokenizer: a small, fixed, byte-level vocabulary.

It behaves like the byte-fallback BPE vocabularies of real models (Llama, Qwen, GPT-2) where it
matters to an auditing proxy, without any model file:

- ids 0–255 are the 256 single bytes, so every text encodes, and a non-ASCII character that is
  not in the vocabulary splits into byte tokens whose bytes are not valid UTF-8 on their own
  (``"é"`` is ``[0xC3, 0xA9]``, ``"🦙"`` four tokens);
- a few hundred common English word pieces follow, each with and without a leading space
  (``" the"``, ``"the"``), matched greedily, longest first, over the UTF-8 bytes;
- the special tokens (BOS, EOS and the ChatML markers) close the vocabulary; their text is
  recognised anywhere, as Hugging Face tokenizers do by default.

``decode(encode(text)) == text`` for every string, because the pieces of an encoding concatenate
to exactly the text's UTF-8 bytes.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

__all__ = ["BOS", "EOS", "IM_END", "IM_START", "SimTokenizer"]

BOS = "<|begin_of_text|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)

# Common English words and fragments; each enters the vocabulary with and without a leading
# space. Fragments like "caf", "na", "ing" make non-ASCII words split mid-word into bytes.
_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every good
me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also
play small end put home read hand port large spell add even land here must big high such follow
act why ask men change went light kind off need house picture try us again animal point mother
world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city
tree cross farm hard start might story saw far sea draw left late run while press close night
real life few north model token audit log record proxy stream chunk hash chain ledger sky blue
because light scatter Rayleigh short wave long red color ocean reflect atmosphere molecule
Hello Hi The This It In A We You There Yes Sure Here Of Thank thanks hello yes sure okay
caf na ve ber ing ed er ly tion ment ness able less ful est ion s es
""".split()  # noqa: SIM905

_PUNCT = [
    ".", ",", "!", "?", ":", ";", "'", '"', "(", ")", "-", "...", "\n", "\n\n", " ", "  ",
    "'s", "'t", "'re", "'ll", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "100",
    "system", "user", "assistant",
]  # fmt: skip


def _build_pieces() -> list[bytes]:
    pieces: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(pieces)
    for word in [*_PUNCT, *_WORDS]:
        for text in (word, " " + word):
            piece = text.encode("utf-8")
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    for special in SPECIAL_TOKENS:
        pieces.append(special.encode("utf-8"))
    return pieces


def _go_string(data: bytes) -> str:
    """Decode *data* as Go's ``encoding/json`` would show it: each invalid byte as U+FFFD."""
    out: list[str] = []
    i = 0
    while i < len(data):
        lead = data[i]
        width = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
        try:
            out.append(data[i : i + width].decode("utf-8"))
            i += width
        except UnicodeDecodeError:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def _valid_prefix_len(data: bytes) -> int:
    """llama.cpp's ``validate_utf8``: the length before a multi-byte character cut at the end."""
    size = len(data)
    for back in range(1, min(4, size) + 1):
        c = data[size - back]
        if (c & 0xE0) == 0xC0 and back < 2:
            return size - back
        if (c & 0xF0) == 0xE0 and back < 3:
            return size - back
        if (c & 0xF8) == 0xF0 and back < 4:
            return size - back
    return size


class SimTokenizer:
    """Greedy longest-match tokenizer over a fixed byte-level vocabulary."""

    def __init__(self) -> None:
        self._pieces = _build_pieces()
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        self._max_len = max(len(p) for p in self._pieces)
        self.bos_id = self._ids[BOS.encode()]
        self.eos_id = self._ids[EOS.encode()]
        self.im_start_id = self._ids[IM_START.encode()]
        self.im_end_id = self._ids[IM_END.encode()]
        self.special_ids = frozenset(self._ids[s.encode()] for s in SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        """Number of token ids; ids run from 0 to ``vocab_size - 1``."""
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        """Token ids of *text*: greedy longest match over its UTF-8 bytes."""
        data = text.encode("utf-8")
        ids: list[int] = []
        i = 0
        while i < len(data):
            for width in range(min(self._max_len, len(data) - i), 0, -1):
                found = self._ids.get(data[i : i + width])
                if found is not None:
                    ids.append(found)
                    i += width
                    break
        return ids

    def piece_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be an incomplete UTF-8 sequence)."""
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        return self._pieces[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of *ids*."""
        return b"".join(self.piece_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of *ids*; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str | list[int]:
        """SPEC section 2 form of a piece: its text when valid UTF-8, else its byte values."""
        data = self.piece_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return list(data)

    def token_text(self, token_id: int, style: str) -> str:
        """The ``token`` string a server shows for one token in logprobs.

        *style* names whose convention to follow for a piece that is not valid UTF-8:
        ``"ollama"`` (Go: each bad byte is U+FFFD), ``"openai"`` (``\\xNN`` escapes),
        ``"openai-legacy"`` (``bytes:\\xNN``), ``"vllm"`` (U+FFFD replacement) and
        ``"llamacpp"`` (cut before an incomplete trailing character, then U+FFFD).
        """
        data = self.piece_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        if style == "ollama":
            return _go_string(data)
        if style in ("openai", "openai-legacy"):
            escaped = "".join(chr(b) if b < 0x80 else f"\\x{b:02x}" for b in data)
            return "bytes:" + escaped if style == "openai-legacy" else escaped
        if style == "llamacpp":
            return data[: _valid_prefix_len(data)].decode("utf-8", errors="replace")
        return data.decode("utf-8", errors="replace")

    def split_utf8(
        self, ids: Sequence[int], *, drop_partial: bool = False
    ) -> list[tuple[str, list[int]]]:
        """Group *ids* into ``(text, ids)`` steps whose text is complete UTF-8.

        Servers hold back a token that ends inside a multi-byte character until the character
        is complete, so one streamed chunk may carry several tokens. A sequence that ends on an
        incomplete character flushes it as U+FFFD in the last step; with ``drop_partial`` (what
        Ollama's Go runner does, ``flushPending`` after ollama/ollama#7303: "we should never
        send back an invalid sequence") the incomplete bytes are dropped, and with them the
        held-back tokens' step, which is then never sent.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        steps: list[tuple[str, list[int]]] = []
        pending: list[int] = []
        for token_id in ids:
            pending.append(token_id)
            text = decoder.decode(self.piece_bytes(token_id))
            if text:
                steps.append((text, pending))
                pending = []
        tail = "" if drop_partial else decoder.decode(b"", final=True)
        if pending and (tail or not drop_partial):
            steps.append((tail, pending))
        elif tail:
            text, last = steps[-1]
            steps[-1] = (text + tail, last)
        return steps
