"""Tests for the S3 store (issue 4) against a real S3 server over HTTP: moto's, on loopback.

Every test uses real boto3 clients with ``endpoint_url`` and dummy credentials, never an
in-process patch. The first class pins down the server's Object Lock behaviour the product
relies on, so a moto upgrade that loosens it fails loudly. Tampering is done here with plain
boto3 calls and ``hashlib``, never with the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard
from botocore.exceptions import ClientError
from click.testing import CliRunner

from s3server import DUMMY_ENV, MotoS3, Outage, use_dummy_credentials
from tokentrail._checkpoint import Signer
from tokentrail._errors import ConfigError, StoreError
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._record import Record
from tokentrail._s3 import (
    ClientOptions,
    Retention,
    S3Url,
    Shipper,
    ShipperConfig,
    count_s3,
    init_bucket,
    mirror_s3,
    read_status,
    ship_once,
    verify_s3,
)
from tokentrail._s3._cli import check_command, cost_command, init_command, ship_command
from tokentrail._s3._cost import SECONDS_PER_MONTH, estimate
from tokentrail._verify import Report, VerifyOptions

LOG_ID = "test-log"
SEGMENT_BYTES = 4096  # about four test records per segment


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port, with dummy credentials in the environment."""
    saved = {
        name: os.environ.get(name)
        for name in [*DUMMY_ENV, "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"]
    }
    use_dummy_credentials()
    server = MotoS3().start()
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def bucket(s3: MotoS3) -> str:
    """A fresh bucket with Object Lock and a GOVERNANCE 2555-day default retention."""
    name = s3.new_bucket()
    s3.client().put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2555}},
        },
    )
    return name


@pytest.fixture
def client(s3: MotoS3) -> Any:
    return s3.client()


def options(s3: MotoS3, endpoint: str | None = None) -> ClientOptions:
    return ClientOptions(endpoint_url=endpoint or s3.endpoint, attempts=1)


def verify_opts(signer: Signer, **kw: Any) -> VerifyOptions:
    return VerifyOptions(verifiers=[signer.verifier], **kw)


def write_log(
    root: Path, signer: Signer, n: int, *, log_id: str = LOG_ID, seal_every: int = 10
) -> list[Record]:
    """Write ``n`` records in small segments, sealing every ``seal_every``, then close."""
    from conftest import exchange_for

    cfg = LedgerConfig(root, log_id, signer, max_segment_bytes=SEGMENT_BYTES, durability="async")
    records = []
    with Ledger.open(cfg) as ledger:
        for i in range(n):
            records.append(ledger.append(exchange_for(i)))
            if (i + 1) % seal_every == 0:
                ledger.seal()
    return records


def days_of(root: Path, records: list[Record]) -> set[str]:
    """Every UTC date a count could file these records under (segment folders, timestamps)."""
    days = {json.loads(r.leaf)["timestamp"][:10] for r in records}
    days |= {p.name for p in root.glob("logs/*/segments/*")}
    return days


def count_all(url: S3Url, s3: MotoS3, days: set[str]) -> int:
    return sum(count_s3(url, day, client_options=options(s3)) for day in days)


