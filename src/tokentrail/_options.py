"""Options and helpers shared by every ``tokentrail`` command module."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click

from ._checkpoint import Verifier, load_verifiers
from ._errors import ConfigError
from ._paths import DEFAULT_LEDGER, default_verifier_key
from ._record import is_event_id
from ._s3._bucket import DEFAULT_DAYS, DEFAULT_MODE, LOCK_MODES

EXIT_INVALID = 1
EXIT_CANNOT_RUN = 2


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (which pass its bounds)."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):  # first: "inf is out of range" would say less
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


LEDGER_OPTION = click.option(
    "--ledger",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_LEDGER,
    show_default=True,
    envvar="TOKENTRAIL_LEDGER",
    help="Ledger directory [env TOKENTRAIL_LEDGER].",
)
PUBLIC_KEY_OPTION = click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    envvar="TOKENTRAIL_PUBLIC_KEY",
    help="Verifier key (name+id+key) or a file of them; repeat for rotated keys"
    " [default: the keygen verifier.pub; env TOKENTRAIL_PUBLIC_KEY].",
)


def _event_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An event id argument, lowercased; a value that is no UUID is a usage error."""
    lowered = value.strip().lower()
    if not is_event_id(lowered):
        raise click.BadParameter(
            f"{value!r} is not an event id: a record's event_id is a UUID such as"
            " 0b6e2c9e-6a5e-4f7e-9d0e-3f1a2b4c5d6e (tokentrail search lists them)"
        )
    return lowered


EVENT_ID_ARGUMENT = click.argument("event_id", callback=_event_id)

#: Every command that talks to S3 reads its endpoint from the first of these that is set (the
#: second is the name ``serve``, ``verify``, ``count`` and ``prove`` used before 2026-11-27).
S3_ENDPOINT_ENV = ["TOKENTRAIL_S3_ENDPOINT_URL", "TOKENTRAIL_S3_ENDPOINT"]


def retention_options(
    mode: str,
    days: str,
    *,
    mode_help: str | None = None,
    days_help: str | None = None,
    envvar: str | None = None,
) -> Callable[[Any], Any]:
    """An Object Lock mode option and a retention-days option (``envvar``: a prefix, ``_MODE``
    and ``_DAYS`` appended), with the one set of modes and defaults every command shares."""

    def decorate(f: Any) -> Any:
        f = click.option(
            days,
            type=click.IntRange(min=1),
            default=DEFAULT_DAYS,
            show_default=True,
            envvar=f"{envvar}_DAYS" if envvar else None,
            help=days_help,
        )(f)
        return click.option(
            mode,
            type=click.Choice(LOCK_MODES),
            default=DEFAULT_MODE,
            show_default=True,
            envvar=f"{envvar}_MODE" if envvar else None,
            help=mode_help,
        )(f)

    return decorate


def fail(message: str, code: int = EXIT_CANNOT_RUN) -> NoReturn:
    """Print one line to stderr and exit with ``code``, even when stderr cannot take the line
    (a full disk under a cron log): its write would raise, and the traceback exit 1."""
    try:
        click.echo(f"tokentrail: error: {message}", err=True)
    except OSError:
        silence(sys.stderr)
    sys.exit(code)


def silence(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at /dev/null, dropping what its buffer holds, so the
    interpreter's last flush of it succeeds (a failed one would change the exit status)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
        stream.flush()  # what the failed write left buffered goes to /dev/null now


def resolve_verifiers(specs: tuple[str, ...]) -> list[Verifier]:
    """The verifier keys named, or the default keygen one."""
    if not specs:
        default = default_verifier_key()
        if not default.exists():
            raise ConfigError(
                "no verifier key: pass --public-key KEY_OR_FILE (keygen prints it), or create"
                f" one with `tokentrail keygen` ({default})"
            )
        specs = (str(default),)
    return load_verifiers(specs)


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)


def parse_moment(value: str, option: str) -> datetime:
    """An RFC 3339 time or a YYYY-MM-DD date, as aware UTC."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{option} {value!r} is not a date (YYYY-MM-DD) or RFC 3339 time"
        ) from None
    try:
        moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:  # an offset that steps past year 1 or 9999
        return EARLIEST if moment.year < 5000 else LATEST
    # Records are stamped in this era: a bound beyond it (0001-01-01 for "everything") means
    # the same as the era's edge, which date arithmetic can step past without overflowing.
    return min(max(moment, EARLIEST), LATEST)


def parse_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """``--since``/``--until`` as aware UTC times, refusing a range that holds no moment."""
    start = parse_moment(since, "--since") if since else None
    end = parse_moment(until, "--until") if until else None
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"--since {since} is not before --until {until}: the range is empty")
    return start, end


@contextlib.contextmanager
def progress_bar(what: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A transient progress bar in bytes on stderr, when stderr is a terminal (never in a cron
    log) and there is something to read; yields its ``advance`` (or None)."""
    if total <= 0 or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)
