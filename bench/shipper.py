"""S3 shipper benchmark: records/s shipped to a local S3 server, PUTs/hour, bytes per token.

Writes ``--seconds`` of simulated traffic at ``--rps`` exchanges/s (a simulated clock drives the
writer's one-minute rotation and sealing, as in production) to a local ledger, then ships it to
moto's S3 server over loopback HTTP in each layout, counting the PUTs boto3 sends and the bytes
the bucket holds. PUTs/hour is the measured count scaled to an hour.

    python bench/shipper.py [--rps 100] [--seconds 60] [--tokens 400]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import exchange, table
from s3server import MotoS3, use_dummy_credentials
from tokentrail import Ledger, LedgerConfig, Signer
from tokentrail._s3 import ClientOptions, S3Url, Shipper, ShipperConfig, make_client
from tokentrail._s3._cost import WORDS


def write_ledger(root: Path, rps: int, seconds: int, tokens: int) -> int:
    """``rps * seconds`` records, with a simulated clock advancing 1/rps per record."""
    now = [time.time()]
    signer = Signer.generate("bench-key")
    config = LedgerConfig(
        root,
        "bench-proxy-1",
        signer,
        durability="async",
        rotate_interval_s=60.0,
        seal_interval_s=60.0,
        clock=lambda: now[0],
    )
    rng = random.Random(1)
    n_in = tokens * 3 // 4
    n = rps * seconds
    with Ledger.open(config) as ledger:
        for _ in range(n):
            # Every record distinct (fresh token ids and words), so zstd cannot cheat.
            base = exchange(rng, n_in, tokens - n_in)
            ledger.append(
                replace(base, input_text=words(rng, n_in), output_text=words(rng, tokens - n_in))
            )
            now[0] += 1.0 / rps
    return n


def words(rng: random.Random, tokens: int) -> str:
    """About four characters of English-like text per token."""
    return " ".join(rng.choice(WORDS) for _ in range(tokens * 4 // 5))


def bucket_bytes(client: Any, bucket: str, prefix: str) -> tuple[int, int]:
    size = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            size += obj["Size"]
            count += 1
    return size, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=400, help="tokens per exchange")
    args = parser.parse_args()

    use_dummy_credentials()
    server = MotoS3().start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "ledger"
            records = write_ledger(root, args.rps, args.seconds, args.tokens)
            raw = sum(p.stat().st_size for p in root.glob("logs/*/segments/*/*"))
            for layout in ("batched", "per-record"):
                bucket = server.new_bucket()
                client = make_client(ClientOptions(endpoint_url=server.endpoint, attempts=1))
                puts = [0]

                def count(**_: Any) -> None:
                    puts[0] += 1  # noqa: B023 - one counter per layout, read right after

                client.meta.events.register("before-call.s3.PutObject", count)
                shipper = Shipper(
                    ShipperConfig(
                        root=root,
                        url=S3Url(bucket, "bench"),
                        layout=layout,  # type: ignore[arg-type]
                        workers=16,
                    ),
                    client,
                )
                started = time.perf_counter()
                report = shipper.ship_once()
                elapsed = time.perf_counter() - started
                assert report.records == records, report.summary()
                stored, objects = bucket_bytes(client, bucket, "bench/")
                rows.append(
                    [
                        layout,
                        f"{records:,}",
                        f"{elapsed:.2f}",
                        f"{records / elapsed:,.0f}",
                        f"{puts[0]:,}",
                        f"{puts[0] * 3600 / args.seconds * 100 / args.rps:,.0f}",
                        f"{objects:,}",
                        f"{stored:,}",
                        f"{stored / (records * args.tokens):.2f}",
                    ]
                )
    finally:
        server.stop()
    print(
        f"{args.rps} exchanges/s simulated for {args.seconds} s, {args.tokens} tokens each;"
        f" local ledger {raw:,} bytes ({raw / (records * args.tokens):.2f} bytes/token);"
        f" moto S3 server on loopback, 16 upload threads"
    )
    print()
    print(
        table(
            [
                "layout",
                "records",
                "ship s",
                "records/s",
                "PUTs",
                "PUTs/hour at 100/s",
                "objects",
                "bytes stored",
                "bytes/token",
            ],
            rows,
        )
    )
    print()
    print(
        "PUTs include one checkpoint per log per minute; records/s is bounded by moto's Python"
        " server (one PUT per record in the per-record layout), not by S3."
    )


if __name__ == "__main__":
    main()
