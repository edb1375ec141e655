"""The audit commands: ``index``, ``search``, ``show``, ``session``, ``export``, ``verify-export``.

Click command objects the main group registers; each opens the library object, calls it, and
leaves errors to the group (one line on stderr). Exit status: 0 success, 1 an integrity problem
found (a mismatching leaf, a failing package), 2 could not run.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._checkpoint import Signer, Verifier
from .._erasure import FileKeyStore, open_record
from .._errors import ConfigError, StoreError
from .._layout import segment_bytes
from .._options import (
    EVENT_ID_ARGUMENT,
    EXIT_INVALID,
    LEDGER_OPTION,
    PUBLIC_KEY_OPTION,
    parse_range,
    progress_bar,
    resolve_verifiers,
)
from .._paths import default_signing_key
from .._verify import VerifyOptions, default_state_dir, remembered_states, store_key
from ._export import build_export, write_package
from ._index import Index, index_path
from ._leaves import Checked, LeafReader
from ._package import FORMATS
from ._search import Filters, SearchResult, search
from ._show import LogProver, print_all, prove_included, render_session, render_show, visible
from ._verify_export import verify_export

COLOR_OPTION = click.option(
    "--color/--no-color",
    default=None,
    help="Colour token boundaries [default: when writing to a terminal]; without colour,"
    " tokens are separated by '|'.",
)
SINCE_OPTION = click.option("--since", help="From this time (YYYY-MM-DD or RFC 3339).")
UNTIL_OPTION = click.option("--until", help="Before this time (YYYY-MM-DD or RFC 3339).")


def _console(color: bool | None) -> Console:
    """stdout as rich writes to it; 160 columns at least into a file or pipe (80 cut the
    session headers short)."""
    probe = Console()
    width = None if probe.is_terminal else max(probe.width, 160)
    if color is None:
        return Console(highlight=False, soft_wrap=True, width=width)
    return Console(
        highlight=False, soft_wrap=True, width=width, force_terminal=color, no_color=not color
    )


def _open_index(ledger: Path, *, update: bool = True) -> Index:
    index = Index.open(ledger, in_memory_ok=True)
    if index.in_memory:
        click.echo(
            f"tokentrail: warning: {ledger} cannot be written here and has no search index:"
            " indexing it in memory for this command (keep one beside it: tokentrail index)",
            err=True,
        )
        update = True
    if index.read_only:
        click.echo(
            f"tokentrail: warning: {ledger} cannot be written here: searching its index as last"
            f" built ({index.count()} records); records appended since are not searched",
            err=True,
        )
    elif update:
        with progress_bar("indexing", segment_bytes(ledger)) as step:
            stats = index.update(step)
        for warning in stats.warnings:
            click.echo(f"tokentrail: warning: {warning}", err=True)
    elif index.count() == 0:
        click.echo(
            f"tokentrail: warning: the index of {ledger} is empty, so nothing is searched; run"
            " tokentrail index, or search without --no-update",
            err=True,
        )
    return index


def _optional_verifiers(specs: tuple[str, ...]) -> list[Verifier] | None:
    """The named keys; with none named, the default key if there is one, else None."""
    if specs:
        return resolve_verifiers(specs)
    try:
        return resolve_verifiers(())
    except ConfigError:
        return None


@click.command("index")
@LEDGER_OPTION
@click.option("--rebuild", is_flag=True, help="Drop the index and build it again from the ledger.")
def index_command(ledger: Path, rebuild: bool) -> None:
    """Build or update the search index (a rebuildable sidecar under <ledger>/index/).

    The index is never the source of truth: search re-checks every hit against the ledger,
    and the folder can be deleted at any time. Search updates it on its own; run this from
    cron to keep searches fast on a busy ledger.

    \b
    Examples:
      tokentrail index --ledger /var/lib/tokentrail
      tokentrail index --rebuild
    """
    with (
        Index.open(ledger, rebuild=rebuild) as index,
        progress_bar("indexing", segment_bytes(ledger)) as step,
    ):
        stats = index.update(step)
    for warning in stats.warnings:
        click.echo(f"tokentrail: warning: {warning}", err=True)
    rate = stats.added / stats.seconds if stats.seconds > 0 else 0.0
    click.echo(
        f"indexed {stats.added} new records ({stats.total} in all, {stats.logs} logs) in"
        f" {stats.seconds:.2f} s ({rate:,.0f} records/s): {index_path(ledger)}"
    )


def _sealing_logs(ledger: Path, index: Index) -> list[str]:
    """The logs whose newest indexed record has its content sealed (``serve --keystore``)."""
    newest = index.rows("r.seq = (SELECT max(seq) FROM records m WHERE m.log_id = r.log_id)")
    reader = LeafReader(ledger)
    try:
        return sorted(
            row.log_id
            for row in newest
            if (record := reader.check(row).record) is not None and record.get("content_sealed")
        )
    finally:
        reader.close()


def _count_of(tokens: object) -> int | None:
    """How many tokens a record's token list holds (None when it has none)."""
    return len(tokens) if isinstance(tokens, list) else None


