"""The DSAR package format: what an export holds, and its deterministic renderings.

A package is a directory (or the same files in a ``.zip``)::

    README.txt                         how to check it, in plain words
    manifest.json                      subject, range, every record (event id, log, seq, leaf
                                       hash) and the SHA-256 of README, key and checkpoints
    manifest.sig                       a C2SP signed note over the manifest's SHA-256, by the
                                       deployment's key: the operator's word that the set is
                                       complete (absent when exported without the signing key)
    verifier.pub                       the deployment's verifier key(s)
    checkpoints/<log_id>/<size>.checkpoint   the signed checkpoint each log's proofs lead to
    records.jsonl | records.csv | records.html   the records, each with its inclusion proof

Each record travels as the exact stored line plus its RFC 9162 audit path. A ``records.jsonl``
line is a complete ``tokentrail.inclusion-proof/v1`` bundle (``tokentrail verify-proof`` reads
it); ``records.csv`` adds readable columns; ``records.html`` is one self-contained page that
embeds everything above, so it is a package on its own.

Every data file is a pure function of the records and the other files, so a checker re-renders
it from what it verified and compares bytes: an edited readable cell is caught and named, not
only an edited proof.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .._proof import BUNDLE_FORMAT
from ._show import context_messages

EXPORT_FORMAT = "tokentrail.dsar-export/v1"
FORMATS = ("jsonl", "csv", "html")
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
README = "README.txt"
CONTENT = "content.json"  # opened sealed content, when exported with the key store
KEYS = "verifier.pub"
DATA_FILES = {fmt: f"records.{fmt}" for fmt in FORMATS}
CSV_COLUMNS = (
    "event_id",
    "timestamp",
    "session_id",
    "model",
    "stop_reason",
    "input_text",
    "output_text",
    "input_token_count",
    "output_token_count",
    "log_id",
    "seq",
    "tree_size",
    "leaf_hash",
    "proof",
    "record",
)
HTML_DATA_START = '<script type="application/json" id="tokentrail-package">'
HTML_DATA_END = "</script>"


@dataclass(frozen=True, slots=True)
class Item:
    """One exported record: its exact stored line and its audit path in a signed tree."""

    log_id: str
    index: int
    tree_size: int
    record: str
    proof: tuple[str, ...]

    def bundle(self, checkpoint: str) -> dict[str, Any]:
        """The record as a ``tokentrail.inclusion-proof/v1`` bundle."""
        return {
            "format": BUNDLE_FORMAT,
            "log_id": self.log_id,
            "index": self.index,
            "tree_size": self.tree_size,
            "record": self.record,
            "proof": list(self.proof),
            "checkpoint": checkpoint,
        }

    def parsed(self) -> dict[str, Any]:
        """The record's fields (an empty dict when the line is not a JSON object)."""
        try:
            obj = orjson.loads(self.record)
        except orjson.JSONDecodeError:
            return {}
        return obj if isinstance(obj, dict) else {}


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def checkpoint_file(log_id: str, size: int) -> str:
    """The package path of a log's checkpoint."""
    return f"checkpoints/{log_id}/{size:020d}.checkpoint"


def signature_text(manifest: bytes) -> bytes:
    """The signed-note text of ``manifest.sig``: the format and the manifest's SHA-256."""
    return f"{EXPORT_FORMAT}\nsha256:{sha256_hex(manifest)}\n".encode()


# ---------------------------------------------------------------------- renderings

Chunk = tuple[str | None, bytes]  # (event id of the record it shows, or None; bytes)


