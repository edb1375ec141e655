"""S3 with Object Lock: the scale-out store (SPEC sections 3, 4 and 6).

::

    _client   s3://bucket/prefix, the boto3 client, botocore errors -> ours
    _keys     the S3 key layout (batched segments, checkpoints, per-record objects)
    _bucket   s3 init / s3 check: versioning, Object Lock, default retention
    _shipper  local ledger -> S3: closed segments, then the checkpoints they complete
    _read     S3 -> local mirror -> verify_local, plus S3-only findings; count; prove
    _cost     monthly PUTs and storage per layout
    _cli      the click commands (s3 init/check, ship, cost)

boto3 is used with a thread pool (``asyncio.to_thread`` from async code); aioboto3 is not
needed. Needs the ``s3`` extra: ``pip install 'tokentrail[s3]'``.
"""

from __future__ import annotations

from .._ledger import writer_is_live
from ._bucket import BucketStatus, Retention, check_bucket, init_bucket, read_status
from ._client import ClientOptions, S3Url, make_client
from ._cost import CostRow, estimate, measure_records
from ._keys import checkpoint_key, parse_key, record_key, segment_key
from ._read import MirrorResult, count_s3, mirror_s3, mirror_store, prove_s3, verify_s3
from ._shipper import Shipper, ShipperConfig, ShipReport, ship_once

__all__ = [
    "BucketStatus",
    "ClientOptions",
    "CostRow",
    "MirrorResult",
    "Retention",
    "S3Url",
    "ShipReport",
    "Shipper",
    "ShipperConfig",
    "check_bucket",
    "checkpoint_key",
    "count_s3",
    "estimate",
    "init_bucket",
    "make_client",
    "measure_records",
    "mirror_s3",
    "mirror_store",
    "parse_key",
    "prove_s3",
    "read_status",
    "record_key",
    "segment_key",
    "ship_once",
    "verify_s3",
    "writer_is_live",
]
