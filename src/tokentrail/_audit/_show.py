"""One exchange, and one conversation, as a person wants to read them.

``show`` prints a record's metadata, the input and output with token boundaries visible
(alternating background colours in a terminal, ``|`` between tokens without colour, a numbered
table with ``--ids``), where the tokens came from, the timing, and whether the record is proven
included in the log's newest signed checkpoint (an RFC 9162 inclusion proof, computed and checked
against the verifier key).

``session`` prints a conversation turn by turn, with what the model saw at each turn: the request's
``messages`` (or ``prompt``), marking messages new since the previous turn, and assistant
messages the client sent that are not a reply recorded in the session (a rewritten history).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .._checkpoint import Verifier
from .._errors import TokentrailError
from .._layout import iter_lines, list_log
from .._merkle import (
    CompactRange,
    MerkleLevels,
    leaf_hash,
    root_from_hashes,
    verify_inclusion,
)
from ._index import Index
from ._leaves import Checked, latest_checkpoint

TOKEN_STYLES = ("black on cyan", "black on yellow")
SEPARATOR = "|"


@dataclass(frozen=True, slots=True)
class Inclusion:
    """Whether a record is proven included in its log's newest signed checkpoint."""

    proven: bool
    message: str
    tree_size: int | None = None
    #: A key was given and the proof fails (not merely unchecked or not sealed yet).
    failed: bool = False


def prove_included(
    root: Path, index: Index, checked: Checked, verifiers: list[Verifier] | None
) -> Inclusion:
    """Compute and check the record's inclusion proof against the newest signed checkpoint.

    Leaf hashes come from the index (fast); a proof from them is only accepted when it leads to
    the signed root, so a stale index costs a re-read of the log, never a wrong answer.
    """
    if verifiers is None:
        return Inclusion(False, "not checked: no verifier key (pass --public-key)")
    if checked.leaf is None or not checked.ok:
        return Inclusion(False, "not proven: the record fails its checks")
    log_id, seq = checked.row.log_id, checked.row.seq
    try:
        head = latest_checkpoint(root, log_id, verifiers)
    except TokentrailError as exc:
        return Inclusion(
            False, f"NOT PROVEN: the newest checkpoint of {log_id} fails: {exc}", failed=True
        )
    if head is None or head.checkpoint.size <= seq:
        size = 0 if head is None else head.checkpoint.size
        return Inclusion(
            False,
            f"not yet sealed: seq {seq} is beyond the newest checkpoint (size {size});"
            " a live writer seals within a minute",
        )
    size = head.checkpoint.size
    lhash = leaf_hash(checked.leaf)
    for hashes in (index.leaf_hashes(log_id, size), None):
        if hashes is None:
            hashes = _log_hashes(root, log_id, size)
        if len(hashes) != size or hashes[seq] != lhash:
            continue
        try:
            verify_inclusion(
                seq, size, lhash, MerkleLevels(hashes).proof(seq), head.checkpoint.root
            )
        except TokentrailError:
            continue
        return Inclusion(
            True,
            f"PROVEN: included in the signed checkpoint of size {size}"
            f" ({head.checkpoint.origin}, {head.path.name})",
            size,
        )
    return Inclusion(
        False,
        f"NOT PROVEN: no inclusion proof leads to the signed root of size {size}"
        " (run tokentrail verify)",
        failed=True,
    )


class LogProver:
    """Whether records are proven under their logs' newest signed checkpoints, for many
    records at once (``search``, ``session``): each log's indexed leaf hashes are checked
    against its signed root once, so a record whose re-read leaf is the indexed one is proven.

    What the index's leaves were last proven to be (a compact range) is kept in the index, so
    a later command hashes only the leaves indexed since; the index is rebuilt from scratch,
    and that kept range dropped, when a log no longer continues what was indexed of it. (One
    who can rewrite the index as well as the ledger can defeat this: ``verify``, with its
    witness state kept apart, is the integrity check.)
    """

    def __init__(self, root: Path, index: Index, verifiers: list[Verifier] | None) -> None:
        self.root = root
        self.index = index
        self.verifiers = verifiers
        #: log -> (size proven, the log's own leaf hashes when the index's were not, name)
        self._logs: dict[str, tuple[int | None, list[bytes] | None, str]] = {}

    def check(self, checked: Checked) -> Inclusion:
        if self.verifiers is None:
            return Inclusion(False, "not checked: no verifier key (pass --public-key)")
        if checked.leaf is None or not checked.ok:
            return Inclusion(False, "not proven: the record fails its checks")
        log_id, seq = checked.row.log_id, checked.row.seq
        if log_id not in self._logs:
            self._logs[log_id] = self._sealed(log_id, self.verifiers)
        size, hashes, why = self._logs[log_id]
        if size is None:
            return Inclusion(False, why, failed=True)
        if seq >= size:
            return Inclusion(False, f"not yet sealed: seq {seq} is beyond {why}")
        if hashes is not None and hashes[seq] != leaf_hash(checked.leaf):
            return Inclusion(
                False,
                f"NOT PROVEN: seq {seq} is not the record {why} covers (run tokentrail verify)",
                failed=True,
            )
        return Inclusion(True, f"PROVEN: under {why}", size)

    def _sealed(
        self, log_id: str, verifiers: list[Verifier]
    ) -> tuple[int | None, list[bytes] | None, str]:
        """How many records the log's newest signed checkpoint covers, proven; the log's own
        leaf hashes when the index's do not lead to the signed root; and that checkpoint's
        name (``None`` and why, when nothing can be proven)."""
        try:
            head = latest_checkpoint(self.root, log_id, verifiers)
        except TokentrailError as exc:
            return None, None, f"NOT PROVEN: the newest checkpoint of {log_id} fails: {exc}"
        if head is None:
            return 0, None, f"the newest checkpoint of {log_id} (none yet)"
        size, signed = head.checkpoint.size, head.checkpoint.root
        name = f"the signed checkpoint of size {size} ({head.path.name})"
        kept = self.index.proven(log_id)
        proven = kept.copy() if kept is not None and kept.size <= size else CompactRange()
        for lhash in self.index.leaf_hashes(log_id, size, proven.size):
            proven.append(lhash)
        if proven.size == size and proven.root() == signed:
            if kept is None or kept.size != size:
                self.index.note_proven(log_id, proven)
            return size, None, name
        hashes = _log_hashes(self.root, log_id, size)  # the index lags, or was rewritten
        if len(hashes) == size and root_from_hashes(hashes) == signed:
            return size, hashes, name
        return (
            None,
            None,
            (
                f"NOT PROVEN: the records of {log_id} do not lead to the root of {name}"
                " (run tokentrail verify)"
            ),
        )