def versions(client: Any, bucket: str) -> dict[str, int]:
    """Number of (non-delete-marker) versions per key."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            out[v["Key"]] = out.get(v["Key"], 0) + 1
    return out


def keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def describe_findings(report: Report) -> str:
    return "\n".join(f.to_line() for f in report.findings)


def findings_at(report: Report, fragment: str) -> list[str]:
    return [f.to_line() for f in report.findings if f.location and fragment in f.location]


# --------------------------------------------------------------------------------------------
# The server's Object Lock behaviour, which everything else relies on
# --------------------------------------------------------------------------------------------


class TestServerObjectLock:
    def test_bucket_created_with_lock_has_versioning_and_lock(self, s3: MotoS3, client: Any):
        """A bucket created with ObjectLockEnabledForBucket is versioned and locked."""
        name = s3.new_bucket()
        assert client.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
        conf = client.get_object_lock_configuration(Bucket=name)["ObjectLockConfiguration"]
        assert conf["ObjectLockEnabled"] == "Enabled"

    def test_governance_needs_bypass_compliance_never_deletes(self, s3: MotoS3, client: Any):
        """GOVERNANCE versions need BypassGovernanceRetention; COMPLIANCE ones cannot go at all."""
        name = s3.new_bucket()
        until = datetime.now(UTC) + timedelta(days=1)
        ids = {}
        for mode in ("GOVERNANCE", "COMPLIANCE"):
            ids[mode] = client.put_object(
                Bucket=name,
                Key=mode,
                Body=b"x",
                ChecksumAlgorithm="SHA256",
                ObjectLockMode=mode,
                ObjectLockRetainUntilDate=until,
            )["VersionId"]
        # No bypass means no header: moto 5.2 treats "x-amz-bypass-governance-retention: false"
        # as a bypass (it tests the header's presence), unlike S3.
        for mode, bypass in (
            ("GOVERNANCE", {}),
            ("COMPLIANCE", {}),
            ("COMPLIANCE", {"BypassGovernanceRetention": True}),
        ):
            with pytest.raises(ClientError) as err:
                client.delete_object(Bucket=name, Key=mode, VersionId=ids[mode], **bypass)
            assert err.value.response["Error"]["Code"] == "AccessDenied"
        client.delete_object(
            Bucket=name,
            Key="GOVERNANCE",
            VersionId=ids["GOVERNANCE"],
            BypassGovernanceRetention=True,
        )
        assert "GOVERNANCE" not in versions(client, name)
        assert versions(client, name)["COMPLIANCE"] == 1

    def test_if_none_match_refuses_an_existing_key(self, s3: MotoS3, client: Any):
        """A conditional PUT on an existing key is refused with 412 and makes no version."""
        name = s3.new_bucket()
        client.put_object(Bucket=name, Key="k", Body=b"a", IfNoneMatch="*")
        with pytest.raises(ClientError) as err:
            client.put_object(Bucket=name, Key="k", Body=b"b", IfNoneMatch="*")
        assert err.value.response["Error"]["Code"] == "PreconditionFailed"
        assert versions(client, name) == {"k": 1}

    def test_lock_needs_versioning(self, s3: MotoS3, client: Any):
        """Object Lock cannot be configured on a bucket without versioning."""
        name = s3.new_bucket(lock=False)
        with pytest.raises(ClientError) as err:
            client.put_object_lock_configuration(
                Bucket=name, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"}
            )
        assert err.value.response["Error"]["Code"] == "InvalidBucketState"


# --------------------------------------------------------------------------------------------
# s3 init / s3 check
# --------------------------------------------------------------------------------------------


class TestBucket:
    def test_init_creates_locked_bucket(self, s3: MotoS3, client: Any):
        """init creates the bucket with Object Lock, versioning and the default retention."""
        name = f"tt-init-{time.monotonic_ns()}"
        status, notes = init_bucket(client, name, Retention("COMPLIANCE", 30))
        assert (status.versioning, status.lock_enabled) == ("Enabled", True)
        assert (status.default_mode, status.default_days) == ("COMPLIANCE", 30)
        assert status.can_write is True
        assert status.problems() == []
        assert any("created bucket" in n for n in notes)

    def test_init_refuses_existing_bucket_without_lock(self, s3: MotoS3, client: Any):
        """An existing unlocked bucket is refused with one line naming both fixes."""
        name = s3.new_bucket(lock=False)
        with pytest.raises(ConfigError) as err:
            init_bucket(client, name, Retention())
        message = str(err.value)
        assert "\n" not in message
        assert "without Object Lock" in message
        assert "--enable-on-existing" in message and "tokentrail s3 init --bucket" in message

    def test_init_enables_lock_on_existing_bucket_when_asked(self, s3: MotoS3, client: Any):
        """With --enable-on-existing, versioning and Object Lock are turned on."""
        name = s3.new_bucket(lock=False)
        status, _ = init_bucket(client, name, Retention(), enable_on_existing=True)
        assert (status.versioning, status.lock_enabled, status.default_days) == (
            "Enabled",
            True,
            2555,
        )

    def test_check_reports_missing_lock(self, s3: MotoS3, client: Any):
        """check names the missing Object Lock and versioning, and the fix."""
        name = s3.new_bucket(lock=False)
        status = read_status(client, S3Url(name))
        assert status.lock_enabled is False and status.can_write is True
        problems = status.problems()
        assert len(problems) == 2
        assert "tokentrail s3 init" in problems[0]

    def test_shipper_refuses_bucket_without_lock(self, s3: MotoS3, tmp_path: Path, signer: Signer):
        """The shipper checks the bucket first and names the fix."""
        write_log(tmp_path, signer, 3)
        name = s3.new_bucket(lock=False)
        with pytest.raises(ConfigError, match=r"has no Object Lock.*s3 init"):
            ship_once(tmp_path, f"s3://{name}/p", client_options=options(s3))

    def test_cli_init_and_check(self, s3: MotoS3):
        """`s3 init` then `s3 check` exit 0; check on an unlocked bucket exits 1."""
        runner = CliRunner()
        name = f"tt-cli-{time.monotonic_ns()}"
        out = runner.invoke(init_command, ["--bucket", name, "--endpoint-url", s3.endpoint])
        assert out.exit_code == 0, out.output
        assert "object lock:       enabled" in out.output
        out = runner.invoke(check_command, ["--bucket", name, "--endpoint-url", s3.endpoint])
        assert out.exit_code == 0, out.output
        assert out.output.splitlines()[-1] == f"OK: s3://{name} can hold a tokentrail ledger"
        bad = s3.new_bucket(lock=False)
        out = runner.invoke(check_command, ["--bucket", bad, "--endpoint-url", s3.endpoint])
        assert out.exit_code == 1
        assert "PROBLEM: bucket" in out.output


# --------------------------------------------------------------------------------------------
# Shipping and reading back
# --------------------------------------------------------------------------------------------


class TestShip:
    @pytest.mark.parametrize("layout", ["batched", "per-record"])
    def test_ship_verify_count(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer, layout: str
    ):
        """A closed ledger ships in full; verify_s3 is OK and count_s3 equals the records."""
        records = write_log(tmp_path, signer, 40)
        url = S3Url(bucket, "audit-prod")
        report = ship_once(tmp_path, url, layout=layout, client_options=options(s3))
        assert report.records == 40 and report.waiting == []
        assert report.checkpoints == 4  # sealed at 10, 20, 30, 40
        result = verify_s3(url, verify_opts(signer), client_options=options(s3))
        assert result.ok, [f.to_line() for f in result.findings]
        assert result.warnings == []
        assert sum(lg.verified_size for lg in result.logs) == 40
        assert count_all(url, s3, days_of(tmp_path, records)) == 40
        assert set(versions(client, bucket).values()) == {1}

    def test_a_log_begun_again_under_its_id_is_refused(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """A ledger lost and begun again under the same log id (a rebuilt host keeps its name,
        so its default log id): its records went into the locked bucket as a second history
        of the log, with other segment keys, found only at a checkpoint key later. Refused
        before anything is shipped, naming the log and the way out."""
        url = S3Url(bucket, "again")
        write_log(tmp_path / "first", signer, 40)
        ship_once(tmp_path / "first", url, client_options=options(s3))
        before = versions(client, bucket)
        write_log(tmp_path / "second", signer, 12)
        with pytest.raises(ConfigError, match=f"holds a checkpoint of 40 records of log {LOG_ID}"):
            ship_once(tmp_path / "second", url, client_options=options(s3))
        assert before == versions(client, bucket)
        # The first ledger, and a longer one, ship on.
        write_log(tmp_path / "first", signer, 5)
        ship_once(tmp_path / "first", url, client_options=options(s3))

    def test_batched_objects_hold_the_local_bytes(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Each segment object decompresses to the local segment byte for byte, and is locked."""
        write_log(tmp_path, signer, 12)
        ship_once(tmp_path, f"s3://{bucket}", client_options=options(s3))
        local = sorted((tmp_path / "logs" / LOG_ID / "segments").glob("*/*.jsonl"))
        keys = keys_under(client, bucket, f"logs/{LOG_ID}/segments/")
        assert len(keys) == len(local) > 1
        for path, key in zip(local, keys, strict=True):
            obj = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            data = zstandard.ZstdDecompressor().decompressobj().decompress(obj["Body"].read())
            assert data == path.read_bytes()
            first, last = key.rsplit("/", 1)[1].split(".")[0].split("-")
            assert int(first) == int(path.name.split(".")[0])
            assert int(last) - int(first) + 1 == data.count(b"\n")
            assert obj["ObjectLockMode"] == "GOVERNANCE"
            assert obj["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=2554)
            assert "ChecksumSHA256" in obj

    def test_per_record_keys_are_the_seeds(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Per-record: audit/<timestamp date>/<event_id>.json holding the leaf bytes."""
        records = write_log(tmp_path, signer, 7)
        ship_once(tmp_path, f"s3://{bucket}", layout="per-record", client_options=options(s3))
        for record in records:
            day = json.loads(record.leaf)["timestamp"][:10]
            body = client.get_object(Bucket=bucket, Key=f"audit/{day}/{record.event_id}.json")
            assert body["Body"].read() == record.leaf
        days = {json.loads(r.leaf)["timestamp"][:10] for r in records}
        assert sum(len(keys_under(client, bucket, f"audit/{d}/")) for d in days) == 7

    def test_retry_makes_no_second_version(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Shipping again, even with the progress file lost, writes nothing new."""
        write_log(tmp_path, signer, 20)
        url = f"s3://{bucket}/p"
        first = ship_once(tmp_path, url, client_options=options(s3))
        before = versions(client, bucket)
        again = ship_once(tmp_path, url, client_options=options(s3))
        assert (again.segments, again.checkpoints) == (0, 0)
        (tmp_path / "logs" / LOG_ID / "shipped.json").unlink()
        lost = ship_once(tmp_path, url, client_options=options(s3))
        assert lost.already_present == first.segments + first.checkpoints
        assert lost.bytes_sent == 0
        assert versions(client, bucket) == before
        assert set(before.values()) == {1}

    def test_different_content_at_a_key_is_an_error(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """An object already at our key with other content is never overwritten."""
        records = write_log(tmp_path, signer, 12)
        day = next((tmp_path / "logs" / LOG_ID / "segments").iterdir()).name
        key = f"logs/{LOG_ID}/checkpoints/{10:020d}.checkpoint"
        client.put_object(Bucket=bucket, Key=key, Body=b"forged", ChecksumAlgorithm="SHA256")
        with pytest.raises(StoreError, match="already holds different content"):
            ship_once(tmp_path, f"s3://{bucket}", client_options=options(s3))
        assert versions(client, bucket)[key] == 1
        assert records and day

    def test_live_writer_open_segment_is_not_shipped(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """While the writer is live its open segment waits; after close, everything ships."""
        from conftest import exchange_for

        url = S3Url(bucket)
        cfg = LedgerConfig(tmp_path, LOG_ID, signer, max_segment_bytes=SEGMENT_BYTES)
        ledger = Ledger.open(cfg)
        try:
            records = [ledger.append(exchange_for(i)) for i in range(10)]
            ledger.seal()
            records += [ledger.append(exchange_for(i)) for i in range(10, 13)]
            open_name = (tmp_path / "logs" / LOG_ID / "open-segment").read_text().strip()
            report = ship_once(tmp_path, url, client_options=options(s3))
            assert report.waiting == [f"{LOG_ID}/{open_name} (open)"]
            open_first = int(open_name.split("/")[1].split(".")[0])
            keys = keys_under(client, bucket, f"logs/{LOG_ID}/segments/")
            assert keys and all(int(k.rsplit("/", 1)[1][:20]) < open_first for k in keys)
            shipped = max(int(k.rsplit("-", 1)[1][:20]) for k in keys) + 1
            # Only checkpoints whose records are all in S3 went up.
            cps = keys_under(client, bucket, f"logs/{LOG_ID}/checkpoints/")
            assert all(int(k.rsplit("/", 1)[1][:20]) <= shipped for k in cps)
        finally:
            ledger.close()
        ship_once(tmp_path, url, client_options=options(s3))
        result = verify_s3(url, verify_opts(signer), client_options=options(s3))
        assert result.ok, [f.to_line() for f in result.findings]
        assert count_all(url, s3, days_of(tmp_path, records)) == 13

    def test_compressed_local_segments_ship(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Segments the writer already zstd-compressed locally ship with the same content."""
        from conftest import exchange_for

        cfg = LedgerConfig(
            tmp_path, LOG_ID, signer, max_segment_bytes=SEGMENT_BYTES, compress_sealed=True
        )
        with Ledger.open(cfg) as ledger:
            records = [ledger.append(exchange_for(i)) for i in range(15)]
        assert not list(tmp_path.glob("logs/*/segments/*/*.jsonl"))
        url = S3Url(bucket, "zst")
        ship_once(tmp_path, url, client_options=options(s3))
        assert verify_s3(url, verify_opts(signer), client_options=options(s3)).ok
        assert count_all(url, s3, days_of(tmp_path, records)) == 15

    def test_two_writers_share_a_bucket(
        self, s3: MotoS3, bucket: str, tmp_path: Path, signer: Signer
    ):
        """Two logs from two machines ship to one prefix at once; both verify."""
        roots = [tmp_path / "a", tmp_path / "b"]
        written = [
            write_log(root, signer, 15 + i, log_id=f"proxy-{i}") for i, root in enumerate(roots)
        ]
        url = S3Url(bucket, "shared")
        errors: list[BaseException] = []

        def ship(root: Path) -> None:
            try:
                ship_once(root, url, client_options=options(s3))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ship, args=(root,)) for root in roots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        result = verify_s3(url, verify_opts(signer), client_options=options(s3))
        assert result.ok, [f.to_line() for f in result.findings]
        assert sorted(lg.log_id for lg in result.logs) == ["proxy-0", "proxy-1"]
        days = days_of(roots[0], written[0]) | days_of(roots[1], written[1])
        assert count_all(url, s3, days) == 31

    def test_mirror_recreates_the_local_layout(
        self, s3: MotoS3, bucket: str, tmp_path: Path, signer: Signer
    ):
        """mirror_s3 writes the local layout back (batched keys -> <first>.jsonl.zst)."""
        write_log(tmp_path / "src", signer, 12)
        ship_once(tmp_path / "src", f"s3://{bucket}", client_options=options(s3))
        findings = mirror_s3(f"s3://{bucket}", tmp_path / "dst", client_options=options(s3))
        assert findings == []
        src = sorted(
            p.name.split(".")[0] for p in (tmp_path / "src").glob("logs/*/segments/*/*.jsonl")
        )
        dst = sorted(
            p.name.split(".")[0] for p in (tmp_path / "dst").glob("logs/*/segments/*/*.jsonl.zst")
        )
        assert src == dst


# --------------------------------------------------------------------------------------------
# Tampering in the bucket
# --------------------------------------------------------------------------------------------


def _leaf_hash(leaf: bytes) -> str:
    return hashlib.sha256(b"\x00" + leaf).hexdigest()


def _forge(lines: list[bytes], prev_hash: str) -> list[bytes]:
    """Change the first record's answer and recompute every hash and link, as a forger would."""
    out = []
    for idx, line in enumerate(lines):
        obj = json.loads(line)
        if idx == 0:
            obj["output_text"] = "forged answer"
            obj["output_text_hash"] = hashlib.sha256(b"forged answer").hexdigest()
        obj["prev_hash"] = prev_hash
        leaf = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        prev_hash = _leaf_hash(leaf)
        out.append(leaf)
    return out


def _put_segment(client: Any, url: S3Url, key: str, raw: bytes, retain_until: Any) -> None:
    """Upload ``raw`` records as a locked zstd segment object, as the shipper would."""
    client.put_object(
        Bucket=url.bucket,
        Key=key,
        Body=zstandard.ZstdCompressor().compress(raw),
        ChecksumAlgorithm="SHA256",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=retain_until,
        Metadata={"tokentrail-sha256": hashlib.sha256(raw).hexdigest()},
    )


class TestTamper:
    @pytest.fixture
    def shipped(
        self, s3: MotoS3, bucket: str, tmp_path: Path, signer: Signer
    ) -> tuple[S3Url, list[str]]:
        """30 records in small segments, sealed every 10, shipped batched."""
        write_log(tmp_path, signer, 30)
        url = S3Url(bucket, "t")
        ship_once(tmp_path, url, client_options=options(s3))
        segments = keys_under(s3.client(), bucket, f"t/logs/{LOG_ID}/segments/")
        assert len(segments) >= 4
        return url, segments

    def verify(self, s3: MotoS3, url: S3Url, signer: Signer) -> Report:
        return verify_s3(url, verify_opts(signer), client_options=options(s3))

    def test_overwritten_object(self, s3: MotoS3, client: Any, shipped: Any, signer: Signer):
        """A second version of a segment (even with the same bytes) is a finding on its key."""
        url, segments = shipped
        key = segments[1]
        data = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        client.put_object(Bucket=url.bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
        report = self.verify(s3, url, signer)
        assert not report.ok
        assert any("2 versions" in line for line in findings_at(report, key))

    def test_version_deleted_with_bypass(
        self, s3: MotoS3, client: Any, shipped: Any, signer: Signer
    ):
        """Deleting a segment's only version (governance bypass) leaves a named gap."""
        url, segments = shipped
        key = segments[2]
        vid = client.head_object(Bucket=url.bucket, Key=key)["VersionId"]
        client.delete_object(
            Bucket=url.bucket, Key=key, VersionId=vid, BypassGovernanceRetention=True
        )
        report = self.verify(s3, url, signer)
        assert not report.ok
        first, last = (int(x) for x in key.rsplit("/", 1)[1].split(".")[0].split("-"))
        gap = [
            f
            for f in report.findings
            if f"no segment object holds seqs {first}-{last}" in f.message
        ]
        assert gap and gap[0].location == url.uri(f"t/logs/{LOG_ID}/segments")
        assert any(f"expected seq {first}, found {last + 1}" in f.message for f in report.findings)

    def test_last_segment_deleted_with_bypass(
        self, s3: MotoS3, client: Any, shipped: Any, signer: Signer
    ):
        """The last segment gone for good: the gap up to the checkpoint's size is named."""
        url, segments = shipped
        key = segments[-1]
        vid = client.head_object(Bucket=url.bucket, Key=key)["VersionId"]
        client.delete_object(
            Bucket=url.bucket, Key=key, VersionId=vid, BypassGovernanceRetention=True
        )
        report = self.verify(s3, url, signer)
        first, last = (int(x) for x in key.rsplit("/", 1)[1].split(".")[0].split("-"))
        assert 29 == last
        want = f"no segment object holds seqs {first}-29"
        gap = [f for f in report.findings if want in f.message]
        assert gap and (LOG_ID, first) == (gap[0].log_id, gap[0].seq), describe_findings(report)

    def test_deleted_object(self, s3: MotoS3, client: Any, shipped: Any, signer: Signer):
        """A plain delete (a delete marker) is a finding on its key."""
        url, segments = shipped
        key = segments[0]
        client.delete_object(Bucket=url.bucket, Key=key)
        report = self.verify(s3, url, signer)
        assert not report.ok
        assert any("delete marker" in line for line in findings_at(report, key))

    def test_bytes_that_do_not_match_their_checksum(
        self, s3: MotoS3, client: Any, shipped: Any, signer: Signer
    ):
        """An object whose bytes are not those its checksum was taken of (one byte changed on
        the way in: AWS refuses such a PUT, moto and other S3-compatible stores keep it): a
        finding on its key (exit 1), and the other objects still verified; it stopped the
        run with exit 2, "could not run", before."""
        url, segments = shipped
        key = segments[1]
        head = client.head_object(Bucket=url.bucket, Key=key)
        body = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        client.delete_object(
            Bucket=url.bucket, Key=key, VersionId=head["VersionId"], BypassGovernanceRetention=True
        )
        flipped = bytearray(body)
        flipped[len(flipped) // 2] ^= 1
        client.put_object(
            Bucket=url.bucket,
            Key=key,
            Body=bytes(flipped),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
            ObjectLockMode="GOVERNANCE",
            ObjectLockRetainUntilDate=head["ObjectLockRetainUntilDate"],
        )
        report = self.verify(s3, url, signer)
        assert not report.ok
        assert any("do not match the checksum" in line for line in findings_at(report, key))

    def test_rehashed_forgery(self, s3: MotoS3, client: Any, shipped: Any, signer: Signer):
        """A re-hashed forged last segment, re-put at its key after a bypass delete, is caught."""
        url, segments = shipped
        key = segments[-1]
        head = client.head_object(Bucket=url.bucket, Key=key)
        body = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        lines = zstandard.ZstdDecompressor().decompressobj().decompress(body).splitlines()
        forged = _forge(lines, json.loads(lines[0])["prev_hash"])
        raw = b"".join(line + b"\n" for line in forged)
        client.delete_object(
            Bucket=url.bucket,
            Key=key,
            VersionId=head["VersionId"],
            BypassGovernanceRetention=True,
        )
        _put_segment(client, url, key, raw, head["ObjectLockRetainUntilDate"])
        assert versions(client, url.bucket)[key] == 1
        report = self.verify(s3, url, signer)
        assert not report.ok
        assert findings_at(report, f"t/logs/{LOG_ID}/checkpoints/{30:020d}.checkpoint")

    def test_forgery_at_a_fresh_key(self, s3: MotoS3, client: Any, shipped: Any, signer: Signer):
        """A forged extra segment at a new key (a duplicate of seqs) is caught and named."""
        url, segments = shipped
        key = segments[-1]
        data = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        lines = zstandard.ZstdDecompressor().decompressobj().decompress(data).splitlines()
        forged = _forge(lines, json.loads(lines[0])["prev_hash"])
        first = json.loads(forged[0])["seq"]
        last = first + len(forged) - 1
        fresh = f"t/logs/{LOG_ID}/segments/2099-01-01/{first:020d}-{last:020d}.jsonl.zst"
        raw = b"".join(line + b"\n" for line in forged)
        client.put_object(
            Bucket=url.bucket,
            Key=fresh,
            Body=zstandard.ZstdCompressor().compress(raw),
            ChecksumAlgorithm="SHA256",
        )
        report = self.verify(s3, url, signer)
        assert not report.ok
        assert findings_at(report, fresh)

    def test_per_record_edit_and_delete(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Per-record: an overwritten record and a deleted one are named by their keys."""
        records = write_log(tmp_path, signer, 12)
        url = S3Url(bucket, "pr")
        ship_once(tmp_path, url, layout="per-record", client_options=options(s3))

        def key_of(record: Record) -> str:
            day = json.loads(record.leaf)["timestamp"][:10]
            return f"pr/audit/{day}/{record.event_id}.json"

        edited = records[4].leaf.replace(b"Rayleigh", b"Mie")
        client.put_object(
            Bucket=bucket, Key=key_of(records[4]), Body=edited, ChecksumAlgorithm="SHA256"
        )
        vid = client.head_object(Bucket=bucket, Key=key_of(records[7]))["VersionId"]
        client.delete_object(
            Bucket=bucket, Key=key_of(records[7]), VersionId=vid, BypassGovernanceRetention=True
        )
        client.delete_object(Bucket=bucket, Key=key_of(records[2]))  # a delete marker
        report = verify_s3(url, verify_opts(signer), client_options=options(s3))
        assert not report.ok
        lines = findings_at(report, key_of(records[4]))
        assert any(f"log={LOG_ID} seq=4 " in line and "2 versions" in line for line in lines)
        assert any("output_text_hash does not match" in line for line in lines)
        # The record after the edited one is named by its own object, in the message too.
        after = f"(seq 5, event_id {records[5].event_id}, s3://{bucket}/{key_of(records[5])})"
        assert any("record edited" in line and line.endswith(after) for line in lines), lines
        assert any(
            "expected seq 7, found 8" in line for line in findings_at(report, key_of(records[8]))
        )
        marker = findings_at(report, key_of(records[2]))
        assert any(f"log={LOG_ID} seq=2 " in line and "delete marker" in line for line in marker)
        # The key names no log, the body does: the findings are filed under it, not a new "log".
        assert [LOG_ID] == [lg.log_id for lg in report.logs]
        assert ": 1 logs," in report.summary()

    @pytest.mark.parametrize("field", ["log_id", "timestamp"])
    def test_per_record_body_naming_a_path_out_of_the_mirror(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer, field: str
    ):
        """An object whose body names a log id or day that is a path ("../../x", "/x") is a
        finding; the verifier writes nothing outside its own temporary mirror."""
        records = write_log(tmp_path / "w", signer, 4)
        url = S3Url(bucket, "esc")
        ship_once(tmp_path / "w", url, layout="per-record", client_options=options(s3))
        target = tmp_path / "escaped"
        obj = json.loads(records[3].leaf)
        event_id = str(uuid.uuid4())
        obj.update(event_id=event_id, seq=4)
        if field == "log_id":
            obj["log_id"] = f"../../../../../../../../..{target}"
        else:
            obj["timestamp"] = f"../../../../../../../../../..{target}"
        body = json.dumps(obj).encode()
        day = json.loads(records[3].leaf)["timestamp"][:10]
        client.put_object(Bucket=bucket, Key=f"esc/audit/{day}/{event_id}.json", Body=body,
                          ChecksumAlgorithm="SHA256")  # fmt: skip
        report = verify_s3(url, verify_opts(signer), client_options=options(s3))
        assert not report.ok
        assert not target.exists() and not list(tmp_path.glob("escaped*"))
        assert findings_at(report, f"esc/audit/{day}/{event_id}.json"), report.summary()

    def test_per_record_hard_deletes_caught_by_the_daily_run(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Records a checkpoint covers, deleted for good after a clean run (governance bypass,
        no delete marker): the next incremental run names each gap, the last record's too."""
        records = write_log(tmp_path, signer, 12)
        url = S3Url(bucket, "hd")
        ship_once(tmp_path, url, layout="per-record", client_options=options(s3))
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        for gone in (records[3], records[11]):
            day = json.loads(gone.leaf)["timestamp"][:10]
            key = f"hd/audit/{day}/{gone.event_id}.json"
            vid = client.head_object(Bucket=bucket, Key=key)["VersionId"]
            client.delete_object(
                Bucket=bucket, Key=key, VersionId=vid, BypassGovernanceRetention=True
            )
        report = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert not report.ok
        gaps = {(f.log_id, f.seq, f.message) for f in report.findings if "holds seqs" in f.message}
        assert {
            (LOG_ID, 3, "no record object holds seqs 3-3 (deleted objects?)"),
            (LOG_ID, 11, "no record object holds seqs 11-11 (deleted objects?)"),
        } <= gaps, describe_findings(report)

    def test_inserted_segment_caught_by_the_daily_run(
        self, s3: MotoS3, client: Any, shipped: Any, signer: Signer, tmp_path: Path
    ):
        """After a clean run, a forged segment object holding one record at a seq a checkpoint
        already covers (hashes recomputed, locked, checksummed, with the shipper's metadata):
        the next incremental run, which reads no record below what it verified, names it from
        the listing (its key range overlaps another object's)."""
        url, segments = shipped
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        key = segments[1]
        head = client.head_object(Bucket=url.bucket, Key=key)
        data = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        lines = zstandard.ZstdDecompressor().decompressobj().decompress(data).splitlines()
        (forged,) = _forge(lines[1:2], json.loads(lines[1])["prev_hash"])
        seq = json.loads(forged)["seq"]
        fresh = f"{key.rsplit('/', 1)[0]}/{seq:020d}-{seq:020d}.jsonl.zst"
        raw = forged + b"\n"
        _put_segment(client, url, fresh, raw, head["ObjectLockRetainUntilDate"])
        report = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert not report.ok
        assert any("overlap" in line for line in findings_at(report, fresh)), describe_findings(
            report
        )

    @staticmethod
    def _replace(client: Any, url: S3Url, key: str, new_key: str | None = None) -> str:
        """Delete ``key``'s only version for good (governance bypass) and put a forgery of it
        (its first record's answer changed; hashes, links, checksum and metadata recomputed;
        locked) at ``new_key``, or at the same key: either way the listing shows one version."""
        head = client.head_object(Bucket=url.bucket, Key=key)
        data = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        lines = zstandard.ZstdDecompressor().decompressobj().decompress(data).splitlines()
        forged = _forge(lines, json.loads(lines[0])["prev_hash"])
        client.delete_object(
            Bucket=url.bucket, Key=key, VersionId=head["VersionId"], BypassGovernanceRetention=True
        )
        target = new_key or key
        raw = b"".join(line + b"\n" for line in forged)
        _put_segment(client, url, target, raw, head["ObjectLockRetainUntilDate"])
        return target

    @pytest.mark.parametrize("where", ["same key", "another day"])
    def test_replaced_segment_caught_by_the_daily_run(
        self, s3: MotoS3, client: Any, shipped: Any, signer: Signer, tmp_path: Path, where: str
    ):
        """After a clean run, a segment a checkpoint covers deleted for good and a forgery put
        in its place (same key, or the same range under another day): one version in the
        listing, content and checksum consistent. The next incremental run, which reads no
        record below what it verified, names it: it was written after what that run read."""
        url, segments = shipped
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        time.sleep(1.1)  # S3's LastModified counts whole seconds
        key = segments[1]
        day = key.split("/segments/")[1].split("/")[0]
        new_key = None if where == "same key" else key.replace(f"/{day}/", "/2020-01-01/")
        put = self._replace(client, url, key, new_key)
        report = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert not report.ok
        assert any("put in its place" in line for line in findings_at(report, put)), (
            describe_findings(report)
        )
        # It stays a finding on the runs after (the run that found it remembers nothing new).
        again = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert any("put in its place" in line for line in findings_at(again, put))

    def test_replaced_record_caught_by_the_daily_run(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Per-record: after a clean run, a sealed record's object deleted for good and a
        forgery put at its key (hashes and metadata recomputed): named by the next run."""
        records = write_log(tmp_path, signer, 12)
        url = S3Url(bucket, "rp")
        ship_once(tmp_path, url, layout="per-record", client_options=options(s3))
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        time.sleep(1.1)  # S3's LastModified counts whole seconds
        obj = json.loads(records[5].leaf)
        key = f"rp/audit/{obj['timestamp'][:10]}/{obj['event_id']}.json"
        head = client.head_object(Bucket=bucket, Key=key)
        client.delete_object(
            Bucket=bucket, Key=key, VersionId=head["VersionId"], BypassGovernanceRetention=True
        )
        obj["output_text"] = "forged answer"
        obj["output_text_hash"] = hashlib.sha256(b"forged answer").hexdigest()
        leaf = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=leaf,
            ChecksumAlgorithm="SHA256",
            ObjectLockMode="GOVERNANCE",
            ObjectLockRetainUntilDate=head["ObjectLockRetainUntilDate"],
            Metadata={"tokentrail-sha256": hashlib.sha256(leaf).hexdigest()},
        )
        report = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert not report.ok
        named = [f for f in report.findings if "put in its place" in f.message]
        assert [(LOG_ID, 5, obj["event_id"], f"s3://{bucket}/{key}")] == [
            (f.log_id, f.seq, f.event_id, f.location) for f in named
        ], describe_findings(report)

    @pytest.mark.parametrize(
        "body",
        [
            b"{",
            b'{"store": "s3://other/x", "logs": {}}',
            b'{"store": "s3://b/p", "logs": []}',
            b'{"store": "s3://b/p", "logs": {"l": {"size": "3", "newest": "'
            b'2026-01-01T00:00:00.000000Z"}}}',
            b'{"store": "s3://b/p", "logs": {"l": {"size": 3, "newest": "yesterday"}}}',
        ],
        ids=["not-json", "another-store", "not-an-object", "size-a-string", "not-a-time"],
    )
    def test_damaged_written_state_is_refused(self, tmp_path: Path, body: bytes) -> None:
        """The remembered sizes and times, damaged or another store's, are refused in one
        line that says what to do, never read as "nothing remembered" (which would turn the
        replacement check off)."""
        from tokentrail._s3._read import _written_path, load_written

        _written_path(tmp_path, "s3://b/p").write_bytes(body)
        with pytest.raises(StoreError, match="remove it to start over"):
            load_written(tmp_path, "s3://b/p")

    def test_daily_runs_after_more_records_stay_clean(
        self, s3: MotoS3, bucket: str, tmp_path: Path, signer: Signer
    ):
        """Segments and checkpoints shipped after a clean run are new, not replacements: the
        runs after it stay clean."""
        write_log(tmp_path, signer, 12)
        url = S3Url(bucket, "more")
        ship_once(tmp_path, url, client_options=options(s3))
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        time.sleep(1.1)
        write_log(tmp_path, signer, 12)  # the same log, continued
        ship_once(tmp_path, url, client_options=options(s3))
        for _ in range(2):
            report = verify_s3(
                url, verify_opts(signer, state_dir=state), client_options=options(s3)
            )
            assert report.ok, describe_findings(report)

    def test_inserted_record_caught_by_the_daily_run(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Per-record: after a clean run, a forged copy of a sealed record under a fresh event
        id (its own key) is named by the next incremental run: two objects hold its seq."""
        records = write_log(tmp_path, signer, 12)
        url = S3Url(bucket, "ins")
        ship_once(tmp_path, url, layout="per-record", client_options=options(s3))
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        obj = json.loads(records[5].leaf)
        obj["event_id"] = str(uuid.uuid4())
        obj["output_text"] = "forged answer"
        obj["output_text_hash"] = hashlib.sha256(b"forged answer").hexdigest()
        leaf = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        fresh = f"ins/audit/{obj['timestamp'][:10]}/{obj['event_id']}.json"
        client.put_object(
            Bucket=bucket,
            Key=fresh,
            Body=leaf,
            ChecksumAlgorithm="SHA256",
            Metadata={"tokentrail-sha256": hashlib.sha256(leaf).hexdigest()},
        )
        report = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert not report.ok
        named = [f for f in report.findings if "two record objects hold seq 5" in f.message]
        assert named and {(LOG_ID, 5)} == {(f.log_id, f.seq) for f in named}, describe_findings(
            report
        )

    def test_log_deleted_caught_by_the_daily_run(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Every object of one log deleted for good after a clean run (governance bypass, no
        delete markers): nothing of it is left to read, and the witness state of the earlier
        run, kept under the store's s3:// URL, says it was there."""
        write_log(tmp_path / "a", signer, 12, log_id="keep")
        write_log(tmp_path / "b", signer, 12, log_id="gone")
        url = S3Url(bucket, "lg")
        for root in (tmp_path / "a", tmp_path / "b"):
            ship_once(root, url, client_options=options(s3))
        state = tmp_path / "state"
        assert verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3)).ok
        for key in keys_under(client, bucket, "lg/logs/gone/"):
            vid = client.head_object(Bucket=bucket, Key=key)["VersionId"]
            client.delete_object(
                Bucket=bucket, Key=key, VersionId=vid, BypassGovernanceRetention=True
            )
        report = verify_s3(url, verify_opts(signer, state_dir=state), client_options=options(s3))
        assert not report.ok
        (gone,) = [f for f in report.findings if "log deleted" in f.message]
        assert (gone.log_id, gone.location) == ("gone", f"s3://{bucket}/lg/logs/gone")

    def test_findings_name_objects_not_the_mirror(
        self, s3: MotoS3, client: Any, shipped: Any, signer: Signer
    ):
        """An edited record (one byte, no hash recomputed): every finding names S3 objects,
        in its location and in its message, never the temporary mirror's files."""
        url, segments = shipped
        key = segments[1]
        data = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        edited = raw.replace(b"prompt number", b"prompt numbeR", 1)
        client.put_object(
            Bucket=url.bucket,
            Key=key,
            Body=zstandard.ZstdCompressor().compress(edited),
            ChecksumAlgorithm="SHA256",
        )
        report = verify_s3(url, verify_opts(signer, full=True), client_options=options(s3))
        assert not report.ok
        lines = [f.to_line() for f in report.findings]
        assert any("record edited" in line for line in lines), lines
        assert not [line for line in lines if "tokentrail-s3-" in line], lines
        edited_lines = [line for line in lines if "record edited" in line]
        assert all(f"s3://{url.bucket}/" in line.split(": ", 1)[1] for line in edited_lines)

    def test_shortened_retention(self, s3: MotoS3, client: Any, shipped: Any, signer: Signer):
        """A retention shortened (governance bypass) below the configured days is a finding."""
        url, segments = shipped
        key = segments[0]
        client.put_object_retention(
            Bucket=url.bucket,
            Key=key,
            BypassGovernanceRetention=True,
            Retention={
                "Mode": "GOVERNANCE",
                "RetainUntilDate": datetime.now(UTC) + timedelta(days=1),
            },
        )
        report = self.verify(s3, url, signer)
        assert not report.ok
        assert any("retention ends" in line for line in findings_at(report, key))


# --------------------------------------------------------------------------------------------
# Outages
# --------------------------------------------------------------------------------------------


class TestOutage:
    def test_unreachable_store_fails_after_retries_and_loses_nothing(
        self, s3: MotoS3, bucket: str, client: Any, tmp_path: Path, signer: Signer
    ):
        """Against a closed port: retries with backoff, a StoreError, no progress; then it ships."""
        records = write_log(tmp_path, signer, 20)
        outage = Outage(s3.port)  # never brought up: the port refuses connections
        url = S3Url(bucket, "o")
        config = ShipperConfig(
            root=tmp_path,
            url=url,
            client=options(s3, outage.endpoint),
            max_attempts=3,
            backoff_base_s=0.01,
            backoff_cap_s=0.05,
        )
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
            Shipper(config).ship_once()
        assert time.monotonic() - started < 10
        assert not (tmp_path / "logs" / LOG_ID / "shipped.json").exists()
        ship_once(tmp_path, url, client_options=options(s3))
        assert verify_s3(url, verify_opts(signer), client_options=options(s3)).ok
        assert count_all(url, s3, days_of(tmp_path, records)) == 20

    def test_spool_alarm_while_unreachable(
        self,
        s3: MotoS3,
        bucket: str,
        tmp_path: Path,
        signer: Signer,
        caplog: pytest.LogCaptureFixture,
    ):
        """Unshipped local data past 80 % of the budget logs a warning naming the store."""
        write_log(tmp_path, signer, 10)
        on_disk = sum(p.stat().st_size for p in tmp_path.glob("logs/*/segments/*/*"))
        outage = Outage(s3.port)
        config = ShipperConfig(
            root=tmp_path,
            url=S3Url(bucket),
            client=options(s3, outage.endpoint),
            max_attempts=1,
            max_spool_bytes=int(on_disk / 0.9),
        )
        shipper = Shipper(config)
        with caplog.at_level(logging.WARNING, "tokentrail.s3"), pytest.raises(StoreError):
            shipper.ship_once()
        assert shipper.unshipped_bytes == on_disk and not shipper.spool_full
        assert any(
            "spool at 90%" in r.getMessage() and f"s3://{bucket}" in r.getMessage()
            for r in caplog.records
        )

    def test_outage_during_steady_load(
        self,
        s3: MotoS3,
        bucket: str,
        client: Any,
        tmp_path: Path,
        signer: Signer,
        caplog: pytest.LogCaptureFixture,
    ):
        """S3 goes away for 2 s under load and comes back: every record is in S3 exactly once."""
        from conftest import exchange_for

        caplog.set_level(logging.WARNING, "tokentrail.s3")
        outage = Outage(s3.port)
        outage.up()
        url = S3Url(bucket, "load")
        shipper = Shipper(
            ShipperConfig(
                root=tmp_path,
                url=url,
                client=options(s3, outage.endpoint),
                max_attempts=2,
                backoff_base_s=0.05,
                backoff_cap_s=0.2,
            )
        )
        cfg = LedgerConfig(tmp_path, LOG_ID, signer, rotate_interval_s=0.2, seal_interval_s=0.3)
        records: list[Record] = []
        with Ledger.open(cfg) as ledger:
            records.append(ledger.append(exchange_for(0)))
            shipper.start(interval_s=0.1)
            try:
                deadline = time.monotonic() + 4.0
                went_down = came_up = False
                while time.monotonic() < deadline:
                    records.append(ledger.append(exchange_for(len(records))))
                    left = deadline - time.monotonic()
                    if not went_down and left < 3.0:
                        outage.down()
                        went_down = True
                    if not came_up and left < 1.0:
                        outage.up()
                        came_up = True
                    time.sleep(0.01)
            finally:
                pass
        # The writer is closed: every segment is closed; wait for the shipper to catch up.
        days = days_of(tmp_path, records)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and count_all(url, s3, days) < len(records):
            time.sleep(0.2)
        shipper.stop(timeout=10)
        outage.down()
        assert any("failed" in r.getMessage() for r in caplog.records)
        assert count_all(url, s3, days) == len(records)
        assert set(versions(client, bucket).values()) == {1}
        result = verify_s3(url, verify_opts(signer), client_options=options(s3))
        assert result.ok, [f.to_line() for f in result.findings]
        assert sum(lg.verified_size for lg in result.logs) == len(records)


# --------------------------------------------------------------------------------------------
# CLI and cost
# --------------------------------------------------------------------------------------------


class TestCli:
    def test_ship_once(self, s3: MotoS3, bucket: str, tmp_path: Path, signer: Signer):
        """`tokentrail ship --once` ships and prints one summary line."""
        write_log(tmp_path, signer, 5)
        out = CliRunner().invoke(
            ship_command,
            [
                "--ledger",
                str(tmp_path),
                "--s3",
                f"s3://{bucket}/cli",
                "--once",
                "--endpoint-url",
                s3.endpoint,
                "--layout",
                "per-record",
            ],
        )
        assert out.exit_code == 0, out.output
        assert out.output.startswith("shipped 2 segments (5 records") or "5 records" in out.output

    def test_ship_once_as_a_command(
        self, s3: MotoS3, bucket: str, tmp_path: Path, signer: Signer
    ) -> None:
        """The command's own process: its summary says what was sent and what S3 had, and its
        log is tokentrail's alone (botocore's "Found credentials in environment variables."
        came out on every run). Shipped again from scratch (the progress file gone), nothing
        is sent: every object is counted as there already, with 0 bytes sent (a per-record
        segment's bytes were counted by whether any object was there)."""
        write_log(tmp_path, signer, 5)
        args = [sys.executable, "-m", "tokentrail", "ship", "--ledger", str(tmp_path), "--s3",
                f"s3://{bucket}/cmd", "--once", "--endpoint-url", s3.endpoint, "--layout",
                "per-record"]  # fmt: skip
        first = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert (0, "") == (first.returncode, first.stderr), first.stderr
        summary = re.fullmatch(
            r"shipped (\d+) segments \(5 records\) and (\d+) checkpoints, (\d+) bytes sent; 0 of"
            r" their objects were in S3 already \(not sent again\); 0 local bytes not yet in S3\n",
            first.stdout,
        )
        assert summary is not None and int(summary.group(3)) > 0, first.stdout
        checkpoints = int(summary.group(2))
        (tmp_path / "logs" / LOG_ID / "shipped.json").unlink()
        again = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert (0, "") == (again.returncode, again.stderr), again.stderr
        assert again.stdout.startswith(
            f"shipped {summary.group(1)} segments (5 records) and {checkpoints} checkpoints, 0"
            f" bytes sent; {5 + checkpoints} of their objects were in S3 already"
        ), again.stdout

    def test_cost_table(self):
        """`tokentrail cost` prints both layouts with the seed's PUT count."""
        out = CliRunner().invoke(cost_command, ["--rps", "100", "--tokens-per-exchange", "500"])
        assert out.exit_code == 0, out.output
        assert "per-record (seed)" in out.output and "batched (60s zstd)" in out.output
        assert f"{100 * SECONDS_PER_MONTH + 43_800:,}" in out.output
        assert "aws.amazon.com/s3/pricing" in out.output


class TestCost:
    def test_put_counts(self):
        """Per-record: one PUT per exchange; batched: two per log-minute (segment, checkpoint)."""
        _, (per_record, batched) = estimate(100, 100)
        minutes = SECONDS_PER_MONTH // 60
        assert per_record.puts_per_month == 100 * SECONDS_PER_MONTH + minutes
        assert batched.puts_per_month == 2 * minutes
        assert per_record.put_cost == pytest.approx(per_record.puts_per_month / 1000 * 0.005)
        assert batched.gb_per_month < per_record.gb_per_month

    def test_size_rotation_adds_segments(self):
        """When a minute of records passes the 64 MiB segment size, each extra segment is a PUT."""
        sample, (_, batched) = estimate(100, 1000)
        minutes = SECONDS_PER_MONTH // 60
        per_minute = 100 * 60 * sample.record_bytes
        extra = -(-per_minute // (64 << 20))  # ceil
        assert batched.puts_per_month == minutes * (1 + extra)


class TestKeys:
    @pytest.mark.parametrize(
        "rel",
        [
            "logs/a/checkpoints/00000000000000000001.checkpoint",
            "logs/a/segments/2026-01-01/00000000000000000000-00000000000000000009.jsonl.zst",
            "audit/2026-01-01/0f7c1e62-0000-4000-8000-000000000000.json",
        ],
    )
    def test_a_key_with_a_trailing_newline_is_not_ours(self, rel: str) -> None:
        """S3 keys may end in a newline, which a ``$`` in a pattern lets through: such a key
        is no key tokentrail writes (a stray, for verify), never a second copy of one."""
        from tokentrail._s3._client import S3Url
        from tokentrail._s3._keys import parse_key

        url = S3Url("bucket", "prefix")
        assert parse_key(url, f"prefix/{rel}") is not None
        assert parse_key(url, f"prefix/{rel}\n") is None

    def test_a_skewed_clock_is_named(self) -> None:
        """S3's RequestTimeTooSkewed, once retries are spent, says what to fix."""
        from tokentrail._s3._client import map_error

        response = {"Error": {"Code": "RequestTimeTooSkewed", "Message": "The difference..."}}
        error = map_error(ClientError(response, "PutObject"), "PutObject x")  # type: ignore[arg-type]
        assert isinstance(error, StoreError)
        assert str(error).endswith("check its time sync, NTP or chrony)")
