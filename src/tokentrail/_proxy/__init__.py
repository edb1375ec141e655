"""``tokentrail serve``: the auditing reverse proxy, as a library and as a click command.

::

    ProxyConfig ──► Proxy.start() ──► (serving) ──► Proxy.close()      programmatic
    serve_command ──► run(config) ──► serve(config) ──► the same Proxy   CLI

``Proxy.start`` opens the ledger (loading, or creating, the signing key), the upstream session
and the listening socket; ``Proxy.close`` stops accepting, lets in-flight exchanges finish for
``shutdown_grace_s`` (what is still running then is recorded as ``interrupted``), and closes the
ledger, which seals a final checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import click
import orjson
from aiohttp import web

from .._checkpoint import Signer
from .._erasure import FileKeyStore, Sealer
from .._errors import ConfigError, StoreError, TokentrailError
from .._layout import iter_lines, list_log
from .._ledger import AsyncLedger, LedgerConfig
from .._main import log_to_stderr
from .._metrics import Metrics
from .._options import S3_ENDPOINT_ENV, FiniteFloatRange, retention_options
from .._s3._bucket import DEFAULT_DAYS
from .._verify import LAST_RUN_FILE, default_state_dir
from ._config import (
    DEFAULT_LEDGER,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY,
    DEFAULT_UPSTREAM,
    DEFAULT_UPSTREAM_TIMEOUT,
    ProxyConfig,
    api_key_table,
    load_api_keys,
    load_toml,
    parse_listen,
)
from ._server import UPSTREAM_SKIP_AUTO_HEADERS, ProxyApp
from ._upstream import Pool

log = logging.getLogger("tokentrail.proxy")
#: A restarted proxy links retries to first attempts recorded this many UTC days back (today
#: included).
RETRY_DAYS = 2
#: ... and from at most this many bytes of its newest segments.
RETRY_SCAN_BYTES = 256 << 20
#: How long a starting proxy waits for S3 to answer its bucket check before serving anyway.
S3_STARTUP_CHECK_S = 15.0


def load_or_create_key(path: Path) -> tuple[Signer, bool]:
    """The signing key at ``path``, generated there (with verifier.pub) when missing."""
    return Signer.load_or_create(path)


class Proxy:
    """One running proxy: ledger, upstream session, listening socket."""

    def __init__(self, config: ProxyConfig, *, ledger: AsyncLedger | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self._own_ledger = ledger is None
        self.signer: Signer | None = None
        self.key_created = False
        self.session: aiohttp.ClientSession | None = None
        self.pool: Pool | None = None
        self.runner: web.ServerRunner | None = None
        self.app: ProxyApp | None = None
        self.url = ""
        self.metrics = Metrics()
        self.metrics_runner: web.AppRunner | None = None
        self.shipper: Any = None
        self.metrics_url = ""

    async def start(self) -> str:
        """Open everything and start listening; returns the base URL (``http://host:port``).

        On failure (a port in use, say) what was opened is closed again and the error raised.
        """
        try:
            return await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise

    async def _start(self) -> str:
        metrics_at = (
            parse_listen(self.config.metrics_listen, "--metrics-listen")
            if self.config.metrics_listen
            else None
        )
        _check_free(self.config.host, self.config.port, "--listen")
        if metrics_at is not None:
            _check_free(*metrics_at, "--metrics-listen")
        if self.ledger is None:
            self.signer, self.key_created = load_or_create_key(self.config.key_path)
            self.ledger = await AsyncLedger.open(
                LedgerConfig(
                    root=self.config.ledger,
                    log_id=self.config.effective_log_id,
                    signer=self.signer,
                    durability=self.config.durability,
                    seal_interval_s=self.config.seal_interval_s,
                    # SPEC section 3: on S3, writers rotate every minute (one object a minute).
                    rotate_interval_s=self.config.s3_rotate_s if self.config.s3_url else None,
                    sealer=None
                    if self.config.keystore is None
                    else Sealer(FileKeyStore(self.config.keystore)),
                )
            )
        if self.config.s3_url:
            self.shipper = self._make_shipper()
            await self._check_bucket()
            self.shipper.start(self.config.s3_interval_s)  # its first pass ships any backlog
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            # The upstream sees the client's headers, not aiohttp's defaults: an added
            # "Accept-Encoding: gzip" would bring compressed bytes to a client that never asked.
            skip_auto_headers=UPSTREAM_SKIP_AUTO_HEADERS,
        )
        self.metrics = Metrics()
        writer = self.ledger.writer
        self.metrics.track_ledger(lambda: writer.size, lambda: writer.signed_size)
        self.metrics.track_verify((self.config.verify_state or default_state_dir()) / LAST_RUN_FILE)
        if self.shipper is not None:
            shipper = self.shipper
            self.metrics.track_shipper(
                lambda: shipper.unshipped_bytes,
                lambda: shipper.last_report is not None and shipper.last_error is None,
                lambda: float("nan") if shipper.last_success is None else shipper.last_success,
            )
        self.pool = Pool(
            self.config.upstream,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.upstream_timeout,
        )
        self.app = ProxyApp(self.config, self.ledger, self.session, self.pool, self.metrics)
        self.metrics.track_refusal(self.app.refusal)
        await asyncio.to_thread(
            self.app.retries.remember,
            keyed_records(self.config.ledger, self.ledger.writer.config.log_id, RETRY_DAYS),
        )
        self.runner = web.ServerRunner(
            self.app.server(
                access_log=None,
                handler_cancellation=False,
                auto_decompress=False,  # relay bodies as sent; audited paths refuse encodings
            ),
            shutdown_timeout=self.config.shutdown_grace_s,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port, reuse_address=True)
        await _listen(site, "--listen")
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        if metrics_at is not None:
            mhost, mport = metrics_at
            self.metrics_runner = web.AppRunner(self.metrics.app(), access_log=None)
            await self.metrics_runner.setup()
            metrics_site = web.TCPSite(self.metrics_runner, mhost, mport, reuse_address=True)
            await _listen(metrics_site, "--metrics-listen")
            h, p = self.metrics_runner.addresses[0][:2]
            self.metrics_url = f"http://{'[' + h + ']' if ':' in h else h}:{p}/metrics"
        return self.url

    async def close(self) -> None:
        """Drain in-flight exchanges, then close the session and the ledger (final seal)."""
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None
        if self.runner is not None:
            # aiohttp waits the grace for handlers to finish, then cancels each request and
            # waits as long again for its handler, which goes on relaying the upstream: so
            # the exchanges still running after the grace are cancelled here, and each
            # records itself as interrupted, so the proxy stops within the grace (and a bit).
            cleanup = asyncio.ensure_future(self.runner.cleanup())
            done, _ = await asyncio.wait({cleanup}, timeout=self.config.shutdown_grace_s)
            if not done and self.app is not None:
                for task in list(self.app.in_flight):
                    task.cancel()
            await cleanup
            self.runner = None
        if self.session is not None:
            if self.app is not None:
                self.app.digests.cancel()
            await self.session.close()
            self.session = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        try:
            if self.ledger is not None and self._own_ledger:
                ledger, self.ledger = self.ledger, None
                await ledger.close()  # raises if its writer stopped on an error
        finally:
            if self.shipper is not None:  # after the ledger's final seal: ship it all
                shipper, self.shipper = self.shipper, None
                grace = self.config.shutdown_grace_s
                await asyncio.to_thread(shipper.stop, grace)
                if shipper.running:
                    log.warning(
                        "S3 did not take the last records within %.0fs;"
                        " they are sealed in the local spool and ship at the next start (or"
                        " with tokentrail ship)",
                        grace,
                    )

    async def _check_bucket(self) -> None:
        """Refuse a bucket that is wrong for good (no Object Lock, none at all, no access)
        before listening; an S3 that does not answer (down, hung) is the outage the local
        spool is for, so the proxy starts and its shipper keeps trying."""
        check = asyncio.create_task(asyncio.to_thread(self.shipper.check))
        check.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved
        try:
            await asyncio.wait_for(asyncio.shield(check), S3_STARTUP_CHECK_S)
        except ConfigError:
            raise
        except (TokentrailError, TimeoutError) as exc:
            reason = str(exc) or f"no answer in {S3_STARTUP_CHECK_S:.0f}s"
            log.warning(
                "cannot check %s yet (%s): serving, with records kept in"
                " the local spool; the shipper checks the bucket and ships once S3 answers",
                self.config.s3_url,
                reason,
            )

    def _make_shipper(self) -> Any:
        from .._s3 import ClientOptions, Retention, S3Url, Shipper, ShipperConfig

        config = self.config
        assert config.s3_url is not None
        return Shipper(
            ShipperConfig(
                root=config.ledger,
                url=S3Url.parse(config.s3_url),
                layout=config.s3_layout,
                retention=Retention(config.s3_retention_mode, config.s3_retention_days),
                client=ClientOptions(endpoint_url=config.s3_endpoint_url, attempts=1),
                log_ids=(config.effective_log_id,),
            )
        )

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def keyed_records(
    root: Path, log_id: str, days: int, budget: int = RETRY_SCAN_BYTES
) -> Iterator[dict[str, Any]]:
    """The records of the last ``days`` UTC days of a log that carry an Idempotency-Key, from
    at most its newest ``budget`` bytes of segments (a start-up never reads a busy log whole)."""
    since = (datetime.now(UTC) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
    recent = []
    for seg in reversed(list_log(root, log_id).segments):
        if seg.date < since or budget <= 0:
            break
        recent.append(seg)
        with contextlib.suppress(OSError):
            budget -= seg.path.stat().st_size
    for seg in reversed(recent):
        try:
            for _, line, complete in iter_lines(seg.path):
                if not complete:
                    break
                if b'"idempotency_key"' not in line:
                    continue
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if isinstance(record, dict):
                        yield record
        except StoreError as exc:  # verify names the damage; the proxy serves all the same
            log.warning("retries not linked past %s", exc)


def _check_free(host: str, port: int, option: str) -> None:
    """Refuse an address taken by another process before the ledger is opened (so that a
    mistake leaves no log behind); the bind itself is checked again by :func:`_listen`."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot resolve {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"{option}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc


async def _listen(site: web.TCPSite, option: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot listen on {site.name}: {exc.strerror or exc}") from exc


@contextlib.asynccontextmanager
async def running_proxy(
    config: ProxyConfig, *, ledger: AsyncLedger | None = None
) -> AsyncIterator[Proxy]:
    """``async with running_proxy(config) as proxy:`` — ``proxy.url`` is its base URL."""
    proxy = Proxy(config, ledger=ledger)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def serve(config: ProxyConfig, *, announce: bool = True) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def stopping(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopping, sig)
    proxy = Proxy(config)
    await proxy.start()
    try:
        if announce:
            assert proxy.signer is not None
            if proxy.key_created:
                click.echo(f"tokentrail: created signing key {config.key_path}", err=True)
            click.echo(f"tokentrail: verifier key {proxy.signer.verifier.to_text()}", err=True)
            click.echo(
                f"tokentrail: ledger {config.ledger} log {config.effective_log_id}"
                f" ({config.durability}), upstream {config.upstream}"
                + (f", shipping to {config.s3_url}" if config.s3_url else ""),
                err=True,
            )
            if proxy.metrics_url:
                click.echo(f"tokentrail: metrics on {proxy.metrics_url}", err=True)
            click.echo(f"tokentrail: listening on {proxy.url}", err=True)
        await stop.wait()
    finally:
        writer = proxy.ledger.writer if proxy.ledger is not None else None
        if announce and received:
            running = len(proxy.app.in_flight) if proxy.app is not None else 0
            click.echo(
                f"tokentrail: {received[0].name} received: stopping; {running} request"
                f"{'' if running == 1 else 's'} in flight (up to {config.shutdown_grace_s:g}s"
                " to finish, then recorded as interrupted)",
                err=True,
            )
        await proxy.close()
        if announce and writer is not None:
            click.echo(
                f"tokentrail: stopped; log {writer.config.log_id} holds {writer.size} records,"
                f" {writer.signed_size} sealed",
                err=True,
            )


def run(config: ProxyConfig) -> None:
    """Blocking :func:`serve`, for the CLI: on uvloop when it is installed (less CPU a request)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


# -- the click command --------------------------------------------------------------------------


def _setting_names(command: click.Command) -> dict[str, str]:
    """Every name a config file may give an option by: the option's own (``s3``,
    ``s3-rotate-seconds``), dashes or underscores, and its parameter's (``s3_url``)."""
    names: dict[str, str] = {}
    for param in command.params:
        if not param.name or param.name == "config":
            continue
        names[param.name] = param.name
        for opt in param.opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = param.name
    return names


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: TOML values become defaults under the options and env vars.

    The ``api-keys`` setting (a file) and an ``[api_keys]`` table may both be given: their keys
    are merged. A setting given twice (``log-id`` and ``log_id``) is refused, as is one that is
    no option's (a typo must not leave the proxy on its defaults, silently).
    """
    if value is None:
        return None
    try:
        raw = load_toml(Path(value))
    except TokentrailError as exc:
        raise click.BadParameter(str(exc)) from exc
    names = _setting_names(ctx.command)
    data: dict[str, Any] = {}
    unknown = []
    for key, setting in raw.items():
        spelled = str(key).replace("-", "_")
        if spelled == "api_keys" and isinstance(setting, dict):
            ctx.meta["tokentrail.api_key_table"] = setting
            continue
        name = names.get(spelled)
        if name is None:
            unknown.append(str(key))
        elif name in data:
            raise click.BadParameter(f"{value}: {key} is given twice (under two spellings)")
        else:
            data[name] = setting
    if unknown:
        raise click.BadParameter(f"{value}: unknown setting(s) {', '.join(sorted(unknown))}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


@click.command(
    "serve",
    epilog="""\b
Examples:
  tokentrail serve
  tokentrail serve --upstream http://gpu:11434 --listen 0.0.0.0:11435 --ledger /var/lib/tt
  tokentrail serve --upstream http://127.0.0.1:8000 --request-token-data ids   # vLLM
  TOKENTRAIL_UPSTREAM=http://127.0.0.1:8080 tokentrail serve --config /etc/tokentrail.toml
  OLLAMA_HOST=http://127.0.0.1:11435 ollama run llama3.2      # point clients at the proxy
""",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    envvar="TOKENTRAIL_CONFIG",
    help="TOML file with the same option names (and an [api_keys] table).",
)
@click.option(
    "--upstream",
    default=DEFAULT_UPSTREAM,
    show_default=True,
    envvar="TOKENTRAIL_UPSTREAM",
    help="Base URL of the Ollama or OpenAI-compatible server.",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    envvar="TOKENTRAIL_LISTEN",
    help="HOST:PORT to listen on (port 0: any free port).",
)
@click.option(
    "--ledger",
    default=DEFAULT_LEDGER,
    show_default=True,
    envvar="TOKENTRAIL_LEDGER",
    type=click.Path(file_okay=False),
    help="Local ledger directory.",
)
@click.option(
    "--key",
    default=None,
    envvar="TOKENTRAIL_KEY",
    type=click.Path(dir_okay=False),
    help="Signing key file; created if missing [default: ~/.config/tokentrail/signing.key].",
)
@click.option(
    "--log-id",
    default=None,
    envvar="TOKENTRAIL_LOG_ID",
    help="This writer's log id, unique within the store (proxies that share a bucket need"
    " their own) [default: <hostname>-<port>; on port 0, <hostname>-0-<random>, one per"
    " process].",
)
@click.option(
    "--durability",
    type=click.Choice(["strict", "async"]),
    default="strict",
    show_default=True,
    envvar="TOKENTRAIL_DURABILITY",
    help="strict: the final chunk waits until the record is fsynced.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BODY,
    show_default=True,
    envvar="TOKENTRAIL_MAX_BODY_BYTES",
    help="Larger audited request bodies are refused with 413.",
)
@click.option(
    "--upstream-timeout",
    type=FiniteFloatRange(min=0, min_open=True),
    default=DEFAULT_UPSTREAM_TIMEOUT,
    show_default=True,
    envvar="TOKENTRAIL_UPSTREAM_TIMEOUT",
    help="Seconds the upstream may stay silent (before answering or mid-stream).",
)
@click.option(
    "--request-token-data",
    type=click.Choice(["off", "logprobs", "ids", "all"]),
    default="off",
    show_default=True,
    is_flag=False,
    flag_value="logprobs",
    envvar="TOKENTRAIL_REQUEST_TOKEN_DATA",
    help="Ask the upstream for logprobs (and/or vLLM token ids) and hide them from "
    "the client. Alone: logprobs.",
)
@click.option(
    "--api-keys",
    "api_keys",
    default=None,
    envvar="TOKENTRAIL_API_KEYS",
    type=click.Path(dir_okay=False),
    help='TOML file of "<api key or sha256:hex>" = "<user_id>" pairs.',
)
# Each switch has its --no- form: off on the command line, over the environment or the file.
@click.option(
    "--trust-identity-headers/--no-trust-identity-headers",
    default=False,
    envvar="TOKENTRAIL_TRUST_IDENTITY_HEADERS",
    help="Honour X-Tokentrail-User / X-Tokentrail-Session (only behind a trusted network).",
)
@click.option(
    "--require-identity/--no-require-identity",
    default=False,
    envvar="TOKENTRAIL_REQUIRE_IDENTITY",
    help="Refuse (401) requests without a known user.",
)
@click.option(
    "--keystore",
    "keystore",
    default=None,
    envvar="TOKENTRAIL_KEYSTORE",
    type=click.Path(file_okay=False),
    help="Seal every record's content under its user's key kept here (outside the ledger),"
    " so `tokentrail forget --user U` can erase it without breaking the chain [default: off].",
)
@click.option(
    "--fail-open/--no-fail-open",
    default=False,
    envvar="TOKENTRAIL_FAIL_OPEN",
    help="When the ledger cannot be written (disk full), relay traffic anyway, unaudited."
    " UNSAFE for compliance; the default refuses with 503.",
)
@click.option(
    "--refuse-unaudited/--no-refuse-unaudited",
    default=False,
    envvar="TOKENTRAIL_REFUSE_UNAUDITED",
    help="Answer 403 to every request the proxy would relay unrecorded (/v1/responses,"
    " /api/embed, /api/pull, ...), except reads that reach no model: GET, HEAD and OPTIONS"
    " without an Upgrade, and POST /api/show. [default: relay them]",
)
@click.option(
    "--min-free-bytes",
    type=click.IntRange(min=0),
    default=16 << 20,
    show_default=True,
    envvar="TOKENTRAIL_MIN_FREE_BYTES",
    help="Refuse new exchanges (503) while the ledger's filesystem has less free space.",
)
@click.option(
    "--s3",
    "s3_url",
    default=None,
    envvar="TOKENTRAIL_S3",
    help="Also ship sealed segments and checkpoints to this bucket (s3://bucket/prefix),"
    " Object Lock required; the local ledger stays the spool [default: off].",
)
@click.option(
    "--s3-endpoint-url",
    default=None,
    envvar=S3_ENDPOINT_ENV,
    help="S3-compatible endpoint (moto, MinIO).",
)
@click.option(
    "--s3-layout",
    type=click.Choice(["batched", "per-record"]),
    default="batched",
    show_default=True,
    envvar="TOKENTRAIL_S3_LAYOUT",
    help="batched: one zstd object per log per minute; per-record: the seed's audit/<day>/.",
)
@retention_options("--s3-retention-mode", "--s3-retention-days", envvar="TOKENTRAIL_S3_RETENTION")
@click.option(
    "--s3-rotate-seconds",
    "s3_rotate_s",
    type=FiniteFloatRange(min=0.1),
    default=60.0,
    show_default=True,
    envvar="TOKENTRAIL_S3_ROTATE_SECONDS",
    help="Close a segment (one S3 object) this often.",
)
@click.option(
    "--s3-interval",
    "s3_interval_s",
    type=FiniteFloatRange(min=0.1),
    default=10.0,
    show_default=True,
    envvar="TOKENTRAIL_S3_INTERVAL",
    help="Seconds between shipping passes.",
)
@click.option(
    "--verify-state",
    default=None,
    # its own name, as every option's, and verify's (--state), which the daily check may set
    envvar=["TOKENTRAIL_VERIFY_STATE", "TOKENTRAIL_STATE"],
    type=click.Path(file_okay=False),
    help="The state directory of the daily `tokentrail verify`, whose last result /metrics"
    " shows [default: ~/.local/state/tokentrail/witness].",
)
@click.option(
    "--metrics-listen",
    default=None,
    envvar="TOKENTRAIL_METRICS_LISTEN",
    help="HOST:PORT for Prometheus /metrics and /healthz (a port of their own, so that no"
    " upstream path is shadowed) [default: off].",
)
@click.pass_context
def serve_command(ctx: click.Context, /, **options: Any) -> None:
    """Run the auditing proxy: every exchange lands in the ledger, token by token.

    Clients change only their base URL. Ollama-native (/api/generate, /api/chat) and
    OpenAI-compatible (/v1/chat/completions, /v1/completions) requests are recorded; every
    other path is passed through untouched and unrecorded (among them /v1/responses,
    /api/embed and llama.cpp's native /completion), or refused with --refuse-unaudited.

    \b
    Examples:
      tokentrail serve --upstream http://127.0.0.1:11434 --ledger /var/lib/tokentrail
      tokentrail serve --upstream http://gpu-1:8000 --listen 0.0.0.0:8001 \\
          --request-token-data all --api-keys keys.toml
      tokentrail serve --config /etc/tokentrail/serve.toml
    """
    try:
        config = build_config(options, ctx.meta.get("tokentrail.api_key_table"))
        log_to_stderr()
        run(config)
    except TokentrailError as exc:
        raise click.ClickException(str(exc)) from exc


# Every option of serve reads an environment variable: --help names each.
for _param in serve_command.params:
    if isinstance(_param, click.Option) and _param.envvar:
        _param.show_envvar = True


def build_config(
    options: Mapping[str, Any], key_table: Mapping[str, Any] | None = None
) -> ProxyConfig:
    """A :class:`ProxyConfig` from the command's options (and a config file's key table)."""
    host, port = parse_listen(options["listen"])
    api_keys: dict[str, str] = {}
    if key_table:
        api_keys.update(api_key_table(key_table, "config [api_keys]"))
    if options.get("api_keys"):
        api_keys.update(load_api_keys(Path(options["api_keys"])))
    return ProxyConfig(
        upstream=options["upstream"],
        host=host,
        port=port,
        ledger=Path(options["ledger"]),
        key=Path(options["key"]) if options.get("key") else None,
        log_id=options.get("log_id"),
        durability=options["durability"],
        max_body_bytes=options["max_body_bytes"],
        upstream_timeout=options["upstream_timeout"],
        request_token_data=options["request_token_data"],
        api_keys=api_keys,
        trust_identity_headers=options["trust_identity_headers"],
        require_identity=options["require_identity"],
        metrics_listen=options.get("metrics_listen"),
        keystore=Path(options["keystore"]) if options.get("keystore") else None,
        fail_open=bool(options.get("fail_open", False)),
        refuse_unaudited=bool(options.get("refuse_unaudited", False)),
        verify_state=Path(options["verify_state"]) if options.get("verify_state") else None,
        s3_url=options.get("s3_url"),
        s3_endpoint_url=options.get("s3_endpoint_url"),
        s3_layout=options.get("s3_layout", "batched"),
        s3_retention_mode=options.get("s3_retention_mode", "GOVERNANCE"),
        s3_retention_days=int(options.get("s3_retention_days", DEFAULT_DAYS)),
        s3_rotate_s=float(options.get("s3_rotate_s", 60.0)),
        s3_interval_s=float(options.get("s3_interval_s", 10.0)),
        min_free_bytes=int(options.get("min_free_bytes", 16 << 20)),
    )


__all__ = [
    "Proxy",
    "ProxyConfig",
    "build_config",
    "load_or_create_key",
    "run",
    "running_proxy",
    "serve",
    "serve_command",
]