def sealed_contents(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The opened content of sealed records (``content.json``), by event id."""
    try:
        data = orjson.loads(files[CONTENT]) if CONTENT in files else {}
    except orjson.JSONDecodeError:
        return {}
    records = data.get("records") if isinstance(data, dict) else None
    return records if isinstance(records, dict) else {}


def opened_view(rec: dict[str, Any], contents: Mapping[str, Any]) -> dict[str, Any]:
    """A record as a person should read it: sealed content opened, or stated as erased."""
    if not rec.get("content_sealed"):
        return rec
    entry = contents.get(str(rec.get("event_id")))
    if not isinstance(entry, dict):
        note = "[sealed content, not opened in this export]"
        return {**rec, "input_text": note, "output_text": note}
    if isinstance(entry.get("content"), dict):
        return {**rec, **entry["content"]}
    note = f"[content erased: the key was destroyed at {entry.get('erased_at')}]"
    return {**rec, "input_text": note, "output_text": note}


def render(fmt: str, items: list[Item], files: Mapping[str, bytes]) -> list[Chunk]:
    """The data file of a package, as chunks labelled with the record each one shows."""
    if fmt == "jsonl":
        return _render_jsonl(items, files)
    if fmt == "csv":
        return _render_csv(items, sealed_contents(files))
    return _render_html(items, files)


def checkpoint_notes(files: Mapping[str, bytes]) -> dict[str, str]:
    """The package's checkpoint notes by log id."""
    out: dict[str, str] = {}
    for name, data in files.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "checkpoints" and parts[2].endswith(".checkpoint"):
            out[parts[1]] = data.decode("utf-8", "replace")
    return out


def _render_jsonl(items: list[Item], files: Mapping[str, bytes]) -> list[Chunk]:
    notes = checkpoint_notes(files)
    return [
        (
            item.parsed().get("event_id"),
            orjson.dumps(item.bundle(notes.get(item.log_id, ""))) + b"\n",
        )
        for item in items
    ]


def _count(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else ""


#: What makes a spreadsheet read a cell as a formula (OWASP, "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A readable cell; one a spreadsheet would run as a formula (a prompt is anyone's text)
    starts with an apostrophe, which shows it as text (the exact record is in ``record``)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_row(item: Item, contents: Mapping[str, Any] | None = None) -> list[str]:
    """The CSV cells of one item: readable columns, then the proof and the exact record."""
    rec = opened_view(item.parsed(), contents or {})
    return [
        _cell(rec.get("event_id")),
        _cell(rec.get("timestamp")),
        _cell(rec.get("session_id")),
        _cell(rec.get("model")),
        _cell(rec.get("stop_reason")),
        _cell(rec.get("input_text")),
        _cell(rec.get("output_text")),
        _count(rec.get("input_tokens")),
        _count(rec.get("output_tokens")),
        item.log_id,
        str(item.index),
        str(item.tree_size),
        sha256_hex(b"\x00" + item.record.encode("utf-8")),
        " ".join(item.proof),
        item.record,
    ]


def _csv_line(cells: list[str] | tuple[str, ...]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue().encode("utf-8")


def _render_csv(items: list[Item], contents: Mapping[str, Any]) -> list[Chunk]:
    chunks: list[Chunk] = [(None, _csv_line(CSV_COLUMNS))]
    chunks.extend(
        (item.parsed().get("event_id"), _csv_line(csv_row(item, contents))) for item in items
    )
    return chunks


def parse_csv(data: bytes) -> tuple[list[Item], list[str]]:
    """Items from ``records.csv`` and what could not be read, by row."""
    items: list[Item] = []
    problems: list[str] = []
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        return [], [f"records.csv cannot be read: {exc}"]
    if not rows or tuple(rows[0]) != CSV_COLUMNS:
        problems.append("records.csv does not start with the expected header row")
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(CSV_COLUMNS):
            problems.append(f"records.csv row {n} has {len(row)} columns")
            continue
        cells = dict(zip(CSV_COLUMNS, row, strict=True))
        try:
            items.append(
                Item(
                    cells["log_id"],
                    int(cells["seq"]),
                    int(cells["tree_size"]),
                    cells["record"],
                    tuple(cells["proof"].split()),
                )
            )
        except ValueError:
            problems.append(f"records.csv row {n} (event {cells['event_id']}) is malformed")
    return items, problems


def item_from_json(obj: Any) -> Item:
    """An item from its JSON form (a bundle, with or without the checkpoint); raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    try:
        proof = obj["proof"]
        if not isinstance(proof, list) or not all(isinstance(p, str) for p in proof):
            raise ValueError("proof is not a list of strings")
        if not all(isinstance(obj[k], str) for k in ("log_id", "record")):
            raise ValueError("log_id and record must be strings")
        if not all(type(obj[k]) is int for k in ("index", "tree_size")):
            raise ValueError("index and tree_size must be integers")
        return Item(obj["log_id"], obj["index"], obj["tree_size"], obj["record"], tuple(proof))
    except KeyError as exc:
        raise ValueError(f"lacks {exc}") from None


# ---------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:60rem;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ccc}
table.meta{border-collapse:collapse;margin:.5rem 0}
table.meta th{text-align:left;padding:.15rem 1rem .15rem 0;color:#555;font-weight:600}
table.meta td{padding:.15rem 0}
pre{white-space:pre-wrap;word-break:break-word;background:#f5f5f7;padding:.6rem;
border-radius:.3rem;margin:.3rem 0}
.role{font-weight:600;color:#444}.proof{color:#0a6b2d}.note{color:#555;font-size:.9rem}
section.rec{border:1px solid #ddd;border-radius:.4rem;padding:.2rem 1rem .8rem;margin:1rem 0}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _html_record(n: int, item: Item, contents: Mapping[str, Any]) -> bytes:
    rec = opened_view(item.parsed(), contents)
    meta = [
        ("Time (UTC)", rec.get("timestamp")),
        ("Conversation (session)", rec.get("session_id")),
        ("Model", rec.get("model")),
        ("Why the answer ended", rec.get("stop_reason")),
        ("Record id", rec.get("event_id")),
        ("Position in the audit log", f"log {item.log_id}, entry {item.index}"),
    ]
    out = [f'<section class="rec" id="r-{_e(rec.get("event_id"))}">']
    out.append(f"<h2>Exchange {n}</h2>")
    out.append('<table class="meta">')
    out.extend(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta)
    out.append("</table>")
    messages = context_messages(rec)
    if messages:
        out.append("<h3>What the model was sent</h3>")
        out.extend(
            f'<pre><span class="role">{_e(role)}:</span> {_e(text)}</pre>'
            for role, text in messages
        )
    out.append("<h3>What the model answered</h3>")
    out.append(f"<pre>{_e(rec.get('output_text'))}</pre>")
    out.append(
        f'<p class="proof">Proven part of the signed audit log: entry {item.index} of'
        f" {item.tree_size} in log {_e(item.log_id)} ({len(item.proof)} proof hashes).</p>"
    )
    out.append("</section>\n")
    return "\n".join(out).encode("utf-8")


def _embedded(items: list[Item], files: Mapping[str, bytes]) -> bytes:
    data = {
        "format": EXPORT_FORMAT,
        "files": {
            name: files[name].decode("utf-8", "replace")
            for name in sorted(files)
            if not name.startswith("records.")
        },
        "records": [
            {
                "log_id": i.log_id,
                "index": i.index,
                "tree_size": i.tree_size,
                "record": i.record,
                "proof": list(i.proof),
            }
            for i in items
        ],
    }
    raw = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    # Inside <script>, "</" would end the element: escape the three HTML-special characters.
    return raw.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")


def _render_html(items: list[Item], files: Mapping[str, bytes]) -> list[Chunk]:
    try:
        manifest = orjson.loads(files.get(MANIFEST, b"{}"))
    except orjson.JSONDecodeError:
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    subject = (manifest.get("subject") or {}).get("user_id")
    rng = manifest.get("range") or {}
    signed = SIGNATURE in files
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Your AI conversation records: {_e(subject)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Your records of conversations with an AI model</h1>",
        f"<p>This file lists every recorded exchange between <strong>{_e(subject)}</strong> and"
        f" the AI model service: <strong>{len(items)} exchanges</strong>"
        f" (from {_e(rng.get('since') or 'the beginning')}"
        f" until {_e(rng.get('until') or 'the export')}).</p>",
        f'<p class="note">Exported {_e(manifest.get("created_at"))} by'
        f" {_e(manifest.get('tool'))}."
        + (
            " The operator signed the list of records as complete."
            if signed
            else " The list of records was not signed by the operator."
        )
        + "</p>",
        "<h2>How this can be checked</h2>",
        "<p>Each exchange below is stored word for word as it was recorded, together with a"
        " cryptographic proof that it is part of a tamper-evident audit log signed by the"
        " operator. Changing a single character of an exchange breaks its proof. An expert can"
        " check the whole file with the free tool <code>tokentrail verify-export</code>; the"
        " proofs and the operator's public key are embedded at the end of this file.</p>",
        f'<p class="note">Operator\'s public key: <code>{_e(files.get(KEYS, b"").decode())}'
        "</code></p>",
        "",
    ]
    chunks: list[Chunk] = [(None, "\n".join(head).encode("utf-8"))]
    contents = sealed_contents(files)
    for n, item in enumerate(items, 1):
        chunks.append((item.parsed().get("event_id"), _html_record(n, item, contents)))
    tail = HTML_DATA_START.encode() + _embedded(items, files) + HTML_DATA_END.encode()
    chunks.append((None, b"<footer>\n" + tail + b"\n</footer>\n</body></html>\n"))
    return chunks


def parse_html(data: bytes) -> tuple[list[Item], dict[str, bytes], list[str]]:
    """Items and the embedded package files of ``records.html``, and what could not be read."""
    start = data.find(HTML_DATA_START.encode())
    end = data.find(HTML_DATA_END.encode(), start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        return [], {}, ["records.html holds no embedded package data"]
    try:
        obj = orjson.loads(data[start + len(HTML_DATA_START) : end])
        files = {name: text.encode("utf-8") for name, text in obj["files"].items()}
        raw = obj["records"]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        return [], {}, [f"records.html's embedded package data cannot be read: {exc!r}"]
    items: list[Item] = []
    problems: list[str] = []
    for n, entry in enumerate(raw if isinstance(raw, list) else [], 1):
        try:
            items.append(item_from_json(entry))
        except ValueError as exc:
            problems.append(f"records.html embedded record {n} is malformed: {exc}")
    return items, files, problems