def _hit_json(hit: Checked, keystore: Path | None) -> dict[str, object]:
    rec = hit.record or {}
    found: dict[str, object] = {
        "event_id": rec.get("event_id"),
        "timestamp": rec.get("timestamp"),
        "user_id": rec.get("user_id"),
        "session_id": rec.get("session_id"),
        "model": rec.get("model"),
        "model_version": rec.get("model_version"),
        "api": rec.get("api"),
        "stop_reason": rec.get("stop_reason"),
        "request_duration_ms": rec.get("request_duration_ms"),
        "input_token_source": rec.get("input_token_source"),
        "output_token_source": rec.get("output_token_source"),
        "input_tokens_count": _count_of(rec.get("input_tokens")),
        "output_tokens_count": _count_of(rec.get("output_tokens")),
        "usage_input_tokens": rec.get("gen_ai.usage.input_tokens"),
        "usage_output_tokens": rec.get("gen_ai.usage.output_tokens"),
        "retry_of": rec.get("retry_of"),
        "log_id": hit.row.log_id,
        "seq": hit.row.seq,
        "input_text": rec.get("input_text"),
        "output_text": rec.get("output_text"),
        "checked": True,
        # The same keys whether the ledger seals content or not, so a script reads any ledger.
        "content_sealed": False,
        "content_erased_at": None,
    }
    if rec.get("content_sealed"):  # the texts stay null unless the key store opens them
        opened = open_record(rec, FileKeyStore(keystore)) if keystore is not None else None
        found["content_sealed"] = True
        found["content_erased_at"] = opened.erased_at if opened is not None else None
        if opened is not None and opened.content is not None:
            found["input_text"] = opened.content.get("input_text")
            found["output_text"] = opened.content.get("output_text")
    return found


def _problem_json(problem: Checked) -> dict[str, object]:
    return {
        "event_id": problem.row.event_id,
        "log_id": problem.row.log_id,
        "seq": problem.row.seq,
        "file": problem.location,
        "offset": problem.row.offset,
        "checked": False,
        "problem": problem.problem,
    }


KEYSTORE_OPTION = click.option(
    "--keystore",
    type=click.Path(path_type=Path, file_okay=False, exists=True),  # (a typo is not "erased")
    envvar="TOKENTRAIL_KEYSTORE",
    help="Key store to open sealed content with (writers run with --keystore).",
)


def _opened(checked: Checked, keystore: Path | None) -> Checked:
    """``checked`` with sealed content opened for display, or marked as erased."""
    record = checked.record
    if record is None or not record.get("content_sealed"):
        return checked
    if keystore is None:
        note = "[sealed content: pass --keystore to open it]"
        return replace(checked, record={**record, "input_text": note, "output_text": note})
    opened = open_record(record, FileKeyStore(keystore))
    if opened.content is None:
        note = f"[content erased: the subject's key was destroyed at {opened.erased_at}]"
        return replace(checked, record={**record, "input_text": note, "output_text": note})
    return replace(checked, record={**record, **opened.content})


def _short(value: object, width: int = 40) -> Text:
    """A table cell: one line, shortened, what a terminal would obey escaped, and no markup
    (a prompt holding "[/]" or "[link=…]" is shown as written)."""
    text = "" if value is None else visible(str(value).replace("\n", " "))
    return Text(text if len(text) <= width else text[: width - 1] + "…")


