"""Ingest benchmark: strict-durability appends of ~1,000-in/300-out token records.

Compares, in one run, 1, 16 and 64 concurrent appenders on the async API and 16 threads on the
sync API, all writing one log on the local disk with fsync group commit.

    python bench/ingest.py [--records 20000] [--dir /path/on/the/disk/to/measure]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from _common import exchange, pct, table
from tokentrail import AsyncLedger, Ledger, LedgerConfig, Signer


def _count_fsyncs() -> list[int]:
    counter = [0]
    real = os.fsync

    def counting(fd: int) -> None:
        counter[0] += 1
        real(fd)

    os.fsync = counting  # type: ignore[assignment]
    return counter


async def run_async(root: Path, signer: Signer, records: int, conc: int, pool: list) -> dict:
    config = LedgerConfig(root=root, log_id=f"async-{conc}", signer=signer)
    ledger = await AsyncLedger.open(config)
    latencies: list[float] = []

    async def worker(n: int, offset: int) -> None:
        for i in range(n):
            t0 = time.perf_counter()
            await ledger.append(pool[(offset + i) % len(pool)])
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(records // conc, k * 7) for k in range(conc)))
    elapsed = time.perf_counter() - start
    await ledger.close()
    return {"api": "async", "conc": conc, "n": len(latencies), "s": elapsed, "lat": latencies}


def run_threads(root: Path, signer: Signer, records: int, conc: int, pool: list) -> dict:
    ledger = Ledger.open(LedgerConfig(root=root, log_id=f"sync-{conc}", signer=signer))
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int, offset: int) -> None:
        mine = []
        for i in range(n):
            t0 = time.perf_counter()
            ledger.append(pool[(offset + i) % len(pool)])
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(records // conc, k * 7)) for k in range(conc)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ledger.close()
    return {
        "api": "sync (threads)",
        "conc": conc,
        "n": len(latencies),
        "s": elapsed,
        "lat": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tt-ingest-", dir=args.dir))
    rng = random.Random(7)
    pool = [exchange(rng) for _ in range(64)]
    line_bytes = len(pool[0].content_bytes())
    signer = Signer.generate("bench")
    fsyncs = _count_fsyncs()
    rows = []
    try:
        for conc in (1, 16, 64):
            n = args.records if conc > 1 else max(1000, args.records // 10)
            before = fsyncs[0]
            r = asyncio.run(run_async(base / f"a{conc}", signer, n, conc, pool))
            r["fsyncs"] = fsyncs[0] - before
            rows.append(r)
        before = fsyncs[0]
        r = run_threads(base / "t16", signer, args.records, 16, pool)
        r["fsyncs"] = fsyncs[0] - before
        rows.append(r)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"record size ~{line_bytes} bytes (1000 input + 300 output token ids), strict durability")
    print(
        table(
            [
                "API",
                "appenders",
                "records",
                "records/s",
                "MB/s",
                "records/fsync",
                "p50 ms",
                "p99 ms",
            ],
            [
                [
                    r["api"],
                    r["conc"],
                    r["n"],
                    f"{r['n'] / r['s']:,.0f}",
                    f"{r['n'] * line_bytes / r['s'] / 1e6:.1f}",
                    f"{r['n'] / max(1, r['fsyncs']):.1f}",
                    f"{pct(r['lat'], 50) * 1e3:.2f}",
                    f"{pct(r['lat'], 99) * 1e3:.2f}",
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
