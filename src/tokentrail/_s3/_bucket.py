"""Creating and checking the audit bucket: versioning, Object Lock and default retention.

``init`` is the seed's step 3 done safely: a new bucket is created with Object Lock enabled
(which turns versioning on for good) and a default retention rule; an existing bucket without
Object Lock is refused with one line naming the fix, unless the operator asks to enable it
(versioning, then ``PutObjectLockConfiguration``: AWS allows this on existing buckets since
November 2023; other S3-compatible stores may not, and then the error says to create a new
bucket). ``check`` reports versioning, the lock mode and retention, and whether the credentials
can write (a conditional PUT of one tiny probe object, so repeated checks add no versions).

References: Amazon S3 User Guide, "Configuring S3 Object Lock" (new and existing buckets);
S3 API Reference: CreateBucket (``x-amz-bucket-object-lock-enabled``), GetBucketVersioning,
GetObjectLockConfiguration, PutObjectLockConfiguration, PutBucketVersioning.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from .._errors import ConfigError
from ._client import S3Client, S3Url, check_bucket_name, error_code, map_error

LockMode = Literal["GOVERNANCE", "COMPLIANCE"]
LOCK_MODES: tuple[LockMode, ...] = ("GOVERNANCE", "COMPLIANCE")
DEFAULT_MODE: LockMode = "GOVERNANCE"
DEFAULT_DAYS = 2555

#: Written (once, conditionally) by the write probe; outside ``logs/`` and ``audit/``.
PROBE_KEY = ".tokentrail/write-probe"
_PROBE_BODY = b"tokentrail write probe\n"


@dataclass(frozen=True)
class Retention:
    """The Object Lock retention every object gets: mode and days."""

    mode: LockMode = DEFAULT_MODE
    days: int = DEFAULT_DAYS

    def __post_init__(self) -> None:
        if self.mode not in LOCK_MODES:
            raise ConfigError(f"lock mode must be GOVERNANCE or COMPLIANCE, not {self.mode!r}")
        if self.days < 1:
            raise ConfigError("retention must be at least 1 day")

    def until(self, now: datetime) -> datetime:
        """The retain-until date of an object written at ``now``."""
        return now + timedelta(days=self.days)


@dataclass(frozen=True)
class BucketStatus:
    """What ``s3 check`` found."""

    bucket: str
    versioning: str | None  # "Enabled", "Suspended", or None when never enabled
    lock_enabled: bool
    default_mode: str | None
    default_days: int | None
    can_write: bool | None  # None: not probed
    write_error: str | None = None

    def problems(self, wanted: Retention | None = None) -> list[str]:
        """Why this bucket cannot hold an audit log (empty when it can)."""
        out = []
        if not self.lock_enabled:
            out.append(
                f"bucket {self.bucket} has no Object Lock: run `tokentrail s3 init --bucket"
                f" {self.bucket} --enable-on-existing`, or create a new bucket with"
                " `tokentrail s3 init --bucket NEW` (aws s3api create-bucket --bucket NEW"
                " --object-lock-enabled-for-bucket)"
            )
        if self.versioning != "Enabled":
            out.append(f"bucket {self.bucket} does not have versioning enabled")
        if self.can_write is False:
            out.append(f"cannot write to bucket {self.bucket}: {self.write_error}")
        if wanted is not None and self.default_days is not None and self.default_days < wanted.days:
            out.append(
                f"bucket {self.bucket} default retention is {self.default_days} days, shorter"
                f" than the {wanted.days} configured (objects are written with {wanted.days})"
            )
        return out

    def lines(self) -> list[str]:
        """Human-readable report lines."""
        if self.default_mode is not None:
            default = f"{self.default_mode} {self.default_days} days"
        else:
            default = "none (every object sets its own)"
        if self.can_write is None:
            write = "not probed"
        elif self.can_write:
            write = "yes"
        else:
            write = f"NO ({self.write_error})"
        return [
            f"bucket:            {self.bucket}",
            f"versioning:        {self.versioning or 'never enabled'}",
            f"object lock:       {'enabled' if self.lock_enabled else 'DISABLED'}",
            f"default retention: {default}",
            f"can write:         {write}",
        ]


def _lock_rule(retention: Retention) -> dict[str, Any]:
    return {
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": retention.mode, "Days": retention.days}},
    }


def _bucket_exists(client: S3Client, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise map_error(exc, f"HeadBucket {bucket}") from exc
    return True


def read_status(client: S3Client, url: S3Url, *, probe: bool = True) -> BucketStatus:
    """Versioning, Object Lock configuration and (when ``probe``) write access of a bucket."""
    bucket = url.bucket
    try:
        versioning = client.get_bucket_versioning(Bucket=bucket).get("Status")
    except Exception as exc:
        raise map_error(exc, f"GetBucketVersioning {bucket}") from exc
    lock_enabled = False
    mode: str | None = None
    days: int | None = None
    try:
        conf = client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    except Exception as exc:
        if error_code(exc) != "ObjectLockConfigurationNotFoundError":
            raise map_error(exc, f"GetObjectLockConfiguration {bucket}") from exc
    else:
        lock_enabled = conf.get("ObjectLockEnabled") == "Enabled"
        rule = conf.get("Rule", {}).get("DefaultRetention")
        if rule:
            mode = rule.get("Mode")
            days = int(rule.get("Days") or 0) + 365 * int(rule.get("Years") or 0)
    can_write: bool | None = None
    write_error: str | None = None
    if probe:
        can_write, write_error = _probe_write(client, url)
    return BucketStatus(bucket, versioning, lock_enabled, mode, days, can_write, write_error)


def _probe_write(client: S3Client, url: S3Url) -> tuple[bool, str | None]:
    """A conditional PUT of one probe object: 200 (created) or 412 (exists) both prove access."""
    digest = base64.b64encode(hashlib.sha256(_PROBE_BODY).digest()).decode()
    try:
        client.put_object(
            Bucket=url.bucket,
            Key=url.key(PROBE_KEY),
            Body=_PROBE_BODY,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=digest,
            IfNoneMatch="*",
        )
    except Exception as exc:
        if error_code(exc) in ("PreconditionFailed", "412"):
            return True, None
        return False, str(map_error(exc, "PutObject probe"))
    return True, None


def check_bucket(
    client: S3Client,
    url: S3Url,
    *,
    retention: Retention | None = None,
    probe: bool = True,
) -> BucketStatus:
    """:func:`read_status`, raising ConfigError with the fix when the bucket is unusable."""
    status = read_status(client, url, probe=probe)
    problems = status.problems(retention)
    if problems:
        raise ConfigError("; ".join(problems))
    return status


def init_bucket(
    client: S3Client,
    bucket: str,
    retention: Retention,
    *,
    region: str | None = None,
    enable_on_existing: bool = False,
) -> tuple[BucketStatus, list[str]]:
    """Create ``bucket`` with Object Lock and default retention; return its status and notes.

    An existing bucket with Object Lock keeps its settings (a missing default rule is added);
    one without is refused unless ``enable_on_existing``, which turns versioning and Object Lock
    on for good.
    """
    check_bucket_name(bucket)
    url = S3Url(bucket)
    notes: list[str] = []
    if not _bucket_exists(client, bucket):
        params: dict[str, Any] = {"Bucket": bucket, "ObjectLockEnabledForBucket": True}
        region = region or client.meta.region_name
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**params)
        except Exception as exc:
            if error_code(exc) == "BucketAlreadyExists":
                raise ConfigError(
                    f"bucket name {bucket} is taken by another AWS account; choose another name"
                ) from exc
            raise map_error(exc, f"CreateBucket {bucket}") from exc
        notes.append(f"created bucket {bucket} with Object Lock (versioning is now on for good)")
    status = read_status(client, url, probe=False)
    if not status.lock_enabled:
        if not enable_on_existing:
            raise ConfigError(
                f"bucket {bucket} exists without Object Lock, and Object Lock can never be"
                " turned off again, so it is not enabled unasked: rerun with"
                " --enable-on-existing (turns on versioning and Object Lock for good; AWS"
                " allows it on existing buckets, some S3-compatible stores do not), or create a"
                f" new bucket: tokentrail s3 init --bucket {bucket}-audit"
            )
        try:
            client.put_bucket_versioning(
                Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
            )
            client.put_object_lock_configuration(
                Bucket=bucket, ObjectLockConfiguration=_lock_rule(retention)
            )
        except Exception as exc:
            reason = map_error(exc, "PutObjectLockConfiguration")
            raise ConfigError(
                f"bucket {bucket} exists without Object Lock and the store refused to enable it"
                f" ({reason}); create a new bucket with Object Lock instead: tokentrail s3 init"
                f" --bucket {bucket}-audit"
            ) from exc
        notes.append(f"enabled versioning and Object Lock on existing bucket {bucket}")
    elif status.default_mode is None:
        try:
            client.put_object_lock_configuration(
                Bucket=bucket, ObjectLockConfiguration=_lock_rule(retention)
            )
        except Exception as exc:
            raise map_error(exc, f"PutObjectLockConfiguration {bucket}") from exc
    elif (status.default_mode, status.default_days) != (retention.mode, retention.days):
        notes.append(
            f"kept the bucket's existing default retention {status.default_mode}"
            f" {status.default_days} days (tokentrail sets {retention.mode} {retention.days}"
            " days on every object it writes)"
        )
    notes.append(
        f"default retention {retention.mode} {retention.days} days"
        if status.default_mode is None
        else f"default retention {status.default_mode} {status.default_days} days"
    )
    return read_status(client, url, probe=True), notes