#: ``search --count-by`` keys: the record field each counts by, and its SQL over the index.
COUNT_KEYS = {
    "user": ("user_id", "r.user_id"),
    "session": ("session_id", "r.session_id"),
    "model": ("model", "r.model"),
    "stop-reason": ("stop_reason", "r.stop_reason"),
    "day": ("day", "strftime('%Y-%m-%d', r.ts / 1000000, 'unixepoch')"),
    "log": ("log_id", "r.log_id"),
}


@click.command("search")
@LEDGER_OPTION
@click.option("--user", help="Only this user_id.")
@click.option(
    "--anonymous",
    is_flag=True,
    help="Only records with no user_id (null or empty; the erasure subject _anonymous).",
)
@click.option("--session", help="Only this session_id.")
@click.option("--model", help="Only this model (as requested).")
@SINCE_OPTION
@UNTIL_OPTION
@click.option("--stop-reason", help="Only this stop reason (stop, length, client_disconnect, …).")
@click.option("--text", help="Prompt or output contains this text (case-insensitive).")
@click.option(
    "--limit",
    type=click.IntRange(min=0, max=10**9),
    default=100,
    show_default=True,
    help="Show at most this many records (0: all).",
)
@click.option(
    "--count-by",
    type=click.Choice(sorted(COUNT_KEYS)),
    help="Show how many records match per user, model, … instead of the records (from the"
    " index: not re-read; tokentrail verify checks the ledger).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--no-update", is_flag=True, help="Do not bring the index up to date first.")
@KEYSTORE_OPTION
@PUBLIC_KEY_OPTION
def search_command(
    ledger: Path,
    user: str | None,
    anonymous: bool,
    session: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    stop_reason: str | None,
    text: str | None,
    limit: int,
    count_by: str | None,
    as_json: bool,
    no_update: bool,
    keystore: Path | None,
    public_keys: tuple[str, ...],
) -> None:
    """Find exchanges by user, session, model, time, stop reason or text.

    Every record shown has been re-read from the ledger and checked against the leaf hash the
    index holds and its own content hashes, and proven under its log's newest signed
    checkpoint with the verifier key (the records of a log that do not lead to that
    checkpoint's root are not proven); a record that fails is reported as MISMATCH (exit
    status 1), never shown as if it were fine. Without a key nothing is proven, and the
    summary says so. Sealed content is shown opened with --keystore; --text searches only
    content that is not sealed.

    \b
    Examples:
      tokentrail search --user alice --since 2025-01-01
      tokentrail search --text "refund" --model llama3.2:1b --json
      tokentrail search --anonymous --since 2025-01-01
      tokentrail search --since 2025-07-01 --until 2025-10-01 --count-by model
    """
    if anonymous and user is not None:
        raise ConfigError("--anonymous and --user exclude each other: give one")
    if count_by is not None and text is not None:
        raise ConfigError(
            "--count-by counts the index's rows, which hold no text: it cannot apply --text"
            " (search --text --limit 0 --json lists every match)"
        )
    start, end = parse_range(since, until)
    filters = Filters(
        user=user,
        anonymous=anonymous,
        session=session,
        model=model,
        since=start,
        until=end,
        stop_reason=stop_reason,
        text=text,
    )
    if count_by is not None:
        with _open_index(ledger, update=not no_update) as index:
            _show_counts(index, filters, count_by, as_json)
        return
    verifiers = _optional_verifiers(public_keys)
    with _open_index(ledger, update=not no_update) as index:
        if text is not None and (sealing := _sealing_logs(ledger, index)):
            click.echo(
                f"tokentrail: warning: log{'s' if len(sealing) > 1 else ''}"
                f" {', '.join(sealing)} seal{'' if len(sealing) > 1 else 's'} records' content:"
                " --text searches only content that is not sealed",
                err=True,
            )
        result = search(ledger, index, filters, limit or None)
        unproven = _prove_hits(ledger, index, result, verifiers)
    if as_json:
        for hit in result.hits:
            found = _hit_json(hit, keystore)
            found["proven"] = (hit.row.log_id, hit.row.seq) not in unproven
            click.echo(orjson.dumps(found).decode())
        for problem in result.problems:
            click.echo(orjson.dumps(_problem_json(problem)).decode())
    else:
        table = Table(show_lines=False)
        for column in ("time (UTC)", "user", "session", "model", "stop", "log/seq", "event_id",
                       "input"):  # fmt: skip
            table.add_column(column, overflow="fold")
        for hit in result.hits:
            rec = _opened(hit, keystore).record or {}
            table.add_row(
                _short(str(rec.get("timestamp", ""))[:19].replace("T", " ")),
                _short(rec.get("user_id"), 16),
                _short(rec.get("session_id"), 16),
                _short(rec.get("model"), 20),
                _short(rec.get("stop_reason"), 30),
                _short(f"{hit.row.log_id}/{hit.row.seq}", 90),
                _short(rec.get("event_id"), 40),
                _short(rec.get("input_text")),
            )
        console = Console(highlight=False, width=max(Console().width, 160))
        console.print(table)
        more = " (more: raise --limit)" if result.truncated else ""
        if verifiers is None:
            proof = "; none proven under a signed checkpoint (no verifier key: --public-key)"
        elif unproven:
            proof = f", {len(unproven)} of them not sealed yet (not proven)"
        else:
            proof = ", each proven under its log's signed checkpoint"
        click.echo(f"{len(result.hits)} records, each re-checked against the ledger{proof}{more}")
        for problem in result.problems:
            click.echo(problem.problem_line(), err=True)
    if result.problems:
        click.echo(
            f"tokentrail: {len(result.problems)} indexed records fail their re-check; run"
            " tokentrail verify, then tokentrail index --rebuild",
            err=True,
        )
        sys.exit(EXIT_INVALID)


