"""A session's turns, in order, with what the model saw at each: for debugging agents.

Every record stores the request body exactly as sent (``request_body``), so a chat turn's
``messages`` are the whole context window the model was given (system prompt, history, tool
results), and a completion turn's ``prompt`` (with Ollama's ``system``, ``template`` and
``context``) is everything it was given. :func:`session_turns` reads a local ledger (every log in
it, plain and compressed segments) and returns one :class:`Turn` per record of the session,
ordered by the time the request arrived, then by log and ``seq`` (the order within one writer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._layout import iter_lines, list_log, list_logs


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange of a session: what was sent, what came back, and the record itself."""

    index: int
    timestamp: str
    log_id: str
    seq: int
    event_id: str
    api: str
    model: str | None
    messages: list[dict[str, Any]]
    request: Mapping[str, Any] | None
    input_text: str | None
    output_text: str | None
    output_messages: list[Any]
    stop_reason: str
    record: Mapping[str, Any] = field(repr=False)


def request_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The context window of a recorded request, as chat messages.

    Chat requests: their ``messages`` as sent. Completion requests: Ollama's ``system`` as a
    system message, then the ``prompt`` as a user message (Ollama's ``context`` token ids, the
    previous turns, are in ``request``). A plain ``record()`` with no body: its ``input_text``.
    """
    body = record.get("request_body")
    if isinstance(body, Mapping):
        messages = body.get("messages")
        if isinstance(messages, list):
            return [dict(m) if isinstance(m, Mapping) else {"content": m} for m in messages]
        out: list[dict[str, Any]] = []
        if isinstance(body.get("system"), str) and body["system"]:
            out.append({"role": "system", "content": body["system"]})
        prompt = body.get("prompt")
        if prompt is not None:
            out.append({"role": "user", "content": prompt})
        return out
    text = record.get("input_text")
    return [{"role": "user", "content": text}] if isinstance(text, str) else []


def _session_records(root: Path, session_id: str) -> list[dict[str, Any]]:
    needle = orjson.dumps(session_id)
    found: list[dict[str, Any]] = []
    for log_id in list_logs(root):
        for seg in list_log(root, log_id).segments:
            for _, line, complete in iter_lines(seg.path):
                if not complete or needle not in line:  # cheap filter before parsing
                    continue
                rec = orjson.loads(line)
                if rec.get("session_id") == session_id:
                    found.append(rec)
    return found


def session_turns(ledger_root: str | Path, session_id: str) -> list[Turn]:
    """The records of ``session_id`` in a local ledger, oldest first, as :class:`Turn` s."""
    records = _session_records(Path(ledger_root), session_id)
    records.sort(key=lambda r: (r.get("timestamp", ""), r.get("log_id", ""), r.get("seq", 0)))
    turns = []
    for index, rec in enumerate(records):
        body = rec.get("request_body")
        output = rec.get("gen_ai.output.messages")
        if not isinstance(output, list):
            text = rec.get("output_text")
            output = [] if text is None else [{"role": "assistant", "content": text}]
        turns.append(
            Turn(
                index=index,
                timestamp=rec["timestamp"],
                log_id=rec["log_id"],
                seq=rec["seq"],
                event_id=rec["event_id"],
                api=rec["api"],
                model=rec.get("model"),
                messages=request_messages(rec),
                request=body if isinstance(body, Mapping) else None,
                input_text=rec.get("input_text"),
                output_text=rec.get("output_text"),
                output_messages=output,
                stop_reason=rec["stop_reason"],
                record=rec,
            )
        )
    return turns
