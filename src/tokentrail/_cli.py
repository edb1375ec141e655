"""The ``tokentrail`` command: a thin shell over the library.

Each command opens the library object, calls it, and turns library errors into one line on
stderr. Exit status: 0 success or a valid ledger, 1 an integrity violation, 2 could not run.
"""

from __future__ import annotations

import dataclasses
import errno
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson
from click.core import ParameterSource

from . import __version__
from ._audit import (
    export_command,
    index_command,
    search_command,
    session_command,
    show_command,
    verify_export_command,
)
from ._checkpoint import Signer, propose_key_name
from ._errors import ConfigError, KeyError_, StoreError, TokentrailError, VerificationError
from ._layout import list_log, list_logs, read_bytes, segment_bytes
from ._main import TERMINATED, Terminated, terminate
from ._options import (
    EARLIEST,
    EVENT_ID_ARGUMENT,
    EXIT_CANNOT_RUN,
    EXIT_INVALID,
    LEDGER_OPTION,
    PUBLIC_KEY_OPTION,
    S3_ENDPOINT_ENV,
    FiniteFloatRange,
    parse_range,
    progress_bar,
    resolve_verifiers,
    retention_options,
    silence,
)
from ._options import fail as _fail
from ._paths import default_signing_key
from ._proof import build_bundle, check_bundle
from ._proxy import serve_command
from ._s3._cli import cost_command, s3_group, ship_command
from ._sim import sim_command
from ._verify import VerifyOptions, default_state_dir, verify_local


def s3_options(func: Any) -> Any:
    """``--s3 s3://bucket/prefix`` (read the bucket instead of --ledger) and its client options."""
    for option in reversed(
        (
            click.option(
                "--s3",
                "s3_url",
                envvar="TOKENTRAIL_S3",
                help="Read this bucket (s3://bucket/prefix) instead of --ledger.",
            ),
            click.option(
                "--endpoint-url",
                envvar=S3_ENDPOINT_ENV,
                help="S3-compatible endpoint (moto, MinIO) [env TOKENTRAIL_S3_ENDPOINT_URL].",
            ),
            click.option("--region", envvar="AWS_REGION", help="S3 region."),
        )
    ):
        func = option(func)
    return func


def _client_options(endpoint_url: str | None, region: str | None) -> Any:
    from ._s3 import ClientOptions

    return ClientOptions(endpoint_url=endpoint_url, region=region)


#: Errors of writing the output (a full disk, a closed pipe), as against reading the ledger.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE, errno.EIO})