def _show_counts(index: Index, filters: Filters, count_by: str, as_json: bool) -> None:
    """``search --count-by``: matching records per value of one field, from the index."""
    field_name, key_sql = COUNT_KEYS[count_by]
    where, params = filters.sql()
    counts = index.counts(key_sql, where, params)
    total = sum(n for _, n in counts)
    if as_json:
        for value, n in counts:
            click.echo(orjson.dumps({field_name: value, "records": n}).decode())
        return
    table = Table(show_lines=False)
    table.add_column(field_name, overflow="fold")
    table.add_column("records", justify="right")
    for value, n in counts:
        table.add_row(_short("(none)" if value is None else value, 90), f"{n:,}")
    Console(highlight=False).print(table)
    click.echo(
        f"{total:,} records in {len(counts):,} group{'' if len(counts) == 1 else 's'} by"
        f" {field_name}, counted from the search index (not re-read: tokentrail verify checks"
        " the ledger)"
    )


def _prove_hits(
    ledger: Path, index: Index, result: SearchResult, verifiers: list[Verifier] | None
) -> set[tuple[str, int]]:
    """Prove each hit under its log's signed checkpoint: a hit whose proof fails becomes a
    problem; returns the (log, seq) of the hits left that are not proven (not sealed yet, or
    no key)."""
    prover = LogProver(ledger, index, verifiers)
    kept: list[Checked] = []
    unproven: set[tuple[str, int]] = set()
    for hit in result.hits:
        inclusion = prover.check(hit)
        if inclusion.failed:
            result.problems.append(replace(hit, problem=inclusion.message))
            continue
        kept.append(hit)
        if not inclusion.proven:
            unproven.add((hit.row.log_id, hit.row.seq))
    result.hits = kept
    return unproven


def _checked_event(ledger: Path, index: Index, event_id: str) -> Checked:
    rows = index.by_event(event_id)
    if not rows:
        raise StoreError(f"no record with event_id {event_id} in {ledger}")
    checked = LeafReader(ledger).check(rows[0])
    return checked


@click.command("show")
@LEDGER_OPTION
@PUBLIC_KEY_OPTION
@EVENT_ID_ARGUMENT
@click.option("--ids", is_flag=True, help="List every token with its position, id or bytes.")
@COLOR_OPTION
@KEYSTORE_OPTION
def show_command(
    ledger: Path,
    public_keys: tuple[str, ...],
    event_id: str,
    ids: bool,
    color: bool | None,
    keystore: Path | None,
) -> None:
    """Show one exchange: metadata, tokens, timing, and whether it is proven in the log.

    Token boundaries are visible: alternating colours in a terminal, '|' between tokens
    otherwise (--no-color). The record is re-checked against the ledger, and its inclusion
    proof against the newest signed checkpoint is computed and checked with the verifier key.

    \b
    Example:
      tokentrail show 0b6e2c9e-6a5e-4f7e-9d0e-3f1a2b4c5d6e --public-key verifier.pub
      tokentrail show 0b6e2c9e-6a5e-4f7e-9d0e-3f1a2b4c5d6e --ids --no-color
    """
    verifiers = _optional_verifiers(public_keys)
    with _open_index(ledger) as index:
        checked = _checked_event(ledger, index, event_id)
        inclusion = prove_included(ledger, index, checked, verifiers)
    console = _console(color)
    checked = _opened(checked, keystore)
    print_all(console, render_show(checked, inclusion, color=console.is_terminal and
                                   not console.no_color, ids=ids))  # fmt: skip
    if not checked.ok or inclusion.failed:  # a key was given and the proof fails: exit 1
        sys.exit(EXIT_INVALID)


