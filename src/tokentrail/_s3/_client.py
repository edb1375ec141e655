"""S3 addresses, the boto3 client factory, and the mapping of botocore errors to ours.

``s3://bucket/prefix`` names a store: every key tokentrail writes lives under ``prefix``. The
client is a plain boto3 S3 client (thread-safe, shared by a thread pool); ``endpoint_url``
points it at an S3-compatible server such as moto's or MinIO. aioboto3 is not used: async code
calls the same client through ``asyncio.to_thread``.

Errors: every botocore/boto3 exception is turned into :class:`ConfigError` (the operator can fix
it: no bucket, no credentials, access denied) or :class:`StoreError` (the store failed or could
not be reached), with one line that names the operation and the object.

References: Amazon S3 API Reference, "Error responses" (error codes) and "PutObject";
botocore "Config Reference" (retries, timeouts, connection pool).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from .._errors import ConfigError, StoreError, TokentrailError

#: A boto3 S3 client (boto3 ships no type information).
S3Client: TypeAlias = Any

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

#: Error codes that mean "try again later" (S3 API Reference, "Error responses").
RETRYABLE_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "OperationAborted",
        "Throttling",
        "ThrottlingException",
        "ConditionalRequestConflict",
        "500",
        "502",
        "503",
        "504",
    }
)
#: Error codes an operator fixes by changing configuration or permissions.
CONFIG_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "IllegalLocationConstraintException",
        "InvalidBucketState",
        "MissingUploadObjectWithObjectLockHeaders",
        "InvalidRequest",
        "403",
    }
)


def check_bucket_name(bucket: str) -> str:
    """Return ``bucket`` if it is a valid S3 bucket name, else raise ConfigError."""
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"{bucket!r} is not a valid S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')"
        )
    return bucket


@dataclass(frozen=True, slots=True)
class S3Url:
    """A store address ``s3://bucket/prefix``; ``prefix`` has no leading or trailing slash."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> S3Url:
        """Parse ``s3://bucket[/prefix]``; raises ConfigError."""
        if not text.startswith("s3://"):
            raise ConfigError(f"{text!r} is not an S3 address (expected s3://bucket/prefix)")
        bucket, _, prefix = text[5:].partition("/")
        return cls(check_bucket_name(bucket), prefix.strip("/"))

    def key(self, *parts: str) -> str:
        """The key of ``parts`` joined by ``/`` under the prefix."""
        tail = "/".join(parts)
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def uri(self, key: str) -> str:
        """``s3://bucket/key``, for messages and findings."""
        return f"s3://{self.bucket}/{key}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def as_url(url: str | S3Url) -> S3Url:
    """Accept either form."""
    return url if isinstance(url, S3Url) else S3Url.parse(url)


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the store.

    ``attempts`` is botocore's own total attempt count per request (1 = no retry); the shipper
    keeps it at 1 and retries with its own backoff so that an outage never stalls it for long.
    """

    endpoint_url: str | None = None
    region: str | None = None
    attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_pool_connections: int = 32


def make_client(options: ClientOptions | None = None) -> S3Client:
    """A boto3 S3 client; credentials come from the usual AWS chain (env, profile, role)."""
    options = options or ClientOptions()
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError("S3 support needs boto3: pip install 'tokentrail[s3]'") from exc
    config = Config(
        retries={"total_max_attempts": max(1, options.attempts), "mode": "standard"},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        max_pool_connections=options.max_pool_connections,
        s3={"addressing_style": "path"} if options.endpoint_url else None,
    )
    try:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=options.endpoint_url,
            region_name=options.region,
            config=config,
        )
    except Exception as exc:
        raise ConfigError(f"cannot create an S3 client: {exc}") from exc


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (or its HTTP status), else ``None``."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else None


def is_transient(exc: BaseException) -> bool:
    """Whether an error from botocore is worth retrying (network trouble, 5xx, throttling)."""
    from botocore import exceptions as bce  # type: ignore[import-untyped]

    if isinstance(
        exc,
        bce.EndpointConnectionError
        | bce.ConnectionClosedError
        | bce.ReadTimeoutError
        | bce.ConnectTimeoutError
        | bce.ResponseStreamingError
        | bce.IncompleteReadError
        | ConnectionError
        | TimeoutError,
    ):
        return True
    code = error_code(exc)
    return code in RETRYABLE_CODES


def map_error(exc: BaseException, what: str) -> TokentrailError:
    """Turn a botocore/boto3 exception into one clear line; ``what`` names the operation."""
    from botocore import exceptions as bce

    if isinstance(exc, TokentrailError):
        return exc
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return ConfigError(
            f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
            " AWS_PROFILE, or an instance role)"
        )
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
        return StoreError(f"{what}: cannot reach the S3 endpoint ({exc})")
    code = error_code(exc)
    if code is not None:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or code
        if code == "NoSuchBucket":
            return ConfigError(
                f"{what}: the bucket does not exist; create it with `tokentrail s3 init --bucket"
                " NAME`"
            )
        if code in CONFIG_CODES:
            return ConfigError(f"{what}: {code}: {message}")
        if code == "RequestTimeTooSkewed":
            return StoreError(
                f"{what}: {code}: {message} (this machine's clock is off from S3's by more than"
                " S3 allows: check its time sync, NTP or chrony)"
            )
        return StoreError(f"{what}: {code}: {message}")
    if isinstance(exc, bce.BotoCoreError):
        return StoreError(f"{what}: {exc}")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")