class _Main(click.Group):
    """The command group, printing every error as one line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        argv = args[0] if args else kwargs.get("args")
        as_json = "--json" in (sys.argv[1:] if argv is None else argv)

        def fail(message: str, code: int = EXIT_CANNOT_RUN) -> NoReturn:
            if as_json:  # a reader of --json gets JSON, whatever went wrong
                try:
                    click.echo(orjson.dumps({"ok": False, "exit_status": code, "error": message}))
                except OSError:
                    silence(sys.stdout)
            _fail(message, code)

        # A cron job's timeout or a shutdown ends a long verify with SIGTERM: it leaves a
        # line in the log, as Ctrl-C does (serve and sim set their own graceful handlers).
        # Run in-process (a test, a program calling main), the caller's handler comes back.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, terminate)
        try:
            return self._run(fail, *args, **kwargs)
        finally:
            if previous is not None and previous is not terminate:
                signal.signal(signal.SIGTERM, previous)

    def _run(self, fail: Callable[[str, int], NoReturn], *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return super().main(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a full disk or closed pipe shows here, not after exit
        except OSError as exc:
            if exc.errno not in _OUTPUT_ERRNOS:  # not mapped to a StoreError: still one line
                where = f" ({exc.filename})" if exc.filename else ""
                fail(f"{exc.strerror or exc}{where}", EXIT_CANNOT_RUN)
            silence(sys.stdout)  # the output could not be written: the result is not known
            _fail(f"cannot write the output: {exc.strerror or exc}")
        except click.exceptions.Abort:
            fail("aborted", EXIT_CANNOT_RUN)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # the help page, not an error line
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_CANNOT_RUN)
        except click.ClickException as exc:
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and ctx is not None:
                hint = f" (see: {ctx.command_path} --help)"
            fail(exc.format_message() + hint, EXIT_CANNOT_RUN)
        except TokentrailError as exc:
            fail(str(exc), EXIT_CANNOT_RUN)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Terminated:
            fail(TERMINATED, 128 + signal.SIGTERM)


#: The README's cron line: one line (crontab has no continuation lines).
DAILY_CHECK = (
    "0 6 * * * tokentrail verify --ledger /var/lib/tokentrail"
    " --public-key /etc/tokentrail/verifier.pub --days 1"
    " >> /var/log/audit-validation.log 2>&1"
)


@click.group(
    cls=_Main,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=f"""tokentrail: a token-level, tamper-evident audit trail of every exchange with an LLM.

    \b
    Quick start (no Ollama, no AWS needed):
      tokentrail demo
    The daily check, a crontab line (the verifier key pinned; see deploy/ for /etc/cron.d):
      {DAILY_CHECK}
    """,
)
@click.version_option(__version__, prog_name="tokentrail")
def main() -> None:
    """The command group (its help is above)."""


@main.command()
@click.option("--name", help="Key name (unique to this deployment) [default: proposed].")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Private key file to write (mode 0600) [default: ~/.config/tokentrail/signing.key].",
)
def keygen(name: str | None, out: Path | None) -> None:
    """Create the deployment's Ed25519 signing key and print its verifier key.

    \b
    Example:
      tokentrail keygen --name acme-prod-audit
    The verifier key is also written beside the private key as verifier.pub; publish it to
    auditors. The private key never goes inside a ledger.
    """
    key_path = out or default_signing_key()
    if key_path.exists():
        raise KeyError_(f"{key_path} already exists; refusing to overwrite a signing key")
    signer, _ = Signer.load_or_create(key_path, propose_key_name() if name is None else name)
    pub_path = key_path.with_name("verifier.pub")
    click.echo(f"wrote signing key {key_path} (mode 0600) and {pub_path}", err=True)
    click.echo(signer.verifier.to_text())


@main.command()
@LEDGER_OPTION
@PUBLIC_KEY_OPTION
@click.option("--days", type=click.IntRange(min=1), help="Check records of the last N days.")
@click.option("--since", help="Check records from this time (YYYY-MM-DD or RFC 3339).")
@click.option("--until", help="Check records before this time (YYYY-MM-DD or RFC 3339).")
@click.option("--all", "full", is_flag=True, help="Re-read every log from seq 0.")
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="TOKENTRAIL_STATE",
    help="Witness state directory [default: ~/.local/state/tokentrail/witness].",
)
@click.option("--require-sealed", is_flag=True, help="Treat any unsealed record as a finding.")
@click.option(
    "--seal-grace",
    type=FiniteFloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds an unsealed record may be young before it is a finding.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
@s3_options
@retention_options(
    "--retention-mode",
    "--retention-days",
    mode_help="With --s3: the Object Lock mode every object must have.",
    days_help="With --s3: the least retention every object must have.",
)
def verify(
    ledger: Path,
    public_keys: tuple[str, ...],
    days: int | None,
    since: str | None,
    until: str | None,
    full: bool,
    state_dir: Path | None,
    require_sealed: bool,
    seal_grace: float,
    as_json: bool,
    s3_url: str | None,
    endpoint_url: str | None,
    region: str | None,
    retention_mode: str,
    retention_days: int,
) -> None:
    """Verify a ledger: hashes, chain, checkpoints, and consistency with the last run.

    Exit status 0 when valid, 1 on any integrity violation, 2 when it could not run.
    Prints one line per finding or warning, then one summary line, last (the verdict that
    `tail -1` of a cron log reads).

    \b
    Examples:
      tokentrail verify --ledger ./tokentrail-ledger --public-key verifier.pub
      tokentrail verify --public-key /etc/tokentrail/verifier.pub --days 1 \\
          >> /var/log/audit-validation.log 2>&1
    """
    if days is not None and since is not None:
        raise ConfigError("give --days or --since, not both")
    now = datetime.now(UTC)
    since_at, until_at = parse_range(since, until)
    if days is not None:
        since_at = max(EARLIEST, now - timedelta(days=min(days, (now - EARLIEST).days + 1)))
        if until_at is not None and since_at >= until_at:
            raise ConfigError(f"--days {days} ends before --until {until}: the range is empty")
    options = VerifyOptions(
        verifiers=resolve_verifiers(public_keys),
        since=since_at,
        until=until_at,
        full=full,
        require_sealed=require_sealed,
        seal_grace_s=seal_grace,
        state_dir=state_dir or default_state_dir(),
        now=now,
    )
    if s3_url:
        from ._s3 import Retention, verify_s3

        report = verify_s3(
            s3_url,
            options,
            client_options=_client_options(endpoint_url, region),
            retention=Retention(retention_mode, retention_days),  # type: ignore[arg-type]
        )
    else:
        with progress_bar("verifying", segment_bytes(ledger)) as step:
            report = verify_local(ledger, dataclasses.replace(options, progress=step))
    # Done, its outcome noted in the state: a SIGTERM now would print "terminated" and exit 143
    # after (or instead of) the verdict, for a run that finished; let it print the verdict.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if as_json:
        click.echo(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        # SPEC section 4: a line per finding or warning, then the summary line, last (what a
        # cron log's reader, or `tail -1`, takes as the run's result).
        for item in report.findings + report.warnings:
            click.echo(item.to_line())
        suppressed = sum(lg.suppressed for lg in report.logs)
        if suppressed:
            click.echo(f"FINDING: {suppressed} more findings not shown")
        click.echo(report.summary())
    sys.exit(0 if report.ok else EXIT_INVALID)


@main.command()
@LEDGER_OPTION
@click.option(
    "--date",
    "day",
    default="today",
    show_default=True,
    help="UTC day (YYYY-MM-DD or 'today') whose appended records to count.",
)
@click.option("--min", "minimum", type=int, default=None, help="Exit 1 if fewer records than this.")
@s3_options
def count(
    ledger: Path,
    day: str,
    minimum: int | None,
    s3_url: str | None,
    endpoint_url: str | None,
    region: str | None,
) -> None:
    """Count the records appended on one UTC day (the seed's verification step).

    A quick count that reads no record: the stored lines of that day's segments (with --s3,
    the key names alone). It does not check what it counts; verify does that. The day is the
    one a segment was started on, not the records' own timestamps (a record given an earlier
    time through the SDK counts on the day it was appended); to count by timestamp, and by
    user, model or stop reason, use search --since/--until --count-by day (or user, …).

    \b
    Example:
      tokentrail count --date today --min 1
    """
    if day == "today":
        day = datetime.now(UTC).strftime("%Y-%m-%d")
    try:
        datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"--date {day!r} is not YYYY-MM-DD or 'today'") from None
    total = 0
    if s3_url:
        from ._s3 import count_s3

        total = count_s3(s3_url, day, client_options=_client_options(endpoint_url, region))
    for log_id in [] if s3_url else list_logs(ledger):
        for seg in list_log(ledger, log_id).segments:
            if seg.date == day:
                total += read_bytes(seg.path).count(b"\n")
    click.echo(str(total))
    if minimum is not None and total < minimum:
        click.echo(f"tokentrail: {total} records on {day}, fewer than --min {minimum}", err=True)
        sys.exit(EXIT_INVALID)


@main.command()
@LEDGER_OPTION
@EVENT_ID_ARGUMENT
@click.option("--tree-size", type=click.IntRange(min=1), help="Prove against this checkpoint.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the proof bundle here [default: stdout].",
)
@s3_options
def prove(
    ledger: Path,
    event_id: str,
    tree_size: int | None,
    out: Path | None,
    s3_url: str | None,
    endpoint_url: str | None,
    region: str | None,
) -> None:
    """Prove one record's inclusion in a signed checkpoint (RFC 9162 section 2.1.3).

    \b
    Example:
      tokentrail prove 0b6e2c9e-6a5e-4f7e-9d0e-3f1a2b4c5d6e --out proof.json
      tokentrail verify-proof proof.json --public-key verifier.pub
    """
    try:
        if s3_url:
            from ._s3 import prove_s3

            client = _client_options(endpoint_url, region)
            bundle = prove_s3(s3_url, event_id, tree_size, client_options=client)
        else:
            bundle = build_bundle(ledger, event_id, tree_size)
    except VerificationError as exc:
        _fail(f"cannot prove {event_id}: {exc}", EXIT_INVALID)
    data = orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n"
    if out is None:
        click.echo(data.decode(), nl=False)
    else:
        try:
            out.write_bytes(data)
        except OSError as exc:
            raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from exc
        click.echo(f"wrote inclusion proof of {event_id} to {out}", err=True)


@main.command("verify-proof")
@click.argument("bundle_path", type=click.Path(path_type=Path, dir_okay=False))
@PUBLIC_KEY_OPTION
def verify_proof(bundle_path: Path, public_keys: tuple[str, ...]) -> None:
    """Check an inclusion proof bundle with nothing but the verifier key.

    \b
    Examples:
      tokentrail verify-proof proof.json --public-key verifier.pub
      tokentrail prove EVENT_ID | tokentrail verify-proof - --public-key verifier.pub
    """
    try:
        raw = sys.stdin.buffer.read() if str(bundle_path) == "-" else bundle_path.read_bytes()
        bundle = orjson.loads(raw)
    except OSError as exc:
        raise ConfigError(f"cannot read {bundle_path}: {exc.strerror}") from exc
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{bundle_path} is not JSON") from exc
    verifiers = resolve_verifiers(public_keys)
    try:
        record = check_bundle(bundle, verifiers)
    except VerificationError as exc:
        click.echo(f"INVALID: {bundle_path}: {exc}")
        sys.exit(EXIT_INVALID)
    click.echo(
        f"OK: record {record.get('event_id')} is seq {record.get('seq')} of log"
        f" {record.get('log_id')}, included in the signed checkpoint of size"
        f" {bundle.get('tree_size')}"
    )


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to put the demo's keys and ledger [default: a new temporary directory].",
)
@click.option("--exchanges", type=click.IntRange(min=3), default=36, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def demo(directory: Path | None, exchanges: int, no_progress: bool) -> None:
    """Run the whole product end to end: simulator, proxy, official clients, ledger, verify.

    No Ollama, no AWS and no network needed.

    \b
    Example:
      tokentrail demo --dir ./demo --exchanges 60
    """
    from ._demo import demo_main

    sys.exit(0 if demo_main(directory, exchanges, not no_progress) else EXIT_INVALID)


@main.command()
@click.option("--user", "user_id", required=True, help="The data subject (user_id) to erase.")
@click.option(
    "--keystore",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    envvar="TOKENTRAIL_KEYSTORE",
    help="The key store the writers seal content with [env TOKENTRAIL_KEYSTORE].",
)
@LEDGER_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def forget(user_id: str, keystore: Path, ledger: Path, yes: bool) -> None:
    """Erase a data subject's content by destroying their key (crypto-shredding).

    The records stay, with every hash, so the ledger still verifies; their content can no
    longer be decrypted by anyone. The search index (rebuildable) is dropped with it.
    Exports made earlier are outside the ledger's reach. From then on, proxies sealing with
    this key store refuse the user's requests (403) before they reach the model, since
    nothing of theirs can be recorded. Records written without a key store are not sealed,
    and this cannot erase them: it counts them in --ledger, and exits 1 when there are any.

    \b
    Example:
      tokentrail forget --user alice@example.com --keystore /var/lib/tokentrail-keys
    """
    from ._erasure import FileKeyStore, unsealed_records
    from ._erasure import forget as do_forget

    if not user_id.strip():
        raise ConfigError(
            "--user is empty: name the data subject to erase (records with no user_id are a"
            " subject of their own, never erased by an empty name)"
        )
    present = ledger.is_dir()
    given = click.get_current_context().get_parameter_source("ledger")
    if not present and given not in (None, ParameterSource.DEFAULT):
        raise ConfigError(
            f"--ledger {ledger} is not a directory; nothing was erased (name the ledger whose"
            " search index is to be dropped with the key, or leave --ledger out)"
        )
    plain = unsealed_records(ledger, user_id) if present else 0
    left = (
        f"{plain} record{'s' if plain != 1 else ''} of {user_id} in {ledger}"
        f" {'were' if plain != 1 else 'was'} written without a key store: not sealed, the"
        " content stays readable, and cannot be erased from the append-only log"
    )
    if not yes:
        click.confirm(f"Destroy the content key of {user_id!r} for good?", abort=True)
    try:
        when = do_forget(FileKeyStore(keystore), user_id, ledger if present else None)
    except StoreError as exc:
        if not plain:
            raise
        raise StoreError(f"{exc}; {left}") from exc
    click.echo(f"erased: the content key of {user_id} was destroyed at {when}")
    if not present:
        click.echo(
            f"tokentrail: warning: no ledger at {ledger}, so no search index was dropped; delete"
            " the index/ folder of the ledger holding these records (it is rebuilt without"
            " their text)",
            err=True,
        )
    if plain:
        click.echo(f"tokentrail: warning: {left}", err=True)
        sys.exit(EXIT_INVALID)


main.add_command(sim_command, "sim")
main.add_command(s3_group, "s3")
main.add_command(ship_command, "ship")
main.add_command(cost_command, "cost")
main.add_command(serve_command, "serve")

for _command in (
    index_command,
    search_command,
    show_command,
    session_command,
    export_command,
    verify_export_command,
):
    main.add_command(_command)
