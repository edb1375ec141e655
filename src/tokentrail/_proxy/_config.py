"""The proxy's configuration: one frozen value built from options, a TOML file and environment.

Precedence, highest first: command-line option, ``TOKENTRAIL_*`` environment variable, the
``--config`` TOML file (same option names, dashes or underscores), the default. The TOML file may
also hold an ``[api_keys]`` table (API key → ``user_id``); ``--api-keys FILE`` names a TOML file
of such pairs (top level or under ``[api_keys]``). A key may be written as ``"sha256:<hex>"`` so
that the configuration never holds a usable key; only the SHA-256 of each key is kept in memory.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .._errors import ConfigError
from .._layout import check_log_id
from .._paths import default_signing_key
from .._s3._bucket import DEFAULT_DAYS

TokenData = Literal["off", "logprobs", "ids", "all"]

DEFAULT_UPSTREAM = "http://127.0.0.1:11434"
DEFAULT_LISTEN = "127.0.0.1:11435"
DEFAULT_LEDGER = "./tokentrail-ledger"
DEFAULT_MAX_BODY = 16 << 20
DEFAULT_UPSTREAM_TIMEOUT = 300.0
_SHA256_RE = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


#: This process's mark for a log on an ephemeral port (port 0: any free one).
_EPHEMERAL = secrets.token_hex(3)


def default_log_id(port: int) -> str:
    """A log id stable across restarts of the same proxy: ``<host>-<port>``, sanitised.

    On port 0 (any free port, so no restart listens where the last one did) it is
    ``<host>-0-<random>``, one per process: every proxy started so writes a log of its own,
    never one another shares (SPEC section 3: unique within a store).
    """
    host = re.sub(r"[^a-z0-9._-]+", "-", socket.gethostname().lower()).strip("-._") or "proxy"
    return f"{host[:50]}-{port}" if port else f"{host[:50]}-0-{_EPHEMERAL}"


def key_digest(key: str) -> str:
    """The SHA-256 hex of an API key: what the proxy keeps and may log instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{option} must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_upstream(value: str) -> str:
    """An ``http://`` or ``https://`` base URL without a trailing slash."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (read for its check: a port beyond 65535 or not a number)
    except ValueError as exc:
        raise ConfigError(f"--upstream must be an http(s) URL, not {value!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--upstream must be an http(s) URL, not {value!r}")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ConfigError(
            f"--upstream is the model server's root URL, without a query or fragment: {value!r}"
        )
    base = value.rstrip("/")
    if base.endswith(("/v1", "/api")):
        # Clients call the proxy at /v1/chat/completions, /api/chat …, and it forwards that
        # path: with a /v1 upstream every call would go to /v1/v1/… (and the client that then
        # drops /v1 from its own base URL would reach the model unaudited).
        raise ConfigError(
            f"--upstream is the model server's root URL ({base.rsplit('/', 1)[0]}), not its API"
            f" base URL ({base}): the proxy forwards each path as the client sent it"
        )
    return base


def api_key_table(table: Mapping[str, Any], where: str) -> dict[str, str]:
    """A key → user table as digest → user, refusing anything but string pairs."""
    out: dict[str, str] = {}
    for key, user in table.items():
        if not isinstance(user, str) or not user:
            raise ConfigError(f"{where}: user id for an API key must be a non-empty string")
        m = _SHA256_RE.fullmatch(key)
        if m is None and key.startswith("sha256:"):  # a digest mistyped, not a key
            raise ConfigError(f"{where}: {key!r} is not sha256: and 64 hex digits")
        out[m.group(1).lower() if m else key_digest(key)] = user
    return out


def load_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """Read a TOML file (``what`` names it in errors), mapping failures to ConfigError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def load_api_keys(path: Path) -> dict[str, str]:
    """An ``--api-keys`` file: ``"<key>" = "<user_id>"`` pairs (top level or ``[api_keys]``)."""
    data = load_toml(path, "API keys file")
    table = data.get("api_keys", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [api_keys] must be a table")
    return api_key_table(table, str(path))


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``tokentrail serve`` needs, validated."""

    upstream: str = DEFAULT_UPSTREAM
    host: str = "127.0.0.1"
    port: int = 11435
    ledger: Path = Path(DEFAULT_LEDGER)
    key: Path | None = None
    log_id: str | None = None
    durability: Literal["strict", "async"] = "strict"
    max_body_bytes: int = DEFAULT_MAX_BODY
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    connect_timeout: float = 10.0
    request_token_data: TokenData = "off"
    api_keys: Mapping[str, str] = field(default_factory=dict)  # sha256(key) hex → user_id
    trust_identity_headers: bool = False
    require_identity: bool = False
    seal_interval_s: float = 60.0
    tags_ttl_s: float = 60.0
    shutdown_grace_s: float = 10.0
    metrics_listen: str | None = None
    keystore: Path | None = None  # set: content is sealed per subject (SPEC section 7)
    s3_url: str | None = None  # ship sealed segments and checkpoints to this bucket/prefix
    s3_endpoint_url: str | None = None
    s3_layout: Literal["batched", "per-record"] = "batched"
    s3_retention_mode: Literal["GOVERNANCE", "COMPLIANCE"] = "GOVERNANCE"
    s3_retention_days: int = DEFAULT_DAYS
    s3_interval_s: float = 10.0
    s3_rotate_s: float = 60.0
    verify_state: Path | None = None  # where `tokentrail verify` notes its last run
    fail_open: bool = False  # relay even when the ledger cannot write (unsafe for compliance)
    refuse_unaudited: bool = False  # 403 for requests that could reach a model unrecorded
    min_free_bytes: int = 16 << 20  # refuse new exchanges below this much free ledger space

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream", check_upstream(self.upstream))
        if self.log_id is not None:
            check_log_id(self.log_id)
        if self.durability not in ("strict", "async"):
            raise ConfigError("--durability must be strict or async")
        if self.request_token_data not in ("off", "logprobs", "ids", "all"):
            raise ConfigError("--request-token-data must be off, logprobs, ids or all")
        if self.max_body_bytes < 1:
            raise ConfigError("--max-body-bytes must be positive")
        if self.upstream_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("timeouts must be positive")

    @property
    def effective_log_id(self) -> str:
        """The configured log id, or the default for this host and port."""
        return self.log_id or default_log_id(self.port)

    @property
    def key_path(self) -> Path:
        """The signing key file (created on first start when missing)."""
        return self.key or default_signing_key()
