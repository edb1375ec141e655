"""The S3 commands: ``s3 init``, ``s3 check``, ``ship`` and ``cost`` — thin shells over the library.

Library errors propagate as :class:`~tokentrail._errors.TokentrailError`; the ``tokentrail``
command group prints them as one line (exit status 2).
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .._errors import ConfigError, StoreError
from .._main import log_to_stderr
from .._options import S3_ENDPOINT_ENV, FiniteFloatRange, retention_options
from .._paths import DEFAULT_LEDGER
from ._bucket import DEFAULT_DAYS, Retention, init_bucket, read_status
from ._client import ClientOptions, S3Url, check_bucket_name, make_client
from ._cost import MAX_TOKENS_PER_EXCHANGE, estimate, format_table
from ._keys import LAYOUTS
from ._shipper import DEFAULT_MAX_SPOOL_BYTES, Shipper, ShipperConfig

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``10G``, ``512MiB``, ``1000000`` -> bytes (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"{text!r} is not a size (e.g. 10G, 512M, 1000000)")
    scale = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * scale)


def _endpoint_options(f: Any) -> Any:
    f = click.option(
        "--endpoint-url",
        envvar=S3_ENDPOINT_ENV,
        help="S3-compatible endpoint (moto, MinIO) [env TOKENTRAIL_S3_ENDPOINT_URL].",
    )(f)
    return click.option("--region", envvar="AWS_REGION", help="AWS region [env AWS_REGION].")(f)


_retention_options = retention_options(
    "--mode",
    "--days",
    mode_help="Object Lock mode.",
    days_help="Object Lock retention in days (2555 = 7 years).",
)


@click.group("s3")
def s3_group() -> None:
    """Create and check the S3 bucket that holds the audit log (Object Lock, WORM).

    \b
    Examples:
      tokentrail s3 init --bucket acme-audit-logs --mode GOVERNANCE --days 2555
      tokentrail s3 check --bucket acme-audit-logs
    """


@s3_group.command("init")
@click.option("--bucket", required=True, help="Bucket name.")
@click.option("--prefix", default="", help="Key prefix the ledger will use (for the probe).")
@_retention_options
@_endpoint_options
@click.option(
    "--enable-on-existing",
    is_flag=True,
    help="If the bucket exists without Object Lock, turn on versioning and Object Lock for good.",
)
def init_command(
    bucket: str,
    prefix: str,
    mode: str,
    days: int,
    endpoint_url: str | None,
    region: str | None,
    enable_on_existing: bool,
) -> None:
    """Create the bucket with Object Lock and a default retention (the seed's step 3).

    \b
    Example:
      tokentrail s3 init --bucket acme-audit-logs --mode GOVERNANCE --days 2555
    Object Lock can only be turned on, never off; versioning stays on for good.
    """
    check_bucket_name(bucket)
    client = make_client(ClientOptions(endpoint_url=endpoint_url, region=region))
    retention = Retention(mode, days)  # type: ignore[arg-type]
    status, notes = init_bucket(
        client, bucket, retention, region=region, enable_on_existing=enable_on_existing
    )
    for note in notes:
        click.echo(note)
    for line in status.lines():
        click.echo(line)
    del prefix  # accepted for symmetry with `check`; the probe object lives under .tokentrail/


@s3_group.command("check")
@click.option("--bucket", required=True, help="Bucket name.")
@click.option("--prefix", default="", help="Key prefix the ledger uses.")
@_retention_options
@_endpoint_options
@click.option("--no-probe", is_flag=True, help="Do not test write access.")
def check_command(
    bucket: str,
    prefix: str,
    mode: str,
    days: int,
    endpoint_url: str | None,
    region: str | None,
    no_probe: bool,
) -> None:
    """Report the bucket's versioning, lock mode, retention and write access; exit 1 if unfit.

    \b
    Example:
      tokentrail s3 check --bucket acme-audit-logs --prefix prod
    """
    url = S3Url(check_bucket_name(bucket), prefix.strip("/"))
    client = make_client(ClientOptions(endpoint_url=endpoint_url, region=region))
    status = read_status(client, url, probe=not no_probe)
    for line in status.lines():
        click.echo(line)
    problems = status.problems(Retention(mode, days))  # type: ignore[arg-type]
    for problem in problems:
        click.echo(f"PROBLEM: {problem}")
    if problems:
        sys.exit(1)
    click.echo(f"OK: {url} can hold a tokentrail ledger")


@click.command("ship")
@click.option(
    "--ledger",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_LEDGER,
    show_default=True,
    envvar="TOKENTRAIL_LEDGER",
    help="Ledger directory [env TOKENTRAIL_LEDGER].",
)
@click.option("--s3", "s3_url", required=True, envvar="TOKENTRAIL_S3", help="s3://bucket/prefix")
@click.option("--once", is_flag=True, help="Ship what is closed now, then exit.")
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="batched",
    show_default=True,
    help="batched: one zstd object per log per segment; per-record: the seed's one object each.",
)
@_endpoint_options
@_retention_options
@click.option(
    "--interval",
    type=FiniteFloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between passes.",
)
@click.option(
    "--max-spool",
    default=str(DEFAULT_MAX_SPOOL_BYTES),
    show_default=True,
    help="Disk budget for data not yet in S3 (e.g. 10G); warns at 80%.",
)
@click.option("--log-id", "log_ids", multiple=True, help="Ship only these logs (repeatable).")
def ship_command(
    ledger: Path,
    s3_url: str,
    once: bool,
    layout: str,
    endpoint_url: str | None,
    region: str | None,
    mode: str,
    days: int,
    interval: float,
    max_spool: str,
    log_ids: tuple[str, ...],
) -> None:
    """Upload a local ledger's closed segments and checkpoints to S3 with Object Lock.

    \b
    Examples:
      tokentrail ship --ledger /var/lib/tokentrail --s3 s3://acme-audit-logs/prod
      tokentrail ship --once --layout per-record --s3 s3://audit-logs
    Each object is written once (If-None-Match), checksummed and locked; rerunning is safe.
    """
    log_to_stderr()
    config = ShipperConfig(
        root=ledger,
        url=S3Url.parse(s3_url),
        layout=layout,  # type: ignore[arg-type]
        retention=Retention(mode, days),  # type: ignore[arg-type]
        client=ClientOptions(endpoint_url=endpoint_url, region=region, attempts=1),
        max_spool_bytes=parse_size(max_spool),
        log_ids=log_ids or None,
    )
    shipper = Shipper(config)
    if once:
        report = shipper.ship_once()
        click.echo(report.summary())
        for item in report.waiting:
            click.echo(f"waiting: {item}")
        return
    try:
        shipper.check()
    except StoreError as exc:  # unreachable now: the loop retries with backoff
        logging.getLogger("tokentrail.s3").warning("cannot check %s yet: %s", config.url, exc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: shipper.request_stop())
    click.echo(f"shipping {ledger} to {config.url} every {interval:g}s (Ctrl-C to stop)", err=True)
    shipper.run(interval)


@click.command("cost")
@click.option(
    "--rps", type=FiniteFloatRange(min=0, max=1e9), required=True, help="Exchanges per second."
)
@click.option(
    "--tokens-per-exchange",
    type=click.IntRange(min=0, max=MAX_TOKENS_PER_EXCHANGE),
    default=1000,
    show_default=True,
    help="Input plus output tokens per exchange.",
)
@click.option(
    "--writers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Logs (proxy workers, SDK processes) writing at once.",
)
@click.option(
    "--segment-seconds",
    type=FiniteFloatRange(min=1),
    default=60.0,
    show_default=True,
    help="How often each writer closes a segment.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=DEFAULT_DAYS,
    show_default=True,
    help="Retention in days.",
)
def cost_command(
    rps: float, tokens_per_exchange: int, writers: int, segment_seconds: float, days: int
) -> None:
    """Monthly S3 PUTs, PUT cost and storage for each layout (the seed's "high write costs").

    \b
    Example:
      tokentrail cost --rps 100 --tokens-per-exchange 1500
    """
    sample, rows = estimate(
        rps,
        tokens_per_exchange,
        writers=writers,
        segment_seconds=segment_seconds,
        retention_days=days,
    )
    click.echo(format_table(rps, tokens_per_exchange, sample, rows, days))
