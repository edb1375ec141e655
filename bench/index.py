"""Search index benchmark: index build rate and ``search --user`` latency on a large ledger.

Builds a ledger of small records (async durability) once under ``--dir``, then times
``tokentrail index --rebuild``, an incremental update with nothing new, and searches for one
user's records (the first 100, as the table shows them, and all of them as JSON), each hit
re-checked against its leaf and proven under its log's signed checkpoint as ``search`` does
(the first time from every indexed leaf hash, then from the compact range the index keeps).
Targets (issue 6): build >= 50,000 records/s, a user's search < 200 ms.

    python bench/index.py --records 1000000 --dir /tmp/tt-bench-index
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from _common import table
from tokentrail import Exchange
from tokentrail._audit import Filters, Index, search
from tokentrail._audit._show import LogProver
from tokentrail._checkpoint import Signer, Verifier
from tokentrail._layout import list_logs
from tokentrail._ledger import Ledger, LedgerConfig

USERS = 50


def build_ledger(root: Path, records: int, logs: int) -> float:
    """Write ``records`` small records over ``logs`` logs; returns seconds."""
    signer = Signer.generate("bench-index")
    root.mkdir(parents=True, exist_ok=True)
    (root.parent / f"{root.name}.pub").write_text(signer.verifier.to_text() + "\n")
    started = time.perf_counter()
    per = records // logs
    for log in range(logs):
        with Ledger.open(LedgerConfig(root, f"bench-{log}", signer, durability="async")) as led:
            for i in range(per):
                k = log * per + i
                led.append(
                    Exchange(
                        model=("llama3.2:1b", "qwen2.5:0.5b")[k % 2],
                        api="sdk",
                        stop_reason="stop",
                        input_text=f"question {k}",
                        output_text=f"answer {k}",
                        input_tokens=[k % 50_000, 13],
                        output_tokens=[k % 7],
                        user_id=f"user-{k % USERS}",
                        session_id=f"s-{k % 20_000}",
                    )
                )
    return time.perf_counter() - started


def timed(fn: object, repeat: int) -> list[float]:
    """Milliseconds of ``repeat`` calls."""
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--logs", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tt-bench-index"))
    args = parser.parse_args()
    root = args.dir / f"ledger-{args.records}"
    pub = args.dir / f"ledger-{args.records}.pub"
    if not (root / "logs").exists() or not pub.exists():
        shutil.rmtree(root, ignore_errors=True)
        secs = build_ledger(root, args.records, args.logs)
        print(f"wrote {args.records:,} records in {secs:.1f} s ({args.records / secs:,.0f}/s)")
    rows = []
    with Index.open(root, rebuild=True) as index:
        stats = index.update()
        rate = stats.added / stats.seconds
        rows.append(("index --rebuild", f"{stats.added:,} records", f"{stats.seconds:.2f} s",
                     f"{rate:,.0f} records/s", "PASS" if rate >= 50_000 else "FAIL"))  # fmt: skip
        noop = timed(index.update, 5)
        rows.append(("index (nothing new)", "", f"{statistics.median(noop):.1f} ms", "", ""))
        verifiers = [Verifier.from_text(pub.read_text().strip())]

        def proven(limit: int | None) -> int:
            """search as the command runs it: the hits, each proven under its checkpoint."""
            hits = search(root, index, Filters(user="user-7"), limit).hits
            prover = LogProver(root, index, verifiers)
            assert all(prover.check(hit).proven for hit in hits)
            return len(hits)

        for log in list_logs(root):  # the first search hashes every leaf: timed alone
            index.conn.execute("DELETE FROM meta WHERE key = ?", (f"proven:{log}",))
        first = timed(lambda: proven(100), 1)[0]
        rows.append(("first proven search", "every leaf hashed", f"{first:.1f} ms", "", ""))
        for label, limit in (("search --user (100 rows)", 100), ("search --user --limit 0", None)):
            hits = [0]

            def once(limit: int | None = limit, hits: list[int] = hits) -> None:
                hits[0] = proven(limit)

            ms = timed(once, 7)
            p50 = statistics.median(ms)
            rows.append((label, f"{hits[0]:,} hits re-checked, proven", f"{p50:.1f} ms p50",
                         f"{max(ms):.1f} ms max", "PASS" if p50 < 200 else "FAIL"))  # fmt: skip
        ms = timed(lambda: search(root, index, Filters(text="question 4242"), 100), 5)
        rows.append(("search --text (100 rows)", "", f"{statistics.median(ms):.1f} ms p50",
                     "", ""))  # fmt: skip
    size = sum(p.stat().st_size for p in (root / "index").iterdir())
    rows.append(("index size", "", f"{size / 1e6:.0f} MB", f"{size / args.records:.0f} B/record",
                 ""))  # fmt: skip
    print(table(("step", "work", "time", "rate", "target"), rows))


if __name__ == "__main__":
    main()
