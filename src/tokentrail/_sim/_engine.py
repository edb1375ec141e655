"""The simulated model: chat template, deterministic generation and synthetic logprobs.

Nothing here is random at run time: the output is a pure function of (model, prompt, seed), so
a test can run the same request twice, or through a proxy and directly, and compare bytes.

The chat template is ChatML (the format of Qwen and many other open models)::

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    Why is the sky blue?<|im_end|>
    <|im_start|>assistant

The prompt tokens are the encoding of that string, with no BOS added (as a ChatML model's
template, which carries its own markers, is tokenised without one).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokentrail._sim._tokenizer import IM_END, IM_START, SimTokenizer

__all__ = [
    "Generation",
    "Step",
    "TokenChoice",
    "generate",
    "render_chat",
    "render_prompt",
]

TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

# What the model "says": words it strings together, and now and then a non-ASCII word so that
# byte-fallback tokens (pieces that are not valid UTF-8 on their own) occur in outputs.
_WORDS = (
    " the", " sky", " is", " blue", " because", " light", " of", " short", " wave", " scatter",
    " in", " the", " atmosphere", " and", " it", " will", " be", " a", " good", " day", " to",
    " learn", " about", " how", " the", " world", " works", " model", " token", " audit", " log",
    " record", " proxy", " stream", " every", " chunk", " has", " its", " own", " hash", " chain",
    " people", " often", " ask", " why", " water", " can", " look", " more", " than", " one",
    " color", " at", " night", " near", " the", " sea", " under", " high", " air",
)  # fmt: skip
_OPENERS = ("Hello", "Sure", "The", "Yes", "Here", "It", "We", "There", "This")
_EXOTIC = (" café", " naïve", " 🦙", " über", " déjà", " 東京", " —", " €5")
_ENDERS = (".", "!", ".", ".", "?")

MIN_TOKENS = 8
MAX_TOKENS = 40


@dataclass(frozen=True)
class TokenChoice:
    """One generated token with its log probability and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Step:
    """What one streamed chunk carries: text that is complete UTF-8 and the tokens behind it."""

    text: str
    tokens: tuple[TokenChoice, ...]


@dataclass(frozen=True)
class Generation:
    """The full, deterministic answer of the simulated model to one prompt."""

    prompt_text: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" or "length"
    steps: tuple[Step, ...] = field(repr=False)
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did


def _digest(*parts: object) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode("utf-8"))
        h.update(b"\x00")
    return h.digest()


class _Stream:
    """A deterministic stream of integers from a SHA-256 counter (no global random state)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._buf = b""

    def next(self, bound: int) -> int:
        if len(self._buf) < 4:
            self._buf += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        value = int.from_bytes(self._buf[:4], "big")
        self._buf = self._buf[4:]
        return value % bound


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, or OpenAI's list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The ChatML prompt for *messages*, ending with the assistant header."""
    out = []
    for message in messages:
        role = str(message.get("role", "user"))
        out.append(f"{IM_START}{role}\n{content_text(message.get('content'))}{IM_END}\n")
    out.append(f"{IM_START}assistant\n")
    return "".join(out)


def render_prompt(prompt: str, system: str | None = None) -> str:
    """The ChatML prompt Ollama's ``/api/generate`` builds from ``prompt`` (and ``system``)."""
    messages: list[Mapping[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return render_chat(messages)


def _compose(rng: _Stream, tok: SimTokenizer, length: int) -> list[int]:
    """Token ids of a plausible sentence of at least *length* tokens."""
    ids = tok.encode(_OPENERS[rng.next(len(_OPENERS))])
    while len(ids) < length:
        roll = rng.next(100)
        if roll < 12:
            word = _EXOTIC[rng.next(len(_EXOTIC))]
        elif roll < 18:
            word = "," if rng.next(2) else _ENDERS[rng.next(len(_ENDERS))]
        else:
            word = _WORDS[rng.next(len(_WORDS))]
        ids.extend(tok.encode(word))
    ids.extend(tok.encode(_ENDERS[rng.next(len(_ENDERS))]))
    return ids


def _choices(rng: _Stream, tok: SimTokenizer, ids: Sequence[int], top_n: int) -> list[TokenChoice]:
    """Synthetic logprobs: the chosen token is the most likely, alternatives trail it."""
    choices = []
    for token_id in ids:
        chosen = -round(0.001 + rng.next(150_000) / 100_000, 6)
        alternatives: list[tuple[int, float]] = [(token_id, chosen)]
        floor = chosen
        while len(alternatives) < top_n:
            alt = rng.next(tok.vocab_size)
            if alt in tok.special_ids or any(alt == a for a, _ in alternatives):
                continue
            floor = round(floor - 0.05 - rng.next(300_000) / 100_000, 6)
            alternatives.append((alt, floor))
        choices.append(TokenChoice(token_id, chosen, tuple(alternatives)))
    return choices


def _stop_cut(tok: SimTokenizer, ids: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """Tokens to keep so that the text ends before the first stop sequence, and that sequence."""
    text = tok.decode(ids)
    found = sorted((text.find(s), s) for s in stops if s and s in text)
    if not found:
        return None
    start, stop = found[0]
    limit = len(text[:start].encode("utf-8"))
    end = 0
    for kept, token_id in enumerate(ids):
        end += len(tok.piece_bytes(token_id))
        if end > limit:
            return kept, stop
    return len(ids), stop


def generate(
    tok: SimTokenizer,
    *,
    model: str,
    prompt_text: str,
    seed: object = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    top_logprobs: int = 0,
    drop_partial: bool = False,
) -> Generation:
    """The simulated model's answer to *prompt_text* (already templated).

    ``drop_partial``: an answer cut inside a multi-byte character ends without it, as Ollama's
    runner sends it (see :meth:`SimTokenizer.split_utf8`); ``output_ids`` still counts every
    token the model produced.
    """
    digest = _digest(model, prompt_text, seed)
    rng = _Stream(digest)
    length = MIN_TOKENS + rng.next(MAX_TOKENS - MIN_TOKENS + 1)
    ids = _compose(rng, tok, length)
    finish = "stop"
    stop_sequence = None
    cut = _stop_cut(tok, ids, stop)
    if cut is not None:
        ids, stop_sequence = ids[: cut[0]], cut[1]
    if max_tokens is not None and max_tokens >= 0 and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        finish, stop_sequence = "length", None
    choices = _choices(_Stream(digest + b"logprobs"), tok, ids, max(1, top_logprobs))
    steps = []
    position = 0
    for text, group in tok.split_utf8(ids, drop_partial=drop_partial):
        steps.append(Step(text, tuple(choices[position : position + len(group)])))
        position += len(group)
    return Generation(
        prompt_text=prompt_text,
        prompt_ids=tuple(tok.encode(prompt_text)),
        output_ids=tuple(ids),
        text="".join(step.text for step in steps),
        finish_reason=finish,
        steps=tuple(steps),
        stop_sequence=stop_sequence,
    )


def embedding(model: str, text: str, dimensions: int = 16) -> list[float]:
    """A deterministic unit vector for *text* (for ``/api/embed``)."""
    rng = _Stream(_digest(model, "embed", text))
    raw = [rng.next(2_000_001) / 1_000_000 - 1.0 for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 7) for v in raw]