@click.command("session")
@LEDGER_OPTION
@click.argument("session_id")
@COLOR_OPTION
@KEYSTORE_OPTION
@PUBLIC_KEY_OPTION
def session_command(
    ledger: Path,
    session_id: str,
    color: bool | None,
    keystore: Path | None,
    public_keys: tuple[str, ...],
) -> None:
    """Show a conversation turn by turn, with what the model saw at each turn.

    Each turn lists the messages (or prompt) the model was sent — '+' marks those new since
    the previous turn, and an assistant message that is not a reply recorded in the session
    is flagged — then the model's reply. Every turn is re-checked against the ledger and
    proven under its log's signed checkpoint with the verifier key; a turn that fails is
    shown as FAIL (exit status 1).

    \b
    Example:
      tokentrail session 9f1c2d-support-chat --ledger /var/lib/tokentrail
    """
    verifiers = _optional_verifiers(public_keys)
    with _open_index(ledger) as index:
        result = search(ledger, index, Filters(session=session_id), None)
        unproven = _prove_hits(ledger, index, result, verifiers)
    turns = sorted(
        (_opened(c, keystore) for c in result.hits + result.problems),
        key=lambda c: (c.row.ts or 0, c.row.log_id, c.row.seq),
    )
    if not turns:
        raise StoreError(f"no records of session {session_id} in {ledger}")
    print_all(_console(color), render_session(session_id, turns))
    if verifiers is None:
        click.echo("not proven under a signed checkpoint: no verifier key (pass --public-key)")
    elif unproven:
        click.echo(f"{len(unproven)} turns not sealed yet (not proven)")
    if result.problems:
        sys.exit(EXIT_INVALID)


def witnessed_sizes(
    ledger: Path, state_dir: Path, verifiers: list[Verifier]
) -> dict[str, tuple[int, str]]:
    """Per log of ``ledger``, the largest checkpoint ``verify`` proved (under these keys) and
    when, from its witness state."""
    names = {v.name for v in verifiers}
    sizes: dict[str, tuple[int, str]] = {}
    for state in remembered_states(state_dir, store_key(ledger, VerifyOptions(verifiers))):
        name, _, log_id = state.origin.partition("/")
        if name in names and state.tree.size > sizes.get(log_id, (0, ""))[0]:
            sizes[log_id] = (state.tree.size, state.verified_at)
    return sizes


