"""Asking the upstream for token data on the client's behalf, and hiding it again.

With ``--request-token-data`` the proxy adds to an audited request what the client did not ask
for itself:

- ``logprobs`` (``logprobs`` or ``all``): Ollama ``"logprobs": true`` (0.12.11+; older servers
  ignore unknown fields), OpenAI chat ``"logprobs": true, "top_logprobs": 1``, legacy
  completions ``"logprobs": 1``
  (not when the client sent ``top_logprobs`` without ``logprobs``: that request is its own);
- ``ids`` (``ids`` or ``all``): vLLM's ``"return_token_ids": true`` (other servers may refuse an
  unknown parameter, which is why it is a separate choice).

An upstream that refuses what was added (OpenAI answers 400 "Unrecognized request argument
supplied: return_token_ids", and its reasoning models refuse ``logprobs``) has the request sent
again without it, and it is not asked for that model again (:func:`refused_by`): the client gets
the answer it gets directly.

and removes from every response chunk exactly what that addition put there, editing the upstream's
bytes in place (never re-serialising) so the client receives the bytes it would have received
(an SSE event whose JSON spans several ``data:`` lines is edited as a client reads it, joined):

- Ollama: the top-level ``logprobs`` member is removed (Ollama omits it when not asked:
  ``json:"logprobs,omitempty"``);
- OpenAI-compatible: each ``choices[].logprobs`` value becomes ``null`` (what OpenAI, vLLM and
  llama.cpp's completions send when not asked), except that in a chat response llama.cpp's
  entries, recognisable by their token ``id``, are removed with their member (llama.cpp's
  ``to_json_oaicompat_chat`` omits ``logprobs`` when there are none), and so are those of
  Ollama's ``/v1`` layer, which signs every answer ``"system_fingerprint": "fp_ollama"`` and
  omits ``logprobs`` when not asked (``ChoiceLogprobs`` is ``omitempty``, 0.12.11+);
- vLLM ids: ``prompt_token_ids`` (top level and on each choice) and ``choices[].token_ids`` are
  set to ``null`` (vLLM's ``serving_chat.py``/``serving_completion.py`` set them explicitly, to
  ``None`` when not asked, so they are serialised as ``null`` even in ``exclude_unset`` chunks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_WS = b" \t\r\n"
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR_END = re.compile(rb"[,}\]\s]")
#: Ollama's OpenAI-compatible layer (``openai/openai.go``) names itself so in every answer.
_OLLAMA_FINGERPRINT = b'"fp_ollama"'
#: llama.cpp's logprobs entries carry the token ``id``; OpenAI's and vLLM's do not.
_LLAMACPP_ENTRY = re.compile(rb'\{\s*"id"\s*:|,\s*"id"\s*:')


@dataclass(frozen=True, slots=True)
class Strip:
    """What to hide from the client in each response chunk."""

    top_remove: tuple[bytes, ...] = ()
    choice_null: tuple[bytes, ...] = ()
    choice_remove: tuple[bytes, ...] = ()
    top_null: tuple[bytes, ...] = ()
    drop_llamacpp_logprobs: bool = False

    def __bool__(self) -> bool:
        return bool(self.top_remove or self.choice_null or self.choice_remove or self.top_null)


#: What each request member the proxy may add asks for: refused, the whole ask is dropped.
ASKS = {"logprobs": "logprobs", "top_logprobs": "logprobs", "return_token_ids": "ids"}
#: The statuses a server refuses a request member with (OpenAI 400, and 403 for logprobs on
#: some reasoning models; 422 from servers on FastAPI that validate strictly).
REFUSAL_STATUSES = frozenset({400, 403, 422})


def plan(
    api: str, body: Mapping[str, Any], mode: str, refused: frozenset[str] = frozenset()
) -> tuple[dict[str, Any] | None, Strip]:
    """The request body to send upstream (``None``: unchanged) and what to strip from responses.

    ``refused``: the asks (``"logprobs"``, ``"ids"``) the upstream refused for this model.
    """
    if mode == "off":
        return None, Strip()
    want_lp = mode in ("logprobs", "all") and "logprobs" not in refused
    want_ids = mode in ("ids", "all") and api.startswith("openai.") and "ids" not in refused
    new = dict(body)
    top_remove: list[bytes] = []
    choice_null: list[bytes] = []
    choice_remove: list[bytes] = []
    top_null: list[bytes] = []
    # top_logprobs without logprobs is the client's own question, which some servers refuse
    # (llama.cpp, vLLM): adding logprobs would answer it instead.
    if want_lp and not body.get("logprobs") and "top_logprobs" not in body:
        if api.startswith("ollama."):
            new["logprobs"] = True
            top_remove.append(b"logprobs")
        elif api == "openai.chat":
            # top_logprobs too: llama-cpp-python's server answers logprobs: true alone with null
            # (it reads top_logprobs as the count). 1 is the least that asks for an alternative
            # everywhere; llama.cpp's server (4227c9b) sends one for 0 or 1, 20 when absent.
            new["logprobs"], new["top_logprobs"] = True, 1
            choice_null.append(b"logprobs")
        elif "logprobs" not in body or body.get("logprobs") is None:
            new["logprobs"] = 1  # (llama.cpp reads 0 as "none")
            choice_null.append(b"logprobs")
    if want_ids and not body.get("return_token_ids"):
        new["return_token_ids"] = True
        top_null.append(b"prompt_token_ids")
        choice_null.extend((b"prompt_token_ids", b"token_ids"))
    strip = Strip(
        tuple(top_remove),
        tuple(choice_null),
        tuple(choice_remove),
        tuple(top_null),
        drop_llamacpp_logprobs=api == "openai.chat",
    )
    return (new if strip else None), strip


def added(body: Mapping[str, Any], sent: Mapping[str, Any]) -> list[str]:
    """The members of ``sent`` the proxy added to the client's ``body`` (or changed: a legacy
    completions ``"logprobs": null`` asked as 1), sorted."""
    return sorted(k for k, v in sent.items() if k not in body or body[k] != v)


def refused_by(members: list[str], error: bytes) -> frozenset[str]:
    """The asks an upstream's error body refuses: those whose added member it names."""
    return frozenset(ASKS[m] for m in members if m in ASKS and m.encode() in error)