def _log_hashes(root: Path, log_id: str, size: int) -> list[bytes]:
    hashes: list[bytes] = []
    for seg in list_log(root, log_id).segments:
        for _, line, complete in iter_lines(seg.path):
            if not complete or len(hashes) >= size:
                return hashes
            hashes.append(leaf_hash(line))
    return hashes


# ---------------------------------------------------------------------- tokens


def token_label(token: Any) -> str:
    """A token as text: a piece with control characters escaped, a byte piece as hex, an id."""
    if isinstance(token, str):
        return token.encode("unicode_escape").decode("ascii") if not token.isprintable() else token
    if isinstance(token, list):
        return "‹" + " ".join(f"{b:02x}" for b in token if isinstance(b, int)) + "›"
    return str(token)


def render_tokens(tokens: Any, *, color: bool) -> Text:
    """Tokens with visible boundaries: alternating colours, or ``|`` between them."""
    if tokens is None:
        return Text("(unknown: no token data recorded)", style="italic")
    if not tokens:
        return Text("(none)", style="italic")
    if color:
        out = Text()
        for i, token in enumerate(tokens):
            out.append(token_label(token), style=TOKEN_STYLES[i % 2])
        return out
    return Text(SEPARATOR.join(token_label(t) for t in tokens))


def token_table(tokens: Any, logprobs: Any = None) -> Table:
    """A numbered table of tokens: position, the piece or id, and the logprob when recorded."""
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("kind")
    has_lp = isinstance(logprobs, list) and len(logprobs) == len(tokens or [])
    if has_lp:
        table.add_column("logprob", justify="right")
    for i, token in enumerate(tokens or []):
        kind = "id" if isinstance(token, int) else "bytes" if isinstance(token, list) else "piece"
        label = token_label(token) if kind != "piece" else repr(token)
        cells = [str(i), label, kind]
        if has_lp:
            value = logprobs[i]
            cells.append(f"{value:.4f}" if isinstance(value, int | float) else "")
        table.add_row(*(Text(cell) for cell in cells))  # (a token "[/]" is no markup)
    return table


# ---------------------------------------------------------------------- one exchange


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "unknown"


