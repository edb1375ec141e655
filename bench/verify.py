"""Verify benchmark: records/s, MB/s and peak RSS of `tokentrail verify` on a large ledger.

Builds a ledger of ``--size-mb`` MB (default 512) of ~1,000-in/300-out token records, then runs
`tokentrail verify --all` in a child process, once over plain segments and once with sealed
segments zstd-compressed, and prints a table.

    python bench/verify.py [--size-mb 512] [--dir /path]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import exchange, table
from tokentrail import AsyncLedger, LedgerConfig, Signer
from tokentrail._ledger import compress_segment
from tokentrail._record import new_event_id


async def build(root: Path, signer: Signer, size_mb: int) -> int:
    rng = random.Random(11)
    pool = [exchange(rng) for _ in range(256)]
    line = len(pool[0].content_bytes())
    records = size_mb * 1_000_000 // line
    config = LedgerConfig(root=root, log_id="bench", signer=signer, durability="async")
    ledger = await AsyncLedger.open(config)
    for i in range(records):
        # (each record its own event_id: ids are unique within a store, and verify checks)
        await ledger.append(replace(pool[i % len(pool)], event_id=new_event_id()))
        if i % 2000 == 0:
            await asyncio.sleep(0)
    await ledger.close()
    return records


def ledger_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.jsonl*") if p.is_file())


def run_verify(root: Path, pub: str, state: Path) -> tuple[float, int, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrail",
            "verify",
            "--ledger",
            str(root),
            "--all",
            "--public-key",
            pub,
            "--state",
            str(state),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"verify failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return elapsed, max(peak_kb, before), proc.stdout.splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="tt-verify-", dir=args.dir))
    try:
        signer = Signer.generate("bench")
        pub = signer.verifier.to_text()
        root = base / "ledger"
        t0 = time.perf_counter()
        records = asyncio.run(build(root, signer, args.size_mb))
        build_s = time.perf_counter() - t0
        plain = ledger_bytes(root)
        rows = []
        secs, rss, _ = run_verify(root, pub, base / "state1")
        rows.append(
            [
                "plain .jsonl",
                records,
                f"{plain / 1e6:,.0f}",
                f"{secs:.1f}",
                f"{records / secs:,.0f}",
                f"{plain / secs / 1e6:.0f}",
                f"{rss / 1024:.0f}",
            ]
        )
        for seg in sorted(root.rglob("*.jsonl")):
            compress_segment(seg)
        packed = ledger_bytes(root)
        secs, rss, _ = run_verify(root, pub, base / "state2")
        rows.append(
            [
                f"zstd .jsonl.zst ({packed / 1e6:,.0f} MB on disk)",
                records,
                f"{plain / 1e6:,.0f}",
                f"{secs:.1f}",
                f"{records / secs:,.0f}",
                f"{plain / secs / 1e6:.0f}",
                f"{rss / 1024:.0f}",
            ]
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"built {records:,} records ({plain / 1e6:,.0f} MB) in {build_s:.1f}s;"
        " verify --all in a child process, one core"
    )
    print(table(["segments", "records", "MB", "seconds", "records/s", "MB/s", "peak RSS MB"], rows))


if __name__ == "__main__":
    main()