def _skip_ws(buf: bytes, i: int) -> int:
    n = len(buf)
    while i < n and buf[i] in _WS:
        i += 1
    return i


def _value_end(buf: bytes, i: int) -> int:
    """The index just past the JSON value starting at ``i`` (no validation beyond structure)."""
    c = buf[i : i + 1]
    if c == b'"':
        m = _STRING.match(buf, i)
        if m is None:
            raise ValueError("unterminated string")
        return m.end()
    if c in (b"{", b"["):
        depth = 0
        n = len(buf)
        while i < n:
            ch = buf[i]
            if ch == 0x22:  # '"'
                m = _STRING.match(buf, i)
                if m is None:
                    raise ValueError("unterminated string")
                i = m.end()
                continue
            if ch in (0x7B, 0x5B):
                depth += 1
            elif ch in (0x7D, 0x5D):
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated container")
    m = _SCALAR_END.search(buf, i)
    return m.start() if m else len(buf)


def _members(buf: bytes, i: int) -> list[tuple[bytes, int, int, int]]:
    """Members of the object at ``i``: (raw key, member start, value start, value end)."""
    out: list[tuple[bytes, int, int, int]] = []
    i = _skip_ws(buf, i + 1)
    if buf[i : i + 1] == b"}":
        return out
    while True:
        m = _STRING.match(buf, i)
        if m is None:
            raise ValueError("expected a key")
        key = buf[m.start() + 1 : m.end() - 1]
        j = _skip_ws(buf, m.end())
        if buf[j : j + 1] != b":":
            raise ValueError("expected ':'")
        v = _skip_ws(buf, j + 1)
        end = _value_end(buf, v)
        out.append((key, i, v, end))
        k = _skip_ws(buf, end)
        if buf[k : k + 1] == b",":
            i = _skip_ws(buf, k + 1)
            continue
        return out


def _elements(buf: bytes, i: int) -> list[tuple[int, int]]:
    """Elements of the array at ``i``: (start, end)."""
    out: list[tuple[int, int]] = []
    i = _skip_ws(buf, i + 1)
    if buf[i : i + 1] == b"]":
        return out
    while True:
        end = _value_end(buf, i)
        out.append((i, end))
        k = _skip_ws(buf, end)
        if buf[k : k + 1] != b",":
            return out
        i = _skip_ws(buf, k + 1)