@click.command("export")
@LEDGER_OPTION
@PUBLIC_KEY_OPTION
@click.option("--user", required=True, help="The data subject's user_id.")
@SINCE_OPTION
@UNTIL_OPTION
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="jsonl",
    show_default=True,
    help="jsonl: a proof bundle per line; csv: a spreadsheet; html: one page for a person.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Package to write: a new directory, or a .zip file.",
)
@click.option(
    "--key",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="TOKENTRAIL_KEY",
    help="Signing key that signs the manifest (completeness)"
    " [default: ~/.config/tokentrail/signing.key if present].",
)
@click.option("--no-sign", is_flag=True, help="Do not sign the manifest.")
@KEYSTORE_OPTION
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="TOKENTRAIL_STATE",
    help="verify's witness state: a log it proved larger, or that is gone, stops the export"
    " [default: ~/.local/state/tokentrail/witness].",
)
@click.option(
    "--without-sealed-content",
    is_flag=True,
    help="Export sealed records without a --keystore: with their proofs and metadata, but"
    " none of their content.",
)
def export_command(
    ledger: Path,
    public_keys: tuple[str, ...],
    user: str,
    since: str | None,
    until: str | None,
    fmt: str,
    out: Path,
    key: Path | None,
    no_sign: bool,
    keystore: Path | None,
    state_dir: Path | None,
    without_sealed_content: bool,
) -> None:
    """Export a data subject's records with proofs (a DSAR package).

    The package holds every record of the user, each with its RFC 9162 inclusion proof
    against a signed checkpoint, the checkpoints, the verifier key, a manifest signed by the
    deployment's key, and a README explaining how to check it. It is a directory, or a zip
    when --out ends in .zip. The html format is one self-contained page a person can open.
    Only its owner can read what is written. Records sealed for erasure are opened with
    --keystore; without it, an export that would hold sealed records stops (exit 2), unless
    --without-sealed-content says that is what you want.

    \b
    Examples:
      tokentrail export --user alice --format html --out alice-dsar/
      tokentrail export --user alice --since 2025-01-01 --out alice-2025.zip
      tokentrail verify-export alice-2025.zip --public-key verifier.pub
    """
    if not user.strip():
        raise ConfigError("--user is empty: name the data subject whose records to export")
    start, end = parse_range(since, until)  # the arguments first, then the keys they need
    verifiers = resolve_verifiers(public_keys)
    signer: Signer | None = None
    if not no_sign:
        path = key or default_signing_key()
        if key is not None or path.exists():
            signer = Signer.load(path)
        else:
            click.echo(
                f"tokentrail: warning: no signing key at {path}; the manifest is not signed"
                " (pass --key to sign it)",
                err=True,
            )
    state = state_dir or default_state_dir()
    witnessed = witnessed_sizes(ledger, state, verifiers)
    if not witnessed:
        click.echo(
            f"tokentrail: warning: no witness state of tokentrail verify for {ledger} in"
            f" {state} (pass --state, the verifier's): a log deleted or cut short before this"
            " export would not be noticed; the package's README says so",
            err=True,
        )
    package = build_export(
        ledger,
        user,
        fmt=fmt,
        verifiers=verifiers,
        signer=signer,
        since=start,
        until=end,
        keystore=FileKeyStore(keystore) if keystore is not None else None,
        witnessed=witnessed,
    )
    if package.sealed and keystore is None and not without_sealed_content:
        raise ConfigError(
            f"{package.sealed} of the {package.records} records of user {user} are sealed, and"
            " without --keystore the package would hold none of their content; nothing was"
            " written (pass --keystore DIR, or --without-sealed-content)"
        )
    write_package(package, out)
    click.echo(
        f"exported {package.records} records of user {user} from {package.logs} logs to {out}"
        f" ({fmt}, manifest {'signed' if package.signed else 'not signed'})"
    )


@click.command("verify-export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    envvar="TOKENTRAIL_PUBLIC_KEY",
    help="Pin the operator's verifier key (name+id+key or a file) [default: the key inside"
    " the package, which shows only that the package agrees with itself].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--require-signed",
    is_flag=True,
    help="Fail a package whose manifest is not signed (its completeness then rests on nothing).",
)
def verify_export_command(
    path: Path, public_keys: tuple[str, ...], as_json: bool, require_signed: bool
) -> None:
    """Check a DSAR package with nothing else at hand; name any failing record.

    Checks every record's inclusion proof against its signed checkpoint, its content hashes,
    that it belongs to the subject, the manifest's list and signature, and that every readable
    field matches the proven record. Exit status 0 when valid, 1 when not, 2 when the
    package cannot be read at all.

    \b
    Examples:
      tokentrail verify-export alice-dsar/ --public-key verifier.pub --require-signed
      tokentrail verify-export alice-dsar.zip
      tokentrail verify-export alice-dsar/records.html --public-key 'name+1a2b3c4d+AX…'
    """
    pinned = resolve_verifiers(public_keys) if public_keys else None
    report = verify_export(path, pinned)
    if require_signed and not report.signed:
        report.problems.append(
            "the manifest is not signed (--require-signed): nothing proves the package complete"
        )
    if as_json:
        click.echo(
            orjson.dumps(
                {
                    "ok": report.ok,
                    "path": report.path,
                    "subject": report.subject,
                    "records": report.records,
                    "key_pinned": report.pinned,
                    "manifest_signed": report.signed,
                    "problems": report.problems,
                    "notes": report.notes,
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.ok else EXIT_INVALID)