#: What a terminal would act on rather than show (C0 and C1 controls but LF and tab, DEL) and
#: the bidirectional overrides that reorder what is shown ("Trojan source"): a record's text is
#: shown with these escaped, never obeyed.
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with what a terminal would obey instead of show escaped (``\\x1b``, ``\\r``)."""
    return _UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _text(value: Any) -> str:
    return visible(value) if isinstance(value, str) else "(none)"


def render_show(checked: Checked, inclusion: Inclusion, *, color: bool, ids: bool) -> list[Any]:
    """The renderables of ``tokentrail show`` for one re-checked record."""
    rec = checked.record or {}
    meta = Table.grid(padding=(0, 2))
    meta.add_column(style="bold")
    meta.add_column(overflow="fold")  # a long path wraps whole, never cut to "…"
    version = rec.get("model_version")
    rows: list[tuple[str, str]] = [
        ("event", str(rec.get("event_id"))),
        ("log / seq", f"{checked.row.log_id} / {checked.row.seq}"),
        ("file", f"{checked.location} @ {checked.row.offset}"),
        ("time", str(rec.get("timestamp"))),
        ("user", str(rec.get("user_id"))),
        ("session", str(rec.get("session_id"))),
        ("model", f"{rec.get('model')}" + (f" (version {version})" if version else "")),
        ("api", f"{rec.get('api')}" + (", streamed" if rec.get("stream") else "")),
        ("stop reason", str(rec.get("stop_reason"))),
        (
            "timing",
            f"{_ms(rec.get('request_duration_ms'))} total, first token after"
            f" {_ms(rec.get('time_to_first_token_ms'))}",
        ),
        (
            "usage",
            f"{rec.get('gen_ai.usage.input_tokens', '?')} input /"
            f" {rec.get('gen_ai.usage.output_tokens', '?')} output tokens (reported)",
        ),
        ("token sources", f"input {rec.get('input_token_source')},"
         f" output {rec.get('output_token_source')}"),
        ("integrity", "OK: leaf and content hashes hold" if checked.ok else
         f"FAIL: {checked.problem}"),
        ("inclusion", inclusion.message),
    ]  # fmt: skip
    if rec.get("retry_of"):
        rows.append(("retry of", str(rec["retry_of"])))
    for key, value in rows:
        meta.add_row(key, Text(visible(value)))
    out: list[Any] = [Rule(Text(visible(f"exchange {rec.get('event_id')}"))), meta]
    messages = context_messages(rec)
    if messages:
        out.append(Rule("what the model saw (request)", style="dim"))
        for role, content in messages:
            out.append(Text.assemble((f"{role}: ", "bold"), content))
    for side in ("input", "output"):
        tokens = rec.get(f"{side}_tokens")
        count = "?" if tokens is None else str(len(tokens))
        source = rec.get(f"{side}_token_source")
        out.append(Rule(Text(visible(f"{side}: {count} tokens, source {source}")), style="dim"))
        out.append(Text.assemble(("text: ", "bold"), _text(rec.get(f"{side}_text"))))
        if ids and tokens:
            out.append(
                token_table(tokens, rec.get("output_logprobs") if side == "output" else None)
            )
        else:  # with no tokens to list, --ids says so as the default view does
            out.append(Text.assemble(("tokens: ", "bold"), render_tokens(tokens, color=color)))
    return out


# ---------------------------------------------------------------------- a conversation


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict):
                parts.append(f"[{part.get('type', 'part')}]")
        return " ".join(parts)
    return "" if value is None else str(value)


def context_messages(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """What the model was sent, as ``(role, text)``: chat messages, or system and prompt (as
    shown: :func:`visible`)."""
    return [(visible(role), visible(text)) for role, text in _context(rec)]


def _context(rec: dict[str, Any]) -> list[tuple[str, str]]:
    body = rec.get("request_body")
    if not isinstance(body, dict):
        text = rec.get("input_text")
        return [("input", text)] if isinstance(text, str) else []
    out: list[tuple[str, str]] = []
    if isinstance(body.get("system"), str):
        out.append(("system", body["system"]))
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            text = _content(msg.get("content"))
            extras = []
            if msg.get("images"):
                extras.append(f"[{len(msg['images'])} image(s)]")
            for call in msg.get("tool_calls") or []:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                extras.append(f"[tool call {fn.get('name')}({_content(fn.get('arguments'))})]")
            out.append((str(msg.get("role")), " ".join([text, *extras]).strip()))
    elif isinstance(body.get("prompt"), str | list):
        out.append(("prompt", _content(body["prompt"])))
    return out


def render_session(session_id: str, turns: list[Checked]) -> list[Any]:
    """The renderables of ``tokentrail session``: each turn's context and reply, in order."""
    out: list[Any] = [Rule(Text(visible(f"session {session_id}: {len(turns)} turns")))]
    seen: list[tuple[str, str]] = []
    replies: set[str] = set()
    for n, turn in enumerate(turns, 1):
        rec = turn.record or {}
        head = (
            f"turn {n} · {rec.get('timestamp')} · {rec.get('model')} · {rec.get('api')}"
            f" · stop_reason {rec.get('stop_reason')} · {_ms(rec.get('request_duration_ms'))}"
        )
        out.append(Rule(Text(visible(head)), style="bold"))
        out.append(Text(visible(f"event {rec.get('event_id')} (log {turn.row.log_id}, seq"
                        f" {turn.row.seq}), user {rec.get('user_id')}"), style="dim"))  # fmt: skip
        if not turn.ok:
            out.append(Text(f"FAIL: {turn.problem}", style="bold red"))
            continue
        context = context_messages(rec)
        out.append(Text(f"what the model saw ({len(context)} messages):", style="bold"))
        for i, (role, text) in enumerate(context):
            new = i >= len(seen) or seen[i] != (role, text)
            mark = "+ " if new else "  "
            line = Text.assemble((mark, "green" if new else ""), (f"{role}: ", "bold"), text)
            if role == "assistant" and text not in replies:
                line.append("  (not a reply recorded in this session)", style="bold red")
            out.append(line)
        reply = rec.get("output_text")
        out.append(Text.assemble(("reply: ", "bold"), _text(reply)))
        shown = visible(reply) if isinstance(reply, str) else ""
        if isinstance(reply, str):
            replies.add(shown)
        seen = [*context, ("assistant", shown)]
    return out


def print_all(console: Console, renderables: list[Any]) -> None:
    """Print renderables in order."""
    console.print(Group(*renderables))