def _object_edits(
    buf: bytes,
    start: int,
    remove: tuple[bytes, ...],
    null: tuple[bytes, ...],
    llamacpp: bool = False,
) -> list[tuple[int, int, bytes]]:
    members = _members(buf, start)
    edits: list[tuple[int, int, bytes]] = []
    for pos, (key, mstart, vstart, vend) in enumerate(members):
        drop = key in remove or (
            llamacpp
            and key == b"logprobs"
            and key in null
            and _LLAMACPP_ENTRY.search(buf, vstart, vend) is not None
        )
        if drop:
            if pos > 0:  # drop from the end of the previous value: ``,"key":value``
                edits.append((members[pos - 1][3], vend, b""))
            elif len(members) > 1:  # first member: drop through the next member's start
                edits.append((mstart, members[1][1], b""))
            else:
                edits.append((mstart, vend, b""))
        elif key in null and buf[vstart:vend] != b"null":
            edits.append((vstart, vend, b"null"))
    return edits


def strip_json(buf: bytes, strip: Strip) -> bytes:
    """``buf`` (one JSON object) with the members ``strip`` names removed or nulled."""
    if not strip:
        return buf
    start = _skip_ws(buf, 0)
    if buf[start : start + 1] != b"{":
        return buf
    try:
        edits = _object_edits(buf, start, strip.top_remove, strip.top_null)
        if strip.choice_null or strip.choice_remove:
            members = _members(buf, start)
            remove, null = strip.choice_remove, strip.choice_null
            if b"logprobs" in null and any(
                key == b"system_fingerprint" and buf[vstart:vend] == _OLLAMA_FINGERPRINT
                for key, _, vstart, vend in members
            ):  # Ollama's /v1 layer omits logprobs not asked for (omitempty), never nulls them
                remove = (*remove, b"logprobs")
                null = tuple(key for key in null if key != b"logprobs")
            for key, _, vstart, _ in members:
                if key == b"choices" and buf[vstart : vstart + 1] == b"[":
                    for estart, _ in _elements(buf, vstart):
                        if buf[estart : estart + 1] == b"{":
                            edits.extend(
                                _object_edits(
                                    buf, estart, remove, null, strip.drop_llamacpp_logprobs
                                )
                            )
    except (ValueError, IndexError):
        return buf  # not JSON we can edit: relay as it came
    if not edits:
        return buf
    edits.sort()
    out: list[bytes] = []
    pos = 0
    for a, b, repl in edits:
        if a < pos:
            continue
        out.append(buf[pos:a])
        out.append(repl)
        pos = b
    out.append(buf[pos:])
    return b"".join(out)


def strip_line(line: bytes, strip: Strip, *, sse: bool) -> bytes:
    """One NDJSON line or SSE line (``data: {...}``) with the token data hidden; ends kept."""
    if not strip:
        return line
    body_end = len(line)
    while body_end and line[body_end - 1] in b"\r\n":
        body_end -= 1
    head = 0
    if sse:
        if not line.startswith(b"data:"):
            return line
        head = 5
    body = line[head:body_end]
    new = strip_json(body, strip)
    return line if new is body else line[:head] + new + line[body_end:]


def _data_value(line: bytes) -> bytes | None:
    """The value of an SSE ``data`` field line (one space after the colon dropped), else None."""
    name, colon, value = line.rstrip(b"\r\n").partition(b":")
    if name != b"data":
        return None
    return value[1:] if colon and value[:1] == b" " else value


def strip_event(lines: list[bytes], strip: Strip) -> list[bytes]:
    """An SSE event's lines (its blank line last) with the token data hidden from its data.

    A client joins an event's ``data`` lines with LF and parses that, so an event whose JSON
    spans several ``data`` lines is edited as a whole (line by line, no line is JSON): the
    edited data goes out as ``data:`` lines split where it has LFs, in the place of the old
    ones, with the first one's spelling and line end. An event with one data line is edited
    in place (:func:`strip_line`).
    """
    if not strip:
        return lines
    at = [i for i, line in enumerate(lines) if _data_value(line) is not None]
    if len(at) < 2:
        return [strip_line(line, strip, sse=True) for line in lines]
    first = lines[at[0]]
    data = b"\n".join(_data_value(lines[i]) or b"" for i in at)
    new = strip_json(data, strip)
    if new is data:
        return lines
    head = b"data: " if first[5:6] == b" " else b"data:"
    end = first[len(first.rstrip(b"\r\n")) :]
    data_lines = [head + part + end for part in new.split(b"\n")]
    data_at = set(at)
    rest = [line for i, line in enumerate(lines) if i not in data_at]
    return rest[: at[0]] + data_lines + rest[at[0] :]
